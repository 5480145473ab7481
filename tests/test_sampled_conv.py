"""fastcurv.ops.sampled_conv: a convolution at chosen output positions per channel, and its weight
gradient.

* The torch reference against F.conv2d evaluated everywhere and then picked at the positions, and
  its weight gradient against autograd through that, so the formula itself is checked.
* The C++ kernel (every ISA variant) against the reference: float32 and float64, tap counts and
  positions per channel that are not multiples of the vector width, one or several weights per
  channel, strided operands, written and accumulated outputs; clear errors on bad input.
"""
import pytest
import torch
import torch.nn.functional as F

from fastcurv import _ext
from fastcurv.ops import conv_patches, sampled_conv, sampled_conv_reference, sampled_conv_wgrad, sampled_conv_wgrad_reference

pytestmark = pytest.mark.usefixtures("one_thread")

needs_ext = pytest.mark.skipif(not _ext.has_kernel("sampled_conv", "cpu"), reason="C++ extension not loaded (fastcurv._ext.extension_error() says why)")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}

# (N, C_in, H, W, kernel, stride, padding, dilation, G, K, S)
CASES = [(3, 1, 9, 7, 3, 1, 1, 1, 5, 3, 11),  # 9 taps, 11 positions (a vector tail)
         (2, 3, 8, 8, 3, 2, 0, 1, 4, 1, 16),  # 27 taps, stride 2
         (1, 2, 5, 6, 1, 1, 0, 1, 2, 8, 33),  # 2 taps (1x1), 33 positions
         (2, 1, 10, 9, (2, 3), 1, (1, 0), (2, 1), 3, 4, 40),  # rectangular, dilated
         (2, 3, 6, 6, 3, 1, 1, 1, 3, 13, 21),  # 27 taps (two AVX-512 vectors), 13 probes (blocks 8 + 4 + 1)
         (1, 1, 4, 4, 1, 1, 0, 1, 1, 1, 1)]  # one tap, one position


def _inputs(case, dtype, seed=0):
    N, C, H, W, k, s, p, d, G, K, S = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).to(dtype)
    cols = conv_patches(x, k, s, p, d)
    pos = torch.randint(0, cols.shape[1], (N, G, S), generator=gen)
    weight = torch.randn(G, K, cols.shape[2], generator=gen, dtype=torch.float64).to(dtype)
    grad = torch.randn(N, K, G, S, generator=gen, dtype=torch.float64).to(dtype)
    return x, cols, pos, weight, grad


