"""The fused engine on conv nets (Conv2d, pooling, eval BatchNorm) against dense float64 Hessians,
the autograd oracle and torch.func gradients."""
import copy

import pytest
import torch
from torch import nn

import fastcurv
from fastcurv import _ext
from models import replicas as _replicas


def replicas(factory, R, seed=0, dtype=torch.float64):
    """tests/models.replicas, also for BatchNorm without affine parameters (random running stats)."""
    gen = torch.Generator().manual_seed(seed + 1000)

    def make():
        m = factory()
        for b in m.modules():
            if isinstance(b, nn.modules.batchnorm._BatchNorm) and not b.affine:
                b.running_mean.copy_(torch.randn(b.running_mean.shape, generator=gen) * 0.3)
                b.running_var.copy_(torch.rand(b.running_var.shape, generator=gen) + 0.5)
                b.affine, b.weight, b.bias = True, nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
                b._restore = True
        return m

    models = _replicas(make, R, seed, dtype)
    for m in models:
        for b in m.modules():
            if getattr(b, "_restore", False):
                b.affine, b.weight, b.bias = False, None, None
    return models
from oracle import check_fused_float32, dense_hessian

pytestmark = pytest.mark.usefixtures("one_thread")


def conv_net(bias=True):
    # odd sizes, stride, padding, dilation and groups; GELU (non-zero second derivative)
    return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=bias), nn.GELU(),
                         nn.Conv2d(2, 2, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, bias=bias),
                         nn.Tanh(), nn.Flatten(), nn.LazyLinear(3, bias=bias))


def pool_net(pool, bias=True):
    layers = {"max": nn.MaxPool2d(3, stride=2, padding=1),  # overlapping windows, padding
              "max_ceil": nn.MaxPool2d(2, stride=2, ceil_mode=True, dilation=1),
              "avg": nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
              "avg_ceil": nn.AvgPool2d(2, ceil_mode=True),
              "adaptive": nn.AdaptiveAvgPool2d((2, 3))}  # non-divisible bins
    return nn.Sequential(nn.Conv2d(1, 3, 2, bias=bias), nn.ReLU(), layers[pool], nn.Sigmoid(), nn.Flatten(),
                         nn.LazyLinear(3, bias=bias))


def bn_net(bias=True, affine=True):
    return nn.Sequential(nn.Conv2d(1, 3, 3, bias=bias), nn.BatchNorm2d(3, affine=affine), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
                         nn.Flatten(), nn.LazyLinear(4, bias=bias), nn.BatchNorm1d(4, affine=affine), nn.Tanh(),
                         nn.Linear(4, 3, bias=bias))


def bn_first_net(bias=True):
    # BatchNorm on the shared input, then an MLP with BatchNorm1d
    return nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3, bias=bias), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(2, 3, bias=bias))


def _materialize(factory, shape):
    def make():
        m = factory()
        m(torch.zeros(2, *shape))  # initialize lazy layers
        return m
    return make


def _data(shape, n, loss, gen, C=3, dtype=torch.float64):
    x = torch.randn(n, *shape, generator=gen, dtype=dtype)
    y = torch.randint(0, C, (n,), generator=gen) if loss == "cross_entropy" else torch.randn(n, C, generator=gen, dtype=dtype)
    return x, y


