"""rho-sharpness family, Keskar epsilon-sharpness, Mason-Williams sharpness and Josz's measures:
closed forms on a quadratic and agreement with plain per-model reference implementations."""
import copy
import math

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import nn

import fastcurv
from fastcurv.measures._ascent import apgd_ascent
from fastcurv.measures.epsilon_sharpness import epsilon_sharpness_values
from fastcurv.measures.rho_sharpness import _scale, adaptive_rho_sharpness, average_case_sharpness, worst_case_sharpness

from _measure_models import full_loss, make_data, make_replicas, set_flat, train, single_thread  # noqa: F401  (autouse fixture)
from models import mlp, replicas


def quadratic_problem(R=2):
    """Linear bias-free models with MSE on their own outputs: L is a quadratic with minimum 0 at theta."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.8, 0.5], dtype=torch.float64)
    models = []
    for r in range(R):
        torch.manual_seed(10 + r)
        models.append(nn.Linear(4, 2, bias=False).double())
    # targets per replica must equal that replica's outputs: use a callable loss on outputs only
    return models, x


def test_worst_case_l2_quadratic_closed_form():
    models, x = quadratic_problem()
    for m in models:
        y = m(x).detach()
        op = fastcurv.HessianOperator([m], (x, y), loss="mse")
        lam = torch.linalg.eigvalsh(op.dense(0))[-1]
        for rho in (0.1, 0.5):
            val, delta, _ = worst_case_sharpness(op, rho=rho, p="l2", n_iter=30, per_batch=False)
            expect = rho**2 * float(lam) / 2
            assert float(val[0]) == pytest.approx(expect, rel=1e-4)
            assert float(delta.norm()) == pytest.approx(rho, rel=1e-6)  # the maximum is on the sphere


def test_average_case_quadratic_closed_forms():
    models, x = quadratic_problem(R=1)
    m = models[0]
    op = fastcurv.HessianOperator([m], (x, m(x).detach()), loss="mse")
    H = op.dense(0)
    theta = op.replicas.flat_params()[0]
    rho = 0.3
    v, se = average_case_sharpness(op, rho=rho, n_samples=400)
    assert abs(float(v[0]) - rho**2 * float(H.trace()) / 2) < 4 * float(se[0])
    v, se = average_case_sharpness(op, rho=rho, n_samples=400, adaptive=True)
    expect = rho**2 * float((H.diagonal() * theta**2).sum()) / 2
    assert abs(float(v[0]) - expect) < 4 * float(se[0])


def _reference_avg(model, loader, rho, n, seed, adaptive):
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    c = theta.abs() if adaptive else torch.ones_like(theta)
    base = float(full_loss(model, loader))
    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    diffs = []
    with torch.no_grad():
        for _ in range(n):
            z = torch.randn(1, theta.numel(), generator=g, dtype=torch.float64)[0]
            set_flat(m, theta + rho * c * z)
            diffs.append(float(full_loss(m, loader)) - base)
    return np.mean(diffs)


@pytest.mark.parametrize("adaptive", [False, True])
def test_average_case_matches_per_model_reference(adaptive):
    models = make_replicas()
    loader = make_data()
    name = "adaptive_avg_rho_sharpness" if adaptive else "avg_rho_sharpness"
    res = fastcurv.batched_sharpness(models, loader, measures=(name,), seed=5,
                                     measure_options={name: {"rho": 0.05, "n_samples": 20}}, progress=False)
    for r, m in enumerate(models):
        ref = _reference_avg(m, loader, 0.05, 20, 5, adaptive)
        assert float(res[name][r]) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def _reference_pgd(model, loader, rho, steps=300, batch=None):
    """Plain projected gradient ascent with decaying normalized steps on the l2 ball, several starts."""
    data = loader if batch is None else [loader[batch]]
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    m = copy.deepcopy(model)
    with torch.no_grad():
        base = float(full_loss(m, data))
    best = 0.0
    for start in range(2):
        g = torch.Generator().manual_seed(100 + start)
        u = torch.randn(theta.numel(), generator=g, dtype=torch.float64)
        u = 0.5 * rho * u / u.norm()
        for t in range(steps):
            set_flat(m, theta + u)
            m.zero_grad()
            loss = full_loss(m, data)
            best = max(best, float(loss) - base)
            gr = torch.nn.utils.parameters_to_vector(torch.autograd.grad(loss, list(m.parameters())))
            u = u + rho * (0.5 * 0.99**t) * gr / gr.norm()
            u = u * min(1.0, rho / float(u.norm()))
    return best


def test_worst_case_matches_per_model_reference():
    models = train(make_replicas(R=2), make_data(), steps=100)
    loader = make_data()
    rho = 0.05  # small enough for a single maximum: local ascent and the reference must agree
    res = fastcurv.batched_sharpness(models, loader, measures=("rho_sharpness", "josz_variation"), progress=False,
                                     measure_options={"rho_sharpness": {"rho": rho, "n_iter": 60},
                                                     "josz_variation": {"r": rho, "n_iter": 60}})
    op = fastcurv.HessianOperator(models, loader)
    val, delta, _ = worst_case_sharpness(op, rho=rho, per_batch=False, n_iter=60)
    for r, m in enumerate(models):
        per_batch = sum(_reference_pgd(m, loader, rho, steps=60, batch=b) * len(loader[b][0]) for b in range(2)) / 48
        full = _reference_pgd(m, loader, rho, steps=60)
        # a maximization: at least as good as the long plain-PGD reference ...
        assert float(res["rho_sharpness"][r]) == pytest.approx(per_batch, rel=0.02)
        assert float(res["josz_V"][r]) == pytest.approx(full, rel=0.02)
        assert float(val[r]) == pytest.approx(full, rel=0.02)
        # ... and attained by a feasible perturbation (checked with the plain model)
        assert float(delta[r].norm()) <= rho * (1 + 1e-9)
        mm = copy.deepcopy(m)
        theta = torch.nn.utils.parameters_to_vector(m.parameters()).detach()
        with torch.no_grad():
            base = float(full_loss(mm, loader))
            set_flat(mm, theta + delta[r])
            assert float(full_loss(mm, loader)) - base == pytest.approx(float(val[r]), rel=1e-9)


def test_linf_worst_case_stays_in_box_and_beats_corners():
    models = make_replicas(R=2)
    loader = make_data(batches=1)
    op = fastcurv.HessianOperator(models, loader)
    theta = op.replicas.flat_params()
    val, delta, _ = worst_case_sharpness(op, rho=0.01, p="linf", adaptive=True, per_batch=False)
    assert (delta.abs() <= 0.01 * theta.abs() + 1e-12).all()
    # the sign-gradient corner is a feasible point: the search must do at least as well
    from fastcurv.measures._common import loss_at, loss_grad_at
    base, g = loss_grad_at(op, theta)
    corner = loss_at(op, theta + 0.01 * theta.abs() * g.sign()) - base
    assert (val >= corner - 1e-12).all()


def test_adaptive_rho_defaults_are_the_canonical_example():
    """Andriushchenko et al.'s canonical example: adaptive worst-case l-inf, rho = 0.001, 20 steps,
    logit-normalised (which changes the value, so the default must say which it is)."""
    models = train(make_replicas(R=2), make_data(), steps=50)
    op = fastcurv.HessianOperator(models, make_data())
    got = adaptive_rho_sharpness(op, seed=0, common=True)["adaptive_rho_sharpness"].value
    canonical, _, _ = worst_case_sharpness(op, adaptive=True, p="linf", rho=0.001, n_iter=20, normalize_logits=True)
    plain, _, _ = worst_case_sharpness(op, adaptive=True, p="linf", rho=0.001, n_iter=20)
    assert torch.equal(got, canonical)
    assert not torch.allclose(got, plain, rtol=1e-2)


def test_asam_scales_the_weights_only():
    """weights_only=True: T = |theta| + eta on the parameters named ...weight, 1 on the biases (ASAM)."""
    models = make_replicas(R=2)
    op = fastcurv.HessianOperator(models, make_data())
    theta = op.replicas.flat_params()
    c = _scale(op.replicas, theta, True, 0.01, True)
    is_weight = torch.cat([torch.full((p.numel(),), n.endswith("weight")) for n, p in models[0].named_parameters()])
    assert torch.equal(c[:, is_weight], theta[:, is_weight].abs() + 0.01) and (c[:, ~is_weight] == 1).all()
    kw = dict(seed=0, common=True, p="l2", rho=0.5, eta=0.01, n_iter=3, normalize_logits=False)

    def value(op, **extra):
        return adaptive_rho_sharpness(op, **kw, **extra)["adaptive_rho_sharpness"].value

    assert not torch.allclose(value(op, weights_only=True), value(op), rtol=1e-3)
    bias_free = fastcurv.HessianOperator(make_replicas(R=2, bias=False), make_data())  # every parameter is a weight
    assert torch.equal(value(bias_free, weights_only=True), value(bias_free))
    with pytest.raises(TypeError, match="weights_only"):
        fastcurv.batched_sharpness(models, make_data(), measures=("rho_sharpness",), progress=False,
                                   measure_options={"rho_sharpness": {"weights_only": True}})


def test_keskar_matches_lbfgsb_reference():
    models = train(make_replicas(R=2), make_data(), steps=100)
    loader = make_data()
    eps = 1e-2
    res = fastcurv.batched_sharpness(models, loader, measures=("epsilon_sharpness",), progress=False,
                                     measure_options={"epsilon_sharpness": {"eps": eps, "n_iter": 20}})
    op = fastcurv.HessianOperator(models, loader)
    for r, m0 in enumerate(models):
        m = copy.deepcopy(m0)
        theta = torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone()
        base = float(full_loss(m, loader))

        def negf(y):
            set_flat(m, theta + torch.from_numpy(y))
            m.zero_grad()
            loss = full_loss(m, loader)
            loss.backward()
            return -float(loss), -torch.nn.utils.parameters_to_vector([p.grad for p in m.parameters()]).numpy()

        hw = (eps * (theta.abs() + 1)).numpy()
        opt = scipy.optimize.minimize(negf, np.zeros_like(hw), jac=True, method="L-BFGS-B",
                                      bounds=list(zip(-hw, hw)), options={"maxiter": 10})
        ref = 100 * (-opt.fun - base) / (1 + base)
        # at least as good as Keskar's 10 L-BFGS-B iterations ...
        assert float(res["epsilon_sharpness"][r]) >= 0.97 * ref
        # ... and attained inside the box
        value, delta = epsilon_sharpness_values(op, eps=eps, n_iter=20)
        assert float(value[r]) == pytest.approx(float(res["epsilon_sharpness"][r]), rel=1e-12)
        assert (delta[r].abs() <= torch.from_numpy(hw) * (1 + 1e-9)).all()
        with torch.no_grad():
            set_flat(m, theta + delta[r])
            assert 100 * (float(full_loss(m, loader)) - base) / (1 + base) == pytest.approx(float(value[r]), rel=1e-9)


def test_mw_sharpness_matches_reference_and_perturbs_buffers():
    models = make_replicas(R=2)
    loader = make_data()
    res = fastcurv.batched_sharpness(models, loader, measures=("mw_sharpness",), seed=2, progress=False,
                                     measure_options={"mw_sharpness": {"n_samples": 10, "rho": 0.05}})
    for r, m0 in enumerate(models):
        m = copy.deepcopy(m0)
        theta = torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone()
        base = float(full_loss(m, loader))
        g = torch.Generator().manual_seed(2)
        vals = []
        with torch.no_grad():
            for _ in range(10):
                z = torch.randn(1, theta.numel(), generator=g, dtype=torch.float64)[0]
                set_flat(m, theta + 0.05 * z / math.sqrt(theta.numel()))
                vals.append(abs(float(full_loss(m, loader)) - base) / 0.05)
        assert float(res["mw_sharpness"][r]) == pytest.approx(np.mean(vals), rel=1e-9)
    # BatchNorm running statistics are perturbed too, at the parameters' scale rho / sqrt(P) (reference behaviour,
    # P the number of parameters): the value changes with them
    torch.manual_seed(0)
    bn = [nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double().eval() for _ in range(2)]
    a = fastcurv.batched_sharpness(bn, loader, measures=("mw_sharpness",), progress=False,
                                   measure_options={"mw_sharpness": {"n_samples": 5}})["mw_sharpness"]
    m = copy.deepcopy(bn[0])
    theta = torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone()
    bufs = {n: b.clone() for n, b in m.named_buffers() if b.is_floating_point()}
    base, g, vals, scale = float(full_loss(m, loader)), torch.Generator().manual_seed(0), [], 0.005 / math.sqrt(theta.numel())
    with torch.no_grad():
        for _ in range(5):
            set_flat(m, theta + scale * torch.randn(1, theta.numel(), generator=g, dtype=torch.float64)[0])
            for n, b0 in bufs.items():
                m.get_buffer(n).copy_(b0 + scale * torch.randn((1,) + tuple(b0.shape), generator=g, dtype=torch.float64)[0])
            vals.append(abs(float(full_loss(m, loader)) - base) / 0.005)
    assert float(a[0]) == pytest.approx(np.mean(vals), rel=1e-9)
    b = fastcurv.batched_sharpness(bn, loader, measures=("mw_sharpness",), progress=False,
                                   measure_options={"mw_sharpness": {"n_samples": 5, "perturb_buffers": False}})["mw_sharpness"]
    assert not torch.allclose(a, b)


def test_josz_level_distance_hits_the_level():
    models = train(make_replicas(R=2), make_data(), steps=100)
    loader = make_data()
    eps = 0.05
    res = fastcurv.batched_sharpness(models, loader, measures=("josz_level_distance",), progress=False,
                                     measure_options={"josz_level_distance": {"eps": eps, "n_bisect": 10, "n_iter": 20}})
    d = res["josz_d_eps"]
    assert bool(res.converged["josz_d_eps"].all())
    op = fastcurv.HessianOperator(models, loader)
    from fastcurv.measures.josz import variation
    above = variation(op, d * 1.05, n_iter=20)
    below = variation(op, d * 0.95, n_iter=20)
    assert (above >= eps).all() and (below < eps).all()


def test_apgd_rejects_bad_input():
    with pytest.raises(ValueError, match="p must be"):
        apgd_ascent(lambda t: None, torch.zeros(1, 3), torch.ones(1), p="l1")
    models = make_replicas(R=1)
    with pytest.raises(ValueError, match="rho must be a positive"):
        fastcurv.batched_sharpness(models, make_data(), measures=("rho_sharpness",), progress=False,
                                   measure_options={"rho_sharpness": {"rho": -1.0}})
    with pytest.raises(TypeError, match="unknown options"):
        fastcurv.batched_sharpness(models, make_data(), measures=("rho_sharpness",), progress=False,
                                   measure_options={"rho_sharpness": {"radius": 1.0}})


def test_failed_replica_is_nan_and_flagged():
    models = make_replicas(R=3)
    with torch.no_grad():
        models[1][0].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning):
        res = fastcurv.batched_sharpness(models, make_data(), measures=("rho_sharpness", "avg_rho_sharpness"),
                                         progress=False, measure_options={"avg_rho_sharpness": {"n_samples": 4}})
    for col in ("rho_sharpness", "avg_rho_sharpness"):
        assert torch.isnan(res[col][1]) and torch.isfinite(res[col][[0, 2]]).all()
    assert res.flags[1] and not res.flags[0]


def test_measures_without_a_convergence_test_have_no_convergence_entry():
    """rho- and epsilon-sharpness run a fixed number of ascent steps: no "converged" entry (it
    was always True, even after one step); a non-finite value is flagged by name instead."""
    models = replicas(lambda: mlp(nn.Tanh, (5, 6, 3)), R=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=gen)
    res = fastcurv.batched_sharpness(models, (x, y), measures=("rho_sharpness", "josz_level_distance"), progress=False,
                                     measure_options={"rho_sharpness": {"n_iter": 1}})
    assert "rho_sharpness" not in res.converged and "josz_d_eps" in res.converged
    assert res.flags == ["", ""]
    from fastcurv.measures import REGISTRY, REPLICA_NOISE, register_measure
    from fastcurv.measures._common import finish

    @register_measure("test_half_finite", replica_noise=False)
    def half_finite(op, *, seed, common):
        return {"test_half_finite": finish(op, torch.tensor([1.0, float("inf")]))}

    try:
        bad = fastcurv.batched_sharpness(models, (x, y), measures=("test_half_finite",), progress=False)
    finally:
        REGISTRY.pop("test_half_finite"), REPLICA_NOISE.pop("test_half_finite")
    assert "test_half_finite" not in bad.converged
    assert bad.flags == ["", "test_half_finite not finite"] and math.isnan(float(bad["test_half_finite"][1]))


class _ChannelsFirst(nn.Module):
    def forward(self, z):
        return z.movedim(-1, 1)


def _per_position_problem():
    """Two per-pixel MLPs (Linear layers on channels-last inputs [N, H, W, 2], classes moved to dim 1)
    with logits [N, 3, H, W] and soft per-position targets [N, 3, H, W]."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3), _ChannelsFirst()).double() for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 5, 2, generator=g, dtype=torch.float64)
    y = torch.softmax(3 * torch.randn(16, 3, 3, 5, generator=g, dtype=torch.float64), 1)
    return models, (x, y)


