"""Function-preserving reparameterizations, the invariance audit, and per-measure invariance."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fastcurv
from fastcurv import reparam

from _measure_models import make_data, make_replicas, train, single_thread  # noqa: F401  (autouse fixture)
from fake_device import OnOtherDevice


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
    with pytest.raises(TypeError, match=r"not a single module; wrap it as \[model\]"):
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


def _wn_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Linear(4, 4, bias=False), nn.ReLU(),
                      nn.Linear(4, 3, bias=False)).double()
    torch.nn.utils.parametrizations.weight_norm(m[2])
    return m


def test_parametrized_layers_are_refused():
    """On a weight_norm (or spectral_norm, ...) layer ``layer.weight`` is recomputed at each access, so
    the in-place rescaling scaled a temporary: rescale_layers(alpha=10) reported an output change of 0
    with layer '2' unchanged, and the audit labelled lambda_max and trace invariant (ratio 1.0, for a
    transform that should move them ~100x). Old-style torch.nn.utils.weight_norm failed with torch's
    raw deepcopy RuntimeError."""
    import warnings

    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    for call in (lambda ms: reparam.rescale_layers(ms, alpha=10, probe=x), lambda ms: reparam.balance(ms),
                 lambda ms: reparam.rescale_neurons(ms, torch.ones(4)),
                 lambda ms: fastcurv.invariance_audit(ms, (x, y), measures=("lambda_max",))):
        with pytest.raises(ValueError, match=r"layer '2' has a parametrized \(_WeightNorm\) weight.*"
                                             r"remove_parametrizations\(layer, 'weight'\)"):
            call([_wn_mlp()])
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).double()
    torch.nn.utils.parametrizations.spectral_norm(bn[0])
    with pytest.raises(ValueError, match=r"layer '0' has a parametrized \(_SpectralNorm\) weight"):
        reparam.fold_batchnorm([bn])
    old = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (old-style weight_norm is deprecated)
        torch.nn.utils.weight_norm(old[4])
    with pytest.raises(ValueError, match=r"layer '4' has a computed \(old-style.*remove_weight_norm"):
        reparam.rescale_layers([old])
    with pytest.raises(ValueError, match="cannot be copied.*remove_weight_norm"):  # (layers '0' and '2' are plain)
        reparam.rescale_layers([old], layers=("0", "2"))


def _bn_mlp(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        m[1].running_mean.normal_(), m[1].running_var.uniform_(0.5, 2)
    return m


def test_folding_under_batch_statistics_is_caught():
    """The function check ran in eval mode whatever the audit's bn_mode: fold_batchnorm under
    bn_mode="batch" reported an output change of 1e-16 and no warning, while the function the
    measures see changed (the audit's loss row moved by 1-10%, lambda_max by a factor 0.15-0.53)."""
    models = [_bn_mlp(0), _bn_mlp(1)]
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    with pytest.raises(ValueError, match="with bn_mode='batch' each BatchNorm normalizes by the batch's own"):
        fastcurv.invariance_audit(models, (x, y), measures=("lambda_max",), transform="fold_batchnorm", bn_mode="batch")
    with pytest.raises(ValueError, match="fold only for bn_mode='eval'"):
        reparam.fold_batchnorm(models, bn_mode="batch")
    # a custom transform that folds: the probe runs with batch statistics, and the loss row is checked
    with pytest.warns(RuntimeWarning, match=r"not function-preserving.*full-data loss moved on replicas \[0, 1\]"):
        fastcurv.invariance_audit(models, [(x[:20], y[:20]), (x[20:], y[20:])], measures=("lambda_max",),
                                  transform=lambda ms: reparam.fold_batchnorm(ms), bn_mode="batch", max_iter=5)
    assert reparam.fold_batchnorm(models, probe=x).function_changed is False  # (in eval mode folding is exact)


def _tanh_net(seed, bias0=50.0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        m[4].bias.copy_(torch.tensor([bias0, 0.0, 0.0]))  # (no argmax flips: only the output change tells)
    return m


def test_a_nan_replica_first_does_not_hide_the_change():
    """max() over the replicas' changes returned NaN when the NaN replica came first (nan > 1e-2 is
    False): max_output_change NaN and no warning, where the same replica last gave 0.586 and the warning."""
    good = [_tanh_net(0), _tanh_net(1)]
    bad = _tanh_net(2)
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    x = torch.randn(64, 5, dtype=torch.float64)
    results = []
    for models, where in ((good + [bad], 2), ([bad] + good, 0)):
        with pytest.warns(RuntimeWarning, match=rf"not function-preserving.*replicas \[{where}\] had non-finite"):
            res = reparam.rescale_layers(models, alpha=10, probe=x)
        assert res.details["nonfinite_replicas"] == [where] and res.function_changed
        results.append(res)
    assert results[0].max_output_change == results[1].max_output_change > 0.1


def test_fold_refuses_a_batchnorm_that_does_not_follow_its_layer():
    """fold_batchnorm folded a BatchNorm that follows a ReLU (Linear -> ReLU -> BatchNorm) into the
    Linear before the ReLU: the output changed by 0.175, silently without probe=, and with one the
    warning advised fold_batchnorm, the transform that had just failed."""
    m = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 3)).double().eval()
    with pytest.raises(ValueError, match=r"BatchNorm '2' follows ReLU '1', not a Linear/Conv"):
        reparam.fold_batchnorm([m])

    class Functional(nn.Module):  # registration order conv, bn; forward puts a ReLU between them
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.out = nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

        def forward(self, x):
            return self.out(self.bn(torch.relu(self.fc(x))))

    x = torch.randn(20, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"BatchNorm 'bn' is registered after 'fc' but in forward does not take its "
                                         "output as is"):
        reparam.fold_batchnorm([Functional().double()], probe=x)
    # Identity and Dropout between a layer and its BatchNorm are fine; the hint for a fold names the fold
    ok = nn.Sequential(nn.Linear(5, 6), nn.Identity(), nn.Dropout(0.3), nn.BatchNorm1d(6), nn.ReLU(),
                       nn.Linear(6, 3)).double()
    res = reparam.fold_batchnorm([ok], probe=x)
    assert res.details["folded"] == 1 and res.max_output_change < 1e-12
    assert reparam.preservation_hint(ok, fold=True).startswith("fold_batchnorm folds each BatchNorm")


