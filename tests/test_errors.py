"""Bad input gets a clear error naming the problem; one bad replica never loses the others."""
import io
import math
import warnings

import pytest
import torch
from torch import nn

import fastcurv
from models import mlp, replicas
from fastcurv.train import evaluate_population, train_population


def data(n=12, d=5, c=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randint(0, c, (n,), generator=gen)


def test_empty_model_list():
    with pytest.raises(ValueError, match="models is empty"):
        fastcurv.HessianOperator([], data())


def test_single_module_instead_of_list():
    with pytest.raises(TypeError, match="list of nn.Module"):
        fastcurv.HessianOperator(mlp().double(), data())


def test_architecture_mismatch_names_replica_and_parameter():
    ms = [mlp().double(), mlp().double(), mlp(sizes=(5, 8, 3)).double()]
    with pytest.raises(ValueError, match=r"replica 2 .*'0.weight'.*\(8, 5\)"):
        fastcurv.HessianOperator(ms, data())


def test_module_type_mismatch():
    ms = [mlp(nn.Tanh).double(), mlp(nn.ReLU).double()]
    with pytest.raises(ValueError, match=r"replica 1 .*module '1' is ReLU.*Tanh"):
        fastcurv.HessianOperator(ms, data())


def test_mixed_dtypes():
    with pytest.raises(ValueError, match="dtype"):
        fastcurv.HessianOperator([mlp().double(), mlp().float()], data())


def test_model_without_parameters():
    with pytest.raises(ValueError, match="no parameters"):
        fastcurv.HessianOperator([nn.ReLU()], data())


def test_empty_loader():
    with pytest.raises(ValueError, match="no batches"):
        fastcurv.HessianOperator([mlp().double()], [])
    x, y = data()
    with pytest.raises(ValueError, match="only empty batches"):
        fastcurv.HessianOperator([mlp().double()], [(x[:0], y[:0])] * 2)


@pytest.mark.parametrize("backend", ["fused", "func"])
@pytest.mark.parametrize("memory_budget", [None, "64MB"])
def test_empty_batches_among_others_are_skipped(backend, memory_budget):
    """An off-by-one slice list ends in an empty batch: the fused engine crashed on it (a reshape
    error; a ZeroDivisionError when it came first). Empty batches add nothing: skipped."""
    x, y = data(n=12)
    ms = replicas(mlp, 2)
    want = fastcurv.batched_sharpness(ms, (x, y), measures=("lambda_max", "trace"), backend=backend, seed=0)
    for loader in ([(x[i:i + 4], y[i:i + 4]) for i in range(0, 13, 4)], [(x[:0], y[:0]), (x, y)]):
        got = fastcurv.batched_sharpness(ms, loader, measures=("lambda_max", "trace"), backend=backend, seed=0,
                                         memory_budget=memory_budget)
        assert torch.allclose(got["lambda_max"], want["lambda_max"], rtol=1e-6)
        assert torch.allclose(got["trace"], want["trace"], rtol=1e-6)


def test_wrong_batch_structure_and_shapes():
    x, y = data()
    with pytest.raises(TypeError, match="batch 0"):
        fastcurv.HessianOperator([mlp().double()], [x])
    with pytest.raises(ValueError, match="disagree on the batch size"):
        fastcurv.HessianOperator([mlp().double()], [(x, y[:5])])
    with pytest.raises(ValueError, match="cannot run on the first batch"):
        fastcurv.HessianOperator([mlp().double()], [(torch.randn(12, 7, dtype=torch.float64), y)])


def test_labels_out_of_range():
    x, y = data()
    y[3] = 7
    with pytest.raises(ValueError, match=r"labels out of range.*3 classes"):
        fastcurv.HessianOperator([mlp().double()], (x, y))


@pytest.mark.parametrize("backend", ["fused", "func", "autograd"])
def test_labels_out_of_range_in_a_later_batch(backend):
    x, y = data()
    y[-1], y[1] = 7, -1
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    with pytest.raises(ValueError, match=r"labels out of range: batch 0 has label -1 but the model has 3 classes"):
        fastcurv.HessianOperator([mlp().double()], loader, backend=backend)
    y[1] = 0
    with pytest.raises(ValueError, match=r"labels out of range: batch 1 has label 7 but the model has 3 classes"):
        fastcurv.HessianOperator([mlp().double()], loader, backend=backend)


def test_targets_of_another_kind_in_a_later_batch():
    x, y = data()
    soft = nn.functional.one_hot(y, 3).double()
    with pytest.raises(ValueError, match=r"batch 1's targets are float with per-sample shape \(3,\), batch 0's int"):
        fastcurv.HessianOperator([mlp().double()], [(x[:4], y[:4]), (x[4:], soft[4:])])


def test_nan_in_data():
    x, y = data()
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fastcurv.HessianOperator([mlp().double()], (x, y))


def test_unknown_names():
    with pytest.raises(ValueError, match="backend"):
        fastcurv.HessianOperator([mlp().double()], data(), backend="magic")
    with pytest.raises(ValueError, match="unknown loss"):
        fastcurv.HessianOperator([mlp().double()], data(), loss="hinge")
    with pytest.raises(ValueError, match="unknown measures"):
        fastcurv.batched_sharpness([mlp().double()], data(), measures=("flatness!",), progress=False)
    with pytest.raises(ValueError, match="bn_mode"):
        fastcurv.HessianOperator([mlp().double()], data(), bn_mode="train")


def test_vector_shape_mismatch():
    op = fastcurv.HessianOperator(replicas(mlp, 2), data())
    with pytest.raises(ValueError, match=r"P = \d+"):
        op.matvec(torch.randn(2, op.P + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[2, P\]"):
        op.matvec(torch.randn(3, op.P, dtype=torch.float64))


def test_fused_requested_for_unsupported_model_names_module():
    ms = replicas(lambda: nn.Sequential(nn.Linear(5, 4), nn.Softplus(), nn.Linear(4, 3)), 2)
    with pytest.raises(ValueError, match="Softplus"):
        fastcurv.HessianOperator(ms, data(), backend="fused")
    op = fastcurv.HessianOperator(ms, data())
    assert op.backend_name == "func" and "Softplus" in op.backend_reason


@pytest.mark.parametrize("backend", ["autograd", "func", "fused"])
def test_nan_replica_is_flagged_and_others_unaffected(backend):
    ms = replicas(mlp, 4)
    x, y = data()
    clean = fastcurv.batched_sharpness(ms, (x, y), backend=backend, progress=False)
    with torch.no_grad():
        ms[2][0].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"replicas \[2\]"):
        res = fastcurv.batched_sharpness(ms, (x, y), backend=backend, progress=False)
    assert math.isnan(res["lambda_max"][2]) and math.isnan(res["trace"][2])
    assert not res.ok[2] and "non-finite parameters" in res.flags[2]
    keep = [0, 1, 3]
    torch.testing.assert_close(res["lambda_max"][keep], clean["lambda_max"][keep])
    torch.testing.assert_close(res["trace"][keep], clean["trace"][keep])
    assert res.to_pandas().loc[2, "flags"] == "non-finite parameters"


class ExpScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x * torch.exp(self.log_scale)


def test_replica_whose_products_blow_up_is_flagged():
    ms = replicas(lambda: nn.Sequential(nn.Linear(5, 3), ExpScale()), 3)
    x, y = data()
    with torch.no_grad():
        ms[1][1].log_scale.fill_(800.0)  # a finite parameter whose outputs overflow
    res = fastcurv.batched_sharpness(ms, (x, y), backend="func", progress=False)
    assert not res.ok[1] and math.isnan(res["lambda_max"][1])
    assert res.flags[1] == "non-finite loss"  # (its loss overflows too: the gradient that starts Lanczos sees it first)
    assert res.ok[0] and res.ok[2] and torch.isfinite(res["lambda_max"][[0, 2]]).all()
    res = fastcurv.batched_sharpness(ms, (x, y), backend="func", eig_start="random", progress=False)  # (no loss computed)
    assert not res.ok[1] and math.isnan(res["lambda_max"][1])
    assert "non-finite Hessian products" in res.flags[1]


@pytest.mark.parametrize("kw,words", [
    (dict(eig_solver="power", trace_method="deflated"), "it needs eig_solver='lanczos'"),
    (dict(measure_options={"rho_sharpnes": {"rho": 5.0}}), r"unknown measures \['rho_sharpnes'\]"),
    (dict(max_iter=0), "max_iter must be a positive integer"),
    (dict(tol=-1.0), "tol must be non-negative"),
    (dict(measures=("top_k",), top_k=70), "top_k=70 exceeds the number of parameters P=66"),
])
def test_bad_sharpness_arguments_are_named(kw, words):
    x, y = data()
    with pytest.raises(ValueError, match=words):
        fastcurv.batched_sharpness([mlp().double()], (x, y), progress=False, **kw)


def test_function_measures_bad_labels_and_nan_inputs():
    x, y = data()
    models = [mlp().double(), mlp().double()]
    with pytest.raises(ValueError, match=r"labels out of range: batch 1 has label 1[01] but the models have 3 classes"):
        fastcurv.function_measures(models, [(x[:6], y[:6]), (x[6:], y[6:] + 9)], measures=("gde",))
    x[7, 1] = float("nan")
    with pytest.raises(ValueError, match="batch 0: the inputs contain NaN or Inf"):
        fastcurv.function_measures(models, (x, y), measures=("disagreement",))


@pytest.mark.parametrize("backend", ["fused", "func", "autograd"])
def test_batch_statistics_with_a_one_sample_batch(backend):
    x, y = data()
    ms = replicas(lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)), 2)
    with pytest.raises(ValueError, match="batch 1 has 1 sample: batch-statistics BatchNorm"):
        fastcurv.HessianOperator(ms, [(x[:11], y[:11]), (x[11:], y[11:])], bn_mode="batch", backend=backend)
    fastcurv.HessianOperator(ms, [(x[:11], y[:11]), (x[11:], y[11:])], backend=backend)  # running statistics: fine


