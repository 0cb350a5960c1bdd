"""Choose AlphaEdit's null-space threshold from our own spectrum of C = E[k kᵀ] (no edit is applied).

    python bench/null_space.py --n 30 --thresholds 0.01 0.02 0.03 0.06 0.1

For each eigenvalue threshold, prints: the null-space dimension (of d_in), the mean share of a
subject key's energy inside it (‖Pk*‖²/‖k*‖²), the mean ‖key_dir‖ (the update's size per unit of
delta) and the mean expected disruption of a preserved key, key_dirᵀ C key_dir, as a ratio to
r-ROME's (which minimises exactly this, so the ratio is ≥ 1). With the key cache of the other
subjects' keys, it also prints how much an update moves those keys (|key_dir · k_j|, mean).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from editing import RomeEditor, load_model  # noqa: E402
from editing.evaluation.datasets import load_cases, sample_cases  # noqa: E402
from editing.projection import null_space_projection, projected_key_dir, stack_keys  # noqa: E402
from editing.rome import compute_key, rank_one_factors  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "counterfact_dev.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.01, 0.02, 0.03, 0.06, 0.1])
    parser.add_argument("--l2", type=float, default=1e-2)
    args = parser.parse_args()
    model, tok = load_model()
    editor = RomeEditor(model, tok)
    hp = editor.hparams
    cov = editor.cov(hp.layer).double()
    evals = torch.linalg.eigvalsh(cov)
    print(f"layer {hp.layer}: d_in {cov.shape[0]}, eigenvalues {float(evals[0]):.3g} … {float(evals[-1]):.3g}, "
          f"median {float(evals.median()):.3g}, trace {float(evals.sum()):.1f}")
    cases = sample_cases(load_cases(DATA)[0], args.n, args.seed)
    keys = []
    for case in cases:
        rows = editor.rows(case.request(), hp)[0]
        keys.append(compute_key(model, hp.layer, rows, tok.pad_token_id).double().cpu())
    r_rome = [rank_one_factors(cov, k, torch.zeros(1))[1].double() for k in keys]
    r_disrupt = [float(d @ cov @ d) for d in r_rome]
    print(f"r-ROME: mean ‖key_dir‖ {statistics.mean(float(d.norm()) for d in r_rome):.3g}, "
          f"mean disruption {statistics.mean(r_disrupt):.3g}")
    print("threshold  dims  ‖Pk‖²/‖k‖²  ‖key_dir‖  disruption/r-ROME  cached-key move (no cache → cache)")
    for threshold in args.thresholds:
        proj = null_space_projection(cov, threshold)
        share, norms, ratio, bare_move, cache_move = [], [], [], [], []
        for i, k in enumerate(keys):
            others = stack_keys([keys[j] for j in range(len(keys)) if j != i], k.numel()).double()
            bare = projected_key_dir(k, proj, others[:, :0], args.l2).double()
            cached = projected_key_dir(k, proj, others, args.l2).double()
            share.append(float((proj.matrix @ k).norm() ** 2 / k.norm() ** 2))
            norms.append(float(bare.norm()))
            ratio.append(float(bare @ cov @ bare) / r_disrupt[i])
            bare_move.append(float((bare @ others).abs().mean()))
            cache_move.append(float((cached @ others).abs().mean()))
        print(f"{threshold:9.3g} {proj.dims:5d} {statistics.mean(share):11.4f} {statistics.mean(norms):10.3g} "
              f"{statistics.mean(ratio):18.3g}  {statistics.mean(bare_move):.3g} → {statistics.mean(cache_move):.3g}")


if __name__ == "__main__":
    main()
