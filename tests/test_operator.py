"""Every backend's Hessian-vector products against dense float64 Hessians (torch.func.hessian)."""
import pytest
import torch
from torch import nn

import fastcurv
from models import cnn, mlp, replicas
from oracle import dense_hessian, ragged

BACKENDS = ["autograd", "func", "auto"]



def check_against_dense(models, batches, backend, **kw):
    op = fastcurv.HessianOperator(models, batches, backend=backend, **kw)
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(len(models), 3, op.P, generator=gen, dtype=torch.float64)
    HV = op.matvec(V)
    for r, m in enumerate(models):
        H = dense_hessian(m, batches, loss=kw.get("loss", "cross_entropy"), reduction=kw.get("reduction", "mean"),
                          bn_mode=kw.get("bn_mode", "eval"))
        torch.testing.assert_close(HV[r], V[r] @ H.T, rtol=1e-9, atol=1e-11)
    return op


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU, nn.GELU, nn.Sigmoid])
def test_mlp_cross_entropy_ragged(backend, act):
    models = replicas(lambda: mlp(act), R=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(23, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=gen)
    check_against_dense(models, ragged(x, y, [10, 10, 3]), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mlp_mse(backend, reduction):
    models = replicas(lambda: mlp(nn.Tanh, (4, 6, 2)), R=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(17, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(17, 2, generator=gen, dtype=torch.float64)
    check_against_dense(models, ragged(x, y, [8, 8, 1]), backend, loss="mse", reduction=reduction)


@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_callable_loss(backend):
    def smooth_l1(out, y):
        return nn.functional.smooth_l1_loss(out, y, reduction="sum") / out.shape[0]

    models = replicas(lambda: mlp(nn.Tanh, (3, 5, 2)), R=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(9, 2, generator=gen, dtype=torch.float64) * 0.1
    check_against_dense(models, ragged(x, y, [5, 4]), backend, loss=smooth_l1)


@pytest.mark.parametrize("backend", ["autograd", "func"])
@pytest.mark.parametrize("pool", ["max", "avg", "adaptive"])
def test_cnn_batchnorm_eval(backend, pool):
    models = replicas(lambda: cnn(pool), R=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    check_against_dense(models, ragged(x, y, [4, 3]), backend)


@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_batchnorm_batch_statistics(backend):
    models = replicas(lambda: cnn("avg"), R=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    op = check_against_dense(models, ragged(x, y, [4, 4]), backend, bn_mode="batch")
    # batch statistics really differ from running statistics
    op_eval = fastcurv.HessianOperator(models, ragged(x, y, [4, 4]), backend=backend)
    V = torch.randn(2, op.P, dtype=torch.float64, generator=gen)
    assert (op.matvec(V) - op_eval.matvec(V)).abs().max() > 1e-6
    # the user's models are left in their own mode
    assert all(m.training for m in models)


def test_linear_regression_closed_form():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(31, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(31, 1, generator=gen, dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()
    op = fastcurv.HessianOperator([model], ragged(X, y, [16, 15]), loss="mse")
    expected = 2 * X.T @ X / 31
    torch.testing.assert_close(op.dense(0), expected, rtol=1e-10, atol=1e-12)


def test_batched_equals_loop_and_probe_layout():
    models = replicas(lambda: mlp(nn.Tanh, (6, 8, 4)), R=4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, generator=gen)
    y = torch.randint(0, 4, (20,), generator=gen)
    op = fastcurv.HessianOperator(models, (x, y))
    V = torch.randn(4, 5, op.P, generator=gen)
    HV = op.matvec(V)
    for r, m in enumerate(models):
        single = fastcurv.hvp([m], (x, y), V[r : r + 1])
        torch.testing.assert_close(HV[r : r + 1], single, rtol=1e-4, atol=1e-6)
        for k in (0, 4):
            torch.testing.assert_close(HV[r, k], fastcurv.hvp([m], (x, y), V[r : r + 1, k])[0], rtol=1e-4, atol=1e-6)
    # idx selects a subset of replicas
    idx = torch.tensor([3, 1])
    torch.testing.assert_close(op.matvec(V[idx], idx=idx), HV[idx], rtol=1e-4, atol=1e-6)


def test_loader_read_once_per_matvec_and_cache():
    class CountingLoader:
        def __init__(self, batches):
            self.batches, self.passes = batches, 0

        def __iter__(self):
            self.passes += 1
            return iter(self.batches)

    models = replicas(lambda: mlp(nn.Tanh), R=5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    loader = CountingLoader(ragged(x, y, [6, 6]))
    op = fastcurv.HessianOperator(models, loader, cache_data=False)
    first = loader.passes
    op.matvec(torch.randn(5, 2, op.P, dtype=torch.float64))
    assert loader.passes == first + 1  # one pass for all 5 replicas and both probes
    loader2 = CountingLoader(ragged(x, y, [6, 6]))
    op2 = fastcurv.HessianOperator(models, loader2, cache_data=True)
    op2.matvec(torch.randn(5, op.P, dtype=torch.float64))
    op2.matvec(torch.randn(5, op.P, dtype=torch.float64))
    assert loader2.passes == 1  # cached on the device after the first pass


def test_func_reuse_matches_fresh():
    models = replicas(lambda: mlp(nn.GELU), R=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    V = torch.randn(3, 2, sum(p.numel() for p in models[0].parameters()), generator=gen, dtype=torch.float64)
    a = fastcurv.HessianOperator(models, (x, y), backend="func", backend_options={"reuse": True})
    b = fastcurv.HessianOperator(models, (x, y), backend="func", backend_options={"reuse": False})
    torch.testing.assert_close(a.matvec(V), b.matvec(V))
    torch.testing.assert_close(a.matvec(V[[2, 0]], idx=torch.tensor([2, 0])), b.matvec(V)[[2, 0]])


def test_func_drops_a_linearization_before_linearizing_fewer_replicas(monkeypatch):
    """When the active replicas fall below half of those linearized, the batch is linearized again
    for them; the old linearization is released first, so the two never take memory together."""
    from fastcurv.backends import func

    models = replicas(lambda: mlp(nn.Tanh), R=5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    op = fastcurv.HessianOperator(models, [(x[:6], y[:6]), (x[6:], y[6:])], backend="func", backend_options={"reuse": True})
    ref = fastcurv.HessianOperator(models, [(x[:6], y[:6]), (x[6:], y[6:])], backend="autograd")
    V = torch.randn(5, 2, op.P, generator=gen, dtype=torch.float64)
    op.matvec(V)
    held = []
    build = func.FuncBackend._linear_map
    monkeypatch.setattr(func.FuncBackend, "_linear_map",
                        lambda self, *a: held.append(sorted(self._linear)) or build(self, *a))
    idx = torch.tensor([3, 1])
    torch.testing.assert_close(op.matvec(V[idx], idx=idx), ref.matvec(V[idx], idx=idx))
    assert held == [[1], [0]]  # each batch is linearized anew with only the other batch's linearization kept


@pytest.mark.parametrize("R,K,item,budget,want", [
    (5, 4, 10, 1000, (5, 4)),  # everything fits
    (5, 4, 10, 100, (5, 2)),  # all replicas, two probes at a time
    (5, 4, 10, 49, (4, 1)),  # not even one probe for all replicas: one probe, four replicas
    (5, 4, 10, 5, (1, 1)),  # not even one item: one at a time
    (3, 1, 10, 10**9, (3, 1)),
])
def test_func_work_chunks(R, K, item, budget, want):
    from fastcurv.backends.func import work_chunks

    assert work_chunks(R, K, item, budget) == want


@pytest.mark.parametrize("items", [1, 7.5])  # one replica and probe per call; two probes for all three replicas
def test_func_without_reuse_in_chunks_matches_one_call(items, monkeypatch):
    """Without reuse, in mode "forward", replicas and probes run in chunks that fit work_bytes (so
    that many probes of a large model do not exhaust memory); the products stay those of the
    autograd oracle."""
    from fastcurv.backends import func

    models = replicas(lambda: cnn("max"), R=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen)
    batches = ragged(x, y, [5, 4])
    P = sum(p.numel() for p in models[0].parameters())
    V = torch.randn(3, 3, P, generator=gen, dtype=torch.float64)
    whole = fastcurv.HessianOperator(models, batches, backend="autograd")
    budget = int(items * func.hvp_bytes(whole.replicas, x[:5]))
    chunks = []
    real = func.work_chunks
    monkeypatch.setattr(func, "work_chunks", lambda *a: chunks.append(real(*a)) or chunks[-1])
    split = fastcurv.HessianOperator(models, batches, backend="func",
                                     backend_options={"reuse": False, "work_bytes": budget, "mode": "forward"})
    torch.testing.assert_close(split.matvec(V), whole.matvec(V))
    assert chunks[0] == ((1, 1) if items == 1 else (3, 2))
    torch.testing.assert_close(split.matvec(V[[2, 0]], idx=torch.tensor([2, 0])), whole.matvec(V)[[2, 0]])
    with pytest.raises(ValueError, match="work_bytes must be positive"):
        fastcurv.HessianOperator(models, batches, backend="func", backend_options={"work_bytes": 0})


@pytest.mark.parametrize("K", [1, 2])
def test_func_graph_mode_without_reuse_in_replica_chunks(K, monkeypatch):
    """Mode "graph" (the default; batch-statistics BatchNorm here) without reuse builds each batch's
    graph for as many replicas as fit work_bytes; the products stay those of the autograd oracle."""
    from fastcurv.backends import func

    models = replicas(lambda: cnn("avg"), R=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    data = (x, y) if K == 1 else ragged(x, y, [4, 4])  # K=1 on one batch: the single-product path
    V = torch.randn(3, K, sum(p.numel() for p in models[0].parameters()), generator=gen, dtype=torch.float64)
    ref = fastcurv.HessianOperator(models, data, backend="autograd", bn_mode="batch")
    budget = int(1.5 * func.graph_bytes(ref.replicas, x if K == 1 else x[:4]))  # one replica per graph
    chunks = []
    real = func.work_chunks
    monkeypatch.setattr(func, "work_chunks", lambda *a: chunks.append(real(*a)) or chunks[-1])
    op = fastcurv.HessianOperator(models, data, backend="func", bn_mode="batch",
                                  backend_options={"reuse": False, "work_bytes": budget})
    assert op.backend.mode == "graph"
    torch.testing.assert_close(op.matvec(V), ref.matvec(V))
    assert chunks and chunks[0] == (1, 1)
    torch.testing.assert_close(op.matvec(V[[2, 0]], idx=torch.tensor([2, 0])), ref.matvec(V)[[2, 0]])


def test_func_auto_reuse_follows_the_linearization_estimate():
    """reuse="auto" keeps the linearizations (mode "forward") or retained graphs (mode "graph", the
    default) only when their estimated size fits reuse_bytes. Per byte of output, feature maps /
    other outputs / parameters: linearizations 30 / 20 / 24, graphs at their peak 8 / 7 / 8 and once
    built 3 / 3 / 4; without reuse, per replica and probe, 6 / 9 / 6 (calibrated on MLPs, CNNs and
    ResNets)."""
    from fastcurv.backends.func import graph_bytes, graph_held_bytes, hvp_bytes, linearization_bytes, memory_costs

    models = replicas(lambda: cnn("max"), R=2)
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    op = fastcurv.HessianOperator(models, (x, y), backend="func")
    rs, P = op.backend.replicas, op.P
    # conv, BatchNorm, ReLU: [6, 2, 4, 4]; pool, flatten: [6, 2, 2, 2] / [6, 8]; linear: [6, 3]; the model: [6, 3]
    maps, flat = 8 * (3 * 6 * 2 * 16 + 6 * 2 * 4), 8 * (6 * 8 + 2 * 6 * 3)
    assert linearization_bytes(rs, x) == 30 * maps + 20 * flat + 24 * 8 * P
    assert graph_bytes(rs, x) == 8 * maps + 7 * flat + 8 * 8 * P
    assert graph_held_bytes(rs, x) == 3 * (maps + flat) + 4 * 8 * P
    assert hvp_bytes(rs, x) == 6 * maps + 9 * flat + 6 * 8 * P
    # the memory planner's split of each into bytes per sample and fixed bytes (the parameters' part)
    costs = memory_costs(rs, x, "graph")
    assert costs["peak"] == pytest.approx(((8 * maps + 7 * flat) / 6, 8 * 8 * P))
    assert costs["held"] == pytest.approx((3 * (maps + flat) / 6, 4 * 8 * P))
    assert memory_costs(rs, x, "forward")["item"] == pytest.approx(((6 * maps + 9 * flat) / 6, 6 * 8 * P))
    assert op.backend.mode == "graph" and op.backend.reuse  # 2 replicas x 1 batch, far below the default 8 GiB
    # three batches: one graph at its peak, the two others as built
    three = fastcurv.HessianOperator(models, [(x, y)] * 3, backend="func")
    assert three.backend._reused_bytes(x, 3) == 2 * (graph_bytes(rs, x) + 2 * graph_held_bytes(rs, x))
    for mode, est in (("graph", 2 * graph_bytes(rs, x)), ("forward", 2 * linearization_bytes(rs, x))):
        for budget, reuse in ((est, True), (est - 1, False)):
            o = fastcurv.HessianOperator(models, (x, y), backend="func", backend_options={"reuse_bytes": budget, "mode": mode})
            assert o.backend.reuse is reuse
    # compile=True compiles the reused linearizations (mode "forward", its default): a warning when there are none
    with pytest.warns(RuntimeWarning, match="running without reuse and uncompiled"):
        o = fastcurv.HessianOperator(models, (x, y), backend="func", backend_options={"reuse_bytes": est - 1, "compile": True})
    assert o.backend.mode == "forward" and not o.backend.reuse
    with pytest.warns(RuntimeWarning, match="no effect with reuse=False"):
        fastcurv.HessianOperator(models, (x, y), backend="func", backend_options={"reuse": False, "compile": True})
    with pytest.warns(RuntimeWarning, match="mode 'graph' runs uncompiled"):
        fastcurv.HessianOperator(models, (x, y), backend="func", backend_options={"mode": "graph", "compile": True})


def test_gradient_matches_autograd():
    models = replicas(lambda: mlp(nn.Tanh), R=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    op = fastcurv.HessianOperator(models, ragged(x, y, [7, 3]))
    loss, grad = op.loss_and_gradient()
    for r, m in enumerate(models):
        m.zero_grad()
        l = nn.functional.cross_entropy(m(x), y)
        l.backward()
        torch.testing.assert_close(loss[r], l.detach())
        torch.testing.assert_close(grad[r], torch.cat([p.grad.flatten() for p in m.parameters()]))


def test_batch_statistics_against_finite_differences():
    """Guards the reason the func backend uses reverse-over-reverse for batch-statistics BatchNorm:
    every backend must match central differences of the exact gradient."""
    models = replicas(lambda: cnn("avg"), R=1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    batches = ragged(x, y, [4, 4])
    v = torch.randn(1, sum(p.numel() for p in models[0].parameters()), generator=gen, dtype=torch.float64)
    eps = 1e-5

    def grad_at(delta):
        m = models[0]
        with torch.no_grad():
            for p, d in zip(m.parameters(), fastcurv.ReplicaSet([m]).unflatten(delta[0])):
                p.add_(d)
        g = fastcurv.HessianOperator([m], batches, bn_mode="batch").loss_and_gradient()[1]
        with torch.no_grad():
            for p, d in zip(m.parameters(), fastcurv.ReplicaSet([m]).unflatten(delta[0])):
                p.sub_(d)
        return g

    fd = (grad_at(eps * v) - grad_at(-eps * v)) / (2 * eps)
    for backend in ["autograd", "func"]:
        hv = fastcurv.HessianOperator(models, batches, backend=backend, bn_mode="batch").matvec(v)
        torch.testing.assert_close(hv, fd, rtol=1e-5, atol=1e-7)


def test_func_backend_compiled_linearization_matches_eager():
    """backend_options={"compile": True}: the torch.compile'd linearization gives the eager products."""
    gen = torch.Generator().manual_seed(3)
    models = []
    for _ in range(2):
        m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        models.append(m)
    x, y = torch.randn(9, 5, generator=gen), torch.randint(0, 3, (9,), generator=gen)
    eager = fastcurv.HessianOperator(models, (x, y), backend="func")
    compiled = fastcurv.HessianOperator(models, (x, y), backend="func", backend_options={"compile": True})
    V = torch.randn(2, 2, eager.P, generator=gen)
    torch.testing.assert_close(compiled.matvec(V), eager.matvec(V), rtol=1e-5, atol=1e-6)
    assert compiled.backend.compile_error is None  # (compiled indeed, not the eager fallback)


@pytest.mark.parametrize("backend", ["fused", "func", "autograd"])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_idx_permuting_or_repeating_every_replica(backend, net):
    """``idx`` holding every replica in another order (or one replica twice) picks those
    replicas' Hessians row by row: a permutation of all of them was read as the natural order."""
    models = replicas((lambda: mlp(nn.ReLU)) if net == "mlp" else cnn, 3, seed=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=gen, dtype=torch.float64) if net == "mlp" else torch.randn(9, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen)
    op = fastcurv.HessianOperator(models, (x, y), backend=backend)
    V = torch.randn(3, 2, op.P, generator=gen, dtype=torch.float64)
    H = [dense_hessian(m, [(x, y)]) for m in models]
    _, grad = op.loss_and_gradient()
    for idx in ([2, 0, 1], [1, 1], [0, 1, 2]):
        got = op.matvec(V[: len(idx)], idx=torch.tensor(idx))
        for j, r in enumerate(idx):
            torch.testing.assert_close(got[j], V[j] @ H[r], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op.loss_and_gradient(torch.tensor(idx))[1], grad[idx], rtol=1e-12, atol=1e-14)
