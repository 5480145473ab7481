"""The fused engine's self-check (:meth:`FusedBackend.check_on <.backend.FusedBackend.check_on>`):
its loss and gradient on samples of a batch against the model's own forward and autograd."""
from __future__ import annotations

import copy

import torch

#: The check compares in the model's dtype to within this fraction of the loss and of the largest
#: gradient entry; a wrong graph (an in-place update the tracer missed, a detach) changes the
#: gradient by far more.
CHECK_TOL = {torch.float32: 1e-4, torch.float64: 1e-9}
#: A float32 model that fails that comparison is compared again in float64 (replicas, samples and
#: engine cast), to within this fraction: two correct float32 computations of a loss that nearly
#: cancels (a float32 MSE regression with outputs around 1e4 rounds every residual to about 1e-3)
#: can differ by more than any fixed tolerance, while in float64 they differ by their float32
#: rounding error (relative) times 2e-9. 1e-7 stays clear of that while float32's own gradient keeps
#: any digit (measured: up to 7e-10 for float32 MSE models fitted to float32's resolution of their
#: outputs, without synthetic samples).
FLOAT32_IN_FLOAT64_TOL = 1e-7


class _NoReference(Exception):
    """The model's own forward failed on the engine check's samples (the reason)."""


def _check_samples(x, y, samples: int, synthetic: int):
    """The samples the check runs: all of ``x`` when it has at most ``samples``, else its first 8
    and others evenly spaced through it, ``samples`` in all; then ``synthetic`` random inputs (a
    fixed seed, the samples' mean and standard deviation; floating-point inputs only), with the
    targets of the first samples."""
    N = x.shape[0]
    if N <= samples:
        idx = torch.arange(N)
    else:
        head = min(8, samples)
        idx = torch.cat([torch.arange(head), torch.linspace(head, N - 1, samples - head).round().long()]).unique()
    xs, ys = x[idx.to(x.device)], y[idx.to(y.device)]
    if synthetic > 0 and xs.is_floating_point() and xs.numel() > 0:
        xf = xs.double()
        scale, shift = (float(xf.std()) if xf.numel() > 1 else 0.0), float(xf.mean())
        scale = scale if scale == scale and 0 < scale < float("inf") else 1.0
        shift = shift if abs(shift) < float("inf") else 0.0
        gen = torch.Generator().manual_seed(0)  # not the global generator: the caller's draws stay as they were
        z = torch.randn(synthetic, *x.shape[1:], generator=gen, dtype=torch.float64) * scale + shift
        xs = torch.cat([xs, z.to(device=x.device, dtype=x.dtype)])
        ys = torch.cat([ys, ys[torch.arange(synthetic, device=ys.device) % len(idx)]])
    return xs, ys


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    """``t`` in ``dtype`` if it holds floating-point numbers (labels and counters stay as they are)."""
    return t.to(dtype) if t.is_floating_point() else t


def _rows_in(replicas, rows: list[int], dtype):
    """Replicas ``rows`` of ``replicas``, their floating-point parameters and buffers in ``dtype``:
    a copy of the set (watching no models), for an engine of its own."""
    rs = copy.copy(replicas)  # (ReplicaSet.__getstate__: the copy drops the watched models and caches)
    rs.params = {n: _cast(t[rows], dtype) for n, t in replicas.params.items()}
    rs.buffers = {n: _cast(t[rows], dtype) for n, t in replicas.buffers.items()}
    rs.R, rs.dtype, rs.finite = len(rows), dtype, replicas.finite[rows]
    return rs


def _model_loss_and_gradient(replicas, one, r: int, xs, ys, dtype):
    """The model's own loss and flat gradient (torch.func over its forward) of replica ``r`` on
    ``(xs, ys)``, computed in ``dtype``."""
    params = {k: _cast(t[r], dtype) for k, t in replicas.params.items()}
    buffers = {k: _cast(t[r], dtype) for k, t in replicas.buffers.items()}
    xs, ys = _cast(xs, dtype), _cast(ys, dtype)
    try:
        grad, value = torch.func.grad_and_value(lambda p: one.batch_loss(replicas.call(p, buffers, xs), ys))(params)
    except RuntimeError as exc:  # e.g. a model that groups samples runs on some batch sizes only
        raise _NoReference(f"the model's own forward fails on {tuple(xs.shape)} samples the engine check "
                           f"takes in {dtype} ({str(exc)[:200]}): it may mix samples") from exc
    return value, torch.cat([grad[k].flatten() for k in replicas.names])


def _engine_loss_and_gradient(engine_replicas, idx, one, xs, ys, dtype):
    """The engine's loss ``[Ra]`` and gradients of replicas ``idx`` (None: all) of
    ``engine_replicas`` on ``(xs, ys)`` in ``dtype``."""
    from ...data import Batches
    from .backend import FusedBackend

    engine = FusedBackend(engine_replicas, one, Batches((xs, ys), device=xs.device, dtype=dtype, cache=True))
    return engine.loss_and_gradient(idx)