def test_logit_normalization_of_per_position_outputs_is_over_the_classes():
    """adaptive_rho_sharpness normalizes the logits by default (cross-entropy). For outputs
    [N, C, H, W] the cross-entropy's classes are dim 1, but the logits were centred and scaled
    over the last axis (W): [0.00232, 0.00612] against [0.00340, 0.01169] over the classes, 1.5-1.9x
    too low. Now the same as a callable loss that normalizes over dim 1; other losses, whose outputs
    of more than two dimensions have no known class axis, are refused."""
    models, data = _per_position_problem()

    def over_classes(out, t):
        out = out - out.mean(1, keepdim=True)
        return nn.functional.cross_entropy(out / out.norm(dim=1, keepdim=True).clamp_min(1e-10), t)

    opts = {"adaptive_rho_sharpness": {"rho": 0.05, "init": "zero", "n_iter": 5}}

    def value(**kw):
        return fastcurv.batched_sharpness(models, data, measures=("adaptive_rho_sharpness",), measure_options=opts,
                                          progress=False, **kw)["adaptive_rho_sharpness"]

    torch.testing.assert_close(value(), value(loss=over_classes), rtol=1e-9, atol=1e-14)
    opts["adaptive_rho_sharpness"]["normalize_logits"] = True
    with pytest.raises(ValueError, match=r"no known class axis with a mse loss"):
        value(loss="mse")


