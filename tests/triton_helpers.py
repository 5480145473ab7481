"""Helpers of the Triton kernel tests: the devices they run on, skipping without Triton, and
ahead-of-time compilation for an NVIDIA GPU on a machine without one (the interpreter,
``TRITON_INTERPRET=1``, which the tests use without a GPU, skips Triton's compiler, so errors that
only the compiler sees would otherwise go unnoticed until a GPU run).
"""
import os
import subprocess
import sys

import pytest

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# CPU tensors under the interpreter; CUDA tensors on a GPU
TRITON_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
# BatchNorm shapes [N, K, G, S] whose per-group reductions over the N * S samples take more than one
# tile, the last one ragged (triton_kernels.batchnorm._tile_shape): for small S a tile holds 32
# groups and 32 samples (40 here); for S >= 8 one group and 1024 samples (1500 here)
BN_MULTI_TILE = [(40, 2, 37, 1), (5, 1, 2, 300)]


def triton_kernels_or_skip():
    """The ``fastcurv.triton_kernels`` module, or skip the test when Triton is not installed."""
    tk = pytest.importorskip("fastcurv.triton_kernels")
    if not tk.HAVE_TRITON:
        pytest.skip("triton is not installed")
    return tk

_PRELUDE = r'''
import inspect, sys
import torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

target = GPUTarget("cuda", int(sys.argv[1]), 32)

def sig(fn, dt, const):
    out = {}
    for n in inspect.signature(fn.fn).parameters:
        if n in const: out[n] = "constexpr"
        elif n.endswith("_ptr"): out[n] = "*" + dt
        elif n.endswith(("_hi", "_lo")): out[n] = "fp32"
        else: out[n] = "i32"
    return out

def comp(fn, dt, const, **options):
    return triton.compile(ASTSource(fn=fn, signature=sig(fn, dt, const), constexprs=const), target=target,
                          options=options)

def comp_launch(fn, dt, const, ints, **options):
    """Compile as a launch with the integer arguments ``ints`` would: Triton makes those equal to 1
    constexprs and marks those divisible by 16 (and the pointers, as fresh torch allocations are) as
    such, which lets the compiler pipeline the loads (the largest shared memory)."""
    const, attrs = dict(const), {}
    for n, v in ints.items():
        if v == 1:
            const[n] = 1
    s = sig(fn, dt, const)
    for i, n in enumerate(s):
        if s[n] != "constexpr" and (n.endswith("_ptr") or ints.get(n, 1) % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn=fn, signature=s, constexprs=const, attrs=attrs), target=target, options=options)
'''


def compile_for_gpu(tmp_path, body: str, arch: int = 90) -> None:
    """Run ``body`` in a fresh interpreter without ``TRITON_INTERPRET``, after a prelude that defines
    ``comp(kernel, dtype, constexprs, **options)`` (compile one specialization for ``sm_<arch>`` and
    return it, its ``metadata.shared`` included; pointer arguments get ``dtype``, ``*_hi``/``*_lo``
    fp32, the rest i32; ``options`` such as ``num_stages``) and ``comp_launch(kernel, dtype,
    constexprs, ints, **options)`` (the same, specialized on the integer argument values ``ints`` as
    a launch is); skips when this triton has no NVIDIA backend, fails with the compiler's error (or
    the body's failed assert) otherwise."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = _PRELUDE + body + '\nprint("compiled")\n'
    proc = subprocess.run([sys.executable, "-c", script, str(arch)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
