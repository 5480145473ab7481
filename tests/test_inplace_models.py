"""Models with in-place operations on what fastcurv passes them more than once: their inputs
(``x -= 0.5``), their buffers (a call counter updated in forward), and tensors they allocate from
their inputs (``out = x.new_zeros(...); out[:, :k] = ...``), on every path that runs a model:
function_measures, the operators, training, evaluate_population, the reparametrization probe."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcurv
from fastcurv.function import collect_predictions
from fastcurv.measures._common import loss_grad_at
from fastcurv.replicas import ReplicaSet
from fastcurv.reparam import fold_batchnorm, rescale_layers
from fastcurv.train import evaluate_population, train_population

from oracle import sgd_loop


class Shift(nn.Module):
    """Centres its inputs, in place (``x -= 0.5``) or not."""

    def __init__(self, inplace=True, width=4, bn=False):
        super().__init__()
        self.inplace = inplace
        self.l1 = nn.Linear(width, 8)
        self.bn = nn.BatchNorm1d(8) if bn else nn.Identity()
        self.l2 = nn.Linear(8, 3)

    def forward(self, x):
        if self.inplace:
            x -= 0.5
        else:
            x = x - 0.5
        return self.l2(torch.relu(self.bn(self.l1(x))))


class Counted(nn.Module):
    """Counts its forward calls in a buffer: always, or only in training mode."""

    def __init__(self, always=True):
        super().__init__()
        self.always = always
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        if self.always or self.training:
            self.calls += 1
        return self.l2(torch.tanh(self.l1(x)))


class EvalAverage(nn.Module):
    """Centres its inputs by a running mean it updates in every mode (as an observer does)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, x):
        self.mean.mul_(0.5).add_(0.5 * x.mean(0))
        return self.l2(torch.tanh(self.l1(x - self.mean)))


class Prealloc(nn.Module):
    """Fills a tensor it allocates from its input (``x.new_zeros``), or concatenates (``fill=False``)."""

    def __init__(self, fill=True):
        super().__init__()
        self.fill = fill
        self.a, self.b, self.fc = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 3)

    def forward(self, x):
        if not self.fill:
            return self.fc(torch.cat([torch.tanh(self.a(x)), torch.tanh(self.b(x))], 1))
        out = x.new_zeros(x.shape[0], 6)
        out[:, :3] = torch.tanh(self.a(x))
        out[:, 3:] = torch.tanh(self.b(x))
        return self.fc(out)


