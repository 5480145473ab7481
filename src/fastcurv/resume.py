"""Chunked, resumable ``batched_sharpness``: replicas are processed ``replica_chunk`` at a time and
each finished chunk is saved atomically to a JSON-lines file, so a killed job loses nothing.

File layout (``output``, and ``output.part<rank>`` for ranks of a distributed job): line 1 is a
header ``{"fastcurv": "sharpness-results", "fingerprint": ..., "config": ...}``; every later line
is one finished chunk ``{"start": a, "stop": b, ...}`` with the results of replicas ``a..b-1``.
A file is always replaced whole (write to a temporary file, fsync, ``os.replace``), so it is never
half-written. A restarted job with the same arguments skips replicas already saved; a different
configuration (models, data, measures, solver settings, seed, ...) raises
:class:`FingerprintMismatch`.

Results do not depend on how replicas are split (chunks, ranks): each replica runs its own
solvers; with common random numbers every replica gets the same probes whatever its chunk, and
with independent probes (``common_random_numbers=False``) each replica's probes come from its
own stream keyed by ``seed`` and its global number (see :func:`fastcurv.solvers.probes.replica_window`).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import warnings

import torch

from .data import Batches
from .solvers import SpectralDensity
from .memory import is_out_of_memory, release_cached_memory, warn_halving
from .solvers.probes import replica_window

HEADER_TAG = "sharpness-results"


class FingerprintMismatch(ValueError):
    """The output file was written by a job with a different configuration."""


# --- fingerprints --------------------------------------------------------------------------------
def _jsonable(obj):
    if callable(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    if isinstance(obj, torch.Tensor):
        return {"tensor": hashlib.sha256(obj.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()}
    return repr(obj)


def models_digest(models) -> str:
    """sha256 over every replica's class, parameter and buffer names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for m in models:
        h.update(type(m).__qualname__.encode())
        for kind, items in (("p", m.named_parameters()), ("b", m.named_buffers())):
            for n, t in items:
                t = t.detach().cpu().contiguous()
                h.update(f"{kind}:{n}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_signature(batches: Batches) -> dict:
    """Summary of the data that a shuffled pass of the same data set keeps: the sample count, the
    batch sizes in order, sums and sums of squares of inputs and targets, and a sum over samples
    that pairs each input with its target (fixed random projections ``(x_i . u)(1 + y_i . w)``),
    which changes when the targets are permuted against the inputs (12 significant digits)."""
    n, sx, sxx, sy, syy, pair = 0, 0.0, 0.0, 0.0, 0.0, 0.0
    shapes = set()
    proj: dict = {}

    def direction(numel, key):
        if (key, numel) not in proj:
            g = torch.Generator().manual_seed(7 if key == "x" else 11)
            proj[(key, numel)] = torch.randn(numel, generator=g, dtype=torch.float64)
        return proj[(key, numel)]

    for _, x, y in batches:
        n += x.shape[0]
        xf, yf = x.to(torch.float64).reshape(x.shape[0], -1).cpu(), y.to(torch.float64).reshape(y.shape[0], -1).cpu()
        sx += float(xf.sum())
        sxx += float(xf.square().sum())
        sy += float(yf.sum())
        syy += float(yf.square().sum())
        pair += float(((xf @ direction(xf.shape[1], "x")) * (1 + yf @ direction(yf.shape[1], "y"))).sum())
        shapes.add((tuple(x.shape[1:]), str(x.dtype), tuple(y.shape[1:]), str(y.dtype)))
    return {"samples": n, "batches": list(batches.sizes), "inputs": [f"{sx:.12g}", f"{sxx:.12g}"],
            "targets": [f"{sy:.12g}", f"{syy:.12g}"], "pairs": f"{pair:.12g}", "shapes": sorted(map(repr, shapes))}


def fingerprint(models, batches: Batches, kwargs: dict) -> tuple[str, dict]:
    """``(digest, config)`` identifying a job: models, data and every result-changing keyword, its
    defaults filled in (so that a job started through :func:`fastcurv.batched_sharpness` and one
    started through :func:`fastcurv.distributed.batched_sharpness` with the same settings match)."""
    from .sharpness import result_settings

    config = result_settings(kwargs, with_measures=True)
    config = json.loads(json.dumps(config, default=_jsonable, sort_keys=True))
    config["R"] = len(models)
    config["models"] = models_digest(models)
    config["data"] = data_signature(batches)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:32]
    return digest, config


