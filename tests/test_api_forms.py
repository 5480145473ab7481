"""The public entry points take the same forms of their arguments (models, data, seeds, counts,
bn_mode) and honour them, or refuse them with a clear error, as their siblings do."""
import ast
import inspect
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fastcurv
import fastcurv.distributed as fd
from fastcurv.curvature import GGNOperator
from fastcurv.function import collect_predictions
from fastcurv.memory import job_shape, plan_memory
from fastcurv.train import evaluate_population
from models import mlp, replicas


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def data(n=24, d=5, c=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randint(0, c, (n,), generator=gen)


def bn_mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def bn_replicas():
    """Two BatchNorm MLPs whose running statistics are far from any batch's (so eval and batch
    statistics give very different products)."""
    ms = replicas(bn_mlp, 2)
    for m in ms:
        m[1].running_mean.fill_(3.0)
        m[1].running_var.fill_(0.1)
    return ms


def test_a_replica_set_keeps_its_bn_mode_and_refuses_another():
    """HessianOperator(ReplicaSet(ms), data, bn_mode="batch") silently computed eval-mode products
    (off by up to 1.7 from the batch-mode ones on this kind of model; GGN/Fisher operators too), and
    bn_mode="bogus" was accepted: the ReplicaSet's own mode won and the argument was dropped unread.
    Now the default (None) takes the ReplicaSet's mode, and another mode or an unknown one is refused."""
    ms, (x, y) = bn_replicas(), data()
    V = torch.randn(2, sum(p.numel() for p in ms[0].parameters()), generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    op = dict(backend="func")  # (the fused engine's first build in a process takes seconds)
    want = fastcurv.HessianOperator(ms, (x, y), bn_mode="batch", **op).matvec(V)
    evals = fastcurv.HessianOperator(ms, (x, y), **op).matvec(V)
    assert (want - evals).abs().max() > 0.1  # (the two modes do differ here)
    for rs_mode, arg in (("batch", None), ("batch", "batch")):
        got = fastcurv.HessianOperator(fastcurv.ReplicaSet(ms, bn_mode=rs_mode), (x, y), bn_mode=arg, **op).matvec(V)
        assert torch.allclose(got, want)
    with pytest.raises(ValueError, match=r"bn_mode='batch', but the ReplicaSet was built with bn_mode='eval'"):
        fastcurv.HessianOperator(fastcurv.ReplicaSet(ms), (x, y), bn_mode="batch")
    with pytest.raises(ValueError, match=r"bn_mode='batch', but the ReplicaSet was built with bn_mode='eval'"):
        GGNOperator(fastcurv.ReplicaSet(ms), (x, y), bn_mode="batch")
    with pytest.raises(ValueError, match=r"bn_mode must be one of \('eval', 'batch'\), got 'bogus'"):
        fastcurv.HessianOperator(fastcurv.ReplicaSet(ms), (x, y), bn_mode="bogus")


def test_function_measures_keeps_a_replica_sets_bn_mode_and_refuses_another():
    """function_measures(ReplicaSet(ms), x, bn_mode="batch") gave the eval-mode agreement counts
    ([[32, 0], [0, 32]] where batch mode gives [[32, 17], [17, 32]] in the hunt's example)."""
    ms, (x, _) = bn_replicas(), data()
    want = fastcurv.function_measures(ms, x, measures="disagreement", bn_mode="batch").pairwise["agree"]
    rs = fastcurv.function_measures(fastcurv.ReplicaSet(ms, bn_mode="batch"), x, measures="disagreement")
    assert torch.equal(rs.pairwise["agree"], want)
    with pytest.raises(ValueError, match="but the ReplicaSet was built with bn_mode='eval'"):
        fastcurv.function_measures(fastcurv.ReplicaSet(ms), x, measures="disagreement", bn_mode="batch")
    with pytest.raises(ValueError, match="bn_mode must be one of"):
        fastcurv.function_measures(fastcurv.ReplicaSet(ms), x, measures="disagreement", bn_mode="bogus")


def test_plan_memory_checks_models_as_batched_sharpness_does():
    """plan_memory(model) planned a single nn.Sequential as its layers (3 "replicas", P of the first
    layer: 250 of 403), and plan_memory([model, "oops"]) was accepted, for jobs batched_sharpness
    refuses."""
    x, y = data(d=4)
    m = nn.Sequential(nn.Linear(4, 50), nn.ReLU(), nn.Linear(50, 3)).double()
    for f in (lambda ms: plan_memory(ms, (x, y), "1GiB"), lambda ms: job_shape(ms, (x, y))):
        with pytest.raises(TypeError, match=r"not a single module; wrap it as \[model\]"):
            f(m)
        with pytest.raises(TypeError, match="replica 1 is a str, not an nn.Module"):
            f([m, "oops"])
    assert plan_memory([m], (x, y), "1GiB", backend="func").shape.P == 403


def test_distributed_batched_sharpness_fills_settings_and_takes_every_form_of_models():
    """fastcurv.distributed.batched_sharpness returned settings == {} (so invariance_audit(before=)
    took every setting as different), refused an nn.ModuleList ("needs a list of nn.Module
    replicas") and said "models is empty" for a generator, which batched_sharpness all takes."""
    ms, (x, y) = replicas(mlp, 2), data()
    job = dict(measures=("lambda_max",), max_iter=12, backend="func", progress=False)
    top = fastcurv.batched_sharpness(ms, (x, y), **job)
    res = fd.batched_sharpness(ms, (x, y), **job)
    assert res.settings == top.settings and res.settings["max_iter"] == 12
    assert torch.equal(res["lambda_max"], top["lambda_max"])
    for form in (nn.ModuleList(ms), (m for m in ms)):
        assert torch.equal(fd.batched_sharpness(form, (x, y), **job)["lambda_max"], top["lambda_max"])
    seeded = fd.batched_sharpness(ms, (x, y), seed=np.int64(3), **job).settings["seed"]
    assert seeded == 3 and type(seeded) is int
    assert fastcurv.batched_sharpness(ms, (x, y), replica_chunk=1, **job).settings == top.settings


@pytest.mark.parametrize("solver, kw", [(fastcurv.lanczos, dict(max_iter=12)), (fastcurv.power_iteration, dict(max_iter=5)),
                                        (fastcurv.hutchinson, dict(num_probes=4)), (fastcurv.hutchpp, dict(num_matvecs=6)),
                                        (fastcurv.slq, dict(num_steps=5))])
def test_solvers_take_numpy_integer_seeds(solver, kw):
    """The public solvers raised a raw "TypeError: an integer is required" for seed=np.int64(2) (a
    seed from a numpy grid), which batched_sharpness and function_measures take."""
    op = fastcurv.HessianOperator(replicas(mlp, 2), data(), backend="func")
    want, got = solver(op, seed=2, **kw), solver(op, seed=np.int64(2), **kw)
    field = "nodes" if solver is fastcurv.slq else ("trace" if hasattr(want, "trace") else "eigenvalues")
    assert torch.equal(getattr(got, field), getattr(want, field))
    with pytest.raises(TypeError, match=r"seed must be an integer, got 2.5"):
        solver(op, seed=2.5, **kw)


def test_evaluate_population_and_collect_predictions_take_the_common_forms():
    """evaluate_population(ms, [x, y]) raised "batch 0 is a Tensor; the loader must yield (inputs,
    targets) pairs" (every other entry point takes [x, y] as one batch), and
    collect_predictions(list of models, x) raised AttributeError: 'list' object has no attribute 'R'."""
    ms, (x, y) = replicas(mlp, 2), data()
    want = evaluate_population(ms, (x, y))
    got = evaluate_population(ms, [x, y])
    assert torch.equal(got["loss"], want["loss"]) and torch.equal(got["accuracy"], want["accuracy"])
    assert torch.equal(collect_predictions(ms, x).labels, collect_predictions(fastcurv.ReplicaSet(ms), x).labels)
    bms = bn_replicas()
    assert torch.equal(collect_predictions(bms, x, bn_mode="batch").labels,
                       collect_predictions(fastcurv.ReplicaSet(bms, bn_mode="batch"), x).labels)


def test_function_measures_takes_whole_float_counts_and_a_replica_set_as_init_models():
    """function_measures(num_draws=8.0) (a JSON or YAML config's count) raised a raw "'float' object
    cannot be interpreted as an integer", which batched_sharpness takes for its counts; and
    init_models=ReplicaSet(...) was refused with "a ReplicaSet is taken by ... function_measures only"."""
    ms, (x, y) = replicas(mlp, 2), data()
    kw = dict(measures=("perturbation_weakness",), probe_size=16, perturb_sigmas=(0.1,))
    want = fastcurv.function_measures(ms, (x, y), num_draws=2, bisect_steps=3, **kw)
    got = fastcurv.function_measures(ms, (x, y), num_draws=2.0, bisect_steps=3.0, **{**kw, "probe_size": 16.0})
    assert all(torch.equal(got[k], want[k]) for k in want.values)
    with pytest.raises(ValueError, match="num_draws must be a positive integer, got 2.5"):
        fastcurv.function_measures(ms, (x, y), num_draws=2.5, **kw)
    init = replicas(mlp, 2, seed=5)
    kw = dict(measures=("simplicity",), pacbayes_sigma=0.1)
    want = fastcurv.function_measures(ms, (x, y), init_models=init, **kw)["pacbayes_mag_kl"]
    got = fastcurv.function_measures(ms, (x, y), init_models=fastcurv.ReplicaSet(init), **kw)["pacbayes_mag_kl"]
    assert torch.equal(got, want)


def test_a_deflated_trace_alone_flags_no_lambda_max():
    """measures=("trace",) with trace_method="deflated" flagged every replica "lambda_max not
    converged" and added lambda_max_iters / lambda_max_converged columns, for a lambda_max that was
    not asked for (the deflated trace is unbiased whether or not its basis run converged)."""
    ms, (x, y) = replicas(mlp, 2), data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fastcurv.batched_sharpness(ms, (x, y), measures=("trace",), trace_method="deflated", max_iter=3,
                                         backend="func", progress=False)
    assert res.trace_method == "deflated" and res.flags == ["", ""]
    assert not res.converged and not res.iterations
    assert not any(c.startswith("lambda_max") for c in res.to_pandas().columns)
    both = fastcurv.batched_sharpness(ms, (x, y), measures=("lambda_max", "trace"), trace_method="deflated",
                                      max_iter=3, backend="func", progress=False)
    assert both.flags == ["lambda_max not converged"] * 2  # (asked for: still flagged)


def test_study_docstring_names_every_returned_key():
    """study() returned an "audit_transform" key its docstring's list of returned keys left out."""
    study = fastcurv.study  # (the function: fastcurv.study the name shadows the module)
    doc = study.__doc__
    listed = doc[doc.index("Returns ``{"):]
    listed = set(ast.literal_eval(listed[listed.index("{"):listed.index("}") + 1]))
    tree = ast.parse(inspect.getsource(study))
    returned = next(set(ast.literal_eval(k) for k in node.value.keys) for node in ast.walk(tree)
                    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "res"
                    and isinstance(node.value, ast.Dict))
    assert listed == returned


def test_a_loss_name_is_one_setting_in_any_spelling():
    """batched_sharpness(loss="MSE").settings recorded "MSE" as it was spelt, so an invariance audit
    with loss="mse" refused that result as its before ("before was computed with other settings than
    the audit's: loss='MSE' (audit: 'mse')"), for the same loss. Now settings hold the canonical name."""
    ms, (x, _) = replicas(lambda: mlp(nn.ReLU), 2), data()  # (ReLU: the audit's rescaling preserves them)
    t = torch.randn(len(x), 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    job = dict(measures=("lambda_max",), max_iter=8, backend="autograd", progress=False)
    before = fastcurv.batched_sharpness(ms, (x, t), loss="MSE", **job)
    assert before.settings == fastcurv.batched_sharpness(ms, (x, t), loss="mse", **job).settings
    assert before.settings["loss"] == "mse"
    ce = fastcurv.batched_sharpness(ms, data(), loss="Cross-Entropy", **job).settings["loss"]
    assert ce == "cross_entropy"
    audit = fastcurv.invariance_audit(ms, (x, t), measures=("lambda_max",), loss="mse", before=before, max_iter=8,
                                      backend="autograd", progress=False)
    assert "lambda_max" in audit.table.index


def test_bn_mode_none_is_the_eval_setting(tmp_path):
    """bn_mode=None means "eval" for a list of models, but a job started with it was another setting:
    its results file did not resume with bn_mode="eval", and an audit's ``before`` differed."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)) for _ in range(2)]
    data = (torch.randn(10, 4), torch.randint(0, 2, (10,)))
    kw = dict(measures=("lambda_max",), progress=False, output=tmp_path / "r.jsonl")
    first = fastcurv.batched_sharpness(models, data, bn_mode=None, **kw)
    again = fastcurv.batched_sharpness(models, data, bn_mode="eval", **kw)
    assert first.settings == again.settings and first.settings["bn_mode"] == "eval"
    torch.testing.assert_close(again["lambda_max"], first["lambda_max"])


def test_every_result_field_is_described_in_its_class_docstring():
    """SharpnessResult's docstring said nothing of backend_reason, num_matvecs (shown in the repr as
    ``matvecs=``, and larger the more chunks a job is split into) or seconds, FunctionMeasuresResult's
    nothing of num_examples or seconds."""
    for cls in (fastcurv.SharpnessResult, fastcurv.FunctionMeasuresResult):
        doc = inspect.getdoc(cls)
        assert [f for f in cls.__dataclass_fields__ if f"{f}:" not in doc] == [], cls.__name__
    doc = " ".join(inspect.getdoc(fastcurv.SharpnessResult).split())
    assert "sums it over its chunks" in doc and "not a cost per replica" in doc


def test_every_argument_of_function_measures_is_documented():
    """probs_dtype (the dtype of the probabilities "soft" keeps) was not in the docstring."""
    doc = inspect.getdoc(fastcurv.function_measures)
    assert [p for p in inspect.signature(fastcurv.function_measures).parameters if p not in doc] == []


def test_the_ggn_and_fisher_operators_document_their_own_matrix():
    """GGNOperator and EmpiricalFisherOperator inherited HessianOperator's method docstrings: dense
    "The full [P, P] Hessian of one replica", matvec "Hessian-vector products", exact_trace "Exact
    Hessian trace", though they compute the GGN / empirical Fisher (whose dense(0) is not the
    Hessian) and exact_trace always raises, saying the fused engine had it."""
    from fastcurv.curvature import EmpiricalFisherOperator

    ms, d = replicas(lambda: mlp(nn.ReLU), 1), data()
    for cls, words in ((GGNOperator, "generalized Gauss-Newton"), (EmpiricalFisherOperator, "empirical Fisher")):
        for method in ("dense", "matvec", "exact_trace"):
            doc = inspect.getdoc(getattr(cls, method))
            assert words.lower() in doc.lower(), (cls.__name__, method)
            assert "Hessian-vector" not in doc and "Exact Hessian" not in doc
        op = cls(ms, d)
        assert op.dense(0).shape == (op.P, op.P) and not op.exact_trace_support()[0]
        with pytest.raises(ValueError, match=f"{cls.__name__} has no exact trace"):
            op.exact_trace()


def test_every_registered_measure_has_a_docstring():
    """ggn_lambda_max, ggn_trace, fisher_lambda_max and fisher_trace had none (their options were
    only in the module docstring)."""
    from fastcurv.measures import load_all

    assert sorted(name for name, fn in load_all().items() if not inspect.getdoc(fn)) == []
