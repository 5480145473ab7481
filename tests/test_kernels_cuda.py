"""CUDA kernels of the element-wise ops (csrc/cuda/*.cu, stable ABI).

Without a GPU: the extension must load into this (possibly CPU-only) torch and register a CUDA
kernel for every op (every csrc/cuda file). With a GPU (``gpu`` marker): each CUDA op against its torch reference, next to
the C++ CPU op, in the same parametrised test (devices/impls that are available here).
"""
import glob
import os
import shutil

import pytest
import torch

import fastcurv
from fastcurv import _ext
from fastcurv.ops import (
    ACTIVATIONS,
    act_derivs,
    act_derivs_reference,
    act_rop_bwd,
    act_rop_bwd_reference,
    softmax_ce_hvp,
    softmax_ce_hvp_reference,
)
from oracle import pairwise_ce_product, rowwise_error

CUDA_OPS = ("softmax_ce_hvp", "act_derivs", "act_rop_bwd")
# the C++ CPU ops always; the CUDA ones on a GPU
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


# every op with a CUDA source file (one op per file)
ALL_CUDA_OPS = sorted(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda", "*.cu")))


def _cuda_toolkit_found() -> bool:
    """Whether setup.py finds a CUDA toolkit to build fastcurv._cuda with (its search: CUDA_HOME,
    /usr/local/cuda, the folder of the nvcc on PATH, each holding include/cuda_runtime.h). An editable
    install's build note (``_cuda_build.txt``) stays in the build's temporary folder, so this does not
    rely on it."""
    nvcc = shutil.which("nvcc")
    roots = (os.environ.get("CUDA_HOME"), "/usr/local/cuda",
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None)
    return any(r and os.path.exists(os.path.join(r, "include", "cuda_runtime.h")) for r in roots)


def _must_have_cuda_ext() -> bool:
    """Whether fastcurv._cuda has to load here: where it was built, with FASTCURV_CUDA=1, and in CI
    where a CUDA toolkit is found to compile it with (not on a machine without nvcc)."""
    built = glob.glob(os.path.join(os.path.dirname(fastcurv.__file__), "_cuda*.so"))
    ci = bool(os.environ.get("CI")) and _cuda_toolkit_found()
    return bool(built) or os.environ.get("FASTCURV_CUDA") == "1" or ci


def test_cuda_kernels_registered():
    """fastcurv._cuda loads (it must in CI, with FASTCURV_CUDA=1, or where it was built) and registers a
    CUDA kernel for every op in csrc/cuda."""
    assert {"softmax_ce_hvp", "bn_eval_rop_fwd", "agreement_counts"} <= set(ALL_CUDA_OPS), ALL_CUDA_OPS
    if not fastcurv.cuda_extension_loaded():
        msg = f"fastcurv._cuda did not load: {_ext.extension_error('_cuda')}"
        if _must_have_cuda_ext():
            pytest.fail(msg)
        pytest.skip(msg)
    for op in ALL_CUDA_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastcurv::{op}", "CUDA"), op
        assert _ext.has_kernel(op, "cuda"), op


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype, device, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def _ext_op(op, device):
    if not _ext.has_kernel(op, device):
        pytest.skip(f"no compiled {device} kernel for {op}: {_ext.extension_error('_cuda' if device == 'cuda' else '_C')}")
    return getattr(torch.ops.fastcurv, op)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(3, 4, 7, 13, 3.0), (1, 1, 1, 1, 1.0), (2, 1, 5, 10, 0.0), (2, 4, 6, 10, 1e4), (1, 2, 3, 1000, 2.0)])
def test_softmax_ce_hvp_ext(device, dtype, case):
    B, K, N, C, s = case
    op = _ext_op("softmax_ce_hvp", device)
    g = _gen(N * C)
    probs = (_randn(B, N, C, dtype=torch.float64, device="cpu", gen=g) * s).softmax(-1).to(dtype=dtype, device=device)
    tangent = _randn(B, K, N, C, dtype=dtype, device=device, gen=g)
    out = op(probs, tangent, 0.25)
    assert out.shape == tangent.shape and out.dtype == dtype and out.device == tangent.device
    torch.testing.assert_close(out, softmax_ce_hvp_reference(probs, tangent, 0.25), **TOL[dtype])
    zero = op(probs, torch.zeros_like(tangent), 0.25)
    assert torch.count_nonzero(zero) == 0
    strided = tangent.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(op(probs, strided, 0.25), out, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [11, 1000])
