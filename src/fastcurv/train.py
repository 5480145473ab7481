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
replica group's seeds, the epoch and the step: the global RNG is left alone (the CPU generator and
those of every accelerator device, which the initialization seeds too) and a call is
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

This module holds the API; the parts of a call live in :mod:`fastcurv.train_options` (the arguments
checked), :mod:`fastcurv.train_random` (initialization and dropout draws), :mod:`fastcurv.train_data`
(data orders, label noise, minibatches), :mod:`fastcurv.train_engine` (the engine and its losses
and gradients), :mod:`fastcurv.train_optim` (the optimizer step), :mod:`fastcurv.train_group` (the
population's state and its batch-size groups), :mod:`fastcurv.train_loop` (the epoch loop),
:mod:`fastcurv.train_checkpoint` (checkpoints), :mod:`fastcurv.train_eval`
(:func:`evaluate_population`) and :mod:`fastcurv.train_fused` (the fused MLP path).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .ambient import outside_inference, resetting_ambient
from .architectures import ACTIVATIONS, cnn, mlp  # noqa: F401  (fastcurv.train.mlp, cnn, ACTIVATIONS, as documented)
from .model_checks import _check_tensor_hooks
from .train_checkpoint import resume, run_fingerprint
from .train_data import epoch_order, noisy_labels, replica_labels  # noqa: F401  (epoch_order: fastcurv.train's API)
from .train_engine import Engine, place_replicas
from .train_eval import evaluate_population  # noqa: F401  (fastcurv.train.evaluate_population, as documented)
from .train_group import initial_population, make_groups
from .train_loop import fill_history, run_epochs, worker_limit
from .train_optim import optimizer_settings
from .train_options import OPTIMIZERS, parse_options, replica_hyperparameters  # noqa: F401  (OPTIMIZERS: the API)
from .train_options import _batch_sizes, _label_noise  # noqa: F401  (fastcurv.study checks its sweeps with them)
from .train_random import _GLOBAL_RNG_LOCK, _dropout_rng, init_replicas  # noqa: F401  (the lock and keyed draws: tests)


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
    ``fused-mlp`` (:mod:`fastcurv.train_fused`; ``fused-mlp+shared-order`` with
    ``shared_data_order=True``), ``per-replica autograd (<why not fused>)`` or ``vmap (<why not fused>)``;
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


@resetting_ambient  # training differentiates whatever the caller's grad mode (see fastcurv.ambient)
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
            its own seeds, and the engine choices that depend on the population (``shared_data_order``'s
            one data order, one SGD setting for all) are the whole population's, so its result does not depend on
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
            the other replicas of a group stop; the full training-set loss, so the stops at
            ``target_loss``, included: until the twenty-seventh round its chunks of the training set
            shrank with the group's size, and the loss moved by 1e-7 in float32), except with dropout, whose masks are drawn per group
            of replicas, and with ``shared_data_order`` on the fused MLP path, whose first layer is one
            matrix product for the group, rounded by the group's size (about 1e-7 in float32 for small
            layers, none seen at MNIST sizes).
        shared_data_order: every replica sees the same minibatches (the data order of
            ``data_seeds[0]``, default ``seeds[0]``); the replicas then differ only in initialization
            and hyperparameters, and the fused path computes the first layer of all replicas as one
            GEMM. Off by default (each replica has its own data order). Only this flag takes that GEMM:
            equal ``data_seeds`` without it, and a replica trained alone, keep each replica's own
            products, so a replica trained alone is its population twin bit for bit (until the
            twenty-seventh round a lone replica took the shared-order GEMM, rounded differently: 1e-16
            after 3 epochs in float64, a different model after 40 chaotic ones).
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

    Gradient hooks on parameters (``p.register_hook``, ``register_post_accumulate_grad_hook``) raise a
    ValueError, as module hooks do: training differentiates stacked copies of the parameters, where
    they would not run.
    Called inside ``torch.no_grad()``, ``torch.inference_mode()`` or ``torch.autocast(...)``,
    training runs as outside: grad mode on, in the models' own dtype (fastcurv leaves autocast
    regions); the caller's settings are left as they were (:mod:`fastcurv.ambient`).
    """
    t_start = time.perf_counter()
    opts = parse_options(locals())
    if isinstance(builder, nn.Module):  # (its copies have no gradient hooks: deepcopy drops them)
        _check_tensor_hooks([builder], template=True)
    models = init_replicas(builder, opts.seeds)
    device, dtype = place_replicas(models, device, dtype)
    # (a copy of data made under torch.inference_mode, which has no version counter and cannot be saved for backward)
    x, y = (outside_inference(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
            for t in (opts.x, opts.y))
    engine = Engine(models[0], x, y, opts, device, dtype)
    # the optimizer's coefficients in at least float32 (bfloat16 rounds momentum 0.999 and Adam's beta2 to 1.0),
    # as torch.optim computes its updates of half-precision parameters
    hdt = torch.promote_types(dtype, torch.float32)
    hp = replica_hyperparameters(opts, hdt, device)
    out0 = engine.check_outputs(models[0], opts.eval_train)
    optim = optimizer_settings(opts, hp, hdt)
    labels = replica_labels(y, opts.noise, opts.seeds, int(out0.shape[-1])) if any(opts.noise) else None
    pop = initial_population(models, opts, hp, labels, device)
    history = TrainHistory(batch_size=list(opts.batch_sizes), engine=engine.name)
    fingerprint = run_fingerprint(opts, hp, optim, dtype, x, y, models[0], engine.frozen)
    start_epoch = 0
    if opts.checkpoint is not None and opts.checkpoint.exists():
        start_epoch = resume(opts.checkpoint, fingerprint, opts.epochs, pop, device, dtype, history)
    most_workers = worker_limit(device, engine.has_dropout, opts.R, opts.threads)
    groups = make_groups(pop, engine, optim, opts, most_workers)
    del pop  # (with several groups, each holds its own rows: no second copy)
    run_epochs(groups, opts, history, start_epoch, fingerprint, callback, most_workers)
    fill_history(history, groups, opts.R)
    history.seconds = time.perf_counter() - t_start
    for g in groups:
        g.write_to(models)
    return models, history
