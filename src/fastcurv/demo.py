"""A minimal population study (train, measure, correlate, report) and the README demo.

:func:`run_study` trains R replicas in one batched job (:func:`fastcurv.train.train_population`),
computes curvature measures for all of them at once (:func:`fastcurv.batched_sharpness`), adds the
generalization numbers, correlates every measure with the chosen target
(:func:`fastcurv.stats.correlations`) and writes a report folder:

* ``results.csv``: one row per replica (seed, train/test loss and accuracy, gap, measures, flags);
* ``correlations.csv``: Spearman rho, p, bootstrap CI, Kendall tau per measure;
* ``report.md``: both tables and the settings;
* ``<measure>_vs_<target>.png``: scatter plots (needs matplotlib; skipped with a note otherwise);
* ``config.json``: the settings and library versions, to rerun the study.

:func:`demo` is ``run_study`` with the embedded default: 8 MLPs 64-32-10 on scikit-learn's 8x8 digits.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

TARGETS = ("test_acc", "test_loss", "gap")

DEMO_CONFIG = dict(data="digits", hidden=(32,), activation="relu", replicas=8, seed=0, optimizer="sgd", lr=0.05,
                   momentum=0.9, weight_decay=0.0, sam_rho=0.0, batch_size=32, epochs=15, target_loss=None,
                   measures=("lambda_max", "trace"), target="test_acc", n_boot=2000, threads=1)


def _versions() -> dict:
    import pandas
    import scipy

    from . import __version__

    return {"fastcurv": __version__, "torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "pandas": pandas.__version__, "python": sys.version.split()[0], "platform": platform.platform()}


def _plot(df, measures, target, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    for m in measures:
        fig, ax = plt.subplots(figsize=(4.2, 3.4), dpi=110)
        ok = np.isfinite(df[m].to_numpy(float)) & np.isfinite(df[target].to_numpy(float))
        ax.scatter(df.loc[ok, m], df.loc[ok, target], s=22)
        for r in df.index[ok]:
            ax.annotate(str(df.loc[r, "seed"]), (df.loc[r, m], df.loc[r, target]), fontsize=6, alpha=0.6)
        ax.set_xlabel(m)
        ax.set_ylabel(target)
        ax.set_title(f"{m} vs {target} (R={int(ok.sum())})", fontsize=9)
        fig.tight_layout()
        name = f"{m}_vs_{target}.png"
        fig.savefig(out / name)
        plt.close(fig)
        files.append(name)
    return files


def _markdown_table(df, floatfmt="{:.4g}") -> str:
    cols = [df.index.name or ""] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in df.iterrows():
        cells = [str(idx)]
        for v in row:
            if isinstance(v, (float, np.floating)):
                cells.append(floatfmt.format(v))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_study(
    *,
    data: str = "digits",
    data_root=None,
    n_train: int | None = None,
    n_test: int | None = None,
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
    measures=("lambda_max", "trace"),
    target: str = "test_acc",
    n_boot: int = 2000,
    sharpness_batch_size: int = 1024,
    sharpness_kwargs: dict | None = None,
    out: str | Path | None = "fastcurv-report",
    checkpoint: str | Path | None = None,
    progress: bool | None = None,
    verbose: bool = True,
    threads: int | None = None,
) -> dict:
    """Train ``replicas`` MLPs (seeds ``seed .. seed+R-1``), measure, correlate, write a report.

    Args:
        data: "digits" (embedded), "mnist" or "fashion-mnist" (see :mod:`fastcurv.datasets`);
            n_train / n_test: random subsets (MNIST-like data only).
        hidden, activation: the MLP's hidden widths (input and output widths come from the data).
        optimizer ... target_loss: training settings, as in :func:`fastcurv.train.train_population`.
        measures: any of ``fastcurv.sharpness.MEASURES`` with a per-replica value ("lambda_max",
            "lambda_min", "top_k", "trace"). target: "test_acc", "test_loss" or "gap" (train acc - test acc).
        sharpness_batch_size: batch size of the training-set loader the Hessian is averaged over.
        out: report folder (created), or None to write nothing.
        threads: torch intra-op threads for this study (restored afterwards); None leaves the
            setting alone. For tiny models 1 is fastest: their ops are too small to split, and
            waiting OpenMP threads slow everything down badly when the cores are shared.
    Returns ``{"table", "correlations", "history", "sharpness", "out", "files", "seconds"}``.
    """
    from . import batched_sharpness
    from .datasets import load_dataset, make_loader
    from .stats import correlations
    from .train import evaluate_population, mlp, train_population

    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if threads is not None:
        old_threads = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return run_study(**{**{k: v for k, v in locals().items() if k in _STUDY_ARGS}, "threads": None})
        finally:
            torch.set_num_threads(old_threads)
    measures = (measures,) if isinstance(measures, str) else tuple(measures)
    t0 = time.perf_counter()
    config = {k: v for k, v in locals().items() if k in _STUDY_ARGS}
    config["threads"] = torch.get_num_threads()
    config = json.loads(json.dumps(config, default=str))

    kw = {"flatten": True}
    if data.lower() not in ("digits", "sklearn-digits"):
        kw.update(n_train=n_train, n_test=n_test, seed=seed)
    elif n_train is not None or n_test is not None:
        raise ValueError("n_train / n_test apply to mnist / fashion-mnist, not to the embedded digits")
    splits = load_dataset(data, data_root, **kw)
    x_tr, y_tr, x_te, y_te = splits
    n_classes = int(max(y_tr.max(), y_te.max())) + 1
    sizes = [x_tr.shape[1], *[int(h) for h in hidden], n_classes]
    seeds = list(range(seed, seed + int(replicas)))

    def builder():
        return mlp(sizes, activation)

    t_train = time.perf_counter()
    models, history = train_population(builder, x_tr, y_tr, seeds=seeds, optimizer=optimizer, lr=lr, momentum=momentum,
                                       weight_decay=weight_decay, sam_rho=sam_rho, batch_size=batch_size, epochs=epochs,
                                       target_loss=target_loss, checkpoint=checkpoint, progress=progress)
    t_train = time.perf_counter() - t_train

    t_sharp = time.perf_counter()
    loader = make_loader(x_tr, y_tr, sharpness_batch_size)
    sharp = batched_sharpness(models, loader, measures=measures, seed=seed, progress=progress,
                              **(sharpness_kwargs or {}))
    t_sharp = time.perf_counter() - t_sharp

    ev_tr = evaluate_population(models, x_tr, y_tr)
    ev_te = evaluate_population(models, x_te, y_te)
    sdf = sharp.to_pandas()
    import pandas as pd

    table = pd.DataFrame({
        "seed": seeds,
        "train_loss": ev_tr["loss"].numpy(),
        "train_acc": ev_tr["accuracy"].numpy(),
        "test_loss": ev_te["loss"].numpy(),
        "test_acc": ev_te["accuracy"].numpy(),
    })
    table["gap"] = table["train_acc"] - table["test_acc"]
    table["epochs"] = history.epochs_run
    table["diverged"] = history.diverged
    table = table.join(sdf.reset_index(drop=True))
    table.index.name = "replica"
    measure_cols = list(sharp.values)
    corr = correlations(table, target, measure_cols, n_boot=n_boot, seed=seed)

    files = []
    if out is not None:
        outp = Path(out)
        outp.mkdir(parents=True, exist_ok=True)
        table.to_csv(outp / "results.csv")
        corr.to_csv(outp / "correlations.csv")
        files += ["results.csv", "correlations.csv"]
        try:
            table.to_parquet(outp / "results.parquet")
            files.append("results.parquet")
        except ImportError:
            pass  # no parquet engine (pyarrow / fastparquet) installed: CSV only
        plots = _plot(table, measure_cols, target, outp)
        files += plots
        meta = {"config": config, "versions": _versions(), "backend": sharp.backend,
                "backend_reason": sharp.backend_reason, "seconds": {"train": t_train, "sharpness": t_sharp}}
        (outp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        files.append("config.json")
        show = ["seed", "train_loss", "test_acc", "gap", *measure_cols, "flags"]
        md = [
            f"# fastcurv study: {len(seeds)} replicas of MLP {'-'.join(map(str, sizes))} on {data}",
            "",
            f"Training: {optimizer}, lr {lr}, momentum {momentum}, weight decay {weight_decay}, SAM rho {sam_rho}, "
            f"batch {batch_size}, epochs {epochs}" + (f", target loss {target_loss}" if target_loss else "")
            + f"; {len(x_tr)} training / {len(x_te)} test samples. Seeds {seeds[0]}..{seeds[-1]}.",
            f"Curvature: `batched_sharpness` backend `{sharp.backend}`, {sharp.num_matvecs} Hessian-vector products "
            f"for all replicas together; Hessian of the mean cross-entropy over the training set.",
            f"Time: training {t_train:.1f} s, curvature {t_sharp:.1f} s.",
            "",
            f"## Rank correlation with `{target}`",
            "",
            f"Spearman rho (two-sided p), {int(100 * 0.95)} % percentile bootstrap CI ({n_boot} resamples over "
            "networks), Kendall tau-b.",
            "",
            _markdown_table(corr),
            "",
            "## Per-replica results",
            "",
            _markdown_table(table[show]),
            "",
        ]
        if plots:
            md += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
        else:
            md += ["(matplotlib is not installed: no plots)", ""]
        (outp / "report.md").write_text("\n".join(md))
        files.append("report.md")
    res = {"table": table, "correlations": corr, "history": history, "sharpness": sharp,
           "out": None if out is None else Path(out).resolve(), "files": files, "seconds": time.perf_counter() - t0}
    if verbose:
        _print(res, measure_cols, target)
    return res


_STUDY_ARGS = run_study.__code__.co_varnames[:run_study.__code__.co_kwonlyargcount]


def _print(res, measure_cols, target):
    import pandas as pd

    table = res["table"]
    cols = ["seed", "train_loss", "test_acc", *measure_cols]
    with pd.option_context("display.width", 120, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(table[cols].to_string())
        print()
        print(f"Rank correlation with {target}:")
        print(res["correlations"].to_string())
    if res["out"] is not None:
        print(f"\nreport: {res['out']} ({', '.join(res['files'])})")
    print(f"done in {res['seconds']:.1f} s")


def demo(*, replicas: int = 8, seed: int = 0, out="fastcurv-demo", progress: bool | None = None, **overrides) -> dict:
    """The README demo: ``replicas`` MLPs 64-32-10 on the embedded 8x8 digits, sharpness table, correlations."""
    cfg = {**DEMO_CONFIG, **overrides, "replicas": replicas, "seed": seed}
    return run_study(out=out, progress=progress, **cfg)
