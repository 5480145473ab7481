"""Batched population training against a loop over the models.

Workload (issue 6): R=100 MLPs 784-128-128-10, 2,000 MNIST training images (from
``../shared/data/mnist`` or $FASTCURV_DATA; synthetic images only when no file is found, and the
output says so), SGD with momentum 0.9, lr 0.01, batch 64, cross-entropy, float32.

* batched: :func:`fastcurv.train.train_population` (one vmapped forward/backward for all R);
* loop: each model alone with ``torch.optim.SGD`` on exactly the same batches (same seeds).

Run as a script to write JSON (ratios measured in one run, best of ``--repeats``)::

    python benchmarks/bench_train.py --epochs 1 --repeats 2 --json bench_train.json

or with pytest-benchmark: ``pytest benchmarks/bench_train.py --benchmark-only``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

from fastcurv import train
from fastcurv.train import epoch_order, init_replicas, mlp, train_population

SIZES = (784, 128, 128, 10)


def load_data(n_train: int = 2000):
    """``(x [n, 784] float32, y [n] int64, source)``; synthetic only when MNIST is not found."""
    from fastcurv import datasets

    try:
        s = datasets.load_mnist(n_train=n_train, flatten=True, seed=0)
        return s.x_train, s.y_train, "mnist"
    except FileNotFoundError:
        g = torch.Generator().manual_seed(0)
        print("MNIST not found: using SYNTHETIC random images for the benchmark", file=sys.stderr)
        return torch.rand(n_train, 784, generator=g), torch.randint(0, 10, (n_train,), generator=g), "synthetic"


def builder():
    return mlp(SIZES)


def run_batched(x, y, R: int, epochs: int, batch_size: int = 64):
    models, _ = train_population(builder, x, y, replicas=R, epochs=epochs, lr=0.01, momentum=0.9,
                                 batch_size=batch_size, progress=False)
    return models


def run_loop(x, y, R: int, epochs: int, batch_size: int = 64):
    models = init_replicas(builder, range(R))
    n = len(x)
    for r, m in enumerate(models):
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        for e in range(epochs):
            order = epoch_order(r, e, n)
            for k in range(0, n, batch_size):
                idx = order[k:k + batch_size]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(m(x[idx]), y[idx]).backward()
                opt.step()
    return models


def measure(R=100, epochs=1, repeats=2, n_train=2000, batch_size=64):
    x, y, source = load_data(n_train)
    t_b, t_l = [], []
    for _ in range(repeats):  # interleaved, best of repeats: less sensitive to other load on the machine
        t = time.perf_counter()
        mb = run_batched(x, y, R, epochs, batch_size)
        t_b.append(time.perf_counter() - t)
        t = time.perf_counter()
        ml = run_loop(x, y, R, epochs, batch_size)
        t_l.append(time.perf_counter() - t)
    # the two runs train the same models: report how far apart they ended (float32 rounding only)
    diff = max((pb - pl).abs().max().item() for a, b in zip(mb, ml) for pb, pl in zip(a.parameters(), b.parameters()))
    return {
        "workload": f"R={R} MLP {'-'.join(map(str, SIZES))}, {n_train} {source} images, batch {batch_size}, "
                    f"{epochs} epoch(s), SGD momentum 0.9, float32",
        "data": source,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "batched_s": min(t_b),
        "loop_s": min(t_l),
        "speedup_loop_over_batched": min(t_l) / min(t_b),
        "batched_all_s": t_b,
        "loop_all_s": t_l,
        "max_abs_param_diff_batched_vs_loop": diff,
    }


# ---- pytest-benchmark ---------------------------------------------------------------------
def test_bench_train_batched(benchmark):
    x, y, _ = load_data()
    benchmark.pedantic(run_batched, args=(x, y, 100, 1), rounds=1, iterations=1)


def test_bench_train_loop(benchmark):
    x, y, _ = load_data()
    benchmark.pedantic(run_loop, args=(x, y, 100, 1), rounds=1, iterations=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = measure(a.replicas, a.epochs, a.repeats, a.n_train, a.batch_size)
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
