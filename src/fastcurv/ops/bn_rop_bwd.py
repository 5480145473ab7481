"""Input-gradient R-op of a batch-statistics BatchNorm (the fused engine's ``bn_mode="batch"``).

Layout (``G`` = replicas x channels, ``S`` = spatial positions, 1 for BatchNorm1d; means run over the
``N * S`` samples of each group ``g``, separately for every probe ``k``):

* ``xh`` ``[N, G, S]``: the normalized input ``(x - mean) * inv``; ``g`` ``[N, G, S]``: the loss
  gradient w.r.t. the BatchNorm output (shared by the probes); ``rg`` ``[N, K, G, S]``: its tangent.
* ``inv`` ``[G]``: ``1 / sqrt(var + eps)``.
* ``gamma`` ``[G]`` and ``rgamma`` ``[K, G]``: the weight and its tangent (both, or neither without
  affine parameters).
* ``rxh`` ``[N, K, G, S]`` and ``m2`` ``[K, G]``: the tangent of ``xh`` and ``mean(dx * xh)`` when the
  BatchNorm input has a tangent ``dx`` (both, or neither).

With ``gx = gamma * g`` and ``rgx = gamma * rg + rgamma * g``::

    out = inv * (rgx - mean(rgx) - xh * mean(rgx * xh) - rxh * mean(gx * xh) - xh * mean(gx * rxh))
          - inv**2 * m2 * (gx - mean(gx) - xh * mean(gx * xh))

(the ``rxh``/``m2`` terms only when given): the R-op of ``gx -> inv * P(gx)``, ``P(v) = v - mean(v) -
xh * mean(v * xh)``, the backward pass of BatchNorm w.r.t. its input. Returns ``[N, K, G, S]``.
"""
from __future__ import annotations

import torch

from .. import _ext
from ._checks import check_like

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_bn_rop_bwd_inputs(xh, g, rg, inv, gamma=None, rgamma=None, rxh=None, m2=None) -> tuple[int, int, int, int]:
    """Validate shapes, dtypes and devices; returns ``(N, K, G, S)``. Raises ValueError/TypeError naming the problem."""
    op = "bn_rop_bwd"
    if xh.dim() != 3:
        raise ValueError(f"{op}: xh must be [N, G, S], got {tuple(xh.shape)}")
    N, G, S = xh.shape
    if g.shape != xh.shape:
        raise ValueError(f"{op}: g {tuple(g.shape)} must have the shape of xh {tuple(xh.shape)}")
    if rg.dim() != 4 or (rg.shape[0], rg.shape[2], rg.shape[3]) != (N, G, S):
        raise ValueError(f"{op}: rg must be [N, K, G, S] = [{N}, K, {G}, {S}], got {tuple(rg.shape)}")
    K = rg.shape[1]
    if inv.shape != (G,):
        raise ValueError(f"{op}: inv must be [G] = [{G}], got {tuple(inv.shape)}")
    if (gamma is None) != (rgamma is None):
        raise ValueError(f"{op}: gamma and rgamma must be given together (affine BatchNorm) or both be None")
    if (rxh is None) != (m2 is None):
        raise ValueError(f"{op}: rxh and m2 must be given together (input tangent) or both be None")
    if gamma is not None:
        if gamma.shape != (G,):
            raise ValueError(f"{op}: gamma must be [G] = [{G}], got {tuple(gamma.shape)}")
        if rgamma.shape != (K, G):
            raise ValueError(f"{op}: rgamma must be [K, G] = [{K}, {G}], got {tuple(rgamma.shape)}")
    if rxh is not None:
        if rxh.shape != rg.shape:
            raise ValueError(f"{op}: rxh {tuple(rxh.shape)} must have the shape of rg {tuple(rg.shape)}")
        if m2.shape != (K, G):
            raise ValueError(f"{op}: m2 must be [K, G] = [{K}, {G}], got {tuple(m2.shape)}")
    if xh.dtype not in _FLOATS:
        raise TypeError(f"{op}: floating-point tensors required, got xh of dtype {xh.dtype}")
    check_like(op, "xh", xh, dict(g=g, rg=rg, inv=inv, gamma=gamma, rgamma=rgamma, rxh=rxh, m2=m2))
    return N, K, G, S


def bn_rop_bwd_reference(xh, g, rg, inv, gamma=None, rgamma=None, rxh=None, m2=None) -> torch.Tensor:
    """Pure-torch reference of :func:`bn_rop_bwd` (same arguments, same result ``[N, K, G, S]``)."""
    N, K, G, S = check_bn_rop_bwd_inputs(xh, g, rg, inv, gamma, rgamma, rxh, m2)
    xh4, g4, inv4 = xh.unsqueeze(1), g.unsqueeze(1), inv.view(1, 1, G, 1)

    def mean(t):
        return t.mean((0, 3), keepdim=True)

    gx, rgx = g4, rg
    if gamma is not None:
        gm = gamma.view(1, 1, G, 1)
        gx = g4 * gm
        rgx = rg * gm + g4 * rgamma.view(1, K, G, 1)
    mg = mean(gx * xh4)
    inner = rgx - mean(rgx) - xh4 * mean(rgx * xh4)
    if rxh is None:
        return inner * inv4
    inner = inner - rxh * mg - xh4 * mean(gx * rxh)
    pg = gx - mean(gx) - xh4 * mg
    return inner * inv4 - pg * (inv4 * inv4 * m2.view(1, K, G, 1))


def bn_rop_bwd(xh, g, rg, inv, gamma=None, rgamma=None, rxh=None, m2=None) -> torch.Tensor:
    """The input-gradient R-op of a batch-statistics BatchNorm (see the module docstring for the
    shapes and the formula): C++ on CPU tensors, Triton or CUDA on GPU tensors, or the torch
    reference, as chosen by :func:`fastcurv.set_kernel_impl`; float16/bfloat16 tensors take Triton
    (on a GPU) or the torch reference, never the C++/CUDA kernels. Returns ``[N, K, G, S]``."""
    impl = _ext.choose("bn_rop_bwd", rg.device, rg.dtype)
    if impl == "ext":
        return torch.ops.fastcurv.bn_rop_bwd(xh, g, rg, inv, gamma, rgamma, rxh, m2)
    if impl == "triton":
        from .. import triton_kernels

        return triton_kernels.bn_rop_bwd(xh, g, rg, inv, gamma, rgamma, rxh, m2)
    return bn_rop_bwd_reference(xh, g, rg, inv, gamma, rgamma, rxh, m2)
