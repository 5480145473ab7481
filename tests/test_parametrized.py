"""Models with torch.nn.utils.parametrize parametrizations: torch's weight norm
(``torch.nn.utils.parametrizations.weight_norm``) measured against the same model with the weight
norm written out by hand, in float64; the functional copy's replacement for it
(:class:`fastcurv.replicas.PlainWeightNorm`) against torch's values; the first-order paths and
the fused engine's refusal of parametrized models. Populations of parametrized replicas (weight
norm, spectral norm, orthogonal, a user's own) measured, evaluated and trained at R=3 against each
replica alone and torch.optim; spectral norm's stored singular vectors; the refusal of replicas
whose parametrizations differ."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, _WeightNorm, orthogonal, spectral_norm, weight_norm

import fastcurv
from fastcurv import HessianOperator
from fastcurv.replicas import InPlaceSpectralNorm, PlainWeightNorm, ReplicaSet, validate_models
from fastcurv.train import train_population
from fastcurv.train_eval import evaluate_population

from oracle import sgd_loop

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


# --- populations of parametrized replicas -----------------------------------------------------------
_KINDS = {"weight_norm": weight_norm, "spectral_norm": spectral_norm, "orthogonal": orthogonal}


def _mlp(kind: str, seed: int = 0) -> nn.Module:
    """5-6-3 tanh MLP in float64 whose first layer's weight is parametrized by ``kind`` (torch's
    defaults: weight norm over ``dim=0``, one power iteration, Householder for the 6x5 weight)."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    _KINDS[kind](m[0])
    return m


def _conv(kind: str, seed: int = 0) -> nn.Module:
    """Conv2d(2, 3, 3) -> Tanh -> Flatten -> Linear(12, 3) on ``[N, 2, 4, 4]`` inputs, float64, with
    the convolution's weight parametrized by ``kind`` (orthogonal: a ``[3, 2]`` batch of square 3x3
    matrices, by the matrix exponential)."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()
    _KINDS[kind](m[0])
    return m


_ARCHS = {"mlp": (_mlp, (20, 5)), "conv": (_conv, (12, 2, 4, 4))}


def _arch_data(arch: str):
    """Float64 inputs for ``arch`` and labels of 3 classes."""
    g = torch.Generator().manual_seed(0)
    shape = _ARCHS[arch][1]
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (shape[0],), generator=g)


def _population(kind: str, arch: str, R: int = 3) -> list:
    """R replicas of ``arch`` parametrized by ``kind``, seeds 0..R-1."""
    return [_ARCHS[arch][0](kind, seed) for seed in range(R)]


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # (vmap's fallback: orthogonal's tril_)
@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("kind", list(_KINDS))
def test_parametrized_replicas_measure_as_a_population(kind, arch):
    """R=3 replicas with torch's weight_norm, spectral_norm or orthogonal parametrizations measure
    as one population: each replica's Hessian products (func and autograd backends), lambda_max,
    trace and evaluate_population loss equal that replica measured alone, to float64 rounding.

    Was refused: torch makes a class of its own for every parametrized module
    (``ParametrizedLinear``), so validate_models saw replica 1's layer as another class than
    replica 0's ("module '0' is ParametrizedLinear, replica 0 has ParametrizedLinear") and a
    population of 100 weight-normed seeds could only be measured one replica per call."""
    x, y = _arch_data(arch)
    models = _population(kind, arch)
    for backend in ("func", "autograd"):
        op = HessianOperator(models, (x, y), backend=backend)
        V = torch.randn(3, 2, op.P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        HV = op.matvec(V)
        for r, m in enumerate(models):
            alone = HessianOperator([m], (x, y), backend=backend).matvec(V[r:r + 1])[0]
            torch.testing.assert_close(HV[r], alone, rtol=1e-12, atol=1e-14, msg=f"{backend} replica {r}")
    res = fastcurv.batched_sharpness(models, (x, y), backend="func", tol=1e-8, seed=0, progress=False)
    assert res.ok.all(), res.flags
    for r, m in enumerate(models):
        alone = fastcurv.batched_sharpness([m], (x, y), backend="func", tol=1e-8, seed=0, progress=False)
        for key in ("lambda_max", "trace"):
            torch.testing.assert_close(res[key][r], alone[key][0], rtol=1e-12, atol=1e-14, msg=f"{key} {r}")
    ev = evaluate_population(models, x, y)
    for r, m in enumerate(models):
        assert ev["loss"][r] == evaluate_population([m], x, y)["loss"][0]
        torch.testing.assert_close(ev["loss"][r], F.cross_entropy(copy.deepcopy(m).eval()(x), y).detach(), rtol=1e-14,
                                   atol=0)


def test_function_measures_of_parametrized_replicas_are_each_replicas_own():
    """function_measures of R=3 weight-normed, spectral-normed and orthogonal replicas: every
    per-replica value (weakness, entropy, compressed sizes, the parameters' squared norm, the
    PAC-Bayes magnitude sigma) equals that replica's alone. Was refused as for the operators."""
    x, y = _arch_data("mlp")
    kw = dict(measures=("weakness", "simplicity"), num_draws=2, bisect_steps=3, taus=(0.1,), tau_modes=("relative",))
    for kind in _KINDS:
        models = _population(kind, "mlp")
        res = fastcurv.function_measures(models, (x, y), **kw)
        assert res.ok.all()
        for r, m in enumerate(models):
            alone = fastcurv.function_measures([m], (x, y), **kw)
            for key, v in res.values.items():
                torch.testing.assert_close(v[r], alone[key][0], rtol=1e-12, atol=0, equal_nan=True,
                                           msg=f"{kind} {key} {r}")


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("arch, fused, engine", [("mlp", None, "vmap"), ("conv", None, "per-replica autograd"),
                                                 ("conv", False, "vmap")])