def test_audit_refuses_a_before_computed_with_other_settings():
    x, y = data()
    models = replicas(mlp, 2)
    before = fastcurv.batched_sharpness(models, (x, y), measures=("lambda_max",), reduction="sum", progress=False)
    assert before.settings["reduction"] == "sum" and before.settings["seed"] == 0
    with pytest.raises(ValueError, match=r"other settings than the audit's: reduction='sum' \(audit: 'mean'\)"):
        fastcurv.invariance_audit(models, (x, y), measures=("lambda_max",), before=before)
    same = fastcurv.invariance_audit(models, (x, y), measures=("lambda_max",), reduction="sum", before=before)
    assert same.table.loc["lambda_max", "before_mean"] == pytest.approx(float(before["lambda_max"].mean()))


def test_a_single_module_or_a_generator_of_models():
    x, y = data()
    model = mlp().double()
    from fastcurv.train import evaluate_population

    for call in (lambda m: fastcurv.invariance_audit(m, (x, y), measures=("lambda_max",)),
                 lambda m: fastcurv.invariance_audit(m, (x, y), measures=("lambda_max",), transform="fold_batchnorm"),
                 lambda m: evaluate_population(m, x, y),
                 lambda m: fastcurv.batched_sharpness(m, (x, y), replica_chunk=1, progress=False)):
        with pytest.raises(TypeError, match=r"wrap it as \[model\]"):
            call(model)
    res = fastcurv.batched_sharpness((m for m in replicas(mlp, 2)), (x, y), progress=False)
    assert res["lambda_max"].shape == (2,) and res.ok.all()


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return {"logits": self.fc(x)}


