"""pytest-benchmark: each sharpness measure for R = 100 replicas of 784-128-128-10 on 1000 MNIST
images (synthetic when the files are absent), with the reduced options of measures_json.py, and
the gradient unit they are compared with. benchmarks/measures_json.py writes the same numbers as
JSON in gradient units, plus the alpha = 10 invariance audit.

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
    x, y, _ = mj.mnist(1000)
    models = mj.train(mj.make_models(100), x, y, 20)
    return models, mj.loader_of(x, y, 250)


def test_gradient_unit(benchmark, setup):
    models, loader = setup
    op = fastcurv.HessianOperator(models, loader)
    benchmark.pedantic(op.loss_and_gradient, rounds=3, iterations=1)


@pytest.mark.parametrize("measure", mj.MEASURES)
def test_measure(benchmark, setup, measure):
    models, loader = setup
    benchmark.pedantic(lambda: fastcurv.batched_sharpness(models, loader, measures=(measure,), progress=False,
                                                          measure_options=mj.QUICK_OPTIONS), rounds=1, iterations=1)
