"""Integer settings given as whole floats (a JSON or YAML config's ``3.0``): one rule everywhere,
whole floats taken as integers and other values refused with a ValueError naming the argument."""
import pytest
import torch
from torch import nn

import fastcurv
from fastcurv.solvers import hutchinson, hutchpp, lanczos, power_iteration, slq
from models import mlp, replicas


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def job():
    ms = replicas(lambda: mlp(nn.ReLU, (6, 5, 3)), 2)
    g = torch.Generator().manual_seed(100)
    return ms, (torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g))


@pytest.fixture(scope="module")
def op(job):
    return fastcurv.HessianOperator(*job, backend="func")


@pytest.mark.parametrize("kw", [
    dict(measures=("top_k",), top_k=3),
    dict(measures=("trace",), trace_probes=12, backend="func"),  # Hutch++
    dict(measures=("trace",), trace_probes=10, trace_method="hutchinson"),
])
def test_batched_sharpness_counts_as_whole_floats(job, kw):
    """top_k=3.0 and trace_probes=30.0 (Hutch++) crashed deep inside torch ("full(): argument 'size'
    ... got float", naming no argument; also through a study's JSON config), while max_iter=100.0
    was taken. Now they give the integer job's results, and its settings."""
    as_float = {k: float(v) if k in ("top_k", "trace_probes") else v for k, v in kw.items()}
    ref = fastcurv.batched_sharpness(*job, progress=False, **kw)
    got = fastcurv.batched_sharpness(*job, progress=False, **as_float)
    assert got.values.keys() == ref.values.keys()
    for name in ref.values:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0)
    assert got.settings == ref.settings and all(type(v) is not float for k, v in got.settings.items()
                                                 if k in ("top_k", "trace_probes"))


@pytest.mark.parametrize("name, kw", [("top_k", dict(measures=("top_k",), top_k=2.5)),
                                      ("trace_probes", dict(measures=("trace",), trace_probes=7.5, backend="func"))])
def test_batched_sharpness_refuses_other_floats_by_name(job, name, kw):
    """top_k=2.5 gave the same raw torch TypeError."""
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {kw[name]}"):
        fastcurv.batched_sharpness(*job, progress=False, **kw)


@pytest.mark.parametrize("measure, options", [
    ("rho_sharpness", {"n_iter": 2}),
    ("mw_sharpness", {"n_samples": 3}),
    ("ggn_trace", {"num_matvecs": 9}),
    ("ggn_lambda_max", {"max_iter": 12}),
    ("josz_variation", {"n_iter": 2}),
])
def test_integer_measure_options_as_whole_floats(job, measure, options):
    """measure_options counts as whole floats raised "'float' object cannot be interpreted as an
    integer" (rho_sharpness n_iter, mw/avg_rho n_samples, pac_bayes, jiang, josz, epsilon) or the
    randint TypeError (ggn_trace num_matvecs), and ggn_lambda_max refused max_iter=50.0 that
    batched_sharpness's own max_iter takes. Now they are the integer's results."""
    def run(opts):
        return fastcurv.batched_sharpness(*job, measures=(measure,), measure_options={measure: opts}, progress=False)

    ref, got = run(options), run({k: float(v) for k, v in options.items()})
    for name in ref.values:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, equal_nan=True)


def test_a_non_whole_measure_option_is_refused_by_name(job):
    for measure, option in (("rho_sharpness", "n_iter"), ("pac_bayes", "mc_samples"), ("ggn_trace", "num_matvecs")):
        refusal = rf"measure_options\['{measure}'\]\['{option}'\] must be an integer, got 2.5"
        with pytest.raises(ValueError, match=refusal):
            fastcurv.batched_sharpness(*job, measures=(measure,), measure_options={measure: {option: 2.5}},
                                       progress=False)


@pytest.mark.parametrize("solver, count, kw", [
    (lanczos, "k", dict(k=2, max_iter=20)),
    (lanczos, "max_iter", dict(max_iter=20)),
    (power_iteration, "max_iter", dict(max_iter=20)),
    (hutchinson, "num_probes", dict(num_probes=10)),
    (hutchinson, "probe_batch", dict(num_probes=10, probe_batch=5)),
    (hutchpp, "num_matvecs", dict(num_matvecs=30)),
    (slq, "num_steps", dict(num_steps=8)),
    (slq, "num_draws", dict(num_steps=8, num_draws=2)),
])
def test_solver_counts_take_whole_floats_and_name_the_others(op, solver, count, kw):
    """The public solvers disagreed: lanczos(k=2.0) and hutchpp(num_matvecs=30.0) raised raw torch
    TypeErrors, power_iteration(max_iter=20.0) "'float' object cannot be interpreted as an integer",
    while hutchinson took 10.0 and lanczos(max_iter=20.0) refused it."""
    ref = solver(op, **kw)
    got = solver(op, **{**kw, count: float(kw[count])})
    for a, b in zip(vars(ref).values(), vars(got).values()):
        if torch.is_tensor(a):
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match=f"{count} must be a positive integer, got 2.5"):
        solver(op, **{**kw, count: 2.5})


