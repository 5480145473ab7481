"""GGN and empirical Fisher operators against dense float64 matrices built from explicit
Jacobians and per-sample gradients; solvers on them; the batched_sharpness columns."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import fastcurv
from fastcurv.curvature import EmpiricalFisherOperator, GGNOperator

from _measure_models import single_thread  # noqa: F401  (autouse fixture)


def _models(R=2):
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double() for _ in range(R)]


def _data(n=20):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y, [(x[:12], y[:12]), (x[12:], y[12:])]


def _flat_fn(m):
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for p in m.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    def f(t, x):
        d, o = {}, 0
        for n, s in zip(names, shapes):
            k = int(torch.Size(s).numel())
            d[n] = t[o:o + k].view(s)
            o += k
        return functional_call(m, d, (x,))

    return flat, f


def _dense_refs(m, x, y, loss="ce"):
    flat, f = _flat_fn(m)
    n = x.shape[0]
    G = torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64)
    F = torch.zeros_like(G)
    for i in range(n):
        J = jacrev(lambda t: f(t, x[i:i + 1])[0])(flat)
        z = f(flat, x[i:i + 1])[0].detach()
        if loss == "ce":
            p = torch.softmax(z, -1)
            Hout = (torch.diag(p) - torch.outer(p, p)) / n
            gi = jacrev(lambda t: nn.functional.cross_entropy(f(t, x[i:i + 1]), y[i:i + 1]))(flat)
            F += torch.outer(gi, gi) / n
        else:
            Hout = 2 * torch.eye(z.numel(), dtype=torch.float64) / (n * z.numel())
        G += J.T @ Hout @ J
    return G, F


def test_ggn_and_fisher_match_dense_float64():
    models = _models()
    x, y, loader = _data()
    G = GGNOperator(models, loader)
    F = EmpiricalFisherOperator(models, loader)
    for r, m in enumerate(models):
        Gref, Fref = _dense_refs(m, x, y)
        assert torch.allclose(G.dense(r), Gref, atol=1e-12, rtol=1e-10)
        assert torch.allclose(F.dense(r), Fref, atol=1e-12, rtol=1e-10)


def test_ggn_equals_hessian_for_mse_at_zero_residual():
    models = _models(R=1)
    x, _, _ = _data()
    t = models[0](x).detach()
    H = fastcurv.HessianOperator(models, (x, t), loss="mse").dense(0)
    G = GGNOperator(models, (x, t), loss="mse").dense(0)
    Gref, _ = _dense_refs(models[0], x, None, loss="mse")
    assert torch.allclose(G, Gref, atol=1e-12)
    assert torch.allclose(G, H, atol=1e-10)
    # and differs from the Hessian away from zero residual (the check can fail)
    H2 = fastcurv.HessianOperator(models, (x, t + 1), loss="mse").dense(0)
    assert not torch.allclose(GGNOperator(models, (x, t + 1), loss="mse").dense(0), H2, atol=1e-6)


def test_solvers_run_on_curvature_operators():
    models = _models()
    _, _, loader = _data()
    for cls in (GGNOperator, EmpiricalFisherOperator):
        op = cls(models, loader)
        dense = [op.dense(r) for r in range(op.R)]
        top = fastcurv.lanczos(op, k=2, max_iter=60, tol=1e-8)
        tr = fastcurv.hutchpp(op, num_matvecs=3 * op.P, seed=3)  # sketch spans everything: exact trace
        for r, D in enumerate(dense):
            ev = torch.linalg.eigvalsh(D)
            assert ev.min() > -1e-12  # both are PSD
            assert torch.allclose(top.eigenvalues[r], ev.flip(0)[:2], rtol=1e-6)
            assert float(tr.trace[r]) == pytest.approx(float(D.trace()), rel=1e-6)


def test_curvature_measures_in_batched_sharpness():
    models = _models()
    x, y, loader = _data()
    res = fastcurv.batched_sharpness(models, loader, progress=False,
                                     measures=("ggn_lambda_max", "ggn_trace", "fisher_lambda_max", "fisher_trace"),
                                     measure_options={"ggn_trace": {"num_matvecs": 120}, "fisher_trace": {"num_matvecs": 120},
                                                      "ggn_lambda_max": {"tol": 1e-9}, "fisher_lambda_max": {"tol": 1e-9}})
    for r, m in enumerate(models):
        Gref, Fref = _dense_refs(m, x, y)
        assert float(res["ggn_lambda_max"][r]) == pytest.approx(float(torch.linalg.eigvalsh(Gref)[-1]), rel=1e-6)
        assert float(res["fisher_lambda_max"][r]) == pytest.approx(float(torch.linalg.eigvalsh(Fref)[-1]), rel=1e-6)
        assert abs(float(res["ggn_trace"][r]) - float(Gref.trace())) <= 4 * float(res.stderr["ggn_trace"][r]) + 1e-9
        assert abs(float(res["fisher_trace"][r]) - float(Fref.trace())) <= 4 * float(res.stderr["fisher_trace"][r]) + 1e-9
