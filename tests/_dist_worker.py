"""Worker for test_distributed.py and test_resume.py: a tiny fixed job (models and data from seeds)."""
import os
import sys
from contextlib import contextmanager

import torch
from torch import nn

import fastcurv

MEASURES = ("lambda_max", "trace", "spectrum")


def job(R=7, seed=0):
    """R replicas of a 5-8-3 tanh MLP in float64 and two ragged batches, all from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    models = []
    for _ in range(R):
        m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        models.append(m)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    return models, [(x[:16], y[:16]), (x[16:], y[16:])]


KW = dict(measures=MEASURES, slq_steps=8, max_iter=40, progress=False)


@contextmanager
def _group(rank, world, out_dir):
    """A gloo group over a file store in ``out_dir`` (unlike a TCP store, no rank hosts a server
    that the others still talk to while they tear down). A block that ends normally ends at a
    barrier, and the worker process then exits at once (``os._exit(0)``, after flushing): gloo's
    teardown sometimes aborts the process (``terminate called without an active exception``, seen
    in CI and here in about 1 of 8 runs, after every result was written), and what is tested here
    is fastcurv's behaviour, not gloo's destructors."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank, world_size=world)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _dist_main(rank, world, out_dir):
    with _group(rank, world, out_dir):
        models, data = job()
        res = fastcurv.batched_sharpness(models, data, distributed=True, replica_chunk=2,
                                         output=os.path.join(out_dir, "dist.jsonl"), **KW)
        torch.save({"values": res.values, "nodes": res.spectrum.nodes, "flags": res.flags},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def _data_main(rank, world, out_dir):
    """Data sharding: rank k reads only batch k of the job's data (ragged shares: 16 and 14 samples)."""
    with _group(rank, world, out_dir):
        models, data = job(R=3)
        out = {}
        for backend in ("fused", "func"):
            kw = KW if backend == "fused" else dict(KW, measures=("lambda_max",))
            res = fastcurv.batched_sharpness(models, data[rank:rank + 1], distributed_data=True, backend=backend, **kw)
            out[backend] = {"values": res.values, "nodes": None if res.spectrum is None else res.spectrum.nodes}
        torch.save(out, os.path.join(out_dir, f"data_rank{rank}.pt"))


def _failing_main(rank, world, out_dir):
    """Replica sharding where rank 1's computation raises: each rank writes what it raised."""
    import fastcurv.sharpness as S

    with _group(rank, world, out_dir):
        if rank == 1:
            def broken(*a, **k):
                raise FloatingPointError("injected failure on rank 1")

            S.batched_sharpness = broken  # what each chunk calls (the entry point stays the real one)
        models, data = job()
        try:
            fastcurv.batched_sharpness(models, data, distributed=True, output=os.path.join(out_dir, "fail.jsonl"), **KW)
            msg = "no error"
        except Exception as exc:  # noqa: BLE001 - the test reads what each rank raised
            msg = f"{type(exc).__name__}: {exc}"
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(msg)


def _mismatch_main(rank, world, out_dir, what):
    """Data sharding where rank 1 has one replica fewer ("replicas") or another seed ("seed"): each
    rank writes what it raised."""
    with _group(rank, world, out_dir):
        models, data = job(R=3 - (rank == 1 and what == "replicas"))
        kw = dict(KW, measures=("lambda_max",), seed=5 if rank == 1 and what == "seed" else 0)
        try:
            fastcurv.batched_sharpness(models, data[rank:rank + 1], distributed_data=True, **kw)
            msg = "no error"
        except Exception as exc:  # noqa: BLE001 - the test reads what each rank raised
            msg = f"{type(exc).__name__}: {exc}"
        with open(os.path.join(out_dir, f"mismatch{rank}.txt"), "w") as f:
            f.write(msg)


class _FailingLoader:
    """Yields ``batches`` on its first ``passes`` passes, then raises (a read error mid-job)."""

    def __init__(self, batches, passes):
        self.batches, self.passes = batches, passes

    def __iter__(self):
        if self.passes == 0:
            raise OSError("injected read error on rank 1")
        self.passes -= 1
        return iter(self.batches)


def _data_failing_main(rank, world, out_dir, passes):
    """Data sharding where rank 1's loader fails after ``passes`` passes: each rank writes what it raised."""
    with _group(rank, world, out_dir):
        models, data = job(R=3)
        share = data[rank:rank + 1] if rank == 0 else _FailingLoader(data[1:], passes)
        try:
            fastcurv.batched_sharpness(models, share, distributed_data=True, cache_data=False, **KW)
            msg = "no error"
        except Exception as exc:  # noqa: BLE001 - the test reads what each rank raised
            msg = f"{type(exc).__name__}: {exc}"
        with open(os.path.join(out_dir, f"data_error{rank}.txt"), "w") as f:
            f.write(msg)


if __name__ == "__main__":  # resumable job: python _dist_worker.py OUTPUT [slow]
    models, data = job(R=6)
    if len(sys.argv) > 2 and sys.argv[2] == "slow":
        import time

        import fastcurv.sharpness as S

        real = S.batched_sharpness

        def slow(*a, **k):  # each chunk (looked up as fastcurv.sharpness.batched_sharpness) takes >= 1 s more
            time.sleep(1.0)
            return real(*a, **k)

        S.batched_sharpness = slow  # fastcurv.batched_sharpness (the entry point) is still the real one
    res = fastcurv.batched_sharpness(models, data, replica_chunk=2, output=sys.argv[1], **KW)
    torch.save(res.values, sys.argv[1] + ".pt")
