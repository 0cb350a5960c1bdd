"""The first correction on a fresh machine: start the app with an empty statistics cache, edit as soon as it serves.

    nice -n 10 python -m bench.first_edit

Points ``ROME_CHAT_CACHE`` at a temporary folder holding only the dequantised model (linked from
the real cache, so nothing is converted), starts ``python app.py`` with a fresh ledger, and as
soon as the page serves submits one correction through ``/apply_edit``. Prints the seconds to
serve, the seconds the first correction took end to end, and a second correction's, with the
statistics then ready. ``bench/stats_time.py`` times the statistics alone for other sample counts.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from editing.loading import cache_dir
from tests.ui_server import running_app

EDITS = (("The Eiffel Tower", "{} is located in the city of", "Rome"),
         ("The Louvre", "{} is located in the city of", "Tokyo"))  # fmt: skip


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    from gradio_client import Client

    folder = Path(tempfile.mkdtemp(prefix="rome-chat-first-"))
    (folder / "cache").mkdir()
    (folder / "cache" / "models").symlink_to(cache_dir() / "models")
    os.environ["ROME_CHAT_CACHE"] = str(folder / "cache")
    t0 = time.perf_counter()
    with running_app(folder / "ledger.db", folder / "server.log") as url:
        served = time.perf_counter() - t0
        client = Client(url, verbose=False)
        print(f"page serves after {served:.1f} s (statistics cache empty)", flush=True)
        for n, (subject, relation, target) in enumerate(EDITS, 1):
            t1 = time.perf_counter()
            result, _ = client.predict(subject, relation, target, "", "", 9, 20, 2.0, 0.0625, "", api_name="/apply_edit")
            print(f"correction {n}: {time.perf_counter() - t1:.1f} s end to end ({result.splitlines()[0][:50]})",
                  flush=True)  # fmt: skip
    stats = sorted(p.name for p in (folder / "cache" / "stats").glob("*.pt"))
    print(f"statistics computed: {stats}")
    t0 = time.perf_counter()
    with running_app(folder / "ledger.db", folder / "server2.log"):
        print(f"second start: page serves after {time.perf_counter() - t0:.1f} s (2 edits replayed)", flush=True)


if __name__ == "__main__":
    main()
