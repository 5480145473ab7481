"""Stochastic Lanczos quadrature: the Hessian's spectral density per replica."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .lanczos import _tridiag, lanczos
from .probes import probe_vectors


@dataclass
class SpectralDensity:
    """Quadrature nodes and weights ``[R, n_draws, m]``: the spectral measure of replica r is
    approximated by ``(1/n_draws) sum_draws sum_k weights * delta(nodes)``."""

    nodes: torch.Tensor
    weights: torch.Tensor

    def density(self, grid: torch.Tensor | None = None, sigma2: float | None = None, num_points: int = 1000):
        """Gaussian-smoothed density on ``grid`` (default: ``num_points`` spanning all replicas'
        nodes, extended by 1%).

        sigma2: kernel variance; default ``1e-5 * max(1, lambda_max - lambda_min)`` per replica
        (Ghorbani et al.), raised to the square of the grid's widest spacing where it is smaller,
        so that every row integrates to ~1 on the grid shared by all replicas (a flat replica
        beside one 40x sharper would otherwise fall between the grid points). Returns
        ``(grid [G], density [R, G])``; failed replicas (no finite nodes) have NaN rows, and when
        every replica failed the default grid is empty.
        """
        nodes = self.nodes.to(torch.float64)
        if not bool(torch.isfinite(nodes).any()):  # every replica failed: nothing to smooth
            grid = torch.zeros(0, dtype=torch.float64) if grid is None else grid.to(torch.float64)
            return grid, torch.full((nodes.shape[0], grid.numel()), float("nan"), dtype=torch.float64)
        lo, hi = torch.nanquantile(nodes.flatten(), 0.0), torch.nanquantile(nodes.flatten(), 1.0)  # failed replicas are NaN
        if grid is None:
            pad = 0.01 * float(hi - lo) + 1e-12
            grid = torch.linspace(float(lo) - pad, float(hi) + pad, num_points, dtype=torch.float64)
        grid = grid.to(torch.float64)
        span = (nodes.amax(dim=(1, 2)) - nodes.amin(dim=(1, 2))).clamp_min(1.0)
        dx2 = float(grid.diff().max()) ** 2 if grid.numel() > 1 else 0.0
        if sigma2 is None:
            s2 = (1e-5 * span).clamp_min(dx2)
        else:
            if sigma2 < dx2:
                warnings.warn(f"sigma2={sigma2:.3g} is below the grid spacing squared ({dx2:.3g}): the densities will "
                              "not integrate to 1 on this grid (pass a finer grid or a larger sigma2)", stacklevel=2)
            s2 = torch.full_like(span, sigma2)
        diff = grid.view(1, 1, 1, -1) - nodes.unsqueeze(-1)
        kern = torch.exp(-diff**2 / (2 * s2.view(-1, 1, 1, 1))) / torch.sqrt(2 * torch.pi * s2.view(-1, 1, 1, 1))
        dens = (self.weights.to(torch.float64).unsqueeze(-1) * kern).sum(2).mean(1)
        return grid, dens

    def plot(self, replicas=None, ax=None, path=None, log=True):
        """Plot the densities of some replicas (default: up to 4) with matplotlib; save to ``path``.
        Failed replicas have no curve (the title names them); with none left the axes say so."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        grid, dens = self.density()
        rows = list(range(min(4, dens.shape[0]))) if replicas is None else list(replicas)
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
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


def slq(op, *, num_steps: int = 60, num_draws: int = 1, seed: int = 0, common: bool = True, callback=None) -> SpectralDensity:
    """Spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019; Ubaru et al. 2017).

    For each of ``num_draws`` Rademacher start vectors, ``num_steps`` Lanczos steps (partial
    reorthogonalization: the basis stays orthogonal to ``sqrt(eps)``; fewer where the Krylov space
    is exhausted, whose quadrature is then exact) give
    ``T = Y diag(theta) Y^T``: nodes ``theta``, weights ``Y[0, :]^2``.
    Costs ``num_draws * num_steps`` matvecs per replica.
    """
    R, P = op.R, op.P
    g = torch.Generator().manual_seed(seed)
    runs = []
    for _ in range(num_draws):
        v0 = probe_vectors(R, 1, P, generator=g, kind="rademacher", common=common, dtype=op.dtype, device=op.device)[:, 0]
        # every step (tol=0 alone stops once the top Ritz value's residual underflows to 0)
        runs.append(lanczos(op, k=1, max_iter=num_steps, min_iter=num_steps, tol=0.0, v0=v0, callback=callback))
    # a draw whose Krylov space is exhausted (Lanczos breakdown: its quadrature is exact) has fewer
    # nodes; every draw is padded to the longest
    m = max(int(res.iterations.max()) for res in runs)
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
