"""``invariance_audit``: every requested measure before and after a function-preserving
reparameterization, as a table of ratios (and a plot)."""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from . import reparam
from .ambient import resetting_ambient
from ._figures import figure_class, file_figure
from .data import is_one_pass, read_one_pass
from .replicas import validate_models
from .paths import prepare_file, sibling_path
from .sharpness import batched_sharpness, result_settings, reuse_refusal

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


def _probe_inputs(models, data, n: int = 1024) -> torch.Tensor:
    """The first ``n`` inputs of ``data`` (``[<= n, ...]``, on the models' device and in their dtype), after
    a pass over ``data`` (not kept) that raises batched_sharpness's errors for bad data (a Dataset of
    single samples, an empty loader, ...). A :class:`fastcurv.data.Batches` (already read and
    checked) is iterated as it is."""
    from .data import Batches

    ref = next(models[0].parameters())
    xs, count = [], 0
    batches = data if isinstance(data, Batches) else Batches(data, device=ref.device, dtype=ref.dtype, cache=False)
    for _, x, _ in batches:
        xs.append(x.to(ref.device, ref.dtype) if x.is_floating_point() else x.to(ref.device))
        count += x.shape[0]
        if count >= n:
            break
    return torch.cat(xs)[:n]


def _fingerprint(models) -> list[dict]:
    """Per model, ``{"parameter 'name'" / "buffer 'name'": [3] float64}``: the sum, the sum of squares
    and a position-weighted sum of each tensor's entries (a change in place almost surely moves one)."""
    prints = []
    with torch.no_grad():
        for m in models:
            found = {}
            for kind, named in (("parameter", m.named_parameters()), ("buffer", m.named_buffers())):
                for name, t in named:
                    v = t.detach().reshape(-1).double()
                    pos = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device)
                    found[f"{kind} {name!r}"] = torch.stack([v.sum(), v.pow(2).sum(), (v * pos).sum()]).cpu()
            prints.append(found)
    return prints


def _check_untouched(models, prints) -> None:
    """A ValueError when ``models`` no longer match their fingerprints ``prints`` (taken before the
    transform): the audit would measure the transformed models as the "before"."""
    for r, (was, now) in enumerate(zip(prints, _fingerprint(models))):
        changed = [k for k in {**was, **now} if k not in was or k not in now
                   or not torch.allclose(was[k], now[k], rtol=0, atol=0, equal_nan=True)]
        if changed:
            raise ValueError(f"the transform changed the models it was given in place (replica {r}: "
                             f"{', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}), so they no longer are "
                             "the models to audit (and stay changed): make it transform copies, e.g. "
                             "[copy.deepcopy(m) for m in models], and reload your models")


def _unchanged(models, new) -> bool:
    """Whether every transformed replica has exactly the original's parameters and buffers."""
    for a, b in zip(models, new):
        sa, sb = a.state_dict(), b.state_dict()
        if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k].to(sa[k].device))
                                         for k in sa):
            return False
    return True


def _apply(models, transform, probe, alpha, seed, bn_mode):
    if callable(transform) and not isinstance(transform, str):
        prints = _fingerprint(models)
        out = transform(models)
        _check_untouched(models, prints)
        new, details = (out.models, out.details) if isinstance(out, reparam.ReparamResult) else (list(out), {})
        return reparam._report(models, new, probe, details, bn_mode=bn_mode)
    if transform == "dinh":
        return reparam.rescale_layers(models, alpha=alpha, probe=probe, bn_mode=bn_mode)
    if transform == "neurons":
        first = dict(models[0].named_modules())[reparam._pair(models[0], None)[0]]
        g = torch.Generator().manual_seed(seed)
        s = torch.exp(torch.randn(first.weight.shape[0], generator=g, dtype=torch.float64) * abs(torch.log(torch.tensor(alpha))))
        return reparam.rescale_neurons(models, s, probe=probe, bn_mode=bn_mode)
    if transform == "balance":
        return reparam.balance(models, probe=probe, bn_mode=bn_mode)
    if transform == "fold_batchnorm":
        return reparam.fold_batchnorm(models, probe=probe, bn_mode=bn_mode)
    raise ValueError(f"transform must be one of {TRANSFORMS} or a callable(models) -> models, got {transform!r}")


