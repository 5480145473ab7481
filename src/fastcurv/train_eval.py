"""Scoring trained populations: :func:`evaluate_population`, each replica's loss and accuracy on a
data set (tensors, one batch or a loader), all replicas in one pass per batch.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from .ambient import outside_inference, resetting_ambient
from .losses import as_labels, canonical_name
from .replicas import ReplicaSet, check_output
from .train_engine import model_cannot_run, summed_losses
from .train_options import _check_targets


@resetting_ambient  # inference mode and autocast off (see fastcurv.ambient); no graph below
@torch.no_grad()
def evaluate_population(models: Sequence[nn.Module], x, y: torch.Tensor | None = None, *, batch_size: int = 2048,
                        loss: str = "cross_entropy") -> dict:
    """Per-replica loss and (for cross-entropy) accuracy on ``(x, y)`` tensors, on one batch given
    as ``x`` alone (``(inputs, targets)`` or ``[inputs, targets]``), or on a loader (an iterable of
    ``(inputs, targets)`` batches, e.g. a ``DataLoader``) given as ``x`` alone; all replicas in one
    pass per batch. MSE targets must be shaped like the outputs (as for training and the operators).
    ``loss``: "cross_entropy" (integer labels) or "mse", by name (no callable loss); the
    cross-entropy is :func:`fastcurv.losses.cross_entropy_losses`', the operators', which keeps the
    digits of confident samples where torch's ``F.cross_entropy`` loses them. The per-sample losses
    are summed in float64 (:func:`~fastcurv.train_engine.summed_losses`), as for training's full
    training-set loss (``eval_train``, ``target_loss``), which this matches as far as the outputs
    agree. For models without batch statistics in eval mode:

    - float64 models: to float64 rounding, whatever ``batch_size`` (measured: at most 4e-16 relative).
    - float32 models: the outputs round otherwise where the products differ (training's fused MLP
      engine runs one product per replica, this the vmapped :class:`~fastcurv.replicas.ReplicaSet`;
      a product of another ``batch_size`` may round otherwise too), so the mean losses differ by
      float32 rounding averaged over the samples (measured 1e-10 to 2e-9 relative on MLPs);
      identical on the vmap engine (``fused=False``) with training's ``batch_size``.

    Models normalizing by batch statistics in eval mode (BatchNorm with
    ``track_running_stats=False``), in any dtype, normalize each chunk of ``batch_size`` samples by
    itself: the loss depends on ``batch_size`` (5e-3 off at the default 2048 for an MLP trained with
    batches of 100) and is training's only with training's ``batch_size`` (training's full loss
    takes chunks of its minibatch size, in data order).

    A ValueError "the model cannot run on the first batch (inputs shape, dtype): ..." for inputs the
    model cannot take (a wrong width, uint8 token ids), as training's check.

    Returns ``{"loss": [R] float64, "accuracy": [R] float64 (fraction in [0, 1])}`` (NaN rows for
    replicas with non-finite parameters, and, with a warning naming them, for replicas whose outputs
    are not finite on some input).

    Called inside ``torch.inference_mode()`` or ``torch.autocast(...)``, and on data made under
    inference mode, the same numbers as outside (the models' own dtype; :mod:`fastcurv.ambient`).
    """
    from .data import _split, is_single_batch

    rs = ReplicaSet(models)  # validates the list; eval mode whatever the models' own modes
    R = rs.R
    if isinstance(x, torch.Tensor):
        if y is None or len(x) == 0 or len(y) != len(x):
            raise ValueError(f"evaluate_population needs a non-empty data set with one target per input; got inputs "
                             f"{tuple(x.shape)} and targets {None if y is None else tuple(y.shape)}")
        batches = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size))
    elif y is not None:
        raise TypeError(f"evaluate_population takes (x, y) tensors or a loader alone; got a {type(x).__name__} and targets")
    elif is_single_batch(x):  # one (x, y) pair, a tuple or a list, as the other entry points take it
        return evaluate_population(models, x[0], x[1], batch_size=batch_size, loss=loss)
    else:
        batches = (_split(item, i) for i, item in enumerate(x))
    loss = canonical_name(loss, callable_ok=False)
    tot_loss = torch.zeros(R, dtype=torch.float64)
    correct = torch.zeros(R, dtype=torch.float64)
    bad_out = torch.zeros(R, dtype=torch.bool)
    N = 0
    for xb, yb in batches:
        if len(xb) == 0:
            continue
        yb = as_labels(yb)
        if xb.is_floating_point() and not bool(torch.isfinite(xb).all()):
            raise ValueError("the inputs contain NaN or Inf")
        if yb.is_floating_point() and not bool(torch.isfinite(yb).all()):
            raise ValueError("the targets contain NaN or Inf")
        # (data made under torch.inference_mode: a copy, as the operators take it)
        xb = outside_inference(xb.to(rs.device, rs.dtype if xb.is_floating_point() else xb.dtype))
        yb = outside_inference(yb.to(rs.device))
        try:
            if N == 0:  # one replica on copies of the first samples and of its buffers: a model that writes
                rs.checked_call(xb[:8])  # into its input or buffers (ValueError) would shift the caller's data
            out = rs.forward(xb)
        except (RuntimeError, IndexError) as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            if "randomness" in str(exc):  # (torch's vmap error names flags the caller cannot set)
                raise ValueError("the model draws random numbers in eval mode (e.g. F.dropout(..., training=True)): "
                                 "evaluate_population needs a deterministic eval-mode forward") from exc
            # inputs the model cannot take (a wrong width, uint8 token ids): vmap's raw message names neither
            where = "the first batch" if N == 0 else f"the batch starting at sample {N}"
            raise model_cannot_run(where, xb, exc) from exc
        check_output(out)
        _check_targets(loss, yb, out[0])
        bad_out |= ~torch.isfinite(out.reshape(R, -1)).all(1).cpu()
        tot_loss += summed_losses(loss, out, yb.unsqueeze(0).expand(R, *yb.shape)).cpu()
        if loss == "cross_entropy":
            correct += (out.argmax(-1) == yb).double().sum(1).cpu()
        N += len(xb)
    if N == 0:
        raise ValueError("evaluate_population needs a non-empty data set: the loader yielded no samples")
    failed = bad_out & rs.finite.cpu()
    if bool(failed.any()):
        warnings.warn(f"replicas {failed.nonzero().flatten().tolist()} have finite parameters but non-finite outputs "
                      "(NaN or Inf): their loss and accuracy are NaN", RuntimeWarning,
                      stacklevel=4)  # (past the decorators' wrappers: the caller's line)
    res = {"loss": (tot_loss / N).masked_fill(bad_out, float("nan"))}
    if loss == "cross_entropy":
        acc = correct / N
        acc[~rs.finite.cpu() | bad_out] = float("nan")
        res["accuracy"] = acc
    return res
