"""Hessian-vector product backends. Each computes, for the active replicas and K probes,
the full-data Hessian applied to per-parameter tangents ``[Ra, K, *shape]``.

* ``autograd``: the oracle; per-replica double backward, graph rebuilt for every matvec.
* ``func``: vmapped over replicas; each batch's double-backward graph (or, with ``compile=True``, its torch.func
  linearization) built once and reused.
* ``fused``: fastcurv's R-op engine with compact per-batch caches (supported layer graphs only).
"""
from .autograd import AutogradBackend
from .base import Backend
from .func import FuncBackend
from .fused import FusedBackend

BACKENDS = {"autograd": AutogradBackend, "func": FuncBackend, "fused": FusedBackend}

__all__ = ["Backend", "AutogradBackend", "FuncBackend", "FusedBackend", "BACKENDS"]
