"""Simplicity of R replicas: encoding-dependent description lengths of the weights (on purpose
not invariant to reparameterisation; reference/measures.md sections 3.14 and 5.3).

* ``compressed_bytes_<codec>``: bytes of the zlib/lzma-compressed weights after per-tensor 8-bit
  uniform quantisation ``q = round(255 * (w - min) / (max - min))``: the compressed codes plus 8
  bytes per tensor, its min and max as two float32 stored uncompressed. Fewer bytes = simpler: the column is a size, so its
  sign is the opposite of a "simplicity" score (measures.md section 5.3 uses -bytes).
* ``sq_weight_norm``: ``||theta||_2^2`` over all parameters, as the model holds them: a
  parametrized layer's original tensors (weight norm's ``g`` and ``v``, ``original`` of
  spectral norm), not the weight they compute, as for every measure here and the Hessian.
* ``pacbayes_mag_kl``: the magnitude-aware PAC-Bayes KL term of Jiang et al. (2020),
  ``1/4 sum_i log[(eps^2 + (s^2 + 1) ||theta||^2 / P) / (eps^2 + s^2 (theta_i - w0_i)^2)]
  + log(m / s) + 10`` with ``s = sigma'``, P parameters, m training examples, w0 the initial
  weights (zeros when not given).

Under Dinh alpha-rescaling (a whole layer's weights and biases scaled) the compressed sizes do not
change (the quantisation is per tensor, so the codes stay; only the two stored float32 bounds
change, and they are counted, not compressed: compressed with the codes, they changed the sizes by
a few bytes) and neither does
the bisected sigma' (up to its eps), while ``sq_weight_norm`` and ``pacbayes_mag_kl`` do. Neuron-wise
rescaling changes the compressed sizes too. All parameters count as they are in the model
(biases and BatchNorm weights included; BatchNorm is not folded into the preceding layer, as
Dziugaite et al.'s code does before its norms: pass ``fastcurv.reparam.fold_batchnorm(models).models``
for that).
"""
from __future__ import annotations

import lzma
import zlib

import torch

CODECS = ("zlib", "lzma")


BOUND_BYTES = 8  # per tensor: its min and max as two float32


def quantized_bytes(tensors) -> bytes:
    """The 8-bit codes of the per-tensor uniform quantisation of ``tensors`` (one replica), as bytes
    (without the bounds, ``BOUND_BYTES`` per tensor)."""
    parts = []
    for t in tensors:
        w = t.detach().double().flatten().cpu()
        lo, hi = float(w.min()), float(w.max())
        scale = (hi - lo) if hi > lo else 1.0
        q = torch.round((w - lo) / scale * 255.0).clamp_(0, 255).to(torch.uint8)
        parts.append(q.numpy().tobytes())
    return b"".join(parts)


def compressed_sizes(params: dict, finite: torch.Tensor, codecs=CODECS) -> dict:
    """``{f"compressed_bytes_{codec}": float64 [R]}`` for ``codecs`` (names from ``CODECS``, or one
    name); NaN for replicas with non-finite weights."""
    codecs = (codecs,) if isinstance(codecs, str) else tuple(codecs)
    for c in codecs:
        if c not in CODECS:
            raise ValueError(f"unknown codec {c!r}; available: {CODECS}")
    R = int(finite.shape[0])
    out = {f"compressed_bytes_{c}": torch.full((R,), float("nan"), dtype=torch.float64) for c in codecs}
    for r in range(R):
        if not bool(finite[r]):
            continue
        raw = quantized_bytes([t[r] for t in params.values()])
        for c in codecs:
            size = len(zlib.compress(raw, 9)) if c == "zlib" else len(lzma.compress(raw, preset=6))
            out[f"compressed_bytes_{c}"][r] = size + BOUND_BYTES * len(params)
    return out


def sq_weight_norm(flat: torch.Tensor) -> torch.Tensor:
    """``||theta_r||^2`` per replica from ``[R, P]`` parameters (float64 ``[R]``)."""
    return flat.double().square().sum(1).cpu()


def pacbayes_mag_kl(flat: torch.Tensor, sigma: torch.Tensor, num_train: int, init: torch.Tensor | None = None,
                    eps: float = 1e-3) -> torch.Tensor:
    """Magnitude-aware PAC-Bayes KL term per replica (float64 ``[R]``).

    flat: ``[R, P]`` parameters; sigma: ``[R]`` the magnitude-aware noise scale sigma';
    init: ``[R, P]`` initial parameters (zeros when None); num_train: training-set size m.
    """
    theta = flat.double().cpu()
    w0 = torch.zeros_like(theta) if init is None else init.double().cpu()
    if w0.shape != theta.shape:
        raise ValueError(f"init parameters have shape {tuple(w0.shape)}, the models {tuple(theta.shape)}")
    s2 = sigma.double().cpu()[:, None] ** 2
    P = theta.shape[1]
    num = eps**2 + (s2 + 1) * theta.square().sum(1, keepdim=True) / P
    den = eps**2 + s2 * (theta - w0).square()
    kl = 0.25 * torch.log(num / den).sum(1)
    return kl + torch.log(num_train / sigma.double().cpu()) + 10.0
