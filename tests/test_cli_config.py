"""``fastcurv study`` config files and the study settings checked before training: reruns into
another folder, YAML numbers, relative paths (against the current folder), switches, seeds (tiny studies on the embedded digits)."""
import json
import sys

import pytest

import fastcurv
from fastcurv.cli import _load_config, build_parser, main
from fastcurv import study_config

yaml = pytest.importorskip("yaml")

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(data="digits", hidden=(4,), replicas=2, epochs=1, n_boot=10, progress=False, verbose=False)
TINY_YAML = "data: digits\nhidden: [4]\nreplicas: 2\nepochs: 1\nn_boot: 10\nmeasures: [lambda_max]\n"
FAST = ["--no-progress", "--threads", "1"]


@pytest.fixture
def no_training(monkeypatch):
    """Training fails the test: the settings must be refused before it."""
    monkeypatch.setattr("fastcurv.train.train_population", lambda *a, **k: pytest.fail("trained"))


class _Trained(Exception):
    """Raised by the ``training_seeds`` fixture's train_population: the settings reached training."""


@pytest.fixture
def training_seeds(monkeypatch):
    """Training records its seeds, then stops the study (raising :class:`_Trained`): a list, filled
    when the settings got through every check before training."""
    seen = []

    def train(*a, seeds, **k):
        seen.extend(seeds)
        raise _Trained

    monkeypatch.setattr("fastcurv.train.train_population", train)
    return seen


@pytest.fixture
def study_call(monkeypatch):
    """``fastcurv study``'s call of :func:`fastcurv.study` captured (nothing runs): a dict of its
    keywords, ``progress`` among them."""
    seen = {}
    monkeypatch.setattr(sys.modules["fastcurv.study"], "study", lambda **cfg: seen.update(cfg))
    return seen


def test_a_rerun_with_out_elsewhere_moves_the_results_file_along(tmp_path, monkeypatch):
    """Only the checkpoint moved with ``--out``: ``sharpness_kwargs.output: a/run.jsonl`` stayed, and
    ``--config a/config.yaml --out b --lr 0.1`` trained, then failed (exit 2) with "a/run.jsonl was
    written by a job with a different configuration"; with no changed flag it read and rewrote a's
    file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(TINY_YAML + "audit: false\nout: a\ncheckpoint: a/train.ckpt\n"
                                                 "sharpness_kwargs:\n  output: a/run.jsonl\n")
    assert main(["study", "--config", "c.yaml", *FAST]) == 0
    first = (tmp_path / "a" / "run.jsonl").read_bytes()
    assert main(["study", "--config", "a/config.yaml", "--out", "b", "--lr", "0.1", *FAST]) == 0
    b = tmp_path / "b"
    assert (b / "run.jsonl").is_file() and (b / "train.ckpt").is_file() and (b / "report.md").is_file()
    assert (tmp_path / "a" / "run.jsonl").read_bytes() == first
    saved = yaml.safe_load((b / "config.yaml").read_text())
    assert saved["sharpness_kwargs"]["output"] == str((b / "run.jsonl").absolute())


def test_yaml_exponent_numbers_are_numbers_in_nested_settings(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-3`` as a string: ``sharpness_kwargs: {tol: 1e-3}`` failed after
    training with "'>=' not supported between instances of 'str' and 'int'"."""
    path = tmp_path / "c.yaml"
    path.write_text("target_loss: 1e-3\nlr: 5E-2\nreplicas: 7\nname: '1e-3'\nsharpness_kwargs:\n  tol: 1e-3\n"
                    "  max_iter: 1.0e2\n  measure_options:\n    rho_sharpness: {rho: 5e-2}\n"
                    "function_kwargs:\n  delta: 1e-2\n  taus: [1e-2, 0.5]\n")
    cfg = _load_config(str(path))
    assert cfg["sharpness_kwargs"]["tol"] == 1e-3 and cfg["sharpness_kwargs"]["max_iter"] == 100.0
    assert cfg["sharpness_kwargs"]["measure_options"]["rho_sharpness"]["rho"] == 0.05
    assert cfg["function_kwargs"] == {"delta": 0.01, "taus": [0.01, 0.5]}
    assert cfg["target_loss"] == 1e-3 and cfg["lr"] == 0.05
    assert cfg["replicas"] == 7 and isinstance(cfg["replicas"], int) and cfg["name"] == "1e-3"  # (quoted: a string)


