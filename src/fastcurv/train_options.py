"""The arguments of :func:`fastcurv.train.train_population`, checked before any work and put in one
canonical form (:func:`parse_options`, :class:`TrainOptions`); the per-replica hyperparameters as
tensors once the training dtype is known (:func:`replica_hyperparameters`); and the targets'
check that training and :func:`fastcurv.train.evaluate_population` share (:func:`_check_targets`).
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .losses import Loss, as_labels, canonical_name, label_out_of_range
from .paths import prepare_file

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass
class TrainOptions:
    """The arguments of :func:`~fastcurv.train.train_population` after :func:`parse_options` (see there for
    their meaning): lists of R per-replica values, flags as bools, ``x``/``y`` the checked training set
    (detached, labels as integers, still on the caller's device). ``shared``: ``shared_data_order``,
    every replica sees the same minibatches (one data seed for all, the fused path's one GEMM; equal
    ``data_seeds`` without it, a lone replica included, keep each replica's own products, so a replica
    trains as in any population); ``eval_train``: the full training-set loss is evaluated
    after every epoch (asked for, or needed by ``target_loss``). ``lr``, ``momentum``,
    ``weight_decay`` and ``sam_rho`` are as given (:func:`replica_hyperparameters` checks them)."""

    seeds: list[int]
    data_seeds: list[int]
    shared: bool
    optimizer: str
    batch_sizes: list[int]
    noise: list[float]
    epochs: int
    threads: int | None
    chunk_size: int | None
    target_loss: float | None
    loss: str
    eval_train: bool
    nesterov: bool
    progress: bool | None
    fused: bool | None
    sparse_input: bool | None
    betas: tuple
    eps: float
    lr: object
    momentum: object
    weight_decay: object
    sam_rho: object
    checkpoint: Path | None
    x: torch.Tensor
    y: torch.Tensor

    @property
    def R(self) -> int:
        """The number of replicas."""
        return len(self.seeds)


def parse_options(args: dict) -> TrainOptions:
    """``train_population``'s arguments ``args`` (by name: its ``locals()`` on entry) checked and in
    canonical form; a ValueError (a TypeError for data that are not tensors) naming the first wrong
    argument, in a fixed order (the flags, the replica counts and seeds, the optimizer and the
    per-replica options, the counts, the loss, the data, the betas, the checkpoint path)."""
    nesterov = _flag(args["nesterov"], "nesterov")
    shared_data_order = _flag(args["shared_data_order"], "shared_data_order")
    eval_train, progress = _flag(args["eval_train"], "eval_train", True), _flag(args["progress"], "progress", True)
    fused, sparse_input = _flag(args["fused"], "fused", True), _flag(args["sparse_input"], "sparse_input", True)
    seeds, data_seeds = _replica_seeds(args["replicas"], args["seeds"], args["data_seeds"], shared_data_order)
    R = len(seeds)
    optimizer = args["optimizer"]
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    batch_sizes = _batch_sizes(args["batch_size"], R)
    noise = _label_noise(args["label_noise"], R)
    epochs, threads, chunk_size = args["epochs"], args["threads"], args["chunk_size"]
    if not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if threads is not None and (not isinstance(threads, (int, np.integer)) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    target_loss = _as_target(args["target_loss"])
    loss = canonical_name(args["loss"], callable_ok=False)
    if any(noise) and loss != "cross_entropy":
        raise ValueError(f"label_noise replaces class labels: it needs loss='cross_entropy' with integer labels, got "
                         f"loss={loss!r}")
    x, y = _checked_data(args["x"], args["y"], loss)
    betas = args["betas"]
    if optimizer != "sgd" and not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"betas must lie in [0, 1), got {tuple(betas)}")
    checkpoint = prepare_file(args["checkpoint"], "checkpoint") if args["checkpoint"] is not None else None
    return TrainOptions(
        seeds=seeds, data_seeds=data_seeds, shared=shared_data_order, optimizer=optimizer,
        batch_sizes=batch_sizes, noise=noise, epochs=epochs, threads=threads, chunk_size=chunk_size,
        target_loss=target_loss, loss=loss, eval_train=bool(eval_train) or target_loss is not None,
        nesterov=nesterov, progress=progress, fused=fused, sparse_input=sparse_input, betas=betas, eps=args["eps"],
        lr=args["lr"], momentum=args["momentum"], weight_decay=args["weight_decay"], sam_rho=args["sam_rho"],
        checkpoint=checkpoint, x=x, y=y)


def _replica_seeds(replicas, seeds, data_seeds, shared_data_order: bool) -> tuple[list[int], list[int]]:
    """``(seeds, data_seeds)``, R ints each, from ``replicas``/``seeds``/``data_seeds`` as given (see
    :func:`~fastcurv.train.train_population`); with ``shared_data_order`` every data seed is the first."""
    if seeds is None:
        if replicas is None:
            raise ValueError("give replicas=R or seeds=[...]")
        seeds = list(range(int(replicas)))
    seeds = [int(s) for s in seeds]
    if replicas is not None and int(replicas) != len(seeds):
        raise ValueError(f"replicas={replicas} but {len(seeds)} seeds were given")
    R = len(seeds)
    if R < 1:
        raise ValueError("need at least one replica")
    data_seeds_given = data_seeds is not None
    data_seeds = seeds if data_seeds is None else [int(s) for s in data_seeds]
    if len(data_seeds) != R:
        raise ValueError(f"data_seeds has {len(data_seeds)} entries, expected one per replica (R={R})")
    if shared_data_order:
        if data_seeds_given and len(set(data_seeds)) > 1:
            raise ValueError("shared_data_order=True needs one data order for all replicas, but data_seeds differ; "
                             "pass equal data_seeds or leave them out (then data_seeds[0] is used)")
        data_seeds = [data_seeds[0]] * R
    return seeds, data_seeds


def _checked_data(x, y, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set ``x [N, ...]``, ``y [N, ...]`` detached (data, not part of a graph: targets from a
    teacher net), ``y`` as integer labels where it holds class labels; a TypeError for non-tensors and a
    ValueError for different or zero lengths, non-finite values or targets that do not fit ``loss``."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        hint = " (convert them with torch.as_tensor)" if "numpy" in type(x).__module__ + type(y).__module__ else ""
        raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}{hint}")
    x, y = x.detach(), y.detach()
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x and y must hold the same, non-zero number of samples; got {len(x)} and {len(y)}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("the inputs x contain NaN or Inf")
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):  # (every replica's loss NaN: all "diverged")
        raise ValueError("the targets y contain NaN or Inf")
    y = as_labels(y)
    _check_targets(loss, y, None)
    return x, y


def replica_hyperparameters(opts: TrainOptions, hdt: torch.dtype, device) -> dict[str, torch.Tensor]:
    """``{"lr", "momentum", "weight_decay", "sam_rho"}``, each ``[R]`` of dtype ``hdt`` on ``device``; a
    ValueError for a wrong count or a negative or non-finite value, or Nesterov without momentum, and a
    warning (attributed to ``train_population``'s caller) when Adam/AdamW are given momenta that differ."""
    R = opts.R
    hp = {k: _per_replica(getattr(opts, k), R, k, hdt, device) for k in ("lr", "momentum", "weight_decay", "sam_rho")}
    if opts.nesterov and opts.optimizer == "sgd" and bool((hp["momentum"] <= 0).any()):
        raise ValueError("nesterov=True needs a positive momentum (as torch.optim.SGD)")
    if opts.optimizer != "sgd" and bool((hp["momentum"] != hp["momentum"][0]).any()):
        shown = ", ".join(f"{v:.6g}" for v in hp["momentum"].tolist())
        warnings.warn(f"momentum differs across the replicas ({shown}), but optimizer={opts.optimizer!r} does not use "
                      "momentum (it uses betas): the replicas do not differ in it", UserWarning, stacklevel=4)
    return hp


def _per_replica(value, R: int, name: str, dtype, device) -> torch.Tensor:
    """``value`` (a number, or one per replica) as a ``[R]`` tensor of ``dtype`` on ``device``; a ValueError
    naming ``name`` for another shape or a negative or non-finite value."""
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() == 0:
        t = t.expand(R)
    if t.shape != (R,):
        raise ValueError(f"{name} must be a number or a sequence of one value per replica (R={R}), got shape "
                         f"{tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name} must be finite and non-negative, got {t.tolist()}")
    return t.to(device=device, dtype=dtype)


def _per_replica_list(value, R: int, name: str, what: str) -> list:
    """``value`` as a list of R items: one value (a Python or numpy scalar, a 0-d array or tensor) for every
    replica, or a list, tuple, 1-d numpy array or tensor of R of them; a ValueError naming ``name`` for
    another length or shape (``what``: the values it takes, for the message)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim > 1:
            raise ValueError(f"{name} must be {what}, or one per replica (R={R}); got an array of shape "
                             f"{tuple(value.shape)}")
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return [value] * R
    if len(value) != R:
        raise ValueError(f"{name} has {len(value)} entries, expected one per replica (R={R})")
    return list(value)


def _batch_sizes(value, R: int) -> list[int]:
    """``batch_size`` as one positive int per replica (see :func:`~fastcurv.train.train_population`); a
    ValueError naming the option for another length, a non-integer (a float such as 32.0 or a bool too)
    or a value below 1."""
    what = "a positive integer"
    items = _per_replica_list(value, R, "batch_size", what)
    for v in items:
        is_int = isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
        if not is_int or v < 1:
            why = "not positive" if is_int else "not an integer"
            raise ValueError(f"batch_size must be {what} or one per replica (R={R}); got {value!r} ({v!r} is {why})")
    return [int(v) for v in items]


def _label_noise(value, R: int) -> list[float]:
    """``label_noise`` as one fraction in [0, 1) per replica (see :func:`~fastcurv.train.train_population`);
    a ValueError naming the option for another length, a value that is not a number, or one outside [0, 1)."""
    what = "a fraction in [0, 1)"
    items = _per_replica_list(value, R, "label_noise", what)
    for v in items:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not 0.0 <= float(v) < 1.0:
            raise ValueError(f"label_noise must be {what} (of the training labels replaced by wrong ones) or one per "
                             f"replica (R={R}); got {value!r}")
    return [float(v) for v in items]


def _flag(value, name: str, none_ok: bool = False) -> bool | None:
    """A yes/no option as a Python bool (``np.bool_`` and the integers 0 and 1 are read as bools;
    ``None`` kept where ``none_ok``); a ValueError for anything else, e.g. a per-replica list, whose
    truth value would silently switch the option on for every replica."""
    if value is None and none_ok:
        return None
    if isinstance(value, (bool, np.bool_)) or isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    allowed = "True, False or None" if none_ok else "True or False"
    raise ValueError(f"{name} must be {allowed} (one setting for all replicas), got {value!r}")


def _as_target(target_loss) -> float | None:
    """``target_loss`` as a Python float (a numpy number or a one-element tensor would not go into the
    checkpoint's JSON fingerprint); a ValueError for anything but a number that is not NaN."""
    if target_loss is None:
        return None
    if isinstance(target_loss, torch.Tensor) and target_loss.numel() == 1 and not target_loss.dtype.is_complex:
        target_loss = target_loss.item()
    if isinstance(target_loss, bool) or not isinstance(target_loss, numbers.Real) or math.isnan(float(target_loss)):
        raise ValueError(f"target_loss must be a number (or None), got {target_loss!r}")
    return float(target_loss)


def _check_targets(loss: str, y: torch.Tensor, out: torch.Tensor | None) -> None:
    """Raise a clear error for targets ``y [N, ...]`` that do not fit ``loss`` (and, given the
    outputs ``out [n, ...]`` of the first ``n`` samples, the model's outputs: the number of classes,
    or their shape).

    Training and evaluation take integer class labels ``[N]`` for cross-entropy (no soft targets);
    the shape rules are the operators' (:meth:`~fastcurv.losses.Loss.check_targets`): logits
    ``[N, C]``, and MSE targets shaped like the outputs, ``[N, 1]`` for a one-output model, not
    ``[N]``, and in the outputs' layout (channels-last targets of ``[N, C, H, W]`` outputs would
    pair outputs with the wrong targets)."""
    if loss == "cross_entropy" and (y.is_floating_point() or y.dim() != 1):
        raise ValueError(f"cross_entropy needs integer class labels y of shape [N], got {y.dtype} {tuple(y.shape)}")
    if out is None:
        return
    try:
        Loss(loss).check_targets(out, y[:len(out)])
    except ValueError as exc:
        if loss != "mse":
            raise
        raise ValueError(f"{exc} (one target per output: targets {tuple(y.shape[1:])} per sample, outputs "
                         f"{tuple(out.shape[1:])}, in the same layout)") from None
    bad = label_out_of_range(y, out.shape[-1]) if loss == "cross_entropy" else None
    if bad is not None:
        raise ValueError(f"labels out of range: found label {bad} but the model has {out.shape[-1]} classes")
