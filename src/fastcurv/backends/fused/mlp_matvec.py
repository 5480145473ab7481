"""The MLP engine's matvec: :class:`_MlpMatvec`.

Tangents use the layout ``[R, N, K, F]``: every batched matmul then reads and writes contiguous
views without permuting activation-sized tensors.
"""
from __future__ import annotations

import torch

from ... import _ext
from ...ops import act_rop_bwd
from ...ops.csr_linear import csr_linear, csr_linear_wgrad_shared, csr_masked_linear
from ...ops.linear_rop import in_fused_engine, linear_rop
from ...replicas import consecutive_runs
from .loss_head import _head_products, loss_rop
from .mlp_state import _all_rows, _scatter_columns_


def _bmm_into(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``dst (=|+=) a @ b`` for a product block ``dst [R, K, O, I]`` (a view of the flat ``[R, K, P]``
    result) and ``a @ b`` of ``[R, K*O, I]``: in place where the K blocks are one matrix (K = 1),
    else through a temporary."""
    R, K, O, I = dst.shape
    if K == 1:
        dst.view(R, O, I).baddbmm_(a, b, beta=0 if first else 1)
    else:
        p = torch.bmm(a, b).view(R, K, O, I)
        dst.copy_(p) if first else dst.add_(p)


def _as_slice(ids: torch.Tensor):
    """``ids`` as a slice when they are consecutive (a view instead of a copy), else ``ids``."""
    lo = int(ids[0])
    return slice(lo, lo + len(ids)) if int(ids[-1]) - lo + 1 == len(ids) else ids


class _MlpMatvec:
    """:meth:`FusedBackend.matvec <.backend.FusedBackend.matvec>` of MLP chains, a mixin of
    :class:`~.backend.FusedBackend`. It reads the backend's ``layers`` (the parsed chain),
    ``replicas``, ``loss``, ``chunk_bytes``, ``fused_head``, ``_widest`` (the widest Linear
    output) and ``_unused`` (parameters no layer reads), and its cached state through ``_blocks``
    and ``_state_rows``."""

    def _matvec_mlp(self, vecs, idx):
        """The products of replicas ``idx`` (None: all) as the flat ``[Ra, K, P]``: per block of
        the cached state, in chunks of replicas (:meth:`_chunk`), one :meth:`_apply` each."""
        rs = self.replicas
        pos = {n: j for j, n in enumerate(rs.names)}
        R, K = vecs[0].shape[:2]
        flat = vecs[0].new_empty(R, K, rs.P)
        # the products land in their place in the flat result: [R, K, O, I] views, whose K probe
        # blocks lie P apart (the sparse kernels and head_hvp read and write such groups directly;
        # the GEMMs of the dense paths go through a temporary)
        out = rs.unflatten(flat)
        for j in self._unused:  # parameters no layer reads (their Hessian rows are zero)
            out[j].zero_()
        triton_fwd = in_fused_engine(vecs[0].device)
        # the last Linear and the loss in one kernel (head_hvp), which reads the probe block as it is
        head = self.fused_head and not triton_fwd and _ext.choose("head_hvp", vecs[0].device, vecs[0].dtype) == "ext"
        for n_batch, blk in enumerate(self._blocks()):
            st, where = self._state_rows(blk, idx)
            step = self._chunk(R, blk.rows, K, blk.device)
            for s0, v0, n in consecutive_runs(where, R):  # state rows s0.. hold the replicas of vecs rows v0..
                ids = None if idx is None else idx[v0:v0 + n]
                for c in range(0, n, step):
                    m = min(step, n - c)
                    sv, vv = slice(s0 + c, s0 + c + m), slice(v0 + c, v0 + c + m)
                    gid = slice(v0 + c, v0 + c + m) if ids is None else _as_slice(ids[c:c + m])
                    self._apply(st.narrow(sv), {n_: t[gid] for n_, t in rs.params.items()}, [v[vv] for v in vecs],
                                [o[vv] for o in out], pos, blk.rows, first=n_batch == 0, triton_fwd=triton_fwd, head=head)
        return flat

    def _chunk(self, R: int, N: int, K: int, device) -> int:
        """Replicas per chunk: all on a GPU; on a CPU as many as keep one [chunk, N, K, F]
        tangent within ``chunk_bytes``, so the element-wise passes between GEMMs hit the cache."""
        if device.type != "cpu" or self.chunk_bytes is None:
            return R
        per = N * K * self._widest * self.replicas.params[self.replicas.names[0]].element_size()
        return max(1, min(R, self.chunk_bytes // max(per, 1)))

    def _apply(self, st, params, vecs, out, pos, N, first, triton_fwd, head):
        """Accumulate one batch's Hessian-vector products of the replicas in ``st`` into ``out``
        (``first``: the first batch, whose products overwrite ``out``: it is not zeroed;
        ``triton_fwd``: the Linear layers' R-forward runs through the Triton linear_rop; ``head``:
        the last Linear layer and the loss run in the head_hvp kernel)."""
        R, K = vecs[0].shape[:2]
        head = head and st.mass is None  # the kernel has no per-sample loss Hessian scale
        ra, rpre, rin = None, [], []
        lin = act = 0
        fused_act = None  # the R-op of the activation after a Linear run by the Triton linear_rop
        masked = set()  # activations whose derivative a sparse kernel applied already (forward pass)
        layers = self.layers[:-1] if head else self.layers  # with head, the backward pass starts below it

        def relu_mask(li: int, a: int):
            """The 0/1 (or slope) derivative of the activation at layer ``li``, number ``a``, when it is
            piecewise linear (its tangent is then the product's times it: the sparse kernels apply it
            to their result in cache, in place of a pass over the tangent); else None."""
            if 0 <= li < len(self.layers) and self.layers[li].kind == "act" and st.d2g[a] is None:
                return st.d1[a]
            return None

        for li, layer in enumerate(layers):
            if layer.kind == "linear" and triton_fwd:
                rin.append(ra)
                nxt = self.layers[li + 1] if li + 1 < len(self.layers) else None
                ra, fused_act = self._linear_rop_layer(st, lin, layer, nxt if nxt is not None and nxt.kind == "act" else None,
                                                       ra, params, vecs, pos)
                lin += 1
            elif layer.kind == "linear":
                rin.append(ra)
                a, W, dW = st.inputs[lin], params[layer.weight], vecs[pos[layer.weight]]
                O, I = W.shape[1], W.shape[2]
                db = None if layer.bias is None else vecs[pos[layer.bias]].reshape(R, K * O)  # the first product starts from it
                sp = st.sparse_in[lin]
                mask = relu_mask(li + 1, act)
                if lin == 0 and st.csr is not None:  # sparse input; the kernels read the K probe blocks [R, K, O, I] in place
                    rz = csr_linear(st.csr, _all_rows(N, R, a.device), dW, db, out_mask=mask)
                    if mask is not None:
                        masked.add(act)
                elif sp is not None:  # from the ReLU input's nonzeros
                    rz = csr_linear(sp.csr, sp.rows, dW, db)
                else:
                    # [R, I, K*O], or for the first layer [R, I_kept, K*O] (the probe's kept columns)
                    fwd = (dW.reshape(R, K * O, I) if lin > 0 or st.keep is None
                           else dW.index_select(3, st.keep).view(R, K * O, -1)).transpose(1, 2)
                    # an input shared by all replicas enters bmm as a stride-0 expand (no copy)
                    a3 = a.expand(R, *a.shape) if a.dim() == 2 else a
                    rz = torch.bmm(a3, fwd) if db is None else torch.baddbmm(db.unsqueeze(1), a3, fwd)
                rz = rz.view(R, N, K, O)
                if ra is not None and sp is not None:  # ra vanishes where the ReLU input does
                    csr_masked_linear(sp.csr, sp.rows, ra, W, out=rz, accumulate=True, out_mask=mask)
                    if mask is not None:
                        masked.add(act)
                elif ra is not None:  # in place: these tensors are R*N*K*F large
                    rz.view(R, N * K, O).baddbmm_(ra.view(R, N * K, I), W.transpose(1, 2))
                ra = rz
                lin += 1
            elif layer.kind == "act":
                d1 = st.d1[act]
                act += 1
                if fused_act is not None:  # applied by linear_rop's epilogue: (tangent before, after)
                    rz, ra = fused_act
                    fused_act = None
                    rpre.append(None if st.d2g[act - 1] is None else rz)
                    continue
                if d1 is None:
                    rpre.append(None)
                    continue
                if st.d2g[act - 1] is None:  # piecewise-linear: the pre-activation tangent is not needed later
                    rpre.append(None)
                    if act - 1 not in masked:
                        ra = ra.mul_(d1.unsqueeze(2))
                else:
                    rpre.append(ra)
                    ra = d1.unsqueeze(2) * ra
        if head:
            rd, layers, act = self._head(st, params, vecs, out, pos, ra, act, first)
        else:
            rd = loss_rop(self.loss, st.probs, st.mass, ra, sample_dim=1)
        masked.clear()  # now for the backward pass
        for li in reversed(range(len(layers))):
            layer = layers[li]
            if layer.kind == "linear":
                lin -= 1
                a, W, delta = st.inputs[lin], params[layer.weight], st.deltas[lin]
                O, I = W.shape[1], W.shape[2]
                j = pos[layer.weight]
                rdT = rd.reshape(R, N, K * O).transpose(1, 2)  # [R, K*O, N]
                sp_in, sp_out = st.sparse_in[lin], st.sparse_out[lin]
                bias_out = None if layer.bias is None else out[pos[layer.bias]]  # [R, K, O]: sum_n rd
                if lin == 0 and st.csr is not None:  # from the nonzero inputs, written in place (with the bias's)
                    csr_linear_wgrad_shared(st.csr_t, rd.reshape(R, N, K * O), out=out[j], accumulate=not first,
                                            bias_out=bias_out)
                    bias_out = None
                elif sp_in is not None:
                    csr_linear_wgrad_shared(sp_in.csr_t, rd.reshape(R, N, K * O), out=out[j], accumulate=not first,
                                            rows=sp_in.rows_t, bias_out=bias_out)
                    bias_out = None
                elif lin == 0 and st.keep is not None:
                    _scatter_columns_(out[j], st.keep, st.zero, torch.bmm(rdT, a.expand(R, *a.shape)).view(R, K, O, -1), first)
                else:
                    _bmm_into(out[j], rdT, a.expand(R, *a.shape) if a.dim() == 2 else a, first)
                ra_in = rin[lin]
                if ra_in is not None:  # delta^T ra_in [R, O, K*I], from the output's ReLU pattern where sparse
                    dra = (torch.bmm(delta.transpose(1, 2), ra_in.view(R, N, K * I)) if sp_out is None else
                           csr_linear_wgrad_shared(sp_out.csr_t, ra_in.view(R, N, K * I), rows=sp_out.rows_t,
                                                   out=delta.new_empty(R, O, K * I).transpose(1, 2)).transpose(1, 2))
                    out[j] += dra.view(R, O, K, I).transpose(1, 2)
                if bias_out is not None:  # not summed by the sparse kernels above
                    if first:
                        torch.sum(rd, 1, out=bias_out)
                    else:
                        bias_out += rd.sum(1)
                dW = vecs[j]
                if a.dim() == 3 and sp_out is not None:  # rd vanishes outside the output's ReLU pattern
                    # delta dW^T: the weight [R, K*I, O] as K groups [R, K, I, O], a view of the probe
                    rg = csr_linear(sp_out.csr, sp_out.rows, dW.permute(0, 1, 3, 2))
                    mask = relu_mask(li - 1, act - 1)
                    rd = csr_masked_linear(sp_out.csr, sp_out.rows, rd, W.transpose(1, 2), out=rg.view(R, N, K, I),
                                           accumulate=True, out_mask=mask)
                    if mask is not None:
                        masked.add(act - 1)
                elif a.dim() == 3:
                    rg = torch.bmm(rd.reshape(R, N * K, O), W)
                    rg.view(R, N, K * I).baddbmm_(delta, dW.permute(0, 2, 1, 3).reshape(R, O, K * I))
                    rd = rg.view(R, N, K, I)
            elif layer.kind == "act":
                act -= 1
                d1 = st.d1[act]
                if d1 is None:
                    continue
                d2g, rz = st.d2g[act], rpre[act]
                F_ = rd.shape[-1]
                if d2g is None:
                    if act not in masked:
                        rd = rd.mul_(d1.unsqueeze(2))
                else:
                    rd = act_rop_bwd(d1.reshape(R * N, F_), d2g.reshape(R * N, F_), rz.reshape(R * N, K, F_), rd.reshape(R * N, K, F_)).view(R, N, K, F_)

    def _head(self, st, params, vecs, out, pos, ra, act, first):
        """The last Linear layer's products and the loss R-op by :func:`~fastcurv.ops.head_hvp.head_hvp`,
        given the tangent ``ra`` of its input; when a piecewise-linear activation precedes it, that
        activation's backward R-op too. Returns the R-gradient for the layers left, those layers and
        the activation count below them."""
        layer, lin = self.layers[-1], len(st.inputs) - 1
        layers, d1 = self.layers[:-1], None
        if layers[-1].kind == "act" and st.d1[act - 1] is not None and st.d2g[act - 1] is None:
            act -= 1
            d1, layers = st.d1[act], layers[:-1]
        bias = None if layer.bias is None else pos[layer.bias]
        rd = _head_products(self.loss, st.inputs[lin], ra, params[layer.weight], vecs[pos[layer.weight]], st.deltas[lin],
                            st.probs, None if bias is None else vecs[bias], d1, out[pos[layer.weight]],
                            None if bias is None else out[bias], accumulate=not first)
        return rd, layers, act

    @staticmethod
    def _linear_rop_layer(st, lin, layer, act, ra, params, vecs, pos):
        """One Linear layer's R-forward (and that of the activation ``act`` after it, or None) by
        the Triton :func:`fastcurv.ops.linear_rop.linear_rop`, in the engine's ``[R, N, K, F]``
        layout: returns the tangent after the layer and, with ``act``, ``(rz, sigma'(z) rz)``
        for the activation step (else None)."""
        a, W, dW = st.inputs[lin], params[layer.weight], vecs[pos[layer.weight]]
        R = dW.shape[0]
        if lin == 0 and st.keep is not None:
            W, dW = W.index_select(2, st.keep), dW.index_select(3, st.keep)
        out = linear_rop(
            a.expand(R, *a.shape) if a.dim() == 2 else a, None if ra is None else ra.transpose(1, 2), W, dW,
            None if layer.bias is None else params[layer.bias], None if layer.bias is None else vecs[pos[layer.bias]],
            None if act is None else act.act, 0.0 if act is None else act.slope)
        rz = out.rz.transpose(1, 2).contiguous()  # [R, K, N, O] -> [R, N, K, O]
        if act is None:
            return rz, None
        return rz, (rz, out.rh.transpose(1, 2).contiguous())