def test_a_yaml_tolerance_runs_through_the_cli(tmp_path, monkeypatch):
    """The same ``tol: 1e-3`` end to end: exit 2 after training before, a report now."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(TINY_YAML + "audit: false\nout: r\nsharpness_kwargs:\n  tol: 1e-3\n")
    assert main(["study", "--config", "c.yaml", *FAST]) == 0
    assert (tmp_path / "r" / "report.md").is_file()


def test_numeric_strings_in_keyword_dicts_are_read_as_numbers(tmp_path):
    """From Python (a YAML file read with yaml.safe_load): ``sharpness_kwargs={"tol": "1e-3"}`` failed
    after training; strings where no number goes (a path, a name) stay strings."""
    kw = study_config._from_config({"tol": "1e-3", "max_iter": "50", "output": "1e3.jsonl", "eig_solver": "power",
                       "measure_options": {"rho_sharpness": {"rho": "5e-2", "p": "l2"}}}, "sharpness_kwargs")
    assert kw == {"tol": 1e-3, "max_iter": 50, "output": "1e3.jsonl", "eig_solver": "power",
                  "measure_options": {"rho_sharpness": {"rho": 0.05, "p": "l2"}}}
    kw = study_config._from_config({"delta": "1e-2", "taus": ["1e-2"]}, "function_kwargs")
    assert kw == {"delta": 0.01, "taus": [0.01]}
    res = fastcurv.study(**TINY, measures=["lambda_max"], audit=False, out=None, sharpness_kwargs={"tol": "1e-3"})
    assert res["sharpness"].settings["tol"] == 1e-3


@pytest.mark.parametrize("kw,words", [
    (dict(sharpness_kwargs={"eig_solver": "foo"}), r"sharpness_kwargs\['eig_solver'\] must be one of"),
    (dict(sharpness_kwargs={"backend": "foo"}), r"sharpness_kwargs\['backend'\] must be one of"),
    (dict(sharpness_kwargs={"trace_method": "nope"}), r"sharpness_kwargs\['trace_method'\] must be one of"),
    (dict(sharpness_kwargs={"tol": "small"}), r"sharpness_kwargs\['tol'\] must be a number, got 'small'"),
    (dict(sharpness_kwargs={"tol": -1.0}), r"sharpness_kwargs\['tol'\] must be non-negative"),
    (dict(sharpness_kwargs={"max_iter": 0}), r"sharpness_kwargs\['max_iter'\] must be a positive integer"),
    (dict(function_kwargs={"delta": 2.0}), r"function_kwargs\['delta'\] must be in \(0, 1\)"),
    (dict(function_kwargs={"taus": ["x"]}), r"function_kwargs\['taus'\] must be a number or a list"),
    (dict(sharpness_kwargs={"measure_options": {"rho_sharpness": {"rho": "big"}}}),
     r"\['rho_sharpness'\]\['rho'\] must be a number"),
    (dict(sharpness_kwargs={"measure_options": {"rho_sharpness": {"radius": 1}}}), r"unknown options \['radius'\]"),
    (dict(sharpness_kwargs={"measure_options": {"nope": {}}}), "'nope' is not a measure that takes options"),
])
def test_values_in_keyword_dicts_are_checked_before_training(no_training, kw, words):
    """They were seen only by batched_sharpness / function_measures, after training."""
    with pytest.raises(ValueError, match=words):
        fastcurv.study(**{**TINY, "measures": ["lambda_max"], "out": None, **kw})


def test_audit_measures_given_as_one_name(tmp_path, monkeypatch):
    """``audit_measures: trace`` was split into characters after training and all the measures
    ("unknown measures ['t', 'r', 'a', 'c', 'e']"). The CLI audits trace; from Python the name is
    audited too (a list of one)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(TINY_YAML + "out: r\naudit_measures: trace\n")
    assert main(["study", "--config", "c.yaml", *FAST]) == 0
    audit = (tmp_path / "r" / "audit.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in audit[1:]] == ["loss", "trace"]  # (the loss row: a function check)
    res = fastcurv.study(**TINY, measures=["lambda_max"], audit_measures="trace", out=None)
    assert list(res["audit"].table.index) == ["loss", "trace"]


def test_a_negative_seed_is_refused_before_any_work(tmp_path, monkeypatch, no_training, capsys):
    """``--seed -10`` trained and measured, then failed in the bootstrap ("expected non-negative
    integer", numpy's generator); ``fastcurv demo --seed -1`` likewise."""
    monkeypatch.chdir(tmp_path)
    assert main(["study", "--seed", "-10", "--out", "r", *FAST]) == 2
    assert "seed must be a non-negative integer, got -10" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["demo", "--seed", "-1", "--out", "d", "--no-progress"]) == 2
    assert "seed must be a non-negative integer, got -1" in capsys.readouterr().err