def test_standard_rho_sharpness_refuses_the_adaptive_options():
    """eta is the offset of the adaptive scale |theta| + eta: rho_sharpness and avg_rho_sharpness
    accepted it and ignored it (eta = 100 gave the default values). Now refused as an unknown option,
    while the adaptive measures take it and it changes their value."""
    models, loader = make_replicas(R=2), make_data()
    for name in ("rho_sharpness", "avg_rho_sharpness"):
        with pytest.raises(TypeError, match=rf"measure_options\['{name}'\] has unknown options \['eta'\]"):
            fastcurv.batched_sharpness(models, loader, measures=(name,), progress=False,
                                       measure_options={name: {"eta": 100.0}})
    op = fastcurv.HessianOperator(models, loader)
    with pytest.raises(ValueError, match="standard ball takes neither"):
        worst_case_sharpness(op, eta=0.1)
    with pytest.raises(ValueError, match="standard ball takes neither"):
        average_case_sharpness(op, eta=0.1, n_samples=2)
    for name in ("adaptive_rho_sharpness", "adaptive_avg_rho_sharpness"):
        opts = {"n_iter": 2} if name == "adaptive_rho_sharpness" else {"n_samples": 4}
        a, b = (fastcurv.batched_sharpness(models, loader, measures=(name,), progress=False,
                                           measure_options={name: {**opts, "eta": eta}})[name] for eta in (0.0, 0.5))
        assert not torch.allclose(a, b, rtol=1e-3)


