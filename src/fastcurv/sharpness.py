"""``batched_sharpness``: curvature measures for every replica in one job."""
from __future__ import annotations

import contextvars
import inspect
import json
import numbers
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ._heap import reusing_heap
from .ambient import resetting_ambient
from .losses import canonical_name
from .measures import accepted_options, load_all as _load_measures
from .operator import HessianOperator
from .replicas import validate_models
from .solvers._norms import row_norms
from .solvers.lanczos import whole, whole_count
from .solvers.probes import as_seed, start_vectors
from .solvers import SpectralDensity, hutchinson, hutchpp, lanczos, power_iteration, slq

MEASURES = ("lambda_max", "lambda_min", "top_k", "trace", "spectrum")
# backend options that change memory, not results (the fused engine's, then the func backend's)
_MEMORY_OPTIONS = ("cache_bytes", "chunk_bytes", "sample_chunk_bytes", "reuse", "reuse_bytes", "work_bytes")
# measure options that change memory, not results (epsilon_sharpness_subspace's matrix: the same cached or
# regenerated)
_MEASURE_MEMORY_OPTIONS = {"epsilon_sharpness_subspace": ("max_matrix_bytes",)}
TRACE_METHODS = ("auto", "exact", "deflated", "hutch++", "hutchinson")
EIG_SOLVERS = ("lanczos", "power")
EIG_STARTS = ("gradient", "random")


@dataclass
class SharpnessResult:
    """Per-replica results of :func:`batched_sharpness`.

    values: ``{column: [R] tensor}`` (``lambda_max``, ``trace``, ``lambda_1..k`` for top_k, ...).
    stderr: standard errors of stochastic estimates (``trace``). error_bounds: eigenvalue error
    estimates (``inf`` where the eigensolver did not converge). iterations: matvecs per replica for each solver. converged: ``[R]`` bool per solver.
    ok: ``[R]`` False for replicas whose parameters or products were non-finite (their values are
    NaN). flags: one human-readable string per replica (empty when all is well).
    spectrum: the SLQ spectral density when requested.
    trace_method: the estimator the trace came from ("exact", "deflated", "hutch++" or
    "hutchinson"; empty without a trace); trace_reason: with ``trace_method="auto"`` and no exact
    trace, why not (as :meth:`HessianOperator.exact_trace_support` says).
    backend: the backend that computed the products ("fused", "func", "autograd"; a chunked job's
    chunks joined by commas where they differ); backend_reason: why it was chosen (or why "auto"
    fell back), as :class:`HessianOperator` says it.
    num_matvecs: the operator's products as the solvers issued them: one batched product of K
    vectors counts K, however many replicas it covers (every replica still running, all at once);
    a chunked job (``replica_chunk``, ``output=``, ``distributed``, the chunks ``memory_budget``
    plans or the GPU out-of-memory retry makes) sums it over its chunks, so the same job counts
    more the more chunks it is split into: a figure of the job's sequential work, not a cost per
    replica (that is ``iterations``, which does not depend on the chunking).
    seconds: wall-clock time of the computation (a chunked job: summed over its chunks).
    estimator: the solver runs the measure set chose, which change the values of the columns they
    give (the same settings with other measures can give other values): ``top_eigen_k`` (the k of
    the top-eigenvalue run giving lambda_max, lambda_1..k and the deflated trace's basis: ``top_k``
    when "top_k" is measured, else 1) and ``top_eigen_basis_kept`` (whether that run kept its basis
    for the trace, with full reorthogonalization), present when that run was made;
    ``trace_estimator`` (as ``trace_method``) and ``trace_probes`` (its probes or matvec budget,
    None for the exact trace), present with a trace. :func:`fastcurv.invariance_audit` refuses a
    ``before`` whose runs differ from those its own measures make. None when unknown (a result
    read from a results file written before fastcurv recorded it, or from chunks that differ).
    settings: the keywords of the call that change results, defaults filled in (not ``measures``,
    ``progress``, ``cache_data``, the chunking and output options, or the options that change only
    memory: ``memory_budget``, the backends' cache and chunk sizes, epsilon_sharpness_subspace's
    ``max_matrix_bytes``).
    """

    values: dict = field(default_factory=dict)
    stderr: dict = field(default_factory=dict)
    error_bounds: dict = field(default_factory=dict)
    iterations: dict = field(default_factory=dict)
    converged: dict = field(default_factory=dict)
    ok: torch.Tensor | None = None
    flags: list = field(default_factory=list)
    spectrum: SpectralDensity | None = None
    backend: str = ""
    backend_reason: str = ""
    num_matvecs: int = 0
    seconds: float = 0.0
    trace_method: str = ""
    trace_reason: str = ""
    estimator: dict | None = None
    settings: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]

    def __repr__(self):
        cols = ", ".join(self.values)
        return f"SharpnessResult(R={len(self.flags)}, measures=[{cols}], backend={self.backend!r}, matvecs={self.num_matvecs})"

    def to_pandas(self):
        """One row per replica: each measure, its stderr / error bound, iterations, converged, flags."""
        import pandas as pd

        df = pd.DataFrame({"replica": range(len(self.flags))})
        for name, v in self.values.items():
            df[name] = v.numpy()
            if name in self.stderr:
                df[f"{name}_stderr"] = self.stderr[name].numpy()
            if name in self.error_bounds:
                df[f"{name}_error"] = self.error_bounds[name].numpy()
        for name, it in self.iterations.items():
            df[f"{name}_iters"] = it.numpy()
        for name, c in self.converged.items():
            df[f"{name}_converged"] = c.numpy()
        df["ok"] = self.ok.numpy()
        df["flags"] = self.flags
        return df.set_index("replica")


