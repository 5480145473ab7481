"""``fastcurv.study``: train a population, compute curvature AND function-space measures, correlate, report.

One call does the whole job users run ("train 100 seeds, compute every measure, tell me which
one predicts generalization"):

1. train R MLPs or CNNs (seeds ``seed .. seed+R-1``) in one batched job (:func:`fastcurv.train.train_population`);
2. curvature measures of all replicas at once (:func:`fastcurv.batched_sharpness`, Hessian of the
   mean cross-entropy over the training set) for the requested names in ``SHARPNESS_MEASURES``
   (or any measure registered with batched_sharpness);
3. function-space measures (:func:`fastcurv.function_measures`, on the test inputs) for the
   requested names in ``FUNCTION_MEASURES``;
4. the generalization numbers (test accuracy, test loss, gap = train acc - test acc);
5. Spearman rho (two-sided p), percentile bootstrap CI and Kendall tau-b of every measure column
   with the target (:func:`fastcurv.stats.correlations`);
6. the invariance audit (:func:`fastcurv.invariance_audit`, Dinh alpha-rescaling, alpha=10) on a
   reparameterized copy of (some of) the population;
7. an output folder: ``results.csv`` and ``results.parquet`` (the same table; pyarrow),
   ``correlations.csv``, ``audit.csv``, ``audit_mixed_correlations.csv`` (at least 4 audited
   replicas), ``report.md``, PNG plots (``<measure>_vs_<target>.png``, ``spectrum.png`` when
   "spectrum" is requested, ``agreement_heatmap.png`` when "disagreement" or "gde" is requested,
   ``disagreement_vs_test_error.png`` when both are, ``audit.png``), ``config.json`` (settings, versions,
   times) and ``config.yaml`` (the settings alone: ``fastcurv study --config config.yaml`` reruns
   the study). The folder is checked (a file there is refused) and created before any work; files
   of an earlier study in it (the names above) are removed when the new one is written.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .demo import TARGETS, _markdown_table, _plot, _versions
from .function.pairwise import SOFT
from .resume import expand_path, prepare_file, prepare_folder, sibling_path

FUNCTION_MEASURES = ("disagreement", "gde", "soft", "weakness", "perturbation_weakness", "simplicity")

# The column standing for each requested measure in the summary ("headline") table; other measures
# stand for the column of their own name, or their first column named ``<measure>_*`` ("spectrum"
# and "gde" have no per-replica column, so no row).
HEADLINE = {
    "lambda_max": "lambda_max",
    "trace": "trace",
    "lambda_min": "lambda_min",
    "top_k": "lambda_1",
    "pac_bayes": "pacbayes_flatness",
    "jiang_sharpness": "jiang_sharpness_flatness",
    "josz_variation": "josz_V",
    "josz_level_distance": "josz_d_eps",
    "disagreement": "disagreement",
    "weakness": "weakness_rel_tau0.1",
    "perturbation_weakness": "perturb_sigma_star",
    "simplicity": "compressed_bytes_lzma",
    "soft": "js",
}

# Columns of function_measures that are not predictors of generalization (test_error IS the target).
_NOT_PREDICTORS = ("test_error", "pacbayes_mag_sigma")
# function_measures columns renamed in the study table: simplicity's noise scale of its KL term would
# clash with the pac_bayes curvature measure's column of the same name, another sigma (the largest
# magnitude-aware weight noise keeping the training accuracy)
FUNCTION_RENAMES = {"pacbayes_mag_sigma": "pacbayes_mag_kl_sigma"}
DATA_SETS = ("digits", "mnist", "fashion-mnist")
MODELS = ("mlp", "cnn")
STALLED_MARGIN = 0.05  # training accuracy within this of chance (1 / classes): flagged "did not learn"
# what a config file cannot hold (a Python function, an object) is written as this, and refused on a rerun
_NOT_STORED = "<not stored in a config file: "
# the report folder's files that a study writes (and removes from an earlier study in the same folder)
REPORT_FILES = ("results.csv", "results.parquet", "correlations.csv", "audit.csv", "audit_mixed_correlations.csv",
                "report.md", "config.json", "config.yaml", "spectrum.png", "agreement_heatmap.png",
                "disagreement_vs_test_error.png", "audit.png", *(f"*_vs_{t}.png" for t in TARGETS))


def _split_measures(measures):
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


def _mixed_correlations(aud, table, target, n_boot, seed, folded: bool = False):
    """Spearman rho of each audited curvature column with ``target`` on a population where a random
    half of the audited replicas is replaced by its reparameterized copy (the same functions, so the
    same target values and the same output-based function-space measures). Rows: ``<measure>`` (original) and
    ``<measure> (half reparameterized)``; ``folded`` (the audit ran on BatchNorm-folded copies):
    ``<measure> (BatchNorm folded)`` and ``<measure> (BatchNorm folded, half reparameterized)``."""
    import pandas as pd

    from .stats import correlations

    k = len(table)
    if k < 4:
        return None
    rng = np.random.default_rng(seed + 7)
    mask = np.zeros(k, dtype=bool)
    mask[rng.choice(k, size=k // 2, replace=False)] = True
    df = pd.DataFrame({target: table[target].to_numpy()})
    cols = []
    for col, (before, after) in aud.per_replica.items():
        if col == "loss" or col not in table.columns:
            continue
        b, a = before.numpy(), after.numpy()
        orig, half = ((f"{col} (BatchNorm folded)", f"{col} (BatchNorm folded, half reparameterized)") if folded
                      else (col, f"{col} (half reparameterized)"))
        df[orig] = b
        df[half] = np.where(mask, a, b)
        cols += [orig, half]
    return correlations(df, target, cols, n_boot=n_boot, seed=seed) if cols else None


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


def _numbers(value, name: str):
    """A number or a list of numbers, numeric strings read as floats (YAML reads ``1e-3`` as a string)."""
    def one(v):
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                raise ValueError(f"{name} must be a number or a list of numbers, got {value!r}") from None
        return v

    return [one(v) for v in value] if isinstance(value, (list, tuple)) else one(value)


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


def _clear_report(out: Path, keep=()) -> list[str]:
    """Remove the files an earlier study wrote into ``out`` (``REPORT_FILES``, but not ``keep``);
    returns their names."""
    old = sorted({p for pattern in REPORT_FILES for p in out.glob(pattern) if p.is_file() and p.name not in keep})
    for p in old:
        p.unlink()
    return [p.name for p in old]


def _keywords(name: str) -> set:
    """The keywords ``sharpness_kwargs`` (batched_sharpness and the HessianOperator it builds) or
    ``function_kwargs`` (function_measures) can take."""
    import inspect

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


def _figure_class():
    """``matplotlib.figure.Figure``, or None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def _figure(**kw):
    """``(figure, axes)``: a ``matplotlib.figure.Figure`` for a file (no pyplot state to close, the
    process's backend untouched), or None without matplotlib."""
    Figure = _figure_class()
    if Figure is None:
        return None
    fig = Figure(**kw)
    return fig, fig.subplots()


