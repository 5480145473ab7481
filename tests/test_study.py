"""fastcurv.study end to end on the embedded digits (few replicas, few epochs), Python and CLI."""
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

import fastcurv
from fastcurv.cli import main
from fastcurv.study import HEADLINE

MEASURES = ("lambda_max", "trace", "spectrum", "weakness", "perturbation_weakness", "simplicity", "disagreement", "gde")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    res = fastcurv.study(data="digits", hidden=(16,), replicas=5, epochs=3, lr=0.05, batch_size=32, measures=MEASURES,
                         n_boot=200, audit_replicas=3, out=out, progress=False, verbose=False)
    return res, out


def test_all_output_files_present(small_study):
    res, out = small_study
    expected = ["results.csv", "correlations.csv", "audit.csv", "report.md", "config.json", "config.yaml",
                "spectrum.png", "agreement_heatmap.png", "disagreement_vs_test_error.png", "audit.png"]
    expected += [f"{HEADLINE[m]}_vs_test_acc.png" for m in MEASURES if m in HEADLINE]
    expected.append("results.parquet")  # pyarrow is a dependency: Parquet is always written
    for name in expected:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        assert name in res["files"], name
    for name in expected:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_parquet_equals_csv(small_study):
    """results.parquet holds the same table as results.csv (same columns, index, values; NaNs in the same places)."""
    res, out = small_study
    pq = pd.read_parquet(out / "results.parquet")
    csv = pd.read_csv(out / "results.csv", index_col=0)
    assert list(pq.columns) == list(csv.columns)
    assert pq.index.name == csv.index.name and list(pq.index) == list(csv.index)
    assert len(pq) == 5
    for col in pq.columns:
        a, b = pq[col], csv[col]
        if pd.api.types.is_numeric_dtype(a) and not pd.api.types.is_bool_dtype(a):
            np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-12, atol=0, equal_nan=True,
                                       err_msg=col)
        else:
            # CSV writes "" and NaN alike (an empty field) and reads both back as NaN
            def norm(s):
                return [None if pd.isna(v) or v == "" else str(v) for v in s]
            assert norm(a) == norm(b), col
    # Parquet keeps the dtypes the study produced (CSV round-trips them only by parsing)
    pd.testing.assert_frame_equal(pq, res["table"])


def test_correlation_table_has_requested_measures(small_study):
    res, out = small_study
    corr = pd.read_csv(out / "correlations.csv", index_col="measure")
    want = {"lambda_max", "trace", "weakness_rel_tau0.1", "perturb_sigma_star", "compressed_bytes_lzma", "disagreement"}
    assert want <= set(corr.index)
    assert "test_error" not in corr.index  # the target itself is not a predictor
    assert (corr["n"] == 5).all()
    fin = corr.dropna(subset=["spearman_rho"])  # a column constant over the 5 replicas has no rank correlation
    assert set(res["headline"].index) <= set(fin.index)
    assert fin["spearman_rho"].between(-1, 1).all() and fin["spearman_p"].between(0, 1).all()
    ok = corr["ci_low"].notna()
    assert (corr.loc[ok, "ci_low"] <= corr.loc[ok, "ci_high"]).all()
    assert list(res["headline"].index) == ["lambda_max", "trace", "weakness_rel_tau0.1", "perturb_sigma_star",
                                           "compressed_bytes_lzma", "disagreement"]
    report = (out / "report.md").read_text()
    for m in want:
        assert f"| {m} |" in report, m
    assert "Generalization-disagreement check" in report and "Invariance audit" in report


def test_tables_agree_across_pipelines(small_study):
    """Test accuracy from evaluate_population and test error from the agreement-count kernels agree;
    the summary disagreement is the mean off-diagonal of the pairwise matrix."""
    res, out = small_study
    table = pd.read_csv(out / "results.csv", index_col="replica")
    assert list(table["seed"]) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(table["test_acc"], 1.0 - table["test_error"], atol=1e-6)
    np.testing.assert_allclose(table["gap"], table["train_acc"] - table["test_acc"], atol=1e-9)
    D = res["function"].pairwise["disagreement"].numpy()
    R = D.shape[0]
    off = D[~np.eye(R, dtype=bool)].mean()
    assert res["summary"]["mean_pairwise_disagreement"] == pytest.approx(off, rel=1e-9)
    assert res["summary"]["mean_test_error"] == pytest.approx(table["test_error"].mean(), rel=1e-9)
    assert (table["lambda_max"] > 0).all() and table["trace"].notna().all()
    assert (table["lambda_max"] <= table["trace"] + 1e-6 * table["trace"].abs() + table["trace_stderr"] * 6).all()


def test_audit_preserves_function_and_moves_curvature(small_study):
    res, out = small_study
    audit = pd.read_csv(out / "audit.csv", index_col="measure")
    assert audit.loc["loss", "ratio_median"] == pytest.approx(1.0, rel=1e-4)
    assert res["audit"].table.attrs["predictions_changed"] == 0
    assert audit.loc["lambda_max", "ratio_median"] > 5  # alpha = 10 rescaling inflates the top eigenvalue
    assert not bool(audit.loc["lambda_max", "invariant"])


def test_config_reruns_through_cli(small_study, tmp_path):
    _, out = small_study
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["replicas"] == 5 and cfg["config"]["measures"] == list(MEASURES)
    assert "torch" in cfg["versions"] and "train" in cfg["seconds"]
    yaml = pytest.importorskip("yaml")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved.update(replicas=3, measures=["lambda_max", "weakness"], audit=False, n_boot=50)
    path = tmp_path / "rerun.yaml"
    path.write_text(yaml.safe_dump(saved))
    out2 = tmp_path / "rerun"
    assert main(["study", "--config", str(path), "--out", str(out2), "--no-progress", "--target", "gap"]) == 0
    corr = pd.read_csv(out2 / "correlations.csv", index_col="measure")
    assert {"lambda_max", "weakness_rel_tau0.1"} <= set(corr.index) and "trace" not in corr.index
    assert (out2 / "lambda_max_vs_gap.png").is_file() and not (out2 / "audit.csv").exists()
    t1 = pd.read_csv(out / "results.csv", index_col="replica")
    t2 = pd.read_csv(out2 / "results.csv", index_col="replica")
    # same settings and seeds: the first three replicas train to the same weights
    np.testing.assert_allclose(t2["test_acc"], t1["test_acc"].iloc[:3], atol=1e-6)


