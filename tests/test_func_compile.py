"""The func backend's ``compile=True`` when torch.compile fails: the documented eager fallback."""
import warnings

import pytest
import torch
from torch import nn

import fastcurv


@pytest.fixture
def problem():
    """Two small MLPs on two batches, and their Hessian products without compiling (mode "graph")."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)]
    x, y = torch.rand(32, 20), torch.randint(0, 3, (32,))
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    eager = fastcurv.HessianOperator(models, batches, backend="func", backend_options={"mode": "graph"})
    V = torch.randn(2, 2, eager.P)
    return models, batches, V, eager.matvec(V)


@pytest.fixture
def dynamo_reset():
    yield
    torch._dynamo.reset()


def _compiled_op(models, batches):
    return fastcurv.HessianOperator(models, batches, backend="func", backend_options={"compile": True, "reuse": True})


def _fallback_warnings(caught):
    return [str(w.message) for w in caught if "running it eagerly" in str(w.message)]


def _eager_product_with_one_warning(op, V, want):
    """``op.matvec(V)`` equals the eager product ``want`` (to float32 rounding), with one fallback warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = op.matvec(V)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    said = _fallback_warnings(caught)
    assert len(said) == 1, said


def test_compile_failing_after_tracing_falls_back_to_a_fresh_linearization(problem, monkeypatch, dynamo_reset):
    """A compiler backend that fails after Dynamo traced the linearization (what Inductor does
    without a working C++ compiler). The fallback used to run the very linearization Dynamo had
    traced, which the failed compile leaves unusable (its const-folded graph half set up): a raw
    ``IndexError: index 0 is out of range`` instead of the eager product. Now: the eager product (to
    float32 rounding), one warning, ``compile_error`` set, and no compile for the second batch."""
    models, batches, V, want = problem
    real_compile, compiled = torch.compile, []

    def failing_backend(gm, example_inputs):
        raise RuntimeError("simulated: no working C++ compiler")

    def compile_with_failing_backend(fn, **kw):
        compiled.append(fn)
        return real_compile(fn, backend=failing_backend, **kw)

    monkeypatch.setattr(torch, "compile", compile_with_failing_backend)
    op = _compiled_op(models, batches)
    _eager_product_with_one_warning(op, V, want)
    assert "simulated: no working C++ compiler" in op.backend.compile_error
    assert len(compiled) == 1  # the second batch's linearization ran eagerly from the start
    torch.testing.assert_close(op.matvec(V), want, rtol=1e-5, atol=1e-6)


def test_torch_compile_raising_falls_back(problem, monkeypatch):
    """``torch.compile`` itself raising (e.g. a Python version it does not support) used to escape
    the matvec uncaught, though the docstring promises a fallback; now the products run eagerly."""
    models, batches, V, want = problem

    def unavailable(fn, **kw):
        raise RuntimeError("simulated: torch.compile is not supported here")

    monkeypatch.setattr(torch, "compile", unavailable)
    op = _compiled_op(models, batches)
    _eager_product_with_one_warning(op, V, want)
    assert "not supported here" in op.backend.compile_error


def test_compile_that_works_leaves_no_error(problem, dynamo_reset):
    """The flag a benchmark reads to label its times "compiled" stays None when the compile worked
    (here with Dynamo's "eager" backend, which needs no C++ compiler)."""
    models, batches, V, _ = problem
    batch = batches[0]
    want = fastcurv.HessianOperator(models, batch, backend="func", backend_options={"mode": "graph"}).matvec(V)
    real_compile = torch.compile
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
        op = _compiled_op(models, batch)
        torch.testing.assert_close(op.matvec(V), want, rtol=1e-5, atol=1e-6)
    assert op.backend.compile_error is None


def test_compile_on_a_model_forward_mode_gets_wrong_falls_back_to_graph_mode(monkeypatch):
    """compile=True runs mode "forward", whose linearization torch 2.13 gets wrong through LayerNorm;
    called as ``F.layer_norm`` no module type names it, and the products were 17% off the dense
    Hessian, silently. The first (compiled) linearization is now checked against mode "graph": a
    warning, mode "graph" from then on, and the exact products. (torch.compile is replaced by the
    identity here: the check is on what the compiled wrapper runs.)"""

    class FunctionalLayerNorm(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.rand(n) + 0.5), nn.Parameter(torch.randn(n))

        def forward(self, h):
            return nn.functional.layer_norm(h, self.weight.shape, self.weight, self.bias)

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 5), FunctionalLayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double() for _ in range(2)]
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    V = torch.randn(2, 2, sum(p.numel() for p in models[0].parameters()), dtype=torch.float64)
    want = fastcurv.HessianOperator(models, (x, y), backend="autograd").matvec(V)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    # (the forward-pass scan now names F.layer_norm up front: switched off, as for an op it does not know)
    monkeypatch.setattr(fastcurv.backends.func, "traced_hazard", lambda replicas, x: None)
    op = _compiled_op(models, (x, y))
    assert op.backend.mode == "forward"
    with pytest.warns(RuntimeWarning, match="mode 'forward' gives Hessian products .* off mode 'graph'"):
        got = op.matvec(V)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert op.backend.mode == "graph" and op.backend.forward_error and op.backend.compile_error is None
