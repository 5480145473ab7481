"""Data sets for studies: MNIST and Fashion-MNIST from local IDX files, and an embedded default.

Nothing here downloads. MNIST / Fashion-MNIST are read from the four standard IDX files
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``), gzip-compressed (``.gz``) or not, found in any of these layouts under
a root folder:

* torchvision style: ``<root>/MNIST/raw/`` or ``<root>/FashionMNIST/raw/``;
* plain folders: ``<root>/mnist/`` or ``<root>/fashion-mnist/`` (also ``fashion_mnist``, ``fashionmnist``);
* the root itself holding the four files.

Roots searched when none is given, in order: ``$FASTCURV_DATA``, ``../shared/data`` next to the
repository (``<repo>/../shared/data``; only when running from a source checkout or an editable
install, since an installed package has no repository), ``./data``, ``~/.cache/fastcurv`` (skipped
when there is no home directory), and (Fashion-MNIST only) Debian's
``/usr/share/datasets/fashion-mnist`` from the package ``dataset-fashion-mnist``. A folder holding
only some of the four files is skipped with a warning naming the missing ones (and named in the
error when nothing complete is found).

Both data sets use the same four file names, so the files are also identified by content: every
``.gz`` file, and every uncompressed label file, is hashed (md5) once as it is read and compared
with the published checksums of MNIST and Fashion-MNIST (those torchvision holds). Files of the
*other* data set (or a standard file under another file's name) raise a ValueError; files with an
unknown checksum (your own data, a re-compressed file, an uncompressed image file) are accepted.

:func:`load_digits` is the embedded default: scikit-learn's bundled 8x8 digits (1,797 images
shipped inside scikit-learn), no files needed.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import sys
import warnings
import zlib
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# folder names a data set may live under, inside a root
_FOLDERS = {
    "mnist": ["MNIST/raw", "mnist", "MNIST"],
    "fashion-mnist": ["FashionMNIST/raw", "fashion-mnist", "fashion_mnist", "fashionmnist", "FashionMNIST"],
}
_ALIASES = {"mnist": "mnist", "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist",
            "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}

_HERE = Path(__file__).resolve()
# src/fastcurv/datasets.py -> the repository; None for an installed package (site-packages/fastcurv/)
_REPO_ROOT = _HERE.parents[2] if _HERE.parent.parent.name == "src" else None

# published md5s (torchvision's MNIST / FashionMNIST resources): of the .gz files and of their
# decompressed contents, as {md5: (data set, file stem)}
_MD5 = {
    "f68b3c2dcbeaaa9fbdd348bbdeb94873": ("mnist", "train-images-idx3-ubyte"),
    "d53e105ee54ea40749a09fcbcd1e9432": ("mnist", "train-labels-idx1-ubyte"),
    "9fb629c4189551a2d022fa330f9573f3": ("mnist", "t10k-images-idx3-ubyte"),
    "ec29112dd5afa0611ce80d1b7f02629c": ("mnist", "t10k-labels-idx1-ubyte"),
    "6bbc9ace898e44ae57da46a324031adb": ("mnist", "train-images-idx3-ubyte"),
    "a25bea736e30d166cdddb491f175f624": ("mnist", "train-labels-idx1-ubyte"),
    "2646ac647ad5339dbf082846283269ea": ("mnist", "t10k-images-idx3-ubyte"),
    "27ae3e4e09519cfbb04c329615203637": ("mnist", "t10k-labels-idx1-ubyte"),
    "8d4fb7e6c68d591d4c3dfef9ec88bf0d": ("fashion-mnist", "train-images-idx3-ubyte"),
    "25c81989df183df01b3e8a0aad5dffbe": ("fashion-mnist", "train-labels-idx1-ubyte"),
    "bef4ecab320f06d8554ea6380940ec79": ("fashion-mnist", "t10k-images-idx3-ubyte"),
    "bb300cfdad3c16e7a12a480ee83cd310": ("fashion-mnist", "t10k-labels-idx1-ubyte"),
    "f4a8712d7a061bf5bd6d2ca38dc4d50a": ("fashion-mnist", "train-images-idx3-ubyte"),
    "9018921c3c673c538a1fc5bad174d6f9": ("fashion-mnist", "train-labels-idx1-ubyte"),
    "8181f5470baa50b63fa0f6fddb340f0a": ("fashion-mnist", "t10k-images-idx3-ubyte"),
    "15d484375f8d13e6eb1aabb0c3f46965": ("fashion-mnist", "t10k-labels-idx1-ubyte"),
}
_PRETTY = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


class Splits(NamedTuple):
    """Train and test tensors. Images are float in [0, 1] (or normalized), labels int64.

    x_train ``[N_train, *shape]``, y_train ``[N_train]``, x_test ``[N_test, *shape]``, y_test ``[N_test]``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip-compressed or not; detected from its first bytes) into a numpy array.

    The header is 2 zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    int32. Raises ValueError naming the file when the header or the size is wrong, or when the
    gzip stream is damaged.
    """
    path = Path(path)
    return _parse_idx(_decompress(path.read_bytes(), path), path)


def _decompress(raw: bytes, path: Path) -> bytes:
    """``raw`` gunzipped when it starts with the gzip magic bytes, else unchanged."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # zlib.error (a damaged deflate stream) is no OSError
        raise ValueError(f"{path}: corrupt gzip stream ({e})") from None


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    """The array stored in the uncompressed IDX bytes ``raw`` (``path`` only names the file in errors)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {dims} ({expected} data bytes) but the file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (gzip when ``compress`` or the name ends in .gz). For tests and tools."""
    path = Path(path)
    array = np.asarray(array)
    codes = {v.newbyteorder("=").str[1:]: k for k, v in _IDX_DTYPES.items()}
    key = array.dtype.newbyteorder("=").str[1:]
    if key not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    code = codes[key]
    body = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    body += np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    if compress or (compress is None and path.suffix == ".gz"):
        body = gzip.compress(body)
    path.write_bytes(body)
    return path


