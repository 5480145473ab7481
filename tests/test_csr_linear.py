"""The sparse-input linear layer (``fastcurv.ops.csr_linear``): C++ kernels against dense float64 products."""
import pytest
import torch

import fastcurv
from fastcurv.ops.csr_linear import (CsrRows, csr_linear, csr_linear_reference, csr_linear_wgrad,
                                     csr_linear_wgrad_reference, csr_linear_wgrad_shared, csr_masked_linear,
                                     csr_masked_linear_reference)

needs_ext = pytest.mark.skipif(not fastcurv.cpu_extension_loaded(), reason="C++ extension not loaded (fastcurv._ext.extension_error() says why)")

# Output widths that reach every code path of every variant: tiles of 8 vectors, then passes of 4, 2
# and 1 vectors, of 32- and 16-byte vectors and scalar tails (127 takes all of them), for 16-, 32- and
# 64-byte vectors of float and double.
WIDTHS = [1, 3, 8, 13, 32, 37, 64, 127, 133, 260]


def _sparse_data(n, d, density, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    x[torch.rand(n, d, generator=g) > density] = 0
    x[0] = 0  # an empty row
    if n > 1:
        x[1] = torch.randn(d, generator=g, dtype=dtype)  # a full row
    return x


def test_csr_rows_round_trip_and_density():
    x = _sparse_data(9, 11, 0.3, torch.float64)
    X = CsrRows.from_dense(x)
    assert X.indices.dtype == torch.int32 and X.indptr.dtype == torch.int64
    torch.testing.assert_close(X.to_dense(), x, rtol=0, atol=0)
    assert X.density == pytest.approx(float((x != 0).double().mean()))
    assert int(X.indptr[1] - X.indptr[0]) == 0  # the empty row
    img = x.reshape(9, 1, 11)  # samples of any shape are flattened
    torch.testing.assert_close(CsrRows.from_dense(img).to_dense(), x, rtol=0, atol=0)
    with pytest.raises(TypeError, match="floating-point"):
        CsrRows.from_dense(x.long())
    xt = X.transpose()  # the columns; x has an empty row (an empty column of x^T)
    assert xt.num_rows == 11 and xt.in_features == 9 and xt.indices.dtype == torch.int32
    torch.testing.assert_close(xt.to_dense(), x.t(), rtol=0, atol=0)
    torch.testing.assert_close(xt.transpose().to_dense(), x, rtol=0, atol=0)


def _mask_values(R, B, M, dtype, g):
    """An out_mask ``[R, B, M]`` of zeros, ones and a leaky slope (0.25), as a sliced (strided) view."""
    m = torch.tensor([0.0, 1.0, 0.25], dtype=dtype)[torch.randint(0, 3, (R, B, M + 1), generator=g)]
    return m[..., 1:]


def _layouts(w):
    """``w [R, out, in]`` stored three ways: contiguous, as a transposed ``[R, in, out]`` storage, and
    with a replica stride larger than a block (a slice of a wider buffer)."""
    R, o, i = w.shape
    wide = torch.zeros(R, o * i + 5, dtype=w.dtype)
    strided = wide[:, 3:3 + o * i].view(R, o, i)
    strided.copy_(w)
    return {"contiguous": w.contiguous(), "transposed": w.transpose(1, 2).contiguous().transpose(1, 2), "strided": strided}


@needs_ext
@pytest.mark.parametrize("level", ["0", "1", "2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", ["small", "blocked"])
def test_kernels_match_dense_products(shape, level, dtype, monkeypatch):
    """Every vector variant (FASTCURV_CPU_LEVEL caps the one picked), every tile path, both weight
    layouts and a replica stride, with and without bias, overwriting and accumulating gradients,
    per-replica and shared (stride-0) rows (and for those the weight gradient from the minibatch's
    transpose, csr_linear_wgrad_shared), against float64 dense products. "blocked": more input
    columns than one block of every variant (kBlockBytes) and more minibatch rows than one chunk
    (kRowChunk), with widths whose tiles are used in place and ones gathered into scratch."""
    monkeypatch.setenv("FASTCURV_CPU_LEVEL", level)
    R, B, N, d, widths = (3, 7, 12, 29, WIDTHS) if shape == "small" else (2, 300, 320, 1100, [13, 100, 133, 260])
    x = _sparse_data(N, d, 0.25, dtype)
    X = CsrRows.from_dense(x)
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, N, (R, B), generator=g)
    rows[0, 0], rows[1, 2] = 0, 1  # the empty and the full row
    shared = torch.randint(0, N, (B,), generator=g).expand(R, B)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    if shape == "blocked" and dtype == torch.float32:
        tol = dict(rtol=1e-4, atol=1e-4)  # sums of about 275 products
    for out in widths:
        w = torch.randn(R, out, d, generator=g, dtype=dtype)
        bias = torch.randn(R, out, generator=g, dtype=dtype)
        grad = torch.randn(R, B, out, generator=g, dtype=dtype)
        for rr in (rows, shared):
            xb = x.double()[rr]
            want = torch.bmm(xb, w.double().transpose(1, 2))
            want_g = torch.bmm(grad.double().transpose(1, 2), xb)
            M = out // next(k for k in (4, 2, 1) if out % k == 0)  # out_mask's width: out in groups of M
            mask = _mask_values(R, B, M, dtype, g)
            for name, wl in _layouts(w).items():
                with fastcurv.use_kernels("ext"):
                    z = csr_linear(X, rr, wl, bias)
                    z0 = csr_linear(X, rr, wl)
                    zm = csr_linear(X, rr, wl, bias, out_mask=mask)
                torch.testing.assert_close(z.double(), want + bias.double().unsqueeze(1), **tol, msg=name)
                torch.testing.assert_close(z0.double(), want, **tol, msg=name)
                want_m = (want + bias.double().unsqueeze(1)).view(R, B, -1, M) * mask.double().unsqueeze(2)
                torch.testing.assert_close(zm.double(), want_m.view(R, B, out), **tol, msg=f"out_mask, {name}")
                buf = _layouts(torch.full_like(w, float("nan")))[name]
                start = torch.randn(R, out, d, generator=g, dtype=dtype)
                acc = _layouts(start.clone())[name]
                with fastcurv.use_kernels("ext"):
                    got = csr_linear_wgrad(X, rr, grad, out=buf)
                    csr_linear_wgrad(X, rr, grad, out=acc, accumulate=True)
                assert got is buf
                torch.testing.assert_close(buf.double(), want_g, **tol, msg=name)
                torch.testing.assert_close(acc.double(), start.double() + want_g, **tol, msg=name)
                if rr is shared:
                    Xt = CsrRows.from_dense(x[shared[0]]).transpose()
                    buf, acc = _layouts(torch.full_like(w, float("nan")))[name], _layouts(start.clone())[name]
                    with fastcurv.use_kernels("ext"):
                        assert csr_linear_wgrad_shared(Xt, grad, out=buf) is buf
                        csr_linear_wgrad_shared(Xt, grad, out=acc, accumulate=True)
                    torch.testing.assert_close(buf.double(), want_g, **tol, msg=f"shared, {name}")
                    torch.testing.assert_close(acc.double(), start.double() + want_g, **tol, msg=f"shared, {name}")


def test_masked_rows_and_pattern():
    """from_dense with a mask stores the masked entries, zeros included; pattern() is where."""
    x = _sparse_data(7, 9, 0.5, torch.float64)
    mask = torch.rand(7, 9, generator=torch.Generator().manual_seed(2)) < 0.4
    X = CsrRows.from_dense(x, mask)
    assert X.values.numel() == int(mask.sum())
    assert torch.equal(X.pattern(), mask) and torch.equal(CsrRows.from_dense(x).pattern(), x != 0)
    torch.testing.assert_close(X.to_dense(), x * mask, rtol=0, atol=0)
    torch.testing.assert_close(X.transpose().pattern(), mask.t(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        CsrRows.from_dense(x, mask.double())


@needs_ext
@pytest.mark.parametrize("level", ["0", "1", "2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", ["small", "blocked"])
def test_masked_kernel_matches_dense_products(shape, level, dtype, monkeypatch):
    """csr_masked_linear (every vector variant, tile path, weight layout; K = 1, 3 and 9 rows per
    pattern row, 9 taking the groups of four (AVX-512) or two (AVX2) rows, some cut by the row
    chunks; overwriting and accumulating; with and without out_mask; per-replica and shared rows;
    strided dense / out) against float64 products of the masked dense rows. The dense rows are
    nonzero outside the pattern too: those entries must be ignored."""
    monkeypatch.setenv("FASTCURV_CPU_LEVEL", level)
    R, B, N, d, widths = (3, 7, 12, 29, WIDTHS) if shape == "small" else (2, 300, 320, 1100, [13, 133, 260])
    X = CsrRows.from_dense(_sparse_data(N, d, 0.4, dtype))
    mask = X.pattern()
    g = torch.Generator().manual_seed(4)
    rows = torch.randint(0, N, (R, B), generator=g)
    rows[0, 0], rows[1, 2] = 0, 1  # the empty and the full row
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    if shape == "blocked" and dtype == torch.float32:
        tol = dict(rtol=1e-4, atol=1e-4)
    for K in (1, 3, 9):
        dense = torch.randn(R, B, K, d, generator=g, dtype=dtype)
        masked = dense.double() * mask[rows].unsqueeze(2)
        for rr, mk in ((rows, masked), (rows[:1].expand(R, B), dense.double() * mask[rows[0]].unsqueeze(1))):
            for out in widths:
                w = torch.randn(R, out, d, generator=g, dtype=dtype)
                want = torch.bmm(mk.reshape(R, B * K, d), w.double().transpose(1, 2)).view(R, B, K, out)
                omask = _mask_values(R, B, out, dtype, g).unsqueeze(2)
                for name, wl in _layouts(w).items():
                    start = torch.randn(R, B, K, out, generator=g, dtype=dtype)
                    wide = torch.zeros(R, B * K * out + 3, dtype=dtype)  # a replica stride beyond the rows
                    acc = wide[:, 3:].view(R, B, K, out)
                    acc.copy_(start)
                    acc_m = start.clone()
                    with fastcurv.use_kernels("ext"):
                        z = csr_masked_linear(X, rr, dense, wl)
                        assert csr_masked_linear(X, rr, dense, wl, out=acc, accumulate=True) is acc
                        zm = csr_masked_linear(X, rr, dense, wl, out_mask=omask[:, :, 0])
                        csr_masked_linear(X, rr, dense, wl, out=acc_m, accumulate=True, out_mask=omask[:, :, 0])
                    torch.testing.assert_close(z.double(), want, **tol, msg=f"K={K}, {out} outputs, {name}")
                    torch.testing.assert_close(acc.double(), start.double() + want, **tol, msg=f"K={K}, {name}")
                    torch.testing.assert_close(zm.double(), want * omask.double(), **tol, msg=f"K={K}, out_mask, {name}")
                    torch.testing.assert_close(acc_m.double(), (start.double() + want) * omask.double(), **tol,
                                               msg=f"K={K}, accumulated, out_mask, {name}")


def _grouped(flat_width, G, rows_, cols_, dtype, fill, transposed=False):
    """A ``[R=2, G, rows_, cols_]`` view into a wider ``[2, G, flat_width]`` buffer holding ``fill``
    (the K probe blocks of a flat ``[R, K, P]`` tensor): the groups lie ``flat_width`` apart, after an
    offset of 3; ``transposed``: each group stored as ``[cols_, rows_]``. Returns (view, buffer)."""
    buf = torch.full((2, G, flat_width), fill, dtype=dtype)
    block = buf[..., 3:3 + rows_ * cols_]
    return (block.view(2, G, cols_, rows_).transpose(2, 3) if transposed else block.view(2, G, rows_, cols_)), buf


@needs_ext
@pytest.mark.parametrize("level", ["0", "1", "2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", ["small", "blocked"])
def test_grouped_operands_are_read_and_written_in_place(shape, level, dtype, monkeypatch):
    """Weights ``[R, G, out / G, in]`` (the Hessian engine's probe blocks, G = K probes P apart), in
    both layouts, and the weight gradient of csr_linear_wgrad_shared into such a view (its bias
    gradient, ``bias_out``, into ``[R, G, out / G]`` groups), against float64 dense products; group
    sizes below, at and across a tile (8 vectors: 32-128 columns), so that tiles span several
    groups. The memory between the groups is never written."""
    monkeypatch.setenv("FASTCURV_CPU_LEVEL", level)
    N, d = (9, 29) if shape == "small" else (300, 1100)
    x = _sparse_data(N, d, 0.25, dtype)
    X, Xt, rows = CsrRows.from_dense(x), CsrRows.from_dense(x).transpose(), torch.arange(N).expand(2, N)
    g = torch.Generator().manual_seed(3)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    if shape == "blocked" and dtype == torch.float32:
        tol = dict(rtol=1e-4, atol=1e-4)
    for G, og in ((3, 5), (2, 64), (3, 130), (1, 37)):
        width = og * d + 7
        for transposed in (False, True):
            w, _ = _grouped(width, G, og, d, dtype, 0.0, transposed)
            w.copy_(torch.randn(w.shape, generator=g, dtype=dtype))
            bias = torch.randn(2, G * og, generator=g, dtype=dtype)
            want = torch.bmm(x.double().expand(2, N, d), w.double().reshape(2, G * og, d).transpose(1, 2))
            with fastcurv.use_kernels("ext"):
                torch.testing.assert_close(csr_linear(X, rows, w).double(), want, **tol, msg=f"{G}x{og} {transposed}")
                torch.testing.assert_close(csr_linear(X, rows, w, bias).double(), want + bias.double().unsqueeze(1), **tol)
            with fastcurv.use_kernels("torch"):  # the reference takes the groups too
                torch.testing.assert_close(csr_linear(X, rows, w).double(), want, **tol)
        grad = torch.randn(2, N, G * og, generator=g, dtype=dtype)
        want_g = torch.bmm(grad.double().transpose(1, 2), x.double().expand(2, N, d)).view(2, G, og, d)
        want_b = grad.double().sum(1).view(2, G, og)
        for accumulate in (False, True):
            fill = float("nan") if not accumulate else 2.0
            for kernels in ("ext", "torch"):
                out, buf = _grouped(width, G, og, d, dtype, fill)
                bias_out, bias_buf = _grouped(og + 5, G, og, 1, dtype, fill)  # the bias's [R, G, og], groups apart
                with fastcurv.use_kernels(kernels):
                    assert csr_linear_wgrad_shared(Xt, grad, out=out, accumulate=accumulate,
                                                   bias_out=bias_out[..., 0]) is out
                torch.testing.assert_close(out.double(), want_g + (2.0 if accumulate else 0.0), **tol)
                torch.testing.assert_close(bias_out[..., 0].double(), want_b + (2.0 if accumulate else 0.0), **tol,
                                           msg=f"bias_out, {kernels}")
                for b, n in ((buf, og * d), (bias_buf, og)):
                    gaps = torch.cat([b[..., :3], b[..., 3 + n:]], -1)
                    assert (gaps.isnan() if not accumulate else gaps == 2.0).all(), "written between the groups"
        # one replica: two threads split its rows, and only the one with row 0 adds the bias gradient
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            one = torch.ones(1, G, og, dtype=dtype)
            with fastcurv.use_kernels("ext"):
                csr_linear_wgrad_shared(Xt, grad[:1], out=torch.empty(1, G * og, d, dtype=dtype), accumulate=True,
                                        bias_out=one)
            torch.testing.assert_close(one.double(), want_b[:1] + 1, **tol)
        finally:
            torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="out must be"):
        csr_linear_wgrad_shared(Xt, grad, out=torch.empty(2, 2, G * og, d, dtype=dtype))


@needs_ext
def test_masked_layouts_the_kernel_cannot_read_are_copied():
    """A dense operand or out whose rows are not contiguous goes through a copy: same result."""
    X = CsrRows.from_dense(_sparse_data(8, 6, 0.5, torch.float64))
    rows = torch.arange(8).view(2, 4)
    g = torch.Generator().manual_seed(6)
    dense = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64).transpose(1, 2)  # [2, 4, 3, 6], strided
    w = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    want = csr_masked_linear_reference(X, rows, dense, w)
    out = torch.ones(2, 3, 4, 5, dtype=torch.float64).transpose(1, 2)
    mask = torch.rand(2, 4, 5, generator=g, dtype=torch.float64).round()
    out_m = out.clone()
    with fastcurv.use_kernels("ext"):
        torch.testing.assert_close(csr_masked_linear(X, rows, dense, w), want)
        csr_masked_linear(X, rows, dense, w, out=out, accumulate=True)
        csr_masked_linear(X, rows, dense, w, out=out_m, accumulate=True, out_mask=mask)
    torch.testing.assert_close(out, want + 1)
    torch.testing.assert_close(out_m, (want + 1) * mask.unsqueeze(2))


@needs_ext
def test_references_agree_with_kernels():
    x = _sparse_data(10, 17, 0.2, torch.float64)
    X = CsrRows.from_dense(x)
    rows = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(3))
    w, grad = torch.randn(2, 6, 17, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    with fastcurv.use_kernels("ext"):
        z, gw = csr_linear(X, rows, w), csr_linear_wgrad(X, rows, grad)
    with fastcurv.use_kernels("torch"):
        zr, gr = csr_linear(X, rows, w), csr_linear_wgrad(X, rows, grad)
    torch.testing.assert_close(z, zr)
    torch.testing.assert_close(zr, csr_linear_reference(X, rows, w))
    torch.testing.assert_close(gw, gr)
    torch.testing.assert_close(gr, csr_linear_wgrad_reference(X, rows, grad))
    Xt, shared = CsrRows.from_dense(x[rows[0]]).transpose(), rows[0].expand(2, 5)
    with fastcurv.use_kernels("ext"):
        gs = csr_linear_wgrad_shared(Xt, grad)
    with fastcurv.use_kernels("torch"):
        torch.testing.assert_close(gs, csr_linear_wgrad_shared(Xt, grad))
    torch.testing.assert_close(gs, csr_linear_wgrad_reference(X, shared, grad))
    # per-replica transposes stacked in one CSR matrix, picked by a row table
    xs = torch.stack([x[rows[0]], x[rows[1]]])  # [2, 5, 17]
    Xts, rows_t = CsrRows.from_dense(xs.transpose(1, 2).reshape(34, 5)), torch.arange(34).view(2, 17)
    with fastcurv.use_kernels("ext"):
        gp = csr_linear_wgrad_shared(Xts, grad, rows=rows_t)
    with fastcurv.use_kernels("torch"):
        torch.testing.assert_close(gp, csr_linear_wgrad_shared(Xts, grad, rows=rows_t))
    torch.testing.assert_close(gp, csr_linear_wgrad_reference(X, rows, grad))
    dense = torch.randn(2, 5, 3, 17, dtype=torch.float64)
    with fastcurv.use_kernels("ext"):
        zm = csr_masked_linear(X, rows, dense, w)
    with fastcurv.use_kernels("torch"):
        torch.testing.assert_close(zm, csr_masked_linear(X, rows, dense, w))
    torch.testing.assert_close(zm, torch.einsum("rbki,roi->rbko", dense * (x[rows] != 0).unsqueeze(2), w))
    m2, m6 = torch.rand(2, 5, 2, dtype=torch.float64).round(), torch.rand(2, 5, 6, dtype=torch.float64).round()
    for kernels in ("ext", "torch"):
        with fastcurv.use_kernels(kernels):
            torch.testing.assert_close(csr_linear(X, rows, w, out_mask=m2), (z.view(2, 5, 3, 2) * m2.unsqueeze(2)).view(2, 5, 6))
            torch.testing.assert_close(csr_masked_linear(X, rows, dense, w, out_mask=m6), zm * m6.unsqueeze(2))
    # an out whose rows are not contiguous in either orientation takes the reference path
    odd = torch.zeros(2, 12, 34, dtype=torch.float64)[:, ::2, ::2]
    with fastcurv.use_kernels("ext"):
        csr_linear_wgrad(X, rows, grad, out=odd)
    torch.testing.assert_close(odd, gr)


@needs_ext
def test_bad_inputs_are_named():
    x = _sparse_data(6, 5, 0.5, torch.float32)
    X = CsrRows.from_dense(x)
    rows = torch.zeros(2, 3, dtype=torch.int64)
    w = torch.randn(2, 4, 5)
    ops = torch.ops.fastcurv
    with fastcurv.use_kernels("ext"):
        with pytest.raises(RuntimeError, match=r"rows must lie in \[0, 6\)"):
            csr_linear(X, rows + 6, w)
        with pytest.raises(RuntimeError, match="weight must have contiguous rows"):
            ops.csr_linear(X.indptr, X.indices, X.values, rows, w.transpose(1, 2), None, False)
        with pytest.raises(RuntimeError, match="bias must be"):
            csr_linear(X, rows, w, torch.randn(2, 3))
        with pytest.raises(RuntimeError, match=r"out must be \[R, 4, in\]"):
            ops.csr_linear_wgrad(X.indptr, X.indices, X.values, rows, torch.randn(2, 3, 4), torch.empty(2, 3, 5),
                                 False, False)
        with pytest.raises(RuntimeError, match="a bias cannot be accumulated"):
            ops.csr_linear_out(X.indptr, X.indices, X.values, rows, w, torch.randn(2, 4), False, torch.empty(2, 3, 4),
                               False, True)
        with pytest.raises(RuntimeError, match=r"out must be \[R, out, B\] = \[2, 4, 3\]"):
            ops.csr_linear_out(X.indptr, X.indices, X.values, rows, w, None, False, torch.empty(2, 3, 4), True, False)
        with pytest.raises(ValueError, match="grad must be"):
            csr_linear_wgrad_shared(X.transpose(), torch.randn(2, 3, 4))
        with pytest.raises(ValueError, match=r"rows must be \[R = 2, in\]"):
            csr_linear_wgrad_shared(X.transpose(), torch.randn(2, 6, 4), rows=torch.zeros(3, 5, dtype=torch.int64))
        with pytest.raises(ValueError, match=r"dense must be \[R, B, K, in\] = \[2, 3, K, 5\]"):
            csr_masked_linear(X, rows, torch.randn(2, 3, 5), w)
        with pytest.raises(ValueError, match=r"out must be \[2, 3, 1, 4\]"):
            csr_masked_linear(X, rows, torch.randn(2, 3, 1, 5), w, out=torch.empty(2, 3, 4))
        with pytest.raises(RuntimeError, match="dense's last three dims must be contiguous"):
            ops.csr_masked_linear_out(X.indptr, X.indices, rows, torch.randn(2, 3, 5, 2).transpose(2, 3), w, False,
                                      torch.empty(2, 3, 2, 4), False)
        with pytest.raises(RuntimeError, match="out has 1 rows per minibatch row, dense 2"):
            ops.csr_masked_linear_out(X.indptr, X.indices, rows, torch.randn(2, 3, 2, 5), w, False,
                                      torch.empty(2, 3, 1, 4), False)
        with pytest.raises(ValueError, match=r"out_mask must be \[R, B, M\] = \[2, 3, M\] with M dividing the 4"):
            csr_linear(X, rows, w, out_mask=torch.ones(2, 3, 3))
        with pytest.raises(ValueError, match=r"out_mask must be \[R, B, out\] = \[2, 3, 4\]"):
            csr_masked_linear(X, rows, torch.randn(2, 3, 1, 5), w, out_mask=torch.ones(2, 3, 2))
        with pytest.raises(TypeError, match="out_mask is torch.float64"):
            csr_linear(X, rows, w, out_mask=torch.ones(2, 3, 4, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="out_mask needs z, not z"):
            ops.csr_linear_out(X.indptr, X.indices, X.values, rows, w, None, False, torch.empty(2, 4, 3), True, False,
                               torch.ones(2, 3, 4))
    with pytest.raises(TypeError, match="float32 values but the layer is torch.float64"):
        csr_linear(X, rows, w.double())
    with pytest.raises(ValueError, match=r"int64 \[R, B\] table"):
        csr_linear(X, rows[0], w)


@needs_ext
def test_replica_forward_takes_the_sparse_path_for_mlps(monkeypatch):
    """ReplicaSet.forward (used by the function measures) runs plain MLP chains on sparse inputs
    through the fused forward with csr_linear; the outputs equal vmap over the models."""
    from torch import nn
    from torch.func import vmap

    from fastcurv.replicas import ReplicaSet

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 3)).double() for _ in range(3)]
    rs = ReplicaSet(models)
    x = _sparse_data(20, 12, 0.2, torch.float64).reshape(20, 3, 4)
    calls = []
    orig = torch.ops.fastcurv.csr_linear

    class Spy:
        def __call__(self, *a):
            calls.append(1)
            return orig(*a)

    want = vmap(rs.call, in_dims=(0, 0, None))(rs.params, rs.buffers, x)
    torch.ops.fastcurv.csr_linear = Spy()
    try:
        got = rs.forward(x)
        dense = rs.forward(torch.randn(20, 3, 4, dtype=torch.float64))  # dense inputs: vmap
    finally:
        torch.ops.fastcurv.csr_linear = orig
    assert len(calls) == 1 and dense.shape == (3, 20, 3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rs.forward(x, torch.tensor([2, 0])), want[[2, 0]], rtol=1e-12, atol=1e-12)
    # parameters that need a gradient: the differentiable vmap path
    params = {n: t.clone().requires_grad_(True) for n, t in rs.params.items()}
    rs.forward_with(params, rs.buffers, x).square().sum().backward()
    assert all(p.grad is not None for p in params.values())
    # the CSR form of the last input (x, above) is reused while that tensor is unchanged, rebuilt
    # after an in-place change
    built = []
    orig_from_dense = CsrRows.from_dense
    monkeypatch.setattr(CsrRows, "from_dense", staticmethod(lambda t: built.append(1) or orig_from_dense(t)))
    for _ in range(2):
        torch.testing.assert_close(rs.forward(x), want, rtol=1e-12, atol=1e-12)
    assert built == []
    x[0, 0, 0] = 0.5
    torch.testing.assert_close(rs.forward(x), vmap(rs.call, in_dims=(0, 0, None))(rs.params, rs.buffers, x),
                               rtol=1e-12, atol=1e-12)
    assert built == [1]


@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_shapes_are_checked_against_in_features(impl):
    """A weight or ``out`` narrower than X's in_features, and a CsrRows built by hand with column
    indices past in_features, are refused (the C++ kernels read and wrote out of bounds)."""
    if impl == "ext" and not fastcurv.cpu_extension_loaded():
        pytest.skip("C++ extension not loaded (fastcurv._ext.extension_error() says why)")
    x = torch.zeros(4, 64)
    x[:, -1] = 1.0
    X, rows = CsrRows.from_dense(x), torch.arange(4).view(1, 4)
    with fastcurv.use_kernels(impl):
        with pytest.raises(ValueError, match="the weight takes 16 inputs but X has in_features = 64"):
            csr_linear(X, rows, torch.randn(1, 8, 16))
        with pytest.raises(ValueError, match=r"out must be \[R, out, in\] = \[1, 8, 64\]"):
            csr_linear_wgrad(X, rows, torch.ones(1, 4, 8), out=torch.zeros(1, 16, 8).transpose(1, 2))
    with pytest.raises(ValueError, match=r"column indices must lie in \[0, in_features = 4\)"):
        CsrRows(torch.tensor([0, 1]), torch.tensor([1000], dtype=torch.int32), torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="indptr must rise from 0 to nnz"):
        CsrRows(torch.tensor([0, 2]), torch.tensor([1], dtype=torch.int32), torch.tensor([1.0]), 4)


@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_masked_linear_empty_and_aliased(impl):
    if impl == "ext" and not fastcurv.cpu_extension_loaded():
        pytest.skip("C++ extension not loaded (fastcurv._ext.extension_error() says why)")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen).clamp_min(0)
    P, w = CsrRows.from_dense(x), torch.randn(2, 4, 5, generator=gen)
    with fastcurv.use_kernels(impl):
        for B, K in ((3, 0), (0, 3)):
            rows = torch.randint(0, 6, (2, B), generator=gen)
            z = csr_masked_linear(P, rows, torch.randn(2, B, K, 5, generator=gen), w)
            assert z.shape == (2, B, K, 4)
        dense = torch.randn(2, 3, 2, 5, generator=gen)
        with pytest.raises(ValueError, match="out must not overlap dense"):
            csr_masked_linear(P, torch.randint(0, 6, (2, 3), generator=gen), dense, torch.randn(2, 5, 5, generator=gen),
                              out=dense)


