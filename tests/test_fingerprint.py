"""Fingerprints: the same value as the full hash, computed once per weight files; checksums cached per tensor."""
from __future__ import annotations

import os

import pytest
import torch

from editing import RomeEditor, load_model
from editing import fingerprint as fp
from tests.tiny import tiny_llama, tiny_tokenizer


@pytest.fixture
def saved(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ROME_CHAT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def full_hashes(monkeypatch):  # type: ignore[no-untyped-def]
    calls = []
    real = fp.model_fingerprint
    monkeypatch.setattr(fp, "model_fingerprint", lambda model: calls.append(1) or real(model))
    return calls


def test_fingerprint_is_the_full_hash_computed_once_per_weight_files(saved, full_hashes) -> None:  # type: ignore[no-untyped-def]
    model, tok = load_model(saved)
    first = RomeEditor(model, tok).fingerprint
    again, _ = load_model(saved)  # a second start
    assert RomeEditor(again, tok).fingerprint == first
    assert len(full_hashes) == 1  # the second start read the cached value
    assert fp.model_fingerprint(again) == first  # stable: ledgers bound to the full hash keep opening
    stamp = (saved / "model.safetensors").stat().st_mtime_ns + 10**9
    os.utime(saved / "model.safetensors", ns=(stamp, stamp))  # a new file identity: hashed again, same value
    full_hashes.clear()
    assert RomeEditor(again, tok).fingerprint == first and len(full_hashes) == 1


def test_a_model_changed_in_memory_is_hashed_again(saved, full_hashes) -> None:  # type: ignore[no-untyped-def]
    model, tok = load_model(saved)
    first = RomeEditor(model, tok).fingerprint
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(2)  # every sampled element changes
    assert RomeEditor(model, tok).fingerprint != first and len(full_hashes) == 2


def test_a_model_built_in_memory_gets_the_full_hash(full_hashes) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama()
    assert fp.identify_model(model) == fp.model_fingerprint(model) and len(full_hashes) == 2


def test_cached_checksum_hashes_a_tensor_once_until_it_changes(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = []
    real = fp.tensor_checksum
    monkeypatch.setattr(fp, "tensor_checksum", lambda t: calls.append(1) or real(t))
    weight = torch.randn(50, 8)
    first = fp.cached_checksum(weight)
    assert fp.cached_checksum(weight) == first and len(calls) == 1
    weight.add_(1.0)  # an in-place write
    assert fp.cached_checksum(weight) != first and len(calls) == 2
    assert fp.cached_checksum(weight.clone()) == real(weight) and len(calls) == 3
