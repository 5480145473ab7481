"""Batched population training against a loop over the models.

Workload (issue 6): R=100 MLPs 784-128-128-10, 2,000 MNIST training images (from
``../shared/data/mnist`` or $FASTCURV_DATA; synthetic images only when no file is found, and the
output says so), SGD with momentum 0.9, lr 0.01, batch 64, cross-entropy, float32. ``--model w3``:
W3's small CNNs with BatchNorm (``benchmarks/hvp_json.py``; R=20 is W3's count) instead, trained in
train mode (batch statistics, running statistics updated per replica) on 28x28 images.

* batched: :func:`fastcurv.train.train_population` with its defaults (each replica its own data
  order; the fused MLP path of :mod:`fastcurv.train_fused`: baddbmm/bmm over the replica axis);
* batched_dense: the same with ``sparse_input=False`` (dense GEMMs for the first layer; the
  default multiplies only MNIST's nonzero pixels, :mod:`fastcurv.ops.csr_linear`);
* batched_shared: the same with ``shared_data_order=True`` (one data order for all replicas, the
  first layer as one GEMM);
* batched_vmap: ``fused=False``, the generic ``vmap(functional_call)`` path, for reference;
* batched_intraop: ``threads=1``, the fused path without replica-parallel worker threads (torch's
  intra-op OpenMP threads parallelize each op instead);
* loop: each model alone with ``torch.optim.SGD`` on exactly the same batches (same seeds).

Every variant and the loop first run once untimed on 2 replicas and 2 batches (:func:`warm_up`), so
that one-time costs stay out of every timed run: torch.optim's first optimizer imports
torch._dynamo (about 2.5 s here: 3 replicas on 256 images took 2.3 s timed cold, 0.03 s warm); the
pytest-benchmark tests do the same before their single rounds. All variants run interleaved in
every repeat and the best of ``--repeats`` is kept, so load from other processes on the machine
(recorded as ``loadavg``) biases the ratios as little as possible; ``*_cpu_s`` is the process CPU
time of the best run.

Run as a script to write JSON (ratios measured in one run, best of ``--repeats``)::

    python benchmarks/bench_train.py --epochs 1 --repeats 2 --json bench_train.json
    python benchmarks/bench_train.py --model w3 --replicas 20 --variants batched,batched_intraop

or with pytest-benchmark: ``pytest benchmarks/bench_train.py --benchmark-only``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from fastcurv.train import epoch_order, init_replicas, mlp, train_population
from hvp_json import w3_cnn

SIZES = (784, 128, 128, 10)


def load_data(n_train: int = 2000, flatten: bool = True):
    """``(x [n, 784] or [n, 1, 28, 28] float32, y [n] int64, source)``; synthetic only when MNIST is not found."""
    from fastcurv import datasets

    try:
        s = datasets.load_mnist(n_train=n_train, flatten=flatten, seed=0)
        return s.x_train, s.y_train, "mnist"
    except FileNotFoundError:
        g = torch.Generator().manual_seed(0)
        print("MNIST not found: using SYNTHETIC random images for the benchmark", file=sys.stderr)
        x = torch.rand(n_train, 784, generator=g)
        return (x if flatten else x.view(-1, 1, 28, 28)), torch.randint(0, 10, (n_train,), generator=g), "synthetic"


def builder():
    return mlp(SIZES)


MODELS = {"mlp": (builder, "MLP " + "-".join(map(str, SIZES))), "w3": (w3_cnn, "W3 CNN with BatchNorm")}


def run_batched(x, y, R: int, epochs: int, batch_size: int = 64, build=builder, **kw):
    models, hist = train_population(build, x, y, replicas=R, epochs=epochs, lr=0.01, momentum=0.9,
                                    batch_size=batch_size, progress=False, **kw)
    run_batched.engine = hist.engine
    return models


def run_loop(x, y, R: int, epochs: int, batch_size: int = 64, shared_order: bool = False, threads=None, build=builder):
    if threads:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run_loop(x, y, R, epochs, batch_size, shared_order, build=build)
        finally:
            torch.set_num_threads(old)
    models = init_replicas(build, range(R))
    n = len(x)
    for r, m in enumerate(models):
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        for e in range(epochs):
            order = epoch_order(0 if shared_order else r, e, n)
            for k in range(0, n, batch_size):
                idx = order[k:k + batch_size]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(m(x[idx]), y[idx]).backward()
                opt.step()
    return models


def _max_diff(ma, mb):
    """Largest difference between the parameters (and BatchNorm statistics) of two lists of models."""
    return max((pa - pb).abs().max().item() for a, b in zip(ma, mb)
               for pa, pb in zip([*a.parameters(), *a.buffers()], [*b.parameters(), *b.buffers()]))


VARIANTS = {  # name -> extra train_population arguments
    "batched": {},
    "batched_dense": {"sparse_input": False},
    "batched_shared": {"shared_data_order": True},
    "batched_vmap": {"fused": False},
    "batched_intraop": {"threads": 1},
}


def run_variant(name, x, y, R: int, epochs: int, batch_size: int = 64, build=builder):
    """The trained models of variant ``name``: "loop", "loop_<t>thread" (the loop on ``t`` torch
    threads) or a batched variant of :data:`VARIANTS`."""
    if name == "loop":
        return run_loop(x, y, R, epochs, batch_size, build=build)
    if name.startswith("loop_"):
        return run_loop(x, y, R, epochs, batch_size, threads=int(name[5:-6]), build=build)
    return run_batched(x, y, R, epochs, batch_size, build=build, **VARIANTS[name])


def warm_up(x, y, names, batch_size: int = 64, build=builder):
    """Run each variant of ``names`` once, untimed, on 2 replicas and the first 2 batches of ``x``:
    one-time costs (torch.optim's first optimizer imports torch._dynamo; kernels and thread pools
    start on first use) then stay out of the timed runs."""
    for k in names:
        run_variant(k, x[:2 * batch_size], y[:2 * batch_size], 2, 1, batch_size, build)


def measure(R=100, epochs=1, repeats=2, n_train=2000, batch_size=64, variants=tuple(VARIANTS), loop_threads=(),
            model="mlp"):
    build, arch = MODELS[model]
    x, y, source = load_data(n_train, flatten=model == "mlp")
    names = [*variants, "loop", *[f"loop_{t}thread" for t in loop_threads]]
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    engines, models = {}, {}
    warm_up(x, y, names, batch_size, build)
    load = [os.getloadavg()[0]]
    for rep in range(repeats):  # interleaved (rotated order), best of repeats: less sensitive to other load
        for k in names[rep % len(names):] + names[:rep % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            models[k] = run_variant(k, x, y, R, epochs, batch_size, build)
            if k in VARIANTS:
                engines[k] = run_batched.engine
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
        load.append(os.getloadavg()[0])
    best = {k: min(range(repeats), key=wall[k].__getitem__) for k in names}
    res = {
        "workload": f"R={R} {arch}, {n_train} {source} images, batch {batch_size}, "
                    f"{epochs} epoch(s), SGD momentum 0.9, float32",
        "data": source,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "loadavg_1min": load,
        "engines": engines,
    }
    for k in names:
        res[f"{k}_s"] = wall[k][best[k]]
        res[f"{k}_cpu_s"] = cpu[k][best[k]]
        res[f"{k}_all_s"] = wall[k]
    for k in variants:
        res[f"speedup_loop_over_{k}"] = res["loop_s"] / res[f"{k}_s"]
        for t in loop_threads:
            res[f"speedup_loop_{t}thread_over_{k}"] = res[f"loop_{t}thread_s"] / res[f"{k}_s"]
    # the runs train the same models (float32 rounding apart); the shared-order variant against a loop
    # with the same shared order over its first replicas
    if "batched" in models:
        res["max_abs_param_diff_batched_vs_loop"] = _max_diff(models["batched"], models["loop"])
    if "batched_vmap" in models:
        res["max_abs_param_diff_batched_vmap_vs_loop"] = _max_diff(models["batched_vmap"], models["loop"])
    if "batched_shared" in models:
        k = min(R, 5)
        res[f"max_abs_param_diff_batched_shared_vs_loop_first{k}"] = _max_diff(
            models["batched_shared"][:k], run_loop(x, y, k, epochs, batch_size, shared_order=True, build=build))
    return res


# ---- pytest-benchmark ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    x, y, _ = load_data()
    return x, y


def time_once(benchmark, name, x, y, R: int = 100, epochs: int = 1):
    """Variant ``name`` (see :func:`run_variant`) timed by pytest-benchmark in a single round, after
    :func:`warm_up` (on 2 replicas) so that the round pays no one-time costs."""
    warm_up(x, y, [name])
    benchmark.pedantic(run_variant, args=(name, x, y, R, epochs), rounds=1, iterations=1)


def test_bench_train_batched(benchmark, data):
    time_once(benchmark, "batched", *data)


def test_bench_train_batched_shared_order(benchmark, data):
    time_once(benchmark, "batched_shared", *data)


def test_bench_train_batched_vmap(benchmark, data):
    time_once(benchmark, "batched_vmap", *data)


def test_bench_train_loop(benchmark, data):
    time_once(benchmark, "loop", *data)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="mlp", help="mlp (default) or w3 (CNNs with BatchNorm)")
    ap.add_argument("--replicas", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated batched variants to time against the loop (of {', '.join(VARIANTS)})")
    ap.add_argument("--loop-threads", default="", help="also time the loop with these torch thread counts, e.g. 1")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    variants = tuple(v for v in a.variants.split(",") if v)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    res = measure(a.replicas, a.epochs, a.repeats, a.n_train, a.batch_size, variants,
                  tuple(int(t) for t in a.loop_threads.split(",") if t), a.model)
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