# --------------------------------------------------------------------------------------------
# finding files
# --------------------------------------------------------------------------------------------
def default_roots(name: str = "mnist") -> list[Path]:
    """The roots searched when no ``root`` is given (see the module docstring), existing or not."""
    roots = []
    env = os.environ.get("FASTCURV_DATA")
    if env:
        roots += [_expand(p) for p in env.split(os.pathsep) if p]
    if _REPO_ROOT is not None:
        roots.append(_REPO_ROOT.parent / "shared" / "data")
    roots.append(Path.cwd() / "data")
    try:
        roots.append(Path.home() / ".cache" / "fastcurv")
    except RuntimeError:  # no $HOME and no passwd entry (env -i jobs, containers with random uids)
        pass
    if _canonical(name) == "fashion-mnist":
        roots.append(Path("/usr/share/datasets/fashion-mnist"))
    return roots


def _expand(p: str | os.PathLike) -> Path:
    """``p`` with ``~`` expanded; unchanged when there is no home directory to expand it to."""
    try:
        return Path(p).expanduser()
    except RuntimeError:
        return Path(p)


def _canonical(name: str) -> str:
    key = name.lower().replace(" ", "")
    if key not in _ALIASES:
        raise ValueError(f"unknown data set {name!r}; available: 'mnist', 'fashion-mnist'")
    return _ALIASES[key]


def _file_in(folder: Path, stem: str) -> Path | None:
    for cand in (folder / f"{stem}.gz", folder / stem):
        if cand.is_file():
            return cand
    return None


def _missing(folder: Path, found: dict[str, Path | None]) -> list[str] | None:
    """What ``folder`` lacks of the four files, when it holds some of them (or something in a file's
    place: a folder, a broken link); None when it holds none of them."""
    notes, anything = [], False
    for k, stem in FILES.items():
        if found[k] is not None:
            anything = True
            continue
        note = f"{stem}(.gz)"
        for cand in (folder / f"{stem}.gz", folder / stem):
            if os.path.lexists(cand):
                anything = True
                note += f" ({cand.name} is {'a broken link' if not cand.exists() else 'not a file'})"
        notes.append(note)
    return notes if anything else None


