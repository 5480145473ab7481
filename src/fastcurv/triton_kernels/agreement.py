"""Triton kernel of ``agreement_counts``: out[i, j] = #{m : preds[i, m] == preds[j, m]}.

Each program owns a ``BLOCK_R x BLOCK_R`` tile of replica pairs and streams the examples in
chunks of ``BLOCK_M``, comparing the two row blocks by broadcasting (a matmul whose
multiply-add is replaced by compare-and-count). Counters are int32 (M < 2**31), output int64;
addresses are int64 (R * M may pass 2**31: 1000 replicas x 2.2M examples).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import register


@triton.jit
def _agreement_kernel(p_ptr, out_ptr, R, M, stride_r, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    ri = pid_i.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rj = pid_j.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_i, row_j = p_ptr + ri[:, None] * stride_r, p_ptr + rj[:, None] * stride_r
    acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.int32)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        in_m = m < M
        a = tl.load(row_i + m[None, :], mask=(ri[:, None] < R) & in_m[None, :], other=0)
        b = tl.load(row_j + m[None, :], mask=(rj[:, None] < R) & in_m[None, :], other=0)
        eq = (a[:, None, :] == b[None, :, :]) & in_m[None, None, :]
        acc += tl.sum(eq.to(tl.int32), axis=2)
    mask = (ri[:, None] < R) & (rj[None, :] < R)
    tl.store(out_ptr + ri[:, None] * R + rj[None, :], acc.to(tl.int64), mask=mask)


@register("agreement_counts")
def agreement_counts(preds: torch.Tensor, block_r: int | None = None, block_m: int | None = None) -> torch.Tensor:
    """Triton agreement counts; preds ``[R, M]`` integer -> int64 ``[R, R]``."""
    if preds.dim() != 2:
        raise ValueError(f"agreement_counts: preds must be [R, M], got shape {tuple(preds.shape)}")
    if preds.dtype == torch.bool:
        preds = preds.to(torch.uint8)
    if preds.is_floating_point() or preds.is_complex():
        raise TypeError(f"agreement_counts: preds must hold integer class indices, got {preds.dtype}")
    if preds.shape[1] >= 2**31:
        raise ValueError(f"agreement_counts: M = {preds.shape[1]} exceeds the int32 counters; split the examples")
    p = preds.contiguous()
    R, M = p.shape
    out = torch.zeros(R, R, dtype=torch.int64, device=p.device)
    if R == 0 or M == 0:
        return out
    # Interpreter: few, large programs (cost is per program and op). GPU: 16x16x32 tiles in registers.
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    block_r = block_r or (32 if interp else 16)
    block_m = block_m or (128 if interp else 32)
    grid = (triton.cdiv(R, block_r), triton.cdiv(R, block_r))
    _agreement_kernel[grid](p, out, R, M, p.stride(0), BLOCK_R=block_r, BLOCK_M=block_m)
    return out
