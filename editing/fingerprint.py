"""Checksums of parameters and a fingerprint of a whole model.

The fingerprint is SHA-256 over every parameter's bytes, which costs a pass over all weights
(0.5 GB for the default model, 14 GB+ for a 7B one). ``identify_model`` computes it once per
weight files (path, size, modification time) plus a strided sample of every parameter, and caches
it under ``cache_dir()/"fingerprints"``: later starts read it back. The value is the same as
``model_fingerprint``'s, so ledgers bound to it keep opening.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from pathlib import Path

import torch
from torch import nn

from editing.loading import cache_dir
from editing.placement import materialised

log = logging.getLogger(__name__)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
SAMPLE = 256  # elements per parameter in the sample digest


def tensor_checksum(tensor: torch.Tensor) -> str:
    """SHA-256 of the tensor's bytes (dtype and shape included), device-independent."""
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{data.dtype}|{tuple(data.shape)}|".encode())
    if data.numel():
        digest.update(data.reshape(-1).view(torch.uint8).numpy())  # hashed from the buffer, no copy
    return digest.hexdigest()


_CHECKSUMS: dict[int, tuple[weakref.ref, int, int, str]] = {}


def cached_checksum(tensor: torch.Tensor) -> str:
    """``tensor_checksum`` remembered per tensor object until the tensor changes (in-place writes bump its version)."""
    entry = _CHECKSUMS.get(id(tensor))
    if entry is not None and entry[0]() is tensor and entry[1:3] == (tensor._version, tensor.data_ptr()):
        return entry[3]
    value = tensor_checksum(tensor)
    _CHECKSUMS[id(tensor)] = (weakref.ref(tensor), tensor._version, tensor.data_ptr(), value)
    return value


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the family, and every parameter's name and bytes.

    Call it on unedited weights: the fingerprint names the base model an edit was made for.
    """
    digest = hashlib.sha256(str(getattr(model.config, "model_type", "")).encode())
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor_checksum(materialised(model, name, param)).encode())
    return digest.hexdigest()


def _weight_files(model: nn.Module) -> list[Path]:
    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    if not str(folder) or not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name == "config.json"))


def _sample_digest(model: nn.Module) -> str:
    """Names, shapes, dtypes and a strided sample of every parameter: catches a model changed in memory after loading."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        flat = materialised(model, name, param).detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // SAMPLE)][:SAMPLE].to("cpu").contiguous()
        digest.update(f"{name}|{param.dtype}|{tuple(param.shape)}|".encode())
        if picked.numel():
            digest.update(picked.view(torch.uint8).numpy())
    return digest.hexdigest()


def model_identity(model: nn.Module) -> str | None:
    """What identifies the loaded model cheaply: its weight files' path, size and mtime, plus a sample digest.

    None for a model that was not loaded from a folder (built in memory, or a first GGUF conversion).
    """
    files = _weight_files(model)
    if not any(f.suffix in WEIGHT_SUFFIXES for f in files):
        return None
    digest = hashlib.sha256(_sample_digest(model).encode())
    for f in files:
        stat = f.stat()
        digest.update(f"{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
    return digest.hexdigest()


def identify_model(model: nn.Module) -> str:
    """``model_fingerprint(model)``, read from the cache when the same weight files were fingerprinted before."""
    identity = model_identity(model)
    path = cache_dir() / "fingerprints" / f"{identity}.json" if identity else None
    if path is not None and path.is_file():
        try:
            value = json.loads(path.read_text())["fingerprint"]
            if isinstance(value, str) and len(value) == 64:
                return value
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("fingerprint cache %s is unreadable (%s); recomputing", path.name, err)
    value = model_fingerprint(model)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")  # instances sharing the cache may write it at once
        tmp.write_text(json.dumps({"fingerprint": value, "model": str(getattr(model, "name_or_path", ""))}))
        tmp.replace(path)
    return value