def _hint(models, transform, tr, bn_mode) -> str:
    """:func:`fastcurv.reparam.preservation_hint` for the transform the audit ran."""
    if transform == "fold_batchnorm":
        return reparam.preservation_hint(models[0], fold=True, bn_mode=bn_mode)
    layers = tr.details.get("layers")
    pairs = [tuple(layers)] if layers else reparam._pairs(models[0], None) if transform == "balance" else None
    return reparam.preservation_hint(models[0], pairs, bn_mode=bn_mode)


def _loss_moved(before: torch.Tensor, after: torch.Tensor, dtype: torch.dtype) -> list[int]:
    """Replicas whose full-data loss moved by more than the output tolerance (relative), of those
    whose loss was finite before (a finite loss that became inf or NaN moved)."""
    rtol = reparam._output_rtol(dtype)
    return [r for r, (b, a) in enumerate(zip(before.tolist(), after.tolist()))
            if math.isfinite(b) and not (math.isfinite(a) and abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-12)]


def _in_order(data) -> bool:
    """Whether ``data`` is a DataLoader that batches its dataset in order (the default BatchSampler over
    a SequentialSampler: ``shuffle=False``, no custom sampler or batch_sampler), so that every pass
    gives the same samples in the same batches (unless its dataset itself is random)."""
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    return (isinstance(data, DataLoader) and type(data.batch_sampler) is BatchSampler
            and type(data.batch_sampler.sampler) is SequentialSampler)


def _probe_summary(tr) -> str:
    """The probe's findings of a transform ``tr`` that changed nothing there, in words."""
    n = len(tr.predictions_changed) if tr.predictions_changed is not None else 0
    return (f"largest output change {tr.max_output_change:.2g}, no prediction changed on {n} replica"
            f"{'s' if n != 1 else ''}")


def _frozen(models, data, loss_kw):
    """``(data, frozen)``: ``data`` read once into a list of its batches (on the models' device), for the
    loss row, and whether it was: a loader read twice can give other batches each pass
    (``shuffle=True`` with ``drop_last=True``, a random sampler or batch_sampler), and the before /
    after losses must see the same ones. Lists, tuples, one batch and a caching
    :class:`fastcurv.data.Batches` are returned as they are (frozen; a Batches that does not cache,
    as it is, not frozen); so is a DataLoader that
    batches its dataset in order (:func:`_in_order`: not held in memory for this). A loader with
    ``cache_data=False``, or whose batches do not fit ``memory_budget``, is also returned as it is,
    not frozen (read twice then). A loader not frozen under ``memory_budget`` is streamed
    (``loss_kw["cache_data"]`` set to False): the operator's "auto" cache is not fitted to the budget."""
    from .data import Batches, is_single_batch

    if isinstance(data, Batches):  # (one that does not cache reads its loader again on every pass)
        return data, data.cached
    if isinstance(data, (list, tuple)) or is_single_batch(data):
        return data, True
    budget = loss_kw.get("memory_budget")
    if _in_order(data):
        if budget is not None:
            loss_kw["cache_data"] = False
        return data, True
    if loss_kw.get("cache_data", "auto") is False:
        return data, False
    try:
        frozen, _ = read_one_pass(models, (item for item in data), "auto", budget)
    except ValueError as e:
        if not str(e).startswith("memory_budget="):  # (not the budget: bad data, said as batched_sharpness says it)
            raise
        loss_kw["cache_data"] = False  # (too large to keep within the budget: read twice, as the measures read it)
        return data, False
    loss_kw["cache_data"] = True
    return frozen, True


