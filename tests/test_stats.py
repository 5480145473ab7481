"""fastcurv.stats against scipy directly."""
import math
import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from fastcurv import stats


def _xy(n=40, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = 0.5 * x + rng.normal(size=n)
    if ties:
        x = np.round(x, 1)
        y = np.round(y, 0)
    return x, y


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_and_kendall_match_scipy(ties):
    x, y = _xy(ties=ties)
    rho, p = stats.spearman(x, y)
    ref = st.spearmanr(x, y)
    assert rho == pytest.approx(ref.statistic, abs=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9)
    tau, tp = stats.kendall(x, y)
    ref = st.kendalltau(x, y)
    assert tau == pytest.approx(ref.statistic, abs=1e-12) and tp == pytest.approx(ref.pvalue, rel=1e-9)


def test_rowwise_spearman_matches_scipy_on_resamples_with_ties():
    x, y = _xy(n=25, seed=3)
    idx = stats.bootstrap_indices(25, 50, seed=1)
    got = stats._rowwise_spearman(x[idx], y[idx])
    want = [st.spearmanr(x[i], y[i]).statistic for i in idx]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_bootstrap_ci_equals_scipy_loop_percentiles():
    x, y = _xy(n=30, seed=5)
    lo, hi = stats.bootstrap_spearman_ci(x, y, n_boot=300, seed=7, level=0.9)
    idx = stats.bootstrap_indices(30, 300, seed=7)
    rhos = np.array([st.spearmanr(x[i], y[i]).statistic for i in idx])
    rhos = rhos[np.isfinite(rhos)]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(rhos, [0.05, 0.95])), abs=1e-12)
    rho, _ = stats.spearman(x, y)
    assert lo < rho < hi


def test_correlations_table_drops_nan_rows_and_skips_bookkeeping():
    x, y = _xy(n=30, seed=2)
    df = pd.DataFrame({"lambda_max": x, "trace": -x + 0.1 * y, "trace_stderr": np.ones(30), "acc": y,
                       "ok": np.ones(30, dtype=bool)})
    df.loc[4, "lambda_max"] = np.nan
    df["broken"] = np.nan  # a measure with no finite value does not drop every replica
    df.loc[0, "broken"] = 1.0
    with pytest.warns(RuntimeWarning, match=r"replicas \[4\] dropped \(not finite in \['lambda_max'\]\)"):
        tab = stats.correlations(df, "acc", n_boot=200)
    assert list(tab.index) == ["lambda_max", "trace", "broken"]
    keep = np.isfinite(df["lambda_max"].to_numpy())
    ref = st.spearmanr(x[keep], y[keep])
    assert tab.loc["lambda_max", "n"] == tab.loc["trace", "n"] == 29  # the same replicas for every measure
    assert tab.loc["lambda_max", "spearman_rho"] == pytest.approx(ref.statistic)
    assert tab.loc["lambda_max", "spearman_p"] == pytest.approx(ref.pvalue)
    assert tab.loc["trace", "kendall_tau"] == pytest.approx(st.kendalltau(df["trace"][keep], y[keep]).statistic)
    mostly_nan = df.assign(rare=np.where(np.arange(30) < 5, x, np.nan))  # finite on 5 of 30: does not cut the others
    with pytest.warns(RuntimeWarning):
        tab2 = stats.correlations(mostly_nan, "acc", ["lambda_max", "trace", "rare"], n_boot=50)
    assert tab2.loc["trace", "n"] == 29 and tab2.loc["rare", "n"] == 4  # its finite rows among the common ones
    each = stats.correlations(df, "acc", ["lambda_max", "trace"], rows="each", n_boot=200)
    assert each.loc["trace", "n"] == 30
    assert each.loc["trace", "kendall_tau"] == pytest.approx(st.kendalltau(df["trace"], y).statistic)
    with pytest.raises(KeyError, match="target column 'gap'"):
        stats.correlations(df, "gap")


def test_degenerate_inputs_give_nan():
    assert np.isnan(stats.spearman([1, 1, 1, 1], [1, 2, 3, 4])[0])
    assert np.isnan(stats.kendall([1, 2], [2, 1])[0])
    with pytest.raises(ValueError, match="different lengths"):
        stats.spearman([1, 2, 3], [1, 2])