def _check_dense(factory, shape, R, K, loss, seed=0, n=7, **options):
    models = replicas(_materialize(factory, shape), R=R, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = _data(shape, n, loss, gen)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    op = fastcurv.HessianOperator(models, batches, backend="fused", loss=loss, backend_options=options or None)
    V = torch.randn(R, K, op.P, generator=gen, dtype=torch.float64)
    HV = op.matvec(V)
    for r in range(R):
        H = dense_hessian(models[r], batches, loss=loss)
        assert H.abs().max() > 1e-3  # a non-trivial Hessian
        torch.testing.assert_close(HV[r], V[r] @ H.T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(op.matvec(V), HV, rtol=0, atol=0)  # from the cached state
    return op


@pytest.mark.parametrize("R,K", [(1, 1), (3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_against_dense(R, K, bias):
    _check_dense(lambda: conv_net(bias), (2, 5, 6), R, K, "cross_entropy")


def pointwise_net(bias=True):
    # 1x1 convolutions (matmuls on the CPU, fastcurv.backends.fused.conv): on the shared input, then
    # strided, grouped and dilated ones on odd sizes, between activations with curvature
    return nn.Sequential(nn.Conv2d(2, 4, 1, bias=bias), nn.GELU(),
                         nn.Conv2d(4, 6, 1, stride=2, groups=2, bias=bias), nn.Tanh(),
                         nn.Conv2d(6, 3, 1, stride=(1, 2), dilation=2, bias=bias), nn.ReLU(), nn.Flatten(),
                         nn.LazyLinear(3, bias=bias))


@pytest.mark.parametrize("R,K", [(1, 1), (3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_convolutions_against_dense(R, K, bias, torch_conv_calls):
    loss = "cross_entropy" if bias else "mse"
    _check_dense(lambda: pointwise_net(bias), (2, 5, 7), R, K, loss)
    # and the engine's 1x1 products (primal, gradient, matvec) ran as matmuls, not through torch's
    models = replicas(_materialize(lambda: pointwise_net(bias), (2, 5, 7)), R=R)
    x, y = _data((2, 5, 7), 5, loss, torch.Generator().manual_seed(1))
    op = fastcurv.HessianOperator(models, (x, y), backend="fused", loss=loss)  # (checks one model's forward)
    calls = torch_conv_calls()
    op.loss_and_gradient()
    op.matvec(torch.randn(R, K, op.P, dtype=torch.float64))
    assert [name for name, kernel in calls if kernel == (1, 1)] == []


def narrow_net(bias=True):
    # stride-1 convolutions with few channels (the group_conv kernels on the CPU): on the shared
    # input, then a rectangular kernel with padding k - 1 on one side and 0 on the other, channel
    # counts that are not multiples of 8; then a strided one (torch's)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=bias), nn.GELU(),
                         nn.Conv2d(3, 5, (3, 2), padding=(2, 0), bias=bias), nn.Tanh(),
                         nn.Conv2d(5, 2, 3, stride=2, bias=bias), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3, bias=bias))


@pytest.mark.parametrize("group_conv", [None, False])
@pytest.mark.parametrize("R,K", [(1, 1), (3, 4)])
def test_group_conv_layers_against_dense(group_conv, R, K, torch_conv_calls):
    op = _check_dense(lambda: narrow_net(bias=K == 1), (2, 6, 5), R, K, "cross_entropy", group_conv=group_conv)
    # in a matvec from the cached state, the stride-1 convolutions ran in the kernels (where built)
    V = torch.randn(R, K, op.P, dtype=torch.float64)
    calls = torch_conv_calls()
    op.matvec(V)
    in_torch = {k for _, k in calls}
    assert (3, 3) in in_torch  # the strided one
    assert ((3, 2) in in_torch) == (group_conv is False or not _ext.has_kernel("group_conv", "cpu"))


@pytest.mark.parametrize("pool", ["max", "max_ceil", "avg", "avg_ceil", "adaptive"])
@pytest.mark.parametrize("R,K", [(1, 4), (3, 1)])
def test_pooling_against_dense(pool, R, K):
    _check_dense(lambda: pool_net(pool, bias=R == 3), (1, 6, 7), R, K, "cross_entropy" if K == 4 else "mse")


@pytest.mark.parametrize("R,K", [(1, 1), (3, 4)])
@pytest.mark.parametrize("bias,affine", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_batchnorm_eval_against_dense(R, K, bias, affine, loss):
    # with bias, the conv's and the linear layer's bias tangents are folded into the BatchNorm R-ops
    op = _check_dense(lambda: bn_net(bias=bias, affine=affine), (1, 6, 5), R, K, loss)
    assert len(op.backend._maps.bias_folded) == 2 * bias
    assert op.replicas.buffers  # running statistics travel with the replicas


def stem_net(act, bn, pool, bias=True):
    """A first convolution, then element-wise layers (eval BatchNorm, an activation) and a strided max
    pooling: the stem the engine runs at the pooled resolution."""
    acts = {"relu": nn.ReLU(), "leaky": nn.LeakyReLU(0.2), "gelu": nn.GELU(), "tanh": nn.Tanh()}
    pools = {"2": nn.MaxPool2d(2), "3_ceil": nn.MaxPool2d(3, ceil_mode=True), "2_pad": nn.MaxPool2d(2, padding=1),
             "3_overlap": nn.MaxPool2d(3, stride=2, padding=1), "2_dilated": nn.MaxPool2d(2, dilation=2)}
    layers = [nn.Conv2d(2, 3, 3, stride=(1, 2), padding=1, bias=bias)] + ([nn.BatchNorm2d(3)] if bn else [])
    return nn.Sequential(*layers, acts[act], pools[pool], nn.Conv2d(3, 2, 2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3, bias=bias))


def _stems(op):
    """The pooling nodes whose stems ran at the pooled resolution in the op's cached state."""
    return next(iter(op.backend._cache.values()))[1].stems


@pytest.mark.parametrize("act,bn,pool,bias", [("relu", True, "2", True), ("leaky", True, "3_ceil", False),
                                              ("gelu", True, "2_pad", True), ("tanh", False, "2", False),
                                              ("relu", False, "3_ceil", True), ("relu", True, "3_overlap", True),
                                              ("gelu", False, "2_dilated", False)])
@pytest.mark.parametrize("R,K", [(1, 1), (3, 4)])
def test_pooled_stem_against_dense(act, bn, pool, bias, R, K):
    """The stem's R-passes at the pooling's winning positions (fastcurv.ops.sampled_conv) against
    dense Hessians, on inputs with zero regions (ties in the pooling windows; overlapping windows
    that share winners), and against the engine at full resolution; with the C++ kernel and with
    the torch reference."""
    shape = (2, 9, 12)

    def net():
        m = stem_net(act, bn, pool, bias)
        m(torch.zeros(2, *shape))
        return m

    models = replicas(net, R=R)
    for m in models:
        if bn:
            m[1].running_mean.uniform_(-0.5, 0.5)
            m[1].running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, *shape, generator=gen, dtype=torch.float64)
    x[:, :, :5] = 0  # windows of equal values
    y = torch.randint(0, 3, (9,), generator=gen)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    V = torch.randn(R, K, sum(p.numel() for p in models[0].parameters()), generator=gen, dtype=torch.float64)
    want = want_g = None
    for impl, pooled in (("auto", False), ("auto", None), ("torch", True)):
        if impl == "auto" and pooled is None and not fastcurv.cpu_extension_loaded():
            continue
        with fastcurv._ext.use_kernels(impl):
            op = fastcurv.HessianOperator(models, batches, backend="fused", backend_options={"pooled_stem": pooled})
            HV = op.matvec(V)
            _, grad = op.loss_and_gradient()  # the stem's gradient from the winning positions too
        assert _stems(op) == (frozenset() if pooled is False else frozenset({3 if bn else 2}))
        if want is None:
            want = torch.stack([V[r] @ dense_hessian(models[r], batches).T for r in range(R)])
            want_g = grad
        torch.testing.assert_close(HV, want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grad, want_g, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("model,stems", [
    (nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU(), nn.MaxPool2d(2, stride=1), nn.Flatten(), nn.LazyLinear(3)), set()),
    (nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(3)),
     set()),  # the pooled convolution's input has a tangent
    (nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(3)), set()),
    (nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.LazyLinear(3)),
     set()),
    (nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(3)), {2}),
], ids=["stride1", "second_conv", "groups", "avgpool", "stem"])
def test_which_convolutions_run_as_pooled_stems(model, stems):
    model(torch.zeros(1, 2, 9, 9))  # the lazy head's size
    models = replicas(lambda: copy.deepcopy(model).double(), R=2)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 2, 9, 9, generator=gen, dtype=torch.float64)
    data = (x, torch.randint(0, 3, (6,), generator=gen))
    V = torch.randn(2, 3, sum(p.numel() for p in models[0].parameters()), generator=gen, dtype=torch.float64)
    op = fastcurv.HessianOperator(models, data, backend="fused", backend_options={"pooled_stem": True})
    HV = op.matvec(V)
    assert op.backend._maps.stems.keys() == stems and _stems(op) == stems
    every = fastcurv.HessianOperator(models, data, backend="fused", backend_options={"pooled_stem": False})
    torch.testing.assert_close(HV, every.matvec(V), rtol=1e-10, atol=1e-13)


@pytest.mark.skipif(not fastcurv.cpu_extension_loaded(), reason="C++ extension not built")
def test_stems_with_many_taps_keep_every_position_by_default():
    """Above STEM_MAX_TAPS (2 x 5 x 5 = 50 taps here) the default keeps every position; True pools."""
    from fastcurv.backends.fused.maps import STEM_MAX_TAPS

    assert 2 * 5 * 5 > STEM_MAX_TAPS >= 3 * 3 * 3
    models = replicas(_materialize(lambda: nn.Sequential(nn.Conv2d(2, 2, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                                         nn.LazyLinear(3)), (2, 9, 9)), R=2)
    gen = torch.Generator().manual_seed(5)
    data = (torch.randn(4, 2, 9, 9, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen))
    V = torch.randn(2, 1, sum(p.numel() for p in models[0].parameters()), generator=gen, dtype=torch.float64)
    HV = {}
    for pooled, want in ((None, frozenset()), (True, frozenset({2}))):
        op = fastcurv.HessianOperator(models, data, backend="fused", backend_options={"pooled_stem": pooled})
        HV[pooled] = op.matvec(V)
        assert _stems(op) == want
    torch.testing.assert_close(HV[None], HV[True], rtol=1e-10, atol=1e-13)


def test_batchnorm_on_the_input_against_dense():
    _check_dense(bn_first_net, (1, 5, 5), 3, 2, "cross_entropy")


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_relu_on_the_input_against_dense(affine):
    # the fused BatchNorm-ReLU R-op where the BatchNorm input has no tangent
    _check_dense(lambda: nn.Sequential(nn.BatchNorm2d(1, affine=affine), nn.ReLU(), nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2),
                                       nn.ReLU(), nn.Flatten(), nn.Linear(18, 3)), (1, 5, 5), 3, 2, "mse")


def test_sample_chunks_give_the_same_products():
    # tiny chunks: one sample at a time, and no cache (state recomputed in every matvec)
    _check_dense(lambda: bn_net(), (1, 6, 5), 2, 3, "cross_entropy", sample_chunk_bytes=1, cache_bytes=0)


def test_float32_against_autograd_subsets_and_gradient():
    models = replicas(lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                            nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), nn.GELU(),
                                            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5)), R=4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 1, 11, 11, generator=gen)
    y = torch.randint(0, 5, (30,), generator=gen)
    data = [(x[:16], y[:16]), (x[16:], y[16:])]
    fused, idx, g2 = check_fused_float32(models, data, gen)
    _, g3 = fused.loss_and_gradient(idx)
    torch.testing.assert_close(g3, g2[idx], rtol=1e-4, atol=1e-6)


