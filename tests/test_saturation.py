"""Confident samples: cross-entropy, its gradient and its Hessian keep their precision when a
sample's label probability rounds to 1 (torch's log_softmax loses them to cancellation there)."""
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcurv
from fastcurv import ops
from fastcurv.losses import cross_entropy_losses, cross_entropy_parts
from fastcurv.ops.head_hvp import head_hvp, head_hvp_reference
from models import mlp, replicas
from oracle import dense_hessian, pairwise_ce_product, rowwise_error

needs_ext = pytest.mark.skipif(not fastcurv.cpu_extension_loaded(), reason="C++ extension not loaded (fastcurv._ext.extension_error() says why)")


def _targets(gen, N, C, soft):
    if soft:
        y = torch.rand(N, C, generator=gen, dtype=torch.float64)
        y[0] = F.one_hot(torch.tensor(1), C)
        y[1] *= -0.4  # torch takes any mass, negative too
        return y
    return torch.randint(0, C, (N,), generator=gen)


@pytest.mark.parametrize("soft", [False, True])
def test_cross_entropy_parts_equal_torch(soft):
    """Ordinary logits (float64): loss, probabilities, gradient and Hessian equal torch's."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(9, 6, generator=gen, dtype=torch.float64) * 3
    z[2, 1] = z[2, 4]  # a tie for the most probable class
    y = _targets(gen, 9, 6, soft)
    loss, p, g = cross_entropy_parts(z, y)
    zz = z.clone().requires_grad_()
    want = F.cross_entropy(zz, y, reduction="none")
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(cross_entropy_losses(z, y), want.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(p, z.softmax(-1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, torch.autograd.grad(want.sum(), zz)[0], rtol=1e-12, atol=1e-14)
    H = torch.func.hessian(lambda q: cross_entropy_losses(q, y).sum())(z)
    torch.testing.assert_close(H, torch.func.hessian(lambda q: F.cross_entropy(q, y, reduction="sum"))(z),
                               rtol=1e-10, atol=1e-13)


def _confident_logits(N, C, margins, dtype):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(N, C, generator=gen, dtype=torch.float64)
    z[:, 0] += torch.as_tensor(margins, dtype=torch.float64)
    return z.to(dtype)


@pytest.mark.parametrize("soft", [False, True])
def test_confident_samples_keep_precision_in_float32(soft):
    """Margins of 18-24 in float32 (label probabilities round to 1): torch's float32 loss and
    gradient at the label are 0; ours match float64 (which is exact enough at these margins)."""
    z = _confident_logits(7, 5, torch.linspace(18, 24, 7), torch.float32)
    y = F.one_hot(torch.zeros(7, dtype=torch.long), 5).float() if soft else torch.zeros(7, dtype=torch.long)
    assert float(F.cross_entropy(z, y, reduction="sum")) == 0  # what this test guards against
    loss, _, g = cross_entropy_parts(z, y)
    zz = z.double().requires_grad_()
    want = F.cross_entropy(zz, y.double() if soft else y, reduction="none")
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(g.double(), torch.autograd.grad(want.sum(), zz)[0], rtol=1e-5, atol=0)
    H = torch.func.hessian(lambda q: cross_entropy_losses(q[None], y[:1]).sum())(z[0])
    Hd = torch.func.hessian(lambda q: F.cross_entropy(q[None], y[:1].double() if soft else y[:1], reduction="sum"))(zz[0].detach())
    torch.testing.assert_close(H.double(), Hd, rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl", ["torch", pytest.param("ext", marks=needs_ext)])
def test_softmax_ce_hvp_confident_rows(impl):
    """float32 probabilities of rows with margins up to 60 (and an ordinary row): each product
    row to 1e-5 of a float64 product of the exact probabilities. The unpivoted formula is off by O(1)."""
    B, K, N, C = 2, 3, 5, 11
    z = _confident_logits(B * N, C, [0, 10, 20, 30, 60] * B, torch.float64).view(B, N, C)
    p64 = z.softmax(-1)
    t = torch.randn(B, K, N, C, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = 0.5 * pairwise_ce_product(p64.unsqueeze(1), t)
    p, t32 = p64.float(), t.float()
    with fastcurv.use_kernels(impl):
        got = ops.softmax_ce_hvp(p, t32, 0.5)
    assert rowwise_error(got, want) < 1e-5
    unpivoted = 0.5 * p.unsqueeze(1) * (t32 - (p.unsqueeze(1) * t32).sum(-1, keepdim=True))
    assert rowwise_error(unpivoted, want) > 1e-2


@pytest.mark.parametrize("impl", [head_hvp_reference, pytest.param(head_hvp, marks=needs_ext)])
def test_head_hvp_confident_rows(impl):
    """The head kernel's loss R-op is pivoted too: its products match float64 ones of the exact
    probabilities on confident samples."""
    R, N, K, O, I = 2, 5, 2, 7, 9
    gen = torch.Generator().manual_seed(3)
    f64 = dict(generator=gen, dtype=torch.float64)
    a, ra = torch.randn(R, N, I, **f64), torch.randn(R, N, K, I, **f64)
    W, dW, db = torch.randn(R, O, I, **f64), torch.randn(R, K, O, I, **f64), torch.randn(R, K, O, **f64)
    p64 = _confident_logits(R * N, O, [0, 15, 25, 40, 60] * R, torch.float64).view(R, N, O).softmax(-1)
    delta = torch.zeros(R, N, O, dtype=torch.float64)  # rg is then each sample's loss R-op through W: no sum hides an error
    rz = torch.einsum("rni,rkoi->rnko", a, dW) + torch.einsum("rnki,roi->rnko", ra, W) + db.unsqueeze(1)
    rd = 0.25 * pairwise_ce_product(p64.unsqueeze(2), rz)
    want_b = rd.sum(1)
    want_rg = torch.einsum("rnko,roi->rnki", rd, W) + torch.einsum("rno,rkoi->rnki", delta, dW)
    f32 = [t.float() for t in (a, ra, W, dW, delta)]
    rg, _, hb = impl(*f32, 0.25, probs=p64.float(), dbias=db.float())
    assert rowwise_error(hb, want_b) < 1e-4
    assert rowwise_error(rg, want_rg) < 1e-4
    p = p64.float().unsqueeze(2)
    unpivoted = torch.einsum("rnko,roi->rnki", p * (rz.float() - (p * rz.float()).sum(-1, keepdim=True)), W.float())
    assert rowwise_error(0.25 * unpivoted, want_rg) > 1e-2


def _cnn(C, side):
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(side * side // 2, C))


def _confident_population(factory, C, margin, dtype):
    """Two replicas whose last bias puts class 0 ``margin`` above the others for every sample."""
    models = replicas(factory, R=2, dtype=dtype)
    for m in models:
        with torch.no_grad():
            m[-1].weight.mul_(0.3)
            m[-1].bias.zero_()
            m[-1].bias[0] = margin
    return models


CASES = {  # name: (factory, input shape); 3 classes take the head kernel, 33 the GEMMs and softmax_ce_hvp
    "mlp3": (lambda: mlp(nn.ReLU, (6, 8, 3)), (6,)),
    "mlp33": (lambda: mlp(nn.ReLU, (6, 4, 33)), (6,)),
    "cnn3": (lambda: _cnn(3, 8), (1, 8, 8)),  # the conv engine's head kernel needs 32 inputs
    "cnn33": (lambda: _cnn(33, 4), (1, 4, 4)),
}


@functools.lru_cache(maxsize=None)
def _dense_case(case):
    """The case's data ``(x [24, ...] float64, y)`` and its two float64 replicas' dense Hessians."""
    factory, shape = CASES[case]
    x = torch.randn(24, *shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.zeros(24, dtype=torch.long)
    models = _confident_population(factory, 33 if case.endswith("33") else 3, 22.0, torch.float64)
    return x, y, [dense_hessian(m, [(x, y)]) for m in models]


@pytest.mark.parametrize("backend", ["fused", "func", "autograd"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_confident_population_matches_dense_float64(case, backend):
    """float32 replicas with margins near 22 (per-sample losses near 1e-10, far below float32's
    epsilon): products and lambda_max match the float64 dense Hessian to 1e-4, and nothing is flagged.
    Before the pivoted cross-entropy every backend returned rounding noise here."""
    x, y, dense = _dense_case(case)
    factory, _ = CASES[case]
    models = [m.float() for m in _confident_population(factory, 33 if case.endswith("33") else 3, 22.0, torch.float64)]
    data = (x.float(), y)
    gen = torch.Generator().manual_seed(4)
    op = fastcurv.HessianOperator(models, data, backend=backend)
    assert op.backend_name == backend
    V = torch.randn(2, 2, op.P, generator=gen, dtype=torch.float64)
    HV = op.matvec(V.float()).double()
    for r in range(2):
        want = V[r] @ dense[r]
        assert float((HV[r] - want).norm() / want.norm()) < 1e-4
    res = fastcurv.batched_sharpness(models, data, backend=backend, measures=("lambda_max",), progress=False)
    lam = torch.tensor([np.linalg.eigvalsh(H.numpy())[-1] for H in dense])
    assert float(((res["lambda_max"].double() - lam) / lam).abs().max()) < 1e-4
    assert res.flags == ["", ""]


def test_underflowing_probabilities_are_flagged():
    """A margin of 120 in float32: the other classes' probabilities underflow to 0, and the
    result says the Hessian has lost its precision; a margin of 22 is not flagged."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(10, 6, generator=gen)
    models = _confident_population(CASES["mlp3"][0], 3, 22.0, torch.float32)
    with torch.no_grad():
        models[1][-1].bias[0] = 120.0
    res = fastcurv.batched_sharpness(models, (x, torch.zeros(10, dtype=torch.long)), progress=False)
    assert res.flags[0] == ""
    assert "loss below the dtype's range" in res.flags[1]


