"""The MLP engine's exact Hessian trace (piecewise-linear chains): :class:`_MlpExactTrace`."""
from __future__ import annotations

import torch

from ...ops.csr_linear import csr_masked_linear
from .loss_head import _mass_for_trace, hessian_sqrt_columns


class _MlpExactTrace:
    """:meth:`FusedBackend.exact_trace <.backend.FusedBackend.exact_trace>` of MLP chains, a mixin of
    :class:`~.backend.FusedBackend`. It reads the backend's ``layers`` (the parsed chain),
    ``_linears`` (its Linear layers), ``replicas``, ``loss``, ``batches`` and ``chunk_bytes``, and
    its cached state through ``_blocks`` and ``_state_rows``."""

    def _exact_trace_mlp(self, idx) -> torch.Tensor:
        """The exact trace ``[Ra]`` (float64) of replicas ``idx`` of an MLP chain: per block of the
        cached state, in chunks of replicas and samples (:meth:`_trace_steps`)."""
        params = self.replicas.subset(idx)[0]
        Ra = next(iter(params.values())).shape[0]
        total = torch.zeros(Ra, dtype=torch.float64, device=self.replicas.device)
        for blk in self._blocks():
            st, where = self._state_rows(blk, idx)
            if where is not None:
                st = st.select(where.to(blk.device))
            N = blk.rows
            C = st.deltas[-1].shape[-1]
            r_step, n_step = self._trace_steps(Ra, N, C, blk)
            for r0 in range(0, Ra, r_step):
                rows = slice(r0, min(Ra, r0 + r_step))
                sub, sub_params = st.narrow(rows), {n: t[rows] for n, t in params.items()}
                for n0 in range(0, N, n_step):
                    n1 = min(N, n0 + n_step)
                    part = sub if n1 - n0 == N else sub.samples(slice(n0, n1))
                    total[rows] += self._trace_rows(part, sub_params, n1 - n0, C)
        return total

    def _trace_widths(self) -> list[tuple[int, int]]:
        """``(outputs, inputs)`` of each Linear layer, first to last."""
        return [tuple(self.replicas.params[l.weight].shape[1:]) for l in self._linears]

    def _gram_trace(self, C: int) -> bool:
        """Whether the exact trace propagates each sample's Gram matrix ``J^T H_n J`` (``[H, H]``
        at a layer of width H; :meth:`_trace_gram`) instead of the C columns of ``J^T A_n``
        (``[C, H]``): where its multiply-adds per sample are fewer than 2/3 of theirs. The
        columns cost ``C^2 H`` through the head (H its inputs) and ``C O I`` through each Linear
        layer below it but the first; the Gram matrices ``C H^2`` at the head and ``O I (O + I)``
        per layer below it (the last step only a diagonal, ``O^2 I``), so they win when the classes
        outnumber the widths (64-64-64-500: 18M against 2.5M; W1's 784-128-128-10: 0.18M against
        2.3M). Measured (one thread, ReLU MLPs at initialization, the columns' sparse ReLU products
        on): the Gram form 0.87x the columns' time at a count ratio of 1.56 (64-128-128-200),
        0.7x at 1.56 (64-64-64-100), 0.56x at 2.5 (64-128-128-300), 0.2x at 7 (64-64-64-500);
        1.3x at 1.17 (64-256-256-300), 2.6x at 0.78 (784-128-128-100). The last layer must be the
        Linear head."""
        if self.layers[-1].kind != "linear":
            return False
        w = self._trace_widths()
        L, I = len(w), w[-1][1]
        columns = C * C + (C * C * I if L > 1 else 0) + sum(C * o * i for o, i in w[1:-1])
        gram = C + (C * I * (I if L > 2 else 1) if L > 1 else 0)
        gram += sum(o * i * (o + i) if l > 1 else o * o * i for l, (o, i) in enumerate(w[:-1]) if l > 0)
        return 3 * gram < 2 * columns

    def _trace_steps(self, R: int, N: int, C: int, x) -> tuple[int, int]:
        """``(replicas, samples)`` per chunk of the exact trace for a block of N samples (``x``: its
        inputs, or the :class:`~.blocks.Block`; only its ``device`` is read): on the CPU
        as many as keep its widest tensor (per replica and sample: C vectors of the widest layer, or
        for the Gram form the largest of its matrices) within ``chunk_bytes``, replicas first;
        elsewhere all replicas, and samples up to the loader's largest batch (what the trace held
        before batches were joined)."""
        if x.device.type != "cpu" or self.chunk_bytes is None:
            return R, min(N, max(self.batches.sizes))
        w = self._trace_widths()
        if self._gram_trace(C):  # what _trace_gram builds: the probabilities alone for one Linear layer,
            I = w[-1][1]         # V [C, I] and a diagonal for two, matrices [I, I] and [O, I] below
            per = C if len(w) == 1 else C * I if len(w) == 2 else max([C * I, I * I] + [max(o, i) * i for o, i in w[1:-1]])
        else:
            per = C * max(o for o, _ in w)
        per *= self.replicas.params[self.replicas.names[0]].element_size()
        budget = self.chunk_bytes
        if N * per <= budget:
            return max(1, min(R, budget // (N * per))), N
        return 1, max(1, min(N, budget // max(per, 1)))

    def _trace_rows(self, st, params, N, C) -> torch.Tensor:
        """``sum_n sum_c |J_n^T a_nc|^2`` ``[R]`` for the state of R replicas and N samples."""
        if self._gram_trace(C):
            return self._trace_gram(st, params, N, C)
        R = st.deltas[-1].shape[0]
        rd = hessian_sqrt_columns(self.loss, st.probs, st.mass, 1, C, st.deltas[-1]).expand(R, N, C, C)  # [R, N, C, C]
        total = torch.zeros(R, dtype=torch.float64, device=rd.device)
        lin, act = len(st.inputs), len(st.d1)
        for layer in reversed(self.layers):
            if layer.kind == "linear":
                lin -= 1
                a, W = st.inputs[lin], params[layer.weight]
                sq = a.square().sum(-1)  # [N] (the shared input) or [R, N]
                if layer.bias is not None:
                    sq = sq + 1
                total += (rd.square().sum((2, 3)) * sq).sum(1).to(torch.float64)
                sp = st.sparse_out[lin]
                if a.dim() == 3 and sp is not None:  # rd vanishes outside the ReLU pattern after the layer
                    rd = csr_masked_linear(sp.csr, sp.rows, rd, W.transpose(1, 2))
                elif a.dim() == 3:
                    rd = torch.bmm(rd.reshape(R, N * C, -1), W).view(R, N, C, -1)
            elif layer.kind == "act":
                act -= 1
                if st.d1[act] is not None:
                    rd = rd * st.d1[act].unsqueeze(2)
        return total

    def _trace_gram(self, st, params, N, C) -> torch.Tensor:
        """:meth:`_trace_rows` by Gram matrices: per sample ``M = J^T H_n J`` at each layer's output
        (``sum_c |J^T a_nc|^2 = tr M``), started at the head's input from the loss Hessian and
        propagated down as ``D M D`` through each activation (D its derivative) and ``W^T M W``
        through each Linear layer; the last step only its diagonal.

        Cross-entropy's ``H_n = s m (diag(p) - p p^T)`` annihilates constant vectors, so with ``k``
        the most probable class and ``q`` the probabilities without it (``q_k = 0``), ``W^T H_n W =
        s m (V^T diag(q) V - (V^T q)(V^T q)^T)`` where ``V = W - 1 w_k^T``: every term scales with
        ``1 - p_k = sum(q)``, so a confident sample keeps its relative precision (``W^T diag(p) W -
        (W^T p)(W^T p)^T`` would cancel to rounding where ``p_k`` rounds to 1)."""
        R = st.deltas[-1].shape[0]
        head = self._linears[-1]
        W = params[head.weight]  # [R, C, I]
        I = W.shape[2]
        lin, act = len(st.inputs) - 1, len(st.d1)
        full = lin >= 2  # the matrices below the head, else (two Linear layers) their diagonals
        if self.loss.kind == "cross_entropy":
            p = st.probs  # [R, N, C]
            k = p.argmax(-1, keepdim=True)
            q = p.scatter(-1, k, 0.0)
            scale = torch.full((1, 1), self.loss.scale(), dtype=p.dtype, device=p.device)  # s m [1, N] (or [1, 1])
            if st.mass is not None:
                scale = scale * _mass_for_trace(st.mass).view(1, N)
            r = q.sum(-1)
            head_trace = scale * ((1 + p.gather(-1, k).squeeze(-1)) * r - q.square().sum(-1))  # tr H_n [R, N]
            M = None
            if lin > 0:
                V = W.unsqueeze(1) - torch.gather(W, 1, k.expand(R, N, I)).unsqueeze(2)  # [R, N, C, I]
                u = torch.bmm(q.view(R * N, 1, C), V.view(R * N, C, I)).view(R, N, I) * scale.sqrt().unsqueeze(-1)
                X = V.mul_((scale.unsqueeze(-1) * q).sqrt_().unsqueeze(-1)).view(R * N, C, I)
                if full:
                    M = torch.bmm(X.transpose(1, 2), X).baddbmm_(u.view(R * N, I, 1), u.view(R * N, 1, I), alpha=-1).view(R, N, I, I)
                else:
                    M = X.square().sum(1).view(R, N, I) - u.square()
        else:
            s2 = 2 * self.loss.scale(C)  # H_n = 2 s I
            head_trace = torch.full((1, 1), s2 * C, dtype=W.dtype, device=W.device)
            M = None
            if lin > 0:
                M = s2 * (torch.bmm(W.transpose(1, 2), W).unsqueeze(1) if full else W.square().sum(1).unsqueeze(1))  # [R, 1, ...]

        def norms(lin):  # |input|^2 (+ 1 for the bias) [N] or [R, N]
            sq = st.inputs[lin].square().sum(-1)
            return sq + 1 if self._linears[lin].bias is not None else sq

        total = (head_trace * norms(lin)).sum(-1).to(torch.float64).expand(R).clone()
        for layer in reversed(self.layers[:-1]):
            if layer.kind == "act":
                act -= 1
                d = st.d1[act]
                if d is not None:
                    M = M * (d.unsqueeze(3) * d.unsqueeze(2) if full else d.square())
            elif layer.kind == "linear":
                lin -= 1
                tr = M.diagonal(dim1=2, dim2=3).sum(-1) if full else M.sum(-1)  # [R, N] (or [R, 1]: MSE, unmasked)
                total += (tr * norms(lin)).sum(-1).to(torch.float64).expand(R)
                if lin == 0:
                    break
                Wl = params[layer.weight]  # [R, O, I]
                O, I = Wl.shape[1:]
                n = M.shape[1]
                T = torch.bmm(M.reshape(R, n * O, O), Wl).view(R, n, O, I)  # M W
                full = lin >= 2
                if full:  # W^T M W = (M W)^T W, M symmetric
                    M = torch.bmm(T.transpose(2, 3).reshape(R, n * I, O), Wl).view(R, n, I, I)
                else:
                    M = (T * Wl.unsqueeze(1)).sum(2)
        return total
