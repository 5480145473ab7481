"""Weakness of R replicas: two operationalizations of Bennett's notion (ours; his estimator for
networks is not published, see reference/measures.md sections 3.13 and 5.3).

1. **Permission-profile log-weakness** (closed form of Bennett's output permission profiles).
   Class k is *permitted* at input x when ``p_k(x) >= tau * max_j p_j(x)`` (relative threshold)
   or ``p_k(x) >= tau`` (absolute threshold); the argmax class is always permitted, so the number
   of permitted classes ``a(x) >= 1`` (one argmax class when several tie at the maximum, as the
   predictions take the first; with a relative threshold tied maxima all pass the threshold itself).
   Score: ``W = mean_x log2(2^a(x) - 1)`` bits per input, over unlabelled probe inputs, for a sweep
   of tau. It is 0 for a fully committed network and
   ``log2(2^K - 1)`` when every class is permitted everywhere (it rewards uncommitted outputs, so
   the mean prediction entropy is reported next to it).
2. **Perturbation weakness.** Multiplicative weight noise ``theta * (1 + sigma * xi)``,
   ``xi ~ N(0, I)`` (invariant to diagonal rescalings of the weights). ``w_hat(sigma)`` is the
   fraction of ``num_draws`` draws that leave *every* probe prediction unchanged, and ``sigma*``
   is the noise level, found by bisection in log space, at which the mean agreement of the
   perturbed predictions with the replica's own falls to ``1 - delta``.

Half precision: the perturbed passes run float16/bfloat16 models in float32
(:func:`working_precision`), as the loss-based perturbation measures do
(:func:`fastcurv.measures._common.working_precision`).
"""
from __future__ import annotations

import math

import torch

from .._heap import reusing_heap
from ..data import target_dtype
from ..replicas import ReplicaSet
from .predictions import Accumulator, row_chunks


def log2_weakness_terms(a: torch.Tensor) -> torch.Tensor:
    """``log2(2^a - 1)`` for integer ``a >= 1``, computed stably as ``a + log2(1 - 2^-a)``."""
    a = a.double()
    return a + torch.log2(-torch.expm1(-a * math.log(2.0)))


class PermissionWeakness(Accumulator):
    """Streaming permission-profile log-weakness for several (mode, tau) pairs, plus entropy."""

    def __init__(self, R: int, taus=(0.01, 0.05, 0.1, 0.25, 0.5), modes=("relative", "absolute")):
        modes = (modes,) if isinstance(modes, str) else tuple(modes)
        taus = (taus,) if isinstance(taus, (str, int, float)) else tuple(taus)
        for m in modes:
            if m not in ("relative", "absolute"):
                raise ValueError(f"weakness threshold mode must be 'relative' or 'absolute', got {m!r}")
        for t in taus:
            if not 0 < float(t) <= 1:
                raise ValueError(f"weakness tau must be in (0, 1], got {t}")
        self.keys = [(m, float(t)) for m in modes for t in taus]
        self.sums = {k: torch.zeros(R, dtype=torch.float64) for k in self.keys}
        self.entropy = torch.zeros(R, dtype=torch.float64)
        self.count = 0

    def update(self, idx: torch.Tensor, probs: torch.Tensor) -> None:
        idx = idx.cpu()
        pmax = probs.amax(-1, keepdim=True)
        for mode, tau in self.keys:
            thr = tau * pmax if mode == "relative" else torch.full_like(pmax, tau)
            # [Rc, N]; plus the argmax class when below the threshold: one class even for tied maxima
            a = (probs >= thr).sum(-1) + (pmax < thr).squeeze(-1)
            self.sums[(mode, tau)][idx] += log2_weakness_terms(a).sum(-1).cpu()
        ent = -torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs)).sum(-1)
        self.entropy[idx] += ent.double().sum(-1).cpu()
        if int(idx[0]) == 0:
            self.count += probs.shape[1]

    @staticmethod
    def column(mode: str, tau: float) -> str:
        return f"weakness_{'rel' if mode == 'relative' else 'abs'}_tau{tau:g}"

    def results(self) -> dict:
        n = max(self.count, 1)
        out = {self.column(m, t): s / n for (m, t), s in self.sums.items()}
        out["mean_entropy"] = self.entropy / n
        return out


