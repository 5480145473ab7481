"""Function-preserving reparameterizations, the invariance audit, and per-measure invariance."""
import pytest
import torch
from torch import nn

import fastcurv
from fastcurv import reparam

from _measure_models import make_data, make_replicas, train, single_thread  # noqa: F401  (autouse fixture)


def _x(loader):
    return torch.cat([b[0] for b in loader])


def test_dinh_rescaling_preserves_function_and_scales_hessian_blocks_exactly():
    models = make_replicas(R=2)
    loader = make_data()
    alpha = 10.0
    res = reparam.rescale_layers(models, alpha=alpha, layers=("2", "4"), probe=_x(loader))
    assert res.max_output_change < 1e-12 and int(res.predictions_changed.sum()) == 0
    assert torch.equal(models[0][2].weight, make_replicas(R=2)[0][2].weight)  # inputs untouched
    H = fastcurv.HessianOperator(models, loader).dense(0)
    H2 = fastcurv.HessianOperator(res.models, loader).dense(0)
    # theta' = D theta with D = alpha on layer "2" (weight, bias), 1/alpha on "4".weight: H' = D^-1 H D^-1
    sizes = [p.numel() for p in models[0].parameters()]
    d = torch.cat([torch.full((n,), f, dtype=torch.float64) for n, f in zip(sizes, [1, 1, alpha, alpha, 1 / alpha, 1])])
    assert torch.allclose(H2, H / torch.outer(d, d), rtol=1e-9, atol=1e-12)


def test_seed_result_alpha_10_inflates_lambda_max_about_100x():
    """Bennett's seed result: alpha = 10 multiplies lambda_max by about alpha^2 = 100 with zero
    prediction changes. Exactly: alpha^2 lambda_max(H_bb) <= lambda_max' <= alpha^2 lambda_max, with
    H_bb the Hessian block of the layer divided by alpha (bias-free net: the output layer)."""
    loader = make_data(n=96)
    models = train(make_replicas(R=2, bias=False), loader, steps=100, lr=0.3)
    audit = fastcurv.invariance_audit(models, loader, measures=("lambda_max", "trace", "fisher_rao"), alpha=10.0,
                                      tol=1e-7)
    t = audit.table
    assert t.attrs["predictions_changed"] == 0 and t.attrs["max_output_change"] < 1e-10
    assert t.loc["fisher_rao", "invariant"] and t.loc["loss", "invariant"]
    assert not t.loc["lambda_max", "invariant"]
    before, after = audit.per_replica["lambda_max"]
    for r, m in enumerate(models):
        H = fastcurv.HessianOperator([m], loader).dense(0)
        nb = m[-1].weight.numel()
        lam_b = torch.linalg.eigvalsh(H[-nb:, -nb:])[-1]
        assert 100 * lam_b * (1 - 1e-5) <= after[r] <= 100 * before[r] * (1 + 1e-5)
    assert t.loc["lambda_max", "ratio_min"] > 10  # more than an order of magnitude; 100x when the output block dominates
    # the curvature of the unchanged models computed once elsewhere (as the study does) is reused as is
    pre = fastcurv.batched_sharpness(models, loader, measures=("lambda_max", "trace", "fisher_rao", "spectrum"), tol=1e-7)
    reused = fastcurv.invariance_audit(models, loader, measures=("lambda_max", "trace", "fisher_rao"), alpha=10.0,
                                       tol=1e-7, before=pre)
    assert list(reused.table.index) == list(t.index)
    assert torch.equal(reused.per_replica["lambda_max"][0], pre["lambda_max"].double().cpu())
    torch.testing.assert_close(reused.per_replica["lambda_max"][1], after, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="before holds results for 2 replicas, the audit has 1"):
        fastcurv.invariance_audit(models[:1], loader, measures=("lambda_max",), before=pre)
    with pytest.raises(ValueError, match="before has no column 'trace'"):
        fastcurv.invariance_audit(models, loader, measures=("lambda_max", "trace"),
                                  before=fastcurv.batched_sharpness(models, loader, measures=("lambda_max",)))


INVARIANT = ("fisher_rao", "adaptive_avg_rho_sharpness", "adaptive_rho_sharpness", "relative_flatness")
NOT_INVARIANT = ("lambda_max", "rho_sharpness", "avg_rho_sharpness", "mw_sharpness", "epsilon_sharpness",
                 "josz_variation", "ggn_lambda_max", "fisher_lambda_max")
OPTIONS = {"avg_rho_sharpness": {"n_samples": 8}, "adaptive_avg_rho_sharpness": {"n_samples": 8},
           "mw_sharpness": {"n_samples": 8, "rho": 0.5}, "adaptive_rho_sharpness": {"n_iter": 10},
           "rho_sharpness": {"n_iter": 10}, "relative_flatness": {"method": "exact"}, "josz_variation": {"n_iter": 10}}


