"""Stochastic Lanczos quadrature: the Hessian's spectral density per replica."""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass

import torch

from ..ambient import resetting_ambient
from .lanczos import _tridiag, lanczos, whole_count
from .probes import as_seed, probe_vectors


#: The most points a default density grid takes (beyond it, narrow kernels are widened to its spacing).
MAX_GRID_POINTS = 200_000


@dataclass
class SpectralDensity:
    """Quadrature nodes and weights ``[R, n_draws, m]``: the spectral measure of replica r is
    approximated by ``(1/n_draws) sum_draws sum_k weights * delta(nodes)``."""

    nodes: torch.Tensor
    weights: torch.Tensor

    def density(self, grid: torch.Tensor | None = None, sigma2: float | None = None, num_points: int | None = None):
        """Gaussian-smoothed density on ``grid``. Returns ``(grid [G], density [R, G])``; failed
        replicas (no finite nodes) have NaN rows, and when every replica failed the default grid is
        empty.

        sigma2: kernel variance, absolute; default ``1e-5 * max(1, lambda_max - lambda_min)`` per
        replica, Ghorbani et al.'s (PyHessian's ``sigma_squared`` is that factor 1e-5, relative to
        the span). Default grid: spanning all replicas' nodes, extended by 1% and 8 standard
        deviations of the widest kernel, with ``num_points``
        points, by default at least Ghorbani's 10,000 and enough to put 4 points within the
        narrowest kernel's standard deviation (at most ``MAX_GRID_POINTS``), so that a replica's
        density does not depend on the others beside it. Only where that cap binds (or on a grid
        given) are narrower kernels widened to the grid's spacing, so that every row still
        integrates to about 1 (before the twenty-second round a 1000-point grid widened the kernels
        of any spectrum spanning more than about 10, 4.3x at a span of 181).
        """
        nodes = self.nodes.to(torch.float64)
        if not bool(torch.isfinite(nodes).any()):  # every replica failed: nothing to smooth
            grid = torch.zeros(0, dtype=torch.float64) if grid is None else grid.to(torch.float64)
            return grid, torch.full((nodes.shape[0], grid.numel()), float("nan"), dtype=torch.float64)
        lo, hi = torch.nanquantile(nodes.flatten(), 0.0), torch.nanquantile(nodes.flatten(), 1.0)  # failed replicas are NaN
        if sigma2 is not None and not sigma2 > 0:
            raise ValueError(f"sigma2 must be a positive kernel variance, got {sigma2!r}")
        span = (nodes.amax(dim=(1, 2)) - nodes.amin(dim=(1, 2))).clamp_min(1.0)
        s2 = 1e-5 * span if sigma2 is None else torch.full_like(span, float(sigma2))
        uniform = grid is None
        if grid is None:
            # room for the widest kernel on both sides: a narrow spectrum (a confident model's Hessian
            # spans 1e-5, its kernels 3e-3) lost most of its mass past the grid's ends
            pad = 0.01 * float(hi - lo) + 8 * float(s2[torch.isfinite(s2)].max()) ** 0.5
            if num_points is None:
                narrowest = float(s2[torch.isfinite(s2)].min()) ** 0.5
                num_points = int(min(max(10_000, 4 * (float(hi - lo) + 2 * pad) / narrowest + 1), MAX_GRID_POINTS))
            grid = torch.linspace(float(lo) - pad, float(hi) + pad, num_points, dtype=torch.float64)
        grid = grid.to(torch.float64)
        dx2 = float(grid.diff().max()) ** 2 if grid.numel() > 1 else 0.0
        if sigma2 is None:
            s2 = s2.clamp_min(dx2)
        elif sigma2 < dx2:
            warnings.warn(f"sigma2={sigma2:.3g} is below the grid spacing squared ({dx2:.3g}): the densities will "
                          "not integrate to 1 on this grid (pass a finer grid or a larger sigma2)", stacklevel=2)
        w = self.weights.to(torch.float64)
        if uniform:
            return grid, _windowed_density(grid, nodes, w, s2)
        dens = torch.empty(nodes.shape[0], grid.numel(), dtype=torch.float64)
        for r in range(nodes.shape[0]):  # one replica at a time: [draws, m, G] stays small on fine grids
            kern = torch.exp(-(grid - nodes[r].unsqueeze(-1)) ** 2 / (2 * s2[r])) / torch.sqrt(2 * torch.pi * s2[r])
            dens[r] = (w[r].unsqueeze(-1) * kern).sum(1).mean(0)
        return grid, dens

    def plot(self, replicas=None, ax=None, path=None, log=True):
        """Plot the densities of some replicas (default: up to 4) with matplotlib; save to ``path``.
        Failed replicas have no curve (the title names them); with none left the axes say so.

        replicas: indices into the R replicas (negative ones count from the end), checked.
        ax: axes to draw into (not closed); None: a new figure, a pyplot one when ``path`` is None
        (for display), else a file-only ``matplotlib.figure.Figure`` that no pyplot state holds
        (nothing to close; the process's matplotlib backend is never changed). Returns the axes.
        """
        grid, dens = self.density()
        R = dens.shape[0]
        rows = list(range(min(4, R))) if replicas is None else [_replica_index(r, R) for r in replicas]
        if ax is None:
            if path is None:
                import matplotlib.pyplot as plt

                _, ax = plt.subplots(figsize=(6, 4))
            else:
                from .._figures import file_figure

                made = file_figure(figsize=(6, 4))
                if made is None:
                    raise ModuleNotFoundError("No module named 'matplotlib' (SpectralDensity.plot(path=...) needs it: "
                                              "pip install 'fastcurv[plot]')")
                ax = made[1]
        shown = [r for r in rows if bool(torch.isfinite(dens[r]).any())]
        for r in shown:
            ax.plot(grid.numpy(), dens[r].clamp_min(1e-12).numpy(), label=f"replica {r}")
        if shown:
            if log:
                ax.set_yscale("log")
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no spectral density: every replica shown failed", ha="center", va="center",
                    transform=ax.transAxes)
        if len(shown) < len(rows):
            ax.set_title(f"no density for failed replicas {[r for r in rows if r not in shown]}", fontsize=9)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        if path is not None:
            ax.figure.savefig(path, dpi=120, bbox_inches="tight")
        return ax