def working_precision(rs: ReplicaSet, x: torch.Tensor | None = None):
    """``(rs, x)`` as they are for float32 and float64 models; for float16/bfloat16 ones a copy of the
    replica set in float32 (:func:`~fastcurv.data.target_dtype`: its parameters and floating
    buffers converted, exactly; the models are not touched) and ``x`` (probe inputs, or None)
    converted if floating. In the models' own dtype the multiplicative noise ``theta * (1 + sigma *
    xi)`` rounded back to ``theta`` below the rounding unit (bfloat16: every draw at sigma = 5e-4 left
    the weights unchanged: ``perturb_weakness_sigma0.0005`` 1.0 where float32 gives 0.5), and ``perturb_sigma_star``
    came out 11-18% low. Idempotent: a float32 set comes back as it is."""
    wide = target_dtype(rs.dtype)
    if wide != rs.dtype:
        rs = rs.in_dtype(wide)
    if x is not None and x.is_floating_point() and x.dtype != rs.dtype:
        x = x.to(rs.dtype)
    return rs, x


def reference_labels(rs: ReplicaSet, x: torch.Tensor, max_rows: int = 1 << 19) -> torch.Tensor:
    """Argmax predictions ``[R, N]`` (int64, CPU) of the unperturbed replicas on probe inputs ``x`` in
    their :func:`working_precision`: what the perturbed passes' predictions are compared with (a
    half-precision forward's own labels can differ from the float32 forward's where logits nearly
    tie, which would count as changed by the noise at any sigma)."""
    rs, x = working_precision(rs, x)
    R, N = rs.R, x.shape[0]
    rc, n = row_chunks(R, N, max_rows, rs.batch_statistics)
    xs = [x] if n >= N else list(x.split(n))
    with torch.no_grad():
        rows = []
        for r0 in range(0, R, rc):
            idx = torch.arange(r0, min(R, r0 + rc), device=rs.device)
            params, buffers = rs.subset(idx)
            rows.append(torch.cat([rs.forward_with(params, buffers, xc).argmax(-1) for xc in xs], dim=1))
    return torch.cat(rows).cpu()


def _perturbed_labels(rs: ReplicaSet, xs: list, sigma: torch.Tensor, noise: list, kind: str, eps: float,
                      rows: slice) -> torch.Tensor:
    """Argmax predictions ``[Rc, N]`` of replicas ``rows``, each with its weights perturbed at its own
    ``sigma`` (``[R]``), on the example chunks ``xs`` (``N`` examples in all, one forward call each)."""
    params = {}
    for (n, p), xi in zip(rs.params.items(), noise):
        p = p[rows]
        s = sigma[rows].to(p.dtype).reshape(-1, *([1] * (p.dim() - 1)))
        if kind == "multiplicative":
            params[n] = p * (1 + s * xi)
        else:  # magnitude-aware additive noise, std sqrt(sigma^2 theta^2 + eps^2)
            params[n] = p + xi * torch.sqrt(s.square() * p.square() + eps * eps)
    buffers = {n: b[rows] for n, b in rs.buffers.items()}
    return torch.cat([rs.forward_with(params, buffers, x).argmax(-1) for x in xs], dim=1)


def _draw(rs: ReplicaSet, seed: int, d: int) -> list:
    """Draw ``d``: one noise tensor per parameter, shared by every replica (common random numbers,
    so a replica's values do not depend on which other replicas are evaluated with it)."""
    g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + d)
    return [torch.randn(p.shape[1:], generator=g, dtype=p.dtype).to(p.device)[None] for p in rs.params.values()]


@reusing_heap  # each draw's perturbed weights are R x P fresh numbers (in chunks): reuse the last draw's pages
def perturbation_counts(rs: ReplicaSet, x: torch.Tensor, ref: torch.Tensor, sigma: torch.Tensor, *, num_draws: int,
                        seed: int, kind: str = "multiplicative", eps: float = 1e-3, targets: torch.Tensor | None = None,
                        max_rows: int = 1 << 19):
    """Per replica, over ``num_draws`` draws (the same draws for every call with this seed: common
    random numbers), int64 ``[R]`` counts: ``(predictions equal to ref, out of num_draws * N;
    draws with every prediction unchanged)``. With ``targets``, the first counts the correct
    predictions instead. x: ``[N, ...]`` probe inputs; ref: ``[R, N]`` classes, the unperturbed
    predictions in the working precision (:func:`reference_labels`); sigma: ``[R]``. The replicas
    are perturbed and run in their :func:`working_precision` (float32 for float16/bfloat16 models).
    At most ``max_rows`` replica x example rows per forward call (:func:`row_chunks`; the draws
    do not depend on the chunks)."""
    rs, x = working_precision(rs, x)
    R, N = rs.R, x.shape[0]
    rc, n = row_chunks(R, N, max_rows, rs.batch_statistics)
    xs = [x] if n >= N else list(x.split(n))  # x itself: ReplicaSet keeps its CSR form across calls
    ref = ref.to(x.device).long()
    sigma = sigma.to(x.device)
    hits = torch.zeros(R, dtype=torch.int64)
    unchanged = torch.zeros(R, dtype=torch.int64)
    with torch.no_grad():
        for d in range(num_draws):
            noise = _draw(rs, seed, d)
            for r0 in range(0, R, rc):
                rows = slice(r0, min(R, r0 + rc))
                lab = _perturbed_labels(rs, xs, sigma, noise, kind, eps, rows)
                same = lab == ref[rows]
                hits[rows] += (same if targets is None else lab == targets.to(x.device)[None]).sum(1).cpu()
                unchanged[rows] += same.all(1).cpu()
    return hits, unchanged


