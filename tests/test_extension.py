"""The compiled CPU kernels: loaded (in CI), and equal to their torch references; the kernel choice."""
import os

import pytest
import torch

import fastcurv
from fastcurv import _ext, ops
from fastcurv.ops.activation import ACTIVATIONS


def test_extension_loaded_in_ci():
    if not os.environ.get("CI"):
        pytest.skip("only enforced in CI (set CI=1)")
    assert fastcurv.cpu_extension_loaded(), fastcurv._ext.extension_error()
    for op in ("softmax_ce_hvp", "act_derivs", "act_rop_bwd", "bn_rop_bwd", "bn_eval_rop_fwd", "bn_eval_rop_bwd",
               "agreement_counts", "csr_linear", "csr_linear_wgrad", "head_hvp", "sampled_conv", "sampled_conv_wgrad",
               "group_conv", "group_conv_wgrad"):
        assert fastcurv._ext.has_kernel(op, "cpu"), op


needs_ext = pytest.mark.skipif(not fastcurv.cpu_extension_loaded(), reason="C++ extension not loaded (fastcurv._ext.extension_error() says why)")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [1, 4])
def test_softmax_ce_hvp(dtype, K):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 5, generator=gen, dtype=dtype)
    logits[0, 0] = 1e4  # large logits: saturated softmax
    logits[1, 1] = 0.0
    p = torch.softmax(logits, -1)
    t = torch.randn(3, K, 7, 5, generator=gen, dtype=dtype)
    t[2] = 0
    with fastcurv.use_kernels("ext"):
        got = ops.softmax_ce_hvp(p, t, 0.3)
    torch.testing.assert_close(got, ops.softmax_ce_hvp_reference(p, t, 0.3))


@needs_ext
@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_act_derivs(name, dtype):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(4, 33, generator=gen, dtype=dtype) * 3
    z[0, :3] = torch.tensor([0.0, 50.0, -50.0], dtype=dtype)
    g = torch.randn(4, 33, generator=gen, dtype=dtype)
    kind = ACTIVATIONS[name]
    with fastcurv.use_kernels("ext"):
        d1, d2g = ops.act_derivs(z, g, kind, 0.1)
    r1, r2 = ops.act_derivs_reference(z, g, kind, 0.1)
    torch.testing.assert_close(d1, r1)
    torch.testing.assert_close(d2g, r2)


@needs_ext
@pytest.mark.parametrize("name", ["tanh", "gelu", "sigmoid"])
def test_act_derivs_match_autograd(name):
    z = torch.randn(50, dtype=torch.float64, requires_grad=True)
    f = {"tanh": torch.tanh, "gelu": torch.nn.functional.gelu, "sigmoid": torch.sigmoid}[name]
    (d1_auto,) = torch.autograd.grad(f(z).sum(), z, create_graph=True)
    (d2_auto,) = torch.autograd.grad(d1_auto.sum(), z)
    g = torch.randn(50, dtype=torch.float64)
    d1, d2g = ops.act_derivs(z.detach(), g, ACTIVATIONS[name])
    torch.testing.assert_close(d1, d1_auto.detach())
    torch.testing.assert_close(d2g, d2_auto * g)


@needs_ext
@pytest.mark.parametrize("K", [1, 3])
def test_act_rop_bwd(K):
    gen = torch.Generator().manual_seed(2)
    d1, d2g = torch.randn(5, 17, generator=gen), torch.randn(5, 17, generator=gen)
    rz, rg = torch.randn(5, K, 17, generator=gen), torch.randn(5, K, 17, generator=gen)
    with fastcurv.use_kernels("ext"):
        got = ops.act_rop_bwd(d1, d2g, rz, rg)
    torch.testing.assert_close(got, ops.act_rop_bwd_reference(d1, d2g, rz, rg))


@needs_ext
def test_op_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="probs must be"):
        torch.ops.fastcurv.softmax_ce_hvp(torch.randn(3, 4), torch.randn(3, 1, 3, 4), 1.0)
    with pytest.raises(RuntimeError, match="unknown activation kind"):
        torch.ops.fastcurv.act_derivs(torch.randn(3), torch.randn(3), 99, 0.0)


