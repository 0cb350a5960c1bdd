"""Statistics computation time per layer: C = E[k kᵀ] over N corpus texts, uncached.

    python bench/stats_time.py --layers 3 9 15 --samples 200

The model runs only up to the layer needed, so deeper layers cost more; the time grows
linearly with the sample count (the default count is in the README).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from editing import load_model  # noqa: E402
from editing.stats import SAMPLE_SEED, compute_second_moment, read_corpus, shuffled  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 9, 15, 29])
    ap.add_argument("--samples", type=int, default=200)
    args = ap.parse_args()
    model, tok = load_model()
    texts = shuffled(read_corpus(), SAMPLE_SEED)[: args.samples]  # the sample the app uses
    for layer in args.layers:
        t0 = time.perf_counter()
        _, n_tokens = compute_second_moment(model, tok, layer, texts)
        seconds = time.perf_counter() - t0
        print(f"layer {layer:2d}: {seconds:6.1f} s for {len(texts)} texts ({n_tokens} tokens), "
              f"{1000 * seconds / len(texts):.1f} ms per text", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
