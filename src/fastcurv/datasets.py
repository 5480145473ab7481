"""Data sets for studies: MNIST and Fashion-MNIST from local IDX files, and an embedded default.

Nothing here downloads. MNIST / Fashion-MNIST are read from the four standard IDX files
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``), gzip-compressed (``.gz``) or not, found in any of these layouts under
a root folder:

* torchvision style: ``<root>/MNIST/raw/`` or ``<root>/FashionMNIST/raw/``;
* plain folders: ``<root>/mnist/`` or ``<root>/fashion-mnist/`` (also ``fashion_mnist``, ``fashionmnist``);
* the root itself holding the four files.

Roots searched when none is given, in order: ``$FASTCURV_DATA``, ``../shared/data`` next to the
repository (``<repo>/../shared/data``), ``./data``, ``~/.cache/fastcurv``, and (Fashion-MNIST only)
Debian's ``/usr/share/datasets/fashion-mnist`` from the package ``dataset-fashion-mnist``.

:func:`load_digits` is the embedded default: scikit-learn's bundled 8x8 digits (1,797 images
shipped inside scikit-learn), no files needed.
"""
from __future__ import annotations

import gzip
import os
import struct
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

_REPO_ROOT = Path(__file__).resolve().parents[2]  # src/fastcurv/datasets.py -> the repository


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
    int32. Raises ValueError naming the file when the header or the size is wrong.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from None
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
        roots += [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    roots += [_REPO_ROOT.parent / "shared" / "data", Path.cwd() / "data", Path.home() / ".cache" / "fastcurv"]
    if _canonical(name) == "fashion-mnist":
        roots.append(Path("/usr/share/datasets/fashion-mnist"))
    return roots


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


def find_idx_files(name: str, root: str | os.PathLike | Sequence | None = None) -> dict[str, Path]:
    """Paths of the four IDX files of ``name`` ("mnist" or "fashion-mnist").

    ``root``: a folder (any layout listed in the module docstring), a list of folders, or None for
    :func:`default_roots`. Raises FileNotFoundError listing every place looked at and where to put
    the files when they are not all found.
    """
    name = _canonical(name)
    if root is None:
        roots = default_roots(name)
    elif isinstance(root, (str, os.PathLike)):
        roots = [Path(root).expanduser()]
    else:
        roots = [Path(r).expanduser() for r in root]
    looked = []
    for r in roots:
        for folder in [r / sub for sub in _FOLDERS[name]] + [r]:
            looked.append(folder)
            found = {k: _file_in(folder, stem) for k, stem in FILES.items()}
            if all(found.values()):
                return found
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
    unique = list(dict.fromkeys(str(p) for p in looked))
    raise FileNotFoundError(hint + " Looked in: " + "; ".join(unique))


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def _subset(n_total: int, n: int | None, seed: int, what: str) -> torch.Tensor | None:
    if n is None:
        return None
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{what} must be a positive integer or None, got {n!r}")
    if n > n_total:
        raise ValueError(f"{what}={n} is larger than the {n_total} samples available")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_total, generator=g)[:n].sort().values


def _finish(x_tr, y_tr, x_te, y_te, *, n_train, n_test, seed, normalize, flatten, dtype, scale) -> Splits:
    x_tr = torch.from_numpy(np.asarray(x_tr, dtype=np.float64) / scale)
    x_te = torch.from_numpy(np.asarray(x_te, dtype=np.float64) / scale)
    y_tr = torch.from_numpy(np.asarray(y_tr).astype(np.int64))
    y_te = torch.from_numpy(np.asarray(y_te).astype(np.int64))
    if normalize:
        # statistics of the whole training split (before any subsetting), one scalar each
        mean, std = x_tr.mean(), x_tr.std()
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    idx = _subset(len(y_tr), n_train, seed, "n_train")
    if idx is not None:
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    idx = _subset(len(y_te), n_test, seed + 1, "n_test")
    if idx is not None:
        x_te, y_te = x_te[idx], y_te[idx]
    if flatten:
        x_tr, x_te = x_tr.reshape(len(x_tr), -1), x_te.reshape(len(x_te), -1)
    else:
        x_tr, x_te = x_tr.unsqueeze(1), x_te.unsqueeze(1)
    return Splits(x_tr.to(dtype).contiguous(), y_tr, x_te.to(dtype).contiguous(), y_te)


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
            split (pixel values, one scalar each); otherwise pixels are in [0, 1].
        flatten: images as ``[N, 784]`` instead of ``[N, 1, 28, 28]``.
    """
    files = find_idx_files(name, root)
    arrays = {k: read_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        xi, yi = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if xi.ndim != 3 or yi.ndim != 1 or len(xi) != len(yi):
            raise ValueError(f"{files[split + '_images']}: expected images [N, H, W] and labels [N], got {xi.shape} and {yi.shape}")
    return _finish(arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"],
                   n_train=n_train, n_test=n_test, seed=seed, normalize=normalize, flatten=flatten, dtype=dtype,
                   scale=255.0)


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

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d = _sk_digits()
    x, y = d.images, d.target
    n = len(y)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(split_seed))).numpy()
    n_test = int(round(n * test_fraction))
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return _finish(x[tr], y[tr], x[te], y[te], n_train=None, n_test=None, seed=0, normalize=normalize,
                   flatten=flatten, dtype=dtype, scale=16.0)


def load_dataset(name: str, root=None, **kwargs) -> Splits:
    """By name: "digits" (embedded), "mnist" or "fashion-mnist"."""
    if name.lower() in ("digits", "sklearn-digits"):
        extra = set(kwargs) - {"normalize", "flatten", "dtype", "test_fraction", "split_seed"}
        if extra:
            raise ValueError(f"options {sorted(extra)} do not apply to the digits data set")
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
