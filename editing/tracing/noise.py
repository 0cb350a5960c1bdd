"""The corruption: Gaussian noise on the subject's token embeddings, scaled to the embedding std over corpus text."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.arch import arch_of, get_module
from editing.fingerprint import cached_checksum
from editing.loading import cache_dir
from editing.nethook import edit_output

log = logging.getLogger(__name__)
NOISE_TEXTS = 200  # corpus texts whose token embeddings give the embedding std


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