@pytest.mark.parametrize("transform", ["dinh", "neurons"])
def test_invariance_per_measure(transform, tmp_path):
    loader = make_data()
    models = train(make_replicas(R=2), loader, steps=100)
    audit = fastcurv.invariance_audit(models, loader, measures=INVARIANT + NOT_INVARIANT, transform=transform,
                                      alpha=5.0, rtol=1e-6, measure_options=OPTIONS, max_iter=60, tol=1e-6,
                                      path=tmp_path / "audit.png")
    t = audit.table
    cols = {"josz_variation": "josz_V"}
    for m in INVARIANT:
        assert t.loc[cols.get(m, m), "invariant"], (m, t.loc[cols.get(m, m)].to_dict())
    for m in NOT_INVARIANT:
        assert not t.loc[cols.get(m, m), "invariant"], (m, t.loc[cols.get(m, m)].to_dict())
    assert (tmp_path / "audit.png").stat().st_size > 1000


def test_relative_flatness_needs_normalization_for_neuron_rescaling():
    loader = make_data()
    models = train(make_replicas(R=2), loader, steps=100)
    s = torch.linspace(0.2, 5.0, 7, dtype=torch.float64)
    new = reparam.rescale_neurons(models, s, probe=_x(loader)).models
    vals = {}
    for norm in (False, True):
        opts = {"relative_flatness": {"method": "exact", "normalize": norm}}
        a = fastcurv.batched_sharpness(models, loader, measures=("relative_flatness",), measure_options=opts, progress=False)
        b = fastcurv.batched_sharpness(new, loader, measures=("relative_flatness",), measure_options=opts, progress=False)
        vals[norm] = (a["relative_flatness"], b["relative_flatness"])
    assert torch.allclose(*vals[True], rtol=1e-8)
    assert not torch.allclose(*vals[False], rtol=1e-2)


def test_balance_is_canonical_and_function_preserving():
    loader = make_data()
    models = train(make_replicas(R=2), loader, steps=50)
    g = torch.Generator().manual_seed(0)
    scrambled = reparam.rescale_neurons(models, torch.exp(torch.randn(7, generator=g, dtype=torch.float64)), layers=("2", "4"))
    scrambled = reparam.rescale_neurons(scrambled.models, torch.exp(torch.randn(8, generator=g, dtype=torch.float64)),
                                        layers=("0", "2"))
    a = reparam.balance(models, probe=_x(loader), tol=1e-12, max_sweeps=2000)
    b = reparam.balance(scrambled.models, probe=_x(loader), tol=1e-12, max_sweeps=2000)
    assert a.details["converged"] and b.details["converged"]
    assert a.max_output_change < 1e-10 and int(a.predictions_changed.sum()) == 0
    for ma, mb in zip(a.models, b.models):
        for pa, pb in zip(ma.parameters(), mb.parameters()):
            assert torch.allclose(pa, pb, rtol=1e-6, atol=1e-9)
        # balanced: incoming (weights + bias) and outgoing norms agree per hidden unit
        for i, j in ((0, 2), (2, 4)):
            win = ma[i].weight.pow(2).sum(1) + ma[i].bias.pow(2)
            wout = ma[j].weight.pow(2).sum(0)
            assert torch.allclose(win, wout, rtol=1e-6)
    # the parameter norm did not grow (balancing minimizes it over the orbit)
    n0 = sum(p.pow(2).sum() for p in models[0].parameters())
    n1 = sum(p.pow(2).sum() for p in a.models[0].parameters())
    assert n1 <= n0 + 1e-12


def test_fold_batchnorm():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double() for _ in range(2)]
    for m in models:
        m.train()
        m(torch.randn(64, 6, dtype=torch.float64) * 3 + 1)  # non-trivial running statistics
        m.eval()
    loader = make_data()
    res = reparam.fold_batchnorm(models, probe=_x(loader))
    assert res.details["folded"] == 1
    assert res.max_output_change < 1e-12
    assert not any(isinstance(mod, nn.BatchNorm1d) for mod in res.models[0].modules())
    assert any(isinstance(mod, nn.BatchNorm1d) for mod in models[0].modules())  # originals untouched


def test_bad_inputs_are_named():
    models = make_replicas(R=1)
    with pytest.raises(ValueError, match="alpha must be"):
        reparam.rescale_layers(models, alpha=0.0)
    with pytest.raises(ValueError, match="scales has 3 entries"):
        reparam.rescale_neurons(models, torch.ones(3))
    with pytest.raises(ValueError, match="no module named"):
        reparam.rescale_layers(models, layers=("0", "9"))
    with pytest.raises(TypeError, match="list of replicas"):
        reparam.balance(models[0])
    with pytest.raises(ValueError, match="transform must be"):
        fastcurv.invariance_audit(models, make_data(), transform="nope")
    with pytest.raises(ValueError, match=r"scales must be \[units\] or \[R, units\] with R = 1"):
        reparam.rescale_neurons(models, torch.ones(4, 5))


