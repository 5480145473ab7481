"""fastcurv.ops.bn_eval_rop_fwd / bn_eval_rop_bwd, the R-ops of an eval BatchNorm fused with the
derivative of the activation that reads its output.

* The torch references against torch.func: the forward against the directional derivative (jvp)
  of eval BatchNorm followed by ReLU, the backward against the directional derivative of their
  vector-Jacobian product, so the formulas themselves are checked, not only their implementations.
* The C++ CPU kernels, the Triton kernels (TRITON_INTERPRET=1 on CPU, or CUDA) and the CUDA kernels
  (``gpu`` marker) against the references on random inputs, every combination of the optional
  operands, and edge cases; clear errors on bad input.
* The fused engine runs its eval BatchNorms through the ops and matches the autograd backend with
  every kernel choice, the Triton kernels included.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcurv
from fastcurv import _ext
from fastcurv.ops import bn_eval_rop_bwd, bn_eval_rop_bwd_reference, bn_eval_rop_fwd, bn_eval_rop_fwd_reference
from triton_helpers import BN_MULTI_TILE, INTERPRET, TRITON_DEVICES, compile_for_gpu, triton_kernels_or_skip

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
# (the reason says why: no library, or one that failed to load, e.g. built against another torch)
needs_ext = pytest.mark.skipif(not (_ext.has_kernel("bn_eval_rop_fwd", "cpu") and _ext.has_kernel("bn_eval_rop_bwd", "cpu")),
                               reason=f"C++ kernels bn_eval_rop_fwd/bwd not loaded: "
                                      f"{_ext.extension_error() or 'not in fastcurv._C'}")
# which optional operands are given: (affine: xh and rgamma / crg, rbeta, d1, delta)
FLAGS = list(itertools.product([True, False], repeat=4))
FLAG_IDS = ["".join(n for n, f in zip(("A", "B", "D", "G"), fl) if f) or "none" for fl in FLAGS]


def fwd_inputs(N, K, G, S, flags, dtype=torch.float64, device="cpu", seed=0, scale=1.0):
    """Positional arguments of bn_eval_rop_fwd: (rz, scale, xh, rgamma, rbeta, d1, delta); d1 is a
    ReLU mask (0/1) like the engine's, with a few LeakyReLU slopes."""
    affine, beta, act, grad = flags
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64) * scale  # noqa: E731
    d1 = torch.where(torch.rand(N, G, S, generator=gen, dtype=torch.float64) > 0.5, 1.0, 0.1)
    args = (rnd(N, K, G, S), rnd(G), rnd(N, G, S) if affine else None, rnd(K, G) if affine else None,
            rnd(K, G) if beta else None, d1 if act else None, rnd(N, G, S) if grad else None)
    return tuple(None if t is None else t.to(dtype=dtype, device=device) for t in args)


def bwd_inputs(N, K, G, S, flags, dtype=torch.float64, device="cpu", seed=0, scale=1.0):
    """Positional arguments of bn_eval_rop_bwd: (rd, scale, xh, delta, crg, d1)."""
    affine, _, act, grad = flags
    rz, sc, xh, _, crg, d1, delta = fwd_inputs(N, K, G, S, (affine, grad, act, grad), dtype, device, seed, scale)
    return rz, sc, xh, delta, crg, d1


def double(args):
    return tuple(None if t is None or isinstance(t, bool) else t.double() for t in args)


# ----------------------------------------------------------------------------- the formulas


