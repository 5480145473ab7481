"""The README demo.

:func:`demo` is :func:`fastcurv.study.study` with the embedded default (8 MLPs 64-32-10 on
scikit-learn's 8x8 digits, curvature and function-space measures, invariance audit).
:func:`run_study` is the curvature-only study kept for compatibility. The report helpers that
lived here are in :mod:`fastcurv.study_report` (re-exported).
"""
from __future__ import annotations

from .study_report import TARGETS, _markdown_table, _plot, _versions  # noqa: F401  (re-exported)

DEMO_CONFIG = dict(data="digits", hidden=(32,), activation="relu", replicas=8, seed=0, optimizer="sgd", lr=0.05,
                   momentum=0.9, weight_decay=0.0, sam_rho=0.0, batch_size=32, epochs=15, target_loss=None,
                   measures=("lambda_max", "trace", "spectrum", "weakness", "perturbation_weakness", "simplicity",
                             "disagreement", "gde"),
                   target="test_acc", n_boot=2000, threads=1, audit=True, audit_replicas=None)


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
