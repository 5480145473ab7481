"""The fused engine's sparse hidden products on trained MLPs: is ``HIDDEN_SPARSE_MAX_DENSITY`` right?

Trains R ReLU MLPs 784-H-H-10 for a few epochs on MNIST (``fastcurv.train_population``; synthetic
data only when no MNIST file is found, and then it says so), then times the fused K=8 matvec on B
training images with ``sparse_hidden`` on (the hidden layers' products from their ReLU patterns,
``csr_masked_linear`` and friends), off (dense GEMMs) and automatic (sparse where at most
``hidden_sparse_max_density()`` of a layer's ReLU outputs are nonzero). Trained ReLU nets sit near
40-50% nonzero; to sweep the density, every hidden layer's bias is shifted by each of ``--shifts``
(a larger bias opens more ReLUs), which changes the density and nothing about the products' shapes.

    python benchmarks/sparse_hidden_json.py --out sparse_hidden_w1.json                     # W1 shape
    python benchmarks/sparse_hidden_json.py --hidden 512 --replicas 20 --shifts 0 0.3 0.45 0.6 1.2 \
        --out sparse_hidden_w2.json                                                         # W2 shape

Per shift: each hidden ReLU's fraction of nonzero outputs on the batch (mean, min and max over the
replicas), the median of ``--repeats`` matvecs per mode, the three modes timed in alternation (one
matvec of each in turn), and ``dense_over_sparse``: off / on (above 1: the sparse products pay).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

import fastcurv
from fastcurv import _ext
from fastcurv.backends.fused.backend import hidden_sparse_max_density
from fastcurv.train import mlp, train_population

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hvp_json import load_batch  # noqa: E402

MODES = {"on": True, "off": False, "auto": None}


def relu_densities(models, x) -> list[dict]:
    """Per hidden ReLU: the fraction of its outputs on ``x`` that are nonzero (mean, min, max over models)."""
    per_model = []
    with torch.no_grad():
        for m in models:
            a, d = x, []
            for layer in m:
                a = layer(a)
                if isinstance(layer, torch.nn.ReLU):
                    d.append(float((a != 0).float().mean()))
            per_model.append(d)
    t = torch.tensor(per_model)
    return [{"mean": round(float(c.mean()), 4), "min": round(float(c.min()), 4), "max": round(float(c.max()), 4)}
            for c in t.T]


def shifted(models, shift: float):
    """Copies of ``models`` with every hidden Linear layer's bias plus ``shift``."""
    out = [copy.deepcopy(m) for m in models]
    with torch.no_grad():
        for m in out:
            for layer in [lay for lay in m if isinstance(lay, torch.nn.Linear)][:-1]:
                layer.bias += shift
    return out


def time_modes(models, x, y, K: int, repeats: int) -> dict:
    """Median seconds of one K-probe matvec per sparse_hidden mode, the modes in alternation."""
    ops = {name: fastcurv.HessianOperator(models, (x, y), backend="fused", backend_options={"sparse_hidden": v})
           for name, v in MODES.items()}
    V = torch.randn(len(models), K, ops["on"].replicas.P, generator=torch.Generator().manual_seed(0))
    for op in ops.values():  # builds the cached state, warms the caches
        op.matvec(V)
    times = {name: [] for name in ops}
    for _ in range(repeats):
        for name, op in ops.items():
            t0 = time.perf_counter()
            op.matvec(V)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--replicas", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1000, help="images in the Hessian's batch")
    ap.add_argument("--train", type=int, default=10000, help="training images")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shifts", type=float, nargs="+", default=[0.0, 0.3, 0.6, 0.8, 1.0, 1.5])
    ap.add_argument("--data", default=None, help="MNIST root (default: search ../shared/data, FASTCURV_DATA)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    x, y, source = load_batch(args.train, args.data)
    t0 = time.perf_counter()
    models, _ = train_population(lambda: mlp([784, args.hidden, args.hidden, 10]), x, y, replicas=args.replicas,
                                 epochs=args.epochs, lr=0.05, progress=False)
    res = {"data": source, "hidden": args.hidden, "replicas": args.replicas, "batch": args.batch,
           "epochs": args.epochs, "probes": args.probes, "repeats": args.repeats,
           "train_seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "cpu_level": _ext.cpu_level(),
           "hidden_sparse_max_density": hidden_sparse_max_density(), "torch": torch.__version__, "runs": []}
    xb, yb = x[:args.batch], y[:args.batch]
    for shift in args.shifts:
        ms = shifted(models, shift)
        secs = time_modes(ms, xb, yb, args.probes, args.repeats)
        run = {"bias_shift": shift, "relu_density": relu_densities(ms, xb),
               "seconds": {k: round(v, 4) for k, v in secs.items()},
               "dense_over_sparse": round(secs["off"] / secs["on"], 3),
               "auto_over_best": round(secs["auto"] / min(secs["on"], secs["off"]), 3)}
        res["runs"].append(run)
        print(f"shift {shift}: density {[d['mean'] for d in run['relu_density']]}, "
              f"on {secs['on']:.3f} s, off {secs['off']:.3f} s, auto {secs['auto']:.3f} s", file=sys.stderr)
    text = json.dumps(res, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
