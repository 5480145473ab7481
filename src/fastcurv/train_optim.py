"""The optimizer of :func:`fastcurv.train.train_population`: its settings (:class:`OptimizerSettings`),
its initial state (:func:`initial_state`), and the in-place update of a replica group's stacked
parameters (:class:`GroupOptimizer`), by the formulas of ``torch.optim.SGD`` / ``Adam`` / ``AdamW``
(see the module docstring of :mod:`fastcurv.train`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .train_options import TrainOptions
from .train_rows import _bcast, _restore_rows, _rows

_FUSED_SGD = getattr(torch, "_fused_sgd_", None)  # private torch op behind SGD(fused=True); foreach ops if absent


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer of a call, the same for every replica group: ``name`` ("sgd", "adam" or "adamw"),
    ``nesterov``, Adam's ``b1``, ``b2`` and ``eps``, ``hdt`` the dtype of the per-replica coefficients,
    and ``sgd_scalars``: SGD's ``(lr, momentum, weight_decay)`` when they are the same for every replica
    of the population (of every batch-size group, also where one group alone would have one setting: its
    replicas train as in a call with one batch size), else None."""

    name: str
    nesterov: bool
    b1: float
    b2: float
    eps: object
    hdt: torch.dtype
    sgd_scalars: tuple | None


def optimizer_settings(opts: TrainOptions, hp: dict, hdt: torch.dtype) -> OptimizerSettings:
    """The :class:`OptimizerSettings` of ``opts``, with the per-replica hyperparameters ``hp`` (name -> ``[R]``)."""
    sgd_scalars = None
    if opts.optimizer == "sgd" and all(bool((hp[k] == hp[k][0]).all()) for k in ("lr", "momentum", "weight_decay")):
        sgd_scalars = tuple(float(hp[k][0]) for k in ("lr", "momentum", "weight_decay"))
    return OptimizerSettings(name=opts.optimizer, nesterov=opts.nesterov, b1=float(opts.betas[0]),
                             b2=float(opts.betas[1]), eps=opts.eps, hdt=hdt, sgd_scalars=sgd_scalars)


def initial_state(optimizer: str, params: dict, device) -> dict:
    """The optimizer state of a fresh population with parameters ``params`` (name -> ``[R, ...]``):
    ``{"step": [R] int64}`` and SGD's momentum buffers ``"buf"`` or Adam's moments ``"m"``, ``"v"`` (name ->
    zeros like the parameter, so the first SGD step gives ``buf = g`` as torch.optim does)."""
    R = len(next(iter(params.values())))
    state = {"step": torch.zeros(R, dtype=torch.int64, device=device)}
    for key in ("buf",) if optimizer == "sgd" else ("m", "v"):
        state[key] = {n: torch.zeros_like(p) for n, p in params.items()}
    return state


