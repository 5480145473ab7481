"""Fingerprints of a ``batched_sharpness`` job, which a results file records so that a rerun resumes
only the same job (:mod:`fastcurv.resume`), and the descriptions they are made of.

A setting is described by what it computes (:func:`describe`): numbers and strings as they are,
tensors and arrays by a hash of their bytes, modules by their structure (:func:`module_structure`)
and weights (:func:`models_digest`), callables by their code, defaults, closures and, outside
installed packages, the module-level values they read; a setting that cannot be identified reliably
gets a description unique to the call, so that a rerun is refused saying why. The data is
summarized by :func:`data_signature` (what a shuffled pass of the same data keeps).
:func:`fingerprint` makes a job's ``(digest, config)``; :func:`describe_changes` names what differs
between two configs (also used by :mod:`fastcurv.train`'s checkpoints).
"""
from __future__ import annotations

import dis
import functools
import hashlib
import json
import math
import os
import site
import sysconfig
import types
import uuid

import numpy as np
import torch
from torch import nn

from .data import Batches, SplitBatches
from .losses import canonical_name
from .replicas import module_settings


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


def _type_change(a, b, where: str = "") -> str:
    """For values equal by ``==`` (JSON-like: dicts, lists, scalars), the first place where their
    types differ, as ``"[where: ]50.0 -> 50"`` (a float for an int, True for 1), or "" (none: the
    same values, that a fingerprint spells alike)."""
    if type(a) is not type(b):
        return f"{where}: {a!r} -> {b!r}" if where else f"{a!r} -> {b!r}"
    if isinstance(a, dict):
        pairs = [(a[k], b[k], f"{where}.{k}" if where else str(k)) for k in a]
    elif isinstance(a, (list, tuple)):
        pairs = [(u, v, f"{where}[{i}]") for i, (u, v) in enumerate(zip(a, b))]
    else:
        return ""
    return next((found for u, v, w in pairs if (found := _type_change(u, v, w))), "")


def describe_changes(old: dict, new: dict, *, types: bool = False) -> str:
    """The keys whose values differ between two configurations, comma-separated; an architecture
    change names its first differing module, and a setting that cannot be fingerprinted says so.
    ``types``: also name values equal by ``==`` but of another type, which a fingerprint's digest
    spells otherwise (``"max_iter (50.0 -> 50)"``; a results file's mismatch said "unknown")."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            if types and (change := _type_change(a, b)):
                parts.append(f"{key} ({change})")
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
    (:class:`fastcurv.data.SplitBatches`) count as the original ones."""
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
    """The batch sizes of the data the caller gave (before a memory plan split them: what
    :class:`~fastcurv.data.SplitBatches` saw in the pass ``batches`` made)."""
    source = batches.source
    return source.given_sizes() if isinstance(source, SplitBatches) else list(batches.sizes)


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


# the counts batched_sharpness takes whole floats for, written as ints in configs since the 27th round
_COUNT_KEYS = ("max_iter", "top_k", "trace_probes", "slq_steps", "slq_draws")


def same_job_written_before(old, digest: str) -> bool:
    """Whether a results file's ``config`` is this job's (``digest``) as an earlier fastcurv wrote
    it: files written before the twenty-fifth round hold the loss name as given ("MSE", "ce"), not
    :func:`fastcurv.losses.canonical_name`'s, and those written before the twenty-seventh a count
    given as a whole float (``max_iter=50.0``, a JSON config's) as that float, where the settings now
    hold the int; each in their config and fingerprint. Nothing else is read otherwise."""
    if not isinstance(old, dict):
        return False
    config = dict(old)
    if isinstance(config.get("loss"), str):
        try:
            config["loss"] = canonical_name(config["loss"])
        except ValueError:
            pass  # (not a loss name fastcurv knows: a file of another job)
    for key in _COUNT_KEYS:
        v = config.get(key)
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            config[key] = int(v)
    return _config_digest(config) == digest
