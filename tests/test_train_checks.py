"""Population training's checks of its options and its losses: yes/no options, loss names, a momentum
sweep under Adam, the default replica groups of Adam, the outputs' shape, and the precision of the
full training-set and evaluation losses of confident float32 models."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcurv
from fastcurv.train import evaluate_population, mlp, train_population

pytestmark = pytest.mark.usefixtures("one_thread")

needs_ext = pytest.mark.skipif(not fastcurv.cpu_extension_loaded(), reason="C++ extension not loaded (fastcurv._ext.extension_error() says why)")


def _data(n=16, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _builder():
    return mlp([6, 5, 3], "tanh").double()


KW = dict(seeds=[0, 1], lr=0.1, momentum=0.9, batch_size=8, epochs=1, progress=False)


def _same(a, b) -> bool:
    return all(torch.equal(p, q) for ma, mb in zip(a, b) for p, q in zip(ma.parameters(), mb.parameters()))


def test_nesterov_takes_bool_like_scalars_and_refuses_anything_else():
    """``nesterov`` was never checked. On the vmap path a per-replica list (as lr or momentum take)
    counted as True: ``nesterov=[False, False]`` trained every replica with Nesterov, silently (8e-3
    away from ``nesterov=False`` on MNIST). On the fused path ``np.True_`` (from a numpy grid), ``1``
    or a list reached torch's fused SGD kernel and failed there with its raw TypeError. Now
    ``np.bool_``, 0 and 1 are bools, and anything else is a ValueError before training."""
    x, y = _data()
    for fused in (None, False):  # the fused SGD kernel (one lr/momentum for all) and the vmap path
        plain, _ = train_population(_builder, x, y, nesterov=False, fused=fused, **KW)
        nest, h = train_population(_builder, x, y, nesterov=True, fused=fused, **KW)
        assert h.engine.startswith("fused-mlp" if fused is None else "vmap") and not _same(plain, nest)
        for like, want in ((np.True_, nest), (1, nest), (np.False_, plain), (0, plain)):
            got, _ = train_population(_builder, x, y, nesterov=like, fused=fused, **KW)
            assert _same(got, want), (fused, like)
        for bad in ([False, False], [True, False], 2, "yes", 1.0):
            with pytest.raises(ValueError, match=r"nesterov must be True or False \(one setting for all replicas\)"):
                train_population(_builder, x, y, nesterov=bad, fused=fused, **KW)


def test_the_other_yes_no_options_are_checked_alike():
    """A list for ``shared_data_order`` switched it on (every replica trained on data_seeds[0]'s
    batches, silently), a list for ``fused``, ``eval_train`` or ``sparse_input`` read as True (the
    sparse path forced on dense inputs), and ``progress="no"`` failed with a bare KeyError. Each is
    now a ValueError naming the option, and bool-likes work."""
    x, y = _data()
    for name, bad in (("shared_data_order", [False]), ("fused", [False]), ("eval_train", [False]), ("progress", "no"),
                      ("sparse_input", [False])):
        kw = {**KW, name: bad}
        with pytest.raises(ValueError, match=rf"{name} must be True(, False)? or (False|None) \(one setting"):
            train_population(_builder, x, y, **kw)
    _, h = train_population(_builder, x, y, **{**KW, "shared_data_order": np.True_})
    assert h.engine == "fused-mlp+shared-order"
    _, h = train_population(_builder, x, y, **{**KW, "fused": np.False_})
    assert h.engine == "vmap (fused=False)"


@needs_ext
def test_sparse_input_np_false_means_never():
    """``sparse_input=np.False_`` (not ``False`` by identity) was read as "auto": sparse inputs took the
    CSR path the option was meant to turn off."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64) * (torch.rand(16, 6, generator=g) < 0.2)
    y = torch.randint(0, 3, (16,), generator=g)
    _, auto = train_population(_builder, x, y, **KW)
    _, off = train_population(_builder, x, y, sparse_input=np.False_, **KW)
    assert "+sparse-input" in auto.engine and "+sparse-input" not in off.engine