@pytest.mark.parametrize("S", [1, 5])
def test_references_are_the_derivatives_of_batchnorm_relu(S):
    """Forward: d/dt relu(BN(x + t dx; gamma + t dgamma, beta + t dbeta)). Backward: d/dt of the
    vector-Jacobian product of the same map along the same tangents and dg; its input part is the
    updated rd, its weight and bias parts are sum_uxh + inv * dot and sum_u."""
    N, K, G, eps = 6, 2, 3, 1e-5
    gen = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x, g = rnd(N, G, S), rnd(N, G, S)
    mean, var = rnd(G) * 0.3, rnd(G).abs() + 0.5
    gamma, beta = rnd(G), rnd(G)
    dx, dgamma, dbeta, dg = rnd(K, N, G, S), rnd(K, G), rnd(K, G), rnd(K, N, G, S)

    def f(x_, w, b):
        return torch.relu(F.batch_norm(x_, mean, var, w, b, False, 0.0, eps))

    def vjp(x_, w, b, g_):
        return torch.func.vjp(f, x_, w, b)[1](g_)

    inv = torch.rsqrt(var + eps)
    xh = (x - mean.view(1, G, 1)) * inv.view(1, G, 1)
    d1 = (f(x, gamma, beta) > 0).double()
    delta = g * d1  # the loss gradient w.r.t. the BatchNorm output
    want_f = torch.stack([torch.func.jvp(f, (x, gamma, beta), (dx[k], dgamma[k], dbeta[k]))[1] for k in range(K)], 1)
    want_b = [torch.func.jvp(vjp, (x, gamma, beta, g), (dx[k], dgamma[k], dbeta[k], dg[k]))[1] for k in range(K)]
    args_f = (dx.transpose(0, 1).contiguous(), gamma * inv, xh, dgamma, dbeta, d1, delta)
    args_b = (dg.transpose(0, 1).contiguous(), gamma * inv, xh, delta, dgamma * inv, d1)
    impls = ["torch"] + (["ext"] if _ext.has_kernel("bn_eval_rop_fwd", "cpu") else [])
    for impl in impls:
        with fastcurv.use_kernels(impl):
            out, dot = bn_eval_rop_fwd(*args_f)
            rg, sum_u, sum_uxh = bn_eval_rop_bwd(args_b[0].clone(), *args_b[1:])
        torch.testing.assert_close(out, want_f, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(rg, torch.stack([w[0] for w in want_b], 1), rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(sum_uxh + inv * dot, torch.stack([w[1] for w in want_b]), rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(sum_u, torch.stack([w[2] for w in want_b]), rtol=1e-11, atol=1e-12)


# ----------------------------------------------------------------------------- C++ kernels

# the last three span several tiles of groups: 2 of 102 groups, one group per tile (S > 4096), 2 of 4096 groups
SHAPES = [(2, 1, 3, 1), (7, 3, 4, 1), (33, 2, 70, 1), (3, 3, 2, 5), (1, 2, 3, 4), (5, 1, 6, 9), (2, 2, 5, 37),
          (2, 2, 130, 40), (1, 2, 2, 4100), (2, 1, 4200, 1)]


@needs_ext
@pytest.mark.parametrize("level", ["0", "1", "2"])  # FASTCURV_CPU_LEVEL: baseline, AVX2, AVX-512 (capped by the CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
def test_cpu_kernels_match_references(dtype, shape, flags, level, monkeypatch):
    monkeypatch.setenv("FASTCURV_CPU_LEVEL", level)
    args = fwd_inputs(*shape, flags, dtype=dtype, seed=sum(shape))
    want_out, want_dot = bn_eval_rop_fwd_reference(*double(args))
    rz = args[0].clone()
    with fastcurv.use_kernels("ext"):
        out, dot = bn_eval_rop_fwd(rz, *args[1:], inplace=True)
    assert out.data_ptr() == rz.data_ptr() and out.dtype == dtype
    torch.testing.assert_close(out, want_out.to(dtype), **TOL[dtype])
    torch.testing.assert_close(dot, want_dot.to(dtype), **TOL[dtype])
    with fastcurv.use_kernels("ext"):  # out of place: rz is left alone
        out2, _ = bn_eval_rop_fwd(*args)
    assert torch.equal(out2, out) and out2.data_ptr() != args[0].data_ptr()

    args = bwd_inputs(*shape, flags, dtype=dtype, seed=sum(shape) + 1)
    for input_grad in (True, False):
        want = bn_eval_rop_bwd_reference(args[0].double().clone(), *double(args[1:]), input_grad=input_grad)
        rd = args[0].clone()
        with fastcurv.use_kernels("ext"):
            got = bn_eval_rop_bwd(rd, *args[1:], input_grad=input_grad)
        assert got[0] is rd
        if not input_grad:
            assert torch.equal(rd, args[0])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b.to(dtype), **TOL[dtype])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernels_edge_cases(dtype):
    fwd, bwd = torch.ops.fastcurv.bn_eval_rop_fwd, torch.ops.fastcurv.bn_eval_rop_bwd
    flags = (True, True, True, True)
    # zero tangents: zero output and sums
    rz, sc, xh, rgamma, rbeta, d1, delta = fwd_inputs(4, 2, 3, 6, flags, dtype=dtype)
    z = torch.zeros_like
    r = z(rz)
    assert fwd(r, sc, xh, z(rgamma), z(rbeta), d1, delta).abs().max() == 0 and r.abs().max() == 0
    sums = bwd(r, sc, xh, delta, z(rgamma), d1, True)
    assert all(t.abs().max() == 0 for t in sums) and r.abs().max() == 0
    # large values: a near-constant channel with inv = 1/sqrt(eps) and tangents ~1e4
    args = list(fwd_inputs(6, 3, 4, 3, flags, dtype=dtype, scale=1e4, seed=3))
    args[1] = args[1].clone()
    args[1][1] = 1e-5 ** -0.5
    want = bn_eval_rop_fwd_reference(*double(args))
    r = args[0].clone()
    dot = fwd(r, *args[1:])
    assert torch.isfinite(r).all() and torch.isfinite(dot).all()
    for a, b in ((r, want[0]), (dot, want[1])):
        torch.testing.assert_close(a.double() / b.abs().max(), b / b.abs().max(), **TOL[dtype])
    # non-contiguous operands give the contiguous result; a non-contiguous rd is read without input_grad
    rz, sc, xh, rgamma, rbeta, d1, delta = fwd_inputs(5, 3, 4, 2, flags, dtype=dtype, seed=4)
    t = lambda a: a.transpose(0, 1).contiguous().transpose(0, 1)  # noqa: E731
    r1, r2 = rz.clone(), rz.clone()
    torch.testing.assert_close(fwd(r1, sc, t(xh), t(rgamma), t(rbeta), t(d1), t(delta)), fwd(r2, sc, xh, rgamma, rbeta, d1, delta))
    assert torch.equal(r1, r2)
    torch.testing.assert_close(bwd(t(rz), sc, xh, None, None, d1, False), bwd(rz.clone(), sc, xh, None, None, d1, False))
    # empty probe axis and empty batch
    assert fwd(rz[:, :0], sc, xh, rgamma[:0], rbeta[:0], d1, delta).shape == (0, 4)
    assert bwd(rz[:0].contiguous(), sc, xh[:0], delta[:0], rgamma, d1[:0], True)[0].abs().max() == 0


@needs_ext
def test_cpu_kernels_errors_name_the_problem():
    fwd, bwd = torch.ops.fastcurv.bn_eval_rop_fwd, torch.ops.fastcurv.bn_eval_rop_bwd
    rz, sc, xh, rgamma, rbeta, d1, delta = fwd_inputs(4, 2, 3, 2, (True, True, True, True), dtype=torch.float32)
    with pytest.raises(RuntimeError, match="rz must be"):
        fwd(rz[0], sc, xh, rgamma, rbeta, d1, delta)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        fwd(rz.transpose(0, 1), sc, None, None, None, None, None)
    with pytest.raises(RuntimeError, match="scale must be"):
        fwd(rz, sc[:2], xh, rgamma, rbeta, d1, delta)
    with pytest.raises(RuntimeError, match="xh and rgamma must be given together"):
        fwd(rz, sc, xh, None, rbeta, d1, delta)
    with pytest.raises(RuntimeError, match="rbeta must be"):
        fwd(rz, sc, xh, rgamma, rbeta.t(), d1, delta)
    with pytest.raises(RuntimeError, match="dtype mismatch, d1"):
        fwd(rz, sc, xh, rgamma, rbeta, d1.double(), delta)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        fwd(rz.half(), sc.half(), None, None, None, None, None)
    with pytest.raises(RuntimeError, match="delta and crg must be given together"):
        bwd(rz, sc, xh, delta, None, d1, True)
    with pytest.raises(RuntimeError, match="input_grad overwrites rd"):
        bwd(rz.transpose(0, 1), sc, None, None, None, None, True)
    with pytest.raises(RuntimeError, match="xh must be"):
        bwd(rz, sc, xh[:, :2], delta, rgamma, d1, True)
    # the references and wrappers raise the same complaints
    with pytest.raises(ValueError, match="rgamma must be"):
        bn_eval_rop_fwd_reference(rz, sc, xh, rgamma[:1], rbeta, d1, delta)
    with pytest.raises(TypeError, match="dtype mismatch, crg"):
        bn_eval_rop_bwd_reference(rz, sc, xh, delta, rgamma.double(), d1)
    with pytest.raises(ValueError, match="inplace needs a contiguous rz"):
        bn_eval_rop_fwd(rz.transpose(0, 1), sc, inplace=True)


# ----------------------------------------------------------------------------- Triton kernels


def check_kernels(fwd, bwd, shape, dtype, device, flags=FLAGS):
    """fwd(rz, scale, xh, rgamma, rbeta, d1, delta) -> dot, in place on rz, and bwd(rd, scale, xh,
    delta, crg, d1, input_grad) -> (sum_u, sum_uxh), in place on rd, against the references (in
    float64) for each combination of the optional operands in ``flags`` (default: every one;
    Triton and CUDA kernels)."""
    for flags in flags:
        args = fwd_inputs(*shape, flags, dtype=dtype, device=device, seed=sum(shape))
        want_out, want_dot = bn_eval_rop_fwd_reference(*double(args))
        rz = args[0].clone()
        dot = fwd(rz, *args[1:])
        torch.testing.assert_close(rz, want_out.to(dtype), **TOL[dtype])
        torch.testing.assert_close(dot, want_dot.to(dtype), **TOL[dtype])
        args = bwd_inputs(*shape, flags, dtype=dtype, device=device, seed=sum(shape) + 1)
        for input_grad in (True, False):
            want = bn_eval_rop_bwd_reference(args[0].double().clone(), *double(args[1:]), input_grad=input_grad)
            rd = args[0].clone()
            sums = bwd(rd, *args[1:], input_grad)
            for a, b in zip((rd, *sums), want):
                torch.testing.assert_close(a, b.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 3, 4, 1), (9, 2, 37, 1), (1, 2, 3, 4), (2, 2, 3, 9)], ids=lambda s: "x".join(map(str, s)))
