"""Rank correlations between per-replica measures and a generalization target.

Conventions (see the project's measures reference, section 4):

* Spearman rho with a two-sided p-value: exact for n <= 9 (every permutation of the ranks, ties kept
  as mid-ranks; twice the smaller one-sided tail, as ``scipy.stats.permutation_test``), else the t
  approximation of ``scipy.stats.spearmanr`` (n - 2 dof), never below 2/n!, the smallest exact
  permutation p of n pairs (the t approximation gave p = 0 for a perfect rank correlation of 3 replicas,
  whose exact p is 1/3);
* a percentile bootstrap confidence interval for rho, resampling networks (rows) with replacement;
* Kendall tau-b with a two-sided p-value: exact for n <= 9 (every permutation, ties kept, as for
  Spearman), else ``scipy.stats.kendalltau``'s (its normal approximation, which it takes whenever
  there is a tie, gave 0.0495 for an exact 0.1 on 6 replicas with tied accuracies);
* Benjamini-Yekutieli adjusted p-values (``scipy.stats.false_discovery_control(method="by")``, valid
  under any dependence between the columns) over the rows of a correlations table;
* Jiang et al.'s granulated Kendall coefficient Psi over a hyperparameter grid
  (:func:`granulated_kendall`).

Rows where the measure or the target is NaN/Inf (e.g. diverged replicas) are dropped pairwise and
``n`` reports how many were used.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Sequence

import numpy as np
from scipy import stats as _st

from .solvers.lanczos import whole_count

EXACT_SPEARMAN_N = 9  # largest n whose Spearman p enumerates all n! permutations (9! = 362,880)
COLUMNS = ("measure", "n", "spearman_rho", "spearman_p", "spearman_p_by", "ci_low", "ci_high", "kendall_tau",
           "kendall_p", "kendall_p_by")


def _clean(x, y):
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"measure and target have different lengths ({x.size} and {y.size})")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _degenerate(x, y) -> bool:
    return x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0


def spearman(x, y) -> tuple[float, float]:
    """Spearman rho and its two-sided p-value; NaN when fewer than 3 finite pairs or a constant input.

    The p-value is exact for n <= ``EXACT_SPEARMAN_N`` (:func:`spearman_exact_p`); for larger n it is
    the t approximation of ``scipy.stats.spearmanr``, floored at 2/n! (it underestimates far tails:
    it gave p = 0 for any perfect rank correlation)."""
    x, y = _clean(x, y)
    if _degenerate(x, y):
        return float("nan"), float("nan")
    r = _st.spearmanr(x, y)
    if x.size <= EXACT_SPEARMAN_N:
        return float(r.statistic), spearman_exact_p(x, y)
    return float(r.statistic), max(float(r.pvalue), math.exp(math.log(2) - math.lgamma(x.size + 1)))


def spearman_exact_p(x, y) -> float:
    """Exact two-sided permutation p-value of Spearman rho for small samples (n <= 9 by default in
    :func:`spearman`; n! permutations): y's ranks are paired with x's in every order, ties kept as
    mid-ranks, and p = min(1, 2 min(P[S >= s], P[S <= s])) with S = sum of rank products (rho is
    increasing in S), the two-sided p of ``scipy.stats.permutation_test(..., permutation_type="pairings")``.
    With no ties the null is symmetric and this is P[|rho| >= |rho_observed|]."""
    x, y = _clean(x, y)
    if x.size > 10:
        raise ValueError(f"exact enumeration of {x.size}! permutations is too large; use at most 10 pairs")
    rx = np.rint(2 * _st.rankdata(x)).astype(np.int64)  # mid-ranks are multiples of 1/2: integer arithmetic
    ry = np.rint(2 * _st.rankdata(y)).astype(np.int64)
    cum = _spearman_null(tuple(np.sort(rx).tolist()), tuple(np.sort(ry).tolist()))
    s = int(rx @ ry)
    total = int(cum[-1])
    le = int(cum[s])
    ge = total - (int(cum[s - 1]) if s > 0 else 0)
    return min(1.0, 2 * min(le, ge) / total)


@functools.lru_cache(maxsize=32)
def _spearman_null(rx: tuple, ry: tuple) -> np.ndarray:
    """Cumulative counts ``cum[s]`` = #{permutations with sum(rx * ry[perm]) <= s} (integer ranks
    rx, ry). Depends only on the two multisets of ranks, so tie-free columns of one length share it."""
    a = np.asarray(rx, dtype=np.float64)
    b = np.asarray(ry, dtype=np.float64)
    perms = _permutations(len(a))
    s = np.empty(len(perms), dtype=np.int64)
    step = 65_536
    for i in range(0, len(perms), step):  # float64 products of small integers: exact
        s[i:i + step] = np.rint(b[perms[i:i + step]] @ a).astype(np.int64)
    return np.cumsum(np.bincount(s, minlength=int(a @ b) + 1))


@functools.lru_cache(maxsize=4)
def _permutations(n: int) -> np.ndarray:
    """``[n!, n]`` int8: every permutation of range(n) (built by inserting k at each position)."""
    p = np.zeros((1, 0), dtype=np.int8)
    for k in range(n):
        m = len(p)
        out = np.empty((m * (k + 1), k + 1), dtype=np.int8)
        for pos in range(k + 1):
            blk = out[pos * m:(pos + 1) * m]
            blk[:, :pos] = p[:, :pos]
            blk[:, pos] = k
            blk[:, pos + 1:] = p[:, pos:]
        p = out
    p.flags.writeable = False
    return p


def kendall(x, y) -> tuple[float, float]:
    """Kendall tau-b and its two-sided p-value; NaN when degenerate as in :func:`spearman`. The
    p-value is exact for n <= ``EXACT_SPEARMAN_N`` (:func:`kendall_exact_p`), else scipy's."""
    x, y = _clean(x, y)
    if _degenerate(x, y):
        return float("nan"), float("nan")
    r = _st.kendalltau(x, y)
    return float(r.statistic), kendall_exact_p(x, y) if x.size <= EXACT_SPEARMAN_N else float(r.pvalue)


