"""Softmax cross-entropy Hessian (w.r.t. the logits) applied to K tangents per row."""
from __future__ import annotations

import torch

from .. import _ext
from ._checks import check_like


def softmax_ce_hvp_reference(probs: torch.Tensor, tangent: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * p * (t - <p, t>)``; probs ``[B, N, C]``, tangent ``[B, K, N, C]`` -> ``[B, K, N, C]``."""
    p = probs.unsqueeze(1)
    return scale * p * (tangent - (p * tangent).sum(-1, keepdim=True))


def softmax_ce_hvp(probs: torch.Tensor, tangent: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Apply ``scale * (diag(p) - p p^T)`` to each tangent row (the Hessian of cross-entropy
    with respect to the logits at softmax probabilities ``p``).

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
