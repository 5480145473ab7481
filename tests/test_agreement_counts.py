"""Exact agreement counts: every implementation against the naive loop."""
import os

import pytest
import torch

import fastcurv
from fastcurv import _ext
from fastcurv.ops.agreement_counts import AgreementCounts, agreement_counts_naive, agreement_counts_onehot

# (R, M, C): M not a multiple of any tile (64-bit words, 32-word chunks, 32/64 replica tiles, 128 examples).
SHAPES = [(1, 7, 2), (1, 1, 5), (2, 1, 2), (5, 64, 2), (37, 2049, 2), (70, 4099, 10), (33, 777, 1000), (65, 130, 3)]


def _preds(R, M, C, seed, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, C, (R, M), generator=g).to(dtype)


def _impls():
    impls = [("onehot", agreement_counts_onehot), ("torch-wrapper", lambda p: _with("torch", p))]
    if _ext.has_kernel("agreement_counts", "cpu"):
        impls.append(("cpu-ext", torch.ops.fastcurv.agreement_counts))
    return impls


def _with(impl, p):
    with fastcurv.use_kernels(impl):
        return fastcurv.agreement_counts(p)


def test_cpu_extension_is_registered_in_ci():
    if os.environ.get("CI"):
        assert _ext.has_kernel("agreement_counts", "cpu"), _ext.extension_error("_C")


@pytest.mark.parametrize("R,M,C", SHAPES)
def test_all_cpu_implementations_match_naive(R, M, C):
    p = _preds(R, M, C, seed=R * 1000 + M)
    ref = agreement_counts_naive(p)
    assert ref.dtype == torch.int64 and ref.shape == (R, R)
    assert torch.equal(ref.diagonal(), torch.full((R,), M))
    for name, fn in _impls():
        out = fn(p)
        assert out.dtype == torch.int64, name
        assert torch.equal(out, ref), name


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_integer_dtypes(dtype):
    p = _preds(20, 1001, 7, seed=3, dtype=dtype)
    assert torch.equal(fastcurv.agreement_counts(p), agreement_counts_naive(p.long()))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_wide_unsigned_dtypes(dtype):
    """Viewed bit for bit as the signed type for the kernels; the labelled counts compare values."""
    top = {torch.uint16: 2**16 - 1, torch.uint32: 2**32 - 1, torch.uint64: 2**63 - 1}[dtype]
    p = _preds(20, 1001, 7, seed=3)
    p[:, :5] = top  # negative once viewed as signed
    p[3, 5:9] = top - 1
    ref = agreement_counts_naive(p)
    u = p.to(dtype)
    assert torch.equal(fastcurv.agreement_counts(u), ref)
    assert torch.equal(_with("torch", u), ref)
    assert torch.equal(agreement_counts_naive(u), ref)
    assert torch.equal(agreement_counts_onehot(u[:, 9:]), agreement_counts_naive(p[:, 9:]))  # (one-hot: few classes)
    if os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
        pytest.importorskip("triton")
        assert torch.equal(_with("triton", u[:5, :64]), agreement_counts_naive(p[:5, :64]))
    y = p[0].clone()
    y[-5:] = (y[-5:] + 1) % 7
    lab, lab_ref = fastcurv.agreement_counts(u, y.to(dtype)), fastcurv.agreement_counts(p, y)
    for a, b in zip(lab[:5], lab_ref[:5]):
        assert torch.equal(a, b)
    assert int(lab.correct[0]) == 1001 - 5


def test_negative_and_extreme_values():
    g = torch.Generator().manual_seed(1)
    p = torch.randint(-4, 3, (9, 333), generator=g)
    assert torch.equal(fastcurv.agreement_counts(p), agreement_counts_naive(p))
    big = torch.tensor([[2**62, -(2**62), 0, 5], [2**62, 2**62, 0, -5], [-(2**63), 2**63 - 1, 1, 5]])
    assert torch.equal(fastcurv.agreement_counts(big), agreement_counts_naive(big))