@pytest.mark.parametrize("loss", ["cross_entropy", lambda out, y: nn.functional.cross_entropy(out["logits"], y)])
def test_a_model_returning_a_dict_is_named(loss):
    x, y = data()
    with pytest.raises(TypeError, match="the model returns a dict; fastcurv needs one tensor of outputs"):
        fastcurv.HessianOperator(replicas(DictOut, 1), (x, y), loss=loss)


def test_a_model_returning_a_dict_is_named_by_function_measures():
    """function_measures read the dict as logits: a raw AttributeError ('dict' has no 'dim')."""
    x, y = data()
    with pytest.raises(TypeError, match="the model returns a dict; fastcurv needs one tensor of outputs"):
        fastcurv.function_measures(replicas(DictOut, 2), (x, y), measures=("disagreement",))


def test_a_replica_mixing_dtypes_names_the_parameter():
    model = mlp().double()
    model[2].float()
    with pytest.raises(ValueError, match=r"replica 0 mixes parameter dtypes: '2.weight' is torch.float32, '0.weight' torch.float64"):
        fastcurv.HessianOperator([model], data())


def test_batches_with_extra_elements_are_read_as_inputs_and_targets():
    """Loaders that also yield indices: (x, y, idx) batches give the same products as (x, y)."""
    models = replicas(mlp, R=2)
    x, y = data()
    V = torch.randn(2, sum(p.numel() for p in models[0].parameters()), dtype=torch.float64)
    plain = fastcurv.HessianOperator(models, [(x, y)]).matvec(V)
    extra = fastcurv.HessianOperator(models, [(x, y, torch.arange(len(y)))]).matvec(V)
    torch.testing.assert_close(extra, plain)


def test_rescaling_a_model_with_one_weight_layer_is_named():
    """(it failed with "not enough values to unpack")"""
    from fastcurv import reparam

    ms = replicas(lambda: nn.Sequential(nn.Flatten(), nn.Linear(5, 3)), 2)
    for fn in (lambda: reparam.rescale_layers(ms), lambda: reparam.rescale_neurons(ms, torch.ones(3))):
        with pytest.raises(ValueError, match=r"two consecutive weight layers, but the model has 1 \('1'\)"):
            fn()


