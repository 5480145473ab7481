"""What each replica trains on: its data order in every epoch (:func:`epoch_order`), its labels with
label noise (:func:`noisy_labels`, :func:`replica_labels`), and the minibatches of each step gathered
into buffers allocated once (:class:`Minibatches`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .losses import label_out_of_range
from .train_fused import CsrBatch
from .train_options import _label_noise


def epoch_order(data_seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order (a permutation of ``range(n)``) a replica with ``data_seed`` uses in ``epoch``.

    A pure function of (data_seed, epoch), so a resumed run sees the same batches.
    """
    state = np.random.SeedSequence([int(data_seed) & 0xFFFFFFFF, int(epoch), 0x5EED]).generate_state(2, dtype=np.uint64)
    g = torch.Generator().manual_seed(int(state[0] & np.uint64(2**63 - 1)))
    return torch.randperm(n, generator=g)


def epoch_orders(data_seeds: list[int], epoch: int, n: int, one: bool, device) -> torch.Tensor:
    """The data orders of ``epoch`` on ``device``: ``[n]``, the order of ``data_seeds[0]``, with ``one``
    (every replica sees the same minibatches), else ``[R, n]``, one row per data seed."""
    if one:
        return epoch_order(data_seeds[0], epoch, n).to(device)
    return torch.stack([epoch_order(s, epoch, n) for s in data_seeds]).to(device)


def _noisy_count(fraction: float, n: int) -> int:
    """How many of ``n`` labels ``label_noise=fraction`` makes wrong: the nearest integer to ``fraction * n``."""
    return int(math.floor(fraction * n + 0.5))


def noisy_labels(y: torch.Tensor, fraction: float, seed: int, num_classes: int) -> torch.Tensor:
    """The labels a replica with initialization seed ``seed`` trains on with ``label_noise=fraction``
    (:func:`~fastcurv.train.train_population`): a copy of the class labels ``y [N]`` (integers in
    ``[0, num_classes)``) where the nearest integer to ``fraction * N`` samples, chosen uniformly at
    random, carry a label drawn uniformly from the ``num_classes - 1`` wrong classes (so exactly that
    fraction is wrong).

    A pure function of (labels, fraction, seed, num_classes): the samples are the first ones of a
    random permutation of ``range(N)`` and each sample's wrong label is drawn once, both from a
    generator keyed by ``seed``, so for one seed a larger fraction corrupts a superset of the
    samples a smaller one does, with the same wrong labels (nested noise levels). Returned on ``y``'s
    device, with its dtype.
    """
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"label_noise needs integer class labels y of shape [N], got "
                         f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    fraction = _label_noise(fraction, 1)[0]
    out = y.detach().cpu().clone()
    k = _noisy_count(fraction, len(y))
    if k == 0:
        return out.to(y.device)
    if num_classes < 2:
        raise ValueError(f"label_noise needs at least 2 classes (a wrong label to draw), got num_classes={num_classes}")
    bad = label_out_of_range(out, num_classes)
    if bad is not None:
        raise ValueError(f"labels out of range: found label {bad} but there are {num_classes} classes")
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x1ABE1]).generate_state(2, dtype=np.uint64)
    g = torch.Generator().manual_seed(int(state[0] & np.uint64(2**63 - 1)))
    order = torch.randperm(len(out), generator=g)
    shift = torch.randint(1, num_classes, (len(out),), generator=g)  # 1..C-1: never the label itself
    pick = order[:k]
    out[pick] = ((out[pick].long() + shift[pick]) % num_classes).to(out.dtype)  # (int8 labels + shift could overflow)
    return out.to(y.device)


def replica_labels(y: torch.Tensor, noise: list[float], seeds: list[int], num_classes: int) -> torch.Tensor:
    """Each replica's training labels with label noise, ``[R, N]`` on ``y``'s device in a narrow integer
    type: row r is :func:`noisy_labels` of ``y [N]`` with ``noise[r]`` and ``seeds[r]``."""
    narrow = torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32
    y_cpu = y.cpu()
    return torch.stack([noisy_labels(y_cpu, f, s, num_classes).to(narrow) for f, s in zip(noise, seeds)]).to(y.device)


class Minibatches:
    """The minibatches of one worker thread's chunks of replicas (at most ``most_rows`` each) in
    every step: index rows ``x[i]`` and targets ``y[i]`` (or the group's own labels ``labels [R_g, N]``
    with label noise) gathered into buffers allocated once; with ``csr`` (the training set in CSR form)
    the inputs are :class:`~fastcurv.train_fused.CsrBatch` row ids instead. With ``shared`` (the fused
    path's shared data order) one minibatch ``[B, ...]`` serves every replica; else each chunk's
    ``R_c`` minibatches are one gather ``[R_c, B, ...]``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor | None, csr, batch_size: int,
                 shared: bool, most_rows: int):
        self.x, self.y, self.labels, self.csr = x, y, labels, csr
        self.batch_size, self.shared = batch_size, shared
        nbuf = min(batch_size, len(x)) * (1 if shared else most_rows)
        # with sparse inputs the minibatches are row ids into the CSR copy: no gathered inputs
        self.xbuf = torch.empty((0 if csr is not None else nbuf, *x.shape[1:]), dtype=x.dtype, device=x.device)
        self.ybuf = torch.empty((nbuf, *y.shape[1:]), dtype=y.dtype, device=y.device)

    def of_step(self, orders: torch.Tensor, k: int, chunks: list[slice]):
        """Step ``k``'s minibatches for the chunks of replicas ``chunks`` (slices of the rows of ``labels``)
        in the data orders ``orders`` (:func:`epoch_orders`): yields ``(chunk, inputs, targets, batch
        length)``, each gathered when asked for (the buffers hold one chunk's at a time)."""
        x, y, labels, csr, bs = self.x, self.y, self.labels, self.csr, self.batch_size
        if self.shared:  # one minibatch for every replica
            i = orders[k * bs:(k + 1) * bs]
            nb = len(i)
            xs = CsrBatch(csr, i) if csr is not None else torch.index_select(x, 0, i, out=self.xbuf[:nb])
            ys = torch.index_select(y, 0, i, out=self.ybuf[:nb]) if labels is None else None
        for sl in chunks:
            if self.shared:  # (with label noise each replica's own labels of the one minibatch: [R_c, B])
                yield sl, xs, ys if labels is None else torch.index_select(labels[sl], 1, i).long(), nb
                continue
            Rc = sl.stop - sl.start
            i = orders[sl, k * bs:(k + 1) * bs]
            nb = i.shape[1]
            if csr is not None:
                xc = CsrBatch(csr, i)
            else:
                xc = torch.index_select(x, 0, i.reshape(-1), out=self.xbuf[:Rc * nb]).view(Rc, nb, *x.shape[1:])
            if labels is None:
                yc = torch.index_select(y, 0, i.reshape(-1), out=self.ybuf[:Rc * nb]).view(Rc, nb, *y.shape[1:])
            else:
                yc = torch.gather(labels[sl], 1, i).long()
            yield sl, xc, yc, nb
