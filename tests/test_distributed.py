"""Replica sharding over torch.distributed: 2 CPU processes (gloo on loopback) give the results
of the single-process run, gathered in replica order on every rank."""
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcurv
from fastcurv.distributed import rank_and_world, shard_range

sys.path.insert(0, os.path.dirname(__file__))
import _dist_worker as W  # noqa: E402


def test_shard_range_covers_replicas_contiguously():
    for R in (0, 1, 5, 7, 64):
        for world in (1, 2, 3, 8):
            spans = [shard_range(R, k, world) for k in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == R
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            sizes = [hi - lo for lo, hi in spans]
            assert max(sizes) - min(sizes) <= 1


def test_without_process_group_runs_in_one_process():
    assert not dist.is_initialized()
    assert rank_and_world() == (0, 1)
    models, data = W.job(R=3)
    ref = fastcurv.batched_sharpness(models, data, **W.KW)
    got = fastcurv.batched_sharpness(models, data, distributed=True, **W.KW)
    for k in ref.values:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12)



@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_gloo_processes_equal_single_process(tmp_path, monkeypatch):
    mp.spawn(W._dist_main, args=(2, str(tmp_path)), nprocs=2, join=True)
    models, data = W.job()
    ref = fastcurv.batched_sharpness(models, data, **W.KW)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got["values"]) == set(ref.values)
        for k, v in ref.values.items():
            assert got["values"][k].shape == v.shape == (7,)
            torch.testing.assert_close(got["values"][k], v, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got["nodes"], ref.spectrum.nodes, rtol=1e-9, atol=1e-12)
        assert got["flags"] == ref.flags
    # rank 0 merged both ranks' part files into one results file, which a 1-process rerun reuses
    assert (tmp_path / "dist.jsonl").exists() and not list(tmp_path.glob("dist.jsonl.part*"))
    def no_compute(*a, **k):
        raise AssertionError("every replica is saved: nothing should be recomputed")

    monkeypatch.setattr(fastcurv.sharpness, "batched_sharpness", no_compute)
    again = fastcurv.batched_sharpness(models, data, output=str(tmp_path / "dist.jsonl"), **W.KW)
    for k, v in ref.values.items():
        torch.testing.assert_close(again[k], v, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_data_sharded_over_two_gloo_processes_equals_full_data(tmp_path):
    mp.spawn(W._data_main, args=(2, str(tmp_path)), nprocs=2, join=True)
    models, data = W.job(R=3)
    half = fastcurv.batched_sharpness(models, data[:1], backend="fused", **W.KW)
    for backend in ("fused", "func"):
        kw = W.KW if backend == "fused" else dict(W.KW, measures=("lambda_max",))
        ref = fastcurv.batched_sharpness(models, data, backend=backend, **kw)
        for k in ref.values:  # one share alone is not the answer
            assert not torch.allclose(half[k], ref[k], rtol=1e-3)
        for rank in (0, 1):
            got = torch.load(tmp_path / f"data_rank{rank}.pt")[backend]
            assert set(got["values"]) == set(ref.values)
            for k, v in ref.values.items():
                torch.testing.assert_close(got["values"][k], v, rtol=1e-8, atol=1e-10)
            if ref.spectrum is not None:
                torch.testing.assert_close(got["nodes"], ref.spectrum.nodes, rtol=1e-8, atol=1e-10)


def _run_two_ranks_or_fail(fn, args, seconds=120, nprocs=2):
    """Spawn ``fn`` on 2 ranks (``nprocs``); fail the test (killing them) if they have not ended after ``seconds``."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"a rank still waits for the failed one after {seconds} s")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_a_failing_rank_makes_the_others_raise_instead_of_hang(tmp_path):
    _run_two_ranks_or_fail(W._failing_main, (2, str(tmp_path)))
    assert (tmp_path / "error1.txt").read_text() == "FloatingPointError: injected failure on rank 1"
    other = (tmp_path / "error0.txt").read_text()
    assert other.startswith("RuntimeError: rank 1 failed: FloatingPointError: injected failure on rank 1"), other
    assert "saved in" in other and list(tmp_path.glob("fail.jsonl.part0"))  # rank 0's replicas are kept


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("passes", [0, 3])
def test_a_failing_rank_in_data_sharding_makes_the_others_raise_instead_of_hang(tmp_path, passes):
    """Rank 1's loader fails while the operator is built (0 passes) or in a later matvec (3)."""
    _run_two_ranks_or_fail(W._data_failing_main, (2, str(tmp_path), passes))
    assert (tmp_path / "data_error1.txt").read_text() == "OSError: injected read error on rank 1"
    other = (tmp_path / "data_error0.txt").read_text()
    what = "building the operator" if passes == 0 else "a Hessian-vector product"
    assert other == f"RuntimeError: rank 1 failed in {what} (distributed_data=True): OSError: injected read error on rank 1", other


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("what,words", [("replicas", "replicas (rank 0: 3, rank 1: 2)"), ("seed", "setting seed (rank 0: 0, rank 1: 5)")])
def test_ranks_that_disagree_in_data_sharding_raise_instead_of_hang(tmp_path, what, words):
    """One replica fewer on rank 1 made both ranks hang; another seed summed mismatched probes."""
    _run_two_ranks_or_fail(W._mismatch_main, (2, str(tmp_path), what))
    for rank in (0, 1):
        msg = (tmp_path / f"mismatch{rank}.txt").read_text()
        assert msg.startswith("ValueError: distributed_data=True: the ranks disagree on " + words), msg


def test_data_sharding_needs_a_process_group_and_core_measures():
    models, data = W.job(R=2)
    with pytest.raises(ValueError, match="process group"):
        fastcurv.HessianOperator(models, data, distributed_data=True)
    with pytest.raises(ValueError, match="read the data themselves"):
        fastcurv.batched_sharpness(models, data, distributed_data=True, measures=("rho_sharpness",), progress=False)
    with pytest.raises(ValueError, match="cannot be combined"):
        fastcurv.batched_sharpness(models, data, distributed_data=True, distributed=True, progress=False)
    with pytest.raises(ValueError, match="output="):
        fastcurv.batched_sharpness(models, data, distributed_data=True, output="r.jsonl", progress=False)


def _subgroup_main(rank, world, out_dir):
    """Global ranks 1 and 2 shard a job over their own group, gathered on the group's rank 0 (global
    rank 1); each member saves what it got (the values, None, or the error), global rank 0 waits."""
    from fastcurv import distributed

    torch.set_num_threads(1)
    with W._group(rank, world, out_dir):
        group = dist.new_group([1, 2])  # (every rank takes part in creating it)
        if rank > 0:
            models, data = W.job(R=3)
            try:
                res = distributed.batched_sharpness(models, data, group=group, gather="rank0", replica_chunk=1,
                                                    output=os.path.join(out_dir, "sub.jsonl"), measures=("lambda_max",),
                                                    max_iter=20, progress=False)
                got = None if res is None else res["lambda_max"]
            except Exception as exc:  # (saved, so that every rank still reaches the final barrier)
                got = f"{type(exc).__name__}: {exc}"
            torch.save(got, os.path.join(out_dir, f"sub{rank}.pt"))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_gather_on_rank0_of_a_group_without_global_rank_0(tmp_path):
    """A group of global ranks 1 and 2 with gather="rank0": both members raised "Global rank 0 is
    not part of group" after computing their replicas (the group's rank 0 was passed to
    gather_object as the global rank). Three processes: a group of two without global rank 0."""
    _run_two_ranks_or_fail(_subgroup_main, (3, str(tmp_path)), nprocs=3)
    got, other = (torch.load(tmp_path / f"sub{r}.pt") for r in (1, 2))
    models, data = W.job(R=3)
    ref = fastcurv.batched_sharpness(models, data, measures=("lambda_max",), max_iter=20, progress=False)
    assert other is None and isinstance(got, torch.Tensor), (got, other)
    torch.testing.assert_close(got, ref["lambda_max"], rtol=1e-10, atol=1e-12)
    assert (tmp_path / "sub.jsonl").is_file() and not list(tmp_path.glob("sub.jsonl.part*"))  # merged by group rank 0