def _data(n=32, width=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _models(build, R=3, seed=0):
    torch.manual_seed(seed)
    return [build().double() for _ in range(R)]


def _twins(models, build):
    twins = []
    for m in models:
        t = build().double()
        t.load_state_dict(m.state_dict())
        twins.append(t)
    return twins


# --- 1. a model that changes its input in place -------------------------------------------------------------------

def test_function_measures_refuse_a_model_that_changes_its_input():
    """function_measures ran a model that centres its inputs in place (``x -= 0.5``) without a word:
    every chunk of replicas and every perturbed pass saw the probe shifted again, so
    perturb_weakness_sigma0.01 came out [0.5, 0.5, 0, 0] instead of [1, 1, 1, 0] and
    perturb_sigma_star [0, 0, 0, 0] instead of [0.16, 0.03, 0.16, 0.005]; with max_rows=64 (replicas
    in chunks) test_error was off by up to 0.016; and the caller's inputs were shifted by 0.5.
    HessianOperator refused the model. Now collect_predictions (so function_measures) checks the
    first batch with the operators' helper and raises their ValueError, the caller's data untouched."""
    models = _models(lambda: Shift(True), R=2)
    x, y = _data()
    before = x.clone()
    with pytest.raises(ValueError, match="changes its input in place"):
        fastcurv.function_measures(models, (x, y), measures=("gde", "perturbation_weakness"), num_draws=2,
                                   bisect_steps=2, probe_size=16)
    with pytest.raises(ValueError, match="changes its input in place"):
        collect_predictions(models, (x, y), max_rows=64)
    assert torch.equal(x, before)
    twins = _twins(models, lambda: Shift(False))  # (the out-of-place form runs, and leaves the data alone)
    res = fastcurv.function_measures(twins, (x, y), measures=("gde",), max_rows=64)
    with torch.no_grad():
        want = torch.stack([(m(x).argmax(1) != y).double().mean() for m in twins])
    assert torch.equal(res["test_error"], want) and torch.equal(x, before)


@pytest.mark.parametrize("eval_train", [False, True])
def test_train_population_refuses_a_model_that_changes_its_input(eval_train):
    """train_population trained a model that centres its inputs in place (``x -= 0.5``) on data its
    own checks had changed: its probes (and with eval_train the full training-set loss at every
    epoch) ran the model on slices, views, of the training set, the caller's tensor. The result was
    0.049 (0.127 with eval_train) from the torch.optim loop on the same batches, and the caller's x
    moved by 1.0 (2.5). Training now refuses the model with the operators' ValueError (see
    train_engine.Engine for why it does not train it), found by its probe step, which runs on a copy."""
    x, y = _data(40, 6, seed=0)
    before = x.clone()
    with pytest.raises(ValueError, match="changes its input in place"):
        train_population(lambda: Shift(True, width=6).double(), x, y, seeds=[0, 1], lr=0.1, batch_size=16, epochs=2,
                         progress=False, eval_train=eval_train)
    assert torch.equal(x, before)


def test_reparam_probe_refuses_a_model_that_changes_its_input():
    """The reparametrization probe ran the old and the new model on the caller's probe tensor itself:
    a model that changes its input in place ran the new model on the inputs the old one had shifted
    (a spurious 'not function-preserving' warning for an exact rescaling: 5 predictions 'changed'),
    and shifted the caller's probe by 0.5 at each forward (2.0 for two replicas; fold_batchnorm's
    forward check 2.5). The probe now runs on copies, and such a model raises the operators'
    ValueError."""
    probe, _ = _data(16)
    before = probe.clone()
    models = _models(lambda: Shift(True), R=2)
    with pytest.raises(ValueError, match="changes its input in place"):
        rescale_layers(models, 3.0, layers=("l1", "l2"), probe=probe)
    bn = _models(lambda: Shift(True, bn=True), R=2)
    for m in bn:
        m.bn.running_mean.uniform_(-1, 1)
    with pytest.raises(ValueError, match="changes its input in place"):
        fold_batchnorm(bn, probe)
    assert torch.equal(probe, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the out-of-place form: an exact rescaling, no warning)
        res = rescale_layers(_twins(models, lambda: Shift(False)), 3.0, layers=("l1", "l2"), probe=probe)
    assert not res.function_changed


# --- 2. training's checks leave the models alone ------------------------------------------------------------------

def test_training_checks_do_not_run_the_models_buffers():
    """train_population's output check ran replica 0's eval-mode forward with the model's own
    buffers: a model that counts its calls in a buffer started training with replica 0's count one
    ahead of the torch.optim loop's (7 calls against its 6 steps). The check now runs on copies."""
    x, y = _data(40)
    build = lambda: Counted(always=True).double()  # noqa: E731
    got, _ = train_population(build, x, y, seeds=[0, 1], lr=0.1, batch_size=16, epochs=2, progress=False,
                              eval_train=False)
    want = sgd_loop(build, x, y, [0, 1])
    for g, w in zip(got, want):
        assert float(g.calls) == float(w.calls) == 6
        for (n, a), (_, b) in zip(g.named_parameters(), w.named_parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-14, msg=n)


# --- 3. a model that updates a buffer in its eval-mode forward ----------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "func", "autograd"])
def test_operator_refuses_a_model_that_updates_a_buffer_in_eval_mode(backend):
    """A model that updates a buffer in forward (a call counter here) was built into a HessianOperator,
    whose first product then raised 'the models changed since this HessianOperator was built (buffer
    'calls' of replica 0 was modified in place, e.g. by an optimizer step ...)': the operator's own
    forwards had written into its copy of the buffers, the models were untouched, and building a new
    operator could not help. The first-batch check now runs on copies of the buffers and names the
    buffer the forward updates."""
    models = _models(lambda: Counted(always=True), R=2)
    x, y = _data(6)
    with pytest.raises(ValueError, match=r"updates its buffer 'calls' in forward in eval mode.*self\.training"):
        fastcurv.HessianOperator(models, (x, y), backend=backend)
    assert all(float(m.calls) == 0 for m in models)


def test_function_measures_refuse_a_model_that_updates_a_buffer_in_eval_mode():
    """function_measures evaluated a model whose forward updates a buffer it computes with (a running
    mean of its inputs, updated whatever the mode) without a word, as another function for every
    chunk: replica 0's test_error was 0.594 with the default max_rows and 0.625 with max_rows=8. It
    now raises the operators' ValueError naming the buffer; a counter updated in training mode only
    is fine (and so are its products, which stay the same)."""
    x, y = _data()
    rs = ReplicaSet(_models(EvalAverage, R=2))
    with pytest.raises(ValueError, match="updates its buffer 'mean' in forward in eval mode"):
        fastcurv.function_measures(rs, (x, y), measures=("gde",))
    models = _models(lambda: Counted(always=False), R=2)
    res = fastcurv.function_measures(models, (x, y), measures=("gde",))
    assert res.ok.all()
    op = fastcurv.HessianOperator(models, (x, y))
    V = torch.randn(2, op.P, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V), op.matvec(V), rtol=0, atol=0)


