"""torch loss modules as callables, found mishandled by the hunt of round 282: the class-weighted and
ignore_index means of CrossEntropyLoss / NLLLoss (batching-dependent Hessians, a NaN loss left
``ok``, the class weights dropped from the empirical Fisher, a memory budget changing the result),
a module's own ``reduction`` ignored, half-precision models rounding their floating targets, and
raw torch errors for a loss class or out-of-range labels. References are dense float64 Hessians
of torch's own loss on all the data in one batch."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastcurv
from fastcurv.curvature import EmpiricalFisherOperator, GGNOperator
from fastcurv.data import Batches
from fastcurv.losses import Loss

pytestmark = pytest.mark.usefixtures("one_thread")

N = 13
WEIGHT = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
IGNORED = [1, 6, 7, 12]


def _mlp(seed=1, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _data(ignored=()):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    y[list(ignored)] = -100
    return x, y


def _batched(x, y, sizes):
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return [(x[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:])]


def _flat(model):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def call(t, x):
        parts = dict(zip(names, (c.view(s) for c, s in zip(t.split([s.numel() for s in shapes]), shapes))))
        return functional_call(model, parts, (x,))

    return theta, call


def _torch_hessian(model, lossfn, x, y):
    theta, call = _flat(model)
    return torch.autograd.functional.hessian(lambda t: lossfn(call(t, x), y), theta)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --- 1: class-weighted and ignore_index means ----------------------------------------------------
CLASS_LOSSES = {
    "CrossEntropyLoss(weight)": (lambda: nn.CrossEntropyLoss(weight=WEIGHT), ()),
    "CrossEntropyLoss(), ignored labels": (lambda: nn.CrossEntropyLoss(), IGNORED),
    "CrossEntropyLoss(weight, label_smoothing), ignored": (
        lambda: nn.CrossEntropyLoss(weight=WEIGHT, label_smoothing=0.1), IGNORED),
    "F.cross_entropy, ignored labels": (lambda: F.cross_entropy, IGNORED),
    "partial(F.cross_entropy, weight)": (lambda: functools.partial(F.cross_entropy, weight=WEIGHT), IGNORED),
}


@pytest.mark.parametrize("sizes", [[5, 5, 3], [1] * N], ids=["5-5-3", "ones"])
@pytest.mark.parametrize("case", list(CLASS_LOSSES))
def test_class_weighted_means_give_torchs_whole_data_hessian_for_any_batching(case, sizes):
    """torch's CrossEntropyLoss mean divides by the class weights of the labels not ignored, sum_i
    w[y_i], not by the batch size; fastcurv multiplied each batch's value by its size, so the
    Hessian depended on the batching: weight=[1, 2, 3] was 19% off (max entry) with batches 5/5/3
    and 77% with batches of 1, four labels -100 22% (batches of 1: lambda_max 0.51 for 0.74, and a
    NaN loss). Now the Hessian and the loss are torch's on all the data, whatever the batching."""
    make, ignored = CLASS_LOSSES[case]
    model, (x, y) = _mlp(), _data(ignored)
    want = _torch_hessian(model, make(), x, y)
    op = fastcurv.HessianOperator([model], _batched(x, y, sizes), loss=make())
    assert _rel(op.dense(0), want) < 1e-10
    torch.testing.assert_close(op.loss_and_gradient()[0][0], make()(model(x), y).detach())


