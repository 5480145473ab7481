"""PAC-Bayes sigma flatness (Jiang et al., ICLR 2020, arXiv 1912.02178), sigma found by bisection
as in Dziugaite et al.'s re-implementation, **with noise of standard deviation sigma** (that code
passes sigma^2 as the std of ``torch.normal``; fastcurv does not).

For each replica: bisect sigma on ``[0, sigma_max]`` (default 2) for at most ``depth`` (15)
halvings; at each sigma average the accuracy over ``mc_samples`` (10) draws of ``theta + u``;
stop when ``|acc(theta) - acc(theta + u) - target|  <= tol`` (target 0.1, tol 0.01). The
bisection is :func:`._bisect.bisect_scale`, shared with the worst-case sharpness alpha search.

* isotropic: ``u ~ N(0, sigma^2 I)``; measure ``pacbayes_flatness = 1 / sigma^2``;
* magnitude-aware: ``u_i ~ N(0, sigma'^2 theta_i^2 + eps^2)``, eps = 1e-3;
  ``pacbayes_mag_flatness = 1 / sigma'^2``.

Accuracy is measured on the operator's data (the training set by convention). The found sigmas
are reported too (columns ``pacbayes_sigma`` / ``pacbayes_mag_sigma``); "converged" is False when
the bisection ended without reaching the tolerance. Isotropic: not invariant; magnitude-aware:
approximately invariant to elementwise rescalings (eps breaks exactness).

Parameters: every parameter is perturbed, biases and BatchNorm weights included, as they are in
the model (Dziugaite et al.'s code first folds BatchNorm into the preceding layer and perturbs the
weights only). BatchNorm is not folded here: for eval-mode BatchNorm after a Linear/Conv, pass
``fastcurv.reparam.fold_batchnorm(models).models`` (the same function) to measure the folded
network; without folding the noise also hits the BatchNorm scale, and sigma differs (several-fold).
"""
from __future__ import annotations

import torch

from . import keywords, register_measure
from ._bisect import bisect_scale, flatness_columns
from ._common import accuracy_at, positive, working_precision


def perturbation_std(theta: torch.Tensor, sigma: torch.Tensor, magnitude: bool, eps: float) -> torch.Tensor:
    """Standard deviation ``[R, P]`` of the PAC-Bayes noise: sigma, or sqrt(sigma^2 theta^2 + eps^2)."""
    s = sigma.to(theta.device, theta.dtype).view(-1, 1)
    if magnitude:
        return (s**2 * theta**2 + eps**2).sqrt()
    return s.expand_as(theta)


def sigma_search(op, *, magnitude: bool = False, target: float = 0.1, tol: float = 0.01, sigma_max: float = 2.0,
                 depth: int = 15, mc_samples: int = 10, eps: float = 1e-3, seed: int = 0, common: bool = True):
    """Per-replica sigma ``[R]``, whether the tolerance was met ``[R]`` and the base accuracy ``[R]``."""
    positive("pac_bayes", target=target, tol=tol, sigma_max=sigma_max, depth=depth, mc_samples=mc_samples)
    op = working_precision(op)  # (float16/bfloat16 models: perturbed and evaluated in float32)
    theta = op.replicas.flat_params()
    base = accuracy_at(op, theta)
    R = op.R
    gen = torch.Generator().manual_seed(seed)

    def drop(sigma, active, step):  # every replica is evaluated (the draws do not depend on which are done)
        std = perturbation_std(theta, sigma, magnitude, eps)
        acc = torch.zeros(R, dtype=torch.float64)
        for _ in range(mc_samples):
            z = torch.randn(1 if common else R, op.P, generator=gen, dtype=torch.float64).to(op.device, op.dtype)
            acc += accuracy_at(op, theta + std * z)
        return base - acc / mc_samples

    sigma, done = bisect_scale(drop, R, target=target, tol=tol, hi=sigma_max, depth=int(depth))
    return sigma, done, base


@register_measure("pac_bayes", options=keywords(sigma_search, drop=("magnitude",)))
def pac_bayes(op, *, seed, common, magnitude_aware: bool = True, **options):
    """Columns ``pacbayes_flatness`` (1/sigma^2), ``pacbayes_sigma`` and, with
    ``magnitude_aware=True`` (default), ``pacbayes_mag_flatness`` and ``pacbayes_mag_sigma``.
    Options: target, tol, sigma_max, depth, mc_samples, eps (see the module docstring)."""
    return flatness_columns(op, "pacbayes", sigma_search, "sigma", magnitude_aware, seed=seed, common=common, **options)
