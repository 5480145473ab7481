"""A convolution evaluated only at chosen output positions, a set of positions per output channel,
and its weight gradient from those positions.

With the input's patches ``cols [N, L, T]`` (:func:`conv_patches`: L output positions, T = C_in * kh *
kw taps), positions ``pos [N, G, S]`` (int64 in ``[0, L)``) for each of G output channels, and K
weights per channel ``weight [G, K, T]``::

    sampled_conv:       out[n, k, g, s] = sum_t cols[n, pos[n, g, s], t] * weight[g, k, t]     [N, K, G, S]
    sampled_conv_wgrad: gw[g, k, t]     = sum_{n, s} grad[n, k, g, s] * cols[n, pos[n, g, s], t]  [G, K, T]

The fused engine's first convolution before a strided max pooling uses them: only the
position that wins each pooling window reaches the rest of the network (forward) or receives a
gradient (backward), and the element-wise layers in between (BatchNorm, activations) commute with
picking positions, so that stem's passes run at the pooled resolution from the winning positions
(``pos`` = the pooling's indices; K = the probes in a matvec, 1 in the parameter gradient). The C++ kernels
(``csrc/cpu/sampled_conv.cpp``) read a position's patch as one row of whole vectors (rows padded
to 64 bytes, as :func:`conv_patches` lays them out) and use it for all K; elsewhere the torch
reference (a gather, then an einsum) runs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _ext
from ._checks import check_like, check_shapes, store

_FLOATS = (torch.float32, torch.float64)


def conv_patches(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """The patches of ``x [N, C_in, H, W]`` that a convolution with these settings reads, one row
    per output position: ``[N, H_out * W_out, C_in * kh * kw]`` (taps in the order of a conv weight
    ``[C_out, C_in, kh, kw]`` flattened), a view of rows zero-padded to 64 bytes, the layout the
    C++ kernels read (any other layout is copied into it)."""
    return _kernel_rows(F.unfold(x, kernel_size, dilation, padding, stride).transpose(1, 2))


def _padded_taps(T: int, element_size: int) -> int:
    per = 64 // element_size
    return -(-T // per) * per


def _kernel_rows(cols: torch.Tensor) -> torch.Tensor:
    """``cols`` if each of its rows can be read as whole 64-byte vectors within its storage (rows
    contiguous, padded), else such a copy."""
    N, L, T = cols.shape
    tp = _padded_taps(T, cols.element_size())
    if cols.numel() == 0:
        return cols
    last = cols.storage_offset() + (N - 1) * cols.stride(0) + (L - 1) * cols.stride(1) + tp
    if (cols.stride(2) == 1 and cols.stride(1) >= tp and cols.stride(0) >= 0
            and last * cols.element_size() <= cols.untyped_storage().nbytes()):
        return cols
    out = cols.new_zeros(N, L, tp)
    out[..., :T] = cols
    return out[..., :T]


def _check(op: str, cols, pos, weight=None, grad=None, out=None) -> tuple[int, int, int]:
    """Validate shapes, dtypes and devices (``weight`` for the forward, ``grad`` and ``out`` for the
    weight gradient); returns ``(G, K, T)``. Raises ValueError/TypeError naming the problem."""
    if cols.dim() != 3:
        raise ValueError(f"{op}: cols must be [N, L, T], got {tuple(cols.shape)}")
    if cols.dtype not in _FLOATS:
        raise TypeError(f"{op}: float32 or float64 tensors required, got cols of dtype {cols.dtype}")
    N, L, T = cols.shape
    if pos.dim() != 3 or pos.shape[0] != N:
        raise ValueError(f"{op}: pos must be [N, G, S] with N = {N}, got {tuple(pos.shape)}")
    if pos.dtype != torch.int64:
        raise TypeError(f"{op}: pos must be int64, got {pos.dtype}")
    if pos.device != cols.device:
        raise ValueError(f"{op}: pos is on {pos.device} but cols is on {cols.device}")
    G, S = pos.shape[1:]
    if weight is not None and (weight.dim() != 3 or weight.shape[0] != G or weight.shape[2] != T):
        raise ValueError(f"{op}: weight must be [G, K, T] = [{G}, K, {T}], got {tuple(weight.shape)}")
    if grad is not None and (grad.dim() != 4 or grad.shape[0] != N or grad.shape[2:] != (G, S)):
        raise ValueError(f"{op}: grad must be [N, K, G, S] = [{N}, K, {G}, {S}], got {tuple(grad.shape)}")
    K = (weight if weight is not None else grad).shape[1]
    check_shapes(op, (("out", out, (G, K, T)),))
    check_like(op, "cols", cols, dict(weight=weight, grad=grad, out=out))
    return G, K, T


def _outside(L: int) -> str:
    return f"pos has entries outside [0, {L}) (the patches' positions)"


def _patches_at(op: str, cols, pos) -> torch.Tensor:
    """``[N, G, S, T]``: the patch of every position in ``pos``."""
    N, L, T = cols.shape
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= L):
        raise ValueError(f"{op}: {_outside(L)}")
    return torch.gather(cols, 1, pos.reshape(N, math.prod(pos.shape[1:]), 1).expand(-1, -1, T)).view(*pos.shape, T)


def _run(op: str, *args):
    """``torch.ops.fastcurv.<op>(*args)``, its out-of-range error as the reference raises it."""
    try:
        return getattr(torch.ops.fastcurv, op)(*args)
    except RuntimeError as exc:
        if "outside" not in str(exc):
            raise
        raise ValueError(f"{op}: {_outside(args[0].shape[1])}") from None


def sampled_conv_reference(cols, pos, weight) -> torch.Tensor:
    """Pure-torch reference of :func:`sampled_conv`."""
    _check("sampled_conv", cols, pos, weight=weight)
    return torch.einsum("ngst,gkt->nkgs", _patches_at("sampled_conv", cols, pos), weight)


def sampled_conv(cols, pos, weight) -> torch.Tensor:
    """The convolution at positions ``pos [N, G, S]`` of each output channel, for K weights per
    channel ``weight [G, K, T]``, from the patches ``cols [N, L, T]``: ``[N, K, G, S]`` (module
    docstring). C++ on CPU tensors, the torch reference elsewhere."""
    if _ext.choose("sampled_conv", cols.device, cols.dtype) != "ext":
        return sampled_conv_reference(cols, pos, weight)
    _check("sampled_conv", cols, pos, weight=weight)
    return _run("sampled_conv", _kernel_rows(cols), pos, weight)


def sampled_conv_wgrad_reference(cols, pos, grad, out=None, accumulate: bool = False) -> torch.Tensor:
    """Pure-torch reference of :func:`sampled_conv_wgrad`."""
    _check("sampled_conv_wgrad", cols, pos, grad=grad, out=out)
    return store(out, torch.einsum("nkgs,ngst->gkt", grad, _patches_at("sampled_conv_wgrad", cols, pos)), accumulate)


def sampled_conv_wgrad(cols, pos, grad, out=None, accumulate: bool = False) -> torch.Tensor:
    """The weight gradient ``[G, K, T]`` of :func:`sampled_conv` from ``grad [N, K, G, S]``, written
    into ``out`` when given (added to it with ``accumulate``) and returned. C++ on CPU tensors, the
    torch reference elsewhere."""
    if _ext.choose("sampled_conv_wgrad", cols.device, cols.dtype) != "ext":
        return sampled_conv_wgrad_reference(cols, pos, grad, out, accumulate)
    G, K, T = _check("sampled_conv_wgrad", cols, pos, grad=grad, out=out)
    direct = out is not None and out.is_contiguous()
    target = out if direct else cols.new_empty(G, K, T)
    _run("sampled_conv_wgrad", _kernel_rows(cols), pos, grad, target, accumulate and direct)
    return target if direct or out is None else store(out, target, accumulate)
