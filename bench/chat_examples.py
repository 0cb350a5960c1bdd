"""The issue's two corrections on the default model: greedy completion and chat reply after each edit setting.

    python bench/chat_examples.py '{}' '{"exact_keys": 1}' '{"chat_values": 2}'

Each argument is a JSON object of hyperparameter overrides. Prints, per setting and edit, the edit
time and steps, the greedy completion of the user's prompt and the chat reply (the app's settings)
to the question built from the relation.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from editing import EditRequest, RomeEditor, load_model  # noqa: E402
from editing.generation import chat_reply, greedy_completions  # noqa: E402
from editing.questions import question_for  # noqa: E402

REQUESTS = (EditRequest("Angela Merkel", "{} is a citizen of", "Canada"),
            EditRequest("Michael Jordan", "{} plays the sport of", "baseball"))  # fmt: skip


def main() -> None:
    model, tok = load_model()
    editor = RomeEditor(model, tok)
    for overrides in [json.loads(a) for a in sys.argv[1:]] or [{}]:
        for req in REQUESTS:
            t0 = time.perf_counter()
            edit = editor.compute(req, **overrides)
            seconds = time.perf_counter() - t0
            editor.apply(edit)
            try:
                question = question_for(req.relation, req.subject)
                completion = greedy_completions(model, tok, [req.relation.format(req.subject)], 8)[0]
                reply = chat_reply(model, tok, question)[:150].replace("\n", " ")
            finally:
                editor.revert(edit)
            print(f"{json.dumps(overrides)} {req.subject}: {seconds:.1f} s, {edit.stats['steps']} steps | "
                  f"{completion!r} | {question} -> {reply!r}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