def test_a_moderately_confident_float16_population_is_not_flagged():
    """float16 with per-sample losses near 0.01 (margin 5): far above float16's smallest normal
    number, so nothing is flagged (the first underflow rule, tiny / eps = 0.06, flagged it)."""
    models = [m.half() for m in _confident_population(CASES["mlp3"][0], 3, 5.0, torch.float32)]
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(6)).half()
    res = fastcurv.batched_sharpness(models, (x, torch.zeros(16, dtype=torch.long)), measures=("lambda_max",),
                                     progress=False)
    assert res.flags == ["", ""]


def test_soft_targets_on_outputs_with_more_dimensions_take_classes_in_dim_1():
    """torch's cross_entropy reads [N, C, L] outputs and soft targets with classes in dim 1; the
    pivoted loss took the last dimension there (a Conv1d head: 17.29 against torch's 9.27)."""
    from fastcurv.losses import Loss

    gen = torch.Generator().manual_seed(7)
    z = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64)
    y = torch.rand(5, 4, 3, generator=gen, dtype=torch.float64)
    loss = Loss("cross_entropy", reduction="sum")
    loss.num_samples = 5
    torch.testing.assert_close(loss.batch_loss(z, y), F.cross_entropy(z, y, reduction="sum"))


def test_narrow_integer_labels_are_read_as_int64():
    """uint8 labels (MNIST's raw files) failed in every backend with torch's gather error."""
    models = _confident_population(CASES["mlp3"][0], 3, 1.0, torch.float64)
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(9))
    want = fastcurv.batched_sharpness(models, (x, y), measures=("lambda_max",), progress=False)["lambda_max"]
    got = fastcurv.batched_sharpness(models, (x, y.to(torch.uint8)), measures=("lambda_max",), progress=False)["lambda_max"]
    torch.testing.assert_close(got, want)
