"""The exact Hessian trace of ReLU/LeakyReLU MLPs (Hessian diagonal = Gauss-Newton diagonal)
against the trace of the dense float64 Hessian from plain autograd."""
import pytest
import torch
from torch import nn

import fastcurv
from fastcurv.backends.fused import DEFAULT_CHUNK_BYTES
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
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


class _LargestAllocation(TorchDispatchMode):
    """The largest storage (bytes) any operation run under it returns."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.untyped_storage().nbytes())
        return out


def _many_classes(sizes, R=2, n=64, loss="cross_entropy", soft=False, seed=11, bias=True, act=nn.ReLU):
    gen = torch.Generator().manual_seed(seed)
    models = replicas(lambda: mlp(act, sizes=sizes, bias=bias), R, seed=seed)
    C = sizes[-1]
    x = torch.randn(n, sizes[0], generator=gen, dtype=torch.float64)
    if loss == "mse":
        y = torch.randn(n, C, generator=gen, dtype=torch.float64)
    elif soft:  # class probabilities, some rows' mass not 1
        y = torch.softmax(torch.randn(n, C, generator=gen, dtype=torch.float64), -1) * torch.rand(n, 1, generator=gen, dtype=torch.float64) * 2
    else:
        y = torch.randint(0, C, (n,), generator=gen)
    return models, ragged(x, y, [n // 2, n - n // 2 - 5, 5])


@pytest.mark.parametrize("sizes,gram,loss,soft,act,bias", [
    ((5, 4, 3, 40), True, "cross_entropy", False, nn.ReLU, True),
    ((5, 4, 3, 40), True, "mse", False, nn.LeakyReLU, False),
    ((5, 6, 4, 3, 40), True, "cross_entropy", True, nn.LeakyReLU, False),
    ((5, 3, 40), True, "cross_entropy", True, nn.LeakyReLU, True),
    ((5, 3, 40), True, "mse", False, nn.ReLU, True),
    ((6, 40), True, "cross_entropy", False, nn.ReLU, True),
    ((6, 40), True, "mse", False, nn.ReLU, False),
    ((5, 7, 6, 3), False, "cross_entropy", True, nn.LeakyReLU, True),
])
def test_exact_trace_of_many_classes_by_gram_matrices(sizes, gram, loss, soft, act, bias):
    """With more classes than hidden units, the exact trace propagates each sample's Gram matrix
    ``J^T H_n J`` (``[H, H]``) instead of its C columns (``[C, H]``, from ``[C, C]`` seeds): at 500
    classes (MLP 64-64-64-500, 200 samples) 15x faster than before, where the default job took 6.4x
    the time of trace_method="deflated". Both forms (and one, two, three or four Linear layers, with
    and without biases) against the dense float64 Hessian's trace, in chunks of one sample too."""
    models, data = _many_classes(sizes, loss=loss, soft=soft, bias=bias, act=act)
    op = fastcurv.HessianOperator(models, data, backend="fused", loss=loss)
    assert op.backend._gram_trace(sizes[-1]) == gram
    check_exact_trace(op, models, data, loss)
    one = fastcurv.HessianOperator(models, data, backend="fused", loss=loss, backend_options={"chunk_bytes": 1})
    torch.testing.assert_close(one.exact_trace(), op.exact_trace(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("sizes,chunk", [((6, 8, 8, 200), DEFAULT_CHUNK_BYTES), ((6, 200, 200, 40), 1 << 20)])
def test_exact_trace_memory_stays_within_the_chunk(sizes, chunk, monkeypatch):
    """The MLP exact trace held ``[R, N, C, C]`` seeds and ``[R, N, C, F]`` vectors for a whole
    batch, chunked over replicas only: 20 MB for 200 classes and 64 samples here, 4 MB in one chunk
    of the wide model (4.3 GB peak at 1000 classes and 500 samples). Now its largest tensor stays
    within ``chunk_bytes`` (weight-sized copies aside: 0.6 MB here), in Gram form (many classes)
    and in column form (wide layers: in chunks of samples); the trace equals the column form's
    over the whole batch (checked against dense Hessians above)."""
    from fastcurv.backends.fused.backend import FusedBackend

    models, data = _many_classes(sizes, n=64)
    data = [(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))]
    op = fastcurv.HessianOperator(models, data, backend="fused", backend_options={"chunk_bytes": chunk})
    op.exact_trace()  # (the state cached: what is measured below is the trace's own)
    with _LargestAllocation() as seen:
        got = op.exact_trace()
    assert 0 < seen.most <= chunk, (seen.most, chunk)
    monkeypatch.setattr(FusedBackend, "_gram_trace", lambda self, C: False)
    whole = fastcurv.HessianOperator(models, data, backend="fused", backend_options={"chunk_bytes": None})
    torch.testing.assert_close(got, whole.exact_trace(), rtol=1e-10, atol=0)


def test_exact_trace_by_gram_matrices_keeps_confident_samples_precise():
    """Cross-entropy's ``W^T (diag(p) - p p^T) W`` cancels to rounding where the top probability
    rounds to 1 in float32 (a 96% error on one such sample); the Gram form takes it relative to
    the top class's weights, and stays as precise as the column form: confident float32 nets
    (1 - p_max down to 1e-9) against the float64 Hessian's trace."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(30, 5, generator=gen)
    models = replicas(lambda: mlp(nn.ReLU, sizes=(5, 6, 4, 40)), 2, seed=12, dtype=torch.float32)
    with torch.no_grad():
        for m in models:
            m[-1].weight.mul_(3000)
        y = models[0](x).argmax(-1)  # the predicted classes: a small trace, from small probabilities
        assert float((1 - torch.softmax(models[0](x).double(), -1).max(-1).values).median()) < 1e-3
    op = fastcurv.HessianOperator(models, (x, y), backend="fused")
    assert op.backend._gram_trace(40)
    got = op.exact_trace()
    for r, m in enumerate(models):
        want = torch.trace(dense_hessian(m.double(), [(x.double(), y)]))
        torch.testing.assert_close(got[r], want, rtol=2e-4, atol=0)


@pytest.mark.parametrize("sizes", [(784, 10), (784, 1024, 10)])
def test_gram_trace_of_shallow_mlps_runs_in_whole_chunks(sizes, monkeypatch):
    """The Gram form's chunks were sized for an ``[I, I]`` matrix per sample, which it builds only
    below two Linear layers: a logistic regression on 784 inputs (and a 784-1024-10 MLP) ran the
    exact trace one replica and one sample at a time (295 ms against 7.4 ms before the Gram form,
    on 4 replicas and 2048 samples). Now one chunk holds what fits of the tensors it does build;
    the trace is unchanged (the column form's, per replica)."""
    from fastcurv.backends.fused.backend import FusedBackend

    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(256, 784, generator=gen), torch.randint(0, 10, (256,), generator=gen)
    layers = [nn.Linear(sizes[0], sizes[1])] + ([nn.ReLU(), nn.Linear(sizes[1], sizes[2])] if len(sizes) == 3 else [])
    models = []
    for r in range(4):
        torch.manual_seed(r)
        models.append(nn.Sequential(*[type(m)(*m.weight.shape[::-1]) if isinstance(m, nn.Linear) else m for m in layers]))
    op = fastcurv.HessianOperator(models, [(x, y)], backend="fused", backend_options={"chunk_bytes": 4 << 20})
    assert op.backend._gram_trace(10)
    R_step, N_step = op.backend._trace_steps(4, 256, 10, x)
    # one Linear layer: the probabilities alone (40 bytes a sample); two: V [10, 1024] (40 KB a sample)
    assert (R_step, N_step) == (4, 256) if len(sizes) == 2 else (R_step, N_step) == (1, (4 << 20) // 40960)
    got = op.exact_trace()
    monkeypatch.setattr(FusedBackend, "_gram_trace", lambda self, C: False)
    whole = fastcurv.HessianOperator(models, [(x, y)], backend="fused", backend_options={"chunk_bytes": None})
    torch.testing.assert_close(got, whole.exact_trace(), rtol=1e-4, atol=0)
