"""batched_sharpness end to end against dense eigendecompositions."""
import numpy as np
import pytest
import torch
from torch import nn

import fastcurv
from models import mlp, replicas
from oracle import dense_hessian


@pytest.fixture(scope="module")
def setup():
    models = replicas(lambda: mlp(nn.Tanh, (5, 8, 3)), R=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=gen)
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    eigs = [np.linalg.eigvalsh(dense_hessian(m, batches).numpy()) for m in models]
    return models, batches, eigs


@pytest.mark.parametrize("backend", ["fused", "func"])
def test_default_job(setup, backend):
    models, batches, eigs = setup
    res = fastcurv.batched_sharpness(models, batches, backend=backend, progress=False, trace_probes=40)
    assert res.backend == backend
    for r, ev in enumerate(eigs):
        assert abs(float(res["lambda_max"][r]) - ev[-1]) <= 1e-3 * abs(ev[-1])
        assert abs(float(res["trace"][r]) - ev.sum()) <= 4 * float(res.stderr["trace"][r]) + 1e-9
    assert res.converged["lambda_max"].all() and res.ok.all()
    df = res.to_pandas()
    assert list(df.index) == [0, 1, 2]
    assert {"lambda_max", "trace", "trace_stderr", "lambda_max_iters", "lambda_max_converged", "flags"} <= set(df.columns)


def test_all_builtin_measures(setup, tmp_path):
    models, batches, eigs = setup
    res = fastcurv.batched_sharpness(models, batches, measures=("top_k", "lambda_min", "trace", "spectrum"), top_k=3,
                                     trace_method="hutch++", trace_probes=30, slq_steps=40, progress=False)
    for r, ev in enumerate(eigs):
        np.testing.assert_allclose([float(res[f"lambda_{i}"][r]) for i in (1, 2, 3)], ev[::-1][:3], rtol=2e-3)
        assert abs(float(res["lambda_min"][r]) - ev[0]) <= 1e-3 * abs(ev[0]) + 1e-6
    grid, dens = res.spectrum.density()
    assert dens.shape == (3, grid.shape[0])
    res.spectrum.plot(path=tmp_path / "esd.png")
    assert (tmp_path / "esd.png").stat().st_size > 1000


def test_spectrum_takes_every_step_of_several_draws_beside_a_sharp_replica():
    # 60 steps on P = 155, where the top Ritz value's residual underflows to 0 after 52-56 steps
    # (the runs stopped there); replica 1 is 40x sharper than the others, so the grid shared by
    # all is coarse for replica 0's kernels unless they widen to its spacing
    models = replicas(lambda: mlp(nn.Tanh, (6, 8, 8, 3)), R=3)
    with torch.no_grad():
        models[1][4].weight.mul_(40.0)
        models[1][0].weight.mul_(3.0)
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(37, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (37,), generator=gen))
    res = fastcurv.batched_sharpness(models, data, measures=("spectrum",), slq_steps=60, slq_draws=4, progress=False)
    sp = res.spectrum
    assert sp.nodes.shape == sp.weights.shape == (3, 4, 60)
    torch.testing.assert_close(sp.weights.sum(-1), torch.ones(3, 4, dtype=torch.float64))
    for r, m in enumerate(models):
        ev = torch.linalg.eigvalsh(dense_hessian(m, [data]))
        assert sp.nodes[r].min() >= ev[0] - 1e-8 and sp.nodes[r].max() <= ev[-1] + 1e-8
    grid, dens = sp.density()
    torch.testing.assert_close(torch.trapezoid(dens, grid), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-3)
    with pytest.warns(UserWarning, match="grid spacing"):
        sp.density(sigma2=1e-6, num_points=1000)


def test_power_solver_option(setup):
    models, batches, eigs = setup
    res = fastcurv.batched_sharpness(models, batches, measures=("lambda_max",), eig_solver="power", tol=1e-6,
                                     max_iter=500, progress=False)
    for r, ev in enumerate(eigs):
        dominant = ev[np.argmax(np.abs(ev))]
        assert abs(float(res["lambda_max"][r]) - dominant) <= 1e-3 * abs(dominant)