def test_replicas_whose_layers_are_set_up_otherwise_are_named():
    """Every replica runs through replica 0's modules: a LeakyReLU slope, a conv stride or a
    BatchNorm without running statistics in another replica was silently replica 0's (lambda_max
    0.523 for 0.538 alone; 3.21 for 0.42), or a raw KeyError."""
    x, y = data()
    a, b = mlp(lambda: nn.LeakyReLU(0.01)).double(), mlp(lambda: nn.LeakyReLU(0.5)).double()
    with pytest.raises(ValueError, match=r"replica 1 .*module '1' \(LeakyReLU\) has negative_slope=0.5, replica 0 "
                                         r"has negative_slope=0.01"):
        fastcurv.batched_sharpness([a, b], (x, y), measures=("lambda_max",))
    with pytest.raises(ValueError, match="negative_slope"):
        evaluate_population([a, b], x, y)

    def conv(stride):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 2, 3, stride=stride), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(2, 3))
    xi, yi = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match=r"module '0' \(Conv2d\) has stride=\(2, 2\), replica 0 has stride=\(1, 1\)"):
        fastcurv.function_measures([conv(1), conv(2)], (xi, yi), measures=("disagreement",))

    def bn(track):
        return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=track), nn.Linear(4, 3)).double()
    for ms in ([bn(False), bn(True)], [bn(True), bn(False)]):
        with pytest.raises(ValueError, match="track_running_stats"):
            fastcurv.batched_sharpness(ms, (x, y), measures=("lambda_max",))


def test_settings_that_do_not_change_a_measurement_may_differ():
    """A sweep over dropout rates (or BatchNorm momenta) measures as one population: in eval mode
    neither changes the function; training such a population from one builder is refused."""
    x, y = data()

    def net(p, momentum=0.1):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, momentum=momentum), nn.ReLU(inplace=p > 0.2),
                             nn.Dropout(p), nn.Linear(4, 3)).double()
    ms = [net(0.1), net(0.5, momentum=0.3)]
    got = fastcurv.batched_sharpness(ms, (x, y), measures=("lambda_max",))["lambda_max"]
    alone = fastcurv.batched_sharpness(ms[1:], (x, y), measures=("lambda_max",))["lambda_max"]
    assert torch.allclose(got[1:], alone, rtol=1e-8)
    rates = iter([0.1, 0.5])
    with pytest.raises(ValueError, match=r"module '3' \(Dropout\) has p=0.5, replica 0 has p=0.1"):
        train_population(lambda: net(next(rates)), x, y, replicas=2, epochs=1)


@pytest.mark.parametrize("name, options, accepts", [
    ("mw_sharpness", {"num_samples": 5}, "n_samples"),
    ("rho_sharpness", {"radius": 0.1}, "rho"),
    ("pac_bayes", {"sigma": 0.1}, "sigma_max"),
    ("lambda_max", {"tol": 0.1}, "none"),
])
def test_a_misspelt_measure_option_is_refused_before_any_measure_runs(name, options, accepts):
    """It was a TypeError from the measure itself, after every measure before it had run (their
    results lost); options of the built-in Hessian measures were ignored."""
    with pytest.raises(TypeError, match=rf"measure_options\['{name}'\] has unknown options \[.{list(options)[0]}.\]; "
                                         rf"{name} accepts .*{accepts}"):
        fastcurv.batched_sharpness(replicas(mlp, 2), data(), measures=("lambda_max", "trace", name),
                                   measure_options={name: options})


@pytest.mark.parametrize("backend", ["fused", "func"])
def test_vectors_that_require_grad_nan_rows_and_bad_idx(backend):
    """Probe vectors that require grad (H theta with theta the parameters) crashed the fused engine
    with an autograd error; a NaN in one replica's probe marked that healthy replica failed for the
    operator's life (later products and eigenvalues NaN); idx out of range was a raw IndexError."""
    x, y = data()
    ms = replicas(mlp, 2)
    op = fastcurv.HessianOperator(ms, (x, y), backend=backend)
    theta = torch.stack([torch.cat([p.flatten() for p in m.parameters()]) for m in ms])
    assert theta.requires_grad
    want = op.matvec(theta.detach())
    assert torch.allclose(op.matvec(theta), want, rtol=1e-10)
    bad = theta.detach().clone()
    bad[0, 3] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"the vectors of replicas \[0\] contain NaN or Inf"):
        got = op.matvec(bad)
    assert torch.isnan(got[0]).all() and torch.allclose(got[1], want[1], rtol=1e-10)
    assert not op.failed.any()
    assert torch.allclose(op.matvec(theta.detach()), want, rtol=1e-10)
    for idx in (torch.tensor([2]), torch.tensor([-1])):
        with pytest.raises(ValueError, match=r"idx names replicas \[-?\d\], but there are 2"):
            op.matvec(want[:1], idx=idx)
    with pytest.raises(TypeError, match="integer replica indices"):
        op.matvec(want[:1], idx=torch.tensor([0.0]))


