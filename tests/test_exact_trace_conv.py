"""The exact Hessian trace of conv nets and residual graphs (convolutions, eval BatchNorm,
ReLU/LeakyReLU, poolings, residual additions: the Hessian diagonal equals the Gauss-Newton
diagonal) against the trace of the dense float64 Hessian from plain autograd."""
import copy

import pytest
import torch
from torch import nn

import fastcurv
from models import replicas
from oracle import check_exact_trace, dense_hessian, ragged


def stem_cnn():
    """A stem (conv with bias, affine BatchNorm, ReLU, strided max pooling), a conv into a
    BatchNorm without affine parameters and a LeakyReLU, average pooling, a Linear head."""
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, affine=False), nn.LeakyReLU(0.1),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))


def overlapping_stem():
    """A stem whose max pooling windows overlap (3x3, stride 2): a position can win two windows."""
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.LeakyReLU(0.2), nn.MaxPool2d(3, 2, 1),
                         nn.Flatten(), nn.Linear(48, 3))


def grouped_cnn():
    """Grouped convolutions (the first on the model input), one dilated and strided, adaptive
    pooling, and a BatchNorm1d between Linear layers."""
    return nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5), nn.ReLU(),
                         nn.BatchNorm1d(5), nn.Linear(5, 3))


class Residual(nn.Module):
    """conv-BN-ReLU, then two blocks: an identity skip and a strided 1x1 projection skip."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU(),
                               nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2))
        self.b = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(3))
        self.proj = nn.Sequential(nn.Conv2d(2, 3, 1, stride=2, bias=False), nn.BatchNorm2d(3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(self.a(h) + h)
        h = torch.relu(self.b(h) + self.proj(h))
        return self.head(torch.flatten(self.pool(h), 1))


def _data(loss, gen, n=13, channels=1):
    x = torch.randn(n, channels, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen) if loss == "cross_entropy" else torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return ragged(x, y, [8, 5])


@pytest.mark.parametrize("factory", [stem_cnn, overlapping_stem, grouped_cnn, Residual])
@pytest.mark.parametrize("loss,reduction", [("cross_entropy", "mean"), ("mse", "sum")])
@pytest.mark.parametrize("pooled_stem", [None, False])
def test_exact_trace_of_conv_nets_equals_dense_trace(factory, loss, reduction, pooled_stem):
    gen = torch.Generator().manual_seed(11)
    models = [m.eval() for m in replicas(factory, 3, seed=4)]
    data = _data(loss, gen, channels=2 if factory is grouped_cnn else 1)
    op = fastcurv.HessianOperator(models, data, backend="fused", loss=loss, reduction=reduction,
                                  backend_options={"pooled_stem": pooled_stem, "sample_chunk_bytes": 1 << 12})
    check_exact_trace(op, models, data, loss, reduction)


def test_batched_sharpness_uses_the_exact_trace_of_conv_nets_in_float32():
    """The default job takes the exact trace of a float32 conv net (standard error 0), and a replica
    with NaN weights leaves the others' traces exact (they run as a replica subset of the state)."""
    gen = torch.Generator().manual_seed(12)
    models = [m.eval() for m in replicas(stem_cnn, 4, seed=5, dtype=torch.float32)]
    with torch.no_grad():
        models[1][4].weight[0, 0, 0, 0] = float("nan")
    data = [(x.float(), y) for x, y in _data("cross_entropy", gen)]
    with pytest.warns(RuntimeWarning):
        res = fastcurv.batched_sharpness(models, data, backend="fused", progress=False)
    for r in (0, 2, 3):
        want = torch.trace(dense_hessian(copy.deepcopy(models[r]).double(), [(x.double(), y) for x, y in data]))
        torch.testing.assert_close(res["trace"][r], want, rtol=1e-4, atol=0)
        assert float(res.stderr["trace"][r]) == 0.0
    assert torch.isnan(res["trace"][1]) and not bool(res.ok[1])
    assert res.trace_method == "exact"
    # in replica chunks (the sharded path, whose chunks' records are merged): the same traces
    with pytest.warns(RuntimeWarning):
        chunked = fastcurv.batched_sharpness(models, data, backend="fused", progress=False, replica_chunk=2)
    torch.testing.assert_close(chunked["trace"], res["trace"], equal_nan=True, rtol=1e-6, atol=0)
    assert chunked.trace_method == "exact"


def test_exact_trace_of_conv_nets_is_refused_with_the_reason():
    gen = torch.Generator().manual_seed(13)
    data = _data("cross_entropy", gen)
    gelu = replicas(lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU(), nn.Flatten(), nn.Linear(72, 3)), 2)
    op = fastcurv.HessianOperator(gelu, data, backend="fused")
    with pytest.raises(ValueError, match="not piecewise linear .*'1'"):
        op.exact_trace()
    res = fastcurv.batched_sharpness(gelu, data, progress=False)  # auto: the deflated estimator
    assert (res.stderr["trace"] > 0).all()
    assert res.trace_method == "deflated" and "not piecewise linear" in res.trace_reason
    batch = fastcurv.HessianOperator(replicas(stem_cnn, 2), data, backend="fused", bn_mode="batch")
    assert batch.exact_trace_support() == (False, "BatchNorm '1' uses batch statistics, with which the model is curved in its parameters")


@pytest.mark.gpu
@pytest.mark.parametrize("factory", [stem_cnn, Residual])
def test_exact_trace_of_conv_nets_on_cuda_matches_the_cpu(factory):
    gen = torch.Generator().manual_seed(14)
    models = [m.eval() for m in replicas(factory, 3, seed=6)]
    data = _data("cross_entropy", gen)
    cpu = fastcurv.HessianOperator(models, data, backend="fused").exact_trace()
    gpu = fastcurv.HessianOperator([m.cuda() for m in models], data, backend="fused").exact_trace()
    torch.testing.assert_close(gpu, cpu, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("factory", [
    lambda: nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(27, 3)),
    lambda: nn.Sequential(nn.AvgPool2d(2), nn.GELU(), nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3, 3)),
    lambda: nn.Sequential(nn.Flatten(), nn.BatchNorm1d(72), nn.Linear(72, 5), nn.LeakyReLU(), nn.Linear(5, 3)),
], ids=["bn2d_first", "curved_shared_prefix", "bn1d_first"])
def test_exact_trace_from_the_model_input(factory):
    """A BatchNorm reading the model input (no input gradient to pass on), and a parameter-free
    prefix that is curved (GELU) but the same for every parameter value."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(11, 2, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (11,), generator=gen)
    data = ragged(x, y, [6, 5])
    models = [m.eval() for m in replicas(factory, 2, seed=1)]
    check_exact_trace(fastcurv.HessianOperator(models, data, backend="fused"), models, data)
