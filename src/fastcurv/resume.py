"""Chunked, resumable ``batched_sharpness``: replicas are processed ``replica_chunk`` at a time and
each finished chunk is saved atomically to a JSON-lines file, so a killed job loses nothing.

File layout (``output``, and ``output.part<rank>`` for ranks of a distributed job): line 1 is a
header ``{"fastcurv": "sharpness-results", "fingerprint": ..., "config": ...}``; every later line
is one finished chunk ``{"start": a, "stop": b, ...}`` with the results of replicas ``a..b-1``.
A file is always replaced whole (write to a hidden temporary file ``.<name>.tmp<pid>`` in the
same folder, fsync, ``os.replace``), so it is never half-written. A restarted job with the same
arguments skips replicas already saved; a different configuration (models, data, measures, solver
settings, seed, ...) raises :class:`FingerprintMismatch` naming what differs. The models are
identified by their module structure (each module's class and ``extra_repr()``) and weights;
callables (a ``loss=``, an option) by what they compute (:func:`describe`), a function defined
outside installed packages with the values of the module-level names it reads (a setting such as
``LABEL_SMOOTHING = 0.1``, a class-weight tensor, a helper function and what that reads); a setting
that cannot be identified reliably makes a rerun be refused, saying so. Paths may start with ``~``.
Values are strict JSON (NaN as null, infinities as "Infinity" / "-Infinity"). The output's folder
is created, and checked, before any work.

Results do not depend on how replicas are split (chunks, ranks): each replica runs its own
solvers; with common random numbers every replica gets the same probes whatever its chunk, and
with independent probes (``common_random_numbers=False``) each replica's probes come from its
own stream keyed by ``seed`` and its global number (see :func:`fastcurv.solvers.probes.replica_window`).

The parts live in their own modules, and this one re-exports their names: fingerprints in
:mod:`fastcurv.fingerprint`, output paths in :mod:`fastcurv.paths`, the results file in
:mod:`fastcurv.results_file`, a chunk's warnings in :mod:`fastcurv.chunk_warnings`; this module runs
the chunks (:func:`run_chunks`).
"""
from __future__ import annotations

import sys

from .chunk_warnings import _recording_warnings, _reemit
from .data import Batches
from .fingerprint import fingerprint
from .measures import split_refusal
from .memory import is_out_of_memory, release_cached_memory, warn_halving
from .results_file import ResultStore, to_record
from .solvers.probes import replica_window

# re-exported (the names that callers, the tests and the docs import from fastcurv.resume)
from .fingerprint import data_signature, describe, describe_changes, models_digest, module_structure  # noqa: F401
from .paths import expand_path, prepare_file, prepare_folder, replace_atomically, sibling_path  # noqa: F401
from .results_file import FingerprintMismatch, merge_records, part_files, write_atomic  # noqa: F401


# --- the chunked job -----------------------------------------------------------------------------
def _runs(indices: list[int], chunk: int) -> list[tuple[int, int]]:
    """Contiguous ``[a, b)`` ranges of at most ``chunk`` replicas covering ``indices`` (sorted)."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i and i - out[-1][0] < chunk:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def run_chunks(models, data, kwargs: dict, *, lo: int = 0, hi: int | None = None, replica_chunk: int | None = None,
               output: str | None = None, read_also=(), batches: Batches | None = None):
    """Compute ``batched_sharpness(models[a:b], ...)`` for every chunk of replicas in ``[lo, hi)``.

    With ``output``, finished chunks are saved as they finish and chunks already in ``output`` (or
    ``read_also``) are skipped. Returns ``(records, digest, config)``: the records of ``[lo, hi)``
    (saved and new) in replica order, and the job's fingerprint (None without ``output``).
    Ctrl-C stops after saving every finished chunk, then re-raises KeyboardInterrupt. The
    warnings of each chunk are re-emitted after it, also when it fails (before its error goes on),
    but not when it ran out of memory and is retried in halves (the retry raises them again).
    """
    from .sharpness import batched_sharpness

    models = models if isinstance(models, list) else list(models)  # (a validated list stays marked checked)
    R = len(models)
    hi = R if hi is None else hi
    if batches is None:
        p = next(models[0].parameters())
        batches = Batches(data, device=p.device, dtype=p.dtype, cache=kwargs.get("cache_data", "auto"))
    chunk = max(1, int(replica_chunk or max(1, hi - lo)))
    store, digest, config = None, None, None
    saved: list[dict] = []
    if output is not None:
        digest, config = fingerprint(models, batches, kwargs)
        store = ResultStore(output, digest, config, read_also)
        saved = _select(store.records, lo, hi)
    done = {i for r in saved for i in range(r["start"], r["stop"])}
    todo = _runs([i for i in range(lo, hi) if i not in done], chunk)
    new: list[dict] = []
    try:
        while todo:
            a, b = todo.pop(0)
            oom, caught = None, []
            try:
                with _recording_warnings() as caught, replica_window(a, R):
                    res = batched_sharpness(models[a:b], batches, **kwargs)
            except BaseException as exc:  # out of memory (GPU): halve the chunk and retry
                retry = isinstance(exc, Exception) and is_out_of_memory(exc)
                why = split_refusal(kwargs) if retry and b - a > 1 else None
                if not retry or why:
                    _reemit(caught, a, b)  # what the failing chunk warned of goes before its error
                    if why:
                        exc.add_note(f"not retried in smaller chunks: {why}")
                    raise
                oom = f"{type(exc).__name__}: {str(exc)[:300]}"  # the traceback (and the chunk's tensors) go here
            if oom is not None:
                release_cached_memory()
                if b - a == 1:
                    _reemit(caught, a, b)
                    raise RuntimeError(
                        f"out of memory even with one replica at a time (replica {a}): {oom}. Lower the batch size, pass "
                        "a smaller memory_budget=, or use a device with more memory")
                chunk = max(1, (b - a) // 2)
                warn_halving(b - a, chunk, a, oom)
                todo = _runs([i for r0, r1 in [(a, b)] + todo for i in range(r0, r1)], chunk)
                continue
            _reemit(caught, a, b)
            rec = to_record(res, a, b)
            if store is not None:
                store.add(rec)
            new.append(rec)
    except KeyboardInterrupt:
        n = sum(r["stop"] - r["start"] for r in new)
        saved_now = len(store.saved() & set(range(lo, hi))) if store is not None else 0
        where = (f"; {saved_now} finished replicas are saved in {store.path}: rerun the same call to resume"
                 if store is not None else "")
        print(f"fastcurv: interrupted after {n} new replicas{where}", file=sys.stderr)
        raise
    return sorted(saved + new, key=lambda r: r["start"]), digest, config


def _select(records: list[dict], lo: int, hi: int) -> list[dict]:
    """Non-overlapping saved records inside ``[lo, hi)`` (records of other splits that straddle
    the range are left out: their replicas are recomputed)."""
    chosen: list[dict] = []
    taken: set[int] = set()
    for r in sorted(records, key=lambda r: (r["start"], -r["stop"])):
        span = set(range(r["start"], r["stop"]))
        if r["start"] >= lo and r["stop"] <= hi and span and not (span & taken):
            chosen.append(r)
            taken |= span
    return chosen