def test_lanczos_start_vectors_that_cannot_be_normalized():
    """A zero v0 row (the loss gradient of a replica whose ReLUs all died) gave that replica
    lambda_max NaN; a v0 of the wrong shape was a raw expand error."""
    x, y = data()
    op = fastcurv.HessianOperator(replicas(mlp, 2), (x, y))
    want = fastcurv.lanczos(op, k=1, seed=0).eigenvalues[:, 0]
    v0 = torch.randn(2, op.P, dtype=torch.float64)
    v0[0] = 0
    with pytest.warns(RuntimeWarning, match=r"v0 is zero or not finite for replicas \[0\]"):
        got = fastcurv.lanczos(op, k=1, v0=v0, seed=0).eigenvalues[:, 0]
    assert torch.allclose(got, want, rtol=1e-6) and not op.failed.any()
    with pytest.raises(ValueError, match=r"v0 must be a tensor \[R, P\] = \[2, "):
        fastcurv.lanczos(op, k=1, v0=torch.randn(3, op.P, dtype=torch.float64))


def test_func_forward_mode_with_batch_statistics_is_refused():
    """torch.func.linearize's second derivatives through batch-statistics BatchNorm are wrong: the
    products were 37% off the dense Hessian (lambda_2 a copy of lambda_1), without a flag."""
    def bn():
        return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    x, y = data()
    with pytest.raises(ValueError, match="mode='forward' gives wrong Hessian products through a BatchNorm"):
        fastcurv.HessianOperator(replicas(bn, 2), (x, y), backend="func", bn_mode="batch",
                                 backend_options={"mode": "forward"})
    op = fastcurv.HessianOperator(replicas(bn, 2), (x, y), backend="func", bn_mode="batch",
                                  backend_options={"compile": True})
    assert op.backend.mode == "graph"


def test_replica_containers():
    """A ReplicaSet was a raw "not iterable" error in batched_sharpness; an nn.ModuleList of replicas
    was refused as a single model with advice ("wrap it as [model]") that failed in turn."""
    x, y = data()
    ms = replicas(mlp, 2)
    want = fastcurv.batched_sharpness(ms, (x, y), measures=("lambda_max",))["lambda_max"]
    assert torch.allclose(fastcurv.batched_sharpness(nn.ModuleList(ms), (x, y), measures=("lambda_max",))["lambda_max"],
                          want)
    with pytest.raises(TypeError, match=r"a ReplicaSet is taken by HessianOperator \(and GGNOperator, "
                                        r"EmpiricalFisherOperator\), function_measures and collect_predictions only"):
        fastcurv.batched_sharpness(fastcurv.ReplicaSet(ms), (x, y), measures=("lambda_max",))


def test_backend_options_of_another_backend_name_the_chosen_one():
    """Options of the backend "auto" did not pick (HessianOperator's own example {"reuse": False} on
    an MLP, which auto gives the fused engine) were a raw constructor TypeError."""
    x, y = data()
    with pytest.raises(TypeError, match=r"backend_options \['reuse'\] are not options of the 'fused' backend \(auto"):
        fastcurv.HessianOperator(replicas(mlp, 2), (x, y), backend_options={"reuse": False})
    with pytest.raises(TypeError, match=r"\['cache_bytes'\] are not options of the 'func' backend \(requested\); "
                                        r"it takes \['reuse'"):
        fastcurv.HessianOperator(replicas(mlp, 2), (x, y), backend="func", backend_options={"cache_bytes": 0})


