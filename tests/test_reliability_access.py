"""Access: loopback by default, a password over the whole app, a read-only mode enforced by the server,
no secret in the logs, and a ledger file only its owner can read."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from unittest import mock
from typing import Any

import pytest

import app
import chat_app.cli  # noqa: F401 - imported before test_serving_… patches what it imports
from editing import EditRequest
from tests.reliability_helpers import ROOT, app_env, cli_runner, in_process_app, one_thread, tiny_app_on_disk
from tests.ui_server import free_port, wait_until_serving

USER, SECRET = "ana", "Tr0ub4dor&3-not-in-any-log"
FACT = EditRequest("The Eiffel tower", "Located in {}", "rome")
OTHER = EditRequest("Big Ben", "{} is in", "paris")


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model on disk; a ledger with one applied edit; an export of an edit it does not hold."""
    return tiny_app_on_disk(tmp_path_factory.mktemp("access"), {"ledger.db": [FACT], "other.db": [OTHER]},
                            {"other.zip": "other.db"})  # fmt: skip


# ----- settings ----------------------------------------------------------------------------------
def test_default_host_is_loopback() -> None:
    assert app.parse_args([]).host == "127.0.0.1"
    assert app.parse_args(["--port", "8000"]).host == "127.0.0.1"


def test_credentials_from_flag_environment_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROME_CHAT_AUTH", raising=False)
    monkeypatch.delenv("ROME_CHAT_AUTH_FILE", raising=False)
    assert app.read_auth(None) is None
    assert app.read_auth(f"{USER}:{SECRET}") == [(USER, SECRET)]
    monkeypatch.setenv("ROME_CHAT_AUTH", "env:pw:with:colons")
    assert app.read_auth(None) == [("env", "pw:with:colons")]
    assert app.read_auth(f"{USER}:{SECRET}") == [(USER, SECRET)]  # the flag wins
    monkeypatch.delenv("ROME_CHAT_AUTH")
    creds = tmp_path / "users"
    creds.write_text(f"# who may edit\n{USER}:{SECRET}\n\nbob:hunter2\n")
    monkeypatch.setenv("ROME_CHAT_AUTH_FILE", str(creds))
    assert app.read_auth(None) == [(USER, SECRET), ("bob", "hunter2")]
    creds.write_text(f"{USER}{SECRET}\n")  # no colon: refused, and the message does not repeat the line
    with pytest.raises(SystemExit) as refused:
        app.read_auth(None)
    assert "user:password" in str(refused.value) and SECRET not in str(refused.value)


def test_serving_passes_loopback_and_credentials_to_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    served: dict[str, Any] = {}
    monkeypatch.setattr("chat_app.runtime.build_service", lambda settings: (SimpleNamespace(read_only=settings.read_only, ledger=mock.Mock()), None))
    monkeypatch.setattr("chat_app.ui.launch", lambda service, **kw: served.update(kw, read_only=service.read_only))
    assert app.main(["--auth", f"{USER}:{SECRET}", "--read-only"]) == 0
    served.pop("warmup")  # the background statistics, which a read-only app never needs to wait for
    assert served == {"host": "127.0.0.1", "port": 7860, "auth": [(USER, SECRET)], "read_only": True}


# ----- the command line --------------------------------------------------------------------------
@pytest.fixture
def run(disk: dict[str, Path], capsys: Any) -> Any:
    return cli_runner(disk, capsys)