def test_power_iteration_refuses_zero_iterations(op):
    """power_iteration(max_iter=0) returned NaN eigenvalues without an error."""
    with pytest.raises(ValueError, match="max_iter must be a positive integer, got 0"):
        power_iteration(op, max_iter=0)


@pytest.fixture
def user_measure():
    """A measure registered as a user would (annotations as objects: this module has no ``from
    __future__ import annotations``), recording the options it receives; unregistered after."""
    from typing import Optional

    from fastcurv.measures import OPTIONS, REGISTRY, REPLICA_NOISE, MeasureValue, register_measure

    seen = {}

    @register_measure("test_user_options", replica_noise=False)
    def measure(op, *, seed, common, scale: float = 1, count: int = 2, maybe: Optional[int] = None, plain=3,
                ratio=1.0, flag: bool = False):
        seen.update(scale=scale, count=count, maybe=maybe, plain=plain, ratio=ratio, flag=flag)
        return {"test_user_options": MeasureValue(torch.full((op.R,), float(scale), dtype=torch.float64))}

    yield seen
    for table in (REGISTRY, REPLICA_NOISE, OPTIONS):
        table.pop("test_user_options", None)


def test_a_user_measures_float_option_with_an_int_default_is_left_alone(job, user_measure):
    """``scale: float = 1`` (a float option whose default is written as 1) was taken for an
    integer from its default alone: 0.5 was refused ("must be an integer") and 2.0 reached the
    measure as the int 2. An option is an integer by its annotation when it has one (``int``,
    ``Optional[int]``: as an object, not only as text), by its int default when it has none."""
    def run(**options):
        fastcurv.batched_sharpness(*job, measures=("test_user_options",), progress=False,
                                   measure_options={"test_user_options": options})
        return {k: (user_measure[k], type(user_measure[k])) for k in options}

    assert run(scale=0.5, ratio=2.0) == {"scale": (0.5, float), "ratio": (2.0, float)}
    assert run(scale=2.0) == {"scale": (2.0, float)}
    assert run(count=3.0, maybe=4.0, plain=5.0) == {"count": (3, int), "maybe": (4, int), "plain": (5, int)}
    assert run(flag=True) == {"flag": (True, bool)}
    for option in ("count", "maybe", "plain"):
        with pytest.raises(ValueError, match=rf"measure_options\['test_user_options'\]\['{option}'\] must be an "
                                             "integer, got 2.5"):
            run(**{option: 2.5})


def test_the_built_in_measures_integer_options():
    """Every count of the built-in measures is an integer option (whole floats taken, others
    refused), and nothing else is (rho, eps, r, eta, tol, ... reach the measures as given)."""
    from fastcurv.sharpness import _integer_options, _load_measures

    expected = {
        "adaptive_avg_rho_sharpness": {"n_samples"}, "adaptive_rho_sharpness": {"n_iter"},
        "avg_rho_sharpness": {"n_samples"}, "epsilon_sharpness": {"n_iter"},
        "epsilon_sharpness_subspace": {"max_matrix_bytes", "n_iter", "p"}, "fisher_lambda_max": {"max_iter"},
        "fisher_rao": {"depth"}, "fisher_trace": {"num_matvecs"}, "ggn_lambda_max": {"max_iter"},
        "ggn_trace": {"num_matvecs"}, "jiang_sharpness": {"depth", "n_iter"},
        "josz_level_distance": {"max_doublings", "n_bisect", "n_iter"}, "josz_variation": {"n_iter"},
        "mw_sharpness": {"n_samples"}, "pac_bayes": {"depth", "mc_samples"},
        "relative_flatness": {"num_probes", "probe_batch"}, "rho_sharpness": {"n_iter"},
    }
    measures = _load_measures()
    assert {name for name, fn in measures.items() if fn.__module__.startswith("fastcurv.measures.")} == set(expected)
    assert {name: _integer_options(name, measures[name]) for name in expected} == expected
