"""Export edits to one file, and read such a file back with full validation.

Format: a zip archive holding ``manifest.json`` and ``factors/NNNN.bin`` (one member per edit,
the raw factor bytes). Why a zip rather than one JSON file with base64 factors: the factors
stay raw bytes (no 4/3 growth, nothing to re-encode), every member carries a CRC-32 that is
checked on reading, and the file opens in any archive tool with a human-readable manifest.
On top of the CRC, the manifest records each factors member's SHA-256, checked on reading.

``manifest.json``::

    {"format": "rome-chat-ledger-export", "version": 1, "model_fingerprint": "<hex|null>",
     "created_at": "<ISO 8601 UTC>",
     "edits": [{"source_id": 3, "status": "applied", "position": 0, "created_at": "...",
                "meta": {...payload meta...}, "probes": [...], "note": null, "author": null,
                "answer_before": null, "answer_after": null,
                "factors_file": "factors/0000.bin", "factors_sha256": "<hex>"}, ...]}

Edits are listed in the order to apply them (by default: the applied sequence). Importing
(applying to a model) is the service's job: for each edit it skips ``ledger.is_duplicate``,
then records, applies and marks it as for a new edit, adding an 'imported' event.
``read_export`` raises only ``LedgerError`` (a ``ValueError``) for any bad file.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from db.ledger import Ledger
from db.records import EditRecord, check_hex64, sha256_hex, validate_meta, validate_probes
from db.schema import STATUSES, LedgerError, utcnow

logger = logging.getLogger(__name__)

FORMAT = "rome-chat-ledger-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_FACTORS_BYTES = 256 * 2**20  # per edit; a rank-one update of even a huge matrix is far smaller
MAX_EDITS = 100_000
_FACTORS_NAME = re.compile(r"factors/\d{1,9}\.bin")
# What a damaged archive can make zipfile raise (besides OSError and ValueError).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
               struct.error, OverflowError, KeyError, IndexError)
_OPTIONAL_TEXT = ("note", "author", "answer_before", "answer_after")


@dataclass(frozen=True)
class ExportedEdit:
    """One edit read from an export; ``meta`` and ``factors`` form the engine's payload."""

    source_id: int
    status: str
    position: int | None
    created_at: datetime
    meta: dict[str, Any]
    probes: tuple[dict[str, Any], ...]
    note: str | None
    author: str | None
    answer_before: str | None
    answer_after: str | None
    factors: bytes = field(repr=False)
    factors_sha256: str


@dataclass(frozen=True)
class ExportBundle:
    format_version: int
    model_fingerprint: str | None
    created_at: datetime
    edits: tuple[ExportedEdit, ...]


def export_edits(ledger: Ledger, path: str | Path, ids: Sequence[int] | None = None) -> int:
    """Write the edits ``ids`` (default: the applied sequence, in order) to ``path``; return their number.

    The file appears whole or not at all (temporary file + rename); the ledger is only read.
    """
    records = ledger.applied() if ids is None else _records(ledger, ids)
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "model_fingerprint": ledger.model_fingerprint,
        "created_at": utcnow().isoformat(), "edits": [],
    }
    members: list[tuple[str, bytes]] = []
    for n, record in enumerate(records):
        name = f"factors/{n:04d}.bin"
        manifest["edits"].append(_entry(record, name))
        members.append((name, record.factors or b""))
    _write_atomically(Path(path), json.dumps(manifest, ensure_ascii=False, indent=1).encode(), members)
    logger.info("exported %d edits to %s", len(records), path)
    return len(records)


def _records(ledger: Ledger, ids: Sequence[int]) -> list[EditRecord]:
    if len(set(ids)) != len(ids):
        raise LedgerError("the same edit id is listed twice for export")
    records = [ledger.get(i) for i in ids]
    for r in records:
        if r.factors is None:
            raise LedgerError(f"edit #{r.id} was refused before its factors existed; it cannot be exported")
    return records


def _entry(r: EditRecord, name: str) -> dict[str, Any]:
    return {
        "source_id": r.id, "status": r.status, "position": r.position, "created_at": r.created_at.isoformat(),
        "meta": r.meta, "probes": list(r.probes), "note": r.note, "author": r.author,
        "answer_before": r.answer_before, "answer_after": r.answer_after,
        "factors_file": name, "factors_sha256": r.factors_sha256,
    }


def _write_atomically(target: Path, manifest: bytes, members: list[tuple[str, bytes]]) -> None:
    if target.is_dir():
        raise LedgerError(f"{target} is a folder; give a file name for the export, e.g. {target / 'edits.zip'}")
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(MANIFEST, manifest)
                for name, data in members:
                    zf.writestr(name, data, compress_type=zipfile.ZIP_STORED)  # floats barely compress
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as err:
        raise LedgerError(
            f"could not write the export {target}: {err.strerror or err}. Nothing was written; "
            "free some disk space or choose another path."
        ) from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def read_export(path: str | Path) -> ExportBundle:
    """Read and check an export file; any fault raises ``LedgerError`` saying what is wrong."""
    try:
        with zipfile.ZipFile(path) as zf:
            return _read_archive(zf)
    except LedgerError:
        raise
    except OSError as err:
        raise LedgerError(f"cannot read the export file {path}: {err.strerror or err}") from err
    except (*_ZIP_ERRORS, ValueError) as err:
        raise LedgerError(f"{path} is not a readable export (damaged or truncated zip file?): {err!r:.200}") from err


