"""The conv engine's convolutions (fastcurv.backends.fused.conv) against torch's: 1x1 kernels as
matmuls on the CPU, everything else passed through."""
import pytest
import torch
import torch.nn.functional as F

from fastcurv.backends.fused import conv

# (N, C_in, H, W), C_out, groups, stride: odd sizes, strides that do not divide them, the engine's
# replicas-as-groups shapes, a 1x1 layer on a 3-channel input
CASES = [
    ((3, 4, 5, 6), 6, 2, (1, 1)),
    ((3, 4, 5, 7), 6, 2, (2, 2)),
    ((2, 6, 7, 5), 9, 3, (2, 3)),
    ((4, 40, 6, 6), 80, 5, (2, 2)),
    ((5, 3, 8, 8), 4, 1, (1, 2)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,co,groups,stride", CASES)
def test_pointwise_matches_torch(shape, co, groups, stride, bias, dtype, torch_conv_calls):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    w = torch.randn(co, shape[1] // groups, 1, 1, generator=gen, dtype=dtype)
    b = torch.randn(co, generator=gen, dtype=dtype) if bias else None
    args = (stride, (0, 0), (2, 1), groups)  # dilation does not change a 1x1 convolution
    z = F.conv2d(x, w, b, *args)
    go = torch.randn(z.shape, generator=gen, dtype=dtype)
    gi = torch.nn.grad.conv2d_input(x.shape, w, go, *args)
    gw = torch.nn.grad.conv2d_weight(x, w.shape, go, *args)
    calls = torch_conv_calls()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.conv2d(x, w, b, *args), z, **tol)
    torch.testing.assert_close(conv.conv2d_input(x.shape, w, go, *args), gi, **tol)
    torch.testing.assert_close(conv.conv2d_weight(x, w.shape, go, *args), gw, **tol)
    assert calls == []  # all three as matmuls


def test_non_contiguous_operands():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 6, 6, generator=gen).transpose(0, 1)[:, :, :, ::1]  # [3, 4, 6, 6], strided
    w = torch.randn(2, 6, 1, 1, generator=gen).transpose(0, 1)  # [6, 2, 1, 1], strided
    args = ((2, 2), (0, 0), (1, 1), 2)
    z = F.conv2d(x, w, None, *args)
    go = torch.randn(z.shape, generator=gen).transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(conv.conv2d(x, w, None, *args), z)
    torch.testing.assert_close(conv.conv2d_input(x.shape, w, go, *args), torch.nn.grad.conv2d_input(x.shape, w, go, *args))
    torch.testing.assert_close(conv.conv2d_weight(x, w.shape, go, *args), torch.nn.grad.conv2d_weight(x, w.shape, go, *args))


def test_weight_gradient_in_sample_slices(monkeypatch):
    monkeypatch.setattr(conv, "_WEIGHT_PARTIAL_BYTES", 1)  # one sample per slice
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, 5, 5, generator=gen, dtype=torch.float64)
    go = torch.randn(5, 6, 3, 3, generator=gen, dtype=torch.float64)
    args = ((2, 2), (0, 0), (1, 1), 2)
    torch.testing.assert_close(conv.conv2d_weight(x, (6, 2, 1, 1), go, *args),
                               torch.nn.grad.conv2d_weight(x, (6, 2, 1, 1), go, *args))


@pytest.mark.parametrize("kernel,padding,channels,stride,torch_ops", [
    (3, 1, (4, 6), (1, 1), {"conv2d", "conv2d_input", "conv2d_weight"}),  # not 1x1
    (1, 1, (4, 6), (1, 1), {"conv2d", "conv2d_input", "conv2d_weight"}),  # padded 1x1
    (1, 0, (64, 32), (1, 1), {"conv2d", "conv2d_input", "conv2d_weight"}),  # wide groups
    (1, 0, (64, 32), (2, 2), {"conv2d", "conv2d_weight"}),  # wide groups; a strided input gradient is a matmul
])
def test_other_convolutions_go_to_torch(kernel, padding, channels, stride, torch_ops, torch_conv_calls):
    gen = torch.Generator().manual_seed(3)
    ci, co = channels
    x = torch.randn(2, ci, 6, 6, generator=gen)
    w = torch.randn(co, ci, kernel, kernel, generator=gen)
    args = (stride, (padding, padding), (1, 1), 1)
    z = F.conv2d(x, w, None, *args)
    go = torch.randn(z.shape, generator=gen)
    gi, gw = torch.nn.grad.conv2d_input(x.shape, w, go, *args), torch.nn.grad.conv2d_weight(x, w.shape, go, *args)
    calls = torch_conv_calls()
    torch.testing.assert_close(conv.conv2d(x, w, None, *args), z)
    torch.testing.assert_close(conv.conv2d_input(x.shape, w, go, *args), gi)
    torch.testing.assert_close(conv.conv2d_weight(x, w.shape, go, *args), gw)
    assert {name for name, _ in calls} == torch_ops