def test_nll_loss_module_with_weight_and_ignore_index():
    """nn.NLLLoss(weight, ignore_index=2) as a module applied to log-probabilities (a model that ends
    in LogSoftmax): the same class-weighted mean, exact on ragged batches."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.LogSoftmax(-1)).double()
    x, y = _data()
    lossfn = nn.NLLLoss(weight=WEIGHT, ignore_index=2)
    want = _torch_hessian(model, lossfn, x, y)
    op = fastcurv.HessianOperator([model], _batched(x, y, [5, 5, 3]), loss=lossfn)
    assert _rel(op.dense(0), want) < 1e-10


def test_a_batch_whose_labels_are_all_ignored_adds_nothing():
    """torch's mean over a batch whose labels are all -100 is NaN (0/0): fastcurv's loss was NaN while
    batched_sharpness returned lambda_max 0.5454 (torch's whole-data loss: 0.7090) with ok=True and
    no flag. The batch now adds 0 to the summed loss, and the results are torch's."""
    model, (x, y) = _mlp(), _data()
    y[10:] = -100
    lossfn = nn.CrossEntropyLoss()
    want = torch.linalg.eigvalsh(_torch_hessian(model, lossfn, x, y))[-1]
    data = _batched(x, y, [5, 5, 3])
    res = fastcurv.batched_sharpness([model], data, loss=lossfn, measures=("lambda_max",), tol=1e-10, progress=False)
    assert res.ok.tolist() == [True]
    assert abs(res.values["lambda_max"][0].item() - want.item()) < 1e-8
    loss = fastcurv.HessianOperator([model], data, loss=lossfn).loss_and_gradient()[0][0]
    torch.testing.assert_close(loss, lossfn(model(x), y).detach())


@pytest.mark.parametrize("weight", [None, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)], ids=["none", "zero"])
def test_a_data_set_with_no_weighted_label_is_refused(weight):
    """Every label ignored (or of class weight 0): torch's mean is NaN; a clear ValueError now."""
    model, (x, y) = _mlp(), _data()
    if weight is None:
        y[:] = -100
    else:
        y[y == 2] = 0
    with pytest.raises(ValueError, match="sum to 0 over the whole data set"):
        fastcurv.HessianOperator([model], (x, y), loss=nn.CrossEntropyLoss(weight=weight))


def _per_sample_grads(model, x, y):
    """``[N, P]`` gradients of torch's unweighted per-sample cross-entropy (0 for an ignored label)."""
    theta, call = _flat(model)
    rows = []
    for i in range(len(y)):
        g = torch.autograd.functional.jacobian(
            lambda t: F.cross_entropy(call(t, x[i:i + 1]), y[i:i + 1], reduction="sum"), theta)
        rows.append(g)
    return torch.stack(rows)


@pytest.mark.parametrize("case", ["weight", "ignore_index"])
def test_empirical_fisher_weighs_samples_by_their_class_weight(case):
    """The empirical Fisher evaluated a callable on each sample alone, where torch's weighted mean is
    w_y l / w_y = l: the class weights vanished (21% off the weighted-loss Fisher), and an ignored
    sample's 0/0 spoiled it (31% off). For L = (1/W) sum_i w[y_i] l_i it is now
    (1/W) sum_i w[y_i] grad l_i grad l_i^T (ignored samples: weight 0)."""
    model, (x, y) = _mlp(), _data(IGNORED if case == "ignore_index" else ())
    lossfn = nn.CrossEntropyLoss(weight=WEIGHT if case == "weight" else None)
    w = (WEIGHT[y.clamp(min=0)] if case == "weight" else torch.ones(N, dtype=torch.float64)) * (y != -100)
    g = _per_sample_grads(model, x, y)
    want = (g.T * w) @ g / w.sum()
    got = EmpiricalFisherOperator([model], _batched(x, y, [5, 5, 3]), loss=lossfn).dense(0)
    assert _rel(got, want) < 1e-10
    summed = EmpiricalFisherOperator([model], (x, y), loss=lossfn, reduction="sum").dense(0)
    assert _rel(summed, (g.T * w) @ g) < 1e-10


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_empirical_fisher_of_a_module_with_its_own_sum_weighs_samples_by_class(reduction):
    """CrossEntropyLoss(weight=w, reduction="sum") fell to the generic callable path: its value on
    one sample, w[y_i] l_i, was taken as the sample's loss, so the empirical Fisher summed
    w[y_i]^2 grad l_i grad l_i^T (1.44 relative off the mean module's for the same summed loss;
    the Hessians agreed). The class weights now act as sample weights for a module's own sum too:
    c_i = w[y_i] (reduction="sum") or w[y_i] / N ("mean": the callable's sums averaged over N)."""
    model, (x, y) = _mlp(), _data(IGNORED)
    lossfn = nn.CrossEntropyLoss(weight=WEIGHT, reduction="sum")
    w = WEIGHT[y.clamp(min=0)] * (y != -100)
    g = _per_sample_grads(model, x, y)
    want = (g.T * w) @ g / (N if reduction == "mean" else 1)
    got = EmpiricalFisherOperator([model], _batched(x, y, [5, 5, 3]), loss=lossfn, reduction=reduction).dense(0)
    assert _rel(got, want) < 1e-10