def kendall_exact_p(x, y) -> float:
    """Exact two-sided permutation p-value of Kendall tau-b for small samples (n! permutations): y
    paired with x in every order, ties kept, and p = min(1, 2 min(P[S >= s], P[S <= s])) with S the
    concordant minus the discordant pairs (tau-b is S over a denominator no pairing changes), as
    :func:`spearman_exact_p` does for Spearman."""
    x, y = _clean(x, y)
    if x.size > 10:
        raise ValueError(f"exact enumeration of {x.size}! permutations is too large; use at most 10 pairs")
    rx, ry = _st.rankdata(x), _st.rankdata(y)
    i, j = np.triu_indices(x.size, 1)
    s = int(np.sign(rx[i] - rx[j]) @ np.sign(ry[i] - ry[j]))
    null = _kendall_null(tuple(np.sort(rx).tolist()), tuple(np.sort(ry).tolist()))
    offset = len(null) // 2  # (S runs from -n(n-1)/2 to n(n-1)/2)
    le, ge = int(null[:offset + s + 1].sum()), int(null[offset + s:].sum())
    return min(1.0, 2 * min(le, ge) / int(null.sum()))


@functools.lru_cache(maxsize=256)  # (one per pattern of ties: a table's tied columns each have theirs)
def _kendall_null(rx: tuple, ry: tuple) -> np.ndarray:
    """Counts ``null[S + n(n-1)/2]`` of the permutations of ``ry`` against ``rx`` (both sorted
    ranks) with concordant minus discordant pairs S. Depends only on the two multisets of ranks."""
    a, b = np.asarray(rx), np.asarray(ry)
    n = len(a)
    perms = _permutations(n)
    i, j = np.triu_indices(n, 1)
    sx = np.sign(a[i] - a[j]).astype(np.int64)
    pairs = n * (n - 1) // 2
    counts = np.zeros(2 * pairs + 1, dtype=np.int64)
    step = 65_536
    for k in range(0, len(perms), step):
        v = b[perms[k:k + step]]
        s = np.sign(v[:, i] - v[:, j]).astype(np.int64) @ sx
        counts += np.bincount(s + pairs, minlength=2 * pairs + 1)
    return counts


