"""The conv engine's convolutions: forward, input gradient and weight gradient, with torch's
signatures (``F.conv2d``, ``torch.nn.grad.conv2d_input``, ``torch.nn.grad.conv2d_weight``).

A 1x1 convolution without padding is a strided subsampling of its input followed by one small
matrix product per group. On the CPU these run as batched matmuls when every group has few
channels (``in/groups * out/groups <= POINTWISE_MAX_CHANNELS``): the engine stacks R replicas (and
K probes) as groups of a handful of channels each, a shape where oneDNN's grouped convolutions ran
1.2-25x slower than the matmuls on 2 cores (``python benchmarks/bench_kernels.py --pointwise``).
The input gradient of a strided 1x1 convolution also runs as a matmul for wider groups, where it
was 2.2-2.7x faster. Everything else, and every GPU tensor, goes to torch (oneDNN, cuDNN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# in/groups * out/groups up to which 1x1 convolutions run as matmuls on the CPU: measured faster
# at 8x16, 8x128, 64x16 and 3x16 (in x out channels per group); slower at 32x64, 64x64, 64x128
POINTWISE_MAX_CHANNELS = 1024
# bytes of the per-sample weight-gradient partials [n, groups, out/groups, in/groups] summed at once
_WEIGHT_PARTIAL_BYTES = 16 << 20


def _small(weight_shape, groups: int) -> bool:
    """Few channels per group: ``out/groups * in/groups <= POINTWISE_MAX_CHANNELS``."""
    return (weight_shape[0] // groups) * weight_shape[1] <= POINTWISE_MAX_CHANNELS


def _plain(weight_shape, padding, device) -> bool:
    """A 1x1 kernel without padding, on the CPU (dilation does not matter for 1x1)."""
    return device.type == "cpu" and tuple(weight_shape[2:]) == (1, 1) and not any(padding)


def _subsample(x: torch.Tensor, stride) -> torch.Tensor:
    """The input positions a 1x1 kernel with this stride reads (a view)."""
    return x if tuple(stride) == (1, 1) else x[:, :, :: stride[0], :: stride[1]]


def conv2d(x, weight, bias, stride, padding, dilation, groups):
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``: ``x [N, C_in, H, W]``,
    ``weight [C_out, C_in/groups, kh, kw]``, ``bias [C_out]`` or None; stride, padding and
    dilation as pairs."""
    if not (_plain(weight.shape, padding, x.device) and _small(weight.shape, groups)):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    xs = _subsample(x, stride)
    N, Ci, Ho, Wo = xs.shape
    Co = weight.shape[0]
    out = torch.matmul(weight.reshape(groups, Co // groups, Ci // groups), xs.reshape(N, groups, Ci // groups, Ho * Wo))
    out = out.view(N, Co, Ho, Wo)
    return out if bias is None else out.add_(bias.view(1, Co, 1, 1))


def conv2d_input(input_size, weight, grad_output, stride, padding, dilation, groups):
    """``torch.nn.grad.conv2d_input``: the gradient ``[N, C_in, H, W]`` (``input_size``) of a
    convolution's input from that of its output ``grad_output [N, C_out, H', W']``."""
    strided = tuple(stride) != (1, 1)
    if not (_plain(weight.shape, padding, grad_output.device) and (strided or _small(weight.shape, groups))):
        return torch.nn.grad.conv2d_input(input_size, weight, grad_output, stride, padding, dilation, groups)
    N, Ci, H, W = input_size
    Co, (Ho, Wo) = weight.shape[0], grad_output.shape[2:]
    gi = torch.matmul(weight.reshape(groups, Co // groups, Ci // groups).transpose(1, 2),
                      grad_output.reshape(N, groups, Co // groups, Ho * Wo)).view(N, Ci, Ho, Wo)
    if not strided:
        return gi
    out = grad_output.new_zeros(N, Ci, H, W)
    out[:, :, :: stride[0], :: stride[1]] = gi
    return out


def conv2d_weight(x, weight_size, grad_output, stride, padding, dilation, groups):
    """``torch.nn.grad.conv2d_weight``: the gradient ``[C_out, C_in/groups, kh, kw]``
    (``weight_size``) of a convolution's weight from its input ``x`` and output gradient."""
    if not (_plain(weight_size, padding, x.device) and _small(weight_size, groups)):
        return torch.nn.grad.conv2d_weight(x, weight_size, grad_output, stride, padding, dilation, groups)
    xs = _subsample(x, stride)
    N, Ci, Ho, Wo = xs.shape
    Co, Cig = weight_size[0], weight_size[1]
    xg = xs.reshape(N, groups, Cig, Ho * Wo).transpose(-1, -2)
    gg = grad_output.reshape(N, groups, Co // groups, Ho * Wo)
    # per-sample partials, summed over samples; in slices, so that they stay small
    step = max(1, _WEIGHT_PARTIAL_BYTES // max(1, Co * Cig * grad_output.element_size()))
    gw = None
    for n0 in range(0, N, step):
        part = torch.matmul(gg[n0 : n0 + step], xg[n0 : n0 + step]).sum(0)
        gw = part if gw is None else gw.add_(part)
    return gw.view(weight_size)
