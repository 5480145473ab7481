"""IDX parsing, the real MNIST files when present, the embedded digits, and the missing-file error."""
import gzip

import numpy as np
import pytest
import torch

from fastcurv import datasets
from fastcurv.datasets import FILES, find_idx_files, load_digits, load_idx_dataset, make_loader, read_idx, write_idx

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # published, see shared/data/README
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _have(name):
    try:
        find_idx_files(name)
        return True
    except FileNotFoundError:
        return False


def _fake_set(folder, n_train=12, n_test=5, seed=0, gz=True):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for k, a in data.items():
        write_idx(folder / (FILES[k] + (".gz" if gz else "")), a)
    return data


def test_idx_header_parsing_by_hand(tmp_path):
    """A file written byte by byte (not with write_idx): magic 0x00000803, dims big-endian."""
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big") + arr.tobytes()
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    for name in ("a", "a.gz"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
        np.testing.assert_array_equal(got, arr)
    # big-endian int32 payload
    vals = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "b").write_bytes(bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + vals.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), [1, -2, 70000])


def test_idx_errors_name_the_file(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad.*not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(ValueError, match="short.*shape \\(10,\\)"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("layout,gz", [("MNIST/raw", False), ("mnist", True), ("", True)])
def test_layouts_scaling_and_subsets(tmp_path, layout, gz):
    data = _fake_set(tmp_path / layout if layout else tmp_path, gz=gz)
    s = load_idx_dataset("mnist", tmp_path)
    assert s.x_train.shape == (12, 1, 28, 28) and s.x_train.dtype == torch.float32
    assert s.y_train.dtype == torch.int64 and s.x_test.shape == (5, 1, 28, 28)
    np.testing.assert_allclose(s.x_train[:, 0].numpy(), data["train_images"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(s.y_test.numpy(), data["test_labels"])
    sub = load_idx_dataset("mnist", tmp_path, n_train=5, seed=3, flatten=True)
    again = load_idx_dataset("mnist", tmp_path, n_train=5, seed=3, flatten=True)
    other = load_idx_dataset("mnist", tmp_path, n_train=5, seed=4, flatten=True)
    assert sub.x_train.shape == (5, 784)
    assert torch.equal(sub.x_train, again.x_train)
    assert not torch.equal(sub.x_train, other.x_train)
    rows = [next(i for i in range(12) if np.allclose(data["train_images"][i].ravel() / 255.0, r.numpy(), rtol=1e-6))
            for r in sub.x_train]
    assert rows == sorted(rows) and len(set(rows)) == 5
    norm = load_idx_dataset("mnist", tmp_path, normalize=True, dtype=torch.float64)
    assert abs(norm.x_train.mean().item()) < 1e-9 and abs(norm.x_train.std().item() - 1) < 1e-9
    with pytest.raises(ValueError, match="n_train=13 is larger"):
        load_idx_dataset("mnist", tmp_path, n_train=13)


def test_missing_files_error_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCURV_DATA", str(tmp_path))
    (tmp_path / "fashion-mnist").mkdir()
    write_idx(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz", np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(FileNotFoundError) as e:
        load_idx_dataset("fashion-mnist", tmp_path)
    msg = str(e.value)
    assert "never downloads" in msg and "t10k-labels-idx1-ubyte.gz" in msg and "FASTCURV_DATA" in msg
    assert "dataset-fashion-mnist" in msg and str(tmp_path / "fashion-mnist") in msg
    with pytest.raises(FileNotFoundError, match="mnist not found"):
        datasets.load_mnist(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        load_idx_dataset("cifar", tmp_path)


def test_env_var_root_is_searched(tmp_path, monkeypatch):
    _fake_set(tmp_path / "FashionMNIST" / "raw", n_train=7)
    monkeypatch.setenv("FASTCURV_DATA", str(tmp_path))
    assert datasets.load_fashion_mnist().x_train.shape[0] == 7


@pytest.mark.skipif(not _have("mnist"), reason="real MNIST files not found (../shared/data/mnist or FASTCURV_DATA)")
def test_real_mnist_shapes_and_label_counts():
    s = datasets.load_mnist()
    assert s.x_train.shape == (60000, 1, 28, 28) and s.x_test.shape == (10000, 1, 28, 28)
    assert s.x_train.min() == 0 and s.x_train.max() == 1
    assert torch.bincount(s.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(s.y_test).tolist() == MNIST_TEST_COUNTS
    sub = datasets.load_mnist(n_train=2000, seed=0, flatten=True)
    assert sub.x_train.shape == (2000, 784) and len(torch.unique(sub.y_train)) == 10


@pytest.mark.skipif(not _have("fashion-mnist"), reason="real Fashion-MNIST files not found")
def test_real_fashion_mnist_label_counts():
    s = datasets.load_fashion_mnist(flatten=True)
    assert torch.bincount(s.y_train).tolist() == [6000] * 10 and torch.bincount(s.y_test).tolist() == [1000] * 10


def test_embedded_digits_split_is_deterministic_and_disjoint():
    a, b = load_digits(), load_digits()
    assert a.x_train.shape == (1348, 64) and a.x_test.shape == (449, 64)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert 0 <= a.x_train.min() and a.x_train.max() == 1
    from sklearn.datasets import load_digits as sk

    assert len(a.y_train) + len(a.y_test) == len(sk().target)
    assert torch.bincount(torch.cat([a.y_train, a.y_test])).tolist() == np.bincount(sk().target).tolist()
    c = load_digits(split_seed=1)
    assert not torch.equal(a.y_test, c.y_test)
    assert load_digits(flatten=False).x_train.shape == (1348, 1, 8, 8)


def test_make_loader_is_deterministic_with_ragged_last_batch():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    batches = list(make_loader(x, y, 4))
    assert [len(b[1]) for b in batches] == [4, 4, 2] and len(make_loader(x, y, 4)) == 3
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    sh = make_loader(x, y, 4, shuffle=True, seed=1)
    p1, p2 = [b[1] for b in sh], [b[1] for b in sh]
    assert all(torch.equal(u, v) for u, v in zip(p1, p2))
    assert sorted(torch.cat(p1).tolist()) == list(range(10)) and torch.cat(p1).tolist() != list(range(10))
    assert len(make_loader(x, y, 4, drop_last=True)) == 2
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(x, y, 0)


# --------------------------------------------------------------------------------------------
# hunt 24o: data loading
# --------------------------------------------------------------------------------------------
def _md5(path):
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def test_the_other_data_sets_files_are_refused_by_md5(tmp_path, monkeypatch):
    """Both data sets use the same four file names, and a root holding four files is accepted for either
    name: with FASTCURV_DATA (or root) at MNIST's folder, load_fashion_mnist() returned MNIST without a
    word (and the reverse). The files are now identified by md5 (here: tiny files entered in the table)."""
    _fake_set(tmp_path / "a")
    table = {_md5(tmp_path / "a" / (stem + ".gz")): ("fashion-mnist", stem) for stem in FILES.values()}
    monkeypatch.setattr(datasets, "_MD5", table, raising=False)
    assert datasets.load_fashion_mnist(tmp_path / "a").x_train.shape[0] == 12  # its own files: accepted
    with pytest.raises(ValueError, match=r"MNIST requested, but the files in .*a are Fashion-MNIST's \(by their md5\)"):
        datasets.load_mnist(tmp_path / "a")
    monkeypatch.setenv("FASTCURV_DATA", str(tmp_path / "a"))
    with pytest.raises(ValueError, match="Fashion-MNIST's"):
        datasets.load_mnist()
    # a mix: labels of the other set beside this set's images (counts and ranges match, so nothing else sees it)
    stem = FILES["train_labels"]
    table[_md5(tmp_path / "a" / (stem + ".gz"))] = ("mnist", stem)
    with pytest.raises(ValueError, match=r"mixed up .*train-labels-idx1-ubyte.gz is MNIST's train-labels"):
        datasets.load_fashion_mnist(tmp_path / "a")
    # an uncompressed label file is hashed too (its md5 is the decompressed one's)
    _fake_set(tmp_path / "b", gz=False)
    labels = FILES["test_labels"]
    monkeypatch.setattr(datasets, "_MD5", {_md5(tmp_path / "b" / labels): ("mnist", labels)})
    with pytest.raises(ValueError, match="Fashion-MNIST requested, but the files in .*b are MNIST's"):
        datasets.load_fashion_mnist(tmp_path / "b")


@pytest.mark.skipif(not _have("mnist"), reason="real MNIST files not found")
def test_real_mnist_folder_is_refused_as_fashion_mnist(monkeypatch):
    """The published md5s themselves: MNIST's real folder given as Fashion-MNIST's root (or as FASTCURV_DATA)
    loaded MNIST under the name Fashion-MNIST."""
    folder = find_idx_files("mnist")["train_images"].parent
    with pytest.raises(ValueError, match="Fashion-MNIST requested, but the files in .* are MNIST's"):
        datasets.load_fashion_mnist(folder)
    monkeypatch.setenv("FASTCURV_DATA", str(folder))
    with pytest.raises(ValueError, match="are MNIST's"):
        datasets.load_fashion_mnist()
    assert len(datasets._MD5) == 16 and {v[0] for v in datasets._MD5.values()} == {"mnist", "fashion-mnist"}


def test_float_idx_images_are_not_divided_by_255(tmp_path):
    """Float IDX pixels in [0, 1] were divided by 255 like uint8 ones (test pixel max 0.0039 beside train
    max 1.0, silently). Only integer pixels are scaled now; floats outside [0, 1] are refused."""
    data = _fake_set(tmp_path)
    as_float = data["test_images"] / 255.0
    write_idx(tmp_path / (FILES["test_images"] + ".gz"), as_float.astype(np.float32))
    s = load_idx_dataset("mnist", tmp_path, dtype=torch.float64)
    np.testing.assert_allclose(s.x_test[:, 0].numpy(), as_float, rtol=1e-7)
    np.testing.assert_allclose(s.x_train[:, 0].numpy(), data["train_images"] / 255.0, rtol=1e-15)
    write_idx(tmp_path / (FILES["train_images"] + ".gz"), data["train_images"].astype(np.int16))  # integer: / 255
    np.testing.assert_allclose(load_idx_dataset("mnist", tmp_path).x_train[:, 0].numpy(),
                               data["train_images"] / 255.0, rtol=1e-6)
    write_idx(tmp_path / (FILES["test_images"] + ".gz"), data["test_images"].astype(np.float64))  # 0..255 floats
    with pytest.raises(ValueError, match=r"t10k-images.*float pixels are used as stored and must be in \[0, 1\]"):
        load_idx_dataset("mnist", tmp_path)


def test_an_incomplete_folder_is_named_not_skipped_silently(tmp_path):
    """A folder with 3 of the 4 files (here one under Kaggle's name) was skipped without a word and another
    root's data loaded; with nothing complete, the error did not say which file was missing."""
    _fake_set(tmp_path / "a" / "mnist", n_train=7)
    folder = tmp_path / "a" / "mnist"
    (folder / "train-images-idx3-ubyte.gz").rename(folder / "train-images.idx3-ubyte.gz")  # Kaggle's name
    _fake_set(tmp_path / "b" / "mnist", n_train=9)
    with pytest.warns(UserWarning, match=r"skipping .*a.mnist, which holds only some .*missing: "
                                         r"train-images-idx3-ubyte\(\.gz\)\); loading the files in .*b.mnist instead"):
        assert datasets.load_mnist([tmp_path / "a", tmp_path / "b"]).x_train.shape[0] == 9
    with pytest.raises(FileNotFoundError, match=r"Incomplete: .*a.mnist, .*missing: train-images-idx3-ubyte\(\.gz\)\)"):
        datasets.load_mnist(tmp_path / "a")
    # a folder, or a broken link, in a file's place
    (tmp_path / "a" / "mnist" / "train-images-idx3-ubyte.gz").mkdir()
    (tmp_path / "a" / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "a" / "mnist" / "t10k-labels-idx1-ubyte.gz").symlink_to(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.gz is not a file.*"
                                                r"t10k-labels-idx1-ubyte.gz is a broken link"):
        datasets.load_mnist(tmp_path / "a")


def test_a_damaged_gzip_stream_is_a_value_error_naming_the_file(tmp_path):
    """A damaged deflate stream raised a raw zlib.error without the file name (the CLI printed a traceback)."""
    path = write_idx(tmp_path / "x.gz", np.zeros((50, 28, 28), np.uint8))
    raw = bytearray(path.read_bytes())
    raw[10] = 0x07  # first deflate block: final, type 3 (reserved): "invalid block type"
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"x.gz: corrupt gzip stream \(.*invalid block type"):
        read_idx(path)


def test_no_home_directory_is_not_an_error(tmp_path, monkeypatch):
    """Without $HOME and a passwd entry (env -i jobs, random-uid containers) Path.home() raises RuntimeError,
    and every load without a root failed even with the files in $FASTCURV_DATA."""
    from pathlib import Path

    _fake_set(tmp_path / "mnist", n_train=6)
    monkeypatch.setenv("FASTCURV_DATA", str(tmp_path))

    def no_home(*args):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", classmethod(no_home))
    assert datasets.load_mnist().x_train.shape[0] == 6
    monkeypatch.setattr(Path, "expanduser", no_home)  # the same for "~" in FASTCURV_DATA and root
    assert datasets.load_mnist().x_train.shape[0] == 6
    assert datasets.load_mnist(str(tmp_path)).x_train.shape[0] == 6


def test_train_and_test_images_of_different_sizes_are_refused(tmp_path):
    """28x28 train and 32x32 test images loaded as x_train [N, 784] and x_test [N, 1024]; study() then
    trained and failed afterwards with a raw torch shape error."""
    _fake_set(tmp_path)
    write_idx(tmp_path / (FILES["test_images"] + ".gz"), np.zeros((5, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"train and test images differ in size: .*train-images.* \(28, 28\).*"
                                         r"t10k-images.* \(32, 32\)"):
        load_idx_dataset("mnist", tmp_path, flatten=True)


@pytest.mark.parametrize("fraction", [1e-4, 0.9999])
@pytest.mark.parametrize("flatten", [True, False])
def test_digits_test_fraction_leaving_an_empty_split(fraction, flatten):
    """test_fraction=1e-4 or 0.9999 passed the (0, 1) check but rounds to 0 or 1797 test samples of 1797:
    a RuntimeError from reshape (flatten=True) or a silently empty split (flatten=False)."""
    with pytest.raises(ValueError, match="leaves .* samples of 1797; both splits need at least one"):
        load_digits(test_fraction=fraction, flatten=flatten)
    assert len(load_digits(test_fraction=1 / 1797).y_test) == 1


def test_only_the_kept_rows_are_converted_to_float(tmp_path):
    """n_train / n_test subsets were taken after the whole split was converted to float64 (and normalized):
    493 MiB peak for a 6 MiB MNIST subset (1205 MiB with normalize). Here 4000 28x28 train images: their
    float64 copy alone is 25 MB (tracked by tracemalloc; numpy reports its buffers to it)."""
    import tracemalloc

    data = _fake_set(tmp_path, n_train=4000, n_test=10, gz=False)
    full = data["train_images"].astype(np.float64) / 255
    for normalize in (False, True):
        tracemalloc.start()
        try:
            s = load_idx_dataset("mnist", tmp_path, n_train=10, normalize=normalize, dtype=torch.float64)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < full.nbytes / 2, f"peak {peak / 2**20:.1f} MiB"
        expected = full[torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:10].sort().values.numpy()]
        if normalize:  # statistics of the whole training split, not of the subset
            expected = (expected - full.mean()) / full.std(ddof=1)
        np.testing.assert_allclose(s.x_train[:, 0].numpy(), expected, rtol=1e-12, atol=1e-12)


def test_loose_arguments_are_refused(tmp_path):
    """n_train=True gave a 1-sample subset, seed=1.7 the subset of seed 1, dtype="float32" a RuntimeError about
    a device string, dtype=torch.uint8 pixels truncated to 0/1, and a root for the digits was ignored."""
    _fake_set(tmp_path)
    for kw, msg in [({"n_train": True}, "n_train must be a positive integer"),
                    ({"seed": 1.7}, "seed must be an integer"),
                    ({"dtype": "float32"}, "dtype must be a floating torch dtype"),
                    ({"dtype": torch.uint8}, "dtype must be a floating torch dtype")]:
        with pytest.raises(ValueError, match=msg):
            load_idx_dataset("mnist", tmp_path, **kw)
    with pytest.raises(ValueError, match="digits data set is embedded"):
        datasets.load_dataset("digits", tmp_path)


def test_an_installed_package_does_not_search_a_made_up_shared_folder(tmp_path):
    """In a non-editable install, "../shared/data next to the repository" became <venv>/lib/shared/data."""
    import importlib.util

    site = tmp_path / "lib" / "python3.11" / "site-packages" / "fastcurv"
    site.mkdir(parents=True)
    (site / "datasets.py").write_text(open(datasets.__file__).read())
    spec = importlib.util.spec_from_file_location("installed_datasets", site / "datasets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    roots = mod.default_roots()
    assert tmp_path / "lib" / "shared" / "data" not in roots and roots  # ./data and ~/.cache/fastcurv stay
    assert datasets._REPO_ROOT.parent / "shared" / "data" in datasets.default_roots()
