"""Training a population of R replicas of one architecture in ONE batched job.

The R replicas' parameters are stacked along a leading axis (``torch.func.stack_module_state``) and
one forward/backward trains them all. Each replica has its own initialization seed and its own data
order (or, with ``shared_data_order=True``, one order for all), and optionally its own learning
rate, momentum, weight decay, SAM radius, batch size and label-noise fraction (a hyperparameter
grid in one job). Replicas with different batch sizes train in one group per batch size, the
groups epoch by epoch together (see ``batch_size`` in :func:`train_population`).

Engines (``history.engine`` says which ran, in the form given in :class:`TrainHistory`): plain MLP
chains (Linear layers and elementwise activations in an ``nn.Sequential``) take the fused path of
:mod:`fastcurv.train_fused` (baddbmm/bmm over the replica axis, closed-form loss gradient, no
autograd, vmap or functional_call per step); conv nets without random draws on the CPU take
autograd one replica at a time; any other model takes ``torch.func.functional_call`` under ``vmap``
with autograd. On CPU the replica groups are split over worker threads (``threads``, default
torch's thread count) that each run a whole epoch with single-threaded torch ops, so no op waits
for a thread that another process has descheduled; models that draw random numbers in training
mode (dropout) run without worker threads.

Optimizers follow ``torch.optim`` exactly (same update formulas), so a batched run equals a loop
that trains each model with ``torch.optim.SGD`` / ``torch.optim.Adam`` / ``torch.optim.AdamW`` on the
same batches (checked in the tests):

* ``"sgd"``: ``g += wd*w; buf = momentum*buf + g; w -= lr*buf`` (``nesterov``: ``w -= lr*(g + momentum*buf)``);
* ``"adam"``: L2 weight decay added to the gradient, bias-corrected moments;
* ``"adamw"``: decoupled weight decay ``w *= 1 - lr*wd`` before the Adam step.

SAM (Foret et al. 2021) with radius ``sam_rho > 0``: the gradient used by the optimizer is taken at
``w + rho * g / ||g||`` (``g`` the minibatch gradient at ``w``, norm over all parameters of the
replica); it costs a second forward/backward per step.

BatchNorm: the models train in training mode, each replica normalized with its own batch statistics
and updating its own running statistics (its rows of the stacked buffers, in place under ``vmap``);
SAM's perturbed pass leaves them as the unperturbed pass set them, and replicas that stopped keep
theirs. The full training-set loss is evaluated in eval mode (running statistics, no dropout).

Random numbers: dropout, in ``nn.Dropout`` modules or drawn any other way in ``forward`` (a probe
step before training watches torch's generators), is drawn per step from a generator keyed by the
replica group's seeds, the epoch and the step: the global RNG is left alone and a call is
reproducible. Calls in several threads at once get the same models as alone: the sections that seed
torch's global generator (initialization, dropout) hold one lock, so they do not interleave.
Parameters the forward pass does not use (an auxiliary head) stay as they are, as with
``requires_grad=False``, as torch.optim (which sees no gradient for them) leaves them.

Divergence: a replica whose minibatch loss becomes NaN/Inf is marked diverged, its parameters are
set to NaN (so later measures flag it) and it stops training; the others are unaffected.
With ``target_loss``, a replica stops (is frozen) once its full training-set loss, evaluated at the
end of an epoch, is at most ``target_loss``; the job ends when every replica has stopped or after
``epochs`` epochs.

Checkpoints: with ``checkpoint=path`` the whole state (parameters, buffers, optimizer state, masks, history)
is written atomically at the end of every epoch; calling again with the same arguments and path
resumes after the last completed epoch and gives the same result as an uninterrupted run.

Label noise (``label_noise``): each replica trains on its own copy of the labels with a fraction
replaced by wrong ones (:func:`noisy_labels`, keyed by the replica's seed).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import numbers
import os
import pickle
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from operator import itemgetter
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from .architectures import ACTIVATIONS, cnn, mlp  # noqa: F401  (fastcurv.train.mlp, cnn, ACTIVATIONS, as documented)
from .losses import Loss, as_labels, canonical_name, label_out_of_range, replica_mean_losses
from .ops.csr_linear import CsrRows
from .replicas import check_output, meta_copy, nonfinite_rows, validate_models
from .fingerprint import describe_changes, module_structure
from .paths import prepare_file, replace_atomically
from .train_fused import CsrBatch, plan_mlp

OPTIMIZERS = ("sgd", "adam", "adamw")
_CKPT_VERSION = 2  # 2: the fingerprint holds the architecture (module classes and settings)
_FUSED_SGD = getattr(torch, "_fused_sgd_", None)  # private torch op behind SGD(fused=True); foreach ops if absent


def epoch_order(data_seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order (a permutation of ``range(n)``) a replica with ``data_seed`` uses in ``epoch``.

    A pure function of (data_seed, epoch), so a resumed run sees the same batches.
    """
    state = np.random.SeedSequence([int(data_seed) & 0xFFFFFFFF, int(epoch), 0x5EED]).generate_state(2, dtype=np.uint64)
    g = torch.Generator().manual_seed(int(state[0] & np.uint64(2**63 - 1)))
    return torch.randperm(n, generator=g)


# Held around every section that seeds torch's global generators and restores them after (fork_rng): those
# sections are not atomic, and without it two train_population calls in two threads draw each other's random
# numbers (initial weights 0.6-0.8 off). Only the calling thread takes it, never while it waits for the worker threads
# (which take it only for dropout, and dropout runs without worker threads): no deadlock.
_GLOBAL_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def _seeded_section(devices: list):
    """``torch.random.fork_rng(devices)`` under :data:`_GLOBAL_RNG_LOCK`: the global generators may be
    seeded inside, and no other fastcurv section seeds or restores them meanwhile."""
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=devices):
        yield


def init_replicas(builder, seeds: Sequence[int]) -> list[nn.Module]:
    """One model per seed: ``builder()`` (a zero-argument callable) under ``torch.manual_seed(seed)``.

    ``builder`` may also be an ``nn.Module`` template: each replica is a deep copy whose submodules'
    ``reset_parameters()`` are called under the seed. The global RNG state is left unchanged.
    Thread-safe with other fastcurv calls (they do not seed the global RNG meanwhile), not with
    the caller's own draws from it in other threads.
    """
    models = []
    for s in seeds:
        with _seeded_section([]):
            _seed(int(s))
            if isinstance(builder, nn.Module):
                m = copy.deepcopy(builder)
                for mod in m.modules():
                    own = list(mod.parameters(recurse=False))
                    if own and not hasattr(mod, "reset_parameters"):
                        raise ValueError(f"cannot re-initialize {type(mod).__name__}: it has no reset_parameters(); "
                                         "pass a builder function instead of a module")
                    if own:
                        mod.reset_parameters()
            elif callable(builder):
                m = builder()
                if not isinstance(m, nn.Module):
                    raise TypeError(f"builder() returned a {type(m).__name__}, not an nn.Module")
            else:
                raise TypeError("builder must be a zero-argument callable returning an nn.Module, or an nn.Module")
        models.append(m)
    return models


@contextlib.contextmanager
def _dropout_rng(has_dropout: bool, device, key: tuple):
    """Dropout masks of one training step drawn from a generator seeded by ``key`` (the group's
    replica seeds, the epoch and the step), the global RNG state restored after: the same call
    gives the same models, and a run resumed from a checkpoint the uninterrupted run's."""
    if not has_dropout:
        yield
        return
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 1
    with _seeded_section([device] if device.type == "cuda" else []):
        _seed(seed)
        yield


def _seed(s: int) -> None:
    """``torch.manual_seed(s)``; on a machine without an accelerator only the CPU generator, which is
    all that exists there (``torch.manual_seed`` also queues lazy CUDA/XPU seeding with a captured
    traceback: 0.4 ms per call, 40% of initializing 100 small MLPs)."""
    if torch.cuda.is_available() or getattr(torch, "xpu", None) is not None and torch.xpu.is_available() \
            or torch.backends.mps.is_available():
        torch.manual_seed(s)
    else:
        torch.default_generator.manual_seed(s)


