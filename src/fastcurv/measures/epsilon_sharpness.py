"""Keskar et al. (ICLR 2017, arXiv 1609.04836, Metric 2.1) epsilon-sharpness, full space (A = I):

``phi = 100 * [max_{y in C_eps} L(theta + y) - L(theta)] / (1 + L(theta))``, with the box
``C_eps = {|y_i| <= eps (|theta_i| + 1)}``. Units: percent of ``1 + L``. The normalization assumes
a non-negative loss, as cross-entropy and MSE are: for a loss that can go negative (a Poisson or
Gaussian negative log-likelihood with its constants dropped) a replica with ``1 + L <= 0`` gets NaN,
and one with ``-1 < L < 0`` its value inflated by ``1 / (1 + L)``; both with a RuntimeWarning.

Keskar et al. maximize with L-BFGS-B (10 iterations); fastcurv replaces it by batched projected
sign-gradient ascent in the box (APGD, :mod:`._ascent`; ``n_iter`` steps, default 10), which
runs all replicas in lock step. Default eps = 1e-3 (one of the paper's two values, the other
5e-4). Not reparameterization-invariant: Dinh et al. (2017) show it can be made arbitrarily large
by alpha-rescaling.

Random-subspace variant (measure ``epsilon_sharpness_subspace``, its own name because it has its
own options and column): ``phi = 100 * [max_{y in C_eps} L(theta + A y) - L(theta)] / (1 + L(theta))``
with ``A`` a random ``P x p`` matrix (p = 1000, or P when P < 1000; a RuntimeWarning when P < 2p,
since the measure is meant for p << P), ``y`` in ``R^p`` and
``C_eps = {|y_i| <= eps (|(A^+ theta)_i| + 1)}``. The same ascent runs on ``y`` (the gradient in y is
``A^T grad L``). ``A`` has i.i.d. ``N(0, 1/p)`` entries (our choice of distribution and scale, see
:mod:`._subspace`, which also says how A is stored without R dense copies); pass ``A=`` (a tensor
``[P, p]`` or ``[R, P, p]``) to use a given matrix: ``A = I`` gives the full-space measure exactly.
``max_matrix_bytes`` (default None: 1 GiB; under ``batched_sharpness(memory_budget=...)`` the memory
plan caches the matrix whenever the whole job fits with it cached, else regenerates it) caches the
dense matrix when it fits, else regenerates its blocks from the seed in every product (the same
matrix: the results do not change, up to the floating-point order of the products' sums; a
resumable job's fingerprint leaves it out).
Keskar et al.'s subspace dimension: measures.md records p = 1000 from recall (unverified against the
paper).
"""
from __future__ import annotations

import numbers
import warnings

import torch

from . import register_measure
from ._ascent import apgd_ascent
from ._common import finish, loss_at, loss_grad_at, positive, working_precision
from ._subspace import RandomSubspace


def epsilon_sharpness_values(op, *, seed: int = 0, common: bool = True, eps: float = 1e-3, n_iter: int = 10):
    """Keskar sharpness ``[R]`` (float64 CPU, percent) and the maximizing perturbations ``[R, P]``."""
    positive("epsilon_sharpness", eps=eps)
    op = working_precision(op)  # (float16/bfloat16 models: perturbed and evaluated in float32)
    theta = op.replicas.flat_params()
    base = loss_at(op, theta)
    best, delta, _ = apgd_ascent(lambda t: loss_grad_at(op, t), theta, torch.full((op.R,), float(eps), dtype=torch.float64),
                             p="linf", c=theta.abs() + 1, n_iter=n_iter, generator=torch.Generator().manual_seed(seed),
                             common=common)
    return _keskar_percent("epsilon_sharpness", best, base), delta


