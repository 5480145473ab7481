"""Projecting vectors off per-replica orthonormal bases (Lanczos reorthogonalization, trace deflation)."""
from __future__ import annotations

import torch

# Bytes of basis handled per call on the CPU: small enough that the second pass over a group's
# basis (the update) finds it still in the last-level cache after the first (the coefficients);
# one call over all replicas reads the whole basis from memory twice.
GROUP_BYTES = 8 << 20


def project_out_(basis: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``W -= (W basis^T) basis`` per replica, in place, and return W: classical Gram-Schmidt of
    the rows of ``W`` ``[n, K, P]`` against the orthonormal (or zero) rows of ``basis``
    ``[n, j, P]``. On the CPU in groups of replicas whose basis fits in cache. The vectors are
    rows (``[K, P] @ [P, j]``): on the CPU that orientation runs ~6x faster than ``[j, P] @ [P, K]``."""
    n, j, P = basis.shape
    if j == 0:
        return W
    per = max(1, GROUP_BYTES // (j * P * basis.element_size())) if basis.device.type == "cpu" else n
    for s in range(0, n, per):
        b, w = basis[s : s + per], W[s : s + per]
        w.baddbmm_(torch.bmm(w, b.transpose(1, 2)), b, alpha=-1)
    return W
