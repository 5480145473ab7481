"""Element-wise activation derivatives: sigma'(z) and sigma''(z) * g, computed once per batch."""
from __future__ import annotations

import math

import torch

from .. import _ext
from ._checks import check_like

# Keep in sync with csrc/cpu/activation.h (FcActivation).
ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4, "gelu": 5}


def activation_kind(name: str) -> int:
    """Integer code of an activation name (see :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def activation_value(z: torch.Tensor, kind: int, slope: float = 0.0) -> torch.Tensor:
    """sigma(z) for an activation code (see :data:`fastcurv.ops.ACTIVATIONS`)."""
    if kind == ACTIVATIONS["relu"]:
        return torch.relu(z)
    if kind == ACTIVATIONS["leaky_relu"]:
        return torch.where(z > 0, z, z * slope)
    if kind == ACTIVATIONS["tanh"]:
        return torch.tanh(z)
    if kind == ACTIVATIONS["sigmoid"]:
        return torch.sigmoid(z)
    if kind == ACTIVATIONS["gelu"]:
        return torch.nn.functional.gelu(z)
    if kind == ACTIVATIONS["identity"]:
        return z
    raise ValueError(f"unknown activation kind {kind}")


def act_derivs_reference(z: torch.Tensor, g: torch.Tensor, kind: int, slope: float = 0.0):
    """``(sigma'(z), sigma''(z) * g)`` in plain torch."""
    if kind == ACTIVATIONS["relu"]:
        d1, d2 = (z > 0).to(z.dtype), torch.zeros_like(z)
    elif kind == ACTIVATIONS["leaky_relu"]:
        d1, d2 = torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope)), torch.zeros_like(z)
    elif kind == ACTIVATIONS["tanh"]:
        t = torch.tanh(z)
        d1 = 1 - t * t
        d2 = -2 * t * d1
    elif kind == ACTIVATIONS["sigmoid"]:
        s = torch.sigmoid(z)
        d1 = s * (1 - s)
        d2 = d1 * (1 - 2 * s)
    elif kind == ACTIVATIONS["gelu"]:
        phi = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
        d1 = cdf + z * phi
        d2 = phi * (2 - z * z)
    elif kind == ACTIVATIONS["identity"]:
        d1, d2 = torch.ones_like(z), torch.zeros_like(z)
    else:
        raise ValueError(f"unknown activation kind {kind}")
    return d1, d2 * g


def act_derivs(z: torch.Tensor, g: torch.Tensor, kind: int, slope: float = 0.0):
    """First derivative of the activation at ``z`` and second derivative times ``g``.

    z, g: same shape (any). Returns ``(d1, d2g)`` of that shape. These are the multipliers of the
    activation's R-op: forward ``a' = d1 * z'``, backward ``g_z' = d1 * g_a' + d2g * z'``.
    """
    check_like("act_derivs", "z", z, dict(g=g))
    impl = _ext.choose("act_derivs", z.device, z.dtype)
    if impl == "ext":
        return torch.ops.fastcurv.act_derivs(z, g, int(kind), float(slope))
    if impl == "triton":
        from .. import triton_kernels

        return triton_kernels.act_derivs(z, g, int(kind), float(slope))
    return act_derivs_reference(z, g, kind, slope)