@pytest.mark.parametrize("start", ["gradient", "random"])
def test_lambda_max_start_vectors_and_residual_stopping(setup, start):
    models, batches, eigs = setup
    res = fastcurv.batched_sharpness(models, batches, measures=("lambda_max",), eig_start=start, tol=1e-4, progress=False)
    assert res.converged["lambda_max"].all()
    for r, ev in enumerate(eigs):
        lam = float(res["lambda_max"][r])
        # Lanczos stops when the Ritz residual is within tol of theta: an eigenvalue lies that close
        assert abs(lam - ev.max()) <= 1e-4 * abs(lam) + 1e-12
        assert float(res.error_bounds["lambda_max"][r]) <= 1e-4 * abs(lam)
    with pytest.raises(ValueError, match="eig_start must be"):
        fastcurv.batched_sharpness(models, batches, eig_start="ones", progress=False)


def test_trace_without_a_lanczos_basis_gets_the_full_hutchpp_budget(setup):
    """measures=("trace",) on a model without an exact trace: "auto" has no Lanczos basis to
    deflate with and runs Hutch++ on the default 30 matvecs (it took the deflated estimator's 10
    before), as trace_method="hutch++" does; fewer than 6 are refused up front."""
    models, batches, _ = setup  # Tanh: no exact trace
    auto = fastcurv.batched_sharpness(models, batches, measures=("trace",), progress=False)
    explicit = fastcurv.batched_sharpness(models, batches, measures=("trace",), trace_method="hutch++", progress=False)
    assert auto.trace_method == explicit.trace_method == "hutch++"
    assert auto.num_matvecs == explicit.num_matvecs == 30  # per replica
    with pytest.raises(ValueError, match="trace_probes=4: the trace runs Hutch\\+\\+"):
        fastcurv.batched_sharpness(models, batches, measures=("lambda_max", "trace"), trace_method="hutch++",
                                   trace_probes=4, progress=False)


def test_lambda_max_converged_with_top_k_and_power_iteration_negative_flag(setup):
    """lambda_max and top_k together: both have iterations and convergence entries. Power
    iteration converging to a negative eigenvalue (the largest in modulus) says so."""
    models, batches, eigs = setup
    res = fastcurv.batched_sharpness(models, batches, measures=("lambda_max", "top_k"), top_k=2, progress=False)
    assert res.converged["lambda_max"].all() and res.converged["top_k"].all()
    assert torch.equal(res.iterations["lambda_max"], res.iterations["top_k"])
    neg = fastcurv.batched_sharpness(models, batches, loss=lambda out, y: -nn.functional.cross_entropy(out, y) * 5,
                                     measures=("lambda_max",), eig_solver="power", max_iter=300, progress=False)
    for r, ev in enumerate(eigs):
        assert ("converged to a negative eigenvalue" in neg.flags[r]) == (float(neg["lambda_max"][r]) < 0)
    assert any("negative eigenvalue" in f for f in neg.flags)