def test_a_config_seed_as_a_string_or_a_whole_float(tmp_path, monkeypatch, training_seeds, capsys):
    """A JSON config's ``"seed": "3"`` failed with "can only concatenate str (not "int") to str",
    ``1.0`` with "'float' object cannot be interpreted as an integer" (the study reads them now)."""
    monkeypatch.chdir(tmp_path)
    for value, expected in (("3", [3, 4]), (1.0, [1, 2])):
        (tmp_path / "c.json").write_text(json.dumps({"seed": value, "replicas": 2, "out": "r"}))
        with pytest.raises(_Trained):
            main(["study", "--config", "c.json", *FAST])
        assert training_seeds == expected and all(type(s) is int for s in training_seeds)
        training_seeds.clear()
    (tmp_path / "c.json").write_text(json.dumps({"seed": 1.5}))
    assert main(["study", "--config", "c.json", *FAST]) == 2
    assert "seed must be a non-negative integer, got 1.5" in capsys.readouterr().err
    assert [study_config._seed(s) for s in (0, 7, "12", 4.0)] == [0, 7, 12, 4]
    for bad in (-1, True, 2.5, "x", None):
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            study_config._seed(bad)


def test_progress_in_a_config_file(tmp_path, study_call, capsys):
    """``progress: false`` gave "study() got multiple values for keyword argument 'progress'";
    --no-progress wins over the file."""
    path = tmp_path / "c.yaml"
    path.write_text("progress: false\n")
    assert main(["study", "--config", str(path)]) == 0 and study_call["progress"] is False
    path.write_text("progress: true\n")
    assert main(["study", "--config", str(path)]) == 0 and study_call["progress"] is True
    assert main(["study", "--config", str(path), "--no-progress"]) == 0 and study_call["progress"] is False
    path.write_text("progress: 0\n")  # (0 and 1 are bools, as in train_population)
    assert main(["study", "--config", str(path)]) == 0 and study_call["progress"] is False
    for word in ("'no'", "'false'"):
        path.write_text(f"progress: {word}\n")
        assert main(["study", "--config", str(path)]) == 2
        assert f"progress must be True, False or None (one setting for all replicas), got {word}" in \
            capsys.readouterr().err
        assert main(["study", "--config", str(path), "--no-progress"]) == 2  # (refused though the flag wins)
        capsys.readouterr()


@pytest.mark.parametrize("word", ["off", "no", "false", "none", "Off", "'off'"])
def test_checkpoint_off_no_false_is_no_checkpoint(tmp_path, study_call, word):
    """YAML reads an unquoted ``off`` / ``no`` / ``false`` as False, which reached the study and
    failed with "expected str, bytes or os.PathLike object, not bool"."""
    path = tmp_path / "c.yaml"
    path.write_text(f"out: a\ncheckpoint: {word}\n")
    assert main(["study", "--config", str(path), *FAST]) == 0 and study_call["checkpoint"] is None
    assert main(["study", "--config", str(path), "--out", str(tmp_path / "b"), *FAST]) == 0
    assert study_call["checkpoint"] is None


