"""The fused R-op engine against dense float64 Hessians and the autograd oracle."""
import copy

import pytest
import torch
from torch import nn

import fastcurv
from models import replicas
from oracle import dense_hessian

ACTS = [nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid]


@pytest.fixture(autouse=True)
def _batches_unjoined(monkeypatch):
    """The MLP engine joins small consecutive batches into one unit of work (``JOIN_ROWS``); these
    tests check how each batch's products and state accumulate, so they keep every batch its own
    unit (the joins are tested in ``tests/test_fused_batches.py``)."""
    monkeypatch.setattr("fastcurv.backends.fused.backend.JOIN_ROWS", 1)


def chain(act, bias=True):
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5, bias=bias), act(), nn.Dropout(0.3),
                         nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Linear(4, 4, bias=bias)), act(), nn.Linear(4, 3, bias=bias))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("R,K", [(1, 1), (3, 4)])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("kernels", ["ext", "torch"])
def test_fused_against_dense(act, R, K, loss, kernels):
    models = replicas(lambda: chain(act, bias=R == 3), R=R)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(13, 2, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (13,), generator=gen) if loss == "cross_entropy" else torch.randn(13, 3, generator=gen, dtype=torch.float64)
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    if kernels == "ext" and not fastcurv.cpu_extension_loaded():
        pytest.skip("C++ extension not built")
    with fastcurv.use_kernels(kernels):
        op = fastcurv.HessianOperator(models, batches, backend="fused", loss=loss)
        V = torch.randn(R, K, op.P, generator=gen, dtype=torch.float64)
        HV = op.matvec(V)
        HV2 = op.matvec(V)  # second matvec reuses the cached per-batch state
    for r in range(R):
        H = dense_hessian(models[r], batches, loss=loss)
        torch.testing.assert_close(HV[r], V[r] @ H.T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(HV2, HV, rtol=0, atol=0)


def test_fused_float32_against_autograd_and_subsets():
    models = replicas(lambda: chain(nn.GELU), R=4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    fused = fastcurv.HessianOperator(models, (x, y), backend="fused")
    oracle = fastcurv.HessianOperator(models, (x, y), backend="autograd")
    V = torch.randn(4, 2, fused.P, generator=gen)
    torch.testing.assert_close(fused.matvec(V), oracle.matvec(V), rtol=1e-4, atol=1e-6)
    idx = torch.tensor([3, 0])
    torch.testing.assert_close(fused.matvec(V[idx], idx=idx), oracle.matvec(V)[idx], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("K", [1, 3])
def test_fused_subsets_of_replicas_in_chunks(K):
    """Subsets (runs of consecutive replicas, out of order, single ones) read the state cached
    for all replicas, or compute their own, in replica chunks of 1 and 2: each row equals the full
    product's."""
    models = replicas(lambda: chain(nn.Tanh), R=7)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=gen)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    ref = fastcurv.HessianOperator(models, batches, backend="autograd")
    V = torch.randn(7, K, ref.P, generator=gen, dtype=torch.float64)
    full = ref.matvec(V)
    subsets = [[0, 1, 2, 4, 5, 6], [6], [2, 3, 5], [5, 1, 2]]
    for chunk_bytes in (1, 2 * 6 * K * 5 * 8):  # 1 and 2 replicas per chunk
        opts = {"chunk_bytes": chunk_bytes}
        for first in (None, torch.tensor([1, 2, 3, 5])):  # state cached for all replicas, or for a subset
            op = fastcurv.HessianOperator(models, batches, backend="fused", backend_options=opts)
            if first is not None:
                op.matvec(V[first], idx=first)
            for sub in subsets:
                idx = torch.tensor(sub)
                torch.testing.assert_close(op.matvec(V[idx], idx=idx), full[idx], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(op.matvec(V), full, rtol=1e-10, atol=1e-12)


def test_fused_without_cache_recomputes_exactly():
    models = replicas(lambda: chain(nn.Tanh), R=2)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen)
    a = fastcurv.HessianOperator(models, (x, y), backend="fused")
    b = fastcurv.HessianOperator(models, (x, y), backend="fused", backend_options={"cache_bytes": 0})
    V = torch.randn(2, 3, a.P, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(a.matvec(V), b.matvec(V))
    assert b.backend._cache == {} and a.backend._cache


@pytest.mark.parametrize("reuse", ["activation", "linear", "conv"])
def test_a_module_run_twice_in_a_sequential_runs_twice(reuse):
    """nn.Sequential runs a reused module at every place it holds it (``named_children`` lists it
    once): a shared activation instance stays in the chain, a reused Linear or Conv2d goes to the
    graph engine, which sums both uses' products; against the dense Hessian."""
    def factory():
        if reuse == "activation":
            act = nn.Tanh()
            return nn.Sequential(nn.Linear(6, 5), act, nn.Linear(5, 5), act, nn.Linear(5, 3))
        if reuse == "linear":
            lin = nn.Linear(5, 5)
            return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), lin, nn.Tanh(), lin, nn.ReLU(), nn.Linear(5, 3))
        conv = nn.Conv2d(2, 2, 3, padding=1)
        return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), conv, nn.ReLU(), conv, nn.Flatten(), nn.Linear(32, 3))

    models = replicas(factory, R=2)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(9, *((6,) if reuse != "conv" else (1, 4, 4)), generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen)
    op = fastcurv.HessianOperator(models, (x, y), backend="fused")
    assert len(op.backend.layers) == len(models[0])
    V = torch.randn(2, 2, op.P, generator=gen, dtype=torch.float64)
    HV = op.matvec(V)
    for r, m in enumerate(models):
        torch.testing.assert_close(HV[r], V[r] @ dense_hessian(m, [(x, y)]), rtol=1e-10, atol=1e-12)
    if reuse != "activation":  # the reused weights make the model curved in them: no exact trace
        assert op.exact_trace_support() == (False, "a parameter is used more than once (by a module run twice or tied weights), which makes the model curved in it")


