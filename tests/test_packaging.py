"""Packaging, build and import-time environment: the source distribution holds everything the
extensions' build reads (and the licence), setup.py's FASTCURV_CUDA, the FASTCURV_* variables read
at run time, a compiled library that does not load, ``python -m fastcurv`` and the CLI's paths."""
import os
import re
import runpy
import shutil
import subprocess
import sys
import tarfile
import tomllib
import warnings
from pathlib import Path

import pytest
import setuptools
from torch.utils import cpp_extension

import fastcurv
from fastcurv import _ext, _heap
from fastcurv.cli import main

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
needs_source = pytest.mark.skipif(not (ROOT / "setup.py").is_file(), reason="needs the source tree")
needs_ext = pytest.mark.skipif(not fastcurv.cpu_extension_loaded(), reason="C++ extension not loaded (fastcurv._ext.extension_error() says why)")


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """``(names, PKG-INFO text)`` of an sdist built from a copy of the source tree."""
    return _sdist(tmp_path_factory.mktemp("sdist"))


def _sdist(tmp_path):
    """Build an sdist from a copy of the source tree (so the checkout gets no egg-info) and list it."""
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("*.so", "*.o", "__pycache__", "*.pyc", "*.egg-info", "results", ".benchmarks")
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, tree / name)
    for name in ("csrc", "src", "tests", "benchmarks", "examples"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    env = dict(os.environ, FASTCURV_CUDA="0")  # CUDA sources must be shipped even when this build skips them
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        info = tar.extractfile(next(n for n in tar.getnames() if n.endswith("/PKG-INFO") and n.count("/") == 1))
        return names, info.read().decode()


@needs_source
def test_sdist_holds_every_kernel_source_and_header(sdist):
    names, _ = sdist
    sources = sorted(p for p in CSRC.rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh"))
    assert sources
    missing = [str(p.relative_to(ROOT)) for p in sources if str(p.relative_to(ROOT)) not in names]
    assert not missing, f"the sdist lacks {missing}: add them to MANIFEST.in"
    for p in sources:  # every local include resolves inside the sdist
        for inc in re.findall(r'#include\s+"([^"]+)"', p.read_text()):
            target = os.path.normpath(str((p.parent / inc).relative_to(ROOT)))
            assert target in names, f"{p.relative_to(ROOT)} includes {inc}, absent from the sdist"
    for name in ("README.md", "pyproject.toml", "setup.py", "src/fastcurv/__init__.py", "examples/bennett_mnist.yaml"):
        assert name in names, name


@needs_source
def test_sdist_ships_the_licence(sdist):
    """pyproject declared BSD-3-Clause, whose conditions must travel with the code, but no licence
    text existed: none in the repository, the sdist or the wheel (no License-File in the metadata)."""
    names, info = sdist
    assert (ROOT / "LICENSE").is_file()
    text = (ROOT / "LICENSE").read_text()
    assert "BSD 3-Clause" in text and "the fastcurv developers" in text
    assert "LICENSE" in names
    assert "License-File: LICENSE" in info and "License-Expression: BSD-3-Clause" in info


@needs_source
def test_requires_python_covers_the_syntax_used():
    """The package called BaseException.add_note (Python 3.11) while pyproject allowed Python 3.10,
    where that line raised an AttributeError hiding the error it annotated."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lowest = tuple(int(v) for v in re.fullmatch(r">=\s*(\d+)\.(\d+)", meta["requires-python"]).groups())
    uses_add_note = [p.name for p in (ROOT / "src").rglob("*.py") if ".add_note(" in p.read_text()]
    if uses_add_note:
        assert lowest >= (3, 11), f"{uses_add_note} call add_note (3.11); requires-python says {lowest}"
    versions = [tuple(map(int, c.rsplit(":: ", 1)[1].split("."))) for c in meta.get("classifiers", [])
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert all(v >= lowest for v in versions), versions


def test_python_m_fastcurv(monkeypatch, capsys):
    """``python -m fastcurv`` failed: the package had no __main__ (only ``python -m fastcurv.cli``)."""
    monkeypatch.setattr(sys, "argv", ["fastcurv", "--version"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("fastcurv", run_name="__main__")
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == fastcurv.__version__


# --- run-time environment variables --------------------------------------------------------------
@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which bad values were already warned about (each is warned about once)."""
    monkeypatch.setattr(_ext, "_warned", set(), raising=False)
    monkeypatch.setattr(_ext, "_cpu_level_seen", None, raising=False)


def _fresh_ext():
    """A new copy of fastcurv._ext, as ``import fastcurv`` runs it (it reads FASTCURV_KERNELS then)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastcurv._ext_fresh", _ext.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernels_variable_checked_at_import(monkeypatch):
    """FASTCURV_KERNELS was used unchecked: 'Torch' became the kernel choice (dispatched like 'auto',
    so the C++ kernels ran), and every ``use_kernels`` block then raised a ValueError on leaving."""
    monkeypatch.setenv("FASTCURV_KERNELS", " Torch")
    ext = _fresh_ext()
    assert ext.kernel_impl() == "torch"
    with ext.use_kernels("ext"):
        assert ext.kernel_impl() == "ext"
    assert ext.kernel_impl() == "torch"
    monkeypatch.setenv("FASTCURV_KERNELS", "cpp")
    with pytest.warns(RuntimeWarning, match=r"FASTCURV_KERNELS='cpp' is not one of auto, ext, torch, triton, cuda"):
        ext = _fresh_ext()
    assert ext.kernel_impl() == "auto"
    with ext.use_kernels("torch"):
        pass


@pytest.mark.parametrize("value,on", [(v, True) for v in ("1", "true", "On", " YES ")] +
                         [(v, False) for v in ("0", "false", "OFF", "no", " 0")])
def test_heap_reuse_on_off_spellings(monkeypatch, fresh_warnings, value, on):
    """FASTCURV_HEAP_REUSE took only the exact string '0' for off: false, off, no (or ' 0') left
    fastcurv changing malloc's settings, which the variable exists to prevent."""
    monkeypatch.setenv("FASTCURV_HEAP_REUSE", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _heap.enabled() == (on and _heap._glibc() is not None)


def test_heap_reuse_refuses_other_values(monkeypatch, fresh_warnings):
    """A value that is neither on nor off is refused with a warning naming the spellings (it was
    silently taken as on); the default (on) holds."""
    monkeypatch.setenv("FASTCURV_HEAP_REUSE", "disable")
    with pytest.warns(RuntimeWarning, match=r"FASTCURV_HEAP_REUSE='disable' is not an on/off value \(1/true/on/yes or "
                                            r"0/false/off/no\)"):
        assert _heap.enabled() == (_heap._glibc() is not None)


@needs_ext
@pytest.mark.parametrize("value", ["-1", "avx2", "AVX512", "1.5"])
def test_bad_cpu_level_warned(monkeypatch, fresh_warnings, value):
    """FASTCURV_CPU_LEVEL was read by C's atoi unchecked: 'avx2' silently ran the baseline loops on an
    AVX-512 machine, and -1 made cpu_level() report -1, the code for 'no C++ extension'."""
    monkeypatch.setenv("FASTCURV_CPU_LEVEL", value)
    with pytest.warns(RuntimeWarning, match=rf"FASTCURV_CPU_LEVEL='{re.escape(value)}' is not one of 0, 1, 2"):
        level = _ext.cpu_level()
    assert 0 <= level <= 2
    for good in ("0", "1", "2"):
        monkeypatch.setenv("FASTCURV_CPU_LEVEL", good)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert 0 <= _ext.cpu_level() <= int(good)


def test_library_that_fails_to_load_warns_with_the_reason(monkeypatch, tmp_path):
    """A _C library present but unloadable (built against another torch: undefined symbols) was dropped
    silently, every op then running the slower torch references, and extension_error() kept only
    torch's "Could not load this library", not the loader's reason."""
    (tmp_path / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not a shared library")
    monkeypatch.setattr(_ext, "_HERE", str(tmp_path))
    monkeypatch.setattr(_ext, "_loaded", {})
    monkeypatch.setattr(_ext, "_errors", {})
    with pytest.warns(RuntimeWarning, match="C\\+\\+ CPU kernels did not load .*(file too short|invalid ELF header)"):
        assert not _ext.cpu_extension_loaded()
    assert re.search("file too short|invalid ELF header", _ext.extension_error())
    (tmp_path / "_C.cpython-311-x86_64-linux-gnu.so").unlink()  # no library at all: silent, as before
    monkeypatch.setattr(_ext, "_loaded", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _ext.cpu_extension_loaded()
    assert "no compiled library" in _ext.extension_error()


# --- setup.py: FASTCURV_CUDA -----------------------------------------------------------------------
def _run_setup(monkeypatch, tree, cuda_env):
    """Run ``tree/setup.py`` with FASTCURV_CUDA = ``cuda_env`` and a toolkit at ``tree/cuda`` (its nvcc
    fails on sm_90); return the keyword arguments it gives setuptools.setup."""
    toolkit = tree / "cuda"
    (toolkit / "include").mkdir(parents=True, exist_ok=True)
    (toolkit / "include" / "cuda_runtime.h").touch()
    (toolkit / "bin").mkdir(exist_ok=True)
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = --version ] && { echo "release 11.7, V11.7.99"; exit 0; }; done\n'
                    "echo \"nvcc fatal   : Unsupported gpu architecture 'compute_90'\" >&2\nexit 1\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)  # setup.py sets it
    if cuda_env is None:
        monkeypatch.delenv("FASTCURV_CUDA", raising=False)
    else:
        monkeypatch.setenv("FASTCURV_CUDA", cuda_env)
    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    runpy.run_path(str(tree / "setup.py"), run_name="setup_under_test")
    return seen


@pytest.fixture
def setup_tree(tmp_path):
    tree = tmp_path / "tree"
    (tree / "csrc" / "cuda").mkdir(parents=True)
    (tree / "csrc" / "cuda" / "k.cu").write_text("__global__ void k() {}\n")
    shutil.copy2(ROOT / "setup.py", tree / "setup.py")
    return tree


@needs_source
@pytest.mark.parametrize("value,builds", [(v, True) for v in ("1", "true", "ON", "yes")] +
                         [(v, False) for v in ("0", "false", "Off", " no ")])
def test_fastcurv_cuda_spellings(monkeypatch, setup_tree, value, builds):
    """FASTCURV_CUDA took only '0' for off: 'false', 'off' or 'no' still built the CUDA kernels (and,
    with an nvcc that cannot, failed the install). It takes fastcurv's other on/off spellings."""
    names = [e.name for e in _run_setup(monkeypatch, setup_tree, value)["ext_modules"]]
    assert ("fastcurv._cuda" in names) == builds, names
    assert "fastcurv._C" in names


@needs_source
def test_fastcurv_cuda_refuses_other_values(monkeypatch, setup_tree):
    """Any other value was taken as 'auto'; now it stops the build naming the accepted spellings."""
    with pytest.raises(RuntimeError, match=r"FASTCURV_CUDA='maybe' is not understood: 1/true/on/yes .* 0/false/off/no"):
        _run_setup(monkeypatch, setup_tree, "maybe")


def _build_cuda_only(monkeypatch, tree, cuda_env):
    """Run build_ext on the fastcurv._cuda extension of ``tree/setup.py`` alone (with a failing nvcc)."""
    from setuptools import Distribution

    kw = _run_setup(monkeypatch, tree, cuda_env)
    cuda = [e for e in kw["ext_modules"] if e.name == "fastcurv._cuda"]
    assert cuda
    monkeypatch.chdir(tree)
    dist = Distribution({"name": "fastcurv", "ext_modules": cuda, "cmdclass": kw["cmdclass"]})
    dist.script_args = ["build_ext", "--build-lib", str(tree / "lib"), "--build-temp", str(tree / "tmp")]
    dist.parse_command_line()
    dist.run_commands()
    return dist.get_command_obj("build_ext")


@needs_source
def test_failed_cuda_build_is_skipped_in_auto_mode(monkeypatch, setup_tree, capfd):
    """With FASTCURV_CUDA unset, an nvcc on the PATH that cannot build the CUDA kernels (a CUDA 11.7
    without sm_90) failed the whole install with "Error compiling objects for extension", nothing
    naming FASTCURV_CUDA. The optional CUDA library is now left out, saying why and how to choose."""
    cmd = _build_cuda_only(monkeypatch, setup_tree, None)
    out = capfd.readouterr().out
    assert "skipping the CUDA kernels" in out and "FASTCURV_CUDA=0" in out and "FASTCURV_CUDA=1" in out
    assert not cmd.extensions and not cmd.get_outputs()
    assert not list((setup_tree / "lib").rglob("_cuda*.so"))


@needs_source
def test_skipped_cuda_build_keeps_its_reason_in_the_package(monkeypatch, setup_tree, tmp_path):
    """pip hides a successful build's output (without -v), so the skip message was never seen and nothing of
    it was kept: extension_error('_cuda') said only "was the package built?". The reason is now written
    into the built package (_cuda_build.txt), which extension_error('_cuda') reports."""
    _build_cuda_only(monkeypatch, setup_tree, None)
    note = setup_tree / "lib" / "fastcurv" / "_cuda_build.txt"
    assert re.search("skipping the CUDA kernels: building fastcurv._cuda failed .*Error compiling objects.*"
                     "FASTCURV_CUDA=1", note.read_text())
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    shutil.copy2(note, pkg / note.name)
    monkeypatch.setattr(_ext, "_HERE", str(pkg))
    monkeypatch.setattr(_ext, "_loaded", {})
    monkeypatch.setattr(_ext, "_errors", {})
    assert "the build said: skipping the CUDA kernels" in _ext.extension_error("_cuda")


def test_the_library_built_for_this_python_is_loaded_not_the_first_by_name(monkeypatch, tmp_path):
    """_load took sorted(glob("_C*.so"))[0]: a stale build for Python 3.10 next to this interpreter's (3.11)
    sorted first, was tried alone and failed, and the C++ kernels counted as absent; rebuilding did not help.
    Only the files named with this interpreter's EXTENSION_SUFFIXES are tried, its exact suffix first."""
    import importlib.machinery

    own = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]
    for name in ("_C.cpython-30-x86_64-linux-gnu.so", own, "_C.so"):
        (tmp_path / name).write_bytes(b"stub")
    tried = []
    monkeypatch.setattr(_ext.torch.ops, "load_library", tried.append)
    monkeypatch.setattr(_ext, "_HERE", str(tmp_path))
    monkeypatch.setattr(_ext, "_loaded", {})
    monkeypatch.setattr(_ext, "_errors", {})
    monkeypatch.setattr(_ext, "_check_cpu_level", lambda: None)
    assert _ext._load("_C") and tried == [str(tmp_path / own)]
    (tmp_path / own).unlink()
    (tmp_path / "_C.so").unlink()
    monkeypatch.setattr(_ext, "_loaded", {})
    assert not _ext._load("_C") and tried == [str(tmp_path / own)]  # the other Python's file: never tried
    assert "only builds for other interpreters (_C.cpython-30-x86_64-linux-gnu.so)" in _ext.extension_error()


@needs_source
def test_failed_cuda_build_is_an_error_when_asked_for(monkeypatch, setup_tree):
    """FASTCURV_CUDA=1: the same failure stops the build."""
    with pytest.raises(Exception, match="Error compiling objects|nvcc|CUDA"):
        _build_cuda_only(monkeypatch, setup_tree, "1")


# --- the command line: '~user' paths ---------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["demo", "--out", "~fastcurv_no_such_user/rep", "--epochs", "1", "--replicas", "2", "--no-progress"],
    ["study", "--config", "~fastcurv_no_such_user/c.yaml"],
    ["study", "--out", "~fastcurv_no_such_user/rep", "--epochs", "1", "--replicas", "2", "--no-progress"],
])
def test_cli_unknown_user_in_a_path(argv, capsys):
    """A path starting with '~user' for an unknown user (a mistyped '~/') ended demo and study with a
    raw RuntimeError traceback (exit 1) instead of the promised one line and exit code 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastcurv {argv[0]}: cannot expand '~'")
    assert "fastcurv_no_such_user" in err[0]
