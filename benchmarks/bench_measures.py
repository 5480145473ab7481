"""pytest-benchmark: each sharpness measure for R = 100 replicas of 784-128-128-10 on 1000 MNIST
images (synthetic when the files are absent), with the reduced options of measures_json.py, and
the gradient unit they are compared with (timed in the steady state, as measures_json.py times
it). benchmarks/measures_json.py runs the same measures on the same replicas (trained for its
default ``TRAIN_STEPS``) and writes their times as JSON in gradient units, plus the alpha = 10
invariance audit.

    python -m pytest benchmarks/bench_measures.py --benchmark-only -p no:cacheprovider
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import measures_json as mj  # noqa: E402

import fastcurv  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    models, loader = mj.workload(100, 1000, 250)[:2]
    return models, loader


def test_gradient_unit(benchmark, setup):
    """One ``loss_and_gradient()`` for all replicas: 3 rounds after a warm-up, inside one
    ``heap_reuse`` (measures_json.GRADIENT_UNIT)."""
    models, loader = setup
    op = fastcurv.HessianOperator(models, loader)
    with fastcurv.heap_reuse():
        benchmark.pedantic(op.loss_and_gradient, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("measure", mj.MEASURES)
def test_measure(benchmark, setup, measure):
    models, loader = setup
    benchmark.pedantic(lambda: fastcurv.batched_sharpness(models, loader, measures=(measure,), progress=False,
                                                          measure_options=mj.QUICK_OPTIONS), rounds=1, iterations=1)
