"""Per-replica batch sizes and label noise in train_population and study (sweeps in one job).

Before the twenty-sixth round ``batch_size`` was one int for all replicas (``ValueError batch_size
must be a positive integer, got [32, 64]``): the batch-size sweep the README advertised needed one
call per size and a hand-merged table, and ``study()`` could not run one. There was no label noise
for randomization-style sweeps (Zhang et al. 2017) at all.
"""
import numpy as np
import pytest
import torch
from torch import nn

import fastcurv
import fastcurv.datasets
from fastcurv.train import cnn, evaluate_population, mlp, noisy_labels, train_population

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=40, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _mlp():
    return mlp([6, 8, 3])


def _flat(models):
    return [torch.cat([t.detach().reshape(-1) for t in m.state_dict().values()]) for m in models]


def _same(a, b):
    """Bitwise equal, NaN where NaN."""
    return torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize("kw", [
    dict(lr=0.1),
    # each batch size's group alone has one lr: its replicas still take the grid's (per-replica) update
    dict(lr=[0.1, 0.1, 0.05, 0.05], weight_decay=0.01),
    dict(optimizer="adam", lr=0.01, sam_rho=[0.0, 0.05, 0.05, 0.0]),
    dict(lr=0.1, threads=2, chunk_size=1, eval_train=True),
    dict(lr=0.1, fused=False),
], ids=["sgd", "lr-grid", "adam-sam", "threads-eval", "vmap"])
def test_each_replica_trains_as_in_the_run_with_its_batch_size(kw):
    """A replica of a mixed-batch-size call equals, bit for bit, the same replica (seeds, data order)
    in a call where every replica has its batch size: parameters, per-epoch losses and steps (more
    steps for the smaller batch, the same epochs)."""
    x, y = _data()
    bs = [8, 16, 8, 16]
    common = dict(seeds=[0, 1, 2, 3], epochs=3, progress=False, **kw)
    models, hist = train_population(_mlp, x, y, batch_size=bs, **common)
    runs = {b: train_population(_mlp, x, y, batch_size=b, **common) for b in (8, 16)}
    flat = _flat(models)
    for r, b in enumerate(bs):
        ref_models, ref_hist = runs[b]
        assert _same(flat[r], _flat(ref_models)[r]), (r, b)
        assert [row[r] for row in hist.train_loss] == [row[r] for row in ref_hist.train_loss]
        assert hist.steps[r] == ref_hist.steps[r] == 3 * -(-40 // b)
    assert hist.batch_size == bs and hist.to_pandas()["batch_size"].tolist() == bs
    assert hist.engine == runs[8][1].engine


def test_a_batch_size_group_equals_its_replicas_trained_alone():
    """The replicas of one batch size, trained by themselves (same seeds and data seeds), give the same
    models: the other batch sizes of the call do not change them. A numpy array is a sweep too."""
    x, y = _data()
    models, _ = train_population(_mlp, x, y, seeds=[3, 4, 5, 6], batch_size=np.array([8, 16, 16, 8]), lr=0.1,
                                 epochs=2, progress=False)
    alone, _ = train_population(_mlp, x, y, seeds=[3, 6], batch_size=8, lr=0.1, epochs=2, progress=False)
    assert _same(_flat(models)[0], _flat(alone)[0]) and _same(_flat(models)[3], _flat(alone)[1])


def test_batchnorm_cnn_per_replica_batch_sizes():
    """The per-replica autograd engine (conv nets on the CPU) with BatchNorm: running statistics too."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 1, 6, 6, generator=g), torch.randint(0, 3, (30,), generator=g)

    def build():
        return cnn((1, 6, 6), [4], 3, "relu")

    common = dict(seeds=[0, 1, 2], epochs=2, lr=0.1, progress=False)
    models, _ = train_population(build, x, y, batch_size=(8, 16, 8), **common)
    for b, rs in ((8, [0, 2]), (16, [1])):
        ref = _flat(train_population(build, x, y, batch_size=b, **common)[0])
        assert all(_same(_flat(models)[r], ref[r]) for r in rs)


def test_shared_data_order_with_batch_sizes_agrees_to_rounding():
    """With a shared data order the fused first layer of a group is one matrix product, whose rounding
    depends on the group's size (as on chunk_size): equal to float32 rounding, not bitwise."""
    x, y = _data()
    common = dict(seeds=[0, 1, 2, 3], epochs=2, lr=0.1, shared_data_order=True, progress=False)
    models, hist = train_population(_mlp, x, y, batch_size=[8, 16, 8, 16], **common)
    assert hist.engine == "fused-mlp+shared-order"
    for b, rs in ((8, [0, 2]), (16, [1, 3])):
        ref = _flat(train_population(_mlp, x, y, batch_size=b, **common)[0])
        for r in rs:
            torch.testing.assert_close(_flat(models)[r], ref[r], rtol=1e-5, atol=1e-6)


def test_target_loss_callback_and_history_with_batch_sizes():
    """Groups stop on their own: a replica that reached target_loss gets NaN rows after, the job
    ends when every group has stopped, and the callback sees the merged per-replica fields."""
    x, y = _data()
    seen = []
    kw = dict(seeds=[0, 1, 2, 3], lr=0.1, epochs=30, target_loss=0.9, progress=True)
    bs = [4, 40, 4, 40]
    models, hist = train_population(_mlp, x, y, batch_size=bs, callback=lambda e, h: seen.append(
        (e, list(h.steps), list(h.reached_target))), **kw)
    assert all(hist.reached_target) and hist.epochs_run[0] < hist.epochs_run[1], hist.to_pandas()
    stop = hist.epochs_run[0]
    assert all(np.isnan(row[0]) for row in hist.train_loss[stop:])
    assert len(hist.train_loss) == max(hist.epochs_run) == len(seen) < 30  # ended when the last group stopped
    assert seen[-1] == (len(seen) - 1, hist.steps, hist.reached_target)
    assert hist.steps == [e * -(-40 // b) for e, b in zip(hist.epochs_run, bs)]
    for b in (4, 40):
        alone, ah = train_population(_mlp, x, y, batch_size=b, **{**kw, "progress": False})
        for r in (r for r in range(4) if bs[r] == b):
            assert _same(_flat(models)[r], _flat(alone)[r]) and ah.epochs_run[r] == hist.epochs_run[r]


def test_checkpoint_resume_and_changed_batch_sizes(tmp_path):
    """One checkpoint holds every group's state: a resumed run equals the uninterrupted one; a resume
    with other batch sizes is refused, naming them."""
    x, y = _data()
    path = tmp_path / "run.pt"
    kw = dict(seeds=[0, 1, 2, 3], lr=0.1, batch_size=[8, 16, 8, 16], progress=False)
    train_population(_mlp, x, y, epochs=2, checkpoint=path, **kw)
    resumed, rh = train_population(_mlp, x, y, epochs=4, checkpoint=path, **kw)
    straight, sh = train_population(_mlp, x, y, epochs=4, **kw)
    assert rh.resumed_from_epoch == 2 and rh.train_loss == sh.train_loss and rh.steps == sh.steps
    assert all(_same(a, b) for a, b in zip(_flat(resumed), _flat(straight)))
    with pytest.raises(ValueError, match=r"batch_size \[8, 16, 8, 16\] -> \[8, 8, 16, 16\]"):
        train_population(_mlp, x, y, epochs=4, checkpoint=path, **{**kw, "batch_size": [8, 8, 16, 16]})
    with pytest.raises(ValueError, match=r"batch_size \[8, 16, 8, 16\] -> 8\)"):
        train_population(_mlp, x, y, epochs=4, checkpoint=path, **{**kw, "batch_size": 8})
    # one batch size given per replica is the one-int run: its checkpoint resumes
    one = tmp_path / "one.pt"
    train_population(_mlp, x, y, epochs=1, checkpoint=one, **{**kw, "batch_size": 8})
    _, h = train_population(_mlp, x, y, epochs=2, checkpoint=one, **{**kw, "batch_size": [8] * 4})
    assert h.resumed_from_epoch == 1


@pytest.mark.parametrize("bad, match", [
    ([8, 16, 8], r"batch_size has 3 entries, expected one per replica \(R=4\)"),
    ([8, 0, 8, 8], r"batch_size must be a positive integer.*0 is not positive"),
    ([8, -4, 8, 8], r"-4 is not positive"),
    ([8, 16.0, 8, 8], r"16.0 is not an integer"),
    ([8, True, 8, 8], r"True is not an integer"),
    (np.ones((2, 2), dtype=int), r"batch_size must be a positive integer, or one per replica \(R=4\); got an array"),
    ("32", r"batch_size must be a positive integer"),
])
def test_bad_batch_sizes_are_refused_naming_the_option(bad, match):
    x, y = _data()
    with pytest.raises(ValueError, match=match):
        train_population(_mlp, x, y, seeds=[0, 1, 2, 3], batch_size=bad, epochs=1, progress=False)


def test_batchnorm_refuses_a_one_sample_last_batch_of_any_batch_size():
    x, y = _data(n=17)

    def bn():
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    with pytest.raises(ValueError, match=r"N=17, batch_size=8"):
        train_population(bn, x, y, seeds=[0, 1], batch_size=[5, 8], epochs=1, progress=False)


def test_dropout_with_batch_sizes_is_reproducible():
    """Dropout masks are keyed per group of replicas (as with chunk_size): a call repeats exactly."""
    x, y = _data()

    def drop():
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))

    kw = dict(seeds=[0, 1, 2], batch_size=[8, 16, 8], epochs=2, lr=0.1, progress=False)
    a, ha = train_population(drop, x, y, **kw)
    b, _ = train_population(drop, x, y, **kw)
    assert all(_same(u, v) for u, v in zip(_flat(a), _flat(b))) and ha.steps == [10, 6, 10]


# ---- label noise -------------------------------------------------------------------------------
def test_noisy_labels_corrupt_an_exact_nested_fraction():
    """round(fraction * N) labels, all wrong, drawn from the seed; a larger fraction corrupts a superset
    with the same wrong labels; another seed other samples."""
    _, y = _data(n=200, classes=4)
    a, b = noisy_labels(y, 0.2, 7, 4), noisy_labels(y, 0.5, 7, 4)
    wrong_a, wrong_b = a != y, b != y
    assert int(wrong_a.sum()) == 40 and int(wrong_b.sum()) == 100
    assert bool((wrong_a <= wrong_b).all()) and torch.equal(a[wrong_a], b[wrong_a])
    assert torch.equal(a, noisy_labels(y, 0.2, 7, 4)) and not torch.equal(a, noisy_labels(y, 0.2, 8, 4))
    assert torch.equal(noisy_labels(y, 0.0, 7, 4), y) and int(a.min()) >= 0 and int(a.max()) < 4


@pytest.mark.parametrize("kw", [dict(), dict(shared_data_order=True), dict(fused=False),
                                dict(batch_size=[8, 16, 8], eval_train=True)],
                         ids=["fused", "shared-order", "vmap", "batch-sizes"])
def test_label_noise_trains_as_on_the_pre_corrupted_labels(kw):
    """Replica r with label_noise=f_r equals, bit for bit, replica r of a run on the labels
    noisy_labels(y, f_r, seed_r, C) (the population's settings otherwise the same)."""
    x, y = _data()
    seeds, noise = [3, 4, 5], [0.25, 0.0, 0.5]
    common = dict(seeds=seeds, epochs=2, lr=0.1, progress=False, **{"batch_size": 8, **kw})
    models, hist = train_population(_mlp, x, y, label_noise=noise, **common)
    for r in range(3):
        ref, rh = train_population(_mlp, x, noisy_labels(y, noise[r], seeds[r], 3), **common)
        assert _same(_flat(models)[r], _flat(ref)[r]), r
        assert hist.train_loss[-1][r] == rh.train_loss[-1][r]


def test_label_noise_history_is_on_the_noisy_labels():
    """The full training-set loss (eval_train, target_loss) is on each replica's own noisy labels."""
    x, y = _data()
    models, hist = train_population(_mlp, x, y, seeds=[0, 1], label_noise=0.4, eval_train=True, epochs=2, lr=0.1,
                                    progress=False)
    for r, m in enumerate(models):
        own = evaluate_population([m], x, noisy_labels(y, 0.4, r, 3))["loss"][0]
        assert hist.train_loss[-1][r] == pytest.approx(float(own), rel=1e-6)
        assert hist.train_loss[-1][r] != pytest.approx(float(evaluate_population([m], x, y)["loss"][0]), rel=1e-3)


@pytest.mark.parametrize("kw, match", [
    (dict(label_noise=1.0), r"label_noise must be a fraction in \[0, 1\)"),
    (dict(label_noise=[0.1, -0.1]), r"label_noise must be a fraction in \[0, 1\)"),
    (dict(label_noise=float("nan")), r"label_noise must be a fraction"),
    (dict(label_noise=[0.1, 0.2, 0.3]), r"label_noise has 3 entries, expected one per replica \(R=2\)"),
    (dict(label_noise="0.1"), r"label_noise must be a fraction"),
])
def test_bad_label_noise_is_refused_naming_the_option(kw, match):
    x, y = _data()
    with pytest.raises(ValueError, match=match):
        train_population(_mlp, x, y, seeds=[0, 1], epochs=1, progress=False, **kw)


def test_label_noise_needs_cross_entropy_and_is_in_the_checkpoint(tmp_path):
    x, _ = _data()
    with pytest.raises(ValueError, match=r"label_noise .* needs loss='cross_entropy'"):
        train_population(lambda: mlp([6, 8, 2]), x, torch.randn(40, 2), seeds=[0], loss="mse", label_noise=0.1,
                         epochs=1, progress=False)
    x, y = _data()
    path = tmp_path / "n.pt"
    train_population(_mlp, x, y, seeds=[0, 1], label_noise=[0.1, 0.2], epochs=1, checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="label_noise"):
        train_population(_mlp, x, y, seeds=[0, 1], label_noise=[0.1, 0.3], epochs=2, checkpoint=path, progress=False)


# ---- study ------------------------------------------------------------------------------------
TINY = dict(data="digits", hidden=(8,), epochs=1, n_boot=20, progress=False, verbose=False, audit=False,
            measures=["lambda_max"], sharpness_kwargs={"max_iter": 4})


def test_study_sweeps_batch_size_as_a_hyperparameter(tmp_path, monkeypatch):
    """A 2 x 2 grid of lr and batch size: the batch sizes reach train_population (each replica's steps),
    get a column, a baseline row, a psi in the granulated Kendall coefficient and the plots' colour
    bar; config.yaml stores them and a rerun from it gives the same table."""
    import matplotlib.figure
    import pandas as pd

    from fastcurv.cli import main

    saved, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: saved.append(self) or save(self, *a, **k))
    res = fastcurv.study(**TINY, replicas=4, lr=[0.05, 0.2, 0.05, 0.2], batch_size=np.array([16, 16, 128, 128]),
                         out=tmp_path / "a")
    table = res["table"]
    assert table["batch_size"].tolist() == [16, 16, 128, 128]
    n = len(fastcurv.datasets.load_dataset("digits", None, flatten=True)[0])
    assert res["history"].steps == [-(-n // b) for b in (16, 16, 128, 128)]  # one epoch each
    assert res["correlations"].loc["batch_size", "kind"] == "hyperparameter"
    assert list(res["granulated_kendall"].columns) == ["psi_lr", "psi_batch_size", "Psi"]
    lam = next(f for f in saved if f.axes[0].get_xlabel() == "lambda_max")
    assert lam.axes[1].get_ylabel() == "lr (also swept: batch_size)"
    md = (tmp_path / "a" / "report.md").read_text()
    assert "batch [16, 16, 128, 128]" in md and "- `batch_size`: minibatch size (swept" in md
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert cfg["batch_size"] == [16, 16, 128, 128]
    assert main(["study", "--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "b" / "results.csv", index_col=0).drop(columns="flags"),
                                  pd.read_csv(tmp_path / "a" / "results.csv", index_col=0).drop(columns="flags"))


def test_study_sweeps_label_noise(tmp_path):
    """label_noise reaches training (the noisy labels are fitted, the clean ones scored), gets a
    column, a baseline row, the noisy-label training accuracy and a line in the report."""
    res = fastcurv.study(**{**TINY, "epochs": 3}, replicas=4, lr=0.2, label_noise=[0.0, 0.0, 0.6, 0.6],
                         weight_decay=[0.0, 0.01, 0.0, 0.01], out=tmp_path)
    table = res["table"]
    assert table["label_noise"].tolist() == [0.0, 0.0, 0.6, 0.6]
    assert res["correlations"].loc["label_noise", "kind"] == "hyperparameter"
    assert (table["noisy_train_acc"][:2] == table["train_acc"][:2]).all()
    x_tr, y_tr, _, _ = fastcurv.datasets.load_dataset("digits", None, flatten=True)
    for r in (2, 3):  # the accuracy on the labels the replica trained on (its seed's noisy labels)
        own = evaluate_population(res["models"][r:r + 1], x_tr, noisy_labels(y_tr, 0.6, r, 10))["accuracy"][0]
        assert table["noisy_train_acc"][r] == float(own) != table["train_acc"][r]
    assert "psi_label_noise" in res["granulated_kendall"].columns
    md = (tmp_path / "report.md").read_text()
    assert "label noise [0.0, 0.0, 0.6, 0.6]" in md and "- `noisy_train_acc`:" in md


@pytest.mark.parametrize("kw, match", [
    (dict(batch_size=[16, 32]), r"batch_size has 2 entries, expected one per replica \(R=3\)"),
    (dict(batch_size=[16, 32.5, 16]), r"32.5 is not an integer"),
    (dict(label_noise=[0.1, 1.5, 0.0]), r"label_noise must be a fraction in \[0, 1\)"),
    (dict(label_noise="abc"), r"label_noise must be a number"),
])
def test_study_refuses_bad_sweeps_before_any_work(tmp_path, monkeypatch, kw, match):
    import fastcurv.datasets

    monkeypatch.setattr(fastcurv.datasets, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    with pytest.raises(ValueError, match=match):
        fastcurv.study(**TINY, replicas=3, out=tmp_path, **kw)


def test_a_replica_does_not_depend_on_when_its_group_mates_stop():
    """One batch size, one SGD setting, replicas stopping at target_loss in different epochs: before the
    twenty-sixth round a replica's group took another (coefficient) update path once a group mate had
    stopped, and its full training-set loss was one product for the group, rounded by the group's size,
    so the models and losses depended on chunk_size (3e-8 in the parameters, 1.2e-7 in the losses, in
    float32), contrary to the docstring, and a batch-size sweep could not equal the one-size runs."""
    x, y = _data()
    kw = dict(seeds=[0, 1, 2, 3], lr=0.1, epochs=30, target_loss=0.9, batch_size=40, progress=False)
    a, ha = train_population(_mlp, x, y, **kw)
    b, hb = train_population(_mlp, x, y, chunk_size=1, **kw)
    assert len(set(ha.epochs_run)) == 4  # (they stop in four different epochs)
    assert all(_same(u, v) for u, v in zip(_flat(a), _flat(b)))
    assert np.array_equal(np.array(ha.train_loss), np.array(hb.train_loss), equal_nan=True)


def test_label_noise_given_as_float32_resumes_and_int8_labels_are_not_overflowed(tmp_path):
    """The checkpoint recorded the raw fractions, so 0.1 given as a float32 (0.10000000149) was
    refused on resume ("label_noise 0.1 x 2 -> 0.1 x 2") though the labels are the same: it records
    how many labels each replica has wrong. And ``noisy_labels`` added the shift in the labels' dtype:
    int8 labels of 100 classes overflowed (136 of 1000 labels differed from int64's)."""
    x, y = _data()
    path = tmp_path / "n.pt"
    train_population(_mlp, x, y, seeds=[0, 1], label_noise=0.1, epochs=1, checkpoint=path, progress=False)
    train_population(_mlp, x, y, seeds=[0, 1], label_noise=np.float32(0.1), epochs=2, checkpoint=path, progress=False)
    yy = torch.randint(0, 100, (1000,), generator=torch.Generator().manual_seed(0))
    want = noisy_labels(yy, 0.5, 3, 100)
    got = noisy_labels(yy.to(torch.int8), 0.5, 3, 100)
    assert got.dtype == torch.int8 and torch.equal(got.long(), want)
    assert int((want != yy).sum()) == 500
