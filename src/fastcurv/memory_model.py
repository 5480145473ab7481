"""The memory cost model of ``batched_sharpness``: what a job holds (:class:`JobShape`), its estimated
peak for a chunk of replicas (:func:`estimate_bytes`, with epsilon_sharpness_subspace's matrices:
:func:`matrix_bytes`) and the plan that keeps it within a budget (:func:`choose`,
:class:`MemoryPlan`), plus the bisection the plan searches with (:func:`largest_true`).

The rules (the copy counts, what the plan prefers) are in :mod:`fastcurv.memory`'s docstring;
measuring a job's shape is :mod:`fastcurv.memory_job`. Pure arithmetic on a :class:`JobShape`; the
fused backend's defaults that it assumes are read from the backend itself
(:data:`~fastcurv.backends.fused.backend.DEFAULT_CHUNK_BYTES`,
:func:`~fastcurv.backends.fused.backend.default_sample_chunk_bytes`), imported where used: the
backends import :mod:`fastcurv.memory`, which imports this module, so a module-level import would
be a cycle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .memory_budget import format_bytes

BASIS_COPIES = 2
VECTOR_COPIES = 8
PARAM_COPIES = 2
STATE_COPIES = 2
TRANSIENT_FACTOR = 2
AUTOGRAD_FACTOR = 4
SAFETY = 0.85
PROBE_BATCH = 10  # probes per matvec in the trace estimators (hutchinson's probe_batch)


def largest_true(lo: int, hi: int, pred) -> int:
    """The largest ``n`` in ``(lo, hi]`` with ``pred(n)``, else ``lo``, by bisection: ``pred`` must be
    monotone (true up to some ``n``, false after). ``pred(lo)`` is never called, so ``lo`` is either
    a "none" answer (0 replicas) or a floor taken as good."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if pred(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _default_chunk_bytes() -> int:
    """The fused MLP engine's default CPU tangent chunk, as the backend defines it."""
    from .backends.fused.backend import DEFAULT_CHUNK_BYTES

    return DEFAULT_CHUNK_BYTES


@dataclass
class JobShape:
    """What the cost model needs to know about a job (see :mod:`fastcurv.memory`).

    P, itemsize: parameters per replica and their bytes. batch / num_samples: the largest batch
    and the total samples. data_bytes: all batches' bytes on the device. vectors: ``stage``, the
    ``[P]`` vectors per replica alive in the widest solver stage. probes: K per matvec (widest).
    state_per_sample: cached fused state bytes per replica and sample (0: not the fused backend).
    act_per_sample: activation bytes per replica and sample. widest: the most features of one
    layer per sample. layers: linear/conv layers. fused / gpu / conv: backend, device, engine.
    func_mode, func_costs: for the func backend, its mode and per-replica costs (peak, held, item:
    bytes per sample and fixed bytes, :func:`fastcurv.backends.func.memory_costs`).
    """

    P: int
    itemsize: int
    batch: int
    num_samples: int
    data_bytes: int
    vectors: int
    probes: int
    state_per_sample: int
    act_per_sample: int
    widest: int
    layers: int
    fused: bool
    gpu: bool
    conv: bool = False
    # the fused MLP engine's CPU tangent chunk (None: unchunked; default: the engine's own)
    chunk_bytes: int | None = field(default_factory=_default_chunk_bytes)
    sample_chunk_bytes: int | None = None  # the fused conv engine's tangent chunk (None: its default)
    func_mode: str = ""  # the func backend's mode ("graph" or "forward"; "" for other backends)
    func_costs: dict = field(default_factory=dict)  # its fastcurv.backends.func.memory_costs
    whole_batches: str = ""  # why the batches must not be split (results depend on them), or ""
    min_batch: int = 1  # the fewest samples a batch may have (2 with batch-statistics BatchNorm)
    # epsilon_sharpness_subspace's random P x p matrices (measures._subspace): p (0: not in the job),
    # one matrix for all replicas (common random numbers), the caller's max_matrix_bytes (None: the
    # plan's), and for an injected matrix A the bytes of its copy (0: used in place; None: drawn)
    matrix_p: int = 0
    matrix_shared: bool = True
    matrix_max: int | None = None
    matrix_injected: int | None = None
    matrix_products: int = 23  # products with the matrices per chunk (2 (n_iter + 1) + 1)
    unsplit: str = ""  # why the replicas must run in one chunk (measures.unsplittable), or ""
    one_pass: bool = False  # the batches are a one-pass loader's, kept (read_one_pass)