def _replica_index(r, R: int) -> int:
    """Replica ``r`` (an int, a 0-d tensor or array; negative counts from the end) as an index in ``0..R-1``."""
    try:
        i = operator.index(r)  # (not int(): 1.5 is no index)
    except TypeError:
        raise ValueError(f"plot: replicas must be integer indices, got {r!r}") from None
    if not -R <= i < R:
        raise ValueError(f"plot: replica {i} is out of range: the density has {R} replicas (0..{R - 1})")
    return i % R


def _windowed_density(grid: torch.Tensor, nodes: torch.Tensor, weights: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """The smoothed densities ``[R, G]`` on a uniform ``grid``, each node's Gaussian summed over the
    grid points within 8 standard deviations of it (the rest is below 1e-14 of its peak), so that a
    fine grid costs nodes x window rather than nodes x grid."""
    R, G = nodes.shape[0], grid.numel()
    dens = torch.zeros(R, G, dtype=torch.float64)
    if G < 2:
        return dens
    x0, dx = float(grid[0]), float(grid[1] - grid[0])
    sd = s2.sqrt()
    half = min(int(torch.ceil(8 * sd[torch.isfinite(sd)].max() / dx)), G) if bool(torch.isfinite(sd).any()) else 0
    offsets = torch.arange(-half, half + 1)
    flat_nodes = nodes.reshape(R, -1)  # [R, draws * m]
    flat_w = (weights / nodes.shape[1]).reshape(R, -1)  # (the mean over draws)
    for r in range(R):  # [draws * m, window] at a time
        ok = torch.isfinite(flat_nodes[r])
        if not bool(ok.any()):
            dens[r] = float("nan")
            continue
        x, wr = flat_nodes[r][ok], flat_w[r][ok]
        idx = torch.round((x - x0) / dx).long().unsqueeze(-1) + offsets  # [n, window]
        inside = (idx >= 0) & (idx < G)
        idx = idx.clamp(0, G - 1)
        kern = torch.exp(-(grid[idx] - x.unsqueeze(-1)) ** 2 / (2 * s2[r])) / torch.sqrt(2 * torch.pi * s2[r])
        dens[r].index_add_(0, idx.flatten(), (wr.unsqueeze(-1) * kern * inside).flatten())
    return dens


@resetting_ambient
def slq(op, *, num_steps: int = 60, num_draws: int = 1, seed: int = 0, common: bool = True, callback=None) -> SpectralDensity:
    """Spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019; Ubaru et al. 2017).

    For each of ``num_draws`` Rademacher start vectors, ``num_steps`` Lanczos steps (partial
    reorthogonalization: the basis stays orthogonal to ``sqrt(eps)``; fewer where the Krylov space
    is exhausted, whose quadrature is then exact) give
    ``T = Y diag(theta) Y^T``: nodes ``theta``, weights ``Y[0, :]^2``.
    Costs ``num_draws * num_steps`` matvecs per replica. Both are positive integers (whole floats
    such as ``60.0`` too; anything else raises a ValueError naming it).
    """
    num_steps, num_draws = whole_count("slq: num_steps", num_steps), whole_count("slq: num_draws", num_draws)
    R, P = op.R, op.P
    g = torch.Generator().manual_seed(as_seed(seed))
    runs = []
    for _ in range(num_draws):
        v0 = probe_vectors(R, 1, P, generator=g, kind="rademacher", common=common, dtype=op.dtype, device=op.device)[:, 0]
        # every step (tol=0 alone stops once the top Ritz value's residual underflows to 0)
        runs.append(lanczos(op, k=1, max_iter=num_steps, min_iter=num_steps, tol=0.0, v0=v0, callback=callback))
    # a draw whose Krylov space is exhausted (Lanczos breakdown: its quadrature is exact) has fewer
    # nodes; every draw is padded to the longest
    m = max(1, max(int(res.iterations.max()) for res in runs))  # (1: a NaN node where every replica failed)
    nodes = torch.full((R, num_draws, m), float("nan"), dtype=torch.float64)
    weights = torch.zeros(R, num_draws, m, dtype=torch.float64)
    for d, res in enumerate(runs):
        for r in range(R):
            n = int(res.iterations[r])
            if n == 0 or bool(op.failed[r]):
                continue
            theta, Y = torch.linalg.eigh(_tridiag(res.alphas[r, :n], res.betas[r, 1:n]))
            nodes[r, d], weights[r, d, :n] = theta[0], Y[0] ** 2  # padding nodes carry zero weight
            nodes[r, d, :n] = theta
    return SpectralDensity(nodes, weights)
