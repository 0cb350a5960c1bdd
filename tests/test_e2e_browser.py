"""End to end in a real browser, with the real default model: chat, correct a fact, see it, revert it.

Starts ``python app.py`` on a free port with a fresh ledger and drives it with Playwright's
Chromium. Screenshots of every tab go to ``artifacts/screenshots/``. The first edit at the
default layer computes key statistics (minutes on a small CPU; cached under
``~/.cache/rome-chat`` afterwards), hence the long timeouts.
"""
from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ui_server import EDIT_TIMEOUT_S, ROOT, missing_default_model, running_app

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "artifacts" / "screenshots"
QUESTION = "Where is the Eiffel Tower?"
QUESTION_PROMPT = "The Eiffel Tower is located in the city of"
REPLY_TIMEOUT_S = 240

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="needs the playwright package"),
    pytest.mark.skipif(missing_default_model() is not None, reason=str(missing_default_model())),
]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("e2e")
    with running_app(folder / "ledger.db", folder / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def page(app_url: str) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(app_url)
        page.wait_for_selector("#chat-input textarea")
        yield page
        browser.close()


def shot(page: object, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def tab(page: object, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def settled_text(locator: object, timeout_s: float, quiet_s: float = 3.0) -> str:
    """The locator's text once it is non-empty and has not changed for ``quiet_s`` (a finished stream)."""
    deadline, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while time.monotonic() < deadline:
        text = locator.inner_text() if locator.count() else ""
        if text != last:
            last, since = text, time.monotonic()
        elif text.strip() and time.monotonic() - since >= quiet_s:
            return text
        time.sleep(0.5)
    raise TimeoutError(f"no settled text within {timeout_s} s; last: {last!r}")


def ask(page: object, question: str) -> str:
    """A fresh conversation with one question; the edited model's reply."""
    tab(page, "Chat")
    if page.locator("#chat-edited [data-testid='user']").count():  # clear, and let the clearing land first
        page.get_by_role("button", name="Clear conversation").click()
        page.wait_for_function("() => !document.querySelector('#chat-edited [data-testid=\"user\"]')")
    page.locator("#chat-input textarea").fill(question)
    page.locator("#chat-send").click()
    try:
        return settled_text(page.locator("#chat-edited [data-testid='bot']").last, REPLY_TIMEOUT_S)
    except TimeoutError as err:
        shot(page, "failure")
        raise TimeoutError(f"{err}; the chat shows: {page.locator('#chat-edited').inner_text()!r}") from err


def wait_for_text(locator: object, needle: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = locator.inner_text() if locator.count() else ""
        if needle.lower() in text.lower():
            return text
        time.sleep(1)
    raise TimeoutError(f"{needle!r} did not appear within {timeout_s} s")


def no_spinner(page: object, timeout_s: float) -> None:
    """Wait until no component shows Gradio's "processing" status; fail if one still does after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    spinning = "() => /processing \\|/.test(document.body.innerText)"  # Gradio's status: "processing | 2.6s"
    while time.monotonic() < deadline:
        if not page.evaluate(spinning):
            return
        time.sleep(0.5)
    shot(page, "failure")
    raise AssertionError(f"a spinner still shows {timeout_s} s after the edit was applied")


def test_correct_a_fact_see_it_in_chat_and_history_then_revert(page: object) -> None:
    before = ask(page, QUESTION)
    assert "rome" not in before.lower(), before
    shot(page, "1-chat")

    # The Chatbot's own clear icon clears the conversation, not only the view: the old turn never comes back.
    no_spinner(page, REPLY_TIMEOUT_S)  # the reply has finished streaming
    page.locator("#chat-edited button[aria-label='Clear']").first.click()
    page.wait_for_function("() => !document.querySelector('#chat-edited [data-testid=\"user\"]')")
    page.locator("#chat-input textarea").fill("Hello")
    page.locator("#chat-send").click()
    settled_text(page.locator("#chat-edited [data-testid='bot']").last, REPLY_TIMEOUT_S)
    no_spinner(page, REPLY_TIMEOUT_S)
    users = page.locator("#chat-edited [data-testid='user']")
    assert users.count() == 1 and "Eiffel" not in users.first.inner_text()

    tab(page, "Correct a fact")
    page.locator("#form-subject textarea").fill("The Eiffel Tower")
    page.locator("#form-target textarea").fill("Rome")
    page.locator("#form-preview").click()
    wait_for_text(page.locator("#form-completion"), "located in the city of", 120)
    page.locator("#form-apply").click()
    result = wait_for_text(page.locator("#form-result"), "applied", EDIT_TIMEOUT_S)
    assert "Edit #1 applied" in result and "no paraphrases or neighbours were checked" in result
    wait_for_text(page.locator("#banner"), "1 edit active", 60)  # refreshed right after the result
    result = wait_for_text(page.locator("#form-result"), "checked in", 120)  # the chat row, answered next
    assert "checking" not in result and "the chat reply" in result
    assert "checking" not in page.locator("#form-probes").inner_text()
    no_spinner(page, 30)
    shot(page, "2-correct-a-fact")

    tab(page, "Chat")
    page.locator("#chat-compare input").check()
    after = ask(page, QUESTION)
    assert "rome" in after.lower(), after
    original = settled_text(page.locator("#chat-original [data-testid='bot']").last, REPLY_TIMEOUT_S)
    assert "rome" not in original.lower(), original
    shot(page, "3-chat-edited-vs-original")

    tab(page, "History")
    table = page.locator("#history-table")
    wait_for_text(table, "Eiffel Tower", 30)
    assert "applied" in table.inner_text() and "requested" in table.inner_text()
    rows = [row for row in table.get_by_role("row").all_inner_texts() if "Eiffel Tower" in row]
    assert rows and "Rome" in rows[0].split("Paris")[0]  # the object the user asked for, before the old → new answer
    table.get_by_text("Eiffel Tower").filter(visible=True).first.click()
    wait_for_text(page.locator("#history-detail"), "Audit trail", 30)
    page.locator("#history-revert").click()
    wait_for_text(page.locator("#history-action"), "Reverted edit #1", 120)
    wait_for_text(table, "reverted", 30)
    wait_for_text(page.locator("#banner"), "0 edits active", 60)
    shot(page, "4-history")

    tab(page, "Chat")
    page.locator("#chat-compare input").uncheck()
    reverted = ask(page, QUESTION)
    assert "rome" not in reverted.lower(), reverted

    tab(page, "Locate")
    page.get_by_label("Prompt", exact=True).fill(QUESTION_PROMPT)
    page.get_by_label("Subject (as written in the prompt)").fill("The Eiffel Tower")
    page.locator("#locate-quick").click()
    wait_for_text(page.locator("#locate-summary"), "Quick approximation", 120)
    no_spinner(page, 30)
    shot(page, "5-locate")
