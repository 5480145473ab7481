"""Forward and R-forward (Pearlmutter R-op) of a linear layer with its activation, for R replicas and K probes.

``z = a W^T + b`` and ``rz = ra W^T + a dW^T + db``; with an activation sigma also ``h = sigma(z)`` and
``rh = sigma'(z) * rz``. On CUDA tensors (or under ``TRITON_INTERPRET=1`` with kernels 'triton') the
fused Triton kernel :func:`fastcurv.triton_kernels.linear_rop` computes all of it from shared operand
tiles; elsewhere the pure-torch reference below runs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from .. import _ext
from .activation import ACTIVATIONS, act_derivs_reference, activation_kind, activation_value


class LinearRop(NamedTuple):
    """Outputs of :func:`linear_rop`. ``h is z`` and ``rh is rz`` when there is no activation."""

    z: torch.Tensor  # [R, N, O] pre-activation
    rz: torch.Tensor  # [R, K, N, O] its R-op
    h: torch.Tensor  # [R, N, O] activation output
    rh: torch.Tensor  # [R, K, N, O] its R-op


def resolve_activation(activation: Union[None, str, int]) -> int:
    """Activation code from a name, a code or None (identity)."""
    if activation is None:
        return ACTIVATIONS["identity"]
    if isinstance(activation, str):
        return activation_kind(activation)
    kind = int(activation)
    if kind not in ACTIVATIONS.values():
        raise ValueError(f"unknown activation kind {kind}; known: {ACTIVATIONS}")
    return kind


def check_linear_rop_shapes(a, ra, W, dW, b, db) -> tuple[int, int, int, int, int]:
    """Validate the shapes of :func:`linear_rop`'s inputs; returns ``(R, K, N, I, O)``."""
    if a.dim() != 3:
        raise ValueError(f"linear_rop: a must be [R, N, I], got {tuple(a.shape)}")
    R, N, I = a.shape
    if W.dim() != 3 or W.shape[0] != R or W.shape[2] != I:
        raise ValueError(f"linear_rop: W must be [R, O, I] = [{R}, O, {I}], got {tuple(W.shape)}")
    O = W.shape[1]
    if dW.dim() != 4 or dW.shape[0] != R or dW.shape[2:] != (O, I):
        raise ValueError(f"linear_rop: dW must be [R, K, O, I] = [{R}, K, {O}, {I}], got {tuple(dW.shape)}")
    K = dW.shape[1]
    if ra is not None and ra.shape != (R, K, N, I):
        raise ValueError(f"linear_rop: ra must be [R, K, N, I] = {(R, K, N, I)}, got {tuple(ra.shape)}")
    if b is not None and b.shape != (R, O):
        raise ValueError(f"linear_rop: b must be [R, O] = {(R, O)}, got {tuple(b.shape)}")
    if db is not None and db.shape != (R, K, O):
        raise ValueError(f"linear_rop: db must be [R, K, O] = {(R, K, O)}, got {tuple(db.shape)}")
    for name, t in (("ra", ra), ("W", W), ("dW", dW), ("b", b), ("db", db)):
        if t is not None and (t.dtype != a.dtype or t.device != a.device):
            raise TypeError(f"linear_rop: {name} is {t.dtype} on {t.device}, but a is {a.dtype} on {a.device}")
    return R, K, N, I, O


def linear_rop_reference(
    a: torch.Tensor,
    ra: Optional[torch.Tensor],
    W: torch.Tensor,
    dW: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    db: Optional[torch.Tensor] = None,
    activation: Union[None, str, int] = None,
    slope: float = 0.0,
) -> LinearRop:
    """Pure-torch :func:`linear_rop` (batched matmuls over R, probes stacked)."""
    R, K, N, I, O = check_linear_rop_shapes(a, ra, W, dW, b, db)
    kind = resolve_activation(activation)
    z = torch.bmm(a, W.transpose(1, 2))
    if b is not None:
        z = z + b[:, None, :]
    # a dW_k^T for every k: [R, 1, N, I] @ [R, K, I, O]
    rz = torch.matmul(a[:, None], dW.transpose(2, 3))
    if ra is not None:
        rz = rz + torch.matmul(ra, W[:, None].transpose(2, 3))
    if db is not None:
        rz = rz + db[:, :, None, :]
    if kind == ACTIVATIONS["identity"]:
        return LinearRop(z, rz, z, rz)
    d1, _ = act_derivs_reference(z, z, kind, slope)
    return LinearRop(z, rz, activation_value(z, kind, slope), d1[:, None] * rz)


def linear_rop(
    a: torch.Tensor,
    ra: Optional[torch.Tensor],
    W: torch.Tensor,
    dW: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    db: Optional[torch.Tensor] = None,
    activation: Union[None, str, int] = None,
    slope: float = 0.0,
) -> LinearRop:
    """Forward and R-forward of ``sigma(a W^T + b)`` for R replicas and K probes.

    a ``[R, N, I]`` layer input (may be an expanded view with stride 0 over R), ra ``[R, K, N, I]``
    its tangent or None (first layer), W ``[R, O, I]``, dW ``[R, K, O, I]`` the weight directions,
    b ``[R, O]`` / db ``[R, K, O]`` or None. activation: a name or code from
    :data:`fastcurv.ops.ACTIVATIONS` or None; slope is the leaky-ReLU slope.
    Returns :class:`LinearRop` ``(z, rz, h, rh)``: z, h ``[R, N, O]``, rz, rh ``[R, K, N, O]``.
    """
    if _use_triton(a.device):
        from .. import triton_kernels

        # OPS, not an attribute: ``triton_kernels.linear_rop`` is the kernel module of the same name
        return triton_kernels.OPS["linear_rop"](a, ra, W, dW, b, db, activation, slope)
    return linear_rop_reference(a, ra, W, dW, b, db, activation, slope)


def in_fused_engine(device: torch.device) -> bool:
    """Whether the fused engine's MLP forward R-pass runs its Linear layers through the Triton
    :func:`linear_rop` on ``device``: only when the kernels are set to 'triton' explicitly
    (``fastcurv.use_kernels("triton")``; CPU tensors under ``TRITON_INTERPRET=1``). Under 'auto' the
    engine keeps its batched GEMMs, because the fused kernel has not been timed against them on a GPU."""
    return _ext.kernel_impl() == "triton" and _use_triton(device)


def _use_triton(device: torch.device) -> bool:
    """Triton for CUDA tensors under kernels 'auto'/'triton' (and CPU tensors under 'triton' when
    interpreting); there is no compiled C++/CUDA linear_rop, so 'ext'/'cuda'/'torch' use the reference."""
    impl = _ext.kernel_impl()
    if impl not in ("auto", "triton"):
        return False
    from .. import triton_kernels

    if not (triton_kernels.available() and triton_kernels.supports("linear_rop")):
        if impl == "triton":
            raise RuntimeError("Triton kernel for linear_rop requested but Triton is not usable here")
        return False
    return device.type == "cuda" or (impl == "triton" and device.type == "cpu" and triton_kernels.interpreting())