def test_audit_warns_when_the_transform_changes_the_function():
    """Dinh rescaling preserves ReLU networks' functions, not Tanh ones': the audit says so."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double() for _ in range(2)]
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    with pytest.warns(RuntimeWarning, match="not function-preserving"):
        fastcurv.invariance_audit(models, (x, y), measures=("lambda_max",))


def test_a_rescaling_undone_by_batchnorm_names_it_and_the_fix():
    """Conv -> BatchNorm -> ReLU: rescaling the conv is undone by the normalization. The transform
    itself now warns (balance changed predictions silently), and the hint names the BatchNorm and
    fold_batchnorm (it blamed the activations); the folded models rescale exactly."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)).double().eval()
              for _ in range(2)]
    with torch.no_grad():
        for m in models:
            m[1].running_mean.uniform_(-1, 1), m[1].running_var.uniform_(0.5, 2)
    x = torch.randn(30, 1, 4, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"BatchNorm \('1'\).*fold_batchnorm"):
        reparam.rescale_layers(models, alpha=10, probe=x)
    folded = reparam.fold_batchnorm(models, probe=x).models
    res = reparam.rescale_layers(folded, alpha=10, probe=x)
    assert int(res.predictions_changed.sum()) == 0 and res.max_output_change < 1e-9


def test_results_print_compactly_and_folding_nothing_warns():
    """A ReparamResult printed every model (12 models flooded the screen); folding a model without
    BatchNorm returned it silently."""
    models = make_replicas(R=3)
    x = torch.randn(10, models[0][0].in_features, dtype=torch.float64)
    res = reparam.rescale_layers(models, alpha=2.0, probe=x)
    text = repr(res)
    assert text.startswith("ReparamResult(R=3, max_output_change=") and "Linear" not in text
    with pytest.warns(RuntimeWarning, match="no BatchNorm to fold"):
        reparam.fold_batchnorm(models)


def test_audit_ratio_median_is_the_median_for_an_even_number_of_replicas():
    """torch.median gave the lower of the two middle ratios (4 replicas: 43.62 for [43.16, 43.62,
    46.27, 52.35], whose median is 44.95)."""
    import numpy as np

    loader = make_data()
    models = make_replicas(R=4)
    for i, m in enumerate(models):  # different scales: four different ratios
        with torch.no_grad():
            m[0].weight.mul_(1 + 0.5 * i)
    audit = fastcurv.invariance_audit(models, loader, measures=("lambda_max", "trace"), alpha=3.0, tol=1e-8)
    for col in ("lambda_max", "trace", "loss"):
        before, after = audit.per_replica[col]
        ratios = (after / before).numpy()
        assert audit.table.loc[col, "ratio_median"] == pytest.approx(np.median(ratios), rel=1e-12)
    before, after = audit.per_replica["trace"]
    ratios = np.sort((after / before).numpy())
    assert ratios[2] - ratios[1] > 1e-3 * ratios[1]  # the two middle ratios differ: the test tells them apart


@pytest.mark.parametrize("n_measures, name", [(1, "dinh_first"), (3, "dinh_first"), (8, "dinh"),
                                              (2, "a_custom_reparameterization_with_a_rather_long_name_" * 2)])
def test_audit_plot_title_fits_in_the_figure(n_measures, name, tmp_path, monkeypatch):
    """The one-line title ran past the right edge of audit.png for 3 measures or fewer
    ("... 0 predictions cha")."""
    import pandas as pd
    from types import SimpleNamespace

    from fastcurv import audit

    table = pd.DataFrame({"ratio_median": [64.0] * n_measures, "ratio_min": [40.0] * n_measures,
                          "ratio_max": [130.0] * n_measures, "invariant": [False] * n_measures},
                         index=[f"measure_{i}" for i in range(n_measures)])
    tr = SimpleNamespace(max_output_change=1.4e-06, predictions_changed=torch.ones(1024, dtype=torch.bool))
    fig = _saved_figure(monkeypatch, lambda: audit._plot(table, tr, name, tmp_path / "audit.png"))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    title = fig.axes[0].title
    box = title.get_window_extent(canvas.get_renderer())
    assert "1024 predictions changed" in title.get_text()
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1, \
        (box, fig.bbox)


def _saved_figure(monkeypatch, draw):
    """The figure ``draw()`` saves (the last one), as it was saved."""
    import matplotlib.figure

    saved, real = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: saved.append(self) or real(self, *a, **k))
    draw()
    return saved[-1]


