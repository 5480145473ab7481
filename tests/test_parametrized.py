"""Models with torch.nn.utils.parametrize parametrizations: torch's weight norm
(``torch.nn.utils.parametrizations.weight_norm``) measured against the same model with the weight
norm written out by hand, in float64; the functional copy's replacement for it
(:class:`fastcurv.replicas.PlainWeightNorm`) against torch's values; the first-order paths and
the fused engine's refusal of parametrized models."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm, weight_norm

import fastcurv
from fastcurv.replicas import PlainWeightNorm, ReplicaSet
from fastcurv.train import train_population
from fastcurv.train_eval import evaluate_population

pytestmark = pytest.mark.usefixtures("one_thread")

_G = "0.parametrizations.weight.original0"
_V = "0.parametrizations.weight.original1"


def _data():
    """``x [20, 5]`` float64 inputs and ``y [20]`` labels of 3 classes."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(20, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)


def _wn_mlp(dim, seed: int = 0) -> nn.Module:
    """5-6-3 tanh MLP in float64 with torch's weight norm (``dim``) on its first layer."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    weight_norm(m[0], dim=dim)
    return m


def _written_out_weight(g: torch.Tensor, v: torch.Tensor, dim) -> torch.Tensor:
    """The first layer's ``[6, 5]`` weight ``g * v / |v|`` by hand: the norm of each row
    (``dim=0``), of each column (``dim=1``) or of all of ``v`` (``dim=None``)."""
    sq = v * v
    norm = {0: sq.sum(1, keepdim=True), 1: sq.sum(0, keepdim=True), None: sq.sum()}[dim].sqrt()
    return g * v / norm


def _oracle_hessian(m: nn.Module, x, y, dim) -> torch.Tensor:
    """``[P, P]`` float64 Hessian of the mean cross-entropy of ``m`` (``named_parameters`` order),
    by autograd through the weight norm written out (:func:`_written_out_weight`)."""
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for p in m.parameters()]
    flat = torch.cat([p.detach().flatten() for p in m.parameters()])

    def loss(theta):
        ps = dict(zip(names, torch.split(theta, [s.numel() for s in shapes])))
        ps = {n: t.view(s) for (n, t), s in zip(ps.items(), shapes)}
        h = torch.tanh(x @ _written_out_weight(ps[_G], ps[_V], dim).T + ps["0.bias"])
        return F.cross_entropy(h @ ps["2.weight"].T + ps["2.bias"], y)

    return torch.autograd.functional.hessian(loss, flat)


def _dense_hessian(op) -> torch.Tensor:
    """``[P, P]`` the operator's Hessian of its single replica, one product per column."""
    return op.matvec(torch.eye(op.P, dtype=torch.float64)[None])[0]


@pytest.mark.parametrize("backend", ["func", "autograd"])
@pytest.mark.parametrize("dim", [0, 1, None])
def test_weight_norm_hessian_matches_the_written_out_oracle(backend, dim):
    """The Hessian through torch's weight-norm parametrization equals (in float64) the Hessian of
    the same model with ``g * v / |v|`` written out, and is symmetric; so do its trace and the
    largest eigenvalue batched_sharpness reports (also with Hutch++).

    Was wrong: functional_call ran torch's own parametrization, and for ``dim=0`` or the last
    dimension torch computes it through ``aten::_weight_norm_interface``, whose double backward
    drops the path through the norms it saved. The Hessian came out not symmetric, for both
    backends: here ``max|H - H^T|`` was 0.44 (``dim=0``) and 0.22 (``dim=1``). On a float32 twin of
    this model lambda_max was 0.9614 instead of 0.9633 with ok=True, 5.89 with
    ``trace_method="hutch++"``, and the trace an estimate of a wrong matrix. ``dim=None`` (a norm
    over all of ``v``) was right already (torch takes plain ops there); it checks that the
    replacement reads torch's -1 as "all of v", not as the last dimension."""
    x, y = _data()
    m = _wn_mlp(dim)
    H_true = _oracle_hessian(m, x, y, dim)
    op = fastcurv.HessianOperator([m], (x, y), backend=backend)
    H = _dense_hessian(op)
    assert (H - H.T).abs().max() < 1e-12
    torch.testing.assert_close(H, H_true, rtol=0, atol=1e-10)
    torch.testing.assert_close(H.diagonal().sum(), H_true.trace(), rtol=1e-10, atol=0)
    lam = torch.linalg.eigvalsh(H_true)[-1]
    for kw in ({}, {"trace_method": "hutch++"}):
        res = fastcurv.batched_sharpness([m], (x, y), backend=backend, tol=1e-8, seed=0, **kw)
        assert res.ok.all() and res.flags == [""], res.flags
        torch.testing.assert_close(res["lambda_max"][0].double(), lam, rtol=1e-7, atol=0)


