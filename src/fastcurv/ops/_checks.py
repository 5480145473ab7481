"""Input checks shared by the op wrappers and their references (messages name the op and operand)."""
from __future__ import annotations

import torch


def check_shapes(op: str, operands) -> None:
    """``operands``: ``(name, tensor or None, shape)``; raises ValueError for a given tensor of another shape."""
    for name, t, want in operands:
        if t is not None and t.shape != tuple(want):
            raise ValueError(f"{op}: {name} must be {list(want)}, got {tuple(t.shape)}")


def check_like(op: str, ref_name: str, ref: torch.Tensor, operands: dict) -> None:
    """Every given operand (name -> tensor or None) has the dtype (TypeError) and device (ValueError) of ``ref``."""
    for name, t in operands.items():
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: dtype mismatch, {name} is {t.dtype} but {ref_name} is {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
