"""A fact of a MEMIT batch as one stored payload: its shares at every layer, replayed exactly.

``RankOneEdit.to_payload`` stores one rank-one update. A batch fact has one share per batch
layer, so its payload is the top (last) layer's meta, with format ``FORMAT``, plus
``shares``: every share's own meta, lowest layer first; the factor bytes are the shares'
factor bytes in that order. Decoding gives back a ``BatchEdit`` of that one fact, whose
shares are added exactly as they were computed: no recomputation.
"""
from __future__ import annotations

import hashlib
from typing import Any

from editing.edit import RankOneEdit
from editing.memit import BatchEdit

FORMAT = "rome-chat/memit-fact/1"
Applied = RankOneEdit | BatchEdit  # what one ledger edit is in the weights: one update, or a batch fact's shares


def shares(edit: Applied) -> tuple[RankOneEdit, ...]:
    """The rank-one updates ``edit`` adds, in the order ``editor.apply`` adds them."""
    return edit.edits if isinstance(edit, BatchEdit) else (edit,)


def fact_payload(batch: BatchEdit, index: int) -> tuple[dict[str, Any], bytes]:
    """``(meta, factors)`` of fact ``index`` of ``batch``; ``decode_payload`` reverses it."""
    parts = [share.to_payload() for share in batch.facts[index]]
    factors = b"".join(f for _, f in parts)
    meta = {**parts[-1][0], "format": FORMAT, "shares": [m for m, _ in parts],
            "factors_sha256": hashlib.sha256(factors).hexdigest()}  # fmt: skip
    return meta, factors


def decode_payload(meta: dict[str, Any], factors: bytes) -> Applied:
    """A stored edit: a ``RankOneEdit``, or a batch fact as a ``BatchEdit`` of one fact. Malformed input raises ``ValueError``."""
    if meta.get("format") != FORMAT:
        return RankOneEdit.from_payload(meta, factors)
    if hashlib.sha256(factors).hexdigest() != meta.get("factors_sha256"):
        raise ValueError("factor bytes fail their checksum")
    metas = meta.get("shares")
    if not isinstance(metas, list) or not metas or not all(isinstance(m, dict) for m in metas):
        raise ValueError("a batch fact's meta needs a non-empty list of shares")
    decoded, start = [], 0
    for share in metas:
        try:
            size = 4 * (int(share["value_shape"][0]) + int(share["key_shape"][0]))
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise ValueError(f"malformed share in a batch fact: {err!r}") from err
        decoded.append(RankOneEdit.from_payload(share, factors[start : start + size]))
        start += size
    if start != len(factors):
        raise ValueError("factor bytes do not match the shares' shapes")
    batch = decoded[-1].stats.get("batch") or {}
    return BatchEdit(str(batch.get("id", "")), (tuple(decoded),), {"layers": [e.layer for e in decoded]})