def _picked_conv(x, case, pos, weight):
    """F.conv2d everywhere (G*K output channels), then each channel's positions: [N, K, G, S]."""
    N, C, H, W, k, s, p, d, G, K, S = case
    k = k if isinstance(k, tuple) else (k, k)
    full = F.conv2d(x, weight.reshape(G * K, C, *k), None, s, p, d).reshape(N, G, K, -1)
    return full.gather(3, pos.unsqueeze(2).expand(N, G, K, S)).transpose(1, 2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-k{c[4]}-G{c[8]}K{c[9]}S{c[10]}")
def test_reference_is_the_convolution_at_the_positions(case):
    x, cols, pos, weight, grad = _inputs(case, torch.float64)
    weight.requires_grad_(True)
    want = _picked_conv(x, case, pos, weight)
    with _ext.use_kernels("torch"):
        torch.testing.assert_close(sampled_conv_reference(cols, pos, weight), want, **TOL[torch.float64])
        (gw,) = torch.autograd.grad(want, weight, grad)
        torch.testing.assert_close(sampled_conv_wgrad_reference(cols, pos, grad), gw, **TOL[torch.float64])


@needs_ext
@pytest.mark.parametrize("level", ["0", "1", "2"])  # FASTCURV_CPU_LEVEL: baseline, AVX2, AVX-512 (capped by the CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-k{c[4]}-G{c[8]}K{c[9]}S{c[10]}")
def test_kernel_matches_reference(case, dtype, level, monkeypatch):
    monkeypatch.setenv("FASTCURV_CPU_LEVEL", level)
    x, cols, pos, weight, grad = _inputs(case, dtype)
    with _ext.use_kernels("torch"):
        want = sampled_conv_reference(cols, pos, weight)
        want_w = sampled_conv_wgrad_reference(cols, pos, grad)
    torch.testing.assert_close(sampled_conv(cols, pos, weight), want, **TOL[dtype])
    torch.testing.assert_close(sampled_conv_wgrad(cols, pos, grad), want_w, **TOL[dtype])
    # strided operands: every other row of wider tensors, the weight's probes transposed
    N, G, S = pos.shape
    wide_pos = torch.zeros(N, G, 2 * S, dtype=torch.int64)
    wide_pos[..., ::2] = pos
    wt = weight.transpose(0, 1).contiguous().transpose(0, 1)
    wide_grad = torch.zeros(N, grad.shape[1], G, S + 3, dtype=dtype)
    wide_grad[..., :S] = grad
    torch.testing.assert_close(sampled_conv(cols, wide_pos[..., ::2], wt), want, **TOL[dtype])
    # rows not padded (copied by the wrapper), and padding that holds NaN (masked by the kernel)
    torch.testing.assert_close(sampled_conv(cols.contiguous(), pos, weight), want, **TOL[dtype])
    nan_padded = torch.full((N, cols.shape[1], cols.stride(1)), float("nan"), dtype=dtype)
    nan_padded[..., :cols.shape[2]] = cols
    torch.testing.assert_close(sampled_conv(nan_padded[..., :cols.shape[2]], pos, weight), want, **TOL[dtype])
    torch.testing.assert_close(sampled_conv_wgrad(nan_padded[..., :cols.shape[2]], pos, grad), want_w, **TOL[dtype])
    torch.testing.assert_close(sampled_conv_wgrad(cols, pos, wide_grad[..., :S]), want_w, **TOL[dtype])
    # written into and added to given outputs, contiguous or not
    for out in (torch.ones_like(want_w), torch.ones(want_w.shape[::-1], dtype=dtype).permute(2, 1, 0)):
        got = sampled_conv_wgrad(cols, pos, grad, out=out, accumulate=True)
        assert got is out
        torch.testing.assert_close(out, want_w + 1, **TOL[dtype])
        sampled_conv_wgrad(cols, pos, grad, out=out)
        torch.testing.assert_close(out, want_w, **TOL[dtype])


@needs_ext
def test_kernel_edge_values():
    """Zero patches give zeros; every position the same gives the conv there, repeated."""
    case = CASES[0]
    x, cols, pos, weight, grad = _inputs(case, torch.float64)
    zero = torch.zeros_like(cols)
    assert sampled_conv(zero, pos, weight).abs().max() == 0
    assert sampled_conv_wgrad(zero, pos, grad).abs().max() == 0
    same = torch.full_like(pos, 5)
    out = sampled_conv(cols, same, weight)  # [N, K, G, S]
    torch.testing.assert_close(out, torch.einsum("nt,gkt->nkg", cols[:, 5], weight).unsqueeze(-1).expand_as(out))


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_errors_name_the_problem(impl):
    if impl == "auto" and not _ext.has_kernel("sampled_conv", "cpu"):
        pytest.skip("C++ extension not loaded (fastcurv._ext.extension_error() says why)")
    x, cols, pos, weight, grad = _inputs(CASES[0], torch.float64)
    L = cols.shape[1]
    with _ext.use_kernels(impl):
        for bad in (L, -1):
            p = pos.clone()
            p[1, 2, 3] = bad
            with pytest.raises(ValueError, match=rf"sampled_conv: pos has entries outside \[0, {L}\)"):
                sampled_conv(cols, p, weight)
            with pytest.raises(ValueError, match=rf"sampled_conv_wgrad: pos has entries outside \[0, {L}\)"):
                sampled_conv_wgrad(cols, p, grad)
        with pytest.raises(ValueError, match="weight must be"):
            sampled_conv(cols, pos, weight[:, :, :-1])
        with pytest.raises(ValueError, match="grad must be"):
            sampled_conv_wgrad(cols, pos, grad[..., :-1])
        with pytest.raises(ValueError, match="out must be"):
            sampled_conv_wgrad(cols, pos, grad, out=torch.zeros(1, dtype=torch.float64))
        with pytest.raises(ValueError, match="pos must be"):
            sampled_conv(cols, pos[:1], weight)
        with pytest.raises(TypeError, match="pos must be int64"):
            sampled_conv(cols, pos.int(), weight)
        with pytest.raises(TypeError, match="dtype mismatch, weight"):
            sampled_conv(cols, pos, weight.float())
        with pytest.raises(TypeError, match="float32 or float64"):
            sampled_conv(cols.half(), pos, weight)
    if impl == "auto":  # the kernel itself refuses rows it cannot read as whole vectors
        with pytest.raises(RuntimeError, match=r"rows padded to 16 entries \(64 bytes"):
            torch.ops.fastcurv.sampled_conv(cols.contiguous(), pos, weight)


@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_empty_patches_and_positions_checked_before_writing(impl):
    """No taps: zeros; no positions (with positions to read) or a position out of range: an error,
    with ``out`` untouched under accumulate (the C++ kernels crashed on the first two and wrote
    part of ``out`` before raising on the third)."""
    if impl == "ext" and not _ext.has_kernel("sampled_conv", "cpu"):
        pytest.skip("C++ extension not loaded (fastcurv._ext.extension_error() says why)")
    with _ext.use_kernels(impl):
        z = sampled_conv(torch.zeros(2, 5, 0), torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(3, 1, 0))
        assert z.shape == (2, 1, 3, 4) and not z.any()
        with pytest.raises(ValueError, match=r"pos has entries outside \[0, 0\)"):
            sampled_conv(torch.zeros(1, 0, 9), torch.zeros(1, 1, 1, dtype=torch.long), torch.randn(1, 1, 9))
        cols = conv_patches(torch.randn(2, 1, 4, 4), 3, 1, 1)  # [2, 16, 9]
        pos = torch.randint(0, 16, (2, 1, 3))
        pos[1, 0, 2] = 16
        out = torch.full((1, 2, 9), 5.0)
        with pytest.raises(ValueError, match=r"pos has entries outside \[0, 16\)"):
            sampled_conv_wgrad(cols, pos, torch.randn(2, 2, 1, 3), out, accumulate=True)
        assert (out == 5.0).all()


@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_no_samples(impl):
    """N = 0 samples: the C++ kernels returned empty results, the reference raised (a reshape of 0
    elements with -1)."""
    if impl == "ext" and not _ext.has_kernel("sampled_conv", "cpu"):
        pytest.skip("C++ extension not loaded (fastcurv._ext.extension_error() says why)")
    with _ext.use_kernels(impl):
        z = sampled_conv(torch.randn(0, 4, 5), torch.zeros(0, 2, 3, dtype=torch.long), torch.randn(2, 2, 5))
        assert z.shape == (0, 2, 2, 3)
        out = torch.full((2, 2, 5), 3.0)
        sampled_conv_wgrad(torch.randn(0, 4, 5), torch.zeros(0, 2, 3, dtype=torch.long), torch.randn(0, 2, 2, 3), out)
        assert not out.any()
