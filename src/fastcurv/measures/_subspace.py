"""Random subspaces ``A`` (``P x p``) for Keskar et al.'s random-subspace epsilon-sharpness,
applied to R replicas at once without storing ``R`` dense ``P x p`` matrices.

Distribution (our choice; Keskar et al. only say "a random P x p matrix" as far as our notes go):
i.i.d. Gaussian entries ``N(0, 1/p)``. With this scale a row of ``A`` has unit expected squared
norm, so ``A y`` with ``|y_j| <= eps`` perturbs each parameter by about ``eps``, the same per-coordinate
scale as the full-space box (the "+1" part of the box is scale-dependent, so the scale matters).

Storage: the matrix is defined block by block: rows ``[k B, (k+1) B)`` (``B = BLOCK_ROWS``) of
replica ``r``'s matrix are ``randn(B, p) / sqrt(p)`` from a generator on the model's device seeded
with a hash of ``(seed, r, k)`` (``r = 0`` for every replica when the draw is common). A block is therefore the
same whether it is cached or regenerated, and replica r's matrix does not depend on the other
replicas. The blocks are cached (one dense ``[Ra, P, p]`` tensor, Ra = 1 common or R, filled block
by block in place: its peak is the matrix plus one block) when that takes at most ``max_bytes``
(default :func:`default_max_bytes`: 1 GiB, or under ``memory_budget=`` the dense bytes when the
memory plan caches the matrix and 0 when it regenerates it, see :func:`matrix_bytes_cap`);
otherwise every product regenerates them (cost: ``Ra P p`` normal draws per product; memory: one
block of ``Ra * B * p`` entries). The draw depends on the device's RNG and
the dtype it is drawn in (the model's; float32 for float16/bfloat16 models, which the measures
run in float32): for a bit-identical A across devices and dtypes inject it (``A=`` a tensor). Inside a
chunked or sharded job (:func:`fastcurv.solvers.probes.replica_window`) ``r`` is the replica's
global number, so each replica's matrix does not depend on how the job was split.

Pseudo-inverse ``A^+ theta`` (for the box half-widths): when ``P >= 2 p`` through the Gram matrix
``A^T A`` (``[Ra, p, p]``; block products in the model dtype summed in float64, then a float64
Cholesky solve; a Gaussian P x p has condition number about (1 + sqrt(p/P)) / (1 - sqrt(p/P)),
under 6 for P >= 2p, so float32 products give the half-widths to about 1e-6; memory ``Ra p^2``
float64, i.e. 800 MB for R = 100 per-replica matrices with p = 1000), otherwise by float64 least
squares on the dense matrix (P < 2p: a small model). Note that p close to P makes a Gaussian A ill-conditioned and ``A^+ theta`` (hence
the box) very large: the measure is meant for p << P.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math

import torch

from ..solvers.probes import _WINDOW

BLOCK_ROWS = 1024
DEFAULT_MAX_BYTES = 1 << 30  # the dense matrices are cached up to this size (without a memory budget)
# the cap a memory plan (batched_sharpness(memory_budget=...)) puts on the cached matrices; None: none
_MAX_BYTES_CAP: contextvars.ContextVar[int | None] = contextvars.ContextVar("fastcurv_subspace_max_bytes", default=None)


def default_max_bytes() -> int:
    """The ``max_bytes`` of a :class:`RandomSubspace` not given one: ``DEFAULT_MAX_BYTES``, or less
    inside :func:`matrix_bytes_cap` (a memory plan's cap: the matrix's bytes when it caches it, 0
    when it regenerates it)."""
    cap = _MAX_BYTES_CAP.get()
    return DEFAULT_MAX_BYTES if cap is None else min(DEFAULT_MAX_BYTES, cap)


@contextlib.contextmanager
def matrix_bytes_cap(nbytes: int | None):
    """Within this block, random subspaces without an explicit ``max_bytes`` cache their dense
    matrices only up to ``nbytes`` (None: the cap is left as it is), else regenerate their blocks
    in every product (the same matrices: the results do not change). Set by ``batched_sharpness``
    from its memory plan."""
    if nbytes is None:
        yield
        return
    token = _MAX_BYTES_CAP.set(int(nbytes))
    try:
        yield
    finally:
        _MAX_BYTES_CAP.reset(token)


def _block_seed(seed: int, r: int, k: int) -> int:
    """A 62-bit generator seed for block k of replica r (stable across Python versions and runs)."""
    digest = hashlib.blake2b(f"fastcurv-subspace:{int(seed)}:{int(r)}:{int(k)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class RandomSubspace:
    """The matrices ``A_r`` ``[P, p]`` of R replicas (one shared when ``common``), or injected ones.

    Args:
        P: parameters per replica. p: subspace dimension (> 0). R: replicas.
        seed, common: the draw (see the module docstring). device, dtype: where products run.
        max_bytes: cache the dense matrices when ``Ra * P * p * itemsize <= max_bytes`` (None:
            :func:`default_max_bytes`).
        A: optional injected matrix ``[P, p]`` (shared) or ``[R, P, p]`` (per replica); then
            ``p``, ``seed`` and ``common`` are ignored.
    """

    def __init__(self, P: int, p: int, R: int, *, seed: int = 0, common: bool = True, device=None,
                 dtype=torch.float32, max_bytes: int | None = None, A: torch.Tensor | None = None):
        self.P, self.R, self.device, self.dtype, self.seed = P, R, device, dtype, seed
        self._dense = None
        if A is not None:
            if not isinstance(A, torch.Tensor):
                raise TypeError(f"A must be a torch.Tensor [P, p] or [R, P, p], got {type(A).__name__}")
            if A.dim() == 2:
                A = A.unsqueeze(0)
            if A.dim() != 3 or A.shape[1] != P or A.shape[0] not in (1, R) or A.shape[2] < 1:
                raise ValueError(f"A must have shape [P={P}, p] or [R={R}, P={P}, p], got {tuple(A.shape)}")
            if not bool(torch.isfinite(A).all()):
                raise ValueError("A has non-finite entries")
            self.p, self.rows = A.shape[2], A.shape[0]
            self._dense = A.to(device, dtype)
            self.injected = True
            return
        if not (isinstance(p, int) and p > 0):
            raise ValueError(f"subspace dimension p must be a positive integer, got {p!r}")
        self.p, self.rows, self.injected = p, 1 if common else R, False
        window = _WINDOW.get()
        self.first = 0 if common or window is None else int(window[0])
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if max_bytes is None:
            max_bytes = default_max_bytes()
        if self.rows * P * p * itemsize <= max_bytes:
            # filled block by block in place (a list of the blocks concatenated held the matrix twice)
            dense = torch.empty(self.rows, P, p, device=device, dtype=dtype)
            for k in range(self.num_blocks):
                for r in range(self.rows):
                    dense[r, k * BLOCK_ROWS:(k + 1) * BLOCK_ROWS] = self._generate(r, k)
            self._dense = dense

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.P / BLOCK_ROWS)

    @property
    def cached(self) -> bool:
        return self._dense is not None

    def _generate(self, r: int, k: int) -> torch.Tensor:
        n = min(BLOCK_ROWS, self.P - k * BLOCK_ROWS)
        gen = torch.Generator(device=self.device).manual_seed(_block_seed(self.seed, self.first + r, k))
        return torch.randn(n, self.p, generator=gen, device=self.device, dtype=self.dtype).div_(math.sqrt(self.p))

    def _block(self, k: int) -> torch.Tensor:
        """Rows ``[k B, (k+1) B)`` of every stored matrix: ``[Ra, rows, p]``."""
        if self._dense is not None:
            return self._dense[:, k * BLOCK_ROWS:(k + 1) * BLOCK_ROWS]
        n = min(BLOCK_ROWS, self.P - k * BLOCK_ROWS)
        out = torch.empty(self.rows, n, self.p, device=self.device, dtype=self.dtype)
        for r in range(self.rows):
            out[r] = self._generate(r, k)
        return out

    def _chunks(self):
        """``(row slice, [Ra, rows, p] block)`` covering all P rows: the whole cached matrix at once
        (one GEMM per product), else the regenerated blocks one by one."""
        if self._dense is not None:
            yield slice(0, self.P), self._dense
            return
        for k in range(self.num_blocks):
            Ak = self._block(k)
            yield slice(k * BLOCK_ROWS, k * BLOCK_ROWS + Ak.shape[1]), Ak

    def dense(self, r: int = 0) -> torch.Tensor:
        """Replica ``r``'s matrix ``[P, p]`` (materialized; for tests and small models)."""
        i = 0 if self.rows == 1 else r
        if self._dense is not None:
            return self._dense[i]
        return torch.cat([self._generate(i, k) for k in range(self.num_blocks)])

    def matmul(self, y: torch.Tensor) -> torch.Tensor:
        """``A_r y_r`` for every replica: ``y`` ``[R, p]`` -> ``[R, P]``."""
        out = torch.empty(y.shape[0], self.P, device=y.device, dtype=y.dtype)
        for sl, Ak in self._chunks():
            out[:, sl] = y @ Ak[0].T if self.rows == 1 else torch.einsum("rp,rnp->rn", y, Ak)
        return out

    def rmatmul(self, g: torch.Tensor) -> torch.Tensor:
        """``A_r^T g_r`` for every replica: ``g`` ``[R, P]`` -> ``[R, p]``."""
        out = torch.zeros(g.shape[0], self.p, device=g.device, dtype=g.dtype)
        for sl, Ak in self._chunks():
            out += g[:, sl] @ Ak[0] if self.rows == 1 else torch.einsum("rn,rnp->rp", g[:, sl], Ak)
        return out

    def pinv_apply(self, theta: torch.Tensor) -> torch.Tensor:
        """``A_r^+ theta_r`` ``[R, p]`` (float64) for ``theta`` ``[R, P]``: the least-squares
        (minimum-norm when rank-deficient) coordinates of theta in the subspace."""
        t64 = theta.to(torch.float64)
        if self.P >= 2 * self.p:
            gram = torch.zeros(self.rows, self.p, self.p, dtype=torch.float64, device=theta.device)
            rhs = torch.zeros(theta.shape[0], self.p, dtype=torch.float64, device=theta.device)
            for sl, Ak in self._chunks():  # products in the model dtype, sums in float64
                tk = theta[:, sl].to(Ak.dtype)
                gram += (Ak.transpose(1, 2) @ Ak).to(torch.float64)
                rhs += (tk @ Ak[0] if self.rows == 1 else torch.einsum("rn,rnp->rp", tk, Ak)).to(torch.float64)
            L, info = torch.linalg.cholesky_ex(gram)
            if bool((info != 0).any()):
                raise ValueError("random subspace: A^T A is singular (A has dependent columns); inject a full-rank A")
            L = L.expand(theta.shape[0], -1, -1)
            return torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
        # P < 2p: a small model (P < 2000 for the default p); dense least squares on the CPU (gelsd
        # handles rank-deficient injected matrices: minimum-norm solution). gelsd refuses a non-finite
        # right-hand side with an internal assert: a replica with NaN weights gets NaN coordinates.
        out = torch.full((theta.shape[0], self.p), float("nan"), dtype=torch.float64, device=theta.device)
        good = torch.isfinite(t64).all(1).cpu()
        if self.rows == 1:
            if bool(good.any()):
                A = self.dense(0).to(torch.float64).cpu()
                solved = torch.linalg.lstsq(A, t64.cpu()[good].T, driver="gelsd").solution.T
                out[good.to(theta.device)] = solved.to(theta.device)
            return out
        for r in good.nonzero().flatten().tolist():
            A = self.dense(r).to(torch.float64).cpu()
            out[r] = torch.linalg.lstsq(A, t64[r].cpu().unsqueeze(1), driver="gelsd").solution[:, 0].to(theta.device)
        return out
