"""Grouped stride-1 convolutions with few channels per group, and their input and weight gradients.

Operands are 6-d views ``[B, G, C1, C2, H, W]``: B samples, G groups, and each group's channels
split in two axes (C = C1 * C2), every axis with its own stride, so that the fused engine's
tangents ``[N, K, R, C, H, W]`` serve as inputs and outputs without copies (the probes K as samples
of a replica's convolution, or as channels of its output or input). The two ops are stride-1
convolutions with zero padding ``(top, bottom, left, right)`` (or ``(ph, pw)`` on both sides)::

    group_conv:        out[b, g, o, y, x]  (+)= sum_{c, ty, tx} w[g, o, c, ty, tx] * x[b, g, c, y + ty - top, x + tx - left]
    group_conv_wgrad:  gw[g, o, c, ty, tx] (+)= sum_{b, y, x} grad[b, g, o, y, x] * x[b, g, c, y + ty - top, x + tx - left]

(``o`` indexes ``out``'s and ``grad``'s channel pair ``(O1, O2)``, ``c`` x's ``(C1, C2)``; x is zero
outside its H x W.) The input gradient of a stride-1 convolution is :func:`group_conv` of the
output gradient with the weight flipped and its channels swapped (:func:`conv_input_grad`).

The C++ kernels (``csrc/cpu/group_conv.cpp``) lay each sample's planes out zero-padded with rows
back to back and run vectors over the flat positions. On 2 cores (20 groups, ``python
benchmarks/bench_kernels.py --group-conv``) they beat oneDNN's grouped convolutions where a group
has fewer than ``NARROW_CHANNELS`` (16) input or output channels (3-8 channels, 3x3 and 5x5
kernels on 7x7 to 32x32 maps: forward 1.06-4.1x, weight gradient 1.2-4.4x, but 0.87x at 8 -> 8
channels on 7x7 maps) and lose to its 16-channel blocked kernels beyond (16 and 32 channels:
forward 0.65-1.01x, weight gradient 0.46-0.75x). Elsewhere the torch reference (``F.conv2d`` on
contiguous copies) runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from ._checks import check_like

# channels per group (input or output, whichever is fewer) below which the kernels beat oneDNN
NARROW_CHANNELS = 16
_FLOATS = (torch.float32, torch.float64)


def _pads(padding) -> tuple[int, int, int, int]:
    """``(ph, pw)`` or ``(top, bottom, left, right)`` as the latter."""
    p = tuple(int(v) for v in padding)
    if len(p) == 2:
        p = (p[0], p[0], p[1], p[1])
    if len(p) != 4:
        raise ValueError(f"padding must be (ph, pw) or (top, bottom, left, right), got {tuple(padding)}")
    return p


def _geometry(op: str, x: torch.Tensor, kh: int, kw: int, padding) -> tuple[int, int]:
    if x.dim() != 6:
        raise ValueError(f"{op}: x must be 6-d [B, G, C1, C2, H, W], got {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{op}: float32 or float64 tensors required, got x of dtype {x.dtype}")
    t, b, l, r = padding
    if min(padding) < 0:
        raise ValueError(f"{op}: padding must be non-negative, got {tuple(padding)}")
    Ho, Wo = x.shape[4] + t + b - kh + 1, x.shape[5] + l + r - kw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"{op}: the {kh}x{kw} kernel is larger than the padded input "
                         f"({x.shape[4] + t + b}x{x.shape[5] + l + r}: {tuple(x.shape[4:])} with padding {tuple(padding)})")
    return Ho, Wo


def _check_out(op: str, name: str, x: torch.Tensor, t: torch.Tensor, Ho: int, Wo: int) -> None:
    B, G = x.shape[:2]
    if t.dim() != 6 or tuple(t.shape[:2]) != (B, G) or tuple(t.shape[4:]) != (Ho, Wo):
        raise ValueError(f"{op}: {name} must be [B, G, O1, O2, H_out, W_out] = [{B}, {G}, O1, O2, {Ho}, {Wo}], got {tuple(t.shape)}")


def _check_weight(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, ...]:
    """``weight``'s shape ``(G, O, C, kh, kw)`` after checking it against ``x``'s G and C."""
    if x.dim() != 6:
        raise ValueError(f"group_conv: x must be 6-d [B, G, C1, C2, H, W], got {tuple(x.shape)}")
    G, C = x.shape[1], x.shape[2] * x.shape[3]
    if weight.dim() != 5 or weight.shape[0] != G or weight.shape[2] != C:
        raise ValueError(f"group_conv: weight must be [G, O, C, kh, kw] with G = {G}, C = {C}, got {tuple(weight.shape)}")
    return tuple(weight.shape)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 6-d ``[B, G, C1, C2, H, W]`` operand as the contiguous ``[B, G*C, H, W]`` torch convolves."""
    B, G, C1, C2, H, W = t.shape
    return t.reshape(B, G * C1 * C2, H, W)


def _padded(x: torch.Tensor, pads) -> torch.Tensor:
    t, b, l, r = pads
    return F.pad(_flat(x), (l, r, t, b))


