"""Models beyond MLP/CNN stacks: embeddings whose torch backward is not the function's derivative
(``scale_grad_by_freq``, ``padding_idx``, ``sparse``), models torch.func's vmap cannot batch (LSTM,
GRU), token ids out of range, a non-finite full-data loss, and attention under the vmapped paths."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastcurv
from fastcurv.model_run import VmapUnsupportedError
from fastcurv.train import train_population
from fastcurv.train_eval import evaluate_population
from fastcurv.train_random import init_replicas


pytestmark = pytest.mark.usefixtures("one_thread_module")  # (its module-scoped fixtures too)


class EmbMLP(nn.Module):
    """Tokens ``[N, 3]`` -> an embedding (its options ``emb``) -> tanh -> a linear head (3 classes)."""

    def __init__(self, vocab=7, **emb):
        super().__init__()
        self.emb = nn.Embedding(vocab, 4, **emb)
        self.fc = nn.Linear(12, 3)

    def forward(self, t):
        return self.fc(torch.tanh(self.emb(t)).flatten(1))


class Recurrent(nn.Module):
    """Tokens ``[N, 3]`` -> embedding -> a recurrent layer (``cell``) -> its last output -> head."""

    def __init__(self, cell=nn.LSTM):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.rnn = cell(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, t):
        return self.fc(self.rnn(self.emb(t))[0][:, -1])


def _tokens(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 7, (n, 3), generator=g), torch.randint(0, 3, (n,), generator=g)


def _pair(**emb):
    """An EmbMLP with the options ``emb`` and a copy of it (the same weights) without them, float64."""
    torch.manual_seed(0)
    model = EmbMLP(**emb).double()
    plain = EmbMLP().double()
    plain.load_state_dict(model.state_dict())
    return model, plain


def _dense_hessian(model, t, y):
    """torch's float64 Hessian of the mean cross-entropy over ``model.parameters()``, flattened."""
    names = [n for n, _ in model.named_parameters()]
    ps = [p.detach() for p in model.parameters()]
    sizes, shapes = [p.numel() for p in ps], [p.shape for p in ps]

    def loss(theta):
        params = {n: c.view(s) for n, c, s in zip(names, theta.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, params, (t,)), y)

    return torch.autograd.functional.hessian(loss, torch.cat([p.reshape(-1) for p in ps]))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# --- embeddings: the function's derivatives, torch's semantics in training --------------------------
@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_scale_grad_by_freq_embedding_gives_the_loss_hessian(backend):
    """Embedding(scale_grad_by_freq=True) changes only torch's backward (each row's gradient divided by its
    token's count in the batch), which is no gradient: differentiated twice it gave a "Hessian" that was
    not symmetric (u.Hv 0.61 against v.Hu 0.43), products 37% off and lambda_max 2% low with ok=True. The
    functional copy now differentiates the function: the Hessian of the same model without the flag."""
    model, plain = _pair(scale_grad_by_freq=True)
    t, y = _tokens()
    want = _dense_hessian(plain, t, y)
    got = fastcurv.HessianOperator([model], (t, y), backend=backend).dense(0)
    assert _rel(got, want) < 1e-10
    res = fastcurv.batched_sharpness([model], (t, y), backend=backend, measures=("lambda_max",), tol=1e-10,
                                     max_iter=200, progress=False)
    assert abs(res["lambda_max"].item() - torch.linalg.eigvalsh(want)[-1].item()) < 1e-8 and bool(res.ok.all())


def test_padding_row_is_differentiated_in_hessian_ggn_and_fisher():
    """Embedding(padding_idx=0): torch's backward zeroes the padding row's gradient, so its rows and columns
    of the Hessian were 0 (lambda_max 0.685 for 0.739, 7% low), though the row is a parameter (counted in
    P: the README's "every parameter in model.parameters()") and the embedding of every padding token. The
    Hessian, GGN and empirical Fisher are now those of the same function without padding_idx, and so are
    the measures built on them."""
    model, plain = _pair(padding_idx=0)
    t, y = _tokens()
    t[:4, 0] = 0  # padding tokens
    want = _dense_hessian(plain, t, y)
    got = fastcurv.HessianOperator([model], (t, y)).dense(0)
    assert _rel(got, want) < 1e-10
    assert got[:4, :4].abs().max() > 1e-3  # (the padding row's own block)
    for cls in (fastcurv.GGNOperator, fastcurv.EmpiricalFisherOperator):
        assert _rel(cls([model], (t, y)).dense(0), cls([plain], (t, y)).dense(0)) < 1e-12
    kw = dict(measures=("lambda_max", "ggn_trace"), tol=1e-10, max_iter=200, progress=False, seed=0)
    got_m, want_m = fastcurv.batched_sharpness([model], (t, y), **kw), fastcurv.batched_sharpness([plain], (t, y), **kw)
    for col in got_m.values:
        assert torch.allclose(got_m[col], want_m[col], rtol=1e-8), col