def test_plausible_inputs_that_were_raw_errors():
    """bool labels (a binary task) were a raw gather() dtype error; a Dataset's single samples, numpy
    arrays, max_iter=2.5, slq_draws=0 and a target-shape mismatch were named unclearly (the shapes
    of the first 8 rows the check ran, not the batch's)."""
    x, y = data(n=20)
    two = replicas(lambda: mlp(sizes=(5, 4, 2)), 2)
    yb = y % 2
    want = fastcurv.batched_sharpness(two, (x, yb), measures=("lambda_max",))["lambda_max"]
    got = fastcurv.batched_sharpness(two, (x, yb.bool()), measures=("lambda_max",))["lambda_max"]
    assert torch.equal(got, want)
    ms = replicas(mlp, 2)
    with pytest.raises(ValueError, match=r"the data yields single samples \(a Dataset\?\)"):
        fastcurv.batched_sharpness(ms, torch.utils.data.TensorDataset(x, y))
    with pytest.raises(TypeError, match="torch.as_tensor"):
        fastcurv.batched_sharpness(ms, (x.numpy(), y.numpy()))
    with pytest.raises(TypeError, match="torch.as_tensor"):
        fastcurv.batched_sharpness(ms, [(x.numpy(), y.numpy())])
    for kw in ({"max_iter": 2.5}, {"slq_draws": 0}, {"slq_steps": 0}):
        with pytest.raises(ValueError, match=f"{list(kw)[0]} must be a positive integer"):
            fastcurv.batched_sharpness(ms, (x, y), measures=("lambda_max", "spectrum"), **kw)
    op = fastcurv.HessianOperator(ms, (x, y))
    with pytest.raises(ValueError, match="slq: num_draws must be a positive integer"):
        fastcurv.slq(op, num_draws=0)
    with pytest.raises(ValueError, match=r"mse expects targets shaped like the outputs \(20, 3\), got \(20,\)"):
        fastcurv.HessianOperator(ms, (x, y.double()), loss="mse")


def test_a_chunk_of_failed_replicas_in_a_spectrum_job():
    """A chunk holding only failed (NaN) replicas gave SLQ nodes with no column, and merging the
    chunks crashed (a raw 'expanded size' error) where the unchunked job gave NaN and a flag."""
    x, y = data()
    ms = replicas(mlp, 2)
    with torch.no_grad():
        ms[1][0].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning):
        whole = fastcurv.batched_sharpness(ms, (x, y), measures=("lambda_max", "spectrum"))
        chunked = fastcurv.batched_sharpness(ms, (x, y), measures=("lambda_max", "spectrum"), replica_chunk=1)
    for res in (whole, chunked):
        assert torch.isfinite(res["lambda_max"][0]) and torch.isnan(res["lambda_max"][1])
        assert torch.isnan(res.spectrum.nodes[1]).all() and torch.isfinite(res.spectrum.nodes[0]).any()
    torch.testing.assert_close(chunked.spectrum.nodes[0], whole.spectrum.nodes[0])


def test_a_model_whose_outputs_are_not_one_row_per_sample_is_named():
    """The first-batch check compared the targets with a stand-in of one row per target (this
    round's batch-shape message), so a model averaging over the batch ran on silently (lambda_max of
    a meaningless loss) and one returning two rows per sample hit a raw torch error."""
    class BatchMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x).mean(0, keepdim=True)

    x, y = data(n=16)
    with pytest.raises(ValueError, match=r"returns outputs \(1, 3\) for inputs \(8, 5\).*one output row per sample"):
        fastcurv.batched_sharpness(replicas(BatchMean, 2), (x, torch.randn(16, 3, dtype=torch.float64)), loss="mse",
                                   measures=("lambda_max",))


