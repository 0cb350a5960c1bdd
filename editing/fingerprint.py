"""Checksums of parameters and a fingerprint of a whole model."""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def tensor_checksum(tensor: torch.Tensor) -> str:
    """SHA-256 of the tensor's bytes (dtype and shape included), device-independent."""
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{data.dtype}|{tuple(data.shape)}|".encode())
    if data.numel():
        digest.update(data.reshape(-1).view(torch.uint8).numpy())  # hashed from the buffer, no copy
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the family, and every parameter's name and bytes.

    Call it on unedited weights: the fingerprint names the base model an edit was made for.
    """
    digest = hashlib.sha256(str(getattr(model.config, "model_type", "")).encode())
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor_checksum(param).encode())
    return digest.hexdigest()
