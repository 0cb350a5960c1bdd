"""Statistics computation time per layer and arithmetic: C = E[k kᵀ] over N corpus texts, uncached.

    python bench/stats_time.py --layers 9 --samples 1000 --precisions float32 bfloat16

The model runs only up to the layer needed, so deeper layers cost more; the time grows
linearly with the sample count (the default count is in the README). With two precisions, also
prints how far the second's C is from the first's (relative Frobenius norm, smallest and largest
eigenvalue) and, for keys of held-out corpus texts, the cosine between the update directions
C⁻¹k of the two (the r-ROME update is invariant to C⁻¹k's scale, so the cosine is what matters).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from editing import load_model  # noqa: E402
from editing.arch import layer_name  # noqa: E402
from editing.defaults import PRECISIONS  # noqa: E402
from editing.nethook import capture_input, run_until  # noqa: E402
from editing.stats import SAMPLE_SEED, compute_second_moment, read_corpus, shuffled  # noqa: E402

HELD_OUT = 8  # corpus texts outside the sample whose last keys stand for facts' keys


def held_out_keys(model: torch.nn.Module, tok: object, layer: int, texts: list[str]) -> torch.Tensor:
    """(d_in, 5 × len(texts)) float64: the keys of each text's last five tokens."""
    keys = []
    for text in texts:
        enc = tok(text, return_tensors="pt", truncation=True, max_length=64)  # type: ignore[operator]
        with capture_input(model, layer_name(model, layer, "mlp_out"), stop=True) as box:
            run_until(model, **enc, use_cache=False)
        keys.append(box["input"][0, -5:].double())
    return torch.cat(keys).T


def compare(first: torch.Tensor, second: torch.Tensor, keys: torch.Tensor) -> str:
    error = float((second - first).norm() / first.norm())
    low, high = torch.linalg.eigvalsh(first), torch.linalg.eigvalsh(second)
    a, b = torch.linalg.solve(first, keys), torch.linalg.solve(second, keys)
    cos = (a * b).sum(0) / a.norm(dim=0) / b.norm(dim=0)
    return (f"relative difference {error:.2e}; eigenvalues {float(low[0]):.4g}..{float(low[-1]):.4g} against "
            f"{float(high[0]):.4g}..{float(high[-1]):.4g}; cos(C⁻¹k) over {keys.shape[1]} held-out keys: "
            f"min {float(cos.min()):.6f}, mean {float(cos.mean()):.6f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 9, 15, 29])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["auto"])
    args = ap.parse_args()
    model, tok = load_model()
    corpus = shuffled(read_corpus(), SAMPLE_SEED)
    texts = corpus[: args.samples]  # the sample the app uses
    for layer in args.layers:
        covs = []
        for precision in args.precisions:
            t0 = time.perf_counter()
            cov, n_tokens = compute_second_moment(model, tok, layer, texts, precision=precision)
            seconds = time.perf_counter() - t0
            covs.append(cov)
            print(f"layer {layer:2d}, {precision}: {seconds:6.1f} s for {len(texts)} texts ({n_tokens} tokens), "
                  f"{1000 * seconds / len(texts):.1f} ms per text", flush=True)  # fmt: skip
        if len(covs) > 1:
            keys = held_out_keys(model, tok, layer, corpus[-HELD_OUT:])
            for precision, cov in zip(args.precisions[1:], covs[1:]):
                print(f"layer {layer:2d}, {precision} against {args.precisions[0]}: {compare(covs[0], cov, keys)}")


if __name__ == "__main__":
    main()