# HessianOperator keywords that set the loss the measures see (the audit's loss row uses them all)
_LOSS_KEYWORDS = ("loss", "reduction", "loss_reduction", "bn_mode", "cache_data", "distributed_data", "process_group",
                  "memory_budget")


@resetting_ambient
def invariance_audit(models, data, *, measures=("lambda_max", "trace"), transform="dinh", alpha: float = 10.0,
                     rtol: float = 0.05, path: str | None = None, seed: int = 0, progress=False, before=None,
                     **kwargs) -> AuditResult:
    """Compute ``measures`` (any :func:`fastcurv.batched_sharpness` measure) for ``models`` and for
    their reparameterization, and tabulate the ratios. ``models`` and ``data`` are checked as
    batched_sharpness checks them, before any measure is computed (the same errors).

    Args:
        transform: "dinh" (alpha-rescale the last two weight layers; default alpha = 10: lambda_max
            grows by at most alpha^2 = 100, measured 20x (15-27) on MNIST MLPs, with zero prediction
            changes; growing the first layers' blocks instead gave 59-134x, which brackets Bennett's
            "about x100": see :func:`fastcurv.reparam.rescale_layers` and the README), "neurons" (random
            per-neuron scales exp(N(0, log(alpha)^2)) on the last hidden layer), "balance",
            "fold_batchnorm" (a ValueError when there is no BatchNorm to fold, or with
            ``bn_mode="batch"``, which no fold preserves), or a callable ``models -> models`` (or
            ReparamResult) that returns new models: one that changes the given models in place raises
            a ValueError (their parameters and buffers are compared before and after it).
        rtol: a measure counts as invariant when every finite ratio is within rtol of 1.
        path: write a bar plot of log10(ratio) per measure (matplotlib PNG) there (checked before
            any work: missing folders are created, a folder at the path raises a ValueError); a
            measure whose ratios reach 0 or below (it changed sign) or have no finite value gets a
            hatched bar or a whisker down to the axis bottom labelled "sign change" / "undefined".
            The process's matplotlib backend is left alone.
        before: the :func:`fastcurv.batched_sharpness` result of ``models`` on ``data`` with the
            same settings (``measures`` among its columns), reused instead of computed again. Its
            solver runs must be those the audit's ``measures`` make
            (:attr:`fastcurv.SharpnessResult.estimator`): the measure set chooses them (``top_k``
            sets the top-eigenvalue Lanczos run's k, and lambda_max or top_k beside the trace switch
            ``trace_method="auto"`` from Hutch++ to the deflated estimator), and ratios of two
            estimators would show their difference; a ValueError says which differ otherwise.
        Other keywords (measure_options, loss, backend, max_iter, ...) go to batched_sharpness.
        With ``output=`` (resumable results), the models' results are saved there (unless
        ``before`` is given: nothing is computed for them then) and the reparameterized models' in
        a file of their own, ``.reparam`` before the extension (``audit.jsonl`` ->
        ``audit.reparam.jsonl``).
    ``bn_mode=None`` reads as "eval", as in batched_sharpness. The caller's grad mode, inference
    mode and autocast change nothing (:mod:`fastcurv.ambient`).
    The table also has rows ``loss`` (full-data loss under the audit's loss settings, must not move)
    and reports the transform's largest output change and changed predictions on up to 1024 inputs
    of ``data`` (the probe), run with the audit's ``bn_mode``. For the loss row a loader is read
    once into memory, so the losses before and after are over the same batches, except a DataLoader
    that batches its dataset in order (``shuffle=False``, no custom sampler: read twice) and a
    loader whose batches do not fit ``memory_budget`` or with ``cache_data=False`` (read twice; a
    loader giving other batches each pass cannot be compared sample for sample, so its loss row is
    not checked). A RuntimeWarning says the transform is not function-preserving when on the probe
    a prediction flips or an output moves by more than ``reparam.OUTPUT_RTOL`` (1e-3) of its
    replica's largest output (the primary check). When only a replica's loss moves by more than
    that (relative), a milder RuntimeWarning says so: a dataset with random augmentation (other
    data each pass, which cannot be detected) moves it as well. Another warns when the transform
    left every parameter unchanged.
    """
    import pandas as pd

    models = validate_models(models)
    if path is not None:
        if figure_class() is None:  # (checked before the work, not after it)
            raise ImportError("invariance_audit(path=...) plots with matplotlib, which is not installed: "
                              "pip install 'fastcurv[plot]', or pass path=None")
        path = str(prepare_file(path, "path"))  # (~ expanded: matplotlib does not)
    output = kwargs.pop("output", None)
    outputs = (None, None) if output is None else (output, sibling_path(output, "reparam"))
    for p in filter(None, outputs):
        prepare_file(p)
    if is_one_pass(data):  # (read several times below: once, into a list of its batches)
        data, _ = read_one_pass(models, data, kwargs.get("cache_data", "auto"), kwargs.get("memory_budget"))
    probe = _probe_inputs(models, data)
    bn_mode = reparam._check_bn_mode(kwargs.get("bn_mode"))
    if transform == "fold_batchnorm" and not reparam._fold_plan(models[0]):
        raise ValueError("transform='fold_batchnorm': the models have no BatchNorm to fold, so the audit would compare "
                         "them with themselves (every measure invariant)")
    with warnings.catch_warnings():  # (said below, for the audit, with the loss; the transform's other warnings pass)
        warnings.filterwarnings("ignore", message=re.escape(reparam.NOT_PRESERVING))
        tr = _apply(models, transform, probe, alpha, seed, bn_mode)
    if _unchanged(models, tr.models):
        warnings.warn("the transform left every parameter and buffer of the models unchanged: the audit compares them "
                      "with themselves, so every measure comes out invariant", RuntimeWarning, stacklevel=3)
    from .operator import HessianOperator

    loss_kw = {k: v for k, v in kwargs.items() if k in _LOSS_KEYWORDS}
    loss_data, frozen = _frozen(models, data, loss_kw)
    lb = HessianOperator(models, loss_data, backend="autograd", **loss_kw).loss_and_gradient()[0]
    la = HessianOperator(tr.models, loss_data, backend="autograd", **loss_kw).loss_and_gradient()[0]
    # (a loader read twice may give other batches: its losses cannot be compared sample for sample)
    moved = _loss_moved(lb, la, next(models[0].parameters()).dtype) if frozen else []
    if moved:
        ratios = ", ".join(f"{float(la[r] / lb[r]):.4g}" for r in moved[:3])
        moved_text = (f"the full-data loss moved on replicas {moved} (after / before {ratios}"
                      f"{', ...' if len(moved) > 3 else ''})")
    if tr.function_changed:
        found = [reparam.change_summary(tr)] + ([moved_text] if moved else [])
        warnings.warn(f"{reparam.NOT_PRESERVING} for these models: {'; '.join(found)}, so the audit compares the "
                      f"curvature of different functions; {_hint(models, transform, tr, bn_mode)}", RuntimeWarning,
                      stacklevel=3)
    elif moved:  # (the probe, the primary check, saw no change: the loss row alone is weaker evidence)
        warnings.warn(f"{moved_text}, although the transform changed no output on the probe ({_probe_summary(tr)}): "
                      "a loader that yields other data each pass (random augmentation in its dataset) moves the loss "
                      "by itself, and the two losses then say nothing; otherwise the transform may change the "
                      f"function away from the probe's inputs ({_hint(models, transform, tr, bn_mode)})",
                      RuntimeWarning, stacklevel=3)
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
        _check_reusable(before, measures)
    after = batched_sharpness(tr.models, data, output=outputs[1], **kw)
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


