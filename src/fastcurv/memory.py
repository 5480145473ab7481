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

This module holds the out-of-memory helpers and re-exports the rest from where it lives: the
budgets (:func:`parse_budget`, :func:`available_memory`, :func:`format_bytes`) in
:mod:`fastcurv.memory_budget`, the cost model and the plan in :mod:`fastcurv.memory_model`,
measuring a job or an operator in :mod:`fastcurv.memory_job`, the one-pass and split loaders in
:mod:`fastcurv.data`.
"""
from __future__ import annotations

import warnings

import torch

# re-exported (the names callers import from fastcurv.memory): budgets, loaders, measuring a job, the cost model
from .data import SplitBatches, is_one_pass, read_one_pass  # noqa: F401
from .memory_budget import available_memory, format_bytes, parse_budget  # noqa: F401
from .memory_job import (check_operator_budget, func_bytes_caps, job_shape, operator_cache_bytes,  # noqa: F401
                         operator_least_bytes, plan_memory)
from .memory_model import (AUTOGRAD_FACTOR, BASIS_COPIES, PARAM_COPIES, PROBE_BATCH, SAFETY,  # noqa: F401
                           STATE_COPIES, TRANSIENT_FACTOR, VECTOR_COPIES, JobShape, MemoryPlan, choose,
                           estimate_bytes, matrix_bytes)


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
