"""The README demo and the report helpers shared with :mod:`fastcurv.study`.

:func:`demo` is :func:`fastcurv.study.study` with the embedded default (8 MLPs 64-32-10 on
scikit-learn's 8x8 digits, curvature and function-space measures, invariance audit).
:func:`run_study` is the curvature-only study kept for compatibility.
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import numpy as np
import torch

TARGETS = ("test_acc", "test_loss", "gap")

DEMO_CONFIG = dict(data="digits", hidden=(32,), activation="relu", replicas=8, seed=0, optimizer="sgd", lr=0.05,
                   momentum=0.9, weight_decay=0.0, sam_rho=0.0, batch_size=32, epochs=15, target_loss=None,
                   measures=("lambda_max", "trace", "spectrum", "weakness", "perturbation_weakness", "simplicity",
                             "disagreement", "gde"),
                   target="test_acc", n_boot=2000, threads=1, audit=True, audit_replicas=None)


def _versions() -> dict:
    import pandas
    import scipy

    from . import __version__

    return {"fastcurv": __version__, "torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "pandas": pandas.__version__, "python": sys.version.split()[0], "platform": platform.platform()}


def _plot(df, measures, target, out: Path, correlated=None) -> list[str]:
    """``<measure>_vs_<target>.png`` in ``out`` for each of ``measures`` (columns of ``df``); returns
    the file names ([] without matplotlib).

    correlated: the measure columns a :func:`fastcurv.stats.correlations` with ``rows="common"`` ran
    on; the replicas it left out (some deciding measure not finite) are drawn hollow and grey, and
    the title says how many were correlated. None: every replica where the measure and the target
    are finite counts. Figures are ``matplotlib.figure.Figure`` objects (no pyplot state, the
    process's backend untouched)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return []
    import warnings

    from .stats import _common_rows

    finite = np.isfinite(df[target].to_numpy(float))
    if correlated is None:
        used = np.ones(len(df), dtype=bool)
    else:
        with warnings.catch_warnings():  # (correlations warned about the dropped replicas already)
            warnings.simplefilter("ignore")
            used = _common_rows(df, target, list(correlated))
    files = []
    for m in measures:
        fig = Figure(figsize=(4.2, 3.4), dpi=110)
        ax = fig.subplots()
        ok = np.isfinite(df[m].to_numpy(float)) & finite
        kept, left = ok & used, ok & ~used
        ax.scatter(df.loc[kept, m], df.loc[kept, target], s=22)
        if left.any():
            ax.scatter(df.loc[left, m], df.loc[left, target], s=22, facecolors="none", edgecolors="grey",
                       label="not correlated (another measure not finite)")
            ax.legend(fontsize=6)
        for r in df.index[ok]:
            ax.annotate(str(df.loc[r, "seed"]), (df.loc[r, m], df.loc[r, target]), fontsize=6, alpha=0.6)
        ax.set_xlabel(m)
        ax.set_ylabel(target)
        count = f"R={int(kept.sum())}" + (f" correlated; {int(left.sum())} left out: hollow" if left.any() else "")
        ax.set_title(f"{m} vs {target} ({count})", fontsize=9)
        fig.tight_layout()
        name = f"{m}_vs_{target}.png"
        fig.savefig(out / name)
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


def run_study(**settings) -> dict:
    """Curvature-only study (kept for compatibility): :func:`fastcurv.study.study` with the defaults
    ``measures=("lambda_max", "trace")`` and ``audit=False``; every keyword of ``study`` is accepted."""
    from .study import study

    settings.setdefault("measures", ("lambda_max", "trace"))
    settings.setdefault("audit", False)
    return study(**settings)


def demo(*, replicas: int = 8, seed: int = 0, out="fastcurv-demo", progress: bool | None = None, **overrides) -> dict:
    """The README demo: ``replicas`` MLPs 64-32-10 on the embedded 8x8 digits; curvature (lambda_max,
    trace, spectrum) and function-space measures (weakness, perturbation weakness, simplicity,
    disagreement), correlations with test accuracy, invariance audit; see :func:`fastcurv.study.study`."""
    from .study import study

    cfg = {**DEMO_CONFIG, **overrides, "replicas": replicas, "seed": seed}
    return study(out=out, progress=progress, **cfg)
