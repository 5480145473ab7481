"""fastcurv.stats against scipy directly."""
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