def test_mixed_dtypes_and_half_inputs_of_the_element_wise_ops():
    from fastcurv.ops import act_derivs, act_derivs_reference, act_rop_bwd, activation_kind, softmax_ce_hvp

    z = torch.randn(3, 4)
    with pytest.raises(TypeError, match="act_rop_bwd: dtype mismatch, rz is torch.float64 but rg is torch.float32"):
        act_rop_bwd(z, z, torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(3, 2, 4))
    h = z.half()
    d1, d2g = act_derivs(h, h, activation_kind("gelu"))  # the torch reference (the C++ kernels take float32/64)
    r1, r2 = act_derivs_reference(h, h, activation_kind("gelu"))
    assert d1.dtype == torch.float16 and torch.equal(d1, r1) and torch.equal(d2g, r2)
    p = torch.softmax(torch.randn(2, 3, 4), -1).bfloat16()
    assert softmax_ce_hvp(p, torch.randn(2, 1, 3, 4).bfloat16()).dtype == torch.bfloat16
    assert CsrRows.from_dense(torch.randn(3, 4).half()).values.dtype == torch.float16


@needs_ext
def test_size_one_dimensions_at_any_stride():
    """A size-1 dimension's stride does not matter, but the C++ checks demanded 1 there: a
    one-output ``out`` or one-input ``dense`` made as a transposed view, or a ``[1, 1, 1]`` weight of
    stride 2, were raw C++ errors where the wrapper passed them on (the reference computed them)."""
    g = torch.Generator().manual_seed(0)
    R, B, K = 2, 3, 4
    rows = torch.randint(0, 5, (R, B), generator=g)
    for F, O in ((7, 1), (1, 3)):
        P = CsrRows.from_dense(torch.relu(torch.randn(5, F, generator=g, dtype=torch.float64)) + (F == 1))
        dense = torch.randn(R, B, F, K, generator=g, dtype=torch.float64).transpose(2, 3)  # strides (., K, 1, K) when F = 1
        weight = torch.randn(R, O, F, generator=g, dtype=torch.float64)
        out = torch.zeros(R, B, O, K, dtype=torch.float64).transpose(2, 3)
        want = csr_masked_linear_reference(P, rows, dense, weight)
        torch.testing.assert_close(csr_masked_linear(P, rows, dense, weight, out), want)
        torch.testing.assert_close(out, want)
    X = CsrRows.from_dense(torch.rand(4, 1, generator=g, dtype=torch.float64))
    w = torch.randn(1, 1, 2, dtype=torch.float64)[:, :, ::2]  # [1, 1, 1] of strides (2, 2, 2)
    one = torch.zeros(1, 2, dtype=torch.long)
    torch.testing.assert_close(csr_linear(X, one, w), csr_linear_reference(X, one, w))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_the_references(dtype):
    """float16 / bfloat16 sparse products run the torch references, as the README says: the wrappers
    asked for the C++ kernels without the dtype and raised torch's raw '"csr_linear" not
    implemented for 'Half'' (an MNIST-like half-precision MLP crashed evaluate_population, training
    and the perturbation measures)."""
    x = _sparse_data(10, 17, 0.2, torch.float32)
    X, Xh = CsrRows.from_dense(x), CsrRows.from_dense(x.to(dtype))
    rows = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(3))
    w, grad, dense = torch.randn(2, 6, 17), torch.randn(2, 5, 6), torch.randn(2, 5, 3, 17)
    w, grad, dense = (t.to(dtype).float() for t in (w, grad, dense))  # (exact in both dtypes)
    with fastcurv.use_kernels("ext"):
        got = (csr_linear(Xh, rows, w.to(dtype)), csr_linear_wgrad(Xh, rows, grad.to(dtype)),
               csr_masked_linear(Xh, rows, dense.to(dtype), w.to(dtype)))
        want = (csr_linear(X, rows, w), csr_linear_wgrad(X, rows, grad), csr_masked_linear(X, rows, dense, w))
    for g, r in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r, rtol=2e-2, atol=2e-2)
