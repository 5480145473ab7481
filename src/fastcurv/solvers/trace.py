"""Stochastic trace estimators with standard errors: Hutchinson, Hutch++ and Krylov deflation."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ambient import resetting_ambient
from ._project import project_out_
from .lanczos import whole_count
from .probes import as_seed, probe_vectors


@dataclass
class TraceResult:
    """trace, stderr: ``[R]``. num_matvecs: probe-matvecs per replica. samples: ``[R, m]`` the
    quadratic forms of the stochastic part (after deflation). exact_part: ``[R]`` trace of the
    deflated subspace (0 for plain Hutchinson)."""

    trace: torch.Tensor
    stderr: torch.Tensor
    num_matvecs: int
    samples: torch.Tensor
    exact_part: torch.Tensor


def _quadratic_forms(G: torch.Tensor, HG: torch.Tensor) -> torch.Tensor:
    """``[R, K]`` float64 CPU: ``g_k^T (H g_k)`` per replica and probe, without a ``[R, K, P]`` temporary."""
    R, K, P = G.shape
    return torch.bmm(G.reshape(R * K, 1, P), HG.reshape(R * K, P, 1)).view(R, K).to(torch.float64).cpu()


def probes_per_matvec(op, probe_batch: int | None = None) -> int:
    """Probes per matvec. Default: 10 on a GPU, where stacking probes raises GEMM efficiency; on
    the CPU the operator's backend's ``cpu_probe_batch``: 1 for MLP chains, where a K=1 matvec
    reuses the memory the Lanczos steps already touched and a single larger one pays first-touch
    page faults (W1's job with the deflated trace 7.6-7.9 s against 8.1-8.4 s with 10, although
    in a loop of trace stages 10 probes took 1.06 s as one matvec against 1.35 s one by one); 10
    in the fused engine's conv and residual graphs, where the job gains (W3 3.0-3.4 -> 2.9-3.3 s,
    W4 5.6-5.75 -> 5.4-5.6 s)."""
    if probe_batch is None:
        if op.device.type != "cpu":
            return 10
        return getattr(getattr(op, "backend", None), "cpu_probe_batch", 1)
    return whole_count("probe_batch", probe_batch)


@resetting_ambient
def hutchinson(op, *, num_probes: int = 30, probe_batch: int | None = None, seed: int = 0, common: bool = True,
               kind: str = "rademacher", basis: torch.Tensor | None = None, basis_trace: torch.Tensor | None = None,
               callback=None) -> TraceResult:
    """Hutchinson's estimator ``mean_j g_j^T H g_j``, optionally deflated.

    With an orthonormal ``basis`` ``[R, s, P]`` (rows; zero rows allowed) whose ``trace(Q H Q^T)``
    is known (``basis_trace`` ``[R]``, e.g. the Lanczos tridiagonal's trace), the estimate is
    ``basis_trace + mean_j g~_j^T H g~_j`` with ``g~ = (I - Q^T Q) g``: unbiased, and with far less
    variance when the basis holds the dominant eigenvectors. stderr = sample std / sqrt(m).
    Probes are applied ``probe_batch`` at a time (K per matvec; default: see :func:`probes_per_matvec`).
    Counts are integers (whole floats such as ``30.0`` too; anything else raises a ValueError naming it).
    """
    num_probes = whole_count("num_probes", num_probes)
    if num_probes < 2:
        raise ValueError(f"num_probes must be at least 2 to give a standard error, got {num_probes}")
    R, P = op.R, op.P
    probe_batch = probes_per_matvec(op, probe_batch)
    block = max(probe_batch, 10)  # probes drawn and deflated together: one pass over the basis per block
    g = torch.Generator().manual_seed(as_seed(seed))
    samples = []
    done = 0
    while done < num_probes:
        G = probe_vectors(R, min(block, num_probes - done), P, generator=g, kind=kind, common=common, dtype=op.dtype, device=op.device)
        if basis is not None:
            project_out_(basis, G)
        for c in G.split(probe_batch, dim=1):
            c = c.contiguous()
            samples.append(_quadratic_forms(c, op.matvec(c)))
            done += c.shape[1]
            if callback is not None:
                callback(done, R)
    s = torch.cat(samples, dim=1)
    exact = basis_trace.to(torch.float64).cpu() if basis_trace is not None else torch.zeros(R, dtype=torch.float64)
    trace = exact + s.mean(1)
    stderr = s.std(1) / math.sqrt(s.shape[1])
    trace[op.failed], stderr[op.failed] = float("nan"), float("nan")
    return TraceResult(trace, stderr, num_probes, s, exact)


@resetting_ambient
def hutchpp(op, *, num_matvecs: int = 30, probe_batch: int | None = None, seed: int = 0, common: bool = True,
            callback=None) -> TraceResult:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021) with a budget of ``num_matvecs`` per replica.

    A third of the budget sketches ``Y = H S``; ``Q = orth(Y)``; a third gives ``trace(Q^T H Q)``
    exactly; the last third runs Hutchinson on ``(I - QQ^T) H (I - QQ^T)``. The standard error
    is that of the stochastic part. ``num_matvecs``: an integer >= 6 (a whole float such as ``30.0``
    too; anything else raises a ValueError naming it).
    """
    num_matvecs = whole_count("num_matvecs", num_matvecs)
    if num_matvecs < 6:
        raise ValueError(f"Hutch++ needs num_matvecs >= 6, got {num_matvecs}")
    seed = as_seed(seed)
    R, P = op.R, op.P
    probe_batch = probes_per_matvec(op, probe_batch)
    s = num_matvecs // 3
    g = torch.Generator().manual_seed(seed)
    S = probe_vectors(R, s, P, generator=g, kind="rademacher", common=common, dtype=op.dtype, device=op.device)
    Y = torch.cat([op.matvec(c) for c in S.split(probe_batch, dim=1)], dim=1)
    Y = torch.nan_to_num(Y)
    work = torch.promote_types(Y.dtype, torch.float32)  # (torch has no QR of float16 / bfloat16)
    Q = torch.linalg.qr(Y.transpose(1, 2).to(work)).Q.transpose(1, 2).to(Y.dtype).contiguous()
    HQ = torch.cat([op.matvec(c) for c in Q.split(probe_batch, dim=1)], dim=1)
    exact = _quadratic_forms(Q, HQ).sum(1)
    if callback is not None:
        callback(2 * s, R)
    rest = hutchinson(op, num_probes=num_matvecs - 2 * s, probe_batch=probe_batch, seed=seed + 1, common=common,
                      basis=Q, basis_trace=exact)
    rest.num_matvecs = num_matvecs
    return rest
