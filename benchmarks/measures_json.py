"""Cost of every sharpness measure for R replicas of the reference MLP 784-128-128-10 on n MNIST
training images, in gradient units (one unit = one ``HessianOperator.loss_and_gradient()`` call:
loss and gradient of all R replicas over the n images, timed in the steady state like
hvp_json.py's unit: the fastest of 3 calls after a warm-up, all inside one ``heap_reuse``, as a
job's calls run; the JSON's ``gradient_unit`` says so), measured in one run; plus the invariance
audit of the seed result (alpha = 10) on the same replicas. Writes JSON.

    python benchmarks/measures_json.py [--R 100] [--n 1000] [--out measures_bench.json] [--library-defaults]
                                       [--measures NAME ...] [--no-audit]

Data: /work/shared/data/mnist (gzip IDX; or $FASTCURV_MNIST); synthetic Gaussian images with random
labels when the files are absent (the JSON then says ``"data": "synthetic"``). The replicas are
trained for ``--train-steps`` (default :data:`TRAIN_STEPS`) full-batch gradient steps (vmapped,
seeds 0..R-1) so they sit at plausible points. By default the Monte-Carlo and iteration counts are
reduced (see QUICK_OPTIONS; each record's ``options``) to keep the run at a few minutes;
--library-defaults uses the documented defaults of every measure instead. A measure's cost grows
with these counts: each record also holds the median solver iterations (matvecs per replica) where
the measure reports them (``iterations``, e.g. lambda_max's Lanczos steps).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import fastcurv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hvp_json import best  # noqa: E402

TRAIN_STEPS = 60
MEASURES = ("lambda_max", "trace", "rho_sharpness", "adaptive_rho_sharpness", "avg_rho_sharpness",
            "adaptive_avg_rho_sharpness", "mw_sharpness", "epsilon_sharpness", "josz_variation", "josz_level_distance",
            "relative_flatness", "fisher_rao", "pac_bayes", "ggn_lambda_max", "ggn_trace", "fisher_lambda_max",
            "fisher_trace", "epsilon_sharpness_subspace", "jiang_sharpness")
QUICK_OPTIONS = {
    "avg_rho_sharpness": {"n_samples": 20},  # Andriushchenko et al.'s runs use 20
    "adaptive_avg_rho_sharpness": {"n_samples": 20},
    "mw_sharpness": {"n_samples": 20},
    "josz_level_distance": {"n_bisect": 4, "max_doublings": 4},
    "relative_flatness": {"num_probes": 20},
    "pac_bayes": {"depth": 8},
    "jiang_sharpness": {"n_iter": 5},  # depth 15: the isotropic alpha (~2e-3 here) needs ~10 halvings of [0, 2]
    "ggn_lambda_max": {"max_iter": 30},
    "fisher_lambda_max": {"max_iter": 30},
}


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def mnist(n: int):
    root = Path(os.environ.get("FASTCURV_MNIST", "/work/shared/data/mnist"))
    img, lab = root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz"
    if img.exists() and lab.exists():
        x = torch.from_numpy(read_idx(img)[:n].astype(np.float32) / 255.0).reshape(n, 784)
        x = (x - 0.1307) / 0.3081
        y = torch.from_numpy(read_idx(lab)[:n].astype(np.int64))
        return x, y, f"MNIST train[:{n}] from {root}"
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g), "synthetic"


def make_models(R: int):
    models = []
    for r in range(R):
        torch.manual_seed(r)
        models.append(nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)))
    return models


def train(models, x, y, steps: int, lr: float = 0.5):
    """Full-batch gradient descent of all replicas at once (vmapped)."""
    if steps <= 0:
        return models
    base = models[0]
    names = [n for n, _ in base.named_parameters()]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names}

    def loss(p):
        return nn.functional.cross_entropy(functional_call(base, p, (x,)), y)

    g = vmap(grad(loss))
    for _ in range(steps):
        gr = g(params)
        params = {n: params[n] - lr * gr[n] for n in names}
    with torch.no_grad():
        for r, m in enumerate(models):
            for n, p in m.named_parameters():
                p.copy_(params[n][r])
    return models


def loader_of(x, y, batch):
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]


GRADIENT_UNIT = "steady state: the fastest of 3 loss_and_gradient() calls after a warm-up, inside one heap_reuse"


def gradient_unit(models, loader, repeats=3):
    """Seconds of one ``loss_and_gradient()`` for all replicas, as :data:`GRADIENT_UNIT` says
    (``hvp_json.best``): a measure's job runs its calls inside one ``heap_reuse`` too, where each
    call reuses the pages the one before freed (single calls, each in its own, took 1.1-2x as long)."""
    return best(fastcurv.HessianOperator(models, loader).loss_and_gradient, repeats, lambda: None, steady=True)


def workload(R: int, n: int, batch: int, train_steps: int = TRAIN_STEPS):
    """``(models, loader, x, y, source)``: R reference MLPs trained for ``train_steps`` steps on the
    first n images, and those images in batches of ``batch``."""
    x, y, source = mnist(n)
    models = train(make_models(R), x, y, train_steps)
    return models, loader_of(x, y, batch), x, y, source


def run(R=100, n=1000, batch=250, train_steps=TRAIN_STEPS, library_defaults=False, measures=MEASURES, audit_R=20,
        log=print, with_audit=True):
    models, loader, x, y, source = workload(R, n, batch, train_steps)
    unit = gradient_unit(models, loader)
    log(f"data: {source}; R={R}, n={n}; gradient unit {unit:.3f} s")
    options = {} if library_defaults else QUICK_OPTIONS
    records = []
    for m in measures:
        t = time.perf_counter()
        res = fastcurv.batched_sharpness(models, loader, measures=(m,), measure_options=options, progress=False)
        sec = time.perf_counter() - t
        cols = {c: float(torch.nanmedian(v)) for c, v in res.values.items()}
        rec = {"measure": m, "seconds": sec, "gradient_units": sec / unit, "options": options.get(m, {}),
               "median_values": cols, "ok": int(res.ok.sum()),
               "iterations": {c: float(v.double().median()) for c, v in res.iterations.items()},
               "converged": {c: int(v.sum()) for c, v in res.converged.items()}}
        records.append(rec)
        log(f"{m:28s} {sec:7.2f} s  {sec / unit:7.1f} gradient units  {cols}")
    with torch.no_grad():
        acc = float(np.mean([(m(x).argmax(-1) == y).float().mean().item() for m in models]))
    out = {
        "benchmark": "measures", "data": source, "R": R, "n": n, "batch": batch, "train_steps": train_steps,
        "train_accuracy_mean": acc, "gradient_unit_seconds": unit, "gradient_unit": GRADIENT_UNIT,
        "library_defaults": library_defaults,
        "records": records,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    if not with_audit:
        return out
    t = time.perf_counter()
    audit = fastcurv.invariance_audit(models[:audit_R], loader, measures=("lambda_max", "trace", "fisher_rao",
                                      "adaptive_avg_rho_sharpness", "relative_flatness"), alpha=10.0,
                                      measure_options={"adaptive_avg_rho_sharpness": {"n_samples": 20},
                                                       "relative_flatness": {"num_probes": 20}})
    audit_sec = time.perf_counter() - t
    table = audit.table.reset_index().to_dict(orient="records")
    log(audit.table.to_string())
    log(f"audit: max output change {audit.table.attrs['max_output_change']:.2e}, "
        f"predictions changed {audit.table.attrs['predictions_changed']}, {audit_sec:.1f} s")
    out["audit"] = {"alpha": 10.0, "R": audit_R, "table": table, "seconds": audit_sec,
                    "max_output_change": audit.table.attrs["max_output_change"],
                    "predictions_changed": audit.table.attrs["predictions_changed"]}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--R", type=int, default=100)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--train-steps", type=int, default=TRAIN_STEPS)
    ap.add_argument("--library-defaults", action="store_true")
    ap.add_argument("--measures", nargs="*", default=list(MEASURES), help="measure names to time (default: all)")
    ap.add_argument("--no-audit", action="store_true", help="skip the alpha = 10 invariance audit")
    ap.add_argument("--out", default="measures_bench.json")
    args = ap.parse_args()
    out = run(args.R, args.n, args.batch, args.train_steps, args.library_defaults, tuple(args.measures),
              with_audit=not args.no_audit)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
