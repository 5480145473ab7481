"""Relative flatness (Petzka et al., NeurIPS 2021) of one fully connected feature layer.

With ``W`` (m x d, rows w_s) the weight of the chosen ``nn.Linear`` layer (default: the last one,
which maps features to logits) and ``H_{s,s'}`` the d x d blocks of ``d^2 L / dW dW``:

``kappa_Tr = sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'}) = Tr((G kron I_d) H_WW)``, ``G = W W^T``.

L is the operator's full-data loss: the mean over the samples by default, their sum (N times
larger) with ``reduction="sum"`` (the Mason-Williams code sums per-batch mean values instead, which
multiplies the mean's result by the number of batches). With ``normalize=True`` (default, as in the
reference code) the layer's input features phi_j are first divided by their standard deviation
sigma_j over the data and W's columns multiplied by sigma_j (function-preserving); this is done
analytically, ``kappa = sum_{s,s'} (sum_j W_sj W_s'j sigma_j^2)(sum_j H_(s,j),(s',j) / sigma_j^2)``.
Features constant over the data (e.g. dead ReLUs, or units with zero incoming weights) are dropped
from both sums, their weights and their Hessian terms: their column acts like a bias, and a
normalization by sigma_j = 0 is undefined. A feature counts as constant when its standard deviation
(computed centred, merged across batches) is at most 64 float epsilons of the model's dtype times
the absolute value of its mean: rounding cannot make a constant feature vary by more. (The Mason-Williams
code zeroes such a column but keeps its Hessian terms, which is not invariant to rescaling that unit.)

* ``method="exact"``: the whole H_WW block from m*d Hessian-vector products (small layers).
* ``method="hutchinson"`` (default): ``kappa ~ mean_k <G V_k, H_WW V_k>`` with Rademacher V_k
  (``num_probes`` HVPs restricted to W), with a standard error.

Invariant to layer-wise rescaling around the feature layer and, with normalization, to neuron-wise
rescaling of the features. Units: loss units (Hessian entries times squared weights).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..replicas import tied_parameters
from . import keywords, register_measure
from ._common import finish


def feature_layer(op, layer: str | None) -> str:
    """Name of the ``nn.Linear`` module used (default: the last one)."""
    linears = [n for n, m in op.replicas.base.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("relative_flatness needs an nn.Linear feature layer; the model has none")
    if layer is None:
        return linears[-1]
    if layer not in linears:
        raise ValueError(f"relative_flatness: layer {layer!r} is not an nn.Linear module; choose one of {linears}")
    return layer


def feature_std(op, layer: str) -> torch.Tensor:
    """``[R, d]`` standard deviation (population) of the layer's input features over the data, 0 for
    features constant over the data (see the module docstring)."""
    rs = op.replicas
    module = dict(rs.base.named_modules())[layer]
    store = {}
    # (a copy: a model that changed that tensor in place after the layer read it would change the features)
    handle = module.register_forward_pre_hook(lambda _m, args: store.__setitem__("x", args[0].detach().clone()))
    d = module.in_features
    count = torch.zeros(rs.R, 1, dtype=torch.float64)
    mean = torch.zeros(rs.R, d, dtype=torch.float64)
    m2 = torch.zeros(rs.R, d, dtype=torch.float64)  # sums of squared deviations from the mean
    try:
        with torch.no_grad():
            for _, x, _y in op.batches:
                for r in range(rs.R):
                    rs.call({n: t[r] for n, t in rs.params.items()}, {n: t[r] for n, t in rs.buffers.items()}, x)
                    f = store["x"].reshape(-1, d).to(torch.float64).cpu()
                    _merge_moments(count[r], mean[r], m2[r], f)
    finally:
        handle.remove()
    std = (m2 / count).sqrt()
    constant = std <= 64 * torch.finfo(op.dtype).eps * mean.abs()
    return torch.where(constant, torch.zeros_like(std), std)


def _merge_moments(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, f: torch.Tensor) -> None:
    """Fold the rows of ``f`` ``[n, d]`` into a running count, mean and sum of squared deviations
    (in place; Chan et al.'s pairwise merge of centred batch moments, stable for constant columns)."""
    n = f.shape[0]
    if n == 0:
        return
    batch_mean = f.mean(0)
    batch_m2 = (f - batch_mean).square().sum(0)
    total = count + n
    delta = batch_mean - mean
    m2 += batch_m2 + delta.square() * (count * n / total)
    mean += delta * (n / total)
    count.copy_(total)


def _block(op, layer):
    """``(offset of the layer's weight in the flat parameters, its shape (m, d))``; a ValueError when
    the weight is no parameter of its own (computed by a parametrization, or tied to another's)."""
    rs = op.replicas
    name = f"{layer}.weight"
    module = rs.base.get_submodule(layer)
    if parametrize.is_parametrized(module, "weight"):
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations["weight"])
        own = [n for n in rs.names if n.startswith(f"{layer}.parametrizations.weight.")]
        raise ValueError(f"relative_flatness: the weight of layer {layer!r} is computed by a parametrization ({kinds}, "
                         f"from the parameters {own}), not a parameter the measure can take the Hessian block of: "
                         f"remove it (torch.nn.utils.parametrize.remove_parametrizations(model.get_submodule({layer!r}), "
                         "'weight'), which keeps the current weight) or choose another layer with layer=")
    if name not in rs.names:  # a tied weight: named_parameters lists it under its first owner only
        owner = tied_parameters(rs.base).get(name, "another module")
        raise ValueError(f"relative_flatness: layer {layer!r} shares its weight with {owner!r} (tied weights); the "
                         "measure needs a feature layer with a weight of its own: choose one with layer=")
    j = rs.names.index(name)
    start = sum(rs.numels[:j])
    return start, rs.shapes[j]


