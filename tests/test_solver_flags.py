"""Convergence flags on adversarial spectra: quadratic models whose Hessian is a prescribed
``U diag(eigs) U^T``, a zero Hessian, and rank-deficient ones, against their dense truth."""
import pytest
import torch
from torch import nn

import fastcurv


class Quad(nn.Module):
    """Outputs ``L w``; with the loss ``0.5 * sum(sgn * out^2)`` the Hessian is ``L^T diag(sgn) L``."""

    def __init__(self, L):
        super().__init__()
        self.register_buffer("L", L)
        self.w = nn.Parameter(torch.zeros(L.shape[1], dtype=L.dtype))

    def forward(self, x):
        return (x[:, :1] * 0 + 1) * (self.L @ self.w).unsqueeze(0)


def quad(eigs, seed=5):
    eigs = torch.as_tensor(eigs, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    sgn = torch.sign(eigs)

    def loss(out, y):
        return 0.5 * (out * out * sgn).sum(-1).mean()
    return Quad(torch.diag(eigs.abs().sqrt()) @ U.T), loss


ONE = (torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_power_iteration_on_a_zero_hessian(dtype):
    """Hv = 0 was divided by clamp_min(1e-300), 0 in float32: lambda_max NaN, flagged only 'not
    converged' (ReLU units all dead). It is 0, an exact eigenvalue: converged."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3, bias=False)).to(dtype) for _ in range(2)]
    for m in models:
        with torch.no_grad():
            m[0].bias.fill_(-100.0)
    x, y = torch.randn(20, 4, dtype=dtype), torch.randint(0, 3, (20,))
    res = fastcurv.batched_sharpness(models, (x, y), measures=("lambda_max",), eig_solver="power")
    assert torch.equal(res["lambda_max"], torch.zeros(2, dtype=torch.float64))
    assert res.converged["lambda_max"].all() and res.flags == ["", ""]


@pytest.mark.parametrize("seed", [3, 4])
def test_power_iteration_between_opposite_extremes_is_not_converged(seed):
    """With extreme eigenvalues +4.01 and -4 the estimate stops moving at about -3.06, no eigenvalue
    (its residual 85% of it): it was reported converged and flagged 'converged to a negative
    eigenvalue (the largest in modulus)', which is +4.01."""
    g = torch.Generator().manual_seed(seed)
    eigs = torch.cat([torch.tensor([4.01]), torch.rand(18, generator=g, dtype=torch.float64) * 2 - 1, torch.tensor([-4.0])])
    m, loss = quad(eigs)
    res = fastcurv.batched_sharpness([m], ONE, loss=loss, measures=("lambda_max",), eig_solver="power")
    if not torch.isclose(res["lambda_max"][0].abs(), torch.tensor(4.0, dtype=torch.float64), rtol=0.05):
        assert not bool(res.converged["lambda_max"][0])
        assert "negative eigenvalue" not in res.flags[0]


def test_an_exact_zero_eigenvalue_converges():
    """At a breakdown (the Krylov space used up) the residuals are at rounding level, which a Ritz
    value of 0 can never be tol times: lambda_min of a rank-deficient Hessian, exact to 1e-15, was
    flagged 'not converged' in 10 of 10 seeds."""
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(5, 13, generator=g, dtype=torch.float64)  # N < P: lambda_min = 0
        m = nn.Linear(13, 1, bias=False).double()
        res = fastcurv.batched_sharpness([m], (X, torch.randn(5, 1, generator=g, dtype=torch.float64)), loss="mse",
                                         measures=("lambda_min",))
        assert abs(float(res["lambda_min"][0])) < 1e-12 and bool(res.converged["lambda_min"][0]), res.flags


def test_lambda_max_keeps_its_own_convergence_beside_top_k():
    """An isolated top eigenvalue over a dense bulk: lambda_max converged in 10 steps, but with top_k
    requested too it took top-k's flag ('lambda_max not converged', lambda_2..5 in the bulk)."""
    g = torch.Generator().manual_seed(0)
    eigs = torch.cat([torch.tensor([10.0]), torch.rand(299, generator=g, dtype=torch.float64)])
    m, loss = quad(eigs)
    res = fastcurv.batched_sharpness([m], ONE, loss=loss, measures=("lambda_max", "top_k"), top_k=5, max_iter=40)
    assert float(res["lambda_max"][0]) == pytest.approx(10.0, rel=1e-10)
    assert bool(res.converged["lambda_max"][0]) and not bool(res.converged["top_k"][0])
    assert res.flags == ["top_k not converged"]
