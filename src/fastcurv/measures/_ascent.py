"""Batched worst-case perturbation search: APGD-style projected gradient ascent (Croce & Hein
2020, as used by Andriushchenko et al. 2023 for worst-case rho-sharpness), one ascent per
replica, all replicas in lock step.

The search is over ``delta = c * u`` with ``||u||_p <= rho`` (c = 1: standard ball; c = |theta|:
adaptive, elementwise-scaled ball). Working in u-space makes the projection exact for both balls
(for adaptive l2 the reference code projects onto the ellipsoid by bisection; the feasible set
and hence the maximum are the same).
"""
from __future__ import annotations

import math

import torch

from ..solvers._norms import row_norms

NORMS = ("l2", "linf")


def _checkpoints(n_iter: int) -> list[int]:
    """Croce & Hein's step-size checkpoints: p0=0, p1=0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * n_iter) for q in p[1:] if q <= 1 and math.ceil(q * n_iter) > 0})


def _project(u, rho, p):
    r = rho.view(-1, 1)
    if p == "l2":
        n = row_norms(u, keepdim=True)
        return u * torch.clamp(r / n.clamp_min(torch.finfo(u.dtype).tiny), max=1.0)
    return torch.maximum(torch.minimum(u, r), -r)


def _direction(g, p):
    if p == "l2":
        n = row_norms(g, keepdim=True)
        return g / torch.where(n > 0, n, 1.0)  # (a zero row stays 0; a float16 norm may be subnormal, below finfo.tiny)
    return g.sign()


def apgd_ascent(objective, theta: torch.Tensor, rho: torch.Tensor, *, p: str = "l2", c: torch.Tensor | None = None,
                n_iter: int = 20, momentum: float = 0.75, init: str = "random", generator: torch.Generator | None = None,
                common: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Maximize ``objective(theta + c * u)`` over ``||u||_p <= rho`` for every replica.

    Args:
        objective: ``f(theta_pert [R, P]) -> (value [R] float64 CPU, grad [R, P])``.
        theta: ``[R, P]`` centre. rho: ``[R]`` radii (per replica). c: ``[R, P]`` scaling (None: 1).
        n_iter: ascent steps (one gradient each; one more for the start point).
        momentum: APGD's alpha (0.75). Step size starts at ``2 rho`` and is halved at Croce & Hein's
            checkpoints when fewer than 75 % of the steps since the last checkpoint increased the
            objective, or when neither the step nor the best value changed; the iterate then
            restarts from the best point.
        init: "random" (a random point of the ball at half radius; needed at a stationary point)
            or "zero".
    Returns: ``(best value [R], best delta [R, P], gradient evaluations per replica)``.
    """
    if p not in NORMS:
        raise ValueError(f"p must be one of {NORMS}, got {p!r}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be at least 1, got {n_iter}")
    R, P = theta.shape
    dt, dev = theta.dtype, theta.device
    rho = rho.to(dev, dt)
    cc = torch.ones_like(theta) if c is None else c

    def f(u):
        val, g = objective(theta + cc * u)
        return val, g * cc

    if init == "random":
        gen = generator or torch.Generator().manual_seed(0)
        z = torch.randn(1 if common else R, P, generator=gen, dtype=torch.float64).to(dev, dt).expand(R, P)
        if p == "l2":
            u = 0.5 * rho.view(-1, 1) * z / z.norm(dim=-1, keepdim=True)
        else:
            u = 0.5 * rho.view(-1, 1) * z.clamp(-1, 1)
    elif init == "zero":
        u = torch.zeros_like(theta)
    else:
        raise ValueError(f"init must be 'random' or 'zero', got {init!r}")
    val, g = f(u)
    best_val, best_u, best_g = val.clone(), u.clone(), g.clone()
    eta = 2 * rho.clone()
    checkpoints = set(_checkpoints(n_iter))
    last_ck, n_up = 0, torch.zeros(R, dtype=torch.long)
    eta_at_ck, best_at_ck = eta.clone(), best_val.clone()
    u_prev = u.clone()
    evals = 1
    for k in range(n_iter):
        z = _project(u + eta.view(-1, 1) * _direction(g, p), rho, p)
        if k == 0:
            u_new = z
        else:
            u_new = _project(u + momentum * (z - u) + (1 - momentum) * (u - u_prev), rho, p)
        new_val, new_g = f(u_new)
        evals += 1
        n_up += (new_val > val).long()
        improved = new_val > best_val
        best_val = torch.where(improved, new_val, best_val)
        best_u[improved.to(dev)] = u_new[improved.to(dev)]
        best_g[improved.to(dev)] = new_g[improved.to(dev)]
        u_prev, u, val, g = u, u_new, new_val, new_g
        if k + 1 in checkpoints and k + 1 < n_iter:
            span = k + 1 - last_ck
            cond1 = n_up < 0.75 * span
            cond2 = (eta_at_ck.cpu() == eta.cpu()) & (best_at_ck == best_val)
            halve = (cond1 | cond2).to(dev)
            eta_at_ck, best_at_ck = eta.clone(), best_val.clone()
            eta = torch.where(halve, eta / 2, eta)
            if bool(halve.any()):
                u = torch.where(halve.view(-1, 1), best_u, u)
                u_prev = torch.where(halve.view(-1, 1), best_u, u_prev)
                val = torch.where(halve.cpu(), best_val, val)
                g = torch.where(halve.view(-1, 1), best_g, g)
            last_ck, n_up = k + 1, torch.zeros(R, dtype=torch.long)
    return best_val, cc * best_u, evals
