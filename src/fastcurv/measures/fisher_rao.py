"""Fisher-Rao norm (Liang, Poggio, Rakhlin & Stokes, AISTATS 2019, arXiv 1711.01530), the closed
form for cross-entropy of the Petzka and Mason-Williams reference code (empirical, true labels):

``FR = sqrt( D^2 * (1/n) sum_i <dl_i/dz_i, z_i>^2 )``, ``dl/dz = m softmax(z) - y``

where z_i are sample i's logits, y its label (one-hot) or class probabilities of mass
``m = sum_c y_c`` (1 for labels), so that ``<dl/dz, z> = m <softmax(z), z> - <y, z>``
(``<softmax(z), z> - z_y`` for a label), and D = L + 1 the number of weight layers: the calls of
Linear/Conv modules in one forward, so a module that runs twice (listed twice in an
``nn.Sequential``) counts twice and one that never runs not at all; pass ``depth=`` to override.
For bias-free networks with positively homogeneous activations
``<theta, grad_theta l_i> = D <dl/dz_i, z_i>``, so this equals ``sqrt((1/n) sum_i <theta, grad l_i>^2)``;
with biases, BatchNorm or residual connections the closed form is a proxy, and where parallel
branches apply weight layers (one encoder run on two inputs) D is the number on one path from input
to output, which the call count overstates: pass ``depth=``. It depends on the outputs only, hence
is invariant to every function-preserving reparameterization.

Per-position outputs ``[n, C, H, W]`` with class probabilities ``[n, C, H, W]`` (the cross-entropy's
classes in dim 1): l_i is sample i's loss as the operator defines it, the mean over its positions
(their sum with ``reduction="sum"``), so ``<dl_i/dz_i, z_i>`` is that mean (sum) of the positions'
terms; ``FR^2 = theta^T F theta`` with F the empirical Fisher of the same per-sample losses
(:class:`fastcurv.EmpiricalFisherOperator`, whose 1/n it shares with ``reduction="mean"``).
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
from torch.func import functional_call

from ..losses import cross_entropy_parts
from . import register_measure
from ._common import finish, outputs_at

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_depth(op) -> int:
    """The D = L + 1 of the Fisher-Rao closed form: how many times Linear/Conv modules run in one
    forward of replica 0 on the first batch (counted by forward pre-hooks)."""
    rs = op.replicas
    calls = [0]

    def count(_module, _args):
        calls[0] += 1

    hooks = [m.register_forward_pre_hook(count) for m in rs.base.modules() if isinstance(m, _WEIGHT_LAYERS)]
    try:
        _, x, _ = next(iter(op.batches))
        params = {n: t[0] for n, t in rs.params.items()}
        buffers = {n: t[0].clone() for n, t in rs.buffers.items()}  # (batch statistics may update them in place)
        with torch.no_grad():
            # one plain forward of replica 0, outside ReplicaSet.call (what its vmapped forwards run, which the
            # measure's own sparse MLP path avoids): a hook sees every call of a module listed twice
            functional_call(rs.base, (params, buffers), (x,))
    finally:
        for h in hooks:
            h.remove()
    return calls[0]


def _inner(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``<dl/dz, z>`` ``[R, ...]`` for logits ``[R, ..., C]`` and labels ``[...]`` or probabilities
    ``[..., C]``. ``dl/dz`` sums to 0 over the classes, so the logits are taken relative to each row's
    largest: the terms are then as small as the loss's gradient (a confident row loses no digits)."""
    y = y.expand(z.shape if y.is_floating_point() else z.shape[:-1])
    _, _, g = cross_entropy_parts(z, y)
    return (g * (z - z.amax(-1, keepdim=True))).sum(-1)


def fisher_rao_values(op, depth: int | None = None) -> torch.Tensor:
    """``[R]`` float64 CPU Fisher-Rao norms over the operator's data."""
    if op.loss.kind != "cross_entropy":
        raise ValueError(f"fisher_rao: the closed form is for the named loss='cross_entropy', the operator's loss is "
                         f"{op.loss.kind!r}{op.loss.named_hint()}")
    D = weight_depth(op) if depth is None else int(depth)
    if D < 1:
        raise ValueError("fisher_rao: no Linear/Conv layer runs in the model's forward; pass depth= explicitly")
    theta = op.replicas.flat_params()
    acc = torch.zeros(op.R, dtype=torch.float64)
    for _, x, y in op.batches:
        z = outputs_at(op, theta, x).to(torch.float64)  # [R, n, C] or [R, n, C, ...]
        if z.dim() < 3:
            raise ValueError(f"fisher_rao needs logits [n, C] per replica, the model outputs {tuple(z.shape[1:])}")
        y = y.to(z.device)
        if z.dim() > 3:  # soft targets [n, C, ...] (the loss refuses labels here): classes in dim 1, as the loss has them
            z, y = z.movedim(2, -1), y.movedim(1, -1)
        inner = _inner(z, y.to(z.dtype) if y.is_floating_point() else y).reshape(z.shape[0], z.shape[1], -1)  # [R, n, positions]
        per_sample = inner.sum(-1) / (inner.shape[-1] if op.loss.reduction == "mean" else 1)
        acc += per_sample.square().sum(-1).cpu()
    return (D**2 * acc / op.num_samples).sqrt()


@register_measure("fisher_rao", replica_noise=False)  # draws nothing
def fisher_rao(op, *, seed, common, depth: int | None = None):
    """Column ``fisher_rao`` ``[R]``."""
    return {"fisher_rao": finish(op, fisher_rao_values(op, depth))}
