"""fastcurv.ops.group_conv: grouped stride-1 convolutions on 6-d channel-split views, and their
input and weight gradients.

* The torch reference against a direct sum over the taps and its weight gradient against autograd,
  and conv_input_grad (the flipped kernel) against autograd's input gradient, so the formulas
  themselves are checked.
* The C++ kernels (every ISA variant) against the reference: float32 and float64, maps wider than
  a vector and a single pixel, rectangular kernels, padding 0 to k - 1 and different on each side,
  output channel counts that are not multiples of the block (8), both channel axes in use,
  operands as permuted views and at column strides, written and accumulated outputs; clear errors
  on bad input.
"""
import pytest
import torch
import torch.nn.functional as F

from fastcurv import _ext
from fastcurv.ops.group_conv import (conv_input_grad, group_conv, group_conv_reference, group_conv_wgrad,
                                     group_conv_wgrad_reference, narrow)

pytestmark = pytest.mark.usefixtures("one_thread")

needs_ext = pytest.mark.skipif(not _ext.has_kernel("group_conv", "cpu"), reason="C++ extension not loaded (fastcurv._ext.extension_error() says why)")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-11, atol=1e-11)}

# (B, G, C1, C2, O1, O2, H, W, kh, kw, padding (ph, pw) or (top, bottom, left, right))
CASES = [(3, 2, 1, 3, 1, 5, 9, 7, 3, 3, (1, 1)),  # odd map, 5 outputs (one partial block)
         (2, 3, 2, 4, 3, 5, 14, 14, 3, 3, (1, 1)),  # both channel axes; 15 outputs (blocks 8 + 7)
         (2, 1, 1, 2, 1, 9, 33, 20, 5, 3, (2, 0)),  # rows wider than two vectors; rectangular kernel, pad 0 on one axis
         (1, 2, 1, 1, 2, 2, 6, 5, 2, 4, (0, 3)),  # even and wide kernels, padding up to k - 1
         (2, 2, 1, 3, 1, 8, 1, 1, 1, 1, (0, 0)),  # one pixel, 1x1
         (1, 1, 1, 1, 1, 1, 4, 4, 4, 4, (0, 0)),  # kernel as large as the map: one output
         (2, 2, 1, 2, 1, 3, 7, 8, 3, 3, (0, 2, 1, 0))]  # different padding on each side


def _ids(c):
    return f"B{c[0]}G{c[1]}C{c[2]}x{c[3]}O{c[4]}x{c[5]}-{c[6]}x{c[7]}-k{c[8]}x{c[9]}-p" + "".join(map(str, c[10]))


def _pads(pad):
    return (pad[0], pad[0], pad[1], pad[1]) if len(pad) == 2 else pad


