"""Per-replica bisection of a perturbation scale to a target accuracy drop, all replicas in lock
step (shared by the PAC-Bayes sigma search and Jiang et al.'s worst-case sharpness alpha search,
following Dziugaite et al.'s re-implementation of Jiang et al. 2020).

Each replica bisects its own scale on ``[0, hi]``: at the midpoint it asks ``drop_fn`` for the
accuracy drop; a drop within ``tol`` of ``target`` ends that replica's search ("done"), a larger
drop moves the upper end down, a smaller (or NaN) one moves the lower end up. At most ``depth``
midpoints. Replicas not done after ``depth`` steps keep their last midpoint and are reported as
not converged.
"""
from __future__ import annotations

import torch

from ._common import finish


def bisect_scale(drop_fn, R: int, *, target: float, tol: float, hi: float, depth: int,
                 skip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bisect per-replica scales.

    Args:
        drop_fn: ``f(scale [R] float64, active [R] bool, step int) -> drop [R] float64``: the
            accuracy drop at ``scale`` for the active replicas (other entries are ignored, so
            ``f`` may evaluate only the active ones or all of them).
        R: replicas. target, tol: stop when ``|drop - target| <= tol``. hi: the upper end of the
            initial interval ``[0, hi]``. depth: most midpoints evaluated.
        skip: ``[R]`` bool, replicas never searched (e.g. failed ones; reported not converged).
    Returns: ``(scale [R] float64, done [R] bool)``, both on the CPU.
    """
    lo = torch.zeros(R, dtype=torch.float64)
    up = torch.full((R,), float(hi), dtype=torch.float64)
    scale = (lo + up) / 2
    done = torch.zeros(R, dtype=torch.bool)
    skip = torch.zeros(R, dtype=torch.bool) if skip is None else skip.cpu().bool()
    for step in range(depth):
        active = ~done & ~skip
        if not bool(active.any()):
            break
        scale = torch.where(active, (lo + up) / 2, scale)
        drop = drop_fn(scale, active, step).to(torch.float64).cpu()
        hit = active & ((drop - target).abs() <= tol)
        done |= hit
        move = active & ~hit
        too_much = drop > target
        up = torch.where(move & too_much, scale, up)
        lo = torch.where(move & ~too_much, scale, lo)
    return scale, done


def flatness_columns(op, prefix: str, search, scale_name: str, magnitude_aware: bool, **options) -> dict:
    """The measure columns of a scale search: ``{prefix}_flatness`` (1/scale^2) and
    ``{prefix}_{scale_name}``, and, with ``magnitude_aware``, the same for ``{prefix}_mag``;
    ``search(op, magnitude=bool, **options)`` returns ``(scale [R], done [R], ...)``."""
    out = {}
    kinds = [(prefix, False)] + ([(f"{prefix}_mag", True)] if magnitude_aware else [])
    for name, mag in kinds:
        scale, done, *_ = search(op, magnitude=mag, **options)
        out[f"{name}_flatness"] = finish(op, 1 / scale**2, converged=done)
        out[f"{name}_{scale_name}"] = finish(op, scale, converged=done)
    return out
