"""Shared helpers of the measure modules: losses, gradients and accuracies of R replicas at
arbitrary (perturbed) flat parameters ``[R, P]``, all batched over the replica axis: the
gradient-free forwards (:func:`outputs_at`, :func:`loss_at`, :func:`accuracy_at`) through
:meth:`fastcurv.ReplicaSet.forward_with` (a sparse first layer on MNIST-like inputs), the
gradients by ``vmap(grad(...))``.

Conventions: ``theta`` is ``[Ra, P]`` in :class:`fastcurv.ReplicaSet` flat order; ``idx`` selects
the replicas the rows belong to (None: all R, in order). Losses are the operator's full-data loss
(``op.loss``: mean over every sample by default) or, with ``batch=i``, batch i's *share* of it, so
the shares of all batches sum to the full-data loss. Results are float64 CPU tensors ``[Ra]``.

The forwards and gradients run vmapped over the replicas (:func:`fastcurv.model_run.vmap_replicas`):
a model vmap cannot batch (``nn.LSTM``, ``nn.GRU``: no batching rule for their kernels) raises its
:class:`~fastcurv.model_run.VmapUnsupportedError` naming the module; such models have only the
Hessian operator's ``backend="autograd"``.

Half precision: every measure that evaluates the loss at perturbed weights first takes
:func:`working_precision` of its operator, so that float16/bfloat16 models are perturbed and
evaluated in float32 (see there).
"""
from __future__ import annotations

import torch
from torch.func import grad, vmap

from ..data import target_dtype
from . import MeasureValue


def working_precision(op):
    """``op`` itself for float32 and float64 models; for float16/bfloat16 ones a :class:`Widened`
    view of it in float32 (:func:`~fastcurv.data.target_dtype`): the parameters, the floating
    buffers, inputs and targets converted (exactly), so that the perturbation, the forwards and the
    loss's sums run in float32. In the model's own dtype a perturbation below its rounding unit
    (6.6e-4 against bfloat16's 2e-3 at |theta| = 0.3) left the weights unchanged, and a loss
    increase was a difference of two half-precision losses near 1 (one unit: 7.8e-3 in bfloat16):
    the measures returned 0 or one rounding unit. The view is idempotent (a view is returned as is)."""
    wide = target_dtype(op.dtype)
    return op if wide == op.dtype else Widened(op, wide)


class Widened:
    """The part of an operator the perturbation measures read (replicas, batches, loss, failed, R, P,
    dtype, device, num_samples), in floating dtype ``dtype``: a copy of the replica set with its
    parameters and floating buffers converted, and the batches' floating inputs and targets converted
    as they are read (once, and kept while the view lives, when the operator caches its batches).
    No Hessian products: the measures that need them use the operator itself. Memory: the replicas'
    parameters (and the cached batches) once more in ``dtype``."""

    def __init__(self, op, dtype: torch.dtype):
        self.source, self.loss, self.failed = op, op.loss, op.failed
        self.replicas = op.replicas.in_dtype(dtype)
        self.batches = _WidenedBatches(op.batches, dtype)

    R = property(lambda self: self.replicas.R)
    P = property(lambda self: self.replicas.P)
    dtype = property(lambda self: self.replicas.dtype)
    device = property(lambda self: self.replicas.device)
    num_samples = property(lambda self: self.batches.num_samples)


class _WidenedBatches:
    """``(index, inputs, targets)`` of ``batches`` with floating inputs and targets in ``dtype``."""

    def __init__(self, batches, dtype: torch.dtype):
        self.source, self.dtype, self.num_samples = batches, dtype, batches.num_samples
        # a cached source is converted once: the measures read the batches hundreds of times, and the sparse
        # forward keeps its CSR form of an input only while that tensor lives
        self._cache = list(self._convert(batches)) if getattr(batches, "cache", None) is not None else None

    def _convert(self, batches):
        for i, x, y in batches:
            yield (i, x.to(self.dtype) if x.is_floating_point() else x,
                   y.to(self.dtype) if y.is_floating_point() else y)

    def __iter__(self):
        return iter(self._cache) if self._cache is not None else self._convert(self.source)

    def __len__(self):
        return len(self.source)


def _as_dict(rs, flat: torch.Tensor) -> dict:
    return dict(zip(rs.names, rs.unflatten(flat)))


def _buffers(rs, idx, buffers):
    if buffers is not None:
        return buffers
    return rs.subset(None if idx is None else idx.to(rs.device))[1]


def _batches(op, batch):
    for i, x, y in op.batches:
        if batch is None or i == batch:
            yield i, x, y


def loss_at(op, theta: torch.Tensor, idx: torch.Tensor | None = None, *, batch: int | None = None,
            buffers: dict | None = None, output_map=None) -> torch.Tensor:
    """Full-data loss (or batch ``batch``'s share) ``[Ra]`` at parameters ``theta`` ``[Ra, P]``.

    ``output_map`` (optional) transforms one replica's outputs ``[n, ...]`` before the loss (e.g.
    logit normalization). The outputs come from :func:`outputs_at` (the sparse first layer where it
    applies), the loss is then vmapped over the replicas.
    """
    rs, loss = op.replicas, op.loss
    bufs = _buffers(rs, idx, buffers)
    total = torch.zeros(theta.shape[0], dtype=rs.dtype, device=rs.device)

    def one(out, y):
        if output_map is not None:
            out = output_map(out)
        return loss.batch_loss(out, y)

    with torch.no_grad():
        for _, x, y in _batches(op, batch):
            total += vmap(one, in_dims=(0, None))(outputs_at(op, theta, x, buffers=bufs), y)
    return total.to(torch.float64).cpu()


