"""Build the fastcurv extensions.

* ``fastcurv._C``: C++ CPU kernels registered as ``torch.ops.fastcurv.*`` (always built).
* ``fastcurv._cuda``: CUDA kernels for the same ops, written against torch's stable ABI so that
  they compile with nvcc even next to a CPU-only torch. Built when ``csrc/cuda`` has sources and
  nvcc is found; ``FASTCURV_CUDA=0`` skips it, ``FASTCURV_CUDA=1`` makes a missing nvcc an error.
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

cuda_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
want_cuda = os.environ.get("FASTCURV_CUDA", "auto")
if cuda_sources and want_cuda != "0":
    root = _cuda_root()
    if root is None:
        if want_cuda == "1":
            raise RuntimeError("FASTCURV_CUDA=1 but no CUDA toolkit (nvcc + include/cuda_runtime.h) was found")
        print("fastcurv: nvcc not found, skipping the CUDA kernels")
    else:
        # CPU builds of torch set CUDA_HOME to None; the stable-ABI sources only need nvcc and cudart.
        cpp_extension.CUDA_HOME = root
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext_modules.append(
            CppExtension(
                "fastcurv._cuda",
                cuda_sources,
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

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension})
