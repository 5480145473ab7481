"""Loss functions and exact sample-count weighting over a whole data set.

Conventions (documented in the README):
* ``"cross_entropy"``: softmax cross-entropy on logits ``[N, C]`` with integer labels ``[N]`` or
  class probabilities ``[N, C]`` (soft targets, as torch's ``cross_entropy`` takes them).
* ``"mse"``: squared error, torch's ``MSELoss`` convention: ``mean`` divides by the number of
  output *entries* (N x outputs per sample), ``sum`` sums them.
* a callable ``loss(outputs, targets) -> scalar``: its own reduction over the batch is given by
  ``loss_reduction`` ("mean" over samples, the default, as torch's losses do; or "sum").

The full-data loss is L = (1/N) * sum_i l_i for ``reduction="mean"`` (N = all samples of the
loader, so a ragged last batch is weighted exactly) and sum_i l_i for ``reduction="sum"``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum")
LOSS_NAMES = ("cross_entropy", "mse")
# other spellings of the names (after lower-casing and "-" -> "_")
_ALIASES = {"ce": "cross_entropy", "crossentropy": "cross_entropy"}


def canonical_name(name: str, *, callable_ok: bool = True) -> str:
    """The loss name ``name`` in its one canonical spelling, one of ``LOSS_NAMES`` ("MSE" -> "mse",
    "ce", "cross-entropy" or "CrossEntropy" -> "cross_entropy"): every entry point and the resume
    fingerprints read names through this, so they take the same spellings and count them as the
    same loss. A ValueError for any other name; its message offers a callable loss only with
    ``callable_ok`` (the entry points that take one: the operators and sharpness functions, not
    training and :func:`~fastcurv.train.evaluate_population`)."""
    key = name.lower().replace("-", "_") if isinstance(name, str) else None
    key = _ALIASES.get(key, key)
    if key not in LOSS_NAMES:
        if callable_ok:
            raise ValueError(f"unknown loss {name!r}: use 'cross_entropy', 'mse' or a callable(outputs, targets)")
        what = "a callable loss is not supported here" if callable(name) else f"unknown loss {name!r}"
        raise ValueError(f"{what}: use 'cross_entropy' or 'mse'")
    return key


def label_out_of_range(y: torch.Tensor, num_classes: int) -> int | None:
    """A label of the integer labels ``y`` outside ``[0, num_classes)`` (the smallest if one is
    negative, else the largest), or None."""
    if y.numel() == 0:
        return None
    lo, hi = int(y.min()), int(y.max())
    return lo if lo < 0 else hi if hi >= num_classes else None


def as_labels(y: torch.Tensor) -> torch.Tensor:
    """Integer (or bool: binary) targets as int64 (MNIST's raw labels are uint8; torch's gathers take
    int64 only)."""
    return y.long() if not y.is_floating_point() and y.dtype != torch.int64 else y


def _pivoted_softmax(logits: torch.Tensor):
    """``(m, zm, e, rest)`` for logits ``[..., C]``: ``m`` the most probable class ``[..., 1]``, ``zm``
    its logit, ``e = exp(z - z_m)`` with 0 at ``m`` and ``rest = sum(e)`` ``[..., 1]``."""
    m = logits.detach().argmax(-1, keepdim=True)
    zm = logits.gather(-1, m)
    e = torch.exp(logits - zm).scatter(-1, m, 0.0)
    return m, zm, e, e.sum(-1, keepdim=True)


def _losses(logits, targets, m, zm, rest) -> torch.Tensor:
    """The per-sample losses ``[...]`` from :func:`_pivoted_softmax`'s parts."""
    if targets.is_floating_point():
        d = (zm - logits).scatter(-1, m, 0.0)  # z_m - z_c >= 0; 0, with no gradient, at m
        return (targets * d).sum(-1) + targets.sum(-1) * torch.log1p(rest.squeeze(-1))
    y = targets.unsqueeze(-1)
    top = torch.where(m == y, 0.0, zm - logits.gather(-1, y))  # z_m - z_y; no gradient where y = m
    return (top + torch.log1p(rest)).squeeze(-1)