def matrix_bytes(shape: JobShape, chunk: int, max_matrix_bytes: int | None = None) -> tuple[int, bool]:
    """(peak bytes, whether the dense matrices are cached) of epsilon_sharpness_subspace's random
    subspace (:mod:`fastcurv.measures._subspace`) for a chunk of ``chunk`` replicas: the cached
    ``[Ra, P, p]`` matrices (Ra = 1 shared, else ``chunk``) when they fit ``max_matrix_bytes`` (the
    caller's ``shape.matrix_max`` wins; None: the measure's 1 GiB), else one regenerated block of
    each of the ``Ra`` matrices; plus a block being drawn, and the pseudo-inverse's work: for
    P >= 2p per matrix a ``p x p`` block product and its float64 copy, the float64 Gram matrix and
    its Cholesky factor (``Ra p^2 (16 + itemsize)`` bytes), else dense least squares on one float64
    ``P x p`` matrix at a time (``4 P p`` float64: it, its factorization's copy, the matrix drawn)."""
    from .measures._subspace import BLOCK_ROWS, DEFAULT_MAX_BYTES

    s = shape
    if not s.matrix_p:
        return 0, False
    p, rows = s.matrix_p, 1 if s.matrix_shared else chunk
    block = min(BLOCK_ROWS, s.P) * p * _matrix_itemsize(s)
    if s.matrix_injected is not None:  # an injected A: used as it is (or a converted copy)
        held, cached = s.matrix_injected, True
    else:
        cap = s.matrix_max if s.matrix_max is not None else (max_matrix_bytes if max_matrix_bytes is not None
                                                             else DEFAULT_MAX_BYTES)
        dense = _dense_matrix_bytes(s, chunk)
        cached = dense <= cap
        held = dense if cached else rows * block
    work = rows * p * p * (16 + _matrix_itemsize(s)) if s.P >= 2 * p else 4 * s.P * p * 8
    return held + block + work, cached