def test_ggn_with_ignored_labels_is_torchs():
    """The GGN with ignore_index labels was 4% off J^T H_z J of torch's whole-data loss."""
    model, (x, y) = _mlp(), _data(IGNORED)
    lossfn = nn.CrossEntropyLoss()
    theta, call = _flat(model)
    J = torch.autograd.functional.jacobian(lambda t: call(t, x).reshape(-1), theta)  # [N C, P]
    z = model(x).detach()
    Hz = torch.autograd.functional.hessian(lambda v: lossfn(v.view_as(z), y), z.reshape(-1))
    got = GGNOperator([model], _batched(x, y, [5, 5, 3]), loss=lossfn).dense(0)
    assert _rel(got, J.T @ Hz @ J) < 1e-10


@pytest.mark.parametrize("lossfn", [nn.CrossEntropyLoss(), F.cross_entropy, nn.CrossEntropyLoss(weight=WEIGHT)],
                         ids=["module", "F.cross_entropy", "weight"])
def test_distributed_data_sums_the_class_weight_total_over_the_ranks(monkeypatch, lossfn):
    """distributed_data=True sums N over the ranks; W, the mean's class weights of the labels, was
    this rank's only, and the operator refused every CrossEntropyLoss() and F.cross_entropy (a
    ValueError, plain losses of no weight or ignored label included). W is now summed over the
    ranks next to N: two ranks holding the same data (the rank-sum doubling what it is given)
    give torch's loss and Hessian on that data, with W twice one rank's."""
    from fastcurv.operator import HessianOperator

    monkeypatch.setattr(HessianOperator, "_sum_over_ranks", lambda self, t: 2 * t)
    model, (x, y) = _mlp(), _data(IGNORED)
    op = fastcurv.HessianOperator([model], _batched(x, y, [5, 5, 3]), loss=lossfn)
    w = (WEIGHT[y.clamp(min=0)] if isinstance(lossfn, nn.CrossEntropyLoss) and lossfn.weight is not None
         else torch.ones(N, dtype=torch.float64)) * (y != -100)
    assert op.loss.class_weight_total == pytest.approx(2 * w.sum().item(), rel=1e-14)
    assert op.loss.num_samples == 2 * N
    torch.testing.assert_close(op.loss_and_gradient()[0][0], lossfn(model(x), y).detach())
    assert _rel(op.dense(0), _torch_hessian(model, lossfn, x, y)) < 1e-10


def test_distributed_data_refuses_a_class_weight_total_of_zero_over_the_ranks(monkeypatch):
    """The check that W is above 0 runs on the sum over the ranks (a rank may hold only ignored
    labels): every label ignored on every rank is still refused."""
    from fastcurv.operator import HessianOperator

    monkeypatch.setattr(HessianOperator, "_sum_over_ranks", lambda self, t: 2 * t)
    model, (x, y) = _mlp(), _data()
    y[:] = -100
    with pytest.raises(ValueError, match="sum to 0 over the whole data set"):
        fastcurv.HessianOperator([model], (x, y), loss=nn.CrossEntropyLoss())


