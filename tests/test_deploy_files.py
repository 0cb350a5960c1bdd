"""compose.yaml, the Dockerfile and .dockerignore agree with each other and with the app (no Docker needed)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from app import parse_args

ROOT = Path(__file__).resolve().parent.parent
yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read compose.yaml")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def dockerfile() -> dict[str, list[str]]:
    """Instruction → its arguments, one entry per line (continuations joined)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


def apps(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if name != "postgres"}


def test_two_apps_on_one_postgres_ledger(compose: dict) -> None:
    pg = compose["services"]["postgres"]
    assert pg["image"].startswith("postgres:") and "test" in pg["healthcheck"]
    user, db = pg["environment"]["POSTGRES_USER"], pg["environment"]["POSTGRES_DB"]
    assert len(apps(compose)) == 2
    for name, app in apps(compose).items():
        url = app["environment"]["DATABASE_URL"]
        assert re.fullmatch(rf"postgresql\+psycopg://{user}:\$\{{POSTGRES_PASSWORD\}}@postgres:5432/{db}", url), name
        assert app["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert app["build"] == "." and (ROOT / "Dockerfile").is_file()
    published = [app["ports"][0].split(":") for app in apps(compose).values()]
    assert len({host for host, _ in published}) == 2  # one host port per instance
    assert {container for _, container in published} == {dockerfile()["EXPOSE"][0]} == {"7860"}


def test_volumes_hold_the_ledger_and_the_cache(compose: dict) -> None:
    declared = set(compose["volumes"])
    pg_data = [v.split(":") for v in compose["services"]["postgres"]["volumes"]]
    assert [(name, path) for name, path in pg_data] == [("ledger", "/var/lib/postgresql/data")]
    env = dict(item.split("=", 1) for item in shlex.split(dockerfile()["ENV"][0]))
    for app in apps(compose).values():
        mounts = dict(v.split("#")[0].strip().split(":")[:2] for v in app["volumes"])
        assert mounts == {"cache": env["ROME_CHAT_CACHE"]}
    assert declared == {"ledger", "cache"}


def test_image_installs_as_the_makefile_and_runs_the_app() -> None:
    steps = dockerfile()
    install = next(r for r in steps["RUN"] if "pip install" in r)
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps -r requirements.txt" in makefile and "--no-deps" in install and "-r requirements.txt" in install
    assert any(c.startswith("requirements.txt") for c in steps["COPY"])
    entry = json.loads(steps["ENTRYPOINT"][0])  # the exec form is a JSON array
    assert entry[:2] == ["python", "app.py"]
    assert parse_args(entry[2:]).host == "0.0.0.0"
    assert parse_args([*entry[2:], "history"]).command == "history"  # `docker compose run --rm app1 history`
    assert parse_args([*entry[2:], "--device-map", "auto"]).device_map == "auto"


def test_dockerignore_keeps_ledgers_and_the_venv_out() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")}
    assert {".venv", "data", ".git"} <= ignored