def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))


@pytest.mark.parametrize("factory,shape", [(lambda: bn_net(affine=False), (1, 6, 7)), (lambda: stem_net("relu", True, "2"), (2, 6, 7)),
                                           (bn_first_net, (1, 4, 4))], ids=["bn_not_affine", "pooled_stem", "bn_first"])
def test_gradient_from_the_state_it_caches(factory, shape):
    """reuse_state=True builds each batch's state once, takes the gradient's weight products from it
    and caches it for the matvecs without the output gradients only the gradient reads: the same
    gradient as the chunked passes, the same state as a matvec builds, the same products."""
    models = replicas(_materialize(factory, shape), R=3)
    gen = torch.Generator().manual_seed(0)
    x, y = _data(shape, 9, "cross_entropy", gen)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    reused, plain = (fastcurv.HessianOperator(models, batches, backend="fused") for _ in range(2))
    (l1, g1), (l2, g2) = reused.loss_and_gradient(reuse_state=True), plain.loss_and_gradient()
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)
    assert sorted(reused.backend._cache) == [0, 1]
    V = torch.randn(3, 2, reused.P, generator=gen, dtype=torch.float64)
    HV = plain.matvec(V)  # builds and caches the states the matvecs keep
    for i in (0, 1):
        got, want = reused.backend._cache[i][1], plain.backend._cache[i][1]
        assert set(got.t) == set(want.t) and got.nbytes == want.nbytes
    torch.testing.assert_close(reused.matvec(V), HV, rtol=0, atol=0)
    # without a cache: the chunked passes, nothing cached
    uncached = fastcurv.HessianOperator(models, batches, backend="fused")
    uncached.backend.cache_bytes = 0
    torch.testing.assert_close(uncached.loss_and_gradient(reuse_state=True)[1], g2, rtol=1e-10, atol=1e-14)
    assert not uncached.backend._cache


