"""Build the fastcurv extensions.

* ``fastcurv._C``: C++ CPU kernels registered as ``torch.ops.fastcurv.*`` (always built).
* ``fastcurv._cuda``: CUDA kernels for the same ops, written against torch's stable ABI so that
  they compile with nvcc even next to a CPU-only torch. Built when ``csrc/cuda`` has sources and
  nvcc is found, and optional then: where nvcc cannot build them (too old for sm_90, say) a message
  says so (shown by pip only with -v) and the package is built with the CPU kernels only. Why they
  were left out is kept in the package as ``fastcurv/_cuda_build.txt``, which
  ``fastcurv._ext.extension_error('_cuda')`` reports. ``FASTCURV_CUDA=0`` (or false, off,
  no) skips them; ``FASTCURV_CUDA=1`` (or true, on, yes) makes a missing nvcc or a failed CUDA
  build an error. Any other value is refused.
"""
import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


cpu_sources = _rel([os.path.join(HERE, "csrc", "fastcurv.cpp")] + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
ext_modules = [
    CppExtension(
        "fastcurv._C",
        cpu_sources,
        extra_compile_args={"cxx": ["-O3", "-g0", "-fopenmp"]},
        extra_link_args=["-fopenmp"],
    )
]


def _cuda_root():
    nvcc = shutil.which("nvcc")
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None):
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


# The stable ABI is pinned to the torch the package is built against (e.g. 0x020d000000000000 = 2.13).
_major, _minor = (int(v) for v in torch.__version__.split(".")[:2])
TARGET = f"-DTORCH_TARGET_VERSION=0x{_major:02x}{_minor:02x}000000000000"

# The spellings of fastcurv._ext.env_flag (this file cannot import the package it builds).
_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def _cuda_mode(raw):
    """FASTCURV_CUDA's value (None: unset) -> 'auto', 'on' or 'off' (any case); a RuntimeError naming
    the accepted spellings for any other."""
    value = (raw or "").strip().lower()
    if not value or value == "auto":
        return "auto"
    if value in _ON or value in _OFF:
        return "on" if value in _ON else "off"
    raise RuntimeError(f"FASTCURV_CUDA={raw!r} is not understood: {'/'.join(_ON)} builds the CUDA kernels "
                       f"(an error where they cannot be built), {'/'.join(_OFF)} skips them, unset (or auto) builds "
                       "them where nvcc is found and can compile them")


def _text(output):
    """A subprocess error's captured output as text ('' when none was captured)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


class _BuildExt(BuildExtension):
    """torch's BuildExtension; in FASTCURV_CUDA's auto mode a failure of the optional
    ``fastcurv._cuda`` (an nvcc too old for sm_90, a toolkit that does not match torch's) prints
    why and leaves the package with its CPU kernels only."""

    cuda_mode = "auto"

    # why fastcurv._cuda is not built (None: it is), kept in the package as fastcurv/_cuda_build.txt for
    # fastcurv._ext.extension_error('_cuda'): pip shows a build's output only with -v
    cuda_note = None

    def build_extensions(self):
        self._built_any = False
        self._write_note()
        try:
            super().build_extensions()
        except Exception as exc:  # torch's CUDA checks, before any extension is built (nvcc's version)
            cuda = [e for e in self.extensions if e.name == "fastcurv._cuda"]
            if self.cuda_mode != "auto" or not cuda or self._built_any:
                raise
            self._skip(cuda[0], exc)
            super().build_extensions()

    def build_extension(self, ext):
        self._built_any = True
        if ext.name != "fastcurv._cuda" or self.cuda_mode != "auto":
            return super().build_extension(ext)
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(ext, exc)

    def _write_note(self):
        """Write ``cuda_note`` into the package being built (build_lib, or the sources for an in-place
        build) as _cuda_build.txt, or remove a stale one when there is no note."""
        folder = os.path.dirname(self.get_ext_fullpath("fastcurv._C"))
        path = os.path.join(folder, "_cuda_build.txt")
        if self.cuda_note is None:
            if os.path.exists(path):
                os.remove(path)
            return
        os.makedirs(folder, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.cuda_note + "\n")

    def _skip(self, ext, exc):
        """Leave ``ext`` out of the build (and of its outputs), saying why and what FASTCURV_CUDA does."""
        self.extensions = [e for e in self.extensions if e is not ext]
        # (torch's "Error compiling objects" carries the compiler's output in its cause, when captured)
        causes = list({id(c): c for c in (exc, exc.__cause__, exc.__context__) if c is not None}.values())
        why = " ".join(" ".join(str(c) + " " + _text(getattr(c, "output", None)) for c in causes).split())[:500]
        self.cuda_note = (f"skipping the CUDA kernels: building {ext.name} failed ({type(exc).__name__}: {why}). "
                          "The CPU kernels are built; on a GPU the ops run Triton or the torch references. "
                          "FASTCURV_CUDA=0 skips the CUDA kernels without trying, FASTCURV_CUDA=1 makes this failure "
                          "an error.")
        print(f"fastcurv: {self.cuda_note}", flush=True)
        self._write_note()


cuda_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
_BuildExt.cuda_mode = want_cuda = _cuda_mode(os.environ.get("FASTCURV_CUDA"))
if cuda_sources and want_cuda == "off":
    _BuildExt.cuda_note = "FASTCURV_CUDA=0 skipped the CUDA kernels"
if cuda_sources and want_cuda != "off":
    root = _cuda_root()
    if root is None:
        if want_cuda == "on":
            raise RuntimeError("FASTCURV_CUDA=1 but no CUDA toolkit (nvcc + include/cuda_runtime.h) was found")
        _BuildExt.cuda_note = "nvcc not found (CUDA_HOME, /usr/local/cuda, PATH), skipping the CUDA kernels"
        print(f"fastcurv: {_BuildExt.cuda_note}")
    else:
        # CPU builds of torch set CUDA_HOME to None; the stable-ABI sources only need nvcc and cudart.
        cpp_extension.CUDA_HOME = root
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext_modules.append(
            CppExtension(
                "fastcurv._cuda",
                cuda_sources,
                optional=want_cuda == "auto",  # (an --inplace build then copies it only when built)
                include_dirs=[os.path.join(root, "include")],
                library_dirs=[os.path.join(root, "lib64")],
                libraries=["cudart_static", "dl", "rt", "pthread"],
                extra_compile_args={
                    "cxx": ["-O3", "-g0", TARGET],
                    "nvcc": [
                        "-O3",
                        "-std=c++20",
                        TARGET,
                        "-gencode=arch=compute_80,code=sm_80",
                        "-gencode=arch=compute_90,code=sm_90",
                        "-gencode=arch=compute_90,code=compute_90",
                    ],
                },
            )
        )

setup(ext_modules=ext_modules, cmdclass={"build_ext": _BuildExt})
