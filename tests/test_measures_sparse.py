"""The measures' gradient-free forwards (measures/_common.py: outputs_at, loss_at, accuracy_at) on
sparse (MNIST-like) inputs take the CSR first layer of ReplicaSet.forward_with, not vmap over
functional_call with a dense first-layer product; dense inputs and models the fused forward does
not plan still take the vmap path, with the same numbers as before."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

import fastcurv
from fastcurv import _ext
from fastcurv.measures import REGISTRY, load_all
from fastcurv.measures._common import accuracy_at, loss_at, normalize_logits, outputs_at
from fastcurv.replicas import ReplicaSet

from _measure_models import single_thread  # noqa: F401  (autouse fixture)

load_all()
needs_csr = pytest.mark.skipif(not _ext.has_kernel("csr_linear", "cpu"), reason="C++ extension not loaded (fastcurv._ext.extension_error() says why)")


def sparse_data(n=60, d=50, k=4, density=0.2, seed=0, dtype=torch.float32):
    """Nonnegative inputs with about ``density`` of them nonzero (like MNIST pixels) and labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=dtype) * (torch.rand(n, d, generator=g) < density)
    return x, torch.randint(0, k, (n,), generator=g)


def mlps(R=3, d=50, k=4, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(d, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, k)).to(dtype)
            for _ in range(R)]


def perturbed(op, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    theta = op.replicas.flat_params()
    return theta + scale * torch.randn(theta.shape, generator=g, dtype=theta.dtype)


def reference_outputs(models, theta, x):
    """Each model's own forward at its row of ``theta``: ``[R, n, C]``."""
    outs = []
    for m, t in zip(models, theta):
        p = dict(zip([n for n, _ in m.named_parameters()],
                     [c.view_as(q) for c, q in zip(t.split([q.numel() for q in m.parameters()]), m.parameters())]))
        outs.append(functional_call(m, p, (x,)))
    return torch.stack(outs).detach()


@pytest.fixture
def dense_calls(monkeypatch):
    """Counts the calls of ReplicaSet.call (the per-replica functional_call that vmap runs)."""
    count = [0]
    original = ReplicaSet.call

    def counting(self, params, buffers, x):
        count[0] += 1
        return original(self, params, buffers, x)

    monkeypatch.setattr(ReplicaSet, "call", counting)
    return count


@needs_csr
def test_gradient_free_forwards_skip_the_dense_first_layer_on_sparse_inputs(dense_calls):
    """outputs_at / loss_at / accuracy_at always ran vmap(functional_call), a dense first-layer
    product, also on MNIST-like inputs where ReplicaSet.forward_with multiplies only the nonzero
    inputs: pac_bayes was 2.0-2.7x slower than needed on MNIST (one forward 4.8-5.1x). The numbers
    were right; the check is that the dense call is not made, and that the values still match each
    model's own forward."""
    x, y = sparse_data()
    models = mlps()
    loader = [(x[:30], y[:30]), (x[30:], y[30:])]
    op = fastcurv.HessianOperator(models, loader)
    theta = perturbed(op)
    want = reference_outputs(models, theta, x)
    dense_calls[0] = 0
    out = outputs_at(op, theta, x)
    losses = loss_at(op, theta)
    acc = accuracy_at(op, theta)
    assert dense_calls[0] == 0, "a gradient-free forward ran vmap(functional_call) on sparse inputs"
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    ce = torch.stack([nn.functional.cross_entropy(o, y) for o in want]).double()
    torch.testing.assert_close(losses, ce, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(acc, (want.argmax(-1) == y).double().mean(-1))


@needs_csr
def test_forward_only_measures_make_no_dense_forward_on_sparse_inputs(dense_calls):
    """pac_bayes (accuracy_at), fisher_rao (outputs_at) and mw_sharpness (loss_at) need no
    gradient: with the sparse path none of their forwards is a vmap(functional_call) (HEAD made
    one per forward: hundreds per pac_bayes job)."""
    x, y = sparse_data(seed=2)
    op = fastcurv.HessianOperator(mlps(R=2, seed=3), (x, y))
    dense_calls[0] = 0
    for name, options in (("pac_bayes", dict(depth=3, mc_samples=2)), ("fisher_rao", {}),
                          ("mw_sharpness", dict(n_samples=3))):
        cols = REGISTRY[name](op, seed=0, common=True, **options)
        assert dense_calls[0] == 0, f"{name} ran vmap(functional_call) on sparse inputs"
        assert all(torch.isfinite(v.value).all() for v in cols.values()), name


@needs_csr
def test_loss_at_options_on_the_sparse_path(dense_calls):
    """loss_at now takes its outputs from outputs_at and vmaps the loss over the replicas: a
    replica subset (idx), one batch's share (batch=) and an output_map still give each model's own
    loss (float64 models, so the tolerance is tight)."""
    x, y = sparse_data(seed=4, dtype=torch.float64)
    models = mlps(R=3, seed=5, dtype=torch.float64)
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    op = fastcurv.HessianOperator(models, loader)
    theta = perturbed(op, seed=6)
    idx = torch.tensor([2, 0])
    want = reference_outputs([models[2], models[0]], theta[idx], x)
    dense_calls[0] = 0
    share = loss_at(op, theta[idx], idx, batch=1, output_map=normalize_logits)
    assert dense_calls[0] == 0
    expect = torch.stack([nn.functional.cross_entropy(normalize_logits(o[20:]), y[20:], reduction="sum") / len(x)
                          for o in want])
    torch.testing.assert_close(share, expect, rtol=1e-12, atol=1e-14)


def test_dense_inputs_keep_the_vmap_path_with_identical_numbers(dense_calls):
    """Gaussian (dense) inputs are not worth the CSR product: the forwards stay on vmap over
    functional_call and give bit-for-bit the numbers of HEAD's formula (vmap of the per-replica
    forward and loss in one function)."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(40, 50, generator=g), torch.randint(0, 4, (40,), generator=g)
    models = mlps(seed=8)
    op = fastcurv.HessianOperator(models, (x, y))
    rs = op.replicas
    theta = perturbed(op, seed=9)
    dense_calls[0] = 0
    out, losses = outputs_at(op, theta, x), loss_at(op, theta, output_map=normalize_logits)
    assert dense_calls[0] > 0

    def old_loss(t, b):
        o = rs.call(dict(zip(rs.names, rs.unflatten(t))), b, x)
        return op.loss.batch_loss(normalize_logits(o), y)

    with torch.no_grad():
        old_out = vmap(lambda t, b: rs.call(dict(zip(rs.names, rs.unflatten(t))), b, x))(theta, rs.buffers)
        old = vmap(old_loss)(theta, rs.buffers).double()
    assert torch.equal(out, old_out)
    assert torch.equal(losses, old)
