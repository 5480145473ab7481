"""How the replicas of a :func:`fastcurv.train.train_population` call compute on the training set:
the checks that need the built model (:func:`place_replicas`; the probes in :class:`Engine`), and
the :class:`Engine` chosen for it (the fused MLP plan of :mod:`fastcurv.train_fused`, autograd one
replica at a time, or ``functional_call`` under ``vmap``), which gives the minibatch losses and
gradients of a training step and the full training-set loss.
"""
from __future__ import annotations

import copy
import math
import threading
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from .losses import cross_entropy_losses, replica_mean_losses
from .ops.csr_linear import CsrRows
from .replicas import check_output, meta_copy, run_on_copy, validate_models, vmap_replicas
from .train_fused import CsrBatch, plan_mlp
from .train_options import TrainOptions, _check_targets
from .train_random import _rng_devices, _rng_states, _seeded_section

#: the full training-set loss on the fused MLP path takes the training set in chunks of about
#: ``FULL_LOSS_ROW_ENTRIES`` entries (rows x the widest layer) for each replica, a bound that does not depend on
#: the number of replicas, so neither do the chunks nor a replica's loss; and the replicas in blocks of about
#: ``FULL_LOSS_ENTRIES`` entries in all (the memory; small chunks of many replicas run from cache)
FULL_LOSS_ROW_ENTRIES = 1 << 21
FULL_LOSS_ENTRIES = 1 << 24


def place_replicas(models: list[nn.Module], device, dtype) -> tuple[torch.device, torch.dtype]:
    """Move the replicas to ``device``/``dtype`` (default: those of the first model's first parameter) in
    training mode and return them; a ValueError for a model without parameters, replicas that are not
    one architecture (:func:`~fastcurv.replicas.validate_models`) or a BatchNorm without momentum."""
    ref = next(models[0].parameters(), None)
    if ref is None:
        raise ValueError("the model has no parameters to train")
    device = torch.device(device) if device is not None else ref.device
    dtype = dtype or ref.dtype
    for m in models:
        m.to(device=device, dtype=dtype).train()
    validate_models(models, training=True)  # the builder's replicas: one architecture, one set of settings
    cumulative = [n for n, mod in models[0].named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
                  and mod.training and mod.track_running_stats and mod.momentum is None]
    if cumulative:
        raise ValueError(f"BatchNorm {cumulative[0]!r} has momentum=None (a cumulative average of the batch statistics, "
                         "weighted by the batch count torch reads as a Python number, which batched training cannot do); "
                         "give it a momentum (torch's default: 0.1)")
    return device, dtype