def loss_grad_at(op, theta: torch.Tensor, idx: torch.Tensor | None = None, *, batch: int | None = None,
                 output_map=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss ``[Ra]`` (float64, CPU) and gradient ``[Ra, P]`` (``theta``'s dtype and device) at ``theta``."""
    rs, loss = op.replicas, op.loss
    bufs = _buffers(rs, idx, None)
    total = torch.zeros(theta.shape[0], dtype=rs.dtype, device=rs.device)
    g_total = torch.zeros_like(theta)
    for _, x, y in _batches(op, batch):
        def one(t, b, xr):
            out = rs.call(_as_dict(rs, t), b, xr)
            if output_map is not None:
                out = output_map(out)
            value = loss.batch_loss(out, y)
            return value, value

        # (x shared by the replicas, or batched for a model that fills a tensor allocated from it: ReplicaSet.vmapped)
        g, value = rs.vmapped(grad(one, has_aux=True), theta, bufs, x)
        total += value.detach()
        g_total += g.detach()
    return total.to(torch.float64).cpu(), g_total


def outputs_at(op, theta: torch.Tensor, x: torch.Tensor, idx: torch.Tensor | None = None,
               buffers: dict | None = None) -> torch.Tensor:
    """Model outputs ``[Ra, n, ...]`` at parameters ``theta`` on inputs ``x`` (no gradient).

    Runs :meth:`fastcurv.ReplicaSet.forward_with`: plain MLP chains on sparse CPU inputs (MNIST)
    compute their first layer from the nonzero inputs only (several times faster than the dense
    product); everything else runs ``vmap`` over ``functional_call``. Same outputs up to float rounding.
    """
    rs = op.replicas
    bufs = _buffers(rs, idx, buffers)
    with torch.no_grad():
        return rs.forward_with(_as_dict(rs, theta), bufs, x)


def accuracy_at(op, theta: torch.Tensor, idx: torch.Tensor | None = None, buffers: dict | None = None) -> torch.Tensor:
    """Fraction ``[Ra]`` (float64, CPU) of the operator's samples whose argmax output equals the label."""
    if op.loss.kind != "cross_entropy":
        raise ValueError(f"accuracy-based measures need a classification loss, the named loss='cross_entropy'; got "
                         f"{op.loss.kind!r}{op.loss.named_hint()}")
    correct = torch.zeros(theta.shape[0], dtype=torch.float64)
    for _, x, y in op.batches:
        if y.is_floating_point():
            raise ValueError("accuracy-based measures need integer class labels, got soft (floating point) targets")
        out = outputs_at(op, theta, x, idx, buffers)
        correct += (out.argmax(-1) == y).sum(-1).to(torch.float64).cpu()
    return correct / op.num_samples


def normalize_logits(z: torch.Tensor) -> torch.Tensor:
    """Andriushchenko et al.'s logit normalization of one replica's outputs ``[n, C, ...]``: centre,
    then divide by ``max(||z||_2, 1e-10)``, over the classes, dim 1 (torch's and the cross-entropy's
    class axis: per sample for ``[n, C]``, per position for ``[n, C, H, W]``)."""
    if z.dim() < 2:
        raise ValueError(f"normalize_logits needs outputs [n, C, ...] (classes in dim 1), got shape {tuple(z.shape)}")
    z = z - z.mean(1, keepdim=True)
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-10)


def noise(op, shape_rows: int, *, generator: torch.Generator, common: bool, kind: str = "gaussian") -> torch.Tensor:
    """``[R, P]`` noise drawn on the CPU in float64 (same draw on every device); ``common`` gives
    every replica the same draw. kind: "gaussian" (N(0,1)), "uniform" (U[-1,1]) or "rademacher"."""
    R, P = shape_rows, op.P
    rows = 1 if common else R
    if kind == "gaussian":
        z = torch.randn(rows, P, generator=generator, dtype=torch.float64)
    elif kind == "uniform":
        z = torch.rand(rows, P, generator=generator, dtype=torch.float64) * 2 - 1
    elif kind == "rademacher":
        z = torch.randint(0, 2, (rows, P), generator=generator).to(torch.float64) * 2 - 1
    else:
        raise ValueError(f"unknown noise kind {kind!r}")
    return z.to(op.device, op.dtype).expand(R, P).clone()


def finish(op, value: torch.Tensor, *, stderr=None, converged=None) -> MeasureValue:
    """Wrap a result: float64 CPU, NaN for failed replicas or non-finite values (then not converged).
    ``converged`` only for measures with a convergence test (a search's bracket, a solver's
    residual): the others have no convergence entry, rather than one that is always True."""
    value = value.to(torch.float64).cpu().clone()
    bad = op.failed.cpu() | ~torch.isfinite(value)
    value[bad] = float("nan")
    conv = None if converged is None else converged.cpu().bool().clone() & ~bad
    if stderr is not None:
        stderr = stderr.to(torch.float64).cpu().clone()
        stderr[bad] = float("nan")
    return MeasureValue(value, stderr, conv)


def check_options(name: str, options: dict, allowed: tuple) -> None:
    """Raise a clear error for an unknown option of measure ``name``."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"measure {name!r} got unknown options {unknown}; it accepts {sorted(allowed)}")


def positive(name: str, **values) -> None:
    for k, v in values.items():
        if not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"{name}: {k} must be a positive number, got {v!r}")