class GroupOptimizer:
    """The optimizer steps of one replica group: ``params``, ``state`` and ``hp`` are its rows (name ->
    ``[R_g, ...]``, ``[R_g]``), updated in place; ``trained`` the parameters it updates; ``gbuf`` the fused
    path's gradient buffers (name -> ``[R_g, ...]``, where every step's gradients are; None off that path)."""

    def __init__(self, settings: OptimizerSettings, params: dict, state: dict, hp: dict, trained: list[str],
                 gbuf: dict | None):
        self.settings, self.params, self.state, self.hp, self.trained, self.gbuf = (
            settings, params, state, hp, trained, gbuf)
        self._sgd_views: dict = {}  # chunk -> its per-replica views for the fused SGD kernel

    @torch.no_grad()
    def step(self, p: dict, g: dict, active: torch.Tensor, sl: slice) -> None:
        """One optimizer step, in place, for the replicas in ``active [R_c]`` of the rows ``sl`` (``p``, ``g``:
        name -> views ``[R_c, ...]`` of their parameters and gradients); the others keep parameters and state.

        Inactive replicas get identity coefficients (learning rate 0, momentum/beta 1, gradient
        scale 0) instead of a masked copy, so the common all-active case costs no extra passes.
        """
        all_active = bool(active.all())
        steps = self.state["step"][sl]
        steps += 1 if all_active else active.long()
        if self.settings.sgd_scalars is not None:  # one learning rate/momentum/decay for all: foreach, scalar ops
            # the same kernel for the active replicas whatever the others do, their rows kept as they were: the
            # coefficient path below rounds otherwise (3e-8 in float32), and a replica's result changed when
            # another in its group stopped at target_loss (so with chunk_size, and with the batch-size groups)
            rows = {} if all_active else {(k, n): src[n][sl] for k, src in (("w", self.params),
                                                                            ("buf", self.state["buf"]))
                                          for n in self.trained}
            kept = _rows(rows, ~active)
            self._sgd_uniform(p, g, sl)
            _restore_rows(rows, kept)
            return
        self._coefficient_step(p, g, active, all_active, steps, sl)

    def _coefficient_step(self, p: dict, g: dict, active: torch.Tensor, all_active: bool, steps: torch.Tensor,
                          sl: slice) -> None:
        """:meth:`step` with per-replica coefficients ``[R_c]`` (``steps``: the replicas' step counts, this
        step included)."""
        s, hp, state = self.settings, self.hp, self.state
        a = active.to(s.hdt)
        lr_ = hp["lr"][sl] * a
        wd = hp["weight_decay"][sl] * a
        wd_any = bool((wd != 0).any())
        momentum_ = hp["momentum"][sl]
        if s.name == "sgd":
            mom = torch.where(active, momentum_, torch.ones_like(momentum_))
        else:
            t = steps.double()  # (the bias corrections in float64, as torch.optim's Python numbers)
            bc1 = torch.where(steps > 0, 1 - s.b1 ** t, torch.ones_like(t))
            bc2 = torch.where(steps > 0, 1 - s.b2 ** t, torch.ones_like(t))
            beta1 = torch.where(active, torch.full_like(a, s.b1), torch.ones_like(a))
            beta2 = torch.where(active, torch.full_like(a, s.b2), torch.ones_like(a))
            step_size = (lr_ / bc1).to(s.hdt)
            sqrt_bc2 = bc2.sqrt().to(s.hdt)
        for n in self.trained:
            w, gn = p[n], g[n]
            if not all_active:
                gn = torch.where(_bcast(active, gn), gn, torch.zeros_like(gn))
            if s.name == "sgd":
                if wd_any:
                    gn = gn.addcmul(w, _bcast(wd, w))
                buf = state["buf"][n][sl]
                buf.mul_(_bcast(mom, w)).add_(gn)
                d = gn.addcmul(buf, _bcast(momentum_, w)) if s.nesterov else buf
                w.addcmul_(d, _bcast(lr_, w), value=-1)
            else:
                if s.name == "adam" and wd_any:
                    gn = gn.addcmul(w, _bcast(wd, w))
                elif s.name == "adamw" and wd_any:
                    w.mul_(_bcast(1 - lr_ * wd, w))
                m, v = state["m"][n][sl], state["v"][n][sl]
                m.mul_(_bcast(beta1, w)).add_(gn * _bcast(1 - beta1, w))
                v.mul_(_bcast(beta2, w)).addcmul_(gn, gn * _bcast(1 - beta2, w))
                denom = v.sqrt().div_(_bcast(sqrt_bc2, w)).add_(s.eps)
                w.sub_(m.div(denom).mul_(_bcast(step_size, w)))

    def _fused_sgd_views(self, sl: slice):
        """``[ws, gs, bufs]`` for torch's fused SGD kernel on the chunk ``sl`` of the group's replicas (in
        storage order: the transposed first layer as ``[in, out]``), or None where it cannot run. Built once
        per chunk: the fused path's gradients live in fixed buffers (``gbuf``).

        The kernel rounds its vectorized body and its scalar tail (a tensor's last ``numel % vector
        width`` elements) differently, and splits a tensor among torch's threads at multiples of 64
        bytes. A parameter whose replicas hold a multiple of 64 elements each gets one tensor for the
        group (no tail: every element vectorized, whatever the grouping); any other gets one tensor per
        replica (the same tail in every replica). Either way an element's result does not depend on
        the replica groups (``chunk_size``, batch sizes) or threads. (One tensor for the group for every
        parameter would put the last replica's tail wherever the grouping ends: 6e-8 apart in float32.)
        """
        key = (sl.start, sl.stop)
        if key not in self._sgd_views:
            views = None
            # (torch's CPU kernel leaves the vectorized body of float16 / bfloat16 tensors unchanged)
            if _FUSED_SGD is not None and self.gbuf is not None and self.params[self.trained[0]].dtype in (torch.float32, torch.float64):
                views = [[_storage_order(t) for n in self.trained
                          for t in ([src[n][sl]] if src[n][0].numel() % 64 == 0 else src[n][sl].unbind(0))]
                         for src in (self.params, self.gbuf, self.state["buf"])]
                if not all(w.shape == g.shape == b.shape and all(t.is_contiguous() for t in (w, g, b))
                           for w, g, b in zip(*views)):
                    views = None
            self._sgd_views[key] = views
        return self._sgd_views[key]

    def _sgd_uniform(self, p: dict, g: dict, sl: slice) -> None:
        """The SGD step of the chunk ``sl`` (parameters ``p``, gradients ``g``: views of its rows)
        with one lr/momentum/weight decay for all: torch's fused SGD kernel on the fused MLP path (one
        pass over w, g and buf), else torch.optim.SGD's foreach ops; either way each element's result
        depends on its replica's values only."""
        trained, nesterov = self.trained, self.settings.nesterov
        if not trained:  # (every parameter frozen or unused; torch's list ops refuse empty lists)
            return
        lr0, mom0, wd0 = self.settings.sgd_scalars
        views = self._fused_sgd_views(sl)
        if views is not None:
            ws, gs, bufs = views
            # (plain SGD: the kernel takes no momentum buffers, and refuses them)
            _FUSED_SGD(ws, gs, bufs if mom0 else [], weight_decay=wd0, momentum=mom0, lr=lr0, dampening=0.0,
                       nesterov=nesterov, maximize=False, is_first_step=False)  # buf starts at 0: mom*0 + g = g
            return
        ws, gs = [p[n] for n in trained], [g[n] for n in trained]
        own = self.gbuf is not None  # g: the fused path's own gradient buffers, free to update in place
        if wd0:
            if own:
                torch._foreach_add_(gs, ws, alpha=wd0)
            else:
                gs = torch._foreach_add(gs, ws, alpha=wd0)
        d = gs
        if mom0:
            bufs = [self.state["buf"][n][sl] for n in trained]
            torch._foreach_mul_(bufs, mom0)
            torch._foreach_add_(bufs, gs)
            if not nesterov:
                d = bufs
            elif own:
                torch._foreach_add_(gs, bufs, alpha=mom0)
            else:
                d = torch._foreach_add(gs, bufs, alpha=mom0)
        torch._foreach_add_(ws, d, alpha=-lr0)


def _storage_order(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or its transpose when that is the contiguous one (elementwise updates see no difference)."""
    return t.transpose(-2, -1) if t.dim() >= 2 and not t.is_contiguous() and t.transpose(-2, -1).is_contiguous() else t
