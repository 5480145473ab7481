"""The MLP engine's per-batch state (:class:`_State`) and the sparse forms it caches: the first
layer's input without its all-zero columns, or in CSR form, and the hidden layers' ReLU patterns."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...ops.csr_linear import CsrRows

# The network input's all-zero columns (e.g. MNIST's border pixels, 22% of a 1000-image batch)
# are dropped from the first layer's products when they are at least this fraction of its inputs
# and the batch has at least this many rows: below that, gathering the probe's columns and
# scattering the product back cost more than the skipped flops.
ZERO_COLUMNS_MIN_FRACTION = 0.05
ZERO_COLUMNS_MIN_ROWS = 128


def _check_first_input(name: str, x: torch.Tensor, features: int) -> None:
    """Raise a ValueError naming the first Linear layer ``name`` (``features`` inputs) unless its
    input ``x`` (the batch, after any Flatten) is ``[N, features]``: the MLP engine takes no other
    shape (e.g. an MLP applied along a sequence axis, ``[N, T, F]``; torch.func runs those)."""
    if x.dim() != 2 or x.shape[1] != features:
        raise ValueError(f"Linear {name!r} needs inputs [N, {features}] (N samples, {features} features); "
                         f"got {tuple(x.shape)}")


def _drop_zero_columns(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(x[:, keep], keep, zero)`` for a shared first-layer input ``x`` ``[N, I]`` whose columns
    ``zero`` are 0 in every row, or ``(x, None, None)`` when too few are (see
    ``ZERO_COLUMNS_MIN_FRACTION``). Exact: a zero input column adds nothing to ``x W^T`` and its
    weight column's gradient and Hessian rows are zero."""
    N, I = x.shape
    if N < ZERO_COLUMNS_MIN_ROWS:
        return x, None, None
    used = (x != 0).any(0)
    n_zero = I - int(used.sum())
    if n_zero < ZERO_COLUMNS_MIN_FRACTION * I:
        return x, None, None
    keep = used.nonzero().flatten()
    return x.index_select(1, keep), keep, (~used).nonzero().flatten()


def _scatter_columns_(dst: torch.Tensor, keep: torch.Tensor, zero: torch.Tensor, src: torch.Tensor, first: bool):
    """``dst[..., keep] (=|+=) src`` along the last axis; with ``first`` also ``dst[..., zero] = 0``
    (zeroing all of ``dst`` and adding is ~2.5x faster on the CPU than index_fill_ + index_copy_)."""
    if first:
        dst.zero_()
    dst.index_add_(-1, keep, src)


@dataclass
class _ReluCsr:
    """A ``[R, N, F]`` tensor of R replicas stacked in one CSR matrix ``[R*N, F]`` (``rows[r]``: replica
    r's rows), with its per-replica transposes ``[R*F, N]`` (``rows_t[r]``: replica r's; the
    matvec's transposed products read them)."""

    csr: CsrRows
    rows: torch.Tensor
    csr_t: CsrRows
    rows_t: torch.Tensor

    @staticmethod
    def build(t: torch.Tensor, mask: torch.Tensor | None = None) -> "_ReluCsr":
        """Of ``t [R, N, F]`` (entries where ``mask`` is True, default nonzero)."""
        R, N, F_ = t.shape
        ar = lambda n, m: torch.arange(n * m, device=t.device).view(n, m)
        return _ReluCsr(CsrRows.stacked(t, mask), ar(R, N), CsrRows.stacked(t, mask, transpose=True), ar(R, F_))

    def map_rows(self, f) -> "_ReluCsr":
        return _ReluCsr(self.csr, f(self.rows), self.csr_t, f(self.rows_t))

    @property
    def nbytes(self) -> int:
        """Bytes that scale with the samples (the transposes' row pointers do not)."""
        ts = [self.csr.indptr, self.csr.indices, self.csr.values, self.csr_t.indices, self.csr_t.values]
        return sum(t.numel() * t.element_size() for t in ts)


