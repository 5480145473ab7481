"""csr_from_dense (the CSR form of stacked dense matrices): the C++ kernel against the torch reference."""
import pytest
import torch

import fastcurv
from fastcurv.ops import csr_from_dense, csr_from_dense_reference
from fastcurv.ops.csr_linear import CsrRows

needs_ext = pytest.mark.skipif(not fastcurv.cpu_extension_loaded(), reason="C++ extension not loaded (fastcurv._ext.extension_error() says why)")


def _relu_like(G, M, F, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(G, M, F, generator=g, dtype=dtype).clamp_min(0)
    x[0, 0] = 0  # an empty row
    x[-1, :, 1] = 0  # an empty column
    x[0, 1] = 1.5  # a full row
    return x


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 5, 3), (3, 70, 130), (2, 129, 64)])
@pytest.mark.parametrize("transpose", [False, True])
def test_kernel_matches_reference(dtype, shape, transpose):
    """Rows and columns across 64-entry mask words (tails included), with and without a mask (which
    stores zeros too), from a contiguous tensor and from a slice with a wider replica stride."""
    x = _relu_like(*shape, dtype)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.3
    wide = torch.zeros(shape[0], shape[1] + 2, shape[2], dtype=dtype)
    wide[:, 1:-1] = x
    wide_mask = torch.zeros(shape[0], shape[1] + 3, shape[2], dtype=torch.bool)
    wide_mask[:, 2:-1] = mask
    for xx in (x, wide[:, 1:-1]):
        for m in (None, mask, wide_mask[:, 2:-1]):
            with fastcurv.use_kernels("ext"):
                got = csr_from_dense(xx, m, transpose)
            want = csr_from_dense_reference(x, None if m is None else mask, transpose)
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and torch.equal(a, b)
    X = CsrRows.stacked(x, transpose=transpose)
    dense = x.transpose(1, 2).reshape(-1, shape[1]) if transpose else x.reshape(-1, shape[2])
    torch.testing.assert_close(X.to_dense(), dense, rtol=0, atol=0)


@needs_ext
def test_all_zero_and_all_stored():
    z = torch.zeros(2, 3, 4)
    with fastcurv.use_kernels("ext"):
        indptr, indices, values = csr_from_dense(z)
        assert indptr.tolist() == [0] * 7 and indices.numel() == 0 and values.numel() == 0
        indptr, indices, values = csr_from_dense(z, torch.ones(2, 3, 4, dtype=torch.bool), transpose=True)
    assert indptr.tolist() == list(range(0, 25, 3)) and indices.tolist() == [0, 1, 2] * 8 and not values.any()


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match=r"floating-point \[G, M, F\]"):
        csr_from_dense(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="mask must be a bool tensor of x's shape"):
        csr_from_dense(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))