def find_idx_files(name: str, root: str | os.PathLike | Sequence | None = None) -> dict[str, Path]:
    """Paths of the four IDX files of ``name`` ("mnist" or "fashion-mnist").

    ``root``: a folder (any layout listed in the module docstring), a list of folders, or None for
    :func:`default_roots`. The first folder holding all four files wins; a folder looked at before it
    that holds only some of them is named in a warning with the missing files. Raises
    FileNotFoundError listing every place looked at (and what the incomplete ones lack) and where to
    put the files when they are not all found. The files' content is checked by :func:`load_idx_dataset`.
    """
    name = _canonical(name)
    if root is None:
        roots = default_roots(name)
    elif isinstance(root, (str, os.PathLike)):
        roots = [_expand(root)]
    else:
        roots = [_expand(r) for r in root]
    looked, partial = [], []
    for r in roots:
        for folder in [r / sub for sub in _FOLDERS[name]] + [r]:
            if str(folder) in looked:
                continue
            looked.append(str(folder))
            found = {k: _file_in(folder, stem) for k, stem in FILES.items()}
            if all(found.values()):
                if partial:
                    warnings.warn(f"{name}: skipping {_describe(partial)}; loading the files in {folder} instead",
                                  stacklevel=_outside_level())
                return found
            missing = _missing(folder, found)
            if missing:
                partial.append((folder, missing))
    pretty = "fashion-mnist" if name == "fashion-mnist" else "mnist"
    tv = "FashionMNIST" if name == "fashion-mnist" else "MNIST"
    hint = (
        f"{name} not found (fastcurv never downloads). Put the four files "
        f"{', '.join(s + '.gz' for s in FILES.values())} (gzip or uncompressed) in <root>/{pretty}/ or "
        f"<root>/{tv}/raw/ (torchvision layout), then pass root=<root> or set FASTCURV_DATA=<root>."
    )
    if name == "fashion-mnist":
        hint += (" On Debian/Ubuntu, `apt-get install dataset-fashion-mnist` installs them in "
                 "/usr/share/datasets/fashion-mnist/, which is searched by default.")
    if partial:
        hint += f" Incomplete: {_describe(partial)}."
    raise FileNotFoundError(hint + " Looked in: " + "; ".join(looked))


def _describe(partial: list[tuple[Path, list[str]]]) -> str:
    return "; ".join(f"{folder}, which holds only some of the four files (missing: {', '.join(missing)})"
                     for folder, missing in partial)


