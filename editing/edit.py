"""``RankOneEdit``: an edit as a value (request + rank-one factors + provenance)."""
from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from editing.request import EditRequest

FORMAT = "rome-chat/rank-one-edit/1"


@dataclass(frozen=True, eq=False)
class RankOneEdit:
    """``ΔW = value_dir ⊗ key_dir`` for parameter ``param_name``; re-added exactly without recomputation.

    Factors are float32 on the CPU. ``checksum_before``/``checksum_after`` are the parameter's
    SHA-256 when the edit was computed and after it was applied on top of that state.
    """

    request: EditRequest
    layer: int
    param_name: str
    value_dir: torch.Tensor  # (d_out,)
    key_dir: torch.Tensor  # (d_in,)
    hparams: dict[str, Any]
    fingerprint: str
    checksum_before: str
    checksum_after: str
    stats: dict[str, Any] = field(default_factory=dict)
    key: torch.Tensor | None = None  # (d_in,) k*, kept so the key cache of a layer can be rebuilt from its edits
    # (m, d_in): the other keys the update was solved for (the bare prompt's and chat contexts' with exact
    # keys); the key cache holds them beside k*, so later edits keep their outputs too
    extra_keys: torch.Tensor | None = None

    @property
    def update_norm(self) -> float:
        """Frobenius norm of ΔW (the product of the factor norms)."""
        return float(self.value_dir.norm() * self.key_dir.norm())

    def factors_bytes(self) -> bytes:
        value = self.value_dir.detach().cpu().float().numpy().astype("<f4")
        key = self.key_dir.detach().cpu().float().numpy().astype("<f4")
        return value.tobytes() + key.tobytes()

    def meta(self) -> dict[str, Any]:
        """Everything but the factors, JSON-serialisable."""
        return {
            "format": FORMAT,
            **self.request.to_dict(),
            "layer": self.layer,
            "request_layer": self.request.layer,
            "param_name": self.param_name,
            "hparams": self.hparams,
            "fingerprint": self.fingerprint,
            "checksum_before": self.checksum_before,
            "checksum_after": self.checksum_after,
            "stats": self.stats,
            "value_shape": [int(self.value_dir.numel())],
            "key_shape": [int(self.key_dir.numel())],
            "dtype": "float32-le",
            "factors_sha256": hashlib.sha256(self.factors_bytes()).hexdigest(),
            **({} if self.key is None else {"key_star": _encode(self.key)}),
            **({} if self.extra_keys is None else {"extra_keys": [_encode(k) for k in self.extra_keys]}),
        }

    def to_payload(self) -> tuple[dict[str, Any], bytes]:
        return self.meta(), self.factors_bytes()

    @classmethod
    def from_payload(cls, meta: dict[str, Any], factors: bytes) -> RankOneEdit:
        """Inverse of ``to_payload``; malformed input raises ``ValueError``."""
        try:
            if meta.get("format") != FORMAT:
                raise ValueError(f"unknown edit format {meta.get('format')!r}")
            n_value, n_key = int(meta["value_shape"][0]), int(meta["key_shape"][0])
            if len(factors) != 4 * (n_value + n_key):
                raise ValueError("factor bytes do not match the stated shapes")
            if "factors_sha256" in meta and hashlib.sha256(factors).hexdigest() != meta["factors_sha256"]:
                raise ValueError("factor bytes fail their checksum")
            flat = torch.from_numpy(np.frombuffer(factors, dtype="<f4").astype(np.float32))
            if not torch.isfinite(flat).all():
                raise ValueError("factors contain non-finite values")
            request = EditRequest(meta["subject"], meta["relation"], meta["target"], meta.get("request_layer"))
            return cls(
                request=request,
                layer=int(meta["layer"]),
                param_name=str(meta["param_name"]),
                value_dir=flat[:n_value].clone(),
                key_dir=flat[n_value:].clone(),
                hparams=dict(meta["hparams"]),
                fingerprint=str(meta["fingerprint"]),
                checksum_before=str(meta["checksum_before"]),
                checksum_after=str(meta["checksum_after"]),
                stats=dict(meta.get("stats", {})),
                key=None if meta.get("key_star") is None else _decode(meta["key_star"], n_key),
                extra_keys=_decode_keys(meta.get("extra_keys"), n_key),
            )
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError(f"malformed edit record: {err!r}") from err

    def to_bytes(self) -> bytes:
        """One self-contained blob: 4-byte header length, JSON meta, factors."""
        meta, factors = self.to_payload()
        header = json.dumps(meta, ensure_ascii=False).encode()
        return len(header).to_bytes(4, "little") + header + factors

    @classmethod
    def from_bytes(cls, blob: bytes) -> RankOneEdit:
        if len(blob) < 4:
            raise ValueError("edit blob is truncated")
        n = int.from_bytes(blob[:4], "little")
        try:
            meta = json.loads(blob[4 : 4 + n].decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"edit blob header is unreadable: {err}") from err
        if not isinstance(meta, dict):
            raise ValueError("edit blob header is not an object")
        return cls.from_payload(meta, blob[4 + n :])


def _encode(vector: torch.Tensor) -> str:
    """float32 little-endian bytes in base64: compact and exact inside the JSON meta."""
    return base64.b64encode(vector.detach().cpu().float().numpy().astype("<f4").tobytes()).decode("ascii")


def _decode(text: object, size: int, field: str = "key_star") -> torch.Tensor:
    if not isinstance(text, str):
        raise ValueError(f"meta[{field!r}] must be base64 text")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as err:
        raise ValueError(f"meta[{field!r}] is not base64: {err}") from err
    if len(raw) != 4 * size:
        raise ValueError(f"meta[{field!r}] holds {len(raw) // 4} numbers, the key has {size}")
    key = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))
    if not torch.isfinite(key).all():
        raise ValueError(f"meta[{field!r}] contains non-finite values")
    return key


def _decode_keys(texts: object, size: int) -> torch.Tensor | None:
    if texts is None:
        return None
    if not isinstance(texts, list) or not texts:
        raise ValueError("meta['extra_keys'] must be a non-empty list of base64 keys")
    return torch.stack([_decode(t, size, "extra_keys") for t in texts])
