"""Registry of sharpness measures computed by :func:`fastcurv.batched_sharpness` beyond the
built-in Hessian ones. A measure is a function ``fn(op, *, seed, common, **options)`` taking a
:class:`fastcurv.HessianOperator` and returning ``{column: MeasureValue}``."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

REGISTRY: dict[str, object] = {}


@dataclass
class MeasureValue:
    """One column of results: ``value`` ``[R]``, optional ``stderr`` ``[R]`` and ``converged`` ``[R]``."""

    value: torch.Tensor
    stderr: torch.Tensor | None = None
    converged: torch.Tensor | None = None


def register_measure(name: str):
    """Decorator registering ``fn`` as measure ``name`` for ``batched_sharpness(measures=...)``."""

    def deco(fn):
        REGISTRY[name] = fn
        return fn

    return deco


def load_all() -> dict:
    """Import every measure module so that it registers itself; returns the registry."""
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY
