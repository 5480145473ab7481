"""Comparisons of a tensor's state: its version counter, its values (NaN equal to NaN), its bytes
(one ``memcmp``), and whether its storage still holds it. The run checks (:mod:`fastcurv.model_run`)
and the ReplicaSet's guard against changed models (``ReplicaSet.changed_since_built``) use them.
"""
from __future__ import annotations

import ctypes
import sys

import torch
from torch import nn


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter, None for an inference tensor (made under ``torch.inference_mode``,
    which has none)."""
    return None if t.is_inference() else t._version


def _load_memcmp():
    """The C library's ``memcmp`` through ctypes, or None where it cannot be loaded."""
    try:
        fn = (ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.CDLL(None)).memcmp
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    return fn


_MEMCMP = _load_memcmp()


_PLAIN = (torch.Tensor, nn.Parameter)  # (no subclass whose data_ptr() might not be its values)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` (a model's tensor, on any device) holds the bytes of the CPU tensor ``b``: one
    ``memcmp`` for plain contiguous tensors (it runs before every product: 3-4x faster than
    ``torch.equal``, whose loop over the elements handles NaN), ``torch.equal`` for the others;
    ``a`` on another device is copied over first. False may still be equal values (NaN, -0.0 and
    0.0): the caller confirms by value."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device != b.device:
        a = a.to(b.device)
    if _MEMCMP is not None and type(a) in _PLAIN and type(b) in _PLAIN and a.is_contiguous() and b.is_contiguous():
        return a.numel() == 0 or _MEMCMP(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0
    return torch.equal(a, b)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values, NaN equal to NaN (True on the meta device, which
    holds none)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if "meta" in (a.device.type, b.device.type):
        return True
    with torch.no_grad():
        return torch.equal(a, b) or ((a.is_floating_point() or a.is_complex())
                                     and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))


def _in_storage(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` lies inside its storage: False for a tensor whose storage was
    freed or shrunk under it (``untyped_storage().resize_(0)``, as FSDP does), which reading (a value
    comparison, even ``torch.equal``) would crash the process on."""
    if t.numel() == 0 or t.device.type == "meta" or t.layout != torch.strided:
        return True
    last = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.untyped_storage().nbytes() >= (last + 1) * t.element_size()
