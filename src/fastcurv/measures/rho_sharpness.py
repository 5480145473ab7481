"""rho-sharpness (Andriushchenko et al., ICML 2023, arXiv 2302.07011): worst-case and
average-case, standard (c = 1) and adaptive (c = |theta| + eta), in l2 and l-infinity balls.

* worst case: ``S_max = sum_B [max_{||delta / c||_p <= rho} L_B(theta + delta) - L_B(theta)]`` where
  ``L_B`` is batch B's share of the full-data loss, i.e. the sample-weighted mean over batches of
  the per-batch worst-case increase of the batch mean loss (the reference code's per-batch
  protocol; with ``per_batch=False`` the maximum is taken of the full-data loss instead).
  Solver: APGD-style projected ascent (:mod:`._ascent`), ``n_iter`` steps, momentum 0.75,
  initial step 2 rho, one restart.
  Adaptive: ``c = |theta| + eta`` on every parameter (``eta = 0`` by default, which keeps the
  invariance below); ``weights_only=True`` keeps ``c = 1`` on the parameters whose name does not
  contain "weight" (ASAM's T_theta, Kwon et al. 2021: biases unscaled). The standard measures
  refuse ``eta`` and ``weights_only`` (they had accepted eta and ignored it).
* average case: ``S_avg = E_delta[L(theta + delta)] - L(theta)`` with, per coordinate,
  ``delta_i = rho * c_i * xi_i``; xi ~ N(0, 1) for l2 (not normalized by sqrt(P), as in the
  reference code) and xi ~ U[-1, 1] for l-infinity; ``n_samples`` draws.

Units: loss (nats for cross-entropy) at the operator's reduction (mean by default).
Invariance: the adaptive forms with ``eta = 0`` (and every parameter scaled) are invariant to
positive elementwise rescaling symmetries (Dinh layer and neuron rescaling); ASAM's form is so only
approximately, and the standard forms are not. Logit normalization (``normalize_logits``: the
logits centred and divided by their L2 norm over the classes, dim 1 of per-sample outputs
``[n, C, ...]``, per position for ``[n, C, H, W]``) acts on the outputs only, so it keeps the
invariance.
"""
from __future__ import annotations

import torch

from . import register_measure
from ._ascent import NORMS, apgd_ascent
from ._common import check_options, finish, loss_at, loss_grad_at, noise, normalize_logits, positive, working_precision

# eta (the adaptive scale's offset) and weights_only exist for the adaptive forms only: the standard ones refuse them
WORST_OPTIONS = ("rho", "p", "n_iter", "momentum", "per_batch", "normalize_logits", "init")
ADAPTIVE_WORST_OPTIONS = WORST_OPTIONS + ("eta", "weights_only")
AVG_OPTIONS = ("rho", "p", "n_samples")
ADAPTIVE_AVG_OPTIONS = AVG_OPTIONS + ("eta",)


def _scale(rs, theta, adaptive, eta, weights_only):
    """The perturbation scale ``c`` ``[R, P]`` (None: 1): ``|theta| + eta`` when adaptive, on the
    parameters named "...weight..." only when ``weights_only`` (ASAM's rule; the others get 1)."""
    if not adaptive:
        if eta or weights_only:
            raise ValueError("eta and weights_only shape the adaptive scale |theta| + eta: the standard ball takes neither")
        return None
    c = theta.abs() + eta
    if not weights_only:
        return c
    is_weight = torch.cat([torch.full((n,), "weight" in name, dtype=torch.bool) for name, n in zip(rs.names, rs.numels)])
    return torch.where(is_weight.to(c.device), c, torch.ones_like(c))