def test_relative_paths_in_a_config_file_are_relative_to_the_current_folder(tmp_path, monkeypatch, study_call):
    """They were read against the config file's folder, as no config file written before assumed (see
    the next test); flags and config files alike are read against the current folder again."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "c.yaml").write_text(f"out: rep\ncheckpoint: rep/t.ckpt\ndata_root: [data, {tmp_path}]\n"
                                             "sharpness_kwargs:\n  output: ../run.jsonl\n")
    assert main(["study", "--config", "cfg/c.yaml", "--checkpoint", "flag.ckpt", *FAST]) == 0
    assert study_call["out"] == "rep" and study_call["checkpoint"] == "flag.ckpt"
    assert study_call["data_root"] == ["data", str(tmp_path)]
    assert study_call["sharpness_kwargs"] == {"output": "../run.jsonl"}


def test_a_config_yaml_of_an_earlier_version_reruns_into_its_folder(tmp_path, monkeypatch, study_call):
    """Earlier versions wrote config.yaml with the paths as typed: ``--out rep --checkpoint
    rep/train.ckpt``, run in a project folder, wrote ``out: rep`` into rep/config.yaml. Read against
    the file's folder, ``fastcurv study --config rep/config.yaml`` from the project folder trained
    again from scratch into rep/rep (checkpoint rep/rep/train.ckpt) instead of resuming in rep."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "config.yaml").write_text(TINY_YAML + "out: rep\ncheckpoint: rep/train.ckpt\n")
    assert main(["study", "--config", "rep/config.yaml", *FAST]) == 0
    assert study_call["out"] == "rep" and study_call["checkpoint"] == "rep/train.ckpt"
    assert main(["study", "--config", "rep/config.yaml", "--out", "rep2", *FAST]) == 0
    assert study_call["out"] == "rep2" and study_call["checkpoint"] == "rep2/train.ckpt"


def test_a_study_s_config_yaml_reruns_from_its_own_folder(tmp_path, monkeypatch):
    """config.yaml kept the paths as typed (``out: rep``): run from the report folder, as report.md's
    rerun line says, ``fastcurv study --config config.yaml`` wrote a new report into rep/rep (and
    looked for a relative data_root under rep/). It holds absolute paths now."""
    monkeypatch.chdir(tmp_path)
    args = ["--replicas", "2", "--epochs", "1", "--hidden", "4", "--measures", "lambda_max", "--no-audit",
            "--n-boot", "10", *FAST]
    assert main(["study", *args, "--out", "rep", "--checkpoint", "rep/train.ckpt"]) == 0
    rep = tmp_path / "rep"
    saved = yaml.safe_load((rep / "config.yaml").read_text())
    assert saved["out"] == str(rep.absolute()) and saved["checkpoint"] == str((rep / "train.ckpt").absolute())
    assert "from any folder" in (rep / "report.md").read_text()
    monkeypatch.chdir(rep)
    (rep / "report.md").unlink()
    assert main(["study", "--config", "config.yaml", *FAST]) == 0
    assert (rep / "report.md").is_file() and not (rep / "rep").exists()
    assert main(["study", "--config", "config.yaml", "--out", "../rep2", *FAST]) == 0
    assert (tmp_path / "rep2" / "train.ckpt").is_file() and (tmp_path / "rep2" / "report.md").is_file()


def test_switches_must_be_true_or_false(tmp_path, monkeypatch, no_training, capsys):
    """A JSON config's ``"audit": "false"`` (a string, true to Python) ran the audit and wrote its
    files; now it is refused before any work, as ``"replicas": "8"`` is."""
    monkeypatch.chdir(tmp_path)
    for setting in ({"audit": "false"}, {"verbose": "no"}, {"progress": "off"}, {"audit": 2}):
        (tmp_path / "c.json").write_text(json.dumps({**setting, "out": "r"}))
        assert main(["study", "--config", "c.json", *FAST]) == 2
        name = next(iter(setting))
        assert f"{name} must be True" in capsys.readouterr().err
        assert not (tmp_path / "r").exists()
    for hidden in (TINY["hidden"], []):  # (a model without hidden layers got the audit's layer error)
        with pytest.raises(ValueError, match="audit must be True or False .*, got 'false'"):
            fastcurv.study(**{**TINY, "audit": "false", "hidden": hidden}, measures=["lambda_max"], out=None)
    base = dict(n_boot=10, audit=False, audit_alpha=10.0, audit_measures=["trace"], audit_replicas=None,
                sharpness_kwargs=None, function_kwargs=None, lr=0.1, replicas=2)
    study_config._check_settings(**base, verbose=False, progress=None)
    with pytest.raises(ValueError, match="verbose must be True or False"):
        study_config._check_settings(**base, verbose="no")