def cross_entropy_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample softmax cross-entropy ``[...]`` of logits ``[..., C]`` and integer labels ``[...]``
    or class probabilities ``[..., C]`` (classes in the last dimension), written so that a confident
    sample keeps its precision (differentiable, vmap-able).

    With ``m`` a row's most probable class and ``S = sum_{j != m} exp(z_j - z_m)``, the loss is
    ``sum_c y_c (z_m - z_c) + (sum_c y_c) log1p(S)``, and the gradient at ``m`` comes out as
    ``sum_{c != m} y_c - (sum_c y_c) S / (1 + S)``, a sum of small terms when the label is ``m``.
    ``log_softmax`` instead rounds ``p_m`` to 1 once ``S`` is below the dtype's epsilon (margins
    above 17 in float32), and the loss, its gradient and its Hessian are then lost to
    cancellation; in float32 they lose digits from losses of about 1e-5 on.
    """
    m, zm, _, rest = _pivoted_softmax(logits)
    return _losses(logits, targets, m, zm, rest)


def cross_entropy_parts(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cross_entropy_losses` ``[...]``, the probabilities ``p`` and the loss gradient
    ``(sum_c y_c) p - y`` ``[..., C]`` (``p - onehot(y)`` for labels), all to the same precision."""
    m, zm, e, rest = _pivoted_softmax(logits)
    loss = _losses(logits, targets, m, zm, rest)
    probs = e.scatter(-1, m, 1.0) / (1 + rest)
    tail = rest / (1 + rest)  # 1 - p_m
    if targets.is_floating_point():
        mass = targets.sum(-1, keepdim=True)
        grad_m = targets.scatter(-1, m, 0.0).sum(-1, keepdim=True) - mass * tail
        return loss, probs, (mass * probs - targets).scatter(-1, m, grad_m)
    y = targets.unsqueeze(-1)
    grad = probs.scatter_add(-1, y, torch.full_like(tail, -1.0))
    return loss, probs, grad.scatter(-1, m, torch.where(m == y, -tail, probs.gather(-1, m)))


def replica_mean_losses(kind: str, outputs: torch.Tensor, targets: torch.Tensor, *, precise: bool = True) -> torch.Tensor:
    """Each replica's mean loss ``[R]`` for outputs ``[R, b, ...]`` and targets ``[R, b, ...]`` of a
    named loss ``kind`` (canonical, see :func:`canonical_name`), the loss of
    :func:`~fastcurv.train.train_population` and :func:`~fastcurv.train.evaluate_population`.

    ``"cross_entropy"``: logits ``[R, b, C]`` and integer labels ``[R, b]``, the mean over the
    samples: with ``precise``, :func:`cross_entropy_losses` (a confident sample keeps its digits,
    as in the operators); else torch's ``F.cross_entropy``, which training's minibatch steps use
    (the formula of the fused engine's step and of a torch.optim loop). ``"mse"``: targets shaped
    like the outputs (:meth:`Loss.check_targets`), the mean over every output entry.
    """
    if kind == "cross_entropy":
        if precise:
            return cross_entropy_losses(outputs, targets).mean(-1)
        R, b = targets.shape
        return F.cross_entropy(outputs.reshape(R * b, -1), targets.reshape(-1), reduction="none").view(R, b).mean(1)
    if kind == "mse":
        return ((outputs - targets.to(outputs.dtype)) ** 2).reshape(outputs.shape[0], -1).mean(1)
    raise ValueError(f"replica_mean_losses takes a loss name of {LOSS_NAMES}, got {kind!r}")