# --- 4. a model that fills a tensor it allocates from its input ---------------------------------------------------

def test_a_model_filling_a_tensor_from_its_input_runs_every_vmapped_forward():
    """A model that fills a tensor it allocates from its input (``x.new_zeros``) crashed the vmapped
    forwards with torch's raw 'vmap: inplace arithmetic ... please file a bug report' (the input
    went in unbatched, so did the tensor made from it): rho_sharpness, mw_sharpness,
    function_measures, evaluate_population ('the model cannot run on the first batch'), the
    gradients of epsilon_sharpness (measures._common.loss_grad_at) and of the operator's func
    backend. The input is now batched for such a model: each replica's outputs are its own model(x)
    exactly, and the measures those of the same model written with torch.cat."""
    x, y = _data(16)
    models = _models(Prealloc, R=2)
    twins = _twins(models, lambda: Prealloc(fill=False))
    with torch.no_grad():
        want = torch.stack([m(x) for m in models])
    assert torch.equal(ReplicaSet(models).forward(x), want)
    res = fastcurv.function_measures(models, (x, y), measures=("gde",))
    assert torch.equal(res["test_error"], (want.argmax(-1) != y).double().mean(1))
    ev = evaluate_population(models, x, y)
    torch.testing.assert_close(ev["loss"], torch.stack([F.cross_entropy(o, y) for o in want]), rtol=1e-13, atol=0)
    op, ref = (fastcurv.HessianOperator(ms, (x, y), backend="func") for ms in (models, twins))
    for got, exp in ((op.loss_and_gradient(), ref.loss_and_gradient()),
                     (loss_grad_at(op, op.replicas.flat_params()), loss_grad_at(ref, ref.replicas.flat_params()))):
        torch.testing.assert_close(got[0], exp[0], rtol=1e-13, atol=0)
        torch.testing.assert_close(got[1], exp[1], rtol=1e-12, atol=1e-15)
    kw = dict(measures=("rho_sharpness", "mw_sharpness", "epsilon_sharpness"), progress=False, backend="autograd")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, exp = fastcurv.batched_sharpness(models, (x, y), **kw), fastcurv.batched_sharpness(twins, (x, y), **kw)
    for name in kw["measures"]:
        torch.testing.assert_close(got[name], exp[name], rtol=1e-9, atol=1e-12, msg=name)