def test_a_replica_subset_frees_the_previous_one_before_its_copy(monkeypatch):
    """As a solver's active replicas shrink, each subset of the cached state is copied only once the
    previous subset is freed, so that the copy can reuse its memory."""
    import weakref

    from fastcurv.backends.fused import maps

    models = replicas(_materialize(bn_net, (1, 6, 7)), R=4)
    gen = torch.Generator().manual_seed(0)
    x, y = _data((1, 6, 7), 6, "cross_entropy", gen)
    op = fastcurv.HessianOperator(models, (x, y), backend="fused")
    V = torch.randn(4, 1, op.P, generator=gen, dtype=torch.float64)
    full = op.matvec(V)
    op.matvec(V[[0, 1, 2]], idx=torch.tensor([0, 1, 2]))
    previous = weakref.ref(op.backend._subset[0][1])
    freed = []
    select = maps._MapState.select
    monkeypatch.setattr(maps._MapState, "select", lambda st, pos: (freed.append(previous() is None), select(st, pos))[1])
    torch.testing.assert_close(op.matvec(V[[0, 2]], idx=torch.tensor([0, 2])), full[[0, 2]], rtol=1e-12, atol=1e-14)
    assert freed == [True]


def test_auto_picks_fused_for_a_small_cnn():
    models = replicas(small_cnn, R=2)
    data = (torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))
    op = fastcurv.HessianOperator(models, data)
    assert op.backend_name == "fused"
    # batch-statistics BatchNorm is fused too (checked against dense Hessians in test_fused_residual.py)
    op2 = fastcurv.HessianOperator(models, data, bn_mode="batch")
    assert op2.backend_name == "fused"
    # the trace estimators stack 10 probes per matvec on the CPU in the conv engine, 1 for MLP chains
    assert op.backend.cpu_probe_batch == 10
    mlps = replicas(lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 3)), R=2)
    assert fastcurv.HessianOperator(mlps, data, backend="fused").backend.cpu_probe_batch == 1


