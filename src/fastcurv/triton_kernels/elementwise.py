"""Triton kernels of the element-wise fastcurv ops: ``softmax_ce_hvp``, ``act_derivs``, ``act_rop_bwd``.

Same shapes and results as the torch references in :mod:`fastcurv.ops`. float16/bfloat16 inputs are
computed in float32, float64 in float64 (the other dtypes in float32). Scalars that Triton would pass as
float32 (``scale``, ``slope``, the GELU constants) are split into a float32 head and tail so the float64
path keeps full precision. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests only).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from . import register
from ..ops.activation import ACTIVATIONS


def split_f32(x: float) -> tuple[float, float]:
    """``x`` as a float32 head plus a float32 tail (``hi + lo == x`` to ~1e-14 relative)."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


_INV_SQRT_2PI_HI, _INV_SQRT_2PI_LO = (tl.constexpr(v) for v in split_f32(1.0 / math.sqrt(2.0 * math.pi)))
_INV_SQRT_2_HI, _INV_SQRT_2_LO = (tl.constexpr(v) for v in split_f32(1.0 / math.sqrt(2.0)))


@triton.jit
def _scalar(hi, lo, F64: tl.constexpr):
    """A scalar given as float32 head + tail (runtime argument or constant), in the compute dtype."""
    if F64:
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return tl.cast(hi, tl.float32)


@triton.jit
def _expm1(x):
    """exp(x) - 1 for x <= 0 to full relative precision, also where it is tiny. Near 0 (u = exp(x) in
    [0.5, 1)) by Kahan's method: log(u) rounds like u, so x * (u - 1) / log(u) keeps the digits that
    u - 1 alone cancels, even with the GPU's approximate float32 exp (the log is libdevice's). Below
    (u < 0.5) u - 1 has no cancellation, while a subnormal u would spoil the quotient."""
    u = tl.exp(x)
    kahan = (u >= 0.5) & (u < 1.0)
    lg = tl.log(tl.where(kahan, u, 0.5))  # a placeholder outside: no log(0), no 0 / 0
    return tl.where(u == 1.0, x, tl.where(kahan, (u - 1.0) * x / lg, u - 1.0))


@triton.jit
def _tanh(z):
    # tanh|z| = -m / (2 + m) with m = expm1(-2|z|) in [-1, 0]: no overflow, and no cancellation near 0
    # ((1 - e) / (1 + e) with e = exp(-2|z|) lost all float32 digits for |z| < 6e-8, and 2e-5 of
    # float64's at 1e-12)
    m = _expm1(-2.0 * tl.abs(z))
    t = -m / (2.0 + m)
    return tl.where(z == 0, z, tl.where(z < 0, -t, t))  # z == 0: keeps the sign of -0.0, as torch


@triton.jit
def _sigmoid(z):
    e = tl.exp(-tl.abs(z))  # in (0, 1]: no overflow for any z
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _act_d1_d2(z, slope, KIND: tl.constexpr, F64: tl.constexpr):
    """sigma'(z), sigma''(z) for the activation code KIND (see fastcurv.ops.ACTIVATIONS)."""
    zero = tl.zeros_like(z)
    one = zero + 1.0
    if KIND == 1:  # relu
        d1 = tl.where(z > 0, one, zero)
        d2 = zero
    elif KIND == 2:  # leaky_relu
        d1 = tl.where(z > 0, one, zero + slope)
        d2 = zero
    elif KIND == 3:  # tanh
        t = _tanh(z)
        d1 = 1.0 - t * t
        d2 = -2.0 * t * d1
    elif KIND == 4:  # sigmoid
        s = _sigmoid(z)
        d1 = s * (1.0 - s)
        d2 = d1 * (1.0 - 2.0 * s)
    elif KIND == 5:  # gelu (exact, erf form)
        phi = tl.exp(-0.5 * z * z) * _scalar(_INV_SQRT_2PI_HI, _INV_SQRT_2PI_LO, F64)
        cdf = 0.5 * (1.0 + tl.erf(z * _scalar(_INV_SQRT_2_HI, _INV_SQRT_2_LO, F64)))
        d1 = cdf + z * phi
        d2 = phi * (2.0 - z * z)
    else:  # identity
        d1 = one
        d2 = zero
    return d1, d2


