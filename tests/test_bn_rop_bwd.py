"""fastcurv.ops.bn_rop_bwd, the input-gradient R-op of a batch-statistics BatchNorm.

* The torch reference against the directional derivative (torch.func.jvp) of torch's own BatchNorm
  input gradient, so the formula itself is checked, not only its implementations.
* The C++ CPU kernel, the Triton kernel (TRITON_INTERPRET=1 on CPU, or CUDA) and the CUDA kernel
  (``gpu`` marker) against the reference on random inputs and edge cases; clear errors on bad input.
* The fused engine with ``bn_mode="batch"`` calls the op and matches the autograd backend.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcurv
from fastcurv import _ext
from fastcurv.ops import bn_rop_bwd, bn_rop_bwd_reference
from models import cnn, replicas
from oracle import ragged
from triton_helpers import BN_MULTI_TILE, TRITON_DEVICES, compile_for_gpu, triton_kernels_or_skip

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float32: dict(rtol=1e-4, atol=2e-5), torch.float64: dict(rtol=1e-11, atol=1e-12)}
# (the reason says why: no library, or one that failed to load, e.g. built against another torch)
needs_ext = pytest.mark.skipif(not _ext.has_kernel("bn_rop_bwd", "cpu"),
                               reason=f"C++ kernel bn_rop_bwd not loaded: {_ext.extension_error() or 'not in fastcurv._C'}")


def make_inputs(N, K, G, S, dtype=torch.float64, device="cpu", affine=True, tangent=True, seed=0, scale=1.0):
    """Consistent inputs built from a random BatchNorm input x (so xh has zero mean, unit variance
    up to eps): returns the positional argument tuple of bn_rop_bwd."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = rnd(N, G, S) * 2 + 0.5
    var, mean = torch.var_mean(x, (0, 2), correction=0, keepdim=True)
    inv = torch.rsqrt(var + 1e-5)
    xh = (x - mean) * inv
    g, rg = rnd(N, G, S) * scale, rnd(N, K, G, S) * scale
    gamma = rgamma = rxh = m2 = None
    if affine:
        gamma, rgamma = rnd(G), rnd(K, G)
    if tangent:
        dx = rnd(N, K, G, S)
        xh4 = xh.unsqueeze(1)
        m2 = (dx * xh4).mean((0, 3))
        rxh = (dx - dx.mean((0, 3), keepdim=True) - xh4 * m2[None, :, :, None]) * inv.view(1, 1, G, 1)
    args = (xh, g, rg, inv.reshape(G), gamma, rgamma, rxh, m2)
    return tuple(None if t is None else t.to(dtype=dtype, device=device) for t in args)


# ----------------------------------------------------------------------------- the formula itself


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("S", [1, 3])
def test_reference_is_the_derivative_of_batchnorm_backward(affine, S):
    """The reference equals d/dt of torch's BatchNorm input gradient along (dx, dgamma, dg)."""
    N, K, G, eps = 6, 2, 3, 1e-5
    gen = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x, g = rnd(N, G, S) * 1.5 + 0.3, rnd(N, G, S)
    gamma, beta = (rnd(G), rnd(G)) if affine else (None, None)
    dx, dg, dgamma = rnd(K, N, G, S), rnd(K, N, G, S), rnd(K, G)

    def input_grad(x_, gamma_, g_):
        fwd = lambda t: F.batch_norm(t, None, None, gamma_, beta, True, 0.0, eps)  # noqa: E731
        return torch.func.vjp(fwd, x_)[1](g_)[0]

    want = []
    for k in range(K):
        if affine:
            want.append(torch.func.jvp(input_grad, (x, gamma, g), (dx[k], dgamma[k], dg[k]))[1])
        else:
            want.append(torch.func.jvp(lambda a, b: input_grad(a, None, b), (x, g), (dx[k], dg[k]))[1])
    want = torch.stack(want, 1)  # [N, K, G, S]

    var, mean = torch.var_mean(x, (0, 2), correction=0, keepdim=True)
    inv = torch.rsqrt(var + eps)
    xh = (x - mean) * inv
    dxt, xh4 = dx.transpose(0, 1), xh.unsqueeze(1)
    m2 = (dxt * xh4).mean((0, 3))
    rxh = (dxt - dxt.mean((0, 3), keepdim=True) - xh4 * m2[None, :, :, None]) * inv.view(1, 1, G, 1)
    args = (xh, g, dg.transpose(0, 1), inv.reshape(G), gamma, dgamma if affine else None, rxh, m2)
    torch.testing.assert_close(bn_rop_bwd_reference(*args), want, rtol=1e-10, atol=1e-11)
    if _ext.has_kernel("bn_rop_bwd", "cpu"):
        with fastcurv.use_kernels("ext"):
            torch.testing.assert_close(bn_rop_bwd(*args), want, rtol=1e-10, atol=1e-11)


