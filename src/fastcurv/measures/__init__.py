"""Registry of sharpness measures computed by :func:`fastcurv.batched_sharpness` beyond the
built-in Hessian ones. A measure is a function ``fn(op, *, seed, common, **options)`` taking a
:class:`fastcurv.HessianOperator` and returning ``{column: MeasureValue}``."""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import torch

REGISTRY: dict[str, object] = {}
REPLICA_NOISE: dict[str, object] = {}  # name -> bool or callable(options) -> bool (see register_measure)
OPTIONS: dict[str, tuple] = {}  # name -> the options a measure taking **options accepts (see register_measure)


@dataclass
class MeasureValue:
    """One column of results: ``value`` ``[R]``, optional ``stderr`` ``[R]`` and ``converged`` ``[R]``."""

    value: torch.Tensor
    stderr: torch.Tensor | None = None
    converged: torch.Tensor | None = None


def register_measure(name: str, *, replica_noise=True, options: tuple = ()):
    """Decorator registering ``fn`` as measure ``name`` for ``batched_sharpness(measures=...)``.

    options: for a function that takes ``**options``, the names it accepts there (its explicit
    keywords are read from its signature), so that a misspelt option is refused before any measure
    runs (:func:`accepted_options`). An option annotated ``int``, ``int | None`` or
    ``Optional[int]`` (or unannotated with an int default) is an integer option:
    ``batched_sharpness`` gives it whole floats (``5.0``, a config's) as ints and refuses other
    floats; any other option (``scale: float = 1``) reaches the measure as given.

    replica_noise: whether, with ``common_random_numbers=False``, the measure draws one noise row
    per replica of the job it is given from a single stream, so that a replica's value depends on
    how the replicas are split into chunks or ranks (such jobs are then refused): True (the default,
    the safe answer for a new measure), False (it draws nothing, or keys each replica's draws by
    its number in the whole job, as the solvers do), or a callable ``options -> bool``.
    """

    def deco(fn):
        REGISTRY[name] = fn
        REPLICA_NOISE[name] = replica_noise
        OPTIONS[name] = tuple(options)
        return fn

    return deco


def keywords(fn, drop=()) -> tuple:
    """The names of ``fn``'s parameters with defaults, but ``seed``, ``common`` and ``drop``: the
    options a measure forwards to ``fn``."""
    return tuple(n for n, p in inspect.signature(fn).parameters.items()
                 if p.default is not inspect.Parameter.empty and n not in ("seed", "common", *drop))


def accepted_options(name: str) -> tuple | None:
    """The options measure ``name`` accepts, or None when it takes ``**options`` without saying
    which (a measure registered elsewhere without ``options=``)."""
    fn = REGISTRY[name]
    params = inspect.signature(fn).parameters.values()
    explicit = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.name not in ("op", "seed", "common")]
    if any(p.kind == p.VAR_KEYWORD for p in params):
        if not OPTIONS.get(name):
            return None
        explicit += OPTIONS[name]
    return tuple(explicit)


def unsplittable(kwargs: dict) -> str:
    """``"measures [...] with common_random_numbers=False cannot be split into chunks or ranks"`` for
    the :func:`fastcurv.batched_sharpness` job with keywords ``kwargs`` when its measures draw
    per-replica noise from one stream (see :func:`register_measure`), else ``""``."""
    if kwargs.get("common_random_numbers", True):
        return ""
    load_all()
    measures = kwargs.get("measures", ())
    options = kwargs.get("measure_options") or {}
    noisy = []
    for m in (measures,) if isinstance(measures, str) else measures:
        flag = REPLICA_NOISE.get(m, False)  # the built-in Hessian measures key their probes by replica
        if flag(options.get(m) or {}) if callable(flag) else flag:
            noisy.append(m)
    return f"measures {noisy} with common_random_numbers=False cannot be split into chunks or ranks" if noisy else ""


def split_refusal(kwargs: dict) -> str | None:
    """Why the :func:`fastcurv.batched_sharpness` job with keywords ``kwargs`` cannot be split into
    chunks or ranks (:func:`unsplittable`, with the reason and the remedy), or None when it can."""
    what = unsplittable(kwargs)
    if not what:
        return None
    return (f"{what} (they draw one noise row per replica of a chunk from one stream, so their values would depend on "
            "the split): use common_random_numbers=True, or run the job unsplit")


def load_all() -> dict:
    """Import every measure module so that it registers itself; returns the registry."""
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY
