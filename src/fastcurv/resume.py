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
"""
from __future__ import annotations

import contextlib
import contextvars
import dis
import functools
import glob
import hashlib
import json
import math
import os
import re
import site
import sys
import sysconfig
import threading
import types
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import Batches
from .losses import canonical_name
from .solvers import SpectralDensity
from .measures import split_refusal
from .replicas import module_settings
from .memory import is_out_of_memory, release_cached_memory, warn_halving
from .solvers.probes import replica_window

HEADER_TAG = "sharpness-results"


class FingerprintMismatch(ValueError):
    """The output file was written by a job with a different configuration."""


# --- fingerprints --------------------------------------------------------------------------------
def _unreliable(why: str) -> dict:
    """The description of a setting that cannot be fingerprinted: unique to this call, so that a
    rerun is refused (with ``why`` in the message) instead of silently reusing other results."""
    return {"unreliable": why, "nonce": uuid.uuid4().hex}


def _const_text(c) -> str:
    """A stable text for a code object's constant (nested code by its digest, sets sorted)."""
    if isinstance(c, types.CodeType):
        return _code_digest(c)
    if isinstance(c, (frozenset, set)):
        return "{" + ",".join(sorted(map(_const_text, c))) + "}"
    if isinstance(c, tuple):
        return "(" + ",".join(map(_const_text, c)) + ")"
    return repr(c)


def _code_digest(code: types.CodeType) -> str:
    """sha256 over a code object's bytecode, constants and the names it uses."""
    h = hashlib.sha256(code.co_code)
    h.update("|".join(map(_const_text, code.co_consts)).encode())
    h.update(repr(code.co_names).encode())
    return h.hexdigest()[:32]


def _qualified(obj) -> str:
    return f"{getattr(obj, '__module__', None) or '?'}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _global_names(code: types.CodeType) -> set[str]:
    """The module-level names a code object reads (``LOAD_GLOBAL``), with those read by the
    functions, lambdas and comprehensions nested in it."""
    names = {ins.argval for ins in dis.get_instructions(code) if ins.opname == "LOAD_GLOBAL"}
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


@functools.lru_cache(maxsize=None)
def _library_roots() -> tuple[str, ...]:
    """The folders of installed code: the standard library, site-packages and fastcurv itself."""
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if paths.get(k)}
    roots.update(getattr(site, "getsitepackages", list)())
    if site.ENABLE_USER_SITE:
        roots.add(site.getusersitepackages())
    roots.add(os.path.dirname(os.path.abspath(__file__)))
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots)


@functools.lru_cache(maxsize=4096)
def _is_library_file(filename: str) -> bool:
    """Whether code from ``filename`` belongs to an installed package (or Python itself): such a
    function is described by its code alone, since its module's globals (caches, registries,
    objects without a stable repr) are no settings of the user's and would make every rerun refused."""
    if filename.startswith("<frozen"):
        return True
    return os.path.isabs(filename) and os.path.realpath(filename).startswith(_library_roots())


def _describe_callable(fn, seen: set):
    """A callable by what it computes: a function by its code, defaults, closure values and (for
    a function outside installed packages) the values of the module-level names it reads, a
    ``functools.partial`` by its function and bound arguments, a method by its function and object,
    another callable object by its class and attributes; builtins and classes by name."""
    if isinstance(fn, functools.partial):
        return {"partial": describe(fn.func, seen), "args": describe(fn.args, seen),
                "keywords": describe(fn.keywords, seen)}
    if isinstance(fn, types.MethodType):
        return {"method": describe(fn.__func__, seen), "self": describe(fn.__self__, seen)}
    if isinstance(fn, types.FunctionType):
        cells = []
        for cell in fn.__closure__ or ():
            try:
                cells.append(describe(cell.cell_contents, seen))
            except ValueError:  # an empty cell
                cells.append(None)
        out = {"function": _qualified(fn), "code": _code_digest(fn.__code__),
               "defaults": describe(fn.__defaults__, seen), "kwdefaults": describe(fn.__kwdefaults__, seen),
               "closure": cells}
        if not _is_library_file(fn.__code__.co_filename):
            out["globals"] = {n: describe(fn.__globals__[n], seen) for n in sorted(_global_names(fn.__code__))
                              if n in fn.__globals__}  # (names not there are builtins)
        return out
    if isinstance(fn, (type, types.BuiltinFunctionType, types.BuiltinMethodType, types.MethodWrapperType,
                       types.WrapperDescriptorType, types.MethodDescriptorType, np.ufunc)):
        return _qualified(fn)  # classes and functions implemented in C: by name
    if not hasattr(fn, "__dict__"):
        return _unreliable(f"a {type(fn).__qualname__} object keeps its settings where fastcurv cannot read them")
    return {"object": _qualified(type(fn)), "attributes": describe(vars(fn), seen)}


