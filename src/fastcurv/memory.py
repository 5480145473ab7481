"""Memory budgets for ``batched_sharpness``: a cost model, a plan, and GPU out-of-memory retries.

``batched_sharpness(..., memory_budget=B)`` keeps the memory the job itself allocates (above what
the process already holds: interpreter, torch, the caller's models and data) under ``B``:

* ``B`` is an int (bytes), a string with a unit (``"4GiB"``, ``"512MiB"``, ``"2GB"``) or a float
  in (0, 1]: that fraction of the memory free now on the models' device (CUDA:
  ``torch.cuda.mem_get_info``; CPU: ``MemAvailable`` of ``/proc/meminfo``, Linux only).
* :func:`plan_memory` picks the number of replicas run at a time (``replica_chunk``), the fused
  backend's ``cache_bytes`` (cached per-batch state beyond it is recomputed in every matvec),
  whether the batches are kept on the device (``cache_data``), and, only when even one replica
  does not fit, a smaller batch size (the batches are split; the loss is the same up to the
  floating-point order of the sums). Never where results depend on the batches (batch-statistics
  BatchNorm, per-batch worst-case rho-sharpness): then a budget too small raises a ValueError
  with the estimate's parts, saying whether a loader with smaller batches would fit.
* The plan reads the data before the job does: a one-pass loader is read once for both and its
  batches kept (:func:`read_one_pass`; with ``cache_data=False`` it is refused). One-pass means a
  generator, or an iterator (it has ``__next__``) whose type has no ``__len__`` (``iter(list)``,
  ``map``, ``itertools``, a DataLoader's iterator); other iterables are taken as re-iterable,
  ``iter()`` starting a new pass (a DataLoader, a list, a loader whose ``__iter__`` resets and
  returns ``self`` with a ``__len__``), and are not iterated to find out. Its batches are read
  only while they take at most ``SAFETY * budget``: past that it raises a ValueError.
* Measures that cannot be split into chunks (:func:`fastcurv.measures.unsplittable`, e.g.
  epsilon_sharpness_subspace with ``common_random_numbers=False``) keep all replicas in one
  chunk; the budget then goes to caches and the batch size.
* The replicas then run chunk by chunk (:func:`fastcurv.resume.run_chunks`); results are those of
  an unchunked run (each replica's solvers run on their own; probes do not depend on the split).
* On a GPU, an out-of-memory error in a chunk empties the CUDA cache, halves the chunk and
  retries with a ``RuntimeWarning`` naming the new size (down to one replica, then it re-raises).

The cost model (:func:`estimate_bytes`) is a deliberately conservative estimate (not a proof;
the copy counts below follow the current solvers and backends), in bytes, of the job's peak
for a chunk of ``c`` replicas with P parameters of ``itemsize`` bytes, batches of at most ``n``
samples (N in all), K probes per matvec (the exact trace: K = C, the model's outputs per sample,
the vectors it back-propagates per sample) and m = min(max_iter, P) + 1 stored Lanczos vectors:

* vectors: ``c * P * itemsize * (stage + PARAM_COPIES)``, ``stage`` = the most ``[P]`` vectors
  per replica alive in any solver stage: Lanczos holds ``BASIS_COPIES * m`` (its basis grows by
  doubling, so while it grows the old and the new array coexist: fewer than 2m vectors); the
  basis kept for trace deflation (m) stays alive through the trace stage; plus
  ``VECTOR_COPIES * K`` around each matvec (float64 probe draws, projected probes, the
  operator's input/output and per-parameter copies, the products);
* cached state (fused backend): ``STATE_COPIES * cache_bytes`` (the cache plus, for the conv
  engine, the copies of its rows kept when solvers shrink their active set; an upper bound for
  MLPs, which read the rows in place); all of it is ``c * N * s`` with s the measured state
  bytes per replica and sample (:meth:`FusedBackend.state_bytes_per_sample`);
* per-batch transients: ``TRANSIENT_FACTOR * c * n * s`` for the probe-independent pass, plus
  the R-op tangents, ``(linear/conv layers + 4)`` tensors of ``c * n * K * widest * itemsize``
  (on the CPU the fused MLP engine bounds each by its ``chunk_bytes``, the conv engine by its
  ``sample_chunk_bytes``); the autograd backend: ``AUTOGRAD_FACTOR * c * n * K`` times the
  activation bytes per sample;
* the func backend, from its own calibrated estimates (:func:`fastcurv.backends.func.memory_costs`,
  per replica): reusing every batch's retained graph (or linearization), ``c`` times what N
  samples' graphs keep as cached state plus one batch's graph at its peak as transient; without
  reuse, its products in chunks of ``work_bytes``, at least one unit (one replica's graph, or in
  mode "forward" one replica and probe) and at most all of them;
* data: the batches' bytes when they are cached (``cache_data``);
* measure: epsilon_sharpness_subspace's random ``P x p`` matrices (:func:`matrix_bytes`): cached
  (up to the measure's 1 GiB, or the caller's ``max_matrix_bytes``) whenever the whole plan fits
  with them cached, else regenerated block by block in every product (the same matrices, so the
  same results; regenerating costs ``Ra P p`` normal draws per product, Ra = 1 shared or the
  chunk's replicas: 2x the time of a job on 94k-parameter MLPs with p = 1000), plus its
  pseudo-inverse's ``p x p`` float64 work.

Registered measures (:mod:`fastcurv.measures`) are otherwise assumed to hold at most
``VECTOR_COPIES`` vectors per probe for batches of ``PROBE_BATCH`` probes.

The plan keeps the estimate under ``SAFETY * budget``. It prefers the largest chunk whose state
is cached whole (no recomputation; func: every batch's graph reused, else none, with what is left
for the products' chunks, ``plan.func_options``); when even one replica's state does not fit, the largest
chunk that fits with a partial cache; when one replica does not fit at all, smaller batches.
epsilon_sharpness_subspace's matrix is cached when a plan with unsplit batches fits with it cached
(the chunk and the state cache then take what is left), else regenerated; but a shared matrix,
drawn once per chunk when cached, is regenerated when caching it needs so many more chunks that it
would be drawn more often than in every product (``2 (n_iter + 1) + 1`` per chunk) of the fewer chunks.
A budget too small for one replica (all of them, when the job cannot be split) and one sample
raises ``ValueError`` with the estimate.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field

import torch

BASIS_COPIES = 2
VECTOR_COPIES = 8
PARAM_COPIES = 2
STATE_COPIES = 2
TRANSIENT_FACTOR = 2
AUTOGRAD_FACTOR = 4
SAFETY = 0.85
PROBE_BATCH = 10  # probes per matvec in the trace estimators (hutchinson's probe_batch)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


# --- budgets -------------------------------------------------------------------------------------
def available_memory(device="cpu") -> int:
    """Bytes free now on ``device``: ``torch.cuda.mem_get_info`` for CUDA; on the CPU the
    ``MemAvailable`` line of ``/proc/meminfo`` (Linux). Raises ValueError where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        raise ValueError(f"cannot tell the free memory of a {device.type} device; pass memory_budget in bytes")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ValueError("cannot read MemAvailable from /proc/meminfo (not Linux?); pass memory_budget in bytes, e.g. '4GiB'")


