"""The source distribution holds everything the extensions' build reads."""
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _sdist_names(tmp_path) -> set:
    """Build an sdist from a copy of the source tree (so the checkout gets no egg-info) and list it."""
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("*.so", "*.o", "__pycache__", "*.pyc", "*.egg-info", "results", ".benchmarks")
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    for name in ("csrc", "src", "tests", "benchmarks", "examples"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    env = dict(os.environ, FASTCURV_CUDA="0")  # CUDA sources must be shipped even when this build skips them
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        return {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}


@pytest.mark.skipif(not (ROOT / "setup.py").is_file(), reason="needs the source tree")
def test_sdist_holds_every_kernel_source_and_header(tmp_path):
    names = _sdist_names(tmp_path)
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