def describe(obj, seen: set | None = None):
    """A JSON-able description of a setting that is the same for equal settings in any run:
    numbers (numpy scalars as Python numbers), strings, lists (tuples too), dicts, tensors by a
    hash of their bytes (numpy arrays too), modules by their structure and state, Python modules (``F``
    in ``F.cross_entropy``) by name, callables by what they compute
    (:func:`_describe_callable`), other objects by their repr. An object whose repr is not stable
    (the default ``<... at 0x...>``) gets a description unique to this call, so that resuming with
    it is refused with the reason named."""
    seen = set() if seen is None else seen
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return {"tensor": hashlib.sha256(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest(),
                "shape": list(obj.shape), "dtype": str(obj.dtype)}
    if isinstance(obj, np.ndarray):  # (its repr elides the middle of large arrays)
        if obj.dtype == object:
            return [describe(v, seen) for v in obj.ravel().tolist()]
        return {"array": hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest(), "shape": list(obj.shape),
                "dtype": str(obj.dtype)}
    if isinstance(obj, types.ModuleType):  # (its repr holds the path it was loaded from)
        return {"python module": obj.__name__}
    if id(obj) in seen:  # a function that refers to itself, a container holding itself
        return "<recursive>"
    seen = seen | {id(obj)}
    if isinstance(obj, (list, tuple)):
        return [describe(v, seen) for v in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v, seen) for k, v in obj.items()}
    if isinstance(obj, nn.Module):
        return {"module": module_structure(obj), "state": models_digest([obj])}
    if callable(obj):
        return _describe_callable(obj, seen)
    text = repr(obj)
    if " at 0x" in text:
        return _unreliable(f"a {type(obj).__qualname__} has no stable representation")
    if "..." in text:  # an elided repr (pandas, long containers of other libraries) hides what differs
        return _unreliable(f"a {type(obj).__qualname__}'s representation is abbreviated")
    return text


def module_structure(model: nn.Module) -> list[str]:
    """One line per submodule of ``model``: its name, class and settings as ``extra_repr()`` shows
    them, e.g. ``"1: Tanh()"``, ``"2: Dropout(p=0.3, inplace=False)"``."""
    return [f"{name or '(model)'}: {type(mod).__qualname__}({mod.extra_repr()})" for name, mod in model.named_modules()]


def models_digest(models) -> str:
    """sha256 over every replica's module structure (each module's class, ``extra_repr()`` and
    other simple settings) and its parameter and buffer names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for m in models:
        for (_, mod), line in zip(m.named_modules(), module_structure(m)):
            h.update(f"{type(mod).__module__}.{line} {json.dumps(module_settings(mod), sort_keys=True)}\n".encode())
        for kind, items in (("p", m.named_parameters()), ("b", m.named_buffers())):
            for n, t in items:
                t = t.detach().cpu().contiguous()
                h.update(f"{kind}:{n}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _unreliable_reasons(value) -> list[str]:
    """The reasons of every part of a described setting that could not be fingerprinted."""
    if isinstance(value, dict):
        if "unreliable" in value and "nonce" in value:
            return [value["unreliable"]]
        return [r for v in value.values() for r in _unreliable_reasons(v)]
    if isinstance(value, list):
        return [r for v in value for r in _unreliable_reasons(v)]
    return []


def _structure_change(old: list, new: list) -> str:
    """The first module that differs between two :func:`module_structure` listings."""
    for a, b in zip(old, new):
        if a != b:
            name, _, was = a.partition(": ")
            return f"module {name}: {was} -> {b.partition(': ')[2]}"
    if len(old) != len(new):
        return f"{len(old)} modules -> {len(new)}"
    return ""


def describe_changes(old: dict, new: dict) -> str:
    """The keys whose values differ between two configurations, comma-separated; an architecture
    change names its first differing module, and a setting that cannot be fingerprinted says so."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        why = _unreliable_reasons(b)
        if key == "architecture" and isinstance(a, list) and isinstance(b, list):
            parts.append(f"architecture ({_structure_change(a, b)})")
        elif why:
            parts.append(f"{key} (it cannot be fingerprinted reliably: {'; '.join(dict.fromkeys(why))}, so a rerun "
                         "cannot know whether it is the same)")
        else:
            parts.append(key)
    return ", ".join(parts) or "unknown"


def data_signature(batches: Batches) -> dict:
    """Summary of the data that a shuffled pass of the same data set keeps: the sample count, the
    batch sizes in order, sums and sums of squares of inputs and targets, and a sum over samples
    that pairs each input with its target (fixed random projections ``(x_i . u)(1 + y_i . w)``),
    which changes when the targets are permuted against the inputs (12 significant digits).
    The batch sizes are those of the data as given: batches that ``memory_budget=`` split
    (:class:`fastcurv.memory.SplitBatches`) count as the original ones."""
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
    return {"samples": n, "batches": _given_batch_sizes(batches), "inputs": [f"{sx:.12g}", f"{sxx:.12g}"],
            "targets": [f"{sy:.12g}", f"{syy:.12g}"], "pairs": f"{pair:.12g}", "shapes": sorted(map(repr, shapes))}


