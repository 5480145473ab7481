"""The interface every HVP backend implements."""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..data import Batches
from ..losses import Loss
from ..replicas import ReplicaSet


# The attribute set on an exception known not to say that torch.func cannot run the model (its
# value says why), so that "auto" does not fall back to autograd on it (see
# :func:`fastcurv.backends.func.torch_func_failed`).
NOT_TORCH_FUNC = "_fastcurv_not_torch_func"


def mark_not_torch_func(exc: BaseException, why: str) -> None:
    """Mark ``exc`` as raised for a reason other than torch.func's transforms (``why``; the first
    mark stays)."""
    if getattr(exc, NOT_TORCH_FUNC, None) is None:
        try:
            setattr(exc, NOT_TORCH_FUNC, why)
        except AttributeError:  # (an exception class with __slots__: it stays unmarked)
            pass


_ATTENTION_LOCK = threading.Lock()
_attention_state = {"users": 0, "fastpath": None, "kernel": None}


@contextlib.contextmanager
def math_attention():
    """Within it, ``F.scaled_dot_product_attention`` runs its math kernel and ``nn.MultiheadAttention``
    / ``nn.TransformerEncoderLayer`` keep off their fused inference fast path. The fused attention
    kernels (flash, memory-efficient) have no double backward and the fast path no backward at all,
    so Hessian products through attention raise torch's "derivative for
    aten::_scaled_dot_product_... is not implemented" without it. :class:`~fastcurv.HessianOperator`
    enters it once per product, gradient or trace call of any backend (about 25 us; models without
    attention run as before). Both settings
    are process-wide, so the contexts of all threads share one reference count: the first to enter
    sets them, the last to leave restores what was there before (a per-thread save and restore let
    a thread that left first switch the fused kernels back on under another's product, and the
    last one then left them off for good). Meanwhile other threads' attention runs the math kernel
    too (the same values, slower)."""
    st = _attention_state
    with _ATTENTION_LOCK:
        if st["users"] == 0:
            st["fastpath"] = torch.backends.mha.get_fastpath_enabled()
            st["kernel"] = sdpa_kernel(SDPBackend.MATH)
            st["kernel"].__enter__()
            torch.backends.mha.set_fastpath_enabled(False)
        st["users"] += 1
    try:
        yield
    finally:
        with _ATTENTION_LOCK:
            st["users"] -= 1
            if st["users"] == 0:
                torch.backends.mha.set_fastpath_enabled(st["fastpath"])
                kernel, st["kernel"] = st["kernel"], None
                kernel.__exit__(None, None, None)


def read_batches(batches: Batches):
    """``iter(batches)``, with every exception raised while reading them marked as a data error
    (:func:`mark_not_torch_func`): the loader's own (a DataLoader worker killed) and fastcurv's
    check that the loader yields the same batches on every pass. What the caller runs on each batch
    is not marked."""
    it = iter(batches)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as exc:
            mark_not_torch_func(exc, "raised while reading the data")
            raise
        yield item


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
