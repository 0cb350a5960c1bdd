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

import json
import logging
import re
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from editing.arch import arch_of, get_module, layer_name, n_layers
from editing.fingerprint import cached_checksum
from editing.loading import cache_dir
from editing.nethook import capture_input, edit_output
from editing.tracing.precision import arithmetic, resolve_precision
from editing.tokens import Encoded, encode

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
KINDS = ("hidden", "mlp", "attn")
_PART = {"hidden": None, "mlp": "mlp", "attn": "attn"}  # kind -> part of block for layer_name
NOISE_TEXTS = 200  # corpus texts whose token embeddings give the embedding std
MAX_ROWS = 512  # batch rows per fast pass (rows × vocabulary logits must fit in memory)
MAX_ROW_TOKENS = 8192  # rows × tokens per fast pass
WEAK_SHARE = 0.5  # last subject token's MLP effect below this share of the strongest: no clear layer


@dataclass(frozen=True)
class TraceResult:
    """Scores of one traced fact; ``scores[kind]`` is (tokens, layers): the answer's probability when restored."""

    prompt: str
    subject: str
    tokens: list[str]  # decoded prompt tokens
    subject_range: tuple[int, int]  # (first subject token, last subject token + 1)
    answer: str
    answer_id: int
    clean_prob: float
    corrupted_prob: float
    scores: dict[str, torch.Tensor]
    noise: float  # noise standard deviation used
    samples: int
    window: int
    seed: int
    model_name: str
    precision: str = "float32"  # arithmetic of the matrix products: "float32" (exact) or "bfloat16"

    def indirect_effect(self, kind: str) -> torch.Tensor:
        """(tokens, layers): restored probability minus the corrupted baseline."""
        if kind not in self.scores:
            raise ValueError(f"kind {kind!r} was not traced; traced: {', '.join(self.scores)}")
        return self.scores[kind] - self.corrupted_prob

    @property
    def last_subject_token(self) -> int:
        return self.subject_range[1] - 1


def best_at_last_subject(result: TraceResult) -> tuple[int, float]:
    """``(layer, indirect effect)`` of the MLP window that restores the most at the last subject token."""
    effects = result.indirect_effect("mlp")[result.last_subject_token]
    layer = int(effects.argmax())
    return layer, float(effects[layer])


def suggest_layer(result: TraceResult) -> int:
    """The layer whose MLP window restores the most at the last subject token."""
    return best_at_last_subject(result)[0]


def strongest_mlp_site(result: TraceResult) -> tuple[int, int, float]:
    """``(token, layer, indirect effect)`` of the MLP window that restores the most anywhere in the prompt."""
    effect = result.indirect_effect("mlp")
    token, layer = divmod(int(effect.argmax()), effect.shape[1])
    return token, layer, float(effect[token, layer])


def suggestion_is_weak(result: TraceResult, share: float = WEAK_SHARE) -> bool:
    """True when the last subject token's best MLP effect is under ``share`` of the strongest MLP effect.

    ROME edits at the last subject token; when the fact sits elsewhere (e.g. a middle subject token,
    as for several facts in SmolLM2), ``suggest_layer`` follows noise rather than a site.
    """
    strongest = strongest_mlp_site(result)[2]
    return strongest <= 0 or best_at_last_subject(result)[1] < share * strongest


def embedding_std(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, model_id: str | None = None, n_texts: int = NOISE_TEXTS
) -> float:
    """Standard deviation of token embeddings over corpus text; cached per model under ``cache_dir()/"noise"``."""
    from editing.stats import read_corpus  # the corpus is needed only on a cache miss

    embed = get_module(model, arch_of(model).embed)
    key = model_id or cached_checksum(embed.weight)[:16]  # hashed once per matrix, not once per trace
    path = cache_dir() / "noise" / f"{key}-n{n_texts}.json"
    if path.is_file():
        try:
            return float(json.loads(path.read_text())["std"])
        except (ValueError, KeyError, TypeError) as err:
            log.warning("noise cache %s is unreadable (%s); rebuilding", path.name, err)
    texts = read_corpus()[:n_texts]
    ids = [i for t in texts for i in tok(t, truncation=True, max_length=256, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        vectors = embed(torch.tensor(ids, device=embed.weight.device))  # (tokens, d)
    std = float(vectors.double().std())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"std": std, "n_texts": len(texts), "n_tokens": len(ids)}))
    tmp.replace(path)
    return std


def make_noise(model: PreTrainedModel, samples: int, n_tokens: int, level: float, seed: int) -> torch.Tensor:
    """(samples, n_tokens, d) Gaussian noise of std ``level``, drawn on the CPU so every device sees the same."""
    embed = get_module(model, arch_of(model).embed)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(samples, n_tokens, embed.weight.shape[1], generator=gen) * level
    return noise.to(device=embed.weight.device, dtype=embed.weight.dtype)