def test_triton_kernels_match_references(device, dtype, shape):
    tk = triton_kernels_or_skip()
    check_kernels(tk.bn_eval_rop_fwd, tk.bn_eval_rop_bwd, shape, dtype, device)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", BN_MULTI_TILE, ids=lambda s: "x".join(map(str, s)))
def test_triton_kernels_sum_over_several_tiles(device, dtype, shape):
    """Shapes whose sums over the N * S samples take more than one tile (the other tests' fit in
    one), with every operand and with delta only. Without them, kernels whose sums kept one tile
    only (``acc += r * ...`` -> ``acc = r * ...`` in _bn_eval_rop_fwd_kernel, ``a_u += u`` ->
    ``a_u = u`` in _bn_eval_rop_bwd_kernel, or a loop over the first tile only) passed every test,
    with errors of 17 in ``dot`` and 22 in ``sum_u`` (float64, (40, 2, 37, 1))."""
    tk = triton_kernels_or_skip()
    check_kernels(tk.bn_eval_rop_fwd, tk.bn_eval_rop_bwd, shape, dtype, device,
                  flags=[(True, True, True, True), (False, False, False, True)])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_dispatch_edge_cases_and_errors(device, monkeypatch):
    tk = triton_kernels_or_skip()
    calls = []
    fns = {op: tk.OPS[op] for op in ("bn_eval_rop_fwd", "bn_eval_rop_bwd")}
    for op, fn in fns.items():
        monkeypatch.setitem(tk.OPS, op, lambda *a, _fn=fn, _op=op: calls.append(_op) or _fn(*a))
    rz, sc, xh, rgamma, rbeta, d1, delta = fwd_inputs(4, 2, 3, 2, (True, True, True, True), dtype=torch.float32, device=device)
    with fastcurv.use_kernels("triton"):
        out, dot = bn_eval_rop_fwd(rz, sc, xh, rgamma, rbeta, d1, delta)
        got = bn_eval_rop_bwd(rz.clone(), sc, xh, delta, rgamma, d1)
    assert calls == ["bn_eval_rop_fwd", "bn_eval_rop_bwd"]
    for a, b in zip((out, dot), bn_eval_rop_fwd_reference(rz, sc, xh, rgamma, rbeta, d1, delta)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    for a, b in zip(got, bn_eval_rop_bwd_reference(rz.clone(), sc, xh, delta, rgamma, d1)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    fwd, bwd = fns["bn_eval_rop_fwd"], fns["bn_eval_rop_bwd"]
    # a non-contiguous rd is read without input_grad; no samples: zero sums
    t = rz.transpose(0, 1).contiguous().transpose(0, 1)
    for a, b in zip(bwd(t, sc, xh, None, None, d1, False), bwd(rz.clone(), sc, xh, None, None, d1, False)):
        torch.testing.assert_close(a, b)
    assert torch.equal(t, rz)
    sums = bwd(rz[:0].contiguous(), sc, xh[:0], delta[:0], rgamma, d1[:0], True)
    assert [s.shape for s in sums] == [(2, 3), (2, 3)] and all(s.abs().max() == 0 for s in sums)
    assert fwd(rz[:0].contiguous(), sc, None, None, None, None, delta[:0]).abs().max() == 0
    with pytest.raises(ValueError, match="rz is written in place and must be contiguous"):
        fwd(rz.transpose(0, 1), sc, None, None, None, None, None)
    with pytest.raises(ValueError, match="input_grad overwrites rd"):
        bwd(rz.transpose(0, 1), sc, None, None, None, None, True)
    with pytest.raises(ValueError, match="xh and rgamma must be given together"):
        fwd(rz, sc, xh, None, rbeta, d1, delta)
    with pytest.raises(TypeError, match="dtype mismatch, crg"):
        bwd(rz, sc, xh, delta, rgamma.double(), d1, True)


def test_triton_kernels_compile_for_gpu(tmp_path):
    """Without a GPU the interpreter skips Triton's compiler: compile both kernels to sm_90."""
    triton_kernels_or_skip()
    compile_for_gpu(tmp_path, r'''
from fastcurv.triton_kernels import batchnorm as bn
for dt in ("fp32", "fp64"):
    for bg, on in ((1, True), (32, True), (32, False)):  # every optional operand, or none
        tile = dict(BLOCK_E=1024 // bg, BLOCK_G=bg, F64=dt == "fp64")
        comp(bn._bn_eval_rop_fwd_kernel, dt, dict(HAS_XH=on, HAS_RBETA=on, HAS_D1=on, HAS_DELTA=on, **tile))
        comp(bn._bn_eval_rop_bwd_kernel, dt, dict(HAS_XH=on, HAS_DELTA=on, HAS_D1=on, INPUT_GRAD=on, **tile))
''')


# ----------------------------------------------------------------------------- CUDA kernels


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 3, 4, 1), (1, 2, 3, 4), (64, 4, 40, 49), (300, 2, 130, 1)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_kernels_match_references(dtype, shape):
    if not (_ext.has_kernel("bn_eval_rop_fwd", "cuda") and _ext.has_kernel("bn_eval_rop_bwd", "cuda")):
        pytest.skip(f"no CUDA kernels: {_ext.extension_error('_cuda')}")
    fwd, bwd = torch.ops.fastcurv.bn_eval_rop_fwd, torch.ops.fastcurv.bn_eval_rop_bwd
    check_kernels(fwd, bwd, shape, dtype, "cuda")
    rz, sc, xh, rgamma, rbeta, d1, delta = fwd_inputs(4, 2, 3, 2, (True, True, True, True), dtype=dtype, device="cuda")
    with fastcurv.use_kernels("cuda"):  # through the wrapper, out of place
        got = bn_eval_rop_fwd(rz, sc, xh, rgamma, rbeta, d1, delta)
    for a, b in zip(got, bn_eval_rop_fwd_reference(rz, sc, xh, rgamma, rbeta, d1, delta)):
        torch.testing.assert_close(a, b, **TOL[dtype])
    t = rz.transpose(0, 1).contiguous().transpose(0, 1)
    for a, b in zip(bwd(t, sc, xh, None, None, d1, False), bwd(rz.clone(), sc, xh, None, None, d1, False)):
        torch.testing.assert_close(a, b)
    sums = bwd(rz[:0].contiguous(), sc, xh[:0], delta[:0], rgamma, d1[:0], True)
    assert [s.shape for s in sums] == [(2, 3), (2, 3)] and all(s.abs().max() == 0 for s in sums)
    with pytest.raises(RuntimeError, match="scale must be"):
        fwd(rz, sc[:1], None, None, None, None, None)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        bwd(rz, sc, xh.cpu(), None, None, None, True)
    with pytest.raises(RuntimeError, match="input_grad overwrites rd"):
        bwd(rz.transpose(0, 1), sc, None, None, None, None, True)
    with pytest.raises(RuntimeError, match="dtype mismatch, d1"):
        fwd(rz, sc, None, None, None, d1.float() if dtype == torch.float64 else d1.double(), None)


# ----------------------------------------------------------------------------- the fused engine


def _eval_bn_net():
    # conv -> BN2d -> ReLU -> pool; linear -> BN1d (no affine) -> LeakyReLU; linear -> BN1d -> Tanh: three biases
    # folded into the BatchNorms, two activations fused with them (not Tanh, whose second derivative is not zero)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8, 5), nn.BatchNorm1d(5, affine=False), nn.LeakyReLU(0.2), nn.Linear(5, 4),
                         nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))