def parse_budget(budget, device="cpu") -> int:
    """``memory_budget`` in bytes.

    int: bytes (> 0). str: a number with an optional unit (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB;
    e.g. ``"4GiB"``, ``"1.5 GB"``). float in (0, 1]: that fraction of :func:`available_memory` of
    ``device``. Anything else raises ValueError naming the problem.
    """
    if isinstance(budget, bool) or budget is None:
        raise ValueError(f"memory_budget must be bytes (int), a size like '4GiB' or a fraction in (0, 1], got {budget!r}")
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", budget)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory_budget={budget!r} is not a size: use e.g. '4GiB', '512MiB', '2GB' or bytes as an int")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
        if value < 1:
            raise ValueError(f"memory_budget={budget!r} is less than one byte (a string is a size; pass a fraction of the "
                             "free memory as a float, e.g. 0.5)")
        return int(value)
    if isinstance(budget, int) or (hasattr(budget, "dtype") and getattr(budget, "ndim", 1) == 0 and "int" in str(budget.dtype)):
        if int(budget) <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {int(budget)}")
        return int(budget)
    if isinstance(budget, float) or hasattr(budget, "dtype") and getattr(budget, "ndim", 1) == 0 and "float" in str(budget.dtype):
        budget = float(budget)
        if not math.isfinite(budget) or not 0 < budget <= 1:
            raise ValueError(f"a float memory_budget is a fraction of the free memory and must lie in (0, 1], got {budget!r}"
                             " (pass bytes as an int, e.g. 4 * 2**30, or a string like '4GiB')")
        return max(1, int(budget * available_memory(device)))
    raise ValueError(f"memory_budget must be bytes (int), a size like '4GiB' or a fraction in (0, 1], got {type(budget).__name__}")