@pytest.mark.parametrize("kind", list(_KINDS))
def test_parametrized_replicas_train_as_torch_optim(kind, arch, fused, engine):
    """train_population of R=3 parametrized replicas (the fused MLP engine does not take them: vmap,
    or per-replica autograd for conv nets on the CPU) equals torch.optim.SGD training each replica
    alone, parameters and buffers (spectral norm's ``_u``/``_v``, updated by one power iteration at
    every training-mode forward as torch does; orthogonal's ``base``) to float64 rounding.

    Was refused (the replicas' classes differ: see above); and spectral norm under vmap failed even
    for one replica, with torch's raw "Batching rule not implemented for aten::div.out" (its power
    iteration writes through ``F.normalize(..., out=...)``)."""
    build = (lambda: _mlp(kind)) if arch == "mlp" else (lambda: _conv(kind))
    x, y = _arch_data(arch)
    kw = dict(lr=0.1, epochs=2, batch_size=8)
    models, history = train_population(build, x, y, seeds=[0, 1, 2], fused=fused, progress=False, **kw)
    assert history.engine.startswith(engine)
    for m, ref in zip(models, sgd_loop(build, x, y, [0, 1, 2], **kw)):
        for (n, t), (n_ref, t_ref) in zip(m.state_dict().items(), ref.state_dict().items()):
            assert n == n_ref
            torch.testing.assert_close(t, t_ref, rtol=1e-12, atol=1e-14, msg=n)


