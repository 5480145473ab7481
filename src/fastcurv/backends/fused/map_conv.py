"""The sample-major engine's convolution and pooling helpers (:class:`_MapConv`): grouped
convolutions over the replicas, the group_conv kernels' paths, pooled stems (a convolution run at
a max pooling's winning positions) and the poolings' adjoints."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import _ext
from ...ops.group_conv import conv_input_grad, group_conv_wgrad, narrow


# Taps (C_in x kh x kw) up to which a stem runs at the pooled resolution by default. Against every
# position (R=8, 64 images, 2 threads, a stem of 16 channels and a 3x3 stride-2 pooling): 9, 25 and
# 27 taps faster at K=1 and 8 and in the gradient (K=8 0.81-0.84x); 49 and 75 taps 0.91-0.93x at
# K=8 but 1.0-1.1x at K=1; 98 and 147 taps 1.6-1.8x at K=1 (the patches' rows, as long as the taps,
# then cost more than the positions saved).
STEM_MAX_TAPS = 32


def _conv_io(l) -> tuple:
    """A convolution layer's ``(stride, padding, dilation, groups)``."""
    o = l.opts
    return o["stride"], o["padding"], o["dilation"], o["groups"]


class _MapConv:
    """Convolution and pooling helpers of :class:`~.maps._MapEngine`, a mixin: reads its ``layers``,
    ``stems``, ``pooled_stem`` and ``group_conv``."""

    @staticmethod
    def _full(a, R, shared):
        """``[N, R*C, H, W]`` input of a grouped conv (a shared input is repeated R times)."""
        if shared:
            return a.unsqueeze(1).expand(a.shape[0], R, *a.shape[1:]).reshape(a.shape[0], -1, *a.shape[2:])
        return a.reshape(a.shape[0], -1, *a.shape[3:])

    @staticmethod
    def _pool(a4, l):
        o = l.opts
        if l.kind == "avgpool":
            return F.avg_pool2d(a4, o["kernel_size"], o["stride"], o["padding"], o["ceil_mode"], o["count_include_pad"], o["divisor_override"])
        if l.kind == "adaptive":
            return F.adaptive_avg_pool2d(a4, o["output_size"])
        return F.max_pool2d(a4, o["kernel_size"], o["stride"], o["padding"], o["dilation"], o["ceil_mode"])

    @staticmethod
    def _pool_bwd(g4, l, in_shape):
        """Adjoint of a (linear) average pooling: ``g4`` ``[B, C, H', W']`` -> ``[B, C, H, W]``."""
        proxy = g4.new_zeros(()).expand(*g4.shape[:2], *in_shape)
        o = l.opts
        if l.kind == "avgpool":
            return torch.ops.aten.avg_pool2d_backward(g4, proxy, o["kernel_size"], o["stride"], o["padding"], o["ceil_mode"],
                                                      o["count_include_pad"], o["divisor_override"])
        return torch.ops.aten._adaptive_avg_pool2d_backward(g4, proxy)

    def _reshape_bwd(self, i, l, st, rd):
        """The gradient ``[N, K, R, *feat]`` of a Flatten or pooling node's output taken back to its
        input (a pooled stem's pooling keeps it at the winning positions)."""
        if l.kind == "flatten":
            return rd.reshape(*rd.shape[:3], *st.meta[i])
        if i in st.stems:
            return rd
        n, k, R, C = rd.shape[:4]
        if l.kind == "maxpool":
            ind = st.get(i, "ind")
            gi = rd.new_zeros(n, k, R, C, st.meta[i].numel())
            rd = gi.scatter_add_(4, ind.unsqueeze(1).expand(n, k, *ind.shape[1:]), rd.reshape(n, k, R, C, -1))
            return rd.view(n, k, R, C, *st.meta[i])
        return self._pool_bwd(rd.reshape(n * k, R * C, *rd.shape[4:]), l, st.meta[i]).view(n, k, R, C, *st.meta[i])

    def _grouped(self, l, W, a) -> bool:
        """Whether a convolution's R-passes run in the group_conv kernels: stride 1, no dilation,
        one group per replica, padding below the kernel size, C++ kernels on the CPU; with
        ``group_conv`` None only narrow groups (fewer than 16 input or output channels), with True
        any width, with False never. (Strided convolutions as sums of stride-1 ones over the
        stride's phases ran 1.5-3.5x slower than torch's on W4's 8 -> 16 channels, 14x14 -> 7x7.)"""
        stride, pad, dil, g = _conv_io(l)
        kh, kw = W.shape[3:]
        if self.group_conv is False or not (a.device.type == "cpu" and g == 1 and tuple(stride) == (1, 1)
                                            and tuple(dil) == (1, 1) and pad[0] < kh and pad[1] < kw):
            return False
        if self.group_conv is None and not narrow(W.shape[2], W.shape[1]):
            return False
        return _ext.choose("group_conv", a.device, a.dtype) == "ext"

    @staticmethod
    def _winners(t, st, m):
        """``t [N, R, C, H, W]`` at the winning positions of pooling node ``m``: ``[N, R, C, H', W']``."""
        ind = st.get(m, "ind")  # [N, R, C, H'W']
        return t.reshape(ind.shape[:3] + (-1,)).gather(3, ind).view(*ind.shape[:3], *st.meta[(m, "out")])

    def _pooled_stems(self, x, params) -> frozenset:
        """The pooling nodes whose stems run at the pooled resolution for inputs like ``x``: none
        with ``pooled_stem`` False; with None, where the C++ kernels run and the convolution has at
        most ``STEM_MAX_TAPS`` taps; with True, all."""
        if not self.stems or self.pooled_stem is False:
            return frozenset()
        if self.pooled_stem is None:
            if _ext.choose("sampled_conv", x.device, x.dtype) != "ext":
                return frozenset()
            return frozenset(m for m, nodes in self.stems.items()
                             if params[self.layers[nodes[0]].weight][0, 0].numel() <= STEM_MAX_TAPS)
        return frozenset(self.stems)

    def _grouped_rbwd(self, l, W, a, first, delta, ra_in, rd, out):
        """A group_conv layer's weight and bias products, added to ``out``: ``rd^T a`` (K as
        output channels) and ``delta^T ra`` (K as input channels), read in place."""
        N, R = rd.shape[0], rd.shape[2]
        pad = _conv_io(l)[1]
        o = out[l.weight]  # [R, K, Co, Cig, kh, kw]
        xa = a.unsqueeze(1).expand(N, R, *a.shape[1:]) if first else a
        group_conv_wgrad(xa.unsqueeze(2), rd.permute(0, 2, 1, 3, 4, 5), o.unsqueeze(3), pad, accumulate=True)
        if ra_in is not None:
            group_conv_wgrad(ra_in.permute(0, 2, 1, 3, 4, 5), delta.unsqueeze(2), o.permute(0, 2, 1, 3, 4, 5).unsqueeze(1), pad,
                             accumulate=True)

    @staticmethod
    def _grouped_rgrad(W, dW, delta, rd, in_hw, pad):
        """A group_conv layer's input R-gradient ``[N, K, R, Cig, H, W]``: ``rd`` through the weight
        and ``delta`` through the probe's weight block (K as input channels), written in place."""
        N, K, R, Co = rd.shape[:4]
        Cig, kh, kw = W.shape[2:]
        rg = rd.new_empty(N, K, R, Cig, *in_hw)
        conv_input_grad(rd.reshape(N * K, R, 1, Co, *rd.shape[4:]), W, rg.view(N * K, R, 1, Cig, *in_hw), pad)
        wt = dW.permute(0, 2, 1, 3, 4, 5).reshape(R, Co, K * Cig, kh, kw)  # the probe's block as a conv from (K, Cig)
        conv_input_grad(delta.unsqueeze(2), wt, rg.permute(0, 2, 1, 3, 4, 5), pad, accumulate=True)
        return rg