def test_the_users_models_keep_torchs_weight_norm():
    """Only fastcurv's functional copy computes the weight norm by :class:`PlainWeightNorm`: the
    user's model keeps torch's parametrization and its parameters, and the copy's outputs equal the
    model's."""
    x, _ = _data()
    m = _wn_mlp(0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    rs = ReplicaSet([m])
    assert type(m[0].parametrizations.weight[0]) is _WeightNorm
    assert type(rs.base[0].parametrizations.weight[0]) is PlainWeightNorm
    assert [n for n, _ in m.named_parameters()] == rs.names
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n])
    torch.testing.assert_close(rs.forward(x)[0], m(x).detach(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("make, dims", [
    (lambda: nn.Linear(5, 4), [0, 1, -1, -2, None]),
    (lambda: nn.Conv1d(2, 3, 4), [0, 1, 2, -1, -2, -3, None]),
    (lambda: nn.Conv2d(2, 3, (2, 3)), [0, 3, -2, None]),
])
def test_plain_weight_norm_computes_torchs_weight(make, dims):
    """:class:`PlainWeightNorm` gives torch's weight for every ``dim`` torch takes: 0, the last
    dimension (both fused in torch), a middle one, negative ones (counted from the end, but -1 and
    ``None`` meaning all of ``v``)."""
    for dim in dims:
        torch.manual_seed(0)
        m = weight_norm(make().double(), dim=dim)
        wn = m.parametrizations.weight[0]
        g, v = m.parametrizations.weight.original0, m.parametrizations.weight.original1
        g = g * torch.rand_like(g)  # (a weight whose norms are not those of v already)
        torch.testing.assert_close(PlainWeightNorm(wn.dim)(g, v), wn(g, v), rtol=1e-14, atol=0, msg=f"dim={dim}")


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_a_weight_norm_subclass_with_its_own_forward_is_left_alone():
    """A subclass of torch's weight norm that overrides forward computes something else: the
    functional copy keeps it."""
    class Halved(_WeightNorm):
        def forward(self, g, v):
            return 0.5 * super().forward(g, v)

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 3)).double()
    parametrize.register_parametrization(m[0], "weight", Halved(0), unsafe=True)
    x, _ = _data()
    rs = ReplicaSet([m])
    assert type(rs.base[0].parametrizations.weight[0]) is Halved
    torch.testing.assert_close(rs.forward(x)[0], m(x).detach(), rtol=0, atol=1e-14)


def test_weight_norm_models_train_and_evaluate_first_order():
    """Training (the vmap engine: the fused MLP engine does not take parametrized layers) and
    evaluation of a weight-norm model run and agree with torch: the trained model's loss by
    evaluate_population equals torch's cross-entropy of its outputs, and function_measures runs."""
    x, y = _data()
    x = x.float()
    models, history = train_population(lambda: _wn_mlp(0).float(), x, y, replicas=1, epochs=3, batch_size=10,
                                       lr=0.1, progress=False)
    assert history.engine.startswith("vmap")
    assert type(models[0][0].parametrizations.weight[0]) is _WeightNorm
    losses = [row[0] for row in history.train_loss]
    assert losses[-1] < losses[0]
    ev = evaluate_population(models, x, y)
    torch.testing.assert_close(ev["loss"][0], F.cross_entropy(models[0](x).double(), y).detach(), rtol=1e-6, atol=0)
    fm = fastcurv.function_measures(models, (x, y))
    assert fm is not None


def test_the_fused_engine_refuses_parametrized_models():
    """The fused operator backend refuses a weight-norm model with a ValueError naming the
    parametrized module (it computes plain Linear layers only)."""
    x, y = _data()
    with pytest.raises(ValueError, match="parametrized"):
        fastcurv.HessianOperator([_wn_mlp(0)], (x, y), backend="fused")
