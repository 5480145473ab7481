"""Triton kernels for the fastcurv ops (GPU; on the CPU under ``TRITON_INTERPRET=1``).

One module per op family; each registers its public functions in :data:`OPS` by calling
:func:`register`. Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on
CPU tensors (the tests do this in ``tests/conftest.py``).
"""
from __future__ import annotations

import importlib
import os

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # triton is an optional dependency
    HAVE_TRITON = False

OPS: dict[str, object] = {}
_MODULES = ("elementwise", "agreement", "linear_rop", "batchnorm")


def register(name: str):
    """Decorator: make ``fn`` the Triton implementation of op ``name``."""

    def deco(fn):
        OPS[name] = fn
        return fn

    return deco


def _load_all() -> None:
    if not HAVE_TRITON:
        return
    for mod in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


_load_all()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """Triton is installed and can launch kernels (a CUDA device, or the interpreter)."""
    if not HAVE_TRITON:
        return False
    import torch

    return torch.cuda.is_available() or interpreting()


def supports(op: str) -> bool:
    """Whether a Triton implementation of ``op`` exists."""
    return op in OPS


def __getattr__(name):
    if name in OPS:
        return OPS[name]
    raise AttributeError(name)
