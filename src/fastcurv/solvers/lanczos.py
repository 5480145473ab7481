"""Lanczos with partial (or full) reorthogonalization, one Krylov space per replica, run in lock step."""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..ambient import resetting_ambient
from ..memory_budget import available_memory
from ..replicas import consecutive_runs
from ._norms import row_norms
from ._project import project_out_
from .probes import as_seed, start_vectors


@dataclass
class EigenResult:
    """Extreme eigenvalues per replica.

    eigenvalues: ``[R, k]`` (largest first for which="largest", smallest first for "smallest").
    residuals: ``[R, k]`` Ritz residual norms ``|beta_m s_m|`` (some eigenvalue lies within r of
    theta, not necessarily the wanted one); error_bounds: ``[R, k]`` the estimate
    ``min(r, r^2 / gap)`` of ``|theta - lambda|`` for the columns that converged
    (``column_converged``), ``inf`` for the others: before convergence a Ritz value can sit on the
    second eigenvalue while the first has not entered the Krylov space, with a small residual and a
    large gap to the other Ritz values (measured errors up to 28,000x that estimate, and above r in
    60% of runs stopped after 3 steps); the gap is to the other Ritz values, so a converged column
    whose eigenvalue has a twin the Krylov space has not separated yet (closer than about
    ``sqrt(tol)`` relative) can be off by more than the estimate, though within ``tol``: ``residuals``
    is the conservative bound there; NaN beside a NaN eigenvalue. iterations: ``[R]`` matvecs used.
    converged: ``[R]`` bool, all k columns. column_converged: ``[R, k]`` bool, each column's own test
    (its residual, after the steps one eigenvalue needs): the top eigenvalue of a top-k run may have
    converged while the others have not. eigenvectors: ``[R, k, P]`` Ritz vectors when requested.
    reorthogonalized: ``[R]`` steps whose new vector was orthogonalized against the whole basis.
    basis / tridiag_trace: the orthonormal Krylov basis ``[R, m, P]`` (zero rows past each
    replica's last step) and ``trace(Q^T H Q)`` ``[R]``, kept for trace deflation when requested.
    """

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    error_bounds: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    reorthogonalized: torch.Tensor | None = None
    eigenvectors: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    tridiag_trace: torch.Tensor | None = None
    alphas: torch.Tensor | None = None
    betas: torch.Tensor | None = None
    column_converged: torch.Tensor | None = None