def worst_case_sharpness(op, *, seed: int = 0, common: bool = True, rho: float = 0.05, p: str = "l2", n_iter: int = 20,
                         momentum: float = 0.75, per_batch: bool = True, adaptive: bool = False, eta: float = 0.0,
                         normalize_logits: bool = False, init: str = "random",
                         weights_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Worst-case rho-sharpness ``[R]`` (float64, CPU), the worst perturbations ``[R, P]`` of the
    last batch searched, and gradient evaluations per replica (each over one batch when per_batch)."""
    positive("rho_sharpness", rho=rho)
    if p not in NORMS:
        raise ValueError(f"rho_sharpness: p must be one of {NORMS}, got {p!r}")
    op = working_precision(op)  # (float16/bfloat16 models: perturbed and evaluated in float32)
    rs = op.replicas
    theta = rs.flat_params()
    c = _scale(rs, theta, adaptive, eta, weights_only)
    out_map = _logit_normalization(op.loss) if normalize_logits else None
    rhos = torch.full((op.R,), float(rho), dtype=torch.float64)
    total = torch.zeros(op.R, dtype=torch.float64)
    batches = [i for i, _, _ in op.batches] if per_batch else [None]
    evals = 0
    delta = None
    for b in batches:
        gen = torch.Generator().manual_seed(seed + 7919 * (0 if b is None else b + 1))
        base = loss_at(op, theta, batch=b, output_map=out_map)

        def objective(t, b=b):
            return loss_grad_at(op, t, batch=b, output_map=out_map)

        best, delta, n = apgd_ascent(objective, theta, rhos, p=p, c=c, n_iter=n_iter, momentum=momentum, init=init,
                                     generator=gen, common=common)
        total += (best - base).clamp_min(0.0)
        evals += n
    return total, delta, evals


def _logit_normalization(loss):
    """The output map of ``normalize_logits=True``: one replica's outputs ``[n, C, ...]`` normalized
    over their class axis, dim 1 (for per-position outputs ``[n, C, H, W]``, where the cross-entropy
    takes its classes, not the last axis). Other losses than cross-entropy (the named one or torch's
    module, :attr:`~fastcurv.losses.Loss.softmax_classes`) have a class axis only in outputs ``[n, C]``."""
    def normalize(z):
        if z.dim() > 2 and not loss.softmax_classes:
            raise ValueError(f"normalize_logits: outputs {tuple(z.shape)} have no known class axis with a {loss.kind} "
                             "loss (cross-entropy takes dim 1): normalize inside the loss instead")
        return normalize_logits(z)
    return normalize


def _random_start(options: dict) -> bool:
    """Whether the worst-case ascent draws a random start (one noise row per replica when not common)."""
    return options.get("init", "random") == "random"


def average_case_sharpness(op, *, seed: int = 0, common: bool = True, rho: float = 0.1, p: str = "l2",
                           n_samples: int = 100, adaptive: bool = False, eta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-case rho-sharpness ``[R]`` and its Monte-Carlo standard error ``[R]`` (float64, CPU)."""
    positive("avg_rho_sharpness", rho=rho, n_samples=n_samples)
    if p not in NORMS:
        raise ValueError(f"avg_rho_sharpness: p must be one of {NORMS}, got {p!r}")
    if n_samples < 2:
        raise ValueError("avg_rho_sharpness: n_samples must be at least 2 to give a standard error")
    op = working_precision(op)  # (float16/bfloat16 models: perturbed and evaluated in float32)
    theta = op.replicas.flat_params()
    c = _scale(op.replicas, theta, adaptive, eta, False)
    c = torch.ones_like(theta) if c is None else c
    gen = torch.Generator().manual_seed(seed)
    base = loss_at(op, theta)
    diffs = []
    for _ in range(n_samples):
        xi = noise(op, op.R, generator=gen, common=common, kind="gaussian" if p == "l2" else "uniform")
        diffs.append(loss_at(op, theta + rho * c * xi) - base)
    d = torch.stack(diffs, 1)
    return d.mean(1), d.std(1) / n_samples**0.5


@register_measure("rho_sharpness", replica_noise=_random_start, options=WORST_OPTIONS)
def rho_sharpness(op, *, seed, common, **options):
    """Worst-case rho-sharpness, standard ball. Defaults: rho = 0.05 (SAM's training radius,
    Foret et al. 2021), p = "l2", n_iter = 20 (Andriushchenko et al.), per-batch protocol over the
    loader's batches (theirs: 1024 examples in batches of 128). Column ``rho_sharpness``."""
    check_options("rho_sharpness", options, WORST_OPTIONS)
    value, _, _ = worst_case_sharpness(op, seed=seed, common=common, **options)
    return {"rho_sharpness": finish(op, value)}


@register_measure("adaptive_rho_sharpness", replica_noise=_random_start, options=ADAPTIVE_WORST_OPTIONS)
def adaptive_rho_sharpness(op, *, seed, common, **options):
    """Worst-case adaptive rho-sharpness (``||delta / |theta| ||_p <= rho``). Defaults: the
    reference code's canonical example (Andriushchenko et al.'s README): p = "linf", rho = 0.001,
    n_iter = 20, normalize_logits = True with a cross-entropy loss, named or torch's module (the
    logits centred and divided by their L2 norm before the cross-entropy; False for other losses),
    per-batch protocol over the loader's batches (theirs: 1024 examples in batches of 128); plus eta = 0 (exact
    invariance) and a random start. ASAM's adaptive sharpness (Kwon et al. 2021; ``T = |theta| +
    eta`` on the weights, biases unscaled) is ``p="l2", eta=0.01, weights_only=True,
    normalize_logits=False`` with their rho (0.5 on CIFAR-10). Column ``adaptive_rho_sharpness``."""
    check_options("adaptive_rho_sharpness", options, ADAPTIVE_WORST_OPTIONS)
    # (torch's CrossEntropyLoss module too: it got the other default, 2.2-4x lower values for the same loss)
    options = {"p": "linf", "rho": 0.001, "normalize_logits": op.loss.softmax_classes, **options}
    value, _, _ = worst_case_sharpness(op, seed=seed, common=common, adaptive=True, **options)
    return {"adaptive_rho_sharpness": finish(op, value)}


@register_measure("avg_rho_sharpness", options=AVG_OPTIONS)
def avg_rho_sharpness(op, *, seed, common, **options):
    """Average-case rho-sharpness: ``delta_i = rho xi_i`` per coordinate, xi ~ N(0, 1) with p = "l2"
    (Gaussian noise of std rho) and U[-1, 1] with p = "linf". Defaults: rho = 0.1, p = "l2",
    n_samples = 100 (reference default). Column ``avg_rho_sharpness`` with a Monte-Carlo standard
    error."""
    check_options("avg_rho_sharpness", options, AVG_OPTIONS)
    value, se = average_case_sharpness(op, seed=seed, common=common, **options)
    return {"avg_rho_sharpness": finish(op, value, stderr=se)}


@register_measure("adaptive_avg_rho_sharpness", options=ADAPTIVE_AVG_OPTIONS)
def adaptive_avg_rho_sharpness(op, *, seed, common, **options):
    """Average-case adaptive rho-sharpness: ``delta_i = rho (|theta_i| + eta) xi_i``, xi as for
    :func:`avg_rho_sharpness`. Defaults: rho = 0.1, p = "l2", n_samples = 100, eta = 0. Column
    ``adaptive_avg_rho_sharpness``."""
    check_options("adaptive_avg_rho_sharpness", options, ADAPTIVE_AVG_OPTIONS)
    value, se = average_case_sharpness(op, seed=seed, common=common, adaptive=True, **options)
    return {"adaptive_avg_rho_sharpness": finish(op, value, stderr=se)}