def perturbation_agreement(rs: ReplicaSet, x: torch.Tensor, ref: torch.Tensor, sigma: torch.Tensor, *, num_draws: int,
                           seed: int, kind: str = "multiplicative", eps: float = 1e-3, targets: torch.Tensor | None = None,
                           max_rows: int = 1 << 19):
    """Per replica ``(mean agreement with ref, fraction of draws with every prediction unchanged)``
    (float64, from :func:`perturbation_counts`). With ``targets``, the first value is the mean
    accuracy instead of the agreement."""
    rs, x = working_precision(rs, x)  # (once, not per call of perturbation_counts)
    hits, unchanged = perturbation_counts(rs, x, ref, sigma, num_draws=num_draws, seed=seed, kind=kind, eps=eps,
                                          targets=targets, max_rows=max_rows)
    return hits.double() / (num_draws * x.shape[0]), unchanged.double() / num_draws


def count_threshold(target: torch.Tensor, total: int) -> torch.Tensor:
    """``target`` (fractions ``[R]``) as counts out of ``total``; a count within float rounding of an
    integer is that integer, so that a curve exactly at the target is a tie whatever the rounding of
    the fraction (0.94 - 0.1 against 84 / 100)."""
    slack = max(1e-12, 4 * torch.finfo(target.dtype).eps) * total  # (a float32 target carries its own rounding)
    need = target.double().cpu() * total
    k = need.round()
    return torch.where((need - k).abs() <= slack, k, need)


def bisect_sigma(rs: ReplicaSet, x: torch.Tensor, ref: torch.Tensor, target: torch.Tensor, *, num_draws: int,
                 seed: int, steps: int = 12, sigma_max: float = 8.0, kind: str = "multiplicative", eps: float = 1e-3,
                 targets: torch.Tensor | None = None, max_rows: int = 1 << 19) -> tuple[torch.Tensor, torch.Tensor]:
    """Per replica, the noise level where the (agreement or accuracy) curve crosses ``target``.

    Geometric bisection on ``[sigma_max * 2^-20, sigma_max]``, all replicas in lock-step; a noise
    level counts as below the crossing when the curve is strictly above the target, compared as
    integer counts (:func:`count_threshold`), so an exact tie counts as reached.
    Returns ``(sigma [R], saturated [R] bool)``; ``saturated`` marks replicas whose crossing was
    not bracketed (still above target near ``sigma_max``, or already below near the lower end).
    The replicas run in their :func:`working_precision`; ``ref`` as for :func:`perturbation_counts`.
    """
    if not 0 < sigma_max < math.inf:
        raise ValueError(f"sigma_max must be positive and finite, got {sigma_max}")
    rs, x = working_precision(rs, x)  # (once, not per step)
    lo0, hi0 = sigma_max * 2.0**-20, float(sigma_max)
    lo = torch.full((rs.R,), lo0, dtype=torch.float64)
    hi = torch.full((rs.R,), hi0, dtype=torch.float64)
    need = count_threshold(target, num_draws * x.shape[0])
    for _ in range(steps):
        mid = torch.sqrt(lo * hi)
        hits, _ = perturbation_counts(rs, x, ref, mid, num_draws=num_draws, seed=seed, kind=kind, eps=eps,
                                      targets=targets, max_rows=max_rows)
        above = hits > need
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return torch.sqrt(lo * hi), (hi == hi0) | (lo == lo0)