def test_an_in_place_custom_transform_is_refused():
    """A callable transform that rescaled the given models in place made the audit compare each model
    with itself: lambda_max "invariant" (ratio 1.0) under a Dinh rescaling, with "before" values
    [24.2, 14.2] computed on the rescaled models where the untouched ones give [0.61, 0.63]."""
    models = make_replicas(R=2)
    x, y = _x(make_data()), torch.cat([b[1] for b in make_data()])

    def in_place(ms):
        with torch.no_grad():
            for m in ms:
                m[2].weight.mul_(10), m[2].bias.mul_(10), m[4].weight.div_(10)
        return ms

    with pytest.raises(ValueError, match=r"changed the models it was given in place \(replica 0: parameter '2.weight', "
                                         r"parameter '2.bias', parameter '4.weight'\)"):
        fastcurv.invariance_audit(models, (x, y), measures=("lambda_max",), transform=in_place)
    # a transform of copies is audited against the untouched models
    fresh = make_replicas(R=2)
    audit = fastcurv.invariance_audit(fresh, (x, y), measures=("lambda_max",), tol=1e-8,
                                      transform=lambda ms: in_place([__import__("copy").deepcopy(m) for m in ms]))
    want = fastcurv.batched_sharpness(make_replicas(R=2), (x, y), measures=("lambda_max",), tol=1e-8)["lambda_max"]
    torch.testing.assert_close(audit.per_replica["lambda_max"][0], want.double(), rtol=1e-6, atol=0)
    assert not audit.table.loc["lambda_max", "invariant"]


