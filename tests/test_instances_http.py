"""Two app instances served in this process on one ledger, driven through their HTTP API with ``gradio_client``.

Instance A asks for a password (``--auth``); the user who signs in is recorded as the edit's
author. Instance B (read-only, no password) follows the ledger: its chat answers with A's
edit once it has followed, and with the base weights after a CLI revert. (The follow time is
measured by bench/instances.py; here it is bounded generously for a busy machine.)
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import gradio as gr

from chat_app.follow import Follower
from chat_app.service import EditService
from chat_app.ui import CONCURRENCY, build_ui
from tests.pg_server import wait_until
from tests.reliability_helpers import digest, fast_service, one_thread
from tests.ui_server import free_port

USER = ("alice", "correct horse")
QUESTION = "Where is the Eiffel tower?"
FOLLOW_S = 30.0  # a bound for a busy CI machine; the 2 s target is measured by bench/instances.py


@contextmanager
def serving(service: EditService, auth: list[tuple[str, str]] | None = None) -> Iterator[str]:
    demo: gr.Blocks = build_ui(service)
    demo.queue(default_concurrency_limit=CONCURRENCY)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, auth=auth)
    follower = Follower(service).start()
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        follower.stop()
        demo.close()


def test_edit_through_a_shows_in_b_and_records_the_signed_in_author(ledger_url: str) -> None:
    from gradio_client import Client

    with one_thread():
        a, b = fast_service(ledger_url), fast_service(ledger_url, read_only=True)
        base = digest(b.model)
        with serving(a, auth=[USER]) as url_a, serving(b) as url_b:
            client_a, client_b = Client(url_a, auth=USER, verbose=False), Client(url_b, verbose=False)
            ask = lambda client: client.predict(QUESTION, "", 0.0, 8, False, api_name="/chat")  # noqa: E731
            result = client_a.predict("The Eiffel tower", "Located in {}", "rome", "", "", 2, 3, 0.5, 0.0625,
                                      "from A", api_name="/apply_edit")  # fmt: skip
            assert "Edit #1 applied" in result[0]
            assert wait_until(lambda: b.active_count == 1, FOLLOW_S) is not None, "B did not follow A"
            assert ask(client_b) == ask(client_a) and digest(b.model) == digest(a.model) != base
            assert a.record(1).author == "alice" and "alice" in str(client_b.predict("", "all", api_name="/history"))
            cli = fast_service(ledger_url)  # the CLI's view: a fresh process on the same ledger
            cli.revert(1, actor="cli")
            assert wait_until(lambda: a.active_count == b.active_count == 0, FOLLOW_S) is not None
            assert digest(a.model) == digest(b.model) == base