def test_auto_falls_back_to_autograd_for_the_gradient_too():
    """A model neither torch.fx nor vmap can take (data-dependent control flow): the default job
    (its Lanczos start needs the gradient) runs on autograd with a warning, and the result says so."""

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.relu(h) if h.sum() > -1e9 else h)

    torch.manual_seed(0)
    models = [DataDependent().double() for _ in range(2)]
    x = torch.randn(20, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    with pytest.warns(RuntimeWarning, match="falling back to the 'autograd' backend"):
        res = fastcurv.batched_sharpness(models, (x, y), progress=False)
    assert res.backend == "autograd" and res.backend_reason.startswith("auto: fused engine not usable") and "; then torch.func failed (" in res.backend_reason
    ref = fastcurv.batched_sharpness(models, (x, y), backend="autograd", progress=False)
    torch.testing.assert_close(res["lambda_max"], ref["lambda_max"])


def test_top_k_of_a_model_with_fewer_parameters_than_the_minimum_steps():
    """P = 39 (float32) and top_k=5, whose minimum of 50 steps exceeds P: the minimum is capped at
    P/2, since steps forced to the end of a float32 Krylov space let spurious Ritz values in (a
    replica reported 0.4454 between the true 0.502 and 0.4216)."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)) for _ in range(8)]
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    res = fastcurv.batched_sharpness(models, (x, y), measures=("top_k",), top_k=5, progress=False, backend="func")
    op = fastcurv.HessianOperator(models, (x, y), backend="func")
    for r in range(len(models)):
        true = torch.linalg.eigvalsh(op.dense(r).double()).flip(0)[:5]
        got = torch.stack([res[f"lambda_{i + 1}"][r] for i in range(5)]).double()
        assert bool(res.converged["top_k"][r]) and float(((got - true).abs() / true.abs()).max()) < 1e-4, r


def test_deflated_trace_is_exact_on_a_whole_krylov_space_and_tight_on_most_of_it():
    """The default "deflated" trace (lambda_max's Lanczos basis Q, the tridiagonal's trace as
    trace(Q H Q^T), Hutchinson on the rest) against the dense Hessian's trace, on a model with
    P = 26. tol=0 runs Lanczos until its Krylov space is exhausted (22 steps: 5 eigenvalues are 0):
    the basis then holds every nonzero eigenvector, the projected probes see nothing, and the
    estimate must be the dense trace to rounding. With 16 steps the basis holds most of the
    spectrum: the rest is estimated within 3 standard errors of at most 5 % (they are under 1 %
    here, and a 30 % bias in the exact part is 35 to 170 of them). The end-to-end test above allows 4
    standard errors of 40 probes (10-15 % of the trace): a 30 % bias in the exact part
    (``basis_trace=basis.tridiag_trace * 1.3``) or a tridiagonal trace without its last
    coefficient passed it."""
    models = replicas(lambda: mlp(nn.Tanh, (3, 4, 2)), R=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (11,), generator=gen)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    want = torch.stack([torch.trace(dense_hessian(m, batches)) for m in models])
    P = sum(p.numel() for p in models[0].parameters())

    whole = fastcurv.batched_sharpness(models, batches, tol=0.0, max_iter=P, progress=False)
    assert whole.trace_method == "deflated" and whole.iterations["lambda_max"].tolist() == [22, 22, 22]
    torch.testing.assert_close(whole["trace"], want, rtol=1e-10, atol=0)
    assert (whole.stderr["trace"] <= 1e-12).all()

    most = fastcurv.batched_sharpness(models, batches, tol=0.0, max_iter=16, progress=False)
    assert most.trace_method == "deflated" and most.iterations["lambda_max"].tolist() == [16, 16, 16]
    err, se = (most["trace"] - want).abs(), most.stderr["trace"]
    assert (err <= 3 * se).all() and (se <= 0.05 * want).all(), (err, se, want)


def test_gradient_start_is_taken_on_a_confident_float32_model():
    """The default Lanczos start is each replica's unit loss gradient plus a random unit vector. On a
    confident float32 model (per-sample loss about 1e-27, gradient entries up to 1e-25) torch's norm
    of the gradient underflowed to 0, and the start silently fell back to the random vector alone."""
    from fastcurv.sharpness import _gradient_start
    from fastcurv.solvers.probes import start_vectors
    from test_solvers import _confident_mlp

    m, x, y = _confident_mlp(62.0)
    op = fastcurv.HessianOperator([m], (x, y), backend="autograd")
    v, loss = _gradient_start(op, 0, True)
    z = start_vectors(op, 0, True)
    g = op.loss_and_gradient()[1].double()
    assert float(loss) < 1e-20 and float(g.abs().max()) > 0
    d = v.double() - z.double()  # the gradient's unit vector, when it was taken
    assert torch.allclose(d, g / g.norm(), atol=1e-5)


def test_a_measure_entry_of_none_is_no_options(setup, tmp_path, one_thread):
    """``measure_options={"mw_sharpness": None}`` (a YAML config's empty ``mw_sharpness:`` entry)
    passed the option checks, which read None as no options, then raised Python's raw "argument
    after ** must be a mapping, not NoneType" at the measure's call; also in a chunked job. Now it
    is no options everywhere, and an entry that is no mapping is refused naming it."""
    models, batches, _ = setup
    kw = dict(measures=("mw_sharpness",), progress=False)
    ref = fastcurv.batched_sharpness(models, batches, measure_options={"mw_sharpness": {"n_samples": 100}}, **kw)
    for extra in ({}, dict(replica_chunk=2, output=str(tmp_path / "r.jsonl"))):
        got = fastcurv.batched_sharpness(models, batches, measure_options={"mw_sharpness": None}, **kw, **extra)
        torch.testing.assert_close(got["mw_sharpness"], ref["mw_sharpness"], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"measure_options\['mw_sharpness'\] must be a dict \{option: value\} "
                                         r"\(or None: no options\), got 5 \(int\)"):
        fastcurv.batched_sharpness(models, batches, measure_options={"mw_sharpness": 5}, **kw)
    with pytest.raises(ValueError, match=r"measure_options must be a dict \{measure: \{option: value\}\}, got a list"):
        fastcurv.batched_sharpness(models, batches, measure_options=["mw_sharpness"], **kw)