def _plot_heatmap(D: torch.Tensor, seeds, out: Path) -> str | None:
    made = _figure(figsize=(5.2, 4.4), dpi=110)
    if made is None:
        return None
    fig, ax = made
    from matplotlib.ticker import MaxNLocator

    A = 1.0 - D.double().numpy()
    im = ax.imshow(A, cmap="viridis", interpolation="nearest")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # ticks on replicas, not between them
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=ax, label="prediction agreement on the test set")
    ax.set_xlabel("replica")
    ax.set_ylabel("replica")
    ax.set_title(f"pairwise agreement, R={A.shape[0]} (seeds {seeds[0]}..{seeds[-1]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "agreement_heatmap.png")
    return "agreement_heatmap.png"


def _plot_gde(table, out: Path) -> str | None:
    made = _figure(figsize=(4.2, 3.6), dpi=110)
    if made is None:
        return None
    fig, ax = made
    x, y = table["test_error"].to_numpy(float), table["disagreement"].to_numpy(float)
    ax.scatter(x, y, s=16)
    both = np.concatenate([x, y])
    both = both[np.isfinite(both)]
    if len(both):  # (replicas that failed are NaN)
        ax.plot([both.min(), both.max()], [both.min(), both.max()], "k--", lw=0.8, label="y = x")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finite test error or disagreement", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("test error")
    ax.set_ylabel("mean disagreement with the other replicas")
    ax.set_title("generalization-disagreement equality", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "disagreement_vs_test_error.png")
    return "disagreement_vs_test_error.png"


def study(
    *,
    data: str = "digits",
    data_root=None,
    n_train: int | None = None,
    n_test: int | None = None,
    model: str = "mlp",
    hidden=(32,),
    activation: str = "relu",
    replicas: int = 8,
    seed: int = 0,
    optimizer: str = "sgd",
    lr=0.05,
    momentum=0.9,
    weight_decay=0.0,
    sam_rho=0.0,
    batch_size: int = 32,
    epochs: int = 15,
    target_loss: float | None = None,
    measures=("lambda_max", "trace", "weakness", "perturbation_weakness", "simplicity", "disagreement"),
    target: str = "test_acc",
    n_boot: int = 2000,
    sharpness_batch_size: int = 1024,
    sharpness_kwargs: dict | None = None,
    function_kwargs: dict | None = None,
    spectrum_replicas: int = 4,
    audit: bool = True,
    audit_alpha: float = 10.0,
    audit_transform: str = "dinh",
    audit_replicas: int | None = 8,
    audit_measures=("lambda_max", "trace"),
    out: str | Path | None = "fastcurv-report",
    checkpoint: str | Path | None = None,
    progress: bool | None = None,
    verbose: bool = True,
    threads: int | None = None,
) -> dict:
    """Train ``replicas`` MLPs or CNNs, compute curvature and function-space measures, correlate, write a report.

    Args:
        data: "digits" (embedded 8x8 digits), "mnist" or "fashion-mnist" (:mod:`fastcurv.datasets`);
            n_train / n_test: fixed random subsets drawn with ``seed`` (MNIST-like data only).
        model: "mlp" (default) or "cnn" (:func:`fastcurv.train.cnn`: 3x3 conv layers with BatchNorm,
            the activation and 2x2 max pooling, then a linear head; trained with batch statistics,
            measured with running statistics; the audit compares BatchNorm-folded copies, see
            ``audit_transform``).
        hidden, activation: the MLP's hidden widths, or the CNN's conv channels (input and output
            widths come from the data).
        optimizer ... target_loss, checkpoint: training settings, see :func:`fastcurv.train.train_population`.
        measures: names from ``fastcurv.sharpness.MEASURES`` (and registered extras, e.g.
            "rho_sharpness"), computed by :func:`fastcurv.batched_sharpness` on the training set,
            and/or from ``FUNCTION_MEASURES``, computed by :func:`fastcurv.function_measures` on the
            test inputs. Every per-replica column they produce is correlated with ``target``.
        target: "test_acc", "test_loss" or "gap" (train accuracy - test accuracy).
        n_boot: bootstrap resamples (over networks) for the Spearman CI.
        sharpness_batch_size: batch size of the training-set loader the Hessian is averaged over.
        sharpness_kwargs / function_kwargs: extra keywords for batched_sharpness / function_measures
            (also for the audit's batched_sharpness calls; with ``output=`` the audit saves its
            results in its own file, ``.audit`` before the extension, see
            :func:`fastcurv.invariance_audit`). Dtypes may be given by name (``"torch.float64"``,
            as ``config.yaml`` stores them).
        spectrum_replicas: replicas drawn in ``spectrum.png`` (when "spectrum" is requested; at least 1).
        audit: run :func:`fastcurv.invariance_audit` on the first ``audit_replicas`` replicas
            (None: all) for ``audit_measures``. ``audit_transform``: "dinh" (last two weight layers
            scaled by alpha and 1/alpha), "dinh_first" (the FIRST weight layer scaled by 1/alpha and
            the second by alpha, which grows the Hessian block of the first layer by alpha^2),
            "neurons" or "balance" (see :func:`fastcurv.invariance_audit`); alpha = ``audit_alpha``.
            Each needs two weight layers (checked before training). For a CNN the audit compares
            copies with each BatchNorm folded into its conv (:func:`fastcurv.reparam.fold_batchnorm`:
            the same functions in eval mode; a BatchNorm would undo the rescaling) before and after
            the transform.
        out: report folder, or None to write nothing. Checked and created before any work (a file
            there raises a ValueError); files of an earlier study in it are replaced or removed.
            ``~`` in ``out``, ``checkpoint``, ``data_root`` and ``sharpness_kwargs["output"]`` is
            expanded (as a shell would; ``config.json`` / ``config.yaml`` record the expanded paths).
        threads: torch intra-op threads for this call (restored afterwards); None leaves it alone.
            torch's thread count is process-wide: overlapping calls with ``threads`` in several
            Python threads can leave the process at another count.
    Returns ``{"table", "correlations", "headline", "history", "sharpness", "function", "audit",
    "audit_mixed", "summary", "out", "files", "seconds", "times", "audit_transform"}``
    (``audit_transform``: the transform's name, as given). ``headline``: the correlation
    rows of the requested measures, one per measure that has a per-replica column (``HEADLINE``'s
    column when it was computed, else the measure's first column, e.g. ``weakness_rel_tau0.05`` with
    ``function_kwargs={"taus": (0.05,)}``, else the one named after the measure, else its first column
    named ``<measure>_*``; ``pac_bayes`` -> ``pacbayes_flatness``, ``jiang_sharpness`` ->
    ``jiang_sharpness_flatness``, ``josz_variation`` -> ``josz_V``, ``josz_level_distance`` ->
    ``josz_d_eps``); "spectrum" and "gde" have none (see
    ``spectrum.png`` and the summary's generalization-disagreement numbers). ``table``: the
    per-replica columns of training, batched_sharpness and function_measures, but simplicity's
    ``pacbayes_mag_sigma`` is ``pacbayes_mag_kl_sigma`` there (``FUNCTION_RENAMES``: the pac_bayes
    curvature measure has a column ``pacbayes_mag_sigma`` of its own, another sigma). ``audit_mixed``: the
    correlations with half of the audited replicas reparameterized (None below 4 replicas or without
    the audit). ``summary["did_not_learn"]``: the replicas whose training accuracy is within
    ``STALLED_MARGIN`` of chance (flagged too). ``times``: seconds per stage.
    """
    if threads is not None:
        if not isinstance(threads, (int, np.integer)) or threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        old = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            args = {k: v for k, v in locals().items() if k in STUDY_ARGS}
            args["threads"] = None
            res = study(**args)
            return res
        finally:
            torch.set_num_threads(old)
    from . import batched_sharpness, function_measures, invariance_audit
    from .datasets import load_dataset, make_loader
    from .stats import correlations
    from .train import cnn, evaluate_population, mlp, train_population

    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    _check_data(data)
    sharpness_kwargs = _from_config(sharpness_kwargs, "sharpness_kwargs")
    function_kwargs = _from_config(function_kwargs, "function_kwargs")
    sharp_m, func_m = _split_measures(measures)
    if not sharp_m and not func_m:
        raise ValueError("measures is empty: name at least one curvature or function-space measure")
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    hidden = _hidden_widths(hidden)
    if model == "cnn" and not hidden:
        raise ValueError("model='cnn' needs at least one conv layer: give its channels as hidden (e.g. [8, 16])")
    if not isinstance(spectrum_replicas, (int, np.integer)) or spectrum_replicas < 1:
        raise ValueError(f"spectrum_replicas must be a positive integer, got {spectrum_replicas!r}")
    if audit and audit_measures and len(hidden) < 1:
        raise ValueError(f"the invariance audit ({audit_transform!r}) rescales two weight layers, but a model without "
                         "hidden layers has one: give hidden layers, or audit=False (--no-audit)")
    lr, momentum, weight_decay, sam_rho, audit_alpha = (_numbers(v, k) for k, v in (
        ("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("sam_rho", sam_rho),
        ("audit_alpha", audit_alpha)))
    target_loss = _target_loss(target_loss)
    _check_settings(n_boot=n_boot, audit=audit, audit_alpha=audit_alpha, audit_measures=audit_measures,
                    audit_replicas=audit_replicas, sharpness_kwargs=sharpness_kwargs, function_kwargs=function_kwargs,
                    lr=lr, replicas=replicas)
    if audit:
        _audit_transform(audit_transform, audit_alpha)  # check the name before training
        if audit_measures and model == "cnn" and (sharpness_kwargs or {}).get("bn_mode", "eval") == "batch":
            raise ValueError("model='cnn' with sharpness_kwargs bn_mode='batch': the audit compares copies with each "
                             "BatchNorm folded into its conv, which are the measured functions only with running "
                             "statistics (bn_mode='eval'); no fold reproduces batch statistics. Use bn_mode='eval', "
                             "or audit=False (--no-audit)")
    # paths, "~" expanded (a config file's never went through a shell), checked and created before any work
    if checkpoint is not None:
        checkpoint = prepare_file(checkpoint, "checkpoint")
    if (sharpness_kwargs or {}).get("output") is not None:
        sharpness_kwargs = {**sharpness_kwargs,
                            "output": str(prepare_file(sharpness_kwargs["output"], "sharpness_kwargs['output']"))}
    if out is not None:
        out = prepare_folder(out)
    if isinstance(data_root, (str, os.PathLike)):
        data_root = expand_path(data_root)
    elif data_root is not None:  # a list of folders
        data_root = [expand_path(r) for r in data_root]
    t0 = time.perf_counter()
    config = {k: v for k, v in locals().items() if k in STUDY_ARGS}
    config["threads"] = torch.get_num_threads()
    config = _config_value(config)

    kw = {"flatten": model == "mlp"}
    if data.lower() not in ("digits", "sklearn-digits"):
        kw.update(n_train=n_train, n_test=n_test, seed=seed)
    elif n_train is not None or n_test is not None:
        raise ValueError("n_train / n_test apply to mnist / fashion-mnist, not to the embedded digits")
    x_tr, y_tr, x_te, y_te = load_dataset(data, data_root, **kw)
    n_classes = int(max(y_tr.max(), y_te.max())) + 1
    seeds = list(range(seed, seed + int(replicas)))
    if model == "mlp":
        sizes = [x_tr.shape[1], *hidden, n_classes]
        arch = f"MLP {'-'.join(map(str, sizes))}"

        def builder():
            return mlp(sizes, activation)
    else:
        in_shape = tuple(x_tr.shape[1:])
        arch = f"CNN {'x'.join(map(str, in_shape))} -> conv {'-'.join(map(str, hidden))} (BatchNorm) -> {n_classes}"

        def builder():
            return cnn(in_shape, hidden, n_classes, activation)

    times = {}
    bars = progress or (progress is None and sys.stderr.isatty())  # tqdm's rule for progress=None

    def stage(what: str) -> None:
        """One line per stage where no progress bar shows (a log, a pipe): a long study is not silent."""
        if verbose and not bars:
            print(f"fastcurv study: {what} ...", flush=True)

    stage(f"training {len(seeds)} replicas (at most {epochs} epochs)")
    t = time.perf_counter()
    models, history = train_population(builder, x_tr, y_tr, seeds=seeds, optimizer=optimizer, lr=lr, momentum=momentum,
                                       weight_decay=weight_decay, sam_rho=sam_rho, batch_size=batch_size, epochs=epochs,
                                       target_loss=target_loss, checkpoint=checkpoint, progress=progress)
    times["train"] = time.perf_counter() - t

    import pandas as pd

    ev_tr = evaluate_population(models, x_tr, y_tr)
    ev_te = evaluate_population(models, x_te, y_te)
    table = pd.DataFrame({
        "seed": seeds,
        "train_loss": ev_tr["loss"].numpy(),
        "train_acc": ev_tr["accuracy"].numpy(),
        "test_loss": ev_te["loss"].numpy(),
        "test_acc": ev_te["accuracy"].numpy(),
    })
    table["gap"] = table["train_acc"] - table["test_acc"]
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("sam_rho", sam_rho)):
        if isinstance(value, (list, tuple)):  # swept: the main covariate of such a study
            table.insert(1, name, list(value))
    table["epochs"] = history.epochs_run
    table["diverged"] = history.diverged
    if target_loss:
        table["reached_target"] = history.reached_target
    table.index.name = "replica"
    flags = [[] for _ in seeds]
    # replicas that never learned (a learning rate too large that collapsed them to one class): at chance on the
    # training set; they are measured, but can decide a rank correlation on their own
    chance = 1.0 / n_classes
    stalled = [r for r, acc in enumerate(table["train_acc"]) if acc <= chance + STALLED_MARGIN]
    for r in stalled:
        flags[r].append(f"training accuracy {table['train_acc'][r]:.3f} at chance ({chance:.3f}): the replica did not learn")

    train_loader = make_loader(x_tr, y_tr, sharpness_batch_size)
    sharp = None
    sharp_cols: list[str] = []
    if sharp_m:
        stage(f"curvature measures {', '.join(sharp_m)}")
        t = time.perf_counter()
        sharp = batched_sharpness(models, train_loader, measures=sharp_m, seed=seed, progress=progress,
                                  **(sharpness_kwargs or {}))
        times["sharpness"] = time.perf_counter() - t
        sdf = sharp.to_pandas().reset_index(drop=True)
        if "flags" in sdf:
            for r, f in enumerate(sdf.pop("flags")):
                if f:
                    flags[r].append(str(f))
        sdf.index.name = "replica"
        table = table.join(sdf)
        sharp_cols = [c for c in sharp.values]

    fm = None
    func_cols: list[str] = []
    if func_m:
        stage(f"function-space measures {', '.join(func_m)}")
        t = time.perf_counter()
        fkw = dict(function_kwargs or {})
        fkw.setdefault("num_train", len(x_tr))
        fm = function_measures(models, make_loader(x_te, y_te, 2048), measures=func_m, seed=seed, **fkw)
        times["function"] = time.perf_counter() - t
        fdf = fm.to_pandas()
        for r, f in enumerate(fdf.pop("flags")):
            if f:
                for old, new in FUNCTION_RENAMES.items():  # (the flags name the columns as the table does)
                    f = str(f).replace(f"{old}'s", f"{new}'s")
                flags[r].append(str(f))
        fdf = fdf.drop(columns=["ok"]).rename(columns=FUNCTION_RENAMES)
        table = table.join(fdf)
        func_cols = [FUNCTION_RENAMES.get(c, c) for c in fm.values if c not in _NOT_PREDICTORS]
    table["flags"] = ["; ".join(dict.fromkeys(f)) for f in flags]  # (the same flag from two stages once)

    measure_cols = [c for c in sharp_cols + func_cols
                    if pd.api.types.is_numeric_dtype(table[c]) and not c.endswith(("_stderr", "_iters", "_converged"))]
    corr = correlations(table, target, measure_cols, n_boot=n_boot, seed=seed)
    head_of = _headline_columns((*sharp_m, *func_m), corr.index)
    headline = corr.loc[list(dict.fromkeys(head_of.values()))]

    summary = {}
    if fm is not None and "gde_estimate" in fm.summary:
        summary["mean_pairwise_disagreement"] = float(fm.summary["gde_estimate"])
        if "mean_test_error" in fm.summary:
            summary["mean_test_error"] = float(fm.summary["mean_test_error"])
    summary["mean_test_acc"] = float(table["test_acc"].mean())
    summary["sd_test_acc"] = float(table["test_acc"].std())
    summary["mean_train_acc"] = float(table["train_acc"].mean())
    summary["did_not_learn"] = stalled

    aud = None
    mixed = None
    if audit and audit_measures:
        stage(f"invariance audit of {', '.join(audit_measures)}")
        t = time.perf_counter()
        k = len(models) if audit_replicas is None else min(int(audit_replicas), len(models))
        apath = None if out is None or _figure_class() is None else str(Path(out) / "audit.png")
        # the curvature of the unchanged replicas was computed above with the same settings: reused
        audited = models[:k]
        if model == "cnn":  # BatchNorm would undo a rescaling: the audit compares folded copies before and after
            from .reparam import fold_batchnorm

            audited = fold_batchnorm(audited, bn_mode=(sharpness_kwargs or {}).get("bn_mode", "eval")).models
        reuse = sharp is not None and k == len(models) and set(audit_measures) <= set(sharp_m) and model != "cnn"
        akw = dict(sharpness_kwargs or {})
        if akw.get("output") is not None:  # the audit's own results file (other replicas and measures)
            akw["output"] = sibling_path(akw["output"], "audit")
        aud = invariance_audit(audited, train_loader, measures=tuple(audit_measures),
                               transform=_audit_transform(audit_transform, audit_alpha), alpha=audit_alpha,
                               path=apath, seed=seed, progress=progress, before=sharp if reuse else None, **akw)
        times["audit"] = time.perf_counter() - t
        mixed = _mixed_correlations(aud, table.iloc[:k], target, n_boot, seed, folded=model == "cnn")

    files: list[str] = []
    if out is not None:
        outp = prepare_folder(out)
        keep = {"audit.png"} if aud is not None and aud.plot_path else set()  # (written by this study's audit)
        for name in _clear_report(outp, keep):
            if verbose:
                print(f"removed {name} of an earlier study in {outp}")
        meta = {"config": config, "versions": _versions(), "seconds": times, "summary": summary,
                "backend": None if sharp is None else sharp.backend,
                "backend_reason": None if sharp is None else sharp.backend_reason,
                "trace_method": None if sharp is None else sharp.trace_method}
        (outp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        # (with out: a rerun given --out moves a checkpoint that lay inside this folder along, see the CLI)
        rerun = {k: v for k, v in config.items() if k not in ("progress", "verbose")}
        _write_yaml(rerun, outp / "config.yaml")
        files += ["config.json", "config.yaml"]
        table.to_csv(outp / "results.csv")
        corr.to_csv(outp / "correlations.csv")
        files += ["results.csv", "correlations.csv"]
        parquet_note = ""
        try:  # pyarrow is a dependency of fastcurv; a broken environment still keeps the CSV and says why
            import pyarrow  # noqa: F401
        except ImportError as e:
            parquet_note = (f"results.parquet NOT written: pyarrow, a dependency of fastcurv, cannot be imported ({e}); "
                            "reinstall it with `pip install pyarrow`. The same table is in results.csv.")
            import warnings

            warnings.warn(parquet_note, RuntimeWarning, stacklevel=2)
        else:
            table.to_parquet(outp / "results.parquet", engine="pyarrow")
            files.append("results.parquet")
        # one scatter per requested measure, the replicas its correlation left out drawn hollow
        plots = _plot(table, list(headline.index), target, outp, correlated=measure_cols)
        if sharp is not None and sharp.spectrum is not None:
            try:  # (a file-only figure: nothing left open)
                sharp.spectrum.plot(replicas=range(min(spectrum_replicas, len(models))), path=str(outp / "spectrum.png"))
                plots.append("spectrum.png")
            except ImportError:
                pass
        if fm is not None and "disagreement" in fm.pairwise:
            p = _plot_heatmap(fm.pairwise["disagreement"], seeds, outp)
            if p:
                plots.append(p)
            if "test_error" in table and "disagreement" in table:
                p = _plot_gde(table, outp)
                if p:
                    plots.append(p)
        if aud is not None:
            aud.table.to_csv(outp / "audit.csv")
            files.append("audit.csv")
            if mixed is not None:
                mixed.to_csv(outp / "audit_mixed_correlations.csv")
                files.append("audit_mixed_correlations.csv")
            if aud.plot_path:
                plots.append("audit.png")
        files += plots
        (outp / "report.md").write_text(_report(config, arch, seeds, len(x_tr), len(x_te), data, times, sharp, fm,
                                                corr, headline, head_of, summary, aud, mixed, table, target, plots,
                                                parquet_note))
        files.append("report.md")
    res = {"table": table, "correlations": corr, "headline": headline, "history": history, "sharpness": sharp,
           "function": fm, "audit": aud, "audit_mixed": mixed, "summary": summary, "out": None if out is None else Path(out).resolve(),
           "files": files, "seconds": time.perf_counter() - t0, "times": times, "audit_transform": audit_transform}
    if verbose:
        _print(res, target)
    return res


STUDY_ARGS = study.__code__.co_varnames[:study.__code__.co_kwonlyargcount]


def _write_yaml(cfg: dict, path: Path):
    try:
        import yaml

        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    except ImportError:  # JSON is valid YAML
        path.write_text(json.dumps(cfg, indent=2) + "\n")


# What each results column means, in its units (report.md's "Columns" section): (prefix, text)
_GLOSSARY = (
    ("seed", "initialization and data-order seed"),
    ("lr", "learning rate (swept: one per replica)"), ("momentum", "momentum (swept)"),
    ("weight_decay", "weight decay (swept)"), ("sam_rho", "SAM radius (swept)"),
    ("train_loss", "mean cross-entropy on the training set (nats)"),
    ("test_loss", "mean cross-entropy on the test set (nats)"),
    ("train_acc", "training accuracy (fraction)"), ("test_acc", "test accuracy (fraction)"),
    ("gap", "train_acc - test_acc"), ("epochs", "epochs trained"),
    ("diverged", "training diverged (non-finite loss)"), ("reached_target", "reached the training-loss target"),
    ("lambda_max", "largest eigenvalue of the Hessian of the mean training cross-entropy (nats per squared "
                   "parameter unit); _error: its error bound (inf where not converged), _iters: Lanczos steps"),
    ("lambda_min", "smallest Hessian eigenvalue (same units)"),
    ("lambda_", "the k-th largest Hessian eigenvalue (top_k; same units)"),
    ("trace", "Hessian trace, the sum of its eigenvalues (same units); _stderr: its standard error (0 when exact)"),
    ("weakness_", "permission-profile log-weakness at threshold tau (rel: relative to the top probability, abs: "
                  "absolute), bits per input, from 0 to log2(2^K - 1) (about K for K classes)"),
    ("mean_entropy", "mean entropy of the predicted distribution (nats)"),
    ("perturb_weakness_sigma", "fraction of the multiplicative weight-noise draws at this sigma that leave every "
                               "probe prediction unchanged (steps of 1 / num_draws)"),
    ("perturb_sigma_star", "the noise scale at which prediction agreement falls to 1 - delta"),
    ("compressed_bytes_", "size of the 8-bit quantized weights compressed (bytes; larger = less simple)"),
    ("sq_weight_norm", "squared L2 norm of all parameters"),
    # (before pacbayes_mag_kl, a prefix of its name; function_measures calls it pacbayes_mag_sigma)
    ("pacbayes_mag_kl_sigma", "simplicity: the noise scale sigma' its magnitude-aware PAC-Bayes KL term uses "
                              "(function_measures' pacbayes_mag_sigma: function_kwargs' pacbayes_sigma, or bisected "
                              "where the accuracy on the probe test inputs drops by 0.1)"),
    ("pacbayes_mag_kl", "simplicity: magnitude-aware PAC-Bayes KL term (Jiang et al. 2020; nats)"),
    ("disagreement", "mean fraction of test inputs on which the replica's prediction differs from each other "
                     "replica's"),
    ("test_error", "1 - test accuracy on the function measures' inputs"),
    ("js", "mean Jensen-Shannon divergence between the replica's predicted distributions and each other "
           "replica's (nats)"),
    ("tv", "mean total-variation distance between the replica's predicted distributions and each other replica's"),
    ("l2", "mean L2 distance between the replica's predicted distributions and each other replica's"),
    ("ok", "the replica's measures computed without a failure"),
    ("rho_sharpness", "worst-case rise of the training loss within an L2 ball of radius rho (nats)"),
    ("adaptive_rho_sharpness", "worst-case loss rise within the weight-scaled ball (adaptive; nats)"),
    ("avg_rho_sharpness", "average loss rise under Gaussian weight noise of scale rho (nats)"),
    ("adaptive_avg_rho_sharpness", "average loss rise under weight-scaled Gaussian noise (nats)"),
    ("mw_sharpness", "Mason-Williams: mean absolute loss change over rho per random direction"),
    ("epsilon_sharpness", "Keskar's epsilon-sharpness: 100 x the worst loss rise in the box over (1 + loss)"),
    ("josz_V", "Josz's loss variation: the largest training-loss rise within an L2 ball of radius r (nats; "
               "josz_V_r=<r>: one column per radius)"),
    ("josz_d_eps", "Josz's distance to the eps level set: the smallest radius at which the training loss can rise "
                   "by eps"),
    ("relative_flatness", "Petzka's relative flatness of the last Linear layer (kappa_Tr)"),
    ("fisher_rao", "Fisher-Rao norm (closed form for cross-entropy)"),
    ("pacbayes_flatness", "pac_bayes: PAC-Bayes flatness, 1 / sigma^2 of the largest isotropic Gaussian weight "
                          "noise (std sigma) keeping the mean training-accuracy drop within target"),
    ("pacbayes_sigma", "pac_bayes: that largest noise scale sigma"),
    ("pacbayes_mag_flatness", "pac_bayes, magnitude-aware: 1 / sigma'^2 of the largest weight noise of std "
                              "sqrt(sigma'^2 theta^2 + eps^2) keeping the training-accuracy drop within target"),
    ("pacbayes_mag_sigma", "pac_bayes, magnitude-aware: that largest relative noise scale sigma'"),
    ("jiang_sharpness_flatness", "jiang_sharpness: Jiang et al.'s sharpness flatness, 1 / alpha^2 of the largest "
                                 "box |u_i| <= alpha whose worst-case perturbation keeps the training-accuracy drop "
                                 "within target"),
    ("jiang_sharpness_alpha", "jiang_sharpness: that largest box half-width alpha"),
    ("jiang_sharpness_mag_flatness", "jiang_sharpness, magnitude-aware: 1 / alpha'^2 of the largest box "
                                     "|u_i| <= alpha' |theta_i| + eps keeping the training-accuracy drop within "
                                     "target"),
    ("jiang_sharpness_mag_alpha", "jiang_sharpness, magnitude-aware: that largest relative half-width alpha'"),
    ("ggn_", "generalized Gauss-Newton matrix: largest eigenvalue or trace (nats per squared parameter unit)"),
    ("fisher_", "empirical Fisher: largest eigenvalue or trace (nats per squared parameter unit)"),
)


def _glossary(columns) -> list[str]:
    """report.md lines explaining the result columns present: one per glossary entry (the first
    whose prefix a column has), a family of columns (``weakness_*``) on one line."""
    found: dict[str, list[str]] = {}
    for col in columns:
        if str(col).endswith(("_error", "_iters", "_converged", "_stderr")) and col != "test_error":
            continue
        prefix = next((p for p, _ in _GLOSSARY if str(col).startswith(p)), None)
        if prefix is not None:
            found.setdefault(prefix, []).append(col)
    text = dict(_GLOSSARY)
    return [f"- `{cols[0] if len(cols) == 1 else prefix + '*'}`"
            + (f" ({len(cols)} columns)" if len(cols) > 1 else "") + f": {text[prefix]}" for prefix, cols in found.items()]


def _headline_columns(measures, columns) -> dict:
    """``{measure: column}``: the correlated column standing for each requested measure in the headline,
    ``HEADLINE``'s when it was computed, else the measure's first column (``function_kwargs`` may ask for
    other thresholds, codecs or divergences: ``taus=(0.05,)`` gives ``weakness_rel_tau0.05``; a list of
    josz radii ``josz_V_r=<r>``), else its own name, else the first column named ``<measure>_*`` (a
    measure registered with batched_sharpness that writes, e.g., ``<measure>_flatness``)."""
    family = {"weakness": lambda c: c.startswith("weakness_"), "simplicity": lambda c: c.startswith("compressed_bytes_"),
              "soft": lambda c: c in SOFT, "josz_variation": lambda c: c.startswith("josz_V_r=")}
    out = {}
    for m in measures:
        col = HEADLINE.get(m, m)
        if col not in columns:
            own = family.get(m) or (lambda c, m=m: c.startswith(f"{m}_"))
            col = next((c for c in columns if own(str(c))), col)
        if col in columns:
            out[m] = col
    return out


def _report(config, arch, seeds, n_tr, n_te, data, times, sharp, fm, corr, headline, head_of, summary, aud, mixed,
            table, target, plots, parquet_note) -> str:
    c = config
    asked = [c["measures"]] if isinstance(c["measures"], str) else c["measures"]
    none = [m for m in asked if m not in head_of]  # measures without a headline row ("spectrum", "gde")
    md = [
        f"# fastcurv study: {len(seeds)} replicas of {arch} on {data}",
        "",
        f"Training: {c['optimizer']}, lr {c['lr']}, momentum {c['momentum']}, weight decay {c['weight_decay']}, "
        f"SAM rho {c['sam_rho']}, batch {c['batch_size']}, at most {c['epochs']} epochs"
        + (f", stop at training loss {c['target_loss']}" if c.get("target_loss") else "")
        + f"; {n_tr} training / {n_te} test samples"
        + (f" (fixed subsets drawn with seed {c['seed']}). " if c.get("n_train") or c.get("n_test") else " (all of them). ")
        + f"Seeds {seeds[0]}..{seeds[-1]} (initialization and data order).",
        f"Train accuracy {summary['mean_train_acc']:.4f} (mean), test accuracy {summary['mean_test_acc']:.4f} "
        + (f"+- {summary['sd_test_acc']:.4f} (mean +- sd over replicas)." if len(seeds) > 1 else "(one replica)."),
        "Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + ".",
        "",
    ]
    if "reached_target" in table:
        reached, R = int(table["reached_target"].sum()), len(table)
        if reached < R:
            rest = table.loc[~table["reached_target"].astype(bool), "train_loss"]
            md[-1:-1] = [f"**{R - reached} of {R} replicas did not reach the training-loss target {c['target_loss']}** "
                         f"in {c['epochs']} epochs (their training losses {rest.min():.3g} to {rest.max():.3g}): they "
                         "are measured as they stood at the epoch limit (column `reached_target`)."]
        else:
            md[-1:-1] = [f"All {R} replicas reached the training-loss target {c['target_loss']}."]
    failed = table.index[table["diverged"].astype(bool)].tolist()
    if len(failed) == len(table):
        md[-1:-1] = [f"**All {len(table)} replicas diverged in training**: there is nothing to measure; lower the "
                     "learning rate."]
    elif failed:
        md[-1:-1] = [f"**{len(failed)} of {len(table)} replicas diverged in training** (replicas {failed}): their "
                     f"measures are NaN; the means above and the correlations use the other {len(table) - len(failed)}."]
    stalled = summary["did_not_learn"]
    if stalled:
        md[-1:-1] = [f"**{len(stalled)} of {len(table)} replicas did not learn** (replicas {stalled}: training accuracy "
                     f"within {STALLED_MARGIN} of chance, flagged): they are measured and correlated with the others, "
                     "and a few such outliers can decide a rank correlation; a smaller learning rate trains them."]
    if sharp is not None:
        how = {"exact": "the trace exact (no probes)", "": "no trace"}.get(sharp.trace_method,
                                                                        f"the trace estimated ({sharp.trace_method})")
        md += [f"Curvature (`batched_sharpness`, backend `{sharp.backend}`): Hessian of the mean cross-entropy over "
               f"the {n_tr} training samples; {sharp.num_matvecs} Hessian-vector products for all replicas together; "
               f"{how}.", ""]
    if fm is not None:
        from .function import function_measures

        delta = (c.get("function_kwargs") or {}).get("delta", inspect.signature(function_measures).parameters["delta"].default)
        md += [f"Function-space measures (`function_measures`) on the {fm.num_examples} test inputs. Weakness "
               "columns are OUR operationalizations of Bennett's weakness (permission-profile log-weakness at "
               "threshold tau, bits per input; perturbation weakness = noise scale sigma* at which "
               f"{100 * delta:g} % of the predictions change). Simplicity columns are sizes/norms (larger = less "
               "simple).", ""]
    no_row = f"{' and '.join(none)} {'have' if len(none) > 1 else 'has'} no per-replica column"
    md += [f"## Headline: rank correlation with `{target}`", "",
           f"Spearman rho (two-sided p), 95 % percentile bootstrap CI ({c['n_boot']} resamples over networks), "
           "Kendall tau-b. "
           + ("One column per requested measure (" + ", ".join(f"{k} -> `{v}`" for k, v in head_of.items()) + ")"
              + (f"; {no_row}" if none else "") + "." if head_of
              else f"No headline: {no_row} (see the sections below)."), "",
           *([_markdown_table(headline), ""] if head_of else [])]
    if "mean_pairwise_disagreement" in summary:
        d, e = summary["mean_pairwise_disagreement"], summary.get("mean_test_error", float("nan"))
        md += ["## Generalization-disagreement check", "",
               f"Mean pairwise test disagreement between replicas: {d:.4f}; mean test error: {e:.4f} "
               f"({_gde_ratio(d, e)}; the equality of Jiang et al. 2022 predicts 1).", ""]
    md += [f"## All measure columns vs `{target}`", "", _markdown_table(corr), ""]
    if aud is not None:
        at = aud.table
        md += [f"## Invariance audit (`{c['audit_transform']}` reparameterization, alpha = {c['audit_alpha']}, "
               f"{len(next(iter(aud.per_replica.values()))[0])} replicas)", "",
               *(["The audit compares copies with each BatchNorm folded into its conv layer (the same functions in "
                  "eval mode; a BatchNorm would undo a rescaling) before and after the transform; folding is itself a "
                  "reparameterization, so `before_mean` differs from the curvature columns above.", ""]
                 if c.get("model") == "cnn" else []),
               f"Largest output change {at.attrs.get('max_output_change', float('nan')):.2e}, "
               f"predictions changed: {at.attrs.get('predictions_changed')}. Function-space measures computed from "
               "the outputs are unchanged by construction; the simplicity columns describe the weights: "
               "`sq_weight_norm` and `pacbayes_mag_kl` change under any rescaling, the compressed sizes under "
               "neuron-wise rescaling.", "", _markdown_table(at), ""]
        if mixed is not None:
            md += [f"Rank correlation with `{target}` when a random half of these replicas is replaced by its "
                   "reparameterized copy (same functions, same test accuracy, same output-based function-space "
                   "measures):", "",
                   _markdown_table(mixed), ""]
    show = [x for x in ["seed", "train_loss", "test_acc", "gap", *[h for h in headline.index], "flags"] if x in table]
    md += ["## Per-replica results (headline columns; all columns in results.csv)", "", _markdown_table(table[show]), ""]
    if parquet_note:
        md += [parquet_note, ""]
    if plots:
        md += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    else:
        md += ["(matplotlib is not installed: no plots)", ""]
    md += ["## Columns", "", "A correlation of NaN means the column is constant over the replicas (or has fewer "
           "than 3 finite values).", "", *_glossary(table.columns), ""]
    md += ["Rerun: `fastcurv study --config config.yaml --out <folder>` (settings and versions in config.json).", ""]
    return "\n".join(md)


def _gde_ratio(disagreement: float, test_error: float) -> str:
    """"ratio <disagreement / test error>" for report.md, in words where the test error is 0 or NaN
    (a population perfect on a small test set; the division raised ZeroDivisionError)."""
    if disagreement != disagreement or test_error != test_error:
        return "ratio undefined: not finite"
    if test_error == 0:
        return ("ratio undefined: mean test error 0 and no disagreement" if disagreement == 0
                else "ratio infinite: mean test error 0")
    return f"ratio {disagreement / test_error:.3f}"


def _print(res, target):
    import pandas as pd

    with pd.option_context("display.width", 140, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        if len(res["headline"]):
            print(f"Rank correlation with {target} (headline measures):")
            print(res["headline"].to_string())
        else:
            print(f"No headline: no requested measure has a per-replica column to correlate with {target}.")
        s = res["summary"]
        if "mean_pairwise_disagreement" in s:
            print(f"\nmean pairwise disagreement {s['mean_pairwise_disagreement']:.4f} vs mean test error "
                  f"{s.get('mean_test_error', float('nan')):.4f}")
        if res["audit"] is not None:
            print(f"\ninvariance audit ({res['audit_transform']}):")
            print(res["audit"].table[["before_mean", "after_mean", "ratio_median", "invariant"]].to_string())
        if res.get("audit_mixed") is not None:
            print("\nhalf of the audited replicas reparameterized:")
            print(res["audit_mixed"][["n", "spearman_rho", "spearman_p"]].to_string())
    if res["out"] is not None:
        print(f"\nreport: {res['out'] / 'report.md'} ({len(res['files'])} files)")
    print(f"done in {res['seconds']:.1f} s")
