"""Calibration of the func backend's memory estimates (``fastcurv.backends.func``).

For each model and replica count, one child process per case measures the peak memory (see
``peak_memory.measure``) of one matvec with the func backend on one batch:

* ``reuse``: the first K=1 matvec with ``reuse=True`` in mode "forward" (linearizing the batch,
  then one product), and what the linearization still holds after it;
* ``graph``: the same in mode "graph" (the batch's retained double-backward graph);
* ``hvp``: one matvec with ``reuse=False`` for K=1 and K=2 probes (vmapped jvp of grad, one chunk).

and divides by the replicas' module output bytes, split into feature maps (outputs with 4 or more
dimensions) and the rest, as ``linearization_bytes``, ``graph_bytes`` and ``hvp_bytes`` weight them
(the first two also count the parameters' bytes). It prints the ratios next to the backend's
current estimates and writes them as JSON:

    python benchmarks/func_memory.py --out func_memory.json
    python benchmarks/func_memory.py --cases mlp:20:1000 cnn3:4:128

Cases: ``model:R:n`` with model one of ``mlp`` (784-128-128-10), ``w3`` (W3's CNN), ``w4``
(W4's ResNet), ``cnn3`` (3 conv layers 32-64-64 on 3x32x32 inputs). Random inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CASES = ["mlp:10:1000", "mlp:50:1000", "w3:10:500", "w4:8:256", "cnn3:4:128"]


def _model(kind):
    from torch import nn

    if kind == "mlp":
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)), (784,)
    if kind == "cnn3":
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(64, 10)), (3, 32, 32)
    sys.path.insert(0, HERE)
    import hvp_json

    if kind == "w3":
        return hvp_json.w3_cnn(), (1, 28, 28)
    if kind == "w4":
        return hvp_json.W4ResNet(), (1, 28, 28)
    raise SystemExit(f"unknown model {kind!r}: mlp, w3, w4 or cnn3")


def child(kind, R, n, mode):
    """One case in this process: prints one JSON line."""
    import torch

    import fastcurv
    from fastcurv.backends import func

    sys.path.insert(0, HERE)
    import peak_memory

    torch.set_num_threads(2)
    models = []
    for s in range(R):
        torch.manual_seed(s)
        m, shape = _model(kind)
        models.append(m.eval())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
    opts = {"reuse": mode != "hvp", "mode": "graph" if mode == "graph" else "forward"}
    warm = fastcurv.HessianOperator(models[:1], (x[:4], y[:4]), backend="func", backend_options=opts)
    warm.matvec(torch.randn(1, 2, warm.replicas.P))
    del warm
    op = fastcurv.HessianOperator(models, (x, y), backend="func", backend_options=opts)
    rs = op.replicas
    flat, maps = (b * R for b in func._output_parts(rs, x))
    out = {"model": kind, "R": R, "n": n, "mode": mode, "flat_output_bytes": flat, "feature_map_bytes": maps}
    if mode in ("reuse", "graph"):
        from fastcurv._heap import trim

        v = torch.randn(R, 1, rs.P)
        trim()
        before = peak_memory.status_bytes("VmRSS")
        with peak_memory.measure(x.device) as peak:
            op.matvec(v)
        trim()  # what the linearization (cached in the backend) still holds
        out.update(peak=peak.bytes, held=peak_memory.status_bytes("VmRSS") - before,
                   estimate=(func.graph_bytes if mode == "graph" else func.linearization_bytes)(rs, x) * R)
    else:
        for K in (1, 2):
            v = torch.randn(R, K, rs.P)
            with peak_memory.measure(x.device) as peak:
                op.matvec(v)
            out[f"peak_K{K}"] = peak.bytes
        out["estimate_K1"] = func.hvp_bytes(rs, x) * R
    print(json.dumps(out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=DEFAULT_CASES, help="model:R:n (default: %(default)s)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child", nargs=4, metavar=("MODEL", "R", "N", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a.child[0], int(a.child[1]), int(a.child[2]), a.child[3])
    rows = []
    for case in a.cases:
        kind, R, n = case.split(":")
        for mode in ("reuse", "graph", "hvp"):
            p = subprocess.run([sys.executable, __file__, "--child", kind, R, n, mode], capture_output=True, text=True)
            if p.returncode:
                print(f"{case} {mode}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(r)
            out_bytes = r["flat_output_bytes"] + r["feature_map_bytes"]
            share = r["feature_map_bytes"] / out_bytes
            if mode != "hvp":
                print(f"{case:14s} {mode:6s} peak {r['peak'] / 2**20:7.0f} MiB ({r['peak'] / out_bytes:5.1f}x outputs), "
                      f"held {r['held'] / out_bytes:5.1f}x, estimate {r['estimate'] / 2**20:7.0f} MiB; "
                      f"feature maps {share:.0%} of outputs", flush=True)
            else:
                print(f"{case:14s} hvp    peak K=1 {r['peak_K1'] / 2**20:7.0f} MiB ({r['peak_K1'] / out_bytes:5.1f}x), "
                      f"K=2 {r['peak_K2'] / 2**20:7.0f} MiB ({r['peak_K2'] / out_bytes / 2:5.1f}x per probe), "
                      f"estimate K=1 {r['estimate_K1'] / 2**20:7.0f} MiB", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
