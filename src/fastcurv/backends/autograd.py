"""The oracle backend: a per-replica loop of plain double backward. Slow and exact."""
from __future__ import annotations

import torch

from .base import Backend


class AutogradBackend(Backend):
    """For each replica and batch: build the loss graph, take the gradient with
    ``create_graph=True``, then one more backward per probe. Nothing is reused between matvecs.
    :class:`~fastcurv.HessianOperator` runs products and gradients under
    :func:`~.base.math_attention` (attention's fused kernels have no double backward)."""

    name = "autograd"

    def matvec(self, vecs, idx):
        rs = self.replicas
        rows = idx.tolist() if idx is not None else list(range(rs.R))
        K = vecs[0].shape[1]
        out = [torch.zeros_like(v) for v in vecs]
        for local, r in enumerate(rows):
            params = {n: rs.params[n][r].detach().requires_grad_(True) for n in rs.names}
            buffers = {n: b[r] for n, b in rs.buffers.items()}
            plist = list(params.values())
            for _, x, y in self.batches:
                loss = self.loss.batch_loss(rs.call(params, buffers, x), y)
                grads = torch.autograd.grad(loss, plist, create_graph=True, allow_unused=True)
                used = [(j, g) for j, g in enumerate(grads) if g is not None and g.requires_grad]
                if not used:
                    continue
                for k in range(K):
                    hv = torch.autograd.grad(
                        [g for _, g in used],
                        plist,
                        grad_outputs=[vecs[j][local, k] for j, _ in used],
                        retain_graph=True,
                        allow_unused=True,
                    )
                    for j, h in enumerate(hv):
                        if h is not None:
                            out[j][local, k] += h
        return out

    def loss_and_gradient(self, idx, reuse_state: bool = False):
        """Full-data loss ``[Ra]`` and per-parameter gradients ``[Ra, ...]`` of replicas ``idx``
        (all when None), one replica and batch at a time (``reuse_state`` is the fused engine's
        option; nothing is cached here)."""
        rs = self.replicas
        rows = idx.tolist() if idx is not None else list(range(rs.R))
        total = torch.zeros(len(rows), dtype=rs.dtype, device=rs.device)
        grads = [rs.params[n].new_zeros(len(rows), *rs.params[n].shape[1:]) for n in rs.names]
        for local, r in enumerate(rows):
            params = {n: rs.params[n][r].detach().requires_grad_(True) for n in rs.names}
            buffers = {n: b[r] for n, b in rs.buffers.items()}
            for _, x, y in self.batches:
                loss = self.loss.batch_loss(rs.call(params, buffers, x), y)
                total[local] += loss.detach()
                for j, g in enumerate(torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                    if g is not None:
                        grads[j][local] += g
        return total, grads
