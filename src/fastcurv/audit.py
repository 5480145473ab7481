"""``invariance_audit``: every requested measure before and after a function-preserving
reparameterization, as a table of ratios (and a plot)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import reparam
from .memory import is_one_pass, read_one_pass
from .replicas import validate_models
from .resume import prepare_file, sibling_path
from .sharpness import batched_sharpness, result_settings

TRANSFORMS = ("dinh", "neurons", "balance", "fold_batchnorm")


@dataclass
class AuditResult:
    """table: pandas DataFrame, one row per measure column, with the median/min/max over replicas of
    ``after / before``, the mean before and after, and ``invariant`` (all ratios within ``rtol`` of 1).
    per_replica: ``{column: (before [R], after [R])}``. transform: the :class:`fastcurv.reparam.ReparamResult`.
    plot_path: where the figure was written (None when no path was given)."""

    table: object
    per_replica: dict
    transform: reparam.ReparamResult
    plot_path: str | None = None

    def __repr__(self):
        R = len(next(iter(self.per_replica.values()))[0]) if self.per_replica else 0
        return f"AuditResult(R={R}, plot_path={self.plot_path!r})\n{self.table.to_string()}"


def _probe_inputs(data, n: int = 1024):
    from .data import _split, is_single_batch

    if is_single_batch(data):
        return data[0][:n]
    xs, count = [], 0
    for i, item in enumerate(data):
        x, _ = _split(item, i)
        xs.append(x)
        count += x.shape[0]
        if count >= n:
            break
    return torch.cat(xs)[:n]


def _apply(models, transform, probe, alpha, seed):
    if callable(transform) and not isinstance(transform, str):
        out = transform(models)
        if isinstance(out, reparam.ReparamResult):
            return reparam._report(models, out.models, probe, out.details)
        return reparam._report(models, list(out), probe)
    if transform == "dinh":
        return reparam.rescale_layers(models, alpha=alpha, probe=probe)
    if transform == "neurons":
        first = dict(models[0].named_modules())[reparam._pair(models[0], None)[0]]
        g = torch.Generator().manual_seed(seed)
        s = torch.exp(torch.randn(first.weight.shape[0], generator=g, dtype=torch.float64) * abs(torch.log(torch.tensor(alpha))))
        return reparam.rescale_neurons(models, s, probe=probe)
    if transform == "balance":
        return reparam.balance(models, probe=probe)
    if transform == "fold_batchnorm":
        return reparam.fold_batchnorm(models, probe=probe)
    raise ValueError(f"transform must be one of {TRANSFORMS} or a callable(models) -> models, got {transform!r}")


def invariance_audit(models, data, *, measures=("lambda_max", "trace"), transform="dinh", alpha: float = 10.0,
                     rtol: float = 0.05, path: str | None = None, seed: int = 0, progress=False, before=None,
                     **kwargs) -> AuditResult:
    """Compute ``measures`` (any :func:`fastcurv.batched_sharpness` measure) for ``models`` and for
    their reparameterization, and tabulate the ratios.

    Args:
        transform: "dinh" (alpha-rescale the last two weight layers; default alpha = 10: lambda_max
            grows by at most alpha^2 = 100, measured 20x (15-27) on MNIST MLPs, with zero prediction
            changes; growing the first layers' blocks instead gave 59-134x, which brackets Bennett's
            "about x100": see :func:`fastcurv.reparam.rescale_layers` and the README), "neurons" (random
            per-neuron scales exp(N(0, log(alpha)^2)) on the last hidden layer), "balance",
            "fold_batchnorm", or a callable ``models -> models`` (or ReparamResult).
        rtol: a measure counts as invariant when every finite ratio is within rtol of 1.
        path: write a bar plot of log10(ratio) per measure (matplotlib PNG) there (checked before
            any work: missing folders are created, a folder at the path raises a ValueError).
        before: the :func:`fastcurv.batched_sharpness` result of ``models`` on ``data`` with the
            same settings (``measures`` among its columns), reused instead of computed again.
        Other keywords (measure_options, loss, backend, max_iter, ...) go to batched_sharpness.
        With ``output=`` (resumable results), the models' results are saved there (unless
        ``before`` is given: nothing is computed for them then) and the reparameterized models' in
        a file of their own, ``.reparam`` before the extension (``audit.jsonl`` ->
        ``audit.reparam.jsonl``).
    The table also has rows ``loss`` (full-data loss, must not move) and reports the transform's
    largest output change and changed predictions on up to 1024 inputs of ``data``.
    """
    import pandas as pd

    models = validate_models(models)
    if path is not None:
        path = str(prepare_file(path, "path"))  # (~ expanded: matplotlib does not)
    output = kwargs.pop("output", None)
    outputs = (None, None) if output is None else (output, sibling_path(output, "reparam"))
    for p in filter(None, outputs):
        prepare_file(p)
    if is_one_pass(data):  # (read four times below: once, into a list of its batches)
        data, _ = read_one_pass(models, data, kwargs.get("cache_data", "auto"), kwargs.get("memory_budget"))
    probe = _probe_inputs(data)
    with warnings.catch_warnings():  # (said below, for the audit)
        warnings.simplefilter("ignore")
        tr = _apply(models, transform, probe, alpha, seed)
    changed = int(tr.predictions_changed.sum()) if tr.predictions_changed is not None else 0
    if changed or tr.max_output_change > 1e-2:
        warnings.warn(f"the transform is not function-preserving for these models: it changed {changed} predictions on "
                      f"the probe inputs (largest output change {tr.max_output_change:.3g}), so the audit compares the "
                      f"curvature of different functions; {reparam.preservation_hint(models[0])}", RuntimeWarning,
                      stacklevel=2)
    kw = dict(measures=measures, seed=seed, progress=progress, **kwargs)
    if before is None:
        before = batched_sharpness(models, data, output=outputs[0], **kw)
    elif (n_before := len(next(iter(before.values.values())))) != len(models):
        raise ValueError(f"before holds results for {n_before} replicas, the audit has {len(models)}")
    else:
        want = result_settings(kw)
        differ = sorted(k for k in set(before.settings) | set(want) if before.settings.get(k) != want.get(k))
        if differ:
            raise ValueError("before was computed with other settings than the audit's: "
                             + ", ".join(f"{k}={before.settings.get(k)!r} (audit: {want.get(k)!r})" for k in differ))
    after = batched_sharpness(tr.models, data, output=outputs[1], **kw)
    from .operator import HessianOperator

    loss_kw = {k: v for k, v in kwargs.items() if k in ("loss", "reduction", "bn_mode")}
    lb = HessianOperator(models, data, backend="autograd", **loss_kw).loss_and_gradient()[0]
    la = HessianOperator(tr.models, data, backend="autograd", **loss_kw).loss_and_gradient()[0]
    per = {"loss": (lb.double().cpu(), la.double().cpu())}
    for col, v in after.values.items():
        if col not in before.values:
            raise ValueError(f"before has no column {col!r}: compute it with the audit's measures {tuple(measures)}")
        per[col] = (before.values[col].double().cpu(), v.double().cpu())
    rows = []
    for col, (b, a) in per.items():
        ratio = a / b
        fin = ratio[torch.isfinite(ratio)]
        rows.append({
            "measure": col,
            "before_mean": float(b.nanmean()),
            "after_mean": float(a.nanmean()),
            "ratio_median": float(fin.quantile(0.5)) if len(fin) else float("nan"),  # (torch.median: lower middle one)
            "ratio_min": float(fin.min()) if len(fin) else float("nan"),
            "ratio_max": float(fin.max()) if len(fin) else float("nan"),
            "invariant": bool(len(fin) and ((fin - 1).abs() <= rtol).all()),
        })
    table = pd.DataFrame(rows).set_index("measure")
    table.attrs["max_output_change"] = tr.max_output_change
    table.attrs["predictions_changed"] = int(tr.predictions_changed.sum()) if tr.predictions_changed is not None else None
    res = AuditResult(table, per, tr)
    if path is not None:
        res.plot_path = _plot(table, tr, transform, path)
    return res


def _plot(table, tr, transform, path):
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt
    import numpy as np

    vals = np.log10(table["ratio_median"].to_numpy(dtype=float))
    lo = np.log10(table["ratio_min"].to_numpy(dtype=float))
    hi = np.log10(table["ratio_max"].to_numpy(dtype=float))
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(table) + 2), 4))
    colors = ["tab:green" if inv else "tab:red" for inv in table["invariant"]]
    x = np.arange(len(table))
    ax.bar(x, vals, color=colors)
    ax.errorbar(x, vals, yerr=[vals - lo, hi - vals], fmt="none", ecolor="black", capsize=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(table.index, rotation=45, ha="right")
    ax.set_ylabel("log10(after / before)")
    name = transform if isinstance(transform, str) else getattr(transform, "__name__", "custom")
    changed = int(tr.predictions_changed.sum()) if tr.predictions_changed is not None else 0
    # two lines (on one it ran past the right edge for 3 measures or fewer), a long name wrapped
    ax.set_title(textwrap.fill(f"invariance audit: {name}", 50) + f"\nmax |output change| {tr.max_output_change:.1e}, "
                 f"{changed} predictions changed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
