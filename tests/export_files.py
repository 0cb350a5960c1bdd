"""Damaged, hostile and impossible export files, made from a valid one, for the import tests."""
from __future__ import annotations

import errno
import hashlib
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Members = dict[str, bytes]  # an export's archive: member name -> bytes


def rewrite(src: Path, dst: Path, change: Callable[[Members], Any]) -> Path:
    """Copy the export ``src`` to ``dst`` with ``change(members)`` applied."""
    with zipfile.ZipFile(src) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    change(members)
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


def in_manifest(change: Callable[[dict[str, Any]], Any]) -> Callable[[Members], None]:
    """A change of the archive made by changing its decoded manifest."""

    def apply(members: Members) -> None:
        manifest = json.loads(members["manifest.json"])
        change(manifest)
        members["manifest.json"] = json.dumps(manifest).encode()

    return apply


def set_entry(key: str, value: Any) -> Callable[[Members], None]:
    """The first edit's manifest entry gets ``key = value``."""
    return in_manifest(lambda m: m["edits"][0].__setitem__(key, value))


def set_meta(key: str, value: Any) -> Callable[[Members], None]:
    """The first edit's meta gets ``key = value``."""
    return in_manifest(lambda m: m["edits"][0]["meta"].__setitem__(key, value))


def scale_factors(scale: float) -> Callable[[Members], None]:
    """Every update ``scale``² times larger, with every checksum recomputed: consistent, only absurd."""

    def apply(members: Members) -> None:
        manifest = json.loads(members["manifest.json"])
        for entry in manifest["edits"]:
            factors = np.frombuffer(members[entry["factors_file"]], dtype="<f4").astype(np.float64) * scale
            members[entry["factors_file"]] = factors.astype("<f4").tobytes()
            sha = hashlib.sha256(members[entry["factors_file"]]).hexdigest()
            entry["factors_sha256"] = entry["meta"]["factors_sha256"] = sha
        members["manifest.json"] = json.dumps(manifest).encode()

    return apply


class FullDisk:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, raw: Any, room: int) -> None:
        self.raw, self.room = raw, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.raw.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.raw.close()
