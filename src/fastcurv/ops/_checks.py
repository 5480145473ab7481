"""Input checks shared by the op wrappers and their references (messages name the op and operand), the
layout test the wrappers use to pass a tensor to a kernel as it is, and how they write a result into
a given ``out``."""
from __future__ import annotations

import torch


def check_shapes(op: str, operands) -> None:
    """``operands``: ``(name, tensor or None, shape)``; raises ValueError for a given tensor of another shape."""
    for name, t, want in operands:
        if t is not None and t.shape != tuple(want):
            raise ValueError(f"{op}: {name} must be {list(want)}, got {tuple(t.shape)}")


def check_mask(mask, shape) -> None:
    """``mask`` is None or a bool tensor of ``shape`` (the shape of the tensor it selects from)."""
    if mask is not None and (mask.dtype != torch.bool or mask.shape != shape):
        raise ValueError(f"mask must be a bool tensor of x's shape {tuple(shape)}, got {mask.dtype} {tuple(mask.shape)}")


def inner_contiguous(t: torch.Tensor, inner: int) -> bool:
    """Whether the last ``inner`` dimensions of ``t`` are contiguous (the leading ones any stride), as
    the kernels that take a free replica (and probe) stride read them. Size-1 dimensions' strides do
    not matter, nor does any stride of an empty tensor."""
    if t.numel() == 0:
        return True
    expect = 1
    for size, stride in zip(reversed(t.shape[-inner:]), reversed(t.stride()[-inner:])):
        if size > 1 and stride != expect:
            return False
        expect *= size
    return True


def contiguous_inner(t: torch.Tensor, inner: int) -> torch.Tensor:
    """``t``, or a copy when its last ``inner`` dimensions are not contiguous."""
    return t if inner_contiguous(t, inner) else t.contiguous()


def check_like(op: str, ref_name: str, ref: torch.Tensor, operands: dict) -> None:
    """Every given operand (name -> tensor or None) has the dtype (TypeError) and device (ValueError) of ``ref``."""
    for name, t in operands.items():
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: dtype mismatch, {name} is {t.dtype} but {ref_name} is {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of ``a`` and ``b`` (from their first to their last element) overlap."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False

    def span(t):
        last = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def store(out: torch.Tensor | None, value: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """``value`` written into ``out`` (added with ``accumulate``) and returned; ``value`` itself when
    ``out`` is None."""
    if out is None:
        return value
    return out.add_(value) if accumulate else out.copy_(value)