def _check_reusable(before, measures) -> None:
    """A ValueError when ``before`` lacks a column of the built-in ``measures`` or came from other
    solver runs than the audit's ``measures`` make (:func:`fastcurv.sharpness.reuse_refusal`): the
    ratios would then hold the two estimators' difference (a no-op transform read as "not invariant",
    trace ratios 0.77-1.5), not the transform's effect."""
    measures = (measures,) if isinstance(measures, str) else tuple(measures)
    columns = {"lambda_max": "lambda_max", "lambda_min": "lambda_min", "trace": "trace", "top_k": "lambda_1"}
    missing = [columns[m] for m in measures if m in columns and columns[m] not in before.values]
    if missing:  # (said as for the registered measures' columns, found missing after the audit's run)
        raise ValueError(f"before has no column {missing[0]!r}: compute it with the audit's measures {measures}")
    why = reuse_refusal(before, measures)
    if why:
        raise ValueError(f"before cannot be reused: {why}; compute it with the audit's measures {measures} "
                         "(batched_sharpness(models, data, measures=...)), or leave before out")


def _ratio_status(median: float, low: float) -> str:
    """How a measure's after/before ratios show on a log axis: "ok" (all finite ratios > 0),
    "sign change" (the median > 0 but some ratio <= 0: the measure changed sign on some replicas),
    "negative" (the median ratio <= 0) or "undefined" (no finite ratio, e.g. before = 0)."""
    if not np.isfinite(median):
        return "undefined"
    if median <= 0:
        return "negative"
    return "sign change" if low <= 0 else "ok"


