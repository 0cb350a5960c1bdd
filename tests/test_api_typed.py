"""The running app (a tiny model, in a subprocess) through ``gradio_client`` and raw HTTP: input of the wrong
type is refused with a message and nothing recorded, no traceback reaches the client or the log, export files
do not pile up, and SIGTERM leaves every edit in the ledger file itself (the -wal can be lost)."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from db import Ledger
from editing import EditRequest
from tests.reliability_helpers import ROOT, app_env, tiny_app_on_disk
from tests.ui_server import free_port, wait_until_serving

FACT = EditRequest("The Eiffel tower", "Located in {}", "rome")
LAYER = 1  # the tiny model's default layer, whose statistics tiny_app_on_disk cached


def form(**change: Any) -> dict[str, Any]:
    """The /apply_edit fields by name, as a script would send them."""
    fields = {"subject": FACT.subject, "relation": FACT.relation, "target": FACT.target, "paraphrases": "",
              "neighbours": "", "layer": LAYER, "steps": 2, "lr": 0.5, "kl_factor": 0.0625, "note": ""}  # fmt: skip
    return {**fields, **change}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    disk = tiny_app_on_disk(tmp_path_factory.mktemp("typed"), {})
    root, port = disk["root"], free_port()
    (root / "tmp").mkdir()
    log_path, ledger = root / "server.log", root / "ledger.db"
    argv = [sys.executable, str(ROOT / "app.py"), "--model", str(disk["model"]), "--db", str(ledger),
            "--port", str(port)]  # fmt: skip
    env = app_env(disk["cache"], TMPDIR=str(root / "tmp"), GRADIO_TEMP_DIR=str(root / "gradio"))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_until_serving(proc, url, log_path, timeout_s=240)
            yield {"url": url, "log": log_path, "proc": proc, "ledger": ledger, "tmp": root / "tmp"}
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(60)


@pytest.fixture(scope="module")
def client(server: dict[str, Any]) -> Any:
    from gradio_client import Client

    return Client(server["url"], verbose=False, download_files=False)


def rows(client: Any) -> list[Any]:
    return client.predict("", "all", api_name="/history")["data"]


REFUSED = [
    ("/apply_edit", form(subject=["a", "b"]), "subject must be text, got a list"),
    ("/apply_edit", form(subject=12345), "subject must be text, got a number"),
    ("/apply_edit", form(target={"x": 1}), "new object must be text, got an object"),
    ("/apply_edit", form(relation=["{} is in"]), "relation must be text, got a list"),
    ("/apply_edit", form(layer="abc"), "layer must be a number, got text: 'abc'"),
    ("/apply_edit", form(lr="nan"), "learning rate must be a number, got text: 'nan'"),
    ("/apply_edit", form(steps=True), "optimisation steps must be a number, got true/false"),
    ("/apply_edit_anyway", form(subject=[1]), "subject must be text, got a list"),
    ("/preview", {"subject": ["a"], "relation": FACT.relation, "target": "x"}, "subject must be text"),
    ("/history", {"text": 5, "status": "all"}, "filter must be text, got a number"),
    ("/detail", {"edit_id": "abc"}, "selected edit id must be a number, got text"),
    ("/revert", {"edit_id": [1]}, "selected edit id must be a number, got a list"),
    ("/chat", {"message": ["hi"]}, "message must be text, got a list"),
    ("/chat", {"message": "hi", "max_new_tokens": "abc"}, "max new tokens must be a number"),
    ("/locate", {"prompt": 3, "subject": "x", "expected": ""}, "prompt must be text"),
    ("/history", {"text": "", "status": "bogus"}, "bogus is not in the list of choices"),
]


@pytest.mark.parametrize(("endpoint", "fields", "message"), REFUSED)
def test_wrong_types_are_refused_with_a_message_and_nothing_recorded(client: Any, endpoint: str,
                                                                     fields: dict[str, Any], message: str) -> None:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message.replace("(", r"\(")):
        client.predict(**fields, api_name=endpoint)
    assert rows(client) == []


def _raw_call(url: str, endpoint: str, data: list[Any]) -> str:
    """POST as a script without gradio_client would; return the event stream's text."""
    call = urllib.request.Request(f"{url}gradio_api/call/{endpoint}", data=json.dumps({"data": data}).encode(),
                                  headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(call, timeout=30) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{endpoint}/{event_id}", timeout=60) as response:
        return response.read().decode()


@pytest.mark.parametrize(("endpoint", "data", "message"), [
    ("apply_edit", list(form(lr="nan").values()), "learning rate must be a number"),
    ("import_edits", [5], "must be a file uploaded with the request"),
    ("import_edits", ["/etc/hostname"], "must be a file uploaded with the request .*got text"),
])  # fmt: skip
def test_a_raw_post_gets_the_message_too(server: dict[str, Any], client: Any, endpoint: str, data: list[Any],
                                         message: str) -> None:  # fmt: skip
    stream = _raw_call(server["url"], endpoint, data)
    assert "event: error" in stream and re.search(message, stream), stream
    assert rows(client) == []


def test_no_traceback_reaches_the_log_and_each_refusal_is_one_line(server: dict[str, Any], client: Any) -> None:
    from gradio_client.exceptions import AppError

    before = server["log"].read_text(errors="replace").count("refused a request")
    with pytest.raises(AppError):
        client.predict(**form(subject=["a"]), api_name="/apply_edit")
    log = server["log"].read_text(errors="replace")
    assert log.count("refused a request") == before + 1
    assert "Traceback" not in log and "upstream Gradio app has raised" not in log


def test_exports_leave_one_folder_and_sigterm_keeps_every_edit_in_the_ledger_file(
    server: dict[str, Any], client: Any,
) -> None:  # fmt: skip
    """Runs last: it stops the server."""
    result, _ = client.predict(**form(), api_name="/apply_edit_anyway")  # a tiny model's edit may not hold
    assert "Edit #1 applied" in result
    for _ in range(3):
        exported, _ = client.predict(api_name="/export")
    assert len(list(server["tmp"].glob("rome-chat-export*"))) == 1
    from gradio_client import handle_file

    path = exported if isinstance(exported, str) else exported["path"]  # the server's copy, on this machine
    report = client.predict(handle_file(path), api_name="/import_edits")  # a real upload still works
    assert "Imported 0 edits" in report and "skipped 1" in report
    proc, ledger = server["proc"], server["ledger"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    log = server["log"].read_text(errors="replace")
    assert "checkpointed and closed" in log and "Traceback" not in log
    assert list(server["tmp"].glob("rome-chat-export*")) == []  # removed at exit
    for leftover in (ledger.with_name(ledger.name + "-wal"), ledger.with_name(ledger.name + "-shm")):
        leftover.unlink(missing_ok=True)  # lost, or never copied along with the .db
    with Ledger.open(ledger) as reopened:
        assert [(r.id, r.status, r.subject) for r in reopened.history()] == [(1, "applied", FACT.subject)]


def test_checked_inputs_use_their_gradio_front_end() -> None:
    """A checked input must name its Gradio component for the page, or the page never finishes loading."""
    import gradio as gr

    from chat_app import ui_inputs

    made = {ui_inputs.Textbox(): "textbox", ui_inputs.IdBox(): "textbox", ui_inputs.Number(): "number",
            ui_inputs.Slider(0, 1): "slider", ui_inputs.Dropdown(["a"]): "dropdown", ui_inputs.Radio(["a"]): "radio",
            ui_inputs.CheckboxGroup(["a"]): "checkboxgroup", ui_inputs.File(): "file"}  # fmt: skip
    for component, name in made.items():
        assert component.get_block_name() == name and isinstance(component, gr.components.Component)


def test_checked_inputs_send_their_settings_to_the_page() -> None:
    """The page gets each checked input's label, elem_id and options (the file input overrides ``__init__``)."""
    from chat_app import ui_inputs

    made = [ui_inputs.File(label="Fact file", elem_id="f", file_types=[".json"], file_count="single"),
            ui_inputs.Textbox(label="Subject", elem_id="t"), ui_inputs.Radio(["a"], label="Mode", elem_id="r")]  # fmt: skip
    for component in made:
        config = component.get_config()
        assert config["label"] == component.label and config["elem_id"] == component.elem_id, config
    assert made[0].get_config()["file_types"] == [".json"]