#: what the engine raises on a model it cannot run (shapes, unsupported inputs)
_ENGINE_ERRORS = (RuntimeError, ValueError, IndexError, KeyError, TypeError)


def _disagreement(refs: dict, got, grads, dtype, tol: float) -> str:
    """Why the engine's loss ``got`` and gradients ``grads`` (rows in ``sorted(refs)`` order) differ
    from ``refs`` (replica -> the model's own loss and flat gradient) by more than ``tol`` of the
    loss and of the largest gradient entry, or "" where they agree."""
    for i, r in enumerate(sorted(refs)):
        want, flat = refs[r]
        mine = torch.cat([g[i].flatten() for g in grads])
        scale = float(flat.abs().max())
        if not (torch.allclose(got[i], want, rtol=tol, atol=tol * float(want.abs()))
                and torch.allclose(mine, flat, rtol=tol, atol=tol * scale)):
            gap = float((mine - flat).abs().max())
            return (f"the fused engine's loss or gradient differs from the model's own (replica {r}, in {dtype}: "
                    f"loss {float(got[i]):.10g} against {float(want):.10g}, gradients up to {gap:.3g} apart, "
                    f"{gap / scale if scale > 0 else float('inf'):.2g} of the largest entry): its forward() may "
                    "update in place a tensor that another operation reads, which torch.fx records as an "
                    "out-of-place operation, or compute part of its output without a gradient (torch.no_grad, detach)")
    return ""


def check_engine(replicas, loss, x, y, samples: int = 32, synthetic: int = 2) -> tuple[bool, str]:
    """:meth:`FusedBackend.check_on <.backend.FusedBackend.check_on>`: ``(ok, reason)``. The engine
    runs in the model's dtype, as it will run (:data:`CHECK_TOL`); a float32 model it disagrees with
    is compared again in float64 (:data:`FLOAT32_IN_FLOAT64_TOL`), which tells float32's rounding of
    a nearly cancelling loss from a wrong graph."""
    from ...losses import Loss
    from .backend import FusedBackend

    tol = CHECK_TOL.get(replicas.dtype)
    if tol is None:  # (the engine's own check, which the caller has usually run already)
        return False, FusedBackend.supports(replicas, loss)[1]
    if not bool(replicas.finite.any()):
        return True, ""  # nothing to compare: every replica's results will be NaN
    xs, ys = _check_samples(x, y, samples, synthetic)
    n = xs.shape[0]
    one = Loss(loss.kind, loss.reduction, loss.loss_reduction)  # (supports() took cross-entropy or MSE only)
    one.num_samples = n

    # the model's own loss and gradient for the first and the last replica where they are finite (a
    # replica with finite weights may still overflow: there is nothing to compare on it)
    seen = {}

    def reference(r):
        if r not in seen:
            want, flat = _model_loss_and_gradient(replicas, one, r, xs, ys, replicas.dtype)
            seen[r] = (want, flat) if bool(torch.isfinite(want)) and bool(torch.isfinite(flat).all()) else None
        return seen[r]

    finite = replicas.finite.nonzero().flatten().tolist()
    refs = {}
    try:
        for order in (finite, finite[::-1]):
            r = next((r for r in order if reference(r) is not None), None)
            if r is not None:
                refs[r] = seen[r]
    except _NoReference as exc:
        return False, str(exc)
    if not refs:  # (this passed unchecked before: an engine nothing had compared ran, or crashed)
        return False, (f"every replica's loss or gradient overflows (Inf or NaN) on the {n} samples of the engine "
                       "check, so the engine could not be compared with the model's own forward and autograd")
    rows = sorted(refs)
    try:
        got, grads = _engine_loss_and_gradient(replicas, torch.tensor(rows, device=x.device), one, xs, ys, replicas.dtype)
    except _ENGINE_ERRORS as exc:
        return False, (f"the fused engine cannot run this model on inputs {tuple(xs.shape)} "
                       f"({type(exc).__name__}: {str(exc)[:300]})")
    why = _disagreement(refs, got, grads, replicas.dtype, tol)
    if not why or replicas.dtype != torch.float32:
        return not why, why
    wide = torch.float64
    try:
        refs = {r: _model_loss_and_gradient(replicas, one, r, xs, ys, wide) for r in rows}
        got, grads = _engine_loss_and_gradient(_rows_in(replicas, rows, wide), None, one, xs, ys, wide)
    except (_NoReference, *_ENGINE_ERRORS):
        return False, why  # (the model or the engine runs in float32 only: the float32 comparison stands)
    why = _disagreement(refs, got, grads, wide, FLOAT32_IN_FLOAT64_TOL)
    return not why, why
