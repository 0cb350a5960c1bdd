"""Plain values handed out by the ledger, and validation of what comes in.

``EditRecord`` and ``EventRecord`` are frozen copies made inside a session: no ORM object
leaves the ledger. ``validate_meta`` and ``validate_probes`` check a payload before it is
stored and raise ``LedgerError`` (a ``ValueError``) naming the offending field.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from db.schema import Edit, Event, LedgerError

PROBE_KINDS = ("edited", "paraphrase", "neighbour", "chat")
HEX64 = re.compile(r"[0-9a-f]{64}")
# Bytes per element of the dtypes we can size-check; other dtype names are stored unchecked.
DTYPE_SIZES = {
    "float16": 2, "float16-le": 2, "bfloat16": 2, "bfloat16-le": 2,
    "float32": 4, "float32-le": 4, "float64": 8, "float64-le": 8,
}
_TEXT_KEYS = ("subject", "relation", "target", "param_name")
_FULL_KEYS = ("checksum_before", "checksum_after", "stats", "value_shape", "key_shape", "dtype")


@dataclass(frozen=True)
class EditRecord:
    """A row of ``edits`` with its JSON fields decoded (``meta``, ``hparams``, ``probes``)."""

    id: int
    created_at: datetime
    status: str
    subject: str
    relation: str
    target: str
    answer_before: str | None
    answer_after: str | None
    layer: int
    param_name: str
    factors: bytes | None = field(repr=False)
    factors_sha256: str | None
    meta: dict[str, Any]
    hparams: dict[str, Any]
    fingerprint: str
    checksum_before: str | None
    checksum_after: str | None
    state_checksum: str | None
    probes: tuple[dict[str, Any], ...]
    superseded_by: int | None
    position: int | None
    note: str | None
    author: str | None
    refusal_reason: str | None
    batch_id: str | None = None  # the MEMIT batch this fact was edited in (None: edited alone)
    batch_index: int | None = None  # its place in the batch, from 0
    batch_size: int | None = None

    @property
    def prompt(self) -> str:
        """The relation with the subject filled in."""
        return self.relation.replace("{}", self.subject)

    @property
    def layers(self) -> list[int]:
        """The layers the edit changes: each share's for a fact spread over layers, else its one layer."""
        shares = self.meta.get("shares") or []
        found = [int(s["layer"]) for s in shares if isinstance(s, dict) and s.get("layer") is not None]
        return found or [self.layer]

    @property
    def layer_label(self) -> str:
        """``9``, or ``5–9`` for a fact spread over layers."""
        layers = self.layers
        return str(layers[0]) if len(layers) == 1 else f"{min(layers)}–{max(layers)}"

    @property
    def not_holding(self) -> bool:
        """Applied, but its own prompt did not give the target right after applying (its stored 'edited' probe)."""
        return self.status == "applied" and any(
            p.get("kind") == "edited" and p.get("holds") is False for p in self.probes if isinstance(p, dict)
        )


