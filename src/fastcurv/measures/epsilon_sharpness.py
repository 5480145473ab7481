"""Keskar et al. (ICLR 2017, arXiv 1609.04836, Metric 2.1) epsilon-sharpness, full space (A = I):

``phi = 100 * [max_{y in C_eps} L(theta + y) - L(theta)] / (1 + L(theta))``, with the box
``C_eps = {|y_i| <= eps (|theta_i| + 1)}``. Units: percent of ``1 + L``.

Keskar et al. maximize with L-BFGS-B (10 iterations); fastcurv replaces it by batched projected
sign-gradient ascent in the box (APGD, :mod:`._ascent`; ``n_iter`` steps, default 10), which
runs all replicas in lock step. The random-subspace variant (A random P x p) is not implemented.
Default eps = 1e-3 (one of the paper's two values, the other 5e-4). Not reparameterization-invariant:
Dinh et al. (2017) show it can be made arbitrarily large by alpha-rescaling.
"""
from __future__ import annotations

import torch

from . import register_measure
from ._ascent import apgd_ascent
from ._common import finish, loss_at, loss_grad_at, positive


def epsilon_sharpness_values(op, *, seed: int = 0, common: bool = True, eps: float = 1e-3, n_iter: int = 10):
    """Keskar sharpness ``[R]`` (float64 CPU, percent) and the maximizing perturbations ``[R, P]``."""
    positive("epsilon_sharpness", eps=eps)
    theta = op.replicas.flat_params()
    base = loss_at(op, theta)
    best, delta, _ = apgd_ascent(lambda t: loss_grad_at(op, t), theta, torch.full((op.R,), float(eps), dtype=torch.float64),
                             p="linf", c=theta.abs() + 1, n_iter=n_iter, generator=torch.Generator().manual_seed(seed),
                             common=common)
    return 100 * (best - base).clamp_min(0.0) / (1 + base), delta


@register_measure("epsilon_sharpness")
def epsilon_sharpness(op, *, seed, common, eps: float = 1e-3, n_iter: int = 10):
    """Column ``epsilon_sharpness`` ``[R]`` (percent)."""
    value, _ = epsilon_sharpness_values(op, seed=seed, common=common, eps=eps, n_iter=n_iter)
    return {"epsilon_sharpness": finish(op, value)}