@pytest.mark.parametrize("switch", [{"verbose": 0}, {"audit": 0}, {"progress": 0}, {"audit": 1, "verbose": 1}])
def test_switches_given_as_0_or_1_are_bools(switch, training_seeds):
    """``study(verbose=0)``, ``audit=0``, ``progress=0`` were refused ("must be true or false, got 0"),
    though train_population, which study calls, reads 0 and 1 (and numpy bools) as bools."""
    with pytest.raises(_Trained):
        fastcurv.study(**{**TINY, "measures": ["lambda_max"], "out": None, **switch})
    assert training_seeds == [0, 1]


def test_a_study_that_fails_before_any_work_leaves_no_empty_out_folder(tmp_path, monkeypatch, no_training):
    """The --out folder, created before the checks that need the data, stayed behind empty; then
    (``--out new/r``) its parent ``new``, also created by the study, did."""
    monkeypatch.chdir(tmp_path)
    assert main(["study", "--n-train", "10", "--out", "new/r", *FAST]) == 2  # (n_train: mnist only)
    assert not (tmp_path / "new").exists()  # (new/ too: it stayed behind, empty)
    (tmp_path / "kept").mkdir()
    assert main(["study", "--n-train", "10", "--out", "kept/a/b", *FAST]) == 2
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "a").exists()
    (tmp_path / "old").mkdir()
    assert main(["study", "--n-train", "10", "--out", "old", *FAST]) == 2
    assert (tmp_path / "old").is_dir()  # (the user's folder stays)


def test_the_audit_alpha_message_offers_no_list(no_training):
    """audit_alpha "x" was refused as "a number or a list of numbers (one per replica)": it is never per replica."""
    with pytest.raises(ValueError, match=r"audit_alpha must be a number, got 'x'$"):
        fastcurv.study(**TINY, measures=["lambda_max"], audit_alpha="x", out=None)


def test_a_negative_target_loss_is_refused(no_training):
    """``target_loss=-1`` was taken; no replica can reach a cross-entropy below 0, and the report said
    "2 of 2 replicas did not reach the training-loss target -1.0"."""
    with pytest.raises(ValueError, match="target_loss must be >= 0"):
        fastcurv.study(**TINY, measures=["lambda_max"], target_loss=-1, out=None)


def test_demo_help_says_what_it_prints():
    """The help said the demo prints "its sharpness table"; it prints the headline correlations and the audit."""
    text = build_parser().format_help()
    assert "sharpness table" not in text and "headline correlations" in text


def test_the_summary_says_why_there_is_no_granulated_kendall(capsys):
    """report.md said why Psi was not computed (a sweep that is not a full grid); the printed summary said nothing."""
    res = fastcurv.study(**{**TINY, "replicas": 3, "verbose": True}, lr=[0.02, 0.2, 0.02],
                         weight_decay=[0.0, 0.0, 0.01], measures=["lambda_max"], audit=False, out=None,
                         sharpness_kwargs={"max_iter": 4})
    assert res["granulated_kendall"] is None
    assert f"granulated Kendall coefficient (Psi) {res['granulated_kendall_note']}" in capsys.readouterr().out


def test_help_states_the_path_rule(capsys):
    """Which folder a config file's relative paths are read against was not said anywhere (it is the
    current folder, as for flags)."""
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "in a config file as in flags, are relative to the current folder" in text and "moves into NEW" in text
    assert "config file's folder" not in text
