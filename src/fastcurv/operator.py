"""The batched Hessian operator: R replicas x K probes per pass over the data."""
from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import grad

from ._heap import heap_reuse
from .ambient import resetting_ambient
from .backends import BACKENDS
from .backends.base import mark_not_torch_func, math_attention, read_batches
from .backends.func import torch_func_failed
from .data import Batches
from .losses import Loss
from .model_run import VmapUnsupportedError, first_input_failing, model_cannot_run
from .replicas import BN_MODES, ReplicaSet, nonfinite_rows

# the errors on which backend="auto" may fall back from torch.func to autograd (_fall_back decides)
_FALLBACK_ERRORS = (RuntimeError, NotImplementedError, VmapUnsupportedError)

BACKEND_CHOICES = ("auto", "autograd", "func", "fused")


def select_backend(replicas: ReplicaSet, requested: str, loss: Loss | None = None, sample=None) -> tuple[str, str]:
    """Pick a backend name and say why. ``auto`` prefers the fused engine when it supports the
    model, else torch.func (any model torch.func can run). ``sample``: a batch ``(x, y)`` on which
    the fused engine is checked against the model's own forward and autograd."""
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {requested!r}")
    fused = BACKENDS["fused"]

    def fused_ok():
        ok, why = fused.supports(replicas, loss)
        if ok and sample is not None:
            ok, why = fused.check_on(replicas, loss, *sample)
        return ok, why

    if requested == "fused":
        ok, why = fused_ok()
        if not ok:
            raise ValueError(f"the fused backend does not support this model: {why}")
        return "fused", "requested"
    if requested != "auto":
        return requested, "requested"
    ok, why = fused_ok()
    if ok:
        return "fused", "auto: the fused R-op engine supports every layer and the loss of this model (fastest)"
    return "func", f"auto: fused engine not usable ({why}); torch.func works for any model it can trace"


def _check_backend_options(name: str, reason: str, options: dict) -> None:
    """Raise a TypeError naming the backend (and why it was chosen) when ``options`` holds names its
    constructor does not take (options meant for a backend ``"auto"`` did not pick)."""
    params = inspect.signature(BACKENDS[name].__init__).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return  # (it names unknown options itself)
    allowed = [p.name for p in params if p.name not in ("self", "replicas", "loss", "batches")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"backend_options {unknown} are not options of the {name!r} backend ({reason}); it takes "
                        f"{allowed}. Options of another backend need that backend named: backend='func', 'fused' "
                        "or 'autograd'")


def as_replica_set(models, bn_mode: str | None = None) -> ReplicaSet:
    """``models`` (a list of replicas, or a :class:`ReplicaSet`) as a ReplicaSet evaluated in
    ``bn_mode``. A ReplicaSet is returned as it is: its BatchNorm mode was fixed when it was built,
    so ``bn_mode`` must be None or that mode (another raises a ValueError), and its models must not
    have changed since it was built (:meth:`ReplicaSet.changed_since_built`; else a ValueError: its
    copies would be the old weights). A list is stacked with ``bn_mode`` ("eval" when None). An
    unknown ``bn_mode`` raises a ValueError either way."""
    if bn_mode is not None and bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    if isinstance(models, ReplicaSet):
        if bn_mode is not None and bn_mode != models.bn_mode:
            raise ValueError(f"bn_mode={bn_mode!r}, but the ReplicaSet was built with bn_mode={models.bn_mode!r} (a "
                             "ReplicaSet's BatchNorm mode is fixed when it is built): pass the list of models, or "
                             f"build the ReplicaSet with ReplicaSet(models, bn_mode={bn_mode!r})")
        changed = models.changed_since_built()
        if changed:
            raise ValueError(f"the models changed since this ReplicaSet was built ({changed} was modified or replaced): "
                             "it holds copies of the old weights; build a new ReplicaSet from the models (or pass the "
                             "list of models)")
        return models
    return ReplicaSet(models, bn_mode="eval" if bn_mode is None else bn_mode)


