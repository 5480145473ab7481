"""One pass over a loader producing the predictions of all R replicas at once.

The replicas are evaluated together (``ReplicaSet.forward``, vmapped over the replica axis) in
chunks of replicas (and of examples, for large batches) so that ``replicas x examples`` rows fit in
memory. Only what the measures need is kept: argmax labels ``[R, M]`` in the smallest integer dtype,
optionally softmax probabilities ``[R, M, K]``, the targets when the loader has them, and streaming
per-example accumulators (:class:`Accumulator`) that never store the probabilities.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..ambient import resetting_ambient
from ..data import split_dict
from ..losses import label_out_of_range
from ..model_run import model_cannot_run
from ..operator import as_replica_set
from ..replicas import ReplicaSet
from ..solvers.lanczos import count


def label_dtype(num_classes: int) -> torch.dtype:
    """Smallest integer dtype that holds class indices ``0 .. num_classes - 1``."""
    if num_classes <= 256:
        return torch.uint8
    if num_classes <= 2**15:
        return torch.int16
    return torch.int32


def row_chunks(R: int, N: int, max_rows: int, whole_batch: bool = False) -> tuple[int, int]:
    """``(replicas, examples)`` per forward call so that one call sees at most ``max_rows``
    replica x example rows of ``R`` replicas on ``N`` examples: all ``N`` examples and as many
    replicas as fit, else ``max_rows`` examples of one replica. ``whole_batch`` (batch statistics,
    which depend on the batch) keeps the ``N`` examples together whatever ``max_rows``."""
    max_rows = count("max_rows", max_rows)
    n = N if whole_batch else max(1, min(N, max_rows))
    return max(1, min(R, max_rows // n)), n


class Accumulator:
    """Per-replica sums over examples, fed one ``[Rc, N, K]`` probability chunk at a time."""

    def update(self, idx: torch.Tensor, probs: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Predictions:
    """Outputs of all replicas on the examples of one pass.

    labels: ``[R, M]`` argmax classes (uint8/int16/int32). probs: ``[R, M, K]`` softmax
    probabilities or None. targets: ``[M]`` int64 true classes or None. finite: ``[R]`` False where
    a replica produced a non-finite logit. probe_inputs: the first ``probe_size`` inputs.
    """

    labels: torch.Tensor
    probs: torch.Tensor | None
    targets: torch.Tensor | None
    finite: torch.Tensor
    num_classes: int
    probe_inputs: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return self.labels.shape[1]


def _split_item(item, i: int):
    """``(inputs, targets or None)`` from a loader item: a tensor, a tuple/list, or a dict, read by
    the operators' rule (:func:`fastcurv.data.split_dict`: a known key pair; here also one inputs
    key alone), so that a dict they refuse (``{"x", "label"}``) is refused here with their message
    rather than read without its labels."""
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, dict):
        return split_dict(item, i, targets_optional=True)
    if isinstance(item, (tuple, list)) and len(item) >= 1 and isinstance(item[0], torch.Tensor):
        y = item[1] if len(item) > 1 else None
        return item[0], y
    raise TypeError(f"batch {i} is a {type(item).__name__}; the loader must yield inputs or (inputs, targets)")


def _as_labels(y):
    """Class labels ``[N]`` from labels as a column ``[N, 1]`` or one-hot rows ``[N, C]``; other
    targets as they are."""
    if y is None or y.dim() != 2:
        return y
    if y.shape[1] == 1 and not y.is_floating_point():
        return y[:, 0]
    if y.shape[1] > 1 and bool(((y == 0) | (y == 1)).all()) and bool((y.sum(1) == 1).all()):
        return y.argmax(1)
    return y


def iterate(data):
    """Batches of ``data``: a loader, one ``(inputs, targets)`` pair, or one inputs tensor.

    Two tensors: a tuple is one (inputs, targets) pair whatever the targets' shape (labels, one-hot
    or soft targets; targets with another row count are refused by :func:`collect_predictions`); a
    list is one pair when its second tensor holds labels for as many rows (integers, or one value
    per row) or differs in its shape per example (so it cannot be a second batch of inputs), else
    two batches of inputs.
    """
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        labels = x.dim() > 0 and y.dim() > 0 and x.shape[0] == y.shape[0] and (not y.is_floating_point() or y.dim() == 1)
        if isinstance(data, tuple) or labels or x.shape[1:] != y.shape[1:]:
            return [tuple(data)]
    return data


def _forward(replicas: ReplicaSet, x: torch.Tensor, idx: torch.Tensor, batch: int) -> torch.Tensor:
    """``replicas.forward(x, idx)`` on (a chunk of) batch ``batch``; a RuntimeError other than
    running out of memory, or an IndexError (token ids beyond an embedding's table), becomes the
    ValueError the operators raise for inputs the model cannot take, naming the batch ("the first
    batch", "batch 3"): torch's own message (a vmapped bmm's shapes, an embedding's index dtype or
    "index out of range in self") names neither. (A model vmap cannot batch raises
    :class:`~fastcurv.model_run.VmapUnsupportedError`, which blames no input.)"""
    from ..memory import is_out_of_memory

    try:
        return replicas.forward(x, idx)
    except (RuntimeError, IndexError) as exc:
        if is_out_of_memory(exc):
            raise
        raise model_cannot_run("the first batch" if batch == 0 else f"batch {batch}", x, exc) from exc


def _check_model(replicas: ReplicaSet, x: torch.Tensor) -> None:
    """One replica's forward on copies of the first samples of the first batch ``x`` and of its
    buffers (:meth:`ReplicaSet.checked_call`): a ValueError for a model that changes its input or a
    buffer in place, which the chunks of replicas, of examples and the perturbed passes would each
    see changed (and the caller's data with them), as the operators raise; a RuntimeError other than
    running out of memory, or an IndexError (token ids beyond an embedding's table: inputs the model
    cannot take) becomes their ValueError."""
    from ..memory import is_out_of_memory

    try:
        replicas.checked_call(x[:8])
    except (RuntimeError, IndexError) as exc:
        if is_out_of_memory(exc):
            raise
        raise model_cannot_run("the first batch", x, exc) from exc


@resetting_ambient
def collect_predictions(
    replicas: ReplicaSet,
    data,
    *,
    bn_mode: str | None = None,
    keep_probs: bool = False,
    probs_dtype: torch.dtype | None = None,
    accumulators: tuple = (),
    probe_size: int = 0,
    max_rows: int = 1 << 19,
) -> Predictions:
    """Evaluate every replica on every batch of ``data`` once.

    Args:
        replicas: a :class:`ReplicaSet`, or a list of R replicas of one architecture (stacked here),
            whose outputs are logits ``[batch, K]`` with K >= 2 (else a ValueError on the first
            forward: one output, a regressor's, has no classes to compare).
        data: a loader yielding inputs or ``(inputs, targets)``, or one such batch (see :func:`iterate`).
        bn_mode: "eval" or "batch", as in :func:`fastcurv.function_measures` (default: "eval" for a
            list, a ReplicaSet's own mode for a ReplicaSet).
        keep_probs: also store softmax probabilities ``[R, M, K]`` (``probs_dtype``; default:
            float64 for float64 models, else float32).
        accumulators: :class:`Accumulator` objects fed every probability chunk.
        probe_size: keep the first ``probe_size`` inputs (for perturbation measures).
        max_rows: at most this many ``replica x example`` rows per forward call (memory bound; a
            batch is split into chunks of examples when one replica's rows exceed it, except under
            batch statistics).

    A model that changes its input in place (``x -= mean``), or updates a buffer in its eval-mode
    forward, raises a ValueError on the first batch, as the operators do (each chunk of replicas and
    each perturbed pass would see other data, or another function).
    """
    replicas = as_replica_set(replicas, bn_mode)
    R = replicas.R
    labels, probs, targets, probes = [], [], [], []
    finite = torch.ones(R, dtype=torch.bool)
    have_targets = True
    num_classes = None
    n_probe = 0
    checked = False
    with torch.no_grad():
        for i, item in enumerate(iterate(data)):
            x, y = _split_item(item, i)
            if y is not None and (x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]):
                raise ValueError(f"batch {i}: inputs {tuple(x.shape)} and targets {tuple(y.shape)} disagree on the batch "
                                 "size (two batches of inputs go in a list or a loader)")
            if x.shape[0] == 0:
                continue
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise ValueError(f"batch {i}: the inputs contain NaN or Inf")
            x = x.to(replicas.device, replicas.dtype) if x.is_floating_point() else x.to(replicas.device)
            if not checked:
                _check_model(replicas, x)
                checked = True
            y = _as_labels(y)
            if y is None or y.dim() != 1 or y.is_floating_point():
                if y is not None and have_targets:
                    warnings.warn(f"batch {i}'s targets {tuple(y.shape)} ({y.dtype}) are not class labels (nor one-hot "
                                  "rows): measures that compare predictions with labels (test_error) are skipped",
                                  RuntimeWarning, stacklevel=2)
                have_targets = False
            elif have_targets:
                targets.append(y.to("cpu", torch.int64))
            if n_probe < probe_size:
                probes.append(x[: probe_size - n_probe])
                n_probe += probes[-1].shape[0]
            N = x.shape[0]
            chunk, n = row_chunks(R, N, max_rows, replicas.batch_statistics)
            for m0 in range(0, N, n):
                xb = x[m0 : m0 + n] if n < N else x
                lab_b, prob_b = [], []
                for r0 in range(0, R, chunk):
                    idx = torch.arange(r0, min(R, r0 + chunk), device=replicas.device)
                    out = _forward(replicas, xb, idx, i)
                    if out.dim() != 3:
                        raise ValueError("models must output logits [batch, classes]; got per-replica shape "
                                         f"{tuple(out.shape[1:])}")
                    if out.shape[-1] < 2:
                        k = out.shape[-1]
                        raise ValueError(f"the models output {k} value{'s' * (k != 1)} per example (a regressor?): "
                                         "function-space measures compare predicted classes (argmax and softmax of "
                                         "logits [batch, K]), which need K >= 2 outputs; with one output every "
                                         "replica predicts the same class and every measure is a constant")
                    if num_classes is None:
                        num_classes = out.shape[-1]
                    finite[idx.cpu()] &= torch.isfinite(out).flatten(1).all(1).cpu()
                    p = torch.softmax(out.to(torch.float64) if out.dtype == torch.float64 else out.float(), dim=-1)
                    for acc in accumulators:
                        acc.update(idx, p)
                    lab_b.append(out.argmax(-1).to(label_dtype(num_classes)).cpu())
                    if keep_probs:
                        prob_b.append(p.to(probs_dtype or p.dtype).cpu())
                labels.append(torch.cat(lab_b))
                if keep_probs:
                    probs.append(torch.cat(prob_b))
            bad = label_out_of_range(y, num_classes) if have_targets else None
            if bad is not None:
                raise ValueError(f"labels out of range: batch {i} has label {bad} but the models have {num_classes} classes")
    if not labels:
        raise ValueError("the data yielded no examples")
    tgt = torch.cat(targets) if have_targets and targets else None
    return Predictions(
        labels=torch.cat(labels, dim=1),
        probs=torch.cat(probs, dim=1) if keep_probs else None,
        targets=tgt,
        finite=finite & replicas.finite,
        num_classes=num_classes,
        probe_inputs=torch.cat(probes) if probes else None,
    )
