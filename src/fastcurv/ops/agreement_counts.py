"""Exact pairwise agreement counts between the predicted classes of R replicas.

``agreement_counts(preds)[i, j]`` is the number of examples on which replicas i and j predict the
same class. Implementations: C++ bit-sliced popcount kernel (CPU), Triton and CUDA kernels (GPU);
the one-hot matmul and a naive loop are kept here as references.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _ext

# the kernels take signed 16/32/64-bit codes: wider unsigned ones are reinterpreted bit for bit
_SIGNED_OF = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool, *_SIGNED_OF)


class AgreementCounts(NamedTuple):
    """Pairwise counts for labelled examples; every matrix is int64 ``[R, R]``.

    agree: both replicas predict the same class. both_correct: both predict the label.
    both_wrong_same: both wrong with the same class. both_wrong_different: both wrong with
    different classes. correct: ``[R]`` examples each replica gets right. num_examples: M.
    ``agree == both_correct + both_wrong_same``; ``both_correct + both_wrong_same +
    both_wrong_different + (exactly one correct) == M``.
    """

    agree: torch.Tensor
    both_correct: torch.Tensor
    both_wrong_same: torch.Tensor
    both_wrong_different: torch.Tensor
    correct: torch.Tensor
    num_examples: int


def _check_preds(preds: torch.Tensor) -> torch.Tensor:
    """``preds`` checked, with uint16/32/64 viewed as int16/32/64 (no copy; equal codes stay equal and
    distinct ones distinct, all that agreement needs)."""
    if not isinstance(preds, torch.Tensor):
        raise TypeError(f"preds must be a tensor of predicted classes [R, M], got {type(preds).__name__}")
    if preds.dim() != 2:
        raise ValueError(f"preds must be [R, M] (replicas x examples), got shape {tuple(preds.shape)}")
    if preds.dtype not in _INT_DTYPES:
        raise TypeError(
            f"preds must hold integer class indices (bool or 8/16/32/64-bit integers), got {preds.dtype}; "
            "take argmax of the logits first"
        )
    signed = _SIGNED_OF.get(preds.dtype)
    return preds if signed is None else preds.view(signed)


def agreement_counts_naive(preds: torch.Tensor) -> torch.Tensor:
    """Reference: a loop over replicas, ``out[i, j] = (preds[i] == preds[j]).sum()`` (one row per step)."""
    preds = _check_preds(preds)
    R = preds.shape[0]
    out = torch.empty(R, R, dtype=torch.int64, device=preds.device)
    for i in range(R):
        out[i] = (preds[i : i + 1] == preds).sum(1)
    return out


def agreement_counts_onehot(preds: torch.Tensor, *, max_chunk_elems: int = 1 << 26) -> torch.Tensor:
    """Reference: the one-hot matmul ``O O^T`` with ``O = one_hot(preds)`` reshaped to ``[R, M*C]``.

    C = max - min + 1. The examples are processed in chunks of at most ``max_chunk_elems`` one-hot
    entries (and at most 2**24 examples, so float32 sums stay exact); chunk results are added in int64.
    """
    preds = _check_preds(preds)
    R, M = preds.shape
    out = torch.zeros(R, R, dtype=torch.int64, device=preds.device)
    if R == 0 or M == 0:
        return out
    p = preds.long()
    p = p - p.min()
    C = int(p.max()) + 1
    chunk = max(1, min(1 << 24, max_chunk_elems // max(1, R * C)))
    for m0 in range(0, M, chunk):
        o = torch.nn.functional.one_hot(p[:, m0 : m0 + chunk], C).reshape(R, -1).to(torch.float32)
        out += (o @ o.T).round_().to(torch.int64)
    return out


def agreement_counts(preds: torch.Tensor, labels: torch.Tensor | None = None):
    """Exact number of examples on which each pair of replicas predicts the same class.

    preds: integer tensor ``[R, M]`` of predicted classes (bool, or any signed or unsigned 8- to
    64-bit integer dtype; negative values are allowed). Returns int64 ``[R, R]`` (diagonal = M).

    labels: optional ``[M]`` true classes. Then returns :class:`AgreementCounts` with the counts of
    "both correct", "both wrong with the same class" and "both wrong with different classes" per
    pair. "Both correct" comes exactly from the agreement counts of the 0/1 correctness matrix:
    agree_corr[i, j] = both_correct + both_wrong, and both_wrong = M - c_i - c_j + both_correct.
    """
    values = preds
    preds = _check_preds(preds)
    if labels is None:
        return _agreement(preds)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != preds.shape[1]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a [M] = [{preds.shape[1]}] tensor of classes, got {shape}")
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"labels must hold integer classes, got {labels.dtype}")
    if labels.device != preds.device:
        raise ValueError(f"labels are on {labels.device} but preds on {preds.device}")
    M = preds.shape[1]
    agree = _agreement(preds)
    corr = values.long() == labels.long()  # by value: a uint16 class 40000 equals an int64 label 40000
    c = corr.sum(1)
    agree_corr = _agreement(corr.to(torch.uint8))
    both_correct = (agree_corr - M + c[:, None] + c[None, :]) // 2
    both_wrong = M - c[:, None] - c[None, :] + both_correct
    both_wrong_same = agree - both_correct
    return AgreementCounts(agree, both_correct, both_wrong_same, both_wrong - both_wrong_same, c, M)


def _agreement(preds: torch.Tensor) -> torch.Tensor:
    impl = _ext.choose("agreement_counts", preds.device)
    if impl == "ext":
        return torch.ops.fastcurv.agreement_counts(preds)
    if impl == "triton":
        from .. import triton_kernels

        return triton_kernels.agreement_counts(preds)
    if preds.numel() and int(preds.max()) - int(preds.min()) < 32:
        return agreement_counts_onehot(preds)  # BLAS is fast for few classes
    return agreement_counts_naive(preds)