# --- (de)serialising results ---------------------------------------------------------------------
def _enc(t: torch.Tensor) -> dict:
    t = t.detach().cpu()
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "data": t.reshape(-1).tolist()}


def _dec(d: dict) -> torch.Tensor:
    return torch.tensor(d["data"], dtype=getattr(torch, d["dtype"])).reshape(d["shape"])


def to_record(res, start: int, stop: int) -> dict:
    """A JSON-able dict with the results of replicas ``start..stop-1`` (``res`` holds just them)."""
    rec = {"start": start, "stop": stop, "backend": res.backend, "backend_reason": res.backend_reason,
           "trace_method": res.trace_method, "trace_reason": res.trace_reason,
           "num_matvecs": res.num_matvecs, "seconds": res.seconds, "flags": list(res.flags),
           "ok": _enc(res.ok) if res.ok is not None else None}
    for key in ("values", "stderr", "error_bounds", "iterations", "converged"):
        rec[key] = {name: _enc(t) for name, t in getattr(res, key).items()}
    rec["spectrum"] = None if res.spectrum is None else {"nodes": _enc(res.spectrum.nodes), "weights": _enc(res.spectrum.weights)}
    return rec


def _pad_last(t: torch.Tensor, m: int, fill_first: bool) -> torch.Tensor:
    if t.shape[-1] == m:
        return t
    pad = (t[..., :1] if fill_first else torch.zeros_like(t[..., :1])).expand(*t.shape[:-1], m - t.shape[-1])
    return torch.cat([t, pad], -1)


def merge_records(records: list[dict], R: int):
    """One :class:`fastcurv.SharpnessResult` for replicas ``0..R-1`` from records covering them."""
    from .sharpness import SharpnessResult

    records = sorted((r for r in records if r["stop"] > r["start"]), key=lambda r: r["start"])
    covered = [i for r in records for i in range(r["start"], r["stop"])]
    if covered != list(range(R)):
        missing = sorted(set(range(R)) - set(covered))
        raise RuntimeError(f"results cover replicas {covered[:5]}... but replicas {missing[:10]} are missing or duplicated")
    out = SharpnessResult()
    for key in ("values", "stderr", "error_bounds", "iterations", "converged"):
        names = list(records[0][key]) if records else []
        getattr(out, key).update({n: torch.cat([_dec(r[key][n]) for r in records]) for n in names})
    out.ok = torch.cat([_dec(r["ok"]) for r in records]) if records else torch.zeros(0, dtype=torch.bool)
    out.flags = [f for r in records for f in r["flags"]]
    if records and records[0]["spectrum"] is not None:
        nodes = [_dec(r["spectrum"]["nodes"]) for r in records]
        weights = [_dec(r["spectrum"]["weights"]) for r in records]
        m = max(t.shape[-1] for t in nodes)
        out.spectrum = SpectralDensity(torch.cat([_pad_last(t, m, True) for t in nodes]),
                                       torch.cat([_pad_last(t, m, False) for t in weights]))
    backends = list(dict.fromkeys(r["backend"] for r in records))
    out.backend = ",".join(backends)
    out.backend_reason = records[0]["backend_reason"] if len(backends) == 1 and records else "; ".join(
        dict.fromkeys(r["backend_reason"] for r in records))
    for key in ("trace_method", "trace_reason"):  # (files written before these were recorded lack them)
        setattr(out, key, "; ".join(dict.fromkeys(r.get(key, "") for r in records if r.get(key))))
    out.num_matvecs = sum(r["num_matvecs"] for r in records)
    out.seconds = sum(r["seconds"] for r in records)
    return out


