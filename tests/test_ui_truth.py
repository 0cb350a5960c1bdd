"""What the page says matches what happened: checks summary, short answers, the requested object, the chat's title."""
from __future__ import annotations

from types import SimpleNamespace

from chat_app import ui_render
from chat_app.service import Probe
from chat_app.ui_handlers import Handlers


def probe(kind: str, expected: str, after: str) -> Probe:
    return Probe("p", kind, expected, before="x", after=after)


def test_one_check_is_not_called_one_of_one_checks_holding() -> None:
    text = ui_render.checks_summary([probe("edited", "Rome", "Rome")])
    assert "1/1" not in text and "gives the new object ✓" in text and "no paraphrases or neighbours" in text
    text = ui_render.checks_summary([probe("edited", "Rome", "Paris"), probe("paraphrase", "Rome", "Rome"),
                                     probe("neighbour", "Paris", "Paris"), probe("neighbour", "Paris", "Rome")])  # fmt: skip
    assert text == ("the edited prompt does not give it yet ✗; paraphrases 1/1 give the new object; "
                    "neighbours 1/2 unchanged")  # fmt: skip


def test_run_on_completions_are_cut_at_the_answer_in_tables() -> None:
    assert ui_render.short_answer("Tokyo, and it's a major cultural") == "Tokyo …"
    assert ui_render.short_answer("Paris, France") == "Paris, France"
    assert ui_render.short_answer("Rome") == "Rome" and ui_render.short_answer(None) == ""
    frame = ui_render.probes_frame([Probe("p", "edited", "Tokyo", "Paris, and the", "Tokyo, and it's a major")])
    assert frame.loc[0, "before"] == "Paris …" and frame.loc[0, "after"] == "Tokyo …"


def test_history_shows_the_requested_object() -> None:
    record = SimpleNamespace(id=3, created_at=None, subject="The Louvre", relation="{} is in", target="Tokyo",
                             answer_before="Paris", answer_after="Tokyo, and it's big", layer=9, status="applied",
                             not_holding=False, author="ana", batch_id="3f2a9c1b0d4e", batch_index=1,
                             batch_size=10, meta={}, layer_label="5–9")  # fmt: skip
    frame = ui_render.history_frame([record])
    assert frame.loc[0, "layer"] == "5–9"
    assert frame.loc[0, "batch"] == "3f2a9c1b0d4e (2/10)"
    assert list(frame.columns) == ui_render.HISTORY_HEADERS and len(ui_render.HISTORY_WIDTHS) == len(frame.columns)
    assert frame.loc[0, "requested"] == "Tokyo" and frame.loc[0, "old → new answer"] == "Paris → **Tokyo …**"


def test_the_chat_title_says_whether_the_model_is_edited() -> None:
    handlers = Handlers(SimpleNamespace(active_count=0))  # type: ignore[arg-type]
    assert handlers.chat_label() == "Model (no edits)"
    handlers.service.active_count = 2
    assert handlers.chat_label() == "Edited model (2 edits)"
