"""Scaling curves of the fused Hessian-vector product: time against R, K and width.

W1-style MLPs 784-H-H-10 on B MNIST images (synthetic only when no file is found, and then it
says so), cross-entropy. Three sweeps, each point timed in one run as the best of --repeats:

* R (replicas) from 1 to 200 at K=1, H=128: one matvec for all R, and one gradient for all R
  (a per-model loop and the fused engine's batched gradient; the faster is the unit);
* K (probes per matvec) at R=--k-replicas, H=128: time per probe;
* H (width) at R=--width-replicas, K=1: matvec and gradient.

    python benchmarks/scaling_json.py --out benchmarks/results/scaling.json --png benchmarks/results/scaling.png
    python benchmarks/scaling_json.py --device cuda --out scaling_gpu.json --png scaling_gpu.png

Every point is timed in the steady state of fastcurv's jobs (``hvp_json.best``: the repeats run
inside one ``heap_reuse``). Writes the JSON (seconds and ratios) and, with --png, one figure with the three
curves.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from hvp_json import best, load_batch  # noqa: E402

import fastcurv  # noqa: E402


def mlp(H: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 10))


def point(R: int, K: int, H: int, x, y, repeats: int, sync) -> dict:
    """Seconds of one fused matvec with K probes and of one gradient for all R (a per-model loop
    and the fused batched gradient; ``per_probe_over_gradient`` divides by the faster)."""
    torch.manual_seed(0)
    models = [mlp(H).to(x.device) for _ in range(R)]
    op = fastcurv.HessianOperator(models, (x, y), backend="fused")
    V = torch.randn(R, K, op.P, device=x.device)
    params = [list(m.parameters()) for m in models]

    def grad_loop():
        for m, p in zip(models, params):
            torch.autograd.grad(nn.functional.cross_entropy(m(x), y), p)

    mv = best(lambda: op.matvec(V), repeats, sync)
    g = best(grad_loop, repeats, sync)
    gb = best(lambda: op.loss_and_gradient(), repeats, sync)
    return {"R": R, "K": K, "H": H, "P": op.P, "matvec_s": mv, "gradient_loop_s": g, "gradient_batched_s": gb,
            "per_probe_over_gradient": mv / K / min(g, gb)}


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    r = res["replicas"]
    ax[0].plot([p["R"] for p in r], [p["matvec_s"] for p in r], "o-", label="fused matvec (K=1)")
    ax[0].plot([p["R"] for p in r], [p["gradient_loop_s"] for p in r], "s--", label="gradient, per-model loop")
    ax[0].plot([p["R"] for p in r], [p["gradient_batched_s"] for p in r], "^:", label="gradient, fused batched")
    ax[0].set(xlabel="replicas R", ylabel="seconds", title="time against R (H=128)")
    k = res["probes"]
    ax[1].plot([p["K"] for p in k], [p["per_probe_over_gradient"] for p in k], "o-")
    ax[1].axhline(1.0, color="gray", lw=0.8)
    ax[1].set(xlabel="probes K", ylabel="matvec time per probe / gradient", title=f"per-probe cost (R={k[0]['R']}; unit: the faster gradient)")
    w = res["width"]
    ax[2].plot([p["H"] for p in w], [p["per_probe_over_gradient"] for p in w], "o-")
    ax[2].axhline(1.0, color="gray", lw=0.8)
    ax[2].set(xlabel="hidden width H", ylabel="matvec / gradient", title=f"against width (R={w[0]['R']}, K=1)")
    for a in ax:
        a.grid(alpha=0.3)
        a.set_ylim(bottom=0)
    ax[0].legend()
    fig.suptitle(f"fastcurv fused HVP scaling, {res['device']}, {res['data']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 10, 25, 50, 100, 200])
    p.add_argument("--probes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    p.add_argument("--k-replicas", type=int, default=50)
    p.add_argument("--width-replicas", type=int, default=20)
    p.add_argument("--data", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--png", default=None)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    x, y, source = load_batch(a.batch, a.data)
    x, y = x.to(dev), y.to(dev)
    res = {"device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
           "data": f"B={a.batch} {source}", "replicas": [], "probes": [], "width": []}
    sweeps = [("replicas", [(R, 1, 128) for R in a.replicas]), ("probes", [(a.k_replicas, K, 128) for K in a.probes]),
              ("width", [(a.width_replicas, 1, H) for H in a.widths])]
    for key, points in sweeps:
        for R, K, H in points:
            res[key].append(point(R, K, H, x, y, a.repeats, sync))
            print(res[key][-1], flush=True)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    if a.png:
        plot(res, a.png)
    return res


if __name__ == "__main__":
    main()