@dataclass
class TrainHistory:
    """What happened during :func:`train_population`.

    train_loss: one ``[R]`` list per completed epoch (full training-set loss when evaluated, else
    the sample-weighted mean of the epoch's minibatch losses; NaN for diverged replicas, and for a
    replica in the epochs after it reached ``target_loss``: :meth:`final_loss` skips those). With
    several batch sizes the rows are still epochs, of every replica: all batch sizes train the same
    epochs, each with its own number of steps; there are no per-step rows. epochs_run, steps: per
    replica, epochs / optimizer steps actually taken (``ceil(N / batch_size)`` steps per epoch).
    batch_size: per replica, its minibatch size. diverged, reached_target: per-replica bools.
    seconds: wall time of this call. resumed_from_epoch: epochs found in the
    checkpoint (0 when starting fresh). engine: how the forward/backward ran, as
    ``<path>[+sparse-input (<d>% nonzero)][, <n> worker threads]``, where ``<path>`` is
    ``fused-mlp`` (:mod:`fastcurv.train_fused`; ``fused-mlp+shared-order`` when all replicas share
    the data order), ``per-replica autograd (<why not fused>)`` or ``vmap (<why not fused>)``;
    ``+sparse-input`` when the first layer multiplies the nonzero inputs only (``sparse_input``),
    and the worker threads when there are more than one (``threads``).
    """

    train_loss: list = field(default_factory=list)
    epochs_run: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    diverged: list = field(default_factory=list)
    reached_target: list = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_epoch: int = 0
    engine: str = ""
    batch_size: list = field(default_factory=list)

    def final_loss(self) -> list:
        """Last finite training loss recorded for each replica (NaN if none, e.g. diverged at once)."""
        R = len(self.train_loss[0]) if self.train_loss else len(self.diverged)
        out = [float("nan")] * R
        for r in range(R):
            for row in reversed(self.train_loss):
                if not math.isnan(row[r]):
                    out[r] = row[r]
                    break
        return out

    def to_pandas(self):
        """One row per replica: final train loss, epochs, steps, batch size (when the replicas' batch sizes
        differ), diverged, reached_target."""
        import pandas as pd

        cols = {"train_loss": self.final_loss(), "epochs": self.epochs_run, "steps": self.steps}
        if len(self.batch_size) == len(self.steps) and len(set(self.batch_size)) > 1:
            cols["batch_size"] = self.batch_size
        cols.update(diverged=self.diverged, reached_target=self.reached_target)
        return pd.DataFrame(cols).rename_axis("replica")


def _per_replica(value, R: int, name: str, dtype, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() == 0:
        t = t.expand(R)
    if t.shape != (R,):
        raise ValueError(f"{name} must be a number or a sequence of one value per replica (R={R}), got shape {tuple(t.shape)}")
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
    """``batch_size`` as one positive int per replica (see :func:`train_population`); a ValueError naming
    the option for another length, a non-integer (a float such as 32.0 or a bool too) or a value below 1."""
    what = "a positive integer"
    items = _per_replica_list(value, R, "batch_size", what)
    for v in items:
        is_int = isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
        if not is_int or v < 1:
            why = "not positive" if is_int else "not an integer"
            raise ValueError(f"batch_size must be {what} or one per replica (R={R}); got {value!r} ({v!r} is {why})")
    return [int(v) for v in items]


def _label_noise(value, R: int) -> list[float]:
    """``label_noise`` as one fraction in [0, 1) per replica (see :func:`train_population`); a ValueError
    naming the option for another length, a value that is not a number, or one outside [0, 1)."""
    what = "a fraction in [0, 1)"
    items = _per_replica_list(value, R, "label_noise", what)
    for v in items:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not 0.0 <= float(v) < 1.0:
            raise ValueError(f"label_noise must be {what} (of the training labels replaced by wrong ones) or one per "
                             f"replica (R={R}); got {value!r}")
    return [float(v) for v in items]


def _noisy_count(fraction: float, n: int) -> int:
    """How many of ``n`` labels ``label_noise=fraction`` makes wrong: the nearest integer to ``fraction * n``."""
    return int(math.floor(fraction * n + 0.5))


def noisy_labels(y: torch.Tensor, fraction: float, seed: int, num_classes: int) -> torch.Tensor:
    """The labels a replica with initialization seed ``seed`` trains on with ``label_noise=fraction``
    (:func:`train_population`): a copy of the class labels ``y [N]`` (integers in ``[0, num_classes)``)
    where the nearest integer to ``fraction * N`` samples, chosen uniformly at random, carry a label
    drawn uniformly from the ``num_classes - 1`` wrong classes (so exactly that fraction is wrong).

    A pure function of (labels, fraction, seed, num_classes): the samples are the first ones of a
    random permutation of ``range(N)`` and each sample's wrong label is drawn once, both from a
    generator keyed by ``seed``, so for one seed a larger fraction corrupts a superset of the
    samples a smaller one does, with the same wrong labels (nested noise levels). Returned on ``y``'s
    device, with its dtype.
    """
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"label_noise needs integer class labels y of shape [N], got "
                         f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    fraction = _label_noise(fraction, 1)[0]
    out = y.detach().cpu().clone()
    k = _noisy_count(fraction, len(y))
    if k == 0:
        return out.to(y.device)
    if num_classes < 2:
        raise ValueError(f"label_noise needs at least 2 classes (a wrong label to draw), got num_classes={num_classes}")
    bad = label_out_of_range(out, num_classes)
    if bad is not None:
        raise ValueError(f"labels out of range: found label {bad} but there are {num_classes} classes")
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x1ABE1]).generate_state(2, dtype=np.uint64)
    g = torch.Generator().manual_seed(int(state[0] & np.uint64(2**63 - 1)))
    order = torch.randperm(len(out), generator=g)
    shift = torch.randint(1, num_classes, (len(out),), generator=g)  # 1..C-1: never the label itself
    pick = order[:k]
    out[pick] = ((out[pick].long() + shift[pick]) % num_classes).to(out.dtype)  # (int8 labels + shift could overflow)
    return out.to(y.device)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


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


def _rng_states(devices: list) -> tuple:
    """The states of torch's default generators, the CPU one and those of the CUDA ``devices``, as bytes."""
    states = [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in devices)]
    return tuple(t.cpu().numpy().tobytes() for t in states)


def _probe_training_step(model: nn.Module, xb: torch.Tensor) -> tuple[bool, list[str]]:
    """One training-mode forward and backward of a copy of ``model`` on the samples ``xb`` (a few):
    ``(draws_random, unused)``.

    draws_random: whether the forward draws from torch's global random generators (dropout in any
    form: ``nn.Dropout``, ``F.dropout`` in ``forward``, noise injection), which the training steps
    must then key as they key dropout masks. unused: the names of the trainable parameters that get
    no gradient (not used by the forward pass: torch.optim skips them, and so does training).
    The global RNG is left as it was.
    """
    probe = copy.deepcopy(model).train()
    devices = [xb.device] if xb.device.type == "cuda" else []
    with _seeded_section(devices):  # (another call's draws meanwhile would read as this model's)
        before = _rng_states(devices)
        try:
            out = probe(xb)
        except RuntimeError as exc:
            raise ValueError(f"the model cannot run on the first samples (inputs {tuple(xb.shape)}, {xb.dtype}): "
                             f"{exc}") from exc
        draws_random = _rng_states(devices) != before
    check_output(out)
    wanted = [(n, p) for n, p in probe.named_parameters() if p.requires_grad]
    if not wanted:
        return draws_random, []
    if not out.requires_grad:
        return draws_random, [n for n, _ in wanted]
    grads = torch.autograd.grad(out.sum(), [p for _, p in wanted], allow_unused=True)
    return draws_random, [n for (n, _), g in zip(wanted, grads) if g is None]


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