def test_kernel_choice_switch():
    with fastcurv.use_kernels("torch"):
        assert fastcurv.kernel_impl() == "torch"
        assert fastcurv._ext.choose("softmax_ce_hvp", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError):
        fastcurv.set_kernel_impl("fortran")


@pytest.fixture
def cuda_library(monkeypatch):
    """``set(loaded, why)``: fastcurv._cuda simulated as loaded (as after a ``FASTCURV_CUDA=1`` build;
    with no CUDA device its kernels count as running), or as absent for the reason ``why``."""
    if not fastcurv.cpu_extension_loaded():
        pytest.skip("C++ extension not loaded (fastcurv._ext.extension_error() says why)")
    monkeypatch.setattr(_ext, "_has_kernel", {})
    monkeypatch.setattr(_ext, "_cuda_runs", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # (no probe launch)

    def set_state(loaded: bool, why: str | None = None):
        _ext._has_kernel.clear()
        monkeypatch.setitem(_ext._loaded, "_cuda", "/site-packages/fastcurv/_cuda.abi3.so" if loaded else None)
        monkeypatch.setitem(_ext._errors, "_cuda", why)

    return set_state


@pytest.mark.parametrize("impl", ["ext", "cuda"])
def test_an_op_with_no_cuda_kernel_runs_its_reference_on_cuda_tensors(cuda_library, impl):
    """Under 'ext' / 'cuda', an op with no CUDA kernel (csr_linear, csr_linear_wgrad) on CUDA tensors
    raised "CUDA kernel for csr_linear requested but fastcurv._cuda is not built/loaded: None" where
    fastcurv._cuda was loaded: the op simply has none. It runs its torch reference now, as the other
    CPU-only ops do; an op whose CUDA library is missing still raises, with the reason."""
    cuda = torch.device("cuda")
    cuda_library(loaded=True)
    assert fastcurv.cuda_extension_loaded()
    with fastcurv.use_kernels(impl):
        for op in ("csr_linear", "csr_linear_wgrad"):
            assert _ext.choose(op, cuda) == "torch", op
        assert _ext.choose("csr_linear", torch.device("cpu")) == "ext"
    cuda_library(loaded=False, why="no compiled library _cuda (the build said: nvcc not found)")
    with fastcurv.use_kernels(impl), pytest.raises(RuntimeError, match="act_rop_bwd .* not usable: .*nvcc not found"):
        _ext.choose("act_rop_bwd", cuda)


@pytest.mark.parametrize("impl", ["ext", "cuda"])
def test_a_cpu_only_op_runs_its_reference_off_the_cpu_without_the_cuda_library(cuda_library, impl):
    """The ops with only a C++ kernel (``CPU_ONLY_OPS``) run their torch reference on any other device
    under every kernel choice, also where fastcurv._cuda is missing: choose() raised "CUDA kernel for
    head_hvp requested but fastcurv._cuda is not usable" there (and "compiled kernel ... not
    available" on a 'meta' tensor), which every wrapper avoided by a device test of its own."""
    cuda_library(loaded=False, why="no compiled library _cuda")
    with fastcurv.use_kernels(impl):
        for op in sorted(_ext.CPU_ONLY_OPS):
            for device in ("cuda", "meta"):
                assert _ext.choose(op, torch.device(device)) == "torch", (op, device)
            assert _ext.choose(op, torch.device("cpu")) == "ext", op


def test_cpu_only_ops_are_those_without_a_cuda_or_triton_kernel():
    """``CPU_ONLY_OPS`` is the ops the schema defines less those csrc/cuda registers and cpu_level,
    none of them with a Triton kernel: an op given a CUDA kernel later must leave the list."""
    import re
    from pathlib import Path

    from fastcurv import triton_kernels

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    if not csrc.is_dir():
        pytest.skip("no csrc next to the tests (an installed copy)")
    defined = set(re.findall(r'm\.def\("(\w+)\(', (csrc / "fastcurv.cpp").read_text()))
    on_cuda = {m for f in (csrc / "cuda").glob("*.cu") for m in re.findall(r'm\.impl\("(\w+)"', f.read_text())}
    assert on_cuda and _ext.CPU_ONLY_OPS == defined - on_cuda - {"cpu_level"}
    assert not any(triton_kernels.supports(op) for op in _ext.CPU_ONLY_OPS)