def test_bad_measure_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown measures.*sharpiness"):
        fastcurv.study(data="digits", replicas=2, epochs=1, measures=["lambda_max", "sharpiness"], out=None,
                       verbose=False, progress=False)
    assert main(["study", "--replicas", "2", "--epochs", "1", "--measures", "weakness,nope", "--out", str(tmp_path),
                 "--no-progress"]) == 2


@pytest.mark.parametrize("bad,words", [
    (dict(n_boot=0), "n_boot must be a positive integer"),
    (dict(audit_alpha=0.0, audit_transform="dinh_first"), "audit_alpha must be a positive number"),
    (dict(audit_measures=["bogus"]), r"unknown measures \['bogus'\]"),
    (dict(audit_replicas=0), "audit_replicas must be a positive integer"),
    (dict(sharpness_kwargs={"seed": 1}), r"sharpness_kwargs may not set \['seed'\]"),
    (dict(lr="fast"), "lr must be a number"),
    (dict(threads=0), "threads must be a positive integer"),
    (dict(hidden="64,x"), "hidden must be positive layer widths"),
    (dict(target_loss="low"), "target_loss must be a number"),
])
def test_bad_settings_are_named_before_training(tmp_path, bad, words):
    ck = tmp_path / "ck.pt"
    with pytest.raises(ValueError, match=words):
        fastcurv.study(data="digits", replicas=2, epochs=1, measures=["lambda_max"], out=None, verbose=False,
                       progress=False, checkpoint=ck, **bad)
    assert not ck.exists()  # nothing was trained


def test_hidden_widths_as_a_string_and_numbers_as_strings(tmp_path):
    """A config file's forms: "12,6" was read character by character (an MLP 64-1-2-,...)."""
    fastcurv.study(data="digits", hidden="12,6", lr="0.05", replicas=2, epochs=1, measures=["lambda_max"], audit=False,
                   out=tmp_path, verbose=False, progress=False, n_boot=10)
    assert "MLP 64-12-6-10" in (tmp_path / "report.md").read_text()


TINY = dict(data="digits", hidden=(8,), replicas=3, epochs=1, n_boot=20, progress=False, verbose=False)


def test_sharpness_output_with_the_audit(tmp_path):
    """A resumable sharpness stage: the audit reused its results file and was refused after all the
    work, leaving no report; it now has its own files, and the rerun resumes every stage."""
    out = tmp_path / "rep"
    kw = dict(TINY, measures=("lambda_max", "trace"), audit_replicas=2, out=out,
              sharpness_kwargs={"output": str(out / "sharpness.jsonl"), "replica_chunk": 1})
    first = fastcurv.study(**kw)
    for name in ("report.md", "audit.csv", "sharpness.jsonl", "sharpness.audit.jsonl", "sharpness.audit.reparam.jsonl"):
        assert (out / name).is_file(), name
    again = fastcurv.study(**kw)
    pd.testing.assert_frame_equal(again["audit"].table, first["audit"].table)


def test_every_replica_failed_with_a_spectrum(tmp_path):
    """All replicas diverged, "spectrum" requested: the density crashed ("quantile() input tensor
    must be non-empty") before report.md and config.json were written."""
    res = fastcurv.study(**dict(TINY, lr=1e20, measures=("lambda_max", "spectrum"), audit=False, out=tmp_path))
    assert res["table"]["diverged"].all()
    for name in ("report.md", "config.json", "config.yaml", "spectrum.png"):
        assert (tmp_path / name).is_file(), name
    grid, dens = res["sharpness"].spectrum.density()
    assert grid.numel() == 0 and dens.shape == (3, 0)
    grid, dens = res["sharpness"].spectrum.density(grid=torch.linspace(0, 1, 5))
    assert dens.shape == (3, 5) and dens.isnan().all()


def test_bad_paths_are_refused_before_training(tmp_path, monkeypatch):
    """--out a file, a checkpoint folder, an audit plot folder: found after the whole run."""
    monkeypatch.setattr("fastcurv.train.train_population", lambda *a, **k: pytest.fail("trained"))
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        fastcurv.study(**dict(TINY, measures=["lambda_max"], out=afile))
    with pytest.raises(ValueError, match="checkpoint .* is a folder"):
        fastcurv.study(**dict(TINY, measures=["lambda_max"], out=None, checkpoint=tmp_path))
    with pytest.raises(ValueError, match="a file is in the way"):
        fastcurv.study(**dict(TINY, measures=["lambda_max"], out=None,
                              sharpness_kwargs={"output": str(afile / "s.jsonl")}))


