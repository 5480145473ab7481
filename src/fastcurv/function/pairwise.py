"""Pairwise function-space measures between replicas (Jiang et al. 2022; Mason-Williams et al.).

* prediction disagreement ``D[i, j] = 1 - agree[i, j] / M`` from the exact agreement counts;
* soft measures between softmax outputs, averaged over examples: Jensen-Shannon divergence
  (nats), total variation ``0.5 * sum_k |p_i - p_j|`` and the L2 distance ``||p_i - p_j||_2``.

Per-replica values are means over the *other* usable replicas (replicas flagged not ok are
excluded from every mean and get NaN).
"""
from __future__ import annotations

import torch

from ..ops.agreement_counts import agreement_counts

SOFT = ("js", "tv", "l2")


def disagreement_matrix(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D, A)``: disagreement rates float64 ``[R, R]`` and agreement counts int64 ``[R, R]``."""
    A = agreement_counts(labels)
    M = labels.shape[1]
    return 1.0 - A.double() / max(M, 1), A


def mean_over_others(mat: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Per replica, the mean of ``mat[i, j]`` over usable ``j != i``; NaN for unusable ``i`` or
    when there is no other usable replica."""
    R = mat.shape[0]
    w = (ok[None, :] & ~torch.eye(R, dtype=torch.bool)).double()
    m = torch.where(w.bool(), mat.double(), torch.zeros((), dtype=torch.float64))
    n = w.sum(1)
    out = m.sum(1) / n
    out[(n == 0) | ~ok] = float("nan")
    return out


def mean_off_diagonal(mat: torch.Tensor, ok: torch.Tensor) -> float:
    """Mean of ``mat`` over ordered pairs ``i != j`` of usable replicas (NaN with fewer than two)."""
    idx = ok.nonzero().flatten()
    if idx.numel() < 2:
        return float("nan")
    sub = mat[idx][:, idx].double()
    k = idx.numel()
    return float((sub.sum() - sub.diagonal().sum()) / (k * (k - 1)))


def _soft_block(pi: torch.Tensor, pj: torch.Tensor, which) -> dict:
    """Sums over examples of the soft measures for blocks ``pi [a, m, K]``, ``pj [b, m, K]``."""
    out = {}
    a, b = pi[:, None], pj[None, :]  # [a, 1, m, K], [1, b, m, K]
    if "js" in which:
        mix = 0.5 * (a + b)

        def xlogy(p, q):
            return torch.where(p > 0, p * torch.log(torch.where(q > 0, q, torch.ones_like(q))), torch.zeros_like(p))

        kl_a = (xlogy(a, a) - xlogy(a, mix)).sum(-1)
        kl_b = (xlogy(b, b) - xlogy(b, mix)).sum(-1)
        out["js"] = (0.5 * (kl_a + kl_b)).clamp_min(0).sum(-1)
    if "tv" in which or "l2" in which:
        d = a - b
        if "tv" in which:
            out["tv"] = 0.5 * d.abs().sum(-1).sum(-1)
        if "l2" in which:
            out["l2"] = d.square().sum(-1).sqrt().sum(-1)
    return out


def soft_matrices(probs: torch.Tensor, which=SOFT, *, block: int = 32, max_elems: int = 1 << 23) -> dict:
    """Mean over examples of the soft measures for every pair: ``{name: float64 [R, R]}``.

    probs: ``[R, M, K]`` softmax outputs; which: names from ``SOFT`` (or one name). Work is
    ``R^2 M K``; it is done in blocks of ``block`` replicas and as many examples as keep a temporary
    under ``max_elems`` entries.
    """
    which = (which,) if isinstance(which, str) else tuple(which)
    bad = [w for w in which if w not in SOFT]
    if bad:
        raise ValueError(f"unknown soft measures {bad}; available: {SOFT}")
    R, M, K = probs.shape
    out = {w: torch.zeros(R, R, dtype=torch.float64) for w in which}
    mchunk = max(1, max_elems // (block * block * K))
    for i0 in range(0, R, block):
        for j0 in range(i0, R, block):
            acc = {w: 0.0 for w in which}
            for m0 in range(0, M, mchunk):
                pi = probs[i0 : i0 + block, m0 : m0 + mchunk].double()
                pj = probs[j0 : j0 + block, m0 : m0 + mchunk].double()
                part = _soft_block(pi, pj, which)
                for w in which:
                    acc[w] = acc[w] + part[w]
            for w in which:
                blk = acc[w] / max(M, 1)
                out[w][i0 : i0 + block, j0 : j0 + block] = blk
                out[w][j0 : j0 + block, i0 : i0 + block] = blk.T
    return out
