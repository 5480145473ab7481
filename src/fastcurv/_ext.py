"""Loading of the compiled kernels and the choice between them and the torch references.

``torch.ops.fastcurv.*`` is registered by ``fastcurv._C`` (C++ CPU kernels) and, when it was
built, ``fastcurv._cuda`` (CUDA kernels). Every op also has a pure-torch reference in
``fastcurv.ops``; :func:`set_kernel_impl` selects which one the wrappers call.
"""
from __future__ import annotations

import contextlib
import glob
import os
import warnings

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_loaded: dict[str, str | None] = {}
_errors: dict[str, str] = {}
_IMPLS = ("auto", "ext", "torch", "triton", "cuda")
_impl = os.environ.get("FASTCURV_KERNELS", "auto")


def _load(name: str) -> bool:
    if name in _loaded:
        return _loaded[name] is not None
    paths = sorted(glob.glob(os.path.join(_HERE, f"{name}*.so")) + glob.glob(os.path.join(_HERE, f"{name}*.pyd")))
    _loaded[name] = None
    if not paths:
        _errors[name] = f"no compiled library {name}*.so next to {_HERE} (was the package built?)"
        return False
    try:
        torch.ops.load_library(paths[0])
        _loaded[name] = paths[0]
    except OSError as exc:  # wrong torch ABI, missing symbols
        _errors[name] = f"{paths[0]}: {exc}"
    return _loaded[name] is not None


def cpu_extension_loaded() -> bool:
    """True when the C++ CPU kernels (``fastcurv._C``) are registered."""
    return _load("_C")


def cuda_extension_loaded() -> bool:
    """True when the CUDA kernels (``fastcurv._cuda``) are registered (needs ``_C`` first)."""
    return cpu_extension_loaded() and _load("_cuda")


def extension_error(name: str = "_C") -> str | None:
    """Why an extension did not load, or None."""
    _load(name)
    return _errors.get(name)


def cpu_level() -> int:
    """The x86 vector level the C++ kernels run here: 2 AVX-512, 1 AVX2 + FMA, 0 baseline (capped by
    the environment variable ``FASTCURV_CPU_LEVEL``); -1 without the C++ extension."""
    return int(torch.ops.fastcurv.cpu_level()) if cpu_extension_loaded() else -1


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``torch.ops.fastcurv.<op>`` has a compiled kernel for ``device_type`` ('cpu', 'cuda').
    Memoized: the libraries load once (the op wrappers ask on every call, 1,600 times in a W1 job)."""
    hit = _has_kernel.get((op, device_type))
    if hit is None:
        hit = _has_kernel[(op, device_type)] = _lookup_kernel(op, device_type)
    return hit


_has_kernel: dict[tuple[str, str], bool] = {}


_cuda_runs: bool | None = None


def _probe_launch() -> None:
    """Launch one tiny CUDA kernel of fastcurv._cuda (raises RuntimeError where it cannot run)."""
    x = torch.zeros(1, 1, 1, device="cuda")
    torch.ops.fastcurv.act_rop_bwd(x[0], x[0], x, x)
    torch.cuda.synchronize()


def _cuda_kernels_run() -> bool:
    """Whether fastcurv._cuda's kernels launch here (True without a CUDA device). The library carries
    its own static CUDA runtime, from the toolkit it was built with, and code for sm_80 and sm_90: a
    driver older than that runtime, or an older GPU, fails every launch. Such a library then counts
    as absent (the wrappers take Triton or torch) and ``extension_error('_cuda')`` says why."""
    global _cuda_runs
    if _cuda_runs is None:
        _cuda_runs = True
        if torch.cuda.is_available():
            try:
                _probe_launch()
            except RuntimeError as exc:
                _cuda_runs = False
                _errors["_cuda"] = f"{_loaded.get('_cuda')}: loaded, but its kernels do not run here: {exc}"
                warnings.warn(f"fastcurv's CUDA kernels cannot run on this GPU ({str(exc)[:200]}): the op wrappers use "
                              "Triton or the torch references instead", RuntimeWarning, stacklevel=2)
    return _cuda_runs


def _lookup_kernel(op: str, device_type: str) -> bool:
    if device_type == "cuda":
        if cuda_extension_loaded() and not _cuda_kernels_run():
            return False
    elif not cpu_extension_loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastcurv::{op}", key)
    except RuntimeError:
        return False


def kernel_impl() -> str:
    """The current kernel choice: 'auto', 'ext' (compiled C++/CUDA), 'triton', 'cuda' or 'torch'."""
    return _impl


def set_kernel_impl(impl: str) -> None:
    """Select the kernels the op wrappers call.

    'auto' (default): compiled C++ on CPU tensors; on CUDA tensors Triton when installed, else
    the CUDA extension, else torch. 'ext': compiled kernels (C++ on CPU, CUDA on GPU).
    'triton' / 'cuda': force that GPU path. 'torch': the pure-torch references everywhere.

    The choice is process-wide: it holds for every thread, and it is not safe to change it from
    several threads at once (each sees the others' choice; see :func:`use_kernels`).
    """
    global _impl
    if impl not in _IMPLS:
        raise ValueError(f"kernel impl must be one of {_IMPLS}, got {impl!r}")
    _impl = impl


@contextlib.contextmanager
def use_kernels(impl: str):
    """Context manager form of :func:`set_kernel_impl`: the previous choice is restored on leaving.

    Process-wide, not per thread: while the block runs, the choice holds for every thread, and
    blocks in several threads at once see each other's choice and can leave the wrong one behind
    (thread A's block restores what it saw on entering, which may be thread B's). Choose the
    kernels once, or from one thread at a time."""
    old = _impl
    set_kernel_impl(impl)
    try:
        yield
    finally:
        set_kernel_impl(old)


def choose(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Which implementation an op wrapper should call for tensors on ``device`` (of ``dtype``, when
    given): 'ext', 'triton' or 'torch'. The C++ and CUDA kernels take float32 and float64; other
    floating dtypes (float16, bfloat16) run Triton on a GPU where it is usable, else the torch reference."""
    impl = _impl
    if impl == "torch":
        return "torch"
    if dtype is not None and device.type != "cuda" and dtype not in (torch.float32, torch.float64) \
            and not (impl == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
        return "torch"
    if device.type == "cuda":
        if impl in ("auto", "triton"):
            from . import triton_kernels

            if triton_kernels.available() and triton_kernels.supports(op):
                return "triton"
            if impl == "triton":
                raise RuntimeError(f"Triton kernel for {op} requested but Triton is not usable here")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            return "torch"  # the CUDA kernels, like the C++ ones, take float32 and float64 only
        if has_kernel(op, "cuda"):
            return "ext"
        if impl in ("ext", "cuda"):
            raise RuntimeError(f"CUDA kernel for {op} requested but fastcurv._cuda is not built/loaded: {extension_error('_cuda')}")
        return "torch"
    if device.type == "cpu" and impl != "triton" and has_kernel(op, "cpu"):
        return "ext"
    if impl == "ext":
        raise RuntimeError(f"compiled kernel for {op} requested but not available: {extension_error('_C')}")
    if impl == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "torch"
