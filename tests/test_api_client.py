"""The same flow as the browser test, through the app's named API endpoints with ``gradio_client``.

Real default model, fresh ledger; the first edit at the default layer may compute key
statistics (minutes, then cached under ``~/.cache/rome-chat``).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ui_server import missing_default_model, running_app

QUESTION = "Where is the Eiffel Tower?"
FACT = ("The Eiffel Tower", "{} is located in the city of", "Rome")

pytestmark = pytest.mark.skipif(missing_default_model() is not None, reason=str(missing_default_model()))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from gradio_client import Client

    folder = tmp_path_factory.mktemp("api")
    with running_app(folder / "ledger.db", folder / "server.log") as url:
        yield Client(url, verbose=False, download_files=str(folder / "downloads"))


def chat(client: object) -> str:
    return client.predict(QUESTION, "", 0.0, 64, False, api_name="/chat")


def apply_args(subject: str, relation: str, target: str, layer: int = 9) -> tuple[object, ...]:
    # subject, relation, target, paraphrases, neighbours, layer, steps, lr, KL factor, note
    return (subject, relation, target, "The Eiffel Tower stands in the city of", "The Louvre is located in the city of",
            layer, 20, 0.5, 0.0625, "from the API test")  # fmt: skip


def rows(client: object, text: str = "", status: str = "all") -> list[list[object]]:
    return client.predict(text, status, api_name="/history")["data"]


def test_endpoints_are_named(client: object) -> None:
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/chat", "/preview", "/apply_edit", "/history", "/revert", "/reapply", "/verify", "/export",
            "/import_edits", "/detail"} <= names  # fmt: skip


def test_invalid_edit_is_refused_with_a_message_and_nothing_recorded(client: object) -> None:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="exactly one"):
        client.predict(*apply_args("The Eiffel Tower", "is located in", "Rome"), api_name="/apply_edit")
    with pytest.raises(AppError, match="maximum value 29|out of range"):
        client.predict(*apply_args(*FACT, layer=99), api_name="/apply_edit")
    with pytest.raises(AppError, match="kl_factor must be in"):
        client.predict(*apply_args(*FACT)[:8], 1000.0, "", api_name="/apply_edit")
    assert rows(client) == []


def test_apply_changes_the_answer_then_revert_restores_it(client: object, tmp_path: Path) -> None:
    assert "rome" not in chat(client).lower()
    completion, top, conflict = client.predict(*FACT, api_name="/preview")
    assert "located in the city of" in completion and len(top["confidences"]) == 5 and not conflict

    result, probes = client.predict(*apply_args(*FACT), api_name="/apply_edit")
    assert "Edit #1 applied" in result
    assert [r[0] for r in probes["data"]] == ["edited", "paraphrase", "neighbour", "chat"]
    assert "rome" in chat(client).lower()
    assert "rome" not in client.predict(QUESTION, "", 0.0, 64, True, api_name="/chat").lower()  # the original

    table = rows(client, "eiffel", "applied")
    assert [r[0] for r in table] == [1] and "Eiffel Tower" in table[0][2]
    assert "Audit trail" in client.predict(1, api_name="/detail")
    summary, _ = client.predict(api_name="/verify")
    assert summary.startswith("1/1 applied edits still hold")

    exported, note = client.predict(api_name="/export")
    assert "Exported 1 applied edit" in note and Path(exported).is_file()

    message, _ = client.predict(1, api_name="/revert")
    assert "Reverted edit #1" in message
    assert rows(client, status="applied") == [] and "rome" not in chat(client).lower()

    from gradio_client import handle_file

    report = client.predict(handle_file(exported), api_name="/import_edits")
    assert "Imported 0 edits" in report and "skipped 1" in report  # the same edit is already in the ledger
    message, _ = client.predict(1, api_name="/reapply")
    assert "Re-applied edit #1" in message and "rome" in chat(client).lower()