class Engine:
    """How the replicas of ``model``'s architecture compute on the training set ``x [N, ...]``, ``y [N, ...]``
    (on ``device``; ``dtype`` the parameters'), chosen for ``opts`` after the checks that need the model
    on the data (BatchNorm's last minibatch, a probe step): ``plan`` (the fused MLP path, else None),
    ``per_replica`` (autograd one replica at a time, else vmap), ``has_dropout`` (the training forward
    draws random numbers), ``csr`` (the training set in CSR form for the sparse first layer, else None),
    ``fast_shared`` (the fused path with one minibatch ``[B, ...]`` for all replicas), ``name``
    (``history.engine`` without the worker threads). ``names``: the parameters' names; ``frozen``, those
    that are not trained (``requires_grad=False`` or unused by the forward pass); ``trained``, the others.

    A model that changes its input in place (``x -= mean``, ``ReLU(inplace=True)`` first) is refused
    with the operators' ValueError (:data:`~fastcurv.replicas.INPUT_CHANGED`, raised by the probe
    step, which runs on a copy of the first samples): torch.optim trains it on gathered minibatches
    (copies), but training runs the model more than once on the same tensors (SAM's two passes on
    one minibatch, the full training-set loss on the training set itself, the checks), so each
    would see data the previous one changed, and every fastcurv measurement of the trained
    population refuses the model too. Making it out of place (``x = x - mean``) computes the same.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, opts: TrainOptions, device, dtype):
        self.x, self.y, self.loss, self.device, self.dtype = x, y, opts.loss, device, dtype
        if any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules()):
            for b in sorted(set(opts.batch_sizes)):
                _check_bn_batches(model, x, len(x), b)
        draws_random, unused = _probe_training_step(model, x[:2])  # (on a copy: ValueError if the model changes it)
        has_dropout = any(isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0 for mod in model.modules())
        no_fused = "the model has dropout" if has_dropout else "the model draws random numbers in training mode"
        # random draws outside nn.Dropout modules (F.dropout, noise) are keyed per step as dropout is
        self.has_dropout = has_dropout = has_dropout or draws_random
        plan, why = None, "fused=False"
        if opts.fused is None or opts.fused:
            plan, why = plan_mlp(model, opts.loss) if not has_dropout else (None, no_fused)
            if opts.fused and plan is None:
                raise ValueError(f"fused=True, but the model does not qualify for the fused MLP path: {why}")
        # conv nets on the CPU: one replica at a time (in each worker thread) is 1.8x faster than vmap, whose batched
        # convolutions become grouped ones (a W3 step, 10 replicas on one thread: 60 against 110 ms); MLPs gain from
        # vmap's batched matrix products. Dropout keeps vmap, whose masks are drawn per replica group.
        self.per_replica = opts.fused is None and plan is None and device.type == "cpu" and not has_dropout and any(
            isinstance(mod, nn.modules.conv._ConvNd) for mod in model.modules())
        self.plan, self.fast_shared = plan, plan is not None and opts.shared
        self.name = ("fused-mlp" + ("+shared-order" if opts.shared else "")) if plan is not None else (
            f"{'per-replica autograd' if self.per_replica else 'vmap'} ({why})")
        self.names = [n for n, _ in model.named_parameters()]
        # parameters with requires_grad=False, or that the forward pass does not use, stay as they are, as torch.optim
        # (which sees no gradient) leaves them
        self.frozen = [n for n, t in model.named_parameters() if not t.requires_grad or n in unused]
        self.trained = [n for n in self.names if n not in self.frozen]
        # meta copies in training mode (the steps: dropout, BatchNorm with batch statistics, updating the running
        # statistics of the replica's own buffers in place) and in eval mode (the full training-set loss)
        self._bases = {True: meta_copy(model).train(), False: meta_copy(model).eval()}
        self._per_thread = threading.local()  # functional_call swaps tensors into the module: one copy per thread
        self._fwd = vmap(self.forward, in_dims=(0, 0, 0), randomness="different" if has_dropout else "error")
        self._batched_input = False  # (the eval forward needs its inputs batched per replica: vmap_replicas)
        self.csr = _sparse_rows(x, plan, opts.sparse_input)
        if self.csr is not None:
            self.name += f"+sparse-input ({self.csr.density:.0%} nonzero)"
        # the minibatch steps take torch's cross-entropy (precise=False), the formula of the fused engine's step and of
        # a torch.optim loop, so every engine trains as that loop; the full training-set loss (history, target_loss)
        # and evaluate_population take the precise one, which keeps the digits of confident samples
        self._step_loss = partial(replica_mean_losses, opts.loss, precise=False)

    def forward(self, p: dict, b: dict, xb: torch.Tensor, training: bool = True) -> torch.Tensor:
        """One replica's outputs on ``xb`` with parameters ``p`` and buffers ``b`` (name -> tensor), in
        training mode (dropout, BatchNorm's batch statistics) or eval mode."""
        m = getattr(self._per_thread, "bases", None)
        if m is None:
            m = self._per_thread.bases = copy.deepcopy(self._bases)
        return functional_call(m[training], (p, b), (xb,))

    def check_outputs(self, model: nn.Module, eval_train: bool) -> torch.Tensor:
        """``model``'s eval-mode outputs on the first 2 samples, ``[2, ...]``, after a ValueError when the
        targets do not fit them, when the model changes its input in place, or when the eval forward draws
        random numbers and ``eval_train`` needs a deterministic one. Run on copies of the samples and of the
        model's buffers: the check changes neither (an eval-mode buffer update, a call counter, stays out of
        the replica that is trained)."""
        devices = _rng_devices(self.device)
        params = dict(model.named_parameters())
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        with torch.no_grad(), _seeded_section(devices):
            before = _rng_states(devices)
            out0 = run_on_copy(lambda xc: self.forward(params, buffers, xc, training=False), self.x[:2])
            _check_targets(self.loss, self.y, out0)
            if eval_train and _rng_states(devices) != before:
                raise ValueError("the model draws random numbers in eval mode (e.g. F.dropout(..., training=True)): "
                                 "the full training-set loss (eval_train, target_loss) needs a deterministic "
                                 "eval-mode forward")
        return out0

    def grads(self, p: dict, bufs: dict, xb, yb: torch.Tensor, active: torch.Tensor, out: dict | None = None):
        """``(gradients, losses)`` of a training step of ``R_c`` replicas: ``p``/``bufs`` name -> ``[R_c, ...]``
        (BatchNorm's running statistics updated in place), ``xb``/``yb`` their minibatches (``[R_c, B, ...]``,
        or ``[B, ...]`` with ``fast_shared``, or a CsrBatch), ``active [R_c]`` bool. Gradients name ->
        ``[R_c, ...]`` of ``sum_r active_r * loss_r`` (written into ``out`` on the fused path; zero for the
        frozen parameters); losses ``[R_c]``, every replica's minibatch loss."""
        if self.plan is not None:
            g, losses = self.plan.loss_and_grads(p, xb, yb, active, self.loss, shared=self.fast_shared, out=out)
        elif self.per_replica:
            g, losses = self._replica_grads(p, bufs, xb, yb, active)
        else:
            # ``.data`` (unlike ``.detach()``) gets its own version counter: the in-place updates other worker
            # threads make to their groups' views of the same stacked tensors do not invalidate this graph
            leaf = {n: t.data.requires_grad_(True) for n, t in p.items()}
            losses = self._step_loss(self._fwd(leaf, bufs, xb), yb)
            total = torch.where(active, losses, torch.zeros_like(losses)).sum()
            g = torch.autograd.grad(total, [leaf[n] for n in self.names], allow_unused=True)  # (None: unused, frozen)
            g, losses = dict(zip(self.names, g)), losses.detach()
        for n in self.frozen:  # (no gradient: no SAM perturbation either)
            g[n] = torch.zeros_like(p[n])
        return g, losses

    def _replica_grads(self, p: dict, bufs: dict, xb, yb, active: torch.Tensor):
        """:meth:`grads` one replica at a time (leaves from ``.data``, as there): zero gradients and
        losses for the inactive ones."""
        grads = {n: torch.zeros_like(p[n]) for n in self.names}
        losses = torch.zeros(len(active), dtype=self.dtype, device=self.device)
        for r in active.nonzero().flatten().tolist():
            leaf = {n: t.data[r].requires_grad_(True) for n, t in p.items()}
            loss_r = self._step_loss(self.forward(leaf, {n: b_[r] for n, b_ in bufs.items()}, xb[r]).unsqueeze(0),
                                     yb[r].unsqueeze(0))
            for n, g in zip(self.names, torch.autograd.grad(loss_r.sum(), [leaf[n] for n in self.names],
                                                            allow_unused=True)):
                if g is not None:  # (None: a parameter this replica's forward does not use keeps a zero gradient)
                    grads[n][r] = g
            losses[r] = loss_r.detach()[0]
        return grads, losses

    @torch.no_grad()
    def full_loss(self, p: dict, bufs: dict, labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Full training-set loss ``[R_c]`` float64 (eval mode) of the replicas with parameters ``p`` and
        buffers ``bufs`` (name -> ``[R_c, ...]``), on their own labels ``labels [R_c, N]`` with label noise,
        else on ``y``.

        A replica's loss does not depend on the replicas it is evaluated with (``chunk_size``, the
        population, the batch-size groups), bit for bit: the training set is split into the same row
        chunks whatever ``R_c`` (:meth:`_loss_chunks`), each replica's outputs are its own products, and
        the per-sample losses are summed in float64. (Until the twenty-seventh round the fused path's chunk
        was 2^24 // (R_c * features) rows averaged in float32: the same parameters got losses 1e-7 apart
        under chunk_size 1 and 4, which flipped stops at ``target_loss``.)"""
        x, y, N, plan, csr = self.x, self.y, len(self.x), self.plan, self.csr
        Rc = next(iter(p.values())).shape[0]
        out = torch.zeros(Rc, dtype=torch.float64, device=self.device)
        rows, block = self._loss_chunks(batch_size)
        for a in range(0, Rc, block):
            pb = {n: t[a:a + block] for n, t in p.items()}
            bb = {n: t[a:a + block] for n, t in bufs.items()}
            Rb = next(iter(pb.values())).shape[0]
            for i in range(0, N, rows):
                xb, yb = x[i:i + rows], y[i:i + rows]
                if plan is None:
                    o = self._forward_eval(pb, bb, xb)
                elif csr is not None:
                    o = plan.forward(pb, CsrBatch(csr, torch.arange(i, i + len(yb), device=self.device)), shared=True)
                else:  # one product per replica (a view of the inputs for each), not the shared-order GEMM, whose
                    # rounding depends on the group's size
                    o = plan.forward(pb, xb.expand(Rb, *xb.shape), shared=False)
                target = (yb.unsqueeze(0).expand(Rb, *yb.shape) if labels is None
                          else labels[a:a + Rb, i:i + rows].long())
                out[a:a + Rb] += summed_losses(self.loss, o, target)
        return out / N

    def _forward_eval(self, p: dict, b: dict, xb: torch.Tensor) -> torch.Tensor:
        """Eval-mode outputs ``[R_c, n, ...]`` of the replicas ``p``/``b`` (name -> ``[R_c, ...]``) on the
        samples ``xb`` that all of them share, vmapped (:func:`~fastcurv.replicas.vmap_replicas`: ``xb``
        batched per replica once the model needed it, a model that fills a tensor it allocates from its
        input, ``x.new_zeros(...)``)."""
        out, self._batched_input = vmap_replicas(partial(self.forward, training=False), p, b, xb, self._batched_input)
        return out

    def _loss_chunks(self, batch_size: int) -> tuple[int, int]:
        """``(rows, replicas)``: the full training-set loss takes the training set in chunks of ``rows``
        samples, and the replicas in blocks of at most ``replicas``. On the fused MLP path a chunk holds
        about ``FULL_LOSS_ROW_ENTRIES`` entries of the widest layer input or output for each replica,
        whatever the number of replicas, and a block as many replicas as keep ``FULL_LOSS_ENTRIES`` in
        all (at least one; MNIST's 784 inputs: 2674 rows, 8 replicas); other models (conv
        activations, BatchNorm without running statistics, which normalizes each chunk by itself) take
        chunks of the training minibatches' size ``batch_size`` (within a step's memory) and all replicas."""
        if self.plan is None:
            return batch_size, 1 << 62
        widest = max([int(np.prod(self.x.shape[1:]))] + [L.out_features for L in self.plan.layers])
        rows = max(1, min(len(self.x), FULL_LOSS_ROW_ENTRIES // widest))
        return rows, max(1, FULL_LOSS_ENTRIES // (rows * widest))


def summed_losses(kind: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each replica's sum over the samples of its per-sample loss, ``[R]`` float64, for outputs
    ``[R, b, ...]`` and targets ``[R, b, ...]`` of the named loss ``kind`` (the precise cross-entropy,
    :func:`~fastcurv.losses.cross_entropy_losses`, or the MSE averaged over a sample's outputs): the
    per-sample losses in the outputs' dtype, their sum in float64, so the total over a data set barely
    depends on how it is split into chunks (to float64 rounding) and not at all on the other replicas."""
    if kind == "cross_entropy":
        return cross_entropy_losses(outputs, targets).double().sum(1)
    if kind == "mse":  # (the sum over a sample's outputs, divided by their number)
        per_entry = (outputs - targets.to(outputs.dtype)) ** 2
        return per_entry.reshape(len(outputs), -1).double().sum(1) / math.prod(outputs.shape[2:])
    raise ValueError(f"summed_losses takes 'cross_entropy' or 'mse', got {kind!r}")


