"""Peak memory of the default job under ``memory_budget=``: R MLPs 784-128-128-10 on MNIST.

The default ``batched_sharpness`` job (lambda_max by Lanczos, and the trace: exact on these ReLU
MLPs, where fastcurv supports it, else Krylov-deflated; ``trace_method`` in the JSON; fused
backend) on the MNIST training set (``--n-train``, default all 60,000; batches of
``--batch-size``), R = ``--replicas`` (default 100) MLPs 784-128-128-10, run in a child process so
that its peak RSS (``ru_maxrss``) is the job's. The child loads the data and builds the models,
runs a one-replica warm-up, records its resident memory then (the baseline), and gives the job
``memory_budget = --target - baseline`` (or ``--budget``), so the process as a whole should stay
under ``--target`` (default 4 GiB; peak RSS also counts the loading, which reads MNIST as float64). Then it times one full-data gradient for all R replicas (the
unit of fastcurv's benchmarks, in the steady state: ``hvp_json.best``) and writes one JSON file:

    python benchmarks/memory_json.py --out benchmarks/results/memory.json                 # the full job
    python benchmarks/memory_json.py --replicas 10 --n-train 6000 --out memory_small.json  # a quick one
    python benchmarks/memory_json.py --plan-only                                          # the plan, no run

Reported: the process's peak RSS (``ru_maxrss``, loading included), the job's own peak
(``VmHWM`` reset after the baseline via /proc/self/clear_refs) and the baseline (bytes), the
budget, whether the job's peak <= target and peak - baseline <= budget, wall seconds of
the job, seconds of one gradient for all R, their ratio, matvecs per replica, the plan
(replicas per chunk, state cache, estimated peak), mean lambda_max / trace and the trace's method.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hvp_json import best  # noqa: E402
from peak_memory import reset_peak_rss, status_bytes  # noqa: E402


def _rss() -> int:
    """Peak RSS so far (bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(a) -> dict:
    import torch
    from torch import nn

    import fastcurv
    from fastcurv.datasets import load_mnist, make_loader
    from fastcurv.memory import parse_budget, plan_memory

    if a.threads:
        torch.set_num_threads(a.threads)
    d = load_mnist(root=a.data, n_train=a.n_train, flatten=True)
    x, y = d.x_train, d.y_train
    del d
    models = []
    for s in range(a.replicas):
        torch.manual_seed(s)
        models.append(nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)))
    loader = make_loader(x, y, a.batch_size)
    fastcurv.batched_sharpness(models[:1], (x[:16], y[:16]), max_iter=3, progress=False)  # warm-up: kernels, thread pools
    import gc

    gc.collect()
    base_hwm = _rss()  # loading MNIST (float64 on the way) peaks above what it keeps
    reset = reset_peak_rss()  # from here VmHWM is the job's own peak
    base = status_bytes("VmRSS")
    target = parse_budget(a.target)
    budget = parse_budget(a.budget) if a.budget else target - base
    plan = plan_memory(models, loader, budget)
    out = {"replicas": a.replicas, "n_train": len(x), "batch_size": a.batch_size, "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "target_bytes": target, "baseline_rss_bytes": base, "baseline_peak_rss_bytes": base_hwm, "memory_budget_bytes": budget,
           "plan": {"replica_chunk": plan.replica_chunk, "cache_bytes": plan.cache_bytes, "cache_data": plan.cache_data,
                    "batch_size": plan.batch_size, "estimate_bytes": plan.estimate, "description": plan.describe()}}
    if a.plan_only:
        return out
    t0 = time.perf_counter()
    res = fastcurv.batched_sharpness(models, loader, memory_budget=budget, progress=a.progress)
    wall = time.perf_counter() - t0
    job_peak = status_bytes("VmHWM") if reset else _rss()
    peak = max(base_hwm, _rss(), job_peak)  # the reset of VmHWM resets ru_maxrss too: keep the loading's peak
    iters = res.iterations["lambda_max"].double()
    out.update({"peak_rss_bytes": peak, "peak_rss_GiB": peak / 2**30, "job_peak_rss_bytes": job_peak,
                "job_peak_rss_GiB": job_peak / 2**30, "job_peak_measured_alone": reset,
                "job_rss_above_baseline_bytes": job_peak - base, "job_peak_within_target": job_peak <= target,
                "job_within_budget": job_peak - base <= budget,
                "seconds": {"job": wall}, "backend": res.backend,
                "lanczos_steps_per_replica": {"mean": float(iters.mean()), "max": int(iters.max())},
                "operator_matvecs": res.num_matvecs,  # probe columns over all chunks (fastcurv's count)
                "lambda_max_mean": float(res["lambda_max"].mean()), "trace_mean": float(res["trace"].mean()),
                "trace_method": res.trace_method,
                "all_ok": bool(res.ok.all())})
    # the unit: one full-data gradient for all R replicas (batched fused GEMMs, state not cached), in the
    # steady state the job runs in (the fastest of 3 calls after a warm-up inside one heap_reuse, as hvp_json's)
    op = fastcurv.HessianOperator(models, loader, backend="fused", backend_options={"cache_bytes": 0})
    grad = best(op.loss_and_gradient, 3, lambda: None, steady=True)
    out["seconds"]["gradient_all_R"] = grad
    out["ratio_to_gradient"] = wall / grad
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=100)
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--target", default="4GiB", help="peak RSS target of the whole process (bytes or e.g. '4GiB')")
    p.add_argument("--budget", default=None, help="memory_budget of the job (default: target - baseline RSS)")
    p.add_argument("--data", default=None, help="MNIST folder (default: fastcurv's search path, e.g. /work/shared/data/mnist)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--plan-only", action="store_true", help="report the plan without running the job")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return 0
    args = ["--replicas", str(a.replicas), "--n-train", str(a.n_train), "--batch-size", str(a.batch_size),
            "--target", str(a.target), "--threads", str(a.threads)]
    args += (["--budget", str(a.budget)] if a.budget else []) + (["--data", a.data] if a.data else [])
    args += (["--plan-only"] if a.plan_only else []) + (["--progress"] if a.progress else [])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"the benchmark child failed (exit {proc.returncode})", file=sys.stderr)
        return proc.returncode
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["seconds_total_with_loading"] = time.perf_counter() - t0
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
