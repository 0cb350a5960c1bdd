"""Export / read_export: round trip, atomic writing, and refusal of damaged or hostile files."""
from __future__ import annotations

import errno
import hashlib
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db import Ledger, LedgerError, export_edits, read_export
from tests.test_db_ledger import FP, OTHER_FP, PROBES, apply_new, make_payload

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    """A new ledger on SQLite and on PostgreSQL (tests/conftest.py)."""
    with Ledger.open(ledger_url, FP) as led:
        yield led


@pytest.fixture
def export(ledger: Ledger, tmp_path: Path) -> Path:
    """A valid export of two applied edits."""
    apply_new(ledger, 0)
    apply_new(ledger, 1)
    path = tmp_path / "edits.zip"
    assert export_edits(ledger, path) == 2
    return path


def rewrite(src: Path, dst: Path, manifest: Any = None, members: dict[str, bytes] | None = None) -> Path:
    """Copy an export, replacing its manifest (a JSON value, or raw bytes) and/or members."""
    with zipfile.ZipFile(src) as zf:
        content = {name: zf.read(name) for name in zf.namelist()}
    if manifest is not None:
        content["manifest.json"] = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    content.update(members or {})
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in content.items():
            zf.writestr(name, data)
    return dst


def load_manifest(path: Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read("manifest.json"))


def test_round_trip(ledger: Ledger, tmp_path: Path) -> None:
    meta, factors = make_payload("Eiffel Tower", "Rome", 7)
    a = ledger.record_pending(meta, factors, PROBES, note="travel", author="ana", answer_before="Paris")
    ledger.mark_applied(a, meta["checksum_after"], answer_after="Rome")
    b = apply_new(ledger, 1)
    c = apply_new(ledger, 2)
    ledger.mark_reverted(b)
    path = tmp_path / "out.zip"
    assert export_edits(ledger, path) == 2
    bundle = read_export(path)
    assert (bundle.format_version, bundle.model_fingerprint) == (1, FP)
    assert [e.source_id for e in bundle.edits] == [a, c]
    first = bundle.edits[0]
    assert (first.meta, first.factors, first.factors_sha256) == (meta, factors, hashlib.sha256(factors).hexdigest())
    assert (first.status, first.position, first.note, first.author) == ("applied", 0, "travel", "ana")
    assert (first.answer_before, first.answer_after, list(first.probes)) == ("Paris", "Rome", PROBES)
    assert first.created_at == ledger.get(a).created_at
    assert ledger.is_duplicate(first.meta, first.factors_sha256)
    with Ledger.open(tmp_path / "fresh.db", FP) as fresh:
        assert not fresh.is_duplicate(first.meta, first.factors_sha256)


def test_export_chosen_ids_in_given_order(ledger: Ledger, tmp_path: Path) -> None:
    a, b = apply_new(ledger, 0), apply_new(ledger, 1)
    ledger.mark_reverted(a)
    export_edits(ledger, tmp_path / "x.zip", ids=[b, a])
    assert [(e.source_id, e.status) for e in read_export(tmp_path / "x.zip").edits] == [(b, "applied"), (a, "reverted")]
    with pytest.raises(LedgerError, match="twice"):
        export_edits(ledger, tmp_path / "y.zip", ids=[a, a])
    refused = ledger.record_refused(make_payload()[0], "not wanted")
    with pytest.raises(LedgerError, match="refused before its factors"):
        export_edits(ledger, tmp_path / "y.zip", ids=[refused])
    assert not (tmp_path / "y.zip").exists()


