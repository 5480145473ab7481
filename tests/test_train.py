"""Batched population training against a per-model loop with torch.optim (float64)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcurv.train import epoch_order, evaluate_population, init_replicas, mlp, train_population

SIZES = (6, 5, 4, 3)


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, SIZES[0], generator=g, dtype=torch.float64)
    y = torch.randint(0, SIZES[-1], (n,), generator=g)
    return x, y


def builder():
    return mlp(SIZES, "tanh").double()


def _sam_grad(m, xb, yb, rho):
    """SAM's gradient; BatchNorm's running statistics come from the first (unperturbed) pass only."""
    loss = F.cross_entropy(m(xb), yb)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    eps = [rho * g / (norm + 1e-12) for g in grads]
    stats = [b.clone() for b in m.buffers()]
    with torch.no_grad():
        for p, e in zip(m.parameters(), eps):
            p.add_(e)
    loss2 = F.cross_entropy(m(xb), yb)
    g2 = torch.autograd.grad(loss2, list(m.parameters()))
    with torch.no_grad():
        for p, e in zip(m.parameters(), eps):
            p.sub_(e)
        for b, s in zip(m.buffers(), stats):
            b.copy_(s)
    return g2


def reference_loop(x, y, seeds, *, optimizer, lrs, epochs, batch_size, weight_decay=0.0, momentum=0.9, rho=0.0,
                   nesterov=False, data_seeds=None, build=None, loss_fn=F.cross_entropy):
    """Each replica alone, torch.optim, the same batches (epoch_order) and the same initialization."""
    models = init_replicas(build or builder, seeds)
    data_seeds = seeds if data_seeds is None else data_seeds
    for r, m in enumerate(models):
        if optimizer == "sgd":
            opt = torch.optim.SGD(m.parameters(), lr=lrs[r], momentum=momentum, weight_decay=weight_decay,
                                  nesterov=nesterov)
        elif optimizer == "adam":
            opt = torch.optim.Adam(m.parameters(), lr=lrs[r], weight_decay=weight_decay)
        else:
            opt = torch.optim.AdamW(m.parameters(), lr=lrs[r], weight_decay=weight_decay)
        for e in range(epochs):
            order = epoch_order(data_seeds[r], e, len(x))
            for k in range(0, len(x), batch_size):
                idx = order[k:k + batch_size]
                opt.zero_grad()
                if rho > 0:
                    for p, g in zip(m.parameters(), _sam_grad(m, x[idx], y[idx], rho)):
                        p.grad = g
                else:
                    loss_fn(m(x[idx]), y[idx]).backward()
                opt.step()
    return models


def _assert_same(models_a, models_b, atol=1e-10):
    """Equal parameters and buffers (BatchNorm's running statistics and batch counts)."""
    assert len(models_a) == len(models_b)
    for r, (a, b) in enumerate(zip(models_a, models_b)):
        for (n, pa), pb in zip([*a.named_parameters(), *a.named_buffers()], [*b.parameters(), *b.buffers()]):
            torch.testing.assert_close(pa, pb, atol=atol, rtol=1e-9, msg=lambda s: f"replica {r} {n}: {s}")


@pytest.mark.parametrize("optimizer,kwargs", [
    ("sgd", dict(weight_decay=0.01)),
    ("sgd", dict(weight_decay=0.0, nesterov=True)),
    ("adam", dict(weight_decay=0.01)),
    ("adamw", dict(weight_decay=0.05)),
])
def test_batched_equals_loop(optimizer, kwargs):
    x, y = _data()
    seeds = [3, 7, 11]
    lrs = [0.1, 0.05, 0.2] if optimizer == "sgd" else [0.01, 0.003, 0.02]
    models, hist = train_population(builder, x, y, seeds=seeds, optimizer=optimizer, lr=lrs, batch_size=8, epochs=2,
                                    progress=False, **kwargs)
    ref = reference_loop(x, y, seeds, optimizer=optimizer, lrs=lrs, epochs=2, batch_size=8, **kwargs)
    _assert_same(models, ref)
    assert hist.steps == [6, 6, 6]  # ceil(21 / 8) = 3 steps per epoch, ragged last batch
    assert hist.diverged == [False] * 3
    # the models really moved away from their initialization
    init = init_replicas(builder, seeds)
    assert all((a.weight - b.weight).abs().max() > 1e-3 for a, b in zip(
        [m[1] for m in models], [m[1] for m in init]))


def tied_builder():
    """An MLP whose two hidden layers share one weight (weight tying)."""
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 5), torch.nn.Tanh(),
                            torch.nn.Linear(5, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    m[4].weight = m[2].weight
    return m


def test_tied_weights_train_and_evaluate_as_one_parameter():
    """A shared weight is one parameter in batched training (against torch.optim on each model,
    whose tie makes the gradient the sum of both uses) and in evaluation; the trained models keep
    the tie."""
    x, y = _data()
    models, _ = train_population(tied_builder, x, y, seeds=[0, 1], optimizer="sgd", lr=0.1, batch_size=8, epochs=2,
                                 progress=False)
    ref = reference_loop(x, y, [0, 1], optimizer="sgd", lrs=[0.1, 0.1], epochs=2, batch_size=8, build=tied_builder)
    _assert_same(models, ref)
    assert all(m[4].weight is m[2].weight for m in models)
    ev = evaluate_population(models, x, y)
    for r, m in enumerate(models):
        assert abs(float(ev["loss"][r]) - float(F.cross_entropy(m(x), y).detach())) < 1e-12


def test_sam_equals_loop():
    x, y = _data(n=16)
    seeds = [0, 1]
    models, _ = train_population(builder, x, y, seeds=seeds, lr=0.1, momentum=0.9, sam_rho=0.05, batch_size=8,
                                 epochs=2, progress=False)
    ref = reference_loop(x, y, seeds, optimizer="sgd", lrs=[0.1, 0.1], epochs=2, batch_size=8, rho=0.05)
    _assert_same(models, ref)
    plain = reference_loop(x, y, seeds, optimizer="sgd", lrs=[0.1, 0.1], epochs=2, batch_size=8)
    assert any((a.weight - b.weight).abs().max() > 1e-6 for a, b in zip([m[1] for m in models], [m[1] for m in plain]))


def test_per_replica_sam_grid():
    """rho = 0 for one replica gives plain SGD for it, in the same job."""
    x, y = _data(n=16)
    models, _ = train_population(builder, x, y, seeds=[0, 1], lr=0.1, sam_rho=[0.0, 0.05], batch_size=8, epochs=1,
                                 progress=False)
    plain = reference_loop(x, y, [0], optimizer="sgd", lrs=[0.1], epochs=1, batch_size=8)
    sam = reference_loop(x, y, [1], optimizer="sgd", lrs=[0.1], epochs=1, batch_size=8, rho=0.05)
    _assert_same(models, plain + sam)


def _killed_after_epoch_2_then_resumed(x, y, ck, kw, build=builder):
    """Train with a checkpoint, kill the run after its second epoch, resume it: ``(models, history)``."""

    class Killed(Exception):
        pass

    def die(epoch, history):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        train_population(build, x, y, checkpoint=ck, callback=die, **kw)
    assert ck.exists() and not list(ck.parent.glob("*.tmp*"))
    return train_population(build, x, y, checkpoint=ck, **kw)


def test_resume_after_interruption_is_identical(tmp_path):
    x, y = _data()
    kw = dict(seeds=[0, 1, 2], optimizer="adam", lr=0.01, batch_size=8, epochs=3, progress=False)
    full, hist_full = train_population(builder, x, y, **kw)
    ck = tmp_path / "run.pt"
    resumed, hist = _killed_after_epoch_2_then_resumed(x, y, ck, kw)
    assert hist.resumed_from_epoch == 2
    _assert_same(resumed, full, atol=0)
    assert hist.train_loss == hist_full.train_loss
    assert hist.steps == hist_full.steps

    # a finished checkpoint does nothing more; different settings are refused with a clear error
    again, _ = train_population(builder, x, y, checkpoint=ck, **kw)
    _assert_same(again, full, atol=0)
    with pytest.raises(ValueError, match=r"different settings \(lr 0\.01 -> 0\.02\)"):
        train_population(builder, x, y, checkpoint=ck, **{**kw, "lr": 0.02})
    # another replica count: the shared values by count (they read "lr 0.01 -> 0.01", as if changed)
    with pytest.raises(ValueError, match=r"lr 0\.01 x 3 -> 0\.01 x 4, momentum 0\.9 x 3 -> 0\.9 x 4"):
        train_population(builder, x, y, checkpoint=ck, **{**kw, "seeds": [0, 1, 2, 3]})


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    """Same parameter shapes, another activation or dropout p: refused, naming the module (it was
    resumed, training the Tanh nets from the ReLU nets' weights)."""
    x, y = _data()
    kw = dict(seeds=[0, 1], batch_size=8, epochs=1, progress=False)
    ck = tmp_path / "ck.pt"
    train_population(lambda: mlp(SIZES, "relu").double(), x, y, checkpoint=ck, **kw)
    with pytest.raises(ValueError, match=r"architecture \(module 2: ReLU\(\) -> Tanh\(\)\)"):
        train_population(lambda: mlp(SIZES, "tanh").double(), x, y, checkpoint=ck, **{**kw, "epochs": 2})

    def dropout(p):
        return lambda: nn.Sequential(nn.Linear(SIZES[0], 6), nn.ReLU(), nn.Dropout(p), nn.Linear(6, SIZES[-1])).double()

    ck2 = tmp_path / "drop.pt"
    train_population(dropout(0.3), x, y, checkpoint=ck2, **kw)
    with pytest.raises(ValueError, match=r"module 2: Dropout\(p=0.3, inplace=False\) -> Dropout\(p=0.9"):
        train_population(dropout(0.9), x, y, checkpoint=ck2, **kw)


def test_fewer_epochs_than_the_checkpoint_holds_raise(tmp_path):
    """The checkpoint's longer-trained models came back for a shorter run, and a study's report
    stated the shorter run's epoch count."""
    x, y = _data()
    kw = dict(seeds=[0, 1], batch_size=8, progress=False)
    ck = tmp_path / "ck.pt"
    train_population(builder, x, y, checkpoint=ck, epochs=2, **kw)
    with pytest.raises(ValueError, match="holds 2 epochs, but epochs=1 was asked for"):
        train_population(builder, x, y, checkpoint=ck, epochs=1, **kw)
    _, hist = train_population(builder, x, y, checkpoint=ck, epochs=3, **kw)  # extending still works
    assert hist.resumed_from_epoch == 2 and hist.epochs_run == [3, 3]


def test_bad_checkpoint_files_are_named(tmp_path, monkeypatch):
    """A damaged file or one that is not a checkpoint: a ValueError naming it (torch's own error
    advised weights_only=False, which would run code from the file); a folder at the path is
    refused before training; a missing folder is created."""
    x, y = _data()
    kw = dict(seeds=[0, 1], batch_size=8, epochs=1, progress=False)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="garbage.pt cannot be read") as err:
        train_population(builder, x, y, checkpoint=garbage, **kw)
    assert "weights_only" not in str(err.value)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="other.pt is not a fastcurv training checkpoint"):
        train_population(builder, x, y, checkpoint=other, **kw)
    good = tmp_path / "good.pt"
    train_population(builder, x, y, checkpoint=good, **kw)
    good.write_bytes(good.read_bytes()[:100])  # cut off
    with pytest.raises(ValueError, match="good.pt cannot be read"):
        train_population(builder, x, y, checkpoint=good, **kw)
    monkeypatch.setattr("fastcurv.train.init_replicas", lambda *a: pytest.fail("trained"))
    with pytest.raises(ValueError, match="is a folder"):
        train_population(builder, x, y, checkpoint=tmp_path, **kw)
    monkeypatch.undo()
    train_population(builder, x, y, checkpoint=tmp_path / "new" / "dir" / "ck.pt", **kw)
    assert (tmp_path / "new" / "dir" / "ck.pt").is_file()


