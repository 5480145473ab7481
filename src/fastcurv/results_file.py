"""The results file of a chunked ``batched_sharpness`` job (see :mod:`fastcurv.resume` for the layout):
results as strict JSON (:func:`to_record`, :func:`merge_records`), the file of one job's finished
chunks (:class:`ResultStore`, refusing a file of another configuration with
:class:`FingerprintMismatch`), written whole and atomically (:func:`write_atomic`), and the part
files of a distributed job's ranks (:func:`part_files`).
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import warnings

import torch

from .fingerprint import describe_changes, same_job_written_before
from .paths import expand_path, prepare_file, replace_atomically
from .solvers import SpectralDensity

HEADER_TAG = "sharpness-results"


class FingerprintMismatch(ValueError):
    """The output file was written by a job with a different configuration."""


# --- (de)serialising results ---------------------------------------------------------------------
_NONFINITE = {"Infinity": math.inf, "-Infinity": -math.inf, None: math.nan}


def _enc(t: torch.Tensor) -> dict:
    """A tensor as JSON: dtype, shape and values, NaN as null and infinities as "Infinity" /
    "-Infinity" (strict JSON: Python's bare NaN token is not)."""
    t = t.detach().cpu()
    data = t.reshape(-1).tolist()
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        data = [v if math.isfinite(v) else None if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
                for v in data]
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "data": data}


def _dec(d: dict) -> torch.Tensor:
    """The tensor :func:`_enc` wrote (files written before strict JSON hold bare NaN, read alike)."""
    data = d["data"]
    if any(v is None or isinstance(v, str) for v in data):
        data = [_NONFINITE[v] if v is None or isinstance(v, str) else v for v in data]
    return torch.tensor(data, dtype=getattr(torch, d["dtype"])).reshape(d["shape"])


def to_record(res, start: int, stop: int) -> dict:
    """A JSON-able dict with the results of replicas ``start..stop-1`` (``res`` holds just them)."""
    rec = {"start": start, "stop": stop, "backend": res.backend, "backend_reason": res.backend_reason,
           "trace_method": res.trace_method, "trace_reason": res.trace_reason, "estimator": res.estimator,
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
    # the solver runs the measure set chose: one record's when all agree, else unknown (None; files
    # written before they were recorded lack them)
    estimators = [r.get("estimator") for r in records]
    agree = bool(estimators) and all(e is not None and e == estimators[0] for e in estimators)
    out.estimator = estimators[0] if agree else None
    # (summed over the chunks: batched products as issued, see SharpnessResult.num_matvecs)
    out.num_matvecs = sum(r["num_matvecs"] for r in records)
    out.seconds = sum(r["seconds"] for r in records)
    return out


# --- the results file ----------------------------------------------------------------------------
class ResultStore:
    """Finished chunks of one job, saved atomically to ``path`` (the layout: :mod:`fastcurv.resume`).

    ``read_also``: more files of the same job (other ranks' parts) whose chunks count as done.
    """

    def __init__(self, path, digest: str, config: dict, read_also=()):
        self.path, self.digest, self.config = str(prepare_file(path)), digest, config
        read_also = [expand_path(p) for p in read_also]
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
        if not isinstance(head, dict) or head.get("fastcurv") != HEADER_TAG:
            raise ValueError(f"{path} is not a fastcurv results file; delete it or choose another output path")
        if head.get("fingerprint") != self.digest and not same_job_written_before(head.get("config"), self.digest):
            old = head.get("config")
            raise FingerprintMismatch(
                f"{path} was written by a job with a different configuration (differs in: "
                f"{describe_changes(old if isinstance(old, dict) else {}, self.config, types=True)}); "
                "rerun with the same models, data and arguments to resume, or use another output path")
        records = []
        for number, line in enumerate(lines[1:], start=2):
            rec, why = _parse_record(line)
            if why:
                warnings.warn(f"{path}: line {number} is damaged ({why}); its replicas are computed again",
                              RuntimeWarning, stacklevel=4)
            else:
                records.append(rec)
        return records

    @property
    def records(self) -> list[dict]:
        return self.own + self.others

    def saved(self) -> set[int]:
        """The replicas whose results are in the files now (this file read again: after an
        interrupt it, not the list in memory, says what a rerun finds)."""
        return {i for r in self._load(self.path) + self.others for i in range(r["start"], r["stop"])}

    def add(self, record: dict) -> None:
        self.own.append(record)
        write_atomic(self.path, self.digest, self.config, self.own)


_RECORD_KEYS = ("start", "stop", "backend", "backend_reason", "num_matvecs", "seconds", "flags", "ok", "values", "stderr",
                "error_bounds", "iterations", "converged", "spectrum")


def _parse_record(line: str) -> tuple[dict | None, str]:
    """``(record, "")`` for a saved chunk's line, or ``(None, why)`` when it is not one (a file
    damaged or cut off by something other than fastcurv, whose own writes are atomic)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"not JSON: {exc}"
    if not isinstance(rec, dict):
        return None, "not a record of results"
    missing = [k for k in _RECORD_KEYS if k not in rec]
    if missing:
        return None, f"no {', '.join(missing)}"
    if not (isinstance(rec["start"], int) and isinstance(rec["stop"], int) and len(rec["flags"]) == rec["stop"] - rec["start"]):
        return None, "its replica range does not match its results"
    try:
        for key in ("values", "stderr", "error_bounds", "iterations", "converged"):
            for t in rec[key].values():
                _dec(t)
        if rec["ok"] is not None:
            _dec(rec["ok"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        return None, f"unreadable results: {type(exc).__name__}: {exc}"
    return rec, ""


def write_atomic(path: str, digest: str, config: dict, records: list[dict]) -> None:
    """Replace ``path`` by a header line and one line per record, atomically
    (:func:`replace_atomically`)."""
    def write(f):
        f.write((json.dumps({"fastcurv": HEADER_TAG, "fingerprint": digest, "config": config}) + "\n").encode())
        for rec in records:
            f.write((json.dumps(rec) + "\n").encode())

    replace_atomically(path, write)


def part_files(output: str) -> list[str]:
    """The per-rank part files ``<output>.part<k>`` of a distributed job writing ``output`` (``~``
    expanded); no other file whose name starts so."""
    output = expand_path(output)
    pattern = re.compile(re.escape(output) + r"\.part\d+")
    return sorted(p for p in glob.glob(glob.escape(output) + ".part*") if pattern.fullmatch(p))
