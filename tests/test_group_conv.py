"""fastcurv.ops.group_conv: grouped stride-1 convolutions on 6-d channel-split views, and their
weight gradients.

* The torch reference against autograd through F.conv2d (weight gradient), and the flipped kernel
  against torch's input gradient, so the formulas themselves are checked.
* The C++ kernels (every ISA variant) against the reference: float32 and float64, maps wider than
  a vector and a single pixel, rectangular kernels, padding 0 to k - 1, output channel counts that
  are not multiples of the block (8), both channel axes in use, operands as permuted views,
  written and accumulated outputs; clear errors on bad input.
"""
import pytest
import torch
import torch.nn.functional as F

from fastcurv import _ext
from fastcurv.ops.group_conv import (flipped, group_conv, group_conv_reference, group_conv_wgrad, group_conv_wgrad_reference,
                                     narrow)

pytestmark = pytest.mark.usefixtures("one_thread")

needs_ext = pytest.mark.skipif(not _ext.has_kernel("group_conv", "cpu"), reason="C++ extension not built")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-11, atol=1e-11)}

# (B, G, C1, C2, O1, O2, H, W, kh, kw, ph, pw)
CASES = [(3, 2, 1, 3, 1, 5, 9, 7, 3, 3, 1, 1),  # odd map, 5 outputs (one partial block)
         (2, 3, 2, 4, 3, 5, 14, 14, 3, 3, 1, 1),  # both channel axes; 15 outputs (blocks 8 + 7)
         (2, 1, 1, 2, 1, 9, 33, 20, 5, 3, 2, 0),  # rows wider than two vectors; rectangular kernel, pad 0 on one side
         (1, 2, 1, 1, 2, 2, 6, 5, 2, 4, 0, 3),  # even and wide kernels, padding up to k - 1
         (2, 2, 1, 3, 1, 8, 1, 1, 1, 1, 0, 0),  # one pixel, 1x1
         (1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 0, 0)]  # kernel as large as the map: one output


def _ids(c):
    return f"B{c[0]}G{c[1]}C{c[2]}x{c[3]}O{c[4]}x{c[5]}-{c[6]}x{c[7]}-k{c[8]}x{c[9]}-p{c[10]}{c[11]}"


def _inputs(case, dtype, seed=0):
    B, G, C1, C2, O1, O2, H, W, kh, kw, ph, pw = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, G, C1, C2, H, W, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(G, O1 * O2, C1 * C2, kh, kw, generator=gen, dtype=torch.float64).to(dtype)
    Ho, Wo = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1
    grad = torch.randn(B, G, O1, O2, Ho, Wo, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, grad


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_formulas(case):
    B, G, C1, C2, O1, O2, H, W, kh, kw, ph, pw = case
    x, w, grad = _inputs(case, torch.float64)
    w.requires_grad_(True)
    x.requires_grad_(True)
    with _ext.use_kernels("torch"):
        z = group_conv_reference(x, w, torch.empty_like(grad), (ph, pw))
        # against a direct sum over the taps of the zero-padded input
        xp = F.pad(x.detach(), (pw, pw, ph, ph)).reshape(B, G, C1 * C2, H + 2 * ph, W + 2 * pw)
        Ho, Wo = grad.shape[4:]
        want = sum(torch.einsum("goc,bgcyx->bgoyx", w.detach()[..., ty, tx], xp[..., ty:ty + Ho, tx:tx + Wo])
                   for ty in range(kh) for tx in range(kw))
        torch.testing.assert_close(z.reshape(want.shape), want)
        gw, gx = torch.autograd.grad(z, (w, x), grad)
        out = torch.zeros(G, O1, O2, C1, C2, kh, kw, dtype=torch.float64)
        torch.testing.assert_close(group_conv_wgrad_reference(x.detach(), grad, out, (ph, pw)).reshape(gw.shape), gw)
        # the input gradient: the convolution of grad with the flipped weight
        gi = group_conv_reference(grad.reshape(B, G, 1, O1 * O2, Ho, Wo), flipped(w.detach()), None, (kh - 1 - ph, kw - 1 - pw))
        torch.testing.assert_close(gi.reshape(gx.shape), gx)


@needs_ext
@pytest.mark.parametrize("level", ["0", "1", "2"])  # FASTCURV_CPU_LEVEL: baseline, AVX2, AVX-512 (capped by the CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernel_matches_reference(case, dtype, level, monkeypatch):
    monkeypatch.setenv("FASTCURV_CPU_LEVEL", level)
    B, G, C1, C2, O1, O2, H, W, kh, kw, ph, pw = case
    pad = (ph, pw)
    x, w, grad = _inputs(case, dtype)
    with _ext.use_kernels("torch"):
        want = group_conv_reference(x, w, torch.empty_like(grad), pad)
        want_w = group_conv_wgrad_reference(x, grad, torch.empty(G, O1, O2, C1, C2, kh, kw, dtype=dtype), pad)
    torch.testing.assert_close(group_conv(x, w, None, pad).view(want.shape), want, **TOL[dtype])
    got_w = group_conv_wgrad(x, grad, torch.full_like(want_w, float("nan")), pad)
    torch.testing.assert_close(got_w, want_w, **TOL[dtype])
    # operands as permuted views (the engine's [N, K, R, C] tangents read as [N, R, K, C]), rows
    # of x strided (copied by the wrapper), outputs written into permuted views and added to them
    xv = x.permute(0, 2, 1, 3, 4, 5).contiguous().permute(0, 2, 1, 3, 4, 5)
    gv = grad.permute(0, 2, 1, 3, 4, 5).contiguous().permute(0, 2, 1, 3, 4, 5)
    wide = torch.zeros(*x.shape[:5], 2 * W, dtype=dtype)
    wide[..., ::2] = x
    base = torch.ones(*want.shape[3::-1], *want.shape[4:], dtype=dtype).permute(3, 2, 1, 0, 4, 5)
    for xin in (xv, wide[..., ::2]):
        out = base.clone()
        assert group_conv(xin, w, out, pad, accumulate=True) is out
        torch.testing.assert_close(out, want + 1, **TOL[dtype])
        group_conv(xin, w, out, pad)
        torch.testing.assert_close(out, want, **TOL[dtype])
    out_w = torch.ones(want_w.shape[::-1], dtype=dtype).permute(6, 5, 4, 3, 2, 1, 0)
    assert group_conv_wgrad(xv, gv, out_w, pad, accumulate=True) is out_w
    torch.testing.assert_close(out_w, want_w + 1, **TOL[dtype])


@needs_ext
def test_kernel_edge_values():
    """Zero inputs give zeros, in both kernels; a unit impulse gives the weight back."""
    case = CASES[1]
    x, w, grad = _inputs(case, torch.float64)
    pad = case[10:]
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
        pytest.skip("C++ extension not built")
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
        with pytest.raises(TypeError, match="float32 or float64"):
            group_conv(x.half(), w, None, (1, 1))
    if impl == "auto":
        with pytest.raises(TypeError, match="dtype mismatch, weight"):
            group_conv(x, w.float(), None, (1, 1))
        with pytest.raises(ValueError, match="out must be 7-d"):
            group_conv_wgrad(x, grad, out_w[0], (1, 1))
        with pytest.raises(ValueError, match="out's rows must be contiguous"):
            group_conv(x, w, grad.transpose(4, 5).contiguous().transpose(4, 5), (1, 1))


def test_narrow_rule():
    assert narrow(8, 8) and narrow(8, 128) and narrow(64, 8) and narrow(1, 16)
    assert not narrow(16, 16) and not narrow(32, 16)
