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