def test_loss_errors_say_what_training_and_evaluation_accept():
    """The unknown-loss message recommended "a callable(outputs, targets)", which train_population and
    evaluate_population then refused with that same message. They now name only what they take."""
    x, y = _data()
    models, _ = train_population(_builder, x, y, **KW)
    for call in (lambda loss: train_population(_builder, x, y, loss=loss, **KW),
                 lambda loss: evaluate_population(models, x, y, loss=loss)):
        with pytest.raises(ValueError, match=r"^a callable loss is not supported here: use 'cross_entropy' or 'mse'$"):
            call(F.cross_entropy)
        with pytest.raises(ValueError, match=r"^unknown loss 'nll': use 'cross_entropy' or 'mse'$"):
            call("nll")
        assert call("CE") is not None  # the spellings of canonical_name
    with pytest.raises(ValueError, match="or a callable"):  # the operators do take a callable
        fastcurv.HessianOperator(models, (x, y), loss="nll")


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_a_momentum_sweep_under_adam_warns(optimizer):
    """Adam and AdamW do not use ``momentum``, so a per-replica momentum list was a sweep of nothing,
    silently (a study reported it as a "momentum (swept)" column). It now warns once, naming it."""
    x, y = _data()
    kw = {**KW, "optimizer": optimizer, "lr": 0.01}

    def momentum_warnings(**more):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            train_population(_builder, x, y, **{**kw, **more})
        return [str(w.message) for w in seen if "momentum" in str(w.message)]

    assert momentum_warnings(momentum=[0.9, 0.5]) == [
        f"momentum differs across the replicas (0.9, 0.5), but optimizer='{optimizer}' does not use momentum (it uses "
        "betas): the replicas do not differ in it"]
    assert momentum_warnings(momentum=[0.5, 0.5]) == []  # one value: nothing to say
    assert momentum_warnings(momentum=[0.9, 0.5], optimizer="sgd") == []  # SGD uses it


def test_default_replica_groups_of_adam_count_its_two_moment_buffers():
    """The default ``chunk_size`` keeps a group's parameters, gradients and optimizer state within
    about 24 MiB, but counted 3 tensors per parameter for every optimizer: Adam holds 4 (w, g, m, v),
    so its groups were 4/3 of that. Seen through dropout, whose masks are drawn per group: a
    450,750-parameter float64 replica takes 10.8 MB at 3 copies (2 per group) and 14.4 MB at 4
    (1 per group)."""
    def build():
        return nn.Sequential(nn.Linear(600, 750), nn.Dropout(0.5)).double()

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 600, generator=g, dtype=torch.float64), torch.randint(0, 750, (4,), generator=g)
    kw = dict(seeds=[0, 1], optimizer="adam", lr=0.01, batch_size=4, epochs=1, progress=False)
    default, _ = train_population(build, x, y, **kw)
    ones, _ = train_population(build, x, y, chunk_size=1, **kw)
    pair, _ = train_population(build, x, y, chunk_size=2, **kw)
    assert not _same(ones, pair)  # (the grouping shows)
    assert _same(default, ones)


def test_outputs_with_an_extra_axis_are_refused_as_the_operators_refuse_them():
    """Cross-entropy outputs ``[N, 1, C]`` with labels ``[N]``: training reshaped them onto ``[N, C]``
    and trained, evaluation failed with torch's raw shape error (the accuracy's comparison broadcast
    to ``[R, N, N]``), and the operators refused the models. One rule now, the operators'."""
    x, y = _data()

    def build():
        return nn.Sequential(nn.Linear(6, 3), nn.Unflatten(1, (1, 3))).double()

    words = r"cross_entropy expects logits \[N, C\] and integer labels \[N\]"
    with pytest.raises(ValueError, match=words):
        train_population(build, x, y, **KW)
    models = [build() for _ in range(2)]
    with pytest.raises(ValueError, match=words):
        evaluate_population(models, x, y)
    with pytest.raises(ValueError, match=words):
        fastcurv.HessianOperator(models, (x, y))


