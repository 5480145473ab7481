"""The sample-major engine: conv nets, pooling, BatchNorm, residual DAGs.

Layout: a feature tensor of R replicas is [N, R, *feat] (feature maps [N, R, C, H, W], so that
[N, R*C, H, W] is a contiguous view and every replica's conv is one group of a grouped
convolution); a tangent is [N, K, R, *feat] (the K probes fold into the batch axis of the
products that share the weights). Replicas' inputs before the first layer with parameters are
shared: [N, *feat] without the replica axis. Everything has the samples first, so the work is
chunked over samples (contiguous views) to bound the tangents' memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ops import PIECEWISE_LINEAR, act_derivs, act_rop_bwd, activation_value, bn_eval_rop_bwd, bn_eval_rop_fwd, bn_rop_bwd
from ... import _ext
from ...ops.head_hvp import HEAD_MAX_OUTPUTS
from ...ops.group_conv import group_conv
from ...ops.sampled_conv import conv_patches, sampled_conv, sampled_conv_wgrad
from .conv import conv2d, conv2d_input, conv2d_weight
from .loss_head import _head_products, _loss_head, loss_rop
from .map_conv import STEM_MAX_TAPS, _conv_io, _MapConv
from .map_state import _MapState, _rb, _Sums
from .map_trace import _MapExactTrace

# (STEM_MAX_TAPS and _MapState live in .map_conv and .map_state; tests and docs name them here)
__all__ = ["STEM_MAX_TAPS", "_MapEngine", "_MapState"]


class _MapEngine(_MapConv, _MapExactTrace):
    """Forward, backward and R-passes of the sample-major engine over a DAG of layers.

    ``layers``: the nodes in topological order, a parsed chain or a traced graph
    (:class:`fastcurv.backends.fused.graph.Graph`, whose ``inputs[i]`` lists the nodes that node
    ``i`` reads; -1 is the model input; a chain's node reads its predecessor). The last node is the
    model output. ``kind == "add"`` nodes sum their inputs (residual additions). Nodes without
    parameters whose inputs are all computed from the model input alone are "shared": evaluated
    once without a replica axis, with zero tangents. Forward passes run in topological order;
    backward passes in reverse order, each node adding its input gradients into its inputs' (a
    value used twice receives the sum).
    """

    def __init__(self, layers, loss, fused_head: bool = True, pooled_stem: bool | None = None,
                 group_conv: bool | None = None):
        self.layers, self.loss, self.pooled_stem, self.group_conv = layers, loss, pooled_stem, group_conv
        n = len(layers)
        self.inputs = [list(v) for v in getattr(layers, "inputs", [[i - 1] for i in range(n)])]
        self.shared: list[bool] = []
        for i, l in enumerate(layers):
            self.shared.append(l.kind not in ("linear", "conv", "bn") and all(j < 0 or self.shared[j] for j in self.inputs[i]))
        # the output node a Linear whose input has a tangent: with few outputs, it and the loss may run in
        # the head_hvp kernel (decided per call: outputs, device, kernels)
        self.head = fused_head and layers[n - 1].kind == "linear" and not self._reads_shared(self.inputs[n - 1][0])
        users: list[list[int]] = [[] for _ in range(n)]
        for i, ins in enumerate(self.inputs):
            for j in ins:
                if j >= 0:
                    users[j].append(i)
        self.last_use = [max(u, default=n) for u in users]  # values are freed after their last reader
        # BatchNorm with batch statistics couples the samples of a batch (no chunking over samples)
        self.coupled = any(l.batch_stats for l in layers)

        # In-place updates of tangents (activations) only where no other node holds the tensor:
        # forward, the input has this node as its only reader and is not an alias (an addition
        # may return one of its inputs, Flatten returns a view of its input); backward, likewise
        # for the node's reader (an addition hands the same gradient to all its inputs).
        def fwd_owned(j):
            return j >= 0 and len(users[j]) == 1 and layers[j].kind != "add" and (
                layers[j].kind != "flatten" or fwd_owned(self.inputs[j][0]))

        def bwd_owned(i):  # (called once self.stems is known)
            if not users[i]:
                return True
            u = users[i][0]
            # Flatten hands back a view of its output's gradient, a pooled stem's pooling that gradient itself
            passes = layers[u].kind == "flatten" or u in self.stems
            return len(users[i]) == 1 and layers[u].kind != "add" and (not passes or bwd_owned(u))

        # An eval BatchNorm whose output only a first-order activation (ReLU, LeakyReLU) reads: the
        # BatchNorm R-op kernels apply the activation's derivative too, and the activation node
        # passes tangents through.
        self.bn_act = {i: users[i][0] for i, l in enumerate(layers)
                       if l.kind == "bn" and not l.batch_stats and len(users[i]) == 1
                       and layers[users[i][0]].kind == "act" and layers[users[i][0]].act in PIECEWISE_LINEAR}
        self.act_fused = set(self.bn_act.values())
        # A conv or linear bias whose output only an eval BatchNorm reads: the BatchNorm kernels take
        # its tangent (scale * db joins the BatchNorm's shift) and give its product (the sum of the
        # BatchNorm input's R-gradient), a pass over the tangent saved each way.
        self.bn_bias = {users[i][0]: i for i, l in enumerate(layers)
                        if l.kind in ("conv", "linear") and l.bias is not None and len(users[i]) == 1
                        and layers[users[i][0]].kind == "bn" and not layers[users[i][0]].batch_stats}
        self.bias_folded = set(self.bn_bias.values())
        # Stems: a convolution of the model input (one group) whose output reaches a strided max
        # pooling only through eval BatchNorm and activations, each read by the next alone. Only each
        # window's winning position reaches the pooling's output, or gets a gradient from it, and the
        # element-wise layers commute with picking positions: the stem's backward passes, its
        # R-forward and its weight products can run at the pooled resolution, one entry per window
        # (fastcurv.ops.sampled_conv). Where windows overlap and share a winner, its entries are
        # summed where the full-resolution passes would sum first: every pass is linear in the
        # gradients and tangents it carries. pool node -> [conv node, the nodes after it].
        self.stems = {}
        for m, l in enumerate(layers):
            if l.kind != "maxpool" or l.opts["stride"] == (1, 1):  # (a stride-1 pooling keeps as many positions)
                continue
            chain, j = [], self.inputs[m][0]
            while j >= 0 and len(users[j]) == 1 and (layers[j].kind == "act" or layers[j].kind == "bn" and not layers[j].batch_stats):
                chain.append(j)
                j = self.inputs[j][0]
            if j >= 0 and layers[j].kind == "conv" and len(users[j]) == 1 and self._reads_shared(self.inputs[j][0]) \
                    and layers[j].opts["groups"] == 1:
                self.stems[m] = [j] + chain[::-1]
        self.stem_conv = {nodes[0]: m for m, nodes in self.stems.items()}  # conv node -> pool node
        self.stem_of = {j: m for m, nodes in self.stems.items() for j in nodes[1:]}  # element-wise node -> pool node
        self.fwd_owned = [fwd_owned(j) for j in range(n)]
        self.sole_reader = [len(u) == 1 for u in users]
        self.bwd_inplace = [(l.kind == "act" and bwd_owned(i)) or (l.kind == "bn" and bwd_owned(self.bn_act.get(i, i)))
                            for i, l in enumerate(layers)]

    def _reads_shared(self, j) -> bool:
        return j < 0 or self.shared[j]

    def _owned(self, j, fresh: set) -> bool:
        """Forward, whether node ``j``'s output tangent is held by its one reader alone, which may then
        update it in place: known from the graph, or at run time for an addition whose output is a
        sum it made (in ``fresh``)."""
        return j >= 0 and (self.fwd_owned[j] or j in fresh and self.sole_reader[j])

    def _acc(self, acc: "_Sums", j: int, t):
        """Add the gradient ``t`` of node ``j``'s output into ``acc``: the first sum out of place
        (``t`` and the first term may be held elsewhere), later terms into it; shared nodes take none."""
        if j < 0 or self.shared[j] or t is None:
            return
        if j not in acc:
            acc[j] = t
        elif j in acc.fresh:
            acc[j].add_(t)
        else:
            acc[j] = acc[j] + t
            acc.fresh.add(j)

    def _backward(self, grads: dict):
        """Walk the graph from the output back: yield ``(node, layer, gradient of its output)`` for
        every node that is not shared and has a gradient in ``grads`` (popped), while the loop body
        adds the gradients of the node's inputs into ``grads``; additions pass theirs to every input."""
        for i in range(len(self.layers) - 1, -1, -1):
            if self.shared[i] or i not in grads:
                continue
            l, g = self.layers[i], grads.pop(i)
            if l.kind == "add":
                for j in self.inputs[i]:
                    self._acc(grads, j, g)
                continue
            yield i, l, g

    def _free(self, vals: dict, i: int):
        for j in set(self.inputs[i]):
            if j >= 0 and self.last_use[j] == i:
                vals.pop(j, None)

    @staticmethod
    def _add_values(l, terms, shared):
        """The output of a residual addition: ``terms`` with the replica axis at 1, except where
        ``shared`` (no replica axis)."""
        full = [t for t, s in zip(terms, shared) if not s]
        ref = full[0].shape
        for t, s in zip(terms, shared):
            if (t.shape != ref[:1] + ref[2:]) if s else (t.shape != ref):
                raise ValueError(f"the residual addition {l.name!r} adds tensors of shapes "
                                 f"{[tuple(u.shape) for u in terms]} (replica axis at 1 except for inputs shared by all "
                                 f"replicas); the fused engine needs equal shapes (no broadcasting)")
        out = None
        for t, s in zip(terms, shared):
            t = t.unsqueeze(1) if s else t
            out = t if out is None else out + t
        return out

    def _bn_coefs(self, l, params, buffers):
        inv = torch.rsqrt(buffers[l.opts["var"]] + l.opts["eps"])  # [R, C]
        mean = buffers[l.opts["mean"]]
        s = inv if l.weight is None else params[l.weight] * inv
        t = -mean * s if l.bias is None else params[l.bias] - mean * s
        return s, t, inv, mean

    def _bn_eval_rfwd(self, l, i, st, vecs, ra, s, owned):
        """R-forward of eval BatchNorm node ``i`` (and of the activation fused with it; ``ra``:
        the input tangent, without the folded bias of the layer before, if any): returns the output
        tangent ``[N, K, R, C, *sp]`` and, for an affine BatchNorm whose input has a tangent,
        ``dot`` ``[R, K, C]``: the sum over samples and positions of the full input tangent times
        ``delta`` (what the weight's product needs from it, so that it is not kept); computed by
        :func:`fastcurv.ops.bn_eval_rop_fwd` (C++/CUDA/Triton kernel); in place in ``ra`` when
        ``owned`` (no other node holds it)."""
        j = self.bn_act.get(i)
        d1 = None if j is None else st.get(j, "d1")  # [N, R, C, *sp]
        xh = st.get(i, "xhat") if l.weight is not None else None
        if ra is None:  # a BatchNorm of the model input: only the parameter tangents
            nsp = xh.dim() - 3
            term = xh.unsqueeze(1) * _rb(vecs[l.weight], nsp, True) + _rb(vecs[l.bias], nsp, True)
            return (term if d1 is None else term.mul_(d1.unsqueeze(1))), None
        N, K, R, C = ra.shape[:4]
        G, S = R * C, ra[0, 0, 0, 0].numel()
        delta = st.get(i, "delta") if l.weight is not None else None
        rz = ra.reshape(N, K, G, S)
        fresh = rz.untyped_storage().data_ptr() != ra.untyped_storage().data_ptr()  # reshape copied

        def flat(t):
            return None if t is None else t.reshape(N, G, S)

        def kg(p):  # [R, K, C] tangent -> [K, R*C]
            return None if p is None else vecs[p].transpose(0, 1).reshape(K, G)

        rbeta, db = kg(l.bias), kg(self.layers[self.bn_bias[i]].bias) if i in self.bn_bias else None
        if db is not None:
            rbeta = db * s.reshape(G) if rbeta is None else rbeta + db * s.reshape(G)
        out, dot = bn_eval_rop_fwd(rz, s.reshape(G), flat(xh), kg(l.weight), rbeta, flat(d1), flat(delta),
                                   inplace=rz.is_contiguous() and (owned or fresh))
        if delta is None:
            return out.view(ra.shape), None
        if db is not None:
            dot += db * st.get(i, "dsum").reshape(N, G).sum(0)
        return out.view(ra.shape), dot.view(K, R, C).transpose(0, 1)

    def _bn_eval_rbwd(self, l, i, st, vecs, out, rd, s, inv, dot, owned):
        """R-backward of eval BatchNorm node ``i`` (``rd``: the R-gradient w.r.t. the output of the
        activation fused with it, or of the BatchNorm): adds the weight and bias products to ``out``
        and returns the R-gradient w.r.t. the BatchNorm input (None when that input is shared);
        computed by :func:`fastcurv.ops.bn_eval_rop_bwd` (C++/CUDA/Triton kernel), in place in
        ``rd`` when ``owned`` (no other node holds it)."""
        j = self.bn_act.get(i)
        d1 = None if j is None else st.get(j, "d1")
        N, K, R, C = rd.shape[:4]
        G, S = R * C, rd[0, 0, 0, 0].numel()
        input_grad = not self._reads_shared(self.inputs[i][0])
        xh = delta = crg = None
        if l.weight is not None:
            xh = st.get(i, "xhat").reshape(N, G, S)
            if input_grad:
                delta = st.get(i, "delta").reshape(N, G, S)
                crg = (vecs[l.weight] * inv.unsqueeze(1)).transpose(0, 1).reshape(K, G)
        r = rd.reshape(N, K, G, S)
        if input_grad and not (r.is_contiguous() and owned):
            r = r.clone(memory_format=torch.contiguous_format)
        r, sum_u, sum_uxh = bn_eval_rop_bwd(r, s.reshape(G), xh, delta, crg, None if d1 is None else d1.reshape(N, G, S),
                                            input_grad=input_grad)
        if l.weight is not None:
            hw = sum_uxh.view(K, R, C).transpose(0, 1)
            out[l.weight] += hw if dot is None else hw + dot * inv.unsqueeze(1)
            out[l.bias] += sum_u.view(K, R, C).transpose(0, 1)
        if i in self.bn_bias:  # the folded bias: the sum of the input's R-gradient scale * u + crg * delta
            hb = sum_u * s.reshape(G)
            if crg is not None:
                hb += crg * st.get(i, "dsum").reshape(N, G).sum(0)
            out[self.layers[self.bn_bias[i]].bias] += hb.view(K, R, C).transpose(0, 1)
        return r.view(rd.shape) if input_grad else None

    @staticmethod
    def _bn_batch_check(l, a, R, shared):
        """The input of a batch-statistics BatchNorm with the replica axis (a shared input is expanded)."""
        want = (4 if l.opts["dims"] == 2 else 2) + (0 if shared else 1)  # BatchNorm1d: [N, C]; 2d: [N, C, H, W]
        if a.dim() != want:
            raise ValueError(f"BatchNorm {l.name!r} got inputs {tuple(a.shape)} (replica axis included: {not shared})")
        return a.unsqueeze(1).expand(a.shape[0], R, *a.shape[1:]) if shared else a

    def _bn_batch_rbwd(self, l, i, st, params, vecs, out, rin, rd):
        """R-backward of a batch-statistics BatchNorm node: adds the weight and bias products to
        ``out`` and returns the R-gradient w.r.t. the node's input ``[N, K, R, C, *sp]`` (None when
        that input is shared).

        Per replica and channel, with means over samples (and positions): forward
        ``y = gamma * xhat + beta``, ``xhat = (x - mean) * inv``; backward
        ``gx = inv * P(gamma * g)`` with ``P(v) = v - mean(v) - xhat * mean(v * xhat)``. Its R-op
        adds the tangents of ``inv`` (``-inv^2 * mean(xhat * dx)``), ``xhat`` (``rxh``), ``gamma``
        and ``g`` (``rd``); computed by :func:`fastcurv.ops.bn_rop_bwd` (C++/CUDA/Triton kernel)."""
        xh, inv, delta = st.get(i, "xhat").unsqueeze(1), st.get(i, "inv").unsqueeze(1), st.get(i, "delta").unsqueeze(1)
        dims = (0, *range(4, xh.dim()))
        rxh, m2 = rin if rin is not None else (None, None)
        if l.weight is not None:
            hg = (rd * xh).sum(dims)
            if rxh is not None:
                hg += (delta * rxh).sum(dims)
            out[l.weight] += hg.transpose(0, 1)
            out[l.bias] += rd.sum(dims).transpose(0, 1)
        if self._reads_shared(self.inputs[i][0]):
            return None
        # the fused kernel (fastcurv.ops.bn_rop_bwd) on the flat layout: groups G = R*C, positions S
        N, K = rd.shape[:2]
        G = xh.shape[2] * xh.shape[3]
        S = torch.Size(xh.shape[4:]).numel()  # 1 for BatchNorm1d
        gamma = rgamma = None
        if l.weight is not None:
            gamma = params[l.weight].reshape(G)
            rgamma = vecs[l.weight].transpose(0, 1).reshape(K, G)  # [R, K, C] -> [K, R*C]
        if rxh is not None:
            rxh, m2 = rxh.reshape(N, K, G, S), m2.reshape(K, G)
        rg = bn_rop_bwd(xh.reshape(N, G, S), delta.reshape(N, G, S), rd.reshape(N, K, G, S), inv.reshape(G), gamma, rgamma, rxh, m2)
        return rg.view(rd.shape)

    def _shared_apply(self, a, l):
        if l.kind == "flatten":
            return a.reshape(a.shape[0], -1)
        if l.kind == "act":
            return activation_value(a, l.act, l.slope)
        if a.dim() != 4:
            raise ValueError(f"module {l.name!r} ({l.kind}) needs inputs [N, C, H, W]; got {tuple(a.shape)}")
        return self._pool(a, l)

    # --- probe-independent pass -----------------------------------------------------------------
    def primal(self, x, y, params, buffers, keep_all=False) -> _MapState:
        """Forward and backward pass; keeps what the R-passes need (``keep_all``: every layer's
        input and output gradient, for the parameter gradient). A pooled stem's backward runs at the
        winning positions, and its per-position values are kept there only."""
        st = _MapState()
        R = next(iter(params.values())).shape[0]
        N = x.shape[0]
        pooled = self._pooled_stems(x, params)
        vals = {-1: x}  # node outputs still to be read
        pre = {}  # activation node -> its input; a pooled stem's BatchNorm -> its input (its xhat at the winners)
        bn = {}
        for i, l in enumerate(self.layers):
            ins = self.inputs[i]
            if l.kind == "add":
                terms = [vals[j] for j in ins]
                if self.shared[i]:
                    vals[i] = self._add_values(l, [t.unsqueeze(1) for t in terms], [False] * len(terms)).squeeze(1)
                else:
                    vals[i] = self._add_values(l, terms, [self._reads_shared(j) for j in ins])
                    st.widest = max(st.widest, vals[i][0, 0].numel())
                self._free(vals, i)
                continue
            a, shared = vals[ins[0]], self._reads_shared(ins[0])
            if self.shared[i]:
                vals[i] = self._shared_apply(a, l)
                self._free(vals, i)
                continue
            if l.kind == "conv":
                if (a.dim() != 4 if shared else a.dim() != 5):
                    raise ValueError(f"Conv2d {l.name!r} needs inputs [N, C, H, W]; got {tuple(a.shape)} (replica axis included: {not shared})")
                W = params[l.weight]
                stride, pad, dil, g = _conv_io(l)
                b = params[l.bias].reshape(-1) if l.bias is not None else None
                if shared and g == 1:
                    z = conv2d(a, W.reshape(-1, *W.shape[2:]), b, stride, pad, dil, 1)
                else:
                    z = conv2d(self._full(a, R, shared), W.reshape(-1, *W.shape[2:]), b, stride, pad, dil, R * g)
                st.put(i, "in", a, shared)
                a = z.view(N, R, W.shape[1], *z.shape[2:])
            elif l.kind == "linear":
                if a.dim() != (2 if shared else 3):
                    raise ValueError(f"Linear {l.name!r} needs inputs [N, features]; got {tuple(a.shape)} (replica axis included: {not shared})")
                W = params[l.weight]
                z = torch.einsum("ni,roi->nro" if shared else "nri,roi->nro", a, W)
                if l.bias is not None:
                    z = z + params[l.bias]
                st.put(i, "in", a, shared)
                a = z
            elif l.batch_stats:
                a = self._bn_batch_check(l, a, R, shared)
                dims = (0, *range(3, a.dim()))
                var, mean = torch.var_mean(a, dims, correction=0, keepdim=True)
                inv = torch.rsqrt(var + l.opts["eps"])  # [1, R, C, 1...]
                xhat = (a - mean) * inv
                st.put(i, "xhat", xhat)
                st.put(i, "inv", inv)
                a = xhat if l.weight is None else xhat * _rb(params[l.weight], a.dim() - 3, False) + _rb(params[l.bias], a.dim() - 3, False)
            elif l.kind == "bn":
                s, t, inv, mean = bn[i] = self._bn_coefs(l, params, buffers)
                if shared:
                    a = a.unsqueeze(1)
                nsp = a.dim() - 3
                if a.shape[2] != s.shape[1]:
                    raise ValueError(f"BatchNorm {l.name!r} has {s.shape[1]} channels, its input {tuple(a.shape)} (replica axis at 1)")
                if self.stem_of.get(i) in pooled:
                    pre[i] = a
                elif l.weight is not None:
                    st.put(i, "xhat", (a - _rb(mean, nsp, False)) * _rb(inv, nsp, False))
                a = a * _rb(s, nsp, False) + _rb(t, nsp, False)
            elif l.kind == "act":
                pre[i] = a
                a = activation_value(a, l.act, l.slope)
            elif l.kind == "flatten":
                st.meta[i] = a.shape[2:]
                a = a.reshape(N, R, -1)
            elif l.kind == "maxpool":
                st.meta[i] = a.shape[3:]
                o = l.opts
                z, ind = F.max_pool2d(a.reshape(N, -1, *a.shape[3:]), o["kernel_size"], o["stride"], o["padding"],
                                      o["dilation"], o["ceil_mode"], return_indices=True)
                st.put(i, "ind", ind.view(N, R, a.shape[2], -1))
                st.meta[(i, "out")] = z.shape[2:]
                a = z.view(N, R, a.shape[2], *z.shape[2:])
            else:
                st.meta[i] = a.shape[3:]
                z = self._pool(a.reshape(N, -1, *a.shape[3:]), l)
                a = z.view(N, R, a.shape[2], *z.shape[2:])
            st.widest = max(st.widest, a[0, 0].numel())
            vals[i] = a
            self._free(vals, i)
        out = vals[len(self.layers) - 1]  # [N, R, C]
        if out.dim() != 3:
            raise ValueError(f"the model's outputs are {tuple(out.shape)} (replica axis at 1); the fused engine needs [N, classes]")
        st.outputs = out.shape[-1]
        st.loss, st.probs, g, st.mass = _loss_head(self.loss, out, y, sample_dim=0)
        if st.probs is not None:
            st.nbytes += st.probs.numel() * st.probs.element_size()
        grads = _Sums({len(self.layers) - 1: g})  # node -> gradient of the loss w.r.t. its output
        for i, l, g in self._backward(grads):
            if l.kind in ("conv", "linear"):
                a_in, first = st.get(i, "in"), (i, "in") in st.shared
                if keep_all or not first:
                    st.put(i, "delta", g, gradient_only=first)
                if first:
                    continue
                W = params[l.weight]
                if l.kind == "linear":
                    g = torch.einsum("nro,roi->nri", g, W)
                else:
                    stride, pad, dil, gr = _conv_io(l)
                    gi = conv2d_input((N, a_in.shape[1] * a_in.shape[2], *a_in.shape[3:]), W.reshape(-1, *W.shape[2:]),
                                      g.reshape(N, -1, *g.shape[3:]), stride, pad, dil, R * gr)
                    g = gi.view(a_in.shape)
            elif l.batch_stats:
                st.put(i, "delta", g)
                if self._reads_shared(self.inputs[i][0]):
                    continue
                xhat, inv = st.get(i, "xhat"), st.get(i, "inv")
                gx = g if l.weight is None else g * _rb(params[l.weight], g.dim() - 3, False)
                dims = (0, *range(3, g.dim()))
                g = (gx - gx.mean(dims, keepdim=True) - xhat * (gx * xhat).mean(dims, keepdim=True)) * inv
            elif l.kind == "bn":
                if self.stem_of.get(i) in pooled and l.weight is not None:
                    _, _, inv, mean = bn[i]
                    z = self._winners(pre.pop(i), st, self.stem_of[i])
                    st.put(i, "xhat", (z - _rb(mean, z.dim() - 3, False)) * _rb(inv, z.dim() - 3, False))
                if l.weight is not None or keep_all:
                    st.put(i, "delta", g, gradient_only=l.weight is None)
                if l.weight is not None and i in self.bn_bias:  # per sample: the folded bias's R-passes read its sums
                    st.put(i, "dsum", g.reshape(*g.shape[:3], -1).sum(3))
                if self._reads_shared(self.inputs[i][0]):
                    continue
                s = bn[i][0]
                g = g * _rb(s, g.dim() - 3, False)
            elif l.kind == "act":
                z = self._winners(pre[i], st, self.stem_of[i]) if self.stem_of.get(i) in pooled else pre[i]
                d1, d2g = act_derivs(z, g, l.act, l.slope)
                st.put(i, "d1", d1)
                if l.act not in PIECEWISE_LINEAR:
                    st.put(i, "d2g", d2g)
                g = d1 * g
            elif l.kind == "flatten":
                g = g.reshape(N, R, *st.meta[i])
            elif i in pooled:
                pass  # the stem's gradient stays at the winning positions
            elif l.kind == "maxpool":
                ind = st.get(i, "ind")
                gi = g.new_zeros(N, R, g.shape[2], st.meta[i].numel())
                g = gi.scatter_add_(3, ind, g.reshape(N, R, g.shape[2], -1)).view(N, R, g.shape[2], *st.meta[i])
            else:
                C = g.shape[2]
                g = self._pool_bwd(g.reshape(N, R * C, *g.shape[3:]), l, st.meta[i]).view(N, R, C, *st.meta[i])
            self._acc(grads, self.inputs[i][0], g)
        st.stems = pooled
        return st

    @staticmethod
    def for_matvecs(st: _MapState) -> _MapState:
        """``st``, a ``keep_all`` state, without what only :meth:`gradient` reads (the output
        gradients of the layers that read the shared input, and of BatchNorms without affine
        parameters), as :meth:`primal` keeps it for the matvecs; in place, and returned."""
        for key in st.gradient_only:
            t = st.t.pop(key)
            st.nbytes -= t.numel() * t.element_size()
        st.gradient_only = set()
        return st

    def gradient(self, st: _MapState, params, grads: dict):
        """Add the parameter gradients of a ``keep_all`` state to ``grads`` (name -> [R, *shape])."""
        for i, l in enumerate(self.layers):
            if self.shared[i]:
                continue
            if l.kind == "conv":
                a, first, delta = st.get(i, "in"), (i, "in") in st.shared, st.get(i, "delta")
                W = params[l.weight]
                R, N = W.shape[0], delta.shape[0]
                stride, pad, dil, g = _conv_io(l)
                m = self.stem_conv.get(i)
                if m in st.stems:  # delta at the winning positions
                    pos = st.get(m, "ind").reshape(N, R * W.shape[1], -1)
                    gw = sampled_conv_wgrad(conv_patches(a, W.shape[3:], stride, pad, dil), pos, delta.reshape(N, 1, *pos.shape[1:]))
                else:
                    inp = a if first and g == 1 else self._full(a, R, first)
                    gw = conv2d_weight(inp, (R * W.shape[1], *W.shape[2:]), delta.reshape(N, -1, *delta.shape[3:]),
                                       stride, pad, dil, 1 if first and g == 1 else R * g)
                grads[l.weight] += gw.view(W.shape)
                if l.bias is not None:
                    grads[l.bias] += delta.sum((0, 3, 4))
            elif l.kind == "linear":
                a, first, delta = st.get(i, "in"), (i, "in") in st.shared, st.get(i, "delta")
                grads[l.weight] += torch.einsum("nro,ni->roi" if first else "nro,nri->roi", delta, a)
                if l.bias is not None:
                    grads[l.bias] += delta.sum(0)
            elif l.kind == "bn" and l.weight is not None:
                delta = st.get(i, "delta")
                dims = (0, *range(3, delta.dim()))
                grads[l.weight] += (delta * st.get(i, "xhat")).sum(dims)
                grads[l.bias] += delta.sum(dims)

    @staticmethod
    def _head_runs(W) -> bool:
        """Whether the output Linear (weight ``W [R, O, I]``) runs in the head kernel: few outputs, on
        the CPU, at least 32 inputs (W4's 16-input head ran 1.3-1.7% slower with it than with the
        einsums; W3's 784-input one 5.6-8% faster)."""
        return (W.shape[1] <= HEAD_MAX_OUTPUTS and W.shape[2] >= 32
                and _ext.choose("head_hvp", W.device, W.dtype) == "ext")

    def _head(self, st, params, vecs, out, ra):
        """The output Linear layer's products and the loss R-op by :func:`~fastcurv.ops.head_hvp.head_hvp`
        (its [R, ...] operands as views of this engine's sample-major tensors), given the tangent
        ``ra [N, K, R, I]`` of its input; returns the R-gradient w.r.t. that input, ``[N, K, R, I]``."""
        i = len(self.layers) - 1
        l = self.layers[i]
        probs = None if st.probs is None else st.probs.transpose(0, 1)
        rg = _head_products(self.loss, st.get(i, "in").transpose(0, 1), ra.permute(2, 0, 1, 3), params[l.weight],
                            vecs[l.weight], st.get(i, "delta").transpose(0, 1), probs,
                            None if l.bias is None else vecs[l.bias], None, out[l.weight],
                            None if l.bias is None else out[l.bias], accumulate=True)
        return rg.permute(1, 2, 0, 3)

    # --- the R-passes -------------------------------------------------------------------------
    def apply(self, st: _MapState, params, buffers, vecs: dict, out: dict):
        """Add one chunk's Hessian-vector products to ``out`` (name -> [R, K, *shape]);
        ``vecs``: name -> [R, K, *shape] tangents."""
        K = next(iter(vecs.values())).shape[1]
        rv = {}  # node -> output tangent [N, K, R, *feat] still to be read, or None (identically zero)
        rin, rpre, bn, bn_dot = {}, {}, {}, {}
        stem_in = {}  # a pooled stem's conv node -> (patches of its input, winning positions)
        fresh = set()  # additions whose output tangent no other node holds
        last = len(self.layers) - 1
        # (the head kernel has no per-sample loss Hessian scale)
        head = self.head and self._head_runs(params[self.layers[last].weight]) and st.mass is None
        for i, l in enumerate(self.layers):
            if self.shared[i]:
                continue
            ins = self.inputs[i]
            if l.kind == "add":
                ra, own = None, False  # own: no other node holds ra
                for j in ins:
                    t = None if self._reads_shared(j) else rv[j]
                    if t is None:
                        continue
                    if ra is None:
                        ra, own = t, self._owned(j, fresh)
                    elif own:
                        ra.add_(t)
                    elif self._owned(j, fresh):
                        ra, own = t.add_(ra), True
                    else:
                        ra, own = ra + t, True
                if own:
                    fresh.add(i)
                rv[i] = ra
                self._free(rv, i)
                continue
            ra = None if self._reads_shared(ins[0]) else rv[ins[0]]
            if l.kind == "conv":
                a, first = st.get(i, "in"), (i, "in") in st.shared
                W, dW = params[l.weight], vecs[l.weight]
                R, Co, Cig = W.shape[:3]
                N = a.shape[0]
                stride, pad, dil, g = _conv_io(l)
                rin[i] = ra
                m = self.stem_conv.get(i)
                if m in st.stems:  # the tangent at the pooling's winning positions: [N, K, R*Co, H'W']
                    stem_in[i] = conv_patches(a, W.shape[3:], stride, pad, dil), st.get(m, "ind").reshape(N, R * Co, -1)
                    rz = sampled_conv(*stem_in[i], dW.reshape(R, K, Co, -1).transpose(1, 2).reshape(R * Co, K, -1))
                    rz = rz.view(N, K, R, Co, *st.meta[(m, "out")])
                elif self._grouped(l, W, a):  # both products written into rz by the kernels, no copies
                    H, Wd = a.shape[-2:]
                    rz = a.new_empty(N, K, R, Co, H + 2 * pad[0] - W.shape[3] + 1, Wd + 2 * pad[1] - W.shape[4] + 1)
                    xa = a.unsqueeze(1).expand(N, R, *a.shape[1:]) if first else a
                    group_conv(xa.unsqueeze(2), dW.reshape(R, K * Co, *W.shape[2:]), rz.permute(0, 2, 1, 3, 4, 5), pad)
                    if ra is not None:
                        group_conv(ra.reshape(N * K, R, 1, Cig, H, Wd), W, rz.view(N * K, R, 1, Co, *rz.shape[4:]), pad,
                                   accumulate=True)
                else:
                    if first and g == 1:  # one plain conv: output channels in (K, R, Co) order, the tangent's layout
                        zb = conv2d(a, dW.transpose(0, 1).reshape(-1, *W.shape[2:]), None, stride, pad, dil, 1)
                        zb = zb.view(N, K, R, g, Co // g, *zb.shape[2:])
                    else:
                        dWs = dW.view(R, K, g, Co // g, *W.shape[2:]).transpose(1, 2).reshape(-1, *W.shape[2:])
                        zb = conv2d(self._full(a, R, first), dWs, None, stride, pad, dil, R * g)
                        zb = zb.view(N, R, g, K, Co // g, *zb.shape[2:]).permute(0, 3, 1, 2, 4, 5, 6)
                    if ra is not None:
                        za = conv2d(ra.reshape(N * K, -1, *ra.shape[4:]), W.reshape(-1, *W.shape[2:]), None, stride, pad, dil, R * g)
                        rz = za.view(N, K, R, g, Co // g, *za.shape[2:]).add_(zb)
                    else:
                        rz = zb.contiguous()
                    rz = rz.view(N, K, R, Co, *rz.shape[5:])
                if l.bias is not None and i not in self.bias_folded:
                    rz += _rb(vecs[l.bias], 2, True)
                ra = rz
            elif l.kind == "linear" and head and i == last and ra is not None:
                pass  # the head kernel (below) takes the tangent of its input
            elif l.kind == "linear":
                head = head and i != last  # (no input tangent at the output node: the plain path)
                a, first = st.get(i, "in"), (i, "in") in st.shared
                W, dW = params[l.weight], vecs[l.weight]
                rin[i] = ra
                rz = torch.einsum("ni,rkoi->nkro" if first else "nri,rkoi->nkro", a, dW)
                if ra is not None:
                    rz += torch.einsum("nkri,roi->nkro", ra, W)
                if l.bias is not None and i not in self.bias_folded:
                    rz += vecs[l.bias].transpose(0, 1)
                ra = rz
            elif l.batch_stats:
                xh, inv = st.get(i, "xhat").unsqueeze(1), st.get(i, "inv").unsqueeze(1)
                nsp = xh.dim() - 4
                dims = (0, *range(4, xh.dim()))
                rz = None
                if ra is not None:
                    # tangent of the normalized input: inv * (dx - mean(dx) - xhat * mean(dx * xhat))
                    m2 = (ra * xh).mean(dims, keepdim=True)
                    rxh = (ra - ra.mean(dims, keepdim=True) - xh * m2).mul_(inv)
                    rin[i] = (rxh, m2)
                    # (a copy without affine parameters: later layers may update their input in place)
                    rz = rxh.clone() if l.weight is None else rxh * _rb(params[l.weight], nsp, False).unsqueeze(1)
                if l.weight is not None:
                    term = xh * _rb(vecs[l.weight], nsp, True) + _rb(vecs[l.bias], nsp, True)
                    rz = term if rz is None else rz.add_(term)
                ra = rz
            elif l.kind == "bn":
                bn[i] = self._bn_coefs(l, params, buffers)
                if ra is None and l.weight is None:
                    pass
                else:
                    ra, bn_dot[i] = self._bn_eval_rfwd(l, i, st, vecs, ra, bn[i][0], self._owned(ins[0], fresh))
            elif ra is None or i in self.act_fused:
                pass
            elif l.kind == "act":
                d1 = st.get(i, "d1").unsqueeze(1)
                if st.get(i, "d2g") is not None:
                    rpre[i] = ra
                    ra = d1 * ra
                else:
                    ra = ra.mul_(d1) if self._owned(ins[0], fresh) else ra * d1
            elif l.kind == "flatten":
                ra = ra.reshape(*ra.shape[:3], -1)
            elif i in st.stems:
                pass  # the stem's tangent is at the winning positions already
            elif l.kind == "maxpool":
                ind = st.get(i, "ind")  # [N, R, C, H'W']
                n, k, R, C = ra.shape[:4]
                ra = ra.reshape(n, k, R, C, -1).gather(4, ind.unsqueeze(1).expand(n, k, *ind.shape[1:]))
                ra = ra.view(n, k, R, C, *st.meta[(i, "out")])
            else:
                n, k, R, C = ra.shape[:4]
                z = self._pool(ra.reshape(n * k, R * C, *ra.shape[4:]), l)
                ra = z.view(n, k, R, C, *z.shape[2:])
            rv[i] = ra
            self._free(rv, i)
        ra = rv.pop(last)
        rds = _Sums()  # node -> R-gradient w.r.t. its output
        if head:  # ra: the tangent of the output node's input
            self._acc(rds, self.inputs[last][0], self._head(st, params, vecs, out, ra))
        else:
            rds[last] = loss_rop(self.loss, st.probs, st.mass, ra, sample_dim=0)
        for i, l, rd in self._backward(rds):
            if l.kind == "conv":
                a, first, delta, ra_in = st.get(i, "in"), (i, "in") in st.shared, st.get(i, "delta"), rin[i]
                W, dW = params[l.weight], vecs[l.weight]
                R, Co, Cig = W.shape[:3]
                N = rd.shape[0]
                stride, pad, dil, g = _conv_io(l)
                hw = rd.shape[4:]
                o = out[l.weight].view(R, K, g, Co // g, *W.shape[2:])
                # weight: conv-weight-gradient of (input a, output grads rd) with K in the output channels
                grouped = i not in stem_in and self._grouped(l, W, a)
                if grouped:
                    self._grouped_rbwd(l, W, a, first, delta, ra_in, rd, out)
                elif i in stem_in:  # rd at the winning positions
                    gw = sampled_conv_wgrad(*stem_in.pop(i), rd.reshape(N, K, R * Co, -1))
                    out[l.weight] += gw.view(R, Co, K, *W.shape[2:]).transpose(1, 2)
                elif first and g == 1:  # one plain conv: rd's (K, R, Co) channel order as it is
                    gw = conv2d_weight(a, (K * R * Co, *W.shape[2:]), rd.reshape(N, -1, *hw), stride, pad, dil, 1)
                    o += gw.view(K, R, g, Co // g, *W.shape[2:]).transpose(0, 1)
                else:
                    go = rd.view(N, K, R, g, Co // g, *hw).permute(0, 2, 3, 1, 4, 5, 6).reshape(N, -1, *hw)
                    gw = conv2d_weight(self._full(a, R, first), (R * g * K * (Co // g), *W.shape[2:]), go,
                                       stride, pad, dil, R * g)
                    o += gw.view(R, g, K, Co // g, *W.shape[2:]).transpose(1, 2)
                if l.bias is not None and i not in self.bias_folded:
                    out[l.bias] += rd.sum((0, 4, 5)).transpose(0, 1)
                if grouped:
                    if not first:
                        rd = self._grouped_rgrad(W, dW, delta, rd, a.shape[-2:], pad)
                        self._acc(rds, self.inputs[i][0], rd)
                    continue
                if ra_in is not None:
                    # (input tangent, delta) with K in the input channels
                    ri = ra_in.view(N, K, R, g, Cig, *ra_in.shape[4:]).permute(0, 2, 3, 1, 4, 5, 6).reshape(N, -1, *ra_in.shape[4:])
                    gw2 = conv2d_weight(ri, (R * Co, K * Cig, *W.shape[3:]), delta.reshape(N, -1, *hw),
                                        stride, pad, dil, R * g)
                    o += gw2.view(R, g, Co // g, K, Cig, *W.shape[3:]).permute(0, 3, 1, 2, 4, 5, 6)
                if first:
                    continue
                in_hw = a.shape[3:]
                rg = conv2d_input((N * K, R * g * Cig, *in_hw), W.reshape(-1, *W.shape[2:]),
                                  rd.reshape(N * K, -1, *hw), stride, pad, dil, R * g)
                wt = dW.view(R, K, g, Co // g, Cig, *W.shape[3:]).permute(0, 2, 3, 1, 4, 5, 6).reshape(R * Co, K * Cig, *W.shape[3:])
                rg2 = conv2d_input((N, R * g * K * Cig, *in_hw), wt, delta.reshape(N, -1, *hw), stride, pad, dil, R * g)
                rd = rg.view(N, K, R, g, Cig, *in_hw).add_(rg2.view(N, R, g, K, Cig, *in_hw).permute(0, 3, 1, 2, 4, 5, 6))
                rd = rd.view(N, K, R, g * Cig, *in_hw)
            elif l.kind == "linear":
                a, first, delta, ra_in = st.get(i, "in"), (i, "in") in st.shared, st.get(i, "delta"), rin[i]
                W, dW = params[l.weight], vecs[l.weight]
                out[l.weight] += torch.einsum("nkro,ni->rkoi" if first else "nkro,nri->rkoi", rd, a)
                if ra_in is not None:
                    out[l.weight] += torch.einsum("nro,nkri->rkoi", delta, ra_in)
                if l.bias is not None and i not in self.bias_folded:
                    out[l.bias] += rd.sum(0).transpose(0, 1)
                if first:
                    continue
                rd = torch.einsum("nkro,roi->nkri", rd, W) + torch.einsum("nro,rkoi->nkri", delta, dW)
            elif l.batch_stats:
                rd = self._bn_batch_rbwd(l, i, st, params, vecs, out, rin.get(i), rd)
                if rd is None:
                    continue
            elif l.kind == "bn":
                s, _, inv, _ = bn[i]
                owned = self.bwd_inplace[i] or self.bn_act.get(i, i) in rds.fresh
                rd = self._bn_eval_rbwd(l, i, st, vecs, out, rd, s, inv, bn_dot.get(i), owned)
                if rd is None:
                    continue
            elif i in self.act_fused:
                pass
            elif l.kind == "act":
                d1 = st.get(i, "d1")
                d2g = st.get(i, "d2g")
                n, k = rd.shape[:2]
                if d2g is None:
                    rd = rd.mul_(d1.unsqueeze(1)) if self.bwd_inplace[i] or i in rds.fresh else rd * d1.unsqueeze(1)
                else:
                    rd = act_rop_bwd(d1.reshape(n, -1), d2g.reshape(n, -1), rpre[i].reshape(n, k, -1),
                                     rd.reshape(n, k, -1)).view(rd.shape)
            else:
                rd = self._reshape_bwd(i, l, st, rd)
            self._acc(rds, self.inputs[i][0], rd)
