"""Dense float64 references used by the tests."""
import torch
from torch import nn
from torch.func import functional_call

from fastcurv.replicas import functional_base


def dense_hessian(model: nn.Module, batches, loss="cross_entropy", reduction="mean", bn_mode="eval"):
    """The full-data Hessian ``[P, P]`` of one model by plain autograd
    (``torch.autograd.functional.hessian`` of the flat loss). Not torch.func: its nested transforms
    (``hessian``, ``jacrev(jacrev)``) get batch-statistics BatchNorm wrong (see test_operator.py)."""
    base = functional_base(model, bn_mode)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    buffers = {n: b for n, b in model.named_buffers() if n in dict(base.named_buffers()) and dict(base.named_buffers())[n] is not None}
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    N = sum(x.shape[0] for x, _ in batches)

    def f(v):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            params[n] = v[i : i + k].view(s)
            i += k
        total = 0
        for x, y in batches:
            out = functional_call(base, (params, buffers), (x,))
            if loss == "cross_entropy":
                l = nn.functional.cross_entropy(out, y, reduction="sum")
                total = total + (l / N if reduction == "mean" else l)
            elif loss == "mse":
                l = nn.functional.mse_loss(out, y, reduction="sum")
                total = total + (l / (N * out[0].numel()) if reduction == "mean" else l)
            else:
                l = loss(out, y) * x.shape[0]
                total = total + (l / N if reduction == "mean" else l)
        return total

    return torch.autograd.functional.hessian(f, flat)


def check_exact_trace(op, models, batches, loss="cross_entropy", reduction="mean"):
    """``op.exact_trace()`` against the trace of each model's dense float64 Hessian."""
    assert op.exact_trace_support() == (True, "")
    got = op.exact_trace()
    for r, m in enumerate(models):
        want = torch.trace(dense_hessian(m, batches, loss=loss, reduction=reduction))
        torch.testing.assert_close(got[r], want, rtol=1e-10, atol=1e-12)


class DenseOperator:
    """A batched operator over explicit symmetric matrices ``[R, P, P]`` (for solver tests)."""

    def __init__(self, mats):
        self.mats = mats
        self.R, self.P = mats.shape[0], mats.shape[1]
        self.dtype, self.device = mats.dtype, mats.device
        self.failed = torch.zeros(self.R, dtype=torch.bool)
        self.num_matvecs = 0

    def matvec(self, V, idx=None):
        single = V.dim() == 2
        V3 = V.unsqueeze(1) if single else V
        M = self.mats if idx is None else self.mats[idx]
        out = torch.einsum("rpq,rkq->rkp", M, V3)
        self.num_matvecs += V3.shape[1]
        return out.squeeze(1) if single else out


def ragged(x, y, sizes):
    """Split one batch into consecutive batches of the given sizes (a ragged loader)."""
    return list(zip(x.split(list(sizes)), y.split(list(sizes))))


def check_fused_float32(models, data, gen):
    """The fused backend in float32 against the autograd oracle (all replicas, and the subset
    [3, 1]) and its batched gradient against func's; returns (fused operator, subset, func gradient)."""
    import fastcurv

    fused = fastcurv.HessianOperator(models, data, backend="fused")
    oracle = fastcurv.HessianOperator(models, data, backend="autograd")
    V = torch.randn(len(models), 3, fused.P, generator=gen)
    ref = oracle.matvec(V)
    torch.testing.assert_close(fused.matvec(V), ref, rtol=1e-4, atol=1e-5)
    idx = torch.tensor([3, 1])
    torch.testing.assert_close(fused.matvec(V[idx], idx=idx), ref[idx], rtol=1e-4, atol=1e-5)
    func = fastcurv.HessianOperator(models, data, backend="func")
    (l1, g1), (l2, g2) = fused.loss_and_gradient(), func.loss_and_gradient()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    return fused, idx, g2


def pairwise_ce_product(p, t):
    """``(diag(p) - p p^T) t`` along the last dimension as ``p_i sum_j p_j (t_i - t_j)``: free of
    cancellation, and independent of the kernels' pivoted formula."""
    return (p.unsqueeze(-1) * p.unsqueeze(-2) * (t.unsqueeze(-1) - t.unsqueeze(-2))).sum(-1)


def rowwise_error(got, want) -> float:
    """The largest relative error of the rows (last dimension) of ``got`` against float64 ``want``."""
    return float(((got.double().cpu() - want).norm(dim=-1) / want.norm(dim=-1)).max())


def sgd_loop(build, x, y, seeds, *, lr=0.1, epochs=2, batch_size=16, momentum=0.9, weight_decay=0.0):
    """Each replica alone, trained by torch.optim.SGD with cross-entropy on the batches
    train_population gives it (``epoch_order`` of its seed), the model as built (training mode): the
    reference the training tests compare with."""
    from fastcurv.train import epoch_order, init_replicas

    models = init_replicas(build, seeds)
    for s, m in zip(seeds, models):
        opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        for e in range(epochs):
            order = epoch_order(s, e, len(x))
            for k in range(0, len(x), batch_size):
                i = order[k:k + batch_size]
                opt.zero_grad()
                nn.functional.cross_entropy(m(x[i]), y[i]).backward()
                opt.step()
    return models