def test_audit_of_dict_batches_and_of_a_one_pass_generator():
    """Dict batches (keys x/y, image/label) raised KeyError 'inputs' in the audit alone; a generator
    was partly used up by the audit's probe inputs, so the curvature before missed batches and the
    one after failed with 'empty loader'."""
    loader = make_data()
    models = make_replicas(R=2)
    want = fastcurv.invariance_audit(models, loader, measures=("lambda_max",), alpha=3.0, tol=1e-8)
    for got in (fastcurv.invariance_audit(models, [{"image": x, "label": y} for x, y in loader],
                                          measures=("lambda_max",), alpha=3.0, tol=1e-8),
                fastcurv.invariance_audit(models, (b for b in loader), measures=("lambda_max",), alpha=3.0, tol=1e-8)):
        for col in ("lambda_max", "loss"):
            for a, b in zip(got.per_replica[col], want.per_replica[col]):
                assert torch.allclose(a, b, rtol=1e-6)


def test_audit_plot_marks_ratios_that_changed_sign_or_are_undefined(tmp_path, monkeypatch):
    """audit.png plotted log10 of the ratios: a ratio <= 0 (a measure that changed sign, e.g.
    avg_rho_sharpness with ratios -10.75 to 16.08) or an undefined one (no finite ratio) became NaN,
    so its whisker vanished and a negative or NaN median drew no bar at all: the least invariant
    measures looked like invariant ones at log10 = 0. Each now gets a labelled mark reaching the axis bottom."""
    import warnings

    import numpy as np
    import pandas as pd
    from types import SimpleNamespace

    from fastcurv import audit

    nan = float("nan")
    table = pd.DataFrame({"ratio_median": [1.0, 80.0, 1.25, -3.0, nan], "ratio_min": [1.0, 40.0, -10.75, -8.0, nan],
                          "ratio_max": [1.0, 130.0, 16.08, 2.0, nan], "invariant": [True, False, False, False, False]},
                         index=["loss", "lambda_max", "some_negative", "median_negative", "undefined"])
    tr = SimpleNamespace(max_output_change=1e-7, predictions_changed=torch.zeros(8, dtype=torch.bool))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = _saved_figure(monkeypatch, lambda: audit._plot(table, tr, "dinh", tmp_path / "audit.png"))
    ax = fig.axes[0]
    bottom = ax.get_ylim()[0]
    texts = {round(t.get_position()[0]): " ".join(t.get_text().split()) for t in ax.texts}
    assert texts == {2: "sign change (ratios -10.8 to 16.1)", 3: "sign change (ratios -8 to 2)",
                     4: "undefined (no finite ratio)"}
    # the lower whisker of the measure that changed sign on some replicas runs to the axis bottom
    whiskers = [seg for c in ax.collections for seg in c.get_segments()]
    some = [s for s in whiskers if np.allclose(s[:, 0], 2)]
    assert len(some) == 1 and some[0][:, 1].min() == pytest.approx(bottom)
    assert some[0][:, 1].max() == pytest.approx(np.log10(16.08))
    # a hatched bar down to the axis bottom where the median has no log
    hatched = {round(p.get_x() + p.get_width() / 2): p for p in ax.patches if p.get_hatch()}
    assert sorted(hatched) == [3, 4] and all(p.get_height() == pytest.approx(bottom) for p in hatched.values())
    assert np.log10(130.0) < ax.get_ylim()[1]
    assert not caught, [str(w.message) for w in caught]  # (log10 of the ratios <= 0 warned, the only sign of them)


def test_the_audit_plot_keeps_the_backend_and_leaves_no_figure(svg_backend, tmp_path):
    """invariance_audit(path=...) switched the whole process to the Agg backend (matplotlib.use: a
    notebook's plt.show() stopped working), and a plot whose saving failed left its figure open."""
    import matplotlib.pyplot as plt
    import pandas as pd
    from types import SimpleNamespace

    from fastcurv import audit

    open_before = plt.get_fignums()
    res = fastcurv.invariance_audit(make_replicas(R=2), make_data(), measures=("lambda_max",), alpha=3.0,
                                    path=tmp_path / "audit.png", max_iter=5)
    assert res.plot_path and (tmp_path / "audit.png").is_file()
    assert svg_backend.get_backend() == "svg" and plt.get_fignums() == open_before
    table = pd.DataFrame({"ratio_median": [9.0], "ratio_min": [8.0], "ratio_max": [10.0], "invariant": [False]},
                         index=["lambda_max"])
    tr = SimpleNamespace(max_output_change=0.0, predictions_changed=None)
    with pytest.raises(FileNotFoundError):
        audit._plot(table, tr, "dinh", tmp_path / "no such folder" / "audit.png")
    assert plt.get_fignums() == open_before