# --- the results file ----------------------------------------------------------------------------
class ResultStore:
    """Finished chunks of one job, saved atomically to ``path`` (see the module docstring).

    ``read_also``: more files of the same job (other ranks' parts) whose chunks count as done.
    """

    def __init__(self, path, digest: str, config: dict, read_also=()):
        self.path, self.digest, self.config = str(path), digest, config
        self.own: list[dict] = self._load(self.path)
        self.others: list[dict] = [rec for p in read_also if os.path.abspath(p) != os.path.abspath(self.path)
                                   for rec in self._load(p)]

    def _load(self, path) -> list[dict]:
        if not os.path.exists(path):
            return []
        with open(path) as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        if not lines:
            return []
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not a fastcurv results file (bad first line: {exc})") from None
        if head.get("fastcurv") != HEADER_TAG:
            raise ValueError(f"{path} is not a fastcurv results file; delete it or choose another output path")
        if head.get("fingerprint") != self.digest:
            old = head.get("config", {})
            diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
            raise FingerprintMismatch(
                f"{path} was written by a job with a different configuration (differs in: {', '.join(diff) or 'unknown'}); "
                "rerun with the same models, data and arguments to resume, or use another output path")
        return [json.loads(ln) for ln in lines[1:]]

    @property
    def records(self) -> list[dict]:
        return self.own + self.others

    def done(self) -> set[int]:
        return {i for r in self.records for i in range(r["start"], r["stop"])}

    def add(self, record: dict) -> None:
        self.own.append(record)
        write_atomic(self.path, self.digest, self.config, self.own)


def write_atomic(path: str, digest: str, config: dict, records: list[dict]) -> None:
    """Replace ``path`` by a header line and one line per record, atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps({"fastcurv": HEADER_TAG, "fingerprint": digest, "config": config}) + "\n")
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def part_files(output: str) -> list[str]:
    """The per-rank part files of a distributed job writing ``output``."""
    return sorted(glob.glob(glob.escape(output) + ".part*"))


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
    Ctrl-C stops after saving every finished chunk, then re-raises KeyboardInterrupt.
    """
    from .sharpness import batched_sharpness

    models = list(models)
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
            oom = None
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    with replica_window(a, R):
                        res = batched_sharpness(models[a:b], batches, **kwargs)
            except Exception as exc:  # out of memory (GPU): halve the chunk and retry
                if not is_out_of_memory(exc):
                    raise
                oom = f"{type(exc).__name__}: {str(exc)[:300]}"  # the traceback (and the chunk's tensors) go here
            if oom is not None:
                release_cached_memory()
                if b - a == 1:
                    raise RuntimeError(
                        f"out of memory even with one replica at a time (replica {a}): {oom}. Lower the batch size, pass "
                        "a smaller memory_budget=, or use a device with more memory")
                chunk = max(1, (b - a) // 2)
                warn_halving(b - a, chunk, a, oom)
                todo = _runs([i for r0, r1 in [(a, b)] + todo for i in range(r0, r1)], chunk)
                continue
            for w in caught:  # replica numbers in the messages count from the chunk's first replica
                msg = f"[chunk of replicas {a}..{b - 1}; replica numbers below count from {a}] {w.message}" if a else w.message
                warnings.warn(msg, w.category, stacklevel=2)
            rec = to_record(res, a, b)
            if store is not None:
                store.add(rec)
            new.append(rec)
    except KeyboardInterrupt:
        n = sum(r["stop"] - r["start"] for r in new)
        where = f"; {len(done) + n} finished replicas are saved in {output}: rerun the same call to resume" if output else ""
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