def _inputs(case, dtype, seed=0):
    B, G, C1, C2, O1, O2, H, W, kh, kw, pad = case
    t, b, l, r = _pads(pad)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, G, C1, C2, H, W, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(G, O1 * O2, C1 * C2, kh, kw, generator=gen, dtype=torch.float64).to(dtype)
    Ho, Wo = H + t + b - kh + 1, W + l + r - kw + 1
    grad = torch.randn(B, G, O1, O2, Ho, Wo, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, grad


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_formulas(case):
    B, G, C1, C2, O1, O2, H, W, kh, kw, pad = case
    t, b, l, r = _pads(pad)
    x, w, grad = _inputs(case, torch.float64)
    w.requires_grad_(True)
    x.requires_grad_(True)
    with _ext.use_kernels("torch"):
        z = group_conv_reference(x, w, torch.empty_like(grad), pad)
        # against a direct sum over the taps of the zero-padded input
        xp = F.pad(x.detach(), (l, r, t, b)).reshape(B, G, C1 * C2, H + t + b, W + l + r)
        Ho, Wo = grad.shape[4:]
        want = sum(torch.einsum("goc,bgcyx->bgoyx", w.detach()[..., ty, tx], xp[..., ty:ty + Ho, tx:tx + Wo])
                   for ty in range(kh) for tx in range(kw))
        torch.testing.assert_close(z.reshape(want.shape), want)
        gw, gx = torch.autograd.grad(z, (w, x), grad)
        out = torch.zeros(G, O1, O2, C1, C2, kh, kw, dtype=torch.float64)
        torch.testing.assert_close(group_conv_wgrad_reference(x.detach(), grad, out, pad).reshape(gw.shape), gw)
        if len(pad) == 2:  # the input gradient: the convolution of grad with the flipped weight
            gi = conv_input_grad(grad, w.detach(), torch.empty_like(x), pad)
            torch.testing.assert_close(gi, gx)


@needs_ext
@pytest.mark.parametrize("level", ["0", "1", "2"])  # FASTCURV_CPU_LEVEL: baseline, AVX2, AVX-512 (capped by the CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernel_matches_reference(case, dtype, level, monkeypatch):
    monkeypatch.setenv("FASTCURV_CPU_LEVEL", level)
    B, G, C1, C2, O1, O2, H, W, kh, kw, pad = case
    x, w, grad = _inputs(case, dtype)
    with _ext.use_kernels("torch"):
        want = group_conv_reference(x, w, torch.empty_like(grad), pad)
        want_w = group_conv_wgrad_reference(x, grad, torch.empty(G, O1, O2, C1, C2, kh, kw, dtype=dtype), pad)
    torch.testing.assert_close(group_conv(x, w, None, pad).view(want.shape), want, **TOL[dtype])
    got_w = group_conv_wgrad(x, grad, torch.full_like(want_w, float("nan")), pad)
    torch.testing.assert_close(got_w, want_w, **TOL[dtype])
    # operands as permuted views (the engine's [N, K, R, C] tangents read as [N, R, K, C]) and at
    # column strides, outputs written into such views and added to them
    xv = x.permute(0, 2, 1, 3, 4, 5).contiguous().permute(0, 2, 1, 3, 4, 5)
    gv = grad.permute(0, 2, 1, 3, 4, 5).contiguous().permute(0, 2, 1, 3, 4, 5)
    wide = torch.zeros(*x.shape[:5], 2 * W, dtype=dtype)
    wide[..., ::2] = x
    base = torch.ones(*want.shape[3::-1], *want.shape[4:], dtype=dtype).permute(3, 2, 1, 0, 4, 5)
    wide_out = torch.ones(*want.shape[:5], 3 * want.shape[5], dtype=dtype)[..., ::3]
    for xin, out in ((xv, base), (wide[..., ::2], wide_out)):
        assert group_conv(xin, w, out, pad, accumulate=True) is out
        torch.testing.assert_close(out, want + 1, **TOL[dtype])
        group_conv(xin, w, out, pad)
        torch.testing.assert_close(out, want, **TOL[dtype])
    out_w = torch.ones(want_w.shape[::-1], dtype=dtype).permute(6, 5, 4, 3, 2, 1, 0)
    assert group_conv_wgrad(xv, gv, out_w, pad, accumulate=True) is out_w
    torch.testing.assert_close(out_w, want_w + 1, **TOL[dtype])
    if len(pad) == 2:  # the input gradient from the kernel against the reference's
        with _ext.use_kernels("torch"):
            want_i = conv_input_grad(grad, w, torch.empty_like(x), pad)
        into = torch.full_like(x, float("nan")).permute(0, 2, 1, 3, 4, 5).contiguous().permute(0, 2, 1, 3, 4, 5)
        torch.testing.assert_close(conv_input_grad(gv, w, into, pad), want_i, **TOL[dtype])


@needs_ext
def test_kernel_edge_values():
    """Zero inputs give zeros, in both kernels; a unit impulse gives the weight back."""
    case = CASES[1]
    x, w, grad = _inputs(case, torch.float64)
    pad = case[10]
    assert group_conv(torch.zeros_like(x), w, None, pad).abs().max() == 0
    out_w = torch.empty(*w.shape[:1], *case[4:6], *case[2:4], *w.shape[3:], dtype=torch.float64)
    assert group_conv_wgrad(x, torch.zeros_like(grad), out_w, pad).abs().max() == 0
    # one input channel, one pixel at the centre: the output around it is the kernel (flipped)
    x = torch.zeros(1, 1, 1, 1, 7, 7, dtype=torch.float64)
    x[..., 3, 3] = 1
    w = torch.randn(1, 3, 1, 3, 3, dtype=torch.float64)
    z = group_conv(x, w, None, (1, 1))
    torch.testing.assert_close(z[0, 0, 0, :, 2:5, 2:5], w[0, :, 0].flip(1, 2))


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_errors_name_the_problem(impl):
    if impl == "auto" and not _ext.has_kernel("group_conv", "cpu"):
        pytest.skip("C++ extension not loaded (fastcurv._ext.extension_error() says why)")
    x, w, grad = _inputs(CASES[0], torch.float64)
    out_w = torch.zeros(2, 1, 5, 1, 3, 3, 3, dtype=torch.float64)
    with _ext.use_kernels(impl):
        with pytest.raises(ValueError, match=r"x must be 6-d \[B, G, C1, C2, H, W\]"):
            group_conv(x[0], w, None, (1, 1))
        with pytest.raises(ValueError, match=r"weight must be \[G, O, C, kh, kw\]"):
            group_conv(x, w[:, :, :2], None, (1, 1))
        with pytest.raises(ValueError, match=r"out must be \[B, G, O1, O2, H_out, W_out\] = \[3, 2, O1, O2, 9, 7\]"):
            group_conv(x, w, grad[..., :-1], (1, 1))
        with pytest.raises(ValueError, match=r"grad must be \[B, G, O1, O2, H_out, W_out\]"):
            group_conv_wgrad(x, grad, out_w, (0, 0))
        with pytest.raises(ValueError, match="padding must be non-negative"):
            group_conv(x, w, None, (-1, 1))
        with pytest.raises(ValueError, match=r"the 3x3 kernel is larger than the padded input \(2x7"):
            group_conv(x[..., :2, :], w, None, (0, 0))
        with pytest.raises(TypeError, match="float32 or float64"):
            group_conv(x.half(), w, None, (1, 1))
    if impl == "auto":
        with pytest.raises(TypeError, match="dtype mismatch, weight"):
            group_conv(x, w.float(), None, (1, 1))
        with pytest.raises(ValueError, match="out must be 7-d"):
            group_conv_wgrad(x, grad, out_w[0], (1, 1))
    with pytest.raises(ValueError, match="padding must be below the kernel size"):
        conv_input_grad(grad, w, torch.empty_like(x), (3, 1))
    with pytest.raises(ValueError, match=r"padding must be \(ph, pw\) or \(top, bottom, left, right\)"):
        group_conv(x, w, None, (1, 1, 1))


def test_narrow_rule():
    assert narrow(8, 8) and narrow(8, 128) and narrow(64, 8) and narrow(1, 16)
    assert not narrow(16, 16) and not narrow(32, 16)


@needs_ext
@pytest.mark.parametrize("G", [1, 2])
def test_weight_gradient_with_fewer_groups_than_threads(G):
    """Each group's output channel blocks are then split over the threads (3 threads: 1 group in
    3 parts, 2 groups in 2 parts each, of 3 blocks of 8 channels, the last partial)."""
    old = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        case = (2, G, 1, 3, 4, 5, 9, 7, 3, 3, (1, 1))
        x, w, grad = _inputs(case, torch.float64)
        with _ext.use_kernels("torch"):
            want = group_conv_wgrad_reference(x, grad, torch.empty(G, 4, 5, 1, 3, 3, 3, dtype=torch.float64), (1, 1))
        got = group_conv_wgrad(x, grad, torch.full_like(want, float("nan")), (1, 1))
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_no_channels_or_no_groups(impl):
    """C = 0 channels or G = 0 groups: the C++ kernel returned zeros, the reference raised (torch's
    conv2d refuses them)."""
    if impl == "ext" and not _ext.has_kernel("group_conv", "cpu"):
        pytest.skip("C++ extension not loaded (fastcurv._ext.extension_error() says why)")
    with _ext.use_kernels(impl):
        z = group_conv(torch.randn(2, 2, 0, 2, 5, 5), torch.randn(2, 3, 0, 3, 3), padding=(1, 1))
        assert z.shape == (2, 2, 1, 3, 5, 5) and not z.any()
        assert group_conv(torch.randn(2, 0, 1, 2, 5, 5), torch.randn(0, 3, 2, 3, 3), padding=(1, 1)).shape == (2, 0, 1, 3, 5, 5)
        out = torch.full((2, 3, 1, 0, 2, 3, 3), 1.0)
        group_conv_wgrad(torch.randn(2, 2, 0, 2, 5, 5), torch.randn(2, 2, 3, 1, 5, 5), out, padding=(1, 1))
