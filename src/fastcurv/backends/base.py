"""The interface every HVP backend implements."""
from __future__ import annotations

import torch

from ..data import Batches
from ..losses import Loss
from ..replicas import ReplicaSet


class Backend:
    """Computes full-data Hessian-vector products for replicas of one architecture.

    Subclasses implement :meth:`matvec`. ``idx`` selects the active replicas (None: all), and the
    tangents and results are per-parameter tensors ``[Ra, K, *shape]`` in ``replicas.names`` order.
    """

    name = "base"
    #: probes per matvec the trace estimators use by default on the CPU (see
    #: :func:`fastcurv.solvers.trace.probes_per_matvec`)
    cpu_probe_batch = 1

    def __init__(self, replicas: ReplicaSet, loss: Loss, batches: Batches, **options):
        self.replicas, self.loss, self.batches = replicas, loss, batches
        if options:
            raise TypeError(f"backend {self.name!r} got unknown options {sorted(options)}")

    def matvec(self, vecs: list[torch.Tensor], idx: torch.Tensor | None) -> list[torch.Tensor]:
        raise NotImplementedError

    def clear_cache(self) -> None:
        """Drop anything kept between matvecs."""