def test_softmax_ce_hvp_ext_confident_rows(device, C):
    """float32 rows with margins up to 60 keep their precision (the kernels pivot on the most
    probable class); two tied most probable classes pivot as the reference does (the first)."""
    op = _ext_op("softmax_ce_hvp", device)
    g = _gen(C)
    z = _randn(2, 6, C, dtype=torch.float64, device="cpu", gen=g)
    z[:, :5, C // 2] += torch.tensor([0.0, 10, 20, 30, 60], dtype=torch.float64)
    z[:, 5, C - 1] = z[:, 5, 3] = 40.0
    p64 = z.softmax(-1)
    t = _randn(2, 3, 6, C, dtype=torch.float64, device="cpu", gen=g)
    p, t32 = p64.float().to(device), t.float().to(device)
    out = op(p, t32, 0.5)
    assert rowwise_error(out, 0.5 * pairwise_ce_product(p64.unsqueeze(1), t)) < 1e-5
    torch.testing.assert_close(out, softmax_ce_hvp_reference(p, t32, 0.5), **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_act_derivs_ext(device, dtype, name):
    op = _ext_op("act_derivs", device)
    kind = ACTIVATIONS[name]
    g = _gen(kind)
    z = _randn(3, 5, 67, dtype=dtype, device=device, gen=g, scale=3.0)
    z[0, 0, :6] = torch.tensor([0.0, -0.0, 1e4, -1e4, 30.0, -30.0], dtype=dtype)
    grad = _randn(3, 5, 67, dtype=dtype, device=device, gen=g)
    d1, d2g = op(z, grad, kind, 0.013)
    r1, r2 = act_derivs_reference(z, grad, kind, 0.013)
    torch.testing.assert_close(d1, r1, **TOL[dtype])
    torch.testing.assert_close(d2g, r2, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 4, 37), (1, 1, 1), (2, 1, 1025), (5, 4, 8)])
@pytest.mark.parametrize("level", ["0", "1", "2"])  # FASTCURV_CPU_LEVEL of the C++ kernel's variants (capped by the CPU)
def test_act_rop_bwd_ext(device, dtype, shape, level, monkeypatch):
    if device != "cpu" and level != "2":
        pytest.skip("ISA levels are a CPU matter")
    monkeypatch.setenv("FASTCURV_CPU_LEVEL", level)
    op = _ext_op("act_rop_bwd", device)
    B, K, M = shape
    g = _gen(M)
    d1, d2g = (_randn(B, M, dtype=dtype, device=device, gen=g) for _ in range(2))
    rz, rg = (_randn(B, K, M, dtype=dtype, device=device, gen=g) for _ in range(2))
    torch.testing.assert_close(op(d1, d2g, rz, rg), act_rop_bwd_reference(d1, d2g, rz, rg), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs_ext(device):
    sce, ad, arb = (_ext_op(op, device) for op in CUDA_OPS)
    assert sce(torch.rand(2, 0, 3, device=device), torch.rand(2, 4, 0, 3, device=device), 1.0).shape == (2, 4, 0, 3)
    d1, d2g = ad(torch.rand(0, 3, device=device), torch.rand(0, 3, device=device), 3, 0.0)
    assert d1.shape == d2g.shape == (0, 3)
    assert arb(torch.rand(2, 0, device=device), torch.rand(2, 0, device=device),
               torch.rand(2, 3, 0, device=device), torch.rand(2, 3, 0, device=device)).shape == (2, 3, 0)


@pytest.mark.gpu
@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13),
                    reason="torch < 2.13: an error raised inside a stable-ABI op crashes the process (seen on torch 2.11)")