def test_bootstrap_resamples_without_rank_information_count_as_zero():
    """A column constant but for one replica: resamples without that replica are constant and count
    as rho = 0, so the interval holds 0 as p = 0.11 says (skipping them gave [-0.77, -0.48])."""
    acc = [0.8556, 0.8891, 0.9004, 0.9102, 0.8842, 0.2191, 0.8534, 0.8892, 0.8829, 0.9154, 0.8652, 0.0967]
    lo, hi = stats.bootstrap_spearman_ci([0.0] * 11 + [1.0], acc, n_boot=2000)
    rho, p = stats.spearman([0.0] * 11 + [1.0], acc)
    assert p > 0.05 and lo < rho < hi and lo <= 0.0 <= hi


def _enumerated_p(x, y):
    """Two-sided permutation p of Spearman rho by brute force: rho of x against every ordering of y
    (scipy's ranks, ties as mid-ranks), p = min(1, 2 min(P[rho <= obs], P[rho >= obs]))."""
    import itertools

    rx, ry = st.rankdata(x), st.rankdata(y)
    perms = np.array(list(itertools.permutations(range(len(x)))))
    rys = ry[perms]
    rho = np.array([np.corrcoef(rx, ry)[0, 1]])
    rhos = ((rys - rys.mean(1, keepdims=True)) @ (rx - rx.mean())) / np.sqrt(
        ((rys - rys.mean(1, keepdims=True)) ** 2).sum(1) * ((rx - rx.mean()) ** 2).sum())
    eps = 1e-12
    return min(1.0, 2 * min(np.mean(rhos <= rho + eps), np.mean(rhos >= rho - eps))), float(rho[0])


@pytest.mark.parametrize("n", [3, 4, 5])
def test_spearman_p_of_a_perfect_rank_correlation_on_few_replicas_is_exact(n):
    """The t approximation gave p = 0 (n = 3, 4) and 1.4e-24 (n = 5); Kendall's exact p on the same
    data was 0.333 / 0.083 / 0.0167 = 2/n!, the exact permutation p of Spearman rho too."""
    import math

    df = pd.DataFrame({"test_acc": [0.90 + 0.01 * i for i in range(n)], "lambda_max": [float(n - i) for i in range(n)]})
    tab = stats.correlations(df, "test_acc", ["lambda_max"], n_boot=200)
    assert tab.loc["lambda_max", "spearman_rho"] == pytest.approx(-1.0)
    assert tab.loc["lambda_max", "spearman_p"] == pytest.approx(2 / math.factorial(n), rel=1e-12)
    assert tab.loc["lambda_max", "spearman_p"] == pytest.approx(tab.loc["lambda_max", "kendall_p"], rel=1e-12)


@pytest.mark.parametrize("n, ties", [(4, False), (6, False), (7, True), (8, False), (8, True), (9, False), (9, True)])
def test_spearman_p_equals_exact_enumeration_for_small_n(n, ties):
    rng = np.random.default_rng(n + 10 * ties)
    for _ in range(4):
        x = rng.normal(size=n)
        y = x + rng.normal(size=n)
        if ties:  # tied measure values and tied targets, kept as mid-ranks
            x = np.round(x)
            y = np.round(2 * y) / 2
            if np.ptp(x) == 0 or np.ptp(y) == 0:
                continue
        want, rho_want = _enumerated_p(x, y)
        rho, p = stats.spearman(x, y)
        assert rho == pytest.approx(rho_want, abs=1e-12)
        assert p == pytest.approx(want, rel=1e-12, abs=1e-15), (x, y)
        if n == 9 and not ties:
            assert p != pytest.approx(st.spearmanr(x, y).pvalue, rel=1e-3)  # not the t approximation


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_exact_p_equals_scipy_permutation_test(ties):
    def rho(a, b, axis):
        ra = st.rankdata(a, axis=axis)
        rb = st.rankdata(b, axis=axis)
        ra = ra - ra.mean(axis=axis, keepdims=True)
        rb = rb - rb.mean(axis=axis, keepdims=True)
        return (ra * rb).sum(axis) / np.sqrt((ra * ra).sum(axis) * (rb * rb).sum(axis))

    x = np.array([1.0, 0.0, -1.0, -1.0, 0.0]) if ties else np.array([0.3, -1.2, 0.8, 2.0, -0.1])
    y = np.array([1.0, -1.0, -1.0, -1.0, 0.0]) if ties else np.array([1.1, -0.4, 0.2, 1.7, 0.5])
    ref = st.permutation_test((x, y), rho, permutation_type="pairings", n_resamples=np.inf, vectorized=True)
    assert stats.spearman(x, y)[1] == pytest.approx(ref.pvalue, rel=1e-12)
    assert stats.spearman_exact_p(x, y) == pytest.approx(ref.pvalue, rel=1e-12)


