"""Triton kernels of the BatchNorm R-ops.

``bn_rop_bwd``, the input-gradient R-op of a batch-statistics BatchNorm. Shapes and formula:
:mod:`fastcurv.ops.bn_rop_bwd` (xh, g ``[N, G, S]``; rg, rxh ``[N, K, G, S]``;
inv, gamma ``[G]``; rgamma, m2 ``[K, G]``). The output is affine in the inputs with five coefficients
per group ``(k, g)``: a first kernel (one program per tile of groups and probe) reduces the five sums
over the ``N * S`` samples and writes the coefficients, then an element-wise kernel writes
``out = c_rg*rg + c_g*g + c_xh*xh + c_rxh*rxh + c_0``.

``bn_eval_rop_fwd`` and ``bn_eval_rop_bwd``, the R-ops of an eval BatchNorm fused with the derivative
of the following activation (:mod:`fastcurv.ops.bn_eval_rop_fwd`, :mod:`fastcurv.ops.bn_eval_rop_bwd`):
one kernel each, one program per tile of groups and probe, which updates its elements of the first
argument in place and reduces their sums over the ``N * S`` samples (every input value read once).

For small ``S`` (BatchNorm1d) a tile holds 32 groups, so the loads run along the contiguous group
axis. float64 is computed in float64, the other float dtypes in float32. Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests only).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import register
from ..ops.bn_eval_rop_bwd import check_bn_eval_rop_bwd_inputs
from ..ops.bn_eval_rop_fwd import check_bn_eval_rop_fwd_inputs
from ..ops.bn_rop_bwd import check_bn_rop_bwd_inputs


def _tile_shape(N, G, S):
    """(BLOCK_G, BLOCK_E) of the per-group reductions over N * S samples: up to 32 groups per tile
    for small S (loads along the contiguous group axis), one for larger S (loads along s)."""
    block_g = min(32, triton.next_power_of_2(G)) if S < 8 else 1
    return block_g, max(16, min(1024 // block_g, triton.next_power_of_2(N * S)))


@triton.jit
def _group_tile(G, BLOCK_G: tl.constexpr):
    """This program's probe ``k`` (grid axis 1) and its ``BLOCK_G`` groups ``j`` (grid axis 0, which
    has no 65535 limit), with their mask."""
    k = tl.program_id(1).to(tl.int64)
    j = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    return k, j, j < G


@triton.jit
def _sample_tile(e0, k, j, jm, N, K, G, S, BLOCK_E: tl.constexpr):
    """The mask and offsets of the tile [BLOCK_E samples e = n * S + s from e0, the groups j]: ``ia``
    into [N, G, S] tensors, ``ib`` into [N, K, G, S] tensors at probe ``k``."""
    e = e0 + tl.arange(0, BLOCK_E).to(tl.int64)
    n = (e // S)[:, None]
    s = (e % S)[:, None]
    m = (e < N * S)[:, None] & jm[None, :]
    ia = (n * G + j[None, :]) * S + s
    ib = ((n * K + k) * G + j[None, :]) * S + s
    return m, ia, ib


@triton.jit
def _bn_rop_bwd_sums_kernel(xh_ptr, g_ptr, rg_ptr, rxh_ptr, inv_ptr, gamma_ptr, rgamma_ptr, m2_ptr, coef_ptr,
                            N, K, G, S, HAS_AFFINE: tl.constexpr, HAS_RXH: tl.constexpr, BLOCK_E: tl.constexpr,
                            BLOCK_G: tl.constexpr, F64: tl.constexpr):
    # program (tile of BLOCK_G groups, k), tiles [BLOCK_E samples (n, s), BLOCK_G groups]. BLOCK_G = 1
    # when S is large (loads contiguous along s), > 1 for small S (contiguous along the groups)
    k, j, jm = _group_tile(G, BLOCK_G)
    dt = tl.float64 if F64 else tl.float32
    NS = N * S
    a_rg = tl.zeros([BLOCK_E, BLOCK_G], dtype=dt)
    a_rgxh = tl.zeros([BLOCK_E, BLOCK_G], dtype=dt)
    a_grxh = tl.zeros([BLOCK_E, BLOCK_G], dtype=dt)
    a_g = tl.zeros([BLOCK_E, BLOCK_G], dtype=dt)
    a_gxh = tl.zeros([BLOCK_E, BLOCK_G], dtype=dt)
    for e0 in range(0, NS, BLOCK_E):
        m, ia, ib = _sample_tile(e0, k, j, jm, N, K, G, S, BLOCK_E)  # ia: xh, g; ib: rg, rxh
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
    block_g, block_e = _tile_shape(N, G, S)
    _bn_rop_bwd_sums_kernel[(triton.cdiv(G, block_g), K)](x, d, r, q, iv, ga, rga, mm, coef, N, K, G, S,
                                                          HAS_AFFINE=affine, HAS_RXH=tangent, BLOCK_E=block_e,
                                                          BLOCK_G=block_g, F64=f64)
    block = 1024
    _bn_rop_bwd_apply_kernel[(triton.cdiv(total, block),)](x, d, r, q, coef, out, total, K, G, S,
                                                           HAS_RXH=tangent, BLOCK=block, F64=f64)
    return out


@triton.jit
def _bn_eval_rop_fwd_kernel(rz_ptr, scale_ptr, xh_ptr, rgamma_ptr, rbeta_ptr, d1_ptr, delta_ptr, dot_ptr, N, K, G, S,
                            HAS_XH: tl.constexpr, HAS_RBETA: tl.constexpr, HAS_D1: tl.constexpr,
                            HAS_DELTA: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, F64: tl.constexpr):
    # program (tile of BLOCK_G groups, k), tiles [BLOCK_E samples (n, s), BLOCK_G groups] as in
    # _bn_rop_bwd_sums_kernel; dot is accumulated from rz before it is overwritten
    k, j, jm = _group_tile(G, BLOCK_G)
    dt = tl.float64 if F64 else tl.float32
    kg = k * G + j
    a = tl.load(scale_ptr + j, mask=jm, other=0.0)[None, :]
    if HAS_XH:
        b = tl.load(rgamma_ptr + kg, mask=jm, other=0.0)[None, :]
    if HAS_RBETA:
        c = tl.load(rbeta_ptr + kg, mask=jm, other=0.0)[None, :]
    acc = tl.zeros([BLOCK_E, BLOCK_G], dtype=dt)
    for e0 in range(0, N * S, BLOCK_E):
        m, ia, ib = _sample_tile(e0, k, j, jm, N, K, G, S, BLOCK_E)  # ia: xh, d1, delta; ib: rz
        r = tl.load(rz_ptr + ib, mask=m, other=0.0)
        if HAS_DELTA:
            acc += r * tl.load(delta_ptr + ia, mask=m, other=0.0)
        o = a * r
        if HAS_XH:
            o += b * tl.load(xh_ptr + ia, mask=m, other=0.0)
        if HAS_RBETA:
            o += c
        if HAS_D1:
            o *= tl.load(d1_ptr + ia, mask=m, other=0.0)
        tl.store(rz_ptr + ib, o, mask=m)
    if HAS_DELTA:
        tl.store(dot_ptr + kg, tl.sum(acc, axis=0), mask=jm)


@triton.jit
def _bn_eval_rop_bwd_kernel(rd_ptr, scale_ptr, xh_ptr, delta_ptr, crg_ptr, d1_ptr, su_ptr, sx_ptr, N, K, G, S,
                            HAS_XH: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_D1: tl.constexpr,
                            INPUT_GRAD: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, F64: tl.constexpr):
    # program (tile of BLOCK_G groups, k) as in _bn_eval_rop_fwd_kernel; rd is only read without INPUT_GRAD
    k, j, jm = _group_tile(G, BLOCK_G)
    dt = tl.float64 if F64 else tl.float32
    kg = k * G + j
    if INPUT_GRAD:
        a = tl.load(scale_ptr + j, mask=jm, other=0.0)[None, :]
        if HAS_DELTA:
            c = tl.load(crg_ptr + kg, mask=jm, other=0.0)[None, :]
    a_u = tl.zeros([BLOCK_E, BLOCK_G], dtype=dt)
    a_uxh = tl.zeros([BLOCK_E, BLOCK_G], dtype=dt)
    for e0 in range(0, N * S, BLOCK_E):
        m, ia, ib = _sample_tile(e0, k, j, jm, N, K, G, S, BLOCK_E)  # ia: xh, delta, d1; ib: rd
        u = tl.load(rd_ptr + ib, mask=m, other=0.0)
        if HAS_D1:
            u *= tl.load(d1_ptr + ia, mask=m, other=0.0)
        a_u += u
        if HAS_XH:
            a_uxh += u * tl.load(xh_ptr + ia, mask=m, other=0.0)
        if INPUT_GRAD:
            o = a * u
            if HAS_DELTA:
                o += c * tl.load(delta_ptr + ia, mask=m, other=0.0)
            tl.store(rd_ptr + ib, o, mask=m)
    tl.store(su_ptr + kg, tl.sum(a_u, axis=0), mask=jm)
    if HAS_XH:
        tl.store(sx_ptr + kg, tl.sum(a_uxh, axis=0), mask=jm)


@register("bn_eval_rop_fwd")
def bn_eval_rop_fwd(rz, scale, xh=None, rgamma=None, rbeta=None, d1=None, delta=None) -> torch.Tensor:
    """Eval BatchNorm forward R-op times the activation derivative, in place on ``rz``
    ``[N, K, G, S]`` (contiguous); arguments as :func:`fastcurv.ops.bn_eval_rop_fwd`. Returns
    ``dot`` ``[K, G]`` of ``rz`` before the update (``[0]``-shaped without ``delta``)."""
    N, K, G, S = check_bn_eval_rop_fwd_inputs(rz, scale, xh, rgamma, rbeta, d1, delta)
    if not rz.is_contiguous():
        raise ValueError("bn_eval_rop_fwd: rz is written in place and must be contiguous")
    dot = rz.new_zeros((K, G) if delta is not None else (0,))
    if rz.numel() == 0:
        return dot
    # absent operands are passed as rz: never read
    x, rga, rbe, d, de = (rz if t is None else t.contiguous() for t in (xh, rgamma, rbeta, d1, delta))
    block_g, block_e = _tile_shape(N, G, S)
    _bn_eval_rop_fwd_kernel[(triton.cdiv(G, block_g), K)](
        rz, scale.contiguous(), x, rga, rbe, d, de, dot if delta is not None else rz, N, K, G, S,
        HAS_XH=xh is not None, HAS_RBETA=rbeta is not None, HAS_D1=d1 is not None, HAS_DELTA=delta is not None,
        BLOCK_E=block_e, BLOCK_G=block_g, F64=rz.dtype == torch.float64)
    return dot


@register("bn_eval_rop_bwd")
def bn_eval_rop_bwd(rd, scale, xh=None, delta=None, crg=None, d1=None, input_grad=True) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm backward R-op behind an activation derivative; arguments as
    :func:`fastcurv.ops.bn_eval_rop_bwd`. Returns ``(sum_u [K, G], sum_uxh [K, G])`` (``sum_uxh``
    ``[0]``-shaped without ``xh``); with ``input_grad`` overwrites ``rd`` ``[N, K, G, S]`` (then
    contiguous) with the input gradient's tangent."""
    N, K, G, S = check_bn_eval_rop_bwd_inputs(rd, scale, xh, delta, crg, d1)
    if input_grad and not rd.is_contiguous():
        raise ValueError("bn_eval_rop_bwd: input_grad overwrites rd, which must then be contiguous")
    sum_u = rd.new_zeros(K, G)
    sum_uxh = rd.new_zeros((K, G) if xh is not None else (0,))
    if rd.numel() == 0:
        return sum_u, sum_uxh
    r = rd if input_grad else rd.contiguous()
    x, de, cr, d = (r if t is None else t.contiguous() for t in (xh, delta, crg, d1))  # r: never read
    block_g, block_e = _tile_shape(N, G, S)
    _bn_eval_rop_bwd_kernel[(triton.cdiv(G, block_g), K)](
        r, scale.contiguous(), x, de, cr, d, sum_u, sum_uxh if xh is not None else sum_u, N, K, G, S,
        HAS_XH=xh is not None, HAS_DELTA=delta is not None, HAS_D1=d1 is not None, INPUT_GRAD=input_grad,
        BLOCK_E=block_e, BLOCK_G=block_g, F64=rd.dtype == torch.float64)
    return sum_u, sum_uxh