class _Tied(nn.Module):
    """Two Linear layers sharing one weight (weight tying), each with its own bias."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.tanh(self.a(x)))))


def _tied_sequential():
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight
    return nn.Sequential(a, nn.Tanh(), b, nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("factory", [_Tied, _tied_sequential])
@pytest.mark.parametrize("backend", ["fused", "func", "autograd"])
def test_tied_weights(factory, backend):
    """A weight two modules share is one parameter: every backend's loss, gradient and products
    are those of the model itself (moving the model to the meta device for the functional copy
    used to untie it, and the copy then read a meta tensor's garbage)."""
    models = replicas(factory, R=2)
    gen = torch.Generator().manual_seed(9)
    x, y = torch.randn(9, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (9,), generator=gen)
    op = fastcurv.HessianOperator(models, (x, y), backend=backend)
    assert op.P == sum(p.numel() for p in models[0].parameters())  # the shared weight once
    loss, grad = op.loss_and_gradient()
    V = torch.randn(2, op.P, generator=gen, dtype=torch.float64)
    HV = op.matvec(V)
    for r, m in enumerate(models):
        ref = nn.functional.cross_entropy(m(x), y)
        torch.testing.assert_close(loss[r], ref.detach(), rtol=1e-12, atol=1e-12)
        g = torch.cat([t.flatten() for t in torch.autograd.grad(ref, list(m.parameters()))])
        torch.testing.assert_close(grad[r], g, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(HV[r], dense_hessian(m, [(x, y)]) @ V[r], rtol=1e-10, atol=1e-12)
    if backend == "fused":
        assert not op.exact_trace_support()[0]


def test_auto_prefers_fused_and_explains():
    models = replicas(lambda: chain(nn.ReLU), R=2)
    op = fastcurv.HessianOperator(models, (torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])))
    assert op.backend_name == "fused" and "fused" in op.backend_reason
    soft = replicas(lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softplus(), nn.Flatten(), nn.Linear(8, 3)), R=2)
    op2 = fastcurv.HessianOperator(soft, (torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])))
    assert op2.backend_name == "func" and "Softplus" in op2.backend_reason


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_fused_gradient_matches_autograd(loss):
    models = replicas(lambda: chain(nn.Tanh), R=3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=gen) if loss == "cross_entropy" else torch.randn(11, 3, generator=gen, dtype=torch.float64)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    fused = fastcurv.HessianOperator(models, batches, backend="fused", loss=loss)
    func = fastcurv.HessianOperator(models, batches, backend="func", loss=loss)
    (l1, g1), (l2, g2) = fused.loss_and_gradient(), func.loss_and_gradient()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    l3, g3 = fused.loss_and_gradient(torch.tensor([2, 0]))
    torch.testing.assert_close(g3, g2[[2, 0]])
    # from the matvecs' cached state: all replicas (fills the cache), then a subset read from it
    for idx in (None, torch.tensor([2, 0])):
        l4, g4 = fused.loss_and_gradient(idx, reuse_state=True)
        want = slice(None) if idx is None else idx
        torch.testing.assert_close(l4, l2[want])
        torch.testing.assert_close(g4, g2[want])
    assert fused.backend._cache, "reuse_state=True did not fill the state cache"