# ----------------------------------------------------------------------------- C++ kernel

SHAPES = [  # (N, K, G, S): S=1 is BatchNorm1d; N=1 needs S>1 (batch statistics of one value are degenerate)
    (2, 1, 3, 1),
    (7, 3, 4, 1),
    (3, 3, 2, 5),
    (1, 2, 3, 4),
    (5, 1, 6, 9),
    (33, 2, 70, 1),
]


@needs_ext
@pytest.mark.parametrize("level", ["0", "1", "2"])  # FASTCURV_CPU_LEVEL: baseline, AVX2, AVX-512 (capped by the CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("affine,tangent", [(True, True), (True, False), (False, True), (False, False)])
def test_cpu_kernel_matches_reference(dtype, shape, affine, tangent, level, monkeypatch):
    monkeypatch.setenv("FASTCURV_CPU_LEVEL", level)
    args = make_inputs(*shape, dtype=dtype, affine=affine, tangent=tangent, seed=sum(shape))
    with fastcurv.use_kernels("ext"):
        got = bn_rop_bwd(*args)
    assert got.shape == args[2].shape and got.dtype == dtype
    want = bn_rop_bwd_reference(*(None if t is None else t.double() for t in args))
    torch.testing.assert_close(got, want.to(dtype), **TOL[dtype])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernel_edge_cases(dtype):
    op = torch.ops.fastcurv.bn_rop_bwd
    # zero gradients and tangents: zero output
    xh, g, rg, inv, gamma, rgamma, rxh, m2 = make_inputs(4, 2, 3, 2, dtype=dtype)
    z = torch.zeros_like
    assert op(xh, z(g), z(rg), inv, gamma, z(rgamma), z(rxh), z(m2)).abs().max() == 0
    # large values (gradients ~1e4, a near-constant channel with inv = 1/sqrt(eps))
    args = list(make_inputs(6, 3, 4, 3, dtype=dtype, scale=1e4, seed=3))
    args[3] = args[3].clone()
    args[3][1] = 1e-5 ** -0.5
    want = bn_rop_bwd_reference(*(None if t is None else t.double() for t in args))
    got = op(*args)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double() / want.abs().max(), want / want.abs().max(), **TOL[dtype])
    # non-contiguous inputs (views) give the contiguous result
    xh, g, rg, inv, gamma, rgamma, rxh, m2 = make_inputs(5, 3, 4, 2, dtype=dtype, seed=4)
    rg_t = rg.transpose(1, 2).contiguous().transpose(1, 2)
    rgamma_t = rgamma.t().contiguous().t()
    torch.testing.assert_close(op(xh, g, rg_t, inv, gamma, rgamma_t, rxh, m2), op(xh, g, rg, inv, gamma, rgamma, rxh, m2))
    # empty probe axis
    assert op(xh, g, rg[:, :0], inv, gamma, rgamma[:0], rxh[:, :0], m2[:0]).shape == (5, 0, 4, 2)