def test_config_yaml_round_trip_with_a_dtype_and_a_function(tmp_path, capsys):
    """config.yaml stored torch.float64 as a string, and the rerun crashed after training; a Python
    function (which no config file can hold) is now refused by the rerun before training."""
    yaml = pytest.importorskip("yaml")
    out = tmp_path / "a"
    first = fastcurv.study(**dict(TINY, measures=("lambda_max", "soft"), audit=False, out=out,
                                  function_kwargs={"probs_dtype": torch.float64}))
    assert yaml.safe_load((out / "config.yaml").read_text())["function_kwargs"] == {"probs_dtype": "torch.float64"}
    assert main(["study", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    again = pd.read_csv(tmp_path / "b" / "results.csv", index_col="replica")
    np.testing.assert_allclose(again["js"], first["table"]["js"], rtol=1e-12)

    fastcurv.study(**dict(TINY, measures=("lambda_max",), audit=False, out=tmp_path / "c", epochs=0,
                          sharpness_kwargs={"loss": lambda o, t: torch.nn.functional.cross_entropy(o, t)}))
    capsys.readouterr()
    assert main(["study", "--config", str(tmp_path / "c" / "config.yaml"), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "sharpness_kwargs['loss'] is <not stored in a config file: function" in err and not (tmp_path / "d").exists()


def test_a_reused_report_folder_holds_only_the_new_study(tmp_path):
    """An earlier study's audit.csv, spectrum.png, ... stayed next to the new results; files that are
    not a study's are kept. Also: top_k's headline row is lambda_1 (it was dropped)."""
    for name in ("audit.csv", "spectrum.png", "trace_vs_test_acc.png", "notes.txt"):
        (tmp_path / name).write_text("old")
    res = fastcurv.study(**dict(TINY, measures=("top_k",), sharpness_kwargs={"top_k": 2}, audit=False, out=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(res["files"] + ["notes.txt"])
    assert list(res["headline"].index) == ["lambda_1"]


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    """Bad config files, --out a file, --checkpoint a folder, bad demo arguments, an unknown data
    set: each ended in a traceback (exit code 1), or listed only the IDX data sets."""
    (tmp_path / "bad.json").write_text("{bad")
    (tmp_path / "bad.yaml").write_text("replicas: [2\n")
    (tmp_path / "afile").write_text("")
    run = ["--replicas", "2", "--epochs", "1", "--measures", "lambda_max", "--no-audit", "--no-progress"]
    cases = [
        (["study", "--config", str(tmp_path / "bad.json")], "bad.json is not valid JSON"),
        (["study", "--config", str(tmp_path / "bad.yaml")], r"bad.yaml is not valid YAML: .* \(line 2, column 1\)"),
        (["study", *run, "--out", str(tmp_path / "afile")], "is a file, not a folder"),
        (["study", *run, "--out", str(tmp_path / "r"), "--checkpoint", str(tmp_path)], "checkpoint .* is a folder"),
        (["study", "--data", "foo", "--out", str(tmp_path / "r")], "available: 'digits', 'mnist', 'fashion-mnist'"),
        (["demo", "--replicas", "0", "--out", str(tmp_path / "d")], "fastcurv demo: replicas must be a positive integer"),
        (["demo", "--out", str(tmp_path / "afile"), "--no-progress"], "fastcurv demo: out .* is a file"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(f"fastcurv {argv[0]}: ")
        assert re.search(words, err), (argv, err)


def test_the_report_says_how_many_replicas_reached_the_target_loss(tmp_path):
    """A target loss that 1 epoch cannot reach: the report says so, and the table has the column
    (a shrunk config's replicas were compared at the epoch limit without a word)."""
    res = fastcurv.study(**dict(TINY, replicas=2), target_loss=1e-6, measures=["lambda_max"], audit=False, out=tmp_path)
    assert not res["table"]["reached_target"].any()
    assert "**2 of 2 replicas did not reach the training-loss target 1e-06** in 1 epochs" in (tmp_path / "report.md").read_text()


def test_a_study_without_progress_bars_says_each_stage(tmp_path, capsys):
    """In a log or a pipe (no progress bars), a study printed nothing until it finished."""
    fastcurv.study(**dict(TINY, replicas=2, verbose=True), measures=["lambda_max", "disagreement"], audit=False,
                   out=tmp_path)
    out = capsys.readouterr().out
    assert "fastcurv study: training 2 replicas (at most 1 epochs) ..." in out
    assert out.index("curvature measures lambda_max") < out.index("function-space measures disagreement") < out.index("done in")


def test_the_report_explains_its_columns_and_lists_a_swept_learning_rate(tmp_path):
    """report.md had no glossary or units, and an lr sweep's learning rates were in no table."""
    res = fastcurv.study(**dict(TINY, replicas=2), lr=[0.05, 0.1], measures=["lambda_max", "weakness"], audit=False,
                         out=tmp_path)
    assert res["table"]["lr"].tolist() == [0.05, 0.1]
    assert res["correlations"].loc["lr", "kind"] == "hyperparameter"  # a setting, correlated as a baseline
    md = (tmp_path / "report.md").read_text()
    assert "## Columns" in md and "- `lr`: learning rate" in md and "- `lambda_max`: largest eigenvalue" in md
    assert "bits per input" in md and "- `gap`: train_acc - test_acc" in md


def test_cli_checkpoint_follows_out_and_none_turns_it_off(tmp_path, monkeypatch):
    """A config whose checkpoint lies in its out folder: --out moves both (the checkpoint stayed in
    the config's folder, where the next run resumed or refused it); --checkpoint none: no checkpoint."""
    pytest.importorskip("yaml")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("data: digits\nhidden: [8]\nreplicas: 2\nepochs: 1\nmeasures: [lambda_max]\n"
                                     "audit: false\nn_boot: 20\nout: a\ncheckpoint: a/train.ckpt\n")
    assert main(["study", "--config", "c.yaml", "--out", "b", "--no-progress"]) == 0
    assert (tmp_path / "b" / "train.ckpt").is_file() and not (tmp_path / "a").exists()
    assert main(["study", "--config", "c.yaml", "--out", "d", "--checkpoint", "none", "--no-progress"]) == 0
    assert (tmp_path / "d" / "report.md").is_file() and not list((tmp_path / "d").glob("*.ckpt"))


def test_unknown_sharpness_keywords_are_named_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr("fastcurv.train.train_population", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=r"sharpness_kwargs has unknown keywords \['max_iters'\]"):
        fastcurv.study(**TINY, measures=["lambda_max"], sharpness_kwargs={"max_iters": 5}, out=tmp_path)


def test_headline_follows_the_columns_function_kwargs_ask_for(tmp_path):
    """Other taus, codecs or divergences: each requested measure keeps a headline row (its first
    column; they vanished from it silently), and the report's sigma* sentence uses the study's delta
    (it always said 1 %)."""
    res = fastcurv.study(**TINY, measures=("weakness", "perturbation_weakness", "simplicity", "soft", "disagreement"),
                         audit=False, out=tmp_path,
                         function_kwargs={"taus": (0.05, 0.25), "codecs": ("zlib",), "soft": ("tv",), "delta": 0.2,
                                          "num_draws": 2, "bisect_steps": 3})
    assert list(res["headline"].index) == ["weakness_rel_tau0.05", "perturb_sigma_star", "compressed_bytes_zlib", "tv",
                                           "disagreement"]
    md = (tmp_path / "report.md").read_text()
    assert "sigma* at which 20 % of the predictions change" in md
    assert "weakness -> `weakness_rel_tau0.05`" in md and "soft -> `tv`" in md and "no per-replica column" not in md


def test_a_cnn_study_trains_batchnorm_and_audits_folded_copies(tmp_path, capsys):
    """model="cnn": conv layers with BatchNorm trained in one job (one replica at a time per worker
    thread), measured in eval mode; the audit compares BatchNorm-folded copies before and after the
    transform, which preserves the function (a BatchNorm after the rescaled conv would undo the
    rescaling); the printed summary names the transform."""
    res = fastcurv.study(**dict(TINY, verbose=True, hidden=(3, 4), replicas=4), model="cnn",
                         measures=("lambda_max", "disagreement"), audit_transform="neurons", out=tmp_path)
    assert res["history"].engine.startswith("per-replica autograd")
    assert np.isfinite(res["table"][["test_acc", "lambda_max", "disagreement"]].to_numpy()).all()
    at = res["audit"].table
    assert at.attrs["predictions_changed"] == 0 and at.loc["loss", "ratio_median"] == pytest.approx(1, rel=1e-4)
    assert not at.loc["lambda_max", "invariant"]
    # its rows say the audit's values are the folded copies' (they were labelled as the results' columns)
    assert list(res["audit_mixed"].index) == ["lambda_max (BatchNorm folded)",
                                              "lambda_max (BatchNorm folded, half reparameterized)"]
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# fastcurv study: 4 replicas of CNN 1x8x8 -> conv 3-4 (BatchNorm) -> 10 on digits")
    assert "copies with each BatchNorm folded" in md
    assert "invariance audit (neurons):" in capsys.readouterr().out
    # alpha = 1: the identity, so every ratio is 1 (the audit compared the models as trained with
    # transformed folded copies, and reported lambda_max 0.3x "not invariant")
    res = fastcurv.study(**dict(TINY, hidden=(3, 4)), model="cnn", measures=("lambda_max",), audit_alpha=1.0,
                         out=None)
    assert res["audit"].table["ratio_median"].tolist() == pytest.approx([1.0, 1.0, 1.0], rel=1e-4)


def test_a_rerun_into_another_folder_leaves_the_first_study_s_checkpoint_alone(tmp_path, monkeypatch):
    """config.yaml keeps out, so --out moves a checkpoint that lay inside it (the rerun trained on
    into the first study's checkpoint, which the first study's own command then refused)."""
    pytest.importorskip("yaml")
    monkeypatch.chdir(tmp_path)
    args = ["--replicas", "2", "--epochs", "1", "--hidden", "8", "--measures", "lambda_max", "--no-audit",
            "--n-boot", "20", "--no-progress"]
    assert main(["study", *args, "--out", "a", "--checkpoint", "a/train.ckpt"]) == 0
    first = (tmp_path / "a" / "train.ckpt").read_bytes()
    assert main(["study", "--config", "a/config.yaml", "--out", "b", "--epochs", "2", "--no-progress"]) == 0
    assert (tmp_path / "b" / "train.ckpt").is_file() and (tmp_path / "a" / "train.ckpt").read_bytes() == first


def test_settings_the_model_cannot_take_are_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr("fastcurv.train.train_population", lambda *a, **k: pytest.fail("trained"))
    for bad, words in [(dict(hidden=[]), r"audit \('dinh'\) rescales two weight layers"),
                       (dict(spectrum_replicas=0), "spectrum_replicas must be a positive integer"),
                       (dict(model="resnet"), "model must be one of"),
                       (dict(model="cnn", hidden=[]), "needs at least one conv layer")]:
        with pytest.raises(ValueError, match=words):
            fastcurv.study(**{**TINY, "measures": ["lambda_max"], "out": tmp_path, **bad})


def test_the_report_says_which_replicas_diverged_and_plots_gde_around_them(tmp_path, monkeypatch):
    """A diverged replica is named in report.md (the means silently left it out), the y = x line of
    the disagreement plot spans the finite points (it vanished), and test_error and the soft
    divergences are in the Columns section."""
    import matplotlib.axes

    lines = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **k: lines.append(a) or real(self, *a, **k))
    res = fastcurv.study(**TINY, lr=[0.05, 1e30, 0.05], measures=("lambda_max", "gde", "disagreement", "soft"),
                         audit=False, out=tmp_path)
    assert res["table"]["diverged"].tolist() == [False, True, False]
    md = (tmp_path / "report.md").read_text()
    assert "**1 of 3 replicas diverged in training** (replicas [1])" in md
    assert "- `test_error`: 1 - test accuracy" in md and "- `js`: mean Jensen-Shannon" in md
    diagonal = [a for a in lines if len(a) >= 2 and list(a[0]) == list(a[1])]
    assert len(diagonal) == 1 and np.isfinite(diagonal[0][0]).all()


def test_replicas_that_did_not_learn_are_flagged_and_named(tmp_path):
    """A replica left at chance (here a learning rate of 1e-12; in sweeps, one too large that
    collapses it to one class) is flagged and named in the report: such outliers decide rank
    correlations on their own (they were measured without a word)."""
    res = fastcurv.study(**TINY, lr=[0.05, 1e-12, 0.05], measures=["lambda_max"], audit=False, out=tmp_path)
    flags = res["table"]["flags"].tolist()
    assert "did not learn" in flags[1] and "did not learn" not in flags[0] + flags[2]
    assert res["summary"]["did_not_learn"] == [1]
    assert "**1 of 3 replicas did not learn** (replicas [1]" in (tmp_path / "report.md").read_text()


def test_target_loss_as_a_config_file_string(tmp_path):
    """YAML reads ``target_loss: 1e-3`` as the string "1e-3": the study trained an epoch, then
    stopped with "'<=' not supported between instances of 'Tensor' and 'str'" (lr: 1e-2 worked)."""
    res = fastcurv.study(**dict(TINY, replicas=2), target_loss="1e-3", measures=["lambda_max"], audit=False,
                         out=tmp_path)
    assert not res["table"]["reached_target"].any()
    assert "did not reach the training-loss target 0.001**" in (tmp_path / "report.md").read_text()


def test_paths_with_a_tilde_are_in_the_home_folder(tmp_path, monkeypatch, capsys):
    """A config file with ``out: ~/runs/r1`` and ``checkpoint: ~/runs/r1/train.ckpt`` (no shell
    expands a file's "~"): the checkpoint and config files went to a folder literally named "~"
    under the current folder, then pandas (which does expand "~") found no such folder and the
    study failed after all its work, with no report. ``--config ~/c.yaml`` was not found either."""
    pytest.importorskip("yaml")
    from fastcurv.cli import _moved_under_out

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    (home / "c.yaml").write_text("data: digits\nhidden: [8]\nreplicas: 2\nepochs: 1\nmeasures: [lambda_max]\n"
                                 "audit: false\nn_boot: 20\nout: ~/runs/r1\ncheckpoint: ~/runs/r1/train.ckpt\n")
    assert main(["study", "--config", "~/c.yaml", "--no-progress"]) == 0, capsys.readouterr().err
    r1 = home / "runs" / "r1"
    assert (r1 / "report.md").is_file() and (r1 / "results.csv").is_file() and (r1 / "train.ckpt").is_file()
    assert not list(cwd.iterdir())
    # --out moves a checkpoint that lay in the config's out folder, "~" or not
    cfg = {"out": "~/runs/r1", "checkpoint": str(r1 / "train.ckpt")}
    moved = _moved_under_out(cfg["checkpoint"], cfg, {"out": "b"})
    assert moved == "b/train.ckpt"


def test_every_registered_measure_gets_a_headline_row():
    """A curvature measure whose columns are not named after it (pac_bayes -> pacbayes_flatness, ...,
    jiang_sharpness -> jiang_sharpness_flatness, josz_variation -> josz_V, josz_level_distance ->
    josz_d_eps) got no headline row and no scatter plot, and report.md said it "has no per-replica
    column". Every measure batched_sharpness knows (built-in and registered) now has a row, its own column."""
    from fastcurv.measures import load_all
    from fastcurv.sharpness import MEASURES as SHARP
    from fastcurv.study import _headline_columns
    from fastcurv.train import mlp

    torch.manual_seed(0)
    models = [mlp([4, 3, 3], "relu") for _ in range(2)]
    data = (torch.randn(12, 4), torch.randint(0, 3, (12,)))
    every = tuple(m for m in [*SHARP, *sorted(load_all())] if m != "spectrum")  # (a density: no column)
    cheap = {"pac_bayes": {"mc_samples": 1, "depth": 2}, "jiang_sharpness": {"depth": 2, "n_iter": 1},
             "josz_level_distance": {"max_doublings": 1, "n_bisect": 1, "n_iter": 1},
             "epsilon_sharpness_subspace": {"p": 4}}
    other = {"josz_variation": {"r": [0.01, 0.1]}, "pac_bayes": {"magnitude_aware": False, "mc_samples": 1, "depth": 2},
             "jiang_sharpness": {"magnitude_aware": False, "depth": 2, "n_iter": 1}}
    want = {"pac_bayes": "pacbayes_flatness", "jiang_sharpness": "jiang_sharpness_flatness",
            "josz_variation": "josz_V", "josz_level_distance": "josz_d_eps"}
    for measures, options in ((every, cheap), (tuple(other), other)):
        res = fastcurv.batched_sharpness(models, data, measures=measures, max_iter=4, top_k=2, progress=False,
                                         measure_options=options)
        columns = list(res.values)
        head = _headline_columns(measures, columns)
        assert list(head) == list(measures), (set(measures) - set(head), columns)
        assert len(set(head.values())) == len(measures) and set(head.values()) <= set(columns)
        expect = {**want, "josz_variation": "josz_V_r=0.01"} if options is other else want
        assert {m: head[m] for m in want if m in measures} == {m: expect[m] for m in want if m in measures}


def test_pac_bayes_with_simplicity_and_the_columns_they_explain(tmp_path):
    """pac_bayes and simplicity both wrote a column pacbayes_mag_sigma (two different sigmas), and
    the study crashed joining the tables after all the measuring ("columns overlap"); the study table
    now calls simplicity's pacbayes_mag_kl_sigma. report.md explained pacbayes_mag_sigma as
    simplicity's KL sigma and none of pac_bayes's columns; the pac_bayes and josz_variation
    measures had no headline row or plot."""
    res = fastcurv.study(**TINY, measures=("lambda_max", "pac_bayes", "josz_variation", "simplicity"), audit=False,
                         out=tmp_path, sharpness_kwargs={"max_iter": 4, "measure_options": {"pac_bayes": {
                             "mc_samples": 2, "depth": 3}}}, function_kwargs={"bisect_steps": 3, "num_draws": 2})
    table = res["table"]
    np.testing.assert_array_equal(table["pacbayes_mag_sigma"], res["sharpness"].values["pacbayes_mag_sigma"].numpy())
    np.testing.assert_array_equal(table["pacbayes_mag_kl_sigma"], res["function"].values["pacbayes_mag_sigma"].numpy())
    assert "pacbayes_mag_sigma" in res["correlations"].index  # (simplicity's sigma is no predictor)
    assert "pacbayes_mag_kl_sigma" not in res["correlations"].index
    assert list(res["headline"].index) == ["lambda_max", "pacbayes_flatness", "josz_V", "compressed_bytes_lzma"]
    assert {"pacbayes_flatness_vs_test_acc.png", "josz_V_vs_test_acc.png"} <= set(res["files"])
    md = (tmp_path / "report.md").read_text()
    assert "pac_bayes -> `pacbayes_flatness`, josz_variation -> `josz_V`" in md and "no per-replica column" not in md
    glossary = {line.split("`")[1]: line for line in md[md.index("## Columns"):].splitlines() if line.startswith("- `")}
    for col in ("pacbayes_flatness", "pacbayes_sigma", "pacbayes_mag_flatness", "pacbayes_mag_sigma"):
        assert f"`{col}`: pac_bayes" in glossary[col], glossary.get(col)
    assert "simplicity: the noise scale sigma' its magnitude-aware PAC-Bayes" in glossary["pacbayes_mag_kl_sigma"]
    assert "Josz's loss variation" in glossary["josz_V"]


def test_the_glossary_gives_each_jiang_sharpness_column_its_meaning():
    """jiang_sharpness_alpha was folded into one `jiang_sharpness*` line describing 1 / alpha^2 (the
    _flatness column); the josz columns shared one line for two different measures."""
    from fastcurv.study import _glossary

    lines = _glossary(["jiang_sharpness_flatness", "jiang_sharpness_alpha", "jiang_sharpness_mag_flatness",
                       "jiang_sharpness_mag_alpha", "josz_V", "josz_d_eps"])
    assert [line.split("`")[1] for line in lines] == ["jiang_sharpness_flatness", "jiang_sharpness_alpha",
                                                       "jiang_sharpness_mag_flatness", "jiang_sharpness_mag_alpha",
                                                       "josz_V", "josz_d_eps"]
    assert "1 / alpha^2" in lines[0] and "half-width alpha" in lines[1] and "1 / alpha'^2" in lines[2]
    assert "distance to the eps level set" in lines[5]


def test_a_population_perfect_on_its_test_set_gets_its_report(tmp_path, monkeypatch, capsys):
    """A mean test error of 0 (a small n_test, a well-trained population): report.md divided the
    disagreement by it and the study ended in ZeroDivisionError after all the work, with no report.
    A study without a headline measure (only "gde") printed "Empty DataFrame" and reported "One
    column per requested measure ()"."""
    real = fastcurv.function_measures

    def perfect(*args, **kwargs):
        res = real(*args, **kwargs)
        res.summary.update(gde_estimate=0.0, mean_test_error=0.0)
        return res

    monkeypatch.setattr(fastcurv, "function_measures", perfect)
    res = fastcurv.study(**dict(TINY, verbose=True), measures=("gde",), audit=False, out=tmp_path)
    assert res["summary"]["mean_test_error"] == 0.0 and len(res["headline"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "mean test error: 0.0000 (ratio undefined: mean test error 0 and no disagreement;" in md
    assert "No headline: gde has no per-replica column" in md and "requested measure ()" not in md
    printed = capsys.readouterr().out
    assert "No headline: no requested measure has a per-replica column" in printed and "Empty DataFrame" not in printed
    from fastcurv.study import _gde_ratio

    assert _gde_ratio(0.02, 0.0) == "ratio infinite: mean test error 0" and _gde_ratio(0.02, 0.04) == "ratio 0.500"


def test_a_study_leaves_no_figure_open_and_keeps_the_backend(svg_backend, tmp_path):
    """Each study switched the whole process to the Agg backend (matplotlib.use: a notebook's
    plt.show() and inline figures stopped working afterwards) and left spectrum.png's pyplot figure
    open (one more per study; matplotlib warns at 20)."""
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    res = fastcurv.study(**TINY, measures=("lambda_max", "spectrum", "disagreement", "gde"), audit_replicas=2,
                         out=tmp_path, sharpness_kwargs={"max_iter": 4})
    assert {"spectrum.png", "agreement_heatmap.png", "disagreement_vs_test_error.png", "audit.png",
            "lambda_max_vs_test_acc.png"} <= set(res["files"])
    assert svg_backend.get_backend() == "svg"
    assert plt.get_fignums() == open_before


def test_scatter_plots_in_a_study_mark_the_replicas_its_correlations_left_out(tmp_path, monkeypatch):
    """One replica's lambda_max not finite (Hessian products that overflowed): the correlations
    left that replica out (n = 3), but disagreement_vs_test_acc.png drew it among the others, titled R=4."""
    import functools

    import matplotlib.figure

    real = fastcurv.batched_sharpness

    @functools.wraps(real)  # (study checks sharpness_kwargs against its signature)
    def overflowed(*args, **kwargs):
        res = real(*args, **kwargs)
        res.values["lambda_max"][1] = float("nan")
        return res

    monkeypatch.setattr(fastcurv, "batched_sharpness", overflowed)
    titles, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: titles.append(self.axes[0].get_title()) or save(self, *a, **k))
    with pytest.warns(RuntimeWarning, match=r"replicas \[1\] dropped"):
        res = fastcurv.study(**dict(TINY, replicas=4), measures=("lambda_max", "disagreement"), audit=False,
                             out=tmp_path, sharpness_kwargs={"max_iter": 4})
    assert res["correlations"].loc["disagreement", "n"] == 3
    first_lines = [t.split("\n")[0] for t in titles]
    assert "disagreement vs test_acc (R=3 correlated; 1 left out: hollow)" in first_lines
    assert "lambda_max vs test_acc (R=3)" in first_lines


def test_a_one_replica_report_and_a_gde_plot_without_finite_points(tmp_path):
    """One replica: report.md said "test accuracy x +- nan"; every test error and disagreement NaN:
    the generalization-disagreement plot called legend() with nothing labelled (a matplotlib warning)."""
    import warnings

    from fastcurv.study import _plot_gde

    res = fastcurv.study(**dict(TINY, replicas=1), measures=("lambda_max",), audit=False, out=tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert f"test accuracy {res['summary']['mean_test_acc']:.4f} (one replica)." in md and "+- nan" not in md
    table = pd.DataFrame({"test_error": [np.nan, np.nan], "disagreement": [np.nan, np.nan]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _plot_gde(table, tmp_path) == "disagreement_vs_test_error.png"


def test_a_study_without_matplotlib_writes_its_report_without_plots(tmp_path, monkeypatch):
    """matplotlib is the optional ``[plot]`` extra. The audit's plot imported it unguarded, so a
    study with the audit computed everything, then died with a raw ModuleNotFoundError and left the
    report folder empty; every other plot is skipped without it. A direct
    ``invariance_audit(path=...)`` says so before any work."""
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    res = fastcurv.study(**dict(TINY, replicas=2), measures=["lambda_max"], out=tmp_path)
    assert (tmp_path / "results.csv").exists() and not list(tmp_path.glob("*.png"))
    assert res["audit"] is not None
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 3)) for _ in range(2)]
    with pytest.raises(ImportError, match=r"fastcurv\[plot\]"):
        fastcurv.invariance_audit(models, (torch.randn(8, 4), torch.randint(0, 3, (8,))), path=tmp_path / "a.png")


def test_equal_gaps_are_equal_numbers(tmp_path, monkeypatch):
    """target="gap": gap = train_acc - test_acc subtracted two rounded fractions, so replicas with the
    same gap got different floats (1773/2000 - 880/1000 and 191/2000 - 89/1000, both 13/2000, were
    0.00649999999999995 and 0.006500000000000006), and Spearman / Kendall ranked them by that
    rounding noise instead of counting a tie (in the hunt's 8-replica lr sweep: lambda_max's rho
    -0.071 instead of +0.012, disagreement's -0.238 instead of -0.299). Here the data are 2,000 /
    1,000 samples (the digits repeated) and the accuracies those counts."""
    from fractions import Fraction

    import fastcurv.datasets
    import fastcurv.train
    from scipy import stats as st

    real_load, real_eval = fastcurv.datasets.load_dataset, fastcurv.train.evaluate_population

    def load(*args, **kwargs):
        x_tr, y_tr, x_te, y_te = real_load(*args, **kwargs)
        return (torch.cat([x_tr, x_tr])[:2000], torch.cat([y_tr, y_tr])[:2000],
                torch.cat([x_te] * 3)[:1000], torch.cat([y_te] * 3)[:1000])

    correct = {2000: [1800, 1773, 191], 1000: [900, 880, 89]}

    def evaluate(models, x, y, **kwargs):
        res = real_eval(models, x, y, **kwargs)
        res["accuracy"] = torch.tensor(correct[len(x)], dtype=torch.float64) / len(x)
        return res

    monkeypatch.setattr(fastcurv.datasets, "load_dataset", load)
    monkeypatch.setattr(fastcurv.train, "evaluate_population", evaluate)
    res = fastcurv.study(**TINY, target="gap", measures=["lambda_max"], audit=False, out=None,
                         sharpness_kwargs={"max_iter": 4})
    gap = res["table"]["gap"]
    assert gap[1] == gap[2] == float(Fraction(1773, 2000) - Fraction(880, 1000)) and gap[0] == 0.0
    lam = res["table"]["lambda_max"].to_numpy()
    tied = st.kendalltau(lam, [0.0, 0.0065, 0.0065]).statistic  # tau-b with the tie
    assert res["correlations"].loc["lambda_max", "kendall_tau"] == pytest.approx(tied, abs=1e-12)


def test_a_sweep_given_as_a_numpy_array_or_a_tensor_is_a_sweep(tmp_path):
    """np.logspace / a tensor as lr, weight_decay, ...: train_population applied one value per replica,
    but the study's table had no column, report.md and config.yaml said "<not stored in a config
    file: ndarray>" (so the documented rerun failed), and lr=np.array(...) was refused ("lr must be a
    positive number or a list of them")."""
    yaml = pytest.importorskip("yaml")
    out = tmp_path / "a"
    lr, wd = np.array([0.02, 0.05, 0.1]), torch.tensor([0.0, 0.5, 0.25], dtype=torch.float64)
    res = fastcurv.study(**TINY, lr=lr, weight_decay=wd, momentum=np.float64(0.8), measures=["lambda_max"],
                         audit=False, out=out, sharpness_kwargs={"max_iter": 4})
    assert res["table"]["lr"].tolist() == [0.02, 0.05, 0.1] and res["table"]["weight_decay"].tolist() == [0, 0.5, 0.25]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == [0.02, 0.05, 0.1] and saved["weight_decay"] == [0.0, 0.5, 0.25] and saved["momentum"] == 0.8
    md = (out / "report.md").read_text()
    assert "lr [0.02, 0.05, 0.1], momentum 0.8, weight decay [0.0, 0.5, 0.25]" in md and "not stored" not in md
    assert main(["study", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    again = pd.read_csv(tmp_path / "b" / "results.csv", index_col="replica")
    np.testing.assert_allclose(again["test_acc"], res["table"]["test_acc"], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="lr must be a number or a list of numbers"):
        fastcurv.study(**TINY, lr=np.ones((3, 1)), measures=["lambda_max"], out=None)


def test_target_loss_zero_counts_as_set(tmp_path):
    """target_loss=0.0 was tested for truth: the study dropped the reached_target column and the
    report's lines about the target (training itself stopped at 0.0 correctly)."""
    res = fastcurv.study(**dict(TINY, replicas=2), target_loss=0.0, measures=["lambda_max"], audit=False,
                         out=tmp_path, sharpness_kwargs={"max_iter": 4})
    assert res["table"]["reached_target"].tolist() == [False, False]
    md = (tmp_path / "report.md").read_text()
    assert "stop at training loss 0.0" in md and "**2 of 2 replicas did not reach the training-loss target 0.0**" in md


def test_a_swept_grid_gets_baselines_granulated_kendall_models_and_coloured_plots(tmp_path, monkeypatch):
    """A 2 x 2 grid of lr and weight decay: the swept hyperparameters are correlated with the target
    next to the measures (kind "hyperparameter"), Jiang et al.'s granulated Kendall Psi is in the
    results, granulated_kendall.csv and the report, the trained models come back (they were not
    returned), and the scatter plots are coloured by the sweep (a colour bar) with rho in the title."""
    import matplotlib.figure

    from fastcurv.stats import granulated_kendall
    from fastcurv.train import evaluate_population

    saved, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: saved.append(self) or save(self, *a, **k))
    res = fastcurv.study(**dict(TINY, replicas=4), lr=[0.02, 0.2, 0.02, 0.2], weight_decay=[0.0, 0.0, 0.01, 0.01],
                         measures=["lambda_max", "disagreement"], audit=False, out=tmp_path,
                         sharpness_kwargs={"max_iter": 4})
    corr, table = res["correlations"], res["table"]
    assert corr["kind"].to_dict() == {"lambda_max": "measure", "disagreement": "measure", "lr": "hyperparameter",
                                      "weight_decay": "hyperparameter"}
    assert corr.loc["lr", "spearman_rho"] == pytest.approx(_spearman_rho(table["lr"], table["test_acc"]), abs=1e-12)
    assert "kind" not in res["headline"].columns and list(res["headline"].index) == ["lambda_max", "disagreement"]
    psi = res["granulated_kendall"]
    pd.testing.assert_frame_equal(psi, granulated_kendall(table, "test_acc", ["lr", "weight_decay"],
                                                          ["lambda_max", "disagreement"]))
    assert list(psi.columns) == ["psi_lr", "psi_weight_decay", "Psi"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "granulated_kendall.csv", index_col="measure"), psi,
                                  check_exact=False, rtol=1e-12)
    md = (tmp_path / "report.md").read_text()
    assert "## Granulated Kendall coefficient" in md and "| lr | hyperparameter |" in md and "kendall_p_by" in md
    models = res["models"]
    assert len(models) == 4
    np.testing.assert_allclose(evaluate_population(models, *_digits_test())["accuracy"].numpy(), table["test_acc"],
                               rtol=0, atol=0)
    lam = next(f for f in saved if f.axes[0].get_xlabel() == "lambda_max")
    assert len(lam.axes) == 2 and lam.axes[1].get_ylabel() == "lr (also swept: weight_decay)"  # the colour bar
    rho, p = corr.loc["lambda_max", ["spearman_rho", "spearman_p"]]
    assert lam.axes[0].get_title().split("\n")[1] == f"Spearman rho {rho:+.2f} (p {p:.2g})"


def _spearman_rho(x, y):
    from scipy import stats as st

    return st.spearmanr(x, y).statistic


def _digits_test():
    from fastcurv.datasets import load_dataset

    _, _, x_te, y_te = load_dataset("digits", None, flatten=True)
    return x_te, y_te


def test_a_sweep_that_is_not_a_grid_says_why_it_has_no_granulated_kendall(tmp_path):
    res = fastcurv.study(**TINY, lr=[0.02, 0.2, 0.02], weight_decay=[0.0, 0.0, 0.01], momentum=[0.9, 0.9, 0.9],
                         measures=["lambda_max"], audit=False, out=tmp_path, sharpness_kwargs={"max_iter": 4})
    assert res["granulated_kendall"] is None
    note = res["granulated_kendall_note"]
    assert "not a full grid: 3 of its 4 combinations" in note and "left out: momentum" in note
    assert f"Psi {note}" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "granulated_kendall.csv").exists()


def test_adjusted_p_values_of_measures_do_not_depend_on_the_swept_hyperparameters():
    """The study correlates the swept hyperparameters too, as baselines; Benjamini-Yekutieli over all
    rows made a measure's adjusted p depend on which settings were swept (lambda_max 0.5 -> 0.926 in
    a 4-replica study with lr and momentum swept). Each kind is now its own family."""
    import pandas as pd
    import scipy.stats as st

    from fastcurv.stats import correlations
    from fastcurv.study import _by_kind

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"lr": np.repeat([0.01, 0.1, 1.0], 4), "momentum": np.tile([0.0, 0.9], 6)})
    df["gap"] = np.log10(df["lr"]) + rng.normal(0, 0.3, len(df))
    df["a"] = df["gap"] + rng.normal(0, 0.5, len(df))
    df["b"] = rng.random(len(df))
    corr = _by_kind(correlations(df, "gap", ["a", "b", "lr", "momentum"], n_boot=50), ["lr", "momentum"])
    assert corr["kind"].tolist() == ["measure", "measure", "hyperparameter", "hyperparameter"]
    alone = correlations(df, "gap", ["a", "b"], n_boot=50)
    for col in ("spearman_p_by", "kendall_p_by"):
        np.testing.assert_allclose(corr.loc[["a", "b"], col], alone[col], rtol=1e-12)
        hyp = corr.loc[["lr", "momentum"], col.removesuffix("_by")].to_numpy()
        np.testing.assert_allclose(corr.loc[["lr", "momentum"], col], st.false_discovery_control(hyp, method="by"))


def test_cli_takes_batch_size_and_label_noise_sweeps(monkeypatch):
    """``--batch-size`` took one int only (a batch-size sweep ran from Python or a config file alone)
    and there was no ``--label-noise``: both take one value or one per replica."""
    import sys

    from fastcurv.cli import main

    study_module = sys.modules["fastcurv.study"]  # (fastcurv.study, the attribute, is the function)

    seen = {}
    monkeypatch.setattr(study_module, "study", lambda progress, **cfg: seen.update(cfg))
    assert main(["study", "--batch-size", "32,32,128,128", "--label-noise", "0,0.2,0,0.2", "--no-progress"]) == 0
    assert seen["batch_size"] == [32, 32, 128, 128] and seen["label_noise"] == [0.0, 0.2, 0.0, 0.2]
    assert main(["study", "--batch-size", "64", "--label-noise", "0.1", "--no-progress"]) == 0
    assert seen["batch_size"] == 64 and seen["label_noise"] == 0.1


def test_cli_measures_may_have_spaces_after_the_commas(monkeypatch):
    """``--measures "lambda_max, trace"`` failed with "unknown measures [' trace']", while the other
    comma lists (--lr, --hidden, --batch-size) drop the spaces."""
    import sys

    from fastcurv.cli import main

    seen = {}
    monkeypatch.setattr(sys.modules["fastcurv.study"], "study", lambda progress, **cfg: seen.update(cfg))
    assert main(["study", "--measures", "lambda_max, trace ,gde", "--no-progress"]) == 0
    assert seen["measures"] == ("lambda_max", "trace", "gde")