@pytest.mark.parametrize("K", [1, 3])
def test_fused_drops_zero_input_columns_exactly(K, monkeypatch):
    """Input columns that are zero in a whole batch (MNIST's borders) are left out of the first
    layer's products: different columns per batch, a batch too small to prune, replica subsets in
    chunks of one; matvec, gradient and exact trace equal the unpruned engine's and dense Hessians."""
    from fastcurv.backends.fused import mlp_state

    models = replicas(lambda: nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)), R=3)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(300, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (300,), generator=gen)
    x[:140, [0, 5, 11]] = 0  # batch 1: three zero columns
    x[140:280, 2:4] = 0  # batch 2: two others
    batches = [(x[:140], y[:140]), (x[140:280], y[140:280]), (x[280:], y[280:])]  # batch 3: 20 rows, not pruned
    monkeypatch.setattr(mlp_state, "ZERO_COLUMNS_MIN_ROWS", 100)
    pruned = fastcurv.HessianOperator(models, batches, backend="fused", backend_options={"chunk_bytes": 1})
    st = pruned.backend._primal(*batches[0], None)
    assert st.keep is not None and st.zero.tolist() == [0, 5, 11] and st.inputs[0].shape == (140, 9)
    assert pruned.backend._primal(*batches[2], None).keep is None
    plain = fastcurv.HessianOperator(models, batches, backend="fused", backend_options={"drop_zero_columns": False})
    assert plain.backend._primal(*batches[0], None).keep is None
    _same_as_plain_engine(pruned, plain, models, batches, K, gen, exact_trace=True)


