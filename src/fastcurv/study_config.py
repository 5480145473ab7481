"""The settings of :func:`fastcurv.study.study`: parsing (config-file forms: numeric strings, also
inside ``sharpness_kwargs`` / ``function_kwargs`` / ``measure_options`` where a number goes, dtype
names, numpy arrays and tensors as lists, a seed given as ``"3"`` or ``3.0``, one measure name for
a list) and validation before any work (the values inside the keyword dicts, the on/off switches),
and the config files (``config.json`` / ``config.yaml``, the latter with absolute paths) a study
writes so that ``fastcurv study --config`` reruns it from any folder.
"""
from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import re
from pathlib import Path

import numpy as np
import torch

from .train_options import _flag

# the measures function_measures computes (on the test inputs); every other name goes to batched_sharpness
FUNCTION_MEASURES = ("disagreement", "gde", "soft", "weakness", "perturbation_weakness", "simplicity")
DATA_SETS = ("digits", "mnist", "fashion-mnist")
MODELS = ("mlp", "cnn")
STALLED_MARGIN = 0.05  # training accuracy within this of chance (1 / classes): flagged "did not learn"
# what a config file cannot hold (a Python function, an object) is written as this, and refused on a rerun
_NOT_STORED = "<not stored in a config file: "


def _split_measures(measures) -> tuple[list, list]:
    """``(curvature measures, function-space measures)`` of ``measures`` (a name or names); a
    ValueError naming the unknown ones and listing what is known."""
    from .measures import load_all  # registry of extra batched_sharpness measures
    from .sharpness import MEASURES as SHARP

    measures = (measures,) if isinstance(measures, str) else tuple(measures)
    extra = set(load_all())
    sharp, func, unknown = [], [], []
    for m in measures:
        if m in FUNCTION_MEASURES:
            func.append(m)
        elif m in SHARP or m in extra:
            sharp.append(m)
        else:
            unknown.append(m)
    if unknown:
        raise ValueError(f"unknown measures {unknown}; curvature (batched_sharpness): {list(SHARP) + sorted(extra)}; "
                         f"function-space (function_measures): {list(FUNCTION_MEASURES)}")
    return sharp, func


def _hidden_widths(hidden) -> tuple[int, ...]:
    """The hidden widths from an int, a sequence of ints, or a string such as "32" or "64,64"
    (a config file's or the command line's form)."""
    bad = ValueError(f"hidden must be positive layer widths (e.g. 32, [64, 64] or \"64,64\"; [] for none), got {hidden!r}")
    if isinstance(hidden, str):
        items = hidden.replace(",", " ").split()
    else:
        items = [hidden] if isinstance(hidden, int) else hidden
    if isinstance(hidden, str) and not items:
        raise bad
    try:
        widths = tuple(int(h) for h in items)
    except (TypeError, ValueError):
        raise bad from None
    if any(w < 1 for w in widths) or any(isinstance(h, float) and h != int(h) for h in items):
        raise bad
    return widths


