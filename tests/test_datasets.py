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
