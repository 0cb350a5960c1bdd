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
    basis: torch.Tensor  # (d_in, dims) float64: Û, orthonormal
    dims: int  # rank of P: how many eigen-directions count as "not preserved"
    threshold: float  # eigenvalue threshold that chose them

    @property
    def matrix(self) -> torch.Tensor:
        """(d_in, d_in) float64: P = Û Ûᵀ (the solves work in Û's coordinates and never form it)."""
        return self.basis @ self.basis.T


def null_space_projection(cov: torch.Tensor, threshold: float) -> Projection:
    """P onto the eigenvectors of ``cov`` with eigenvalues below ``threshold`` (float64, CPU)."""
    evals, evecs = torch.linalg.eigh(cov.double().cpu())  # ascending
    small = evecs[:, evals < threshold]  # (d_in, r)
    if small.shape[1] == 0:
        raise ValueError(
            f"no eigenvalue of the key statistics is below the null-space threshold {threshold:g} "
            f"(smallest {float(evals[0]):.3g}); raise null_space_threshold"
        )
    return Projection(small, int(small.shape[1]), threshold)


def reduced_gram(basis: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
    """(ÛᵀK)(ÛᵀK)ᵀ for keys K (d_in, m), float64; K Kᵀ when ``basis`` is None."""
    b = keys.double().cpu() if basis is None else basis.T @ keys.double().cpu()
    return b @ b.T


def projected_solve(basis: torch.Tensor, keys: torch.Tensor, cache_gram: torch.Tensor, l2: float) -> torch.Tensor:
    """x = (P (K_c K_cᵀ + K Kᵀ) + α I)⁻¹ P K for keys K (d_in, n), float64 (d_in, n).

    With P = ÛÛᵀ the solution lies in Û's range (x = (P k − P G x) / α), so x = Û y with
    (ÛᵀGÛ + α I) y = Ûᵀk: a system of P's rank instead of d_in, and ``cache_gram`` = Ûᵀ K_c K_cᵀ Û
    (``reduced_gram``) can be kept up to date edit by edit instead of recomputed from every cached key.
    """
    k = basis.T @ keys.double().cpu()  # (r, n)
    system = cache_gram + k @ k.T + l2 * torch.eye(k.shape[0], dtype=torch.float64)
    return basis @ torch.linalg.solve(system, k)


def projected_key_dir(
    key: torch.Tensor, projection: Projection, cache: torch.Tensor | None, l2: float, cache_gram: torch.Tensor | None = None
) -> torch.Tensor:
    """AlphaEdit's key direction for ``key`` (d_in,), scaled so that ``key_dir · key = 1``. float32, CPU.

    ``cache`` (d_in, n) holds the keys of the edits already applied at this layer (n may be 0); or
    pass None and ``cache_gram``, their ``reduced_gram`` on the projection's basis.
    """
    k = key.double().cpu()
    if cache_gram is None:
        if cache is None:
            raise ValueError("projected_key_dir needs the cached keys or their reduced Gram")
        cache_gram = reduced_gram(projection.basis, cache)
    x = projected_solve(projection.basis, k[:, None], cache_gram, l2)[:, 0]  # (d_in,)
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