def group_conv_reference(x, weight, out=None, padding=(0, 0), accumulate: bool = False) -> torch.Tensor:
    """Pure-torch reference of :func:`group_conv`."""
    pads = _pads(padding)
    G, O, C, kh, kw = _check_weight(x, weight)
    Ho, Wo = _geometry("group_conv", x, kh, kw, pads)
    if G * C == 0:  # no groups or no channels: nothing to sum (torch's conv2d refuses them)
        z = x.new_zeros(x.shape[0], G, O, Ho, Wo)
    else:
        z = F.conv2d(_padded(x, pads), weight.reshape(G * O, C, kh, kw), None, 1, 0, 1, G)
        z = z.view(x.shape[0], G, O, Ho, Wo)
    if out is None:
        return z.view(x.shape[0], G, 1, O, Ho, Wo)
    _check_out("group_conv", "out", x, out, Ho, Wo)
    z = z.view(out.shape)
    return out.add_(z) if accumulate else out.copy_(z)


def group_conv(x, weight, out=None, padding=(0, 0), accumulate: bool = False) -> torch.Tensor:
    """The grouped stride-1 convolution of ``x [B, G, C1, C2, H, W]`` with ``weight [G, O, C, kh,
    kw]`` (C = C1 * C2), zero ``padding`` ``(ph, pw)`` or ``(top, bottom, left, right)``: written
    into ``out [B, G, O1, O2, H_out, W_out]`` (O = O1 * O2; any strides) when given, or added to it
    with ``accumulate``, and returned (a new ``[B, G, 1, O, H_out, W_out]`` without ``out``). C++
    on CPU tensors, the torch reference elsewhere."""
    if _ext.choose("group_conv", x.device, x.dtype) != "ext":
        return group_conv_reference(x, weight, out, padding, accumulate)
    pads = _pads(padding)
    G, O, C, kh, kw = _check_weight(x, weight)
    Ho, Wo = _geometry("group_conv", x, kh, kw, pads)
    if out is None:
        out, accumulate = x.new_empty(x.shape[0], G, 1, O, Ho, Wo), False
    _check_out("group_conv", "out", x, out, Ho, Wo)
    check_like("group_conv", "x", x, dict(weight=weight, out=out))
    torch.ops.fastcurv.group_conv(x, weight, out, list(pads), accumulate)
    return out


def group_conv_wgrad_reference(x, grad, out, padding=(0, 0), accumulate: bool = False) -> torch.Tensor:
    """Pure-torch reference of :func:`group_conv_wgrad`."""
    pads = _pads(padding)
    G, O1, O2, C1, C2, kh, kw = out.shape
    Ho, Wo = _geometry("group_conv_wgrad", x, kh, kw, pads)
    _check_out("group_conv_wgrad", "grad", x, grad, Ho, Wo)
    if out.numel() == 0:
        return out
    gw = torch.nn.grad.conv2d_weight(_padded(x, pads), (G * O1 * O2, C1 * C2, kh, kw), _flat(grad), 1, 0, 1, G)
    gw = gw.view(out.shape)
    return out.add_(gw) if accumulate else out.copy_(gw)


def group_conv_wgrad(x, grad, out, padding=(0, 0), accumulate: bool = False) -> torch.Tensor:
    """The weight gradient of :func:`group_conv` from ``grad [B, G, O1, O2, H_out, W_out]``, written
    into ``out [G, O1, O2, C1, C2, kh, kw]`` (any strides), or added to it with ``accumulate``,
    and returned. C++ on CPU tensors, the torch reference elsewhere."""
    if _ext.choose("group_conv_wgrad", x.device, x.dtype) != "ext":
        return group_conv_wgrad_reference(x, grad, out, padding, accumulate)
    pads = _pads(padding)
    if out.dim() != 7:
        raise ValueError(f"group_conv_wgrad: out must be 7-d [G, O1, O2, C1, C2, kh, kw], got {tuple(out.shape)}")
    Ho, Wo = _geometry("group_conv_wgrad", x, out.shape[5], out.shape[6], pads)
    _check_out("group_conv_wgrad", "grad", x, grad, Ho, Wo)
    check_like("group_conv_wgrad", "x", x, dict(grad=grad, out=out))
    torch.ops.fastcurv.group_conv_wgrad(x, grad, out, list(pads), accumulate)
    return out


def flipped(weight: torch.Tensor) -> torch.Tensor:
    """``weight [G, O, C, kh, kw]`` as the weight ``[G, C, O, kh, kw]`` whose :func:`group_conv`
    with padding ``(kh - 1 - ph, kw - 1 - pw)`` is the input gradient of a stride-1 convolution
    with padding ``(ph, pw)`` (contiguous)."""
    return weight.transpose(1, 2).flip(3, 4).contiguous()


def narrow(C: int, O: int) -> bool:
    """Whether a group with C input and O output channels runs faster in these kernels than in
    oneDNN's (fewer than ``NARROW_CHANNELS`` of either)."""
    return min(C, O) < NARROW_CHANNELS


def conv_input_grad(grad, weight, out, padding=(0, 0), accumulate: bool = False) -> torch.Tensor:
    """The input gradient ``out [B, G, C1, C2, H, W]`` (written, or added with ``accumulate``) of
    the stride-1 convolution :func:`group_conv` with ``weight [G, O, C, kh, kw]`` and symmetric
    ``padding (ph, pw)``, from ``grad [B, G, O1, O2, H_out, W_out]``: the :func:`group_conv` of
    ``grad`` with the :func:`flipped` weight and padding ``(kh - 1 - ph, kw - 1 - pw)``."""
    kh, kw = weight.shape[3:]
    ph, pw = padding
    if not (0 <= ph < kh and 0 <= pw < kw):
        raise ValueError(f"conv_input_grad: padding must be below the kernel size {(kh, kw)}, got {tuple(padding)}")
    return group_conv(grad, flipped(weight), out, (kh - 1 - ph, kw - 1 - pw), accumulate)
