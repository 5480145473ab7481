"""Rows of the stacked replica tensors (``[R, ...]``, one row per replica) during training: rows kept
and written back (:func:`_rows`, :func:`_restore_rows`), a ``[R]`` vector broadcast over a tensor's
rows (:func:`_bcast`), a weight stored transposed (:func:`_transposed_storage`), and the rows of
the batch-size groups merged into one population's (:func:`_merge_rows`).
"""
from __future__ import annotations

import torch


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``v [R]`` as a view ``[R, 1, ..., 1]`` that broadcasts over the rows of ``like [R, ...]``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _rows(bufs: dict, which: torch.Tensor):
    """``(which, copies of the rows which of every buffer)``, or None when there is nothing to keep."""
    if not bufs or not bool(which.any()):
        return None
    return which, {n: b[which].clone() for n, b in bufs.items()}


def _restore_rows(bufs: dict, kept) -> None:
    """Write rows kept by :func:`_rows` back into the buffers ``bufs`` (views of the stacked buffers)."""
    if kept is not None:
        which, rows = kept
        for n, b in bufs.items():
            b[which] = rows[n]


def _transposed_storage(t: torch.Tensor) -> torch.Tensor:
    """``t [R, out, in]`` with the same values, stored as a contiguous ``[R, in, out]`` (a transposed view)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _merge_rows(parts: list, R: int):
    """The rows of replica groups ``parts = [(replica indices, rows)]`` as one population's, on the CPU:
    ``rows`` a tensor ``[R_g, ...]`` or a dict of them (nested); row ``j`` of a group goes to replica
    ``indices[j]``. A single group of every replica in order is returned as it is (on the CPU)."""
    if len(parts) == 1 and parts[0][0] == list(range(R)):
        return _to_cpu(parts[0][1])
    first = parts[0][1]
    if isinstance(first, dict):
        return {k: _merge_rows([(i, rows[k]) for i, rows in parts], R) for k in first}
    out = torch.empty((R, *first.shape[1:]), dtype=first.dtype)
    for i, rows in parts:
        out[torch.tensor(i, dtype=torch.long)] = rows.detach().cpu()
    return out


def _to_cpu(obj):
    """``obj`` (a tensor or a nested dict of them) detached, on the CPU; anything else as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj
