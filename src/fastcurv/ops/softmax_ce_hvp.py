"""Softmax cross-entropy Hessian (w.r.t. the logits) applied to K tangents per row."""
from __future__ import annotations

import torch

from .. import _ext
from ._checks import check_like


def ce_hessian_product(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(diag(p) - p p^T) t`` along the last dimension, ``p`` broadcast against ``t``, as
    ``p * (w - <p, w>)`` with ``w = t - t_m`` and ``m`` the row's most probable class (the first
    if tied). For probabilities summing to 1 this is the same product, but it keeps its precision
    when the row is confident: ``t - <p, t>`` cancels at ``m`` once ``p_m`` rounds to 1, while ``w``
    is 0 there and ``<p, w>`` a sum of small terms. The kernels compute the same formula."""
    if t.shape[-1] == 0:
        return p * t
    m = p.argmax(-1, keepdim=True).expand(*t.shape[:-1], 1)
    w = t - t.gather(-1, m)
    return p * (w - (p * w).sum(-1, keepdim=True))


def softmax_ce_hvp_reference(probs: torch.Tensor, tangent: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * (diag(p) - p p^T) t`` by :func:`ce_hessian_product`; probs ``[B, N, C]``, tangent
    ``[B, K, N, C]`` -> ``[B, K, N, C]``."""
    return scale * ce_hessian_product(probs.unsqueeze(1), tangent)


def softmax_ce_hvp(probs: torch.Tensor, tangent: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Apply ``scale * (diag(p) - p p^T)`` to each tangent row (the Hessian of cross-entropy
    with respect to the logits at softmax probabilities ``p``), pivoted on each row's most probable
    class as :func:`ce_hessian_product` says, so that confident rows keep their precision. The
    pivoted form equals ``diag(p) - p p^T`` for rows that sum to 1 (softmax outputs), not otherwise.

    probs: ``[B, N, C]`` softmax probabilities (B independent groups, e.g. replicas; N rows).
    tangent: ``[B, K, N, C]`` (K probes share the same probs). Returns ``[B, K, N, C]``.
    """
    check_like("softmax_ce_hvp", "tangent", tangent, dict(probs=probs))
    impl = _ext.choose("softmax_ce_hvp", tangent.device, tangent.dtype)
    if impl == "ext":
        return torch.ops.fastcurv.softmax_ce_hvp(probs, tangent, float(scale))
    if impl == "triton":
        from .. import triton_kernels

        return triton_kernels.softmax_ce_hvp(probs, tangent, float(scale))
    return softmax_ce_hvp_reference(probs, tangent, scale)