@contextmanager
def corrupt_subject(model: PreTrainedModel, subject_range: tuple[int, int], noise: torch.Tensor) -> Iterator[None]:
    """Add ``noise`` (samples, subject tokens, d) to the embeddings of the subject tokens, row by row."""
    first, end = subject_range

    def add(emb: torch.Tensor) -> torch.Tensor:  # (samples, T, d)
        if emb.shape[0] != noise.shape[0]:
            raise ValueError(f"batch of {emb.shape[0]} rows for {noise.shape[0]} noise samples")
        emb = emb.clone()
        emb[:, first:end] += noise
        return emb

    with edit_output(model, arch_of(model).embed, add):
        yield


@contextmanager
def _join_rows(model: nn.Module, name: str, rows: torch.Tensor, first: bool) -> Iterator[None]:
    """Append ``rows`` to the module's first input (replace it if ``first``), in this thread only."""
    owner = threading.get_ident()

    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if threading.get_ident() != owner:
            return None
        return (rows if first else torch.cat([args[0], rows]), *args[1:])

    handle = get_module(model, name).register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class _Runs:
    """What every restoration reuses: the clean and corrupted runs of one prompt."""

    model: PreTrainedModel
    ids: torch.Tensor  # (1, T)
    subject_range: tuple[int, int]
    noise: torch.Tensor  # (S, n_subject, d)
    answer_id: int
    clean: dict[str, torch.Tensor]  # kind -> (L, T, d) clean outputs
    corrupted_inputs: list[torch.Tensor]  # per block: (S, T, d) its input in the corrupted run
    corrupted_cache: list[tuple[torch.Tensor, torch.Tensor]]  # per block: keys, values (S, heads, T, dh)
    corrupted_prob: float


def _answer_prob(logits: torch.Tensor, answer_id: int) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)[..., answer_id]


def _clean_run(model: PreTrainedModel, ids: torch.Tensor, kinds: Sequence[str]) -> tuple[torch.Tensor, dict]:
    """Last-position logits (V,) and, per kind, the clean outputs (L, T, d) of every layer."""
    outs: dict[tuple[str, int], torch.Tensor] = {}

    def recorder(key: tuple[str, int]) -> Callable[[torch.Tensor], None]:
        return lambda out: outs.__setitem__(key, out[0].detach().clone())

    with ExitStack() as stack:
        for kind in kinds:
            for layer in range(n_layers(model)):
                name = layer_name(model, layer, _PART[kind])
                stack.enter_context(edit_output(model, name, recorder((kind, layer))))
        logits = model(input_ids=ids, use_cache=False).logits[0, -1]
    clean = {k: torch.stack([outs[(k, layer)] for layer in range(n_layers(model))]) for k in kinds}
    return logits, clean


def _corrupted_run(model: PreTrainedModel, ids: torch.Tensor, subject_range: tuple[int, int], noise: torch.Tensor):
    """Every block's input, the key/value cache and the last-position logits of the noised copies."""
    rows = ids.expand(noise.shape[0], -1)
    with ExitStack() as stack:
        stack.enter_context(corrupt_subject(model, subject_range, noise))
        boxes = [stack.enter_context(capture_input(model, layer_name(model, i))) for i in range(n_layers(model))]
        out = model(input_ids=rows, use_cache=True)
    cache = [(layer[0], layer[1]) for layer in out.past_key_values]
    return [b["input"] for b in boxes], cache, out.logits[:, -1]


