"""Loss functions and exact sample-count weighting over a whole data set.

Conventions (documented in the README):
* ``"cross_entropy"``: softmax cross-entropy on logits ``[N, C]`` with integer labels ``[N]`` or
  class probabilities ``[N, C]`` (soft targets, as torch's ``cross_entropy`` takes them).
* ``"mse"``: squared error, torch's ``MSELoss`` convention: ``mean`` divides by the number of
  output *entries* (N x outputs per sample), ``sum`` sums them.
* a callable ``loss(outputs, targets) -> scalar``: its own reduction over the batch is
  ``loss_reduction``, "mean" over the batch's samples or "sum". A torch loss module (``nn.MSELoss()``,
  ...) states its own in its ``.reduction`` ("batchmean" is a mean; "none" is refused), which
  ``loss_reduction`` may repeat but not contradict; a plain callable is a "mean" unless told. A
  mean callable's value times the batch size is taken as the batch's sum of per-sample losses, so
  the result is independent of the batching only for a loss that is a mean over the samples.
* torch's ``nn.CrossEntropyLoss`` and ``nn.NLLLoss`` modules (and ``F.cross_entropy``,
  ``F.nll_loss`` or a ``functools.partial`` of them with keyword arguments, taken as the module)
  with integer labels: their "mean" divides by the summed class weights of the labels that are not
  ``ignore_index``, ``W = sum_i weight[y_i]`` (the count of those labels without ``weight``), not
  by the batch size. They are evaluated summed, ``sum_i weight[y_i] l_i``, and divided by W counted
  over the whole data set when it is read (:meth:`Loss.check_all_targets`; with
  ``distributed_data=True`` summed over the ranks, as N is): the full-data loss is torch's on all
  the data in one batch, whatever the batching, and a batch whose labels are all ignored adds 0.
  With ``reduction="sum"`` the full-data loss is torch's summed one. A module with its own
  ``reduction="sum"`` is the callable sum ``sum_i weight[y_i] l_i`` (divided by N for
  ``reduction="mean"``), its class weights acting as sample weights in the empirical Fisher too.

The full-data loss is L = (1/N) * sum_i l_i for ``reduction="mean"`` (N = all samples of the
loader, so a ragged last batch is weighted exactly; W for the torch classification modules above)
and sum_i l_i for ``reduction="sum"``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn as nn
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


# the torch losses whose "mean" divides by the summed class weights of the labels not ignored
_CLASS_LOSSES = ((F.cross_entropy, nn.CrossEntropyLoss), (F.nll_loss, nn.NLLLoss))
_MODULE_REDUCTIONS = {"mean": "mean", "batchmean": "mean", "sum": "sum"}  # a torch loss module's .reduction


def _as_module(loss):
    """``F.cross_entropy`` / ``F.nll_loss``, or a ``functools.partial`` of one with keyword
    arguments only, as the equivalent torch module (whose weight, ignore_index and reduction
    :class:`Loss` then reads); any other callable as it is."""
    fn, kwargs = (loss.func, loss.keywords) if isinstance(loss, functools.partial) and not loss.args else (loss, {})
    cls = next((c for f, c in _CLASS_LOSSES if fn is f), None)
    if cls is None:
        return loss
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise TypeError(f"loss=functools.partial({fn.__name__}, ...): {exc}") from None


def _class_loss(module) -> nn.Module | None:
    """``module`` if it is torch's ``CrossEntropyLoss`` or ``NLLLoss`` with torch's own forward
    (a subclass that overrides it is an unknown callable), else None."""
    for _, cls in _CLASS_LOSSES:
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return module
    return None


def _resolved_reduction(module, loss_reduction: str | None) -> str:
    """A callable's reduction over its batch: a torch loss module's own ``.reduction`` (which
    ``loss_reduction`` may repeat but not contradict), else ``loss_reduction`` ("mean" when None)."""
    own = getattr(module, "reduction", None) if isinstance(module, nn.modules.loss._Loss) else None
    if own is None:
        return loss_reduction or "mean"
    name = type(module).__name__
    if own not in _MODULE_REDUCTIONS:
        hint = " (per-sample losses)" if own == "none" else ""
        raise ValueError(f"loss={name}(reduction={own!r}) does not reduce its batch to a scalar{hint}: pass "
                         f"{name}(reduction='mean') or {name}(reduction='sum')")
    own = _MODULE_REDUCTIONS[own]
    if loss_reduction is not None and loss_reduction != own:
        raise ValueError(f"loss_reduction={loss_reduction!r} contradicts the loss module's own reduction "
                         f"({name}.reduction is {module.reduction!r}): pass loss_reduction=None (read from the "
                         "module) or a module with the reduction you mean")
    return own


class Loss:
    """A loss with the weighting that turns per-batch values into the full-data loss.

    ``kind`` is "cross_entropy", "mse" or "callable"; :meth:`batch_loss` returns the batch's
    contribution to the full-data loss, so summing it over batches gives L exactly.

    ``loss_reduction`` (callables only) is how the callable reduces its batch, "mean" or "sum":
    None (the default) takes a torch loss module's own ``.reduction`` and "mean" for a plain
    callable; one that contradicts the module's raises a ValueError, as does "sum" with a named
    loss (whose convention is fixed: ``reduction`` chooses the full-data mean or sum; "mean", the
    entry points' former default, is accepted and means nothing there). A loss class
    instead of an instance (``nn.CrossEntropyLoss``) raises a TypeError.

    torch's ``CrossEntropyLoss`` / ``NLLLoss`` (see the module docstring) with integer labels and a
    "mean" reduction need W, the class weights of the labels summed over the whole data:
    :meth:`check_all_targets` counts it from the data's labels (and checks their range,
    ``ignore_index`` excepted), and :meth:`set_class_weight_total` sets the total (over the ranks
    of ``distributed_data=True``), before :meth:`batch_loss` can run.
    """

    def __init__(self, loss: str | Callable = "cross_entropy", reduction: str = "mean", loss_reduction: str | None = None):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if loss_reduction is not None and loss_reduction not in REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {REDUCTIONS} (or None: a loss module's own), got {loss_reduction!r}")
        self._classes = None  # torch's CrossEntropyLoss / NLLLoss: evaluated summed, divided by the data's W
        if isinstance(loss, str):
            self.kind, self.fn = canonical_name(loss), None
            if loss_reduction == "sum":
                raise ValueError(f"loss_reduction='sum' describes a callable loss's own reduction over its batch; the "
                                 f"named loss {self.kind!r} has a fixed one: pass reduction='sum' for the summed "
                                 "full-data loss, or a callable with loss_reduction='sum'")
            loss_reduction = None
        elif isinstance(loss, type):
            raise TypeError(f"loss={loss.__name__} is a class, not a loss: pass an instance, e.g. "
                            f"loss={loss.__name__}()")
        elif callable(loss):
            self.kind, self.fn = "callable", _as_module(loss)
            loss_reduction = _resolved_reduction(self.fn, loss_reduction)
            self._classes = _class_loss(self.fn)
        else:
            raise TypeError(f"loss must be a name or a callable, got {type(loss).__name__}")
        self.reduction = reduction
        self.loss_reduction = loss_reduction
        self._num_samples: int | None = None
        self.class_weight_total: float | None = None  # W of the class losses' mean (check_all_targets)

    def __repr__(self):
        return f"Loss({self.kind}, reduction={self.reduction})"

    @property
    def softmax_classes(self) -> bool:
        """Whether the loss is a softmax cross-entropy over the classes in dim 1 of the outputs: the
        named ``"cross_entropy"``, or torch's ``CrossEntropyLoss`` module (or ``F.cross_entropy``)."""
        return self.kind == "cross_entropy" or isinstance(self._classes, nn.CrossEntropyLoss)

    def named_hint(self) -> str:
        """For the measures that need the named ``loss="cross_entropy"``: a note telling a torch
        ``CrossEntropyLoss`` / ``NLLLoss`` module's user to pass the name, else ""."""
        return (" (a torch CrossEntropyLoss/NLLLoss module is a callable to them: pass loss='cross_entropy')"
                if self._classes is not None else "")

    @property
    def num_samples(self) -> int | None:
        """N, the samples of the whole data set (set by the operator)."""
        return self._num_samples

    @num_samples.setter
    def num_samples(self, n: int) -> None:
        self._num_samples = n

    def scale(self, outputs_per_sample: int = 1) -> float:
        """Factor from a *summed* per-entry loss to the batch's share of the full-data loss."""
        if self.reduction == "sum":
            return 1.0
        denom = self.num_samples * (outputs_per_sample if self.kind == "mse" else 1)
        return 1.0 / denom

    def _weighted_by_class(self, targets: torch.Tensor) -> bool:
        """Whether a batch with ``targets`` is one of torch's class-weighted losses (integer labels):
        evaluated summed, times :meth:`_class_scale`, with per-sample coefficients of their class
        weights, whatever the module's own reduction."""
        return self._classes is not None and not targets.is_floating_point()

    def _class_scale(self) -> float:
        """The factor from the class losses' summed value ``sum_i weight[y_i] l_i`` to the batch's
        share of the full-data loss: 1/W for their own mean with ``reduction="mean"``, else
        :meth:`scale` (their own sum: 1/N for "mean"; 1 for ``reduction="sum"``)."""
        if self.loss_reduction == "sum" or self.reduction == "sum":
            return self.scale()
        W = self.class_weight_total
        if W is None:
            raise RuntimeError(f"{type(self.fn).__name__}'s mean needs the class weights of all the labels (W): "
                               "Loss.check_all_targets counts them from the data before the first batch_loss")
        # (a rank of distributed_data=True may hold no weighted label: its shares are NaN until the sum over
        # the ranks, set_class_weight_total, comes)
        return 1.0 / W if W > 0 else float("nan")

    def sample_coefficients(self, targets: torch.Tensor, outputs_per_sample: int = 1) -> float | torch.Tensor:
        """c_i of the full-data loss ``L = sum_i c_i l_i`` with l_i sample i's loss, for a batch with
        ``targets`` (the empirical Fisher is ``sum_i c_i grad l_i grad l_i^T``): the constant
        :meth:`scale`, or, for torch's class-weighted losses, ``[n]`` of ``W_i`` times
        :meth:`_class_scale` (``W_i / W`` for their mean, ``W_i / N`` or ``W_i`` for their own sum),
        W_i the class weights of sample i's labels that are not ignored (0 for a sample whose labels
        are all ignored; l_i is the weighted mean over its labels)."""
        if not self._weighted_by_class(targets):
            return self.scale(outputs_per_sample)
        m = self._classes
        if m.weight is not None and getattr(m, "label_smoothing", 0.0) > 0:
            # (torch weighs the smoothing term of sample i by every class's weight, not by w[y_i]: the loss is
            # no sum of w[y_i] times a per-sample loss, and F would be no Fisher of it)
            raise ValueError("the empirical Fisher of a CrossEntropyLoss with both class weights and label_smoothing "
                             "is not defined here: torch weighs sample i's smoothing term by every class's weight, "
                             "so the loss is no per-sample weighted sum; drop one of them, or use the GGN")
        keep = targets != m.ignore_index
        w = keep.to(torch.float64)
        if m.weight is not None:
            w = w * m.weight.detach().to(targets.device, torch.float64)[targets.clamp(min=0) * keep]
        return w.reshape(w.shape[0], -1).sum(1) * self._class_scale()

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
        elif self._classes is not None and not targets.is_floating_point():
            want = (outputs.shape[0], *outputs.shape[2:])
            if outputs.dim() < 2 or tuple(targets.shape) != want:
                raise ValueError(f"{type(self.fn).__name__} expects outputs [N, C, ...] and integer labels [N, ...] (the "
                                 f"classes in dim 1); got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}")

    def check_all_targets(self, outputs: torch.Tensor, batches) -> None:
        """After :meth:`check_targets` on the first batch: raise a clear error for labels out of range
        in any batch of ``batches`` (:class:`~fastcurv.data.Batches`), or targets of another kind or
        per-sample shape in a later batch than in the first. For torch's class-weighted losses with
        integer labels, also count W (``class_weight_total``) from the batches' labels: this process's
        share, checked to be above 0 by :meth:`set_class_weight_total` once summed over the ranks."""
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
        if self._classes is not None and batches.label_range is not None:
            self._count_classes(outputs.shape[1], batches)

    def _count_classes(self, C: int, batches) -> None:
        """The label check of torch's ``CrossEntropyLoss`` / ``NLLLoss`` (``ignore_index`` excepted),
        and for their mean with ``reduction="mean"`` this process's W (``class_weight_total``, the
        class weights of its labels that are not ignored). The labels are counted per class
        (:meth:`~fastcurv.data.Batches.class_counts`, a pass over the batches) only where the range
        of the labels (``batches.label_range``) does not tell: class weights, or an ``ignore_index``
        within that range; else W is the number of labels."""
        m, name = self._classes, type(self.fn).__name__
        if m.weight is not None and m.weight.numel() != C:
            raise ValueError(f"{name}'s weight has {m.weight.numel()} entries but the model has {C} classes")
        ignore = m.ignore_index
        lo, ilo, hi, ihi = batches.label_range
        mean = self.loss_reduction == "mean" and self.reduction == "mean"
        total = None
        if (m.weight is not None and mean) or lo <= ignore <= hi:
            counts = batches.class_counts(C, ignore)
            bad = counts.bad
            if mean:
                per_class = counts.per_class.double()
                if m.weight is not None:
                    per_class = per_class * m.weight.detach().to(per_class.device, torch.float64)
                if 0 <= ignore < C:
                    per_class[ignore] = 0
                total = float(per_class.sum())
        else:  # no label is ignore_index: the range tells the rest
            bad = (lo, ilo) if lo < 0 else (hi, ihi) if hi >= C else None
            shape = next(k for k in batches.target_kinds if k[0] == "int")[1]
            total = float(batches.num_samples * math.prod(shape))
        if bad is not None:
            raise ValueError(f"labels out of range: batch {bad[1]} has label {bad[0]} but the model has {C} classes "
                             f"({name}'s ignore_index is {ignore})")
        if mean:
            self.class_weight_total = total

    def set_class_weight_total(self, total: float) -> None:
        """Set W (``class_weight_total``) to ``total``, the class weights of the labels summed over the
        whole data set (:class:`~fastcurv.HessianOperator` sums what :meth:`check_all_targets` counted
        on each rank of ``distributed_data=True``); a ValueError where it is not above 0 (torch's mean
        would be NaN)."""
        if not total > 0:
            m = self._classes
            raise ValueError(f"{type(self.fn).__name__}'s mean divides by the class weights of the labels that are "
                             f"not ignore_index ({m.ignore_index}), and they sum to {total:g} over the whole data "
                             "set: torch's mean is NaN (no labels, or only labels of weight 0)")
        self.class_weight_total = float(total)

    def _summed(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """torch's class-weighted loss with ``reduction="sum"``: ``sum_i weight[y_i] l_i`` over the
        labels that are not ``ignore_index``."""
        m = self._classes
        if isinstance(m, nn.CrossEntropyLoss):
            return F.cross_entropy(outputs, targets, weight=m.weight, ignore_index=m.ignore_index, reduction="sum",
                                   label_smoothing=m.label_smoothing)
        return F.nll_loss(outputs, targets, weight=m.weight, ignore_index=m.ignore_index, reduction="sum")

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
        if self._weighted_by_class(targets):
            return self._summed(outputs, targets) * self._class_scale()
        value = self.fn(outputs, targets)
        if value.dim() != 0:
            raise ValueError(f"a callable loss must return a scalar; got shape {tuple(value.shape)}")
        per_sum = value * n if self.loss_reduction == "mean" else value
        return per_sum * self.scale()