class Concat(nn.Module):
    # residual additions are fused (tests/test_fused_residual.py); concatenation is not
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return torch.cat([x, self.conv(x)], 1)


@pytest.mark.parametrize("model,words", [
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softplus(), nn.Flatten(), nn.Linear(8, 3)), ["'1'", "Softplus"]),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), Concat(), nn.Flatten(), nn.Linear(8, 3)), ["torch.cat", "'1'", "Concat"]),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3), nn.BatchNorm2d(3)), ["'3'", "feature maps"]),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding_mode="reflect"), nn.Flatten(), nn.Linear(8, 3)), ["padding_mode"]),
])
def test_unsupported_modules_are_named(model, words):
    ok, why = fastcurv.backends.FusedBackend.supports(fastcurv.replicas.ReplicaSet(replicas(model, R=1)))
    assert not ok and all(w in why for w in words), why


def test_non_sequential_model_names_the_unsupported_op():
    ok, why = fastcurv.backends.FusedBackend.supports(fastcurv.replicas.ReplicaSet([Concat().double()]))
    assert not ok and "torch.cat" in why, why


@pytest.mark.skipif(not fastcurv.cpu_extension_loaded(), reason="C++ extension not built")
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_net_head_kernel_against_dense(K, loss, bias, monkeypatch):
    """A conv net's output Linear (50 inputs) and the loss run in the head_hvp kernel, on views of
    the sample-major tensors: two batches, sample chunks of 4 (accumulated), against dense
    Hessians and the engine with fused_head=False; a 16-input head keeps the einsums."""
    import fastcurv.backends.fused.loss_head as fused_mod

    def net(width):
        return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=bias), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(1),
                             nn.Flatten(), nn.Linear(width, 3, bias=bias)).eval()

    gen = torch.Generator().manual_seed(31)
    y = torch.randint(0, 3, (11,), generator=gen) if loss == "cross_entropy" else torch.randn(11, 3, generator=gen, dtype=torch.float64)
    calls = []
    monkeypatch.setattr(fused_mod, "head_hvp", lambda *a, **kw: calls.append(1) or fastcurv.ops.head_hvp(*a, **kw))
    for side, runs in ((5, True), (2, False)):  # 2 x 5 x 5 = 50 inputs; 2 x 2 x 2 = 8
        models = replicas(lambda: net(2 * side * side), R=2)
        for m in models:  # running statistics away from (0, 1)
            m[1].running_mean.uniform_(-0.5, 0.5, generator=gen)
            m[1].running_var.uniform_(0.5, 2.0, generator=gen)
        x = torch.randn(11, 1, side, side, generator=gen, dtype=torch.float64)
        batches = [(x[:7], y[:7]), (x[7:], y[7:])]
        calls.clear()
        head = fastcurv.HessianOperator(models, batches, backend="fused", loss=loss, backend_options={"sample_chunk_bytes": 1})
        gemm = fastcurv.HessianOperator(models, batches, backend="fused", loss=loss, backend_options={"fused_head": False})
        V = torch.randn(2, K, head.P, generator=gen, dtype=torch.float64)
        HV = head.matvec(V)
        assert (len(calls) == 11) if runs else not calls  # one call per sample chunk (one sample each)
        torch.testing.assert_close(HV, gemm.matvec(V), rtol=1e-10, atol=1e-13)
        for r in range(2):
            torch.testing.assert_close(HV[r], V[r] @ dense_hessian(models[r], batches, loss=loss).T, rtol=1e-9, atol=1e-12)


def test_sample_chunks_default_to_default_sample_chunk_bytes(monkeypatch):
    """Without ``sample_chunk_bytes`` the conv engine's sample chunks fit
    ``backend.default_sample_chunk_bytes`` of the device (16 MiB on the CPU, 2 GiB on a GPU): the
    one figure that the memory plan reads too (it restated the numbers)."""
    import fastcurv.backends.fused.backend as backend_mod

    assert backend_mod.default_sample_chunk_bytes("cpu") == 16 << 20
    assert backend_mod.default_sample_chunk_bytes(torch.device("cuda", 0)) == 2 << 30
    models = replicas(lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)), R=2)
    x, y = torch.randn(10, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    op = fastcurv.HessianOperator(models, (x, y), backend="fused")
    assert op.backend._sample_step(x, 1 << 20) == 10
    monkeypatch.setattr(backend_mod, "default_sample_chunk_bytes", lambda device: 3 << 20)
    assert op.backend._sample_step(x, 1 << 20) == 3
    op = fastcurv.HessianOperator(models, (x, y), backend="fused", backend_options={"sample_chunk_bytes": 2 << 20})
    assert op.backend._sample_step(x, 1 << 20) == 2
