"""Export of the edited model: a merged checkpoint (hf), a LoRA adapter (peft) or a GGUF file (gguf).

The weights are built from the base weights and the chosen applied edits' stored factors, in ledger
order, on copies: the running model and the ledger are unchanged. The files are written into a
fresh folder beside ``dest`` and moved into place at the end, so a failed export leaves nothing.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from chat_app.model_card import model_card
from db import EditRecord
from editing.fact_payload import decode_payload, shares
from editing.defaults import EXPORT_FORMATS
from editing.export import save_lora, save_merged

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelExport:
    path: Path  # the folder written
    format: str
    edit_ids: tuple[int, ...]  # the edits it holds, in ledger order
    files: tuple[str, ...]  # names inside ``path``


def _chosen(applied: list[EditRecord], ids: list[int] | None) -> list[EditRecord]:
    """The applied records named by ``ids`` (all when None), in ledger order."""
    if ids is None:
        return applied
    known = {r.id for r in applied}
    missing = [i for i in ids if i not in known]
    if missing:
        raise ValueError(f"edit(s) {', '.join(f'#{i}' for i in missing)} are not applied; only applied edits "
                         f"can be exported (applied now: {sorted(known) or 'none'})")  # fmt: skip
    wanted = set(ids)
    return [r for r in applied if r.id in wanted]


def _target(dest: str | Path) -> Path:
    path = Path(dest).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} already exists and is not an empty folder; choose a new folder to export into")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_model(service: Any, dest: str | Path, fmt: str = "hf", ids: list[int] | None = None) -> ModelExport:
    """Write the model with the chosen applied edits to ``dest``; the caller holds the weights' read lock."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    path = _target(dest)
    records = _chosen(service.ledger.applied(), ids)
    edits = [share for r in records for share in shares(decode_payload(r.meta, r.factors or b""))]  # batch facts: every layer
    editor, source = service.editor, service.source
    if fmt == "gguf" and not str(source).endswith(".gguf"):
        raise ValueError(f"gguf export needs a model loaded from a GGUF file; this one came from {source}. "
                         "Export hf and convert it with llama.cpp's convert_hf_to_gguf.py")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        if fmt == "hf":
            save_merged(editor.model, editor.tok, editor.weights_with(edits), work)
        elif fmt == "peft":
            save_lora(editor.model, edits, str(source), work)
        else:
            from editing.gguf_export import write_gguf

            weights = editor.weights_with(edits)
            touched = {e.param_name for e in edits}
            changed = {k: v for k, v in weights.items() if k in touched}
            write_gguf(Path(source), work / gguf_name(source), changed, editor.weights_with([]))
        stamp = datetime.now(timezone.utc)
        (work / "README.md").write_text(model_card(service, records, fmt, stamp), encoding="utf-8")
        if path.exists():
            path.rmdir()  # empty, checked above
        work.rename(path)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    files = tuple(sorted(p.name for p in path.iterdir()))
    log.info("exported %s with %d edits to %s", fmt, len(records), path)
    return ModelExport(path.resolve(), fmt, tuple(r.id for r in records), files)


def gguf_name(source: str | Path) -> str:
    return f"{Path(source).stem}-edited.gguf"