def _given_batch_sizes(batches: Batches) -> list[int]:
    """The batch sizes of the data the caller gave (before a memory plan split them)."""
    from .data import _split
    from .memory import SplitBatches

    if not isinstance(batches.source, SplitBatches):
        return list(batches.sizes)
    sizes = (_split(item, i)[0].shape[0] for i, item in enumerate(batches.source.source))
    return [n for n in sizes if n]  # (Batches skips empty batches)


def fingerprint(models, batches: Batches, kwargs: dict) -> tuple[str, dict]:
    """``(digest, config)`` identifying a job: models (``architecture``: replica 0's
    :func:`module_structure`, for messages; ``models``: every replica's structure and weights),
    data and every result-changing keyword, its defaults filled in (so that a job started through
    :func:`fastcurv.batched_sharpness` and one started through
    :func:`fastcurv.distributed.batched_sharpness` with the same settings match), equivalent
    forms made equal (a measure name or a list of one, ``measure_options`` None or ``{}``, a loss
    name's spellings: "MSE" and "mse")."""
    from .sharpness import result_settings

    config = result_settings(kwargs, with_measures=True)
    if isinstance(config.get("loss"), str):
        config["loss"] = canonical_name(config["loss"])
    if isinstance(config.get("measures"), str):
        config["measures"] = [config["measures"]]
    config["measure_options"] = config.get("measure_options") or {}
    config = describe(config)
    config["R"] = len(models)
    config["architecture"] = module_structure(models[0])
    config["models"] = models_digest(models)
    config["data"] = data_signature(batches)
    digest = _config_digest(config)
    return digest, config


def _config_digest(config: dict) -> str:
    """The fingerprint of a job's (JSON-able) ``config``."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:32]


def _same_but_loss_spelling(old, digest: str) -> bool:
    """Whether a results file's ``config`` is this job's but for its loss name's spelling: files
    written before the twenty-fifth round hold the name as given ("MSE", "ce"), not
    :func:`fastcurv.losses.canonical_name`'s, in their config and fingerprint."""
    if not isinstance(old, dict) or not isinstance(old.get("loss"), str):
        return False
    try:
        config = {**old, "loss": canonical_name(old["loss"])}
    except ValueError:
        return False
    return _config_digest(config) == digest


# --- output paths ----------------------------------------------------------------------------------
def expand_path(path) -> str:
    """``path`` (a str or os.PathLike) with a leading ``~`` or ``~user`` expanded. A ValueError when
    that user, or the home folder, is unknown: ``Path.expanduser`` raises a bare RuntimeError there,
    and ``os.path.expanduser`` leaves the ``~`` in, which would make a folder named ``~user``."""
    path = os.fspath(path)
    if not str(path).startswith("~"):
        return path
    try:
        return str(Path(path).expanduser())
    except RuntimeError:
        user = str(path)[1:].split("/", 1)[0].split(os.sep, 1)[0]
        who = f"no user {user!r} on this system" if user else "no home folder is known ($HOME unset)"
        raise ValueError(f"cannot expand '~' in {str(path)!r}: {who}") from None


def prepare_file(path, what: str = "output") -> Path:
    """Check, before any work, that a file can be written at ``path`` (``~`` expanded: a path from a
    config file never went through a shell) and return it: a folder there, or a parent that is a
    file or not writable, raises a ValueError naming ``what``; missing parent folders are created."""
    p = Path(expand_path(path))
    if p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder; give a file path")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{what} {str(path)!r}: its folder {str(p.parent)!r} cannot be created (a file is in the "
                         "way)") from None
    if not os.access(p.parent, os.W_OK):
        raise ValueError(f"{what} {str(path)!r}: the folder {str(p.parent)!r} is not writable")
    return p


def prepare_folder(path, what: str = "out") -> Path:
    """Check, before any work, that ``path`` (``~`` expanded) is or can be made a writable folder
    (created with its parents) and return it; a file there raises a ValueError naming ``what``."""
    p = Path(expand_path(path))
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file, not a folder; give a folder path")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{what} {str(path)!r} cannot be created as a folder (a file is in the way)") from None
    if not os.access(p, os.W_OK):
        raise ValueError(f"{what} {str(path)!r} is not writable")
    return p