@needs_ext
def test_cpu_kernel_errors_name_the_problem():
    op = torch.ops.fastcurv.bn_rop_bwd
    xh, g, rg, inv, gamma, rgamma, rxh, m2 = make_inputs(4, 2, 3, 2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="rg must be"):
        op(xh, g, rg[:, :, :2], inv, gamma, rgamma, rxh, m2)
    with pytest.raises(RuntimeError, match="inv must be"):
        op(xh, g, rg, inv[:2], gamma, rgamma, rxh, m2)
    with pytest.raises(RuntimeError, match="gamma and rgamma must be given together"):
        op(xh, g, rg, inv, gamma, None, rxh, m2)
    with pytest.raises(RuntimeError, match="rxh and m2 must be given together"):
        op(xh, g, rg, inv, gamma, rgamma, rxh, None)
    with pytest.raises(RuntimeError, match="m2 must be"):
        op(xh, g, rg, inv, gamma, rgamma, rxh, m2.t())
    with pytest.raises(RuntimeError, match="dtype mismatch, rg"):
        op(xh, g, rg.double(), inv, gamma, rgamma, rxh, m2)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(xh.half(), g.half(), rg.half(), inv.half(), None, None, None, None)
    # the reference raises the same complaints
    with pytest.raises(ValueError, match="rgamma must be"):
        bn_rop_bwd_reference(xh, g, rg, inv, gamma, rgamma[:1], rxh, m2)
    with pytest.raises(TypeError, match="dtype mismatch, m2"):
        bn_rop_bwd_reference(xh, g, rg, inv, gamma, rgamma, rxh, m2.double())


# ----------------------------------------------------------------------------- Triton kernel

@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 3, 4, 1), (9, 2, 37, 1), (1, 2, 3, 4), (3, 1, 2, 5), (2, 2, 3, 9), *BN_MULTI_TILE],
                         ids=lambda s: "x".join(map(str, s)))
def test_triton_kernel_matches_reference(device, dtype, shape):
    """Every combination of the affine parameters and the input tangent. The BN_MULTI_TILE shapes
    reduce over more than one tile of samples: without them, a kernel that summed the first tile
    only (``for e0 in range(0, NS, BLOCK_E)`` -> ``range(0, BLOCK_E, BLOCK_E)`` in
    _bn_rop_bwd_sums_kernel) passed every test, with errors of 0.04 to 1 on (40, 2, 37, 1)."""
    tk = triton_kernels_or_skip()
    for affine, tangent in [(True, True), (True, False), (False, False), (False, True)]:
        args = make_inputs(*shape, dtype=dtype, device=device, affine=affine, tangent=tangent, seed=sum(shape))
        got = tk.bn_rop_bwd(*args)
        want = bn_rop_bwd_reference(*(None if t is None else t.double() for t in args))
        torch.testing.assert_close(got, want.to(dtype), **TOL[dtype])


def test_multi_tile_shapes_take_several_tiles():
    """BN_MULTI_TILE (also used by test_bn_eval_rop.py) still spans several tiles of samples, the
    last one ragged, with the kernels' current tile sizes."""
    triton_kernels_or_skip()
    from fastcurv.triton_kernels.batchnorm import _tile_shape

    for N, K, G, S in BN_MULTI_TILE:
        block_e = _tile_shape(N, G, S)[1]
        assert block_e < N * S and (N * S) % block_e != 0, (N, K, G, S, block_e)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_dispatch_and_errors(device, monkeypatch):
    tk = triton_kernels_or_skip()
    calls = []
    fn = tk.OPS["bn_rop_bwd"]
    monkeypatch.setitem(tk.OPS, "bn_rop_bwd", lambda *a: calls.append(1) or fn(*a))
    args = make_inputs(4, 2, 3, 2, dtype=torch.float32, device=device)
    with fastcurv.use_kernels("triton"):
        got = bn_rop_bwd(*args)
    assert calls == [1]
    torch.testing.assert_close(got, bn_rop_bwd_reference(*args), **TOL[torch.float32])
    xh, g, rg, inv, gamma, rgamma, rxh, m2 = args
    with pytest.raises(ValueError, match="rxh .* must have the shape of rg"):
        fn(xh, g, rg, inv, gamma, rgamma, rxh[:1], m2)