def test_a_model_filling_a_tensor_from_its_input_trains_with_eval_train():
    """train_population with eval_train=True (or a target_loss) crashed on such a model with the raw
    vmap error in its first full training-set loss, though its steps (batched minibatches) ran. The
    full-loss forward now batches the input; the losses are evaluate_population's, the training the
    same as without the full loss."""
    x, y = _data(40)
    models, hist = train_population(lambda: Prealloc().double(), x, y, seeds=[0, 1], lr=0.1, batch_size=16, epochs=2,
                                    progress=False, eval_train=True)
    plain, _ = train_population(lambda: Prealloc().double(), x, y, seeds=[0, 1], lr=0.1, batch_size=16, epochs=2,
                                progress=False, eval_train=False)
    for a, b in zip(models, plain):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    final = torch.tensor(hist.train_loss[-1], dtype=torch.float64)  # (the last epoch's, [R])
    torch.testing.assert_close(final, evaluate_population(models, x, y)["loss"], rtol=1e-13, atol=0)


class _MaxNormEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.l = nn.Embedding(10, 4, max_norm=0.5), nn.Linear(4, 3)

    def forward(self, t):
        return self.l(self.e(t).mean(1))


@pytest.mark.parametrize("backend", ["auto", "func", "autograd"])
def test_a_model_that_writes_its_parameters_in_forward_is_named(backend):
    """``nn.Embedding(max_norm=...)`` renormalizes the rows it looks up in place at every forward: the
    operator's own copy of the weights changed under it, and the value check of the models guard
    then blamed the user's untouched models ("the models changed since this HessianOperator was
    built ... build a new HessianOperator", which could never help). The first-batch check now
    names the parameter the forward writes, and the remedy."""
    torch.manual_seed(0)
    models = [_MaxNormEmbedding().double() for _ in range(2)]
    with torch.no_grad():
        for m in models:
            m.e.weight.mul_(3.0)  # (rows longer than max_norm: the forward renormalizes them)
    before = [m.e.weight.clone() for m in models]
    t, y = torch.randint(0, 10, (6, 5)), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="writes into its parameter 'e.weight' in forward .*max_norm"):
        fastcurv.HessianOperator(models, (t, y), backend=backend)
    assert all(torch.equal(m.e.weight, w) for m, w in zip(models, before))