class _Progress:
    def __init__(self, op, enabled):
        self.op = op
        self.bar = tqdm(total=None, unit="matvec", desc="fastcurv: ", disable={False: True, None: None, True: False}[enabled],
                        leave=False, bar_format="{desc}{n_fmt} matvecs [{elapsed}, {rate_fmt}]")
        self._last = 0

    def stage(self, name):
        self.bar.set_description(f"fastcurv {name}")

    def tick(self, *_):
        self.bar.update(self.op.num_matvecs - self._last)
        self._last = self.op.num_matvecs

    def close(self):
        self.tick()
        self.bar.close()


# True inside a job that already handles GPU out-of-memory errors (the retry below, or its chunks)
_RETRY_SCOPE: contextvars.ContextVar = contextvars.ContextVar("fastcurv_oom_retry", default=False)


def _on_gpu(models) -> bool:
    """True when the replicas' parameters are on a CUDA device (where out-of-memory is retried)."""
    try:
        return next(models[0].parameters()).device.type == "cuda"
    except (TypeError, IndexError, StopIteration, AttributeError):
        return False


def _check_operator_keywords(operator_kwargs: dict, sharded: bool) -> None:
    """Raise a TypeError naming :func:`batched_sharpness` (and a close spelling) for the keywords in
    ``operator_kwargs`` that :class:`HessianOperator` does not take either (torch's message named
    ``HessianOperator.__init__``, which the caller never called); a ``sharded`` job (``distributed``,
    ``output=``, ``replica_chunk``) also takes :func:`fastcurv.distributed.batched_sharpness`'s own
    (``group``, ``gather``, ``device``)."""
    taken = set(inspect.signature(HessianOperator.__init__).parameters)
    if sharded:
        from .distributed import batched_sharpness as _sharded

        taken |= set(inspect.signature(_sharded).parameters) - {"use_distributed", "kwargs"}
    unknown = sorted(set(operator_kwargs) - taken)
    if unknown:
        import difflib

        known = set(inspect.signature(batched_sharpness).parameters) | taken
        known -= {"self", "models", "data", "operator_kwargs"}
        close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        hint = "; ".join(f"{k!r}: did you mean {c[0]!r}?" for k, c in close.items() if c)
        raise TypeError(f"batched_sharpness() got unexpected keyword arguments {unknown} (it takes its own settings "
                        f"and HessianOperator's){': ' + hint if hint else ''}")