class Loss:
    """A loss with the weighting that turns per-batch values into the full-data loss.

    ``kind`` is "cross_entropy", "mse" or "callable"; :meth:`batch_loss` returns the batch's
    contribution to the full-data loss, so summing it over batches gives L exactly.
    """

    def __init__(self, loss: str | Callable = "cross_entropy", reduction: str = "mean", loss_reduction: str = "mean"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if loss_reduction not in REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {REDUCTIONS}, got {loss_reduction!r}")
        if isinstance(loss, str):
            self.kind, self.fn = canonical_name(loss), None
        elif callable(loss):
            self.kind, self.fn = "callable", loss
        else:
            raise TypeError(f"loss must be a name or a callable, got {type(loss).__name__}")
        self.reduction = reduction
        self.loss_reduction = loss_reduction
        self.num_samples: int | None = None

    def __repr__(self):
        return f"Loss({self.kind}, reduction={self.reduction})"

    def scale(self, outputs_per_sample: int = 1) -> float:
        """Factor from a *summed* per-entry loss to the batch's share of the full-data loss."""
        if self.reduction == "sum":
            return 1.0
        denom = self.num_samples * (outputs_per_sample if self.kind == "mse" else 1)
        return 1.0 / denom

    def check_targets(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Raise a clear error for targets that do not fit the outputs (outputs without replica axis);
        :meth:`check_all_targets` checks the label range."""
        if self.kind == "cross_entropy":
            if targets.is_floating_point():
                if targets.shape != outputs.shape:
                    raise ValueError(f"soft cross-entropy targets have shape {tuple(targets.shape)}, outputs {tuple(outputs.shape)}")
                return
            if targets.dim() != 1 or targets.shape[0] != outputs.shape[0] or outputs.dim() != 2:
                raise ValueError(
                    f"cross_entropy expects logits [N, C] and integer labels [N]; got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}"
                )
        elif self.kind == "mse" and targets.shape != outputs.shape:
            raise ValueError(f"mse expects targets shaped like the outputs {tuple(outputs.shape)}, got {tuple(targets.shape)}")

    def check_all_targets(self, outputs: torch.Tensor, batches) -> None:
        """After :meth:`check_targets` on the first batch: raise a clear error for labels out of range
        in any batch of ``batches`` (:class:`~fastcurv.data.Batches`), or targets of another kind or
        per-sample shape in a later batch than in the first."""
        if len(batches.target_kinds) > 1:
            (k0, _), (k1, i1) = list(batches.target_kinds.items())[:2]
            raise ValueError(f"batch {i1}'s targets are {k1[0]} with per-sample shape {k1[1]}, batch 0's {k0[0]} with "
                             f"per-sample shape {k0[1]}: every batch needs targets of one kind")
        if self.kind == "cross_entropy" and batches.label_range is not None:
            lo, ilo, hi, ihi = batches.label_range
            C = outputs.shape[-1]
            if lo < 0 or hi >= C:
                i, v = (ilo, lo) if lo < 0 else (ihi, hi)
                raise ValueError(f"labels out of range: batch {i} has label {v} but the model has {C} classes")

    def batch_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """This batch's share of the full-data loss (one replica; outputs ``[n, ...]``)."""
        n = outputs.shape[0]
        if self.kind == "cross_entropy":
            positions = 1
            if outputs.dim() > 2 and targets.is_floating_point():  # torch's [N, C, ...] soft targets: classes in dim 1
                outputs, targets = outputs.movedim(1, -1), targets.movedim(1, -1)
                positions = outputs[0].numel() // outputs.shape[-1]  # torch's mean is over samples and positions
            scale = self.scale() / (positions if self.reduction == "mean" else 1)
            return cross_entropy_losses(outputs, targets).sum() * scale
        if self.kind == "mse":
            # written out: F.mse_loss(reduction="sum") under vmap triggers a torch resize warning
            return (outputs - targets).square().sum() * self.scale(outputs[0].numel())
        value = self.fn(outputs, targets)
        if value.dim() != 0:
            raise ValueError(f"a callable loss must return a scalar; got shape {tuple(value.shape)}")
        per_sum = value * n if self.loss_reduction == "mean" else value
        return per_sum * self.scale()
