"""The sample-major engine's exact Hessian trace (:class:`_MapExactTrace`): conv nets and residual
graphs of layers linear in each parameter and piecewise linear in their input."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ops import PIECEWISE_LINEAR
from ...ops.group_conv import conv_input_grad, group_conv_wgrad
from ...ops.sampled_conv import conv_patches, sampled_conv_wgrad
from .conv import conv2d_input
from .loss_head import hessian_sqrt_columns
from .map_conv import _conv_io
from .map_state import _MapState, _rb, _Sums


class _MapExactTrace:
    """:meth:`exact_trace` of :class:`~.maps._MapEngine`, a mixin: walks its graph (``layers``,
    ``inputs``, ``shared``, ``stem_conv``, ``_backward``, ``_acc``) for its ``loss``, with its
    convolution helpers (``_grouped``, ``_reshape_bwd``) and eval BatchNorm coefficients
    (``_bn_coefs``)."""

    def exact_trace_support(self) -> tuple[bool, str]:
        """Whether :meth:`exact_trace` applies (every node after the shared input linear in each of
        its parameters and piecewise linear in its input), and why not."""
        for i, l in enumerate(self.layers):
            if self.shared[i]:
                continue
            if l.kind == "act" and l.act not in PIECEWISE_LINEAR:
                return False, (f"the model has activations that are not piecewise linear ({l.name!r}; only ReLU and "
                               f"LeakyReLU are)")
            if l.batch_stats:
                return False, f"BatchNorm {l.name!r} uses batch statistics, with which the model is curved in its parameters"
        return True, ""

    def exact_trace(self, st: _MapState, params, buffers) -> torch.Tensor:
        """``sum_n sum_c |J_n^T a_nc|^2`` ``[R]`` (float64) over the samples of ``st``: the exact
        Hessian trace's share of these samples where :meth:`exact_trace_support` holds.

        Convolutions, eval BatchNorm, Linear layers, residual additions, ReLU/LeakyReLU and the
        poolings make the model linear in any single parameter (a weight shared over positions
        included; the others and the activation and pooling patterns fixed), so the Hessian's
        diagonal is the Gauss-Newton diagonal. One backward pass carries the C vectors ``a_nc``
        (the loss Hessian's square-root columns, as in the MLP engine) in the probes' place, and
        each layer adds its per-sample gradients' squared norms: a Linear layer's
        ``|delta|^2 (|input|^2 + 1 if bias)``; a convolution's ``|delta_n^T unfold(input_n)|^2``
        (one product per sample, replica and group; the narrow stride-1 ones by the ``group_conv``
        kernels and a pooled stem's by ``sampled_conv_wgrad`` at the winning positions, one sample
        at a time); a BatchNorm's per-channel sums."""
        last = len(self.layers) - 1
        R = next(iter(params.values())).shape[0]
        ref, C = next(iter(st.t.values())), st.outputs
        seed = hessian_sqrt_columns(self.loss, st.probs, st.mass, 0, C, ref)  # [N, R, C, C], or [C, C]: MSE
        seed = seed.transpose(1, 2) if self.loss.kind == "cross_entropy" else seed.view(1, C, 1, C).expand(ref.shape[0], C, R, C)
        total = torch.zeros(R, dtype=torch.float64, device=seed.device)

        def add(sq):  # per-sample gradients' squares [n, C, R, ...] summed into the replicas' totals
            total.add_(sq.sum(0).sum(0).reshape(R, -1).sum(1).to(torch.float64))

        rds = _Sums({last: seed})  # node -> the C vectors' gradient w.r.t. its output [n, C, R, *feat]
        for i, l, rd in self._backward(rds):
            n, K = rd.shape[:2]
            if l.kind == "conv":
                a, first = st.get(i, "in"), (i, "in") in st.shared
                W = params[l.weight]
                Co, Cig = W.shape[1:3]
                stride, pad, dil, g = _conv_io(l)
                m = self.stem_conv.get(i)
                if m in st.stems:  # rd at the pooling's winning positions: the sampled kernel, per sample
                    cols = conv_patches(a, W.shape[3:], stride, pad, dil)
                    pos = st.get(m, "ind").reshape(n, R * Co, -1)
                    g2 = rd.reshape(n, K, R * Co, -1)
                    if l.bias is not None:  # (a winner shared by two windows holds the sum of both)
                        add(g2.sum(3).view(n, K, R, Co).square())
                    for s in range(n):
                        gw = sampled_conv_wgrad(cols[s : s + 1], pos[s : s + 1], g2[s : s + 1])  # [R*Co, K, taps]
                        total.add_(gw.view(R, -1).square().sum(1).to(torch.float64))
                    continue
                if l.bias is not None:
                    add(rd.sum((4, 5)).square())
                if not first and self._grouped(l, W, a):  # the narrow convolutions' kernels, as in the matvec
                    gw = W.new_empty(R, K, Co, 1, Cig, *W.shape[3:])  # one sample's weight gradients
                    for s in range(n):
                        group_conv_wgrad(a[s : s + 1].unsqueeze(2), rd[s : s + 1].permute(0, 2, 1, 3, 4, 5), gw, pad)
                        total.add_(gw.view(R, -1).square().sum(1).to(torch.float64))
                    gi = rd.new_empty(n, K, R, Cig, *a.shape[-2:])
                    conv_input_grad(rd.reshape(n * K, R, 1, Co, *rd.shape[4:]), W, gi.view(n * K, R, 1, Cig, *a.shape[-2:]), pad)
                    rd = gi
                else:
                    T = rd.shape[4] * rd.shape[5]
                    cols = F.unfold(a.reshape(n, -1, *a.shape[-2:]), W.shape[3:], dil, pad, stride)  # [n, (R) g*Cig*kh*kw, T]
                    if first and g == 1:  # one product per sample for all replicas and vectors: [n, K*R*Co, taps]
                        gw = torch.bmm(rd.reshape(n, -1, T), cols.transpose(1, 2)).view(n, K, R, -1)
                    else:  # per sample, replica and group: [n, R, g, K*Co/g, taps]
                        dr = rd.reshape(n, K, R, g, Co // g, T).permute(0, 2, 3, 1, 4, 5).reshape(n, R, g, -1, T)
                        gw = torch.matmul(dr, cols.view(n, 1 if first else R, g, -1, T).transpose(3, 4)).unsqueeze(1)
                    add(gw.square())
                    if first:
                        continue
                    gi = conv2d_input((n * K, R * g * Cig, *a.shape[-2:]), W.reshape(-1, *W.shape[2:]),
                                      rd.reshape(n * K, -1, *rd.shape[4:]), stride, pad, dil, R * g)
                    rd = gi.view(n, K, R, g * Cig, *a.shape[-2:])
            elif l.kind == "linear":
                a, first = st.get(i, "in"), (i, "in") in st.shared
                sq = a.square().sum(-1)  # [n] or [n, R]
                if l.bias is not None:
                    sq = sq + 1
                add(rd.square().sum(-1) * (sq.view(n, 1, 1) if first else sq.unsqueeze(1)))
                if first:
                    continue
                rd = torch.einsum("nkro,roi->nkri", rd, params[l.weight])
            elif l.kind == "bn":
                nsp = rd.dim() - 4
                if l.weight is not None:  # per channel: sums over positions (BatchNorm1d has none)
                    gamma = rd * st.get(i, "xhat").unsqueeze(1)
                    add((gamma.sum(tuple(range(4, rd.dim()))) if nsp else gamma).square())
                    add((rd.sum(tuple(range(4, rd.dim()))) if nsp else rd).square())
                if self._reads_shared(self.inputs[i][0]):
                    continue
                rd = rd * _rb(self._bn_coefs(l, params, buffers)[0], nsp, False).unsqueeze(1)
            elif l.kind == "act":
                rd = rd * st.get(i, "d1").unsqueeze(1)
            else:
                rd = self._reshape_bwd(i, l, st, rd)
            self._acc(rds, self.inputs[i][0], rd)
        return total
