"""Jiang et al.'s worst-case sharpness flatness with alpha search (``jiang_sharpness``) and the
bisection shared with the PAC-Bayes sigma search: closed form on a threshold model, agreement with
a per-model reference loop, (non-)invariance under Dinh rescaling, NaN isolation."""
import copy

import pytest
import torch
from torch import nn

import fastcurv
from fastcurv.measures._ascent import apgd_ascent
from fastcurv.measures._bisect import bisect_scale
from fastcurv.measures.jiang_sharpness import alpha_search
from fastcurv.reparam import rescale_layers

from _measure_models import full_loss, make_data, make_replicas, set_flat, train, single_thread  # noqa: F401  (autouse fixture)

NAME = "jiang_sharpness"
COLS = ("jiang_sharpness_flatness", "jiang_sharpness_alpha", "jiang_sharpness_mag_flatness", "jiang_sharpness_mag_alpha")


@pytest.fixture(scope="module")
def trained():
    loader = make_data(n=100, batches=2)  # accuracy steps of 0.01: the 0.1 +- 0.01 window can be hit
    return train(make_replicas(R=3), loader, steps=200, lr=0.3), loader


class _Threshold(nn.Module):
    """Logits ``(w - x, 0)``: sample x is class 0 (right) iff ``w > x``."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w], dtype=torch.float64))

    def forward(self, x):
        z = self.w - x[:, 0]
        return torch.stack([z, torch.zeros_like(z)], -1)


def test_closed_form_on_threshold_model():
    """100 samples at margins 0.01 (i + 1/2) below w, all labelled 0. The worst perturbation in
    the box |u| <= a is u = -a, which misclassifies the samples with margin <= a, so the drop is
    #{i : 0.01 (i + 1/2) <= a} / 100 and it is within 0.1 +- 0.01 exactly for a in [0.085, 0.115).
    Magnitude-aware box a |w| + eps: a |w| + eps in that interval."""
    margins = 0.01 * (torch.arange(100, dtype=torch.float64) + 0.5)
    for w in (1.0, 3.0):
        x = (w - margins).unsqueeze(1)
        op = fastcurv.HessianOperator([_Threshold(w), _Threshold(w)], (x, torch.zeros(100, dtype=torch.long)))
        alpha, done, base = alpha_search(op, n_iter=3)
        assert (base == 1).all() and done.all()
        assert ((alpha >= 0.085) & (alpha < 0.115)).all()
        mag, done, _ = alpha_search(op, magnitude=True, n_iter=3)
        assert done.all()
        assert ((mag * w + 1e-3 >= 0.085) & (mag * w + 1e-3 < 0.115)).all()


def _reference_search(model, loader, *, magnitude, depth=15, n_iter=10, eps=1e-3, seed=0, target=0.1, tol=0.01):
    """One plain model: bisection written out, the same ascent on a plain autograd objective."""
    m = copy.deepcopy(model)
    theta = torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone()
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])

    def acc(t):
        set_flat(m, t)
        with torch.no_grad():
            return float((m(x).argmax(-1) == y).double().mean())

    def objective(t):
        set_flat(m, t[0])
        m.zero_grad()
        loss = full_loss(m, loader)
        loss.backward()
        g = torch.nn.utils.parameters_to_vector([p.grad for p in m.parameters()])
        return torch.tensor([float(loss.detach())], dtype=torch.float64), g[None].clone()

    base = acc(theta)
    lo, hi = 0.0, 2.0
    for step in range(depth):
        a = (lo + hi) / 2
        c = a * theta.abs() + eps if magnitude else torch.full_like(theta, a)
        _, delta, _ = apgd_ascent(objective, theta[None], torch.ones(1, dtype=torch.float64), p="linf", c=c[None],
                                  n_iter=n_iter, generator=torch.Generator().manual_seed(seed + step), common=True)
        drop = base - acc(theta + delta[0])
        if abs(drop - target) <= tol:
            return a, True
        if drop > target:
            hi = a
        else:
            lo = a
    return a, False


def test_matches_per_model_reference(trained):
    models, loader = trained
    res = fastcurv.batched_sharpness(models, loader, measures=(NAME,), seed=3, progress=False,
                                     measure_options={NAME: {"n_iter": 5, "depth": 10}})
    for col in COLS:
        assert col in res.values
    assert torch.allclose(res["jiang_sharpness_flatness"], 1 / res["jiang_sharpness_alpha"] ** 2)
    for r, m in enumerate(models):
        for mag, col in ((False, "jiang_sharpness_alpha"), (True, "jiang_sharpness_mag_alpha")):
            a, ok = _reference_search(m, loader, magnitude=mag, depth=10, n_iter=5, seed=3)
            assert float(res[col][r]) == pytest.approx(a, rel=1e-12)
            assert bool(res.converged[col][r]) == ok
    n_conv = sum(int(res.converged[c].sum()) for c in ("jiang_sharpness_alpha", "jiang_sharpness_mag_alpha"))
    assert n_conv >= 2  # the comparison covers converged searches (and here unconverged ones too: 3 of 6)


def test_magnitude_aware_invariant_isotropic_not(trained):
    models, loader = trained
    rescaled = rescale_layers(models, alpha=10.0, probe=torch.cat([b[0] for b in loader]))
    assert rescaled.max_output_change < 1e-10
    opts = {NAME: {"eps": 0.0}}  # eps -> 0: the magnitude-aware search is the same problem in both coordinates
    before = fastcurv.batched_sharpness(models, loader, measures=(NAME,), progress=False, measure_options=opts)
    after = fastcurv.batched_sharpness(rescaled.models, loader, measures=(NAME,), progress=False, measure_options=opts)
    assert torch.allclose(after["jiang_sharpness_mag_alpha"], before["jiang_sharpness_mag_alpha"], rtol=1e-12)
    iso_b, iso_a = before["jiang_sharpness_alpha"], after["jiang_sharpness_alpha"]
    assert (iso_a < 0.9 * iso_b).all()  # the shrunk last layer tolerates a smaller isotropic box


def test_nan_replica_is_isolated(trained):
    models, loader = trained
    bad = [copy.deepcopy(m) for m in models]
    with torch.no_grad():
        bad[1][0].weight[0, 0] = float("nan")
    opts = {NAME: {"n_iter": 3, "depth": 8}}
    with pytest.warns(RuntimeWarning):
        res = fastcurv.batched_sharpness(bad, loader, measures=(NAME,), progress=False, measure_options=opts)
    good = fastcurv.batched_sharpness([models[0], models[2]], loader, measures=(NAME,), progress=False,
                                      measure_options=opts)
    for col in COLS:
        assert torch.isnan(res[col][1]) and not bool(res.converged[col][1])
        assert torch.equal(res[col][[0, 2]], good[col])
    assert "non-finite" in res.flags[1] and "non-finite" not in res.flags[0]


def test_bisect_scale_locks_steps_and_reports_unconverged():
    # replica 0: drop = s (target hit near 0.1); 1: never reaches the window (drop 0 or 1); 2: skipped
    calls = []

    def drop(scale, active, step):
        calls.append(active.clone())
        return torch.stack([scale[0], (scale[1] > 0.3).double(), torch.tensor(float("nan"), dtype=torch.float64)])

    scale, done = bisect_scale(drop, 3, target=0.1, tol=0.01, hi=2.0, depth=12, skip=torch.tensor([False, False, True]))
    assert done.tolist() == [True, False, False]
    assert abs(float(scale[0]) - 0.1) <= 0.01
    assert float(scale[1]) == pytest.approx(0.3, abs=2 / 2**12)  # bisected onto the jump, flagged
    assert all(not bool(a[2]) for a in calls) and len(calls) == 12
    assert not bool(calls[-1][0])  # replica 0 stopped being evaluated once done


def test_rejects_bad_options(trained):
    models, loader = trained
    with pytest.raises(TypeError, match="unknown options"):
        fastcurv.batched_sharpness(models, loader, measures=(NAME,), progress=False,
                                   measure_options={NAME: {"sigma_max": 1.0}})
    with pytest.raises(ValueError, match="alpha_max must be a positive"):
        fastcurv.batched_sharpness(models, loader, measures=(NAME,), progress=False,
                                   measure_options={NAME: {"alpha_max": 0}})
    with pytest.raises(ValueError, match="accuracy-based measures need a classification loss"):
        fastcurv.batched_sharpness(models, (torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)),
                                   measures=(NAME,), loss="mse", progress=False)


@pytest.mark.gpu
def test_cuda_matches_cpu(trained):
    models, loader = trained
    cuda_models = [copy.deepcopy(m).cuda() for m in models]
    cuda_loader = [(x.cuda(), y.cuda()) for x, y in loader]
    opts = {NAME: {"n_iter": 5, "depth": 10}}
    cpu = fastcurv.batched_sharpness(models, loader, measures=(NAME,), progress=False, measure_options=opts)
    gpu = fastcurv.batched_sharpness(cuda_models, cuda_loader, measures=(NAME,), progress=False, measure_options=opts)
    for col in COLS:
        assert torch.allclose(cpu[col], gpu[col], rtol=1e-12)
        assert torch.equal(cpu.converged[col], gpu.converged[col])
