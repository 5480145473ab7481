"""Triton kernels (elementwise ops + fused linear R-op) against their torch references.

Each test runs on every device where the Triton kernels can run: CPU tensors under
``TRITON_INTERPRET=1`` (set by conftest.py when there is no GPU) and CUDA tensors (``gpu`` marker).
"""
import os

import pytest
import torch

import fastcurv
from fastcurv.ops import ACTIVATIONS, act_derivs_reference, act_rop_bwd_reference, softmax_ce_hvp_reference
from fastcurv.ops.linear_rop import linear_rop, linear_rop_reference
from oracle import pairwise_ce_product, rowwise_error
from triton_helpers import compile_for_gpu

triton_kernels = pytest.importorskip("fastcurv.triton_kernels")
if not triton_kernels.HAVE_TRITON:
    pytest.skip("triton is not installed", allow_module_level=True)
from fastcurv.triton_kernels import elementwise as tk  # noqa: E402
from fastcurv.triton_kernels import linear_rop as tlr  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype, device, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------- softmax_ce_hvp

SCE_CASES = [  # (B, K, N, C, logit scale)
    (3, 4, 7, 13, 3.0),
    (1, 1, 1, 1, 1.0),
    (2, 1, 5, 10, 0.0),  # zero logits: uniform probabilities
    (2, 4, 6, 10, 1e4),  # huge logits: (nearly) one-hot probabilities, exact zeros
    (1, 2, 3, 1500, 2.0),  # more classes than one block: looped path
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SCE_CASES)
def test_softmax_ce_hvp(device, dtype, case):
    B, K, N, C, s = case
    g = _gen(hash(case) % 1000)
    probs = (_randn(B, N, C, dtype=torch.float64, device="cpu", gen=g) * s).softmax(-1).to(dtype=dtype, device=device)
    tangent = _randn(B, K, N, C, dtype=dtype, device=device, gen=g)
    out = tk.softmax_ce_hvp(probs, tangent, 1.0 / 7.0)
    assert out.shape == tangent.shape and out.dtype == dtype and out.device == tangent.device
    torch.testing.assert_close(out, softmax_ce_hvp_reference(probs, tangent, 1.0 / 7.0), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C, confident", [(11, 5), (1500, 750), (1500, 1497)])
def test_softmax_ce_hvp_confident_rows(device, C, confident):
    """float32 rows with margins up to 60 keep their precision (the kernel pivots on the most
    probable class, in one block and across blocks).

    With C = 1500 the kernel loops over blocks of 1024 classes: class 750 is in the first block,
    class 1497 in the second, so only the latter checks the search across blocks. A kernel that
    looked for the pivot in the first block only (mutation ``range(0, C, BLOCK_C)`` ->
    ``range(0, BLOCK_C, BLOCK_C)`` in the pivot loop of ``_softmax_ce_hvp_kernel``) passed the
    750 case but gives a row-wise relative error of 1.0 here."""
    g = _gen(5)
    z = _randn(1, 5, C, dtype=torch.float64, device="cpu", gen=g)
    z[:, :, confident] += torch.tensor([0.0, 10, 20, 30, 60], dtype=torch.float64)
    p64 = z.softmax(-1)
    t = _randn(1, 2, 5, C, dtype=torch.float64, device="cpu", gen=g)
    out = tk.softmax_ce_hvp(p64.float().to(device), t.float().to(device), 0.5)
    assert rowwise_error(out, 0.5 * pairwise_ce_product(p64.unsqueeze(1), t)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_ce_hvp_zero_tangent_and_noncontiguous(device):
    g = _gen(1)
    probs = _randn(2, 5, 9, dtype=torch.float32, device=device, gen=g).softmax(-1)
    assert torch.count_nonzero(tk.softmax_ce_hvp(probs, torch.zeros(2, 3, 5, 9, device=device), 2.0)) == 0
    t = _randn(2, 9, 5, 3, dtype=torch.float32, device=device, gen=g).permute(0, 3, 2, 1)  # [2, 3, 5, 9], strided
    torch.testing.assert_close(tk.softmax_ce_hvp(probs, t, 2.0), softmax_ce_hvp_reference(probs, t, 2.0), **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_ce_hvp_bad_input(device):
    p = torch.rand(2, 3, 4, device=device)
    with pytest.raises(ValueError, match="does not match probs"):
        tk.softmax_ce_hvp(p, torch.rand(2, 1, 3, 5, device=device), 1.0)
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        tk.softmax_ce_hvp(p[0], torch.rand(2, 1, 3, 4, device=device), 1.0)
    with pytest.raises(TypeError, match="dtype mismatch"):
        tk.softmax_ce_hvp(p, torch.rand(2, 1, 3, 4, device=device, dtype=torch.float64), 1.0)


# ----------------------------------------------------------------------------- act_derivs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_act_derivs(device, dtype, name):
    g = _gen(ACTIVATIONS[name])
    z = _randn(3, 5, 67, dtype=dtype, device=device, gen=g, scale=3.0)
    z[0, 0, :6] = torch.tensor([0.0, -0.0, 1e4, -1e4, 30.0, -30.0], dtype=dtype)  # zeros, saturation
    grad = _randn(3, 5, 67, dtype=dtype, device=device, gen=g)
    kind = ACTIVATIONS[name]
    d1, d2g = tk.act_derivs(z, grad, kind, 0.013)
    r1, r2 = act_derivs_reference(z, grad, kind, 0.013)
    assert d1.shape == z.shape and d1.dtype == dtype
    torch.testing.assert_close(d1, r1, **TOL[dtype])
    torch.testing.assert_close(d2g, r2, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_act_derivs_bad_input(device):
    z = torch.rand(4, 5, device=device)
    with pytest.raises(ValueError, match="differ in shape"):
        tk.act_derivs(z, torch.rand(5, 4, device=device), 1, 0.0)
    with pytest.raises(ValueError, match="unknown activation kind"):
        tk.act_derivs(z, z, 17, 0.0)
    with pytest.raises(TypeError, match="floating-point"):
        tk.act_derivs(z.long(), z.long(), 1, 0.0)


# ----------------------------------------------------------------------------- act_rop_bwd


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 4, 37), (1, 1, 1), (2, 1, 1025), (5, 4, 8)])
def test_act_rop_bwd(device, dtype, shape):
    B, K, M = shape
    g = _gen(M)
    d1, d2g = (_randn(B, M, dtype=dtype, device=device, gen=g) for _ in range(2))
    rz, rg = (_randn(B, K, M, dtype=dtype, device=device, gen=g) for _ in range(2))
    d1[0, 0] = 0.0
    out = tk.act_rop_bwd(d1, d2g, rz, rg)
    torch.testing.assert_close(out, act_rop_bwd_reference(d1, d2g, rz, rg), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_act_rop_bwd_bad_input(device):
    d = torch.rand(2, 5, device=device)
    with pytest.raises(ValueError, match="does not match d1"):
        tk.act_rop_bwd(d, d, torch.rand(2, 3, 4, device=device), torch.rand(2, 3, 4, device=device))
    with pytest.raises(ValueError, match=r"\[B, K, M\]"):
        tk.act_rop_bwd(d, d, torch.rand(2, 3, 5, device=device), torch.rand(2, 3, 4, device=device))


# ----------------------------------------------------------------------------- dispatch through fastcurv.ops


@pytest.mark.parametrize("device", DEVICES)
def test_ops_wrappers_dispatch_to_triton(device, monkeypatch):
    calls = []
    for op in ("softmax_ce_hvp", "act_derivs", "act_rop_bwd"):
        fn = triton_kernels.OPS[op]
        monkeypatch.setitem(triton_kernels.OPS, op, lambda *a, _fn=fn, _op=op: calls.append(_op) or _fn(*a))
    g = _gen(3)
    p = _randn(2, 3, 5, dtype=torch.float32, device=device, gen=g).softmax(-1)
    t = _randn(2, 2, 3, 5, dtype=torch.float32, device=device, gen=g)
    with fastcurv.use_kernels("triton"):
        out = fastcurv.ops.softmax_ce_hvp(p, t, 0.5)
        d1, d2g = fastcurv.ops.act_derivs(p[:, 0], p[:, 1], ACTIVATIONS["tanh"], 0.0)
        r = fastcurv.ops.act_rop_bwd(d1, d2g, t[:, :, 0], t[:, :, 1])
    assert calls == ["softmax_ce_hvp", "act_derivs", "act_rop_bwd"]
    torch.testing.assert_close(out, softmax_ce_hvp_reference(p, t, 0.5), **TOL[torch.float32])
    r1, r2 = act_derivs_reference(p[:, 0], p[:, 1], ACTIVATIONS["tanh"], 0.0)
    torch.testing.assert_close(r, act_rop_bwd_reference(r1, r2, t[:, :, 0], t[:, :, 1]), **TOL[torch.float32])


@pytest.mark.parametrize("impl", ["auto", "ext"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bn_rop_bwd_half_precision_takes_the_torch_reference(impl, dtype):
    """float16/bfloat16 CPU tensors reached the C++ kernel, which rejects them ("xh must be float32
    or float64"; with the extension not built, kernels 'ext' raised "not available"):
    ``ops.bn_rop_bwd`` asked ``_ext.choose`` without the dtype. Now they take the torch reference."""
    g = _gen(6)
    N, K, G, S = 4, 2, 3, 5
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    x = dict(xh=mk(N, G, S), g=mk(N, G, S), rg=mk(N, K, G, S), inv=mk(G).abs() + 0.5, gamma=mk(G), rgamma=mk(K, G))
    with fastcurv.use_kernels(impl):
        out = fastcurv.ops.bn_rop_bwd(**x)
    assert torch.equal(out, fastcurv.ops.bn_rop_bwd_reference(**x))


# ----------------------------------------------------------------------------- fused linear R-op

LR_CASES = [  # (R, K, N, I, O, activation, has_ra, has_bias)
    (3, 4, 37, 45, 29, "tanh", True, True),
    (1, 1, 20, 33, 40, None, False, False),
    (3, 1, 33, 64, 65, "relu", True, True),
    (1, 4, 17, 40, 9, "leaky_relu", False, True),
    (3, 5, 9, 31, 33, "gelu", True, False),  # K=5: two probe blocks
    (1, 2, 7, 16, 5, "sigmoid", True, True),
]


def _linear_inputs(case, dtype, device, seed=0):
    R, K, N, I, O, _, has_ra, has_b = case
    g = _gen(seed + R * 100 + K * 10 + I)
    mk = lambda *s, scale=1.0: _randn(*s, dtype=dtype, device=device, gen=g, scale=scale)  # noqa: E731
    return dict(
        a=mk(R, N, I),
        ra=mk(R, K, N, I) if has_ra else None,
        W=mk(R, O, I, scale=I ** -0.5),
        dW=mk(R, K, O, I),
        b=mk(R, O) if has_b else None,
        db=mk(R, K, O) if has_b else None,
    )


def _assert_linear_close(out, ref, dtype, rtol=None):
    for name, x, y in zip(out._fields, out, ref):
        scale = y.abs().max().clamp_min(1.0)
        tol = TOL[dtype] if rtol is None else dict(rtol=rtol, atol=rtol)
        torch.testing.assert_close(x / scale, y / scale, msg=lambda m: f"{name}: {m}", **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LR_CASES)
def test_linear_rop(device, dtype, case):
    act = case[5]
    x = _linear_inputs(case, dtype, device)
    out = tlr.linear_rop(**x, activation=act, slope=0.07, block=(32, 32, 32))
    ref = linear_rop_reference(**x, activation=act, slope=0.07)
    R, K, N, I, O = case[:5]
    assert out.z.shape == (R, N, O) and out.rz.shape == (R, K, N, O) and out.rh.shape == (R, K, N, O)
    _assert_linear_close(out, ref, dtype)
    if act is None:
        assert out.h is out.z and out.rh is out.rz


@pytest.mark.parametrize("device", DEVICES)
def test_linear_rop_strided_zero_and_wrapper(device):
    """Input shared by all replicas as a stride-0 view, zero tangents, and the ops wrapper under 'triton'."""
    R, K, N, I, O = 3, 2, 19, 40, 33
    g = _gen(7)
    x = _randn(N, I, dtype=torch.float32, device=device, gen=g)
    a = x.expand(R, N, I)
    W = _randn(R, I, O, dtype=torch.float32, device=device, gen=g).transpose(1, 2)  # non-contiguous [R, O, I]
    dW = torch.zeros(R, K, O, I, device=device)
    b = _randn(R, O, dtype=torch.float32, device=device, gen=g)
    out = tlr.linear_rop(a, None, W, dW, b, None, "relu", block=(32, 32, 32))
    assert torch.count_nonzero(out.rz) == 0 and torch.count_nonzero(out.rh) == 0
    _assert_linear_close(out, linear_rop_reference(a, None, W, dW, b, None, "relu"), torch.float32)
    dW = _randn(R, K, O, I, dtype=torch.float32, device=device, gen=g)
    with fastcurv.use_kernels("triton"):
        out = linear_rop(a, None, W, dW, b, None, "tanh")
    _assert_linear_close(out, linear_rop_reference(a, None, W, dW, b, None, "tanh"), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_rop_bad_input(device):
    a, W = torch.rand(2, 5, 4, device=device), torch.rand(2, 3, 4, device=device)
    with pytest.raises(ValueError, match="dW must be"):
        tlr.linear_rop(a, None, W, torch.rand(2, 1, 3, 5, device=device))
    with pytest.raises(ValueError, match="ra must be"):
        tlr.linear_rop(a, torch.rand(2, 2, 5, 4, device=device), W, torch.rand(2, 1, 3, 4, device=device))
    with pytest.raises(ValueError, match="unknown activation"):
        tlr.linear_rop(a, None, W, torch.rand(2, 1, 3, 4, device=device), activation="swish")
    with pytest.raises(ValueError, match="tile sizes"):
        tlr.linear_rop(a, None, W, torch.rand(2, 1, 3, 4, device=device), block=(32, 24, 32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_keeps_relative_precision_near_zero(device, dtype):
    """The kernels' tanh was (1 - e) / (1 + e) with e = exp(-2|z|), and 1 - e cancels for small |z|:
    float32 gave tanh(z) = 0 for |z| < 6e-8 (relative error 1), 0.4 at 1e-7, 1.4e-3 at 1e-5; float64
    2e-5 at 1e-12. Now it uses an accurate expm1: act_derivs' sigma''(z) g and linear_rop's
    h = tanh(z) agree with torch to a few ulps, relative, from 1e-30 to saturation."""
    rtol = 16 * torch.finfo(dtype).eps
    mags = [1e-30, 1e-12, 1e-9, 1e-7, 1e-5, 1e-3, 0.1, 0.3, 0.6]
    z = torch.tensor(mags + [-m for m in mags], dtype=dtype, device=device)
    _, d2g = tk.act_derivs(z, torch.ones_like(z), ACTIVATIONS["tanh"], 0.0)
    _, want = act_derivs_reference(z, torch.ones_like(z), ACTIVATIONS["tanh"], 0.0)
    torch.testing.assert_close(d2g, want, rtol=rtol, atol=0)
    z = torch.cat([z, torch.tensor([2.0, -5.0, 9.0, 40.0], dtype=dtype, device=device)])
    a = (z[:, None] / 16).expand(-1, 16).reshape(1, -1, 16).contiguous()  # row n: z_n = sum of 16 z_n / 16
    W, dW = torch.ones(1, 16, 16, dtype=dtype, device=device), torch.zeros(1, 1, 16, 16, dtype=dtype, device=device)
    out = tlr.linear_rop(a, None, W, dW, activation="tanh", block=(16, 16, 16))
    torch.testing.assert_close(out.h, torch.tanh(out.z), rtol=rtol, atol=0)


@pytest.mark.skipif(not INTERPRET, reason="runs the kernel in the interpreter on a virtual CPU allocation")
def test_linear_rop_addresses_rows_past_2_to_the_31():
    """Offsets within one replica (row index * stride, for a, ra, W and dW) are int64: in int32 they
    wrapped once they passed 2**31 elements (e.g. the fused engine's ra view, row stride K * I, with
    N * K * I >= 2**31) and the kernel silently read other memory: here row 2 came from storage
    element 0, z[0, 2, 0] = 1600 instead of 48. All operands are views of 3 rows 2**30 elements
    apart from element 2**31 of an 8 GiB float16 allocation that stays virtual but for 3 pages."""
    S = 2**30
    try:
        big = torch.empty(2**32 + 64, dtype=torch.float16)
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve 8 GiB of virtual memory here")
    big[:16] = 100.0  # where a wrapped offset of row 2 lands
    for n in range(3):
        big[2**31 + n * S:2**31 + n * S + 16] = float(n + 1)
    rows = big.as_strided((1, 3, 16), (0, S, 1), 2**31)  # [1, 3, 16]: rows of 1s, 2s, 3s
    probes = big.as_strided((1, 1, 3, 16), (0, 0, S, 1), 2**31)
    out = tlr.linear_rop(rows, probes, rows, probes, block=(16, 16, 16))  # a, ra, W, dW
    v = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(out.z[0].float(), 16 * torch.outer(v, v), rtol=0, atol=0)
    torch.testing.assert_close(out.rz[0, 0].float(), 32 * torch.outer(v, v), rtol=0, atol=0)


@pytest.mark.gpu
def test_linear_rop_tf32_gpu():
    case = (2, 4, 100, 96, 70, "gelu", True, True)
    x = _linear_inputs(case, torch.float32, "cuda")
    out = tlr.linear_rop(**x, activation="gelu", allow_tf32=True)
    _assert_linear_close(out, linear_rop_reference(**x, activation="gelu"), torch.float32, rtol=5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gpu(dtype):
    g = _gen(11)
    z = _randn(4, 300, dtype=dtype, device="cuda", gen=g)
    grad = _randn(4, 300, dtype=dtype, device="cuda", gen=g)
    d1, d2g = tk.act_derivs(z, grad, ACTIVATIONS["gelu"], 0.0)
    r1, r2 = act_derivs_reference(z.double(), grad.double(), ACTIVATIONS["gelu"], 0.0)
    torch.testing.assert_close(d1.double(), r1, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(d2g.double(), r2, rtol=1e-2, atol=1e-2)
    case = (2, 2, 64, 64, 64, "tanh", True, True)
    x = _linear_inputs(case, dtype, "cuda")
    out = tlr.linear_rop(**x, activation="tanh")
    ref = linear_rop_reference(**{k: (v.double() if v is not None else None) for k, v in x.items()}, activation="tanh")
    for o, r in zip(out, ref):
        scale = r.abs().max().clamp_min(1.0)
        torch.testing.assert_close(o.double() / scale, r / scale, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- ahead-of-time GPU compilation

def test_triton_kernels_compile_for_gpu(tmp_path):
    """The interpreter skips Triton's GPU compiler: compile the kernels to sm_90 cubins (no GPU needed)."""
    compile_for_gpu(tmp_path, r'''
from fastcurv.triton_kernels import elementwise as ew, linear_rop as lr
comp(ew._softmax_ce_hvp_kernel, "fp32", dict(BLOCK_R=64, BLOCK_C=16, F64=False))
comp(ew._act_derivs_kernel, "fp64", dict(KIND=5, BLOCK=1024, F64=True))
comp(ew._act_rop_bwd_kernel, "fp32", dict(BLOCK=1024, F64=False))
for dt, tdt, kb, bn in (("fp32", torch.float32, 4, 32), ("fp64", torch.float64, 2, 32), ("bf16", torch.bfloat16, 1, 64)):
    comp(lr._linear_rop_kernel, dt, dict(HAS_RA=True, HAS_B=True, HAS_DB=True, KIND=3, STORE_H=True, BN=bn, BO=bn,
                                         BI=32, KB=kb, F64=dt == "fp64", PREC=lr._input_precision(tdt, False)))
''')


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 3])
def test_fused_engine_forward_through_linear_rop(device, K, monkeypatch):
    """Under kernels 'triton' the fused MLP engine runs every Linear layer's R-forward (with the
    activation after it) through the Triton linear_rop: a smooth activation (whose pre-activation
    tangent the backward pass reads), ReLU, a layer without bias, an input column dropped as zero;
    the products equal dense float64 Hessians."""
    from torch import nn
    from fastcurv.backends.fused import mlp_state
    from models import replicas
    from oracle import dense_hessian

    calls = []
    real = triton_kernels.OPS["linear_rop"]
    monkeypatch.setitem(triton_kernels.OPS, "linear_rop", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(mlp_state, "ZERO_COLUMNS_MIN_ROWS", 8)
    models = replicas(lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Linear(4, 3)), R=2)
    g = _gen(3)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    x[:, 1] = 0
    y = torch.randint(0, 3, (20,), generator=g)
    with fastcurv.use_kernels("triton"):
        op = fastcurv.HessianOperator([m.to(device) for m in models], (x.to(device), y.to(device)), backend="fused")
        V = torch.randn(2, K, op.P, generator=g, dtype=torch.float64)
        HV = op.matvec(V.to(device)).cpu()
    assert len(calls) == 3 and calls[0] == (2, 20, 5)  # one call per Linear; the zero column left out
    for r in range(2):
        H = dense_hessian(models[r].cpu(), [(x, y)])
        torch.testing.assert_close(HV[r], V[r] @ H.T, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not INTERPRET, reason="runs the kernel in the interpreter")
def test_agreement_kernel_addresses_rows_past_2_to_the_31():
    """Rows that start past element 2**31 (R * M >= 2**31, e.g. 1000 replicas x 2.2M examples) are
    addressed in int64: int32 offsets wrapped and the kernel read out of bounds (a segfault in the
    interpreter, so it runs in a child process). Three rows 2**30 + 64 apart in an untouched
    (virtual) allocation."""
    import subprocess
    import sys

    code = """
import torch
from fastcurv.triton_kernels.agreement import _agreement_kernel
S, M = 2**30 + 64, 100
big = torch.empty(3 * S, dtype=torch.uint8)
for r, v in enumerate((1, 1, 2)):
    big[r * S:r * S + M] = v
big[2 * S + 7] = 1
out = torch.zeros(3, 3, dtype=torch.int64)
_agreement_kernel[(1, 1)](big.as_strided((3, M), (S, 1)), out, 3, M, S, BLOCK_R=4, BLOCK_M=64)
print(out.tolist())
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str([[100, 100, 1], [100, 100, 1], [1, 1, 100]])
