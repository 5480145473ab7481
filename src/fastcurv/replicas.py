"""Stacking R same-architecture models into one batched parameter set (replica axis R): the
:class:`ReplicaSet`, and its guard against models changed since (:meth:`ReplicaSet.changed_since_built`).

Flat vector layout used everywhere in fastcurv: ``[R, P]`` or ``[R, K, P]``, P = the number of
parameter entries in ``model.parameters()`` order, each parameter flattened row-major.

The checks that models are replicas of one architecture are in :mod:`fastcurv.model_checks`, the
functional copy of a model in :mod:`fastcurv.model_copy`, the helpers that run one in
:mod:`fastcurv.model_run` and the tensor-state comparisons in :mod:`fastcurv.tensor_state`; their
public names are importable from here too.
"""
from __future__ import annotations

import copy
import warnings
import weakref
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call

from .model_checks import REPLICA_SET_NOT_TAKEN, model_list, module_settings, tied_parameters, validate_models
from .model_copy import _BN_TYPES, BN_MODES, InPlaceSpectralNorm, PlainWeightNorm, functional_base, meta_copy
from .model_run import INPUT_CHANGED, _WRITTEN_IN_FORWARD, check_output, run_on_copy, vmap_replicas
from .tensor_state import _in_storage, _same_bytes, _same_values, _version

__all__ = ["BN_MODES", "INPUT_CHANGED", "REPLICA_SET_NOT_TAKEN", "InPlaceSpectralNorm", "PlainWeightNorm", "ReplicaSet",
           "check_output", "consecutive_runs", "functional_base", "meta_copy", "model_list", "module_settings",
           "nonfinite_rows", "run_on_copy", "tied_parameters", "validate_models", "vmap_replicas"]


