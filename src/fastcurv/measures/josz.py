"""Josz-style flatness (arXiv 2509.11386), in fastcurv's implementable reading (the paper's exact
formulas were not available; see measures.md section 3.12):

* maximal variation on a ball: ``V_r(theta) = max_{||u||_2 <= r} L(theta + u) - L(theta)`` on the
  full-data loss (unnormalized worst-case l2 sharpness; APGD, ``n_iter`` steps per radius);
* distance to the eps level set: ``d_eps(theta) = min{||u|| : L(theta + u) >= L(theta) + eps}``,
  i.e. the smallest r with ``V_r >= eps``, found per replica by bracketing (doubling from
  ``r_init``) then bisection (``n_bisect`` halvings). Not converged when no bracket was found.

Units: V_r in loss units; d_eps in parameter-space distance. Neither is reparameterization-invariant;
compare replicas after :func:`fastcurv.reparam.balance` for a canonical form.
"""
from __future__ import annotations

import torch

from . import register_measure
from ._ascent import apgd_ascent
from ._common import finish, loss_at, loss_grad_at, positive, working_precision


def variation(op, radii: torch.Tensor, *, seed: int = 0, common: bool = True, n_iter: int = 20) -> torch.Tensor:
    """``V_r`` ``[R]`` for per-replica radii ``radii`` ``[R]``."""
    op = working_precision(op)  # (float16/bfloat16 models: perturbed and evaluated in float32)
    theta = op.replicas.flat_params()
    base = loss_at(op, theta)
    best, _, _ = apgd_ascent(lambda t: loss_grad_at(op, t), theta, radii.to(torch.float64), p="l2", n_iter=n_iter,
                             generator=torch.Generator().manual_seed(seed), common=common)
    return (best - base).clamp_min(0.0)


@register_measure("josz_variation")
def josz_variation(op, *, seed, common, r=0.05, n_iter: int = 20):
    """Columns ``josz_V`` (one radius) or ``josz_V_r=<r>`` for each radius of a list. Default r = 0.05."""
    radii = [r] if isinstance(r, (int, float)) else list(r)
    out = {}
    for rr in radii:
        positive("josz_variation", r=rr)
        col = "josz_V" if len(radii) == 1 else f"josz_V_r={rr:g}"
        radii_r = torch.full((op.R,), float(rr), dtype=torch.float64)  # (not the default dtype: bfloat16 rounds 0.05)
        out[col] = finish(op, variation(op, radii_r, seed=seed, common=common, n_iter=n_iter))
    return out


def level_distance(op, *, eps: float = 0.1, r_init: float = 0.1, max_doublings: int = 8, n_bisect: int = 8,
                   n_iter: int = 10, seed: int = 0, common: bool = True):
    """``(d_eps [R], bracketed [R])``; every V_r evaluation costs ``n_iter + 1`` gradients per replica."""
    positive("josz_level_distance", eps=eps, r_init=r_init)
    op = working_precision(op)  # (once for every radius searched)
    R = op.R
    lo = torch.zeros(R, dtype=torch.float64)
    hi = torch.full((R,), float(r_init), dtype=torch.float64)
    found = torch.zeros(R, dtype=torch.bool)
    for _ in range(max_doublings + 1):
        v = variation(op, hi, seed=seed, common=common, n_iter=n_iter)
        found |= v >= eps
        if bool(found.all()):
            break
        lo = torch.where(found, lo, hi)
        hi = torch.where(found, hi, hi * 2)
    for _ in range(n_bisect):
        mid = (lo + hi) / 2
        v = variation(op, mid, seed=seed, common=common, n_iter=n_iter)
        reach = v >= eps
        hi = torch.where(reach & found, mid, hi)
        lo = torch.where(~reach & found, mid, lo)
    d = (lo + hi) / 2
    return d, found


@register_measure("josz_level_distance")
def josz_level_distance(op, *, seed, common, eps: float = 0.1, r_init: float = 0.1, max_doublings: int = 8,
                        n_bisect: int = 8, n_iter: int = 10):
    """Column ``josz_d_eps``: distance to the ``L(theta) + eps`` level set (default eps = 0.1 nats)."""
    d, found = level_distance(op, eps=eps, r_init=r_init, max_doublings=max_doublings, n_bisect=n_bisect, n_iter=n_iter,
                              seed=seed, common=common)
    d[~found] = float("nan")
    return {"josz_d_eps": finish(op, d, converged=found)}
