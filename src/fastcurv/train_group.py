"""The training state of a :func:`fastcurv.train.train_population` call (:class:`Population`) and its
replica groups, one per batch size (:func:`make_groups`): each :class:`ReplicaGroup` holds its rows of
the population's tensors and trains them epoch by epoch, in tasks that worker threads can run in
parallel (each task a share of the group's chunks: replicas that step together).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.func import stack_module_state

from .replicas import nonfinite_rows
from .train_data import Minibatches, epoch_orders
from .train_engine import Engine
from .train_optim import GroupOptimizer, OptimizerSettings, initial_state
from .train_options import TrainOptions
from .train_random import _dropout_rng
from .train_rows import _bcast, _merge_rows, _restore_rows, _rows, _transposed_storage

# the population's tensors a checkpoint holds (and a group's :meth:`ReplicaGroup.tensors`)
STATE_KEYS = ("params", "buffers", "state", "diverged", "done", "epochs_run")


@dataclass
class Population:
    """The training state of all R replicas, stacked: ``params``/``buffers`` name -> ``[R, ...]``, the
    optimizer ``state`` (:func:`~fastcurv.train_optim.initial_state`), ``hp`` name -> ``[R]``
    hyperparameters, ``diverged``/``done`` ``[R]`` bools (on the device), ``epochs_run`` ``[R]`` int64 (on
    the CPU), ``labels`` ``[R, N]`` each replica's labels with label noise (else None), and the seeds."""

    seeds: list[int]
    data_seeds: list[int]
    params: dict
    buffers: dict
    state: dict
    hp: dict
    diverged: torch.Tensor
    done: torch.Tensor
    epochs_run: torch.Tensor
    labels: torch.Tensor | None


def initial_population(models: list[nn.Module], opts: TrainOptions, hp: dict, labels: torch.Tensor | None,
                       device) -> Population:
    """The replicas ``models`` stacked (copies of their parameters, contiguous) with a fresh optimizer state,
    none diverged, stopped or trained yet."""
    params, buffers = stack_module_state(models)
    params = {n: p.detach().clone().contiguous() for n, p in params.items()}
    R = len(models)
    return Population(seeds=opts.seeds, data_seeds=opts.data_seeds, params=params, buffers=buffers,
                      state=initial_state(opts.optimizer, params, device), hp=hp,
                      diverged=torch.zeros(R, dtype=torch.bool, device=device),
                      done=torch.zeros(R, dtype=torch.bool, device=device),
                      epochs_run=torch.zeros(R, dtype=torch.int64), labels=labels)


def make_groups(pop: Population, engine: Engine, optim: OptimizerSettings, opts: TrainOptions,
                most_workers: int) -> list[ReplicaGroup]:
    """One :class:`ReplicaGroup` per batch size (in the order of first appearance in ``opts.batch_sizes``),
    each training as a call with that batch size would; SAM's second pass runs in every group when any
    replica of the population has ``sam_rho > 0``."""
    by_size: dict = {}
    for r, b in enumerate(opts.batch_sizes):
        by_size.setdefault(b, []).append(r)
    use_sam = bool((pop.hp["sam_rho"] > 0).any())
    return [ReplicaGroup(idx, b, pop, engine, optim, opts, use_sam, most_workers) for b, idx in by_size.items()]


def merged_rows(groups: list[ReplicaGroup], R: int, get):
    """``get(group.tensors())`` of every group as one population's rows, on the CPU, in replica order."""
    return _merge_rows([(g.idx, get(g.tensors())) for g in groups], R)