def _python(v, bad: ValueError):
    """``v`` with numpy and torch values as Python ones: a 1-d array or tensor (``np.logspace(...)``:
    a sweep) as a list of Python numbers, a 0-d one or a numpy number as a Python number; ``bad``
    raised for an array of more dimensions."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        if v.ndim > 1:
            raise bad
        return v.tolist()  # (Python numbers; a list for a 1-d array)
    return v.item() if isinstance(v, np.generic) else v


# the numeric settings that may be given one per replica (a sweep)
SWEEPABLE = ("lr", "momentum", "weight_decay", "sam_rho", "label_noise")


def _numbers(value, name: str):
    """A number or a list of numbers: numeric strings read as floats (YAML reads ``1e-3`` as a
    string), arrays and tensors by :func:`_python`, so that the table, the report and the config
    files see the sweep as they see a list. The error for another value offers the list form only
    for the settings in ``SWEEPABLE`` (``audit_alpha`` is one number)."""
    what = "a number or a list of numbers (one per replica)" if name in SWEEPABLE else "a number"
    bad = ValueError(f"{name} must be {what}, got {value!r}")

    def one(v):
        v = _python(v, bad)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                raise bad from None
        return v

    value = one(value)
    if isinstance(value, (list, tuple)):
        items = [one(v) for v in value]
        if any(isinstance(v, list) for v in items):
            raise bad
        return items
    return value


def _integers(value, name: str):
    """An integer or a list of integers (``batch_size``: one per replica is a sweep): arrays and
    tensors by :func:`_python`, a string of digits (a config file's) as an int. Anything else is
    returned as it is, for :func:`fastcurv.train.train_population`'s checks to name (a float, a
    bool, a fraction)."""
    bad = ValueError(f"{name} must be an integer or a list of integers (one per replica), got {value!r}")

    def one(v):
        v = _python(v, bad)
        return int(v) if isinstance(v, str) and v.strip().lstrip("+").isdigit() else v

    value = one(value)
    return [one(v) for v in value] if isinstance(value, (list, tuple)) else value


def _target_loss(value) -> float | None:
    """``target_loss`` as a float (numeric strings too: YAML reads ``1e-3`` as a string), or None;
    a ValueError for anything else (NaN too, and a negative number: the cross-entropy the study
    trains on is never below 0, so no replica could reach it)."""
    if value is None:
        return None
    if isinstance(value, (str, int, float, np.integer, np.floating)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if number < 0:
            raise ValueError(f"target_loss must be >= 0 (a training cross-entropy to stop at), got {value!r}")
        if number == number:  # (not NaN)
            return number
    raise ValueError(f"target_loss must be a number (a training loss to stop at) or None, got {value!r}")


def _seed(value) -> int:
    """``seed`` as a non-negative int: a Python or numpy integer, a whole float or a string of
    digits (a config file's ``3.0`` / ``"3"``); a ValueError for anything else. A negative seed
    trained (torch takes it), then the bootstrap and the function-space measures (numpy's
    generators) failed after all the work."""
    v = value.strip() if isinstance(value, str) else value
    if isinstance(v, str) and v.lstrip("+").isdigit():
        v = int(v)
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        v = int(v)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"seed must be a non-negative integer, got {value!r}")
    return int(v)


def _measure_names(value, name: str = "measures") -> tuple:
    """``value``, one measure name or several (a list, tuple), as a tuple of names: a single name
    given as a string was iterated character by character (``audit_measures: trace`` audited
    t, r, a, c, e after all the work)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a measure name or a list of them, got {value!r}") from None


def _config_value(value):
    """``value`` as a config file (JSON / YAML) holds it: numbers, strings, lists and mappings as
    they are (numpy scalars as numbers, tuples as lists, paths as strings), torch dtypes and
    devices as their names (``"torch.float64"``, read back by :func:`_from_config`), anything else
    (a function, an object) as a ``<not stored in a config file: ...>`` note that a rerun refuses."""
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_config_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _config_value(v) for k, v in value.items()}
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    what = " ".join(filter(None, (type(value).__name__, getattr(value, "__qualname__", None))))
    return f"{_NOT_STORED}{what}>"


def _from_config(value, name: str):
    """A keyword dict's value as :func:`_config_value` wrote it, made usable again: dtype names
    (``"torch.float64"``) become torch dtypes; a value the file could not hold raises a ValueError
    naming ``name``. For ``sharpness_kwargs`` / ``function_kwargs`` (and the options of
    ``measure_options``' registered measures) a numeric string where the parameter takes a number
    (annotated ``int`` / ``float``, or with a number as default) becomes that number: YAML reads
    ``1e-3`` as a string, which failed after training (``'>=' not supported between 'str' and
    'int'``)."""
    value = _stored(value, name)
    if name in _KWARG_DICTS and isinstance(value, dict):
        value = _with_numbers(value, _numeric_parameters(name))
        options = value.get("measure_options") if name == "sharpness_kwargs" else None
        if isinstance(options, dict):
            from .measures import load_all

            registry = load_all()
            value["measure_options"] = {m: _with_numbers(o, _option_kinds(m)) if m in registry and isinstance(o, dict)
                                        else o for m, o in options.items()}
    return value