def _check_bn_batches(model: nn.Module, x: torch.Tensor, N: int, batch_size: int) -> None:
    """Raise a ValueError before training when an epoch's last minibatch holds a single sample that a
    BatchNorm in training mode cannot normalize (torch refuses one value per channel)."""
    last = N % batch_size or min(N, batch_size)
    if last != 1:
        return
    probe = copy.deepcopy(model).train()
    try:
        with torch.no_grad(), _seeded_section(_rng_devices(x.device)):  # (dropout)
            probe(x[:1].clone())  # (a copy: the probe step that follows refuses a model that changes its input)
    except ValueError as e:
        raise ValueError(f"the last minibatch of every epoch holds 1 sample (N={N}, batch_size={batch_size}), and "
                         f"BatchNorm in training mode cannot normalize it ({e}); choose a batch_size that leaves "
                         "more than one sample over") from None


def _probe_training_step(model: nn.Module, xb: torch.Tensor) -> tuple[bool, list[str]]:
    """One training-mode forward and backward of a copy of ``model`` on the samples ``xb`` (a few):
    ``(draws_random, unused)``.

    draws_random: whether the forward draws from torch's global random generators (dropout in any
    form: ``nn.Dropout``, ``F.dropout`` in ``forward``, noise injection), which the training steps
    must then key as they key dropout masks. unused: the names of the trainable parameters that get
    no gradient (not used by the forward pass: torch.optim skips them, and so does training).
    The global RNG is left as it was, and ``xb`` too: the forward runs on a copy, and a model that
    changes its input in place raises the ValueError :data:`~fastcurv.replicas.INPUT_CHANGED`
    (see :class:`Engine`). The forward runs with grad mode on whatever the caller's: under the
    caller's ``torch.no_grad`` every parameter read as unused, and training returned the models as
    initialized.
    """
    probe = copy.deepcopy(model).train()
    devices = _rng_devices(xb.device)
    # (the section: another call's draws meanwhile would read as this model's; grad on: the caller's no_grad)
    with _seeded_section(devices), torch.enable_grad():
        before = _rng_states(devices)
        try:
            out = run_on_copy(probe, xb)
        except (RuntimeError, IndexError) as exc:  # (IndexError: token ids beyond an nn.Embedding's table)
            raise model_cannot_run("the first samples", xb, exc) from exc
        draws_random = _rng_states(devices) != before
    check_output(out)
    wanted = [(n, p) for n, p in probe.named_parameters() if p.requires_grad]
    if not wanted:
        return draws_random, []
    if not out.requires_grad:  # (none of them used: e.g. the only trainable one is an unused head)
        return draws_random, [n for n, _ in wanted]
    grads = torch.autograd.grad(out.sum(), [p for _, p in wanted], allow_unused=True)
    return draws_random, [n for (n, _), g in zip(wanted, grads) if g is None]


def model_cannot_run(where: str, xb: torch.Tensor, exc: Exception) -> ValueError:
    """The ValueError for a model that raised ``exc`` (torch's RuntimeError or IndexError) on ``where``
    (e.g. "the first batch"), the inputs ``xb``: "the model cannot run on <where> (inputs <shape>,
    <dtype>): <torch's message>", the wording of training's check and of the operators'."""
    return ValueError(f"the model cannot run on {where} (inputs {tuple(xb.shape)}, {xb.dtype}): {exc}")


def _sparse_rows(x: torch.Tensor, plan, sparse_input: bool | None) -> CsrRows | None:
    """The training set in CSR form when the first layer should multiply only nonzero inputs, else None."""
    if sparse_input is False:
        return None
    csr, why = (None, "the model does not take the fused MLP path") if plan is None else plan.sparse_rows(x, sparse_input)
    if sparse_input and csr is None:
        raise ValueError(f"sparse_input=True, but {why}")
    return csr