def test_dropout_masks_are_keyed_by_seeds_epoch_and_step(tmp_path):
    """With dropout, the same call gives the same models, a resumed run the uninterrupted one, and
    the global RNG is left as it was (the masks came from the global RNG before the 21st round)."""
    x, y = _data()

    def drop_builder():
        return nn.Sequential(nn.Linear(x.shape[1], 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).double()

    kw = dict(seeds=[0, 1], batch_size=8, epochs=3, progress=False)
    state = torch.get_rng_state()
    first, _ = train_population(drop_builder, x, y, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    _assert_same(train_population(drop_builder, x, y, **kw)[0], first, atol=0)

    resumed, hist = _killed_after_epoch_2_then_resumed(x, y, tmp_path / "drop.pt", kw, drop_builder)
    assert hist.resumed_from_epoch == 2
    _assert_same(resumed, first, atol=0)


def test_bad_training_and_evaluation_input_is_named():
    x, y = _data()
    kw = dict(seeds=[0, 1], batch_size=8, epochs=1, progress=False)
    for bad, words in [(dict(y=y + 3), "labels out of range: found label [3-5] but the model has 3 classes"),
                       (dict(x=x.masked_fill(x > 2, float("nan"))), "contain NaN or Inf"),
                       (dict(loss="mse", y=torch.randn(len(x), 4, dtype=torch.float64)), r"one target per output: targets \(4,\)"),
                       (dict(optimizer="adam", betas=(1.5, 0.9)), r"betas must lie in \[0, 1\)"),
                       # NaN targets made every replica "diverge" with NaN weights, silently
                       (dict(loss="mse", y=torch.randn(len(x), 3, dtype=torch.float64).index_fill(0, torch.tensor([5]),
                                                                                         float("nan"))),
                        "the targets y contain NaN or Inf"),
                       (dict(x=x[:, :4]), r"the model cannot run on the first samples \(inputs \(2, 4\)"),
                       (dict(nesterov=True, momentum=0.0), "nesterov=True needs a positive momentum")]:
        args = dict(dict(x=x, y=y), **bad)
        with pytest.raises(ValueError, match=words):
            train_population(builder, args.pop("x"), args.pop("y"), **kw, **args)
    models, _ = train_population(builder, x, y, **kw)
    models[1].eval()  # replicas in different modes: evaluated in eval mode all the same
    res = evaluate_population(models, x, y)
    ref = [float(F.cross_entropy(m.eval()(x), y)) for m in models]
    assert res["loss"].tolist() == pytest.approx(ref, rel=1e-12)
    for bad, words in [((x[:0], y[:0]), "non-empty"), ((x.masked_fill(x > 2, float("nan")), y), "NaN or Inf"),
                       ((x, y + 3), "labels out of range")]:
        with pytest.raises(ValueError, match=words):
            evaluate_population(models, *bad)
    y_nan = torch.randn(len(x), 3, dtype=torch.float64)
    y_nan[3, 1] = float("inf")
    with pytest.raises(ValueError, match="the targets contain NaN or Inf"):  # (it returned NaN losses)
        evaluate_population(models, x, y_nan, loss="mse")


class _Returns(nn.Module):
    """A linear model whose forward returns a tuple or a dict."""

    def __init__(self, kind):
        super().__init__()
        self.lin, self.kind = nn.Linear(SIZES[0], SIZES[-1]), kind

    def forward(self, x):
        out = self.lin(x)
        return (out, x) if self.kind == "tuple" else {"logits": out}


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_a_model_returning_a_tuple_or_dict_gets_batched_sharpness_type_error(kind):
    """As batched_sharpness: a TypeError naming what the model returns (training and evaluation
    raised AttributeError: 'tuple' object has no attribute 'shape' / KeyError: 0)."""
    x, y = _data()
    words = f"the model returns a {kind}; fastcurv needs one tensor of outputs"
    with pytest.raises(TypeError, match=words):
        train_population(lambda: _Returns(kind).double(), x, y, seeds=[0, 1], epochs=1, progress=False)
    with pytest.raises(TypeError, match=words):
        evaluate_population([_Returns(kind).double() for _ in range(2)], x, y)


def test_diverging_replica_is_isolated():
    x, y = _data()

    def relu_builder():  # unbounded activations: a huge learning rate overflows to Inf/NaN within a few steps
        return mlp(SIZES, "relu").double()

    models, hist = train_population(relu_builder, x, y, seeds=[0, 1, 2], lr=[0.1, 1e200, 0.1], batch_size=8,
                                    epochs=2, progress=False)
    assert hist.diverged == [False, True, False]
    assert all(torch.isnan(p).all() for p in models[1].parameters())
    alone, _ = train_population(relu_builder, x, y, seeds=[0, 2], lr=0.1, batch_size=8, epochs=2, progress=False)
    _assert_same([models[0], models[2]], alone, atol=1e-12)
    assert math.isnan(hist.train_loss[-1][1]) and not math.isnan(hist.train_loss[-1][0])
    ev = evaluate_population(models, x, y)
    assert math.isnan(ev["accuracy"][1]) and 0 <= ev["accuracy"][0] <= 1


def test_target_loss_freezes_each_replica():
    x, y = _data(n=24)
    target = 0.6
    models, hist = train_population(builder, x, y, seeds=[0, 1], lr=[0.3, 0.05], batch_size=8, epochs=40,
                                    target_loss=target, progress=False)
    assert hist.reached_target[0], hist.to_pandas()
    for r in range(2):
        ep = hist.epochs_run[r]
        losses = [row[r] for row in hist.train_loss[:ep]]
        assert (losses[-1] <= target) == hist.reached_target[r]
        assert all(v > target for v in losses[:-1])
        # frozen at the epoch it reached the target: equal to a run of exactly that many epochs
        alone, _ = train_population(builder, x, y, seeds=[r], lr=[0.3, 0.05][r], batch_size=8, epochs=ep, progress=False)
        _assert_same([models[r]], alone, atol=1e-12)
    ev = evaluate_population(models, x, y)
    assert ev["loss"][0] <= target


def test_bad_arguments():
    x, y = _data()
    with pytest.raises(ValueError, match="one value per replica"):
        train_population(builder, x, y, seeds=[0, 1], lr=[0.1, 0.2, 0.3], progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        train_population(builder, x, y, seeds=[0], optimizer="lbfgs", progress=False)
    with pytest.raises(ValueError, match="integer class labels"):
        train_population(builder, x, y.double(), seeds=[0], progress=False)
    with pytest.raises(ValueError, match="sizes"):
        mlp([5])
    with pytest.raises(ValueError, match="threads"):
        train_population(builder, x, y, seeds=[0], threads=0, progress=False)
    for bad in (0, -1, 2.5, True):  # (0 and -1 failed deep inside as 'range() arg 3 must not be zero' / IndexError)
        with pytest.raises(ValueError, match=f"chunk_size must be a positive integer or None, got {bad}"):
            train_population(builder, x, y, seeds=[0], chunk_size=bad, progress=False)
    with pytest.raises(ValueError, match="target_loss must be a number"):
        train_population(builder, x, y, seeds=[0], target_loss="1e-3", progress=False)


@pytest.mark.parametrize("target", [np.float32(0.5), torch.tensor(0.5)])
def test_target_loss_of_numpy_or_tensor_type_is_checkpointed(tmp_path, target):
    """A numpy float32 or 0-dim tensor target_loss trained an epoch, then raised 'Object of type
    float32 is not JSON serializable' writing the checkpoint; it is read as a float."""
    x, y = _data()
    kw = dict(seeds=[0, 1], batch_size=8, epochs=2, progress=False)
    _, ref = train_population(builder, x, y, target_loss=0.5, **kw)
    _, hist = train_population(builder, x, y, target_loss=target, checkpoint=tmp_path / "ck.pt", **kw)
    assert hist.train_loss == ref.train_loss
    _, again = train_population(builder, x, y, target_loss=0.5, checkpoint=tmp_path / "ck.pt", **kw)  # same settings
    assert again.resumed_from_epoch == 2


def test_float32_batched_close_to_loop_on_mnist_like_data():
    """The default float32 path (vmapped bmm) agrees with the loop up to rounding."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(64, 20, generator=g), torch.randint(0, 5, (64,), generator=g)

    def b32():
        return mlp((20, 16, 5))

    models, _ = train_population(b32, x, y, seeds=[0, 1], lr=0.1, batch_size=16, epochs=2, progress=False)
    ref = init_replicas(b32, [0, 1])
    for r, m in enumerate(ref):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for e in range(2):
            order = epoch_order(r, e, 64)
            for k in range(0, 64, 16):
                opt.zero_grad()
                F.cross_entropy(m(x[order[k:k + 16]]), y[order[k:k + 16]]).backward()
                opt.step()
    _assert_same(models, ref, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_chunked_replicas_give_the_same_result(optimizer):
    x, y = _data()
    kw = dict(seeds=[0, 1, 2], optimizer=optimizer, lr=[0.05, 0.01, 0.02], sam_rho=[0.0, 0.05, 0.0], batch_size=8,
              epochs=2, progress=False)
    whole, h1 = train_population(builder, x, y, chunk_size=3, **kw)
    parts, h2 = train_population(builder, x, y, chunk_size=2, **kw)
    _assert_same(whole, parts, atol=1e-12)
    assert h1.steps == h2.steps


# ---- fused MLP path (fastcurv.train_fused) against the vmap path and the loop ----------------------


@pytest.mark.parametrize("activation", ["relu", "gelu", "elu", "silu", "softplus", "leaky_relu", "sigmoid"])
def test_fused_equals_vmap_for_each_activation(activation):
    x, y = _data()

    def b():
        return mlp(SIZES, activation).double()

    kw = dict(seeds=[0, 1, 2], lr=[0.1, 0.2, 0.05], weight_decay=0.01, batch_size=8, epochs=1, progress=False)
    fused, hf = train_population(b, x, y, **kw)
    plain, hv = train_population(b, x, y, fused=False, **kw)
    assert hf.engine == "fused-mlp" and hv.engine == "vmap (fused=False)"
    _assert_same(fused, plain, atol=1e-12)
    assert hf.train_loss[-1] == pytest.approx(hv.train_loss[-1], rel=1e-12)


@pytest.mark.parametrize("nesterov,wd,momentum", [(False, 0.0, 0.8), (True, 0.01, 0.8), (False, 0.01, 0.0)])
def test_uniform_sgd_foreach_step_equals_loop(nesterov, wd, momentum):
    """One lr/momentum/decay for all replicas takes the scalar (foreach or fused) optimizer step;
    plain SGD (momentum 0) crashed in torch's fused kernel before the twenty-first round."""
    x, y = _data()
    seeds = [4, 5]
    models, _ = train_population(builder, x, y, seeds=seeds, lr=0.1, momentum=momentum, weight_decay=wd, nesterov=nesterov,
                                 batch_size=8, epochs=2, progress=False)
    ref = reference_loop(x, y, seeds, optimizer="sgd", lrs=[0.1, 0.1], momentum=momentum, weight_decay=wd,
                         nesterov=nesterov, epochs=2, batch_size=8)
    _assert_same(models, ref)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_shared_data_order_equals_loop(optimizer):
    """shared_data_order: every replica sees data_seeds[0]'s batches; first layer as one GEMM."""
    x, y = _data()
    seeds = [3, 7, 11]
    lrs = [0.1, 0.05, 0.2] if optimizer == "sgd" else [0.01, 0.003, 0.02]
    models, hist = train_population(builder, x, y, seeds=seeds, optimizer=optimizer, lr=lrs, weight_decay=0.01,
                                    batch_size=8, epochs=2, shared_data_order=True, chunk_size=2, progress=False)
    assert hist.engine == "fused-mlp+shared-order"
    ref = reference_loop(x, y, seeds, optimizer=optimizer, lrs=lrs, weight_decay=0.01, epochs=2, batch_size=8,
                         data_seeds=[3, 3, 3])
    _assert_same(models, ref)
    # equal explicit data seeds give the same shared order; different ones contradict the option
    same, _ = train_population(builder, x, y, seeds=seeds, data_seeds=[3, 3, 3], optimizer=optimizer, lr=lrs,
                               weight_decay=0.01, batch_size=8, epochs=2, fused=False, progress=False)
    _assert_same(models, same, atol=1e-12)
    with pytest.raises(ValueError, match="shared_data_order.*data_seeds differ"):
        train_population(builder, x, y, seeds=seeds, data_seeds=[1, 2, 3], shared_data_order=True, progress=False)


def test_fused_mse_image_input_no_bias_equals_loop():
    """Flatten + bias-free layers + MSE through the fused path, per-replica and shared order, against the loop."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 1, 2, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20, 2, generator=g, dtype=torch.float64)

    def b():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False),
                                   torch.nn.Tanh()), torch.nn.Identity(), torch.nn.Linear(5, 2)).double()

    for shared in (False, True):
        models, hist = train_population(b, x, y, seeds=[0, 1], lr=0.05, loss="mse", batch_size=8, epochs=2,
                                        shared_data_order=shared, eval_train=True, progress=False)
        assert hist.engine.startswith("fused-mlp")
        ref = reference_loop(x, y, [0, 1], optimizer="sgd", lrs=[0.05, 0.05], epochs=2, batch_size=8, build=b,
                             loss_fn=F.mse_loss, data_seeds=[0, 0] if shared else None)
        _assert_same(models, ref)
        full = [F.mse_loss(m(x), y).item() for m in ref]
        assert hist.train_loss[-1] == pytest.approx(full, rel=1e-10)


def test_non_mlp_falls_back_to_vmap_and_says_why():
    x, y = _data()

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(SIZES[0], SIZES[0]), torch.nn.Linear(SIZES[0], SIZES[-1])

        def forward(self, x):
            return self.b(x + torch.tanh(self.a(x)))

    def res():
        return Residual().double()

    models, hist = train_population(res, x, y, seeds=[0, 1], lr=0.1, batch_size=8, epochs=1, progress=False)
    assert hist.engine == "vmap (the model is a Residual, not a plain nn.Sequential)"
    ref = reference_loop(x, y, [0, 1], optimizer="sgd", lrs=[0.1, 0.1], epochs=1, batch_size=8, build=res)
    _assert_same(models, ref)

    def with_norm():
        return torch.nn.Sequential(torch.nn.Linear(SIZES[0], 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3)).double()

    _, hist = train_population(with_norm, x, y, seeds=[0], batch_size=8, epochs=1, progress=False)
    assert "LayerNorm at 1" in hist.engine and hist.engine.startswith("vmap")
    with pytest.raises(ValueError, match="fused=True.*LayerNorm"):
        train_population(with_norm, x, y, seeds=[0], fused=True, progress=False)


@pytest.mark.parametrize("fused", [None, False])
def test_worker_threads_give_the_same_result(fused):
    """threads=2 (replica groups trained by two worker threads) equals threads=1, with SAM, a diverging
    replica and per-epoch full-loss evaluation; torch's thread count is restored afterwards."""
    x, y = _data()

    def relu_builder():
        return mlp(SIZES, "relu").double()

    kw = dict(seeds=[0, 1, 2, 3, 4], lr=[0.1, 1e200, 0.05, 0.1, 0.2], sam_rho=[0.0, 0.0, 0.05, 0.0, 0.05],
              batch_size=8, epochs=2, eval_train=True, fused=fused, progress=False)
    before = torch.get_num_threads()
    one, h1 = train_population(relu_builder, x, y, threads=1, **kw)
    two, h2 = train_population(relu_builder, x, y, threads=2, chunk_size=2, **kw)
    assert torch.get_num_threads() == before
    assert h2.engine.endswith("2 worker threads") and "worker" not in h1.engine
    assert h1.diverged == h2.diverged == [False, True, False, False, False]
    keep = [0, 2, 3, 4]
    _assert_same([one[i] for i in keep], [two[i] for i in keep], atol=1e-12)
    assert all(torch.isnan(p).all() for p in [*one[1].parameters(), *two[1].parameters()])
    assert h1.steps == h2.steps
    np_nan = [[v for v in row if not math.isnan(v)] for row in h1.train_loss]
    assert np_nan == [pytest.approx([v for v in row if not math.isnan(v)], rel=1e-12) for row in h2.train_loss]


def test_nonfinite_rows_check():
    from fastcurv.replicas import nonfinite_rows

    a, b = torch.randn(4, 3, 5), torch.randn(4, 7)
    a[1, 0, 0] = float("nan")
    b[2, 3] = float("-inf")
    b[3, :] = 3e38  # finite entries whose float32 sum overflows: not flagged
    assert nonfinite_rows([a, b]).tolist() == [False, True, True, False]


# ---- sparse inputs: the first layer from the nonzero inputs only (fastcurv.ops.csr_linear) ---------


def _sparse_xy(n=21, seed=0):
    x, y = _data(n, seed)
    x[torch.rand(x.shape, generator=torch.Generator().manual_seed(seed + 1)) > 0.25] = 0
    x[0] = 0
    return x, y


needs_ext = pytest.mark.skipif(not __import__("fastcurv").cpu_extension_loaded(), reason="C++ extension not loaded (fastcurv._ext.extension_error() says why)")


@needs_ext
@pytest.mark.parametrize("optimizer,kwargs", [
    ("sgd", dict(lr=[0.1, 0.05, 0.2], weight_decay=0.01)),             # per-replica step
    ("sgd", dict(lr=0.1, nesterov=True, sam_rho=0.05)),                # fused SGD kernel on the transposed layer
    ("adam", dict(lr=[0.01, 0.003, 0.02], weight_decay=0.01)),
])
@pytest.mark.parametrize("shared", [False, True])
def test_sparse_input_equals_loop(optimizer, kwargs, shared):
    x, y = _sparse_xy()
    seeds = [3, 7, 11]
    models, hist = train_population(builder, x, y, seeds=seeds, optimizer=optimizer, batch_size=8, epochs=2,
                                    shared_data_order=shared, chunk_size=2, threads=2, eval_train=True, progress=False,
                                    **kwargs)
    assert "+sparse-input" in hist.engine and hist.engine.endswith("2 worker threads")
    lrs = kwargs["lr"] if isinstance(kwargs["lr"], list) else [kwargs["lr"]] * 3
    ref = reference_loop(x, y, seeds, optimizer=optimizer, lrs=lrs, epochs=2, batch_size=8,
                         weight_decay=kwargs.get("weight_decay", 0.0), nesterov=kwargs.get("nesterov", False),
                         rho=kwargs.get("sam_rho", 0.0), data_seeds=[3, 3, 3] if shared else None)
    _assert_same(models, ref)
    full = [F.cross_entropy(m(x), y).item() for m in ref]
    assert hist.train_loss[-1] == pytest.approx(full, rel=1e-10)
    dense, hd = train_population(builder, x, y, seeds=seeds, optimizer=optimizer, batch_size=8, epochs=2,
                                 shared_data_order=shared, sparse_input=False, progress=False, **kwargs)
    assert "sparse" not in hd.engine
    _assert_same(models, dense, atol=1e-12)


@needs_ext
def test_sparse_input_mse_image_input_no_bias_equals_loop():
    g = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(20, 1, 2, 3, generator=g, dtype=torch.float64) - 0.8)  # about 80% zeros
    y = torch.randn(20, 2, generator=g, dtype=torch.float64)

    def b():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 5, bias=False), torch.nn.Tanh(),
                                   torch.nn.Linear(5, 2)).double()

    models, hist = train_population(b, x, y, seeds=[0, 1], lr=0.05, loss="mse", batch_size=8, epochs=2,
                                    eval_train=True, progress=False)
    assert "+sparse-input" in hist.engine
    ref = reference_loop(x, y, [0, 1], optimizer="sgd", lrs=[0.05, 0.05], epochs=2, batch_size=8, build=b,
                         loss_fn=F.mse_loss)
    _assert_same(models, ref)
    assert hist.train_loss[-1] == pytest.approx([F.mse_loss(m(x), y).item() for m in ref], rel=1e-10)