def _stored(value, name: str):
    """:func:`_from_config`'s first step: dtype names as dtypes, the refusal of values not stored."""
    if isinstance(value, dict):
        return {k: _stored(v, f"{name}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list):
        return [_stored(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and value.startswith(_NOT_STORED):
        raise ValueError(f"{name} is {value}: a config file cannot hold it; pass it from Python "
                         "(fastcurv.study(..., sharpness_kwargs=/function_kwargs=))")
    if isinstance(value, str) and value.startswith("torch.") and isinstance(getattr(torch, value[6:], None), torch.dtype):
        return getattr(torch, value[6:])
    return value


_KWARG_DICTS = ("sharpness_kwargs", "function_kwargs")
# a number as YAML 1.2 writes it (ints too); YAML 1.1, PyYAML's, reads "1e-3" and "1.0e3" as strings
_NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _numeric_parameters(name: str) -> dict:
    """``{parameter: "int" | "float" | "floats"}`` of the functions ``name`` (``sharpness_kwargs`` /
    ``function_kwargs``) passes its keywords to: those that take numbers (see
    :func:`_numeric_parameters_of`)."""
    from . import batched_sharpness, function_measures
    from .operator import HessianOperator

    fns = (batched_sharpness, HessianOperator.__init__) if name == "sharpness_kwargs" else (function_measures,)
    return _numeric_parameters_of(fns)


def _numeric_parameters_of(fns) -> dict:
    """``{parameter: kind}`` of the parameters of ``fns`` that take numbers (:func:`_number_kind`)."""
    return {p.name: kind for f in fns for p in inspect.signature(f).parameters.values()
            if (kind := _number_kind(p)) is not None}


def _number_kind(p: inspect.Parameter) -> str | None:
    """"int" or "float" for a parameter annotated with ``int`` and / or ``float`` alone (``None``
    allowed), or unannotated with such a number as default; "floats" (one number or a list) for one
    unannotated with a tuple of numbers as default; else None."""
    ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
    words = set(re.findall(r"[A-Za-z_]+", ann if p.annotation is not p.empty else ""))
    default = p.default
    if words and words <= {"int", "float", "None", "Optional"} and words & {"int", "float"}:
        return "float" if "float" in words else "int"
    if words:
        return None
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return "float" if isinstance(default, float) else "int"
    if (isinstance(default, tuple) and default
            and all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in default)):
        return "floats"
    return None


def _option_kinds(measure: str) -> dict:
    """``{option: kind}`` of the numeric options of registered measure ``measure``: its own keywords
    (:func:`_number_kind`), and for those it takes through ``**options`` the functions of its module
    that take them with a default (e.g. rho_sharpness's ``rho`` from ``worst_case_sharpness``),
    when all of them take a number."""
    from .measures import REGISTRY
    from .sharpness import option_parameters

    kinds = {}
    for option, params in option_parameters(measure, REGISTRY[measure]).items():
        found = [_number_kind(p) for p in params]
        if found and None not in found:
            kinds[option] = "float" if "float" in found else found[0]
    return kinds


def _with_numbers(kw: dict, kinds: dict) -> dict:
    """``kw`` with the numeric strings of its numeric parameters (``kinds``) as numbers: ``"100"``
    as 100, ``"1e-3"`` as 0.001 (each item of a "floats" list too); other values unchanged (the
    checks name them)."""
    def number(v):
        if isinstance(v, str) and _NUMBER.fullmatch(v.strip()):
            return int(v) if v.strip().lstrip("+-").isdigit() else float(v)
        return v

    out = dict(kw)
    for key, kind in kinds.items():
        if key in out:
            v = out[key]
            out[key] = [number(x) for x in v] if kind == "floats" and isinstance(v, (list, tuple)) else number(v)
    return out


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _check_kwarg_values(kw: dict, name: str) -> None:
    """Raise a clear error, before training, for a value in ``sharpness_kwargs`` / ``function_kwargs``
    that batched_sharpness / function_measures would refuse only when they run: a non-number where a
    number goes, a count below 1, a tolerance or radius out of range, an unknown choice, and
    ``measure_options`` naming unknown measures or options (their ranges the measures check)."""
    def bad(key, what):
        return ValueError(f"{name}[{key!r}] must be {what}, got {kw[key]!r}")

    for key, kind in _numeric_parameters(name).items():
        v = kw.get(key)
        if key not in kw or v is None:
            continue
        items = v if kind == "floats" and isinstance(v, (list, tuple)) else [v]
        if not all(_is_number(x) for x in items):
            raise bad(key, "a number or a list of numbers" if kind == "floats" else "a number")
    for key in ("max_iter", "slq_steps", "slq_draws", "top_k", "trace_probes", "num_draws", "bisect_steps"):
        v = kw.get(key)
        if v is not None and (not math.isfinite(v) or v < 1 or float(v) != int(v)):
            raise bad(key, "a positive integer")
    if kw.get("tol") is not None and not kw["tol"] >= 0:
        raise bad("tol", "non-negative")
    if kw.get("delta") is not None and not 0 < kw["delta"] < 1:
        raise bad("delta", "in (0, 1)")
    for key in ("sigma_max", "pacbayes_sigma"):
        if kw.get(key) is not None and not 0 < kw[key] < math.inf:
            raise bad(key, "positive and finite")
    from .model_copy import BN_MODES
    from .operator import BACKEND_CHOICES
    from .sharpness import EIG_SOLVERS, EIG_STARTS, TRACE_METHODS

    choices = {"eig_solver": EIG_SOLVERS, "eig_start": EIG_STARTS,
               "trace_method": TRACE_METHODS, "backend": BACKEND_CHOICES, "bn_mode": BN_MODES}
    for key, allowed in choices.items():
        if key not in kw or (key == "bn_mode" and kw[key] is None):  # (bn_mode None: the models' own mode)
            continue
        if not (isinstance(kw[key], str) and kw[key] in allowed):
            raise bad(key, f"one of {tuple(allowed)}")
    if name == "sharpness_kwargs" and kw.get("measure_options") is not None:
        _check_measure_options(kw["measure_options"])


def _check_measure_options(options) -> None:
    """``sharpness_kwargs["measure_options"]``: a dict ``{registered measure: {option: value} or
    None}``, its options among those the measure accepts, its typed options numbers."""
    from .measures import accepted_options, load_all

    registry = load_all()
    if not isinstance(options, dict):
        raise ValueError(f"sharpness_kwargs['measure_options'] must be a dict {{measure: {{option: value}}}}, got "
                         f"{options!r}")
    for m, opts in options.items():
        where = f"sharpness_kwargs['measure_options'][{m!r}]"
        if m not in registry:
            raise ValueError(f"{where}: {m!r} is not a measure that takes options; those that do: {sorted(registry)}")
        if opts is not None and not isinstance(opts, dict):
            raise ValueError(f"{where} must be a dict {{option: value}} (or empty), got {opts!r}")
        allowed = accepted_options(m)
        wrong = sorted(set(opts or {}) - set(allowed)) if allowed is not None else []
        if wrong:
            raise ValueError(f"{where} has unknown options {wrong}; {m} accepts {sorted(allowed)}")
        for key in _option_kinds(m):
            v = (opts or {}).get(key)
            if v is not None and not all(_is_number(x) for x in (v if isinstance(v, (list, tuple)) else [v])):
                raise ValueError(f"{where}[{key!r}] must be a number, got {v!r}")


def _check_data(data) -> None:
    """Raise a clear error for a data set name :func:`fastcurv.datasets.load_dataset` does not know."""
    from .datasets import _ALIASES

    if not isinstance(data, str) or (data.lower() not in ("digits", "sklearn-digits")
                                     and data.lower().replace(" ", "") not in _ALIASES):
        raise ValueError(f"unknown data set {data!r}; available: {', '.join(map(repr, DATA_SETS))}")


def _keywords(name: str) -> set:
    """The keywords ``sharpness_kwargs`` (batched_sharpness and the HessianOperator it builds) or
    ``function_kwargs`` (function_measures) can take."""
    from . import batched_sharpness, function_measures
    from .operator import HessianOperator

    fns = (batched_sharpness, HessianOperator.__init__) if name == "sharpness_kwargs" else (function_measures,)
    return {p.name for f in fns for p in inspect.signature(f).parameters.values()
            if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD} - {"self", "models", "data"}


def _check_settings(*, n_boot, audit, audit_alpha, audit_measures, audit_replicas, sharpness_kwargs, function_kwargs,
                    lr, replicas, verbose=True, progress=None) -> None:
    """Raise a clear error for study settings that would otherwise fail only after training (or do
    what was not asked: ``audit="false"``, a string, ran the audit). ``audit_measures`` as
    :func:`_measure_names` normalized it (a tuple of names)."""
    _flag(audit, "audit")  # (0 / 1 and numpy bools are bools, as in train_population)
    _flag(verbose, "verbose")
    _flag(progress, "progress", none_ok=True)
    if not isinstance(replicas, (int, np.integer)) or replicas < 1:
        raise ValueError(f"replicas must be a positive integer, got {replicas!r}")
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    rates = lr if isinstance(lr, (list, tuple)) else [lr]
    if not all(isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and v > 0 for v in rates):
        raise ValueError(f"lr must be a positive number or a list of them (one per replica), got {lr!r}")
    for name, kw, own in (("sharpness_kwargs", sharpness_kwargs, ("measures", "seed", "progress")),
                          ("function_kwargs", function_kwargs, ("measures", "seed", "progress"))):
        if kw is not None and not isinstance(kw, dict):
            raise ValueError(f"{name} must be a dict of keywords, got {type(kw).__name__}")
        clash = sorted(set(kw or {}) & set(own))
        if clash:
            raise ValueError(f"{name} may not set {clash}: study sets them (use its own measures=, seed=, progress=)")
        unknown = sorted(set(kw or {}) - _keywords(name))
        if unknown:
            raise ValueError(f"{name} has unknown keywords {unknown}; known: {', '.join(sorted(_keywords(name) - set(own)))}")
        _check_kwarg_values(kw or {}, name)
    if audit:
        if not (isinstance(audit_alpha, (int, float, np.floating, np.integer)) and audit_alpha > 0):
            raise ValueError(f"audit_alpha must be a positive number, got {audit_alpha!r}")
        if audit_replicas is not None and (not isinstance(audit_replicas, (int, np.integer)) or audit_replicas < 1):
            raise ValueError(f"audit_replicas must be a positive integer or None (all), got {audit_replicas!r}")
        _, func = _split_measures(audit_measures)
        if func:
            raise ValueError(f"audit_measures must be curvature measures (those of batched_sharpness, e.g. lambda_max, "
                             f"trace), got the function-space measures {func}")


def _audit_transform(name: str, alpha: float):
    """The audit's transform by name: a name or callable for :func:`fastcurv.invariance_audit`."""
    from . import reparam

    if name == "dinh_first":
        def dinh_first(models):
            layers = tuple(reparam.weight_layers(models[0])[:2])
            return reparam.rescale_layers(models, alpha=1.0 / float(alpha), layers=layers)

        return dinh_first
    if name in ("dinh", "neurons", "balance"):
        return name
    raise ValueError(f"audit_transform must be 'dinh', 'dinh_first', 'neurons' or 'balance', got {name!r}")


PATH_SETTINGS = ("out", "checkpoint", "data_root")  # study settings that are paths (and sharpness_kwargs' output)


def _map_paths(cfg: dict, fn) -> dict:
    """``cfg`` (study settings) with ``fn`` applied to each of its paths: the settings in
    :data:`PATH_SETTINGS` that are not None (each folder of a ``data_root`` list) and
    ``sharpness_kwargs["output"]``. The one walker over a study's paths (:func:`_absolute_paths`,
    the CLI's ``~`` checks)."""
    out = dict(cfg)
    for key in PATH_SETTINGS:
        if out.get(key) is not None:
            out[key] = [fn(v) for v in out[key]] if isinstance(out[key], list) else fn(out[key])
    kw = out.get("sharpness_kwargs")
    if isinstance(kw, dict) and kw.get("output") is not None:
        out["sharpness_kwargs"] = {**kw, "output": fn(kw["output"])}
    return out


def _absolute_paths(cfg: dict) -> dict:
    """``cfg`` (study settings as :func:`_config_value` writes them, ``~`` already expanded) with its
    relative paths (:func:`_map_paths`) made absolute against the current folder, so that the config
    file reruns the study from any folder (``fastcurv study`` reads a config file's relative paths,
    as its flags, against the current folder)."""
    def absolute(v):
        return str(Path(v).absolute()) if isinstance(v, (str, os.PathLike)) and str(v) != "" else v

    return _map_paths(cfg, absolute)


def _write_yaml(cfg: dict, path: Path):
    """``cfg`` (settings whose paths :func:`fastcurv.study.study` made absolute, :func:`_absolute_paths`)
    as the YAML file ``path`` (JSON, which is YAML, without PyYAML)."""
    try:
        import yaml

        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    except ImportError:  # JSON is valid YAML
        path.write_text(json.dumps(cfg, indent=2) + "\n")
