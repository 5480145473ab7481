"""The loss at the network's output, and the last Linear layer with the loss in the head kernel:
shared by both engines."""
from __future__ import annotations

import torch

from ...losses import cross_entropy_parts
from ...ops import softmax_ce_hvp
from ...ops.head_hvp import head_hvp


def _head_products(loss, a, ra, W, dW, delta, probs, db, d1, out_w, out_b, accumulate: bool) -> torch.Tensor:
    """The output Linear layer's products and the loss R-op by :func:`~fastcurv.ops.head_hvp.head_hvp`
    (``[R, ...]`` operands; ``probs`` is read for cross-entropy only); returns the R-gradient w.r.t.
    the layer's input."""
    ce = loss.kind == "cross_entropy"
    scale = loss.scale() if ce else 2 * loss.scale(W.shape[1])  # the loss Hessian: scale * (diag(p) - p p^T), or scale * I
    return head_hvp(a, ra, W, dW, delta, scale, probs=probs if ce else None, dbias=db, d1=d1, out_w=out_w, out_b=out_b,
                    accumulate=accumulate)[0]


def _sample_view(mass: torch.Tensor, sample_dim: int, dims: int) -> torch.Tensor:
    """The per-sample ``mass [N]`` shaped to broadcast over ``dims`` axes with the samples at ``sample_dim``."""
    shape = [1] * dims
    shape[sample_dim] = -1
    return mass.view(shape)


def _loss_head(loss, out: torch.Tensor, y: torch.Tensor, sample_dim: int):
    """Per-replica loss ``[R]``, softmax probabilities (cross-entropy; else None), the loss
    gradient w.r.t. the outputs, and the soft targets' per-sample mass ``[N]`` (or None), for
    outputs ``[R, N, C]`` (sample_dim=1) or ``[N, R, C]`` (0).

    Soft cross-entropy targets ``y [N, C]`` (class probabilities, as torch's ``cross_entropy``
    takes them) give the loss Hessian ``m_n (diag(p) - p p^T)`` with ``m_n = sum_c y_nc``: the mass
    is returned when some row's is not exactly 1, and the engines scale each sample's loss R-op by it.
    """
    shape = [1, 1, 1]
    shape[sample_dim] = y.shape[0]
    if loss.kind == "cross_entropy":
        sc = loss.scale()
        if y.is_floating_point():  # soft targets
            losses, probs, delta = cross_entropy_parts(out, y.unsqueeze(1 - sample_dim).expand(out.shape))
            mass = y.sum(-1)
            return losses.sum(sample_dim) * sc, probs, delta.mul_(sc), None if bool((mass == 1).all()) else mass
        losses, probs, delta = cross_entropy_parts(out, y.view(shape[:2]).expand(out.shape[:2]))
        return losses.sum(sample_dim) * sc, probs, delta.mul_(sc), None
    sc = loss.scale(out.shape[-1])
    diff = out - y.unsqueeze(1 - sample_dim)
    return diff.square().sum((sample_dim, 2)) * sc, None, 2 * sc * diff, None


def _mass_for_trace(mass: torch.Tensor) -> torch.Tensor:
    """The soft targets' per-sample mass ``[N]`` under the exact trace's square-root seeds, which
    need it nonnegative."""
    if bool((mass < 0).any()):
        raise ValueError("the exact trace needs soft cross-entropy targets whose rows sum to a nonnegative mass; "
                         f"found a row summing to {float(mass.min()):.3g} (use trace_method='deflated')")
    return mass


def loss_rop(loss, probs, mass, ra: torch.Tensor, sample_dim: int) -> torch.Tensor:
    """The loss Hessian times the output tangent ``ra``: ``[R, N, K, C]`` with ``probs [R, N, C]``
    (sample_dim=1, the MLP engine) or ``[N, K, R, C]`` with ``probs [N, R, C]`` (0, the conv engine);
    cross-entropy by :func:`~fastcurv.ops.softmax_ce_hvp` (each sample scaled by the soft targets'
    ``mass``, when not None), MSE ``2 s ra``."""
    C = ra.shape[-1]
    if loss.kind != "cross_entropy":
        return ra * (2 * loss.scale(C))
    if sample_dim == 1:  # as [R*N, K, 1, C] against probabilities [R*N, 1, C]
        R, N, K = ra.shape[:3]
        rd = softmax_ce_hvp(probs.reshape(R * N, 1, C), ra.reshape(R * N, K, 1, C), loss.scale()).view(R, N, K, C)
    else:
        rd = softmax_ce_hvp(probs, ra.contiguous(), loss.scale())
    return rd if mass is None else rd.mul_(_sample_view(mass, sample_dim, 4))


def hessian_sqrt_columns(loss, probs, mass, sample_dim: int, C: int, like: torch.Tensor) -> torch.Tensor:
    """The columns ``a_nc`` of the loss Hessian's square root (``H_n = sum_c a_nc a_nc^T``), the
    exact trace's seeds, as ``[A, B, C, C]`` (column ``c`` second to last) for probabilities
    ``probs [A, B, C]`` with the samples at ``sample_dim``: cross-entropy ``a_nc = sqrt(s m_n p_c)
    (e_c - p)`` (``m_n`` the soft targets' mass, 1 when ``mass`` is None); MSE ``sqrt(2 s) e_c``, one
    ``[C, C]`` matrix (in ``like``'s dtype and device) for the engines to expand."""
    if loss.kind != "cross_entropy":
        return torch.eye(C, dtype=like.dtype, device=like.device) * (2 * loss.scale(C)) ** 0.5
    w = probs if mass is None else probs * _sample_view(_mass_for_trace(mass), sample_dim, 3)
    eye = torch.eye(C, dtype=probs.dtype, device=probs.device)
    return (eye - probs.unsqueeze(2)).mul_((loss.scale() * w).sqrt_().unsqueeze(3))
