"""Large-batch vs small-batch test accuracy against the training-set size (Bennett's large-batch experiment).

For each training-set size n, R replicas (seeds 0..R-1) are trained in one batched job with a small
batch and again with a large batch (``min(n, large)``), each until its full training cross-entropy
is <= ``target_loss`` (capped at ``epochs``, ``large_epochs`` for the large batch), so that both end at the same training fit; the
learning rate of the large batch is the small one scaled by sqrt(large / small) (no tuning).
Prints and writes (``--out``, CSV) the mean test accuracy of each, their difference
(small - large, percentage points) and a 95 % t interval over seeds (seed-paired).

    python examples/large_batch.py --sizes 2000 --replicas 5 --large 512 --large-epochs 300 --out large_batch.csv
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from scipy import stats

from fastcurv.datasets import load_dataset
from fastcurv.train import evaluate_population, mlp, train_population


def run(sizes, replicas, small, large, lr, epochs, target_loss, hidden, data, threads, large_epochs=None):
    torch.set_num_threads(threads)
    rows = []
    for n in sizes:
        x, y, xt, yt = load_dataset(data, None, n_train=n, seed=0, flatten=True)
        sizes_ = [x.shape[1], *hidden, 10]
        accs = {}
        for name, b, ep in (("small", small, epochs), ("large", min(n, large), large_epochs or epochs)):
            t = time.perf_counter()
            lr_b = lr * math.sqrt(b / small)
            models, hist = train_population(lambda: mlp(sizes_), x, y, replicas=replicas, lr=lr_b, momentum=0.9,
                                            batch_size=b, epochs=ep, target_loss=target_loss, progress=False)
            ev = evaluate_population(models, xt, yt)
            accs[name] = ev["accuracy"].numpy().astype(float)
            print(f"n={n} batch={b} lr={lr_b:.3g}: test acc {accs[name].mean():.4f}, "
                  f"epochs {np.mean(hist.epochs_run):.1f}, reached target {np.mean(hist.reached_target):.0%}, "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
        d = 100 * (accs["small"] - accs["large"])
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        rows.append({"n_train": n, "batch_small": small, "batch_large": min(n, large),
                     "acc_small": accs["small"].mean(), "acc_large": accs["large"].mean(),
                     "advantage_pp": d.mean(), "ci_low": d.mean() - half, "ci_high": d.mean() + half,
                     "replicas": replicas})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2000,10000,60000")
    ap.add_argument("--replicas", type=int, default=5)
    ap.add_argument("--small", type=int, default=64)
    ap.add_argument("--large", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--large-epochs", type=int, default=None,
                    help="epoch cap of the large batch (default: --epochs); large batches take far fewer steps per epoch")
    ap.add_argument("--target-loss", type=float, default=0.01)
    ap.add_argument("--hidden", default="128,128")
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="CSV file for the table")
    a = ap.parse_args(argv)
    rows = run([int(s) for s in a.sizes.split(",")], a.replicas, a.small, a.large, a.lr, a.epochs, a.target_loss,
               [int(h) for h in a.hidden.split(",")], a.data, a.threads, a.large_epochs)
    import pandas as pd

    df = pd.DataFrame(rows)
    print(df.to_string(index=False, float_format="{:.4g}".format))
    if a.out:
        df.to_csv(a.out, index=False)


if __name__ == "__main__":
    main()
