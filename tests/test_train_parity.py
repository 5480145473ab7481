"""train_population against torch.optim on models and settings off the common path: modules used
twice, bfloat16, random ops outside nn.Dropout, unused parameters, target_loss without eval_train,
and results that must not depend on threads or chunk_size (the twenty-fourth round's defects), nor on
which replicas are trained or evaluated together (the twenty-seventh round's)."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcurv
import fastcurv.train_engine as train_engine
from fastcurv.train import epoch_order, evaluate_population, init_replicas, train_population
from fastcurv.train_fused import plan_mlp

from oracle import sgd_loop

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=24, d=6, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def _flat(models):
    return torch.cat([t.detach().reshape(-1) for m in models for t in m.state_dict().values()])


def test_a_module_used_twice_in_a_sequential_is_planned_at_every_use():
    """One nn.Tanh() instance after two Linear layers: the fused plan skipped its second use (the
    middle layer ran linear), so the default engine trained another function than the model's: 0.011
    apart from vmap after 2 epochs, and evaluate_population on sparse inputs gave 1.1397 for 1.1363.
    A Linear layer applied twice (tied) is left to the generic path, which sums both uses' gradients."""
    x, y = _data(n=40)

    def shared_act():
        act = nn.Tanh()
        return nn.Sequential(nn.Linear(6, 8), act, nn.Linear(8, 8), act, nn.Linear(8, 3)).double()

    plan, _ = plan_mlp(shared_act())
    assert [len(layer.acts) for layer in plan.layers] == [1, 1, 0]
    m = shared_act()
    p = {n: t.detach()[None] for n, t in m.named_parameters()}
    torch.testing.assert_close(plan.forward(p, x[None])[0], m(x).detach(), rtol=1e-12, atol=1e-12)

    kw = dict(seeds=[0, 1], lr=0.1, batch_size=16, epochs=2, progress=False)
    fused, hf = train_population(shared_act, x, y, fused=True, **kw)
    plain, _ = train_population(shared_act, x, y, fused=False, **kw)
    assert hf.engine == "fused-mlp"
    torch.testing.assert_close(_flat(fused), _flat(plain), rtol=1e-10, atol=1e-12)

    xs = x * (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.2)  # the sparse fused forward
    with torch.no_grad():
        want = [F.cross_entropy(m(xs), y).item() for m in plain]
    assert evaluate_population(plain, xs, y)["loss"].tolist() == pytest.approx(want, rel=1e-12)

    def tied():
        lin = nn.Linear(6, 6)
        return nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(6, 3)).double()

    plan, why = plan_mlp(tied())
    assert plan is None and "Linear layer 0 is applied more than once" in why
    got, h = train_population(tied, x, y, **kw)
    assert h.engine.startswith("vmap (Linear layer 0 is applied more than once")
    torch.testing.assert_close(_flat(got), _flat(sgd_loop(tied, x, y, [0, 1], lr=0.1, epochs=2, batch_size=16)),
                               rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("fused", [True, False])
def test_bfloat16_keeps_the_optimizer_coefficients_unrounded(tmp_path, fused):
    """bfloat16 rounded beta2 = 0.999 to 1.0 (Adam's second moment stayed 0 and the first step
    diverged) and a momentum grid [0.99, 0.995, 0.999] to [0.988, 0.996, 1.0]; torch.optim keeps
    them as Python numbers and computes in float32."""
    x, y = _data(n=64, dtype=torch.float32)

    def build():
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    _, hist = train_population(build, x, y, seeds=[0], optimizer="adam", lr=1e-3, batch_size=16, epochs=3,
                               dtype=torch.bfloat16, eval_train=True, fused=fused, progress=False)
    ref = init_replicas(build, [0])[0].to(torch.bfloat16)
    opt, want = torch.optim.Adam(ref.parameters(), lr=1e-3), []
    for e in range(3):
        order = epoch_order(0, e, len(x))
        for k in range(0, len(x), 16):
            opt.zero_grad()
            F.cross_entropy(ref(x[order[k:k + 16]].bfloat16()).float(), y[order[k:k + 16]]).backward()
            opt.step()
        with torch.no_grad():
            want.append(F.cross_entropy(ref(x.bfloat16()).float(), y).item())
    assert hist.diverged == [False]
    assert [row[0] for row in hist.train_loss] == pytest.approx(want, abs=0.01)

    ck = tmp_path / "ck.pt"
    train_population(build, x, y, seeds=[0, 1, 2], momentum=[0.99, 0.995, 0.999], lr=1e-3, batch_size=16, epochs=1,
                     dtype=torch.bfloat16, fused=fused, checkpoint=ck, progress=False)
    trained_with = json.loads(torch.load(ck, weights_only=True)["fingerprint"])["hp"]["momentum"]
    assert trained_with == pytest.approx([0.99, 0.995, 0.999], abs=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sgd_matches_torch_optim(dtype):
    """float16 / bfloat16 SGD on the fused MLP path: torch's fused SGD kernel (torch._fused_sgd_) leaves
    the vectorized body of a half-precision tensor unchanged on the CPU, so the weights never moved
    (the loss stayed at ln 3 over 20 epochs) with no warning. The foreach ops run there now, as
    torch.optim.SGD's default does: the same losses as a torch.optim loop."""
    x, y = _data(n=64, dtype=torch.float32)

    def build():
        return nn.Sequential(nn.Linear(6, 128), nn.ReLU(), nn.Linear(128, 3))

    _, hist = train_population(build, x, y, seeds=[0], lr=0.1, momentum=0.9, batch_size=16, epochs=8, dtype=dtype,
                               eval_train=True, progress=False)
    assert hist.engine.startswith("fused-mlp")
    ref = init_replicas(build, [0])[0].to(dtype)
    opt, want = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), []
    for e in range(8):
        order = epoch_order(0, e, len(x))
        for k in range(0, len(x), 16):
            opt.zero_grad()
            F.cross_entropy(ref(x[order[k:k + 16]].to(dtype)).float(), y[order[k:k + 16]]).backward()
            opt.step()
        with torch.no_grad():
            want.append(F.cross_entropy(ref(x.to(dtype)).float(), y).item())
    assert want[-1] < 0.8 * want[0]
    assert [row[0] for row in hist.train_loss] == pytest.approx(want, rel=0.05)


class _FunctionalDropoutConv(nn.Module):
    """Dropout by F.dropout in forward (no nn.Dropout module) after a convolution."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv1d(1, 2, 3, padding=1), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(F.dropout(torch.relu(self.conv(x)).flatten(1), 0.3, training=self.training))


class _FunctionalDropoutMLP(nn.Module):
    def __init__(self, always=False):
        super().__init__()
        self.a, self.b, self.always = nn.Linear(6, 6), nn.Linear(6, 3), always

    def forward(self, x):
        return self.b(F.dropout(torch.relu(self.a(x.flatten(1))), 0.2, training=self.training or self.always))


def test_random_ops_outside_dropout_modules_are_keyed_per_step():
    """F.dropout in forward: through vmap it raised torch's 'randomness error mode' RuntimeError;
    conv nets (one replica at a time, worker threads sharing the global RNG) gave other models on
    every call (0.058 apart) and with other thread counts, and consumed the global RNG. Now the
    masks are keyed per step as nn.Dropout's: reproducible, independent of threads, RNG untouched."""
    x, y = _data(n=32)
    _, h = train_population(lambda: _FunctionalDropoutMLP().double(), x, y, seeds=[0, 1], batch_size=8, epochs=1,
                            progress=False)
    assert h.engine.startswith("vmap (the model draws random numbers in training mode)")

    xc = x.view(32, 1, 6)
    kw = dict(seeds=[0, 1, 2, 3], batch_size=8, epochs=2, progress=False)
    state = torch.get_rng_state()
    one, h = train_population(lambda: _FunctionalDropoutConv().double(), xc, y, threads=1, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(5)
    again, _ = train_population(lambda: _FunctionalDropoutConv().double(), xc, y, threads=1, **kw)
    two, _ = train_population(lambda: _FunctionalDropoutConv().double(), xc, y, threads=2, **kw)
    assert torch.equal(_flat(one), _flat(again)) and torch.equal(_flat(one), _flat(two))
    assert not torch.equal(_flat(one), _flat(init_replicas(lambda: _FunctionalDropoutConv().double(), kw["seeds"])))

    # random numbers in eval mode too: the full training-set loss would be random
    with pytest.raises(ValueError, match="draws random numbers in eval mode"):
        train_population(lambda: _FunctionalDropoutMLP(always=True).double(), x, y, seeds=[0], eval_train=True,
                         progress=False)
    with pytest.raises(ValueError, match="draws random numbers in eval mode"):
        evaluate_population([_FunctionalDropoutMLP(always=True).double() for _ in range(2)], x, y)


class _AuxHead(nn.Module):
    """A body the loss sees and an auxiliary head forward never uses."""

    def __init__(self, conv=False):
        super().__init__()
        self.body = (nn.Sequential(nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)) if conv
                     else nn.Linear(6, 3))
        self.aux = nn.Linear(6, 3)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("conv", [False, True])
def test_parameters_the_forward_does_not_use_stay_as_they_are(conv):
    """torch.optim skips a parameter without a gradient (no momentum, no weight decay); training
    raised 'One of the differentiated Tensors appears to not have been used in the graph' (vmap and
    one replica at a time)."""
    x, y = _data()

    def build():
        return _AuxHead(conv).double()

    models, h = train_population(build, x, y, seeds=[0, 1], lr=0.1, weight_decay=0.01, batch_size=8, epochs=2,
                                 progress=False)
    assert h.engine.startswith("per-replica autograd" if conv else "vmap")
    ref = sgd_loop(build, x, y, [0, 1], lr=0.1, weight_decay=0.01, epochs=2, batch_size=8)
    torch.testing.assert_close(_flat(models), _flat(ref), rtol=1e-9, atol=1e-10)
    init = init_replicas(build, [0, 1])
    assert all(torch.equal(a.aux.weight, b.aux.weight) for a, b in zip(models, init))

    def nothing_to_train():  # (torch's fused SGD kernel raised on the empty list of parameters to update)
        m = build()
        m.body.requires_grad_(False)
        return m

    models, _ = train_population(nothing_to_train, x, y, seeds=[0, 1], lr=0.1, batch_size=8, epochs=1, progress=False)
    assert torch.equal(_flat(models), _flat(init_replicas(nothing_to_train, [0, 1])))


def test_target_loss_stops_on_the_full_training_loss_even_without_eval_train():
    """target_loss with eval_train=False stopped on the epoch's mean minibatch loss: the replica
    stopped at 0.878 with reached_target=True while its full training-set loss was 1.330 (target
    0.9). The stop test now always evaluates the full loss, which the history then records."""
    x, y = _data(n=60)

    def build():
        return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3)).double()

    models, h = train_population(build, x, y, seeds=[0], lr=0.5, batch_size=8, epochs=40, target_loss=0.9,
                                 eval_train=False, progress=False)
    assert h.reached_target == [True]
    full = evaluate_population(models, x, y)["loss"][0].item()
    assert full <= 0.9 and h.train_loss[h.epochs_run[0] - 1][0] == pytest.approx(full, rel=1e-12)