def sibling_path(output, tag: str) -> str:
    """``output`` with ``.tag`` before its extension: ``"run.jsonl"`` -> ``"run.<tag>.jsonl"``
    (the results file of a related job, e.g. the audit's reparameterized models)."""
    p = Path(output)
    return str(p.with_name(f"{p.stem}.{tag}{p.suffix}"))


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
        if head.get("fingerprint") != self.digest and not _same_but_loss_spelling(head.get("config"), self.digest):
            old = head.get("config")
            raise FingerprintMismatch(
                f"{path} was written by a job with a different configuration (differs in: "
                f"{describe_changes(old if isinstance(old, dict) else {}, self.config)}); "
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


def replace_atomically(path, write) -> None:
    """Replace ``path`` by what ``write(f)`` writes to a binary file ``f``, atomically: through a hidden
    temporary file ``.<name>.tmp<pid>`` in the same folder (no :func:`part_files` name), fsync and
    ``os.replace``. The temporary file is removed when the write fails (a full disk, an interrupt)
    and the error goes on; only a killed process leaves one behind."""
    folder, name = os.path.split(os.fspath(path))
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed: no partial file stays
            os.remove(tmp)


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


# --- the warnings of a chunk ---------------------------------------------------------------------
# A chunk's warnings are recorded and re-emitted with its first replica's number (the messages count
# replicas from the chunk's first). ``warnings.catch_warnings`` cannot do this in a thread: it swaps the
# process's warnings state for the whole chunk, so chunked jobs in two threads left the state of one
# behind (every later warning swallowed), and the warnings of every other thread were taken meanwhile.
# Instead, while any chunk records, two inert hooks stand in the process's warnings state: a filter
# entry that says "always" only in a context (thread) where a chunk records, and a ``showwarning`` that
# keeps the warnings raised in such a context and passes all others on unchanged. The last chunk to
# finish takes both out again; between chunks the state is exactly as it was.
_RECORD: contextvars.ContextVar = contextvars.ContextVar("fastcurv_chunk_warnings", default=None)
_hooks_lock = threading.Lock()
_recorders = 0  # chunks recording now, in all threads


class _WhereRecording:
    """The module pattern of the filter entry :data:`_ALWAYS`: matches in a recording context only."""

    def match(self, module: str) -> bool:
        return _RECORD.get() is not None

    def __repr__(self):
        return "<fastcurv: only where a chunk of replicas records its warnings>"


_ALWAYS = ("always", None, Warning, _WhereRecording(), 0)


class _ShowOrRecord:
    """``warnings.showwarning`` while chunks record: keeps a warning raised where a chunk records
    (in that chunk's list), passes any other to the hook it replaced, ``previous``."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, message, category, filename, lineno, file=None, line=None):
        caught = _RECORD.get()
        if caught is None:
            self.previous(message, category, filename, lineno, file, line)
        else:
            caught.append(warnings.WarningMessage(message, category, filename, lineno, file, line))


def _put_hooks() -> None:
    """Count one more recording chunk; put the hooks in place where they are not (first chunk)."""
    global _recorders
    with _hooks_lock:
        _recorders += 1
        if not isinstance(warnings.showwarning, _ShowOrRecord):
            warnings.showwarning = _ShowOrRecord(warnings.showwarning)
        if not any(f is _ALWAYS for f in warnings.filters):
            warnings.filters.insert(0, _ALWAYS)


def _take_hooks() -> None:
    """Count one recording chunk less; the last one takes the hooks out where they still stand. (A
    hook that another caller put over them meanwhile stays, and so do they under it: they pass every
    warning on.)"""
    global _recorders
    with _hooks_lock:
        _recorders -= 1
        if _recorders:
            return
        while isinstance(warnings.showwarning, _ShowOrRecord):
            warnings.showwarning = warnings.showwarning.previous
        while any(f is _ALWAYS for f in warnings.filters):
            warnings.filters.remove(_ALWAYS)


@contextlib.contextmanager
def _recording_warnings():
    """Record the warnings raised in this thread (this context) within the block, each one (filters
    apply when they are re-emitted), into the list it yields; other threads' warnings are shown as
    usual. Nests (an inner block's warnings are its own). Thread-safe, unlike
    ``warnings.catch_warnings(record=True)``, but a ``catch_warnings`` block in another thread that
    overlaps it still takes over the whole process's warnings state meanwhile."""
    caught: list = []
    _put_hooks()
    token = _RECORD.set(caught)
    try:
        yield caught
    finally:
        _RECORD.reset(token)
        _take_hooks()


def _reemit(caught: list, a: int, b: int) -> None:
    """Emit the warnings recorded in the chunk of replicas ``[a, b)`` (as raised by run_chunks' caller),
    their replica numbers said to count from ``a``."""
    for w in caught:
        msg = f"[chunk of replicas {a}..{b - 1}; replica numbers below count from {a}] {w.message}" if a else w.message
        warnings.warn(msg, w.category, stacklevel=3)


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