def estimate_bytes(shape: JobShape, chunk: int, *, batch: int | None = None, cache_bytes: int | None = None,
                   cache_data: bool = True, work_bytes: int | None = None, max_matrix_bytes: int | None = None) -> dict:
    """Estimated peak bytes of a job of ``shape`` run ``chunk`` replicas at a time, with batches of
    at most ``batch`` samples and the fused backend caching ``cache_bytes`` of state (None: all
    of it; the func backend: None reuses every batch's graph, 0 none, and then its products take
    ``work_bytes``, None: the least they can, one unit at a time), and epsilon_sharpness_subspace
    caching its matrices up to ``max_matrix_bytes`` (:func:`matrix_bytes`). Returns the parts
    (``vectors``, ``cached_state``, ``batch_transient``, ``tangents``, ``data``, ``measure``) and
    their ``total``."""
    s = shape
    n = s.batch if batch is None else min(batch, s.batch)
    vectors = chunk * s.P * s.itemsize * (s.vectors + PARAM_COPIES)
    if s.fused:
        full_state = chunk * s.num_samples * s.state_per_sample
        cached = STATE_COPIES * (full_state if cache_bytes is None else min(cache_bytes, full_state))
        transient = TRANSIENT_FACTOR * chunk * n * s.state_per_sample
        per_tangent = chunk * n * s.probes * s.widest * s.itemsize
        if s.conv:
            cap = s.sample_chunk_bytes
            if cap is None:  # the conv engine's default for the device
                from .backends.fused.backend import default_sample_chunk_bytes

                cap = default_sample_chunk_bytes(torch.device("cuda" if s.gpu else "cpu"))
            per_tangent = min(per_tangent, max(cap, chunk * s.probes * s.widest * s.itemsize))
        elif not s.gpu and s.chunk_bytes is not None:
            per_tangent = min(per_tangent, max(s.chunk_bytes, n * s.probes * s.widest * s.itemsize))
        tangents = (s.layers + 4) * per_tangent
    elif s.func_mode:
        (peak_n, peak_1), (held_n, held_1), (item_n, item_1) = (s.func_costs[k] for k in ("peak", "held", "item"))
        tangents = 0
        if cache_bytes is None:  # reused: every batch's graph kept, one batch's built at its peak
            cached = chunk * (held_n * s.num_samples + math.ceil(s.num_samples / n) * held_1)
            transient = chunk * (peak_n * n + peak_1)
        else:
            cached = 0
            transient = (item_n * n + item_1) if work_bytes is None else work_bytes
    else:
        cached = 0
        transient = AUTOGRAD_FACTOR * chunk * n * s.probes * s.act_per_sample
        tangents = 0
    data = s.data_bytes if cache_data else 0
    parts = {"vectors": vectors, "cached_state": cached, "batch_transient": transient, "tangents": tangents, "data": data}
    if s.matrix_p:
        parts["measure"] = matrix_bytes(s, chunk, max_matrix_bytes)[0]
    parts["total"] = sum(parts.values())
    return parts


@dataclass
class MemoryPlan:
    """How a job is run within ``budget`` bytes (see :mod:`fastcurv.memory`).

    replica_chunk: replicas per chunk. cache_bytes: the fused backend's state cache (None: not
    the fused backend). cache_data: keep the batches on the device. batch_size: split batches to
    at most this many samples (None: unchanged). estimate: the cost model's parts for this plan.
    backend: the backend the job will use. func_options: for the func backend, the
    ``backend_options`` it runs with: ``reuse`` (every batch's graph kept, if that fits) and
    ``work_bytes`` (what the plan leaves for the temporaries of products without reuse).
    max_matrix_bytes: for epsilon_sharpness_subspace (without the caller's ``max_matrix_bytes``),
    the cap on its cached random matrices (:func:`fastcurv.measures._subspace.matrix_bytes_cap`):
    their dense bytes for a chunk when the plan caches them, 0 when it regenerates them.
    """

    budget: int
    replica_chunk: int
    cache_bytes: int | None
    cache_data: bool
    batch_size: int | None
    estimate: dict = field(default_factory=dict)
    shape: JobShape | None = None
    backend: str = ""
    func_options: dict = field(default_factory=dict)
    max_matrix_bytes: int | None = None

    def describe(self) -> str:

        parts = _parts(self.estimate)
        func = "".join(f", func {k} {v if isinstance(v, bool) else format_bytes(v)}" for k, v in self.func_options.items())
        matrix = ""
        if self.shape is not None and self.shape.matrix_p:
            cached = matrix_bytes(self.shape, self.replica_chunk, self.max_matrix_bytes)[1]
            matrix = f", subspace matrix {'cached' if cached else 'regenerated'}"
        return (f"memory plan for {format_bytes(self.budget)}: {self.replica_chunk} replicas per chunk, "
                f"state cache {format_bytes(self.cache_bytes or 0)}, data cached: {self.cache_data}, "
                f"batch size: {self.batch_size or 'unchanged'}{func}{matrix}; estimated peak "
                f"{format_bytes(self.estimate.get('total', 0))} ({parts})")