def test_cli_read_only_refuses_changes_and_allows_reading(run: Any, disk: dict[str, Path], tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    db.write_bytes(disk["ledger.db"].read_bytes())
    before = run(db, "history", "--json")[1]
    changes = [["edit", "--subject", OTHER.subject, "--relation", OTHER.relation, "--target", OTHER.target],
               ["revert", "1"], ["reapply", "1"], ["import", str(disk["other.zip"])]]  # fmt: skip
    for argv in changes:
        code, _, err = run(db, "--read-only", *argv)  # a global flag: before the command
        assert code == 2 and "read-only" in err, (argv, err)
    assert run(db, "--read-only", "history")[0] == 0
    assert run(db, "--read-only", "verify")[0] in (0, 1)  # 1: a tiny model's probes may not hold
    assert run(db, "--read-only", "export", str(tmp_path / "out.zip"))[0] == 0
    assert run(db, "history", "--json")[1] == before


def test_cli_creates_an_owner_only_ledger(run: Any, disk: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    old_umask = os.umask(0o022)  # a usual umask: files would be world-readable by default
    try:
        db = tmp_path / "new" / "sub" / "ledger.db"
        code, _, _ = run(db, "edit", "--subject", OTHER.subject, "--relation", OTHER.relation, "--target", OTHER.target)
        assert code == 0
        monkeypatch.setenv("ROME_CHAT_DATA", str(tmp_path / "data"))  # the default place, without --db
        with in_process_app(disk["cache"]), one_thread():
            assert app.main(["--model", str(disk["model"]), "history"]) == 0
    finally:
        os.umask(old_umask)
    created = [db, *db.parent.glob("ledger.db-*"), *(tmp_path / "data").glob("*.ledger.db*")]
    assert len(created) >= 2 and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in created), created
    for folder in (tmp_path / "new", tmp_path / "new" / "sub", tmp_path / "data"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


# ----- the running app ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(disk: dict[str, Path]) -> Iterator[dict[str, Any]]:
    """``app.py --auth … --read-only -v`` on the default host, with its whole output captured."""
    port, log_path = free_port(), disk["root"] / "server.log"
    argv = [sys.executable, str(ROOT / "app.py"), "--model", str(disk["model"]), "--db", str(disk["ledger.db"]),
            "--port", str(port), "--auth", f"{USER}:{SECRET}", "--read-only", "-v"]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=app_env(disk["cache"]), stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_until_serving(proc, url, log_path, timeout_s=240)
            yield {"url": url, "port": port, "log": log_path, "proc": proc}
        finally:
            proc.terminate()
            proc.wait(60)


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as the kernel lists them) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    found.append(local.rsplit(":", 1)[0])
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads the kernel's socket table (Linux)")
def test_server_listens_on_loopback_only(server: dict[str, Any]) -> None:
    assert _listeners(server["port"]) == ["0100007F"]  # 127.0.0.1, and nothing on 0.0.0.0 or ::


def test_password_protects_every_page_and_api_call(server: dict[str, Any]) -> None:
    from gradio_client import Client

    for path in ("config", "gradio_api/info"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server["url"] + path, timeout=10)
        assert refused.value.code == 401
    call = urllib.request.Request(server["url"] + "gradio_api/call/chat", data=json.dumps({"data": ["hi"]}).encode(),
                                  headers={"Content-Type": "application/json"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(call, timeout=10)
    assert refused.value.code == 401
    with pytest.raises(Exception, match="credentials were not provided"):
        Client(server["url"], verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(server["url"], auth=(USER, "wrong"), verbose=False)


def test_read_only_server_lets_visitors_chat_and_read_but_refuses_changes(server: dict[str, Any],
                                                                          disk: dict[str, Path]) -> None:  # fmt: skip
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server["url"], auth=(USER, SECRET), verbose=False, download_files=False)
    assert isinstance(client.predict("Where is the tower?", "", 0.0, 8, False, api_name="/chat"), str)
    before = client.predict("", "all", api_name="/history")["data"]
    assert [row[0] for row in before] == [1]
    fact = {"subject": OTHER.subject, "relation": OTHER.relation, "target": OTHER.target, "paraphrases": "",
            "neighbours": ""}  # fmt: skip
    refusals = [lambda: client.predict(**fact, api_name="/apply_edit"), lambda: client.predict(1, api_name="/revert"),
                lambda: client.predict(1, api_name="/reapply"),
                lambda: client.predict(handle_file(str(disk["other.zip"])), api_name="/import_edits")]  # fmt: skip
    for call in refusals:  # called directly, as a script would: the page hiding buttons is no protection
        with pytest.raises(AppError, match="read-only"):
            call()
    assert client.predict("", "all", api_name="/history")["data"] == before


def test_no_secret_in_the_logs(server: dict[str, Any]) -> None:
    from gradio_client import Client

    Client(server["url"], auth=(USER, SECRET), verbose=False).predict("hi", "", 0.0, 4, False, api_name="/chat")
    log = server["log"].read_text(errors="replace")
    assert "serving on http://127.0.0.1" in log and "password protected" in log  # the log was captured
    assert SECRET not in log