def test_triton_kernels_compile_for_gpu(tmp_path):
    """Without a GPU the interpreter skips Triton's compiler: compile both kernels to sm_90."""
    triton_kernels_or_skip()
    compile_for_gpu(tmp_path, r'''
from fastcurv.triton_kernels import batchnorm as bn
for dt in ("fp32", "fp64"):
    for bg in (1, 32):
        comp(bn._bn_rop_bwd_sums_kernel, dt, dict(HAS_AFFINE=True, HAS_RXH=True, BLOCK_E=1024 // bg, BLOCK_G=bg, F64=dt == "fp64"))
    comp(bn._bn_rop_bwd_apply_kernel, dt, dict(HAS_RXH=True, BLOCK=1024, F64=dt == "fp64"))
''')


# ----------------------------------------------------------------------------- CUDA kernel


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 3, 4, 1), (1, 2, 3, 4), (64, 4, 40, 49), (300, 2, 130, 1)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_kernel_matches_reference(dtype, shape):
    if not _ext.has_kernel("bn_rop_bwd", "cuda"):
        pytest.skip(f"no CUDA kernel: {_ext.extension_error('_cuda')}")
    for affine, tangent in [(True, True), (True, False), (False, True), (False, False)]:
        args = make_inputs(*shape, dtype=dtype, device="cuda", affine=affine, tangent=tangent, seed=sum(shape))
        with fastcurv.use_kernels("cuda"):
            got = bn_rop_bwd(*args)
        want = bn_rop_bwd_reference(*(None if t is None else t.double() for t in args))
        torch.testing.assert_close(got, want.to(dtype), **TOL[dtype])
    xh, g, rg, inv, gamma, rgamma, rxh, m2 = args
    with pytest.raises(RuntimeError, match="inv must be"):
        torch.ops.fastcurv.bn_rop_bwd(xh, g, rg, inv[:1], None, None, None, None)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        torch.ops.fastcurv.bn_rop_bwd(xh, g, rg, inv.cpu(), None, None, None, None)


# ----------------------------------------------------------------------------- the fused engine


def _bn_mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 4), nn.BatchNorm1d(4, affine=False),
                         nn.ReLU(), nn.Linear(4, 3))


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_fused_batch_statistics_run_through_the_op(kind, monkeypatch):
    """bn_mode="batch": the fused engine's R-backward goes through ops.bn_rop_bwd, and its products
    equal the autograd backend's, with the compiled kernel and with the torch reference."""
    import fastcurv.backends.fused.maps as fused

    gen = torch.Generator().manual_seed(2)
    if kind == "cnn":
        models = replicas(lambda: cnn("avg"), R=2)  # Conv2d -> BatchNorm2d -> ReLU -> AvgPool -> Linear
        x = torch.randn(8, 1, 4, 4, generator=gen, dtype=torch.float64)
        n_bn = 1
    else:
        torch.manual_seed(2)  # (models.replicas randomizes affine BatchNorms only)
        models = [_bn_mlp().double() for _ in range(3)]
        for m in models:
            with torch.no_grad():
                m[1].weight.normal_(generator=gen)
                m[1].bias.normal_(generator=gen)
        x = torch.randn(9, 5, generator=gen, dtype=torch.float64)
        n_bn = 2
    y = torch.randint(0, 3, (x.shape[0],), generator=gen)
    batches = ragged(x, y, [5, x.shape[0] - 5])
    calls = []
    real = fused.bn_rop_bwd
    monkeypatch.setattr(fused, "bn_rop_bwd", lambda *a: calls.append(a[2].shape) or real(*a))
    R = len(models)
    fused_op = fastcurv.HessianOperator(models, batches, backend="fused", bn_mode="batch")
    ref_op = fastcurv.HessianOperator(models, batches, backend="autograd", bn_mode="batch")
    V = torch.randn(R, 2, fused_op.P, generator=gen, dtype=torch.float64)
    want = ref_op.matvec(V)
    for impl in ("auto", "torch"):
        calls.clear()
        with fastcurv.use_kernels(impl):
            got = fused_op.matvec(V)
        assert len(calls) == n_bn * len(batches), calls
        assert all(s[1] == 2 for s in calls)  # [N, K, G, S] with K = 2 probes
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