def test_settings_that_torch_modules_do_not_read_may_differ():
    """A tag such as ``m.seed = s`` on an nn.Sequential, or a dropout sweep of attention layers (their
    dropout does nothing in eval mode), was refused by this round's first settings check."""
    x, y = data()
    ms = replicas(mlp, 3)
    for s, m in enumerate(ms):
        m.seed = s
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastcurv.batched_sharpness(ms, (x, y), measures=("lambda_max",))

    class Attn(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.att, self.o = nn.MultiheadAttention(5, 1, dropout=p, batch_first=True), nn.Linear(5, 3)

        def forward(self, x):
            h = x.unsqueeze(1)
            return self.o(self.att(h, h, h, need_weights=False)[0][:, 0])

    models = [Attn(p).double() for p in (0.0, 0.1, 0.3)]
    res = fastcurv.function_measures(models, (x, y), measures=("disagreement",))
    assert torch.isfinite(res["disagreement"]).all()


class Scaled(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale, self.lin = scale, nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(x) * self.scale


def test_a_custom_attribute_that_differs_is_warned_about_once():
    """fastcurv cannot know whether forward() reads a custom module's attribute: one warning names
    the replicas that differ."""
    x, y = data()
    with pytest.warns(RuntimeWarning) as caught:
        fastcurv.HessianOperator([Scaled(1.0).double(), Scaled(2.0).double(), Scaled(3.0).double()], (x, y))
    said = [str(w.message) for w in caught if "attribute 'scale'" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("replicas [1, 2] differ from replica 0")
    assert "module '(model)' (Scaled) has scale=2.0, replica 0 has scale=1.0" in said[0]


@pytest.mark.parametrize("backend", ["fused", "func", "autograd"])
def test_a_nan_probe_entry_a_dead_unit_drops_is_still_reported(backend):
    """A dead ReLU's derivative drops a NaN in its incoming weights' probe entries: with the NaN
    check run only on rows whose products came out non-finite (this round's first form), func and
    autograd returned a finite product without a word."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        m[0].bias[2] = -100.0  # hidden unit 2 dead on every sample
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    op = fastcurv.HessianOperator([m], (x, y), backend=backend)
    V = torch.randn(1, op.P, dtype=torch.float64)
    V[0, 8:12] = float("nan")  # unit 2's incoming weights
    with pytest.warns(RuntimeWarning, match=r"the vectors of replicas \[0\] contain NaN or Inf"):
        assert torch.isnan(op.matvec(V)).all()
    assert not op.failed.any()


def test_torch_modules_set_up_otherwise_beyond_their_constructor_names():
    """RNNs take *args (mode and batch_first are no constructor names), a Transformer layer keeps its
    activation as a function: comparing constructor names only (this round's first form) let a
    relu RNN or a gelu layer run through replica 0's tanh / relu (lambda_max 1.484 for 1.149)."""
    torch.manual_seed(0)
    x, y = data()
    with pytest.raises(ValueError, match="mode='RNN_RELU', replica 0 has mode='RNN_TANH'"):
        fastcurv.HessianOperator([nn.RNN(5, 3, nonlinearity=n).double() for n in ("tanh", "relu")], (x, y),
                                 loss=lambda out, t: out[0].square().mean())
    layers = [nn.TransformerEncoderLayer(4, 1, 8, dropout=0.0, activation=a) for a in ("relu", "gelu")]
    with pytest.raises(ValueError, match="activation"):
        fastcurv.replicas.validate_models(layers)


def test_function_measures_refuses_one_output_models():
    """Regressors (one output) got constants without a word: the argmax and softmax of one output are
    constant, so three regressors whose outputs differ by 1.7 on average had disagreement, JS/TV and
    gde_estimate 0, every weakness 0 and perturbation weakness 1. Now a ValueError says why."""
    torch.manual_seed(0)
    ms = replicas(lambda: mlp(sizes=(5, 7, 1)), 3)
    x, _ = data()
    for measures in ("disagreement", ("soft", "weakness"), "perturbation_weakness"):
        with pytest.raises(ValueError, match=r"output 1 value per example \(a regressor\?\).*need K >= 2 outputs"):
            fastcurv.function_measures(ms, x, measures=measures, probe_size=8)
    with pytest.raises(ValueError, match="a regressor"):
        fastcurv.function.collect_predictions(ms, x)
    fastcurv.function_measures(replicas(lambda: mlp(sizes=(5, 7, 2)), 2), x, measures="disagreement")  # K = 2 runs


def _sgd_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_an_operator_refuses_to_run_once_its_models_changed():
    """HessianOperator kept the weights it was built with: after SGD steps on the models, Lanczos on
    the kept operator still gave the first lambda_max ([0.80, 0.53, 0.70] where the trained models had
    [1.12, 0.71, 0.79] in the hunt's example), silently. Now its products, loss and gradient raise a
    RuntimeError naming the changed tensor (and "auto" does not take it for a torch.func failure)."""
    x, y = data()
    ms = replicas(lambda: mlp(nn.Softplus), 2)  # (not the fused engine's: "auto" takes func)
    ops = [fastcurv.HessianOperator(ms, (x, y), backend=b) for b in ("func", "autograd", "auto")]
    assert ops[2].backend_name == "func"
    ops.append(fastcurv.curvature.GGNOperator.like(ops[0]))
    ops.append(fastcurv.curvature.EmpiricalFisherOperator(ms, (x, y)))
    V = torch.randn(2, ops[0].P, dtype=torch.float64)
    before = ops[0].matvec(V)
    for op in ops:
        op.loss_and_gradient()
    _sgd_step(ms[1], x, y)
    for op in ops:
        with pytest.raises(RuntimeError, match=r"the models changed since this \w+ was built \(parameter '0.weight' "
                                               r"of replica 1 was modified in place"):
            op.matvec(V)
        with pytest.raises(RuntimeError, match="build a new"):
            op.loss_and_gradient()
    assert ops[2].backend_name == "func"  # ("auto" did not take the error for a torch.func failure)
    fresh = fastcurv.HessianOperator(ms, (x, y), backend="func").matvec(V)
    assert torch.allclose(fresh[0], before[0]) and not torch.allclose(fresh[1], before[1], atol=1e-3)


@pytest.mark.parametrize("change", ["double", "load_state_dict", "batchnorm_forward", "replica_set"])
def test_the_changes_an_operator_sees(change):
    """The other ways models change under a kept operator: new tensors (``.double()``), a state dict
    loaded in place, BatchNorm running statistics updated by a training-mode forward (seen through
    ``num_batches_tracked``), and a ReplicaSet whose models changed before an operator or
    function_measures took it. None of them raised before (the old weights' results)."""
    x, y = data()
    ms = [nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)) for _ in range(2)]
    if change != "double":
        ms = [m.double().eval() for m in ms]
    x32 = x.float() if change == "double" else x
    rs = fastcurv.ReplicaSet(ms)
    op = fastcurv.HessianOperator(rs, (x32, y), backend="func")
    if change == "double":
        ms[0].double()
    elif change == "load_state_dict":
        ms[1].load_state_dict(ms[0].state_dict())
    elif change == "batchnorm_forward":
        ms[0].train()(x)
    else:
        _sgd_step(ms[0], x, y)
        with pytest.raises(ValueError, match="the models changed since this ReplicaSet was built"):
            fastcurv.HessianOperator(rs, (x, y))
        with pytest.raises(ValueError, match="the models changed since this ReplicaSet was built"):
            fastcurv.function_measures(rs, x, measures="disagreement")
        buf = io.BytesIO()  # (the weak references it keeps to the models are not pickled)
        torch.save(rs, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False).flat_params(), rs.flat_params())
    with pytest.raises(RuntimeError, match="the models changed since this HessianOperator was built"):
        op.loss_and_gradient()


def test_ggn_and_fisher_refuse_a_backend():
    """GGNOperator / EmpiricalFisherOperator took backend= and backend_options= and dropped them
    unread (their products always come from their own jvp/vjp engine): backend="fused" ran the same
    torch.func products as any other. Now anything but "autograd" (the default) or "auto" is refused."""
    from fastcurv.curvature import EmpiricalFisherOperator, GGNOperator

    x, y = data()
    ms = replicas(mlp, 2)
    for cls in (GGNOperator, EmpiricalFisherOperator):
        for backend in ("fused", "func"):
            with pytest.raises(ValueError, match=rf"{cls.__name__} takes no backend \(got backend='{backend}'\): its "
                                                 "products come from its own torch.func jvp/vjp engine"):
                cls(ms, (x, y), backend=backend)
        with pytest.raises(ValueError, match=r"takes no backend_options \(got \['reuse'\]\)"):
            cls(ms, (x, y), backend_options={"reuse": False})
        V = torch.randn(2, sum(p.numel() for p in ms[0].parameters()), dtype=torch.float64)
        assert torch.equal(cls(ms, (x, y), backend="auto").matvec(V), cls(ms, (x, y)).matvec(V))


def test_models_made_under_inference_mode_are_still_taken():
    """Parameters made under torch.inference_mode have no version counter: watching them for changes
    (the check above) must not refuse such models, which evaluate_population and function_measures take."""
    with torch.inference_mode():
        ms = replicas(mlp, 2)
    x, y = data()
    assert torch.isfinite(evaluate_population(ms, x, y)["loss"]).all()
    assert fastcurv.ReplicaSet(ms).changed_since_built() is None


def test_an_unknown_batched_sharpness_keyword_is_named_with_a_close_spelling():
    """A misspelt keyword (``max_iters``) or one only the solvers take (``probe_batch``) raised
    "HessianOperator.__init__() got an unexpected keyword argument", naming a class the caller never
    called and no spelling it meant."""
    x, y = data()
    with pytest.raises(TypeError, match=r"batched_sharpness\(\) got unexpected keyword arguments \['max_iters'\].*"
                                        r"did you mean 'max_iter'"):
        fastcurv.batched_sharpness([mlp()], (x, y), progress=False, max_iters=3)
    with pytest.raises(TypeError, match=r"\['probe_batch'\]"):
        fastcurv.batched_sharpness([mlp()], (x, y), progress=False, probe_batch=3)


def test_the_sharded_jobs_own_keywords_pass_the_keyword_check():
    """distributed.batched_sharpness takes group, gather and device (NCCL's device=f"cuda:{rank}");
    the check of unknown keywords refused them for a distributed=True job, which ran before."""
    x, y = data()
    ms = [mlp().double() for _ in range(2)]
    res = fastcurv.batched_sharpness(ms, (x, y), progress=False, measures=("lambda_max",), distributed=True,
                                     gather="rank0", device="cpu", group=None)
    assert torch.isfinite(res["lambda_max"]).all()
    with pytest.raises(TypeError, match=r"\['gather'\]"):  # (an unsharded job has no use for it)
        fastcurv.batched_sharpness(ms, (x, y), progress=False, gather="rank0")