@pytest.mark.parametrize("n", [10, 100])
def test_spearman_p_for_larger_n_is_scipys_t_approximation_never_zero(n):
    import math

    rng = np.random.default_rng(n)
    x = rng.normal(size=n)
    y = 0.3 * x + rng.normal(size=n)
    rho, p = stats.spearman(x, y)
    ref = st.spearmanr(x, y)
    assert rho == pytest.approx(ref.statistic, abs=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-12)
    # a perfect rank correlation: scipy says p = 0; no permutation test can go below 2/n!
    rho, p = stats.spearman(x, -x)
    assert rho == pytest.approx(-1.0, abs=1e-12) and st.spearmanr(x, -x).pvalue < 1e-60  # 0 or 7e-64
    assert p == pytest.approx(2 / math.factorial(n), rel=1e-9) and p > 0


def test_correlations_without_numeric_measure_columns_say_so():
    """Measure columns of 0-d tensors are object columns: correlations returned an empty table
    without a word."""
    import torch

    rng = np.random.default_rng(0)
    acc, lam = rng.random(8), rng.random(8)
    df = pd.DataFrame({"test_acc": acc, "lambda_max": [torch.tensor(v) for v in lam]})
    with pytest.raises(ValueError, match="no numeric measure columns to correlate with 'test_acc'.*object"):
        stats.correlations(df, "test_acc", n_boot=10)
    got = stats.correlations(df, "test_acc", measures=["lambda_max"], n_boot=10)
    assert got.loc["lambda_max", "n"] == 8


def test_correlations_give_benjamini_yekutieli_adjusted_p_values_next_to_the_p_values():
    """A study correlates 20-30 columns with one target and reported raw p-values only: a p = 0.005
    among 20 columns read as stronger than it is. The table now has spearman_p_by / kendall_p_by,
    scipy's Benjamini-Yekutieli adjustment over its rows with a p-value (a constant column has none:
    NaN, not counted in the family)."""
    rng = np.random.default_rng(4)
    acc = rng.random(12)
    df = pd.DataFrame({"acc": acc, "const": np.ones(12)})
    for i in range(6):
        df[f"m{i}"] = (6 - i) * 0.1 * acc + rng.random(12)
    tab = stats.correlations(df, "acc", n_boot=20)
    cols = list(tab.columns)
    assert cols.index("spearman_p_by") == cols.index("spearman_p") + 1
    assert cols.index("kendall_p_by") == cols.index("kendall_p") + 1
    assert np.isnan(tab.loc["const", "spearman_p"]) and np.isnan(tab.loc["const", "spearman_p_by"])
    for col in ("spearman_p", "kendall_p"):
        tested = tab[col].dropna()
        assert len(tested) == 6
        want = st.false_discovery_control(tested.to_numpy(), method="by")
        np.testing.assert_allclose(tab.loc[tested.index, f"{col}_by"], want, rtol=1e-12)
        assert (tab.loc[tested.index, f"{col}_by"] >= tested).all()


def _factorial_grid():
    """A 3 x 2 x 2 grid of (lr, wd, sam) with two seeds per cell (24 replicas), and a measure and a
    target that depend on the settings and on noise, with a NaN measure value and a tied target pair."""
    import itertools

    rng = np.random.default_rng(7)
    rows = [dict(lr=lr, wd=wd, sam=sam) for lr, wd, sam, _ in itertools.product([0.01, 0.1, 1.0], [0.0, 1e-3],
                                                                                  [0.0, 0.05], range(2))]
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=3).reset_index(drop=True)  # (replicas in any order)
    df["gap"] = np.round(0.1 * np.log10(df["lr"]) + 20 * df["wd"] + rng.normal(0, 0.05, len(df)), 2)
    df["sharp"] = -df["gap"] + rng.normal(0, 0.05, len(df))
    df["noise"] = rng.random(len(df))
    df.loc[5, "sharp"] = np.nan
    return df


