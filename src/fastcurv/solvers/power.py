"""Power iteration (PyHessian's stopping rule), batched over replicas."""
from __future__ import annotations

import torch

from ..ambient import resetting_ambient
from ._norms import row_norms
from .lanczos import EigenResult, whole_count
from .probes import start_vectors


STOP_RESIDUAL = 0.5  # a stop whose residual |Hv - lambda v| exceeds this fraction of |lambda| is no eigenvalue


@resetting_ambient
def power_iteration(op, *, max_iter: int = 100, tol: float = 1e-3, seed: int = 0, common: bool = True,
                    return_vectors: bool = False, callback=None) -> EigenResult:
    """Eigenvalue of largest *modulus* per replica: ``v <- Hv/|Hv|``, ``lambda = v^T H v``.

    A replica stops when ``|lambda_t - lambda_{t-1}| <= tol * (|lambda_{t-1}| + 1e-6)`` (PyHessian's
    rule: relative above ``|lambda|`` of about 1e-6, absolute below, so a Hessian whose eigenvalues
    are all far below 1e-6, a confident model's, stops after two steps whatever ``tol``: a float64
    MLP with lambda_max 7.0e-23 stopped 13% low, converged, within its error bound), or when
    ``Hv = 0`` (v is then an eigenvector of eigenvalue 0); residuals are ``|Hv -
    lambda v|``; ``error_bounds`` the residual where the replica converged, ``inf`` where it did not
    (the residual then bounds the distance to some eigenvalue, not to the wanted one). A replica that stopped with a residual above ``STOP_RESIDUAL * |lambda|`` is not
    reported converged: with two extreme eigenvalues of nearly equal modulus and opposite signs the
    estimate stops moving between them, at no eigenvalue. Prefer :func:`lanczos`: it needs far
    fewer matvecs for the same accuracy and finds the largest algebraic eigenvalue.

    max_iter: matvecs per replica at most, a positive integer (a whole float such as ``100.0``
    too; anything else raises a ValueError: 0 gave NaN eigenvalues).
    """
    max_iter = whole_count("max_iter", max_iter)
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
        # (row_norms: torch's float32 norm of a confident model's Hv, entries 1e-24, is 0: a false Hv = 0)
        r = row_norms(w - new.to(w.dtype).to(w.device).unsqueeze(-1) * va).to(torch.float64).cpu()
        old = lam[ai]
        ok = torch.isfinite(new) & ~op.failed[ai]
        wn = row_norms(w, keepdim=True)
        zero = (wn[:, 0] == 0).cpu()  # Hv = 0: an eigenvector of eigenvalue 0
        done = ok & (((t > 0) & ((new - old).abs() <= tol * (old.abs() + 1e-6))) | zero)
        lam[ai], res[ai] = new, r
        iters[ai] = t + 1
        converged[ai] = done & (r <= STOP_RESIDUAL * new.abs())
        v[dev_ai] = w / torch.where(wn > 0, wn, 1.0)  # (Hv = 0 stays 0; a float16 norm may be subnormal, below finfo.tiny)
        active[ai[done | ~ok]] = False
        if callback is not None:
            callback(t + 1, len(ai))
    lam[op.failed], res[op.failed] = float("nan"), float("nan")
    converged &= ~op.failed
    bounds = torch.where(converged | lam.isnan(), res, torch.full_like(res, float("inf")))  # (as lanczos': no bound unconverged)
    out = EigenResult(lam.unsqueeze(1), res.unsqueeze(1), bounds.unsqueeze(1), iters, converged)
    if return_vectors:
        out.eigenvectors = v.unsqueeze(1)
    return out
