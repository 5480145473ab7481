"""``fastcurv.study``: train a population, compute curvature AND function-space measures, correlate, report.

One call does the whole job users run ("train 100 seeds, compute every measure, tell me which
one predicts generalization"):

1. train R MLPs or CNNs (seeds ``seed .. seed+R-1``) in one batched job (:func:`fastcurv.train.train_population`);
2. curvature measures of all replicas at once (:func:`fastcurv.batched_sharpness`, Hessian of the
   mean cross-entropy over the training set) for the requested names in ``SHARPNESS_MEASURES``
   (or any measure registered with batched_sharpness);
3. function-space measures (:func:`fastcurv.function_measures`, on the test inputs) for the
   requested names in ``FUNCTION_MEASURES``;
4. the generalization numbers (test accuracy, test loss, gap = train acc - test acc, from the
   correct counts with one rounding: equal gaps are equal numbers);
5. Spearman rho (two-sided p), percentile bootstrap CI and Kendall tau-b of every measure column,
   and of every swept hyperparameter as a baseline, with the target, with Benjamini-Yekutieli
   adjusted p-values (:func:`fastcurv.stats.correlations`); with swept hyperparameters, Jiang et
   al.'s granulated Kendall coefficient Psi (:func:`fastcurv.stats.granulated_kendall`);
6. the invariance audit (:func:`fastcurv.invariance_audit`, Dinh alpha-rescaling, alpha=10) on a
   reparameterized copy of (some of) the population;
7. an output folder: ``results.csv`` and ``results.parquet`` (the same table; pyarrow),
   ``correlations.csv``, ``granulated_kendall.csv`` (with a swept grid), ``audit.csv``,
   ``audit_mixed_correlations.csv`` (at least 4 audited replicas), ``report.md``, PNG plots
   (``<measure>_vs_<target>.png``, coloured by a swept hyperparameter, ``spectrum.png`` when
   "spectrum" is requested, ``agreement_heatmap.png`` when "disagreement" or "gde" is requested,
   ``disagreement_vs_test_error.png`` when both are, ``audit.png``), ``config.json`` (settings,
   versions, times) and ``config.yaml`` (the settings alone: ``fastcurv study --config config.yaml`` reruns
   the study). The folder is checked (a file there is refused) and created before any work; files
   of an earlier study in it (the names above) are removed when the new one is written.

The settings are parsed and checked in :mod:`fastcurv.study_config`; the report, plots and
printed summary are made in :mod:`fastcurv.study_report`. The names other code imports from here
are re-exported.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .ambient import resetting_ambient
from .paths import expand_path, prepare_file, prepare_folder, sibling_path
from .study_config import (MODELS, STALLED_MARGIN, _absolute_paths, _audit_transform, _check_data, _check_settings,
                           _config_value, _from_config, _hidden_widths, _integers, _measure_names, _numbers, _seed,
                           _split_measures, _target_loss, _write_yaml)
from .study_config import DATA_SETS, FUNCTION_MEASURES  # noqa: F401  (re-exported)
from .study_report import (TARGETS, _clear_report, _figure_class, _headline_columns, _plot, _plot_gde, _plot_heatmap,
                           _print, _report, _versions)
from .study_report import HEADLINE, REPORT_FILES, _gde_ratio, _glossary  # noqa: F401  (re-exported: the tests use them)

# Columns of function_measures that are not predictors of generalization (test_error IS the target).
_NOT_PREDICTORS = ("test_error", "pacbayes_mag_sigma")
# function_measures columns renamed in the study table: simplicity's noise scale of its KL term would
# clash with the pac_bayes curvature measure's column of the same name, another sigma (the largest
# magnitude-aware weight noise keeping the training accuracy)
FUNCTION_RENAMES = {"pacbayes_mag_sigma": "pacbayes_mag_kl_sigma"}


def _by_kind(corr, swept):
    """``corr`` (:func:`fastcurv.stats.correlations`' table) with a first column ``kind``
    ("hyperparameter" for the ``swept`` rows, else "measure") and its Benjamini-Yekutieli columns
    adjusted within each kind: the measures form one family, so a measure's adjusted p does not
    depend on which settings were swept (over all rows, lambda_max's 0.5 became 0.926 in a
    4-replica study with lr and momentum swept)."""
    from .stats import by_adjusted

    corr = corr.copy()
    corr.insert(0, "kind", ["hyperparameter" if m in swept else "measure" for m in corr.index])
    for kind in ("measure", "hyperparameter"):
        rows = corr["kind"] == kind
        for col in ("spearman_p", "kendall_p"):
            corr.loc[rows, f"{col}_by"] = by_adjusted(corr.loc[rows, col].to_numpy(dtype=float))
    return corr


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


def _exact_gap(train_acc, test_acc, n_train: int, n_test: int) -> np.ndarray:
    """``train_acc - test_acc`` rounded once. Both are counts over ``n_train`` / ``n_test`` samples
    (:func:`fastcurv.train.evaluate_population`'s fractions), so the gap is the rational
    ``(c_train n_test - c_test n_train) / (n_train n_test)``: its numerator is computed exactly
    (integers in float64) and divided once, so equal gaps are equal floats. Subtracting the two
    rounded fractions made 1773/2000 - 880/1000 and 191/2000 - 89/1000 (both 13/2000) differ by
    6e-17, and the rank statistics then ordered the two replicas by rounding noise instead of
    counting a tie. NaN accuracies (diverged replicas) give NaN."""
    c_train = np.rint(np.asarray(train_acc, dtype=np.float64) * n_train)
    c_test = np.rint(np.asarray(test_acc, dtype=np.float64) * n_test)
    return (c_train * n_test - c_test * n_train) / (n_train * n_test)


def _granulated(table, target: str, measure_cols, swept, varying):
    """``(granulated Kendall table or None, note or None)`` for the swept hyperparameters ``varying``,
    those of ``swept`` that take two values or more (:func:`fastcurv.stats.granulated_kendall`); None
    and no note without such a sweep; None and the reason when the sweep is not a grid."""
    from .stats import granulated_kendall

    if not varying or not measure_cols:
        return None, None
    constant = [h for h in swept if h not in varying]
    left = f"swept with one value, left out: {', '.join(constant)}" if constant else ""
    try:
        return granulated_kendall(table, target, varying, measure_cols), f"{left.capitalize()}." if left else None
    except ValueError as e:
        return None, f"not computed: {e}" + (f" ({left})" if left else "")


@resetting_ambient
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
    batch_size: int | list = 32,
    label_noise=0.0,
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
            ``lr``, ``momentum``, ``weight_decay``, ``sam_rho``, ``batch_size`` and ``label_noise``
            may be one number or one per replica (a list, tuple, 1-d numpy array or tensor, e.g.
            ``np.logspace(-3, -1, 8)``): such a sweep gets a column in the table, a row among the
            correlations (kind "hyperparameter": a baseline for the measures), the granulated
            Kendall coefficient (two or more swept, or one) and the colours of the scatter plots.
            ``batch_size``: positive integers; every batch size trains the same ``epochs`` (smaller
            batches take more steps). ``label_noise``: fractions in [0, 1) of each replica's
            training labels replaced by wrong ones, drawn with its seed
            (:func:`fastcurv.train.noisy_labels`); ``train_acc``, ``train_loss``, ``gap`` and the
            curvature measures are on the clean labels, and the table's ``noisy_train_acc`` (with label noise) is the accuracy on
            the labels each replica was trained on. ``target_loss=0.0`` counts as set (the
            ``reached_target`` column and the report's lines); None is unset.
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
        progress: tqdm progress bars for training, the curvature measures and the audit: True,
            False, or None (default) to show them only when stderr is a terminal.
        verbose: print a line per stage where no progress bar shows (a log, a pipe), the names of an
            earlier study's files removed from ``out``, and at the end the headline correlations,
            the audit and where the report is. False: silent (warnings aside).
        threads: torch intra-op threads for this call (restored afterwards); None leaves it alone.
            torch's thread count is process-wide: overlapping calls with ``threads`` in several
            Python threads can leave the process at another count.
    Returns ``{"table", "correlations", "headline", "granulated_kendall", "granulated_kendall_note",
    "models", "history", "sharpness", "function", "audit", "audit_mixed", "summary", "out", "files",
    "seconds", "times", "audit_transform"}`` (``audit_transform``: the transform's name, as given;
    ``models``: the R trained models, in seed order, for follow-up measures without retraining).
    ``correlations``: one row per correlated column, its ``kind`` "measure" or "hyperparameter" (a swept setting, as a
    baseline), with :func:`fastcurv.stats.correlations`' columns (``spearman_p_by`` /
    ``kendall_p_by``: Benjamini-Yekutieli adjusted within each kind: over the measure rows, and
    separately over the hyperparameter rows). ``granulated_kendall``:
    :func:`fastcurv.stats.granulated_kendall` of the measure columns over the swept hyperparameters
    that take two values or more (None without such a sweep, or when it is not a full grid:
    ``granulated_kendall_note`` then says why; the note also names swept hyperparameters left out
    for taking one value). ``headline``: the correlation
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

    The caller's grad mode, inference mode and autocast change nothing
    (:mod:`fastcurv.ambient`).
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
    from .sharpness import reuse_refusal
    from .stats import correlations
    from .train import _batch_sizes, _label_noise, cnn, evaluate_population, mlp, noisy_labels, train_population

    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    _check_data(data)
    seed = _seed(seed)  # (a negative seed failed in numpy after the training)
    audit_measures = _measure_names(audit_measures, "audit_measures")  # (one name: not its letters)
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
    lr, momentum, weight_decay, sam_rho, audit_alpha = (_numbers(v, k) for k, v in (
        ("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("sam_rho", sam_rho),
        ("audit_alpha", audit_alpha)))
    target_loss = _target_loss(target_loss)
    _check_settings(n_boot=n_boot, audit=audit, audit_alpha=audit_alpha, audit_measures=audit_measures,
                    audit_replicas=audit_replicas, sharpness_kwargs=sharpness_kwargs, function_kwargs=function_kwargs,
                    lr=lr, replicas=replicas, verbose=verbose, progress=progress)
    batch_size, label_noise = _integers(batch_size, "batch_size"), _numbers(label_noise, "label_noise")
    _batch_sizes(batch_size, int(replicas))  # (clear errors before any work: a length, a fraction, a float)
    noise = _label_noise(label_noise, int(replicas))
    if audit:
        if audit_measures and len(hidden) < 1:
            raise ValueError(f"the invariance audit ({audit_transform!r}) rescales two weight layers, but a model "
                             "without hidden layers has one: give hidden layers, or audit=False (--no-audit)")
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
    config = _config_value(_absolute_paths(config))

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
                                       target_loss=target_loss, checkpoint=checkpoint, progress=progress,
                                       label_noise=label_noise)
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
    table["gap"] = _exact_gap(table["train_acc"], table["test_acc"], len(x_tr), len(x_te))
    swept = []  # the hyperparameters given one per replica: the main covariates of such a study
    if any(noise):  # the accuracy on the labels each replica was trained on (memorization of the wrong ones)
        table["noisy_train_acc"] = [
            float(evaluate_population(models[r:r + 1], x_tr, noisy_labels(y_tr, f, s, n_classes))["accuracy"][0])
            for r, (f, s) in enumerate(zip(noise, seeds))]
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("sam_rho", sam_rho),
                        ("batch_size", batch_size), ("label_noise", label_noise)):
        if isinstance(value, (list, tuple)):
            table.insert(1, name, list(value))
            swept.append(name)
    table["epochs"] = history.epochs_run
    table["diverged"] = history.diverged
    if target_loss is not None:
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
    # the swept hyperparameters are correlated too, as baselines a measure has to beat
    corr = _by_kind(correlations(table, target, measure_cols + swept, n_boot=n_boot, seed=seed), swept)
    head_of = _headline_columns((*sharp_m, *func_m), measure_cols)
    headline = corr.loc[list(dict.fromkeys(head_of.values()))].drop(columns="kind")
    varying = [h for h in swept if table[h].nunique() > 1]  # (the swept hyperparameters that take two values or more)
    granulated, granulated_note = _granulated(table, target, measure_cols, swept, varying)

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
        apath = None if out is None or _figure_class() is None else str(out / "audit.png")
        # the curvature of the unchanged replicas was computed above with the same settings: reused where
        # the audit's measures make the same solver runs (top_k among the study's measures, or
        # audit_measures without lambda_max, change the estimators: the audit computes its own then)
        audited = models[:k]
        if model == "cnn":  # BatchNorm would undo a rescaling: the audit compares folded copies before and after
            from .reparam import fold_batchnorm

            audited = fold_batchnorm(audited, bn_mode=(sharpness_kwargs or {}).get("bn_mode", "eval")).models
        reuse = (sharp is not None and k == len(models) and set(audit_measures) <= set(sharp_m) and model != "cnn"
                 and not reuse_refusal(sharp, tuple(audit_measures)))
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
        keep = {"audit.png"} if aud is not None and aud.plot_path else set()  # (written by this study's audit)
        for name in _clear_report(out, keep):
            if verbose:
                print(f"removed {name} of an earlier study in {out}")
        meta = {"config": config, "versions": _versions(), "seconds": times, "summary": summary,
                "backend": None if sharp is None else sharp.backend,
                "backend_reason": None if sharp is None else sharp.backend_reason,
                "trace_method": None if sharp is None else sharp.trace_method}
        (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        # (with out: a rerun given --out moves a checkpoint that lay inside this folder along, see the CLI)
        rerun = {k: v for k, v in config.items() if k not in ("progress", "verbose")}
        _write_yaml(rerun, out / "config.yaml")
        files += ["config.json", "config.yaml"]
        table.to_csv(out / "results.csv")
        corr.to_csv(out / "correlations.csv")
        files += ["results.csv", "correlations.csv"]
        if granulated is not None:
            granulated.to_csv(out / "granulated_kendall.csv")
            files.append("granulated_kendall.csv")
        parquet_note = ""
        try:  # pyarrow is a dependency of fastcurv; a broken environment still keeps the CSV and says why
            import pyarrow  # noqa: F401
        except ImportError as e:
            parquet_note = (f"results.parquet NOT written: pyarrow, a dependency of fastcurv, cannot be imported ({e}); "
                            "reinstall it with `pip install pyarrow`. The same table is in results.csv.")
            import warnings

            warnings.warn(parquet_note, RuntimeWarning, stacklevel=3)
        else:
            table.to_parquet(out / "results.parquet", engine="pyarrow")
            files.append("results.parquet")
        # one scatter per requested measure, the replicas its correlation left out drawn hollow
        plots = _plot(table, list(headline.index), target, out, correlated=measure_cols,
                      color_by=varying, corr=corr)
        if sharp is not None and sharp.spectrum is not None:
            try:  # (a file-only figure: nothing left open)
                sharp.spectrum.plot(replicas=range(min(spectrum_replicas, len(models))), path=str(out / "spectrum.png"))
                plots.append("spectrum.png")
            except ImportError:
                pass
        if fm is not None and "disagreement" in fm.pairwise:
            p = _plot_heatmap(fm.pairwise["disagreement"], seeds, out)
            if p:
                plots.append(p)
            if "test_error" in table and "disagreement" in table:
                p = _plot_gde(table, out)
                if p:
                    plots.append(p)
        if aud is not None:
            aud.table.to_csv(out / "audit.csv")
            files.append("audit.csv")
            if mixed is not None:
                mixed.to_csv(out / "audit_mixed_correlations.csv")
                files.append("audit_mixed_correlations.csv")
            if aud.plot_path:
                plots.append("audit.png")
        files += plots
        (out / "report.md").write_text(_report(config, arch, seeds, len(x_tr), len(x_te), data, times, sharp, fm,
                                                corr, headline, head_of, summary, aud, mixed, table, target, plots,
                                                parquet_note, granulated, granulated_note))
        files.append("report.md")
    res = {"table": table, "correlations": corr, "headline": headline, "granulated_kendall": granulated,
           "granulated_kendall_note": granulated_note, "models": models, "history": history, "sharpness": sharp,
           "function": fm, "audit": aud, "audit_mixed": mixed, "summary": summary, "out": None if out is None else out.resolve(),
           "files": files, "seconds": time.perf_counter() - t0, "times": times, "audit_transform": audit_transform}
    if verbose:
        _print(res, target)
    return res


_CODE = study.__wrapped__.__code__  # (study's own, not its ambient_reset wrapper's)
STUDY_ARGS = _CODE.co_varnames[:_CODE.co_kwonlyargcount]
