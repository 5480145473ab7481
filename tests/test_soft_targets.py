"""Soft cross-entropy targets (class probabilities ``[N, C]``, as torch's ``cross_entropy`` takes
them: label smoothing, mixup) in every backend, against dense float64 Hessians. Rows that sum to 1
give the hard-label loss Hessian ``diag(p) - p p^T`` per sample; rows of another mass ``m`` give
``m (diag(p) - p p^T)``, which the fused engine applies outside its head kernel."""
import copy

import pytest
import torch
from torch import nn

import fastcurv
from models import mlp, randomize_bn, replicas
from oracle import check_exact_trace, dense_hessian, ragged


def _conv_net():  # a conv stem and a 32-input head: the sample-major engine with its head kernel
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32, 3))


def _targets(kind, n, gen):
    if kind == "dyadic":  # rows summing to exactly 1 (the hard-label Hessian, head kernel allowed)
        rows = torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0.125, 0.375, 0.5]], dtype=torch.float64)
        return rows[torch.randint(0, 3, (n,), generator=gen)]
    if kind == "softmax":  # probability rows, sums 1 up to rounding
        return torch.softmax(torch.randn(n, 3, generator=gen, dtype=torch.float64) * 2, 1)
    w = torch.rand(n, 3, generator=gen, dtype=torch.float64) * 2  # rows of mass 0..6, one all zero
    w[3] = 0
    return w


def _data(net, kind, gen, sizes=(9, 9, 4)):
    n = sum(sizes)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64) if net == "mlp" else torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    return ragged(x, _targets(kind, n, gen), sizes)


def _models(net):
    return replicas(lambda: mlp(nn.ReLU, sizes=(5, 7, 6, 3)), 3, seed=1) if net == "mlp" else replicas(_conv_net, 3, seed=1)


@pytest.mark.parametrize("net", ["mlp", "conv"])
@pytest.mark.parametrize("kind", ["dyadic", "softmax", "mass"])
@pytest.mark.parametrize("backend", ["fused", "func"])
def test_soft_targets_match_the_dense_hessian(net, kind, backend):
    gen = torch.Generator().manual_seed(5)
    models, data = _models(net), _data(net, kind, gen)
    op = fastcurv.HessianOperator(models, data, backend=backend)
    assert op.backend_name == backend
    V = torch.randn(3, 2, op.P, generator=gen, dtype=torch.float64)
    HV = op.matvec(V)
    loss, grad = op.loss_and_gradient()
    N = sum(x.shape[0] for x, _ in data)
    for r, m in enumerate(models):
        torch.testing.assert_close(HV[r], V[r] @ dense_hessian(m, data), rtol=1e-10, atol=1e-12)
        ev = copy.deepcopy(m).eval()  # running BatchNorm statistics, as bn_mode="eval"
        want = sum(nn.functional.cross_entropy(ev(x), y, reduction="sum") for x, y in data) / N
        torch.testing.assert_close(loss[r], want.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad[r], torch.cat([g.flatten() for g in torch.autograd.grad(want, list(ev.parameters()))]),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("net", ["mlp", "conv"])
@pytest.mark.parametrize("kind", ["dyadic", "mass"])
def test_exact_trace_with_soft_targets(net, kind):
    gen = torch.Generator().manual_seed(6)
    models, data = _models(net), _data(net, kind, gen)
    check_exact_trace(fastcurv.HessianOperator(models, data, backend="fused"), models, data)


def test_soft_target_mass_follows_sample_chunks():
    gen = torch.Generator().manual_seed(9)
    models, data = _models("conv"), _data("conv", "mass", gen)
    op = fastcurv.HessianOperator(models, data, backend="fused", backend_options={"sample_chunk_bytes": 1, "cache_bytes": 0})
    V = torch.randn(3, 2, op.P, generator=gen, dtype=torch.float64)
    HV = op.matvec(V)
    for r, m in enumerate(models):
        torch.testing.assert_close(HV[r], V[r] @ dense_hessian(m, data), rtol=1e-10, atol=1e-12)
    check_exact_trace(op, models, data)


def test_exact_trace_refuses_negative_target_mass():
    gen = torch.Generator().manual_seed(7)
    models, data = _models("mlp"), _data("mlp", "mass", gen)
    data[1][1][2] = torch.tensor([0.5, -2.0, 0.25], dtype=torch.float64)
    op = fastcurv.HessianOperator(models, data, backend="fused")
    with pytest.raises(ValueError, match="nonnegative mass"):
        op.exact_trace()
    V = torch.randn(3, op.P, generator=gen, dtype=torch.float64)  # the products stay exact
    torch.testing.assert_close(op.matvec(V)[0], dense_hessian(models[0], data) @ V[0], rtol=1e-10, atol=1e-12)


def test_soft_targets_in_float32_batched_sharpness():
    gen = torch.Generator().manual_seed(8)
    models = [randomize_bn(m.float(), gen) for m in replicas(_conv_net, 3, seed=2)]
    x = torch.randn(40, 1, 8, 8, generator=gen)
    y = torch.full((40, 3), 0.1 / 3) + 0.9 * nn.functional.one_hot(torch.randint(0, 3, (40,), generator=gen), 3)
    fused = fastcurv.batched_sharpness(models, (x, y), seed=0)
    func = fastcurv.batched_sharpness(models, (x, y), seed=0, backend="func")
    assert fused.backend == "fused" and fused.trace_method == "exact"
    for r, m in enumerate(models):
        H = dense_hessian(copy.deepcopy(m).double(), [(x.double(), y.double())])
        torch.testing.assert_close(fused["trace"][r].double(), torch.trace(H), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused["lambda_max"][r].double(), torch.linalg.eigvalsh(H)[-1], rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(fused["lambda_max"], func["lambda_max"], rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_per_position_soft_targets_average_over_positions_as_torch_does(backend):
    """Soft targets ``[N, C, H, W]`` (a segmentation net's): torch's mean cross-entropy divides by
    N * H * W; fastcurv divided by N only (loss, gradient and Hessian 16x torch's here)."""
    gen = torch.Generator().manual_seed(0)
    models = replicas(lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 1)), 2)
    x = torch.randn(6, 2, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.softmax(torch.randn(6, 3, 4, 4, generator=gen, dtype=torch.float64), 1)
    op = fastcurv.HessianOperator(models, (x, t), backend=backend)
    loss, _ = op.loss_and_gradient()
    V = torch.randn(2, op.P, generator=gen, dtype=torch.float64)
    HV = op.matvec(V)
    for r, m in enumerate(models):
        want = nn.functional.cross_entropy(m(x), t)
        torch.testing.assert_close(loss[r], want.detach(), rtol=1e-12, atol=1e-14)
        H = dense_hessian(m, [(x, t)], loss=nn.functional.cross_entropy)  # torch's own mean
        torch.testing.assert_close(HV[r], V[r] @ H, rtol=1e-10, atol=1e-12)
