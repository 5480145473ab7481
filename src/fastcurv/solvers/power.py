"""Power iteration (PyHessian's stopping rule), batched over replicas."""
from __future__ import annotations

import torch

from .lanczos import EigenResult
from .probes import start_vectors


def power_iteration(op, *, max_iter: int = 100, tol: float = 1e-3, seed: int = 0, common: bool = True,
                    return_vectors: bool = False, callback=None) -> EigenResult:
    """Eigenvalue of largest *modulus* per replica: ``v <- Hv/|Hv|``, ``lambda = v^T H v``.

    A replica stops when ``|lambda_t - lambda_{t-1}| <= tol * (|lambda_{t-1}| + 1e-6)`` (PyHessian's
    rule); residuals are ``|Hv - lambda v|``. Prefer :func:`lanczos`: it needs far fewer matvecs
    for the same accuracy and finds the largest algebraic eigenvalue.
    """
    R = op.R
    v = start_vectors(op, seed, common)
    lam = torch.full((R,), float("nan"), dtype=torch.float64)
    res = torch.full((R,), float("nan"), dtype=torch.float64)
    iters = torch.zeros(R, dtype=torch.long)
    converged = torch.zeros(R, dtype=torch.bool)
    active = ~op.failed.clone()
    for t in range(max_iter):
        ai = active.nonzero().flatten()
        if len(ai) == 0:
            break
        dev_ai = ai.to(op.device)
        va = v[dev_ai]
        w = op.matvec(va, idx=ai)
        new = (w * va).sum(-1).to(torch.float64).cpu()
        r = (w - new.to(w.dtype).to(w.device).unsqueeze(-1) * va).norm(dim=-1).to(torch.float64).cpu()
        old = lam[ai]
        ok = torch.isfinite(new) & ~op.failed[ai]
        done = ok & (t > 0) & ((new - old).abs() <= tol * (old.abs() + 1e-6))
        lam[ai], res[ai] = new, r
        iters[ai] = t + 1
        converged[ai] = done
        v[dev_ai] = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        active[ai[done | ~ok]] = False
        if callback is not None:
            callback(t + 1, len(ai))
    lam[op.failed], res[op.failed] = float("nan"), float("nan")
    converged &= ~op.failed
    out = EigenResult(lam.unsqueeze(1), res.unsqueeze(1), res.unsqueeze(1).clone(), iters, converged)
    if return_vectors:
        out.eigenvectors = v.unsqueeze(1)
    return out
