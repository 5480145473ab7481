"""A linear layer on sparse input rows (a CSR data matrix), for R replicas at once.

Inputs such as MNIST images are mostly zeros (81% of MNIST's pixels), and in an MLP the first
layer's two products with the input, ``X @ W^T`` forward and ``dZ^T @ X`` for the weight gradient,
are most of the work. :class:`CsrRows` holds a data set once in CSR form; a minibatch is a table of
row ids per replica, and the kernels multiply only the nonzero inputs. Each nonzero reads a row of
the transposed weight ``[in, out]``: a weight stored that way (a ``transpose(1, 2)`` view of a
contiguous ``[R, in, out]``, as batched training keeps its first layer) is read directly, one in the
``Linear`` layout ``[R, out, in]`` (a probe block in the Hessian engine) is transposed one tile at a
time inside the kernel; the weight gradient is written in either layout.

The same kernels serve hidden layers between ReLUs in the fused Hessian engine: a ReLU output is
about half zeros, and a CSR matrix can stack R replicas' own rows (``CsrRows.stacked``, with a row
table per replica). :func:`csr_masked_linear` multiplies dense rows that vanish outside a known
pattern (the K probes' tangents of a ReLU output) by reading them only at a CSR row's entries.

Implementations: C++ (CPU, ``csrc/cpu/csr_linear.cpp``) and the dense torch references below, which
GPU tensors take under every kernel choice (there is no GPU kernel).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import _ext
from ._checks import check_mask, contiguous_inner, inner_contiguous, overlap, store
from .csr_from_dense import csr_from_dense

#: Inputs at most this dense (fraction of nonzero entries) take the sparse path by default, in batched
#: training, the fused Hessian engine and replica evaluation. ``python benchmarks/bench_kernels.py
#: --csr-sweep --repeat 20`` (one thread, a training-sized layer, random sparsity), the first layer's
#: products against dense GEMMs: AVX-512 4.1x faster at MNIST's 19%, 2.2x at 40%, 1.7x at 50%, 1.2x at
#: 70%; AVX2 (``FASTCURV_CPU_LEVEL=1``) 2.7x, 1.35x, 1.04x and 0.78x. On Fashion-MNIST (50% nonzero)
#: one training epoch of 100 MLPs ran 5-10% faster sparse with AVX-512 but 5-15% slower with AVX2, so
#: it stays dense by default.
SPARSE_INPUT_MAX_DENSITY = 0.4


@dataclass(frozen=True)
class CsrRows:
    """A data matrix ``X [N, in_features]`` in CSR form, validated when built (the kernels trust it;
    ``from_dense``, ``stacked`` and ``transpose`` build valid ones and skip the check).

    indptr: int64 ``[N + 1]``, non-decreasing from 0 to nnz; indices: int32 ``[nnz]`` column of each
    stored value, in ``[0, in_features)``; values: ``[nnz]`` floating point.
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    in_features: int
    validate: bool = field(default=True, repr=False, compare=False)

    def __post_init__(self):
        if not self.validate:
            return
        ip, ix, v = self.indptr, self.indices, self.values
        if not all(isinstance(t, torch.Tensor) for t in (ip, ix, v)) or ip.dtype != torch.int64 or ix.dtype != torch.int32 \
                or not v.is_floating_point() or ip.dim() != 1 or ix.dim() != 1 or v.dim() != 1 or ip.numel() < 1:
            raise ValueError("CsrRows needs indptr int64 [N + 1], indices int32 [nnz] and floating-point values [nnz]")
        nnz = ix.numel()
        if v.numel() != nnz or int(ip[0]) != 0 or int(ip[-1]) != nnz or bool((ip.diff() < 0).any()):
            raise ValueError(f"CsrRows: indptr must rise from 0 to nnz = {nnz} (the indices' and values' length), "
                             f"got {int(ip[0])} .. {int(ip[-1])} with {v.numel()} values")
        if nnz and (int(ix.min()) < 0 or int(ix.max()) >= int(self.in_features)):
            raise ValueError(f"CsrRows: column indices must lie in [0, in_features = {self.in_features}), "
                             f"found {int(ix.min())} .. {int(ix.max())}")

    @staticmethod
    def from_dense(x: torch.Tensor, mask: torch.Tensor | None = None) -> "CsrRows":
        """CSR form of the rows of ``x [N, ...]`` (each sample flattened to one row): its nonzero
        entries, or with ``mask`` (bool, x's shape) the entries where ``mask`` is True, zeros included."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
            raise TypeError("x must be a floating-point tensor [N, ...]")
        check_mask(mask, x.shape)  # here: the reshape below would take a wrong shape of the same size
        flat = x.reshape(len(x), -1)
        return CsrRows.stacked(flat.unsqueeze(0), None if mask is None else mask.reshape(flat.shape).unsqueeze(0))

    @staticmethod
    def stacked(x: torch.Tensor, mask: torch.Tensor | None = None, transpose: bool = False) -> "CsrRows":
        """One CSR matrix of G stacked matrices ``x [G, M, F]``: the rows of ``x.reshape(G*M, F)``, or
        with ``transpose`` those of the stacked ``x[g]^T`` (``[G*F, M]``); nonzeros, or where ``mask``."""
        indptr, indices, values = csr_from_dense(x, mask, transpose)
        return CsrRows(indptr, indices, values, x.shape[1] if transpose else x.shape[2], validate=False)

    @property
    def num_rows(self) -> int:
        return self.indptr.numel() - 1

    @property
    def density(self) -> float:
        """Fraction of stored (nonzero) entries."""
        return self.values.numel() / max(1, self.num_rows * self.in_features)

    def transpose(self) -> "CsrRows":
        """``X^T [in_features, N]`` in CSR form (the columns of X), for
        :func:`csr_linear_wgrad_shared`."""
        counts = self.indptr.diff()
        rows = torch.repeat_interleave(torch.arange(self.num_rows, device=counts.device, dtype=torch.int32), counts)
        cols = self.indices.long()
        order = torch.argsort(cols * self.num_rows + rows, stable=True)  # by column, then row
        indptr = torch.zeros(self.in_features + 1, dtype=torch.int64, device=counts.device)
        torch.cumsum(torch.bincount(cols, minlength=self.in_features), 0, out=indptr[1:])
        return CsrRows(indptr, rows[order].contiguous(), self.values[order].contiguous(), self.num_rows, validate=False)

    def pattern(self) -> torch.Tensor:
        """Where entries are stored: bool ``[N, in_features]``."""
        m = torch.zeros(self.num_rows, self.in_features, dtype=torch.bool, device=self.indptr.device)
        rows = torch.repeat_interleave(torch.arange(self.num_rows, device=m.device), self.indptr.diff())
        m[rows, self.indices.long()] = True
        return m

    def to_dense(self) -> torch.Tensor:
        """``X [N, in_features]``."""
        counts = self.indptr.diff()
        rows = torch.repeat_interleave(torch.arange(self.num_rows, device=counts.device), counts)
        out = torch.zeros(self.num_rows, self.in_features, dtype=self.values.dtype, device=self.values.device)
        out[rows, self.indices.long()] = self.values
        return out


def sparse_rows(x: torch.Tensor, sparse_input: bool | None) -> tuple[CsrRows | None, str]:
    """``(CsrRows of x, "")`` when ``x [N, ...]`` should take the sparse path, else ``(None, why not)``.

    ``sparse_input``: None (when at most ``SPARSE_INPUT_MAX_DENSITY`` of x is nonzero), True (always,
    where the kernels run), False (never). The kernels are C++: CPU tensors only.
    """
    if sparse_input is False:
        return None, "sparse_input=False"
    if x.device.type != "cpu":
        return None, f"the sparse-input kernels run on the CPU, the data is on {x.device}"
    if not x.is_floating_point():
        return None, f"the inputs are {x.dtype}, not floating point"
    if not _ext.has_kernel("csr_linear", "cpu"):
        return None, f"the C++ kernels are not loaded ({_ext.extension_error('_C')})"
    density = float((x != 0).sum()) / max(1, x.numel())
    if sparse_input or density <= SPARSE_INPUT_MAX_DENSITY:
        return CsrRows.from_dense(x), ""
    return None, f"{density:.0%} of the inputs are nonzero (more than SPARSE_INPUT_MAX_DENSITY)"


def _check(X: CsrRows, rows: torch.Tensor, dtype: torch.dtype) -> None:
    if not isinstance(X, CsrRows):
        raise TypeError(f"X must be a CsrRows (see CsrRows.from_dense), got {type(X).__name__}")
    if rows.dim() != 2 or rows.dtype != torch.int64:
        raise ValueError(f"rows must be an int64 [R, B] table of row ids, got {rows.dtype} {tuple(rows.shape)}")
    if X.values.dtype != dtype:
        raise TypeError(f"X holds {X.values.dtype} values but the layer is {dtype}")


def _kernel_layout(w: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """``w [R, out, in]`` as the kernels take it: ``(w, False)`` when its rows are contiguous, ``(w^T
    [R, in, out], True)`` when that view's rows are (a transposed storage), else None. Grouped,
    ``w [R, G, out / G, in]`` (the forward product's operands only): ``(w, False)`` when its last
    dimension is contiguous, ``(w^T [R, in, G, out / G], True)`` when its third is."""
    if w.dim() == 4:
        for t, transposed in ((w, False), (w.permute(0, 3, 1, 2), True)):
            if t.stride(3) == 1 or t.shape[3] <= 1:
                return t, transposed
        return None
    for t, transposed in ((w, False), (w.transpose(1, 2), True)):
        if t.stride(2) == 1 and (t.shape[1] <= 1 or t.stride(1) == t.shape[2]):
            return t, transposed
    return None


def csr_linear_reference(X: CsrRows, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """Dense reference of :func:`csr_linear`: ``X[rows[r]] @ weight[r]^T (+ bias[r])`` (weight
    ``[R, out, in]`` or in groups ``[R, G, out / G, in]``)."""
    weight = weight.reshape(weight.shape[0], -1, weight.shape[-1])
    z = torch.bmm(X.to_dense()[rows], weight.transpose(1, 2))
    return z if bias is None else z + bias.unsqueeze(1)


def csr_linear_wgrad_reference(X: CsrRows, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Dense reference of :func:`csr_linear_wgrad`: ``grad[r]^T @ X[rows[r]]`` -> ``[R, out, in]``."""
    return torch.bmm(grad.transpose(1, 2), X.to_dense()[rows])


def _grouped_shape(op: str, t: torch.Tensor, name: str) -> tuple[int, int, int]:
    """``(R, out, in)`` of a weight-shaped ``[R, out, in]`` or ``[R, G, out / G, in]`` tensor."""
    if t.dim() == 3:
        return tuple(t.shape)
    if t.dim() == 4:
        return t.shape[0], t.shape[1] * t.shape[2], t.shape[3]
    raise ValueError(f"{op}: {name} must be [R, out, in] or, in groups, [R, G, out / G, in], got {tuple(t.shape)}")


def _check_out_mask(op: str, mask: torch.Tensor | None, R: int, B: int, n_out: int, like: torch.Tensor) -> torch.Tensor | None:
    """``mask`` as the kernels read it (last dimension contiguous), checked to be ``[R, B, M]`` with M
    dividing ``n_out`` (output column c is multiplied by ``mask[..., c % M]``), of ``like``'s dtype."""
    if mask is None:
        return None
    if mask.dim() != 3 or tuple(mask.shape[:2]) != (R, B) or mask.shape[2] == 0 or n_out % mask.shape[2]:
        raise ValueError(f"{op}: out_mask must be [R, B, M] = [{R}, {B}, M] with M dividing the {n_out} outputs, "
                         f"got {tuple(mask.shape)}")
    if mask.dtype != like.dtype or mask.device != like.device:
        raise TypeError(f"{op}: out_mask is {mask.dtype} on {mask.device}, the layer {like.dtype} on {like.device}")
    return mask if mask.stride(2) == 1 or mask.shape[2] == 1 else mask.contiguous()


def _masked(z: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``z [R, B, ..., out]`` times ``mask [R, B, M]`` on its last axis in groups of M (in place)."""
    if mask is None:
        return z
    R, B, M = mask.shape
    z.view(R, B, -1, M).mul_(mask.unsqueeze(2))
    return z


def csr_linear(X: CsrRows, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               out_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``z[r] = X[rows[r]] @ weight[r]^T + bias[r]``, multiplying only the nonzero inputs.

    X: the data set (:class:`CsrRows`). rows: int64 ``[R, B]`` row ids of each replica's minibatch
    (``rows.expand(R, B)`` of a ``[B]`` table shares one minibatch). weight: ``[R, out, in]``, the
    weights of R ``Linear(in, out)`` layers; fastest when stored transposed (a ``transpose(1, 2)``
    view of a contiguous ``[R, in, out]``), also read directly when its rows are contiguous (then
    transposed one tile at a time inside the kernel). It may also come as ``[R, G, out / G, in]``,
    its outputs in G groups at any stride (the K probes' blocks of a Hessian engine's ``[R, K, P]``
    probe tensor), read directly when its last (or third) dimension is contiguous, with no copy into
    an ``[R, out, in]`` tensor. bias: ``[R, out]`` or None. ``out_mask``: ``[R, B, M]`` or None; the
    result's column c is multiplied by ``out_mask[r, b, c % M]`` (M divides out), e.g. a ReLU's 0/1
    derivative applied to the K probes' tangents ``[R, B, K * M]``, while each tile of the result
    is still in cache. Returns ``[R, B, out]``.
    """
    _check(X, rows, weight.dtype)
    R, n_out, n_in = _grouped_shape("csr_linear", weight, "weight")  # 3 or 4 dimensions
    if n_in != X.in_features:
        raise ValueError(f"csr_linear: the weight takes {n_in} inputs but X has in_features = {X.in_features}")
    mask = _check_out_mask("csr_linear", out_mask, R, rows.shape[1], n_out, weight)
    if _ext.choose("csr_linear", weight.device, weight.dtype) == "ext":
        w, transposed = _kernel_layout(weight) or (weight.contiguous(), False)
        return torch.ops.fastcurv.csr_linear(X.indptr, X.indices, X.values, rows, w,
                                             None if bias is None else bias.contiguous(), transposed, mask)
    return _masked(csr_linear_reference(X, rows, weight, bias), mask)


def csr_masked_linear_reference(P: CsrRows, rows: torch.Tensor, dense: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Dense reference of :func:`csr_masked_linear`: ``(dense * mask) @ weight[r]^T``."""
    mask = P.pattern()[rows].unsqueeze(2)  # [R, B, 1, in]
    R, B, K, _ = dense.shape
    return torch.bmm((dense * mask).reshape(R, B * K, dense.shape[3]), weight.transpose(1, 2)).view(R, B, K, weight.shape[1])


def csr_masked_linear(P: CsrRows, rows: torch.Tensor, dense: torch.Tensor, weight: torch.Tensor,
                      out: torch.Tensor | None = None, accumulate: bool = False,
                      out_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``out[r, b, k] (+)= (dense[r, b, k] * m) @ weight[r]^T`` with ``m`` the 0/1 pattern of ``P``'s row
    ``rows[r, b]``: a product of rows that are known to vanish outside a sparse pattern (the K probes'
    tangents of a ReLU layer's output, zero where the output is), multiplying only inside it.

    P: the patterns (:class:`CsrRows`; its values are not read). rows: int64 ``[R, B]``. dense: ``[R, B,
    K, in]``; weight: ``[R, out, in]`` (either layout, as in :func:`csr_linear`); out: ``[R, B, K, out]``
    or None (a new tensor); ``accumulate`` adds to ``out``. ``out_mask``: ``[R, B, out]`` or None; the
    result (after accumulating) is multiplied by it, the same for all K rows. The kernel reads dense
    and writes out with their last three dims contiguous (any replica stride); other layouts are copied.
    """
    _check(P, rows, weight.dtype)
    R, B = rows.shape
    if dense.dim() != 4 or dense.shape[:2] != (R, B) or dense.shape[3] != P.in_features or dense.dtype != weight.dtype:
        raise ValueError(f"dense must be [R, B, K, in] = [{R}, {B}, K, {P.in_features}] of the weight's dtype {weight.dtype}, "
                         f"got {dense.dtype} {tuple(dense.shape)}")
    if weight.dim() != 3 or weight.shape[0] != R or weight.shape[2] != P.in_features:
        raise ValueError(f"weight must be [R = {R}, out, in = {P.in_features}], got {tuple(weight.shape)}")
    shape = (R, B, dense.shape[2], weight.shape[1])
    mask = _check_out_mask("csr_masked_linear", out_mask, R, B, shape[3], weight)
    if mask is not None and mask.shape[2] != shape[3]:
        raise ValueError(f"csr_masked_linear: out_mask must be [R, B, out] = {[R, B, shape[3]]}, got {tuple(mask.shape)}")
    if out is None:
        out, accumulate = torch.empty(shape, dtype=dense.dtype, device=dense.device), False
    elif tuple(out.shape) != shape:
        raise ValueError(f"out must be {list(shape)}, got {tuple(out.shape)}")
    elif overlap(out, dense) or overlap(out, weight):
        raise ValueError("csr_masked_linear: out must not overlap dense or weight (it is written while they are read)")
    if 0 in shape:  # no rows or outputs: nothing to multiply
        return out if accumulate else out.zero_()
    if _ext.choose("csr_masked_linear_out", dense.device, dense.dtype) == "ext":
        w, transposed = _kernel_layout(weight) or (weight.contiguous(), False)
        o = out if inner_contiguous(out, 3) else torch.empty(shape, dtype=out.dtype, device=out.device)
        d = contiguous_inner(dense, 3)
        if o is out:
            torch.ops.fastcurv.csr_masked_linear_out(P.indptr, P.indices, rows, d, w, transposed, o, accumulate, mask)
            return out
        torch.ops.fastcurv.csr_masked_linear_out(P.indptr, P.indices, rows, d, w, transposed, o, False, None)
        return _masked(store(out, o, accumulate), mask)
    return _masked(store(out, csr_masked_linear_reference(P, rows, dense, weight), accumulate), mask)


def csr_linear_wgrad(X: CsrRows, rows: torch.Tensor, grad: torch.Tensor, out: torch.Tensor | None = None,
                     accumulate: bool = False) -> torch.Tensor:
    """Weight gradient of :func:`csr_linear`: ``grad[r]^T @ X[rows[r]]``, ``[R, out, in]``.

    grad: ``[R, B, out]`` gradient of the loss with respect to ``z``. ``out``: optional ``[R, out,
    in]`` tensor written in place (and returned); ``accumulate`` adds the gradient to it instead.
    Written directly when ``out``'s rows, or those of its transpose, are contiguous.
    """
    _check(X, rows, grad.dtype)
    if grad.dim() != 3 or grad.shape[:2] != rows.shape:
        raise ValueError(f"csr_linear_wgrad: grad must be [R, B, out] with [R, B] = {list(rows.shape)}, "
                         f"got {tuple(grad.shape)}")
    R, _, n_out = grad.shape
    if out is None:
        out = torch.empty(R, n_out, X.in_features, dtype=grad.dtype, device=grad.device)
        accumulate = False
    elif tuple(out.shape) != (R, n_out, X.in_features):
        raise ValueError(f"csr_linear_wgrad: out must be [R, out, in] = {[R, n_out, X.in_features]}, got {tuple(out.shape)}")
    if _ext.choose("csr_linear_wgrad", grad.device, grad.dtype) == "ext":
        layout = _kernel_layout(out)
        if layout is not None:
            o, transposed = layout
            torch.ops.fastcurv.csr_linear_wgrad(X.indptr, X.indices, X.values, rows, grad.contiguous(), o,
                                                transposed, accumulate)
            return out
    return store(out, csr_linear_wgrad_reference(X, rows, grad), accumulate)


def csr_linear_wgrad_shared(Xt: CsrRows, grad: torch.Tensor, out: torch.Tensor | None = None,
                            accumulate: bool = False, rows: torch.Tensor | None = None,
                            bias_out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`csr_linear_wgrad` for one minibatch ``X [B, in]`` that every replica reads (all rows
    in order), given as ``Xt = X.transpose()``: ``grad[r]^T @ X``, ``[R, out, in]``. With ``rows``
    (int64 ``[R, in]``), replica r reads its own ``X_r^T = Xt[rows[r]]`` instead (per-replica
    inputs, e.g. hidden layers' ReLU outputs, stacked in one CSR matrix).

    The kernel runs the forward product's loop over the columns of X, ``(X^T @ grad[r])^T``, so
    each tile of a weight-gradient row is summed in registers rather than read and written in L1
    for every nonzero: 0.68-0.77x the time of :func:`csr_linear_wgrad` on 1000 MNIST images for
    128-4096 output columns (AVX-512; about the same with AVX2). grad: ``[R, B, out]``; ``out`` and
    ``accumulate`` as in :func:`csr_linear_wgrad`; ``out`` may also come as ``[R, G, out / G, in]``
    (the K probes' blocks of a Hessian engine's flat product, at any stride between the groups),
    written directly when its last dimension is contiguous. ``bias_out``: ``[R, out]`` or ``[R, G,
    out / G]`` (any stride between the groups), or None: also the bias gradient ``grad.sum(1)``,
    written (or added, with ``accumulate``) from each tile of ``grad`` while the kernel has it in cache.
    """
    if not isinstance(Xt, CsrRows):
        raise TypeError(f"Xt must be a CsrRows (X.transpose()), got {type(Xt).__name__}")
    if grad.dim() != 3 or grad.shape[1] != Xt.in_features:
        raise ValueError(f"grad must be [R, B, out] with B = {Xt.in_features} (the minibatch of Xt), got {tuple(grad.shape)}")
    if Xt.values.dtype != grad.dtype:
        raise TypeError(f"Xt holds {Xt.values.dtype} values but grad is {grad.dtype}")
    R, _, n_out = grad.shape
    if rows is None:
        rows = torch.arange(Xt.num_rows, device=grad.device).expand(R, Xt.num_rows)
    else:
        _check(Xt, rows, grad.dtype)
        if rows.shape[0] != R:
            raise ValueError(f"rows must be [R = {R}, in], got {tuple(rows.shape)}")
    if out is None:
        out = torch.empty(R, n_out, rows.shape[1], dtype=grad.dtype, device=grad.device)
        accumulate = False
    elif _grouped_shape("csr_linear_wgrad_shared", out, "out") != (R, n_out, rows.shape[1]):
        raise ValueError(f"csr_linear_wgrad_shared: out must be [R, out, in] = [{R}, {n_out}, {rows.shape[1]}] "
                         f"(or [R, G, out / G, in]), got {tuple(out.shape)}")
    if bias_out is not None and (bias_out.dim() not in (2, 3) or bias_out.shape[0] != R
                                 or bias_out.shape[1:].numel() != n_out or bias_out.dtype != grad.dtype):
        raise ValueError(f"csr_linear_wgrad_shared: bias_out must be [R, out] = [{R}, {n_out}] (or [R, G, out / G]) "
                         f"of grad's dtype, got {bias_out.dtype} {tuple(bias_out.shape)}")
    layout = _kernel_layout(out)
    if out.dim() == 4 and layout is not None and layout[1]:
        layout = None  # the kernel writes groups of rows only
    sums = None  # where the kernel writes the bias gradient: bias_out, if it can
    if _ext.choose("csr_linear_out", grad.device, grad.dtype) == "ext" and layout is not None:
        o, transposed = layout  # the kernel writes z = X^T grad [R, in, out], here transposed unless out is
        if bias_out is not None and (bias_out.stride(-1) == 1 or bias_out.shape[-1] <= 1):
            sums = bias_out
        torch.ops.fastcurv.csr_linear_out(Xt.indptr, Xt.indices, Xt.values, rows, grad.contiguous(), None, True, o,
                                          not transposed, accumulate, None, sums)
    else:
        store(out, torch.bmm(grad.transpose(1, 2), Xt.to_dense()[rows].transpose(1, 2)).view(out.shape), accumulate)
    if bias_out is not None and sums is None:
        store(bias_out, grad.sum(1).view(bias_out.shape), accumulate)
    return out
