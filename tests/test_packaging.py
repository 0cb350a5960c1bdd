"""``pyproject.toml``: an editable install in a fresh virtual environment gives the ``rome-chat`` command; a wheel builds.

Slow (a venv and two isolated builds, about a minute): run with ``-m slow``. The source is copied first,
so the builds leave nothing in the checkout. The fresh venv sees the project's installed dependencies
through a ``.pth`` file, as ``pip install --no-deps`` after ``requirements.txt`` would.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "app.py", "chat_app", "db", "editing")


def _copy_source(dest: Path) -> Path:
    dest.mkdir()
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _run(*cmd: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done


@pytest.mark.slow
def test_editable_install_gives_the_console_command_and_a_wheel_builds(tmp_path: Path) -> None:
    source = _copy_source(tmp_path / "src")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip()
    (Path(site) / "zz_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "-e", source, cwd=tmp_path)
    command = env_dir / "bin" / "rome-chat"
    assert command.is_file()
    out = _run(command, "--db", tmp_path / "ledger.db", "history", "--json", cwd=tmp_path).stdout
    assert json.loads(out) == []  # the same CLI as app.py, over an empty ledger
    assert "export-model" in _run(command, "--help", cwd=tmp_path).stdout
    _run(python, "-m", "pip", "wheel", "-q", "--no-deps", source, "-w", tmp_path / "dist", cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("rome_chat-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"app.py", "chat_app/service.py", "db/ledger.py", "editing/editor.py"} <= set(names)
    shipped = {f"editing/shipped/{p.name}" for p in (Path(source) / "editing" / "shipped").glob("*.pt")}
    assert shipped and shipped <= set(names)  # the default model's statistics travel with the wheel
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rome-chat = app:console" in zipfile.ZipFile(wheel).read(entry).decode()