def _confident():
    """A float32 linear model whose per-sample losses are log1p(exp(-20) + exp(-40)) = 2.06e-9."""
    m = nn.Sequential(nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[20.0, 0.0], [0.0, 20.0], [-20.0, -20.0]]))
    return m


def test_full_training_and_evaluation_losses_keep_the_digits_of_confident_float32_models():
    """evaluate_population and the full training-set loss (history, target_loss) took torch's
    ``F.cross_entropy``, which rounds a confident sample's probability to 1 in float32: a loss of
    2.06e-9 came out as 0 (100% low), so target_loss=1e-9 counted as reached. They now take
    fastcurv.losses' cross-entropy, the operators' (relative error below 1e-6 here)."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 4)
    y = torch.tensor([0, 1] * 4)
    want = float(np.log1p(np.exp(-20.0) + np.exp(-40.0)))
    with torch.no_grad():
        assert float(F.cross_entropy(_confident()(x), y)) < 0.5 * want  # (torch's float32 value)
    ev = evaluate_population([_confident(), _confident()], x, y)
    assert ev["loss"].tolist() == pytest.approx([want] * 2, rel=1e-6)
    assert ev["accuracy"].tolist() == [1.0, 1.0]
    for fused in (None, False):  # the fused MLP forward and the vmap one
        models, h = train_population(_confident, x, y, seeds=[0, 1], lr=0.0, batch_size=4, epochs=1, fused=fused,
                                     target_loss=1e-9, progress=False)
        assert h.train_loss[-1] == pytest.approx([want] * 2, rel=1e-6)
        assert h.reached_target == [False, False]


def test_the_model_builders_live_in_architectures_and_stay_importable_from_train():
    """mlp, cnn and ACTIVATIONS moved to fastcurv.architectures; fastcurv.train re-exports the same objects
    (tests, benchmarks, the study and users import them from there), and the names others import from
    fastcurv.train stay there since its parts moved to fastcurv.train_* modules."""
    import fastcurv.architectures as arch
    import fastcurv.train as train_mod

    assert train_mod.mlp is arch.mlp and train_mod.cnn is arch.cnn and train_mod.ACTIVATIONS is arch.ACTIVATIONS
    for name in ("train_population", "evaluate_population", "init_replicas", "epoch_order", "noisy_labels",
                 "TrainHistory", "OPTIMIZERS", "_dropout_rng", "_GLOBAL_RNG_LOCK", "_batch_sizes", "_label_noise"):
        assert hasattr(train_mod, name), name


def test_evaluate_population_names_inputs_the_model_cannot_take():
    """Inputs of the wrong width, or uint8 token ids for an nn.Embedding, raised torch's raw RuntimeError
    from evaluate_population ("Expected size for first two dimensions of batch2 tensor to be: [2, 7]
    but got: [2, 5]", naming neither the model nor the inputs), where training and the operators give
    "the model cannot run on the first batch (inputs shape, dtype): ..."."""
    y = torch.randint(0, 3, (10,))
    linear = [nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)) for _ in range(2)]
    with pytest.raises(ValueError, match=r"cannot run on the first batch \(inputs \(10, 7\), torch.float32\)"):
        evaluate_population(linear, torch.randn(10, 7), y)
    with pytest.raises(ValueError, match=r"cannot run on the batch starting at sample 4 \(inputs \(6, 7\)"):
        evaluate_population(linear, [(torch.randn(4, 5), y[:4]), (torch.randn(6, 7), y[4:])])
    embedding = [nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)) for _ in range(2)]
    ids = torch.randint(0, 10, (10, 3))
    with pytest.raises(ValueError, match=r"the model cannot run on the first batch \(inputs \(10, 3\), torch.uint8\)"):
        evaluate_population(embedding, ids.to(torch.uint8), y)
    with pytest.raises(ValueError, match=r"cannot run on the first batch .*index out of range"):
        evaluate_population(embedding, ids + 10, y)
    assert evaluate_population(embedding, ids, y)["loss"].isfinite().all()
