"""A throwaway PostgreSQL server for the tests: Debian's binaries, a temp dir, a unix socket, a random port.

``PgServer.start()`` runs ``initdb`` and ``pg_ctl`` as the current user, or as the unprivileged
``postgres`` user when the tests run as root (PostgreSQL refuses to run as root). The server
listens only on a unix socket in its temp dir (trust authentication, no TCP); each test gets a
fresh database from ``new_database()``. ``missing_reason()`` says why no server can be started.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import pwd
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
START_TIMEOUT_S = 60


def bin_dir() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if Path(folder, "initdb").exists() and Path(folder, "pg_ctl").exists():
            return Path(folder)
    return None


def _run_as() -> list[str]:
    """The command prefix that runs the server's binaries as a user PostgreSQL accepts."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise RuntimeError("tests run as root, but runuser is missing to drop to the postgres user")
    return [runuser, "-u", "postgres", "--"]


def missing_reason() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None when they can."""
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed (pip install -r requirements.txt)"
    if bin_dir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "tests run as root and there is no unprivileged 'postgres' user to run the server"
    return None


@dataclass
class PgServer:
    root: Path
    port: int
    _bin: Path
    _counter: int = 0

    @classmethod
    def start(cls) -> PgServer:
        folder = bin_dir()
        if folder is None:
            raise RuntimeError(missing_reason() or "no PostgreSQL binaries")
        root = Path(tempfile.mkdtemp(prefix="rome-chat-pg-"))
        prefix = _run_as()
        if prefix:
            account = pwd.getpwnam("postgres")
            os.chown(root, account.pw_uid, account.pw_gid)
        os.chmod(root, 0o755)  # the test process (root or owner) reaches the socket
        data = root / "data"
        subprocess.run([*prefix, str(folder / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=START_TIMEOUT_S)  # fmt: skip
        port = random.randint(20000, 60000)
        options = f"-k {root} -c listen_addresses='' -p {port} -c fsync=off -c max_connections=60"
        subprocess.run([*prefix, str(folder / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"),
                        "-w", "-t", str(START_TIMEOUT_S), "start"], check=True, capture_output=True,
                       timeout=START_TIMEOUT_S + 10)  # fmt: skip
        log.info("test PostgreSQL on %s port %d", root, port)
        return cls(root, port, folder)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.root}&port={self.port}"

    def new_database(self) -> str:
        """Create an empty database; return its SQLAlchemy URL."""
        import psycopg

        self._counter += 1
        name = f"t{os.getpid()}_{self._counter}"
        with psycopg.connect(host=str(self.root), port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:  # fmt: skip
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            subprocess.run([*_run_as(), str(self._bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate",
                            "-w", "stop"], capture_output=True, timeout=60)  # fmt: skip
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def wait_until(check, timeout_s: float, interval_s: float = 0.02) -> float | None:  # type: ignore[no-untyped-def]
    """Poll ``check()`` until true; return the seconds it took, or None on timeout."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if check():
            return time.perf_counter() - t0
        time.sleep(interval_s)
    return None
