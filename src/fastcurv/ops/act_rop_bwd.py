"""Backward R-op of an element-wise activation, broadcast over K probes."""
from __future__ import annotations

import torch

from .. import _ext
from ._checks import check_like


def act_rop_bwd_reference(d1: torch.Tensor, d2g: torch.Tensor, rz: torch.Tensor, rg: torch.Tensor) -> torch.Tensor:
    """``d1 * rg + d2g * rz``; d1, d2g ``[B, M]``; rz, rg ``[B, K, M]``."""
    return d1.unsqueeze(1) * rg + d2g.unsqueeze(1) * rz


def act_rop_bwd(d1: torch.Tensor, d2g: torch.Tensor, rz: torch.Tensor, rg: torch.Tensor) -> torch.Tensor:
    """R-op of the activation's backward pass: ``d1 * rg + d2g * rz`` with d1, d2g ``[B, M]``
    (from :func:`act_derivs`, shared by all probes) and rz, rg ``[B, K, M]``. Returns ``[B, K, M]``."""
    check_like("act_rop_bwd", "rg", rg, dict(d1=d1, d2g=d2g, rz=rz))
    impl = _ext.choose("act_rop_bwd", rg.device, rg.dtype)
    if impl == "ext":
        return torch.ops.fastcurv.act_rop_bwd(d1, d2g, rz, rg)
    if impl == "triton":
        from .. import triton_kernels

        return triton_kernels.act_rop_bwd(d1, d2g, rz, rg)
    return act_rop_bwd_reference(d1, d2g, rz, rg)
