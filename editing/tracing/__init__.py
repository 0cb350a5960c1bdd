"""Causal tracing (Meng et al. 2022, §2.1): which hidden states carry a fact.

Three runs: clean; corrupted (Gaussian noise on the subject's token embeddings, ``samples``
copies); corrupted-with-restoration (one clean state copied back in). A restoration's score
is the corrupted copies' mean probability of the answer; minus the corrupted baseline it is
the state's indirect effect.

``method="plain"`` is the reference: one forward pass per restoration. ``method="fast"``
gives the same numbers from less work. Restorations at one token share a pass as batch rows,
each row joining the batch at its first restored layer, fed the corrupted run's state there
(below that layer it would only repeat the corrupted run); tokens before the restored one are
read from the corrupted run's key/value cache (restoring token ``t`` changes nothing before
``t``, and nothing at all before the subject); only the last position is unembedded.
The model's weights are unchanged on return, and no hook outlives a call.

``precision="bfloat16"`` runs the same restorations on a twin of the model, built per trace, whose
matrix weights are bfloat16 (residual stream, norms and softmax stay float32, under autocast). On a CPU with
native bfloat16 (AVX512-BF16, AMX) its matrix products run several times faster; the scores move
by a few thousandths of probability (``bench/trace_speed.py`` prints the largest difference).
``"float32"`` is exact; ``"auto"`` picks bfloat16 on such a CPU and float32 elsewhere.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.arch import n_layers
from editing.tokens import encode
from editing.tracing.noise import NOISE_TEXTS, corrupt_subject, embedding_std, make_noise
from editing.precision import arithmetic, resolve_precision
from editing.tracing.result import (
    WEAK_SHARE, TraceResult, best_at_last_subject, strongest_mlp_site, suggest_layer, suggestion_is_weak,
)
from editing.tracing.runs import KINDS, _prepare, _trace_fast, _trace_plain

__all__ = [
    "KINDS", "NOISE_TEXTS", "WEAK_SHARE", "TraceResult", "best_at_last_subject", "corrupt_subject", "embedding_std",
    "make_noise", "strongest_mlp_site", "suggest_layer", "suggestion_is_weak", "trace",
]
Progress = Callable[[str, float], None]


def _validate(
    prompt: str, subject: str, expected: str | None, samples: int, window: int, kinds: Sequence[str], method: str,
    noise: float | None,
) -> None:
    for field, value in (("prompt", prompt), ("subject", subject)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{field} is empty; type the {field} of the fact to trace")
    if expected is not None and (not isinstance(expected, str) or not expected.strip()):
        raise ValueError("expected answer is empty; leave it out to trace the model's own top answer")
    if subject not in prompt:
        raise ValueError(f"subject {subject!r} does not occur in the prompt {prompt!r}; copy it exactly")
    for field, number in (("samples", samples), ("window", window)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"{field} must be a whole number ≥ 1, got {number!r}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be some of {', '.join(KINDS)}; got {list(kinds)!r}")
    if method not in ("fast", "plain"):
        raise ValueError(f"method must be 'fast' or 'plain', got {method!r}")
    if noise is not None and not (isinstance(noise, (int, float)) and 0 <= noise < float("inf")):
        raise ValueError(f"noise must be a finite standard deviation ≥ 0, got {noise!r}")


def _model_name(model: PreTrainedModel) -> str:
    """The model folder's name, without the hash suffix the loader gives its converted copies."""
    name = str(getattr(model, "name_or_path", "") or getattr(model.config, "model_type", "model"))
    return re.sub(r"-[0-9a-f]{16}$", "", name.rstrip("/").rsplit("/", 1)[-1])


@torch.no_grad()
def trace(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompt: str,
    subject: str,
    expected: str | None = None,
    *,
    samples: int = 10,
    noise: float | None = None,
    window: int = 10,
    kinds: Sequence[str] = KINDS,
    seed: int = 0,
    method: str = "fast",
    precision: str = "float32",
    progress: Progress | None = None,
) -> TraceResult:
    """Trace which states of ``model`` carry the answer to ``prompt`` about ``subject`` (first occurrence).

    ``expected``: the answer whose first token (after a space) is scored; by default the clean run's top token.
    ``noise``: std of the subject's embedding noise; by default 3 × the embedding std over corpus text.
    ``window``: how many layers of MLP or attention outputs one restoration covers.
    ``precision``: ``"float32"`` (exact), ``"bfloat16"`` (matrix products in bfloat16) or ``"auto"``.
    Deterministic for a given ``seed``; ``method="fast"`` and ``"plain"`` agree to float tolerance.
    """
    kinds = tuple(dict.fromkeys(kinds))
    precision = resolve_precision(precision, model)
    _validate(prompt, subject, expected, samples, window, kinds, method, noise)
    if model.training:
        raise ValueError("the model is in training mode (dropout makes the trace random); call model.eval()")
    start, end = prompt.index(subject), prompt.index(subject) + len(subject)
    enc = encode(tok, prompt, start, end)
    answer_id = None
    if expected is not None:  # the first answer token, indexed in the prompt+answer encoding by its own prompt length
        full = encode(tok, prompt, start, end, expected.strip())
        answer_id = full.input_ids[full.n_prompt]
    level = 3 * embedding_std(model, tok) if noise is None else float(noise)
    noise_t = make_noise(model, samples, enc.subject_last + 1 - enc.subject_first, level, seed)
    n_tok = len(enc.input_ids)
    steps = len(kinds) * n_tok * n_layers(model) if method == "plain" else n_tok - enc.subject_first
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress("tracing", done[0] / steps)

    with arithmetic(model, precision) as runner:
        runs, clean_prob = _prepare(runner, enc, answer_id, kinds, noise_t)
        scores = (_trace_plain if method == "plain" else _trace_fast)(runs, kinds, window, tick)
    return TraceResult(
        prompt=prompt,
        subject=subject,
        tokens=[tok.decode([i]) for i in enc.input_ids],
        subject_range=runs.subject_range,
        answer=tok.decode([runs.answer_id]),
        answer_id=runs.answer_id,
        clean_prob=clean_prob,
        corrupted_prob=runs.corrupted_prob,
        scores=scores,
        noise=level,
        samples=samples,
        window=window,
        seed=seed,
        model_name=_model_name(model),
        precision=precision,
    )