def _restored_layers(kind: str, layer: int, window: int, total: int) -> range:
    """Layers whose output is restored for the restoration named ``(kind, layer)`` (a window for MLP/attention)."""
    if kind == "hidden":
        return range(layer, layer + 1)
    return range(max(0, layer - window // 2), min(total, layer - (-window // 2)))


def _restore_hooks(runs: _Runs, jobs: Sequence[tuple[str, int]], window: int, token: int, pos: int, samples: int):
    """Hooks that write the clean state at ``token`` into position ``pos`` of job ``i``'s rows ``[i*S, (i+1)*S)``."""
    model, total = runs.model, n_layers(runs.model)
    rows: dict[tuple[str, int], list[int]] = {}
    for i, (kind, layer) in enumerate(jobs):
        for j in _restored_layers(kind, layer, window, total):
            rows.setdefault((kind, j), []).extend(range(i * samples, (i + 1) * samples))

    def setter(index: torch.Tensor, value: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(out: torch.Tensor) -> torch.Tensor:  # (rows, tokens, d)
            out[index, pos] = value  # in place: the module's output is a fresh tensor
            return out

        return fn

    hooks = []
    for (kind, j), r in rows.items():
        index = torch.tensor(r, device=runs.ids.device)
        hooks.append(edit_output(model, layer_name(model, j, _PART[kind]), setter(index, runs.clean[kind][j, token])))
    return hooks


def _trace_plain(runs: _Runs, kinds: Sequence[str], window: int, tick: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Reference: one forward pass (the noised copies as a batch) per (kind, token, layer)."""
    model, samples = runs.model, runs.noise.shape[0]
    n_tok, total = runs.ids.shape[1], n_layers(model)
    rows = runs.ids.expand(samples, -1)
    scores = {k: torch.empty(n_tok, total) for k in kinds}
    for kind in kinds:
        for t in range(n_tok):
            for layer in range(total):
                with ExitStack() as stack:
                    stack.enter_context(corrupt_subject(model, runs.subject_range, runs.noise))
                    for hook in _restore_hooks(runs, [(kind, layer)], window, t, t, samples):
                        stack.enter_context(hook)
                    logits = model(input_ids=rows, use_cache=False).logits[:, -1]
                scores[kind][t, layer] = _answer_prob(logits, runs.answer_id).mean()
                tick()
    return scores


def _chunks(n_jobs: int, samples: int, n_tok: int) -> list[tuple[int, int]]:
    """Equal contiguous slices of the jobs whose rows (and rows × tokens) fit one pass."""
    per_pass = max(1, min(MAX_ROWS, MAX_ROW_TOKENS // n_tok) // samples)
    n_chunks = -(-n_jobs // per_pass)
    bounds = [round(i * n_jobs / n_chunks) for i in range(n_chunks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _run_chunk(
    runs: _Runs, jobs: Sequence[tuple[str, int]], starts: list[int], token: int, window: int
) -> torch.Tensor:
    """Mean answer probability (len(jobs),) of restorations at ``token``; ``starts``: first restored layers, sorted.

    Job ``i``'s rows join the batch at block ``starts[i]``, fed the corrupted run's input there, so
    the rows active at any block are the first ones: below the first start a single placeholder
    row runs (its output is discarded), and no row repeats what the corrupted run already did.
    This relies on the blocks broadcasting the single-row attention mask and position embeddings
    over the rows, as transformers' decoder blocks do; the fast-versus-plain tests check it.
    """
    model, samples = runs.model, runs.noise.shape[0]
    active = [bisect_right(starts, block) * samples for block in range(n_layers(model))]  # rows per block
    cache = None
    if token > 0:  # tokens before ``token`` are as in the corrupted run: attend to its keys and values
        cache = DynamicCache(
            ddp_cache_data=[
                (k[:, :, :token].repeat(n // samples, 1, 1, 1), v[:, :, :token].repeat(n // samples, 1, 1, 1))
                if n
                else (k[:1, :, :token], v[:1, :, :token])
                for (k, v), n in zip(runs.corrupted_cache, active)
            ],
            config=model.config,
        )
    with ExitStack() as stack:
        for block in sorted(set(starts)):
            joining = runs.corrupted_inputs[block][:, token:].repeat(starts.count(block), 1, 1)  # (rows, n, d)
            stack.enter_context(_join_rows(model, layer_name(model, block), joining, first=block == starts[0]))
        for hook in _restore_hooks(runs, jobs, window, token, 0, samples):
            stack.enter_context(hook)
        ids = runs.ids[:, token:]  # (1, n)
        out = model(input_ids=ids, past_key_values=cache, use_cache=cache is not None, logits_to_keep=1)
    return _answer_prob(out.logits[:, -1], runs.answer_id).view(len(jobs), samples).mean(1)


def _trace_fast(runs: _Runs, kinds: Sequence[str], window: int, tick: Callable[[], None]) -> dict[str, torch.Tensor]:
    samples, n_tok, total = runs.noise.shape[0], runs.ids.shape[1], n_layers(runs.model)
    first = {(k, layer): _restored_layers(k, layer, window, total).start for k in kinds for layer in range(total)}
    jobs = sorted(first, key=first.__getitem__)
    starts = [first[job] for job in jobs]
    # Before the subject the corrupted run equals the clean one: restoring there changes nothing.
    scores = {k: torch.full((n_tok, total), runs.corrupted_prob) for k in kinds}
    for token in range(runs.subject_range[0], n_tok):
        for i, j in _chunks(len(jobs), samples, n_tok - token):
            probs = _run_chunk(runs, jobs[i:j], starts[i:j], token, window)
            for (kind, layer), p in zip(jobs[i:j], probs.tolist()):
                scores[kind][token, layer] = p
        tick()
    return scores


def _prepare(model: PreTrainedModel, enc: Encoded, answer_id: int | None, kinds: Sequence[str], noise: torch.Tensor):
    """The clean and corrupted runs every restoration reuses, and the clean probability of the answer."""
    ids = torch.tensor([enc.input_ids], device=next(model.parameters()).device)
    subject_range = (enc.subject_first, enc.subject_last + 1)
    logits, clean = _clean_run(model, ids, kinds)
    answer_id = int(logits.argmax()) if answer_id is None else answer_id
    inputs, cache, corrupted_logits = _corrupted_run(model, ids, subject_range, noise)
    corrupted_prob = float(_answer_prob(corrupted_logits, answer_id).mean())
    runs = _Runs(model, ids, subject_range, noise, answer_id, clean, inputs, cache, corrupted_prob)
    return runs, float(_answer_prob(logits, answer_id))


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
