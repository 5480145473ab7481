"""Backward R-op of an eval-mode BatchNorm (running statistics), optionally preceded (in the
backward pass) by the derivative of the first-order activation that reads its output.

Layout as in :mod:`fastcurv.ops.bn_eval_rop_fwd` (``G`` = replicas x channels, ``S`` = spatial
positions, sums over the ``N * S`` samples of each group, separately for every probe ``k``):

* ``rd`` ``[N, K, G, S]``: the tangent of the loss gradient w.r.t. the activation's output (the
  BatchNorm output without ``d1``). Overwritten with the input gradient's tangent when
  ``input_grad`` (then it must be contiguous).
* ``scale`` ``[G]``: ``gamma * inv`` (``inv`` without affine parameters).
* ``xh`` ``[N, G, S]``: the normalized input (or None: no weight).
* ``delta`` ``[N, G, S]`` and ``crg`` ``[K, G]``: the loss gradient w.r.t. the BatchNorm output and
  the weight tangent times ``inv`` (both, or neither).
* ``d1`` ``[N, G, S]``: the activation's derivative (or None).

With ``u = rd * d1`` (the R-gradient w.r.t. the BatchNorm output), returns ``(rd, sum_u, sum_uxh)``::

    sum_u[k, g]   = sum_{n, s} u                      (the bias's Hessian-vector product)
    sum_uxh[k, g] = sum_{n, s} u * xh                 ([0]-shaped without xh; part of the weight's)
    rd[n, k, g, s] = scale[g] * u + crg[k, g] * delta[n, g, s]    (only when input_grad)

``rd`` is returned unchanged without ``input_grad`` (the BatchNorm reads the model input, which has
no tangent).
"""
from __future__ import annotations

import torch

from .. import _ext
from ._checks import check_like, check_shapes

_FLOATS = (torch.float32, torch.float64)


def check_bn_eval_rop_bwd_inputs(rd, scale, xh=None, delta=None, crg=None, d1=None) -> tuple[int, int, int, int]:
    """Validate shapes, dtypes and devices; returns ``(N, K, G, S)``. Raises ValueError/TypeError naming the problem."""
    op = "bn_eval_rop_bwd"
    if rd.dim() != 4:
        raise ValueError(f"{op}: rd must be [N, K, G, S], got {tuple(rd.shape)}")
    N, K, G, S = rd.shape
    if scale.shape != (G,):
        raise ValueError(f"{op}: scale must be [G] = [{G}], got {tuple(scale.shape)}")
    if (delta is None) != (crg is None):
        raise ValueError(f"{op}: delta and crg must be given together (affine BatchNorm) or both be None")
    check_shapes(op, (("xh", xh, (N, G, S)), ("delta", delta, (N, G, S)), ("d1", d1, (N, G, S)), ("crg", crg, (K, G))))
    if rd.dtype not in _FLOATS:
        raise TypeError(f"{op}: float32 or float64 tensors required, got rd of dtype {rd.dtype}")
    check_like(op, "rd", rd, dict(scale=scale, xh=xh, delta=delta, crg=crg, d1=d1))
    return N, K, G, S


def bn_eval_rop_bwd_reference(rd, scale, xh=None, delta=None, crg=None, d1=None,
                              input_grad=True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch reference of :func:`bn_eval_rop_bwd` (same arguments and results)."""
    N, K, G, S = check_bn_eval_rop_bwd_inputs(rd, scale, xh, delta, crg, d1)
    u = rd if d1 is None else rd * d1.unsqueeze(1)
    sum_u = u.sum((0, 3))
    sum_uxh = rd.new_zeros(0) if xh is None else (u * xh.unsqueeze(1)).sum((0, 3))
    if input_grad:
        rg = u * scale.view(1, 1, G, 1)
        if delta is not None:
            rg = rg + delta.unsqueeze(1) * crg.view(1, K, G, 1)
        rd.copy_(rg)
    return rd, sum_u, sum_uxh


def bn_eval_rop_bwd(rd, scale, xh=None, delta=None, crg=None, d1=None,
                    input_grad=True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward R-op of an eval BatchNorm behind an activation derivative, in one pass (see the
    module docstring for the shapes and the formula): C++ on CPU tensors, Triton or CUDA on GPU
    tensors, or the torch reference, as chosen by :func:`fastcurv.set_kernel_impl`. Returns
    ``(rd, sum_u [K, G], sum_uxh [K, G])``, ``rd`` overwritten when ``input_grad``."""
    impl = _ext.choose("bn_eval_rop_bwd", rd.device, rd.dtype)
    if impl == "torch":
        return bn_eval_rop_bwd_reference(rd, scale, xh, delta, crg, d1, input_grad)
    if input_grad and not rd.is_contiguous():
        raise ValueError("bn_eval_rop_bwd: input_grad overwrites rd, which must then be contiguous")
    if impl == "ext":
        sum_u, sum_uxh = torch.ops.fastcurv.bn_eval_rop_bwd(rd, scale, xh, delta, crg, d1, input_grad)
    else:
        from .. import triton_kernels

        sum_u, sum_uxh = triton_kernels.bn_eval_rop_bwd(rd, scale, xh, delta, crg, d1, input_grad)
    return rd, sum_u, sum_uxh
