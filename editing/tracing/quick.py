"""Quick causal trace: attribution patching, a first-order estimate of every restoration at once.

The exact trace (``editing.tracing.trace``) runs one corrupted pass per restoration. Attribution
patching (Nanda 2023; Syed et al. 2023; Kramár et al. 2024, "AtP*") linearises the answer's
probability ``m`` around the corrupted run instead: restoring state ``a`` (clean value ``a_c``,
corrupted value ``a_x``) changes ``m`` by about ``(a_c - a_x) · ∂m/∂a``, the gradient taken in the
corrupted run. One clean pass, one corrupted pass (the noised copies as a batch) and one backward
pass give that estimate for every hidden, MLP and attention state at every token and layer. A
window of restored MLP or attention layers is estimated as the sum of its layers' estimates.

The estimate is exact to first order in the difference between the runs, so it ranks sites
well where restoring moves the probability moderately and saturates badly where one state
restores nearly all of it (``bench/quick_trace.py`` measures its agreement with the exact trace).
Scores are returned in a ``TraceResult`` like the exact ones: the corrupted probability plus the
estimated change (so they may leave [0, 1]). The model's weights are unchanged and no hook outlives a call.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.arch import arch_of, layer_name, n_layers
from editing.nethook import edit_output
from editing.placement import input_device
from editing.tokens import encode
from editing.tracing import _model_name, _validate
from editing.tracing.noise import embedding_std, make_noise
from editing.tracing.result import TraceResult
from editing.tracing.runs import _PART, KINDS, _restored_layers

Progress = Callable[[str, float], None]


def _record(store: dict[tuple[str, int], torch.Tensor], key: tuple[str, int]) -> Callable:
    def fn(out: torch.Tensor) -> None:
        store[key] = out

    return fn


def _run(model: PreTrainedModel, ids: torch.Tensor, kinds: Sequence[str], noise: torch.Tensor | None,
         subject_range: tuple[int, int]) -> tuple[torch.Tensor, dict[tuple[str, int], torch.Tensor]]:  # fmt: skip
    """Last-position logits and every (kind, layer) output; with ``noise`` (R, n_subject, d), of R noised
    copies, in the autograd graph."""
    first, end = subject_range
    store: dict[tuple[str, int], torch.Tensor] = {}

    def noised(emb: torch.Tensor) -> torch.Tensor:  # (S, T, d): the leaf every gradient flows back to
        emb = emb.detach().clone()
        emb[:, first:end] += noise
        return emb.requires_grad_(True)

    with ExitStack() as stack:
        if noise is not None:
            stack.enter_context(edit_output(model, arch_of(model).embed, noised))
        for kind in kinds:
            for layer in range(n_layers(model)):
                name = layer_name(model, layer, _PART[kind])
                stack.enter_context(edit_output(model, name, _record(store, (kind, layer))))
        rows = ids if noise is None else ids.expand(noise.shape[0], -1)
        logits = model(input_ids=rows, use_cache=False).logits[:, -1]
    return logits, store


def estimate_restorations(
    clean: dict[tuple[str, int], torch.Tensor], corrupted: dict[tuple[str, int], torch.Tensor],
    grads: dict[tuple[str, int], torch.Tensor], kind: str, total: int, window: int,
) -> torch.Tensor:  # fmt: skip
    """(tokens, layers): the first-order change of the metric when restoring ``kind`` at each token and layer (window).

    ``corrupted`` holds the S noised copies' states (S, T, d); ``grads`` the metric's gradients at
    R = S·m rows (sample s's m path points at rows s, s + S, …), summed over the rows.
    """
    def term(j: int) -> torch.Tensor:  # (T,)
        d = clean[(kind, j)].float() - corrupted[(kind, j)].detach().float()  # (S, T, d)
        g = grads[(kind, j)].float()  # (m·S, T, d): row i·S + s is sample s at path point i
        return (d * g.view(-1, *d.shape).sum(0)).sum((0, 2))  # the path points share the difference

    single = torch.stack([term(j) for j in range(total)], dim=1)  # (T, L): summed over the rows, whose mean the metric is
    out = torch.empty_like(single)
    for layer in range(total):
        out[:, layer] = single[:, list(_restored_layers(kind, layer, window, total))].sum(1)
    return out


def quick_trace(
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
    steps: int = 1,
    progress: Progress | None = None,
) -> TraceResult:
    """Approximate ``editing.tracing.trace`` (same arguments and noise) from one clean, one corrupted and one backward pass.

    ``steps`` > 1 averages the gradient over that many points on the straight path from the
    corrupted to the clean input (the noise scaled by 1 − (i + ½)/steps; integrated gradients, as in
    EAP-IG, Hanna et al. 2024), all in the same batched forward and backward pass.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 32:
        raise ValueError("steps must be a whole number from 1 to 32")
    kinds = tuple(dict.fromkeys(kinds))
    _validate(prompt, subject, expected, samples, window, kinds, "fast", noise)
    if model.training:
        raise ValueError("the model is in training mode (dropout makes the trace random); call model.eval()")
    start, end = prompt.index(subject), prompt.index(subject) + len(subject)
    enc = encode(tok, prompt, start, end)
    answer_id = None if expected is None else encode(tok, prompt, start, end, expected.strip()).input_ids[enc.n_prompt]
    level = 3 * embedding_std(model, tok) if noise is None else float(noise)
    subject_range = (enc.subject_first, enc.subject_last + 1)
    noise_t = make_noise(model, samples, subject_range[1] - subject_range[0], level, seed)
    ids = torch.tensor([enc.input_ids], device=input_device(model))
    with torch.no_grad():
        logits, clean = _run(model, ids, kinds, None, subject_range)
    answer_id = int(logits[0].argmax()) if answer_id is None else answer_id
    clean_prob = float(torch.softmax(logits[0].float(), -1)[answer_id])
    if progress is not None:
        progress("tracing", 0.3)
    if steps == 1:
        scales = torch.ones(1, dtype=noise_t.dtype, device=noise_t.device)
    else:
        scales = 1 - (torch.arange(steps, dtype=noise_t.dtype, device=noise_t.device) + 0.5) / steps
    path = (scales[:, None, None, None] * noise_t[None]).flatten(0, 1)  # (m·S, n, d): step-major
    with torch.enable_grad():
        logits, at_path = _run(model, ids, kinds, path, subject_range)
        metric = torch.softmax(logits.float(), -1)[:, answer_id].mean()
        keys = list(at_path)  # gradients of these states only: no parameter's .grad is touched
        found = torch.autograd.grad(metric, [at_path[k] for k in keys], allow_unused=True)
    grads = {k: torch.zeros_like(at_path[k]) if g is None else g for k, g in zip(keys, found)}
    if steps == 1:  # the path is the corrupted run itself
        corrupted, corrupted_prob = at_path, float(metric.detach())
    else:
        with torch.no_grad():
            logits, corrupted = _run(model, ids, kinds, noise_t, subject_range)
        corrupted_prob = float(torch.softmax(logits.float(), -1)[:, answer_id].mean())
    total = n_layers(model)
    scores = {k: corrupted_prob + estimate_restorations(clean, corrupted, grads, k, total, window).cpu() for k in kinds}
    if progress is not None:
        progress("tracing", 1.0)
    return TraceResult(
        prompt=prompt, subject=subject, tokens=[tok.decode([i]) for i in enc.input_ids], subject_range=subject_range,
        answer=tok.decode([answer_id]), answer_id=answer_id, clean_prob=clean_prob, corrupted_prob=corrupted_prob,
        scores=scores, noise=level, samples=samples, window=window, seed=seed, model_name=_model_name(model),
    )  # fmt: skip