class HessianOperator:
    """Full-data Hessians of R same-architecture replicas as one batched linear operator.

    ``H_r = d^2 L_r / d theta_r^2`` with L_r the loss of replica r over every batch of ``data``
    (exact sample weighting, see :mod:`fastcurv.losses`). :meth:`matvec` applies all R Hessians
    to K probe vectors each in one pass over the data.

    Args:
        models: list of ``nn.Module`` replicas of one architecture (or a :class:`ReplicaSet`).
        data: a loader yielding ``(inputs, targets)`` or one ``(inputs, targets)`` batch.
        loss: "cross_entropy" (default), "mse", or a callable ``loss(outputs, targets)``.
        reduction: "mean" (default, over all samples of ``data``) or "sum".
        loss_reduction: reduction of a callable loss over its batch ("mean" or "sum"; None, the
            default: a torch loss module's own ``.reduction``, "mean" for a plain callable).
        backend: "auto", "autograd", "func" or "fused" (see :mod:`fastcurv.backends`).
        bn_mode: "eval" (BatchNorm running statistics, no dropout) or "batch" (BatchNorm batch
            statistics; dropout still off). The models themselves are never modified. Default
            (None): "eval" for a list, a ReplicaSet's own mode for a ReplicaSet (another mode than
            a ReplicaSet's own raises a ValueError: it is fixed when the ReplicaSet is built).
        cache_data: keep the batches on the device (True/False/"auto", up to 2 GiB).
        backend_options: passed to the backend (e.g. ``{"reuse": False}`` with ``backend="func"``); options
            the chosen backend does not take raise a TypeError naming it.
        check_determinism: read the loader twice at construction and raise if the two passes
            differ (shuffling, random augmentation): the Hessian would change between matvecs.
        ``data`` may also be a :class:`fastcurv.data.Batches` already read (shared between operators).
        distributed_data: ``data`` is this rank's share of the data set (e.g. a DistributedSampler
            without shuffling): sample counts and every product / loss / gradient are summed over the
            ranks of ``process_group`` (default group) with all_reduce, so each rank holds the
            full-data result (exact sample weighting). Every rank must hold all R replicas.
        memory_budget: bytes, a size string ("2GiB") or a fraction in (0, 1] of the free memory.
            With every backend, a budget below what the operator needs at least
            (:func:`fastcurv.memory.operator_least_bytes`: its stacked parameters, the batches it
            owns, one batch's transients for 10 probes per matvec) raises a ValueError with the
            estimate. Then, by backend: fused, the state cache gets what the budget leaves after
            that (see :func:`fastcurv.memory.operator_cache_bytes`; beyond the cache, state is
            recomputed in every matvec) unless ``cache_bytes`` is given in ``backend_options``;
            func, its ``reuse_bytes`` and ``work_bytes`` are capped
            (:func:`fastcurv.memory.func_bytes_caps`) unless given in ``backend_options``;
            autograd, nothing is tuned (it already runs one replica, batch and probe at a time, and
            reuses nothing): the budget is only checked. The probe vectors (and their count per
            matvec) are the caller's.

    Snapshot: the operator holds copies of the weights (and buffers) the models had when it was
    built (through its :class:`ReplicaSet`), and does not follow later changes. To keep it from
    silently giving the old models' curvature, every product, loss, gradient and trace first checks
    the models' parameters and buffers (:meth:`ReplicaSet.changed_since_built`: the identity,
    storage and version counter of each tensor and submodule, and an exact comparison of each
    tensor's values with the operator's copy) and raises a RuntimeError when one was modified in
    place (an optimizer step, fused ``fused=True`` ones included, ``load_state_dict``, a write
    through ``p.data`` or a numpy view, a training-mode BatchNorm forward) or replaced since (a new
    ``nn.Parameter``, ``load_state_dict(assign=True)``, a swapped layer, ``p.data = ...`` with other
    values): build a new operator for the new weights (as when tracking sharpness during training).
    Not seen: a write made while a product runs (models trained by another thread meanwhile), and
    models deleted since. ``share_memory()`` and moving the models to another device are no change.
    The check costs one read of the weights and of the copies: for 10 MLPs 784-128-128-10 on one
    CPU thread, 0.2-0.4 ms, 2% of a one-probe product on 256 samples (0.3% with 8 probes), but up
    to half a product on a deep net of small layers and few samples: a run of products in
    :meth:`models_checked_once` (as ``batched_sharpness`` runs its job) checks before the first and
    after the last only. fastcurv's own measures never change the models (they perturb copies).

    Threads: an operator may be shared by several threads; its computations (:meth:`matvec`,
    :meth:`loss_and_gradient`, :meth:`exact_trace`, :meth:`dense`) then run one at a time, under
    a lock of the operator (the replicas' module is swapped in and out during a product, and the
    products, counters and :attr:`failed` are the operator's state). For products in parallel,
    build one operator per thread.
    """

    _group = None  # the process group of distributed_data=True (subclasses may skip __init__)

    @resetting_ambient
    def __init__(
        self,
        models: Sequence[nn.Module] | ReplicaSet,
        data,
        *,
        loss: str | Callable = "cross_entropy",
        reduction: str = "mean",
        loss_reduction: str | None = None,
        backend: str = "auto",
        bn_mode: str | None = None,
        cache_data="auto",
        backend_options: dict | None = None,
        check_determinism: bool = False,
        distributed_data: bool = False,
        process_group=None,
        memory_budget=None,
    ):
        self._group = None
        if distributed_data:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("distributed_data=True needs an initialised torch.distributed process group")
            self._group = process_group if process_group is not None else dist.group.WORLD

        def build():
            self.replicas = as_replica_set(models, bn_mode)
            rs = self.replicas
            if isinstance(data, Batches):  # already read (shared by the chunks of a chunked job)
                if data.device != torch.device(rs.device) or data.dtype != rs.dtype:
                    raise ValueError(f"the Batches are on {data.device}/{data.dtype} but the models on {rs.device}/{rs.dtype}")
                self.batches = data
            else:
                self.batches = Batches(data, device=rs.device, dtype=rs.dtype, cache=cache_data,
                                       check_determinism=check_determinism)
            self.loss = Loss(loss, reduction, loss_reduction)
            self.loss.num_samples = self.batches.num_samples  # this rank's; summed over ranks below
            sample = self._check_first_batch()
            with self._inputs_named():  # (the fused engine's check and the func backend's estimates run the model)
                self.backend_name, self.backend_reason = select_backend(rs, backend, self.loss, sample)
            self._auto = backend == "auto"
            self._backend_options = backend_options or {}
            options = dict(self._backend_options)
            if memory_budget is not None and self.backend_name == "func":
                from .memory_job import func_bytes_caps

                for key, cap in func_bytes_caps(memory_budget, rs.device).items():
                    options.setdefault(key, cap)  # what the caller sets wins
            _check_backend_options(self.backend_name, self.backend_reason, self._backend_options)
            with self._inputs_named():
                self.backend = BACKENDS[self.backend_name](rs, self.loss, self.batches, **options)
            if memory_budget is not None:
                from .memory_job import check_operator_budget, operator_cache_bytes

                if self.backend_name == "fused" and "cache_bytes" not in self._backend_options:
                    self.backend.cache_bytes = operator_cache_bytes(self.backend, self.batches, memory_budget)
                else:  # the same check for every backend (fused with the caller's cache_bytes, func, autograd)
                    check_operator_budget(self.backend_name, self.backend, self.batches, memory_budget)

        self._on_all_ranks(build, "building the operator")
        rs = self.replicas
        self.check_ranks_agree(lambda: {"replicas": rs.R, "parameters": list(zip(rs.names, rs.shapes)),
                                        "dtype": str(rs.dtype), "backend": self.backend_name, "loss": self.loss.kind,
                                        "reduction": reduction, "bn_mode": rs.bn_mode,
                                        "exact trace": self.exact_trace_support()[0]})
        n = torch.tensor([float(self.batches.num_samples)], dtype=torch.float64, device=rs.device)
        self.loss.num_samples = int(self._sum_over_ranks(n).item())
        if self.loss.class_weight_total is not None:  # W of a class-weighted mean: summed over the ranks as N is
            w = torch.tensor([self.loss.class_weight_total], dtype=torch.float64, device=rs.device)
            self.loss.set_class_weight_total(self._sum_over_ranks(w).item())
        self.failed = ~rs.finite.clone()
        self.num_passes = 0
        self.num_matvecs = 0

    def _guard(self) -> threading.RLock:
        """The operator's lock (re-entrant: :meth:`dense` calls :meth:`matvec`). Made on first use, so that
        operators built without ``__init__`` (``like()`` in :mod:`fastcurv.curvature`) have one too;
        ``dict.setdefault`` is atomic, so two threads asking first get the same lock."""
        return self.__dict__.get("_lock") or self.__dict__.setdefault("_lock", threading.RLock())

    @contextlib.contextmanager
    def models_checked_once(self):
        """Within it, this thread's computations check that the models did not change (see Snapshot)
        before the first of them only, and once more on leaving (a RuntimeError then: the models
        changed while the block ran, so its results mix weights). For a solver's run of products,
        which nothing outside the block can interleave with; :func:`fastcurv.batched_sharpness` runs
        its job in one. The check reads every weight once: on a deep net of small layers it costs up
        to half of a product on few samples, repeated before every product otherwise. Nested blocks
        are part of the outermost; other threads keep their own checks."""
        scope = self._scope()
        if getattr(scope, "active", False):
            yield
            return
        scope.active, scope.checked = True, False
        try:
            yield
        finally:
            ran, scope.active, scope.checked = scope.checked, False, False
        if ran:  # (on every rank, as the products: a rank that raised alone would leave the others waiting)
            self._on_all_ranks(lambda: self._check_models(", while a run of its products went on"), "the models check")

    def _scope(self) -> threading.local:
        """This operator's per-thread state of :meth:`models_checked_once` (made on first use, as :meth:`_guard`)."""
        return self.__dict__.get("_checks") or self.__dict__.setdefault("_checks", threading.local())

    def _check_models(self, when: str = "") -> None:
        """RuntimeError when the models changed since the operator was built (see Snapshot)."""
        changed = self.replicas.changed_since_built()
        if changed:
            exc = RuntimeError(
                f"the models changed since this {type(self).__name__} was built{when} ({changed} was modified in "
                "place, e.g. by an optimizer step or a write through .data, or replaced): the operator holds "
                "copies of the weights it was built with and would give the old models' results; build a new "
                f"{type(self).__name__} for the current weights (and do not train the models while it runs "
                "a product: a write during one is not seen)")
            mark_not_torch_func(exc, "the models changed")  # (auto must not fall back to autograd on it)
            raise exc

    # --- shape facts -------------------------------------------------------------------------
    @property
    def R(self) -> int:
        return self.replicas.R

    @property
    def P(self) -> int:
        return self.replicas.P

    @property
    def dtype(self):
        return self.replicas.dtype

    @property
    def device(self):
        return self.replicas.device

    @property
    def num_samples(self) -> int:
        return self.batches.num_samples

    def _check_first_batch(self):
        """Check the models, targets and batches on (the first samples of) the first batch, and
        return the first batch ``(x, y)`` (the fused engine's check spreads its samples over it). A
        model that changes its input, or one of its buffers, in its (eval-mode) forward raises a
        ValueError (:meth:`ReplicaSet.checked_call`): every product runs it again on the same batches
        and the operator's copies of the buffers. Inputs it cannot take (torch's RuntimeError, or an
        embedding's IndexError for token ids out of range) raise "the model cannot run on the first
        batch (inputs <the batch's shape>, <dtype>): ..."; in a later sample, the first product or
        gradient names the batch (:meth:`_inputs_named`)."""
        rs = self.replicas
        small = [i for i, n in enumerate(self.batches.sizes) if n < 2]
        if rs.batch_statistics and small:
            raise ValueError(f"batch {small[0]} has {self.batches.sizes[small[0]]} sample: batch-statistics BatchNorm "
                             "(bn_mode='batch' or track_running_stats=False) needs at least 2 samples per batch, as torch "
                             "does in training (drop the last batch, e.g. DataLoader(drop_last=True))")
        _, x_all, y_all = next(iter(self.batches))
        x = x_all[:8]
        with torch.no_grad():
            try:  # (on copies of the inputs and buffers: a ValueError for a model that changes either in place)
                out = rs.checked_call(x)
            except (RuntimeError, IndexError) as exc:  # (IndexError: token ids beyond an nn.Embedding's table)
                raise model_cannot_run("the first batch", x_all, exc) from exc
        if out.dim() == 0 or out.shape[0] != x.shape[0]:
            raise ValueError(f"the model returns outputs {tuple(out.shape)} for inputs {tuple(x.shape)}: fastcurv needs "
                             "one output row per sample (a model that averages or reshapes across the batch mixes "
                             "samples)")
        # (the batch's own shapes in the message: the outputs were computed on its first rows only)
        self.loss.check_targets(torch.empty((len(y_all), *out.shape[1:]), device="meta"), y_all)
        self.loss.check_all_targets(out, self.batches)
        return x_all, y_all

    # --- products ----------------------------------------------------------------------------
    @resetting_ambient
    def matvec(self, V: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Hessian-vector products for every replica and probe.

        V: ``[R, P]`` or ``[R, K, P]``; with ``idx`` (a 1-D index tensor of replicas) the leading
        axis holds those replicas only. Returns the same shape. Replicas whose parameters or
        products are non-finite get NaN rows and are recorded in :attr:`failed`.
        """
        with self._guard():  # one computation at a time (see Threads in the class docstring)
            rs = self.replicas
            single = V.dim() == 2
            V3 = (V.unsqueeze(1) if single else V).detach()
            rows = torch.arange(rs.R) if idx is None else self._check_idx(idx)
            if V3.dim() != 3 or V3.shape[0] != len(rows) or V3.shape[2] != rs.P:
                raise ValueError(
                    f"vectors must be [{len(rows)}, P] or [{len(rows)}, K, P] with P = {rs.P}; got {tuple(V.shape)}"
                )
            if V3.dtype != rs.dtype or V3.device != rs.device:
                V3 = V3.to(rs.device, rs.dtype)
            good = ~self.failed[rows]
            # the caller's vectors NaN or Inf in a row: NaN products, nothing recorded in failed (the product
            # need not show it: a dead ReLU's derivative drops a NaN). One sum over them first (8-16 ms of a
            # 0.8 s K=8 matvec on W1, 1-2%); the rows only when it is not finite
            if not bool(torch.isfinite(V3.sum())):
                given = nonfinite_rows([V3]).cpu() & good
                if given.any():
                    warnings.warn(f"the vectors of replicas {rows[given].tolist()} contain NaN or Inf: their products "
                                  "are NaN", RuntimeWarning, stacklevel=3)
                    good &= ~given
            every = bool(good.all())
            out = None if every else torch.full_like(V3, float("nan"))
            if good.any():
                sub = rows[good]
                natural = len(sub) == rs.R and bool((sub == torch.arange(rs.R)).all())  # (not a permutation of them)
                run_idx = None if natural else sub.to(rs.device)
                vin = V3 if every else V3[good.to(V3.device)]
                with heap_reuse():  # a matvec's large temporaries reuse each other's pages (see _heap)
                    res = self._compute(lambda: self._run(rs.unflatten(vin), run_idx), "a Hessian-vector product")
                flat = self._sum_over_ranks(res if torch.is_tensor(res) else rs.flatten(res, lead=2))
                if every:
                    out = flat
                else:
                    out[good.to(V3.device)] = flat
                bad_now = nonfinite_rows([flat]).cpu()
                if bad_now.any():
                    newly = sub[bad_now]
                    self.failed[newly] = True
                    out[torch.isin(rows, newly).to(out.device)] = float("nan")
                    warnings.warn(f"replicas {newly.tolist()} produced non-finite Hessian products: flagged, results NaN",
                                  RuntimeWarning, stacklevel=3)
            self.num_passes += 1
            self.num_matvecs += V3.shape[1]
            return out.squeeze(1) if single else out

    def _check_idx(self, idx) -> torch.Tensor:
        """``idx`` as a CPU int64 vector of replica indices, after checking it names replicas."""
        rows = torch.as_tensor(idx).flatten()
        if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise TypeError(f"idx must hold integer replica indices, got dtype {rows.dtype}")
        rows = rows.to("cpu", torch.long)
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= self.replicas.R):
            raise ValueError(f"idx names replicas {rows.tolist()}, but there are {self.replicas.R} (0 to "
                             f"{self.replicas.R - 1})")
        return rows

    def _run(self, vecs, idx):
        try:
            return self.backend.matvec(vecs, idx)
        except _FALLBACK_ERRORS as exc:
            self._fall_back(exc)
            return self.backend.matvec(vecs, idx)

    def _fall_back(self, exc: Exception) -> None:
        """Switch ``"auto"``'s torch.func backend to autograd after torch.func failed with ``exc``
        (re-raised otherwise)."""
        if not (self._auto and self.backend_name == "func" and torch_func_failed(exc)):
            raise exc
        warnings.warn(
            f"torch.func could not differentiate this model ({exc.__class__.__name__}: {str(exc)[:200]}); "
            "falling back to the 'autograd' backend",
            RuntimeWarning,
            stacklevel=5,
        )
        # (extending the reason: the fused engine's, which names the module it does not support, stays)
        self.backend_name = "autograd"
        self.backend_reason = f"{self.backend_reason}; then torch.func failed ({str(exc)[:160]}): autograd"
        self.backend = BACKENDS["autograd"](self.replicas, self.loss, self.batches)

    def __matmul__(self, V):
        return self.matvec(V)

    @resetting_ambient
    def loss_and_gradient(self, idx: torch.Tensor | None = None, *, reuse_state: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-data loss ``[Ra]`` and gradient ``[Ra, P]`` of replicas ``idx`` (all when None),
        computed for all of them at once (batched GEMMs with the fused engine, else vmapped
        torch.func); the cost unit of fastcurv's benchmarks. ``reuse_state=True`` lets the fused
        engine read (and fill) the probe-independent state its matvecs cache, skipping the forward
        pass: only for parameters unchanged since the operator was built.

        A replica whose loss is not finite (NaN or Inf, with finite parameters: e.g. a callable
        loss's mean over a batch whose every target is ignored, torch's 0/0) is recorded in
        :attr:`failed`, with a warning, and its gradient row is NaN: its products would be finite
        but belong to no loss (see :meth:`_flag_nonfinite_loss`)."""
        with self._guard():  # one computation at a time (see Threads in the class docstring)
            rs = self.replicas
            with heap_reuse():
                if hasattr(self.backend, "loss_and_gradient"):  # the fused engine's batched gradient
                    total, grads = self._compute(
                        lambda: self.backend.loss_and_gradient(None if idx is None else idx.to(rs.device), reuse_state=reuse_state),
                        "the gradient")
                    return self._flag_nonfinite_loss(idx, self._sum_over_ranks(total),
                                                     self._sum_over_ranks(rs.flatten(grads)))
                try:
                    total, grads = self._compute(lambda: self._loss_and_gradient_func(idx), "the gradient")
                except _FALLBACK_ERRORS as exc:
                    self._fall_back(exc)
                    return self.loss_and_gradient(idx, reuse_state=reuse_state)
                return self._flag_nonfinite_loss(idx, self._sum_over_ranks(total), self._sum_over_ranks(grads))

    def _flag_nonfinite_loss(self, idx, total: torch.Tensor, grads: torch.Tensor):
        """``(total, grads)`` of :meth:`loss_and_gradient` for replicas ``idx``, after recording in
        :attr:`failed` (with a warning) those whose loss ``total [Ra]`` is not finite, their gradient
        rows ``grads [Ra, P]`` set to NaN, as for non-finite parameters; ``nonfinite_loss`` (``[R]``
        bool, made at the first such replica) says which failed so. Such a loss may still have
        finite Hessian products (a NaN batch mean, of a batch whose every target is ignored, adds a
        NaN loss but nothing to the derivatives), which belonged to no loss and were reported ok
        before the twenty-eighth round."""
        rows = torch.arange(self.R) if idx is None else self._check_idx(idx)
        bad = ~torch.isfinite(total).cpu() & ~self.failed[rows]
        if bool(bad.any()):
            newly = rows[bad]
            self.failed[newly] = True
            # (set here, not in __init__: operators made by like() skip it)
            self.__dict__.setdefault("nonfinite_loss", torch.zeros(self.R, dtype=torch.bool))[newly] = True
            grads = grads.clone()
            grads[bad.to(grads.device)] = float("nan")
            warnings.warn(f"replicas {newly.tolist()} have a non-finite loss (NaN or Inf, with finite parameters; a "
                          "callable loss's mean over a batch whose every target it ignores is NaN): flagged, results "
                          "NaN", RuntimeWarning, stacklevel=4)
        return total, grads

    @contextlib.contextmanager
    def _inputs_named(self):
        """Within it, an IndexError (an embedding's "index out of range in self": token ids beyond its
        table, in a sample past those the first batch's check ran) becomes the ValueError "the model
        cannot run on batch i (inputs <shape>, <dtype>): ..." naming the first batch the model cannot
        run on (:meth:`_bad_inputs`: one replica's forward per batch, until one raises); where every
        batch runs, the IndexError goes on as it is."""
        try:
            yield
        except IndexError as exc:
            bad = self._bad_inputs()
            if bad is None:
                raise
            raise bad from exc

    def _bad_inputs(self) -> ValueError | None:
        """:func:`~fastcurv.model_run.model_cannot_run`'s ValueError for the first batch on which one
        replica's forward (on copies of its inputs and buffers) raises, or None
        (:func:`~fastcurv.model_run.first_input_failing`)."""
        rs = self.replicas
        r = int(rs.finite.nonzero()[0]) if rs.finite.any() else 0
        params = {n: t[r] for n, t in rs.params.items()}

        def run(x):
            rs.call(params, {n: t[r].clone() for n, t in rs.buffers.items()}, x.clone())

        return first_input_failing(run, (("the first batch" if i == 0 else f"batch {i}", x)
                                         for i, x, _ in read_batches(self.batches)))

    def _loss_and_gradient_func(self, idx):
        rs, loss = self.replicas, self.loss
        params, buffers = rs.subset(idx)
        Ra = next(iter(params.values())).shape[0]
        # (summed in float32 at least: a float16 model's losses above 65504 summed to Inf)
        total = torch.zeros(Ra, dtype=torch.promote_types(rs.dtype, torch.float32), device=rs.device)
        grads = [torch.zeros_like(params[n]) for n in rs.names]
        for _, x, y in read_batches(self.batches):

            def one(p, b, xr):
                value = loss.batch_loss(rs.call(p, b, xr), y)
                return value, value

            g, value = rs.vmapped(grad(one, has_aux=True), params, buffers, x)  # (x batched where the model needs it)
            total += value
            for j, n in enumerate(rs.names):
                grads[j] += g[n]
        return total, rs.flatten(grads)

    def exact_trace_support(self) -> tuple[bool, str]:
        """Whether :meth:`exact_trace` can run here, and why not (backend and model)."""
        check = getattr(self.backend, "exact_trace_support", None)
        if check is None:
            return False, (f"the {self.backend_name!r} backend has no exact trace (the fused engine has, for models piecewise "
                           f"linear in their inputs and linear in each parameter)")
        return check()

    @resetting_ambient
    def exact_trace(self) -> torch.Tensor:
        """Exact Hessian trace of every replica ``[R]`` (float64, NaN for failed replicas), without
        probes, on the fused engine, for models whose Hessian diagonal equals the Gauss-Newton
        diagonal: Linear and Conv2d layers, eval BatchNorm, ReLU/LeakyReLU, max and average
        pooling, Flatten and residual additions, each module used once (see
        :meth:`FusedBackend.exact_trace`). Raises ValueError naming why elsewhere."""
        with self._guard():  # one computation at a time (see Threads in the class docstring)
            ok, why = self.exact_trace_support()
            if not ok:
                raise ValueError(why)
            good = ~self.failed
            out = torch.full((self.R,), float("nan"), dtype=torch.float64)
            if good.any():
                idx = None if bool(good.all()) else good.nonzero().flatten().to(self.replicas.device)
                tr = self._sum_over_ranks(self._compute(lambda: self.backend.exact_trace(idx), "the exact trace"))
                out[good] = tr.cpu()
            return out

    def _compute(self, fn, what: str):
        """``fn()`` on every rank (:meth:`_on_all_ranks`), after checking that the models did not change
        since the operator was built (see Snapshot in the class docstring), under
        :func:`~fastcurv.backends.base.math_attention` (attention's fused kernels have no double or
        forward-mode derivative: every backend's products and gradients go through here). An
        IndexError there becomes the ValueError naming the batch the model cannot run on
        (:meth:`_inputs_named`)."""
        def checked():
            scope = self._scope()
            if not (getattr(scope, "active", False) and scope.checked):
                self._check_models()
                scope.checked = True  # (read only within models_checked_once)
            with math_attention(), self._inputs_named():
                return fn()

        return self._on_all_ranks(checked, what)

    def _on_all_ranks(self, fn, what: str):
        """``fn()``; with data sharded over ranks, the ranks then agree that all of them succeeded
        before any goes on to the collective that follows: if one raised, every rank raises
        (the failing one its own error, the others ``RuntimeError: rank k failed in <what>``)
        instead of waiting forever for it."""
        if self._group is None:
            return fn()
        import torch.distributed as dist

        error = None
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks are told
            error, out = exc, None
        world, me = dist.get_world_size(self._group), dist.get_rank(self._group)
        device = self.replicas.device if hasattr(self, "replicas") else ("cuda" if dist.get_backend(self._group) == "nccl" else "cpu")
        flags = torch.zeros(world, dtype=torch.float32, device=device)
        flags[me] = error is not None
        dist.all_reduce(flags, group=self._group)
        if not flags.any():
            return out
        messages = [None] * world
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=self._group)
        if error is not None:
            raise error
        k = int(flags.nonzero()[0])
        raise RuntimeError(f"rank {k} failed in {what} (distributed_data=True): {messages[k]}")

    def check_ranks_agree(self, facts) -> None:
        """With data sharded over ranks, raise on every rank a ValueError naming what differs when
        the ranks' ``facts()`` (a dict of JSON-like values; only called then) differ: their
        collectives would otherwise wait forever or sum mismatched results."""
        if self._group is None:
            return
        import torch.distributed as dist

        every = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(every, facts(), group=self._group)
        first = every[0]
        for k, other in enumerate(every[1:], start=1):
            differ = sorted(key for key in set(first) | set(other) if first.get(key) != other.get(key))
            if differ:
                raise ValueError("distributed_data=True: the ranks disagree on "
                                 + ", ".join(f"{key} (rank 0: {first.get(key)!r}, rank {k}: {other.get(key)!r})"
                                             for key in differ)
                                 + "; every rank needs the same models and settings")

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the ranks sharing the data (``distributed_data=True``), else ``t``."""
        if self._group is None:
            return t
        import torch.distributed as dist

        t = t.contiguous()
        dist.all_reduce(t, group=self._group)
        return t

    @resetting_ambient
    def dense(self, replica: int = 0) -> torch.Tensor:
        """The full ``[P, P]`` Hessian of one replica, column by column (small models only)."""
        with self._guard():  # one computation at a time (see Threads in the class docstring)
            rs = self.replicas
            if rs.P > 20000:
                raise ValueError(f"dense Hessian of P = {rs.P} parameters is too large; use matvec-based solvers")
            cols = []
            eye = torch.eye(rs.P, dtype=rs.dtype, device=rs.device)
            idx = torch.tensor([replica])
            for chunk in eye.split(64):
                cols.append(self.matvec(chunk.unsqueeze(0), idx=idx)[0])
            return torch.cat(cols).T.contiguous()


def hvp(models, data, vectors: torch.Tensor, **kwargs) -> torch.Tensor:
    """Hessian-vector products of the full-data loss for every replica.

    models: list of replicas of one architecture. data: a loader or one ``(inputs, targets)``
    batch. vectors: ``[R, P]`` or ``[R, K, P]`` in ``model.parameters()`` order. Returns the same
    shape. Keyword arguments are those of :class:`HessianOperator`.
    """
    return HessianOperator(models, data, **kwargs).matvec(vectors)