@needs_ext
def test_sparse_input_default_choice_and_errors():
    x, y = _sparse_xy()
    dense_x, _ = _data()
    _, h = train_population(builder, dense_x, y, seeds=[0], batch_size=8, epochs=1, progress=False)
    assert "sparse" not in h.engine  # every input nonzero: dense GEMMs
    _, h = train_population(builder, dense_x, y, seeds=[0], batch_size=8, epochs=1, sparse_input=True, progress=False)
    assert "+sparse-input (100% nonzero)" in h.engine
    _, h = train_population(builder, x, y, seeds=[0], batch_size=8, epochs=1, progress=False)
    assert "+sparse-input" in h.engine
    with pytest.raises(ValueError, match="sparse_input=True, but the model does not take the fused MLP path"):
        train_population(builder, x, y, seeds=[0], fused=False, sparse_input=True, progress=False)


@needs_ext
def test_sparse_input_resume_is_identical(tmp_path):
    x, y = _sparse_xy()
    kw = dict(seeds=[0, 1, 2], lr=0.05, batch_size=8, epochs=3, progress=False)
    full, _ = train_population(builder, x, y, **kw)
    ck = tmp_path / "run.pt"
    resumed, hist = _killed_after_epoch_2_then_resumed(x, y, ck, kw)
    assert hist.resumed_from_epoch == 2 and "+sparse-input" in hist.engine
    _assert_same(resumed, full, atol=0)
    # a checkpoint of the sparse run resumes on the dense path too (same settings, same numbers up to rounding)
    dense, _ = train_population(builder, x, y, checkpoint=ck, sparse_input=False, **{**kw, "epochs": 4})
    ref, _ = train_population(builder, x, y, **{**kw, "epochs": 4})
    _assert_same(dense, ref, atol=1e-12)


