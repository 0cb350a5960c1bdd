"""The web app's many-facts handlers, called directly: file preview, Apply all in both modes, History's batch actions."""
from __future__ import annotations

import json

import gradio as gr
import pytest

from chat_app.ui_batch import MODES, BatchHandlers
from chat_app.ui_handlers import Handlers
from editing import EditRequest
from tests.service_helpers import same, start, state

FACTS = [
    {"subject": "The Eiffel tower", "relation": "Located in {}", "target": "rome"},
    {"prompt": "The Colosseum is in", "subject": "The Colosseum", "target_new": "london",
     "rephrase_prompt": "Where is The Colosseum? It is in"},
]


@pytest.fixture
def handlers(tmp_path):  # type: ignore[no-untyped-def]
    svc = start(tmp_path / "ledger.db", batch_layers=(1, 2), mom2_weight=1.0)
    return BatchHandlers(svc), Handlers(svc)


def write(tmp_path, name: str, text: str) -> str:  # type: ignore[no-untyped-def]
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_preview_lists_the_facts_or_every_bad_line(handlers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    b, _ = handlers
    summary, frame = b.preview(write(tmp_path, "facts.json", json.dumps(FACTS)))
    assert "2 facts" in summary and len(frame) == 2
    assert list(frame["new object"]) == ["rome", "london"] and list(frame["checks"]) == [0, 1]
    bad = write(tmp_path, "bad.csv", "subject,relation,target\nA,is in,x\nB,{} is in,\nC,{} is in,y\n")
    summary, frame = b.preview(bad)
    assert "refused" in summary and "line 2" in summary and "line 3" in summary and "line 4" not in summary
    assert frame.empty
    assert b.preview(None)[0] == ""
    with pytest.raises(gr.Error, match="refused"):
        b.apply(bad, MODES[1])
    assert b.service.history() == []


def test_apply_all_as_one_batch_then_revert_and_reapply_it_from_history(handlers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    b, h = handlers
    base = state(b.service)
    text, frame = b.apply(write(tmp_path, "facts.jsonl", "\n".join(json.dumps(f) for f in FACTS)), MODES[1])
    assert "Applied 2 of 2 facts" in text and "as batch" in text
    batch = frame["batch"][0]
    assert set(frame["batch"]) == {batch} and all(s.startswith("applied") for s in frame["status"])
    table = h.history()
    assert list(table["batch"]) == [f"{batch} (2/2)", f"{batch} (1/2)"]
    assert list(table["layer"]) == ["1–2", "1–2"]  # every layer a batch fact changes, not only the last
    assert len(h.history(batch=batch)) == 2 and h.history(batch="other").empty
    first = int(frame["edit"][0])
    assert "fact 1 of 2 (MEMIT at layers 1, 2)" in h.detail(first) and batch in h.detail(first)
    assert "2 of 2 facts are now reverted" in b.revert(first) and same(state(b.service), base)
    assert "2 of 2 facts are applied" in b.reapply(first) and b.service.integrity_problems() == []


def test_a_fact_solved_by_alphaedit_names_its_rule_in_the_details(handlers) -> None:  # type: ignore[no-untyped-def]
    b, h = handlers
    result = b.service.apply_batch([EditRequest("The Eiffel tower", "Located in {}", "rome")], update="alphaedit",
                                    null_space_threshold=1.0)  # these tiny models need a higher threshold
    assert "fact 1 of 1 (AlphaEdit at layers 1, 2)" in h.detail(result.records[0].id)


def test_apply_all_one_by_one_records_edits_made_alone(handlers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    b, h = handlers
    text, frame = b.apply(write(tmp_path, "facts.json", json.dumps(FACTS)), MODES[0])
    assert "Applied 2 of 2 facts" in text and "batch" not in text and list(frame["batch"]) == ["", ""]
    assert list(h.history()["batch"]) == ["", ""]
    with pytest.raises(gr.Error, match="not in a batch"):
        b.revert(int(frame["edit"][0]))
    with pytest.raises(gr.Error, match="mode"):
        b.apply(write(tmp_path, "f.json", json.dumps(FACTS)), "all at once")
    with pytest.raises(gr.Error, match="choose a fact file"):
        b.apply(None, MODES[0])


def test_build_ui_names_the_batch_endpoints(handlers) -> None:  # type: ignore[no-untyped-def]
    from chat_app.ui import build_ui

    demo = build_ui(handlers[0].service)
    names = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert {"preview_file", "apply_file", "revert_batch", "reapply_batch", "history"} <= names
