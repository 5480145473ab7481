"""CSR form of G stacked dense matrices, for the sparse products of :mod:`fastcurv.ops.csr_linear`.

``x [G, M, F]``; the stored entries are x's nonzeros, or those where ``mask`` (bool, x's shape) is
True (zeros included). Without ``transpose``: the rows of ``x.reshape(G*M, F)``; with it: the rows of
the stacked ``x[g]^T`` ``[G*F, M]`` (the columns of every matrix). Columns ascend within each row.

Implementations: C++ (CPU, ``csrc/cpu/csr_from_dense.cpp``: two passes over x, entries found as
64-bit masks; 10-12 ms for a ``[100, 1000, 128]`` ReLU output, where :func:`csr_from_dense_reference`
took 0.16 s and 0.34 s transposed) and the torch reference below.
"""
from __future__ import annotations

import torch

from .. import _ext
from ._checks import check_mask


def _check(x: torch.Tensor, mask: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 3:
        raise TypeError(f"x must be a floating-point [G, M, F] tensor, got {getattr(x, 'dtype', type(x).__name__)} "
                        f"{tuple(getattr(x, 'shape', ()))}")
    check_mask(mask, x.shape)


def csr_from_dense_reference(x: torch.Tensor, mask: torch.Tensor | None = None, transpose: bool = False):
    """``(indptr int64, indices int32, values)`` by torch's ``nonzero`` and boolean indexing."""
    _check(x, mask)
    G, M, F_ = x.shape
    flat = (x.transpose(1, 2).reshape(G * F_, M) if transpose else x.reshape(G * M, F_)).detach()
    nz = flat != 0 if mask is None else (mask.transpose(1, 2).reshape(G * F_, M) if transpose else mask.reshape(G * M, F_))
    indptr = torch.zeros(len(flat) + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(nz.sum(1), 0, out=indptr[1:])
    idx = nz.nonzero()  # row-major order: rows in turn, columns ascending within a row
    return indptr, idx[:, 1].to(torch.int32).contiguous(), flat[nz].contiguous()


def csr_from_dense(x: torch.Tensor, mask: torch.Tensor | None = None, transpose: bool = False):
    """``(indptr [rows + 1] int64, indices [nnz] int32, values [nnz])`` of ``x [G, M, F]`` (see the
    module docstring); rows = G*M, or G*F with ``transpose``."""
    _check(x, mask)
    if max(x.shape[1] if transpose else x.shape[2], 1) >= 2**31:
        raise ValueError("the columns do not fit int32 column indices")
    if _ext.choose("csr_from_dense", x.device, x.dtype) == "ext":
        x = x.detach() if x.stride(2) == 1 else x.detach().contiguous()
        if mask is not None and mask.stride(2) != 1:
            mask = mask.contiguous()
        return tuple(torch.ops.fastcurv.csr_from_dense(x, mask, transpose))
    return csr_from_dense_reference(x, mask, transpose)
