"""pytest-benchmark suite for the Hessian-vector products (compare the min/median columns of one run).

Two workloads: W1's MLPs, reduced by default (R=20, B=200), and W3's small CNNs (R=20, B=200, as
in its reference runs); about two minutes on 2 cores. FASTCURV_BENCH_FULL=1 runs W1 itself (R=100
MLPs 784-128-128-10, B=1000 MNIST). ``-k W1`` or ``-k W3`` picks one.
    python -m pytest benchmarks/bench_hvp.py -p no:cacheprovider
"""
import os

import pytest
import torch
from torch import nn

import fastcurv
from hvp_json import load_batch, w3_cnn

FULL = os.environ.get("FASTCURV_BENCH_FULL") == "1"
R, B = (100, 1000) if FULL else (20, 200)


@pytest.fixture(scope="module", params=["W1", "W3"])
def workload(request):
    torch.manual_seed(0)
    if request.param == "W3":
        x, y, _ = load_batch(200, flatten=False)
        return [w3_cnn().eval() for _ in range(20)], x, y
    x, y, _ = load_batch(B)
    models = [nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)) for _ in range(R)]
    return models, x, y


@pytest.fixture(scope="module")
def operators(workload):
    models, x, y = workload
    return {b: fastcurv.HessianOperator(models, (x, y), backend=b) for b in ("fused", "func", "autograd")}


def test_gradient_unit(benchmark, operators):
    benchmark(operators["fused"].loss_and_gradient)


@pytest.mark.parametrize("backend", ["fused", "func"])
@pytest.mark.parametrize("K", [1, 8])
def test_hvp(benchmark, operators, backend, K):
    op = operators[backend]
    V = torch.randn(op.R, K, op.P)
    out = benchmark(op.matvec, V)
    assert out.shape == V.shape


@pytest.mark.parametrize("how", ["exact", "func_hutchinson_10"])
def test_trace(benchmark, operators, how):
    """The fused engine's exact trace (no probes) against what the func backend pays for 10 probes."""
    if how == "exact":
        out = benchmark(operators["fused"].exact_trace)
    else:
        op = operators["func"]
        out = benchmark.pedantic(lambda: fastcurv.solvers.hutchinson(op, num_probes=10, probe_batch=10).trace, rounds=2, iterations=1)
    assert torch.isfinite(out).all()


def test_models_changed_guard(benchmark, operators):
    """The check, before every product, that the models did not change since the operator was built:
    the identity, storage and version of each tensor, and an exact comparison of its values with the
    operator's copy (one ``memcmp`` per tensor on the CPU), which sees the writes no version counter
    does (``p.data``, fused optimizers). Compare with ``test_hvp[fused-1]``: it is part of each
    product's time (2% of it for R=10 and 256 samples on one thread; 0.14% before the values were
    compared)."""
    rs = operators["fused"].replicas
    assert benchmark(rs.changed_since_built) is None


def test_hvp_autograd_oracle(benchmark, operators):
    op = operators["autograd"]
    benchmark.pedantic(op.matvec, args=(torch.randn(op.R, op.P),), rounds=1, iterations=1)


@pytest.mark.parametrize("backend", ["fused", "func"])
def test_default_sharpness_job(benchmark, workload, backend):
    models, x, y = workload
    res = benchmark.pedantic(fastcurv.batched_sharpness, args=(models, (x, y)), kwargs={"backend": backend, "progress": False},
                             rounds=1, iterations=1)
    assert res.ok.all()
