"""Fisher-Rao norm (Liang, Poggio, Rakhlin & Stokes, AISTATS 2019, arXiv 1711.01530), the closed
form for cross-entropy of the Petzka and Mason-Williams reference code (empirical, true labels):

``FR = sqrt( D^2 * (1/n) sum_i (<softmax(z_i), z_i> - z_{i, y_i})^2 )``

where z_i are the logits and D = L + 1 the number of weight layers (Linear/Conv modules; pass
``depth=`` to override). For bias-free networks with positively homogeneous activations
``<theta, grad_theta l_i> = D <dl/dz_i, z_i>``, so this equals ``sqrt((1/n) sum_i <theta, grad l_i>^2)``;
with biases, BatchNorm or residual connections the closed form is a proxy. It depends on the
outputs only, hence is invariant to every function-preserving reparameterization.
Cost: one forward pass per replica. Units: nats-scaled norm (dimensionless).

Deliberate deviation from the reference code's depth factor: Mason-Williams multiply by
``(count_layers + 1)^2`` with count_layers their number of Linear/Conv/Embedding modules (our D),
and Petzka hard-codes 6 for the 5-layer LeNet-5; both are ``(D + 1)^2``, which does not match the
identity above. fastcurv uses ``D^2``, so its values are ``D / (D + 1)`` times theirs (2/3 for two
layers, 3/4 for three): a constant within one architecture, but it changes rankings across depths.
``depth=D + 1`` reproduces the reference numbers.
"""
from __future__ import annotations

import torch
from torch import nn

from . import register_measure
from ._common import finish, outputs_at

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_depth(module: nn.Module) -> int:
    """Number of Linear/Conv modules (the D = L + 1 of the Fisher-Rao closed form)."""
    return sum(isinstance(m, _WEIGHT_LAYERS) for m in module.modules())


def fisher_rao_values(op, depth: int | None = None) -> torch.Tensor:
    """``[R]`` float64 CPU Fisher-Rao norms over the operator's data."""
    if op.loss.kind != "cross_entropy":
        raise ValueError(f"fisher_rao: the closed form is for cross-entropy, the operator's loss is {op.loss.kind!r}")
    D = weight_depth(op.replicas.base) if depth is None else int(depth)
    if D < 1:
        raise ValueError("fisher_rao: the model has no Linear/Conv layer; pass depth= explicitly")
    theta = op.replicas.flat_params()
    acc = torch.zeros(op.R, dtype=torch.float64)
    for _, x, y in op.batches:
        z = outputs_at(op, theta, x).to(torch.float64)
        if y.is_floating_point():
            inner = (torch.softmax(z, -1) * z).sum(-1) - (y.to(z.dtype) * z).sum(-1)
        else:
            inner = (torch.softmax(z, -1) * z).sum(-1) - z.gather(-1, y.view(1, -1, 1).expand(z.shape[0], -1, 1)).squeeze(-1)
        acc += (inner**2).sum(-1).cpu()
    return (D**2 * acc / op.num_samples).sqrt()


@register_measure("fisher_rao", replica_noise=False)  # draws nothing
def fisher_rao(op, *, seed, common, depth: int | None = None):
    """Column ``fisher_rao`` ``[R]``."""
    return {"fisher_rao": finish(op, fisher_rao_values(op, depth))}
