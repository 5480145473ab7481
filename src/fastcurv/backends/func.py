"""The torch.func backend: vmap over replicas; per batch the gradient map is linearized once
(``torch.func.linearize``) and the linearization is reused by every matvec of a solver."""
from __future__ import annotations

import warnings

import torch
from torch.func import grad, jvp, linearize, vmap

from .base import Backend

DEFAULT_REUSE_BYTES = 4 << 30


def activation_bytes(replicas, x) -> int:
    """Bytes of all module outputs for one replica on batch ``x`` (a proxy for autograd graph size)."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in replicas.base.modules()]
    try:
        with torch.no_grad():
            p, b = replicas.subset(torch.tensor([0], device=replicas.device))
            replicas.call({n: t[0] for n, t in p.items()}, {n: t[0] for n, t in b.items()}, x)
    finally:
        for h in handles:
            h.remove()
    return total


class FuncBackend(Backend):
    """Forward-over-reverse HVPs with torch.func, batched over replicas.

    Args:
        reuse: True, False or "auto". With reuse, each batch's gradient map is linearized once per
            set of active replicas and the linearization (which holds the primal forward and
            backward) is reused, so a matvec costs only the tangent passes. "auto" reuses when the
            estimated size of these graphs fits in ``reuse_bytes``.
    """

    name = "func"

    def __init__(self, replicas, loss, batches, reuse="auto", reuse_bytes: int = DEFAULT_REUSE_BYTES):
        super().__init__(replicas, loss, batches)
        if reuse not in (True, False, "auto"):
            raise ValueError(f"reuse must be True, False or 'auto', got {reuse!r}")
        if reuse == "auto":
            first = next(iter(batches))[1]
            est = 6 * activation_bytes(replicas, first) * replicas.R * len(batches)
            reuse = est <= reuse_bytes
        self.reuse = reuse
        self._linear: dict[int, tuple[tuple, object]] = {}

    def clear_cache(self):
        self._linear.clear()

    def _grad_map(self, buffers, x, y):
        rs, loss = self.replicas, self.loss

        def one(p, b):
            return loss.batch_loss(rs.call(p, b, x), y)

        return lambda params: vmap(grad(one))(params, buffers)

    def _linearized(self, i, x, y, idx):
        key = tuple(idx.tolist()) if idx is not None else None
        hit = self._linear.get(i)
        if hit is not None and hit[0] == key:
            return hit[1]
        params, buffers = self.replicas.subset(idx)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*get_attr Node.*")
            _, fn = linearize(self._grad_map(buffers, x, y), params)
        self._linear[i] = (key, fn)
        return fn

    def matvec(self, vecs, idx):
        rs = self.replicas
        K = vecs[0].shape[1]
        out = [torch.zeros_like(v) for v in vecs]
        params, buffers = rs.subset(idx)
        for i, x, y in self.batches:
            if self.reuse:
                fn = self._linearized(i, x, y, idx)
                for k in range(K):
                    hv = fn({n: v[:, k] for n, v in zip(rs.names, vecs)})
                    for j, n in enumerate(rs.names):
                        out[j][:, k] += hv[n]
            else:
                def hvp(p, b, v):
                    def g(q):
                        return grad(lambda q_: self.loss.batch_loss(rs.call(q_, b, x), y))(q)

                    return jvp(g, (p,), (v,))[1]

                tangents = {n: v for n, v in zip(rs.names, vecs)}
                hv = vmap(vmap(hvp, in_dims=(None, None, 0)), in_dims=(0, 0, 0))(params, buffers, tangents)
                for j, n in enumerate(rs.names):
                    out[j] += hv[n]
        return out