def bootstrap_indices(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``[n_boot, n]`` row indices drawn with replacement (numpy PCG64 seeded with ``seed``)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _rowwise_spearman(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair (average ranks for ties), NaN where a row is constant."""
    rx = _st.rankdata(xs, axis=1)
    ry = _st.rankdata(ys, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    num = (rx * ry).sum(axis=1)
    den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def bootstrap_spearman_ci(x, y, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for Spearman rho, resampling (x, y) pairs with replacement.

    Resamples whose measure or target is constant carry no rank information and count as rho = 0
    (skipping them conditioned the interval on the resamples that hold the few distinct values: a
    column constant but for one replica got rho -0.48, p 0.11 and the interval [-0.77, -0.48]).
    Returns (low, high); NaN when degenerate.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n_boot = whole_count("n_boot", n_boot)  # (a config file's 2000.0 too)
    x, y = _clean(x, y)
    if _degenerate(x, y):
        return float("nan"), float("nan")
    idx = bootstrap_indices(x.size, n_boot, seed)
    rho = np.empty(n_boot)
    chunk = max(1, 2_000_000 // x.size)
    for i in range(0, n_boot, chunk):
        j = idx[i:i + chunk]
        rho[i:i + chunk] = _rowwise_spearman(x[j], y[j])
    rho = np.where(np.isfinite(rho), rho, 0.0)
    a = (1 - level) / 2
    lo, hi = np.quantile(rho, [a, 1 - a])
    return float(lo), float(hi)


def by_adjusted(p) -> np.ndarray:
    """Benjamini-Yekutieli adjusted p-values (``scipy.stats.false_discovery_control(method="by")``:
    false discovery rate control under any dependence between the tests) of the finite entries of
    ``p``; NaN entries (a constant column: no test) stay NaN and are not counted in the family."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = _st.false_discovery_control(p[ok], method="by")
    return out


def correlations(df, target: str, measures: Sequence[str] | None = None, *, rows: str = "common",
                 n_boot: int = 10_000, level: float = 0.95, seed: int = 0):
    """One row per measure: n, Spearman rho, p, its BY-adjusted p, bootstrap CI, Kendall tau, p, its
    BY-adjusted p (a pandas DataFrame, columns ``COLUMNS``).

    Spearman's p is the exact permutation p for n <= 9 and the t approximation above (see
    :func:`spearman`); Kendall's is scipy's (exact for small tie-free samples). ``spearman_p_by`` and
    ``kendall_p_by`` correct for testing many columns at once: Benjamini-Yekutieli adjusted p-values
    (:func:`by_adjusted`) over the rows of this table with a p-value (the family is the table:
    correlating more columns raises every adjusted p), each p-value column on its own.

    Args:
        df: one row per replica (e.g. ``SharpnessResult.to_pandas()`` joined with test accuracy).
        target: the generalization column (test accuracy, test loss, gap, ...).
        measures: columns to correlate (default: every numeric column except ``target`` and
            bookkeeping columns ending in ``_stderr``, ``_error``, ``_iters``, ``_converged``).
        rows: "common" (default): every measure on the same replicas, those where the target and
            every measure finite on at least half of them are finite, so that the measures compare
            like with like (a warning names the replicas dropped and the columns that dropped
            them); "each": each measure on the replicas where it and the target are finite.
        n_boot, level, seed: bootstrap resamples, confidence level, RNG seed.
    """
    import pandas as pd

    if target not in df.columns:
        raise KeyError(f"target column {target!r} not in the table (columns: {list(df.columns)})")
    if isinstance(measures, str):  # (one column: not its letters)
        measures = [measures]
    if measures is None:
        measures = _default_measures(df, {target})
        if not measures:
            others = [c for c in df.columns if c != target]
            raise ValueError(f"no numeric measure columns to correlate with {target!r} (columns {others} with dtypes "
                             f"{[str(df[c].dtype) for c in others]}; lists of 0-d tensors are object columns: convert "
                             "them with float(), or name the columns in measures=)")
    missing = [m for m in measures if m not in df.columns]
    if missing:
        raise KeyError(f"measure columns {missing} not in the table (columns: {list(df.columns)})")
    if rows not in ("common", "each"):
        raise ValueError(f"rows must be 'common' or 'each', got {rows!r}")
    keep = _common_rows(df, target, measures) if rows == "common" else np.ones(len(df), dtype=bool)
    out = []
    for m in measures:
        x, y = _clean(df[m].to_numpy(dtype=np.float64)[keep], df[target].to_numpy(dtype=np.float64)[keep])
        rho, p = spearman(x, y)
        lo, hi = bootstrap_spearman_ci(x, y, n_boot=n_boot, level=level, seed=seed)
        tau, tp = kendall(x, y)
        out.append({"measure": m, "n": int(x.size), "spearman_rho": rho, "spearman_p": p, "ci_low": lo,
                    "ci_high": hi, "kendall_tau": tau, "kendall_p": tp})
    tab = pd.DataFrame(out, columns=list(COLUMNS)).set_index("measure")
    tab["spearman_p_by"] = by_adjusted(tab["spearman_p"])
    tab["kendall_p_by"] = by_adjusted(tab["kendall_p"])
    return tab


def _common_rows(df, target: str, measures) -> np.ndarray:
    """``[len(df)]`` bool: the rows where the target and every measure finite on at least half of
    the replicas (and 3) are finite: a measure finite on fewer would cut every other one down to
    its few rows (it is correlated on the common rows where it is finite); warns naming the rows
    dropped and the columns that dropped them."""
    finite = {c: np.isfinite(df[c].to_numpy(dtype=np.float64)) for c in [target, *measures]}
    enough = max(3, (len(df) + 1) // 2)
    deciding = [c for c, f in finite.items() if c == target or f.sum() >= enough]
    keep = np.logical_and.reduce([finite[c] for c in deciding])
    if not keep.all():
        labels = list(df.index[~keep])
        why = [c for c in deciding if not finite[c].all()]
        warnings.warn(f"correlations on the {int(keep.sum())} replicas where every measure and the target are finite: "
                      f"replicas {labels} dropped (not finite in {why}); rows='each' correlates each measure on its "
                      "own finite replicas", RuntimeWarning, stacklevel=3)
    return keep


def _default_measures(df, exclude) -> list:
    """The measure columns of ``df`` by default: every numeric, non-bool column not in ``exclude`` and
    not bookkeeping (a measure's ``_stderr``, ``_error``, ``_iters`` or ``_converged`` column)."""
    import pandas as pd

    skip = ("_stderr", "_error", "_iters", "_converged")
    return [c for c in df.columns if c not in exclude and pd.api.types.is_numeric_dtype(df[c])
            and not pd.api.types.is_bool_dtype(df[c]) and not str(c).endswith(skip)]


def granulated_kendall(df, target: str, hyperparameters: Sequence[str], measures: Sequence[str] | None = None):
    """Jiang et al.'s (ICLR 2020) granulated Kendall coefficient of each measure with ``target``.

    For each hyperparameter ``h`` the replicas are grouped by their values of the OTHER
    hyperparameters, so that the replicas of a group differ only in ``h`` (and in their seed, which
    is not a hyperparameter); ``psi_h`` is the mean over the groups of the paper's Kendall tau
    between the measure and the target within the group, the average over the group's pairs of
    ``sign(d measure) * sign(d target)`` (tau-a: a tied pair counts 0, a constant measure or target
    gives 0), and ``Psi`` is the mean of the ``psi_h``. With one hyperparameter there is one group,
    all the replicas, and ``Psi = psi_h`` is their tau. Unlike a pooled correlation, Psi does not
    credit a measure for merely tracking a hyperparameter that moves the target through some other
    route. (Tau-b, :func:`correlations`' column, rescales for ties: a measure that ignores ``h`` in
    three of four groups would get ``psi_h`` 1 instead of 0.25 if those groups were dropped.)

    Within a group, the rows where the measure or the target is not finite are left out; a group
    whose remaining rows do not take two values of ``h`` (fewer than 2 rows, or replicas that
    diverged at every other value) has no tau along ``h`` and is left out of the mean (``psi_h`` NaN
    when no group has one, and then ``Psi`` NaN too; before, the tau of the remaining seed pairs was
    reported as ``psi_h``).

    Args:
        df: one row per replica, with the hyperparameter, target and measure columns.
        target: the generalization column.
        hyperparameters: the swept hyperparameter columns. They must form a full grid: every
            combination of their values is present (more than one replica per combination is fine),
            and each takes at least two values; otherwise a ValueError says which is not.
        measures: the measure columns (default: every numeric column but the target, the
            hyperparameters and bookkeeping columns, as in :func:`correlations`).
    Returns a DataFrame indexed by measure with the columns ``psi_<h>`` (one per hyperparameter, in
    the order given) and ``Psi``; ``attrs["groups"]``: ``{h: number of groups}``.
    """
    import itertools

    import pandas as pd

    hyper = list(hyperparameters) if not isinstance(hyperparameters, str) else [hyperparameters]
    if not hyper:
        raise ValueError("granulated Kendall needs at least one hyperparameter column")
    missing = [c for c in [target, *hyper] if c not in df.columns]
    if missing:
        raise KeyError(f"columns {missing} not in the table (columns: {list(df.columns)})")
    if len(set(hyper)) < len(hyper) or target in hyper:
        raise ValueError(f"hyperparameters must be distinct columns other than the target, got {hyper}")
    if isinstance(measures, str):  # (one column: not its letters)
        measures = [measures]
    if measures is None:
        measures = _default_measures(df, {target, *hyper})
    missing = [m for m in measures if m not in df.columns]
    if missing:
        raise KeyError(f"measure columns {missing} not in the table (columns: {list(df.columns)})")
    settings = df[hyper]
    if settings.isna().any().any():
        raise ValueError(f"hyperparameter columns {[h for h in hyper if settings[h].isna().any()]} hold missing values")
    levels = {h: [v.item() if isinstance(v, np.generic) else v for v in pd.unique(settings[h])] for h in hyper}
    single = {h: v[0] for h, v in levels.items() if len(v) < 2}
    if single:
        raise ValueError(f"hyperparameters {list(single)} take one value each ({single}): psi needs replicas that "
                         "differ in the hyperparameter; leave them out")
    present = {tuple(v.item() if isinstance(v, np.generic) else v for v in row)
               for row in settings.drop_duplicates().itertuples(index=False)}
    grid = list(itertools.product(*levels.values()))
    if len(present) < len(grid):
        gap = next(c for c in grid if c not in present)
        raise ValueError(f"the sweep of {hyper} is not a full grid: {len(present)} of its {len(grid)} combinations "
                         f"have replicas (no replica has {dict(zip(hyper, gap))}); psi compares replicas that differ "
                         "in one hyperparameter only, so every combination is needed")
    y_all = df[target].to_numpy(dtype=np.float64)
    codes = {h: pd.factorize(settings[h])[0] for h in hyper}
    groups = {}
    for h in hyper:
        others = [g for g in hyper if g != h]
        groups[h] = (list(settings.groupby(others, sort=False).indices.values()) if others
                     else [np.arange(len(df))])
    rows = []
    for m in measures:
        x_all = df[m].to_numpy(dtype=np.float64)
        psi = {f"psi_{h}": _mean_tau(x_all, y_all, groups[h], codes[h]) for h in hyper}
        rows.append({"measure": m, **psi, "Psi": float(np.mean(list(psi.values())))})
    out = pd.DataFrame(rows, columns=["measure", *(f"psi_{h}" for h in hyper), "Psi"]).set_index("measure")
    out.attrs["groups"] = {h: len(g) for h, g in groups.items()}
    return out


def pair_sign_tau(x, y) -> float:
    """Jiang et al.'s Kendall tau of ``x`` and ``y`` ``[n]`` (n >= 2): the average over the pairs
    ``i < j`` of ``sign(x_i - x_j) * sign(y_i - y_j)`` (tau-a; a tied pair counts 0)."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"pair_sign_tau needs two sequences of one length n >= 2, got lengths {x.size} and {y.size}")
    i, j = np.triu_indices(x.size, 1)
    return float(np.mean(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])))


def _mean_tau(x, y, groups, h) -> float:
    """The mean :func:`pair_sign_tau` of ``(x[g], y[g])`` over the index arrays ``groups`` whose
    finite pairs take at least 2 values of the hyperparameter ``h`` (``[n]`` codes); NaN when none do."""
    taus = []
    for g in groups:
        keep = np.isfinite(x[g]) & np.isfinite(y[g])
        if np.unique(h[g][keep]).size >= 2:
            taus.append(pair_sign_tau(x[g][keep], y[g][keep]))
    return float(np.mean(taus)) if taus else float("nan")
