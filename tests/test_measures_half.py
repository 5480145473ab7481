"""The perturbation measures (every measure that evaluates the loss at perturbed weights) of float16
and bfloat16 models run in float32 (``measures._common.working_precision``), and give the values of
the same rounded weights in float64.

Before, they perturbed and evaluated in the model's dtype: a perturbation below its rounding unit
(mw_sharpness's 6.6e-4 against bfloat16's 2e-3 at |theta| = 0.3) left the weights unchanged, and a
loss increase was the difference of two half-precision losses near 1. With ``ok=True`` and no flag,
mw_sharpness, adaptive_rho_sharpness and bfloat16's epsilon_sharpness were 0 (float64: 0.033,
6.7e-4, 0.060), rho_sharpness and josz_V one bfloat16 rounding unit (0.0078, float64 0.0097), and
the losses' errors (3.7e-4 to 4.7e-3 in loss units) moved the bisection searches (bfloat16's
jiang_sharpness alpha 0.1875 against 0.125, josz_d_eps 0.394 against 0.381).

Tolerance: the reference is fastcurv on the same weights and inputs (chosen exactly representable in
both half dtypes) in float64, so the only difference is float32 rounding. In loss units the
measures' values differ from the reference by at most 2.3e-7 here (a float32 loss near 1 over 30
samples is good to a few 1e-7; the ascent's end point moves by as little): the test allows 2e-6
(about 17 float32 units at a loss of 1), converted to each measure's units (mw_sharpness divides by
rho, epsilon_sharpness is 100 / (1 + L) times the increase), 100 times below the old errors. The
bisection results (jiang_sharpness, pac_bayes, josz_level_distance) step through the same dyadic
scales and compare counts of correct predictions, which float32 rounding changes only for a sample
within about 1e-6 of the decision boundary: they must be equal (pac_bayes was right before too,
its perturbations being large).
"""
import copy

import pytest
import torch
from torch import nn

import fastcurv
from fastcurv.measures._common import Widened, working_precision

from _measure_models import single_thread  # noqa: F401  (autouse fixture)

HALF = (torch.float16, torch.bfloat16)
LOSS_ATOL = 2e-6  # loss units (module docstring)