# --- 2: a memory budget that splits the batches ----------------------------------------------------
def test_memory_budget_split_gives_the_same_numbers_for_ignored_labels():
    """memory_budget= cut the batches (SplitBatches) and changed such a loss: lambda_max +8% with no
    flag. With W counted over all the data, the pieces' shares sum to the same loss."""
    from fastcurv.memory_job import plan_memory

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (300,), generator=g)
    y[140:290] = -100  # one piece of the split (150:225) is all ignored

    def mlp(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()

    models, lossfn = [mlp(1), mlp(2)], nn.CrossEntropyLoss()
    kw = dict(loss=lossfn, measures=("lambda_max",), tol=1e-10, progress=False)
    assert plan_memory(models, (x, y), "300KB", measures=("lambda_max",), loss=lossfn).batch_size == 75
    whole = fastcurv.batched_sharpness(models, (x, y), **kw)
    split = fastcurv.batched_sharpness(models, (x, y), memory_budget="300KB", **kw)
    torch.testing.assert_close(split.values["lambda_max"], whole.values["lambda_max"], rtol=1e-9, atol=0)
    want = torch.linalg.eigvalsh(_torch_hessian(models[0], lossfn, x, y))[-1]
    assert abs(whole.values["lambda_max"][0].item() - want.item()) < 1e-8


# --- 3: half-precision models keep their floating targets ---------------------------------------
def test_half_precision_models_keep_float32_targets():
    """Batches rounded floating targets to the model's dtype: a bfloat16 regression model's float32
    targets near 10 were rounded to 1/16, and the float32 perturbation measures ran on the rounded
    targets (epsilon_sharpness 0.02799 against its exact float32 copy's 0.02318, +21%). They are now
    kept in float32, so the measures equal the float32 copy's (here 0.0221, where the bfloat16 model
    gave 0.0248)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g).bfloat16().float()  # exactly representable in bfloat16

    def mlp(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        with torch.no_grad():
            m[2].bias += 10.0
            for p in m.parameters():
                p.copy_(p.bfloat16().float())
        return m

    models32 = [mlp(1), mlp(2)]
    models16 = [mlp(1).bfloat16(), mlp(2).bfloat16()]
    with torch.no_grad():
        y = models32[0](x) + 0.01 * torch.randn(32, 1, generator=g)
    (_, _, kept), = list(Batches((x, y), device="cpu", dtype=torch.bfloat16))
    assert kept.dtype == torch.float32 and torch.equal(kept, y)
    kw = dict(loss="mse", measures=("epsilon_sharpness",), seed=0, progress=False,
              measure_options={"epsilon_sharpness": {"n_iter": 3}})
    want = fastcurv.batched_sharpness(models32, (x, y), **kw).values["epsilon_sharpness"]
    got = fastcurv.batched_sharpness(models16, (x, y), **kw).values["epsilon_sharpness"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_half_precision_hessian_runs_with_float32_targets():
    """The Hessian backends take a bfloat16 model's float32 targets (torch's dtype promotion), for
    MSE and soft cross-entropy targets alike."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=g)
    model = _mlp(dtype=torch.bfloat16)
    soft = torch.softmax(torch.randn(12, 3, generator=g), -1)
    for loss, y in (("mse", torch.randn(12, 3, generator=g)), ("cross_entropy", soft)):
        for backend in ("func", "autograd"):
            op = fastcurv.HessianOperator([model], (x, y), loss=loss, backend=backend)
            assert next(iter(op.batches))[2].dtype == torch.float32
            assert torch.isfinite(op.matvec(torch.ones(1, op.P, dtype=torch.bfloat16))).all()


# --- 4: a loss module's own reduction --------------------------------------------------------------
def test_a_loss_modules_own_sum_reduction_is_honoured():
    """nn.CrossEntropyLoss(reduction="sum") was taken as a mean and multiplied by the batch size:
    lambda_max 8.64 for the mean loss's 0.593 (14.6x) on batches of 16/16/8, no warning. Its
    reduction is now read from the module: its batch sums, averaged over the data, are the mean
    loss (named "cross_entropy"), with the operator's default loss_reduction (None) too."""
    model = _mlp()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    data = _batched(x, y, [16, 16, 8])
    want = fastcurv.HessianOperator([model], data).dense(0)
    op = fastcurv.HessianOperator([model], data, loss=nn.CrossEntropyLoss(reduction="sum"), loss_reduction=None)
    assert _rel(op.dense(0), want) < 1e-12
    default = fastcurv.HessianOperator([model], data, loss=nn.CrossEntropyLoss(reduction="sum"))
    assert _rel(default.dense(0), want) < 1e-12