def _tridiag(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Symmetric tridiagonal ``[B, n, n]`` from diagonals alpha ``[B, n]`` and beta ``[B, n-1]``."""
    T = torch.diag_embed(alpha)
    if beta.shape[-1]:
        T = T + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    return T


def _ritz_errors(theta: torch.Tensor, resid: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """min(r, r^2/gap) for the Ritz values at positions ``pick`` (gap to the nearest other one)."""
    n = theta.shape[-1]
    if n == 1:
        return resid
    sel = theta.gather(1, pick)
    diff = (theta.unsqueeze(1) - sel.unsqueeze(2)).abs()
    diff.scatter_(2, pick.unsqueeze(2), float("inf"))
    gap = diff.min(dim=2).values.clamp_min(1e-300)
    return torch.minimum(resid, resid * resid / gap)


def _capacity(R: int, steps: int, P: int, dtype, device) -> int:
    """Basis rows to allocate per replica: all ``steps`` when that takes at most a quarter of the
    available memory (on the CPU, pages never written are never mapped, so the unused tail costs
    nothing), else 16 (then the basis grows by doubling, copying it each time)."""
    try:
        room = available_memory(device)
    except ValueError:
        return min(steps, 16)
    need = R * steps * P * torch.empty((), dtype=dtype).element_size()
    return steps if need <= room // 4 else min(steps, 16)


def _omega_next(om: torch.Tensor, om_prev: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                b: torch.Tensor, eps1: float) -> torch.Tensor:
    """Simon's estimates ``[n, j + 2]`` of ``q_{j+1} . q_k`` for the vector a step makes.

    om, om_prev: ``[n, >= j + 1]`` the estimates for ``q_j`` and ``q_{j-1}``; alpha ``[n, j + 1]``,
    beta ``[n, j + 1]`` (``beta[:, i]`` couples ``q_{i-1}`` and ``q_i``; ``beta[:, 0] = 0``) and the
    new vector's norm b ``[n]`` before normalization, all float64. The recurrence carries the
    three-term relation's rounding into the inner products; each term adds ``eps1 * (beta_{k+1} +
    b)`` away from zero (Simon 1984), so the estimate errs towards reorthogonalizing."""
    j = alpha.shape[1] - 1
    n = om.shape[0]
    new = torch.zeros(n, j + 2, dtype=torch.float64)
    if j > 0:
        below = torch.cat([torch.zeros(n, 1, dtype=torch.float64), om[:, : j - 1]], 1)  # om_{j, k-1}
        t = (beta[:, 1 : j + 1] * om[:, 1 : j + 1] + (alpha[:, :j] - alpha[:, j : j + 1]) * om[:, :j]
             + beta[:, :j] * below - beta[:, j : j + 1] * om_prev[:, :j])
        t += torch.where(t >= 0, eps1, -eps1) * (beta[:, 1 : j + 1] + b.unsqueeze(1))
        new[:, :j] = t / b.clamp_min(1e-300).unsqueeze(1)
    new[:, j] = eps1
    new[:, j + 1] = 1.0
    return new


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products ``[n]`` of ``[n, P]`` tensors, without an ``[n, P]`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _reorthogonalize(Q: torch.Tensor, w: torch.Tensor, ai: torch.Tensor, due: torch.Tensor, j: int,
                     gather: bool | None = None) -> None:
    """Orthogonalize the rows ``w[due]`` (replicas ``ai[due]``) against ``Q[replica, : j + 1]``,
    in place: through views of one replica's basis at a time, or (``gather``, the default on a GPU,
    where a launch per replica costs more than the copy) on one gathered copy of the bases."""
    if gather is None:
        gather = Q.device.type != "cpu"
    if not gather:
        for local in due.nonzero().flatten().tolist():
            rr = int(ai[local])
            project_out_(Q[rr : rr + 1, : j + 1], w[local : local + 1].unsqueeze(1))
        return
    pick = due.to(w.device)
    sub = w[pick].unsqueeze(1)
    project_out_(Q[ai[due].to(Q.device), : j + 1], sub)
    w[pick] = sub.squeeze(1)


def count(name: str, v) -> int:
    """``v``, a positive integer, as an int; a ValueError naming ``name`` else."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def whole(v):
    """``v`` as an int when it is a whole float (a JSON or YAML config's ``100.0``; numpy's too),
    else ``v`` as it is."""
    if (isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) and math.isfinite(v)
            and float(v).is_integer()):
        return int(v)
    return v


def whole_count(name: str, v) -> int:
    """As :func:`count`, also taking a whole float (a JSON or YAML config's ``100.0``): the rule
    for every count fastcurv takes (other floats raise the ValueError naming ``name``)."""
    return count(name, whole(v))


def min_iter_default(k: int, which: str = "largest") -> int:
    """The fewest Lanczos steps before a replica may stop: 10 per wanted eigenvalue, 30 per one at
    the bottom of the spectrum, where eigenvalues crowd. A residual test only shows that *some*
    eigenvalue lies near each Ritz value; on 1620 runs of tiny MLPs (P = 100-250, dense float64
    references) stopping on it alone reported lambda_max converged but 3-32% low in 0.2-3.5% of them
    (a start vector nearly orthogonal to the top eigenvector), top-5 and lambda_min in up to 2%
    of 432; with these minimums none at tol=1e-3 (two lambda_min at 1.7x tol=1e-2). Real models
    rarely stop this early (W1's lambda_max: 18-34 steps)."""
    return (10 if which == "largest" else 30) * k


