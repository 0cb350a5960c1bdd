"""The AlphaEdit layer solve against the number of cached keys: full size and re-read, or in P's range and kept.

    python bench/alphaedit_solve.py --keys 400 2000 4000

AlphaEdit's update for new keys K on top of cached keys K_c is x = (P (K_c K_cᵀ + K Kᵀ) + α I)⁻¹ P K.
Solved as written it costs a d_in × d_in product with P, a d_in × d_in solve and K_c K_cᵀ re-read from
every cached key, on every layer of every edit. ``editing.projection.projected_solve`` solves the same
system in P's range (x = Û y, a system of P's rank) with the cache's reduced Gram ``Ûᵀ K_c K_cᵀ Û``, which
``editor.cache_gram`` keeps up to date edit by edit. For the default model's layer 9 (its shipped
statistics and the 0.03 threshold) and random cached keys of the size of real ones, this prints both
ways' seconds for one layer of one edit (4 new keys: k* and the exact keys), their ratio, and the
largest relative difference of the solutions, in the same process.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from editing import RomeEditor, load_model  # noqa: E402
from editing.projection import projected_solve, reduced_gram  # noqa: E402


def full_size(p: torch.Tensor, keys: torch.Tensor, cache: torch.Tensor, l2: float) -> torch.Tensor:
    """AlphaEdit's solve as written (the reference)."""
    k, c = keys.double(), cache.double()
    system = p @ (c @ c.T + k @ k.T) + l2 * torch.eye(p.shape[0], dtype=torch.float64)
    return torch.linalg.solve(system, p @ k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--keys", type=int, nargs="+", default=[400, 2000, 4000], help="cached keys")
    ap.add_argument("--threshold", type=float, default=0.03)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, tok = load_model()
    editor = RomeEditor(model, tok)
    hp = editor.hparams
    projection = editor.projection(hp.layer, hp.stats_samples, args.threshold)
    cov = editor.cov(hp.layer, hp.stats_samples).double()
    scale = torch.linalg.cholesky(cov)  # keys drawn with second moment C, the size of real ones
    generator = torch.Generator().manual_seed(0)
    draw = lambda n: (scale @ torch.randn(cov.shape[0], n, generator=generator, dtype=torch.float64)).float()  # noqa: E731
    print(f"layer {hp.layer}, P of rank {projection.dims} of {cov.shape[0]}, {torch.get_num_threads()} threads")
    print("cached keys | full size s | in P's range s (Gram kept) | ratio | max rel. difference")
    for m in args.keys:
        cache, keys = draw(m), draw(4)
        gram = reduced_gram(projection.basis, cache)  # what cache_gram holds; kept edit by edit, not timed
        times: dict[str, list[float]] = {"full": [], "reduced": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ref = full_size(projection.matrix, keys, cache, hp.cache_l2)
            times["full"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = projected_solve(projection.basis, keys, gram, hp.cache_l2)
            times["reduced"].append(time.perf_counter() - t0)
        diff = float(((got - ref).norm(dim=0) / ref.norm(dim=0)).max())
        full, reduced = statistics.median(times["full"]), statistics.median(times["reduced"])
        print(f"{m} | {full:.3f} | {reduced:.3f} | {full / reduced:.1f}x | {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