IMPLS = ["torch", pytest.param("ext", marks=needs_ext),
         pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1"))]


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_engine_runs_eval_batchnorm_through_the_ops(impl, monkeypatch):
    """The fused engine's eval BatchNorm R-passes go through ops.bn_eval_rop_fwd/bwd, once per
    BatchNorm and batch each, and its products equal the autograd backend's with every kernel choice
    (the Triton kernels under the interpreter: the path CUDA tensors take by default)."""
    import fastcurv.backends.fused.maps as fused
    from oracle import ragged

    if impl == "triton":
        triton_kernels_or_skip()
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    models = [_eval_bn_net().double() for _ in range(2)]
    with torch.no_grad():  # random running statistics and affine parameters
        for b in (b for m in models for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)):
            b.running_mean.normal_(generator=gen)
            b.running_var.uniform_(0.5, 1.5, generator=gen)
            for p in (b.weight, b.bias) if b.affine else ():
                p.normal_(generator=gen)
    x = torch.randn(7, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    batches = ragged(x, y, [4, 3])
    calls = []
    for name in ("bn_eval_rop_fwd", "bn_eval_rop_bwd"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _n=name, _f=real, **k: calls.append((_n, a[0].shape)) or _f(*a, **k))
    fused_op = fastcurv.HessianOperator(models, batches, backend="fused")
    engine = fused_op.backend._maps
    assert len(engine.bn_act) == 2 and len(engine.bias_folded) == 3
    V = torch.randn(2, 3, fused_op.P, generator=gen, dtype=torch.float64)
    want = fastcurv.HessianOperator(models, batches, backend="autograd").matvec(V)
    with fastcurv.use_kernels(impl):
        got = fused_op.matvec(V)
    assert sorted({c[0] for c in calls}) == ["bn_eval_rop_bwd", "bn_eval_rop_fwd"]
    assert len(calls) == 2 * 3 * len(batches) and all(shape[1] == 3 for _, shape in calls)  # [N, K, G, S], K = 3
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