def _prealloc_pair(R=2, n=16):
    """Prealloc models, their torch.cat twins (the float64 oracle: the same function), data as two
    batches, and probes ``[R, 2, P]``."""
    x, y = _data(n)
    models = _models(Prealloc, R=R)
    twins = _twins(models, lambda: Prealloc(fill=False))
    batches = [(x[: n // 2], y[: n // 2]), (x[n // 2:], y[n // 2:])]
    P = sum(p.numel() for p in models[0].parameters())
    V = torch.randn(R, 2, P, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return models, twins, (x, y), batches, V


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("two_batches", [False, True])
def test_func_backend_products_of_a_model_filling_a_tensor_from_its_input(reuse, two_batches):
    """The func backend's products (mode "graph", with and without reuse) on a model that fills a
    tensor it allocates from its input (``x.new_zeros``) raised torch's raw 'vmap: inplace
    arithmetic ... please file a bug report': its vmapped forward and gradient maps took the input
    unbatched. They now take it batched where the model needs it (ReplicaSet.vmapped), and give the
    products of the same model written with torch.cat (float64, to rounding)."""
    models, twins, one, batches, V = _prealloc_pair()
    data = batches if two_batches else one
    op = fastcurv.HessianOperator(models, data, backend="func", backend_options=dict(mode="graph", reuse=reuse))
    ref = fastcurv.HessianOperator(twins, data, backend="autograd")
    torch.testing.assert_close(op.matvec(V), ref.matvec(V), rtol=1e-12, atol=1e-14)
    idx = torch.tensor([1])  # (one probe of one replica: the single-product path)
    torch.testing.assert_close(op.matvec(V[1:, 0], idx), ref.matvec(V[1:, 0], idx), rtol=1e-12, atol=1e-14)
    assert op.backend_name == "func"


def test_func_backend_forward_mode_on_a_model_filling_a_tensor_from_its_input(monkeypatch):
    """Mode "forward" refuses such a model by name (its slice writes are in-place copies into a view,
    which ``torch.func.linearize`` gets wrong). Its products without reuse (``vmap(jvp(grad))``, which
    the refusal covers only for simplicity) raised torch's raw vmap error where the scan is bypassed;
    they now take the input batched and give the torch.cat model's products (float64, to rounding)."""
    models, twins, data, _, V = _prealloc_pair()
    with pytest.raises(ValueError, match="copy_ into a view"):
        fastcurv.HessianOperator(models, data, backend="func", backend_options=dict(mode="forward", reuse=False))
    import fastcurv.backends.func as func_backend

    monkeypatch.setattr(func_backend, "traced_hazard", lambda replicas, x: None)
    op = fastcurv.HessianOperator(models, data, backend="func", backend_options=dict(mode="forward", reuse=False))
    want = fastcurv.HessianOperator(twins, data, backend="autograd").matvec(V)
    torch.testing.assert_close(op.matvec(V), want, rtol=1e-12, atol=1e-14)
    assert op.backend.mode == "forward" and op.backend.forward_error is None


@pytest.mark.parametrize("cls", ["GGNOperator", "EmpiricalFisherOperator"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_ggn_and_fisher_products_of_a_model_filling_a_tensor_from_its_input(cls, loss):
    """The GGN and empirical-Fisher operators raised torch's raw 'vmap: inplace arithmetic ...'
    on a model that fills a tensor it allocates from its input (their vmapped jvp/vjp closures took
    the input unbatched). They now give the products of the same model written with torch.cat
    (float64, to rounding), checked also against the dense J^T H_out J of replica 0 (GGN)."""
    models, twins, _, batches, V = _prealloc_pair()
    if loss == "mse":
        batches = [(x, torch.nn.functional.one_hot(y, 3).double()) for x, y in batches]
    Op = getattr(fastcurv.curvature, cls)
    op, ref = Op(models, batches, loss=loss), Op(twins, batches, loss=loss)
    got = op.matvec(V)
    torch.testing.assert_close(got, ref.matvec(V), rtol=1e-12, atol=1e-14)
    if cls == "GGNOperator" and loss == "cross_entropy":  # (an oracle outside the GGN engine)
        m = twins[0]
        names = [n for n, _ in m.named_parameters()]
        shapes = [p.shape for _, p in m.named_parameters()]
        theta = torch.cat([p.detach().reshape(-1) for p in m.parameters()])

        def f(t, x):
            parts = dict(zip(names, (c.reshape(s) for c, s in zip(t.split([s.numel() for s in shapes]), shapes))))
            return torch.func.functional_call(m, parts, (x,))

        G = torch.zeros(len(theta), len(theta), dtype=torch.float64)
        N = sum(len(x) for x, _ in batches)
        for x, y in batches:
            J = torch.autograd.functional.jacobian(lambda t: f(t, x), theta).reshape(len(x), 3, -1)
            p = f(theta, x).softmax(1)
            H = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / N
            G += torch.einsum("nap,nab,nbq->pq", J, H, J)
        torch.testing.assert_close(got[0], V[0] @ G.T, rtol=1e-10, atol=1e-13)


def test_evaluate_population_refuses_a_model_that_changes_its_input():
    """evaluate_population ran a model that writes into its input (``x -= 0.5``) on the caller's
    tensor: every chunk of replicas saw other data, and the caller's x came back shifted by 0.5. It
    raises the ValueError of the other entry points now, the caller's data untouched."""
    torch.manual_seed(0)
    models = [Shift() for _ in range(2)]
    x, y = torch.rand(10, 4), torch.randint(0, 3, (10,))
    keep = x.clone()
    with pytest.raises(ValueError, match="changes its input"):
        evaluate_population(models, x, y)
    assert torch.equal(x, keep)
