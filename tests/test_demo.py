"""The demo and the study runner end to end, tiny settings, into a temporary folder."""
import json

import pandas as pd
import pytest

from fastcurv.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_cli_writes_report(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["demo", "--replicas", "4", "--epochs", "2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "lambda_max" in printed and "Rank correlation with test_acc" in printed and str(out) in printed
    for name in ("results.csv", "correlations.csv", "report.md", "config.json", "lambda_max_vs_test_acc.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    table = pd.read_csv(out / "results.csv", index_col="replica")
    assert list(table["seed"]) == [0, 1, 2, 3]
    assert table["lambda_max"].notna().all() and (table["lambda_max"] > 0).all()
    assert table["trace"].notna().all()
    assert table["test_acc"].between(0, 1).all()
    corr = pd.read_csv(out / "correlations.csv", index_col="measure")
    # the demo correlates curvature AND function-space measures
    assert {"lambda_max", "trace", "weakness_rel_tau0.1", "compressed_bytes_lzma", "disagreement"} <= set(corr.index)
    assert (corr["n"] == 4).all()
    assert (out / "agreement_heatmap.png").is_file() and (out / "spectrum.png").is_file() and (out / "audit.csv").is_file()
    assert (out / "lambda_max_vs_test_acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["replicas"] == 4 and "torch" in cfg["versions"]
    assert "| lambda_max |" in (out / "report.md").read_text()


def test_study_from_json_config_with_flag_override(tmp_path, capsys):
    cfg = tmp_path / "study.json"
    cfg.write_text(json.dumps({"data": "digits", "hidden": [8], "replicas": 3, "epochs": 1, "measures": ["lambda_max"],
                               "target": "gap", "n_boot": 50, "lr": [0.05, 0.1, 0.2]}))
    out = tmp_path / "study"
    assert main(["study", "--config", str(cfg), "--replicas", "3", "--out", str(out), "--no-progress"]) == 0
    table = pd.read_csv(out / "results.csv", index_col="replica")
    assert len(table) == 3 and "gap" in table and (out / "lambda_max_vs_gap.png").is_file()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"replicas": 2, "widths": [3]}))
    assert main(["study", "--config", str(bad), "--out", str(out), "--no-progress"]) == 2
    assert "fastcurv study: unknown setting(s) ['widths']" in capsys.readouterr().err


def test_scatter_plots_show_which_replicas_the_correlation_used(tmp_path, monkeypatch):
    """``<measure>_vs_<target>.png`` drew every replica where its measure is finite, while the
    correlation it illustrates (rows="common") left out those where another measure is not finite:
    the disagreement plot showed 8 points, titled R=8, next to a correlation of n = 7 (the outlier
    that decided the picture was not in the number). The left-out replicas are now hollow and counted
    apart; a plot whose saving failed left its pyplot figure open."""
    import warnings

    import matplotlib.figure
    import matplotlib.pyplot as plt
    import numpy as np

    from fastcurv.demo import _plot
    from fastcurv.stats import correlations

    rng = np.random.default_rng(1)
    t = pd.DataFrame({"seed": range(8), "test_acc": rng.random(8), "lambda_max": rng.random(8),
                      "disagreement": rng.random(8)})
    t.loc[3, "lambda_max"], t.loc[3, "disagreement"] = np.nan, 5.0  # e.g. Hessian products that overflowed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = int(correlations(t, "test_acc", ["lambda_max", "disagreement"], n_boot=10).loc["disagreement", "n"])
    saved, real = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: saved.append(self) or real(self, *a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (correlations warned about replica 3 already)
        assert _plot(t, ["disagreement"], "test_acc", tmp_path, correlated=["lambda_max", "disagreement"]) == [
            "disagreement_vs_test_acc.png"]
    ax = saved[-1].axes[0]
    used, left = (c.get_offsets() for c in ax.collections)
    assert n == 7 and len(used) == 7 and 5.0 not in used[:, 0]
    assert left.tolist() == [[5.0, t.loc[3, "test_acc"]]] and len(ax.collections[1].get_facecolors()) == 0  # hollow
    assert ax.get_title() == "disagreement vs test_acc (R=7 correlated; 1 left out: hollow)"
    open_before = plt.get_fignums()
    with pytest.raises(FileNotFoundError):
        _plot(t, ["disagreement"], "test_acc", tmp_path / "no such folder")
    assert plt.get_fignums() == open_before