def _same_as_plain_engine(op, plain, models, batches, K, gen, exact_trace):
    """``op`` (a fused engine with a first-layer shortcut) against dense Hessians and ``plain`` (the
    engine without it): matvecs of all replicas and of a subset, gradients (fresh and from the
    matvecs' cached state) and, for ReLU models, exact traces."""
    V = torch.randn(3, K, op.P, generator=gen, dtype=torch.float64)
    HV = op.matvec(V)
    for r in range(3):
        torch.testing.assert_close(HV[r], V[r] @ dense_hessian(models[r], batches).T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(HV, plain.matvec(V), rtol=1e-12, atol=1e-14)
    idx = torch.tensor([2, 0])
    torch.testing.assert_close(op.matvec(V[idx], idx=idx), HV[idx], rtol=1e-12, atol=1e-14)
    for reuse in (False, True):
        (l1, g1), (l2, g2) = op.loss_and_gradient(reuse_state=reuse), plain.loss_and_gradient()
        torch.testing.assert_close(l1, l2)
        torch.testing.assert_close(g1, g2)
    if exact_trace:
        torch.testing.assert_close(op.exact_trace(), plain.exact_trace())


@pytest.mark.skipif(not fastcurv.cpu_extension_loaded(), reason="C++ extension not built")
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU, nn.Tanh])
def test_fused_sparse_input_against_dense(K, act):
    """Sparse inputs (at most 40% nonzero): the first layer's products come from the nonzero inputs
    (fastcurv.ops.csr_linear, which also applies a piecewise-linear activation's derivative, 0/1 or
    the leaky slope, to the tangent it writes); batches of different density, one too dense for the
    sparse path, replica subsets in chunks of one; matvec, gradient and exact trace against dense
    Hessians and the dense engine."""
    models = replicas(lambda: nn.Sequential(nn.Linear(12, 6), act(), nn.Linear(6, 3)), R=3)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(90, 12, generator=gen, dtype=torch.float64)
    x[:60][torch.rand(60, 12, generator=gen) > 0.3] = 0  # batches 1-2 sparse (one all-zero row)
    x[5] = 0
    y = torch.randint(0, 3, (90,), generator=gen)
    batches = [(x[:30], y[:30]), (x[30:60], y[30:60]), (x[60:], y[60:])]  # batch 3 dense
    sparse = fastcurv.HessianOperator(models, batches, backend="fused", backend_options={"chunk_bytes": 1})
    dense = fastcurv.HessianOperator(models, batches, backend="fused", backend_options={"sparse_input": False})
    assert [sparse.backend._primal(*b, None).csr is not None for b in batches] == [True, True, False]
    assert dense.backend._primal(*batches[0], None).csr is None
    _same_as_plain_engine(sparse, dense, models, batches, K, gen, exact_trace=act is nn.ReLU)


