"""Triton kernel of ``bn_rop_bwd``, the input-gradient R-op of a batch-statistics BatchNorm.

Shapes and formula: :mod:`fastcurv.ops.bn_rop_bwd` (xh, g ``[N, G, S]``; rg, rxh ``[N, K, G, S]``;
inv, gamma ``[G]``; rgamma, m2 ``[K, G]``). The output is affine in the inputs with five coefficients
per group ``(k, g)``: a first kernel (one program per tile of groups and probe) reduces the five sums
over the ``N * S`` samples and writes the coefficients, then an element-wise kernel writes
``out = c_rg*rg + c_g*g + c_xh*xh + c_rxh*rxh + c_0``. For small ``S`` (BatchNorm1d) a tile holds 32
groups, so the loads run along the contiguous group axis. float64 is computed in float64, the other
float dtypes in float32. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests only).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import register
from ..ops.bn_rop_bwd import check_bn_rop_bwd_inputs


@triton.jit
def _bn_rop_bwd_sums_kernel(xh_ptr, g_ptr, rg_ptr, rxh_ptr, inv_ptr, gamma_ptr, rgamma_ptr, m2_ptr, coef_ptr,
                            N, K, G, S, HAS_AFFINE: tl.constexpr, HAS_RXH: tl.constexpr, BLOCK_E: tl.constexpr,
                            BLOCK_G: tl.constexpr, F64: tl.constexpr):
    # program (tile of BLOCK_G groups, k): the groups on grid axis 0, which has no 65535 limit; tiles [BLOCK_E samples (n, s), BLOCK_G groups]. BLOCK_G = 1
    # when S is large (loads contiguous along s), > 1 for small S (contiguous along the groups)
    k = tl.program_id(1).to(tl.int64)
    j = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    jm = j < G
    NS = N * S
    if F64:
        dt = tl.float64
    else:
        dt = tl.float32
    a_rg = tl.zeros([BLOCK_E, BLOCK_G], dtype=dt)
    a_rgxh = tl.zeros([BLOCK_E, BLOCK_G], dtype=dt)
    a_grxh = tl.zeros([BLOCK_E, BLOCK_G], dtype=dt)
    a_g = tl.zeros([BLOCK_E, BLOCK_G], dtype=dt)
    a_gxh = tl.zeros([BLOCK_E, BLOCK_G], dtype=dt)
    for e0 in range(0, NS, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E).to(tl.int64)
        n = (e // S)[:, None]
        s = (e % S)[:, None]
        m = (e < NS)[:, None] & jm[None, :]
        ia = (n * G + j[None, :]) * S + s  # xh, g
        ib = ((n * K + k) * G + j[None, :]) * S + s  # rg, rxh
        x = tl.load(xh_ptr + ia, mask=m, other=0.0).to(dt)
        d = tl.load(g_ptr + ia, mask=m, other=0.0).to(dt)
        r = tl.load(rg_ptr + ib, mask=m, other=0.0).to(dt)
        a_rg += r
        a_rgxh += r * x
        a_g += d
        a_gxh += d * x
        if HAS_RXH:
            q = tl.load(rxh_ptr + ib, mask=m, other=0.0).to(dt)
            a_grxh += d * q
    cnt = tl.full([BLOCK_G], 0.0, dt) + NS  # (N * S may be a compile-time constant)
    mean_rg = tl.sum(a_rg, axis=0) / cnt
    mean_rgxh = tl.sum(a_rgxh, axis=0) / cnt
    mean_grxh = tl.sum(a_grxh, axis=0) / cnt
    mean_g = tl.sum(a_g, axis=0) / cnt
    mean_gxh = tl.sum(a_gxh, axis=0) / cnt
    kg = k * G + j
    inv = tl.load(inv_ptr + j, mask=jm, other=0.0).to(dt)
    if HAS_AFFINE:
        gam = tl.load(gamma_ptr + j, mask=jm, other=0.0).to(dt)
        rgam = tl.load(rgamma_ptr + kg, mask=jm, other=0.0).to(dt)
    else:
        gam = tl.full([BLOCK_G], 1.0, dt)
        rgam = tl.full([BLOCK_G], 0.0, dt)
    if HAS_RXH:
        mm = tl.load(m2_ptr + kg, mask=jm, other=0.0).to(dt)
    else:
        mm = tl.full([BLOCK_G], 0.0, dt)
    A = gam * mean_rg + rgam * mean_g  # mean(rgx)
    B = gam * mean_rgxh + rgam * mean_gxh  # mean(rgx * xh)
    D = gam * mean_grxh  # mean(gx * rxh)
    mg = gam * mean_gxh  # mean(gx * xh)
    mgx = gam * mean_g  # mean(gx)
    i2m = inv * inv * mm
    KG = K * G
    tl.store(coef_ptr + kg, inv * gam, mask=jm)
    tl.store(coef_ptr + KG + kg, inv * rgam - i2m * gam, mask=jm)
    tl.store(coef_ptr + 2 * KG + kg, -inv * (B + D) + i2m * mg, mask=jm)
    tl.store(coef_ptr + 3 * KG + kg, -inv * mg, mask=jm)
    tl.store(coef_ptr + 4 * KG + kg, -inv * A + i2m * mgx, mask=jm)


@triton.jit
def _bn_rop_bwd_apply_kernel(xh_ptr, g_ptr, rg_ptr, rxh_ptr, coef_ptr, o_ptr, total, K, G, S,
                             HAS_RXH: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < total
    if F64:
        dt = tl.float64
    else:
        dt = tl.float32
    KG = K * G
    s = i % S
    row = i // S  # (n * K + k) * G + j
    kg = row % KG
    n = row // KG
    j = kg % G
    ia = (n * G + j) * S + s
    r = tl.load(rg_ptr + i, mask=m, other=0.0).to(dt)
    d = tl.load(g_ptr + ia, mask=m, other=0.0).to(dt)
    x = tl.load(xh_ptr + ia, mask=m, other=0.0).to(dt)
    c_rg = tl.load(coef_ptr + kg, mask=m, other=0.0)
    c_g = tl.load(coef_ptr + KG + kg, mask=m, other=0.0)
    c_xh = tl.load(coef_ptr + 2 * KG + kg, mask=m, other=0.0)
    c_0 = tl.load(coef_ptr + 4 * KG + kg, mask=m, other=0.0)
    o = c_rg * r + c_g * d + c_xh * x + c_0
    if HAS_RXH:
        q = tl.load(rxh_ptr + i, mask=m, other=0.0).to(dt)
        o += tl.load(coef_ptr + 3 * KG + kg, mask=m, other=0.0) * q
    tl.store(o_ptr + i, o.to(o_ptr.dtype.element_ty), mask=m)


@register("bn_rop_bwd")
def bn_rop_bwd(xh, g, rg, inv, gamma=None, rgamma=None, rxh=None, m2=None) -> torch.Tensor:
    """Batch-statistics BatchNorm input-gradient R-op; arguments and result as
    :func:`fastcurv.ops.bn_rop_bwd` (returns ``[N, K, G, S]``)."""
    N, K, G, S = check_bn_rop_bwd_inputs(xh, g, rg, inv, gamma, rgamma, rxh, m2)
    x, d, r, iv = xh.contiguous(), g.contiguous(), rg.contiguous(), inv.contiguous()
    out = torch.empty_like(r)
    total = r.numel()
    if total == 0:
        return out
    f64 = r.dtype == torch.float64
    coef = torch.empty(5, K * G, dtype=torch.float64 if f64 else torch.float32, device=r.device)
    affine, tangent = gamma is not None, rxh is not None
    ga, rga = (gamma.contiguous(), rgamma.contiguous()) if affine else (iv, iv)  # placeholders: never read
    q, mm = (rxh.contiguous(), m2.contiguous()) if tangent else (r, iv)
    block_g = min(32, triton.next_power_of_2(G)) if S < 8 else 1
    block_e = max(16, min(1024 // block_g, triton.next_power_of_2(N * S)))
    _bn_rop_bwd_sums_kernel[(triton.cdiv(G, block_g), K)](x, d, r, q, iv, ga, rga, mm, coef, N, K, G, S,
                                                          HAS_AFFINE=affine, HAS_RXH=tangent, BLOCK_E=block_e,
                                                          BLOCK_G=block_g, F64=f64)
    block = 1024
    _bn_rop_bwd_apply_kernel[(triton.cdiv(total, block),)](x, d, r, q, coef, out, total, K, G, S,
                                                           HAS_RXH=tangent, BLOCK=block, F64=f64)
    return out