def _data(n=30, d=5, k=3):
    """Inputs exactly representable in float16 and bfloat16 (so every dtype sees the same ones) and labels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(torch.bfloat16).float()
    assert torch.equal(x.half().float(), x)
    return x, torch.randint(0, k, (n,), generator=g)


def _models(R=2):
    out = []
    for s in range(R):
        torch.manual_seed(s)
        out.append(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)))
    return out


_A = torch.randn(57, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / 5**0.5  # (P = 57)

# measure -> (options, {column: atol}); atol None: equal. Small options keep each case well under a second.
CASES = {
    "rho_sharpness": ({"n_iter": 10}, {"rho_sharpness": LOSS_ATOL}),
    "adaptive_rho_sharpness": ({"n_iter": 10}, {"adaptive_rho_sharpness": LOSS_ATOL}),
    "avg_rho_sharpness": ({"n_samples": 8}, {"avg_rho_sharpness": LOSS_ATOL}),
    "adaptive_avg_rho_sharpness": ({"n_samples": 8}, {"adaptive_avg_rho_sharpness": LOSS_ATOL}),
    "mw_sharpness": ({"n_samples": 8}, {"mw_sharpness": LOSS_ATOL / 0.005}),  # (divided by rho = 0.005)
    "epsilon_sharpness": ({}, {"epsilon_sharpness": 100 * LOSS_ATOL}),  # (percent of 1 + L >= 1)
    # (a given A: a drawn one depends on the dtype it is drawn in, so float32 and float64 draw different ones)
    "epsilon_sharpness_subspace": ({"A": _A}, {"epsilon_sharpness_subspace": 100 * LOSS_ATOL}),
    "josz_variation": ({"n_iter": 10}, {"josz_V": LOSS_ATOL}),
    "josz_level_distance": ({"n_iter": 5, "n_bisect": 4, "max_doublings": 4}, {"josz_d_eps": None}),
    "jiang_sharpness": ({"n_iter": 3, "depth": 8}, {"jiang_sharpness_alpha": None, "jiang_sharpness_mag_alpha": None}),
    "pac_bayes": ({"mc_samples": 4, "depth": 8}, {"pacbayes_sigma": None, "pacbayes_mag_sigma": None}),
}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_perturbation_measures_of_half_models_match_float64(name, dtype):
    """Each perturbation measure of a float16/bfloat16 model against the same rounded weights in
    float64 (see the module docstring for what it gave before and for the tolerances)."""
    x, y = _data()
    models = [m.to(dtype) for m in _models()]
    ref = [copy.deepcopy(m).double() for m in models]
    options, columns = CASES[name]
    kw = dict(measures=(name,), seed=0, progress=False, measure_options={name: options})
    got = fastcurv.batched_sharpness(models, (x, y), **kw)
    want = fastcurv.batched_sharpness(ref, (x, y), **kw)
    assert got.ok.all()
    for col, atol in columns.items():
        if atol is None:
            assert torch.equal(got[col], want[col]), (col, got[col], want[col])
        else:
            torch.testing.assert_close(got[col], want[col], rtol=0, atol=atol, msg=lambda m, c=col: f"{c}: {m}")
    for m in models:  # (the models are not changed: the measure ran on float32 copies)
        assert all(p.dtype == dtype for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_float32_and_float64_operators_are_used_as_they_are(dtype):
    """For float32 and float64 models ``working_precision`` is the operator itself, so their
    measures run exactly the code (and give the bits) they gave before; for half-precision models
    it is a float32 view holding the operator's parameters and inputs exactly, the operator unchanged."""
    x, y = _data()
    op = fastcurv.HessianOperator([m.to(dtype) for m in _models()], (x, y))
    assert working_precision(op) is op
    half = fastcurv.HessianOperator([m.to(torch.bfloat16) for m in _models()], (x, y))
    wide = working_precision(half)
    assert isinstance(wide, Widened) and working_precision(wide) is wide
    assert (wide.dtype, wide.R, wide.P, wide.num_samples) == (torch.float32, half.R, half.P, half.num_samples)
    assert torch.equal(wide.replicas.flat_params(), half.replicas.flat_params().float())
    assert half.replicas.flat_params().dtype == torch.bfloat16
    (_, xw, yw), = list(wide.batches)
    assert xw.dtype == torch.float32 and torch.equal(xw, x) and torch.equal(yw, y)


def test_half_models_with_buffers_sparse_inputs_and_soft_targets():
    """The float32 view converts the floating buffers (BatchNorm running statistics, perturbed by
    mw_sharpness), floating targets (MSE) and sparse inputs (the measures' CSR first layer): the
    values match float64 on the same rounded weights as in the test above. Before: mw_sharpness of
    the BatchNorm model [0.073, 0] against [0.0164, 0.0106], rho_sharpness with MSE off by 1.7e-4 and
    avg_rho_sharpness on the sparse inputs [0.0020, 0.00012] against [0.0027, 0.00084]."""
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(40, 20, generator=g) * (torch.rand(40, 20, generator=g) < 0.2)).to(torch.bfloat16).float()
    y = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(0)
    bn = [nn.Sequential(nn.Linear(20, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)]
    for m in bn:
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    mlp = [nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)]
    jobs = [(bn, (x, y), "cross_entropy", "mw_sharpness", {"n_samples": 8}, LOSS_ATOL / 0.005),
            (mlp, (x, nn.functional.one_hot(y, 3).float()), "mse", "rho_sharpness", {"n_iter": 10}, LOSS_ATOL),
            (mlp, (x, y), "cross_entropy", "avg_rho_sharpness", {"n_samples": 8}, LOSS_ATOL)]
    for models, data, loss, name, options, atol in jobs:
        kw = dict(measures=(name,), loss=loss, seed=0, progress=False, measure_options={name: options})
        half = [copy.deepcopy(m).half() for m in models]
        got = fastcurv.batched_sharpness(half, data, **kw)[name]
        want = fastcurv.batched_sharpness([copy.deepcopy(m).double() for m in half], data, **kw)[name]
        torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
