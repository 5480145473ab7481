"""Worst-case sharpness flatness with an alpha search (Jiang et al., ICLR 2020, arXiv 1912.02178:
"sharpness.flatness = 1/alpha'^2" and the magnitude-aware "sharpness-mag" flatness), in
fastcurv's batched form.

For each replica, bisect alpha on ``[0, alpha_max]`` (default 2, at most ``depth`` = 15 midpoints,
exactly as the PAC-Bayes sigma search, :func:`._bisect.bisect_scale`) for the alpha at which the
**worst-case** perturbation in the box

* isotropic: ``|u_i| <= alpha``,
* magnitude-aware: ``|u_i| <= alpha |theta_i| + eps`` (eps = 1e-3),

lowers the accuracy on the operator's data (the training set by convention) by ``target`` = 0.1
(stop within ``tol`` = 0.01). Measures: ``jiang_sharpness_flatness = 1 / alpha'^2`` and
``jiang_sharpness_mag_flatness = 1 / alpha'^2`` (the magnitude-aware alpha); the alphas are
columns too. "converged" is False when the search ended without reaching the tolerance.

Inner maximum: accuracy is not differentiable, so the worst case is searched for on the loss
(cross-entropy): ``n_iter`` (default 10; "a few steps", our choice) steps of projected
sign-gradient ascent in the box (APGD, :mod:`._ascent`; random start), and the accuracy drop is
measured at the highest-loss perturbation found. All replicas bisect in lock step; only the
replicas still searching are evaluated, so one search costs at most ``depth (n_iter + 1)``
gradients plus ``depth + 1`` forward passes per replica. The random start of bisection step k uses
``seed + k`` (the same start for every replica when the draws are common).

Invariance: isotropic no; magnitude-aware approximately (exactly for eps -> 0) under positive
elementwise rescalings such as Dinh et al.'s: in the coordinates ``u = (alpha |theta| + eps) v``
the search is the same problem for theta and its rescaling.
"""
from __future__ import annotations

import torch

from . import register_measure
from ._ascent import apgd_ascent
from ._bisect import bisect_scale, flatness_columns
from ._common import accuracy_at, check_options, loss_grad_at, positive, working_precision

OPTIONS = ("target", "tol", "alpha_max", "depth", "n_iter", "eps", "init")


def alpha_search(op, *, magnitude: bool = False, target: float = 0.1, tol: float = 0.01, alpha_max: float = 2.0,
                 depth: int = 15, n_iter: int = 10, eps: float = 1e-3, init: str = "random", seed: int = 0,
                 common: bool = True):
    """Per-replica alpha ``[R]`` (float64 CPU), whether the tolerance was met ``[R]`` and the base
    accuracy ``[R]``. Failed replicas (non-finite parameters) are not searched."""
    positive("jiang_sharpness", target=target, tol=tol, alpha_max=alpha_max, depth=depth, n_iter=n_iter)
    if magnitude and not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"jiang_sharpness: eps must be a non-negative number, got {eps!r}")
    op = working_precision(op)  # (float16/bfloat16 models: perturbed and evaluated in float32)
    theta = op.replicas.flat_params()
    base = accuracy_at(op, theta)
    ones = torch.ones(op.R, dtype=torch.float64)

    def drop(alpha, active, step):
        idx = active.nonzero().squeeze(1)
        rows = idx.to(op.device)
        th = theta[rows]
        a = alpha[idx].to(op.device, op.dtype).view(-1, 1)
        c = a * th.abs() + eps if magnitude else a.expand_as(th)
        _, delta, _ = apgd_ascent(lambda t: loss_grad_at(op, t, rows), th, ones[idx], p="linf", c=c, n_iter=n_iter,
                                  init=init, generator=torch.Generator().manual_seed(seed + step), common=common)
        out = torch.full((op.R,), float("nan"), dtype=torch.float64)
        out[idx] = base[idx] - accuracy_at(op, th + delta, rows)
        return out

    alpha, done = bisect_scale(drop, op.R, target=target, tol=tol, hi=alpha_max, depth=int(depth),
                               skip=op.failed.cpu())
    return alpha, done, base


@register_measure("jiang_sharpness", options=OPTIONS)
def jiang_sharpness(op, *, seed, common, magnitude_aware: bool = True, **options):
    """Columns ``jiang_sharpness_flatness`` (1/alpha'^2), ``jiang_sharpness_alpha`` and, with
    ``magnitude_aware=True`` (default), ``jiang_sharpness_mag_flatness`` and ``jiang_sharpness_mag_alpha``.
    Options: target (0.1), tol (0.01), alpha_max (2), depth (15), n_iter (10), eps (1e-3), init
    ("random" or "zero"); see the module docstring."""
    check_options("jiang_sharpness", options, OPTIONS)
    return flatness_columns(op, "jiang_sharpness", alpha_search, "alpha", magnitude_aware, seed=seed, common=common,
                            **options)
