"""Chat speed on the default model: time to first token and tokens per second, edited vs original weights.

    python bench/chat_speed.py --runs 3 --tokens 64

"original" answers through the exact unedited-weights view (the compare switch in the app),
measured in the same process after one edit is applied, so the ratio shows that view's cost.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_app.probes import stream_chat  # noqa: E402
from editing import EditRequest, RomeEditor, load_model  # noqa: E402


def measure(editor: RomeEditor, tokens: int, original: bool) -> tuple[float, float]:
    messages = [{"role": "user", "content": "Tell me about the Eiffel Tower."}]
    context = editor.original_weights() if original else None
    t0 = time.perf_counter()
    first = None
    text = ""
    for text in stream_chat(editor.model, editor.tok, messages, 0.0, tokens, context):
        if first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    n = len(editor.tok(text)["input_ids"])
    return first or total, n / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    model, tok = load_model()
    editor = RomeEditor(model, tok)
    editor.apply(editor.compute(EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome")))
    for label, original in (("edited", False), ("original", True)):
        runs = [measure(editor, args.tokens, original) for _ in range(args.runs)]
        print(f"{label:8s} time to first token {statistics.median(r[0] for r in runs):.3f} s, "
              f"{statistics.median(r[1] for r in runs):.1f} tokens/s (median of {args.runs})")  # fmt: skip


if __name__ == "__main__":
    main()
