"""Null-space-projected rank-one updates (AlphaEdit, Fang et al. ICLR 2025) and the key cache.

AlphaEdit projects each update onto the null space of the preserved keys: ``P = Û Ûᵀ`` with Û the
eigenvectors of C = E[k kᵀ] whose eigenvalues are below a threshold, and keeps the keys of the
edits already made in a cache ``K_c``. For one fact with key k* and value residual δ its solution

    ΔW = δ xᵀ,   x = (P (k* k*ᵀ + K_c K_cᵀ) + α I)⁻¹ P k*

is rank one. We scale x so that ``xᵀ k* = 1`` (``W' k* = W k* + δ``, as the value optimisation
assumes), so the edit lands exactly as an r-ROME edit does: ``key_dir = x / (xᵀ k*)``.
Since x lies in the range of P (the solve keeps it there when α > 0), a key that P removes
(a preserved key) sees no change at all, and the cached keys see almost none.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

UPDATES = ("r-rome", "alphaedit")


@dataclass(frozen=True)
class Projection:
    matrix: torch.Tensor  # (d_in, d_in) float64: P = Û Ûᵀ
    dims: int  # rank of P: how many eigen-directions count as "not preserved"
    threshold: float  # eigenvalue threshold that chose them


def null_space_projection(cov: torch.Tensor, threshold: float) -> Projection:
    """P onto the eigenvectors of ``cov`` with eigenvalues below ``threshold`` (float64, CPU)."""
    evals, evecs = torch.linalg.eigh(cov.double().cpu())  # ascending
    small = evecs[:, evals < threshold]  # (d_in, r)
    if small.shape[1] == 0:
        raise ValueError(
            f"no eigenvalue of the key statistics is below the null-space threshold {threshold:g} "
            f"(smallest {float(evals[0]):.3g}); raise null_space_threshold"
        )
    return Projection(small @ small.T, int(small.shape[1]), threshold)


def projected_key_dir(key: torch.Tensor, projection: Projection, cache: torch.Tensor, l2: float) -> torch.Tensor:
    """AlphaEdit's key direction for ``key`` (d_in,), scaled so that ``key_dir · key = 1``. float32, CPU.

    ``cache`` (d_in, n) holds the keys of the edits already applied at this layer (n may be 0).
    """
    k = key.double().cpu()
    p = projection.matrix
    gram = torch.outer(k, k) + cache.double() @ cache.double().T  # (d_in, d_in)
    system = p @ gram + l2 * torch.eye(k.numel(), dtype=torch.float64)
    x = torch.linalg.solve(system, p @ k)  # (d_in,)
    landing = torch.dot(x, k)
    if not torch.isfinite(landing) or landing <= 1e-12 * float(k.norm() * x.norm()):
        raise ValueError(
            "the subject's key has no component outside the preserved directions; "
            "raise null_space_threshold or use update='r-rome'"
        )
    return (x / landing).float()


def recover_key(value_dir: torch.Tensor, key_dir: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """k* of an r-ROME edit from its factors: key_dir = C⁻¹k*/(k*ᵀC⁻¹k*) gives k* = C key_dir / (key_dirᵀ C key_dir)."""
    d = key_dir.double().cpu()
    c_d = cov.double().cpu() @ d
    return (c_d / torch.dot(d, c_d)).float()


def stack_keys(keys: Iterable[torch.Tensor], d_in: int) -> torch.Tensor:
    """(d_in, n) float32 from keys in order; (d_in, 0) when there are none."""
    cols = [k.detach().float().cpu().reshape(d_in) for k in keys]
    return torch.stack(cols, 1) if cols else torch.zeros((d_in, 0))
