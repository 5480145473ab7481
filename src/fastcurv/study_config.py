"""The settings of :func:`fastcurv.study.study`: parsing (config-file forms: numeric strings, dtype
names, numpy arrays and tensors as lists) and validation before any work, and the config files
(``config.json`` / ``config.yaml``) a study writes so that ``fastcurv study --config`` reruns it.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import torch

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


def _numbers(value, name: str):
    """A number or a list of numbers: numeric strings read as floats (YAML reads ``1e-3`` as a
    string), arrays and tensors by :func:`_python`, so that the table, the report and the config
    files see the sweep as they see a list."""
    bad = ValueError(f"{name} must be a number or a list of numbers (one per replica), got {value!r}")

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
    a ValueError for anything else (NaN too)."""
    if value is None:
        return None
    if isinstance(value, (str, int, float, np.integer, np.floating)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if number == number:  # (not NaN)
            return number
    raise ValueError(f"target_loss must be a number (a training loss to stop at) or None, got {value!r}")


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
    naming ``name``."""
    if isinstance(value, dict):
        return {k: _from_config(v, f"{name}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list):
        return [_from_config(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and value.startswith(_NOT_STORED):
        raise ValueError(f"{name} is {value}: a config file cannot hold it; pass it from Python "
                         "(fastcurv.study(..., sharpness_kwargs=/function_kwargs=))")
    if isinstance(value, str) and value.startswith("torch.") and isinstance(getattr(torch, value[6:], None), torch.dtype):
        return getattr(torch, value[6:])
    return value


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
                    lr, replicas) -> None:
    """Raise a clear error for study settings that would otherwise fail only after training."""
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


def _write_yaml(cfg: dict, path: Path):
    try:
        import yaml

        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    except ImportError:  # JSON is valid YAML
        path.write_text(json.dumps(cfg, indent=2) + "\n")