def test_all_equal_predictions_and_empty():
    p = torch.full((6, 1000), 3, dtype=torch.int32)
    for _, fn in _impls():
        assert torch.equal(fn(p), torch.full((6, 6), 1000))
    for _, fn in _impls():
        assert fn(torch.zeros(4, 0, dtype=torch.int64)).tolist() == [[0] * 4] * 4
    assert fastcurv.agreement_counts(torch.zeros(0, 5, dtype=torch.int64)).shape == (0, 0)


def test_non_contiguous_input():
    p = _preds(40, 300, 10, seed=5)
    assert torch.equal(fastcurv.agreement_counts(p.T.contiguous().T), agreement_counts_naive(p))
    assert torch.equal(fastcurv.agreement_counts(p[:, ::3]), agreement_counts_naive(p[:, ::3].contiguous()))


def test_triton_interpreted_matches_naive():
    pytest.importorskip("triton")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter test runs on CPU-only machines")
    from fastcurv import triton_kernels

    assert triton_kernels.supports("agreement_counts")
    for R, M, C in [(1, 7, 2), (33, 301, 10), (40, 257, 1000)]:
        p = _preds(R, M, C, seed=M)
        assert torch.equal(triton_kernels.agreement_counts(p), agreement_counts_naive(p)), (R, M, C)
    p = torch.full((3, 50), 9, dtype=torch.int16)
    assert torch.equal(_with("triton", p), torch.full((3, 3), 50))


def test_labelled_counts_match_definitions():
    R, M, C = 13, 517, 4
    p = _preds(R, M, C, seed=11)
    y = torch.randint(0, C, (M,), generator=torch.Generator().manual_seed(2))
    res = fastcurv.agreement_counts(p, y)
    assert isinstance(res, AgreementCounts) and res.num_examples == M
    ok = p == y
    for i in range(R):
        assert int(res.correct[i]) == int(ok[i].sum())
        for j in range(R):
            bc = (ok[i] & ok[j]).sum()
            bws = (~ok[i] & ~ok[j] & (p[i] == p[j])).sum()
            bwd = (~ok[i] & ~ok[j] & (p[i] != p[j])).sum()
            assert (res.both_correct[i, j], res.both_wrong_same[i, j], res.both_wrong_different[i, j]) == (bc, bws, bwd)
    assert torch.equal(res.agree, res.both_correct + res.both_wrong_same)
    with fastcurv.use_kernels("torch"):
        res_t = fastcurv.agreement_counts(p, y)
    for a, b in zip(res[:5], res_t[:5]):
        assert torch.equal(a, b)


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match=r"\[R, M\]"):
        fastcurv.agreement_counts(torch.zeros(5, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer class indices"):
        fastcurv.agreement_counts(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="labels must be"):
        fastcurv.agreement_counts(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    if _ext.has_kernel("agreement_counts", "cpu"):
        with pytest.raises(RuntimeError, match="integer class indices"):
            torch.ops.fastcurv.agreement_counts(torch.zeros(2, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_gpu_kernels_match_naive(dtype):
    for R, M, C in [(1, 7, 2), (70, 4099, 10), (130, 1031, 1000 if dtype != torch.uint8 else 200), (64, 64, 2)]:
        p = _preds(R, M, C, seed=R + M).to(dtype)
        ref = agreement_counts_naive(p.long())
        pc = p.cuda()
        if _ext.has_kernel("agreement_counts", "cuda"):
            assert torch.equal(torch.ops.fastcurv.agreement_counts(pc).cpu(), ref), ("cuda", R, M, C, dtype)
        from fastcurv import triton_kernels

        if triton_kernels.available():
            assert torch.equal(triton_kernels.agreement_counts(pc).cpu(), ref), ("triton", R, M, C, dtype)
        assert torch.equal(fastcurv.agreement_counts(pc).cpu(), ref)


@pytest.mark.gpu
def test_gpu_wide_unsigned_dtypes():
    p = _preds(70, 4099, 10, seed=4)
    ref = agreement_counts_naive(p)
    for dtype in (torch.uint16, torch.uint32, torch.uint64):
        for impl in ("auto", "torch") + (("ext",) if _ext.has_kernel("agreement_counts", "cuda") else ()):
            with fastcurv.use_kernels(impl):
                assert torch.equal(fastcurv.agreement_counts(p.to(dtype).cuda()).cpu(), ref), (dtype, impl)