def format_bytes(n: float) -> str:
    """``n`` bytes as a short string in GiB, MiB or KiB (bytes below 1 KiB)."""
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if abs(n) >= 2**10 else f"{int(n)} B"


# --- the cost model ------------------------------------------------------------------------------
@dataclass
class JobShape:
    """What the cost model needs to know about a job (see the module docstring).

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
    chunk_bytes: int = 4 << 20  # the fused MLP engine's CPU tangent chunk
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
    block = min(BLOCK_ROWS, s.P) * p * s.itemsize
    if s.matrix_injected is not None:  # an injected A: used as it is (or a converted copy)
        held, cached = s.matrix_injected, True
    else:
        cap = s.matrix_max if s.matrix_max is not None else (max_matrix_bytes if max_matrix_bytes is not None
                                                             else DEFAULT_MAX_BYTES)
        dense = rows * s.P * p * s.itemsize
        cached = dense <= cap
        held = dense if cached else rows * block
    work = rows * p * p * (16 + s.itemsize) if s.P >= 2 * p else 4 * s.P * p * 8
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
            cap = s.sample_chunk_bytes if s.sample_chunk_bytes is not None else ((2 << 30) if s.gpu else (16 << 20))
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
    """How a job is run within ``budget`` bytes (see the module docstring).

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
    return ", ".join(f"{k} {format_bytes(v)}" for k, v in est.items() if k != "total")


def _dense_matrix_bytes(shape: JobShape, chunk: int) -> int:
    """Bytes of epsilon_sharpness_subspace's dense ``[Ra, P, p]`` matrices for a chunk of ``chunk`` replicas."""
    return (1 if shape.matrix_shared else chunk) * shape.P * shape.matrix_p * shape.itemsize