def _all_rows(N: int, R: int, device) -> torch.Tensor:
    """Row ids ``[R, N]`` of a whole batch, shared by R replicas (a stride-0 expand)."""
    return torch.arange(N, device=device).expand(R, N)



class _State:
    """Probe-independent values of one batch for a set of replicas (leading axis R)."""

    def __init__(self):
        self.inputs: list = []  # per linear layer: its input ([N, I] shared for the first, else [R, N, I])
        # the first layer's input columns kept, and those dropped as zero in every row (or None):
        # inputs[0] is then x[:, keep] (see _drop_zero_columns)
        self.keep = self.zero = None
        # or the first layer's input in CSR form (its products then use only the nonzero inputs), and
        # its transpose (for the weight products)
        self.csr = self.csr_t = None
        self.d1: list = []  # per activation: sigma'(z) [R, N, F] (None before the first linear)
        self.d2g: list = []  # per activation: sigma''(z) * g [R, N, F], or None when identically zero
        self.deltas: list = []  # per linear layer: dL/dz [R, N, O]
        # per linear layer (None: dense), in CSR form with transposes: its input after a ReLU (sparse_in),
        # and its output's ReLU pattern holding the deltas (sparse_out); see HIDDEN_SPARSE_MAX_DENSITY
        self.sparse_in: list = []
        self.sparse_out: list = []
        self.probs = None  # softmax probabilities [R, N, C] (cross-entropy)
        self.mass = None  # soft cross-entropy targets' per-sample sums [N], when not all 1 (else None)
        self.loss = None  # this batch's share of the loss per replica [R]
        self.nbytes = 0

    def _map(self, f) -> "_State":
        out = _State()
        out.keep, out.zero, out.csr, out.csr_t = self.keep, self.zero, self.csr, self.csr_t
        shared = self.inputs[0] if self.inputs and self.inputs[0].dim() == 2 else None
        g = lambda t: None if t is None else (t if t is shared else f(t))
        out.inputs = [g(t) for t in self.inputs]
        out.d1 = [g(t) for t in self.d1]
        out.d2g = [g(t) for t in self.d2g]
        out.deltas = [g(t) for t in self.deltas]
        out.sparse_in = [None if c is None else c.map_rows(f) for c in self.sparse_in]
        out.sparse_out = [None if c is None else c.map_rows(f) for c in self.sparse_out]
        out.probs = g(self.probs)
        out.mass = self.mass
        out.loss = g(self.loss)
        return out

    def narrow(self, rows: slice) -> "_State":
        """Views of the replicas ``rows`` (a slice of the leading axis; no copy)."""
        return self._map(lambda t: t[rows])

    def select(self, pos: torch.Tensor) -> "_State":
        """The state of the replicas at positions ``pos`` (a copy of their rows)."""
        return self._map(lambda t: t.index_select(0, pos))

    def samples(self, s: slice) -> "_State":
        """Views of the samples ``s`` (a slice of the sample axis), for the exact trace's sample
        chunks: what it reads, i.e. the layer inputs, derivatives, deltas, probabilities, the
        soft targets' mass, and the hidden layers' ReLU patterns for their forward products
        (``sparse_out``'s rows ``s``, without the transposes). The first layer's CSR forms, the
        ReLU inputs' CSR forms and the loss are left out (None)."""
        out = _State()
        out.keep, out.zero = self.keep, self.zero
        g = lambda t: None if t is None else (t[s] if t.dim() == 2 and t is self.inputs[0] else t[:, s])
        out.inputs = [g(t) for t in self.inputs]
        out.d1 = [g(t) for t in self.d1]
        out.d2g = [g(t) for t in self.d2g]
        out.deltas = [g(t) for t in self.deltas]
        out.sparse_in = [None] * len(self.sparse_in)
        out.sparse_out = [None if c is None else _ReluCsr(c.csr, c.rows[:, s].contiguous(), None, None) for c in self.sparse_out]
        out.probs = g(self.probs)
        out.mass = None if self.mass is None else self.mass[s]
        return out