def test_l2_ascent_moves_on_a_confident_float32_model():
    """A confident model (mean loss 5e-28, gradient entries about 1e-25): torch's float32 norm of the
    gradient underflowed to 0 and the ascent's clamp_min(1e-300) is 0 in float32, so the direction
    was g / 0 and the ascent never left its start: rho_sharpness 3.5e-29 against float64's 1.9e-26
    for the same weights. The rows are now scaled before their norm: float32 matches float64."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    m64 = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        z = m64(x)
        top = z.topk(2, -1).values
        margin = top[:, 0] - top[:, 1]
        keep = margin > margin.median()
        x, y = x[keep], z[keep].argmax(-1)  # every sample right, by a margin of at least 60 after scaling:
        m64[2].weight.mul_(60 / margin[keep].min())
        m64[2].bias.mul_(60 / margin[keep].min())
    m32 = copy.deepcopy(m64).float()
    opts = {"rho_sharpness": {"rho": 0.01}, "josz_variation": {"r": 0.01}}
    values = [fastcurv.batched_sharpness([m], (xx, y), measures=("rho_sharpness", "josz_variation"), progress=False,
                                         measure_options=opts) for m, xx in ((m32, x.float()), (m64, x))]
    for col in ("rho_sharpness", "josz_V"):
        assert float(values[1][col][0]) > 1e-27  # (a loss increase far above the float32 range's bottom)
        assert float(values[0][col][0]) == pytest.approx(float(values[1][col][0]), rel=1e-3, abs=0)


def test_ascent_direction_of_a_float16_gradient_below_finfo_tiny_has_unit_norm():
    """The l2 ascent step divides by the gradient's norm; clamped at float16's smallest normal
    number (6.1e-5), a row of norm 5e-6 (subnormal, representable) got a "unit" direction of norm
    0.08."""
    from fastcurv.measures._ascent import _direction

    g = torch.tensor([[3e-6, 4e-6]], dtype=torch.float16)
    assert float(_direction(g, "l2").float().norm()) == pytest.approx(1.0, abs=1e-2)  # (subnormal: few digits)
    assert float(_direction(torch.zeros(1, 2, dtype=torch.float16), "l2").abs().sum()) == 0.0


@pytest.mark.parametrize("which", ["spectral_norm", "orthogonal"])
def test_relative_flatness_on_a_parametrized_feature_layer_names_the_parametrization(which):
    """relative_flatness took any feature-layer weight missing from the parameters for a tied weight:
    for a last Linear under ``spectral_norm`` it said "layer '2' shares its weight with 'another
    module' (tied weights)", though nothing is tied. It now says the weight is computed by a
    parametrization, names its parameters and gives the remedy; the unparametrized layer 0 still works."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    getattr(parametrizations, which)(m[2])
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    with pytest.raises(ValueError, match=r"the weight of layer '2' is computed by a parametrization .*"
                                         r"'2\.parametrizations\.weight\.original'.*remove_parametrizations"):
        fastcurv.batched_sharpness([m], (x, y), measures=("relative_flatness",), progress=False)
    res = fastcurv.batched_sharpness([m], (x, y), measures=("relative_flatness",), progress=False,
                                     measure_options={"relative_flatness": {"layer": "0", "method": "exact"}})
    assert torch.isfinite(res["relative_flatness"]).all()