def test_the_function_check_is_relative_to_the_output_scale():
    """The check was absolute (an output moving by more than 0.01): a Tanh regression net with outputs
    of about 1e-3 whose outputs the Dinh transform moved by 8e-4 (78% relative) passed silently, and
    the audit compared different functions (loss ratio 0.79, lambda_max x3.0)."""
    import warnings

    torch.manual_seed(0)
    x = torch.randn(64, 5, dtype=torch.float64)
    small = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    with torch.no_grad():
        small[4].weight.mul_(3e-3), small[4].bias.zero_()
    with pytest.warns(RuntimeWarning, match="not function-preserving"):
        res = reparam.rescale_layers([small], alpha=10, probe=x)
    assert res.max_output_change < 1e-2 and res.relative_output_change > 0.1 and res.function_changed
    # function-preserving transforms in float32 stay quiet (rounding is far below the tolerance)
    models = [m.float() for m in train(make_replicas(R=2), make_data(), steps=50)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe = _x(make_data()).float()
        for res in (reparam.rescale_layers(models, alpha=10, probe=probe), reparam.balance(models, probe=probe)):
            assert res.function_changed is False and res.relative_output_change < 1e-5


def test_the_audit_says_when_the_transform_changed_nothing():
    """The audit ignored every warning of the transform: fold_batchnorm's "no BatchNorm to fold" was
    swallowed on a BatchNorm-free MLP, and every measure, lambda_max included, came out invariant."""
    models = make_replicas(R=2)
    loader = make_data()
    with pytest.raises(ValueError, match="no BatchNorm to fold, so the audit would compare them with themselves"):
        fastcurv.invariance_audit(models, loader, measures=("lambda_max",), transform="fold_batchnorm")
    with pytest.warns(RuntimeWarning, match="left every parameter and buffer of the models unchanged"):
        fastcurv.invariance_audit(models, loader, measures=("lambda_max",), transform=lambda ms: ms, max_iter=5)


def test_the_audit_loss_row_uses_the_audits_loss_settings():
    """The loss row forwarded only loss/reduction/bn_mode: with a callable loss and
    loss_reduction="sum" it showed a loss of about 136 where the measures' loss is 2.12 (64x, the batch size)."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    models = [nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2)).double() for _ in range(2)]

    def loss(out, t):
        return ((out - t) ** 2).sum()

    audit = fastcurv.invariance_audit(models, (x, y), measures=("lambda_max",), loss=loss, loss_reduction="sum",
                                      max_iter=5)
    want = fastcurv.HessianOperator(models, (x, y), loss=loss, loss_reduction="sum").loss_and_gradient()[0]
    torch.testing.assert_close(audit.per_replica["loss"][0], want.double(), rtol=1e-12, atol=0)


def test_rescaling_diagnosis_names_skip_connections_and_needs_no_probe_for_known_activations():
    """On a ReLU residual net the warning blamed "ReLU-like activations" (there were only ReLUs) and
    never named the skip connection; without probe=, a GELU between the rescaled layers changed the
    outputs by 0.14 silently."""
    import warnings

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.a, self.b, self.out = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.relu(self.inp(x))
            return self.out(torch.relu(h + self.b(torch.relu(self.a(h)))))

    torch.manual_seed(0)
    x = torch.randn(32, 5, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="probably not consecutive in forward: a skip/residual connection"):
        reparam.rescale_layers([Res().double()], alpha=10, probe=x)
    gelu = nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    with pytest.warns(RuntimeWarning, match=r"not function-preserving.*pass probe=.*GELU '1' is not positively "
                                            "homogeneous"):
        reparam.rescale_layers([gelu], alpha=10, layers=("0", "2"))
    with warnings.catch_warnings():  # the default pair ('2', '4') has only a ReLU between them
        warnings.simplefilter("error")
        reparam.rescale_layers([gelu], alpha=10)


def test_the_audit_refuses_bad_data_with_batched_sharpness_messages():
    """The audit read its probe inputs before any check: a Dataset of single samples was concatenated
    into one [N*d] "batch" (RuntimeError: mat1 and mat2 shapes cannot be multiplied) and an empty
    loader gave torch.cat's "expected a non-empty list of Tensors"; it now says what batched_sharpness
    says."""
    models = make_replicas(R=2)
    x, y = make_data()[0]
    for data, words in [(torch.utils.data.TensorDataset(x, y), r"the data yields single samples \(a Dataset\?\)"),
                        ([], r"the data loader yielded no batches \(empty loader\)"),
                        ([(x[:0], y[:0])], "the data loader yielded only empty batches")]:
        for fn in (fastcurv.batched_sharpness, fastcurv.invariance_audit):
            with pytest.raises(ValueError, match=words):
                fn(models, data, measures=("lambda_max",))


def test_the_transforms_take_a_module_list_and_name_entries_that_are_not_modules():
    """rescale_layers / balance / fold_batchnorm refused an nn.ModuleList of replicas as "a single
    nn.Module; wrap it as [model]" (which would make the list one replica), a str entry raised
    AttributeError 'str' object has no attribute 'named_modules', and a ReplicaSet "'ReplicaSet'
    object is not iterable": they now read a ModuleList as its modules and say what the other entry
    points say."""
    from fastcurv.replicas import ReplicaSet

    models, bn = make_replicas(R=2), [_bn_mlp(0), _bn_mlp(1)]
    for fn, ms in [(lambda m: reparam.rescale_layers(m, alpha=3.0), models), (reparam.balance, models),
                   (reparam.fold_batchnorm, bn)]:
        got, want = fn(nn.ModuleList(ms)).models, fn(ms).models
        assert len(got) == 2
        for a, b in zip(got, want):
            for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
                assert torch.equal(p, q), n
        with pytest.raises(TypeError, match="replica 1 is a str, not an nn.Module"):
            fn([ms[0], "oops"])
        with pytest.raises(TypeError, match="a ReplicaSet is taken by HessianOperator"):
            fn(ReplicaSet(ms))
    with pytest.raises(ValueError, match="models is empty"):
        reparam.rescale_layers([])


def test_a_cnn_study_with_batch_statistics_is_refused_before_training(monkeypatch):
    """study(model="cnn", sharpness_kwargs={"bn_mode": "batch"}) trained, then folded every BatchNorm
    into its conv with the running statistics for the audit: copies that are not the measured
    functions (batch statistics), so the audit compared other functions' curvature (fold_batchnorm
    now raises for bn_mode="batch", but only after all the training). It is refused before training;
    without the audit it trains."""
    class Trained(Exception):
        pass

    def trained(*a, **k):
        raise Trained

    monkeypatch.setattr("fastcurv.train.train_population", trained)
    kw = dict(data="digits", model="cnn", hidden=(3, 4), replicas=2, epochs=1, n_boot=20, progress=False,
              verbose=False, measures=("lambda_max",), sharpness_kwargs={"bn_mode": "batch"})
    with pytest.raises(ValueError, match=r"model='cnn' with sharpness_kwargs bn_mode='batch'.*audit=False"):
        fastcurv.study(**kw)
    with pytest.raises(Trained):
        fastcurv.study(**kw, audit=False)


def test_fold_batchnorm_folds_a_sync_batchnorm():
    """fold_batchnorm knew BatchNorm1d/2d/3d only: a SyncBatchNorm model got "no BatchNorm to fold"
    and came back unchanged. Now folded: the same eval-mode function without the BatchNorm."""
    torch.manual_seed(0)
    models = []
    for _ in range(2):
        m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.SyncBatchNorm(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)).double()
        m[1].running_mean.uniform_(-1, 1), m[1].running_var.uniform_(0.5, 2), m[1].weight.data.uniform_(0.5, 2)
        models.append(m.eval())
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    folded = reparam.fold_batchnorm(models).models
    for m, f in zip(models, folded):
        assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in f.modules())
        torch.testing.assert_close(f(x), m(x))


def test_audit_loss_that_became_infinite_counts_as_moved():
    """A finite loss that became +inf counted as unmoved (|inf - b| <= rtol * inf reads inf <= inf), so a
    transform that sent the full-data loss from 1.09 to inf outside the probe passed without a warning."""
    from fastcurv.audit import _loss_moved

    inf, nan = float("inf"), float("nan")
    assert _loss_moved(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([inf, nan, 2.0]), torch.float32) == [0, 1]
    assert _loss_moved(torch.tensor([inf, nan]), torch.tensor([inf, 1.0]), torch.float32) == []  # not finite before


def test_bn_mode_none_reads_as_eval_in_the_transforms_and_the_audit():
    """bn_mode=None runs in batched_sharpness (= "eval") but the transforms and the audit refused it, so a
    study with sharpness_kwargs={"bn_mode": None} trained and measured, then failed in its audit."""
    models = make_replicas(R=1)
    x = torch.randn(20, models[0][0].in_features, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    assert reparam.rescale_layers(models, alpha=2.0, probe=x, bn_mode=None).max_output_change < 1e-9
    res = fastcurv.invariance_audit(models, (x, y), measures=("trace",), bn_mode=None)
    assert res.table.loc["loss", "invariant"]
    bn = [nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).eval()]
    assert reparam.fold_batchnorm(bn, bn_mode=None).details["folded"] == 1
    with pytest.raises(ValueError, match="bn_mode must be one of"):
        reparam.balance(models, bn_mode="train")


class _PadConv(nn.Module):
    """A conv with hand-made "same" padding (as TF ports write it); ``relu=True`` applies F.relu after it."""

    def __init__(self, relu=False):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 4, 3), relu

    def forward(self, x):
        y = self.conv(nn.functional.pad(x, (1, 1, 1, 1)))
        return nn.functional.relu(y) if self.relu else y


def _padconv_model(relu=False):
    m = nn.Sequential(_PadConv(relu), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)).double().eval()
    with torch.no_grad():
        m[1].running_mean.normal_(), m[1].running_var.uniform_(0.5, 2)
    return m


def test_fold_after_a_custom_module_ending_in_its_conv_is_checked_with_the_probe():
    """A BatchNorm after a custom module whose forward ends in its conv was refused ("folding it would change
    the function"), although the fold is exact: nothing was carried out of a non-Sequential module. Its last
    layer is now a candidate, folded when the probe shows the BatchNorm taking that conv's output; the same
    module with F.relu after the conv (the unsafe case) is still refused, and without a probe it asks for one."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    res = reparam.fold_batchnorm([_padconv_model()], probe=x)
    assert res.details["folded"] == 1 and res.max_output_change < 1e-12
    with pytest.raises(ValueError, match="pass probe="):
        reparam.fold_batchnorm([_padconv_model()])
    with pytest.raises(ValueError, match="does not take its output as is"):
        reparam.fold_batchnorm([_padconv_model(relu=True)], probe=x)
    with pytest.raises(ValueError, match="does not take its output as is"):
        fastcurv.invariance_audit([_padconv_model(relu=True)], (x, torch.randint(0, 3, (16,))),
                                  transform="fold_batchnorm", measures=("trace",))


def test_audit_loss_row_reads_a_shuffled_loader_once():
    """With DataLoader(shuffle=True, drop_last=True) the before and after losses came from two passes that
    dropped different samples: an exact Dinh rescaling was reported "not function-preserving" (loss ratio
    1.006), blaming a skip connection, although the probe saw output changes of 1.5e-7."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(300, 10), torch.randint(0, 3, (300,))
    models = [nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)) for _ in range(2)]
    dl = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, drop_last=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*function-preserving")
        res = fastcurv.invariance_audit(models, dl, measures=("trace",))
    assert res.table.loc["loss", "ratio_min"] == pytest.approx(1, abs=1e-5)
    assert res.table.loc["loss", "ratio_max"] == pytest.approx(1, abs=1e-5)


def test_audit_with_a_shuffled_loader_too_large_for_the_budget_reads_it_twice():
    """The loss row read every shuffled DataLoader whole into memory: with a memory_budget that
    batched_sharpness runs within, the audit failed with "too small for the batches of this one-pass
    generator" (a generator the caller never passed). Now such a loader is read twice, streamed."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(4000, 200), torch.randint(0, 3, (4000,))  # 3.1 MiB of inputs
    models = [nn.Sequential(nn.Linear(200, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)]
    dl = DataLoader(TensorDataset(x, y), batch_size=200, shuffle=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*function-preserving|.*loss moved")
        res = fastcurv.invariance_audit(models, dl, measures=("lambda_max",), max_iter=2, memory_budget="2MiB")
    assert res.table.loc["loss", "ratio_max"] == pytest.approx(1, abs=1e-5)  # (drop_last=False: the same samples)


class _Noisy(torch.utils.data.Dataset):
    """Random augmentation: other inputs at every read."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.3 * torch.randn_like(self.x[i]), self.y[i]


class _RandomHalf(torch.utils.data.Sampler):
    """A batch sampler: a random half of 120 samples per pass."""

    def __iter__(self):
        idx = torch.randperm(120)[:60].tolist()
        return iter([idx[i:i + 20] for i in range(0, 60, 20)])

    def __len__(self):
        return 3


def test_audit_loss_row_with_a_random_batch_sampler_or_an_augmented_dataset():
    """The loss row read a DataLoader twice whenever its sampler was a SequentialSampler, which it also is
    with a custom batch_sampler: an exact Dinh rescaling (output change 9e-8) over a random half per pass
    was reported "not function-preserving" (loss ratios 1.003, 0.996); the same with shuffle=False over a
    randomly augmented dataset. Now such a batch_sampler is read once (no warning), and a loss moved by
    augmentation (undetectable) only says so, as the probe saw no change."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(120, 6), torch.randint(0, 3, (120,))
    models = [nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
              for _ in range(2)]
    kw = dict(measures=("lambda_max",), max_iter=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*function-preserving|.*loss moved")
        res = fastcurv.invariance_audit(models, DataLoader(TensorDataset(x, y), batch_sampler=_RandomHalf()), **kw)
    assert res.table.loc["loss", "ratio_max"] == pytest.approx(1, abs=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastcurv.invariance_audit(models, DataLoader(_Noisy(x, y), batch_size=40), **kw)
    said = [str(w.message) for w in caught if "loss moved" in str(w.message)]
    assert len(said) == 1 and "changed no output on the probe" in said[0] and "random augmentation" in said[0]
    assert not any(reparam.NOT_PRESERVING in str(w.message) for w in caught)


def test_audit_accepts_batches():
    """invariance_audit on a fastcurv.data.Batches (which batched_sharpness takes) failed with "TypeError:
    batch 0: inputs and targets must be tensors, got int and Tensor": its (index, x, y) were read as pairs."""
    from fastcurv.data import Batches

    models = make_replicas(R=2)
    x, y = torch.randn(30, models[0][0].in_features, dtype=torch.float64), torch.randint(0, 3, (30,))
    res = fastcurv.invariance_audit(models, Batches((x, y), device="cpu", dtype=torch.float64),
                                    measures=("trace",))
    assert res.table.loc["loss", "ratio_max"] == pytest.approx(1, abs=1e-9)
    assert res.transform.max_output_change < 1e-9


class _LinActBN(nn.Module):
    """A Linear then a BatchNorm, registered in that order, with an activation between them in forward."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(6, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(torch.relu(self.lin(x)))


def test_fold_inside_a_custom_module_without_probe_warns():
    """Without a probe, fold_batchnorm folded a BatchNorm registered after a Linear inside a custom module
    whose forward applies ReLU between them: another function (outputs 0.42 off, 2 of 50 predictions
    flipped), silently. Now it warns, naming the BatchNorm and asking for probe=; inside nn.Sequential the
    fold stays silent."""
    torch.manual_seed(0)
    m = nn.Sequential(_LinActBN(), nn.Linear(8, 3)).double().eval()
    with torch.no_grad():
        m[0].bn.running_mean.uniform_(-1, 1), m[0].bn.running_var.uniform_(0.5, 2)
    with pytest.warns(RuntimeWarning, match=r"BatchNorm '0\.bn' folded unverified.*pass probe="):
        reparam.fold_batchnorm([m])
    with pytest.raises(ValueError, match="does not take its output as is"):
        reparam.fold_batchnorm([m], probe=torch.randn(10, 6, dtype=torch.float64))
    seq = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reparam.fold_batchnorm([seq]).details["folded"] == 1


def test_audit_loss_row_of_an_uncached_batches_over_a_shuffled_loader():
    """A fastcurv.data.Batches was taken as frozen, but one that does not cache reads its loader
    again on every pass: over a shuffled loader with drop_last the before / after losses covered
    other samples, and a function-preserving Dinh rescaling got "the full-data loss moved"."""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from fastcurv.data import Batches

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double() for _ in range(2)]
    ds = TensorDataset(torch.randn(50, 4), torch.randint(0, 3, (50,)))
    loader = DataLoader(ds, batch_size=16, shuffle=True, drop_last=True)
    data = Batches(loader, device="cpu", dtype=torch.float64, cache=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fastcurv.invariance_audit(models, data, measures=("trace",), transform="dinh", alpha=10, seed=0)
    assert not [w for w in seen if "loss moved" in str(w.message)]


def test_unit_scales_go_to_the_device_of_the_weights():
    """The rescalings moved their per-unit scales to the weights' dtype but not to their device: the
    scales are built on the CPU, so ``invariance_audit`` (its default "dinh", and "neurons"),
    ``rescale_layers`` and ``rescale_neurons`` raised "Expected all tensors to be on the same device"
    on CUDA models. Without a GPU the other direction shows the same in ``_scale_units``, which they
    all call: scales that say they are on "cuda" (``OnOtherDevice``) for CPU layers now give the
    result of CPU scales."""
    scales = torch.tensor([0.5, 2.0, 3.0, 1.0, 0.25, 4.0, 1.5, 8.0], dtype=torch.float64)
    want, got = make_replicas(R=1)[0], make_replicas(R=1)[0]  # Linear 6-8, ReLU, Linear 8-7, ...
    reparam._scale_units(want[0], want[2], scales)
    reparam._scale_units(got[0], got[2], OnOtherDevice(scales))
    for (name, p), q in zip(got.named_parameters(), want.parameters()):
        assert p.device.type == "cpu" and torch.equal(p, q), name
    assert not torch.equal(want[0].weight, make_replicas(R=1)[0][0].weight)


@pytest.mark.gpu
@pytest.mark.parametrize("transform", ["dinh", "neurons"])
def test_audit_of_cuda_models_matches_the_cpu(transform):
    """``invariance_audit`` (and so ``rescale_layers`` / ``rescale_neurons``) on ``.cuda()`` models
    raised a device mismatch; it now gives the CPU audit's table."""
    loader = make_data()
    models = train(make_replicas(R=2), loader, steps=50)
    measures = ("lambda_max", "trace", "fisher_rao")
    kw = dict(measures=measures, transform=transform, alpha=5.0, tol=1e-9, max_iter=60)
    cpu = fastcurv.invariance_audit(models, loader, **kw).table
    gpu = fastcurv.invariance_audit([copy.deepcopy(m).cuda() for m in models], loader, **kw).table
    assert list(gpu.index) == list(cpu.index)
    assert (gpu["invariant"] == cpu["invariant"]).all()
    for col in ("ratio_min", "ratio_max"):
        torch.testing.assert_close(torch.tensor(gpu[col].to_numpy(float)), torch.tensor(cpu[col].to_numpy(float)),
                                   rtol=1e-6, atol=1e-9)


class _TupleOut(nn.Module):
    """A ReLU MLP whose forward returns ``(logits, their sum)`` or ``{"logits": logits}``."""

    def __init__(self, as_dict=False):
        super().__init__()
        self.as_dict = as_dict
        self.m = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x):
        z = self.m(x)
        return {"logits": z} if self.as_dict else (z, z.sum())


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_model_returning_a_tuple_or_dict_gets_the_clear_type_error(as_dict):
    """The probe's forward (``reparam._outputs``) returned the model's output unchecked, so
    ``invariance_audit`` and every transform given ``probe=`` raised torch's raw "isfinite():
    argument 'input' (position 1) must be Tensor, not tuple"; they now raise the TypeError every
    other entry point raises (``replicas.check_output``), in both BatchNorm modes."""
    torch.manual_seed(0)
    models = [_TupleOut(as_dict) for _ in range(2)]
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    words = f"the model returns a {'dict' if as_dict else 'tuple'}; fastcurv needs one tensor of outputs"
    with pytest.raises(TypeError, match=words):
        fastcurv.invariance_audit(models, (x, y), measures=("lambda_max",))
    for bn_mode in ("eval", "batch"):
        with pytest.raises(TypeError, match=words):
            reparam.rescale_layers(models, alpha=2.0, layers=("m.0", "m.2"), probe=x, bn_mode=bn_mode)