def _hvp_W(op, U: torch.Tensor, start: int) -> torch.Tensor:
    """H_WW applied to ``U`` ``[R, K, m, d]`` (embedded into full parameter vectors)."""
    R, K, m, d = U.shape
    V = torch.zeros(R, K, op.P, dtype=op.dtype, device=op.device)
    V[:, :, start:start + m * d] = U.reshape(R, K, m * d).to(op.device, op.dtype)
    return op.matvec(V)[:, :, start:start + m * d].reshape(R, K, m, d)


def relative_flatness_values(op, *, layer: str | None = None, normalize: bool = True, method: str = "hutchinson",
                             num_probes: int = 100, probe_batch: int = 10, seed: int = 0, common: bool = True):
    """``(kappa [R], stderr [R] or None)`` float64 CPU."""
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"relative_flatness: method must be 'exact' or 'hutchinson', got {method!r}")
    layer = feature_layer(op, layer)
    start, (m, d) = _block(op, layer)
    W = op.replicas.params[f"{layer}.weight"].to(torch.float64)  # [R, m, d]
    if normalize:
        sig = feature_std(op, layer).to(W.device)
        inv = torch.where(sig > 0, 1 / sig, torch.zeros_like(sig))  # 0: constant features are dropped
    else:
        sig = torch.ones(op.R, d, dtype=torch.float64, device=W.device)
        inv = sig
    Gp = torch.einsum("rsj,rtj,rj->rst", W, W, sig**2)  # G' = W diag(sigma^2) W^T (no dropped columns)
    if method == "exact":
        if m * d > 4096:
            raise ValueError(f"relative_flatness: exact method needs m*d = {m * d} HVPs; use method='hutchinson'")
        eye = torch.eye(m * d, dtype=torch.float64).reshape(m * d, m, d)
        cols = []
        for chunk in eye.split(probe_batch):
            U = chunk.unsqueeze(0).expand(op.R, -1, -1, -1)
            cols.append(_hvp_W(op, U, start).to(torch.float64).reshape(op.R, -1, m * d))
        H = torch.cat(cols, 1).reshape(op.R, m, d, m, d)  # H[r, s', j', s, j] (symmetric)
        tr = torch.einsum("rsjtj,rj->rst", H, inv**2)
        return (Gp * tr).sum((1, 2)).cpu(), None
    if num_probes < 2:
        raise ValueError("relative_flatness: num_probes must be at least 2")
    gen = torch.Generator().manual_seed(seed)
    samples = []
    done = 0
    while done < num_probes:
        K = min(probe_batch, num_probes - done)
        V = torch.randint(0, 2, (1 if common else op.R, K, m, d), generator=gen).to(torch.float64) * 2 - 1
        V = V.to(W.device).expand(op.R, K, m, d)
        HU = _hvp_W(op, V * inv.view(op.R, 1, 1, d), start).to(torch.float64)
        GV = torch.einsum("rst,rktj->rksj", Gp, V) * inv.view(op.R, 1, 1, d)
        samples.append((GV * HU).sum((2, 3)).cpu())
        done += K
    s = torch.cat(samples, 1)
    return s.mean(1), s.std(1) / math.sqrt(s.shape[1])


def _draws_probes(options: dict) -> bool:
    """Whether the options select the Hutchinson estimator (Rademacher probes; "exact" draws nothing)."""
    return options.get("method", "hutchinson") == "hutchinson"


@register_measure("relative_flatness", replica_noise=_draws_probes, options=keywords(relative_flatness_values))
def relative_flatness(op, *, seed, common, **options):
    """Column ``relative_flatness`` ``[R]`` (with a standard error for the Hutchinson estimator).
    Options: layer (module name), normalize (True), method ("hutchinson" | "exact"), num_probes (100)."""
    value, se = relative_flatness_values(op, seed=seed, common=common, **options)
    return {"relative_flatness": finish(op, value, stderr=se)}