def _keskar_percent(name: str, best: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``100 (best - base)_+ / (1 + base)`` ``[R]``, NaN where ``1 + base <= 0`` (the normalization
    assumes a non-negative loss: there it would flip the sign or divide by zero), with a
    RuntimeWarning naming the replicas whose loss is negative."""
    negative = (base < 0).nonzero().flatten().tolist()
    if negative:
        warnings.warn(f"{name}: the loss is negative for replicas {negative[:10]}{' ...' if len(negative) > 10 else ''} "
                      "(min {:.4g}); Keskar's normalization by 1 + L assumes L >= 0: the value is inflated by "
                      "1 / (1 + L) where -1 < L < 0, and NaN where L <= -1".format(base.min().item()),
                      RuntimeWarning, stacklevel=3)
    value = 100 * (best - base).clamp_min(0.0) / (1 + base)
    return value.masked_fill(1 + base <= 0, float("nan"))


@register_measure("epsilon_sharpness")
def epsilon_sharpness(op, *, seed, common, eps: float = 1e-3, n_iter: int = 10):
    """Column ``epsilon_sharpness`` ``[R]`` (percent)."""
    value, _ = epsilon_sharpness_values(op, seed=seed, common=common, eps=eps, n_iter=n_iter)
    return {"epsilon_sharpness": finish(op, value)}


def epsilon_subspace_values(op, *, seed: int = 0, common: bool = True, eps: float = 1e-3, p: int = 1000,
                            n_iter: int = 10, A: torch.Tensor | None = None, max_matrix_bytes: int | None = None):
    """Random-subspace Keskar sharpness ``[R]`` (float64 CPU, percent), the maximizing subspace
    coordinates ``y`` ``[R, p]`` and the :class:`~._subspace.RandomSubspace` used (so that the
    parameter perturbation is ``subspace.matmul(y)``). ``seed`` draws the matrix (hashed per block)
    and the ascent's random start; ``common`` gives every replica the same matrix and start."""
    positive("epsilon_sharpness_subspace", eps=eps)
    if max_matrix_bytes is not None and (isinstance(max_matrix_bytes, bool) or not isinstance(max_matrix_bytes, numbers.Integral)
                                         or max_matrix_bytes < 0):
        raise ValueError(f"epsilon_sharpness_subspace: max_matrix_bytes must be a non-negative number of bytes or None, "
                         f"got {max_matrix_bytes!r}")
    if A is None and not (isinstance(p, numbers.Integral) and not isinstance(p, bool) and p > 0):
        raise ValueError(f"epsilon_sharpness_subspace: p must be a positive integer, got {p!r}")
    if A is None and 2 * min(int(p), op.P) > op.P:
        warnings.warn(f"epsilon_sharpness_subspace: p = {min(int(p), op.P)} is not small against the P = {op.P} "
                      "parameters (P < 2p): the random matrix A is then nearly square and ill-conditioned, so the box "
                      "eps (|A^+ theta| + 1) reflects A more than the loss; the measure is meant for p << P (pass a "
                      "smaller p)", RuntimeWarning, stacklevel=2)
    op = working_precision(op)  # (float16/bfloat16 models: perturbed and evaluated in float32)
    theta = op.replicas.flat_params()
    sub = RandomSubspace(op.P, min(int(p), op.P), op.R, seed=seed, common=common, device=op.device, dtype=op.dtype,
                         max_bytes=max_matrix_bytes, A=A)
    half = (sub.pinv_apply(theta).abs() + 1).to(op.device, op.dtype)  # box half-widths / eps
    base = loss_at(op, theta)

    def objective(y):
        value, g = loss_grad_at(op, theta + sub.matmul(y))
        return value, sub.rmatmul(g)

    y0 = torch.zeros(op.R, sub.p, device=op.device, dtype=op.dtype)
    best, y, _ = apgd_ascent(objective, y0, torch.full((op.R,), float(eps), dtype=torch.float64), p="linf", c=half,
                             n_iter=n_iter, generator=torch.Generator().manual_seed(seed), common=common)
    return _keskar_percent("epsilon_sharpness_subspace", best, base), y, sub


@register_measure("epsilon_sharpness_subspace")
def epsilon_sharpness_subspace(op, *, seed, common, eps: float = 1e-3, p: int = 1000, n_iter: int = 10,
                               A: torch.Tensor | None = None, max_matrix_bytes: int | None = None):
    """Column ``epsilon_sharpness_subspace`` ``[R]`` (percent): Keskar's sharpness in a random
    ``p``-dimensional subspace (default p = 1000, eps = 1e-3, n_iter = 10). Cost per replica:
    ``n_iter + 1`` gradients plus ``2 (n_iter + 1) + 1`` products with the ``P x p`` matrix.
    ``max_matrix_bytes``: cache the dense matrix up to this size (None: 1 GiB, or as a memory
    budget's plan decides; a value given here is kept, and the plan counts it)."""
    value, _, _ = epsilon_subspace_values(op, seed=seed, common=common, eps=eps, p=p, n_iter=n_iter, A=A,
                                          max_matrix_bytes=max_matrix_bytes)
    return {"epsilon_sharpness_subspace": finish(op, value)}
