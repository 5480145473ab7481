"""Projecting vectors off per-replica orthonormal bases (Lanczos reorthogonalization, trace deflation)."""
from __future__ import annotations

import torch


def project_out_(basis: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``W -= (W basis^T) basis`` per replica, in place, and return W: classical Gram-Schmidt of
    the rows of ``W`` ``[n, K, P]`` against the orthonormal (or zero) rows of ``basis``
    ``[n, j, P]``. The vectors are rows (``[K, P] @ [P, j]``): on the CPU that orientation runs ~6x
    faster than ``[j, P] @ [P, K]``.

    On the CPU one replica at a time, with P cut into one slice per thread: the second pass over
    a replica's basis (the update) then finds it in the last-level cache after the first (the
    coefficients), and both passes use every thread. Measured on 2 cores (P = 118k, 100 replicas,
    5-34 basis vectors, two runs): as fast as one call for all replicas or up to 20% faster, and
    1.5x faster than single-replica products, which use one thread."""
    n, j, P = basis.shape
    if j == 0:
        return W
    if basis.device.type != "cpu":
        W.baddbmm_(torch.bmm(W, basis.transpose(1, 2)), basis, alpha=-1)
        return W
    parts = torch.get_num_threads()
    for r in range(n):
        _project_split(basis[r], W[r], parts)
    return W


def _project_split(b: torch.Tensor, w: torch.Tensor, parts: int) -> None:
    """``w -= (w b^T) b`` for one replica (``b [j, P]``, ``w [K, P]``) with the first
    ``parts * (P // parts)`` columns cut into ``parts`` slices that form a batch axis of the
    products (one slice per thread), and the few columns left over done apart."""
    P = b.shape[-1]
    m = P // parts * parts
    if parts < 2 or m == 0 or b.stride(-1) != 1 or w.stride(-1) != 1:
        w.sub_((w @ b.T) @ b)
        return
    bs = b[:, :m].unflatten(-1, (parts, m // parts)).transpose(0, 1)  # [parts, j, P/parts]
    ws = w[:, :m].unflatten(-1, (parts, m // parts)).transpose(0, 1)  # [parts, K, P/parts], a view of w
    c = torch.bmm(ws, bs.transpose(1, 2)).sum(0)  # [K, j]
    if m < P:
        c += w[:, m:] @ b[:, m:].T
        w[:, m:].sub_(c @ b[:, m:])
    ws.baddbmm_(c.expand(parts, *c.shape), bs, alpha=-1)
