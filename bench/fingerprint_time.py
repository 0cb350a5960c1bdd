"""Start-up fingerprint: the full hash of every weight against the value cached by file identity.

    python bench/fingerprint_time.py

Prints the time of ``model_fingerprint`` (SHA-256 over all parameters), of ``identify_model`` on a
cache miss (the full hash plus the file identity and weight sample) and on a hit (what every later
start pays), and checks that the three agree.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from editing import load_model  # noqa: E402
from editing.fingerprint import identify_model, model_fingerprint  # noqa: E402


def timed(fn, *args):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - t0


def main() -> None:
    model, _ = load_model()
    full, t_full = timed(model_fingerprint, model)
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict("os.environ", {"ROME_CHAT_CACHE": cache}):
        miss, t_miss = timed(identify_model, model)
        hit, t_hit = timed(identify_model, model)
    assert full == miss == hit, "the cached fingerprint differs from the full hash"
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values()) / 2**20
    print(f"{size:.0f} MiB of weights: full hash {t_full:.2f} s; first start {t_miss:.2f} s; "
          f"later starts {1000 * t_hit:.1f} ms ({t_full / t_hit:.0f}x faster); same fingerprint {full[:12]}")


if __name__ == "__main__":
    main()