def test_training_keeps_torchs_embedding_semantics():
    """train_population steps as torch does (its copy of the model keeps the flags): the frequency-scaled
    gradient and a padding row that never moves, equal to a torch.optim SGD step."""
    def build():
        return EmbMLP(padding_idx=0, scale_grad_by_freq=True).double()

    t, y = _tokens(12)
    t[:3, 1] = 0
    ref = init_replicas(build, [0])[0]
    pad_row = ref.emb.weight[0].detach().clone()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    F.cross_entropy(ref(t), y).backward()
    opt.step()
    (trained,), _ = train_population(build, t, y, seeds=[0], lr=0.5, momentum=0.0, batch_size=12, epochs=1,
                                     progress=False)
    for (n, p), q in zip(trained.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-14), n
    assert torch.equal(trained.emb.weight[0], pad_row)


# --- models vmap cannot batch ----------------------------------------------------------------------
def _rnn_replicas(cell=nn.LSTM, R=2):
    models = []
    for r in range(R):
        torch.manual_seed(r)
        models.append(Recurrent(cell).double())
    return models


@pytest.mark.parametrize("run", ["rho_sharpness", "epsilon_sharpness", "function_measures", "evaluate_population",
                                 "train_population"])
def test_models_vmap_cannot_batch_get_one_clear_error(run):
    """An nn.LSTM: every path that batches the replicas with vmap raised torch's raw "Batching rule not
    implemented for aten::lstm.input" (function_measures and evaluate_population: "the model cannot run on
    the first batch", blaming valid inputs). Now one VmapUnsupportedError names the module, says vmap
    cannot batch it and which computations run it (backend='autograd')."""
    t, y = _tokens(20)
    calls = {
        "rho_sharpness": lambda: fastcurv.batched_sharpness(_rnn_replicas(), (t, y), measures=("rho_sharpness",),
                                                            progress=False),
        "epsilon_sharpness": lambda: fastcurv.batched_sharpness(_rnn_replicas(), (t, y), progress=False,
                                                                measures=("epsilon_sharpness",)),
        "function_measures": lambda: fastcurv.function_measures(_rnn_replicas(), (t, y)),
        "evaluate_population": lambda: evaluate_population(_rnn_replicas(), t, y),
        "train_population": lambda: train_population(lambda: Recurrent().double(), t, y, replicas=2, epochs=1,
                                                     batch_size=10, progress=False),
    }
    with pytest.raises(VmapUnsupportedError, match=r"vmap cannot batch module 'rnn' \(LSTM\).*backend='autograd'"):
        calls[run]()


def test_hessian_of_a_recurrent_model_falls_back_and_keeps_its_reason():
    """backend='auto' on a GRU runs autograd after torch.func fails (as documented); backend_reason kept only
    "auto: torch.func failed (Batching rule not implemented for aten::gru.input ...)", losing the fused
    engine's reason naming the module. Now it keeps both, and the explicit backend='func' names the
    module where torch's raw error named an aten op."""
    t, y = _tokens(8)
    models = _rnn_replicas(nn.GRU)
    with pytest.warns(RuntimeWarning, match="falling back to the 'autograd' backend"):
        res = fastcurv.batched_sharpness(models, (t, y), measures=("lambda_max",), tol=1e-6, progress=False)
    assert res.backend == "autograd" and bool(res.ok.all())
    assert "auto: fused engine not usable (module 'emb' (Embedding) is not supported" in res.backend_reason
    assert "then torch.func failed (torch.func's vmap cannot batch module 'rnn' (GRU)" in res.backend_reason
    op = fastcurv.HessianOperator(models, (t, y), backend="func")
    with pytest.raises(VmapUnsupportedError, match=r"module 'rnn' \(GRU\)"):
        op.matvec(torch.randn(2, op.P, dtype=torch.float64))