@pytest.mark.parametrize("kw", [dict(weight_decay=1e-3), dict(nesterov=True, weight_decay=1e-2)])
def test_uniform_sgd_does_not_depend_on_threads_or_chunk_size(kw):
    """One lr/momentum/decay for all replicas: torch's fused SGD kernel got each replica group's
    tensors, and rounds its vectorized body and scalar tail differently: threads, chunk_size and a
    resume with other threads changed the models by 6e-8 in float32 (the docs: "Results do not
    depend on it")."""
    x, y = _data(n=40, dtype=torch.float32)
    args = dict(seeds=[0, 1, 2], lr=0.05, batch_size=8, epochs=3, progress=False, **kw)

    def build():
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    ref, h = train_population(build, x, y, threads=1, **args)
    assert h.engine == "fused-mlp"
    for other in (dict(threads=2), dict(threads=1, chunk_size=1), dict(threads=1, chunk_size=2)):
        got, _ = train_population(build, x, y, **other, **args)
        assert torch.equal(_flat(got), _flat(ref)), other
    torch.set_num_threads(2)  # no worker threads: torch's own threads split each tensor
    got, _ = train_population(build, x, y, threads=1, **args)
    assert torch.equal(_flat(got), _flat(ref))


@pytest.mark.parametrize("sparse,entries", [
    (False, None),     # four row chunks, every replica of a group in one block
    (False, 1 << 22),  # four row chunks, the replicas in blocks of two
    (True, None),      # the CSR first layer
], ids=["dense", "dense-blocks", "sparse"])
def test_the_full_training_loss_of_a_replica_does_not_depend_on_its_group(monkeypatch, sparse, entries):
    """The fused path's full training-set loss (history, target_loss) took the training set in chunks of
    2^24 // (R_c * features) rows, each averaged in float32: the same replica with the same parameters
    got losses 1.0e-7 apart (relative) under chunk_size=1 and 4, or alone and in its population, and a
    target_loss between them stopped it in one grouping only (its final parameters then 0.197 apart).
    The chunks are now fixed by the data and the model and the per-sample losses summed in float64."""
    if sparse and not fastcurv.cpu_extension_loaded():
        pytest.skip("C++ extension not loaded")
    if entries is not None:  # (smaller blocks on the same data; the constant is new in the twenty-seventh round)
        monkeypatch.setattr(train_engine, "FULL_LOSS_ENTRIES", entries, raising=False)
    g = torch.Generator().manual_seed(0)
    N, D = 20000, 400  # 2^23 entries: chunked for 4 replicas by the old rule
    x = torch.randn(N, D, generator=g)
    x = torch.relu(x - 0.9) if sparse else x
    y = torch.randint(0, 10, (N,), generator=g)

    def build():
        return nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, 10))

    kw = dict(batch_size=N // 4, lr=0.05, epochs=1, eval_train=True, progress=False, threads=1)
    m1, h1 = train_population(build, x, y, seeds=[0, 1, 2, 3], chunk_size=1, **kw)
    m4, h4 = train_population(build, x, y, seeds=[0, 1, 2, 3], chunk_size=4, **kw)
    alone, ha = train_population(build, x, y, seeds=[2], **kw)
    assert ("sparse-input" in h1.engine) == sparse
    assert torch.equal(_flat(m1), _flat(m4)) and torch.equal(_flat(alone), _flat(m1[2:3]))  # the same parameters
    assert h1.train_loss == h4.train_loss  # bit for bit
    assert ha.train_loss[0] == [h1.train_loss[0][2]]
    ev = evaluate_population(m1, x, y)["loss"].tolist()  # (its batches, its float64 sums: to float64 rounding)
    assert h1.train_loss[0] == pytest.approx(ev, rel=1e-13)


def test_a_replica_trained_alone_is_its_population_twin():
    """A lone replica (or a population whose data_seeds were all equal) took the shared-order engine
    (its first layer one GEMM over the [B, in] minibatch), which rounds differently from the
    per-replica products it takes in a population: 1.3e-16 apart (relative, float64) after 3 epochs,
    0.82 after 40 chaotic ones at lr 0.3. Only shared_data_order=True takes that GEMM now."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)

    def build():
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()

    kw = dict(epochs=3, lr=0.01, batch_size=8, progress=False)
    pop, h = train_population(build, x, y, seeds=[10, 11, 12, 13, 14], **kw)
    alone, ha = train_population(build, x, y, seeds=[14], **kw)
    assert torch.equal(_flat(alone), _flat(pop[4:]))
    assert h.engine == ha.engine == "fused-mlp"
    # equal data seeds without the flag: each replica its own products, as alone
    same_order, hs = train_population(build, x, y, seeds=[10, 14], data_seeds=[7, 7], **kw)
    alone7, _ = train_population(build, x, y, seeds=[14], data_seeds=[7], **kw)
    assert hs.engine == "fused-mlp" and torch.equal(_flat(alone7), _flat(same_order[1:]))
    _, hf = train_population(build, x, y, seeds=[14], shared_data_order=True, **kw)
    assert hf.engine == "fused-mlp+shared-order"