@triton.jit
def _act_value_d1(z, slope, KIND: tl.constexpr, F64: tl.constexpr):
    """sigma(z), sigma'(z) for the activation code KIND."""
    zero = tl.zeros_like(z)
    one = zero + 1.0
    if KIND == 1:
        h = tl.where(z > 0, z, zero)
        d1 = tl.where(z > 0, one, zero)
    elif KIND == 2:
        h = tl.where(z > 0, z, z * slope)
        d1 = tl.where(z > 0, one, zero + slope)
    elif KIND == 3:
        h = _tanh(z)
        d1 = 1.0 - h * h
    elif KIND == 4:
        h = _sigmoid(z)
        d1 = h * (1.0 - h)
    elif KIND == 5:
        phi = tl.exp(-0.5 * z * z) * _scalar(_INV_SQRT_2PI_HI, _INV_SQRT_2PI_LO, F64)
        cdf = 0.5 * (1.0 + tl.erf(z * _scalar(_INV_SQRT_2_HI, _INV_SQRT_2_LO, F64)))
        h = z * cdf
        d1 = cdf + z * phi
    else:
        h = z
        d1 = one
    return h, d1


def _compute_f64(dtype: torch.dtype) -> bool:
    return dtype == torch.float64


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float(op: str, ref: torch.Tensor, **tensors: torch.Tensor) -> None:
    if ref.dtype not in _FLOATS:
        raise TypeError(f"{op}: floating-point tensors required, got {ref.dtype}")
    for name, t in tensors.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: dtype mismatch, {name} is {t.dtype} but expected {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but expected {ref.device}")


# ----------------------------------------------------------------------------- softmax_ce_hvp


@triton.jit
def _softmax_ce_hvp_kernel(p_ptr, t_ptr, o_ptr, rows, KN, N, C, scale_hi, scale_lo,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0)
    r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # row = (b * K + k) * N + n
    rmask = r < rows
    prow = ((r // KN) * N + r % N) * C
    trow = r * C
    cols = tl.arange(0, BLOCK_C)
    if F64:
        dot = tl.zeros([BLOCK_R], dtype=tl.float64)
    else:
        dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    # the pivot: t at the row's most probable class (the first if tied), see ops/softmax_ce_hvp.py
    best = dot - 1.0
    tm = dot
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        m = rmask[:, None] & (c[None, :] < C)
        p = tl.load(p_ptr + prow[:, None] + c[None, :], mask=m, other=-1.0).to(dot.dtype)
        t = tl.load(t_ptr + trow[:, None] + c[None, :], mask=m, other=0.0).to(dot.dtype)
        bmax = tl.max(p, axis=1)
        first = tl.min(tl.where(p == bmax[:, None], cols[None, :], BLOCK_C), axis=1)
        bt = tl.sum(tl.where(cols[None, :] == first[:, None], t, 0.0), axis=1)
        tm = tl.where(bmax > best, bt, tm)
        best = tl.maximum(best, bmax)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        m = rmask[:, None] & (c[None, :] < C)
        p = tl.load(p_ptr + prow[:, None] + c[None, :], mask=m, other=0.0).to(dot.dtype)
        t = tl.load(t_ptr + trow[:, None] + c[None, :], mask=m, other=0.0).to(dot.dtype)
        dot += tl.sum(p * (t - tm[:, None]), axis=1)
    s = _scalar(scale_hi, scale_lo, F64)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        m = rmask[:, None] & (c[None, :] < C)
        p = tl.load(p_ptr + prow[:, None] + c[None, :], mask=m, other=0.0).to(dot.dtype)
        t = tl.load(t_ptr + trow[:, None] + c[None, :], mask=m, other=0.0).to(dot.dtype)
        out = s * p * ((t - tm[:, None]) - dot[:, None])
        tl.store(o_ptr + trow[:, None] + c[None, :], out.to(o_ptr.dtype.element_ty), mask=m)


@register("softmax_ce_hvp")
def softmax_ce_hvp(probs: torch.Tensor, tangent: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * (diag(p) - p p^T) t`` per row, pivoted as ``ops.softmax_ce_hvp.ce_hessian_product``;
    probs ``[B, N, C]``, tangent ``[B, K, N, C]`` -> ``[B, K, N, C]``."""
    if probs.dim() != 3 or tangent.dim() != 4:
        raise ValueError(f"softmax_ce_hvp: probs must be [B, N, C] and tangent [B, K, N, C], got "
                         f"{tuple(probs.shape)} and {tuple(tangent.shape)}")
    B, K, N, C = tangent.shape
    if probs.shape != (B, N, C):
        raise ValueError(f"softmax_ce_hvp: tangent {tuple(tangent.shape)} does not match probs {tuple(probs.shape)}")
    _check_float("softmax_ce_hvp", probs, tangent=tangent)
    p, t = probs.contiguous(), tangent.contiguous()
    out = torch.empty_like(t)
    rows = B * K * N
    if rows == 0 or C == 0:
        return out
    block_c = min(triton.next_power_of_2(C), 1024)
    block_r = max(1, min(64, 2048 // block_c, triton.next_power_of_2(rows)))
    hi, lo = split_f32(float(scale))
    grid = (triton.cdiv(rows, block_r),)
    _softmax_ce_hvp_kernel[grid](p, t, out, rows, K * N, N, C, hi, lo,
                                 BLOCK_R=block_r, BLOCK_C=block_c, F64=_compute_f64(t.dtype))
    return out


# ----------------------------------------------------------------------------- act_derivs


@triton.jit
def _act_derivs_kernel(z_ptr, g_ptr, d1_ptr, d2g_ptr, n, slope_hi, slope_lo,
                       KIND: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    if F64:
        z = tl.load(z_ptr + i, mask=m, other=0.0).to(tl.float64)
        g = tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float64)
    else:
        z = tl.load(z_ptr + i, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float32)
    d1, d2 = _act_d1_d2(z, _scalar(slope_hi, slope_lo, F64), KIND, F64)
    tl.store(d1_ptr + i, d1.to(d1_ptr.dtype.element_ty), mask=m)
    tl.store(d2g_ptr + i, (d2 * g).to(d2g_ptr.dtype.element_ty), mask=m)


@register("act_derivs")
def act_derivs(z: torch.Tensor, g: torch.Tensor, kind: int, slope: float = 0.0):
    """``(sigma'(z), sigma''(z) * g)``; z, g of the same (any) shape. kind: see ``fastcurv.ops.ACTIVATIONS``."""
    if z.shape != g.shape:
        raise ValueError(f"act_derivs: z {tuple(z.shape)} and g {tuple(g.shape)} differ in shape")
    kind = int(kind)
    if kind not in ACTIVATIONS.values():
        raise ValueError(f"act_derivs: unknown activation kind {kind}; known: {ACTIVATIONS}")
    _check_float("act_derivs", z, g=g)
    zc, gc = z.contiguous(), g.contiguous()
    d1, d2g = torch.empty_like(zc), torch.empty_like(zc)
    n = zc.numel()
    if n == 0:
        return d1, d2g
    block = 1024
    hi, lo = split_f32(float(slope))
    _act_derivs_kernel[(triton.cdiv(n, block),)](zc, gc, d1, d2g, n, hi, lo,
                                                 KIND=kind, BLOCK=block, F64=_compute_f64(zc.dtype))
    return d1, d2g


# ----------------------------------------------------------------------------- act_rop_bwd


@triton.jit
def _act_rop_bwd_kernel(d1_ptr, d2g_ptr, rz_ptr, rg_ptr, o_ptr, n, KM, M, BLOCK: tl.constexpr, F64: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    j = (i // KM) * M + i % M  # same b and m in d1/d2g
    if F64:
        dt = tl.float64
    else:
        dt = tl.float32
    a = tl.load(d1_ptr + j, mask=m, other=0.0).to(dt)
    b = tl.load(d2g_ptr + j, mask=m, other=0.0).to(dt)
    rz = tl.load(rz_ptr + i, mask=m, other=0.0).to(dt)
    rg = tl.load(rg_ptr + i, mask=m, other=0.0).to(dt)
    tl.store(o_ptr + i, (a * rg + b * rz).to(o_ptr.dtype.element_ty), mask=m)


@register("act_rop_bwd")
def act_rop_bwd(d1: torch.Tensor, d2g: torch.Tensor, rz: torch.Tensor, rg: torch.Tensor) -> torch.Tensor:
    """``d1 * rg + d2g * rz``; d1, d2g ``[B, M]``; rz, rg ``[B, K, M]`` -> ``[B, K, M]``."""
    if d1.dim() != 2 or d2g.shape != d1.shape:
        raise ValueError(f"act_rop_bwd: d1 and d2g must both be [B, M], got {tuple(d1.shape)} and {tuple(d2g.shape)}")
    if rz.dim() != 3 or rg.shape != rz.shape:
        raise ValueError(f"act_rop_bwd: rz and rg must both be [B, K, M], got {tuple(rz.shape)} and {tuple(rg.shape)}")
    B, K, M = rz.shape
    if d1.shape != (B, M):
        raise ValueError(f"act_rop_bwd: rz {tuple(rz.shape)} does not match d1 {tuple(d1.shape)}")
    _check_float("act_rop_bwd", d1, d2g=d2g, rz=rz, rg=rg)
    a, b, z, g = d1.contiguous(), d2g.contiguous(), rz.contiguous(), rg.contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    if n == 0:
        return out
    block = 1024
    _act_rop_bwd_kernel[(triton.cdiv(n, block),)](a, b, z, g, out, n, K * M, M, BLOCK=block, F64=_compute_f64(g.dtype))
    return out
