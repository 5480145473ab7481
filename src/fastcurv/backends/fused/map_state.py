"""The sample-major engine's per-batch state (:class:`_MapState`), gradient sums and broadcasting
of per-channel coefficients (see :mod:`.maps` for the layout)."""
from __future__ import annotations

import torch


class _MapState:
    """Probe-independent values of one batch for the sample-major engine.

    ``t[(layer, key)]``: tensors with the samples first; those in ``shared`` have no replica
    axis, the others have it at axis 1. ``meta[layer]``: input shapes (pooling, flatten);
    ``meta[(layer, "out")]``: a max pooling's output shape (the grid of its winners).
    """

    def __init__(self):
        self.t: dict = {}
        self.shared: set = set()
        self.meta: dict = {}
        self.probs = None  # [N, R, C] softmax probabilities (cross-entropy)
        self.mass = None  # soft cross-entropy targets' per-sample sums [N], when not all 1 (else None)
        self.loss = None  # [R]
        self.widest = 1  # the largest number of features per sample and replica
        self.outputs = 0  # the model's outputs per sample
        self.nbytes = 0
        self.stems = frozenset()  # pooling nodes whose stems' values are kept at the pooled positions
        self.gradient_only: set = set()  # keys only the parameter gradient reads (kept with keep_all)

    def put(self, i, key, tensor, shared=False, gradient_only=False):
        self.t[(i, key)] = tensor
        if shared:
            self.shared.add((i, key))
        if gradient_only:
            self.gradient_only.add((i, key))
        self.nbytes += tensor.numel() * tensor.element_size()

    def get(self, i, key):
        return self.t.get((i, key))

    def _map(self, f, shared_too=False) -> "_MapState":
        out = _MapState()
        out.shared, out.meta, out.widest, out.loss, out.stems = self.shared, self.meta, self.widest, self.loss, self.stems
        out.outputs = self.outputs
        out.gradient_only = self.gradient_only
        out.t = {k: (f(v) if shared_too or k not in self.shared else v) for k, v in self.t.items()}
        out.probs = None if self.probs is None else f(self.probs)
        out.mass = None if self.mass is None else (f(self.mass) if shared_too else self.mass)
        return out

    def select(self, pos: torch.Tensor) -> "_MapState":
        """The replicas at positions ``pos`` (a copy of their rows). The features are merged into one
        axis first: torch's index_select took 8x as long on W4's int64 pooling winners ``[N, R, C,
        HW]`` as on their ``[N, R, C*HW]`` view (17 against 2.1 ms)."""
        def rows(v):
            return v.index_select(1, pos) if v.dim() <= 3 else v.flatten(2).index_select(1, pos).view(v.shape[0], -1, *v.shape[2:])
        return self._map(rows)

    def samples(self, rows: slice) -> "_MapState":
        """Views of the samples ``rows`` (no copy)."""
        return self._map(lambda v: v[rows], shared_too=True)


class _Sums(dict):
    """node -> the gradient of its output summed over its readers so far; ``fresh``: the nodes whose
    entry is a sum made by :meth:`_MapEngine._acc`, a tensor no other node holds (later terms are
    added into it, and the node may update it in place)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.fresh: set = set()


def _rb(coef: torch.Tensor, nsp: int, tangent: bool) -> torch.Tensor:
    """A per-replica, per-channel ``[R, C]`` (tangent: ``[R, K, C]``) coefficient shaped to
    broadcast against ``[N, R, C, *sp]`` (tangent: ``[N, K, R, C, *sp]``)."""
    if tangent:
        coef = coef.transpose(0, 1)
    return coef.reshape(1, *coef.shape, *([1] * nsp))