def resolvable_tol(dtype: torch.dtype) -> float:
    """The smallest relative accuracy Lanczos can reach with matvecs in ``dtype``: ``10 eps``."""
    return 10 * torch.finfo(dtype).eps


def _second_pass(Q: torch.Tensor, w: torch.Tensor, b: torch.Tensor, before: torch.Tensor, ai: torch.Tensor,
                 done: torch.Tensor, j: int) -> None:
    """Orthogonalize again the rows ``w[done]`` whose norm ``b`` fell below half its value ``before``
    the first pass, and update ``b`` (in place). Such cancellation (a Krylov space nearly run out)
    leaves one Gram-Schmidt pass's rounding along the basis as large as what remains; a second pass
    removes it ("twice is enough"): with one, a float32 MLP with confident samples (P = 84) lost
    orthogonality and reported lambda_min -8.0 for -2e-6."""
    again = done & (b < 0.5 * before).cpu()
    if again.any():
        _reorthogonalize(Q, w, ai, again, j)
        b[again.to(b.device)] = row_norms(w[again.to(w.device)])


def _start(op, v0, seed: int, common: bool) -> torch.Tensor:
    """The start vectors ``[R, P]``: ``v0``, with rows that cannot be normalized (zero or not
    finite) replaced by the random start, or the random start itself."""
    if v0 is None:
        return start_vectors(op, seed, common)
    if not torch.is_tensor(v0) or tuple(v0.shape) != (op.R, op.P):
        raise ValueError(f"v0 must be a tensor [R, P] = [{op.R}, {op.P}], got "
                         f"{tuple(v0.shape) if torch.is_tensor(v0) else type(v0).__name__}")
    v0 = v0.detach().to(op.device, op.dtype)
    norm = row_norms(v0, keepdim=True)  # (a confident model's gradient, entries 1e-25, is no zero vector)
    usable = torch.isfinite(norm) & (norm > 0)
    if not bool(usable.all()):
        bad = (~usable).flatten().nonzero().flatten().tolist()
        warnings.warn(f"v0 is zero or not finite for replicas {bad}: they start from a random vector",
                      RuntimeWarning, stacklevel=4)
        v0 = torch.where(usable, v0, start_vectors(op, seed, common))
    return v0