@pytest.mark.skipif(not fastcurv.cpu_extension_loaded(), reason="C++ extension not built")
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("before", ["relu", "linear", "tanh"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_fused_head_kernel_against_dense(K, before, loss, monkeypatch):
    """The last Linear layer and the loss run in the head_hvp kernel, with the ReLU before it folded
    in (or a Linear or Tanh before it, whose R-ops the engine keeps): two batches (accumulated),
    replica subsets in chunks of one, against dense Hessians and the engine with fused_head=False."""
    import fastcurv.backends.fused.loss_head as fused_mod

    mid = {"relu": nn.ReLU(), "linear": nn.Identity(), "tanh": nn.Tanh()}[before]
    models = replicas(lambda: nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 5), mid, nn.Linear(5, 4)), R=3)
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(30, 7, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (30,), generator=gen) if loss == "cross_entropy" else torch.randn(30, 4, generator=gen, dtype=torch.float64)
    batches = [(x[:17], y[:17]), (x[17:], y[17:])]
    calls = []
    monkeypatch.setattr(fused_mod, "head_hvp", lambda *a, **kw: calls.append(kw["d1"] is not None) or fastcurv.ops.head_hvp(*a, **kw))
    head = fastcurv.HessianOperator(models, batches, backend="fused", loss=loss, backend_options={"chunk_bytes": 1})
    gemm = fastcurv.HessianOperator(models, batches, backend="fused", loss=loss, backend_options={"fused_head": False})
    assert head.backend.fused_head and not gemm.backend.fused_head
    V = torch.randn(3, K, head.P, generator=gen, dtype=torch.float64)
    HV = head.matvec(V)
    assert len(calls) == 3 * 2 and set(calls) == {before == "relu"}  # 3 chunks x 2 batches
    torch.testing.assert_close(HV, gemm.matvec(V), rtol=1e-10, atol=1e-13)
    for r in range(3):
        torch.testing.assert_close(HV[r], V[r] @ dense_hessian(models[r], batches, loss=loss).T, rtol=1e-9, atol=1e-12)
    idx = torch.tensor([2, 0])
    torch.testing.assert_close(head.matvec(V[idx], idx=idx), HV[idx], rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not fastcurv.cpu_extension_loaded(), reason="C++ extension not built")
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("fused_head", [True, False])
def test_fused_sparse_hidden_layers_against_dense(K, loss, fused_head, monkeypatch):
    """Linear layers between ReLUs take their matvec products from the ReLU input's nonzeros and the
    output's ReLU pattern (csr_linear, csr_masked_linear, csr_linear_wgrad(_shared)): always, by
    density, or never; two batches (accumulated), replica subsets in chunks of one; against dense
    Hessians and the dense engine, and the gradient from the cached state."""
    import fastcurv.backends.fused.backend as fused_mod
    import fastcurv.backends.fused.mlp_matvec as matvec_mod

    models = replicas(lambda: nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 6),
                                            nn.ReLU(), nn.Linear(6, 4)), R=3)
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (40,), generator=gen) if loss == "cross_entropy" else torch.randn(40, 4, generator=gen, dtype=torch.float64)
    batches = [(x[:23], y[:23]), (x[23:], y[23:])]
    calls = []
    monkeypatch.setattr(matvec_mod, "csr_masked_linear", lambda *a, **kw: calls.append(1) or fastcurv.ops.csr_masked_linear(*a, **kw))
    opts = dict(fused_head=fused_head, chunk_bytes=1)
    always = fastcurv.HessianOperator(models, batches, backend="fused", loss=loss, backend_options={**opts, "sparse_hidden": True})
    auto = fastcurv.HessianOperator(models, batches, backend="fused", loss=loss, backend_options=opts)
    never = fastcurv.HessianOperator(models, batches, backend="fused", loss=loss, backend_options={**opts, "sparse_hidden": False})
    st = always.backend._primal(*batches[0], None)
    # inputs after a ReLU (the head's only without the head kernel); patterns after layers 2 and 3
    assert [c is not None for c in st.sparse_in] == [False, True, True, not fused_head]
    assert [c is not None for c in st.sparse_out] == [False, True, True, False]
    torch.testing.assert_close(st.sparse_out[1].csr.to_dense().view(3, 23, 8), st.deltas[1], rtol=0, atol=0)
    # and its per-replica transposes (the delta^T ra product reads them)
    torch.testing.assert_close(st.sparse_out[1].csr_t.to_dense().view(3, 8, 23), st.deltas[1].transpose(1, 2), rtol=0, atol=0)
    assert not any(auto.backend._primal(*batches[0], None).sparse_in)  # layers narrower than HIDDEN_SPARSE_MIN_WIDTH
    monkeypatch.setattr(fused_mod, "HIDDEN_SPARSE_MIN_WIDTH", {2: 6, 1: 6, 0: 6})
    for level, limit in ((0, 0.3), (1, 0.8), (2, 1.0)):  # the automatic choice, per kernel level
        monkeypatch.setenv("FASTCURV_CPU_LEVEL", str(level))
        if fastcurv._ext.cpu_level() < level:
            continue  # this machine's kernels stop below that level
        assert fused_mod.hidden_sparse_max_density() == limit
        st = auto.backend._primal(*batches[0], None)
        want = [float((a != 0).double().mean()) <= limit for a in st.inputs[1:]]
        assert [c is not None for c in st.sparse_in[1:3]] == want[:2] and [c is not None for c in st.sparse_out[1:3]] == want[1:]
    monkeypatch.delenv("FASTCURV_CPU_LEVEL")
    assert not any(never.backend._primal(*batches[0], None).sparse_in)
    V = torch.randn(3, K, always.P, generator=gen, dtype=torch.float64)
    HV = always.matvec(V)
    assert len(calls) == 3 * 2 * (4 + (not fused_head))  # chunks x batches x masked products (2 in layers 2 and 3, 1 in the head)
    for r in range(3):
        torch.testing.assert_close(HV[r], V[r] @ dense_hessian(models[r], batches, loss=loss).T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(HV, never.matvec(V), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(auto.matvec(V), HV, rtol=1e-12, atol=1e-14)
    idx = torch.tensor([2, 0])
    torch.testing.assert_close(always.matvec(V[idx], idx=idx), HV[idx], rtol=1e-12, atol=1e-14)
    (l1, g1), (l2, g2) = always.loss_and_gradient(reuse_state=True), never.loss_and_gradient()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(always.exact_trace(), never.exact_trace())


@pytest.mark.skipif(not fastcurv.cpu_extension_loaded(), reason="C++ extension not built")
def test_fused_sparse_hidden_minimum_width_per_kernel_level(monkeypatch):
    """By default a hidden layer 32 wide takes the sparse products with the AVX-512 kernels only
    (HIDDEN_SPARSE_MIN_WIDTH: 32 there, 64 with AVX2 and the baseline), one 24 wide never."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 10, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=gen)
    for level, width, sparse in ((2, 32, True), (2, 24, False), (1, 32, False), (0, 32, False)):
        monkeypatch.setenv("FASTCURV_CPU_LEVEL", str(level))
        if fastcurv._ext.cpu_level() < level:
            continue  # this machine's kernels stop below that level
        models = replicas(lambda: nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                                nn.Linear(width, 3)), R=2)
        st = fastcurv.HessianOperator(models, (x, y), backend="fused").backend._primal(x, y, None)
        assert (st.sparse_in[1] is not None, st.sparse_out[1] is not None) == (sparse, sparse), (level, width)


@pytest.mark.skipif(not fastcurv.cpu_extension_loaded(), reason="C++ extension not built")
def test_fused_sparse_hidden_layers_with_empty_rows_and_no_bias():
    """Without biases an all-zero input row leaves every ReLU output of that sample zero: empty CSR
    rows in every pattern. The sparse products still equal the dense engine's and dense Hessians."""
    models = replicas(lambda: nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 6, bias=False), nn.ReLU(),
                                            nn.Linear(6, 3, bias=False)), R=2)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    x[[0, 7]] = 0
    y = torch.randint(0, 3, (12,), generator=gen)
    sparse = fastcurv.HessianOperator(models, (x, y), backend="fused", backend_options={"sparse_hidden": True})
    dense = fastcurv.HessianOperator(models, (x, y), backend="fused", backend_options={"sparse_hidden": False})
    st = sparse.backend._primal(x, y, None)
    assert st.sparse_in[1] is not None and st.sparse_out[1] is not None
    assert int(st.sparse_in[1].csr.indptr[1] - st.sparse_in[1].csr.indptr[0]) == 0  # sample 0 of replica 0
    V = torch.randn(2, 2, sparse.P, generator=gen, dtype=torch.float64)
    HV = sparse.matvec(V)
    torch.testing.assert_close(HV, dense.matvec(V), rtol=1e-12, atol=1e-14)
    for r in range(2):
        torch.testing.assert_close(HV[r], V[r] @ dense_hessian(models[r], [(x, y)]).T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sparse.exact_trace(), dense.exact_trace())