def _tau_by_hand(x, y):
    """Jiang et al.'s tau: concordant minus discordant pairs over all pairs (ties count 0)."""
    import itertools

    pairs = list(itertools.combinations(range(len(x)), 2))
    return sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs) / len(pairs)


def _psi_by_hand(df, measure, target, hyper):
    """psi_h: for each setting of the other hyperparameters, the pair-sign tau on those replicas."""
    import itertools

    psi = {}
    for h in hyper:
        others = [g for g in hyper if g != h]
        taus = []
        for values in itertools.product(*(sorted(set(df[g])) for g in others)):
            mask = np.ones(len(df), dtype=bool)
            for g, v in zip(others, values):
                mask &= (df[g] == v).to_numpy()
            x, y = df.loc[mask, measure].to_numpy(), df.loc[mask, target].to_numpy()
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.sum() >= 2:
                taus.append(_tau_by_hand(x[ok], y[ok]))
        psi[h] = np.mean(taus)
    return psi, np.mean(list(psi.values()))


def test_granulated_kendall_equals_scipy_kendalltau_per_group():
    """Jiang et al.'s granulated Kendall Psi (measures reference section 4): psi_h = the mean tau over
    the groups of replicas that differ only in h; Psi = the mean psi_h."""
    df = _factorial_grid()
    hyper = ["lr", "wd", "sam"]
    tab = stats.granulated_kendall(df, "gap", hyper, ["sharp", "noise"])
    assert list(tab.columns) == ["psi_lr", "psi_wd", "psi_sam", "Psi"] and list(tab.index) == ["sharp", "noise"]
    assert tab.attrs["groups"] == {"lr": 4, "wd": 6, "sam": 6}
    for m in ("sharp", "noise"):
        psi, Psi = _psi_by_hand(df, m, "gap", hyper)
        for h in hyper:
            assert tab.loc[m, f"psi_{h}"] == pytest.approx(psi[h], abs=1e-12), (m, h)
        assert tab.loc[m, "Psi"] == pytest.approx(Psi, abs=1e-12)
    assert tab.loc["sharp", "Psi"] < -0.3  # (the measure tracks the gap within the groups, with the opposite sign)
    # one hyperparameter: one group of all the replicas, Psi = their tau
    one = stats.granulated_kendall(df[df["wd"].eq(0.0) & df["sam"].eq(0.0)], "gap", ["lr"], ["noise"])
    sub = df[df["wd"].eq(0.0) & df["sam"].eq(0.0)]
    assert one.loc["noise", "Psi"] == pytest.approx(_tau_by_hand(sub["noise"].to_numpy(), sub["gap"].to_numpy()), abs=1e-12)
    assert one.attrs["groups"] == {"lr": 1}


def test_granulated_kendall_counts_ties_and_constant_groups_as_the_paper_does():
    """Jiang et al.'s tau is the pair-sign average: a tied pair counts 0, so a group where the measure
    is constant has tau 0 and still counts in psi. The first version dropped such groups and took
    tau-b: a measure that ignores wd in three of four lr groups got psi_wd 1.0 for the paper's 0.25,
    and one that ignores wd everywhere psi_wd NaN (Psi NaN) for 0 (Psi 0.5)."""
    df = pd.DataFrame({"lr": np.repeat([0.01, 0.1, 1.0, 10.0], 2), "wd": np.tile([0.0, 1e-3], 4)})
    df["gap"] = df["wd"] * 100 + np.log10(df["lr"])  # (lr and wd both raise the gap)
    df["some"] = np.where(df["lr"].eq(0.01), df["gap"], df["lr"])  # tracks wd in one lr group only
    df["none"] = df["lr"]  # ignores wd entirely
    tab = stats.granulated_kendall(df, "gap", ["lr", "wd"], ["some", "none"])
    assert tab.loc["some", "psi_wd"] == pytest.approx(0.25, abs=1e-12)
    assert tab.loc["none", "psi_wd"] == 0.0 and tab.loc["none", "psi_lr"] == 1.0
    assert tab.loc["none", "Psi"] == pytest.approx(0.5, abs=1e-12)
    # a tie inside a group counts 0 (tau-b would rescale it away)
    assert stats.pair_sign_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 3, abs=1e-12)