def test_spectral_norm_trains_one_replica_under_vmap():
    """A single spectral-normed MLP (the vmap engine) trains as torch.optim does. Was torch's raw
    RuntimeError "Batching rule not implemented for aten::div.out" at the first step, for any R."""
    x, y = _arch_data("mlp")
    kw = dict(lr=0.1, epochs=1, batch_size=10)
    (m,), history = train_population(lambda: _mlp("spectral_norm"), x, y, seeds=[4], progress=False, **kw)
    assert history.engine.startswith("vmap")
    (ref,) = sgd_loop(lambda: _mlp("spectral_norm"), x, y, [4], **kw)
    for (n, t), (_, t_ref) in zip(m.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(t, t_ref, rtol=1e-12, atol=1e-14, msg=n)


def test_the_fused_engines_refuse_parametrized_populations():
    """The fused operator backend (HessianOperator, batched_sharpness) and the fused MLP training
    engine (``fused=True``) refuse a population of parametrized replicas with a ValueError naming
    the parametrized module, not the replicas' classes."""
    x, y = _arch_data("mlp")
    for kind in _KINDS:
        models = _population(kind, "mlp")
        with pytest.raises(ValueError, match=r"module '0' is parametrized \(weight computed from other parameters"):
            HessianOperator(models, (x, y), backend="fused")
        with pytest.raises(ValueError, match="module '0' is parametrized"):
            fastcurv.batched_sharpness(models, (x, y), backend="fused", progress=False)
        with pytest.raises(ValueError, match="fused=True, but .*ParametrizedLinear at 0"):
            train_population(lambda: _mlp(kind), x.float(), y, seeds=[0, 1, 2], fused=True, epochs=1, progress=False)


def test_spectral_norm_is_measured_with_its_stored_singular_vectors():
    """Measures run spectral norm in eval mode: no power iteration, the weight ``W / (u . W v)``
    with the ``u``, ``v`` the model holds, which are buffers: the Hessian is with respect to
    ``original`` (``W``) with ``u``, ``v`` fixed, as torch's own gradients take them (its power
    iterations run under no_grad). Checked against that formula written out, on replicas left in
    training mode (whose own forward would first update ``u``, ``v``): measuring them changes
    neither their ``u``, ``v`` nor their mode."""
    x, y = _arch_data("mlp")
    models = _population("spectral_norm", "mlp")
    before = [{n: b.clone() for n, b in m.named_buffers()} for m in models]
    op = HessianOperator(models, (x, y), backend="func")
    H = op.matvec(torch.eye(op.P, dtype=torch.float64).expand(3, op.P, op.P))
    for r, m in enumerate(models):
        assert m.training and all(torch.equal(b, before[r][n]) for n, b in m.named_buffers())
        sn = m[0].parametrizations.weight[0]
        u, v = sn._u, sn._v
        names = [n for n, _ in m.named_parameters()]
        shapes = [p.shape for p in m.parameters()]

        def loss(theta):
            ps = {n: t.view(s) for n, t, s in zip(names, theta.split([s.numel() for s in shapes]), shapes)}
            w = ps["0.parametrizations.weight.original"]
            h = torch.tanh(x @ (w / (u @ w @ v)).T + ps["0.bias"])
            return F.cross_entropy(h @ ps["2.weight"].T + ps["2.bias"], y)

        flat = torch.cat([p.detach().flatten() for p in m.parameters()])
        torch.testing.assert_close(H[r], torch.autograd.functional.hessian(loss, flat), rtol=0, atol=1e-12)


def test_in_place_spectral_norm_iterates_as_torch():
    """The functional copy's :class:`InPlaceSpectralNorm` (power iterations written with ``copy_``,
    which vmap can batch) gives torch's training-mode forward bit for bit: the same ``u``, ``v`` after
    three iterations and the same weight; the user's models keep torch's ``_SpectralNorm``."""
    m = _conv("spectral_norm")
    spectral_norm(m[3], n_power_iterations=3)
    rs = ReplicaSet([m])
    assert type(m[3].parametrizations.weight[0]) is _SpectralNorm
    assert type(rs.base[3].parametrizations.weight[0]) is InPlaceSpectralNorm
    for layer in (0, 3):
        ours = copy.deepcopy(m[layer])
        ours.parametrizations.weight[0].__class__ = InPlaceSpectralNorm
        w_torch, w_ours = m[layer].weight, ours.weight  # (training mode: power iterations, then W / sigma)
        assert torch.equal(w_ours, w_torch)
        for name in ("_u", "_v"):
            assert torch.equal(getattr(ours.parametrizations.weight[0], name),
                               getattr(m[layer].parametrizations.weight[0], name))


class _Scaled(nn.Module):
    """A user's parametrization: ``c * tanh(X)`` (``c`` a setting)."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, X):
        return self.c * torch.tanh(X)


def _user_parametrized(seed: int, c: float = 1.5) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    parametrize.register_parametrization(m[2], "weight", _Scaled(c))
    return m


def test_a_users_parametrization_measures_as_a_population():
    """A user's own parametrization (``register_parametrization``) of one class and settings on
    every replica: the population's Hessian products equal each replica's alone (was refused as
    for torch's parametrizations)."""
    x, y = _arch_data("mlp")
    models = [_user_parametrized(s) for s in range(3)]
    op = HessianOperator(models, (x, y), backend="autograd")
    V = torch.randn(3, 2, op.P, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    HV = op.matvec(V)
    for r, m in enumerate(models):
        torch.testing.assert_close(HV[r], HessianOperator([m], (x, y), backend="autograd").matvec(V[r:r + 1])[0],
                                   rtol=1e-12, atol=1e-14)


def _factory_class(seed: int) -> nn.Module:
    class Doubled(nn.Module):  # (a class of its own for every model)
        def forward(self, X):
            return 2 * X

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    parametrize.register_parametrization(m[0], "weight", Doubled())
    return m


def _with(kind: str, seed: int, **kw) -> nn.Module:
    """:func:`_mlp` with ``kind``'s settings ``kw`` on its first layer."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    _KINDS[kind](m[0], **kw)
    return m


def _plain(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _twice(seed: int) -> nn.Module:
    m = _with("weight_norm", seed)
    spectral_norm(m[0])
    return m


def _second_layer(seed: int) -> nn.Module:
    m = _with("weight_norm", seed)
    spectral_norm(m[2])
    return m


@pytest.mark.parametrize("first, other, message", [
    (lambda s: _with("weight_norm", s), lambda s: _with("weight_norm", s, dim=1),
     r"parametrization 0 \(_WeightNorm\) has dim=1 where replica 0's has dim=0"),
    (lambda s: _with("spectral_norm", s), lambda s: _with("spectral_norm", s, eps=1e-6),
     r"parametrization 0 \(_SpectralNorm\) has eps=1e-06 where replica 0's has eps=1e-12"),
    (lambda s: _with("spectral_norm", s), lambda s: _with("spectral_norm", s, dim=1),
     r"parametrization 0 \(_SpectralNorm\) has dim=1 where replica 0's has dim=0"),
    (lambda s: _with("orthogonal", s, orthogonal_map="cayley"), lambda s: _with("orthogonal", s),
     r"parametrization 0 \(_Orthogonal\) has orthogonal_map='householder' where replica 0's has "
     r"orthogonal_map='cayley'"),
    (lambda s: _with("orthogonal", s), lambda s: _with("orthogonal", s, use_trivialization=False),
     r"parametrization 0 \(_Orthogonal\) has use_trivialization=False where replica 0's has use_trivialization=True"),
    (lambda s: _with("weight_norm", s), lambda s: _with("spectral_norm", s),
     r"parametrization 0 is _SpectralNorm where replica 0's is _WeightNorm"),
    (lambda s: _with("weight_norm", s), _twice,
     r"is computed by 2 parametrizations, _WeightNorm\(dim=0\) then _SpectralNorm\(dim=0, eps=1e-12\), "
     r"where replica 0's by 1"),
    (lambda s: _with("weight_norm", s), _second_layer,
     r"module '2' \(Linear\) parametrizes 'weight' \(by _SpectralNorm\(dim=0, eps=1e-12\)\) where replica 0's "
     r"parametrizes nothing"),
    (lambda s: _with("weight_norm", s), _plain,
     r"module '0' \(Linear\) parametrizes nothing where replica 0's parametrizes 'weight' \(by _WeightNorm\(dim=0\)\)"),
    (_user_parametrized, lambda s: _user_parametrized(s, c=2.0),
     r"parametrization 0 \(_Scaled\) has c=2.0 where replica 0's has c=1.5"),
    (_factory_class, _factory_class, r"parametrization 0 is Doubled where replica 0's is Doubled \(two classes of one "
                                     r"name"),
])
def test_replicas_with_other_parametrizations_are_refused(first, other, message):
    """Replicas whose parametrizations differ in what defines the function (the tensors
    parametrized, the parametrization classes and their order, their settings: weight norm's
    ``dim``, spectral norm's ``dim`` and ``eps``, orthogonal's map and trivialization, a user's
    parametrization's attributes) are refused with a ValueError naming the module, the tensor and
    the difference; every replica would otherwise run through replica 0's parametrizations."""
    with pytest.raises(ValueError, match=r"replica 1 differs from replica 0: (module '[02]' \(Linear\): its 'weight' )?"
                                         + message):
        validate_models([first(0), other(1)])


def test_spectral_norms_power_iterations_matter_in_training_only():
    """Spectral norm's ``n_power_iterations`` is read only by the training-mode forward: replicas
    that differ in it measure as one population (every measure runs in eval mode, with the stored
    ``u``, ``v``), and are refused for training (``validate_models(..., training=True)``, as
    train_population checks)."""
    x, y = _arch_data("mlp")
    models = [_with("spectral_norm", 0), _with("spectral_norm", 1, n_power_iterations=3)]
    ones = torch.ones(2, 1, 57, dtype=torch.float64)
    HV = HessianOperator(models, (x, y)).matvec(ones)
    torch.testing.assert_close(HV[1], HessianOperator(models[1:], (x, y)).matvec(ones[1:])[0], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="parametrization 0 \\(_SpectralNorm\\) has n_power_iterations=3 where "
                                         "replica 0's has n_power_iterations=1"):
        validate_models(models, training=True)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("kind", list(_KINDS))
def test_measures_inside_parametrize_cached(kind):
    """Inside the user's ``torch.nn.utils.parametrize.cached()`` the Hessian products are those
    computed outside it, and the user's model keeps its own cached weight, through which gradients
    reach its parameters.

    Was wrong: fastcurv's functional copy shares the class of replica 0's parametrized module, whose
    getter caches under the key of the user's module, so every product read the weight the user
    cached (computed from the user's tensors, not the copy's inputs): the products were off by up
    to 1.19 (weight norm), 0.71 (spectral norm), 1.74 (orthogonal). Measured first in the context,
    the copy's weight was cached for the user's model, which then read a tensor without a gradient
    path to its parameters (training in the context would not have updated that layer)."""
    x, y = _arch_data("mlp")
    (m,) = _population(kind, "mlp", R=1)
    m.eval()  # (a training-mode spectral norm would run a power iteration when the test reads the weight)
    V = torch.randn(1, 2, sum(p.numel() for p in m.parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    want = {b: HessianOperator([m], (x, y), backend=b).matvec(V) for b in ("func", "autograd")}
    want_weight = m[0].weight.detach()
    with parametrize.cached():
        w = m[0].weight  # (the user's cached weight)
        for backend in ("func", "autograd"):
            torch.testing.assert_close(HessianOperator([m], (x, y), backend=backend).matvec(V), want[backend],
                                       rtol=1e-12, atol=1e-14)
        assert m[0].weight is w
    with parametrize.cached():
        HessianOperator([m], (x, y)).matvec(V)
        w = m[0].weight
        assert w.requires_grad and torch.equal(w, want_weight)