def _atomic_save(obj, path: Path):
    """``torch.save(obj)`` to ``path`` atomically (:func:`fastcurv.paths.replace_atomically`): a
    failed write, a full disk or Ctrl-C, leaves no temporary file behind (one as large as the
    checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda f: torch.save(obj, f))


_CKPT_KEYS = ("fingerprint", "epoch", "params", "state", "diverged", "done", "epochs_run", "history")


def _load_checkpoint(path: Path, device) -> dict:
    """The training checkpoint at ``path`` (its fingerprint decoded); a ValueError naming the file
    when it is damaged or not one (torch's own message advises ``weights_only=False``, which would
    run arbitrary code from the file)."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise ValueError(f"checkpoint {path} cannot be read ({type(exc).__name__}): it is damaged or not a fastcurv "
                         "training checkpoint; delete it or use another path") from None
    missing = [k for k in _CKPT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ValueError(f"{path} is not a fastcurv training checkpoint (it has no {', '.join(missing)}); "
                         "delete it or use another path")
    try:
        fingerprint = json.loads(ck["fingerprint"])
    except (TypeError, json.JSONDecodeError):
        fingerprint = None
    if not isinstance(fingerprint, dict):
        raise ValueError(f"checkpoint {path} is damaged (unreadable fingerprint); delete it or use another path")
    return {**ck, "fingerprint": fingerprint}


def _settings_change(old: dict, new: dict) -> str:
    """What differs between two checkpoint fingerprints, the hyperparameters by name and short
    values as ``lr [0.05] -> [0.1]`` (the architecture by its first differing module)."""
    def flat(d):
        return {**{k: v for k, v in d.items() if k != "hp"}, **(d.get("hp") or {})}

    def show(v):  # per-replica values (float32-rounded) as one number when all agree
        if isinstance(v, list) and v and all(isinstance(u, float) for u in v):
            return f"{v[0]:.6g}" if len(set(v)) == 1 else "[" + ", ".join(f"{u:.6g}" for u in v) + "]"
        return repr(v)

    a, b = flat(old), flat(new)
    parts = []
    for key in describe_changes(a, b).split(", "):
        x, y = (show(d[key]) if key in d else None for d in (a, b))
        if x is not None and x == y and isinstance(a[key], list):  # one value for another number of replicas
            x, y = (f"{show(d[key])} x {len(d[key])}" for d in (a, b))
        parts.append(f"{key} {x} -> {y}" if x is not None and y is not None and len(x) + len(y) <= 120 else key)
    return ", ".join(parts)


def _data_digest(x: torch.Tensor, y: torch.Tensor) -> str:
    h = hashlib.sha1()
    for t in (x, y):
        a = t.detach().cpu().contiguous()
        h.update(str((tuple(a.shape), str(a.dtype))).encode())
        h.update(a.view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


def train_population(
    builder,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    replicas: int | None = None,
    seeds: Sequence[int] | None = None,
    data_seeds: Sequence[int] | None = None,
    optimizer: str = "sgd",
    lr=0.01,
    momentum=0.9,
    weight_decay=0.0,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    sam_rho=0.0,
    batch_size: int | Sequence[int] = 64,
    epochs: int = 10,
    target_loss: float | None = None,
    eval_train: bool | None = None,
    loss: str = "cross_entropy",
    checkpoint: str | os.PathLike | None = None,
    progress: bool | None = None,
    device=None,
    dtype: torch.dtype | None = None,
    callback: Callable | None = None,
    chunk_size: int | None = None,
    shared_data_order: bool = False,
    fused: bool | None = None,
    threads: int | None = None,
    sparse_input: bool | None = None,
    label_noise=0.0,
) -> tuple[list[nn.Module], TrainHistory]:
    """Train R replicas of one architecture at once; returns ``(models, history)``.

    Args:
        builder: zero-argument callable returning a fresh model (e.g. ``lambda: mlp([784, 128, 10])``),
            or a template module (re-initialized per seed, see :func:`init_replicas`).
        x, y: the whole training set, ``[N, ...]`` inputs and ``[N]`` int64 labels (cross-entropy)
            or float targets shaped like the outputs (MSE: ``[N, 1]`` for one output, else a
            ValueError, as the operators). Moved to ``device``/``dtype`` once.
        replicas / seeds: R, or the initialization seed of each replica (default ``range(R)``).
        data_seeds: per-replica seeds of the data order (default: ``seeds``); see :func:`epoch_order`.
        optimizer: "sgd", "adam" or "adamw". lr, momentum, weight_decay, sam_rho: a number, or one
            value per replica (a hyperparameter grid). ``momentum`` is ignored by Adam/AdamW (they
            use ``betas``; a warning when it differs across the replicas).
        nesterov: Nesterov momentum for SGD (ignored by Adam/AdamW; needs momentum > 0), one
            setting for all replicas.
        betas, eps: Adam/AdamW's moment coefficients (each in [0, 1)) and the term added to the
            denominator, as ``torch.optim.Adam``'s; ignored by SGD.
        batch_size: minibatch size, one positive integer for all replicas or one per replica (a list,
            tuple, 1-d numpy array or tensor of R integers: a batch-size sweep). The last batch of an
            epoch is smaller when it does not divide N. Replicas with different batch sizes train in
            separate groups, one per batch size, for the same ``epochs``, so a smaller batch takes more
            steps (``ceil(N / batch_size)`` per epoch: the convention of Keskar et al.'s sweeps; the
            steps taken are in ``history.steps``). A replica trains as it would in a call where every
            replica has its batch size: its initialization, data order and label noise are keyed by
            its own seeds, and the engine choices that depend on the population (shared data order,
            one SGD setting for all) are the whole population's, so its result does not depend on
            which other batch sizes are swept (bit for bit, except where ``chunk_size`` says results
            depend on the grouping: dropout, and shared_data_order's float rounding). The groups
            advance epoch by epoch together: one history row, checkpoint, callback and progress-bar
            step per epoch for all replicas.
        epochs: number of epochs (the maximum when ``target_loss`` is set).
        target_loss: stop each replica once its full training-set loss (evaluated after every
            epoch, whatever ``eval_train`` says) is <= this. A number (numpy scalars and one-element
            tensors are read as floats), else a ValueError.
        eval_train: evaluate the full training-set loss after every epoch for the history (always
            when ``target_loss`` is set; by default only then); otherwise the history holds the
            epoch's mean minibatch loss.
        loss: "cross_entropy" (mean over the batch) or "mse" (mean over all output entries), by
            name (the spellings of :func:`fastcurv.losses.canonical_name`; no callable loss). The
            full training-set cross-entropy (history, ``target_loss``) is
            :func:`fastcurv.losses.cross_entropy_losses`', which keeps the digits of confident
            samples (torch's ``F.cross_entropy`` loses them in float32 from losses of about 1e-5
            on); the minibatch steps take torch's formula (that of a ``torch.optim`` loop).
        checkpoint: file written atomically after every epoch (missing folders are created; a folder
            at the path raises before training); if it exists, training resumes from it. The
            settings, data and architecture (module classes and settings, e.g. the activation or
            dropout p) must match, else a ValueError names what differs; ``epochs`` may grow, but
            not shrink below the epochs the checkpoint holds (ValueError). With several batch sizes the
            one file holds every group's state, in replica order; a resumed call must ask for the same
            per-replica batch sizes (and label noise), else the ValueError names them.
        progress: tqdm bar with the mean/min/max per-replica loss (None: only on a terminal).
        device, dtype: where and in which precision to train (default: the built model's). The
            optimizer's coefficients (lr, momentum, betas, weight decay, SAM radius) stay in float32
            for half-precision parameters, as torch.optim's.
        callback: ``callback(epoch, history)`` after each epoch (after the checkpoint is written);
            ``history`` holds the epochs so far: ``train_loss`` and the per-replica ``epochs_run``,
            ``steps``, ``diverged`` and ``reached_target`` as of that epoch (``to_pandas()`` works).
        chunk_size: replicas per forward/backward/update group within a step (default: as many as
            keep about 24 MiB of parameters, gradients and optimizer state together, so the
            optimizer update runs from cache); a positive integer. Groups are formed within each batch
            size. Results do not depend on it (nor on ``threads``, which sets its default; nor on when
            the other replicas of a group stop), except with dropout, whose masks are drawn per group
            of replicas, and with ``shared_data_order`` on the fused MLP path, whose first layer is one
            matrix product for the group, rounded by the group's size (about 1e-7 in float32 for small
            layers, none seen at MNIST sizes).
        shared_data_order: every replica sees the same minibatches (the data order of
            ``data_seeds[0]``, default ``seeds[0]``); the replicas then differ only in initialization
            and hyperparameters, and the fused path computes the first layer of all replicas as one
            GEMM. Off by default (each replica has its own data order).
        fused: use the fused MLP forward/backward (:mod:`fastcurv.train_fused`): ``None`` (default)
            when the model is a plain MLP chain without dropout, else the generic path (the reason
            is in ``history.engine``): vmap, or for conv nets without dropout on the CPU autograd
            one replica at a time (1.8x faster than vmap's grouped convolutions on W3's CNNs);
            ``True`` raises if the model does not qualify; ``False`` always uses vmap.
        threads: replica-parallel worker threads on CPU (default ``torch.get_num_threads()``). Each
            worker trains its share of the replica groups for a whole epoch with single-threaded
            torch ops, so there is no per-op synchronization (intra-op OpenMP threads wait at every
            op for the slowest thread, which is very slow when other processes share the cores);
            torch's thread count is 1 during the call and restored after. ``1``: no worker threads,
            torch ops use torch's own intra-op threads. Results do not depend on it. torch's thread
            count is a process-wide setting (threads started meanwhile take it), so calls with worker
            threads are not safe in several threads at once: each restores the count it saw on
            entering, and overlapping calls can leave the process at 1 thread. Run those one at a
            time (their results would be right: see Random numbers in the module docstring). Models
            that draw random numbers in training mode (e.g. dropout) run without worker threads,
            whatever ``threads`` says: their draws are keyed per step in one order.
        sparse_input: on the fused path on CPU, keep the training set in CSR form and compute the
            first layer's forward product and weight gradient from the nonzero inputs only
            (:mod:`fastcurv.ops.csr_linear`; the same numbers up to summation order). ``None``
            (default): when at most ``SPARSE_INPUT_MAX_DENSITY`` (0.4, in that module) of the
            inputs are nonzero (MNIST: 19%); ``True``: always (raises where it cannot run);
            ``False``: never.
        label_noise: the fraction of each replica's training labels replaced by wrong ones (symmetric
            label noise, for randomization sweeps in the manner of Zhang et al. 2017): one number in
            [0, 1) for all replicas, or one per replica (a list, tuple, 1-d array or tensor). Replica r
            trains on ``noisy_labels(y, label_noise[r], seeds[r], C)`` (:func:`noisy_labels`; C the
            model's number of outputs): the nearest integer to ``label_noise[r] * N`` samples, drawn
            with a generator keyed by the replica's initialization seed, each get a label drawn
            uniformly from the C - 1 wrong classes (so exactly that fraction is wrong; Zhang et al.'s
            "corrupted with probability p to a uniform label" leaves p/C of them right, a wrong
            fraction of p (C - 1) / C). The same labels whatever the grouping, batch sizes or engine.
            Cross-entropy with integer labels only (else a ValueError). The history's training loss
            and ``target_loss`` are on the noisy labels (those trained on);
            :func:`evaluate_population` scores the labels it is given (pass the clean ones).

    The yes/no options (``nesterov``, ``eval_train``, ``progress``, ``shared_data_order``, ``fused``,
    ``sparse_input``) take True or False (or None where it has a meaning above), one setting for
    all replicas; ``np.bool_``, 0 and 1 are read as bools, and anything else (e.g. a per-replica
    list) is a ValueError.
    """
    t_start = time.perf_counter()
    nesterov, shared_data_order = _flag(nesterov, "nesterov"), _flag(shared_data_order, "shared_data_order")
    eval_train, progress = _flag(eval_train, "eval_train", True), _flag(progress, "progress", True)
    fused, sparse_input = _flag(fused, "fused", True), _flag(sparse_input, "sparse_input", True)
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
    shared = len(set(data_seeds)) == 1  # all replicas see the same minibatches
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    batch_sizes = _batch_sizes(batch_size, R)
    noise = _label_noise(label_noise, R)
    if not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if threads is not None and (not isinstance(threads, (int, np.integer)) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    target_loss = _as_target(target_loss)
    loss = canonical_name(loss, callable_ok=False)
    if any(noise) and loss != "cross_entropy":
        raise ValueError(f"label_noise replaces class labels: it needs loss='cross_entropy' with integer labels, got "
                         f"loss={loss!r}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        hint = " (convert them with torch.as_tensor)" if "numpy" in type(x).__module__ + type(y).__module__ else ""
        raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}{hint}")
    x, y = x.detach(), y.detach()  # data, not part of a graph (targets from a teacher net)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x and y must hold the same, non-zero number of samples; got {len(x)} and {len(y)}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("the inputs x contain NaN or Inf")
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):  # (every replica's loss NaN: all "diverged")
        raise ValueError("the targets y contain NaN or Inf")
    y = as_labels(y)
    _check_targets(loss, y, None)
    if optimizer != "sgd" and not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"betas must lie in [0, 1), got {tuple(betas)}")
    ckpt_path = prepare_file(checkpoint, "checkpoint") if checkpoint is not None else None

    models = init_replicas(builder, seeds)
    ref = next(models[0].parameters(), None)
    if ref is None:
        raise ValueError("the model has no parameters to train")
    device = torch.device(device) if device is not None else ref.device
    dtype = dtype or ref.dtype
    for m in models:
        m.to(device=device, dtype=dtype).train()
    validate_models(models, training=True)  # the builder's replicas: one architecture, one set of settings
    has_bn = any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in models[0].modules())
    cumulative = [n for n, mod in models[0].named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
                  and mod.training and mod.track_running_stats and mod.momentum is None]
    if cumulative:
        raise ValueError(f"BatchNorm {cumulative[0]!r} has momentum=None (a cumulative average of the batch statistics, "
                         "weighted by the batch count torch reads as a Python number, which batched training cannot do); "
                         "give it a momentum (torch's default: 0.1)")
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    y = y.to(device=device, dtype=dtype if y.is_floating_point() else y.dtype)
    N = len(x)
    if has_bn:
        for b in sorted(set(batch_sizes)):
            _check_bn_batches(models[0], x, N, b)
    draws_random, unused = _probe_training_step(models[0], x[:2])
    has_dropout = any(isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0 for mod in models[0].modules())
    no_fused = "the model has dropout" if has_dropout else "the model draws random numbers in training mode"
    # random draws outside nn.Dropout modules (F.dropout, noise) are keyed per step as dropout is
    has_dropout = has_dropout or draws_random
    plan, why = None, "fused=False"
    if fused is None or fused:
        plan, why = plan_mlp(models[0], loss) if not has_dropout else (None, no_fused)
        if fused and plan is None:
            raise ValueError(f"fused=True, but the model does not qualify for the fused MLP path: {why}")
    # conv nets on the CPU: one replica at a time (in each worker thread) is 1.8x faster than vmap, whose batched
    # convolutions become grouped ones (a W3 step, 10 replicas on one thread: 60 against 110 ms); MLPs gain from
    # vmap's batched matrix products. Dropout keeps vmap, whose masks are drawn per replica group.
    per_replica = fused is None and plan is None and device.type == "cpu" and not has_dropout and any(
        isinstance(mod, nn.modules.conv._ConvNd) for mod in models[0].modules())
    engine = ("fused-mlp" + ("+shared-order" if shared else "")) if plan is not None else (
        f"{'per-replica autograd' if per_replica else 'vmap'} ({why})")

    params, buffers = stack_module_state(models)
    names = list(params)
    # parameters with requires_grad=False, or that the forward pass does not use, stay as they are, as torch.optim
    # (which sees no gradient) leaves them
    frozen = [n for n, t in models[0].named_parameters() if not t.requires_grad or n in unused]
    trained = [n for n in names if n not in frozen]
    params = {n: p.detach().clone().contiguous() for n, p in params.items()}
    # meta copies in training mode (the steps: dropout, BatchNorm with batch statistics, updating the running
    # statistics of the replica's own buffers in place) and in eval mode (the full training-set loss)
    bases = {True: meta_copy(models[0]).train(), False: meta_copy(models[0]).eval()}
    per_thread = threading.local()  # functional_call swaps tensors into the module: one copy per worker thread

    def one(p, b, xb, training=True):
        m = getattr(per_thread, "bases", None)
        if m is None:
            m = per_thread.bases = copy.deepcopy(bases)
        return functional_call(m[training], (p, b), (xb,))

    fwd = vmap(one, in_dims=(0, 0, 0), randomness="different" if has_dropout else "error")
    fwd_eval = vmap(partial(one, training=False), in_dims=(0, 0, None))

    csr = _sparse_rows(x, plan, sparse_input)
    if csr is not None:
        engine += f"+sparse-input ({csr.density:.0%} nonzero)"
    # the optimizer's coefficients in at least float32 (bfloat16 rounds momentum 0.999 and Adam's beta2 to 1.0),
    # as torch.optim computes its updates of half-precision parameters
    hdt = torch.promote_types(dtype, torch.float32)
    hp = {k: _per_replica(v, R, k, hdt, device) for k, v in
          (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("sam_rho", sam_rho))}
    if nesterov and optimizer == "sgd" and bool((hp["momentum"] <= 0).any()):
        raise ValueError("nesterov=True needs a positive momentum (as torch.optim.SGD)")
    if optimizer != "sgd" and bool((hp["momentum"] != hp["momentum"][0]).any()):
        shown = ", ".join(f"{v:.6g}" for v in hp["momentum"].tolist())
        warnings.warn(f"momentum differs across the replicas ({shown}), but optimizer={optimizer!r} does not use "
                      "momentum (it uses betas): the replicas do not differ in it", UserWarning, stacklevel=2)
    if eval_train is None or target_loss is not None:  # (the stop test needs the full training-set loss)
        eval_train = bool(eval_train) or target_loss is not None
    rng_devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), _seeded_section(rng_devices):  # outputs of 2 samples
        before = _rng_states(rng_devices)
        out0 = one({n: t[0] for n, t in params.items()}, {n: t[0] for n, t in buffers.items()}, x[:2], training=False)
        _check_targets(loss, y, out0)
        if eval_train and _rng_states(rng_devices) != before:
            raise ValueError("the model draws random numbers in eval mode (e.g. F.dropout(..., training=True)): the "
                             "full training-set loss (eval_train, target_loss) needs a deterministic eval-mode forward")
    use_sam = bool((hp["sam_rho"] > 0).any())
    # (lr, momentum, weight_decay) when SGD's are the same for every replica of the population (of every batch-size
    # group, also where one group alone would have one setting: its replicas train as in a call with one batch size)
    sgd_scalars = None
    if optimizer == "sgd" and all(bool((hp[k] == hp[k][0]).all()) for k in ("lr", "momentum", "weight_decay")):
        sgd_scalars = tuple(float(hp[k][0]) for k in ("lr", "momentum", "weight_decay"))
    b1, b2 = float(betas[0]), float(betas[1])
    labels = None  # with label noise: each replica's training labels [R, N], in a narrow integer type
    if any(noise):
        num_classes = int(out0.shape[-1])
        narrow = torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32
        y_cpu = y.cpu()
        labels = torch.stack([noisy_labels(y_cpu, f, s, num_classes).to(narrow) for f, s in zip(noise, seeds)]
                             ).to(device)

    # optimizer state (zeros, so the first SGD step gives buf = g as torch.optim does)
    state = {"step": torch.zeros(R, dtype=torch.int64, device=device)}
    if optimizer == "sgd":
        state["buf"] = {n: torch.zeros_like(params[n]) for n in names}
    else:
        state["m"] = {n: torch.zeros_like(params[n]) for n in names}
        state["v"] = {n: torch.zeros_like(params[n]) for n in names}
    diverged = torch.zeros(R, dtype=torch.bool, device=device)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    epochs_run = torch.zeros(R, dtype=torch.int64)
    history = TrainHistory(batch_size=list(batch_sizes))
    start_epoch = 0

    fingerprint = {
        "version": _CKPT_VERSION, "seeds": seeds, "data_seeds": data_seeds, "optimizer": optimizer,
        "hp": {k: v.double().cpu().tolist() for k, v in hp.items()}, "nesterov": bool(nesterov), "betas": [b1, b2],
        "eps": float(eps), "batch_size": batch_sizes[0] if len(set(batch_sizes)) == 1 else batch_sizes,
        "target_loss": target_loss, "loss": loss,
        "eval_train": bool(eval_train), "dtype": str(dtype), "data": _data_digest(x, y),
        "params": [[n, list(params[n].shape[1:])] for n in names], "architecture": module_structure(models[0]),
        **({"frozen": frozen} if frozen else {}), **({"label_noise_samples": [_noisy_count(f, len(y)) for f in noise]} if any(noise) else {}),  # (what the labels depend on)
    }
    if ckpt_path is not None and ckpt_path.exists():
        ck = _load_checkpoint(ckpt_path, device)
        old, new = ck["fingerprint"], json.loads(json.dumps(fingerprint))
        if old.get("version") != _CKPT_VERSION:
            raise ValueError(f"checkpoint {ckpt_path} has format {old.get('version')}, this fastcurv writes "
                             f"{_CKPT_VERSION} (which also records the architecture): use another path")
        if old != new:
            raise ValueError(f"checkpoint {ckpt_path} was written with different settings ({_settings_change(old, new)}); "
                             "use another path or the original settings")
        if int(ck["epoch"]) > epochs:
            raise ValueError(f"checkpoint {ckpt_path} holds {int(ck['epoch'])} epochs, but epochs={epochs} was asked for: "
                             "a checkpoint can be extended, not shortened; ask for at least "
                             f"{int(ck['epoch'])} epochs, or use another path to train {epochs} from the start")
        params = {n: ck["params"][n].to(device=device, dtype=dtype) for n in names}
        for n, b_ in ck.get("buffers", {}).items():  # running statistics (checkpoints of models without any lack them)
            buffers[n].copy_(b_)
        state = ck["state"]
        diverged, done = ck["diverged"].to(device), ck["done"].to(device)
        epochs_run = ck["epochs_run"].cpu()
        h = ck["history"]
        history.train_loss, start_epoch = [list(r) for r in h["train_loss"]], int(ck["epoch"])
        history.resumed_from_epoch = start_epoch

    # the minibatch steps take torch's cross-entropy (precise=False), the formula of the fused engine's step and of a
    # torch.optim loop, so every engine trains as that loop; the full training-set loss (history, target_loss) and
    # evaluate_population take the precise one, which keeps the digits of confident samples
    step_loss = partial(replica_mean_losses, loss, precise=False)

    def total_loss(p, bufs, xb, yb, active):
        losses = step_loss(fwd(p, bufs, xb), yb)
        return torch.where(active, losses, torch.zeros_like(losses)).sum(), losses

    fast_shared = plan is not None and shared  # xb/yb hold ONE minibatch [B, ...] for all replicas
    # worker threads at most (dropout draws from the global RNG: its order is kept fixed, in the calling thread)
    most_workers = 1
    if device.type == "cpu" and not has_dropout:
        most_workers = max(1, min(R, int(threads) if threads is not None else torch.get_num_threads()))

    def make_group(idx: list[int], batch_size: int, pop: dict) -> SimpleNamespace:
        """The replicas ``idx`` (sorted), which all train with ``batch_size``, as one training group: their
        rows of the population's tensors and settings in ``pop`` (the tensors themselves when ``idx`` is
        every replica), and the functions that train them for an epoch. Inside, ``R``, ``seeds``,
        ``params``, ``state``, ``hp``, ``diverged``, ... are the group's (rows in the order of ``idx``)."""
        whole = idx == list(range(len(pop["seeds"])))
        pick = torch.tensor(idx, dtype=torch.long)

        def rows(t):
            if whole or t is None:
                return t
            if isinstance(t, dict):
                return {k: rows(v) for k, v in t.items()}
            if isinstance(t, list):
                return [t[i] for i in idx]
            return t[pick.to(t.device)]

        R = len(idx)
        seeds, data_seeds, params, buffers, state, hp, diverged, done, epochs_run, labels = (rows(pop[k]) for k in (
            "seeds", "data_seeds", "params", "buffers", "state", "hp", "diverged", "done", "epochs_run", "labels"))
        if csr is not None:  # the first layer's weight and everything updated with it, stored as [R, in, out]
            w0 = plan.layers[0].weight
            params[w0] = _transposed_storage(params[w0])
            for group in state.values():
                if isinstance(group, dict):
                    group[w0] = _transposed_storage(group[w0])

        gbuf = {n: torch.empty_like(params[n]) for n in names} if plan is not None else None

        def grads_at(p, bufs, xb, yb, active, sl):
            g, losses = _grads_at(p, bufs, xb, yb, active, sl)
            for n in frozen:  # (no gradient: no SAM perturbation either)
                g[n] = torch.zeros_like(p[n])
            return g, losses

        def _grads_at(p, bufs, xb, yb, active, sl):
            if plan is not None:
                return plan.loss_and_grads(p, xb, yb, active, loss, shared=fast_shared,
                                           out={n: gbuf[n][sl] for n in names})
            if per_replica:
                return replica_grads(p, bufs, xb, yb, active)
            # ``.data`` (unlike ``.detach()``) gets its own version counter: the in-place updates other worker
            # threads make to their groups' views of the same stacked tensors do not invalidate this graph
            leaf = {n: t.data.requires_grad_(True) for n, t in p.items()}
            total, losses = total_loss(leaf, bufs, xb, yb, active)
            g = torch.autograd.grad(total, [leaf[n] for n in names], allow_unused=True)  # (None: unused, in frozen)
            return dict(zip(names, g)), losses.detach()

        def replica_grads(p, bufs, xb, yb, active):
            """:func:`grads_at` one replica at a time (leaves from ``.data``, as there): zero gradients and
            losses for the inactive ones."""
            grads = {n: torch.zeros_like(p[n]) for n in names}
            losses = torch.zeros(len(active), dtype=dtype, device=device)
            for r in active.nonzero().flatten().tolist():
                leaf = {n: t.data[r].requires_grad_(True) for n, t in p.items()}
                loss_r = step_loss(one(leaf, {n: b_[r] for n, b_ in bufs.items()}, xb[r]).unsqueeze(0),
                                   yb[r].unsqueeze(0))
                for n, g in zip(names, torch.autograd.grad(loss_r.sum(), [leaf[n] for n in names], allow_unused=True)):
                    if g is not None:  # (None: a parameter this replica's forward does not use keeps a zero gradient)
                        grads[n][r] = g
                losses[r] = loss_r.detach()[0]
            return grads, losses

        @torch.no_grad()
        def full_loss(p, bufs, sl):
            """Full training-set loss ``[R_c]`` float64 of the replica group ``sl`` (parameters ``p``, name ->
            ``[R_c, ...]``), on each replica's own labels with label noise."""
            Rc = next(iter(p.values())).shape[0]
            out = torch.zeros(Rc, dtype=torch.float64, device=device)
            # the fused MLP path: about 16M input entries per chunk; other models (conv activations, BatchNorm
            # without running statistics, which normalizes each chunk by itself) in the training minibatches'
            # size, whatever the replica groups: within a step's memory, and the same chunks for every group
            chunk = (max(1, min(N, (1 << 24) // max(1, Rc * int(np.prod(x.shape[1:])))))
                     if plan is not None else batch_size)
            for i in range(0, N, chunk):
                xb, yb = x[i:i + chunk], y[i:i + chunk]
                if csr is not None:
                    xb = CsrBatch(csr, torch.arange(i, i + len(yb), device=device))
                if plan is None:
                    o = fwd_eval(p, bufs, xb)
                elif csr is not None:
                    o = plan.forward(p, xb, shared=True)
                else:  # one product per replica (a view of the inputs for each): one GEMM for the group rounded
                    # by the group's size (1e-7 in float32 for small layers), and a replica's full loss, so its stop at
                    # target_loss, depended on the replicas it was grouped with (chunk_size, batch-size groups)
                    o = plan.forward(p, xb.expand(Rc, *xb.shape), shared=False)
                target = yb.unsqueeze(0).expand(Rc, *yb.shape) if labels is None else labels[sl, i:i + chunk].long()
                out += replica_mean_losses(loss, o, target).double() * len(yb)
            return out / N

        @torch.no_grad()
        def step(p, g, active, sl):
            """One optimizer step, in place, for the replicas in ``active``; the others keep parameters and state.

            Inactive replicas get identity coefficients (learning rate 0, momentum/beta 1, gradient
            scale 0) instead of a masked copy, so the common all-active case costs no extra passes.
            """
            all_active = bool(active.all())
            steps = state["step"][sl]
            steps += 1 if all_active else active.long()
            if sgd_scalars is not None:  # one learning rate/momentum/decay for all: foreach, scalar ops
                # the same kernel for the active replicas whatever the others do, their rows kept as they were: the
                # coefficient path below rounds otherwise (3e-8 in float32), and a replica's result changed when
                # another in its group stopped at target_loss (so with chunk_size, and with the batch-size groups)
                rows = {} if all_active else {(k, n): src[n][sl] for k, src in (("w", params), ("buf", state["buf"]))
                                              for n in trained}
                kept = _rows(rows, ~active)
                sgd_uniform(p, g, sl)
                _restore_rows(rows, kept)
                return
            a = active.to(hdt)
            lr_ = hp["lr"][sl] * a
            wd = hp["weight_decay"][sl] * a
            wd_any = bool((wd != 0).any())
            momentum_ = hp["momentum"][sl]
            if optimizer == "sgd":
                mom = torch.where(active, momentum_, torch.ones_like(momentum_))
            else:
                t = steps.double()  # (the bias corrections in float64, as torch.optim's Python numbers)
                bc1 = torch.where(steps > 0, 1 - b1 ** t, torch.ones_like(t))
                bc2 = torch.where(steps > 0, 1 - b2 ** t, torch.ones_like(t))
                beta1 = torch.where(active, torch.full_like(a, b1), torch.ones_like(a))
                beta2 = torch.where(active, torch.full_like(a, b2), torch.ones_like(a))
                step_size = (lr_ / bc1).to(hdt)
                sqrt_bc2 = bc2.sqrt().to(hdt)
            for n in trained:
                w, gn = p[n], g[n]
                if not all_active:
                    gn = torch.where(_bcast(active, gn), gn, torch.zeros_like(gn))
                if optimizer == "sgd":
                    if wd_any:
                        gn = gn.addcmul(w, _bcast(wd, w))
                    buf = state["buf"][n][sl]
                    buf.mul_(_bcast(mom, w)).add_(gn)
                    d = gn.addcmul(buf, _bcast(momentum_, w)) if nesterov else buf
                    w.addcmul_(d, _bcast(lr_, w), value=-1)
                else:
                    if optimizer == "adam" and wd_any:
                        gn = gn.addcmul(w, _bcast(wd, w))
                    elif optimizer == "adamw" and wd_any:
                        w.mul_(_bcast(1 - lr_ * wd, w))
                    m, v = state["m"][n][sl], state["v"][n][sl]
                    m.mul_(_bcast(beta1, w)).add_(gn * _bcast(1 - beta1, w))
                    v.mul_(_bcast(beta2, w)).addcmul_(gn, gn * _bcast(1 - beta2, w))
                    denom = v.sqrt().div_(_bcast(sqrt_bc2, w)).add_(eps)
                    w.sub_(m.div(denom).mul_(_bcast(step_size, w)))

        sgd_views: dict = {}  # replica group -> its per-replica views for the fused SGD kernel (see fused_sgd_views)

        def fused_sgd_views(sl):
            """``[ws, gs, bufs]`` for torch's fused SGD kernel on replica group ``sl`` (in storage order: the
            transposed first layer as ``[in, out]``), or None where it cannot run. Built once per group: the
            fused path's gradients live in fixed buffers (``gbuf``).

            The kernel rounds its vectorized body and its scalar tail (a tensor's last ``numel % vector
            width`` elements) differently, and splits a tensor among torch's threads at multiples of 64
            bytes. A parameter whose replicas hold a multiple of 64 elements each gets one tensor for the
            group (no tail: every element vectorized, whatever the grouping); any other gets one tensor per
            replica (the same tail in every replica). Either way an element's result does not depend on
            the replica groups (``chunk_size``, batch sizes) or threads. (One tensor for the group for every
            parameter would put the last replica's tail wherever the grouping ends: 6e-8 apart in float32.)
            """
            key = (sl.start, sl.stop)
            if key not in sgd_views:
                views = None
                if _FUSED_SGD is not None and plan is not None:
                    views = [[_storage_order(t) for n in trained
                              for t in ([src[n][sl]] if src[n][0].numel() % 64 == 0 else src[n][sl].unbind(0))]
                             for src in (params, gbuf, state["buf"])]
                    if not all(w.shape == g.shape == b.shape and all(t.is_contiguous() for t in (w, g, b))
                               for w, g, b in zip(*views)):
                        views = None
                sgd_views[key] = views
            return sgd_views[key]

        def sgd_uniform(p, g, sl):
            """The SGD step of replica group ``sl`` (parameters ``p``, gradients ``g``: views of its rows)
            with one lr/momentum/weight decay for all: torch's fused SGD kernel on the fused MLP path (one
            pass over w, g and buf), else torch.optim.SGD's foreach ops; either way each element's result
            depends on its replica's values only."""
            if not trained:  # (every parameter frozen or unused; torch's list ops refuse empty lists)
                return
            lr0, mom0, wd0 = sgd_scalars
            views = fused_sgd_views(sl)
            if views is not None:
                ws, gs, bufs = views
                # (plain SGD: the kernel takes no momentum buffers, and refuses them)
                _FUSED_SGD(ws, gs, bufs if mom0 else [], weight_decay=wd0, momentum=mom0, lr=lr0, dampening=0.0,
                           nesterov=nesterov, maximize=False, is_first_step=False)  # buf starts at 0: mom*0 + g = g
                return
            ws, gs = [p[n] for n in trained], [g[n] for n in trained]
            own = plan is not None  # g: the fused path's own gradient buffers, free to update in place
            if wd0:
                if own:
                    torch._foreach_add_(gs, ws, alpha=wd0)
                else:
                    gs = torch._foreach_add(gs, ws, alpha=wd0)
            d = gs
            if mom0:
                bufs = [state["buf"][n][sl] for n in trained]
                torch._foreach_mul_(bufs, mom0)
                torch._foreach_add_(bufs, gs)
                if not nesterov:
                    d = bufs
                elif own:
                    torch._foreach_add_(gs, bufs, alpha=mom0)
                else:
                    d = torch._foreach_add(gs, bufs, alpha=mom0)
            torch._foreach_add_(ws, d, alpha=-lr0)

        @torch.no_grad()
        def kill(p, bad):
            """Set the parameters of replicas ``bad`` to NaN, in place (``p`` may hold views)."""
            for n in names:
                p[n][bad] = float("nan")

        workers = min(most_workers, R)
        size = chunk_size
        if size is None:  # keep one group's parameters, gradients and optimizer state within ~24 MiB
            copies = 3 if optimizer == "sgd" else 4  # w, g and SGD's buf, or Adam's m and v
            replica_bytes = sum(t[0].numel() for t in params.values()) * torch.finfo(dtype).bits // 8 * copies
            most = max(1, (24 << 20) // max(1, replica_bytes))
            per_worker = -(-R // (workers * most))  # groups per worker; equal-sized groups balance the workers
            size = max(1, -(-R // (workers * per_worker)))
        chunks = [slice(c, min(R, c + int(size))) for c in range(0, R, int(size))]
        workers = min(workers, len(chunks))
        shares = [chunks[w::workers] for w in range(workers)]  # each worker's replica groups

        steps_per_epoch = -(-N // batch_size)
        nbuf = min(batch_size, N) * (1 if fast_shared else int(size))
        # with sparse inputs the minibatches are row ids into the CSR copy: no gathered inputs
        xbufs = [torch.empty((0 if csr is not None else nbuf, *x.shape[1:]), dtype=x.dtype, device=device)
                 for _ in range(workers)]
        ybufs = [torch.empty((nbuf, *y.shape[1:]), dtype=y.dtype, device=device) for _ in range(workers)]

        def train_share(w: int, epoch: int, orders: torch.Tensor, loss_sum: torch.Tensor):
            """One epoch for worker ``w``'s replica groups: all steps, no synchronization with other workers."""
            xbuf, ybuf = xbufs[w], ybufs[w]
            for k in range(steps_per_epoch):
                if fast_shared:  # one minibatch for every replica
                    i = orders[k * batch_size:(k + 1) * batch_size]
                    nb = len(i)
                    xs = CsrBatch(csr, i) if csr is not None else torch.index_select(x, 0, i, out=xbuf[:nb])
                    ys = torch.index_select(y, 0, i, out=ybuf[:nb]) if labels is None else None
                for sl in shares[w]:
                    Rc = sl.stop - sl.start
                    if fast_shared:  # (with label noise each replica's own labels of the one minibatch: [R_c, B])
                        xc, yc = xs, ys if labels is None else torch.index_select(labels[sl], 1, i).long()
                    else:  # the group's R_c minibatches with one gather, into a preallocated buffer
                        i = orders[sl, k * batch_size:(k + 1) * batch_size]
                        nb = i.shape[1]
                        if csr is not None:
                            xc = CsrBatch(csr, i)
                        else:
                            xc = torch.index_select(x, 0, i.reshape(-1), out=xbuf[:Rc * nb]).view(Rc, nb, *x.shape[1:])
                        if labels is None:
                            yc = torch.index_select(y, 0, i.reshape(-1), out=ybuf[:Rc * nb]).view(Rc, nb, *y.shape[1:])
                        else:
                            yc = torch.gather(labels[sl], 1, i).long()
                    pc = {n: params[n][sl] for n in names}  # views: updated in place
                    # views that BatchNorm's running statistics update in place; ``.data`` for the reason given in
                    # grads_at
                    bc = {n: b_[sl].data for n, b_ in buffers.items()}
                    active = ~(done[sl] | diverged[sl])
                    stopped = _rows(bc, ~active)  # the buffers of replicas that do not train stay as they are
                    with _dropout_rng(has_dropout, device, (*seeds[sl], epoch, k)):
                        g, losses = grads_at(pc, bc, xc, yc, active, sl)
                        bad = active & ~torch.isfinite(losses)
                        if use_sam:
                            sq = sum(gn.reshape(Rc, -1).double().pow(2).sum(1) for gn in g.values())
                            scale = (hp["sam_rho"][sl] / (sq.sqrt().to(hdt) + 1e-12)).to(dtype)
                            pert = {n: pc[n] + _bcast(scale, pc[n]) * g[n] for n in names}
                            first = _rows(bc, torch.ones_like(active))  # the perturbed pass updates no statistics
                            g, _ = grads_at(pert, bc, xc, yc, active, sl)
                            _restore_rows(bc, first)
                    _restore_rows(bc, stopped)
                    if bool(bad.any()):
                        diverged[sl] |= bad
                        kill(pc, bad)
                        active = active & ~bad
                    step(pc, g, active, sl)
                    loss_sum[sl] += torch.where(active, losses.double(), torch.zeros_like(losses.double())) * nb

        def full_loss_share(w: int, out: torch.Tensor):
            for sl in shares[w]:
                out[sl] = full_loss({n: params[n][sl] for n in names}, {n: b_[sl] for n, b_ in buffers.items()}, sl)

        epoch_state: dict = {}  # the epoch under way: active replicas, minibatch loss sums, full losses

        def live() -> bool:
            """Whether a replica of the group still trains (not diverged, not stopped at ``target_loss``)."""
            return not bool((done | diverged).all())

        def train_tasks(epoch: int) -> list:
            """The epoch's training, one task per worker (to run in any order, in parallel)."""
            epoch_state["active"] = ~(done | diverged)
            if fast_shared:
                orders = epoch_order(data_seeds[0], epoch, N).to(device)  # [N], the same for every replica
            else:
                orders = torch.stack([epoch_order(s, epoch, N) for s in data_seeds]).to(device)  # [R, N]
            epoch_state["loss_sum"] = loss_sum = torch.zeros(R, dtype=torch.float64, device=device)
            return [partial(train_share, w, epoch, orders, loss_sum) for w in range(workers)]

        def eval_tasks() -> list:
            """After the training tasks: the full training-set losses, one task per worker (none without
            ``eval_train``)."""
            if not eval_train:
                return []
            epoch_state["loss"] = out = torch.zeros(R, dtype=torch.float64, device=device)
            return [partial(full_loss_share, w, out) for w in range(workers)]

        def end_epoch() -> torch.Tensor:
            """After the evaluation tasks: mark the diverged and stopped replicas; the epoch's losses ``[R]``
            (NaN for the replicas that did not train in it or diverged)."""
            nonlocal diverged, done
            active_epoch = epoch_state["active"]
            epochs_run.add_(active_epoch.cpu().long())
            ep_loss = epoch_state["loss"] if eval_train else epoch_state["loss_sum"] / N
            ep_loss = torch.where(active_epoch & ~diverged, ep_loss, torch.full_like(ep_loss, float("nan")))
            # replicas whose parameters became non-finite without a non-finite loss
            nonfinite = nonfinite_rows([params[n] for n in names])
            newly = nonfinite & ~diverged
            if bool(newly.any()):
                diverged |= newly
                kill(params, newly)
            if eval_train:
                newly = ~torch.isfinite(ep_loss) & active_epoch & ~diverged
                diverged |= newly
                kill(params, newly)
            if target_loss is not None:
                done |= active_epoch & ~diverged & (ep_loss <= target_loss)
            return ep_loss

        def tensors() -> dict:
            """The group's training state as of now (the checkpoint's entries, its rows in the order of ``idx``)."""
            return {"params": params, "buffers": buffers, "state": state, "diverged": diverged, "done": done,
                    "epochs_run": epochs_run}

        return SimpleNamespace(idx=idx, workers=workers, live=live, train_tasks=train_tasks, eval_tasks=eval_tasks,
                               end_epoch=end_epoch, tensors=tensors)

    # one group per batch size (in the order of first appearance): each trains as a call with that batch size would
    by_size: dict = {}
    for r, b in enumerate(batch_sizes):
        by_size.setdefault(b, []).append(r)
    pop = {"seeds": seeds, "data_seeds": data_seeds, "params": params, "buffers": buffers, "state": state, "hp": hp,
           "diverged": diverged, "done": done, "epochs_run": epochs_run, "labels": labels}
    groups = [make_group(idx, b, pop) for b, idx in by_size.items()]
    del pop, params, buffers, state, labels  # (with several groups, each holds its own rows: no second copy)

    def merged(get):
        """``get(group.tensors())`` of every group as one population's rows, on the CPU, in replica order."""
        return _merge_rows([(g.idx, get(g.tensors())) for g in groups], R)

    def run_tasks(tasks: list) -> None:
        """Run the tasks, in the worker threads when there are several (each waits for all)."""
        if pool is None:
            for task in tasks:
                task()
            return
        for f in [pool.submit(task) for task in tasks]:
            f.result()

    def fill_history():
        """The per-replica fields of ``history`` as of now (copies: the callback may keep them)."""
        history.epochs_run = merged(lambda t: t["epochs_run"]).tolist()
        history.steps = merged(lambda t: t["state"]["step"]).tolist()
        history.diverged = merged(lambda t: t["diverged"]).tolist()
        history.reached_target = merged(lambda t: t["done"]).tolist()

    history.engine = engine
    workers = min(most_workers, sum(g.workers for g in groups))
    pool = bar = None
    old_threads = torch.get_num_threads()
    # everything from the thread count's change on inside the try: an exception or Ctrl-C while the pool or the bar
    # is created must not leave the process at 1 torch thread
    try:
        if workers > 1:
            # replica-parallel: each worker runs its groups with one intra-op thread for a whole epoch, so no
            # per-op barrier waits on a thread that another process has descheduled
            torch.set_num_threads(1)
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastcurv-train")
            history.engine = engine = f"{engine}, {workers} worker threads"
        bar = tqdm(total=epochs, initial=min(start_epoch, epochs), desc="fastcurv train", unit="epoch",
                   disable={False: True, None: None, True: False}[progress], leave=False)
        for epoch in range(start_epoch, epochs):
            live = [g for g in groups if g.live()]
            if not live:
                break
            run_tasks([task for g in live for task in g.train_tasks(epoch)])  # (all batch sizes' groups at once)
            run_tasks([task for g in live for task in g.eval_tasks()])
            ep_loss = torch.full((R,), float("nan"), dtype=torch.float64)  # a group that has stopped: NaN
            for g in live:
                ep_loss[g.idx] = g.end_epoch().cpu()
            history.train_loss.append(ep_loss.tolist())
            if ckpt_path is not None:
                _atomic_save({
                    "fingerprint": json.dumps(fingerprint), "epoch": epoch + 1,
                    **{k: merged(itemgetter(k)) for k in ("params", "buffers", "state", "diverged", "done",
                                                          "epochs_run")},
                    "history": {"train_loss": history.train_loss},
                }, ckpt_path)
            alive = ep_loss[torch.isfinite(ep_loss)]
            post = {"alive": f"{R - sum(int(g.tensors()['diverged'].sum()) for g in groups)}/{R}"}
            if len(alive):
                post.update(loss_mean=f"{alive.mean():.4g}", min=f"{alive.min():.3g}", max=f"{alive.max():.3g}")
            if target_loss is not None:
                post["done"] = sum(int(g.tensors()["done"].sum()) for g in groups)
            bar.set_postfix(post)
            bar.update(1)
            if callback is not None:
                fill_history()  # (the per-replica fields as of this epoch: to_pandas() needs them)
                callback(epoch, history)
    finally:
        try:
            if bar is not None:
                bar.close()
            if pool is not None:
                pool.shutdown()  # (waits for the workers' current epoch: a second Ctrl-C may land here)
        finally:
            if workers > 1:
                torch.set_num_threads(old_threads)

    fill_history()
    history.seconds = time.perf_counter() - t_start
    with torch.no_grad():
        for g in groups:
            t = g.tensors()
            for j, r in enumerate(g.idx):
                for n, p in models[r].named_parameters():
                    p.copy_(t["params"][n][j])
                for n, b_ in models[r].named_buffers():
                    b_.copy_(t["buffers"][n][j])
                models[r].eval()
    return models, history

def _rows(bufs: dict, which: torch.Tensor):
    """``(which, copies of the rows which of every buffer)``, or None when there is nothing to keep."""
    if not bufs or not bool(which.any()):
        return None
    return which, {n: b[which].clone() for n, b in bufs.items()}


def _restore_rows(bufs: dict, kept) -> None:
    """Write rows kept by :func:`_rows` back into the buffers ``bufs`` (views of the stacked buffers)."""
    if kept is not None:
        which, rows = kept
        for n, b in bufs.items():
            b[which] = rows[n]


def _check_bn_batches(model: nn.Module, x: torch.Tensor, N: int, batch_size: int) -> None:
    """Raise a ValueError before training when an epoch's last minibatch holds a single sample that a
    BatchNorm in training mode cannot normalize (torch refuses one value per channel)."""
    last = N % batch_size or min(N, batch_size)
    if last != 1:
        return
    probe = copy.deepcopy(model).train()
    try:
        with torch.no_grad(), _seeded_section([x.device] if x.device.type == "cuda" else []):  # (dropout)
            probe(x[:1])
    except ValueError as e:
        raise ValueError(f"the last minibatch of every epoch holds 1 sample (N={N}, batch_size={batch_size}), and "
                         f"BatchNorm in training mode cannot normalize it ({e}); choose a batch_size that leaves "
                         "more than one sample over") from None


def _sparse_rows(x: torch.Tensor, plan, sparse_input: bool | None) -> CsrRows | None:
    """The training set in CSR form when the first layer should multiply only nonzero inputs, else None."""
    if sparse_input is False:
        return None
    csr, why = (None, "the model does not take the fused MLP path") if plan is None else plan.sparse_rows(x, sparse_input)
    if sparse_input and csr is None:
        raise ValueError(f"sparse_input=True, but {why}")
    return csr


def _transposed_storage(t: torch.Tensor) -> torch.Tensor:
    """``t [R, out, in]`` with the same values, stored as a contiguous ``[R, in, out]`` (a transposed view)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _storage_order(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or its transpose when that is the contiguous one (elementwise updates see no difference)."""
    return t.transpose(-2, -1) if t.dim() >= 2 and not t.is_contiguous() and t.transpose(-2, -1).is_contiguous() else t


def _merge_rows(parts: list, R: int):
    """The rows of replica groups ``parts = [(replica indices, rows)]`` as one population's, on the CPU:
    ``rows`` a tensor ``[R_g, ...]`` or a dict of them (nested); row ``j`` of a group goes to replica
    ``indices[j]``. A single group of every replica in order is returned as it is (on the CPU)."""
    if len(parts) == 1 and parts[0][0] == list(range(R)):
        return _to_cpu(parts[0][1])
    first = parts[0][1]
    if isinstance(first, dict):
        return {k: _merge_rows([(i, rows[k]) for i, rows in parts], R) for k in first}
    out = torch.empty((R, *first.shape[1:]), dtype=first.dtype)
    for i, rows in parts:
        out[torch.tensor(i, dtype=torch.long)] = rows.detach().cpu()
    return out


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


@torch.no_grad()
def evaluate_population(models: Sequence[nn.Module], x, y: torch.Tensor | None = None, *, batch_size: int = 2048,
                        loss: str = "cross_entropy") -> dict:
    """Per-replica loss and (for cross-entropy) accuracy on ``(x, y)`` tensors, on one batch given
    as ``x`` alone (``(inputs, targets)`` or ``[inputs, targets]``), or on a loader (an iterable of
    ``(inputs, targets)`` batches, e.g. a ``DataLoader``) given as ``x`` alone; all replicas in one
    pass per batch. MSE targets must be shaped like the outputs (as for training and the operators).
    ``loss``: "cross_entropy" (integer labels) or "mse", by name (no callable loss); the
    cross-entropy is :func:`fastcurv.losses.cross_entropy_losses`', the operators', which keeps the
    digits of confident samples where torch's ``F.cross_entropy`` loses them.

    Returns ``{"loss": [R] float64, "accuracy": [R] float64 (fraction in [0, 1])}`` (NaN rows for
    replicas with non-finite parameters, and, with a warning naming them, for replicas whose outputs
    are not finite on some input).
    """
    from .data import _split, is_single_batch
    from .replicas import ReplicaSet

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
        xb = xb.to(rs.device, rs.dtype if xb.is_floating_point() else xb.dtype)
        yb = yb.to(rs.device)
        try:
            out = rs.forward(xb)
        except RuntimeError as exc:  # (torch's vmap error names flags the caller cannot set)
            if "randomness" not in str(exc):
                raise
            raise ValueError("the model draws random numbers in eval mode (e.g. F.dropout(..., training=True)): "
                             "evaluate_population needs a deterministic eval-mode forward") from exc
        check_output(out)
        _check_targets(loss, yb, out[0])
        bad_out |= ~torch.isfinite(out.reshape(R, -1)).all(1).cpu()
        tot_loss += replica_mean_losses(loss, out, yb.unsqueeze(0).expand(R, *yb.shape)).double().cpu() * len(xb)
        if loss == "cross_entropy":
            correct += (out.argmax(-1) == yb).double().sum(1).cpu()
        N += len(xb)
    if N == 0:
        raise ValueError("evaluate_population needs a non-empty data set: the loader yielded no samples")
    failed = bad_out & rs.finite.cpu()
    if bool(failed.any()):
        warnings.warn(f"replicas {failed.nonzero().flatten().tolist()} have finite parameters but non-finite outputs "
                      "(NaN or Inf): their loss and accuracy are NaN", RuntimeWarning, stacklevel=2)
    res = {"loss": (tot_loss / N).masked_fill(bad_out, float("nan"))}
    if loss == "cross_entropy":
        acc = correct / N
        acc[~rs.finite.cpu() | bad_out] = float("nan")
        res["accuracy"] = acc
    return res