def test_sparse_embedding_is_measured_as_a_dense_one_and_named_in_training():
    """Embedding(sparse=True): its gradient is a sparse tensor vmap cannot hold, so every vmapped measure
    raised torch's "Could not run 'aten::view' with arguments from the 'SparseCPU' backend". Measured
    through the functional copy (dense gradients, the same values) it now gives the dense model's
    numbers; training, which keeps torch's semantics, names the embedding."""
    model, plain = _pair(sparse=True)
    t, y = _tokens()
    kw = dict(measures=("epsilon_sharpness",), progress=False, seed=0)
    got, want = fastcurv.batched_sharpness([model], (t, y), **kw), fastcurv.batched_sharpness([plain], (t, y), **kw)
    assert torch.allclose(got["epsilon_sharpness"], want["epsilon_sharpness"], rtol=1e-10)
    with pytest.raises(VmapUnsupportedError, match=r"module 'emb' \(Embedding\)"):
        train_population(lambda: EmbMLP(sparse=True).double(), t, y, replicas=2, epochs=1, batch_size=5,
                         progress=False)


# --- token ids out of range ------------------------------------------------------------------------
def _bad_tokens(pos):
    t, y = _tokens(40)
    t[pos, 1] = 9  # the vocabulary has 7 ids
    return t, y


def test_out_of_range_token_ids_name_the_batch():
    """Token ids beyond the embedding's table raise IndexError, which the operators and function_measures
    let through raw ("index out of range in self"), in the first samples or later ones (train_population
    too, past its first samples). Now the README's ValueError, naming the batch (the training samples)."""
    models = [EmbMLP().double() for _ in range(2)]
    for pos in (0, 20):
        data = _bad_tokens(pos)
        with pytest.raises(ValueError, match=r"cannot run on the first batch \(inputs \(40, 3\), torch.int64\): index"):
            fastcurv.HessianOperator(models, data)
        with pytest.raises(ValueError, match=r"cannot run on the first batch \(inputs \(40, 3\), torch.int64\): index"):
            fastcurv.function_measures(models, data, measures=("disagreement",))
    t, y = _bad_tokens(35)
    loader = [(t[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)]
    op = fastcurv.HessianOperator(models, loader)
    with pytest.raises(ValueError, match=r"cannot run on batch 3 \(inputs \(10, 3\), torch.int64\): index"):
        op.matvec(torch.randn(2, op.P, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"cannot run on batch 3 \(inputs \(10, 3\), torch.int64\): index"):
        fastcurv.function_measures(models, loader, measures=("disagreement",))
    t, y = _bad_tokens(20)
    with pytest.raises(ValueError, match=r"cannot run on the training samples 20 to 29 \(inputs \(10, 3\)"):
        train_population(EmbMLP, t, y, replicas=2, epochs=1, batch_size=10, progress=False)


# --- a non-finite full-data loss -------------------------------------------------------------------
def test_a_non_finite_loss_marks_the_replica_failed():
    """A callable loss that is NaN on a batch (a mean over a batch whose every target it ignores: torch's
    0/0) made the full-data loss NaN, but its derivatives there are 0, so the Hessian products stayed
    finite and batched_sharpness reported lambda_max 0.545 (torch's whole-data loss: 0.709) with ok=True
    and no flag. The replica is now failed, as one with NaN parameters: NaN results, ok=False."""
    def ce(z, target):  # (a plain callable: fastcurv cannot know how it reduces)
        return F.cross_entropy(z, target)

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(13, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (13,), generator=g)
    y[10:] = -100
    data = [(x[:5], y[:5]), (x[5:10], y[5:10]), (x[10:], y[10:])]
    op = fastcurv.HessianOperator([model], data, loss=ce)
    with pytest.warns(RuntimeWarning, match=r"replicas \[0\] have a non-finite loss"):
        loss, grad = op.loss_and_gradient()
    assert torch.isnan(loss).all() and torch.isnan(grad).all() and bool(op.failed[0]) and bool(op.nonfinite_loss[0])
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        res = fastcurv.batched_sharpness([model], data, loss=ce, measures=("lambda_max",), progress=False)
    assert not bool(res.ok[0]) and torch.isnan(res["lambda_max"]).all() and res.flags[0] == "non-finite loss"


# --- attention in the vmapped forwards -------------------------------------------------------------
class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, t):
        return self.fc(self.enc(self.emb(t)).mean(1))


def test_vmapped_forwards_of_a_transformer_take_the_math_kernel():
    """The measures' and function_measures' vmapped forwards ran TransformerEncoderLayer's inference fast
    path and the flash attention kernel, which vmap has no batching rule for: torch's per-sample fallback,
    140 "There is a performance drop ... batching rule" warnings for these two calls. vmap_replicas now
    runs under math_attention(): none."""
    torch.manual_seed(0)
    models = [TinyTransformer().eval() for _ in range(2)]
    t, y = _tokens(12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastcurv.batched_sharpness(models, (t, y), measures=("rho_sharpness",), progress=False)
        fastcurv.function_measures(models, (t, y), measures=("disagreement",))
    assert not [w for w in caught if "performance drop" in str(w.message)]