def _outside_level() -> int:
    """warnings.warn's stacklevel of the first caller outside this module (the user's line)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _identify(key: str, raw: bytes) -> tuple[str, str] | None:
    """(data set, file stem) of the standard file whose md5 ``raw`` (a file's bytes as stored) has; None
    when unknown or not hashed. Hashes .gz files and uncompressed label files; uncompressed image files
    are not hashed (about 60 ms for MNIST's train images, more than the rest of a subset's load)."""
    if raw[:2] != b"\x1f\x8b" and key.endswith("images"):
        return None
    return _MD5.get(hashlib.md5(raw).hexdigest())


def _check_identity(name: str, files: dict[str, Path], known: dict[str, tuple[str, str] | None]) -> None:
    """Raise when a file found for ``name`` is, by its md5, a standard file of the other data set, or
    another standard file than the one its name says."""
    wrong = {k: v for k, v in known.items() if v is not None and v != (name, FILES[k])}
    if not wrong:
        return
    what = "; ".join(f"{files[k]} is {_PRETTY[v[0]]}'s {v[1]}" for k, v in wrong.items())
    other = "fashion-mnist" if name == "mnist" else "mnist"
    if all(v[0] != name for v in wrong.values()) and len(wrong) == sum(v is not None for v in known.values()):
        raise ValueError(f"{_PRETTY[name]} requested, but the files in {files['train_images'].parent} are "
                         f"{_PRETTY[other]}'s (by their md5). Both data sets use the same file names: point root / "
                         f"FASTCURV_DATA at the folder holding {_PRETTY[name]}, or at a parent with {name}/ and "
                         f"{other}/ subfolders")
    raise ValueError(f"the {_PRETTY[name]} files found are mixed up (by their md5: {what})")


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def _subset(n_total: int, n: int | None, seed: int, what: str) -> np.ndarray | None:
    """Sorted indices of a random subset of ``n`` of ``n_total`` samples drawn with ``seed`` (None: all)."""
    if n is None:
        return None
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{what} must be a positive integer or None, got {n!r}")
    if n > n_total:
        raise ValueError(f"{what}={n} is larger than the {n_total} samples available")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_total, generator=g)[:n].sort().values.numpy()


def _chunks(x: np.ndarray, elements: int = 1 << 18):
    """``x`` in slices of whole rows of about ``elements`` values (bounds the temporaries' memory)."""
    rows = max(1, elements // max(1, x[0].size)) if len(x) else 1
    for i in range(0, len(x), rows):
        yield slice(i, i + rows), x[i:i + rows]


def _pixel_stats(x: np.ndarray, scale: float) -> tuple[float, float]:
    """Mean and (unbiased) standard deviation of all of ``x / scale``, without a float copy of ``x``.

    Integer pixels: exact integer sums; float pixels: two passes in float64.
    """
    n = x.size
    if n < 2:
        raise ValueError(f"normalize needs at least 2 training pixels, got {n}")
    if np.issubdtype(x.dtype, np.integer):
        s1 = s2 = 0  # Python ints: exact
        for _, c in _chunks(x):
            c = c.astype(np.int64)
            s1, s2 = s1 + int(c.sum()), s2 + int((c * c).sum())
        return s1 / (n * scale), ((n * s2 - s1 * s1) / (n * (n - 1))) ** 0.5 / scale
    mean = sum(float((c.astype(np.float64) / scale).sum()) for _, c in _chunks(x)) / n
    ss = sum(float(np.square(c.astype(np.float64) / scale - mean).sum()) for _, c in _chunks(x))
    return mean, (ss / (n - 1)) ** 0.5


def _to_float(x: np.ndarray, scale: float, stats: tuple[float, float] | None, dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` (then ``(. - mean) / std`` with ``stats``) as a ``dtype`` tensor, computed in float64
    a slice at a time, so the only full-size array is the result."""
    out = torch.empty(x.shape, dtype=dtype)
    for sl, c in _chunks(x):
        c = torch.from_numpy(c.astype(np.float64) / scale)
        if stats is not None:
            c = (c - stats[0]) / stats[1]
        out[sl] = c
    return out


def _finish(x_tr, y_tr, x_te, y_te, *, n_train, n_test, seed, normalize, flatten, dtype, scales) -> Splits:
    """Subsets, then pixels divided by ``scales`` (train's, test's; to [0, 1]) and normalized, as ``dtype``,
    then the layout. Only the kept rows are converted to float; normalize's statistics are those of the
    whole training split."""
    stats = _pixel_stats(x_tr, scales[0]) if normalize else None
    tr = _subset(len(y_tr), n_train, seed, "n_train")
    te = _subset(len(y_te), n_test, seed + 1, "n_test")
    if tr is not None:
        x_tr, y_tr = x_tr[tr], y_tr[tr]
    if te is not None:
        x_te, y_te = x_te[te], y_te[te]
    x_tr, x_te = _to_float(x_tr, scales[0], stats, dtype), _to_float(x_te, scales[1], stats, dtype)
    y_tr = torch.from_numpy(np.asarray(y_tr).astype(np.int64))
    y_te = torch.from_numpy(np.asarray(y_te).astype(np.int64))
    if flatten:
        x_tr, x_te = x_tr.reshape(len(x_tr), -1), x_te.reshape(len(x_te), -1)
    else:
        x_tr, x_te = x_tr.unsqueeze(1), x_te.unsqueeze(1)
    return Splits(x_tr.contiguous(), y_tr, x_te.contiguous(), y_te)


def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype (e.g. torch.float32), got {dtype!r}")


def _pixel_scale(x: np.ndarray, path: Path) -> float:
    """What brings the images of file ``path`` to [0, 1]: 255 for integer pixels (checked to be in
    0..255), 1 for float pixels (used as stored, checked to be in [0, 1])."""
    if x.dtype == np.uint8:
        return 255.0
    if np.issubdtype(x.dtype, np.integer):
        lo, hi, scale, what = 0, 255, 255.0, "integer pixels must be in 0..255 (they are divided by 255)"
    else:
        lo, hi, scale, what = 0.0, 1.0, 1.0, "float pixels are used as stored and must be in [0, 1]"
    if x.size and not (x.min() >= lo and x.max() <= hi):  # NaN fails both comparisons
        raise ValueError(f"{path}: {what}; this {x.dtype} file holds values in [{x.min()}, {x.max()}]")
    return scale


def load_idx_dataset(
    name: str = "mnist",
    root=None,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    normalize: bool = False,
    flatten: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Splits:
    """MNIST or Fashion-MNIST as tensors.

    Args:
        name: "mnist" or "fashion-mnist". root: see :func:`find_idx_files`.
        n_train / n_test: keep a random subset of this size (None: all), chosen by ``seed``
            (a fixed subset for a fixed seed; sorted by original index).
        normalize: subtract the mean and divide by the standard deviation of the whole training
            split (pixel values, one scalar each); otherwise pixels are in [0, 1]: integer pixels
            (uint8 in the standard files) are divided by 255, float pixels are used as stored and
            must lie in [0, 1].
        flatten: images as ``[N, 784]`` instead of ``[N, 1, 28, 28]``.

    The files are checked against the published md5s (see the module docstring): files of the
    other data set raise a ValueError, files of unknown md5 (custom data) are accepted. Train and
    test images must have the same size.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    _check_dtype(dtype)
    canon = _canonical(name)
    files = find_idx_files(canon, root)
    arrays, known = {}, {}
    for k, p in files.items():
        raw = p.read_bytes()
        known[k] = _identify(k, raw)
        arrays[k] = _parse_idx(_decompress(raw, p), p)
        del raw
    _check_identity(canon, files, known)
    for split in ("train", "test"):
        xi, yi = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if xi.ndim != 3 or yi.ndim != 1 or len(xi) != len(yi):
            raise ValueError(f"{files[split + '_images']}: expected images [N, H, W] and labels [N], got {xi.shape} and {yi.shape}")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise ValueError(f"train and test images differ in size: {files['train_images']} holds "
                         f"{arrays['train_images'].shape[1:]} images, {files['test_images']} "
                         f"{arrays['test_images'].shape[1:]}")
    scales = tuple(_pixel_scale(arrays[k], files[k]) for k in ("train_images", "test_images"))
    return _finish(arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"],
                   n_train=n_train, n_test=n_test, seed=int(seed), normalize=normalize, flatten=flatten, dtype=dtype,
                   scales=scales)


def load_mnist(root=None, **kwargs) -> Splits:
    """MNIST (60,000 train / 10,000 test 28x28 digits). Keywords as in :func:`load_idx_dataset`."""
    return load_idx_dataset("mnist", root, **kwargs)


def load_fashion_mnist(root=None, **kwargs) -> Splits:
    """Fashion-MNIST (60,000 / 10,000 28x28 clothing images). Keywords as in :func:`load_idx_dataset`."""
    return load_idx_dataset("fashion-mnist", root, **kwargs)


def load_digits(
    *,
    test_fraction: float = 0.25,
    split_seed: int = 0,
    normalize: bool = False,
    flatten: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Splits:
    """The embedded default: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).

    Pixels (0..16 in the source) are scaled to [0, 1]. The train/test split is a fixed random
    permutation drawn with ``split_seed`` (default: 1,348 train / 449 test). ``flatten``: ``[N, 64]``
    (default) or ``[N, 1, 8, 8]``.
    """
    from sklearn.datasets import load_digits as _sk_digits

    _check_dtype(dtype)
    if not isinstance(test_fraction, (int, float, np.floating)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    d = _sk_digits()
    x, y = d.images, d.target
    n = len(y)
    n_test = int(round(n * test_fraction))
    if not 0 < n_test < n:
        raise ValueError(f"test_fraction={test_fraction} leaves {n - n_test} train and {n_test} test samples of {n}; "
                         f"both splits need at least one (use {1 / n:.2g} <= test_fraction <= {1 - 1 / n:.4g})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(split_seed))).numpy()
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return _finish(x[tr], y[tr], x[te], y[te], n_train=None, n_test=None, seed=0, normalize=normalize,
                   flatten=flatten, dtype=dtype, scales=(16.0, 16.0))


def load_dataset(name: str, root=None, **kwargs) -> Splits:
    """By name: "digits" (embedded; ``root`` must be None), "mnist" or "fashion-mnist"."""
    if name.lower() in ("digits", "sklearn-digits"):
        extra = set(kwargs) - {"normalize", "flatten", "dtype", "test_fraction", "split_seed"}
        if extra:
            raise ValueError(f"options {sorted(extra)} do not apply to the digits data set")
        if root is not None:
            raise ValueError(f"the digits data set is embedded and reads no files; got root={root!r}")
        return load_digits(**kwargs)
    return load_idx_dataset(name, root, **kwargs)


# --------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------
class TensorLoader:
    """Deterministic batches ``(x[i:i+b], y[i:i+b])`` over tensors; every pass yields the same batches.

    With ``shuffle=True`` the order is one fixed permutation drawn from ``seed`` at construction
    (so repeated passes, as fastcurv's curvature operators make, see identical batches). The last
    batch is smaller when ``batch_size`` does not divide N, unless ``drop_last``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.x, self.y, self.batch_size, self.drop_last = x, y, int(batch_size), drop_last
        self.order = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(seed))) if shuffle else None

    def __len__(self):
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            if self.order is None:
                yield self.x[sl], self.y[sl]
            else:
                idx = self.order[sl]
                yield self.x[idx], self.y[idx]


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> TensorLoader:
    """A simple deterministic loader over ``(x, y)``; see :class:`TensorLoader`."""
    return TensorLoader(x, y, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