def _read_member(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    if zf.getinfo(name).file_size > limit:
        raise LedgerError(f"{name} in the export is larger than {limit} bytes; the file is not a valid export")
    with zf.open(name) as member:
        data = member.read(limit + 1)  # the header may lie about the size: read at most limit + 1
    if len(data) > limit:
        raise LedgerError(f"{name} in the export is larger than {limit} bytes; the file is not a valid export")
    return data


def _read_archive(zf: zipfile.ZipFile) -> ExportBundle:
    names = zf.namelist()
    if len(set(names)) != len(names):
        raise LedgerError("the export holds the same member twice; it is damaged or was tampered with")
    if MANIFEST not in names:
        raise LedgerError(f"the export has no {MANIFEST}; it is not an edit export")
    raw = _read_member(zf, MANIFEST, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise LedgerError(f"{MANIFEST} is not UTF-8 text: {err}") from err
    except (ValueError, RecursionError) as err:
        raise LedgerError(f"{MANIFEST} is not valid JSON: {err!s:.200}") from err
    version, fingerprint, created_at, entries = _check_manifest(manifest)
    used: set[str] = set()
    edits = tuple(_read_edit(i, entry, zf, fingerprint, used) for i, entry in enumerate(entries))
    extra = sorted(set(names) - used - {MANIFEST})
    if extra:
        raise LedgerError(f"the export holds members its manifest does not list: {extra[:5]}")
    return ExportBundle(version, fingerprint, created_at, edits)


def _check_manifest(manifest: object) -> tuple[int, str | None, datetime, list[Any]]:
    if not isinstance(manifest, dict):
        raise LedgerError(f"{MANIFEST} must hold a JSON object")
    if manifest.get("format") != FORMAT:
        raise LedgerError(f"this is not an edit export: format is {manifest.get('format')!r:.80}, expected {FORMAT!r}")
    version = manifest.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise LedgerError(f"the export's version must be an integer, got {version!r:.80}")
    if version != FORMAT_VERSION:
        hint = "upgrade this program to read it" if version > FORMAT_VERSION else "it is not supported"
        raise LedgerError(
            f"the export has format version {version}; this program reads version {FORMAT_VERSION}: {hint}"
        )
    fingerprint = manifest.get("model_fingerprint")
    if fingerprint is not None:
        check_hex64(fingerprint, "the export's model_fingerprint")
    entries = manifest.get("edits")
    if not isinstance(entries, list):
        raise LedgerError(f"{MANIFEST} must hold a list 'edits'")
    if len(entries) > MAX_EDITS:
        raise LedgerError(f"the export lists {len(entries)} edits; at most {MAX_EDITS} are accepted")
    return version, fingerprint, _parse_time(manifest.get("created_at"), "the export's created_at"), entries


def _parse_time(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise LedgerError(f"{what} must be an ISO 8601 time, got {value!r:.80}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as err:
        raise LedgerError(f"{what} is not an ISO 8601 time: {value!r:.80}") from err
    if moment.tzinfo is None:
        raise LedgerError(f"{what} lacks a time zone: {value!r:.80}")
    return moment


def _read_edit(i: int, entry: object, zf: zipfile.ZipFile, fingerprint: str | None, used: set[str]) -> ExportedEdit:
    try:
        return _parse_edit(entry, zf, fingerprint, used)
    except LedgerError as err:
        raise LedgerError(f"edit {i} of the export: {err}") from err


def _parse_edit(entry: object, zf: zipfile.ZipFile, fingerprint: str | None, used: set[str]) -> ExportedEdit:
    if not isinstance(entry, dict):
        raise LedgerError("must be a JSON object")
    missing = [k for k in ("source_id", "status", "position", "created_at", "meta", "probes",
                           "factors_file", "factors_sha256", *_OPTIONAL_TEXT) if k not in entry]
    if missing:
        raise LedgerError(f"lacks {', '.join(missing)}")
    source_id, position = entry["source_id"], entry["position"]
    if isinstance(source_id, bool) or not isinstance(source_id, int):
        raise LedgerError(f"source_id must be an integer, got {source_id!r:.80}")
    if position is not None and (isinstance(position, bool) or not isinstance(position, int) or position < 0):
        raise LedgerError(f"position must be a non-negative integer or null, got {position!r:.80}")
    if entry["status"] not in STATUSES:
        raise LedgerError(f"status {entry['status']!r:.80} is not one of {', '.join(STATUSES)}")
    for key in _OPTIONAL_TEXT:
        if entry[key] is not None and not isinstance(entry[key], str):
            raise LedgerError(f"{key} must be text or null")
    name, sha = entry["factors_file"], check_hex64(entry["factors_sha256"], "factors_sha256")
    if not isinstance(name, str) or not _FACTORS_NAME.fullmatch(name) or name not in zf.namelist():
        raise LedgerError(f"factors_file {name!r:.80} is not a factors member of the archive")
    if name in used:
        raise LedgerError(f"factors_file {name} is used by two edits")
    used.add(name)
    factors = _read_member(zf, name, MAX_FACTORS_BYTES)
    if sha256_hex(factors) != sha:
        raise LedgerError(f"the factors in {name} do not match their sha256: the file is damaged or was altered")
    meta = validate_meta(entry["meta"], factors)
    if fingerprint is not None and meta["fingerprint"] != fingerprint:
        made_for = meta["fingerprint"][:12]
        raise LedgerError(f"was made for model {made_for}…, but the export is for {fingerprint[:12]}…")
    return ExportedEdit(
        source_id=source_id, status=entry["status"], position=position,
        created_at=_parse_time(entry["created_at"], "created_at"), meta=meta,
        probes=tuple(validate_probes(entry["probes"])), note=entry["note"], author=entry["author"],
        answer_before=entry["answer_before"], answer_after=entry["answer_after"],
        factors=factors, factors_sha256=sha,
    )
