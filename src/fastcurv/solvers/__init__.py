"""Krylov and stochastic solvers batched over replicas, with per-replica convergence.

All take a :class:`fastcurv.HessianOperator` (anything with ``matvec(V, idx)``, ``R``, ``P``,
``dtype``, ``device`` and a ``failed`` mask) and return results holding ``[R]`` tensors.
``matvec`` must return a new tensor: the solvers update its result in place. ``seed`` takes any
integer, numpy's too (:func:`probes.as_seed`). Each runs with grad mode on and inference mode and
autocast off, whatever the caller's settings, which it leaves as they were
(:mod:`fastcurv.ambient`): the operator's products in the models' dtype, the tridiagonals in float64.
"""
from .lanczos import EigenResult, lanczos
from .power import power_iteration
from .probes import probe_vectors
from .slq import SpectralDensity, slq
from .trace import TraceResult, hutchinson, hutchpp

__all__ = [
    "EigenResult",
    "lanczos",
    "power_iteration",
    "probe_vectors",
    "SpectralDensity",
    "slq",
    "TraceResult",
    "hutchinson",
    "hutchpp",
]
