"""Forward R-op of an eval-mode BatchNorm (running statistics), optionally followed by the
derivative of a first-order activation (ReLU, LeakyReLU), broadcast over K probes.

Layout (``G`` = replicas x channels, ``S`` = spatial positions, 1 for BatchNorm1d; sums run over the
``N * S`` samples of each group ``g``, separately for every probe ``k``):

* ``rz`` ``[N, K, G, S]``: the tangent of the BatchNorm input. Overwritten with the result when
  ``inplace`` (then it must be contiguous).
* ``scale`` ``[G]``: ``gamma * inv`` (``inv`` without affine parameters), ``inv = 1 / sqrt(var + eps)``.
* ``xh`` ``[N, G, S]`` and ``rgamma`` ``[K, G]``: the normalized input and the weight's tangent (both,
  or neither); ``rbeta`` ``[K, G]``: the bias's tangent (or None).
* ``d1`` ``[N, G, S]``: the derivative of the activation that reads the BatchNorm output (or None).
* ``delta`` ``[N, G, S]``: the loss gradient w.r.t. the BatchNorm output (or None).

Returns ``(out, dot)``::

    out[n, k, g, s] = (scale[g] * rz + rgamma[k, g] * xh[n, g, s] + rbeta[k, g]) * d1[n, g, s]
    dot[k, g] = sum_{n, s} rz[n, k, g, s] * delta[n, g, s]      (of rz before it is overwritten)

``out`` is the tangent of the activation's output (of the BatchNorm output without ``d1``); ``dot``
is what the weight's Hessian-vector product needs from the input tangent (``[0]``-shaped without
``delta``), so the engine need not keep ``rz`` for the backward pass.
"""
from __future__ import annotations

import torch

from .. import _ext
from ._checks import check_like, check_shapes

_FLOATS = (torch.float32, torch.float64)


def check_bn_eval_rop_fwd_inputs(rz, scale, xh=None, rgamma=None, rbeta=None, d1=None, delta=None) -> tuple[int, int, int, int]:
    """Validate shapes, dtypes and devices; returns ``(N, K, G, S)``. Raises ValueError/TypeError naming the problem."""
    op = "bn_eval_rop_fwd"
    if rz.dim() != 4:
        raise ValueError(f"{op}: rz must be [N, K, G, S], got {tuple(rz.shape)}")
    N, K, G, S = rz.shape
    if scale.shape != (G,):
        raise ValueError(f"{op}: scale must be [G] = [{G}], got {tuple(scale.shape)}")
    if (xh is None) != (rgamma is None):
        raise ValueError(f"{op}: xh and rgamma must be given together (affine BatchNorm) or both be None")
    check_shapes(op, (("xh", xh, (N, G, S)), ("d1", d1, (N, G, S)), ("delta", delta, (N, G, S)),
                      ("rgamma", rgamma, (K, G)), ("rbeta", rbeta, (K, G))))
    if rz.dtype not in _FLOATS:
        raise TypeError(f"{op}: float32 or float64 tensors required, got rz of dtype {rz.dtype}")
    check_like(op, "rz", rz, dict(scale=scale, xh=xh, rgamma=rgamma, rbeta=rbeta, d1=d1, delta=delta))
    return N, K, G, S


def bn_eval_rop_fwd_reference(rz, scale, xh=None, rgamma=None, rbeta=None, d1=None, delta=None,
                              inplace=False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of :func:`bn_eval_rop_fwd` (same arguments and results)."""
    N, K, G, S = check_bn_eval_rop_fwd_inputs(rz, scale, xh, rgamma, rbeta, d1, delta)
    dot = rz.new_zeros(0) if delta is None else (rz * delta.unsqueeze(1)).sum((0, 3))
    out = rz * scale.view(1, 1, G, 1)
    if xh is not None:
        out = out + xh.unsqueeze(1) * rgamma.view(1, K, G, 1)
    if rbeta is not None:
        out = out + rbeta.view(1, K, G, 1)
    if d1 is not None:
        out = out * d1.unsqueeze(1)
    if inplace:
        out = rz.copy_(out)
    return out, dot


def bn_eval_rop_fwd(rz, scale, xh=None, rgamma=None, rbeta=None, d1=None, delta=None,
                    inplace=False) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward R-op of an eval BatchNorm and a following activation derivative, in one pass
    (see the module docstring for the shapes and the formula): C++ on CPU tensors, Triton or CUDA
    on GPU tensors, or the torch reference, as chosen by :func:`fastcurv.set_kernel_impl`.
    Returns ``(out [N, K, G, S], dot [K, G])``; ``out`` is ``rz`` itself when ``inplace``."""
    impl = _ext.choose("bn_eval_rop_fwd", rz.device, rz.dtype)
    if impl == "torch":
        return bn_eval_rop_fwd_reference(rz, scale, xh, rgamma, rbeta, d1, delta, inplace)
    if inplace and not rz.is_contiguous():
        raise ValueError("bn_eval_rop_fwd: inplace needs a contiguous rz")
    out = rz if inplace else rz.contiguous().clone()
    if impl == "ext":
        dot = torch.ops.fastcurv.bn_eval_rop_fwd(out, scale, xh, rgamma, rbeta, d1, delta)
    else:
        from .. import triton_kernels

        dot = triton_kernels.bn_eval_rop_fwd(out, scale, xh, rgamma, rbeta, d1, delta)
    return out, dot
