"""Mason-Williams et al. (TMLR 2026) "SAM sharpness": the mean absolute loss change under
random isotropic perturbations of norm about rho, divided by rho.

``S = (1/N) sum_k |L(theta + rho xi_k / sqrt(P)) - L(theta)| / rho`` with xi_k ~ N(0, I) over the
perturbed entries (parameters, plus every floating-point buffer such as BatchNorm running
statistics when ``perturb_buffers=True``, as the reference code perturbs every float entry of the
state dict) and P the number of *parameters* (the reference code's ``num_params``; buffers get the
same scale). Defaults from the reference code: rho = 0.005, N = 100. Units: loss per unit of
parameter distance. Not reparameterization-invariant (isotropic perturbation).
"""
from __future__ import annotations

import torch

from . import register_measure
from ._common import finish, loss_at, positive, working_precision


@register_measure("mw_sharpness")
def mw_sharpness(op, *, seed, common, rho: float = 0.005, n_samples: int = 100, perturb_buffers: bool = True):
    """Column ``mw_sharpness`` ``[R]`` with a Monte-Carlo standard error."""
    positive("mw_sharpness", rho=rho, n_samples=n_samples)
    if n_samples < 2:
        raise ValueError("mw_sharpness: n_samples must be at least 2")
    op = working_precision(op)  # (float16/bfloat16 models: perturbed and evaluated in float32)
    rs = op.replicas
    theta = rs.flat_params()
    base = loss_at(op, theta)
    buf_names = [n for n, b in rs.buffers.items() if b.is_floating_point()] if perturb_buffers else []
    scale = rho / op.P**0.5
    gen = torch.Generator().manual_seed(seed)
    rows = 1 if common else op.R
    vals = []
    for _ in range(n_samples):
        xi = torch.randn(rows, op.P, generator=gen, dtype=torch.float64).to(op.device, op.dtype).expand(op.R, -1)
        bufs = dict(rs.buffers)
        for n in buf_names:
            b = rs.buffers[n]
            z = torch.randn((rows,) + tuple(b.shape[1:]), generator=gen, dtype=torch.float64).to(b.device, b.dtype)
            bufs[n] = b + scale * z.expand_as(b)
        vals.append((loss_at(op, theta + scale * xi, buffers=bufs) - base).abs() / rho)
    v = torch.stack(vals, 1)
    return {"mw_sharpness": finish(op, v.mean(1), stderr=v.std(1) / n_samples**0.5)}