def _parts(est: dict) -> str:
    """An estimate's parts as text: ``"vectors 1.2 MiB, cached_state ..."``."""

    return ", ".join(f"{k} {format_bytes(v)}" for k, v in est.items() if k != "total")


def _dense_matrix_bytes(shape: JobShape, chunk: int) -> int:
    """Bytes of epsilon_sharpness_subspace's dense ``[Ra, P, p]`` matrices for a chunk of ``chunk`` replicas."""
    return (1 if shape.matrix_shared else chunk) * shape.P * shape.matrix_p * _matrix_itemsize(shape)


def _matrix_itemsize(shape: JobShape) -> int:
    """Bytes per entry of epsilon_sharpness_subspace's matrices: the model's, at least float32's (the
    perturbation measures run float16 / bfloat16 models in float32)."""
    return max(shape.itemsize, 4)


def choose(shape: JobShape, R: int, budget: int, *, cache_data: bool | None = None) -> MemoryPlan:
    """The plan for ``R`` replicas of ``shape`` within ``budget`` bytes (rules in :mod:`fastcurv.memory`)."""
    if not shape.matrix_p or shape.matrix_max is not None or shape.matrix_injected is not None:
        return _choose(shape, R, budget, cache_data, None)
    # epsilon_sharpness_subspace's random matrices: cached whenever a plan with unsplit batches fits
    # with them cached, else regenerated block by block in every product (the same matrices)
    plans, error = {}, None
    for matrix in (True, False):
        try:
            plans[matrix] = _choose(shape, R, budget, cache_data, matrix)
        except ValueError as exc:
            error = exc
    if not plans:
        raise error  # (the regenerated matrices' error: the least the job needs)
    if len(plans) == 1:
        return next(iter(plans.values()))
    cached, regenerated = plans[True], plans[False]
    if (cached.batch_size is None) != (regenerated.batch_size is None):
        return cached if cached.batch_size is None else regenerated  # the one that keeps the batches whole
    # both fit: the normal draws for the matrices, built once per chunk when cached, drawn again in
    # every product when regenerated (a shared matrix cached in far more, smaller chunks can cost more)
    def draws(plan, per_chunk):
        return per_chunk * (-(-R // plan.replica_chunk) if shape.matrix_shared else R)

    return cached if draws(cached, 1) <= draws(regenerated, shape.matrix_products) else regenerated


def _choose(shape: JobShape, R: int, budget: int, cache_data: bool | None, matrix: bool | None) -> MemoryPlan:
    """:func:`choose` with epsilon_sharpness_subspace's matrices ``matrix``: True cached (chunks
    whose dense matrices exceed the measure's 1 GiB do not fit), False regenerated, None as the
    shape says (the caller's ``max_matrix_bytes`` or matrix, or no matrix)."""
    from .measures._subspace import DEFAULT_MAX_BYTES

    target = SAFETY * budget
    if cache_data is None:  # keep the batches on the device when they take at most a quarter of the budget
        cache_data = shape.data_bytes <= target / 4
    matrix_cap = None if matrix is None else (DEFAULT_MAX_BYTES if matrix else 0)
    least = R if shape.unsplit else 1  # the fewest replicas per chunk (all of them when the job cannot be split)

    def est(c, n, cache, **kw):
        return estimate_bytes(shape, c, batch=n, cache_bytes=cache, cache_data=cache_data, max_matrix_bytes=matrix_cap, **kw)

    def fits(c, n, cache):
        if matrix and _dense_matrix_bytes(shape, c) > DEFAULT_MAX_BYTES:
            return False
        return est(c, n, cache)["total"] <= target

    def largest(pred):  # the most replicas per chunk with pred (monotone in them), 0 if none
        if shape.unsplit:  # one chunk of all R replicas, or nothing
            return R if pred(R) else 0
        return largest_true(0, R, pred)

    def needs(what):  # the subject of the messages below: one replica, or all of them in one chunk
        if least == 1:
            return f"one replica with {what} needs"
        return f"{shape.unsplit}, so its {R} replicas run in one chunk, and with {what} they need"

    n = shape.batch
    c = largest(lambda c: fits(c, n, None))  # whole state cached (func: every batch's graph reused)
    reused = c > 0
    if c == 0:
        c = largest(lambda c: fits(c, n, 0))  # state recomputed per matvec (partially cached below)
    while c == 0 and n > 1 and not shape.whole_batches:
        n = max(1, n // 2)
        c = largest(lambda c: fits(c, n, 0))
    if c == 0 and shape.whole_batches:
        need = est(least, n, 0)
        # the largest batch that would fit (a loader's own batches, since these are not split)
        lo = largest_true(shape.min_batch - 1, n - 1, lambda b: fits(least, b, 0))
        if lo >= shape.min_batch:
            advice = (f"a loader with batches of at most {lo} samples would fit (which changes those results), "
                      "or use a larger budget")
        else:
            m = min(n, shape.min_batch)
            smallest = est(least, m, 0)
            big = max((k for k in smallest if k != "total"), key=smallest.get)
            big += " (the solvers' [P] vectors, which fewer measures or a smaller max_iter reduce)" if big == "vectors" else ""
            advice = ("smaller batches cannot make it fit ("
                      + (f"batches of {m} are the smallest this job takes" if n <= m else
                         f"even batches of {m} need about {format_bytes(smallest['total'] / SAFETY)}")
                      + f"); most of the estimate is {big}: use a larger budget")
        raise ValueError(
            f"memory_budget={format_bytes(budget)} is too small for this job: {shape.whole_batches}, so the batches "
            f"are not split, and {needs(f'batches of {n}')} about {format_bytes(need['total'] / SAFETY)} "
            f"({_parts(need)}); {advice}")
    if c == 0:
        need = est(least, 1, 0)
        big = max((k for k in need if k != "total"), key=need.get)
        if big == "data":
            why = "most of it is the batches, kept on the device"
            advice = ("a one-pass loader's batches must be kept (it cannot be read again): pass a re-iterable loader "
                      "(a list of batches, a DataLoader), whose batches need not be kept, or a larger budget"
                      if shape.one_pass else "pass cache_data=False or 'auto' (the batches are then read in every "
                      "Hessian product) or a larger budget")
            what = f"; {why}: {advice}"
        else:
            what = f"; most of it is {big}: use a larger budget"
        if least > 1:
            what += " (or common_random_numbers=True, which lets the replicas be split)"
        raise ValueError(
            f"memory_budget={format_bytes(budget)} is too small for this job: {needs('one-sample batches')} about "
            f"{format_bytes(need['total'] / SAFETY)} ({_parts(need)}){what}")
    cache, work, func_options = None, None, {}
    if shape.fused:
        spare = target - est(c, n, 0)["total"]
        cache = int(min(max(0, spare) // STATE_COPIES, c * shape.num_samples * shape.state_per_sample))
    elif shape.func_mode:
        # without reuse the products take what is left, up to all of them in one call (work_bytes is
        # also set with reuse, in case the caller's backend_options turn reuse off)
        low = est(c, n, 0)
        item_n, item_1 = shape.func_costs["item"]
        units = c * (shape.probes if shape.func_mode == "forward" else 1)
        work = max(1, int(min(units * (item_n * n + item_1), low["batch_transient"] + target - low["total"])))
        func_options = {"reuse": reused, "work_bytes": work}
        cache = None if reused else 0
    plan = MemoryPlan(budget, c, cache if shape.fused else None, bool(cache_data), None if n == shape.batch else n,
                      est(c, n, cache, work_bytes=None if reused else work), shape)
    plan.func_options = func_options
    if matrix is not None:  # the measure caches exactly what was planned (smaller chunks: smaller matrices)
        plan.max_matrix_bytes = _dense_matrix_bytes(shape, c) if matrix else 0
    return plan
