"""The exact Hessian trace of ReLU/LeakyReLU MLPs (Hessian diagonal = Gauss-Newton diagonal)
against the trace of the dense float64 Hessian from plain autograd."""
import pytest
import torch
from torch import nn

import fastcurv
from models import mlp, replicas
from oracle import check_exact_trace, dense_hessian, ragged


def _data(loss, gen, n=23, d=5, c=3):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=gen) if loss == "cross_entropy" else torch.randn(n, c, generator=gen, dtype=torch.float64)
    return ragged(x, y, [10, 10, 3])


@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU])
@pytest.mark.parametrize("loss,reduction", [("cross_entropy", "mean"), ("cross_entropy", "sum"), ("mse", "mean")])
@pytest.mark.parametrize("bias", [True, False])
def test_exact_trace_equals_dense_trace(act, loss, reduction, bias):
    gen = torch.Generator().manual_seed(3)
    models = replicas(lambda: mlp(act, sizes=(5, 7, 6, 3), bias=bias), 3, seed=1)
    data = _data(loss, gen)
    op = fastcurv.HessianOperator(models, data, backend="fused", loss=loss, reduction=reduction)
    check_exact_trace(op, models, data, loss, reduction)


def test_batched_sharpness_uses_the_exact_trace_where_it_applies():
    gen = torch.Generator().manual_seed(4)
    models = replicas(lambda: mlp(nn.ReLU, sizes=(5, 8, 3)), 4, seed=2)
    with torch.no_grad():
        models[2][0].weight[0, 0] = float("nan")  # one bad replica: NaN, the others unaffected
    data = _data("cross_entropy", gen)
    with pytest.warns(RuntimeWarning):
        res = fastcurv.batched_sharpness(models, data, backend="fused", progress=False)
    for r in (0, 1, 3):
        want = torch.trace(dense_hessian(models[r], data))
        torch.testing.assert_close(res["trace"][r], want, rtol=1e-10, atol=1e-12)
        assert float(res.stderr["trace"][r]) == 0.0
    assert torch.isnan(res["trace"][2]) and torch.isnan(res.stderr["trace"][2]) and not bool(res.ok[2])
    assert (res.trace_method, res.trace_reason) == ("exact", "")
    # the stochastic estimators still run when asked for, with a positive standard error
    est = fastcurv.batched_sharpness(models[:2], data, backend="fused", trace_method="deflated", progress=False)
    assert (est.stderr["trace"] > 0).all() and est.trace_method == "deflated"


def test_exact_trace_is_refused_with_the_reason_elsewhere():
    gen = torch.Generator().manual_seed(5)
    data = _data("cross_entropy", gen)
    tanh = replicas(lambda: mlp(nn.Tanh), 2)
    op = fastcurv.HessianOperator(tanh, data, backend="fused")
    assert not op.exact_trace_support()[0]
    with pytest.raises(ValueError, match="not piecewise linear"):
        op.exact_trace()
    with pytest.raises(ValueError, match="trace_method='exact' is not available: .*not piecewise linear"):
        fastcurv.batched_sharpness(tanh, data, trace_method="exact", progress=False)
    relu = replicas(lambda: mlp(nn.ReLU), 2)
    with pytest.raises(ValueError, match="'func' backend has no exact trace"):
        fastcurv.batched_sharpness(relu, data, backend="func", trace_method="exact", progress=False)
    # auto falls back to the deflated estimator on a curved model, and says why
    res = fastcurv.batched_sharpness(tanh, data, progress=False)
    assert (res.stderr["trace"] > 0).all()
    assert res.trace_method == "deflated" and "not piecewise linear" in res.trace_reason


def test_exact_trace_in_float32_and_on_replica_chunks():
    gen = torch.Generator().manual_seed(6)
    models = replicas(lambda: mlp(nn.ReLU, sizes=(5, 9, 3)), 5, seed=3, dtype=torch.float32)
    data = [(x.float(), y) for x, y in _data("cross_entropy", gen)]
    whole = fastcurv.HessianOperator(models, data, backend="fused").exact_trace()
    op = fastcurv.HessianOperator(models, data, backend="fused", backend_options={"chunk_bytes": 1})  # one replica per chunk
    torch.testing.assert_close(op.exact_trace(), whole, rtol=1e-6, atol=0)
    for r, m in enumerate(models):
        want = torch.trace(dense_hessian(m.double(), [(x.double(), y) for x, y in data]))
        torch.testing.assert_close(whole[r], want, rtol=1e-4, atol=0)