def test_loss_reduction_conventions():
    """loss_reduction: None reads a torch module's .reduction ("batchmean" is a mean), "mean" for a
    plain callable; a contradiction, reduction="none", and "sum" with a named loss (silently ignored
    before: the mean Hessian) raise ValueErrors."""
    assert Loss(nn.MSELoss(reduction="sum")).loss_reduction == "sum"
    assert Loss(nn.KLDivLoss(reduction="batchmean")).loss_reduction == "mean"
    assert Loss(lambda z, t: (z - t).square().sum(), loss_reduction="sum").loss_reduction == "sum"
    assert Loss(F.mse_loss).loss_reduction == "mean"
    assert Loss(nn.MSELoss(), loss_reduction="mean").loss_reduction == "mean"
    with pytest.raises(ValueError, match="contradicts the loss module's own reduction"):
        Loss(nn.MSELoss(reduction="sum"), loss_reduction="mean")
    with pytest.raises(ValueError, match="does not reduce its batch to a scalar"):
        Loss(nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(ValueError, match="pass reduction='sum'"):
        Loss("cross_entropy", loss_reduction="sum")
    with pytest.raises(ValueError, match="contradicts"):
        Loss(functools.partial(F.cross_entropy, reduction="sum"), loss_reduction="mean")


# --- 5: clear errors -----------------------------------------------------------------------------
def test_a_loss_class_is_refused():
    """loss=nn.CrossEntropyLoss (the class) built a module from the outputs and targets and failed
    with "Boolean value of Tensor with more than one value is ambiguous", after auto's misleading
    "torch.func could not differentiate this model" warning."""
    x, y = _data()
    with pytest.raises(TypeError, match=r"pass an instance, e.g. loss=CrossEntropyLoss\(\)"):
        fastcurv.batched_sharpness([_mlp()], (x, y), loss=nn.CrossEntropyLoss, measures=("lambda_max",),
                                   progress=False)


@pytest.mark.parametrize("backend", ["auto", "func"])
@pytest.mark.parametrize("make", [nn.CrossEntropyLoss, lambda: functools.partial(F.nll_loss, ignore_index=7)],
                         ids=["CrossEntropyLoss", "partial(nll_loss)"])
def test_out_of_range_labels_of_a_torch_class_loss_are_named(backend, make):
    """A label 5 for 3 classes with nn.CrossEntropyLoss() gave torch's "IndexError: Target 5 is out of
    bounds" (auto: after a torch.func fallback warning) or "index 5 is out of bounds for dimension 2"
    (func). Now the named loss's message, with ignore_index excepted."""
    x, y = _data()
    y[[2, 6]] = torch.tensor([-100 if make is nn.CrossEntropyLoss else 7, 5])
    data = _batched(x, y, [5, 8])
    with pytest.raises(ValueError, match="labels out of range: batch 1 has label 5 but the model has 3 classes"):
        fastcurv.HessianOperator([_mlp()], data, loss=make(), backend=backend)
    y[6] = 0
    fastcurv.HessianOperator([_mlp()], _batched(x, y, [5, 8]), loss=make(), backend=backend)  # ignore_index: fine


def test_class_loss_target_shapes_and_weights_are_checked():
    """Labels that do not fit [N, ...] for outputs [N, C, ...], and a weight of another length than
    the model's classes, raise ValueErrors naming them (torch's errors came from inside a product)."""
    x, y = _data()
    with pytest.raises(ValueError, match=r"expects outputs \[N, C, ...\] and integer labels \[N, ...\]"):
        fastcurv.HessianOperator([_mlp()], (x, y[:, None]), loss=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="weight has 2 entries but the model has 3 classes"):
        fastcurv.HessianOperator([_mlp()], (x, y), loss=nn.CrossEntropyLoss(weight=WEIGHT[:2]))


# --- 6: counting the labels --------------------------------------------------------------------------
def test_more_than_65536_classes_are_counted():
    """Past 65,536 distinct label values Batches stopped counting them and CrossEntropyLoss() was
    refused ("too many to be class labels"), though a language model may have 128k classes. The
    labels are now counted per class by bincount (W: 70000 here; with class weights, their sum),
    and a label out of range is still named with its batch."""
    C = 70000
    x, y = torch.zeros(C, 1), torch.arange(C)
    batches = Batches([(x[:35000], y[:35000]), (x[35000:], y[35000:])], device="cpu", dtype=torch.float32)
    loss = Loss(nn.CrossEntropyLoss())
    loss.check_all_targets(torch.zeros(2, C), batches)
    assert loss.class_weight_total == C
    weight = torch.linspace(0.5, 1.5, C, dtype=torch.float64)
    weighted = Loss(nn.CrossEntropyLoss(weight=weight))
    weighted.check_all_targets(torch.zeros(2, C), batches)
    assert weighted.class_weight_total == pytest.approx(weight.sum().item(), rel=1e-12)
    y2 = y.clone()
    y2[40000] = -1
    bad = Batches([(x[:35000], y2[:35000]), (x[35000:], y2[35000:])], device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="batch 1 has label -1"):
        Loss(nn.CrossEntropyLoss(ignore_index=-1 + C)).check_all_targets(torch.zeros(2, C), bad)


def test_labels_are_counted_only_for_a_loss_that_needs_it(monkeypatch):
    """Every data set's first pass counted its integer targets (torch.unique and .tolist() per batch,
    a device sync per batch), named losses and MSE included: 0.004 s -> 0.42 s for 200 batches of
    [64, 128] labels of 50k values. Reading the data now counts nothing; a class-weighted
    CrossEntropyLoss counts in one pass of bincounts, and a plain CrossEntropyLoss() whose labels
    (range 0..2) cannot hold its ignore_index not at all."""
    calls = {"unique": 0, "bincount": 0}
    for name in calls:
        real = getattr(torch, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(torch, name, counted)
    model, (x, y) = _mlp(), _data()
    data = _batched(x, y, [5, 5, 3])
    fastcurv.HessianOperator([model], data, loss="cross_entropy")
    fastcurv.HessianOperator([model], data, loss=nn.CrossEntropyLoss())
    assert calls == {"unique": 0, "bincount": 0}
    fastcurv.HessianOperator([model], data, loss=nn.CrossEntropyLoss(weight=WEIGHT))
    assert calls == {"unique": 0, "bincount": 3}


def test_torchs_cross_entropy_module_gets_the_named_losses_measure_defaults():
    """adaptive_rho_sharpness normalizes the logits by default with a cross-entropy loss; it read
    only the name, so nn.CrossEntropyLoss() (the same loss, the same lambda_max) got the other
    default and values 2.2-4x lower. The measures that need the named loss say so."""
    x, y = _data()
    models = [_mlp(1), _mlp(2)]
    named = fastcurv.batched_sharpness(models, (x, y), measures=("adaptive_rho_sharpness",), progress=False)
    module = fastcurv.batched_sharpness(models, (x, y), loss=nn.CrossEntropyLoss(), measures=("adaptive_rho_sharpness",),
                                        progress=False)
    assert torch.allclose(module["adaptive_rho_sharpness"], named["adaptive_rho_sharpness"], rtol=1e-6, atol=0)
    for measure in ("fisher_rao", "jiang_sharpness"):
        with pytest.raises(ValueError, match="pass loss='cross_entropy'"):
            fastcurv.batched_sharpness(models, (x, y), loss=nn.CrossEntropyLoss(), measures=(measure,), progress=False)


def test_empirical_fisher_of_class_weights_with_label_smoothing_is_refused():
    """torch weighs a sample's label-smoothing term by every class's weight, not by its label's: the
    loss is no sum of w[y_i] times a per-sample loss, and the Fisher built as one was 5-6% off its
    documented formula (samples of a weight-0 label left out although their smoothing term counts)."""
    x, y = _data()
    loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), label_smoothing=0.1)
    op = EmpiricalFisherOperator([_mlp()], (x, y), loss=loss)
    with pytest.raises(ValueError, match="both class weights and label_smoothing"):
        op.matvec(torch.ones(1, op.P, dtype=torch.float64))
    EmpiricalFisherOperator([_mlp()], (x, y), loss=nn.CrossEntropyLoss(label_smoothing=0.1)).matvec(
        torch.ones(1, op.P, dtype=torch.float64))  # (either alone is a per-sample weighted sum)