def test_fused_head_applies_only_to_small_last_linears():
    wide = replicas(lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 40)), R=2)
    single = replicas(lambda: nn.Sequential(nn.Linear(4, 3)), R=2)
    x = torch.randn(6, 4, dtype=torch.float64)
    for models in (wide, single):  # 40 outputs > HEAD_MAX_OUTPUTS; the head is the first layer
        op = fastcurv.HessianOperator(models, (x, torch.randn(6, models[0][-1].out_features, dtype=torch.float64)),
                                      backend="fused", loss="mse")
        assert not op.backend.fused_head


@pytest.mark.skipif(not fastcurv.cpu_extension_loaded(), reason="C++ extension not built")
@pytest.mark.parametrize("hidden", [1, 2])
def test_state_bytes_per_sample_scales_to_batches_with_sparse_input(hidden):
    """What the memory planner multiplies by samples: the cached state of a sparse-input batch
    (CSR form and its transpose included; with two hidden layers, their ReLU CSR forms too) is close
    to n times the one-sample measurement."""
    mid = [nn.Linear(16, 16), nn.ReLU()] * (hidden - 1)
    models = replicas(lambda: nn.Sequential(nn.Linear(784, 16), nn.ReLU(), *mid, nn.Linear(16, 10)), R=2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(64, 784, generator=gen) * (torch.rand(64, 784, generator=gen) < 0.2)
    y = torch.randint(0, 10, (64,), generator=gen)
    op = fastcurv.HessianOperator(models, (x, y), backend="fused", backend_options={"sparse_hidden": True})
    st = op.backend._primal(x, y, torch.zeros(1, dtype=torch.long))
    assert st.csr is not None and st.csr_t is not None
    assert sum(c is not None for c in st.sparse_in + st.sparse_out) == 2 * (hidden - 1)
    assert op.backend.state_bytes_per_sample(x, y) * 64 == pytest.approx(st.nbytes, rel=0.3)


def test_a_parameter_no_layer_reads_gets_zero_products():
    """A parameter the model registers but never uses (a temperature applied outside it, say) has
    zero Hessian rows; the MLP engine left its slots of the result unwritten (uninitialized memory)."""
    def make():
        m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        m.register_parameter("temperature", nn.Parameter(torch.ones(5)))
        return m

    models = replicas(make, 2)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (20,), generator=gen)
    op = fastcurv.HessianOperator(models, (x, y), backend="fused")
    H = [dense_hessian(m, [(x, y)]) for m in models]
    for _ in range(3):
        V = torch.randn(2, 3, op.P, generator=gen, dtype=torch.float64)
        torch.full((2, 3, op.P), float("nan"), dtype=torch.float64).add_(1)  # freed pages full of NaN for the result
        HV = op.matvec(V)
        for r in range(2):
            torch.testing.assert_close(HV[r], V[r] @ H[r], rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("one_thread")
def test_mlp_chain_on_sequence_inputs_names_the_layer():
    """An nn.Sequential MLP given [N, T, F] inputs falls back to func with a reason naming the Linear
    layer and the shape (it was "too many values to unpack (expected 2)")."""
    models = replicas(lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), R=2)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, 4, generator=gen, dtype=torch.float64), torch.randn(6, 5, 3, generator=gen, dtype=torch.float64)
    op = fastcurv.HessianOperator(models, (x, y), loss="mse")
    assert op.backend_name == "func", op.backend_reason
    assert "Linear '0' needs inputs [N, 4]" in op.backend_reason and ", 5, 4)" in op.backend_reason, op.backend_reason
    with pytest.raises(ValueError, match=r"Linear '0' needs inputs \[N, 4\].*got \(\d+, 5, 4\)"):
        fastcurv.HessianOperator(models, (x, y), loss="mse", backend="fused")
    V = torch.randn(2, op.P, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V)[0], dense_hessian(models[0], [(x, y)], loss="mse") @ V[0], rtol=1e-10, atol=1e-12)