def nonfinite_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[R]`` bool: replica ``r`` has a NaN/Inf entry in any of the ``[R, ...]`` tensors.

    A finite row sum implies finite entries (NaN and Inf propagate through sums), so one summing
    pass clears almost every row; only rows whose sum is not finite (a NaN/Inf, or a float overflow
    of the sum) get the exact elementwise check.
    """
    R = tensors[0].shape[0]
    bad = torch.zeros(R, dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        t = t.reshape(R, -1)
        maybe = ~torch.isfinite(t.sum(1))
        if bool(maybe.any()):
            rows = maybe.nonzero().squeeze(1)
            bad[rows] |= ~torch.isfinite(t[rows]).all(1)
    return bad


def consecutive_runs(index: torch.Tensor | None, n: int):
    """The runs of consecutive replicas in ``index`` (None: ``0..n-1``), as ``(first replica,
    first position in index, length)``: replicas ``first..first+length-1`` sit at positions
    ``position..position+length-1`` of ``index``, so both are slices (views, not copies)."""
    if index is None:
        yield 0, 0, n
        return
    v = index.tolist()
    start = 0
    for j in range(1, len(v) + 1):
        if j == len(v) or v[j] != v[j - 1] + 1:
            yield v[start], start, j - start
            start = j


_MISSING = object()  # (a dict key that is gone)


def _NO_MODULE():
    """A submodule slot that held None (as a weak reference's call gives)."""
    return None


def _grouped(kept: list) -> dict:
    """``kept``'s ``(tensor, record)`` pairs (see ``ReplicaSet._watch``) grouped by the stacked tensor
    their copies are in, ``("params" or "buffers", name)``, in their order."""
    groups: dict = {}
    for t, rec in kept:
        groups.setdefault((rec[6], rec[7]), []).append((t, rec))
    return groups


class ReplicaSet:
    """R replicas of one architecture, their parameters stacked along a leading axis.

    Attributes:
        params: ``{name: [R, *shape]}`` detached parameter tensors, ``model.parameters()`` order.
        buffers: ``{name: [R, *shape]}`` the buffers the functional model uses.
        finite: ``[R]`` bool, False for replicas whose parameters contain NaN or Inf.
        R, P: number of replicas and of parameter entries per replica.

    ``params`` and ``buffers`` are copies of the models' tensors when the set is built: the set does
    not follow later changes of the models. It remembers which tensors (and submodules) it copied,
    so that :meth:`changed_since_built` can tell (and the operators built on it refuse to run) once
    the models were changed in place (an optimizer step) or given new tensors or layers.
    """

    def __init__(self, models: Sequence[nn.Module], *, bn_mode: str = "eval"):
        models = validate_models(models)
        self.bn_mode = bn_mode
        self.base = functional_base(models[0], bn_mode)
        self.names = [n for n, _ in models[0].named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in models[0].named_parameters()]
        self.numels = [int(torch.Size(s).numel()) for s in self.shapes]
        self.P = sum(self.numels)
        self.R = len(models)
        # each model's name -> tensor maps, built once (looking each name up in a fresh walk of the
        # model made building the set quadratic in the number of parameter tensors)
        named = [dict(m.named_parameters()) for m in models]
        named_buffers = [dict(m.named_buffers()) for m in models]
        with torch.no_grad():
            self.params = {n: torch.stack([d[n].detach() for d in named]) for n in self.names}
            buffer_names = [n for n, b in self.base.named_buffers() if b is not None]
            self.buffers = {n: torch.stack([d[n].detach() for d in named_buffers]) for n in buffer_names}
        self._sources = self._watch(models, named, named_buffers, buffer_names)
        first = self.params[self.names[0]]
        self.dtype, self.device = first.dtype, first.device
        self.finite = ~nonfinite_rows([self.params[n] for n in self.names]).cpu()
        bad = (~self.finite).nonzero().flatten().tolist()
        if bad:
            warnings.warn(
                f"replicas {bad} have non-finite (NaN/Inf) parameters: their results will be NaN and flagged",
                RuntimeWarning,
                stacklevel=3,
            )

    # --- the models it was built from -----------------------------------------------------------
    def _watch(self, models: list, named: list[dict], named_buffers: list[dict], buffer_names: list) -> tuple:
        """What :meth:`changed_since_built` compares: ``(links, tensors)``. The models' modules are held
        weakly (the set does not keep the models alive), their tensors not at all: a weak reference
        to a tensor makes ``torch.utils.swap_tensors`` refuse it, and so the users' own swap-based
        conversions (``load_state_dict``, ``.double()`` under
        ``torch.__future__.set_swap_module_params_on_conversion(True)``).

        ``links``: ``(parent, child name, child, description)`` for every submodule of every model
        (a layer swapped for another is seen there, even when the old one died with its weights).
        ``tensors``: ``[id of the tensor, owning module, "_parameters" or "_buffers", key, version
        counter, data pointer, "params" or "buffers", name, replica, description, the set's copy]`` of
        every parameter and used buffer (``named``/``named_buffers``: each model's name -> tensor; the
        copy: the replica's view of the stacked tensor), a list so that the record can follow a tensor
        that holds the same values elsewhere (``share_memory()``, or a new tensor object from a no-op
        conversion)."""
        links, tensors = [], []
        for r, (model, params, buffers) in enumerate(zip(models, named, named_buffers)):
            for path, mod in model.named_modules():
                for cname, child in mod._modules.items():
                    where = f"{path}.{cname}" if path else cname
                    links.append((weakref.ref(mod), cname, _NO_MODULE if child is None else weakref.ref(child),
                                  f"module {where!r} of replica {r}"))
            watched = [("parameter", "_parameters", "params", n, params[n]) for n in self.names]
            watched += [("buffer", "_buffers", "buffers", n, buffers[n]) for n in buffer_names]
            for kind, table, stacked, n, t in watched:
                owner, _, key = n.rpartition(".")
                tensors.append([id(t), weakref.ref(model.get_submodule(owner)), table, key, _version(t),
                                t.data_ptr(), stacked, n, r, f"{kind} {n!r} of replica {r}",
                                getattr(self, stacked)[n][r]])
        return links, tensors

    def __getstate__(self):
        """For pickling (``torch.save``) and ``copy.deepcopy``: weak references do not pickle, and a
        copy watches no models (a snapshot of the weights it holds). The caches of the sparse-input
        forward (the fused MLP plan's closures, the last input's CSR form) are dropped too: they are
        rebuilt when needed."""
        state = {**self.__dict__, "_sources": ((), ())}
        state.pop("_plan", None)
        state.pop("_csr_of", None)
        return state

    def changed_since_built(self) -> str | None:
        """The first parameter, buffer or submodule of the models this set was built from that changed
        since (e.g. "parameter '0.weight' of replica 2"), or None. Changed: modified in place (its
        version counter moved: an optimizer step, ``load_state_dict``, ``copy_`` under no_grad, a
        training-mode BatchNorm forward through its ``num_batches_tracked``; or its values differ
        from the set's copy: the writes no version counter sees, through ``p.data``, fused optimizers
        (``torch.optim`` with ``fused=True``), numpy views (``p.detach().numpy()``),
        ``torch.distributed`` collectives into the parameters), replaced by a tensor holding other
        values (``load_state_dict(..., assign=True)``, a new ``nn.Parameter`` assigned, a layer
        swapped for another module), or holding other values in another storage (``.double()``,
        ``p.data = ...``). A tensor replaced by one of the same values, or whose storage moved with
        the values kept (``share_memory()``, a no-op ``.to()`` under
        ``torch.__future__.set_overwrite_module_params_on_conversion(True)``, a move to another device
        such as ``model.cuda()``: the set keeps its own copies where it was built), is no change; the
        check then follows the moved tensor. Values are compared exactly, NaN equal to NaN (and -0.0 to
        0.0).

        Not seen: models since deleted, and writes made while a product runs (another thread
        training the models: the check comes before each product). Cost: the identity, storage and
        version of every tensor and submodule (about a microsecond each), and one exact comparison
        of every tensor with its copy (:meth:`_first_rewritten`; a tensor on another device than the
        set is copied over for it). For 10 MLPs 784-128-128-10 on one CPU thread: 0.2-0.4 ms, 2% of
        a one-probe Hessian-vector product on 256 samples, 0.3% of an eight-probe one (the
        comparison runs on one thread: with many, its share of a product grows)."""
        links, tensors = getattr(self, "_sources", ((), ()))
        for parent_ref, cname, child_ref, what in links:
            parent = parent_ref()
            if parent is not None and parent._modules.get(cname, _MISSING) is not child_ref():
                return what
        kept = []  # (the model's tensor, its record): the same tensor object, storage and version
        for rec in tensors:
            tensor_id, owner_ref, table, key, version, ptr, stacked, name, r, what, copied = rec
            owner = owner_ref()
            if owner is None:  # (its model was deleted, or the module swapped: a link tells)
                continue
            t = getattr(owner, table).get(key, _MISSING)
            if not isinstance(t, torch.Tensor) or not _in_storage(t):
                return what
            if id(t) == tensor_id and t.data_ptr() == ptr:
                if version is not None and _version(t) != version:
                    return what
                kept.append((t, rec))  # (its values are compared below)
                continue
            # another tensor object, or the storage moved: a change only if the values did (a tensor
            # whose id is reused by another holds other values, or equal ones, which change nothing)
            if (id(t) == tensor_id and version is not None and _version(t) != version) \
                    or not self._holds_copy_of(t, copied):
                return what
            rec[0], rec[4], rec[5] = id(t), _version(t), t.data_ptr()  # the same values: follow this tensor
        return self._first_rewritten(kept)

    def _first_rewritten(self, kept: list, batched: bool | None = None) -> str | None:
        """The description of the first ``(model's tensor, its record)`` in ``kept`` (see :meth:`_watch`)
        whose values are no longer the set's copy, or None: the in-place writes no version counter
        sees. On the CPU one ``memcmp`` per tensor (:func:`_same_bytes`); elsewhere (or ``batched``)
        each parameter's tensors are stacked (a transient copy of that parameter for every replica)
        and compared with the copies on the device, with one synchronization for all of them rather
        than one per tensor. Tensors whose values differ there, or whose bytes differ on the CPU,
        are confirmed by value (:meth:`_holds_copy_of`: NaN equals NaN, -0.0 equals 0.0)."""
        if not kept or self.device.type == "meta":  # (a set of meta tensors holds no values)
            return None
        with torch.no_grad():
            if not (self.device.type != "cpu" if batched is None else batched):
                for t, rec in kept:
                    if not _same_bytes(t, rec[10]) and not self._holds_copy_of(t, rec[10]):
                        return rec[9]
                return None
            order, flags = [], []
            for (stacked, name), members in _grouped(kept).items():
                copies = getattr(self, stacked)[name]
                for t, rec in members:
                    if t.shape != copies.shape[1:] or t.dtype != copies.dtype:
                        return rec[9]
                rows = [rec[8] for _, rec in members]
                ref = copies if rows == list(range(len(copies))) else copies[rows]
                differ = torch.stack([t.to(self.device) for t, _ in members]) != ref
                flags.append(differ.flatten(1).any(1) if differ.dim() > 1 else differ)
                order += members
            flags = torch.cat(flags)
            if not bool(flags.any()):  # (the one synchronization)
                return None
            for i in flags.nonzero().flatten().tolist():  # (NaN differs from itself: confirmed by value)
                t, rec = order[i]
                if not self._holds_copy_of(t, rec[10]):
                    return rec[9]
        return None

    @staticmethod
    def _holds_copy_of(t: torch.Tensor, copied: torch.Tensor) -> bool:
        """Whether the model's tensor ``t`` still holds exactly the values the set copied (NaN where NaN),
        on any device: a model moved to another device (``.cuda()`` after the set was built on the CPU)
        holds a copy when the values came along. A meta tensor holds no values, so no copy."""
        if t.shape != copied.shape or t.dtype != copied.dtype:
            return False
        if t.device != copied.device and "meta" in (t.device.type, copied.device.type):
            return False
        with torch.no_grad():  # (across devices: one copy per move; the record then follows the moved tensor)
            return torch.allclose(t.to(copied.device), copied, rtol=0, atol=0, equal_nan=True)

    # --- flat layout -------------------------------------------------------------------------
    @property
    def batch_statistics(self) -> bool:
        """Whether a BatchNorm (any ``_BatchNorm``, SyncBatchNorm included) normalizes each batch by
        its own statistics (``bn_mode='batch'``, or ``track_running_stats=False``): the results then
        depend on the batches. (torch's rule, as the fused engine's parser reads it: training mode,
        or no running statistics.)"""
        return any(isinstance(m, _BN_TYPES) and (m.training or m.running_mean is None) for m in self.base.modules())

    def flatten(self, tensors: Sequence[torch.Tensor], lead: int = 1) -> torch.Tensor:
        """Concatenate per-parameter tensors ``[*lead_dims, *shape]`` into ``[*lead_dims, P]``."""
        lead_shape = tensors[0].shape[:lead]
        return torch.cat([t.reshape(*lead_shape, -1) for t in tensors], dim=-1)

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Split ``[..., P]`` into per-parameter views ``[..., *shape]``."""
        if flat.shape[-1] != self.P:
            raise ValueError(f"vectors have {flat.shape[-1]} entries in the last axis, the models have P = {self.P}")
        lead = flat.shape[:-1]
        return [c.reshape(*lead, *s) for c, s in zip(flat.split(self.numels, dim=-1), self.shapes)]

    def flat_params(self) -> torch.Tensor:
        """``[R, P]`` parameters of all replicas."""
        return self.flatten([self.params[n] for n in self.names])

    def subset(self, idx: torch.Tensor | None):
        """``(params, buffers)`` dicts restricted to replicas ``idx`` (all when None)."""
        if idx is None:
            return self.params, self.buffers
        return ({n: t[idx] for n, t in self.params.items()}, {n: t[idx] for n, t in self.buffers.items()})

    # --- evaluation --------------------------------------------------------------------------
    def call(self, params: dict, buffers: dict, x):
        """Run one replica's functional model: ``params``/``buffers`` without the replica axis."""
        return functional_call(self.base, (params, buffers), (x,))

    def forward(self, x, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs of replicas ``idx`` (all when None) on the batch ``x``: ``[R, N, ...]``."""
        params, buffers = self.subset(idx)
        return self.forward_with(params, buffers, x)

    def forward_with(self, params: dict, buffers: dict, x) -> torch.Tensor:
        """Outputs ``[R', N, ...]`` of stacked ``params``/``buffers`` (name -> ``[R', ...]``) on ``x``.

        Plain MLP chains on sparse CPU inputs (at most 40% nonzero, e.g. MNIST; samples that are rows
        ``x [N, F]``, or any ``x [N, ...]`` when the chain starts with ``nn.Flatten()``) compute their first
        layer from the nonzero inputs only (the fused MLP forward of :mod:`fastcurv.train_fused`
        with :mod:`fastcurv.ops.csr_linear`, which autograd cannot differentiate: only when nothing
        needs a gradient); everything else runs ``vmap`` over ``functional_call``, with ``x`` shared by
        the replicas, or batched for a model that cannot run so (:meth:`vmapped`).
        """
        plan = self._mlp_plan()
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params.values()))
        # the sparse path flattens each sample to one row and returns [R', N, C]: the model's own output
        # shape only when it flattens the samples too (a leading Flatten(1, -1)) or they are rows already
        # (an MLP given x [N, 1, F] outputs [N, 1, C], which the loss must see unchanged)
        if plan is not None and not needs_grad and not buffers and (x.dim() == 2 or (plan.flatten and x.dim() >= 2)):
            from .train_fused import CsrBatch

            csr = self._sparse_rows(plan, x)
            if csr is not None:
                return plan.forward(params, CsrBatch(csr, torch.arange(len(x), device=x.device)), shared=True)
        return check_output(self.vmapped(self.call, params, buffers, x))

    def vmapped(self, fn, params, buffers, x):
        """:func:`vmap_replicas` of ``fn(params, buffers, x)`` (a function of one replica, e.g. of
        :meth:`call`) over the replica axis, ``x`` shared by the replicas, or batched once the set's
        model has needed it (remembered by the set: the perturbation measures run it hundreds of
        times)."""
        out, self._batched_input = vmap_replicas(fn, params, buffers, x, getattr(self, "_batched_input", False))
        return out

    def in_dtype(self, dtype: torch.dtype) -> "ReplicaSet":
        """A copy of this set with its parameters and floating buffers in floating dtype ``dtype`` (the
        models are not touched; the copy watches no models and has no sparse-forward caches: see
        ``__getstate__``). The perturbation measures run float16/bfloat16 replicas in float32 on it."""
        wide = copy.copy(self)
        wide.params = {n: t.to(dtype) for n, t in self.params.items()}
        wide.buffers = {n: t.to(dtype) if t.is_floating_point() else t for n, t in self.buffers.items()}
        wide.dtype = dtype
        return wide

    def checked_call(self, x, r: int | None = None) -> torch.Tensor:
        """Replica ``r``'s outputs (default: the first replica with finite parameters) on ``x`` (a few
        samples), computed on copies of ``x`` and of the replica's parameters and buffers, after a
        ValueError when the forward changed one of them in place (a parameter: ``nn.Embedding``'s
        ``max_norm`` renormalization): fastcurv evaluates the replicas many times on the same
        inputs, and with the same buffers (the set's stacked copies, which its vmapped forwards would
        write into), as fixed functions. A model that changes its input would see other data at every
        pass, and change the caller's (:func:`run_on_copy`); one that updates a buffer in its
        eval-mode forward (a call counter, a quantization observer's min/max, an average updated
        whatever the mode) would be another function at every pass, and its copies no longer the
        models' buffers (which :meth:`changed_since_built` then reports as a change of the models).
        The entry points call it on their first batch. torch's own errors (inputs the model cannot
        take) propagate as they are; a model that returns no tensor raises :func:`check_output`'s."""
        if r is None:
            r = int(self.finite.nonzero()[0]) if self.finite.any() else 0
        copies = {kind: {n: t[r].clone() for n, t in getattr(self, kind).items()} for kind in ("params", "buffers")}
        versions = {(kind, n): _version(t) for kind, ts in copies.items() for n, t in ts.items()}
        out = check_output(run_on_copy(lambda xc: self.call(copies["params"], copies["buffers"], xc), x))
        for kind, ts in copies.items():
            for n, t in ts.items():
                if _version(t) != versions[(kind, n)] or not _same_values(t, getattr(self, kind)[n][r]):
                    raise ValueError(_WRITTEN_IN_FORWARD[kind].format(n))
        return out

    def _sparse_rows(self, plan, x: torch.Tensor):
        """The CSR form of ``x`` for the fused MLP ``plan`` (None when too dense or not its input), kept
        for the last input while that tensor lives unchanged (a weak reference and its version
        counter): the perturbation estimators evaluate the same probe inputs hundreds of times. An
        inference tensor (made under ``torch.inference_mode``) has no version counter: its CSR form is
        made anew each time (it cannot be told unchanged)."""
        hit = getattr(self, "_csr_of", None)
        version = _version(x)
        if hit is not None and hit[0]() is x and version is not None and hit[1] == version:
            return hit[2]
        csr, _ = plan.sparse_rows(x, None)
        self._csr_of = (weakref.ref(x), version, csr)
        return csr

    def _mlp_plan(self):
        """The fused MLP plan of the architecture, or None (computed once)."""
        if not hasattr(self, "_plan"):
            from .train_fused import plan_mlp

            self._plan = plan_mlp(self.base)[0]
        return self._plan