def test_cuda_bad_input():
    for op in CUDA_OPS:
        _ext_op(op, "cuda")
    p = torch.rand(2, 3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="does not match probs"):
        torch.ops.fastcurv.softmax_ce_hvp(p, torch.rand(2, 1, 3, 5, device="cuda"), 1.0)
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        torch.ops.fastcurv.softmax_ce_hvp(p, torch.rand(2, 1, 3, 4, device="cuda", dtype=torch.float64), 1.0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.fastcurv.act_derivs(p.half(), p.half(), 1, 0.0)
    with pytest.raises(RuntimeError, match="unknown activation kind"):
        torch.ops.fastcurv.act_derivs(p, p, 9, 0.0)
    with pytest.raises(RuntimeError, match="does not match d1"):
        torch.ops.fastcurv.act_rop_bwd(p[0], p[0], p, p)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "ext", "triton", "torch"])
def test_wrappers_on_gpu(impl):
    """The fastcurv.ops wrappers give the reference result on CUDA tensors under every kernel choice."""
    if impl in ("cuda", "ext"):
        _ext_op("softmax_ce_hvp", "cuda")
    if impl == "triton":
        from fastcurv import triton_kernels

        if not triton_kernels.available():
            pytest.skip("Triton is not installed/usable here")
    g = _gen(5)
    p = _randn(3, 8, 10, dtype=torch.float32, device="cuda", gen=g).softmax(-1)
    t = _randn(3, 4, 8, 10, dtype=torch.float32, device="cuda", gen=g)
    z = _randn(3, 4, 10, dtype=torch.float32, device="cuda", gen=g)
    with fastcurv.use_kernels(impl):
        out = softmax_ce_hvp(p, t, 0.5)
        d1, d2g = act_derivs(p[:, 0], p[:, 1], ACTIVATIONS["gelu"], 0.0)
        r = act_rop_bwd(d1, d2g, z, z * 2)
    torch.testing.assert_close(out, softmax_ce_hvp_reference(p, t, 0.5), **TOL[torch.float32])
    r1, r2 = act_derivs_reference(p[:, 0], p[:, 1], ACTIVATIONS["gelu"], 0.0)
    torch.testing.assert_close(r, act_rop_bwd_reference(r1, r2, z, z * 2), **TOL[torch.float32])


def test_half_inputs_do_not_reach_the_cuda_kernels():
    """The CUDA kernels take float32/float64: float16/bfloat16 CUDA tensors go to Triton or torch
    under every kernel choice (as on CPU), not to a kernel that rejects them (no GPU needed)."""
    if not _ext.has_kernel("act_derivs", "cuda"):
        pytest.skip(f"no CUDA kernels: {_ext.extension_error('_cuda')}")
    for impl in ("ext", "cuda"):
        with fastcurv.use_kernels(impl):
            for op in CUDA_OPS:
                for dtype in (torch.float16, torch.bfloat16):
                    assert _ext.choose(op, torch.device("cuda"), dtype) == "torch", (impl, op, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["auto", "ext", "cuda"])
def test_half_wrappers_on_gpu(impl):
    g = _gen(6)
    z = _randn(3, 10, dtype=torch.float16, device="cuda", gen=g)
    with fastcurv.use_kernels(impl):
        d1, d2g = act_derivs(z, z, ACTIVATIONS["gelu"], 0.0)
    r1, r2 = act_derivs_reference(z.float(), z.float(), ACTIVATIONS["gelu"], 0.0)
    torch.testing.assert_close(d1.float(), r1, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(d2g.float(), r2, rtol=1e-2, atol=1e-2)


def test_cuda_kernels_that_cannot_launch_count_as_absent(monkeypatch):
    """A GPU whose driver is older than the library's static CUDA runtime (or an unsupported
    architecture) fails every launch: the kernels then count as absent, so the wrappers take Triton
    or torch, and extension_error says why (simulated: no GPU needed)."""
    if not fastcurv.cuda_extension_loaded():
        pytest.skip(f"fastcurv._cuda did not load: {_ext.extension_error('_cuda')}")

    def fail():
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "_probe_launch", fail)
    monkeypatch.setattr(_ext, "_cuda_runs", None)
    monkeypatch.setattr(_ext, "_has_kernel", {})
    monkeypatch.setitem(_ext._errors, "_cuda", None)
    with pytest.warns(RuntimeWarning, match="CUDA kernels cannot run on this GPU"):
        assert not _ext.has_kernel("softmax_ce_hvp", "cuda")
    assert "do not run here: CUDA driver version is insufficient" in _ext.extension_error("_cuda")
    assert _ext.has_kernel("softmax_ce_hvp", "cpu")