def _large_output_regression(n=20, features=60, seed=0):
    """Two float32 MLPs with outputs up to about 2e4 (a regression with unnormalized targets), the
    first fitted to 0.01: the targets are its float64 outputs plus noise. Hidden activations about
    1e3 through last-layer weights about 10, on sparse inputs: the engine's first layer (CSR
    products) and autograd's (a dense GEMM) round differently, and the outputs' rounding (about
    1e-3) then differs too."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, features, generator=gen) * (torch.rand(n, features, generator=gen) < 0.2)
    models = [nn.Sequential(nn.Linear(features, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)]
    with torch.no_grad():
        for m in models:
            m[0].bias.fill_(1e3)
            m[2].weight.normal_(generator=gen).mul_(10.0)
        t = copy.deepcopy(models[0]).double()(x.double())
    return models, x, (t + 0.01 * torch.randn(t.shape, generator=gen, dtype=torch.float64)).float()


def test_engine_check_accepts_a_float32_regression_with_large_outputs():
    """The engine check compared float32 against float32 to within 1e-4 of the largest gradient
    entry. With outputs around 1e4, float32 rounds every residual to about 1e-3: here the model's own
    float32 loss is 1.7% off float64 and its gradient 54% (the engine's: 1.3% and 54%; their products
    1.5e-7), and the check found a correct engine's loss 3.91186 against 3.90978 and its gradient 0.06
    apart. ``backend="fused"`` raised, blaming in-place updates, and "auto" fell back to torch.func.
    The check now compares in float64."""
    models, x, y = _large_output_regression()
    op = fastcurv.HessianOperator(models, (x, y), loss="mse")
    assert op.backend_name == "fused", op.backend_reason
    fused = fastcurv.HessianOperator(models, (x, y), loss="mse", backend="fused")
    V = torch.randn(2, fused.P, generator=torch.Generator().manual_seed(1))
    want = fastcurv.HessianOperator(models, (x, y), loss="mse", backend="func").matvec(V)
    torch.testing.assert_close(fused.matvec(V), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _wrong_loss_gradient(monkeypatch, error):
    """Make both engines (the MLP chain's and the conv engine's) wrong: their loss gradient w.r.t.
    the outputs ``1 + error`` times too large."""
    import fastcurv.backends.fused.backend as backend_mod
    import fastcurv.backends.fused.maps as maps_mod

    real = backend_mod._loss_head

    def wrong(*a, **kw):
        loss, probs, delta, mass = real(*a, **kw)
        return loss, probs, delta * (1 + error), mass

    monkeypatch.setattr(backend_mod, "_loss_head", wrong)
    monkeypatch.setattr(maps_mod, "_loss_head", wrong)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_engine_check_still_catches_a_wrong_engine(model, dtype, monkeypatch):
    """The engine check still refuses an engine whose gradient is 1e-3 too large (both engines):
    above float32's tolerance (1e-4 of the largest gradient entry), so the float64 comparison that a
    float32 disagreement now leads to runs, and refuses it too."""
    if model == "mlp":
        models = replicas(lambda: chain(nn.Tanh), R=2, dtype=dtype)
        x = torch.randn(12, 6, generator=torch.Generator().manual_seed(2), dtype=dtype)
    else:
        models = replicas(lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)), R=2, dtype=dtype)
        x = torch.randn(12, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=dtype)
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(3))
    assert fastcurv.HessianOperator(models, (x, y)).backend_name == "fused"
    _wrong_loss_gradient(monkeypatch, 1e-3)
    op = fastcurv.HessianOperator(models, (x, y))
    assert op.backend_name == "func" and "differs from the model's own (replica 0, in torch.float64" in op.backend_reason, op.backend_reason
    with pytest.raises(ValueError, match="differs from the model's own"):
        fastcurv.HessianOperator(models, (x, y), backend="fused")


def test_engine_check_in_float64_catches_a_slightly_wrong_engine(monkeypatch):
    """Where float32 rounding makes the engine check compare again in float64 (outputs around 1e4),
    that comparison still refuses an engine whose gradient is 1e-5 too large: less than the
    float32 disagreement itself, a hundred times float64's tolerance (1e-7)."""
    models, x, y = _large_output_regression()
    _wrong_loss_gradient(monkeypatch, 1e-5)
    op = fastcurv.HessianOperator(models, (x, y), loss="mse")
    assert op.backend_name == "func" and "(replica 0, in torch.float64" in op.backend_reason, op.backend_reason
    assert "apart, 1e-05 of the largest entry" in op.backend_reason, op.backend_reason
