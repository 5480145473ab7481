"""pytest-benchmark: exact agreement counts (C++ bit-sliced kernel) against the one-hot matmul.

Default run (about 2 minutes on 2 cores): the kernel on the whole grid, the one-hot matmul where
R * M * C <= 1e9 (this includes the target point R = 1000, M = 100k, C = 10, ~20-50 s per call).
FASTCURV_BENCH_LARGE=1 adds the one-hot matmul at R = 100, M = 100k, C = 1000 (~80 s). The one-hot
matmul at R = 1000, C = 1000 (2e13-2e14 flops) is never run here; benchmarks/agreement_json.py
extrapolates it from a prefix of the examples.

    python -m pytest benchmarks/bench_agreement.py --benchmark-only -p no:cacheprovider
"""
import os

import pytest
import torch

import fastcurv
from fastcurv.ops.agreement_counts import agreement_counts_onehot

LARGE = os.environ.get("FASTCURV_BENCH_LARGE") == "1"
GRID = [(R, M, C) for R in (100, 1000) for M in (10_000, 100_000) for C in (10, 1000)]


def _onehot_flops(R, M, C):
    """Flops of the one-hot matmul: ``[R, M*C] @ [M*C, R]``."""
    return 2 * R * R * M * C


def _small(R, M, C, impl):
    return impl == "ext" or R * M * C <= 10**9  # one-hot: <= 2e12 flops


def _preds(R, M, C):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, C, (R, M), generator=g, dtype=torch.int64).to(fastcurv.function.label_dtype(C))


@pytest.mark.parametrize("impl", ["ext", "onehot"])
@pytest.mark.parametrize("R,M,C", GRID, ids=[f"R{R}-M{M}-C{C}" for R, M, C in GRID])
def test_agreement_counts(benchmark, R, M, C, impl):
    if impl == "ext" and not fastcurv._ext.has_kernel("agreement_counts", "cpu"):
        pytest.skip("C++ extension not built")
    if impl == "onehot" and _onehot_flops(R, M, C) > 2 * 10**12:
        pytest.skip("one-hot matmul at this size takes over 10 minutes; see agreement_json.py (extrapolated)")
    if not LARGE and not _small(R, M, C, impl):
        pytest.skip("large case: set FASTCURV_BENCH_LARGE=1")
    p = _preds(R, M, C)
    fn = torch.ops.fastcurv.agreement_counts if impl == "ext" else agreement_counts_onehot
    rounds = 3 if impl == "ext" else 1
    out = benchmark.pedantic(fn, args=(p,), rounds=rounds, iterations=1)
    benchmark.extra_info.update(R=R, M=M, C=C, impl=impl, threads=torch.get_num_threads())
    assert out.shape == (R, R) and int(out[0, 0]) == M