def test_granulated_kendall_refuses_what_is_not_a_grid():
    df = _factorial_grid()
    with pytest.raises(ValueError, match=r"not a full grid: 11 of its 12 .*'lr': 1.0, 'wd': 0.001, 'sam': 0.05"):
        stats.granulated_kendall(df[~(df["lr"].eq(1.0) & df["wd"].eq(1e-3) & df["sam"].eq(0.05))], "gap",
                                 ["lr", "wd", "sam"], ["sharp"])
    with pytest.raises(ValueError, match=r"hyperparameters \['wd'\] take one value each \(\{'wd': 0.0\}\)"):
        stats.granulated_kendall(df[df["wd"].eq(0.0)], "gap", ["lr", "wd"], ["sharp"])
    with pytest.raises(ValueError, match="at least one hyperparameter"):
        stats.granulated_kendall(df, "gap", [], ["sharp"])
    with pytest.raises(KeyError, match="momentum"):
        stats.granulated_kendall(df, "gap", ["momentum"], ["sharp"])


@pytest.mark.parametrize("n", [4, 6, 8])
def test_kendall_p_with_ties_on_few_replicas_is_the_exact_permutation_p(n):
    """scipy's kendalltau takes its normal approximation whenever there is a tie: on 6 replicas with
    accuracies 3 x 0.8 and 3 x 0.9, a measure separating them perfectly got p = 0.0495, below every p
    a permutation test can give (exact 0.1, Spearman's p in the same row). Now the exact p for n <= 9,
    checked against a brute-force enumeration with tau-b."""
    import itertools

    rng = np.random.default_rng(n)
    x = rng.normal(size=n)
    y = np.repeat([0.8, 0.9], n // 2)[np.argsort(np.argsort(x))]  # (ties: two accuracy levels)
    tau, p = stats.kendall(x, y)
    taus = np.array([st.kendalltau(x, y[list(q)]).statistic for q in itertools.permutations(range(n))])
    le, ge = (taus <= tau + 1e-12).mean(), (taus >= tau - 1e-12).mean()
    assert p == pytest.approx(min(1.0, 2 * min(le, ge)), rel=1e-12)
    assert p >= 2 / math.factorial(n)
    if n == 6:
        assert p == pytest.approx(0.1) and st.kendalltau(x, y).pvalue < 0.05


def test_granulated_kendall_leaves_out_groups_that_no_longer_differ_in_the_hyperparameter():
    """Every lr=1.0 replica diverged (NaN measure): the groups along lr held only lr=0.1 replicas,
    which differ in their seed alone, and their tau was reported as psi_lr = 1.0. Such a group has
    no tau along lr: psi_lr NaN when none is left, while psi_wd still counts."""
    df = pd.DataFrame({"lr": [0.1, 0.1, 1.0, 1.0] * 2, "wd": [0.0] * 4 + [1e-4] * 4,
                       "m": [1.0, 2.0, np.nan, np.nan, 1.5, 2.5, np.nan, np.nan],
                       "acc": [0.5, 0.6, 0.1, 0.1, 0.55, 0.7, 0.1, 0.1]})
    out = stats.granulated_kendall(df, "acc", ["lr", "wd"], measures="m")
    assert np.isnan(out.loc["m", "psi_lr"]) and out.loc["m", "psi_wd"] == 1.0  # (the lr=0.1 group: concordant)


def test_pair_sign_tau_and_string_measures_are_checked():
    """pair_sign_tau used the first len(x) entries of a longer y (1.0 for [1,2,3] against
    [1,2,3,0]); a single measure name was split into letters (a KeyError listing 'l', 'a', ...);
    n_boot=2000.0 (a config file's) raised numpy's raw TypeError."""
    with pytest.raises(ValueError, match="lengths 3 and 4"):
        stats.pair_sign_tau([1, 2, 3], [1, 2, 3, 0])
    with pytest.raises(ValueError, match="n >= 2"):
        stats.pair_sign_tau([1.0], [2.0])
    x, y = _xy(n=12)
    df = pd.DataFrame({"lam": x, "acc": y})
    one = stats.correlations(df, "acc", "lam", n_boot=200.0)
    ref = stats.correlations(df, "acc", ["lam"], n_boot=200)
    assert list(one.index) == ["lam"] and one.equals(ref)
    with pytest.raises(ValueError, match="n_boot must be a positive integer"):
        stats.correlations(df, "acc", "lam", n_boot=2.5)
