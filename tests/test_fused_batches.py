"""The MLP engine joins consecutive small batches into blocks (one unit of work each): the same
products, gradients and exact traces as batch by batch and as dense float64 Hessians, within the
memory the state cache allows; models with batch statistics are never joined."""
import pytest
import torch
from torch import nn

import fastcurv
import fastcurv.backends.fused.backend as fused_backend
from fastcurv.backends.fused import blocks
from fastcurv.backends.fused.blocks import first_pass, later_pass
from models import mlp, replicas
from oracle import dense_hessian


def _batches(n_batches=8, rows=4, d=6, C=3, target="labels", sparse=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N = n_batches * rows - 1  # a ragged last batch
    x = torch.randn(N, d, generator=gen, dtype=torch.float64)
    if sparse:  # about 20% nonzero, so that the first layer takes its CSR products
        x = x * (torch.rand(N, d, generator=gen, dtype=torch.float64) < 0.2)
    if target == "labels":
        y = torch.randint(0, C, (N,), generator=gen)
    elif target == "soft":  # class probabilities; rows summing to 1 in some batches and not in others
        y = torch.softmax(torch.randn(N, C, generator=gen, dtype=torch.float64), -1)
        y[rows:3 * rows] *= 1.5
    else:
        y = torch.randn(N, C, generator=gen, dtype=torch.float64)
    return [(x[i:i + rows], y[i:i + rows]) for i in range(0, N, rows)]


def _count_passes(monkeypatch):
    calls = []
    apply = fused_backend.FusedBackend._apply
    monkeypatch.setattr(fused_backend.FusedBackend, "_apply", lambda self, *a, **k: calls.append(1) or apply(self, *a, **k))
    return calls


@pytest.mark.parametrize("target,loss,sparse", [("labels", "cross_entropy", False), ("soft", "cross_entropy", False),
                                                ("values", "mse", False), ("labels", "cross_entropy", True)])
def test_small_batches_run_as_one_block(monkeypatch, target, loss, sparse):
    """8 batches of 4 samples (one of 3) ran as 8 passes of the MLP engine, each paying a Python
    pass and a weight-sized read-modify-write of the products: 512 MNIST images in batches of 32
    took 2.0x the time of one batch in the default job, in batches of 1 30x (8 MLPs 784-64-64-10).
    Now they run as one block: the matvec (twice: the state cached per block), the gradient with
    and without the cached state, and the exact trace equal the batch-by-batch engine's and the
    dense float64 Hessian's (labels, soft targets whose mass differs between batches, MSE, CSR
    first-layer inputs)."""
    if sparse and not fastcurv.cpu_extension_loaded():
        pytest.skip("C++ extension not built")
    models = replicas(lambda: mlp(nn.ReLU, sizes=(6, 7, 5, 3)), 3, seed=1)
    data = _batches(target=target, sparse=sparse)
    op = fastcurv.HessianOperator(models, data, backend="fused", loss=loss)
    calls = _count_passes(monkeypatch)
    V = torch.randn(3, 2, op.P, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    HV = op.matvec(V)
    assert len(calls) == 1, f"{len(calls)} passes over 8 batches of 31 samples"
    assert op.backend._groups == [list(range(8))] and (op.backend._cache[0][1].csr is not None) == sparse
    torch.testing.assert_close(op.matvec(V), HV, rtol=0, atol=0)  # from the state cached for the block
    monkeypatch.setattr(fused_backend, "JOIN_ROWS", 1)  # the engine batch by batch
    each = fastcurv.HessianOperator(models, data, backend="fused", loss=loss)
    torch.testing.assert_close(HV, each.matvec(V), rtol=1e-12, atol=1e-14)
    assert len(each.backend._groups) == 8
    for reuse in (False, True):
        got, want = op.loss_and_gradient(reuse_state=reuse), each.loss_and_gradient(reuse_state=reuse)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(op.exact_trace(), each.exact_trace(), rtol=1e-12, atol=0)
    for r, m in enumerate(models):
        H = dense_hessian(m, data, loss=loss)
        torch.testing.assert_close(HV[r], V[r] @ H.T, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(op.exact_trace()[r], torch.trace(H), rtol=1e-10, atol=0)


def test_blocks_join_consecutive_batches_up_to_a_size():
    """Batches join greedily up to the block size (a larger batch stays alone), and not across a
    change of input or target shape; later passes join the same batches."""
    def items(sizes, feats=None):
        feats = feats or [3] * len(sizes)
        return [(i, torch.full((n, f), float(i)), torch.full((n,), i)) for i, (n, f) in enumerate(zip(sizes, feats))]

    groups = []
    joined = [b.data() for b in first_pass(items([300, 200, 100, 600, 5, 5]), 512, groups)]
    assert groups == [[0, 1], [2], [3], [4, 5]]
    assert [tuple(x.shape) for x, _ in joined] == [(500, 3), (100, 3), (600, 3), (10, 3)]
    assert torch.equal(joined[0][0][:, 0], torch.cat([torch.zeros(300), torch.ones(200)]))
    assert torch.equal(joined[3][1], torch.tensor([4] * 5 + [5] * 5))
    again = list(later_pass(items([300, 200, 100, 600, 5, 5]), groups))
    assert [(b.index, b.rows, b.joined) for b in again] == [(0, 500, True), (1, 100, False), (2, 600, False), (3, 10, True)]
    assert all(torch.equal(a[0], b.data()[0]) and torch.equal(a[1], b.data()[1]) for a, b in zip(joined, again))
    groups = []
    list(first_pass(items([2, 2, 2, 2], feats=[3, 3, 4, 4]), 512, groups))
    assert groups == [[0, 1], [2, 3]]
    with pytest.raises(RuntimeError, match="more batches"):
        list(later_pass(items([2, 2, 2]), [[0, 1]]))


def test_cached_blocks_are_not_joined_again(monkeypatch):
    """Every pass joined each block's batches again (a torch.cat of its inputs and targets), also
    where the block's state was cached and the matvec read neither: a matvec on 512 MNIST images
    in 16 batches of 32 took 1.04x the time of one batch (10 MLPs 784-128-128-10). Now a block's
    batches are joined only where its state is computed (the first pass, a gradient without the
    cached state), and the products, gradients and exact trace equal those of the same samples
    as one batch, to the bit."""
    joins, join = [], blocks._join

    def counted(parts):
        if len(parts) > 1:
            joins.append(len(parts))
        return join(parts)

    monkeypatch.setattr(blocks, "_join", counted)
    models = replicas(lambda: mlp(nn.ReLU, sizes=(6, 7, 5, 3)), 3, seed=1)
    data = _batches()
    op = fastcurv.HessianOperator(models, data, backend="fused")
    one = fastcurv.HessianOperator(models, [(torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data]))],
                                   backend="fused")
    V = torch.randn(3, 2, op.P, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = one.matvec(V)
    joins.clear()
    for _ in range(3):
        torch.testing.assert_close(op.matvec(V), want, rtol=0, atol=0)
    torch.testing.assert_close(op.exact_trace(), one.exact_trace(), rtol=0, atol=0)
    torch.testing.assert_close(op.loss_and_gradient(reuse_state=True), one.loss_and_gradient(reuse_state=True),
                               rtol=0, atol=0)
    assert joins == [8], f"joins of 8 batches per pass: {joins}"
    torch.testing.assert_close(op.loss_and_gradient(), one.loss_and_gradient(), rtol=0, atol=0)
    assert joins == [8, 8]  # (the gradient's own passes join them)


def test_block_size_stays_within_the_state_cache(monkeypatch):
    """What a block adds (its state for every replica, twice, its inputs' copy and a matvec's
    tangents) stays within a quarter of the state cache: no joins without a cache, blocks shrinking
    with it, and the results the same."""
    models = replicas(lambda: mlp(nn.ReLU, sizes=(6, 7, 5, 3)), 3, seed=1)
    data = _batches(n_batches=16)
    V = torch.randn(3, 1, sum(p.numel() for p in models[0].parameters()), dtype=torch.float64)
    want = None
    x, y = data[0]
    for cache in (0, 1_000_000, 2_000_000, None):
        opts = {} if cache is None else {"cache_bytes": cache}
        op = fastcurv.HessianOperator(models, data, backend="fused", backend_options=opts)
        got = op.matvec(V)
        b = op.backend
        rows = b._join_rows(x, y)
        largest = max(sum(len(data[i][0]) for i in g) for g in b._groups)
        assert largest <= max(4, rows)
        if cache == 0:
            assert len(b._groups) == 16
        elif cache is None:
            assert b._groups == [list(range(16))]
        else:
            assert 4 < largest < 63 and 2 * 3 * rows * b.state_bytes_per_sample(x, y) <= cache // 4
        want = got if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_joined_blocks_from_a_loader_not_kept_in_memory():
    """With cache_data=False the loader is read again on every pass and its batches joined the same
    way; the state too large to cache is recomputed per block."""
    models = replicas(lambda: mlp(nn.ReLU, sizes=(6, 7, 5, 3)), 2, seed=3)
    data = _batches(n_batches=6, seed=4)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    op = fastcurv.HessianOperator(models, loader, backend="fused", cache_data=False)
    whole = fastcurv.HessianOperator(models, (x, y), backend="fused")
    V = torch.randn(2, 1, op.P, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(op.matvec(V), whole.matvec(V), rtol=1e-12, atol=1e-14)
    assert op.backend._groups == [list(range(6))]


def test_batch_statistics_are_never_joined():
    """BatchNorm with batch statistics normalizes each batch by itself (the conv engine, which
    keeps every batch): the products stay those of separate batches (autograd's)."""
    def net():
        return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))

    models = replicas(net, 2, seed=6)
    data = _batches(n_batches=3, rows=6, d=4, seed=7)
    fused = fastcurv.HessianOperator(models, data, backend="fused", bn_mode="batch")
    oracle = fastcurv.HessianOperator(models, data, backend="autograd", bn_mode="batch")
    joined = fastcurv.HessianOperator(models, [(torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data]))],
                                      backend="autograd", bn_mode="batch")
    V = torch.randn(2, 1, fused.P, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    got = fused.matvec(V)
    torch.testing.assert_close(got, oracle.matvec(V), rtol=1e-9, atol=1e-12)
    assert (got - joined.matvec(V)).abs().max() > 1e-3  # (what a join would have given)
    assert fused.backend._groups is None
