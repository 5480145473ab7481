"""Time exact agreement counts (C++ kernel) against the one-hot matmul in one run; write JSON.

    python benchmarks/agreement_json.py [--large] [--out agreement.json]

Without --large: R in {100, 1000} x M = 10k x C in {10, 1000}, plus R = 1000, M = 100k, C = 10
(the issue's target point). --large: the full grid R in {100, 1000} x M in {10k, 100k} x
C in {10, 1000}. Times are the minimum of ``--repeats`` calls. The one-hot matmul is timed on the
full problem when it costs at most --max-onehot-flops; otherwise on the first M' examples and scaled
by M / M' (its cost is linear in M), and the record says ``onehot_extrapolated: true``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import fastcurv
from fastcurv.ops.agreement_counts import agreement_counts_onehot


def best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", action="store_true", help="the full grid (M = 100k for both R and C)")
    ap.add_argument("--out", default="agreement_bench.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-onehot-flops", type=float, default=2.5e12)
    args = ap.parse_args()
    if not fastcurv._ext.has_kernel("agreement_counts", "cpu"):
        raise SystemExit(f"C++ extension not loaded: {fastcurv._ext.extension_error('_C')}")
    if args.large:
        grid = [(R, M, C) for R in (100, 1000) for M in (10_000, 100_000) for C in (10, 1000)]
    else:
        grid = [(100, 10_000, 10), (100, 10_000, 1000), (1000, 10_000, 10), (1000, 10_000, 1000), (1000, 100_000, 10)]
    records = []
    for R, M, C in grid:
        g = torch.Generator().manual_seed(0)
        p = torch.randint(0, C, (R, M), generator=g).to(fastcurv.function.label_dtype(C))
        t_ext, a = best_time(lambda: torch.ops.fastcurv.agreement_counts(p), args.repeats)
        flops = 2.0 * R * R * M * C
        Msub = M if flops <= args.max_onehot_flops else max(64, int(M * args.max_onehot_flops / flops / 64) * 64)
        t_oh, b = best_time(lambda: agreement_counts_onehot(p[:, :Msub]), 1 if Msub < M or flops > 5e11 else args.repeats)
        if Msub == M:
            assert torch.equal(a, b), "kernel and one-hot reference disagree"
        else:
            assert torch.equal(torch.ops.fastcurv.agreement_counts(p[:, :Msub]), b), "kernel and one-hot reference disagree"
        t_oh_full = t_oh * M / Msub
        rec = dict(R=R, M=M, C=C, ext_s=t_ext, onehot_s=t_oh_full, onehot_extrapolated=Msub < M, onehot_M_timed=Msub,
                   speedup_vs_onehot=t_oh_full / t_ext)
        records.append(rec)
        print(json.dumps(rec), flush=True)
    meta = dict(threads=torch.get_num_threads(), torch=torch.__version__, machine=platform.machine(),
                processor=platform.processor(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=records), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