def test_evaluate_population_takes_a_loader():
    """A DataLoader (or any iterable of batches) gives the same numbers as the tensors."""
    torch.manual_seed(0)
    models = [mlp([6, 8, 3]) for _ in range(2)]
    x, y = torch.randn(50, 6), torch.randint(0, 3, (50,))
    want = evaluate_population(models, x, y)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    got = evaluate_population(models, loader)
    torch.testing.assert_close(got["loss"], want["loss"])
    torch.testing.assert_close(got["accuracy"], want["accuracy"])
    with pytest.raises(ValueError, match="labels out of range"):
        evaluate_population(models, [(x[:10], y[:10]), (x[10:20], torch.full((10,), 7))])
    one_pair = evaluate_population(models, (x, y))  # a single (x, y) pair, as elsewhere; empty batches skipped
    torch.testing.assert_close(one_pair["loss"], want["loss"])
    torch.testing.assert_close(evaluate_population(models, [(x[:0], y[:0]), (x, y)])["loss"], want["loss"])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_narrow_integer_labels_train_and_evaluate(dtype):
    """MNIST's raw labels are uint8: train_population and evaluate_population failed in torch's gather."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    kw = dict(seeds=[0, 1], epochs=1, batch_size=8, progress=False)
    models, _ = train_population(lambda: mlp([6, 8, 3]), x, y.to(dtype), **kw)
    ref, _ = train_population(lambda: mlp([6, 8, 3]), x, y, **kw)
    for a, b in zip(models, ref):
        torch.testing.assert_close(list(a.parameters()), list(b.parameters()))
    torch.testing.assert_close(evaluate_population(models, x, y.to(dtype))["accuracy"], evaluate_population(ref, x, y)["accuracy"])


def bn_mlp():
    return nn.Sequential(nn.Linear(SIZES[0], 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()


def bn_cnn():
    """Two conv layers with BatchNorm2d (one without affine parameters), then a linear head."""
    return nn.Sequential(nn.Unflatten(1, (1, 2, 3)), nn.Conv2d(1, 3, 2, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 2, 2), nn.BatchNorm2d(2, affine=False, momentum=0.3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * 2 * 3, 3)).double()


@pytest.mark.parametrize("build,threads,fused,engine", [(bn_mlp, 1, None, "vmap"), (bn_cnn, 1, None, "per-replica"),
                                                        (bn_cnn, 2, None, "per-replica"), (bn_cnn, 1, False, "vmap")])
def test_batchnorm_models_train_as_the_loop(build, threads, fused, engine):
    """BatchNorm models train with each replica's batch statistics and update its own running
    statistics, as torch.optim on each model in train mode, through vmap and (conv nets on the CPU
    by default) one replica at a time; a replica with SAM takes its statistics from the unperturbed
    pass only."""
    x, y = _data()
    seeds = [3, 7, 11]
    models, hist = train_population(build, x, y, seeds=seeds, lr=[0.1, 0.05, 0.2], sam_rho=[0.0, 0.0, 0.05],
                                    weight_decay=0.01, batch_size=8, epochs=2, threads=threads, chunk_size=2,
                                    fused=fused, progress=False)
    assert hist.engine.startswith(engine + " ")
    ref = reference_loop(x, y, seeds[:2], optimizer="sgd", lrs=[0.1, 0.05], epochs=2, batch_size=8, weight_decay=0.01,
                         build=build)
    ref += reference_loop(x, y, seeds[2:], optimizer="sgd", lrs=[0.2], epochs=2, batch_size=8, weight_decay=0.01,
                          rho=0.05, build=build)
    _assert_same(models, ref)
    init = init_replicas(build, seeds)
    bn = [m for m in models[0].modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)][0]
    assert bn.num_batches_tracked == 6 and not torch.allclose(bn.running_var, init[0].state_dict()[
        [k for k in init[0].state_dict() if k.endswith("running_var")][0]])
    assert not any(m.training for m in models)


@pytest.mark.parametrize("build", [bn_mlp, bn_cnn])
def test_batchnorm_replicas_that_stop_keep_their_statistics(tmp_path, build):
    """A diverged replica and one that reached the target loss no longer change their running
    statistics; the others are as if trained alone; a resumed run equals the uninterrupted one
    (vmap, and one replica at a time)."""
    x, y = _data(n=24)
    kw = dict(lr=[0.3, 1e308, 0.05], batch_size=8, epochs=10, target_loss=0.6, progress=False)
    models, hist = train_population(build, x, y, seeds=[0, 1, 2], **kw)
    assert hist.diverged == [False, True, False] and hist.reached_target[0], hist.to_pandas()
    for r in (0, 2):
        alone, _ = train_population(build, x, y, seeds=[r], lr=kw["lr"][r], batch_size=8, epochs=hist.epochs_run[r],
                                    progress=False)
        _assert_same([models[r]], alone, atol=1e-12)
    assert all(torch.isnan(p).all() for p in models[1].parameters())
    # the full training-set loss is the eval-mode loss (running statistics)
    ev = evaluate_population(models, x, y)
    assert hist.train_loss[hist.epochs_run[0] - 1][0] == pytest.approx(float(ev["loss"][0]), rel=1e-12)

    resumed, rh = _killed_after_epoch_2_then_resumed(x, y, tmp_path / "bn.pt", dict(kw, seeds=[0, 1, 2]), build)
    assert rh.resumed_from_epoch == 2
    np.testing.assert_array_equal(rh.train_loss, hist.train_loss)  # (NaN where a replica no longer trains)
    _assert_same([resumed[0], resumed[2]], [models[0], models[2]], atol=0)
    assert all(torch.isnan(p).all() for p in resumed[1].parameters())


def test_batchnorm_with_a_last_minibatch_of_one_or_a_cumulative_average_is_refused_before_training():
    x, y = _data(n=17)
    with pytest.raises(ValueError, match=r"last minibatch of every epoch holds 1 sample \(N=17, batch_size=8\)"):
        train_population(bn_mlp, x, y, seeds=[0], batch_size=8, progress=False)

    def cumulative():
        return nn.Sequential(nn.Linear(SIZES[0], 5), nn.BatchNorm1d(5, momentum=None), nn.Linear(5, 3)).double()

    with pytest.raises(ValueError, match="BatchNorm '1' has momentum=None"):
        train_population(cumulative, x, y, seeds=[0], batch_size=4, progress=False)

    def batch_stats_only():  # no running statistics: trains as the loop
        return nn.Sequential(nn.Linear(SIZES[0], 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Tanh(),
                             nn.Linear(5, 3)).double()

    models, _ = train_population(batch_stats_only, x, y, seeds=[0, 1], lr=0.1, batch_size=5, epochs=2, progress=False)
    ref = reference_loop(x, y, [0, 1], optimizer="sgd", lrs=[0.1, 0.1], epochs=2, batch_size=5, build=batch_stats_only)
    _assert_same(models, ref)
    _, hist = train_population(bn_cnn, x, y, seeds=[0], batch_size=8, epochs=1, progress=False)  # 2x3 maps: fine
    assert hist.steps == [3]


def test_full_training_loss_is_evaluated_without_dropout():
    """eval_train's loss is the eval-mode loss (it was computed with dropout masks drawn from the
    global RNG before the twenty-third round)."""
    x, y = _data()

    def drop_builder():
        return nn.Sequential(nn.Linear(x.shape[1], 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).double()

    state = torch.get_rng_state()
    models, hist = train_population(drop_builder, x, y, seeds=[0, 1], batch_size=8, epochs=2, eval_train=True,
                                    progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert hist.train_loss[-1] == pytest.approx(evaluate_population(models, x, y)["loss"].tolist(), rel=1e-12)


def test_evaluate_population_gives_nan_for_replicas_with_non_finite_outputs():
    """Finite weights whose logits overflow: NaN loss AND accuracy, with a warning naming the
    replica (the accuracy was the argmax of Inf/NaN logits, silently)."""
    x, y = _data()
    models = init_replicas(builder, [0, 1, 2])
    with torch.no_grad():  # every tanh at 1, then 1e308 * (4 + 1) in the head
        for layer in models[2]:
            if isinstance(layer, nn.Linear):
                layer.weight.fill_(0.0 if layer is not models[2][-1] else 1e308)
                layer.bias.fill_(1e3 if layer is not models[2][-1] else 1e308)
    with pytest.warns(RuntimeWarning, match=r"replicas \[2\] have finite parameters but non-finite outputs"):
        res = evaluate_population(models, x, y)
    assert math.isnan(res["loss"][2]) and math.isnan(res["accuracy"][2])
    alone = evaluate_population(models[:2], x, y)
    assert res["loss"][:2].tolist() == alone["loss"].tolist() and res["accuracy"][:2].tolist() == alone["accuracy"].tolist()


def test_cnn_builder():
    """W3's architecture by its channels; pooling stops at 1x1 maps; bad shapes are named."""
    from fastcurv.train import cnn

    w3 = cnn((1, 28, 28), (8, 16), 10)
    assert [type(m).__name__ for m in w3] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 2 + ["Flatten", "Linear"]
    assert w3[-1].in_features == 16 * 7 * 7 and w3(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    tiny = cnn((1, 2, 3), (2, 3), 4, "tanh", batchnorm=False)
    assert tiny(torch.zeros(5, 1, 2, 3)).shape == (5, 4) and sum(isinstance(m, nn.MaxPool2d) for m in tiny) == 1
    with pytest.raises(ValueError, match=r"in_shape \(C, H, W\)"):
        cnn((28, 28), (8,), 10)


def test_full_loss_of_batch_statistics_models_does_not_depend_on_replica_groups():
    """BatchNorm without running statistics normalizes each evaluation chunk by itself: the chunks
    are the training minibatches' size for every replica group (they followed the group size, so
    chunk_size and threads changed the loss, and a 1-sample chunk crashed after an epoch); the
    single-sample check leaves the global RNG alone with dropout."""
    x, y = _data(n=26)

    def build(p=0.0):
        return nn.Sequential(nn.Unflatten(1, (1, 2, 3)), nn.Conv2d(1, 2, 2, padding=1),
                             nn.BatchNorm2d(2, track_running_stats=False), nn.ReLU(), nn.Dropout(p), nn.Flatten(),
                             nn.Linear(2 * 3 * 4, 3)).double()

    kw = dict(seeds=[0, 1, 2, 3], lr=0.1, batch_size=5, epochs=1, eval_train=True, progress=False)
    _, one = train_population(build, x, y, chunk_size=1, **kw)
    _, four = train_population(build, x, y, chunk_size=4, threads=1, **kw)
    assert np.allclose(one.train_loss, four.train_loss, rtol=1e-12, atol=0)
    state = torch.get_rng_state()
    train_population(lambda: build(0.2), x, y, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # (26 = 5 * 5 + 1: the single-sample check ran)


class _Counting(nn.Module):
    """Identity that counts its forward calls (once per vmapped group, once per replica in a loop)."""

    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return x


@pytest.mark.parametrize("conv,fused,per_replica", [(True, None, True), (True, False, False), (False, False, False)])
def test_the_engine_history_names_is_the_one_that_runs(conv, fused, per_replica):
    """(a variable of the chunk-size estimate had the per-replica switch's name: every model off the
    fused MLP path ran one replica at a time, 13x slower for 64 MLPs, whatever history.engine said)"""
    x, y = _data()

    def build():
        first = (nn.Sequential(nn.Unflatten(1, (1, 2, 3)), nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(4, 5)) if conv
                 else nn.Linear(SIZES[0], 5))
        return nn.Sequential(first, _Counting(), nn.Tanh(), nn.Linear(5, 3)).double()

    _Counting.calls = 0
    _, hist = train_population(build, x, y, seeds=[0, 1, 2], batch_size=8, epochs=1, fused=fused, threads=1,
                               progress=False)
    assert hist.engine.startswith("per-replica autograd" if per_replica else "vmap")
    assert _Counting.calls == 2 + 3 * (3 if per_replica else 1)  # the training-step probe, the targets' check, 3 steps


@pytest.mark.parametrize("build", [builder, bn_cnn])
def test_frozen_parameters_stay_as_they_are(build):
    """requires_grad=False: not updated, by momentum or weight decay either, as torch.optim (every
    engine trained them)."""
    x, y = _data()

    def frozen():
        m = build()
        first = next(mod for mod in m.modules() if isinstance(mod, nn.Linear | nn.Conv2d))
        first.weight.requires_grad_(False)
        return m

    for opt in ("sgd", "adamw"):
        models, _ = train_population(frozen, x, y, seeds=[0, 1], optimizer=opt, lr=0.05, weight_decay=0.1,
                                     batch_size=8, epochs=2, progress=False)
        ref = reference_loop(x, y, [0, 1], optimizer=opt, lrs=[0.05, 0.05], epochs=2, batch_size=8, weight_decay=0.1,
                             build=frozen)
        # (Adam scales the rounding noise in the gradient of a conv bias before a BatchNorm, whose true value is
        # 0, up to steps of lr)
        _assert_same(models, ref, atol=1e-10 if opt == "sgd" else 1e-8)
        init = init_replicas(frozen, [0, 1])
        w = [next(mod for mod in m.modules() if isinstance(mod, nn.Linear | nn.Conv2d)).weight for m in (models[0], init[0])]
        assert torch.equal(w[0], w[1])