def _plot(table, tr, transform, path):
    """Bar plot of log10(median after/before) per measure with min-max whiskers, written to ``path``.

    A ratio <= 0 or undefined has no log: such measures (the least invariant) get a hatched bar down
    to the axis bottom labelled "sign change" or "undefined", and a lower whisker <= 0 runs to the
    axis bottom with an arrow. Built as a ``matplotlib.figure.Figure`` (no pyplot state, the
    process's backend untouched)."""
    import textwrap

    med, low, high = (table[c].to_numpy(dtype=float) for c in ("ratio_median", "ratio_min", "ratio_max"))
    status = [_ratio_status(m, lo) for m, lo in zip(med, low)]
    with np.errstate(divide="ignore", invalid="ignore"):  # (ratios <= 0 and NaN: handled below)
        logs = [np.log10(np.where(v > 0, v, np.nan)) for v in (med, low, high)]
    vals, lo, hi = logs
    finite = np.concatenate([v[np.isfinite(v)] for v in logs] + [np.zeros(1)])
    span = max(finite.max() - finite.min(), 1.0)
    # room below the lowest finite log for the marks of ratios <= 0 or undefined (whose logs are -inf or NaN)
    bottom = finite.min() - (0.1 if all(st == "ok" for st in status) else 1.5) * span
    top = finite.max() + 0.15 * span
    fig, ax = file_figure(figsize=(max(5, 0.8 * len(table) + 2), 4))  # (matplotlib checked before the work)
    x = np.arange(len(table))
    for i, (inv, st) in enumerate(zip(table["invariant"], status)):
        color = "tab:green" if inv else "tab:red"
        if st == "ok" or st == "sign change":
            ax.bar(i, vals[i], color=color)
            down = vals[i] - (lo[i] if st == "ok" else bottom)
            ax.errorbar(i, vals[i], yerr=[[down], [hi[i] - vals[i] if np.isfinite(hi[i]) else 0.0]], fmt="none",
                        ecolor="black", capsize=3)
        else:  # no log: a hatched bar over the whole lower axis, and the reason written on it
            ax.bar(i, bottom, color="none", edgecolor="tab:red" if st == "negative" else "grey", hatch="//")
        if st != "ok":
            ax.plot([i], [bottom], marker="v", color="black", clip_on=False)
            what = ("undefined\n(no finite ratio)" if st == "undefined"
                    else f"{'sign change' if low[i] < 0 else 'ratio 0'}\n(ratios {low[i]:.3g} to {high[i]:.3g})")
            ax.text(i, bottom + 0.06 * (top - bottom), what, ha="center", va="bottom", fontsize=7, rotation=90,
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
    ax.set_ylim(bottom, top)
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
    return str(path)