def test_failed_write_leaves_nothing(ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apply_new(ledger, 0)
    target = tmp_path / "out" / "edits.zip"
    target.parent.mkdir()
    target.write_bytes(b"previous export")

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", disk_full)
    with pytest.raises(LedgerError, match="No space left on device.*Nothing was written"):
        export_edits(ledger, target)
    assert target.read_bytes() == b"previous export"
    assert [p.name for p in target.parent.iterdir()] == ["edits.zip"]  # no temporary file left
    assert ledger.integrity_check() == [] and len(ledger.applied()) == 1
    with pytest.raises(LedgerError, match="could not write"):
        export_edits(ledger, tmp_path / "missing-folder" / "edits.zip")


def test_tampered_factors_are_refused(export: Path, tmp_path: Path) -> None:
    name = load_manifest(export)["edits"][1]["factors_file"]
    with zipfile.ZipFile(export) as zf:
        data = bytearray(zf.read(name))
    data[0] ^= 0x01  # one flipped bit; the new zip has a valid CRC, only the sha256 can tell
    bad = rewrite(export, tmp_path / "bad.zip", members={name: bytes(data)})
    with pytest.raises(LedgerError, match=r"edit 1 of the export: .*do not match their sha256"):
        read_export(bad)


def test_truncated_and_garbage_files_are_refused(export: Path, tmp_path: Path) -> None:
    data = export.read_bytes()
    for n in (0, 10, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.zip").write_bytes(data[:n])
        with pytest.raises(LedgerError, match="not a readable export"):
            read_export(tmp_path / "cut.zip")
    with pytest.raises(LedgerError, match="cannot read the export file"):
        read_export(tmp_path / "nothing-here.zip")


def _edit_change(key: str, value: Any):  # noqa: ANN202
    def change(m: dict[str, Any]) -> None:
        m["edits"][0][key] = value
    return change


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.update(version=2), "format version 2.*upgrade"),
    (lambda m: m.update(format="zip of cats"), "not an edit export"),
    (lambda m: m.pop("edits"), "list 'edits'"),
    (lambda m: m.update(created_at="yesterday"), "ISO 8601"),
    (lambda m: m.update(model_fingerprint=OTHER_FP), "made for model"),
    (lambda m: m["edits"][0].pop("meta"), "lacks meta"),
    (lambda m: m["edits"][0]["meta"].pop("layer"), "lacks layer"),
    (_edit_change("status", "lost"), "status 'lost'"),
    (_edit_change("position", "first"), "position must be"),
    (_edit_change("source_id", True), "source_id"),
    (_edit_change("note", 3), "note must be text"),
    (_edit_change("factors_file", "../../etc/passwd"), "not a factors member"),
    (_edit_change("factors_file", "factors/0001.bin"), "sha256|used by two"),
    (_edit_change("probes", [{"prompt": 1}]), "prompt"),
])
def test_bad_manifests_are_refused(export: Path, tmp_path: Path, change: Any, message: str) -> None:
    manifest = load_manifest(export)
    change(manifest)
    with pytest.raises(LedgerError, match=message):
        read_export(rewrite(export, tmp_path / "bad.zip", manifest=manifest))


def test_undecodable_manifest_and_extra_members_are_refused(export: Path, tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="not UTF-8"):
        read_export(rewrite(export, tmp_path / "a.zip", manifest=b"\xff\xfe{}"))
    with pytest.raises(LedgerError, match="not valid JSON"):
        read_export(rewrite(export, tmp_path / "b.zip", manifest=b'{"format": '))
    with pytest.raises(LedgerError, match="not valid JSON"):
        read_export(rewrite(export, tmp_path / "c.zip", manifest=b"[" * 100_000 + b"]" * 100_000))
    with pytest.raises(LedgerError, match="does not list"):
        read_export(rewrite(export, tmp_path / "d.zip", members={"factors/0009.bin": b"x"}))


# -- property tests: whatever the file, only ValueError (LedgerError) comes out ----------------

def _read_or_value_error(path: Path) -> None:
    try:
        read_export(path)
    except ValueError:
        pass  # anything else propagates and fails the test


@FAST
@given(st.binary(max_size=2048))
def test_random_bytes_only_raise_value_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "random.zip"
    path.write_bytes(data)
    with pytest.raises(ValueError):
        read_export(path)


@FAST
@given(st.data())
def test_mutated_exports_only_raise_value_error(export: Path, tmp_path: Path, data: st.DataObject) -> None:
    blob = bytearray(export.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        if not blob:
            break
        at = data.draw(st.integers(0, len(blob) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if action == "flip":
            blob[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del blob[max(at, 1):]
        elif action == "insert":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del blob[at:at + data.draw(st.integers(1, 16))]
    path = tmp_path / "mutated.zip"
    path.write_bytes(bytes(blob))
    _read_or_value_error(path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@FAST
@given(st.data())
def test_manifest_values_replaced_only_raise_value_error(export: Path, tmp_path: Path, data: st.DataObject) -> None:
    manifest = load_manifest(export)
    node: Any = manifest
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        if not isinstance(node[key], (dict, list)) or not node[key]:
            break
        node = node[key]
    if isinstance(node, dict) and node:
        node[data.draw(st.sampled_from(sorted(node)))] = data.draw(JSON)
    elif isinstance(node, list) and node:
        node[data.draw(st.integers(0, len(node) - 1))] = data.draw(JSON)
    _read_or_value_error(rewrite(export, tmp_path / "changed.zip", manifest=manifest))
