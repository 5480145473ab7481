"""The MLP engine's units of work: consecutive batches of the loader joined into blocks.

Every pass of the MLP engine over a batch costs a fixed amount besides its products: a Python
pass of about 1,600 tensor operations, and a read-modify-write of every weight-sized product
block ``[R, K, P]``. With small batches (torch's ``DataLoader`` defaults to one sample) that
fixed cost dominated: 512 MNIST images in batches of 32 took 2.0x the time of one batch in the
default job, in batches of 1 about 30x. The loss is a sum over samples weighted by the data set's
size (:mod:`fastcurv.losses`), and an MLP chain has no layer that mixes samples, so joining
consecutive batches changes nothing but the floating-point order of the sums.

A pass yields :class:`Block` s, which join their batches (a copy) only when asked for the data:
a matvec that finds a block's state cached never is, so it copies nothing.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

#: Batches are joined into blocks of at most this many samples (a larger batch stays alone):
#: enough to amortize the per-batch pass (``benchmarks``: 512 MNIST images in batches of 32, 8
#: MLPs 784-64-64-10, one thread: the default job within a few percent of one batch of 512).
JOIN_ROWS = 512
#: ... and where a block's own memory (see :meth:`FusedBackend._join_rows`) is at most a quarter
#: of the state cache (``cache_bytes``: 1 GiB of the default 4 GiB) and at most this many bytes.
#: (A 64 MiB cap left 100 MLPs 784-128-128-10 on batches of 32 unjoined: their matvecs took 1.8x
#: (K = 1) and 2.1x (K = 8) the time of blocks of 512.)
JOIN_MAX_BYTES = 1 << 30
#: the probes per matvec a block's tangents are sized for (``fastcurv.memory.PROBE_BATCH``)
JOIN_PROBES = 10


def _kind(x: torch.Tensor, y: torch.Tensor) -> tuple:
    """What must agree for two batches to be joined by ``torch.cat``."""
    return x.shape[1:], x.dtype, x.device, y.shape[1:], y.dtype, y.device


def _join(parts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(x, y)`` of a block from its batches' ``(i, x, y)`` (one batch: itself, no copy)."""
    if len(parts) == 1:
        return parts[0][1], parts[0][2]
    return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


class Block:
    """One unit of work of the MLP engine: consecutive batches ``parts`` (``(i, x, y)`` items of a
    pass over the loader) read as one.

    ``index``: its place in the pass (the key of its cached state); ``rows``: its samples;
    ``device``: where its batches are; ``joined``: whether it holds several batches. :meth:`data`
    joins them on its first call (one batch: itself, no copy). A matvec that finds the block's
    state cached reads only ``rows`` and ``device``, and copies nothing: a join on every pass
    (about 1 ms, mostly the 392 page faults of a fresh 1.6 MB copy) made a matvec on 512 MNIST
    images in 16 batches of 32 take 1.04x the time of one batch of 512 (10 MLPs 784-128-128-10,
    K = 1, one thread; 1.00x since)."""

    __slots__ = ("index", "rows", "device", "joined", "_parts", "_data")

    def __init__(self, index: int, parts: list):
        self.index, self._parts, self._data = index, parts, None
        self.rows = sum(p[1].shape[0] for p in parts)
        self.device = parts[0][1].device
        self.joined = len(parts) > 1

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's inputs and targets ``(x, y)``, its batches' joined (kept for later calls)."""
        if self._data is None:
            self._data = _join(self._parts)
        return self._data


def first_pass(batches, max_rows: int, groups: list) -> Iterator[Block]:
    """Yield the :class:`Block` s of consecutive batches of ``batches`` (``(i, x, y)`` items) joined
    greedily into blocks of at most ``max_rows`` samples (a larger batch alone), breaking where the
    inputs' or targets' shapes, dtypes or devices differ; append each block's batch indices to
    ``groups`` (so that later passes join the same batches: :func:`later_pass`)."""
    parts, rows = [], 0
    for item in batches:
        x, y = item[1], item[2]
        if parts and (rows + x.shape[0] > max_rows or _kind(x, y) != _kind(parts[0][1], parts[0][2])):
            groups.append([p[0] for p in parts])
            yield Block(len(groups) - 1, parts)
            parts, rows = [], 0
        parts.append(item)
        rows += x.shape[0]
    if parts:
        groups.append([p[0] for p in parts])
        yield Block(len(groups) - 1, parts)


def later_pass(batches, groups: list[list[int]]) -> Iterator[Block]:
    """Yield the :class:`Block` s ``groups`` (lists of consecutive batch indices) of ``batches``,
    as :func:`first_pass` made them."""
    it = iter(batches)
    for b, group in enumerate(groups):
        parts = []
        for i in group:
            item = next(it, None)
            if item is None or item[0] != i:  # (Batches checks a loader's later passes; this is a guard)
                raise RuntimeError(f"the data yielded different batches on a later pass (batch {i} of block {b} is missing)")
            parts.append(item)
        yield Block(b, parts)
    if next(it, None) is not None:  # (read to the end: a loader's Batches checks its batch count there)
        raise RuntimeError(f"the data yielded more batches on a later pass than the {sum(map(len, groups))} of the first")