def _gradient_start(op, seed: int, common: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanczos start vectors ``[R, P]``: each replica's unit loss gradient plus the random unit
    vector Lanczos would start from (the random vector alone where the gradient is zero or not
    finite); and the loss ``[R]``."""
    z = start_vectors(op, seed, common)
    loss, grad = op.loss_and_gradient(reuse_state=True)  # the first matvec then finds the state cached
    norm = row_norms(grad, keepdim=True)  # (a confident float32 model's gradient: torch's norm underflowed to 0)
    usable = torch.isfinite(norm) & (norm > 0)
    return torch.where(usable, z + grad / torch.where(usable, norm, 1.0), z), loss


def _underflowed(op, loss: torch.Tensor) -> torch.Tensor:
    """``[R]`` bool: cross-entropy whose mean per-sample loss is below the dtype's smallest normal
    number (1.2e-38 in float32, 2.2e-308 in float64, 6.1e-5 in float16): the other classes'
    probabilities, and with them the loss Hessian, are then subnormal or zero and have lost their
    precision. (Above that, the pivoted cross-entropy of :mod:`fastcurv.losses` keeps the Hessian
    of confident samples exact.)"""
    if op.loss.kind != "cross_entropy":
        return torch.zeros(op.R, dtype=torch.bool)
    per_sample = loss.detach().double().cpu() / (op.loss.num_samples if op.loss.reduction == "sum" else 1)
    return per_sample < torch.finfo(op.dtype).tiny


@resetting_ambient  # grad on, inference mode and autocast off (see fastcurv.ambient)
@reusing_heap
def batched_sharpness(
    models,
    data,
    *,
    measures=("lambda_max", "trace"),
    loss="cross_entropy",
    reduction: str = "mean",
    backend: str = "auto",
    bn_mode: str = "eval",
    seed: int = 0,
    common_random_numbers: bool = True,
    tol: float = 1e-3,
    max_iter: int = 100,
    eig_solver: str = "lanczos",
    eig_start: str = "gradient",
    top_k: int = 5,
    trace_method: str = "auto",
    trace_probes: int | None = None,
    slq_steps: int = 60,
    slq_draws: int = 1,
    progress: bool | None = None,
    cache_data="auto",
    measure_options: dict | None = None,
    replica_chunk: int | None = None,
    output: str | None = None,
    distributed: bool = False,
    memory_budget=None,
    **operator_kwargs,
) -> SharpnessResult:
    """Curvature measures of the full-data loss for every replica at once.

    Args:
        models: list of R replicas of one architecture. data: loader or one (inputs, targets) batch.
        measures: any of "lambda_max" (top Hessian eigenvalue), "lambda_min", "top_k" (the
            ``top_k`` largest, columns lambda_1..), "trace" (with a standard error), "spectrum" (SLQ
            spectral density, in ``result.spectrum``). The set chooses the solver runs, so a
            column's value can depend on the other measures (within the solvers' accuracy): with
            "top_k", lambda_max is the top of a k-eigenvalue Lanczos run; with lambda_max or top_k,
            ``trace_method="auto"`` deflates the trace with that run's basis (else Hutch++). The
            result's ``estimator`` records the runs.
        seed: seeds every probe; with ``common_random_numbers=True`` (default) every replica gets
            the same probes and batches, so differences between replicas are less noisy.
        tol: relative accuracy of eigenvalues. max_iter: matvecs per eigen-solve at most. Both
            apply to the Hessian's eigen-solves (lambda_max, lambda_min, top_k), not to registered
            measures: ``ggn_lambda_max`` and ``fisher_lambda_max`` take their own in
            ``measure_options`` (default ``{"max_iter": 100, "tol": 1e-3}``).
        eig_solver: "lanczos" (default) or "power" (PyHessian's rule; largest modulus).
        eig_start: start vector of the top-eigenvalue Lanczos run: "gradient" (default: each
            replica's normalized loss gradient plus the common random unit vector; the gradient
            tends to lie in the top eigenspace, which saves steps, and the random half keeps every
            direction present) or "random" (the common random vector alone).
        trace_method: "auto" ("exact" where it applies, else Krylov-deflated Hutchinson reusing
            the lambda_max Lanczos basis when there is one, else Hutch++), "exact", "deflated",
            "hutch++" or "hutchinson". "exact": no probes and a standard error of 0, on the fused
            backend for models of Linear and Conv2d layers, eval BatchNorm, ReLU/LeakyReLU,
            poolings, Flatten and residual additions, each module used once (their Hessian's
            diagonal is the Gauss-Newton diagonal; see :meth:`HessianOperator.exact_trace`); it
            costs a backward pass of one vector per model output (conv nets with 10 classes:
            0.6-0.7 of one 10-probe matvec); elsewhere a ValueError says why. trace_probes: the
            number of stochastic probes (Hutch++: total matvec budget); default 10 for the
            deflated estimator (the Krylov basis already holds the dominant part), else 30.
        slq_steps, slq_draws: SLQ Lanczos steps and start vectors.
        progress: tqdm bar (None: only on a terminal; False: off).
        measure_options: ``{measure: {option: value}}`` for registered measures (see
            :mod:`fastcurv.measures`), e.g. ``{"rho_sharpness": {"rho": 0.05}}``. An option declared an
            integer (annotated ``int``, ``int | None`` or ``Optional[int]``, or unannotated with an
            int default: ``n_iter``, ``n_samples``, ``num_matvecs``, ...) takes a whole float too
            (``5.0``, given on as ``5``); another float there raises a ValueError naming it. Other
            options reach the measure as given (``scale: float = 1`` takes 0.5 and 2.0). A measure's
            entry None (a YAML config's empty entry) is no options.
        Counts (``max_iter``, ``top_k``, ``trace_probes``, ``slq_steps``, ``slq_draws``) are
        positive integers; whole floats (a JSON or YAML config's ``100.0``) are taken as integers,
        anything else raises a ValueError naming the argument.
        replica_chunk: process the replicas this many at a time (default: all at once).
        output: a JSON-lines file (see :mod:`fastcurv.resume`) where every finished chunk is saved
            atomically; rerunning the same call skips the replicas already saved (a different
            configuration raises :class:`fastcurv.resume.FingerprintMismatch`).
        distributed: shard the replicas over the ranks of the default torch.distributed group
            (each rank a contiguous slice; results gathered on every rank, in replica order);
            works in one process too (see :func:`fastcurv.distributed.batched_sharpness`).
        memory_budget: keep the memory this job allocates under a budget: bytes (int), a size
            string ("4GiB", "512MiB") or a float in (0, 1] (that fraction of the memory free now on
            the models' device). A cost model (:mod:`fastcurv.memory`) picks the replicas per chunk,
            the fused backend's state cache, data caching and, only if needed, smaller batches;
            results equal an unchunked run. On a GPU, an out-of-memory error halves the chunk and
            retries (RuntimeWarning). ``fastcurv.memory.plan_memory`` shows the plan.
        Other keywords (loss, reduction, backend, bn_mode, cache_data, check_determinism, ...) go
        to :class:`fastcurv.HessianOperator`.

    On a GPU, an out-of-memory error is caught: the job runs again in chunks of half the replicas
    (halved again while the error persists, down to one replica), with a RuntimeWarning naming the
    chunk size; results equal an unchunked run.

    Called inside ``torch.no_grad()``, ``torch.inference_mode()`` or ``torch.autocast(...)``, the job
    computes as outside: grad mode on, in the models' own dtype (fastcurv leaves autocast regions);
    the caller's settings are left as they were (:mod:`fastcurv.ambient`).
    """
    _check_operator_keywords(operator_kwargs, sharded=distributed or output is not None or replica_chunk is not None)
    models = validate_models(models)
    seed = as_seed(seed)
    # whole floats (a JSON config's 100.0) as ints from here on, in settings and fingerprints too (checked below)
    max_iter, top_k, trace_probes, slq_steps, slq_draws = map(whole, (max_iter, top_k, trace_probes, slq_steps,
                                                                      slq_draws))
    measure_options = _option_dicts(measure_options)  # (here: the plan, chunks and measures see the same)
    plan = None
    if memory_budget is not None:
        from .data import SplitBatches, read_one_pass
        from .memory_job import plan_memory

        if operator_kwargs.get("distributed_data"):
            raise ValueError("memory_budget= is not supported with distributed_data=True")
        # the plan reads the data before the job: a one-pass loader is read once, for both
        data, cache_data = read_one_pass(models, data, cache_data, memory_budget)
        loader_type = type(data).__name__
        plan = plan_memory(models, data, memory_budget, measures=measures, loss=loss, reduction=reduction, backend=backend,
                           bn_mode=bn_mode, max_iter=max_iter, eig_solver=eig_solver, trace_method=trace_method,
                           trace_probes=trace_probes, top_k=top_k, slq_steps=slq_steps, slq_draws=slq_draws,
                           cache_data=cache_data, measure_options=measure_options,
                           common_random_numbers=common_random_numbers, **operator_kwargs)
        replica_chunk = plan.replica_chunk if replica_chunk is None else min(int(replica_chunk), plan.replica_chunk)
        if cache_data == "auto":
            cache_data = plan.cache_data
        # the plan's backend options (fused: the state cache; func: its reuse and work bytes); the caller's win
        planned = {"cache_bytes": plan.cache_bytes} if plan.cache_bytes is not None else plan.func_options
        if planned:
            operator_kwargs["backend_options"] = {**planned, **(operator_kwargs.get("backend_options") or {})}
        if plan.batch_size is not None:
            data = SplitBatches(data, plan.batch_size)
    if operator_kwargs.get("distributed_data"):
        if distributed:
            raise ValueError("distributed=True (replica sharding) and distributed_data=True (data sharding) cannot be combined")
        if output is not None:
            raise ValueError("output= (resumable results) is not supported with distributed_data=True: every rank would write it")
        other = [m for m in ((measures,) if isinstance(measures, str) else measures) if m not in MEASURES]
        if other:
            raise ValueError(f"distributed_data=True supports the measures {MEASURES}; {other} read the data themselves")
    kwargs = dict(measures=measures, loss=loss, reduction=reduction, backend=backend, bn_mode=bn_mode, seed=seed,
                  common_random_numbers=common_random_numbers, tol=tol, max_iter=max_iter, eig_solver=eig_solver,
                  eig_start=eig_start,
                  top_k=top_k, trace_method=trace_method, trace_probes=trace_probes, slq_steps=slq_steps,
                  slq_draws=slq_draws, progress=progress, cache_data=cache_data, measure_options=measure_options,
                  **operator_kwargs)
    if distributed or output is not None or replica_chunk is not None:
        from .distributed import batched_sharpness as _sharded

        if plan is None:
            res = _sharded(models, data, replica_chunk=replica_chunk, output=output, use_distributed=distributed, **kwargs)
        else:
            from .measures._subspace import matrix_bytes_cap

            try:
                with matrix_bytes_cap(plan.max_matrix_bytes):  # epsilon_sharpness_subspace's matrix within the plan
                    res = _sharded(models, data, replica_chunk=replica_chunk, output=output, use_distributed=distributed,
                                   **kwargs)
            except ValueError as exc:
                if "empty loader" not in str(exc):
                    raise
                raise ValueError("memory_budget= reads the loader twice (its plan reads the batches' sizes first), but "
                                 f"this {loader_type} yielded no batches the second time: pass a re-iterable "
                                 "loader (a list of batches, a DataLoader) or a one-pass iterator (a generator, or an "
                                 "iterator whose type has no __len__: read once, for both; an iterator with a __len__ "
                                 "is taken as re-iterable)") from exc
        return res  # (its settings filled in by the sharded function, from the same keywords)
    if not _RETRY_SCOPE.get() and not operator_kwargs.get("distributed_data") and _on_gpu(models):
        # a GPU out-of-memory error in an unchunked job: run it again in chunks of half the
        # replicas (resume.run_chunks halves them further while the error persists)
        from .measures import split_refusal
        from .memory import is_out_of_memory, release_cached_memory, warn_halving

        token = _RETRY_SCOPE.set(True)
        try:
            try:
                return batched_sharpness(models, data, **kwargs)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are retried
                if not is_out_of_memory(exc) or len(models) < 2:
                    raise
                if why := split_refusal(kwargs):
                    exc.add_note(f"not retried in smaller chunks: {why}")
                    raise
                error = f"{type(exc).__name__}: {str(exc)[:300]}"
            release_cached_memory()
            warn_halving(len(models), len(models) // 2, 0, error)
            return batched_sharpness(models, data, replica_chunk=len(models) // 2, **kwargs)
        finally:
            _RETRY_SCOPE.reset(token)
    if isinstance(measures, str):
        measures = (measures,)
    extra = _load_measures()
    unknown = [m for m in measures if m not in MEASURES and m not in extra]
    if unknown:
        raise ValueError(f"unknown measures {unknown}; available: {MEASURES + tuple(sorted(extra))}")
    measure_options = measure_options or {}
    stray = sorted(k for k in measure_options if k not in MEASURES and k not in extra)
    if stray:
        raise ValueError(f"measure_options names unknown measures {stray}; available: {MEASURES + tuple(sorted(extra))}")
    for name, opts in measure_options.items():  # (refused before any measure runs, not after the ones before it)
        allowed = accepted_options(name) if name in extra else ()
        wrong = sorted(set(opts or {}) - set(allowed)) if allowed is not None else []
        if wrong:
            raise TypeError(f"measure_options[{name!r}] has unknown options {wrong}; {name} accepts "
                             f"{sorted(allowed) or 'none (its settings are batched_sharpness arguments)'}")
    measure_options = {name: _whole_options(name, extra[name], opts) if name in extra else opts
                       for name, opts in measure_options.items()}
    # (whole floats too: a JSON config's 100.0)
    max_iter, slq_steps, slq_draws = (whole_count(n, v) for n, v in (("max_iter", max_iter), ("slq_steps", slq_steps),
                                                                      ("slq_draws", slq_draws)))
    if "top_k" in measures:
        top_k = whole_count("top_k", top_k)
    if "trace" in measures and trace_probes is not None:
        trace_probes = whole_count("trace_probes", trace_probes)
    if not tol >= 0:
        raise ValueError(f"tol must be non-negative, got {tol}")
    if trace_method not in TRACE_METHODS:
        raise ValueError(f"trace_method must be one of {TRACE_METHODS}, got {trace_method!r}")
    if eig_solver not in EIG_SOLVERS:
        raise ValueError(f"eig_solver must be 'lanczos' or 'power', got {eig_solver!r}")
    if eig_start not in EIG_STARTS:
        raise ValueError(f"eig_start must be 'gradient' or 'random', got {eig_start!r}")
    t0 = time.perf_counter()
    op = HessianOperator(models, data, loss=loss, reduction=reduction, backend=backend, bn_mode=bn_mode,
                         cache_data=cache_data, **operator_kwargs)
    op.check_ranks_agree(lambda: {f"setting {k}": v for k, v in json.loads(
        json.dumps(result_settings(kwargs, with_measures=True), default=repr)).items()})
    out = SharpnessResult(backend=op.backend_name, backend_reason=op.backend_reason)
    bar = _Progress(op, progress)
    crn = common_random_numbers
    exact = False
    if "trace" in measures and trace_method in ("auto", "exact"):
        exact, why = op.exact_trace_support()
        if trace_method == "exact" and not exact:
            raise ValueError(f"trace_method='exact' is not available: {why}")
        out.trace_reason = why
    if trace_method == "deflated" and eig_solver != "lanczos":
        raise ValueError("trace_method='deflated' reuses the Lanczos basis of lambda_max/top_k: "
                         "it needs eig_solver='lanczos'")
    out.estimator = estimator_plan(measures, exact=exact, eig_solver=eig_solver, trace_method=trace_method,
                                   top_k=top_k, trace_probes=trace_probes)
    deflate = out.estimator.get("top_eigen_basis_kept", False)
    basis = None
    if trace_probes is None:
        trace_probes = 10 if deflate else 30
    if "trace" in measures and not exact and not deflate and trace_method != "hutchinson" and trace_probes < 6:
        raise ValueError(f"trace_probes={trace_probes}: the trace runs Hutch++ here, which needs at least 6 matvecs "
                         "(a third each to sketch, to project and to probe the rest)")
    underflow = torch.zeros(op.R, dtype=torch.bool)  # (known where the gradient start computes the loss)
    negative = torch.zeros(op.R, dtype=torch.bool)  # power iteration's largest-modulus eigenvalue below 0
    untested = []  # measures' columns without a convergence test (flagged when not finite)
    try:
        # the models checked before the first product and after the last, not before each (the check
        # reads every weight: on a deep net of small layers up to half a product on few samples)
        with op.models_checked_once():
            top = None
            if "top_eigen_k" in out.estimator:  # (lambda_max, top_k or the deflated trace's basis)
                k = out.estimator["top_eigen_k"]
                if k > op.P:
                    raise ValueError(f"top_k={k} exceeds the number of parameters P={op.P} (the Hessian's dimension)")
                bar.stage("top eigenvalues")
                if eig_solver == "power":
                    if k > 1:
                        raise ValueError("top_k needs eig_solver='lanczos'")
                    top = power_iteration(op, max_iter=max_iter, tol=tol, seed=seed, common=crn, callback=bar.tick)
                else:
                    v0 = None
                    if eig_start == "gradient":
                        v0, start_loss = _gradient_start(op, seed, crn)
                        underflow = _underflowed(op, start_loss)
                    top = lanczos(op, k=k, max_iter=max_iter, tol=tol, v0=v0, seed=seed, common=crn, keep_basis=deflate,
                                  callback=bar.tick)
                    basis = top
                if "lambda_max" in measures:
                    out.values["lambda_max"] = top.eigenvalues[:, 0]
                    out.error_bounds["lambda_max"] = top.error_bounds[:, 0]
                if "top_k" in measures:
                    for i in range(k):
                        out.values[f"lambda_{i + 1}"] = top.eigenvalues[:, i]
                for name in ("lambda_max", "top_k"):  # (none for a run made only as the deflated trace's basis)
                    if name in measures:
                        out.iterations[name] = top.iterations
                        # lambda_max by its own column's test (top-k's lower columns may not have converged)
                        own = name == "lambda_max" and top.column_converged is not None
                        out.converged[name] = top.column_converged[:, 0].clone() if own else top.converged
                if eig_solver == "power":  # (a value it stopped at without converging is flagged not converged alone)
                    negative = (top.eigenvalues[:, 0] < 0) & top.converged
            if "lambda_min" in measures:
                bar.stage("bottom eigenvalue")
                low = lanczos(op, k=1, which="smallest", max_iter=max_iter, tol=tol, seed=seed + 7, common=crn, callback=bar.tick)
                out.values["lambda_min"] = low.eigenvalues[:, 0]
                out.error_bounds["lambda_min"] = low.error_bounds[:, 0]
                out.iterations["lambda_min"] = low.iterations
                out.converged["lambda_min"] = low.converged
            if "trace" in measures:
                bar.stage("trace")
                if exact:
                    out.trace_method = "exact"
                    out.values["trace"] = op.exact_trace()
                    out.stderr["trace"] = torch.where(op.failed, float("nan"), 0.0).to(torch.float64)
                else:
                    if basis is not None and basis.basis is not None:
                        out.trace_method = "deflated"
                        tr = hutchinson(op, num_probes=trace_probes, seed=seed + 1, common=crn, basis=basis.basis,
                                        basis_trace=basis.tridiag_trace, callback=bar.tick)
                    elif trace_method == "hutchinson":
                        out.trace_method = "hutchinson"
                        tr = hutchinson(op, num_probes=trace_probes, seed=seed + 1, common=crn, callback=bar.tick)
                    else:
                        out.trace_method = "hutch++"
                        tr = hutchpp(op, num_matvecs=trace_probes, seed=seed + 1, common=crn, callback=bar.tick)
                    out.values["trace"] = tr.trace
                    out.stderr["trace"] = tr.stderr
            if "spectrum" in measures:
                bar.stage("spectrum")
                out.spectrum = slq(op, num_steps=slq_steps, num_draws=slq_draws, seed=seed + 2, common=crn, callback=bar.tick)
            for name in measures:
                if name in MEASURES:
                    continue
                bar.stage(name)
                for col, mv in extra[name](op, seed=seed, common=crn, **measure_options.get(name, {})).items():
                    out.values[col] = mv.value
                    if mv.stderr is not None:
                        out.stderr[col] = mv.stderr
                    if mv.converged is not None:
                        out.converged[col] = mv.converged
                    else:
                        untested.append(col)
                bar.tick()
    finally:
        bar.close()
    out.ok = ~op.failed
    for name, t in out.values.items():
        t[op.failed] = float("nan")
    flags = []
    finite = op.replicas.finite
    for r in range(op.R):
        f = []
        if not bool(finite[r]):
            f.append("non-finite parameters")
        elif bool(op.failed[r]):
            nonfinite_loss = getattr(op, "nonfinite_loss", None)  # (set by the operator at the first such replica)
            f.append("non-finite loss" if nonfinite_loss is not None and bool(nonfinite_loss[r])
                     else "non-finite Hessian products")
        else:
            f += [f"{name} not converged" for name, c in out.converged.items() if not bool(c[r])]
            f += [f"{col} not finite" for col in untested if not bool(torch.isfinite(out.values[col][r]))]
            if bool(negative[r]):
                f.append("power iteration converged to a negative eigenvalue (the largest in modulus; "
                         "eig_solver='lanczos' finds the largest)")
            if bool(underflow[r]):
                f.append("loss below the dtype's range (the other classes' probabilities underflow: the Hessian "
                         "has lost its precision)")
        flags.append("; ".join(f))
    out.flags = flags
    out.backend, out.backend_reason = op.backend_name, op.backend_reason  # (auto's func may have fallen back)
    out.num_matvecs = op.num_matvecs
    out.seconds = time.perf_counter() - t0
    out.settings = result_settings(kwargs)
    return out


_SIGNATURE = inspect.signature(batched_sharpness)  # (taken now: tests may replace the module's function)


def result_settings(kwargs: dict, with_measures: bool = False) -> dict:
    """The result-changing keywords of a :func:`batched_sharpness` call with ``kwargs``, its
    defaults filled in (for :attr:`SharpnessResult.settings`; ``measures`` too with
    ``with_measures``, for the fingerprint of a resumable job); memory options left out
    (``_MEMORY_OPTIONS`` of ``backend_options``, ``_MEASURE_MEMORY_OPTIONS`` of ``measure_options``)."""
    bound = _SIGNATURE.bind_partial(**kwargs)
    bound.apply_defaults()
    args = dict(bound.arguments)
    args.update(args.pop("operator_kwargs", {}))
    skip = ("models", "data", "progress", "cache_data", "replica_chunk", "output", "distributed", "memory_budget",
            "process_group", *(() if with_measures else ("measures",)))
    out = {k: v for k, v in args.items() if k not in skip}
    if isinstance(out.get("loss"), str):  # ("MSE" and "mse" are one loss: one spelling in settings and fingerprints)
        out["loss"] = canonical_name(out["loss"])
    if "bn_mode" in out and out["bn_mode"] is None:  # (None is "eval" for a list of models: one setting)
        out["bn_mode"] = "eval"
    # memory settings (e.g. from memory_budget=) do not change results
    options = {k: v for k, v in (out.pop("backend_options", None) or {}).items() if k not in _MEMORY_OPTIONS}
    if options:
        out["backend_options"] = options
    if isinstance(out.get("measure_options"), dict):
        out["measure_options"] = _without_memory_options(out["measure_options"])
    return out


def _without_memory_options(measure_options: dict) -> dict | None:
    """``measure_options`` without the options that change memory only (``_MEASURE_MEMORY_OPTIONS``):
    a measure left with none of its options is dropped, and None when none is left (as if they had
    not been given; options without memory ones are returned as they are, so that fingerprints of
    files written before match)."""
    out, stripped = {}, False
    for name, options in measure_options.items():
        drop = _MEASURE_MEMORY_OPTIONS.get(name, ())
        if isinstance(options, dict) and any(k in options for k in drop):
            stripped = True
            options = {k: v for k, v in options.items() if k not in drop}
            if not options:
                continue
        out[name] = options
    if not stripped:
        return measure_options
    return out or None


def estimator_plan(measures, *, exact: bool, eig_solver: str = "lanczos", trace_method: str = "auto", top_k: int = 5,
                   trace_probes: int | None = None) -> dict:
    """The solver runs a :func:`batched_sharpness` job with ``measures`` makes, as recorded in
    :attr:`SharpnessResult.estimator`: with lambda_max or top_k (or a deflated trace) the
    top-eigenvalue run's ``top_eigen_k`` and ``top_eigen_basis_kept``, and with a trace its
    ``trace_estimator`` and ``trace_probes``. ``exact``: whether the exact trace is used
    (``trace_method`` "auto" or "exact" on a model that has it)."""
    measures = (measures,) if isinstance(measures, str) else tuple(measures)
    wants_top = "lambda_max" in measures or "top_k" in measures
    trace = "trace" in measures
    deflate = (trace and not exact and eig_solver == "lanczos"
               and (trace_method == "deflated" or (trace_method == "auto" and wants_top)))
    plan = {}
    if wants_top or deflate:
        plan["top_eigen_k"] = top_k if "top_k" in measures else 1
        plan["top_eigen_basis_kept"] = deflate
    if trace:
        plan["trace_estimator"] = ("exact" if exact else "deflated" if deflate
                                   else "hutchinson" if trace_method == "hutchinson" else "hutch++")
        plan["trace_probes"] = None if exact else trace_probes if trace_probes is not None else 10 if deflate else 30
    return plan


def reuse_refusal(before: SharpnessResult, measures) -> str:
    """Why ``before`` cannot stand for the results of a job with ``measures`` and ``before``'s
    settings: the solver runs those measures make (:func:`estimator_plan`, the exact trace used
    where ``before``'s trace was exact: the same models) differ from those that gave ``before``'s
    columns (a top-k run's lambda_max, a deflated trace where the other job runs Hutch++, ...), so
    their values differ by the estimators' error; "" when they are the same. (``before``'s settings
    are compared by the caller.)"""
    defaults = {k: _SIGNATURE.parameters[k].default for k in ("eig_solver", "trace_method", "top_k", "trace_probes")}
    settings = {**defaults, **(before.settings or {})}
    recorded = before.estimator
    exact = recorded is not None and recorded.get("trace_estimator") == "exact"
    plan = estimator_plan(measures, exact=exact, eig_solver=settings["eig_solver"],
                          trace_method=settings["trace_method"], top_k=settings["top_k"],
                          trace_probes=settings["trace_probes"])
    if not plan:
        return ""
    if recorded is None:
        return ("it does not record which solver runs gave its values (a result read from a results file written "
                "before fastcurv recorded them, or joined from chunks that ran different ones)")
    differ = [k for k in plan if recorded.get(k, "none") != plan[k]]
    if not differ:
        return ""
    return ("its values come from other solver runs than the measures " + repr(tuple(measures)) + " make: "
            + ", ".join(f"{k}={recorded.get(k, 'none')!r} (these measures: {plan[k]!r})" for k in differ)
            + " (the measure set decides them: top_k sets the Lanczos run's k, and lambda_max or top_k beside "
            "the trace switch trace_method='auto' from Hutch++ to the deflated estimator)")


# the annotations declaring an integer, as text (``from __future__ import annotations`` keeps them so; str()
# of ``int | None`` and ``typing.Optional[int]`` gives them so), spaces and "typing." removed
_INT_ANNOTATIONS = ("int", "int|None", "None|int", "Optional[int]", "Union[int,None]", "Union[None,int]")


def _takes_integer(p: inspect.Parameter) -> bool:
    """Whether the parameter ``p`` takes an integer: by its annotation when it has one (``int``,
    ``int | None``, ``Optional[int]``; any other annotation, ``float`` included, is not an integer,
    whatever the default: ``scale: float = 1`` takes 0.5), else by its default (an int, not a bool)."""
    ann = p.annotation
    if ann is not inspect.Parameter.empty:
        text = ann.__name__ if isinstance(ann, type) else str(ann)
        return text.replace(" ", "").replace("typing.", "") in _INT_ANNOTATIONS
    return isinstance(p.default, int) and not isinstance(p.default, bool)


def option_parameters(name: str, fn) -> dict:
    """``{option: [inspect.Parameter]}`` for the options of registered measure ``name`` (function
    ``fn``): ``fn``'s own keyword, or for an option it takes through ``**options`` the parameters
    (with a default) of the functions of its module that name it (e.g. pac_bayes's ``sigma_search``).
    What the options take is read from these (:func:`_integer_options`,
    ``study_config._option_kinds``)."""
    own = inspect.signature(fn).parameters
    module = sys.modules.get(fn.__module__)
    helpers = [inspect.signature(f).parameters for f in vars(module).values()
               if inspect.isfunction(f) and f.__module__ == fn.__module__] if module else []
    return {option: [own[option]] if option in own else
            [h[option] for h in helpers if option in h and h[option].default is not inspect.Parameter.empty]
            for option in accepted_options(name) or ()}


def _integer_options(name: str, fn) -> set:
    """The options of registered measure ``name`` (function ``fn``) that take integers, by their
    annotations or defaults (:func:`_takes_integer`) in :func:`option_parameters` (an option counts
    when all of them take an integer)."""
    return {option for option, params in option_parameters(name, fn).items()
            if params and all(_takes_integer(p) for p in params)}


def _option_dicts(measure_options) -> dict | None:
    """``measure_options`` with every measure's entry a dict: None (a YAML config's empty
    ``mw_sharpness:`` entry) as no options; a ValueError naming an entry, or the whole argument,
    that is not a mapping."""
    if measure_options is None:
        return None
    if not isinstance(measure_options, Mapping):
        raise ValueError(f"measure_options must be a dict {{measure: {{option: value}}}}, got a "
                         f"{type(measure_options).__name__}")
    out = {}
    for name, options in measure_options.items():
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(f"measure_options[{name!r}] must be a dict {{option: value}} (or None: no options), got "
                             f"{options!r:.80} ({type(options).__name__})")
        out[name] = dict(options or {})
    return out


def _whole_options(name: str, fn, options: dict | None) -> dict | None:
    """``options`` of measure ``name`` with its integer options given as whole floats (a JSON or
    YAML config's ``5.0``) as ints (:func:`fastcurv.solvers.lanczos.whole`); a ValueError naming
    the option for another float there (the measures check their own ranges)."""
    if not options:
        return options
    ints = _integer_options(name, fn)
    out = dict(options)
    for option in ints & set(out):
        v = out[option]
        if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):
            out[option] = whole(v)
            if not isinstance(out[option], int):
                raise ValueError(f"measure_options[{name!r}][{option!r}] must be an integer, got {v!r}")
    return out
