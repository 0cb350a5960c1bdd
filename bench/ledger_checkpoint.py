"""What checkpointing after every commit costs an edit's ledger writes.

    python bench/ledger_checkpoint.py --n 200

An edit writes the ledger twice (``record_pending`` with its factors, then ``mark_applied`` with
its probes). This times N such pairs with factors of the default model's size (576 + 1536
float32) in a fresh ledger, once with SQLite's default (checkpoint when the WAL reaches 1000
pages) and once with the app's setting (a checkpoint after every commit), alternating rounds so
a busy machine affects both alike. Prints the median and mean milliseconds per edit and the ratio.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import db.engine  # noqa: E402
from db import Ledger  # noqa: E402

FINGERPRINT = "ab" * 32
FACTOR_BYTES = 4 * (576 + 1536)  # SmolLM2-135M: value (576) and key (1536) directions, float32


def payload(i: int) -> tuple[dict, bytes]:
    factors = hashlib.sha256(str(i).encode()).digest() * (FACTOR_BYTES // 32)
    meta = {"subject": f"subject {i}", "relation": "{} is located in", "target": "Rome", "layer": 9,
            "param_name": "model.layers.9.mlp.down_proj.weight", "fingerprint": FINGERPRINT, "hparams": {},
            "checksum_before": "0" * 64, "checksum_after": "1" * 64, "stats": {}, "value_shape": [576],
            "key_shape": [1536], "dtype": "float32-le"}  # fmt: skip
    return meta, factors


def edit_times(folder: Path, pages: int, n: int) -> list[float]:
    """Seconds per edit (pending + applied) for ``n`` edits with ``wal_autocheckpoint = pages``."""
    db.engine.AUTOCHECKPOINT_PAGES = pages
    probes = [{"prompt": "The Eiffel Tower is located in", "kind": "edited", "expected": "Rome", "holds": True}]
    times = []
    with Ledger.open(folder / f"ledger-{pages}.db", FINGERPRINT) as ledger:
        for i in range(n):
            meta, factors = payload(i)
            t0 = time.perf_counter()
            edit_id = ledger.record_pending(meta, factors)
            ledger.mark_applied(edit_id, "2" * 64, answer_after="Rome", probes=probes)
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="edits per setting")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the synthetic checksums differ from the "computed" ones on purpose
    results: dict[int, list[float]] = {1000: [], 1: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for pages in (1000, 1):
                folder = Path(tmp) / f"round{r}"
                folder.mkdir(exist_ok=True)
                results[pages] += edit_times(folder, pages, args.n)
    for pages, label in ((1000, "SQLite default (checkpoint at 1000 WAL pages)"), (1, "app (checkpoint every commit)")):
        ms = [1000 * t for t in results[pages]]
        print(f"{label:48s} median {statistics.median(ms):6.2f} ms  mean {statistics.fmean(ms):6.2f} ms per edit")
    ratio = statistics.median(results[1]) / statistics.median(results[1000])
    print(f"ratio (app / default, medians): {ratio:.2f}; edits measured per setting: {len(results[1])}")


if __name__ == "__main__":
    main()
