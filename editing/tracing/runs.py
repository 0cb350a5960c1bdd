"""The clean, corrupted and restored runs, and the two ways to score every restoration (plain and fast).

See the package docstring for what the fast method shares between restorations and why it is exact.
"""
from __future__ import annotations

import threading
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from editing.arch import get_module, layer_name, n_layers
from editing.nethook import capture_input, edit_output
from editing.placement import input_device
from editing.tokens import Encoded
from editing.tracing.noise import corrupt_subject

KINDS = ("hidden", "mlp", "attn")
_PART = {"hidden": None, "mlp": "mlp", "attn": "attn"}  # kind -> part of block for layer_name
MAX_ROWS = 512  # batch rows per fast pass (rows × vocabulary logits must fit in memory)
MAX_ROW_TOKENS = 8192  # rows × tokens per fast pass


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
            out[index.to(out.device), pos] = value.to(out.device)  # in place: the module's output is a fresh tensor
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
    ids = torch.tensor([enc.input_ids], device=input_device(model))
    subject_range = (enc.subject_first, enc.subject_last + 1)
    logits, clean = _clean_run(model, ids, kinds)
    answer_id = int(logits.argmax()) if answer_id is None else answer_id
    inputs, cache, corrupted_logits = _corrupted_run(model, ids, subject_range, noise)
    corrupted_prob = float(_answer_prob(corrupted_logits, answer_id).mean())
    runs = _Runs(model, ids, subject_range, noise, answer_id, clean, inputs, cache, corrupted_prob)
    return runs, float(_answer_prob(logits, answer_id))
