"""Shared by the reliability, fault, access and load tests: a fast tiny service, weight digests, a tiny model
on disk, subprocess plumbing."""
from __future__ import annotations

import codecs
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

import app
from chat_app.runtime import Settings, build_service
from chat_app.service import EditService
from chat_app.startup import replay
from chat_app.transfer import export_file
from db import Ledger
from editing import EditRequest, RomeEditor, RomeHyperParams, load_model
from editing import stats as stats_module
from editing.fingerprint import tensor_checksum
from editing.stats import compute_second_moment
from tests.tiny import CORPUS, tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
LAYER = 2
FAST_HPARAMS = {"steps": 3, "lr": 0.5, "value_templates": 2, "stats_samples": 10}


def fast_service(ledger_path: Path, seed: int = 0, tok: object | None = None, **service_args: object) -> EditService:
    """A tiny Llama with one layer's statistics and two templates ready: an edit takes well under a second."""
    tok = tok or tiny_tokenizer()
    model = tiny_llama(seed)
    editor = RomeEditor(model, tok, RomeHyperParams(layer=LAYER, **FAST_HPARAMS))
    cov, _ = compute_second_moment(model, tok, LAYER, CORPUS)
    ridge = 1e-3 * torch.eye(cov.shape[0], dtype=torch.float64)  # the tiny corpus has few tokens
    editor._covs[(LAYER, FAST_HPARAMS["stats_samples"])] = cov + ridge  # noqa: SLF001
    editor._templates = ["{}", "Some text here. {}"]  # noqa: SLF001 - no corpus in a unit test
    service = EditService(editor, Ledger.open(ledger_path), **service_args)  # type: ignore[arg-type]
    service.min_target_prob = 0.0  # tiny random models cannot become confident
    replay(service)
    return service


def digest(model: torch.nn.Module) -> dict[str, str]:
    """The SHA-256 of every tensor of the model's state, by name."""
    return {name: tensor_checksum(t) for name, t in model.state_dict().items()}


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and the CI machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save_tiny_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def seed_stats_cache(model_dir: Path, layers: tuple[int, ...] = (1,)) -> None:
    """Write the statistics the app will look for (default sample count and corpus) into ``$ROME_CHAT_CACHE``,
    computed over the tiny in-test corpus: the app then finds them cached instead of reading 2,000 texts."""
    model, tok = load_model(model_dir)
    editor = RomeEditor(model, tok)
    hp = editor.hparams
    with mock.patch.object(stats_module, "read_corpus", lambda corpus=None: CORPUS):
        for layer in layers:
            stats_module.second_moment(model, tok, editor.fingerprint, layer, hp.stats_samples, hp.stats_max_tokens)


@contextmanager
def in_process_app(cache: Path) -> Iterator[None]:
    """The app's environment for code run in this process: its own cache, the refusal threshold off."""
    with mock.patch.dict(os.environ, {"ROME_CHAT_CACHE": str(cache), "ROME_CHAT_MIN_TARGET_PROB": "0"}):
        yield


def tiny_app_on_disk(root: Path, ledgers: Mapping[str, Sequence[EditRequest]],
                     exports: Mapping[str, str] | None = None) -> dict[str, Path]:  # fmt: skip
    """A tiny model saved under ``root`` (statistics cached) and ledgers made by the app: each ledger file name
    maps to the requests applied, in order; ``exports`` maps an export file name to the ledger it exports."""
    paths = {"root": root, "cache": root / "cache", "model": root / "model"}
    with in_process_app(paths["cache"]), one_thread():
        save_tiny_model(paths["model"])
        seed_stats_cache(paths["model"])
        for name, requests in ledgers.items():
            service, _ = build_service(Settings(model=str(paths["model"]), db=str(root / name)))
            for request in requests:
                service.apply(request, steps=2)
            for export, source in (exports or {}).items():
                if source == name:
                    export_file(service, root / export)
                    paths[export] = root / export
            service.ledger.close()
            paths[name] = root / name
    return paths


def cli_runner(disk: Mapping[str, Path], capsys: Any) -> Callable[..., tuple[int, str, str]]:
    """``invoke(db, *argv)``: ``app.py --model … --db db *argv`` in this process → (exit code, stdout, stderr)."""

    def invoke(db: Path, *argv: str) -> tuple[int, str, str]:
        with in_process_app(disk["cache"]), one_thread():
            code = app.main(["--model", str(disk["model"]), "--db", str(db), *argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return invoke


class Unchanged:
    """Records the weights and the ledger on entry; on a normal exit asserts that neither moved
    (put ``pytest.raises`` inside it: the expected error is then caught before the check)."""

    def __init__(self, service: EditService) -> None:
        self.service = service

    def __enter__(self) -> Unchanged:
        self.weights, self.rows = digest(self.service.model), self.service.ledger.history()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            assert digest(self.service.model) == self.weights
            assert self.service.ledger.history() == self.rows


def app_env(cache: Path, **extra: str) -> dict[str, str]:
    """Environment for the app in a subprocess on a tiny model: its own cache, the refusal threshold off."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "ROME_CHAT_CACHE": str(cache), "ROME_CHAT_MIN_TARGET_PROB": "0",
            "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            **extra}  # fmt: skip


def wait_for_json(path: Path, proc: object, timeout_s: float, ended: Path | None = None) -> dict:
    """The JSON object a subprocess writes to ``path`` (atomically), once it appears.

    Fails early if ``proc`` exits, or if the file ``ended`` (the worker's exit report) appears first.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file():
            return json.loads(path.read_text())
        if proc.poll() is not None:  # type: ignore[attr-defined]
            code = proc.returncode  # type: ignore[attr-defined]
            raise RuntimeError(f"the worker exited with {code} before writing {path.name}")
        if ended is not None and ended.is_file():
            raise RuntimeError(f"the worker ended ({ended.read_text()}) before writing {path.name}")
        time.sleep(0.1)
    raise TimeoutError(f"no {path.name} after {timeout_s} s")


def write_json(path: Path, data: object) -> None:
    """Write atomically, so a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


@contextmanager
def read_only_file(path: Path) -> Iterator[None]:
    """``path`` made 0o400 for the code in the block. Root ignores file modes, so as root the block runs
    with the effective user 'nobody' (the file handed to it), as an unprivileged server would."""
    os.chmod(path, 0o400)
    if os.geteuid() != 0:
        yield
        return
    nobody = 65534
    codecs.lookup("cp437")  # zipfile imports it lazily, and nobody may not read root's Python installation
    os.chmod(path.parent, 0o777)  # nobody may create the -wal and -shm files beside it, as the owner could
    os.chown(path, nobody, nobody)
    os.seteuid(nobody)
    try:
        yield
    finally:
        os.seteuid(0)
