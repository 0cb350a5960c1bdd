"""Shared fixtures: a throwaway PostgreSQL server, ``ledger_url`` over SQLite and PostgreSQL, and one torch thread."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg_server import PgServer, missing_reason


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the session; skipped (with the reason) where it cannot run."""
    reason = missing_reason()
    if reason is not None:
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    server = PgServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty ledger location: a SQLite file, or a fresh database on the test PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "edits.db")
    return request.getfixturevalue("pg_server").new_database()


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """torch on one thread for the test (tiny models gain nothing from threads on a shared machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