def _default_chunk_size(R: int, workers: int, replica_bytes: int) -> int:
    """How many of R replicas step together by default: as many as keep their parameters, gradients and
    optimizer state (``replica_bytes`` a replica) within ~24 MiB, in chunks of equal size that share out
    evenly among ``workers``."""
    most = max(1, (24 << 20) // max(1, replica_bytes))
    per_worker = -(-R // (workers * most))  # chunks per worker; equal-sized chunks balance the workers
    return max(1, -(-R // (workers * per_worker)))


class ReplicaGroup:
    """The replicas ``idx`` (sorted) of the population ``pop``, which all train with ``batch_size``: their
    rows of its tensors and settings (the tensors themselves when ``idx`` is every replica; rows in the
    order of ``idx``), split into chunks of ``chunk_size`` replicas (the default keeps a chunk's
    parameters, gradients and optimizer state within ~24 MiB) that step together, and the chunks into
    ``workers`` shares, one per worker thread (at most ``most_workers``)."""

    def __init__(self, idx: list[int], batch_size: int, pop: Population, engine: Engine, optim: OptimizerSettings,
                 opts: TrainOptions, use_sam: bool, most_workers: int):
        whole = idx == list(range(len(pop.seeds)))
        pick = torch.tensor(idx, dtype=torch.long)

        def rows(t):
            if whole or t is None:
                return t
            if isinstance(t, dict):
                return {k: rows(v) for k, v in t.items()}
            if isinstance(t, list):
                return [t[i] for i in idx]
            return t[pick.to(t.device)]

        self.idx, self.batch_size, self.engine, self.use_sam = idx, batch_size, engine, use_sam
        self.eval_train, self.target_loss, self.hdt = opts.eval_train, opts.target_loss, optim.hdt
        self.seeds, self.data_seeds, self.params, self.buffers, self.state, self.hp, self.diverged, self.done, \
            self.epochs_run, self.labels = (rows(getattr(pop, k)) for k in (
                "seeds", "data_seeds", "params", "buffers", "state", "hp", "diverged", "done", "epochs_run", "labels"))
        if engine.csr is not None:  # the first layer's weight and everything updated with it, stored as [R, in, out]
            w0 = engine.plan.layers[0].weight
            self.params[w0] = _transposed_storage(self.params[w0])
            for group in self.state.values():
                if isinstance(group, dict):
                    group[w0] = _transposed_storage(group[w0])
        self.gbuf = {n: torch.empty_like(self.params[n]) for n in engine.names} if engine.plan is not None else None
        self.optimizer = GroupOptimizer(optim, self.params, self.state, self.hp, engine.trained, self.gbuf)
        R = len(idx)
        self.workers = min(most_workers, R)
        size = opts.chunk_size
        if size is None:
            copies = 3 if optim.name == "sgd" else 4  # w, g and SGD's buf, or Adam's m and v
            replica_bytes = sum(t[0].numel() for t in self.params.values()) * torch.finfo(engine.dtype).bits // 8
            size = _default_chunk_size(R, self.workers, replica_bytes * copies)
        chunks = [slice(c, min(R, c + int(size))) for c in range(0, R, int(size))]
        self.workers = min(self.workers, len(chunks))
        self.shares = [chunks[w::self.workers] for w in range(self.workers)]  # each worker's chunks
        self.batches = [Minibatches(engine.x, engine.y, self.labels, engine.csr, batch_size, engine.fast_shared,
                                    int(size)) for _ in range(self.workers)]
        self.epoch: dict = {}  # the epoch under way: active replicas, minibatch loss sums, full losses

    def live(self) -> bool:
        """Whether a replica of the group still trains (not diverged, not stopped at ``target_loss``)."""
        return not bool((self.done | self.diverged).all())

    def train_tasks(self, epoch: int) -> list:
        """The epoch's training, one task per worker (to run in any order, in parallel)."""
        e = self.engine
        self.epoch["active"] = ~(self.done | self.diverged)
        orders = epoch_orders(self.data_seeds, epoch, len(e.x), e.fast_shared, e.device)
        self.epoch["loss_sum"] = loss_sum = torch.zeros(len(self.idx), dtype=torch.float64, device=e.device)
        return [partial(self._train_share, w, epoch, orders, loss_sum) for w in range(self.workers)]

    def eval_tasks(self) -> list:
        """After the training tasks: the full training-set losses, one task per worker (none without
        ``eval_train``)."""
        if not self.eval_train:
            return []
        self.epoch["loss"] = out = torch.zeros(len(self.idx), dtype=torch.float64, device=self.engine.device)
        return [partial(self._full_loss_share, w, out) for w in range(self.workers)]

    def end_epoch(self) -> torch.Tensor:
        """After the evaluation tasks: mark the diverged and stopped replicas; the epoch's losses ``[R_g]``
        (NaN for the replicas that did not train in it or diverged)."""
        active_epoch = self.epoch["active"]
        self.epochs_run.add_(active_epoch.cpu().long())
        ep_loss = self.epoch["loss"] if self.eval_train else self.epoch["loss_sum"] / len(self.engine.x)
        ep_loss = torch.where(active_epoch & ~self.diverged, ep_loss, torch.full_like(ep_loss, float("nan")))
        # replicas whose parameters became non-finite without a non-finite loss
        nonfinite = nonfinite_rows([self.params[n] for n in self.engine.names])
        newly = nonfinite & ~self.diverged
        if bool(newly.any()):
            self.diverged |= newly
            self._kill(self.params, newly)
        if self.eval_train:
            newly = ~torch.isfinite(ep_loss) & active_epoch & ~self.diverged
            self.diverged |= newly
            self._kill(self.params, newly)
        if self.target_loss is not None:
            self.done |= active_epoch & ~self.diverged & (ep_loss <= self.target_loss)
        return ep_loss

    def tensors(self) -> dict:
        """The group's training state as of now (:data:`STATE_KEYS`, its rows in the order of ``idx``)."""
        return {"params": self.params, "buffers": self.buffers, "state": self.state, "diverged": self.diverged,
                "done": self.done, "epochs_run": self.epochs_run}

    @torch.no_grad()
    def write_to(self, models: list[nn.Module]) -> None:
        """Copy the group's parameters and buffers into its replicas of ``models`` (all R), in eval mode."""
        for j, r in enumerate(self.idx):
            for n, p in models[r].named_parameters():
                p.copy_(self.params[n][j])
            for n, b_ in models[r].named_buffers():
                b_.copy_(self.buffers[n][j])
            models[r].eval()

    def _train_share(self, w: int, epoch: int, orders: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """One epoch for worker ``w``'s chunks: all steps, no synchronization with other workers."""
        for k in range(-(-len(self.engine.x) // self.batch_size)):
            for sl, xc, yc, nb in self.batches[w].of_step(orders, k, self.shares[w]):
                self._step(sl, xc, yc, (*self.seeds[sl], epoch, k), loss_sum, nb)

    def _step(self, sl: slice, xc, yc, key: tuple, loss_sum: torch.Tensor, nb: int) -> None:
        """One training step of the replicas ``sl`` on their minibatches ``xc``, ``yc`` (of ``nb`` samples;
        dropout keyed by ``key``): replicas whose loss is not finite are marked diverged and set to NaN, the
        others take an optimizer step and add their loss times ``nb`` to ``loss_sum [R_g]``."""
        e = self.engine
        pc = {n: self.params[n][sl] for n in e.names}  # views: updated in place
        # views that BatchNorm's running statistics update in place; ``.data`` for the reason given in Engine.grads
        bc = {n: b_[sl].data for n, b_ in self.buffers.items()}
        active = ~(self.done[sl] | self.diverged[sl])
        stopped = _rows(bc, ~active)  # the buffers of replicas that do not train stay as they are
        with _dropout_rng(e.has_dropout, e.device, key):
            g, losses = self._grads(pc, bc, xc, yc, active, sl)
            bad = active & ~torch.isfinite(losses)
            if self.use_sam:
                g = self._sam_grads(pc, bc, xc, yc, active, sl, g)
        _restore_rows(bc, stopped)
        if bool(bad.any()):
            self.diverged[sl] |= bad
            self._kill(pc, bad)
            active = active & ~bad
        self.optimizer.step(pc, g, active, sl)
        loss_sum[sl] += torch.where(active, losses.double(), torch.zeros_like(losses.double())) * nb

    def _grads(self, p: dict, bufs: dict, xb, yb, active: torch.Tensor, sl: slice):
        """:meth:`Engine.grads` of the replicas ``sl``, into their rows of the gradient buffers on the fused path."""
        out = {n: self.gbuf[n][sl] for n in self.engine.names} if self.gbuf is not None else None
        return self.engine.grads(p, bufs, xb, yb, active, out)

    def _sam_grads(self, pc: dict, bc: dict, xc, yc, active: torch.Tensor, sl: slice, g: dict) -> dict:
        """SAM's gradients of the replicas ``sl``: at ``pc + rho * g / ||g||`` (``g`` their gradients at ``pc``,
        the norm over each replica's parameters); the perturbed pass updates no BatchNorm statistics."""
        Rc = sl.stop - sl.start
        sq = sum(gn.reshape(Rc, -1).double().pow(2).sum(1) for gn in g.values())
        scale = (self.hp["sam_rho"][sl] / (sq.sqrt().to(self.hdt) + 1e-12)).to(self.engine.dtype)
        pert = {n: pc[n] + _bcast(scale, pc[n]) * g[n] for n in self.engine.names}
        first = _rows(bc, torch.ones_like(active))
        g, _ = self._grads(pert, bc, xc, yc, active, sl)
        _restore_rows(bc, first)
        return g

    def _full_loss_share(self, w: int, out: torch.Tensor) -> None:
        """The full training-set losses of worker ``w``'s chunks, into their rows of ``out [R_g]``."""
        for sl in self.shares[w]:
            labels = None if self.labels is None else self.labels[sl]
            out[sl] = self.engine.full_loss({n: self.params[n][sl] for n in self.engine.names},
                                            {n: b_[sl] for n, b_ in self.buffers.items()}, labels, self.batch_size)

    @torch.no_grad()
    def _kill(self, p: dict, bad: torch.Tensor) -> None:
        """Set the parameters of replicas ``bad`` to NaN, in place (``p`` may hold views)."""
        for n in self.engine.names:
            p[n][bad] = float("nan")