@resetting_ambient
def lanczos(
    op,
    *,
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    which: str = "largest",
    v0: torch.Tensor | None = None,
    seed: int = 0,
    common: bool = True,
    min_iter: int | None = None,
    return_vectors: bool = False,
    keep_basis: bool = False,
    callback: Callable[[int, int], None] | None = None,
    reorthogonalize: str | None = None,
) -> EigenResult:
    """Top-k (or bottom-k) eigenvalues of each replica's Hessian by Lanczos.

    Every replica runs its own Krylov space from the same start vector (common random numbers)
    and stops on its own when all its k Ritz values have residual ``|beta_m s_m| <= tol * |theta|``
    (so each lies within ``tol * |theta|`` of an eigenvalue; the reported ``error_bounds``, the
    sharper estimate ``min(r, r^2 / gap)``, are usually far smaller; ``inf`` for a column that did
    not converge);
    converged replicas drop out of later matvecs. Tridiagonal eigenproblems are solved in float64.
    One start vector per replica finds each distinct eigenvalue once: an eigenvalue of multiplicity
    m > 1 fills one column of a top-k, not m (see the README's Lanczos notes).

    Reorthogonalization is partial by default (Simon 1984): a recurrence on the tridiagonal
    coefficients estimates how far each new vector has drifted from orthogonality to the basis, and
    only when an estimate passes ``sqrt(eps)`` of the operator's dtype is that vector (and the next,
    whose recurrence inherits the drift) orthogonalized against the replica's whole basis. The
    basis then stays orthogonal to ``sqrt(eps)``, enough for Ritz values accurate to ``eps``
    (no spurious copies), at a fraction of the passes over the basis that full reorthogonalization
    makes every step. With ``keep_basis`` the default is "full": trace deflation projects probes off
    the basis and needs it orthonormal to working precision.

    Args:
        op: the batched operator. k: how many eigenvalues. max_iter: matvecs per replica at most
        (both positive integers; whole floats such as ``100.0`` too, else a ValueError naming them).
        tol: relative accuracy target. which: "largest" (algebraic) or "smallest".
        v0: start vectors ``[R, P]`` (default: Gaussian from ``seed``; rows that are zero or not
            finite, e.g. the loss gradient of a replica whose ReLUs all died, start from it too). min_iter: do at least this
        many steps unless the Krylov space is exhausted first (default ``min_iter_default(k, which)``,
        or ``min(max_iter, P)`` where that is fewer: a residual test after few steps passes on the
        second eigenvalue when the start vector barely touches the first; or SLQ's nodes).
        callback(step, n_active) per step.
        reorthogonalize: "partial" or "full" (default: "full" with keep_basis, else "partial").
    """
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    k, max_iter = whole_count("k", k), whole_count("max_iter", max_iter)
    seed = as_seed(seed)
    if reorthogonalize is None:
        reorthogonalize = "full" if keep_basis else "partial"
    if reorthogonalize not in ("partial", "full"):
        raise ValueError(f"reorthogonalize must be 'partial' or 'full', got {reorthogonalize!r}")
    full = reorthogonalize == "full"
    R, P = op.R, op.P
    if k > P:
        raise ValueError(f"k={k} eigenvalues asked of a Hessian of dimension P={P} (the models' parameter count)")
    if 0 < tol < resolvable_tol(op.dtype):
        warnings.warn(f"tol={tol:g} is below what {op.dtype} matvecs resolve; using {resolvable_tol(op.dtype):.2g} "
                      "(10 eps; float64 models reach finer tolerances)", RuntimeWarning, stacklevel=3)
        tol = resolvable_tol(op.dtype)
    m = min(max_iter, P)
    if min_iter is None:
        # (a max_iter below it is the caller's choice. A model with P below the minimum runs its whole
        # Krylov space: capping the minimum at P/2, against spurious Ritz values at the end of a float32
        # space before the second Gram-Schmidt pass, let top-5 and lambda_min stop converged but up to
        # 13% off in 0.1-0.8% of runs on P = 27-51; run to P there were none, float32 or float64)
        min_iter = min(min_iter_default(k, which), m)
    f64 = torch.float64
    v0 = _start(op, v0, seed, common)
    # Q[r, :n] is replica r's Krylov basis. Rows are never moved: on the CPU the active replicas are
    # read in runs of consecutive replicas (views), so no step copies the basis.
    Q = torch.empty(R, _capacity(R, m + 1, P, op.dtype, op.device), P, dtype=op.dtype, device=op.device)
    Q[:, 0] = v0 / row_norms(v0, keepdim=True)
    alpha = torch.zeros(R, m, dtype=f64)
    beta = torch.zeros(R, m + 1, dtype=f64)
    eig = torch.full((R, k), float("nan"), dtype=f64)
    res = torch.full((R, k), float("nan"), dtype=f64)
    err = torch.full((R, k), float("nan"), dtype=f64)
    eigenvectors = torch.full((R, k, P), float("nan"), dtype=op.dtype, device=op.device) if return_vectors else None
    iters = torch.zeros(R, dtype=torch.long)
    converged = torch.zeros(R, dtype=torch.bool)
    col_conv = torch.zeros(R, k, dtype=torch.bool)
    min_iter_one = min(min_iter, min_iter_default(1, which))  # (a column's own test: the steps one eigenvalue needs)
    reorths = torch.zeros(R, dtype=torch.long)
    active = ~op.failed.clone()
    # Simon's estimates of q_j . q_k (om) and q_{j-1} . q_k (om_prev), and the replicas whose next
    # vector must be reorthogonalized because this one was
    eps = torch.finfo(op.dtype).eps
    eps1, limit = eps * P**0.5 / 2, eps**0.5
    breakdown_tol = max(1e-10, eps * P**0.5)
    om = torch.zeros(R, m + 2, dtype=f64)
    om[:, 0] = 1.0
    om_prev = torch.zeros(R, m + 2, dtype=f64)
    force = torch.zeros(R, dtype=torch.bool)
    sign = 1.0 if which == "largest" else -1.0

    for j in range(m):
        ai = active.nonzero().flatten()
        if len(ai) == 0:
            break
        if j + 1 >= Q.shape[1]:
            grown = Q.new_empty(R, min(2 * Q.shape[1], m + 1), P)
            grown[:, : j + 1] = Q[:, : j + 1]
            Q = grown
        every = len(ai) == R
        ai_dev = ai.to(op.device)
        # (rows of Q, rows of w) per group: runs of consecutive replicas are views of Q on the CPU;
        # on a GPU one gathered copy costs less than a kernel launch per run
        if every:
            groups = [(slice(0, R), slice(0, R))]
        elif Q.device.type == "cuda":
            groups = [(ai_dev, slice(0, len(ai)))]
        else:
            groups = [(slice(r0, r0 + n), slice(p0, p0 + n)) for r0, p0, n in consecutive_runs(ai, R)]
        qj = Q[:, j] if every else Q[ai_dev, j]
        # w is ours (a fresh matvec result): update it in place, these are [R, P] tensors
        w = op.matvec(qj, idx=None if every else ai)
        a = _rowdot(w, qj)
        # the three-term recurrence w -= beta_j q_{j-1} + alpha_j q_j, one pass over w, then
        # reorthogonalization against each replica's basis: every step, or where Simon's estimates
        # say it is due
        lo = max(j - 1, 0)
        coef = (torch.stack([beta[ai, j].to(w.dtype).to(w.device), a], dim=-1) if j > 0 else a.unsqueeze(-1)).unsqueeze(1)
        for gq, gw in groups:
            wr = w[gw].unsqueeze(1)
            wr.baddbmm_(coef[gw], Q[gq, lo : j + 1], alpha=-1)
        if full:
            before = row_norms(w)
            for gq, gw in groups:
                project_out_(Q[gq, : j + 1], w[gw].unsqueeze(1))
        # (row_norms: torch's float32 norm of a confident model's Hv, entries 1e-24, is 0, a false breakdown)
        b = row_norms(w)
        alpha[ai, j] = a.to(f64).cpu()
        if full:
            reorths[ai] += 1
            _second_pass(Q, w, b, before, ai, torch.ones(len(ai), dtype=torch.bool), j)
        else:
            new = _omega_next(om[ai], om_prev[ai], alpha[ai, : j + 1], beta[ai, : j + 1], b.to(f64).cpu(), eps1)
            due = force[ai] | ((new[:, :j].abs().amax(1) > limit) if j else torch.zeros_like(force[ai]))
            if due.any():
                before = b.clone()
                _reorthogonalize(Q, w, ai, due, j)
                b[due.to(b.device)] = row_norms(w[due.to(w.device)])
                _second_pass(Q, w, b, before, ai, due, j)
                new[due, : j + 1] = eps1
                reorths[ai[due]] += 1
            force[ai] = due & ~force[ai]
            om_prev[ai], om[ai, : j + 2] = om[ai], new
        beta[ai, j + 1] = b.to(f64).cpu()
        # the normalized vector goes straight into the basis (one pass over w, not two)
        den = b.clamp_min(torch.finfo(w.dtype).tiny).unsqueeze(-1)
        for gq, gw in groups:
            if isinstance(gq, slice):
                torch.div(w[gw], den[gw], out=Q[gq, j + 1])
            else:
                Q[gq, j + 1] = w[gw] / den[gw]
        iters[ai] = j + 1
        if callback is not None:
            callback(j + 1, len(ai))

        n = j + 1
        T = _tridiag(alpha[ai, :n], beta[ai, 1:n])
        finite = torch.isfinite(T.reshape(len(ai), -1)).all(1) & ~op.failed[ai]
        T = torch.where(finite.view(-1, 1, 1), T, torch.zeros_like(T))
        theta, S = torch.linalg.eigh(T)
        kk = min(k, n)
        pick = (torch.arange(n - 1, n - 1 - kk, -1) if sign > 0 else torch.arange(kk)).expand(len(ai), kk)
        bcur = beta[ai, n]
        r = (bcur.unsqueeze(1) * S[:, n - 1, :].gather(1, pick).abs())
        # the matvecs' rounding: no bound below 10 eps |H| (measured float32 errors reached 0.7 eps |theta|)
        floor = resolvable_tol(op.dtype) * theta.abs().max(dim=1, keepdim=True).values
        e = torch.maximum(_ritz_errors(theta, r, pick), floor)
        th = theta.gather(1, pick)
        scale = th.abs().clamp_min(1e-300)  # (relative tests: an operator scaled by 1e-40 behaves as one by 1)
        # the Krylov space is exhausted once the new vector's norm is at the matvecs' rounding level
        # (about 0.1 sqrt(P) eps |H| measured in float32, 2.8e-6 |H| on a 50,890-parameter MLP with
        # mostly dead ReLUs, where continuing made the coefficients grow to infinity)
        breakdown = bcur <= breakdown_tol * theta.abs().max(dim=1).values.clamp_min(1e-300)
        # stop on the residual (ARPACK's test: an eigenvalue lies within r of theta); the sharper
        # estimate e can look converged while a larger eigenvalue has not yet entered the Krylov
        # space (seen on 5 of 100 untrained MLPs, errors up to 2%)
        # a breakdown (the start vector's Krylov space is exhausted) makes the Ritz values found exact
        # up to the residual, now at rounding level; with fewer than k of them the others cannot be
        # reached: stopped, not converged, NaN. (No step can follow one: the next vector would be
        # rounding noise, not orthogonal to the basis.)
        # (at a breakdown the residuals are at the matvecs' rounding level, which a Ritz value of 0, the
        # bottom of a rank-deficient Hessian, can never be tol times: the rounding floor then counts)
        passed = (r <= tol * scale) | (breakdown.unsqueeze(1) & (r <= floor))
        done = (kk == k) & passed.all(dim=1) & ((n >= min_iter) | breakdown)
        col_done = passed & ((n >= min_iter_one) | breakdown).unsqueeze(1)
        stop = done | breakdown | ~finite | torch.tensor(n == m).expand_as(done)
        for local in stop.nonzero().flatten().tolist():
            rr = int(ai[local])
            if bool(finite[local]):
                eig[rr, :kk], res[rr, :kk] = th[local], r[local]
                # (before convergence a Ritz value may sit near another eigenvalue than the wanted one,
                # with a small residual: no bound on its error)
                err[rr, :kk] = torch.where(col_done[local], e[local], float("inf"))
                converged[rr] = bool(done[local])
                col_conv[rr, :kk] = col_done[local]
                if return_vectors:
                    S_r = S[local][:, pick[local]]
                    eigenvectors[rr, :kk] = S_r.T.to(op.dtype).to(op.device) @ Q[rr, :n]
            active[rr] = False

    failed = op.failed.clone()
    eig[failed], res[failed], err[failed] = float("nan"), float("nan"), float("nan")
    converged &= ~failed
    col_conv &= ~failed.unsqueeze(1)
    out = EigenResult(eig, res, err, iters, converged, reorths, eigenvectors, column_converged=col_conv)
    if keep_basis:
        n_max = int(iters.max()) if len(iters) else 0
        out.basis = Q[:, :n_max]  # a view: rows past a replica's last step are zeroed below
        for rr in range(R):
            n_r = 0 if bool(failed[rr]) else int(iters[rr])
            if n_r < n_max:
                out.basis[rr, n_r:] = 0
        tri = torch.zeros(R, dtype=f64)
        for rr in range(R):
            tri[rr] = alpha[rr, : int(iters[rr])].sum()
        tri[failed] = float("nan")
        out.tridiag_trace = tri
    out.alphas, out.betas = alpha, beta
    return out