@dataclass(frozen=True)
class EventRecord:
    id: int
    edit_id: int | None
    at: datetime
    kind: str
    actor: str | None
    detail: str | None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dumps(value: Any) -> str:
    """Canonical JSON text: sorted keys, so equal values give equal text."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def edit_record(row: Edit) -> EditRecord:
    return EditRecord(
        id=row.id, created_at=row.created_at, status=row.status, subject=row.subject,
        relation=row.relation, target=row.target, answer_before=row.answer_before,
        answer_after=row.answer_after, layer=row.layer, param_name=row.param_name,
        factors=None if row.factors is None else bytes(row.factors),
        factors_sha256=row.factors_sha256, meta=row.meta_json,
        hparams=row.hparams_json, fingerprint=row.fingerprint,
        checksum_before=row.checksum_before, checksum_after=row.checksum_after,
        state_checksum=row.state_checksum, probes=tuple(row.probes_json),
        superseded_by=row.superseded_by, position=row.position, note=row.note,
        author=row.author, refusal_reason=row.refusal_reason,
        batch_id=row.batch_id, batch_index=row.batch_index, batch_size=row.batch_size,
    )


def event_record(row: Event) -> EventRecord:
    return EventRecord(row.id, row.edit_id, row.at, row.kind, row.actor, row.detail)


def check_hex64(value: object, field: str) -> str:
    if not isinstance(value, str) or not HEX64.fullmatch(value):
        raise LedgerError(f"{field} must be a SHA-256 as 64 lowercase hex digits, got {value!r:.80}")
    return value


def _check_shape(value: object, field: str) -> int:
    if not isinstance(value, list) or not value or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value
    ):
        raise LedgerError(f"meta[{field!r}] must be a non-empty list of positive integers, got {value!r:.80}")
    return math.prod(value)


def validate_meta(meta: object, factors: bytes | None) -> dict[str, Any]:
    """Check an edit's meta (and its factors, when given); return a JSON-clean deep copy.

    Without factors (an edit refused before it was computed) only the request fields,
    ``layer``, ``param_name`` and ``fingerprint`` are required.
    """
    if not isinstance(meta, dict):
        raise LedgerError(f"edit meta must be a JSON object (dict), got {type(meta).__name__}")
    required = ("fingerprint", "layer", "hparams", *_TEXT_KEYS) + (_FULL_KEYS if factors is not None else ())
    missing = [key for key in required if key not in meta]
    if missing:
        raise LedgerError(f"edit meta lacks {', '.join(missing)}; the edit engine must supply them")
    for key in _TEXT_KEYS:
        # An edit refused before it was computed may not know its parameter yet.
        may_be_empty = key == "param_name" and factors is None
        if not isinstance(meta[key], str) or not (meta[key].strip() or may_be_empty):
            raise LedgerError(f"meta[{key!r}] must be non-empty text, got {meta[key]!r:.80}")
    if meta["relation"].count("{}") != 1:
        raise LedgerError(f"meta['relation'] must hold exactly one '{{}}' for the subject: {meta['relation']!r:.80}")
    layer = meta["layer"]
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise LedgerError(f"meta['layer'] must be a non-negative integer, got {layer!r:.80}")
    check_hex64(meta["fingerprint"], "meta['fingerprint']")
    if not isinstance(meta["hparams"], dict):
        raise LedgerError("meta['hparams'] must be a JSON object (dict)")
    for key in ("checksum_before", "checksum_after"):
        if factors is not None or meta.get(key) is not None:
            check_hex64(meta[key], f"meta[{key!r}]")
    if factors is not None:
        _validate_factors(meta, factors)
    batch_fields(meta)
    try:
        return json.loads(dumps(meta))
    except (TypeError, ValueError, RecursionError) as err:
        raise LedgerError(f"edit meta is not JSON-serialisable: {err}") from err


def _validate_factors(meta: dict[str, Any], factors: bytes) -> None:
    if not isinstance(factors, (bytes, bytearray, memoryview)):
        raise LedgerError(f"factors must be bytes, got {type(factors).__name__}")
    if not isinstance(meta["stats"], dict):
        raise LedgerError("meta['stats'] must be a JSON object (dict)")
    n_elements = sum(_check_shape(part["value_shape"], "value_shape") + _check_shape(part["key_shape"], "key_shape")
                     for part in factor_parts(meta))
    dtype = meta["dtype"]
    if not isinstance(dtype, str):
        raise LedgerError(f"meta['dtype'] must be text, got {dtype!r:.80}")
    if dtype in DTYPE_SIZES and len(factors) != n_elements * DTYPE_SIZES[dtype]:
        raise LedgerError(
            f"factors hold {len(factors)} bytes, but value_shape + key_shape in {dtype} need "
            f"{n_elements * DTYPE_SIZES[dtype]}; the payload is corrupt"
        )
    stated = meta.get("factors_sha256")
    if stated is not None and stated != sha256_hex(bytes(factors)):
        raise LedgerError("factors do not match meta['factors_sha256']; the payload is corrupt")


def factor_parts(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The parts the factor bytes hold, in order: ``meta['shares']`` for a fact with shares at several layers, else ``[meta]``.

    Each part names its ``param_name``, ``layer``, ``value_shape`` and ``key_shape``.
    """
    shares = meta.get("shares")
    if shares is None:
        return [meta]
    if not isinstance(shares, list) or not shares or not all(isinstance(p, dict) for p in shares):
        raise LedgerError("meta['shares'] must be a non-empty list of objects")
    for i, part in enumerate(shares):
        missing = [k for k in ("param_name", "layer", "value_shape", "key_shape") if k not in part]
        if missing:
            raise LedgerError(f"meta['shares'][{i}] lacks {', '.join(missing)}")
        if not isinstance(part["param_name"], str) or not part["param_name"].strip():
            raise LedgerError(f"meta['shares'][{i}]['param_name'] must be non-empty text")
    return shares


def batch_fields(meta: dict[str, Any]) -> tuple[str | None, int | None, int | None]:
    """``(batch_id, index, size)`` from ``meta['stats']['batch']`` (a fact of a MEMIT batch), else Nones."""
    stats = meta.get("stats")
    batch = stats.get("batch") if isinstance(stats, dict) else None
    if batch is None:
        return None, None, None
    ok = isinstance(batch, dict) and isinstance(batch.get("id"), str) and 0 < len(batch["id"]) <= 32
    index, size = batch.get("fact") if ok else None, batch.get("size") if ok else None
    if not (ok and _count(index) and _count(size) and index < size):
        raise LedgerError(f"meta['stats']['batch'] must be {{id: text of 1 to 32 characters, fact, size}}, got {batch!r:.120}")
    return batch["id"], index, size


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def validate_probes(probes: object) -> list[dict[str, Any]]:
    """Probes are ``{prompt, kind, expected, before, after, holds}``; only prompt and kind are required."""
    if probes is None:
        return []
    if not isinstance(probes, (list, tuple)):
        raise LedgerError(f"probes must be a list of objects, got {type(probes).__name__}")
    for i, probe in enumerate(probes):
        if not isinstance(probe, dict):
            raise LedgerError(f"probe {i} must be an object (dict), got {type(probe).__name__}")
        if not isinstance(probe.get("prompt"), str):
            raise LedgerError(f"probe {i} needs a text 'prompt'")
        if probe.get("kind") not in PROBE_KINDS:
            raise LedgerError(f"probe {i} has kind {probe.get('kind')!r}; use one of {', '.join(PROBE_KINDS)}")
        for key in ("expected", "before", "after"):
            if probe.get(key) is not None and not isinstance(probe[key], str):
                raise LedgerError(f"probe {i}: {key!r} must be text or null")
        if probe.get("holds") is not None and not isinstance(probe["holds"], bool):
            raise LedgerError(f"probe {i}: 'holds' must be true, false or null")
    try:
        return json.loads(dumps(list(probes)))
    except (TypeError, ValueError, RecursionError) as err:
        raise LedgerError(f"probes are not JSON-serialisable: {err}") from err