def test_keskar_normalization_of_a_negative_loss_is_nan_and_warned():
    """Keskar's ``/(1 + L)`` assumes L >= 0. A Poisson NLL (log-rate outputs) is negative near its fit:
    epsilon_sharpness was -0.74, -4.37, -8.63 (full loss -1.60, -1.26, -1.17) with no flag, and it
    explodes as L -> -1. Now: NaN where 1 + L <= 0, a warning naming the replicas, and the values of a
    replica with a positive loss unchanged."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    x = torch.randn(32, 5, dtype=torch.float64)
    t = torch.poisson(torch.full((32, 2), 4.0, dtype=torch.float64))
    models = []
    for s, shift in enumerate((1.386, 1.486, -3.0)):  # (the last: far from the rates, a positive loss)
        torch.manual_seed(s)
        m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2)).double()
        with torch.no_grad():
            m[2].bias.fill_(shift)
        models.append(m)
    loss = lambda z, y: F.poisson_nll_loss(z, y, log_input=True)  # noqa: E731
    base, _ = fastcurv.HessianOperator(models, (x, t), loss=loss).loss_and_gradient()
    assert base[0] < -1 and base[1] < -1 and base[2] > 0
    with pytest.warns(RuntimeWarning, match=r"negative for replicas \[0, 1\]"):
        r = fastcurv.batched_sharpness(models, (x, t), loss=loss, measures=("epsilon_sharpness",), progress=False)
    value = r["epsilon_sharpness"]
    assert math.isnan(value[0]) and math.isnan(value[1])
    alone = fastcurv.batched_sharpness(models[2:], (x, t), loss=loss, measures=("epsilon_sharpness",), progress=False)
    assert value[2] > 0 and float(value[2]) == pytest.approx(float(alone["epsilon_sharpness"][0]), rel=1e-9)
