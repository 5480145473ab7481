"""Replica sharding over torch.distributed ranks (gloo on CPU, NCCL on GPUs).

Every rank is given the same list of R replicas and the same data; rank k of W owns the
contiguous slice :func:`shard_range` ``(R, k, W)``, computes its replicas' measures (in chunks of
``replica_chunk``, saved to ``output`` as they finish when asked) and the results are gathered,
in replica order, on every rank (``gather="all"``) or on rank 0 only (``gather="rank0"``; the
other ranks get None). Without an initialised process group the same call runs in one process.

Results do not depend on the split: each replica's solvers run on their own, and every replica's
probes are drawn from ``seed`` whatever its rank (common random numbers: the same probes for all;
``common_random_numbers=False``: one stream per replica, for the built-in measures).
"""
from __future__ import annotations

import copy
import os

import torch.distributed as dist

from .ambient import resetting_ambient
from .data import Batches
from .measures import split_refusal
from .replicas import validate_models
from .paths import expand_path
from .results_file import merge_records, part_files, write_atomic
from .resume import run_chunks

GATHER = ("all", "rank0")


def rank_and_world(group=None, use_distributed: bool = True) -> tuple[int, int]:
    """``(rank, world_size)`` of ``group`` (default group), or ``(0, 1)`` without torch.distributed."""
    if use_distributed and dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def shard_range(R: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous replicas ``[lo, hi)`` of ``rank``: sizes differ by at most one, the first
    ``R % world`` ranks get the extra replica; ranks past R get an empty slice."""
    base, extra = divmod(R, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@resetting_ambient
def batched_sharpness(models, data, *, replica_chunk: int | None = None, output: str | None = None,
                      group=None, gather: str = "all", device=None, use_distributed: bool = True, **kwargs):
    """:func:`fastcurv.batched_sharpness` with the replicas sharded over the ranks of ``group``.

    Args:
        models: the full list of R replicas (the same on every rank; only this rank's slice is used),
            in any form :func:`fastcurv.batched_sharpness` takes (a list, an ``nn.ModuleList``, a generator).
        data: loader or one (inputs, targets) batch (each rank reads all of it).
        replica_chunk: replicas per chunk within a rank (default: the rank's whole slice).
        output: results file (JSON lines, see :mod:`fastcurv.resume`; ``~`` expanded); with several
            ranks, rank k saves its chunks to ``output.part<k>`` and rank 0 writes the merged ``output``
            at the end.
            A restarted job (any number of ranks) skips every replica already saved.
        group: the process group (default: the default group); ranks are those within it.
        gather: "all" or "rank0" (the group's rank 0, whatever its global rank).
        device: move this rank's replicas there first (e.g. ``f"cuda:{local_rank}"`` for NCCL).
        Other keywords: those of :func:`fastcurv.batched_sharpness`.
    Returns a :class:`fastcurv.SharpnessResult` for all R replicas, its ``settings`` filled in as
    :func:`fastcurv.batched_sharpness` fills them (None on ranks > 0 with ``gather="rank0"``). A
    rank whose computation raises still joins the final gather, so the other ranks raise a
    RuntimeError naming it (and its message) instead of waiting forever; the failing rank re-raises
    its own error. Finished chunks stay saved in the part files.
    """
    from .sharpness import result_settings
    from .solvers.probes import as_seed

    if gather not in GATHER:
        raise ValueError(f"gather must be one of {GATHER}, got {gather!r}")
    models = validate_models(models)  # (what batched_sharpness takes: a list, an nn.ModuleList, a generator)
    if replica_chunk is not None and int(replica_chunk) < 1:
        raise ValueError(f"replica_chunk must be a positive number of replicas, got {replica_chunk!r}")
    if "seed" in kwargs:
        kwargs["seed"] = as_seed(kwargs["seed"])
    settings = result_settings(kwargs)  # (before check_determinism is taken out of kwargs below)
    if output is not None:
        output = expand_path(output)
    rank, world = rank_and_world(group, use_distributed)
    R = len(models)
    why = split_refusal(kwargs)  # only a job that really splits the replicas is refused
    if why is not None and (world > 1 or (replica_chunk is not None and int(replica_chunk) < R)):
        raise ValueError(why)
    lo, hi = shard_range(R, rank, world)
    if device is not None and hi > lo:
        models[lo:hi] = [copy.deepcopy(m).to(device) for m in models[lo:hi]]
    records, digest, config, error = [], None, None, None
    try:
        if hi > lo or world == 1:
            p = next(models[lo if hi > lo else 0].parameters())
            batches = Batches(data, device=p.device, dtype=p.dtype, cache=kwargs.get("cache_data", "auto"),
                              check_determinism=kwargs.pop("check_determinism", False))
            own = output if (output is None or world == 1) else f"{output}.part{rank}"
            read_also = [] if output is None else [output] + part_files(output)
            records, digest, config = run_chunks(models, batches, kwargs, lo=lo, hi=hi, replica_chunk=replica_chunk,
                                                 output=own, read_also=read_also, batches=batches)
    except Exception as exc:
        if world == 1:
            raise
        # still join the gather below, so that the other ranks learn of it instead of waiting forever
        error = (exc, f"{type(exc).__name__}: {str(exc)[:500]}")
    if world == 1:
        parts = [(records, digest, config, None)]
    else:
        mine = (records, digest, config, None if error is None else error[1])
        if gather == "all":
            parts = [None] * world
            dist.all_gather_object(parts, mine, group=group)
        else:
            parts = [None] * world if rank == 0 else None
            dist.gather_object(mine, parts, group_dst=0, group=group)  # (dst= is a global rank)
    if error is not None:
        raise error[0]
    if parts is None:  # rank > 0 with gather="rank0"
        return None
    failed = [(k, msg) for k, (_, _, _, msg) in enumerate(parts) if msg is not None]
    if failed:
        saved = "" if output is None else f"; the replicas every rank finished are saved in {output}.part<rank> for a rerun"
        raise RuntimeError("; ".join(f"rank {k} failed: {msg}" for k, msg in failed) + saved)
    everything = sorted((r for recs, _, _, _ in parts for r in recs), key=lambda r: r["start"])
    if output is not None and rank == 0:
        digest, config = next((d, c) for _, d, c, _ in parts if d is not None)
        write_atomic(output, digest, config, everything)  # one file with every replica; parts no longer needed
        for path in part_files(output):
            os.remove(path)
    res = merge_records(everything, R)
    res.settings = settings
    return res


__all__ = ["batched_sharpness", "rank_and_world", "shard_range"]