def choose(shape: JobShape, R: int, budget: int, *, cache_data: bool | None = None) -> MemoryPlan:
    """The plan for ``R`` replicas of ``shape`` within ``budget`` bytes (rules in the module docstring)."""
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

    def largest(pred):
        if shape.unsplit:  # one chunk of all R replicas, or nothing
            return R if pred(R) else 0
        lo, hi = 0, R  # pred is monotone in c: find the largest c in 1..R with pred(c), 0 if none
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if pred(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

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
        lo, hi = shape.min_batch - 1, n - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(least, mid, 0):
                lo = mid
            else:
                hi = mid - 1
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


# --- looking at a job ----------------------------------------------------------------------------
def _stage_vectors(P, *, measures, max_iter, eig_solver, trace_method, trace_probes, top_k, slq_steps, slq_draws,
                   outputs=1):
    """(the most [P] vectors per replica alive in any solver stage, the most probes per matvec).
    ``outputs``: the model's outputs per sample (C), the vectors the exact trace back-propagates
    per sample in the probes' place."""
    from .sharpness import MEASURES

    measures = (measures,) if isinstance(measures, str) else tuple(measures)
    m = min(max_iter, P) + 1
    deflate = "trace" in measures and trace_method in ("auto", "deflated") and eig_solver == "lanczos"
    probes = 1
    stages = [VECTOR_COPIES]
    if "trace" in measures and trace_method == "exact":
        # no [P] probe vectors, but one backward pass of C vectors per sample: its tangents are
        # those of a C-probe matvec (FusedBackend.exact_trace chunks them as it chunks such a matvec)
        probes = max(probes, int(outputs))
    kept = 0
    if "top_k" in measures or "lambda_max" in measures or (deflate and trace_method == "deflated"):
        k = top_k if "top_k" in measures else 1
        if eig_solver == "lanczos":
            stages.append(BASIS_COPIES * m + VECTOR_COPIES + 2 * k)
            kept = m if deflate else 0
    if "lambda_min" in measures:
        stages.append(kept + 2 * m + VECTOR_COPIES)
    if "trace" in measures and trace_method != "exact":  # "auto" may deflate: planned as if it does
        tp = trace_probes if trace_probes is not None else (10 if deflate else 30)
        K = min(PROBE_BATCH, tp)
        probes = max(probes, K)
        if deflate or trace_method == "hutchinson":
            stages.append(kept + VECTOR_COPIES * K)
        else:
            stages.append(4 * (max(6, tp) // 3) + VECTOR_COPIES * K)
    if "spectrum" in measures:
        stages.append(kept + 2 * (min(slq_steps, P) + 1) + VECTOR_COPIES + 2 * slq_draws)
    if any(name not in MEASURES for name in measures):  # registered measures: K <= 10 probe batches assumed
        probes = max(probes, PROBE_BATCH)
        stages.append(kept + VECTOR_COPIES * PROBE_BATCH)
    return max(stages), probes


def _scan_data(data):
    """(first (x, y) pair, batch sizes, bytes of all batches) of a loader or one batch."""
    from .data import Batches, _split, is_single_batch

    if isinstance(data, Batches):
        first = next(iter(data))[1:]
        nbytes = sum(x.numel() * x.element_size() + y.numel() * y.element_size() for _, x, y in data) if data.cached else 0
        return first, list(data.sizes), nbytes
    items = [tuple(data)] if is_single_batch(data) else data
    first, sizes, nbytes, empty = None, [], 0, 0
    for i, item in enumerate(items):
        x, y = _split(item, i)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() == 0:
            raise TypeError(f"batch {i}: inputs and targets must be tensors with a batch axis")
        if x.shape[0] == 0:
            empty += 1
            continue  # (Batches skips it too)
        if first is None:
            first = (x[:2], y[:2])
        sizes.append(int(x.shape[0]))
        nbytes += x.numel() * x.element_size() + y.numel() * y.element_size()
    if not sizes:
        raise ValueError("the data loader yielded only empty batches" if empty
                         else "the data loader yielded no batches (empty loader)")
    return first, sizes, nbytes


def _activation_stats(rs, x) -> tuple[int, int, int]:
    """(sum of leaf-module output sizes, the widest output size, the model's output size) per
    sample, in elements (the inputs carry no tangent)."""
    total, widest = 0, 1
    hooks = []

    def hook(mod, inp, out):
        nonlocal total, widest
        if isinstance(out, torch.Tensor) and out.dim() > 0:
            per = out.numel() // max(1, out.shape[0])
            total += per
            widest = max(widest, per)

    for mod in rs.base.modules():
        if not list(mod.children()):
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = rs.call({n: t[0] for n, t in rs.params.items()}, {n: t[0] for n, t in rs.buffers.items()}, x)
    finally:
        for h in hooks:
            h.remove()
    outputs = out.numel() // max(1, out.shape[0]) if isinstance(out, torch.Tensor) and out.dim() > 0 else 1
    return total, widest, max(1, int(outputs))


def job_shape(models, data, *, measures=("lambda_max", "trace"), loss="cross_entropy", reduction="mean",
              loss_reduction="mean", backend="auto", bn_mode="eval", max_iter=100, eig_solver="lanczos",
              trace_method="auto", trace_probes=None, top_k=5, slq_steps=60, slq_draws=1,
              backend_options=None, measure_options=None, common_random_numbers=True, **_ignored) -> tuple[JobShape, str]:
    """The :class:`JobShape` of a ``batched_sharpness`` job and the backend it will use. Reads the
    data once (sizes and bytes) and runs one replica on up to two samples (state and activation sizes).
    ``models`` are checked as ``batched_sharpness`` checks them (:func:`fastcurv.replicas.validate_models`)."""
    from .backends.fused import FusedBackend
    from .backends.fused.layers import _is_general
    from .data import Batches
    from .losses import Loss
    from .operator import select_backend
    from .replicas import ReplicaSet, validate_models

    models = validate_models(models)  # (a single model would be planned as its layers)
    rs = ReplicaSet(models[:1], bn_mode=bn_mode)
    (x, y), sizes, nbytes = _scan_data(data)
    lossobj = Loss(loss, reduction, loss_reduction)
    lossobj.num_samples = sum(sizes)
    x = x.to(rs.device, rs.dtype) if x.is_floating_point() else x.to(rs.device)
    y = y.to(rs.device, rs.dtype) if y.is_floating_point() else y.to(rs.device)
    name, _ = select_backend(rs, backend, lossobj, (x, y))  # (the engine check, as the operator runs it)
    n1 = x.shape[0]
    act, widest, outputs = _activation_stats(rs, x)
    state = 0
    fused = name == "fused"
    conv = False
    opts = dict(backend_options or {})
    if fused:
        fb = FusedBackend(rs, lossobj, Batches((x, y), device=rs.device, dtype=rs.dtype, cache=True), **opts)
        state = fb.state_bytes_per_sample(x, y)
        if trace_method == "auto" and fb.exact_trace_support()[0]:
            trace_method = "exact"  # what "auto" will run: no probes
        conv = _is_general(fb.layers)
        layers = sum(1 for l in fb.layers if l.kind in ("linear", "conv"))
    else:
        layers = sum(1 for mod in rs.base.modules() if not list(mod.children()))
    func_mode, func_costs = "", {}
    if name == "func":
        from .backends.func import memory_costs, resolve_mode

        func_mode = resolve_mode(rs, opts.get("mode", "auto"), bool(opts.get("compile", False)))
        func_costs = memory_costs(rs, x, func_mode)
    stage, probes = _stage_vectors(rs.P, measures=measures, max_iter=max_iter, eig_solver=eig_solver,
                                   trace_method=trace_method, trace_probes=trace_probes, top_k=top_k,
                                   slq_steps=slq_steps, slq_draws=slq_draws, outputs=outputs)
    itemsize = rs.dtype.itemsize
    shape = JobShape(P=rs.P, itemsize=itemsize, batch=max(sizes), num_samples=sum(sizes), data_bytes=nbytes,
                     vectors=stage, probes=probes, state_per_sample=state, act_per_sample=-(-act * itemsize // n1) if n1 else 0,
                     widest=widest, layers=layers, fused=fused, gpu=rs.device.type == "cuda", conv=conv,
                     chunk_bytes=opts.get("chunk_bytes", 4 << 20), sample_chunk_bytes=opts.get("sample_chunk_bytes"),
                     func_mode=func_mode, func_costs=func_costs,
                     whole_batches=_whole_batches(rs, measures, measure_options), min_batch=2 if rs.batch_statistics else 1)
    _subspace_matrix(shape, rs, measures, measure_options, common_random_numbers)
    from .measures import unsplittable

    shape.unsplit = unsplittable({"measures": measures, "measure_options": measure_options,
                                  "common_random_numbers": common_random_numbers})
    shape.one_pass = isinstance(data, _KeptBatches)
    return shape, name


def _subspace_matrix(shape: JobShape, rs, measures, measure_options, common) -> None:
    """Fill in ``shape``'s epsilon_sharpness_subspace matrix fields (see :func:`matrix_bytes`)."""
    name = "epsilon_sharpness_subspace"
    if name not in ((measures,) if isinstance(measures, str) else tuple(measures)):
        return
    options = (measure_options or {}).get(name, {})
    A = options.get("A")
    if isinstance(A, torch.Tensor) and A.dim() in (2, 3):
        shape.matrix_p = max(1, int(A.shape[-1]))
        shape.matrix_shared = A.dim() == 2 or A.shape[0] == 1
        same = A.dtype == rs.dtype and A.device == torch.device(rs.device)
        shape.matrix_injected = 0 if same else A.numel() * shape.itemsize
        return
    p = options.get("p", 1000)
    if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1:
        return  # (the measure refuses it)
    shape.matrix_p = min(int(p), shape.P)
    shape.matrix_shared = bool(common)
    n_iter = options.get("n_iter", 10)
    if isinstance(n_iter, numbers.Integral) and not isinstance(n_iter, bool) and n_iter >= 0:
        shape.matrix_products = 2 * (int(n_iter) + 1) + 1
    mx = options.get("max_matrix_bytes")
    shape.matrix_max = int(mx) if isinstance(mx, numbers.Integral) and not isinstance(mx, bool) else None


def _whole_batches(rs, measures, measure_options) -> str:
    """Why a job's results depend on its batches (so that a memory plan must not split them), or ""."""
    if rs.batch_statistics:
        return ("batch-statistics BatchNorm (bn_mode='batch' or track_running_stats=False) normalizes each batch by its "
                "own statistics")
    options = measure_options or {}
    names = [m for m in ((measures,) if isinstance(measures, str) else measures)
             if m in ("rho_sharpness", "adaptive_rho_sharpness") and options.get(m, {}).get("per_batch", True)]
    if names:
        return f"{' and '.join(names)} take each batch's worst case (per_batch=True)"
    return ""


def plan_memory(models, data, budget, **job) -> MemoryPlan:
    """The :class:`MemoryPlan` for ``batched_sharpness(models, data, memory_budget=budget, **job)``
    (``job``: its keywords; ``cache_data`` other than "auto" is kept). ``models`` are checked as
    ``batched_sharpness`` checks them: a single model, say, is refused, not planned as its layers."""
    from .replicas import validate_models

    models = validate_models(models)
    R = len(models)
    device = next(models[0].parameters()).device
    nbytes = parse_budget(budget, device)
    shape, name = job_shape(models, data, **job)
    cache_data = job.get("cache_data", "auto")
    plan = choose(shape, R, nbytes, cache_data=None if cache_data == "auto" else bool(cache_data))
    plan.backend = name
    return plan


class _KeptBatches(list):
    """The batches of a one-pass loader, read once by :func:`read_one_pass` (a list: the plan and
    the job read it again)."""


def is_one_pass(data) -> bool:
    """Whether ``data`` is a one-pass loader, which :func:`read_one_pass` reads once and keeps: a
    generator, a DataLoader's iterator, or an iterator (it has ``__next__``) whose type has no
    ``__len__`` (``iter(list)``, ``map``, ``zip``, ``itertools``). Anything else (a list, a
    DataLoader, one batch, a loader whose ``__iter__`` resets and returns ``self`` and that has a
    ``__len__``) is taken as re-iterable, ``iter()`` starting a new pass. Decided from the type
    alone: ``iter()`` is not called (on a DataLoader it would start workers and draw a seed from
    torch's random generator)."""
    from .data import Batches, is_single_batch

    if isinstance(data, Batches) or is_single_batch(data):
        return False
    if inspect.isgenerator(data):
        return True
    loader_iter = getattr(getattr(torch.utils.data, "dataloader", None), "_BaseDataLoaderIter", None)
    if loader_iter is not None and isinstance(data, loader_iter):  # (it has a __len__, but one pass)
        return True
    return isinstance(data, collections.abc.Iterator) and not hasattr(type(data), "__len__")


def _kept_bytes(t, dtype, targets=False) -> int:
    """The bytes of a batch's tensor ``t`` kept on the device as :class:`fastcurv.data.Batches`
    converts it (floating point to ``dtype``, integer targets to int64); 0 for anything else."""
    if not isinstance(t, torch.Tensor):
        return 0
    if t.is_floating_point():
        return t.numel() * dtype.itemsize
    if targets and t.dtype != torch.int64:  # (losses.as_labels: uint8, int32 and bool labels become int64)
        return t.numel() * 8
    return t.numel() * t.element_size()


def read_one_pass(models, data, cache_data="auto", budget=None):
    """``(data, cache_data)`` for a job with a memory budget, whose plan reads the data before the
    job does. A one-pass loader (:func:`is_one_pass`: a generator, or an iterator whose type has no
    ``__len__``) is read here, once, into a list of its batches on the models' device and dtype
    (copied where the loader's own tensors could be refilled, as :class:`fastcurv.data.Batches`
    does), which the plan and the job then both read, with ``cache_data=True`` (they stay in
    memory, and the plan counts them). ``cache_data=False`` cannot be honoured then (every product
    re-reads the batches): ValueError. With ``budget``, reading stops with a ValueError once the
    batches read take more than ``SAFETY * budget`` (they could never fit; a stream larger than the
    machine's memory is not read whole first). Other data (lists, DataLoaders, one batch,
    :class:`~fastcurv.data.Batches`, loaders with a ``__len__``) is returned as it is, not iterated."""
    from .data import Batches, _split

    if not is_one_pass(data):
        return data, cache_data
    name = type(data).__name__
    if cache_data is False:
        raise ValueError("cache_data=False with memory_budget= needs a re-iterable loader (a list of batches, a "
                         f"DataLoader): this {name} is read as a one-pass loader (a generator, or an iterator whose "
                         "type has no __len__), but without caching every Hessian product reads the batches again; "
                         "pass cache_data='auto' (its batches are then kept, within the budget) or a re-iterable "
                         "loader (a loader whose __iter__ starts a new pass and returns self needs a __len__ to be "
                         "taken as one)")
    p = next(models[0].parameters())
    nbytes = None if budget is None else parse_budget(budget, p.device)
    limit = None if nbytes is None else SAFETY * nbytes

    def limited():
        kept = 0
        for i, item in enumerate(data):
            if limit is not None:
                try:
                    x, y = _split(item, i)
                except TypeError:
                    yield item  # (Batches names the problem)
                    continue
                kept += _kept_bytes(x, p.dtype) + _kept_bytes(y, p.dtype, targets=True)
                if kept > limit:
                    raise ValueError(
                        f"memory_budget={format_bytes(nbytes)} is too small for the batches of this one-pass {name}: "
                        "a one-pass loader (a generator, or an iterator whose type has no __len__) can be read only "
                        "once, so its batches must be kept on the device for every Hessian product, and its first "
                        f"{i + 1} batches already take {format_bytes(kept)}, more than the budget allows "
                        f"({SAFETY:.0%} of it, {format_bytes(limit)}); reading stopped there. Pass a re-iterable "
                        "loader (a list of batches, a DataLoader: its batches are read again in every product when "
                        "they do not fit) or a larger budget")
            yield item

    batches = Batches(limited(), device=p.device, dtype=p.dtype, cache=True)
    return _KeptBatches((x, y) for _, x, y in batches), True


def _operator_shape(name, backend, batches, probes) -> JobShape:
    """The :class:`JobShape` of a :class:`fastcurv.HessianOperator`'s own memory (no solver
    vectors: the probes are the caller's) with backend ``name``."""
    rs = backend.replicas
    _, x, y = next(iter(batches))
    act, widest, outputs = _activation_stats(rs, x[:2])
    n1 = min(2, x.shape[0])
    fused = name == "fused"
    if fused and backend.exact_trace_support()[0]:  # exact_trace() back-propagates C = outputs vectors per sample
        probes = max(probes, outputs)
    func_mode, func_costs = "", {}
    if name == "func":
        from .backends.func import memory_costs

        func_mode, func_costs = backend.mode, memory_costs(rs, x[:2], backend.mode)
    layers = (sum(1 for l in backend.layers if l.kind in ("linear", "conv")) if fused
              else sum(1 for mod in rs.base.modules() if not list(mod.children())))
    return JobShape(P=rs.P, itemsize=rs.dtype.itemsize, batch=max(batches.sizes), num_samples=batches.num_samples,
                    # (the batches' bytes that are the operator's own, not the caller's tensors, which it only reads)
                    data_bytes=batches.owned_bytes, vectors=0, probes=probes,
                    state_per_sample=backend.state_bytes_per_sample(x, y) if fused else 0,
                    act_per_sample=-(-act * rs.dtype.itemsize // n1) if n1 else 0, widest=widest, layers=layers,
                    fused=fused, gpu=rs.device.type == "cuda", conv=fused and backend._maps is not None,
                    chunk_bytes=getattr(backend, "chunk_bytes", None), sample_chunk_bytes=getattr(backend, "sample_chunk_bytes", None),
                    func_mode=func_mode, func_costs=func_costs)


def operator_least_bytes(name, backend, batches, *, probes: int = PROBE_BATCH) -> dict:
    """The least a :class:`fastcurv.HessianOperator` with backend ``name`` needs (:func:`estimate_bytes`'
    parts): its stacked parameters, the batches it owns, and one batch's transients for ``probes``
    probes per matvec. fused: no cached state, tangents for the probes (or, where
    :meth:`exact_trace` applies, for the model's C outputs if more); func: no reused graphs, its
    products one unit at a time (one replica's graph; mode "forward": one replica and probe);
    autograd: one replica, batch and probe at a time (how it always runs)."""
    shape = _operator_shape(name, backend, batches, probes)
    R = backend.replicas.R
    if name in ("fused", "func"):
        return estimate_bytes(shape, R, cache_bytes=0)
    parts = estimate_bytes(shape, R)  # autograd: its graphs are one replica's, for one probe
    parts["batch_transient"] = estimate_bytes(dataclasses.replace(shape, probes=1), 1)["batch_transient"]
    parts["total"] = sum(v for k, v in parts.items() if k != "total")
    return parts


def operator_cache_bytes(backend, batches, budget, *, probes: int = PROBE_BATCH) -> int:
    """``cache_bytes`` for a fused ``backend`` of a :class:`fastcurv.HessianOperator` with a
    ``memory_budget``: what is left of ``SAFETY * budget`` after the operator's own memory
    (:func:`operator_least_bytes`: its stacked parameters, the cached batches, one batch's
    transients and tangents for ``probes`` probes per matvec, or for the model's C outputs where
    :meth:`exact_trace` applies, if more), divided by ``STATE_COPIES``. Raises ValueError when
    nothing is left."""
    nbytes, need = _checked_operator_budget("fused", backend, batches, budget, probes)
    return int((SAFETY * nbytes - need["total"]) // STATE_COPIES)


def check_operator_budget(name, backend, batches, budget, *, probes: int = PROBE_BATCH) -> int:
    """Raise ValueError when ``budget`` (times ``SAFETY``) is less than what a
    :class:`fastcurv.HessianOperator` with backend ``name`` needs at least
    (:func:`operator_least_bytes`); else return the budget in bytes."""
    return _checked_operator_budget(name, backend, batches, budget, probes)[0]


def _checked_operator_budget(name, backend, batches, budget, probes) -> tuple[int, dict]:
    """``(budget in bytes, operator_least_bytes)``, or the ValueError of :func:`check_operator_budget`."""
    nbytes = parse_budget(budget, backend.replicas.device)
    need = operator_least_bytes(name, backend, batches, probes=probes)
    if need["total"] > SAFETY * nbytes:
        what = {"fused": "without any cached state ", "func": "without reused graphs, one replica's products at a time ",
                "autograd": "running one replica, batch and probe at a time "}.get(name, "")
        raise ValueError(f"memory_budget={format_bytes(nbytes)} is too small for this operator: it needs about "
                         f"{format_bytes(need['total'] / SAFETY)} {what}({_parts(need)}); use fewer replicas, smaller "
                         "batches or a larger budget")
    return nbytes, need


def func_bytes_caps(budget, device) -> dict:
    """``reuse_bytes`` and ``work_bytes`` of a func backend under ``memory_budget``: each at most
    half of ``SAFETY * budget`` (reused graphs or linearizations and one chunk's temporaries are alive
    together), and at most the backend's defaults."""
    from .backends.func import DEFAULT_REUSE_BYTES, DEFAULT_WORK_BYTES

    half = max(1, int(SAFETY * parse_budget(budget, device)) // 2)
    return {"reuse_bytes": min(DEFAULT_REUSE_BYTES, half), "work_bytes": min(DEFAULT_WORK_BYTES, half)}


class SplitBatches:
    """The batches of ``data`` (a loader or one ``(inputs, targets)`` pair) cut into pieces of at
    most ``max_batch`` samples, in order; re-iterable when ``data`` is."""

    def __init__(self, data, max_batch: int):
        from .data import is_single_batch

        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.source = [tuple(data)] if is_single_batch(data) else data
        self.max_batch = int(max_batch)

    def __iter__(self):
        from .data import _split

        for i, item in enumerate(self.source):
            x, y = _split(item, i)
            for a in range(0, x.shape[0], self.max_batch):
                yield x[a:a + self.max_batch], y[a:a + self.max_batch]


# --- out-of-memory errors ------------------------------------------------------------------------
def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.cuda.OutOfMemoryError`` and RuntimeErrors whose message says "out of memory"."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_cached_memory() -> None:
    """Return the CUDA caching allocator's free blocks (after an out-of-memory error)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def warn_halving(size: int, new: int, first: int, error: str) -> None:
    """The RuntimeWarning of an out-of-memory retry (names the new chunk size)."""
    warnings.warn(f"out of memory on a chunk of {size} replicas (starting at replica {first}); "
                  f"retrying with replica_chunk={new} ({error[:160]})", RuntimeWarning, stacklevel=3)


__all__ = ["JobShape", "MemoryPlan", "SplitBatches", "available_memory", "choose", "estimate_bytes", "format_bytes",
           "check_operator_budget", "is_out_of_memory", "job_shape", "matrix_bytes", "operator_cache_bytes",
           "is_one_pass", "operator_least_bytes", "parse_budget", "plan_memory", "read_one_pass"]
