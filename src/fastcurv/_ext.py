"""Loading of the compiled kernels and the choice between them and the torch references.

``torch.ops.fastcurv.*`` is registered by ``fastcurv._C`` (C++ CPU kernels) and, when it was
built, ``fastcurv._cuda`` (CUDA kernels). Every op also has a pure-torch reference in
``fastcurv.ops``; :func:`set_kernel_impl` selects which one the wrappers call.

It also reads fastcurv's run-time environment variables, each checked, a bad value refused with a
RuntimeWarning naming the accepted ones: ``FASTCURV_KERNELS`` (the initial kernel choice, read at
import), ``FASTCURV_CPU_LEVEL`` (caps the x86 vector level of the C++ kernels, which read it at
every call) and, through :func:`env_flag` (kept in ``_heap``, which loads with the standard library alone), the on/off switch ``FASTCURV_HEAP_REUSE``.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.machinery
import os
import warnings

import torch

from ._heap import _refuse, env_flag  # noqa: F401  (env_flag: fastcurv._ext.env_flag, as documented)

_HERE = os.path.dirname(os.path.abspath(__file__))
_loaded: dict[str, str | None] = {}
_errors: dict[str, str] = {}
_IMPLS = ("auto", "ext", "torch", "triton", "cuda")
def _startup_impl() -> str:
    """The kernel choice ``FASTCURV_KERNELS`` asks for at import (any case): one of ``_IMPLS``, else
    'auto' with a RuntimeWarning."""
    raw = os.environ.get("FASTCURV_KERNELS", "")
    value = raw.strip().lower()
    if not value:
        return "auto"
    if value not in _IMPLS:
        _refuse("FASTCURV_KERNELS", raw, f"is not one of {', '.join(_IMPLS)}: ignored, the kernels are chosen as 'auto'")
        return "auto"
    return value


_impl = _startup_impl()


# why setup.py left the CUDA kernels out (written into the package by the build; pip hides its output)
CUDA_BUILD_NOTE = "_cuda_build.txt"


def _candidates(name: str) -> list[str]:
    """The files of library ``name`` this interpreter can load, in its own order of preference
    (``importlib.machinery.EXTENSION_SUFFIXES``: ``.cpython-311-x86_64-linux-gnu.so``, ``.abi3.so``,
    ``.so``): a build for another Python next to it (an in-place build's leftover) is never tried."""
    paths = [os.path.join(_HERE, name + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    return [p for p in dict.fromkeys(paths) if os.path.isfile(p)]


def _missing(name: str) -> str:
    """Why library ``name`` has no file to load: other interpreters' builds found, and for ``_cuda`` the
    reason the build recorded for leaving it out."""
    others = sorted(glob.glob(os.path.join(_HERE, f"{name}*.so")) + glob.glob(os.path.join(_HERE, f"{name}*.pyd")))
    text = f"no compiled library {name} for this Python ({name}{importlib.machinery.EXTENSION_SUFFIXES[0]}) next to {_HERE}"
    if others:
        text += (f"; only builds for other interpreters ({', '.join(map(os.path.basename, others))}): rebuild fastcurv "
                 "with this Python")
    else:
        text += " (was the package built?)"
    note = os.path.join(_HERE, CUDA_BUILD_NOTE)
    if name == "_cuda" and os.path.isfile(note):
        with open(note, encoding="utf-8") as f:
            text += f"; the build said: {f.read().strip()}"
    return text


def _load(name: str) -> bool:
    if name in _loaded:
        return _loaded[name] is not None
    paths = _candidates(name)
    _loaded[name] = None
    if not paths:
        _errors[name] = _missing(name)
        return False
    failed = []
    for path in paths:
        try:
            torch.ops.load_library(path)
            _loaded[name] = path
            break
        except OSError as exc:  # wrong torch ABI, missing symbols
            # torch wraps the loader's message ("undefined symbol: ...") as "Could not load this library"
            reason = str(exc.__cause__ or exc)
            failed.append(reason if path in reason else f"{path}: {reason}")
    if _loaded[name] is None:
        _errors[name] = "; ".join(failed)
        what = "C++ CPU" if name == "_C" else "CUDA"
        warnings.warn(f"fastcurv's {what} kernels did not load ({_errors[name]}): the op wrappers use "
                      f"{'the torch references' if name == '_C' else 'Triton or the torch references'} instead. "
                      "Rebuild fastcurv against the torch installed here (pip install --no-build-isolation ...)",
                      RuntimeWarning, stacklevel=3)
        return False
    if name == "_C":
        _check_cpu_level()
    return True


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
    the environment variable ``FASTCURV_CPU_LEVEL``: 0, 1 or 2); -1 without the C++ extension."""
    if not cpu_extension_loaded():
        return -1
    _check_cpu_level()
    return max(0, int(torch.ops.fastcurv.cpu_level()))  # a negative cap runs the baseline loops


_CPU_LEVELS = ("0", "1", "2")
_cpu_level_seen: str | None = None  # the last FASTCURV_CPU_LEVEL checked


def _check_cpu_level() -> None:
    """Warn (once per value) when ``FASTCURV_CPU_LEVEL`` is set to anything but 0, 1 or 2. The C++
    kernels read it themselves at every call, with C's ``atoi``: 'avx2' or -1 run the baseline loops."""
    global _cpu_level_seen
    raw = os.environ.get("FASTCURV_CPU_LEVEL")
    if raw is None or raw == _cpu_level_seen:
        return
    _cpu_level_seen = raw
    if raw.strip() not in _CPU_LEVELS:
        runs = max(0, int(torch.ops.fastcurv.cpu_level()))
        _refuse("FASTCURV_CPU_LEVEL", raw, f"is not one of {', '.join(_CPU_LEVELS)} (the highest x86 vector level of the "
                                           f"C++ kernels: 0 baseline, 1 AVX2 + FMA, 2 AVX-512): they run level {runs}")


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
    An op with no GPU kernel at all (the CSR ops, ``head_hvp``, ``sampled_conv``, ``group_conv``)
    runs its torch reference on CUDA tensors under every choice; under 'ext' / 'cuda' an op that
    has a CUDA kernel raises a RuntimeError saying why when ``fastcurv._cuda`` cannot run it.

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


# The ops whose only compiled kernel is the C++ one (no source in csrc/cuda, no Triton kernel): on
# any other device their torch reference runs, whatever the kernel choice.
CPU_ONLY_OPS = frozenset({"head_hvp", "csr_linear", "csr_linear_out", "csr_linear_wgrad", "csr_masked_linear_out",
                          "csr_from_dense", "sampled_conv", "sampled_conv_wgrad", "group_conv", "group_conv_wgrad"})


def choose(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Which implementation an op wrapper should call for tensors on ``device`` (of ``dtype``, when
    given): 'ext', 'triton' or 'torch'. The C++ and CUDA kernels take float32 and float64; other
    floating dtypes (float16, bfloat16) run Triton on a GPU where it is usable, else the torch
    reference, as do the ops of ``CPU_ONLY_OPS`` off the CPU."""
    impl = _impl
    if impl == "torch" or (op in CPU_ONLY_OPS and device.type != "cpu"):
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
                why = "Triton is not usable here" if triton_kernels.supports(op) else "fastcurv has none for it"
                raise RuntimeError(f"Triton kernel for {op} requested but {why}")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            return "torch"  # the CUDA kernels, like the C++ ones, take float32 and float64 only
        if has_kernel(op, "cuda"):
            return "ext"
        if impl in ("ext", "cuda") and not (cuda_extension_loaded() and _cuda_kernels_run()):
            raise RuntimeError(f"CUDA kernel for {op} requested but fastcurv._cuda is not usable: {extension_error('_cuda')}")
        return "torch"  # (also an op with no CUDA kernel, e.g. csr_linear, under 'ext' / 'cuda': its reference)
    if device.type == "cpu" and impl != "triton" and has_kernel(op, "cpu"):
        _check_cpu_level()  # (cheap while the variable is unchanged)
        return "ext"
    if impl == "ext":
        raise RuntimeError(f"compiled kernel for {op} requested but not available: {extension_error('_C')}")
    if impl == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "torch"
