"""Dataset loaders on small files in the real formats; lookup order and clear errors."""

import gzip

import pytest
import torch

from bnp.config import DataConfig
from bnp.data import DataError, augment_batch, load, read_idx
from conftest import idx_bytes, write_idx_set


def test_fashion_mnist_and_mnist_from_root(data_root):
    for name in ("fashion_mnist", "mnist"):
        d = load(DataConfig(name=name, root=str(data_root), download=False))
        assert d.shape == (1, 28, 28) and d.classes == 10
        assert len(d.train_x) + len(d.val_x) == 64 and len(d.test_x) == 32
        # standard normalization from the training split
        assert abs(d.train_x.mean().item()) < 1e-4 and abs(d.train_x.std().item() - 1) < 1e-2


def test_cifar_from_root(data_root):
    d10 = load(DataConfig(name="cifar10", root=str(data_root), download=False))
    assert d10.shape == (3, 32, 32) and len(d10.train_x) + len(d10.val_x) == 80 and d10.augment
    d100 = load(DataConfig(name="cifar100", root=str(data_root), download=False))
    assert d100.classes == 100 and len(d100.test_x) == 16


def test_validation_split_is_fixed_and_disjoint():
    a = load(DataConfig(name="digits"))
    b = load(DataConfig(name="digits"))
    assert torch.equal(a.val_x, b.val_x) and len(a.train_x) + len(a.val_x) + len(a.test_x) == 1797
    assert len(a.val_x) == round(0.1 * (1797 - 359))


def test_missing_files_list_every_place_tried(tmp_path):
    with pytest.raises(DataError) as err:
        load(DataConfig(name="mnist", root=str(tmp_path), download=False))
    message = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "download: skipped" in message
    assert "IDX files" in message  # how to get the data


def test_download_failure_is_reported_not_raised_raw(tmp_path, monkeypatch):
    import bnp.data

    def offline(name, root):
        raise OSError("Name or service not known")

    monkeypatch.setattr(bnp.data, "_torchvision_download", offline)
    with pytest.raises(DataError, match="torchvision download into .*Name or service not known"):
        load(DataConfig(name="cifar10", root=str(tmp_path), download=True))


def test_truncated_and_corrupt_files_get_clear_errors(tmp_path):
    folder = write_idx_set(tmp_path / "FashionMNIST" / "raw", compress=False)
    images = folder / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        read_idx(images)
    with pytest.raises(DataError, match="truncated or corrupt"):
        load(DataConfig(name="fashion_mnist", root=str(tmp_path), download=False))
    bad_gz = tmp_path / "x-idx1-ubyte.gz"
    bad_gz.write_bytes(gzip.compress(idx_bytes(torch.arange(10).numpy()))[:-8])
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_idx(bad_gz)
    bad_magic = tmp_path / "y-idx1-ubyte"
    bad_magic.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="magic"):
        read_idx(bad_magic)
    pickle_root = tmp_path / "cifar-10-batches-py"
    pickle_root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (pickle_root / name).write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot unpickle"):
        load(DataConfig(name="cifar10", root=str(tmp_path), download=False))


def test_augment_batch_crops_and_flips_deterministically():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    a = augment_batch(x, torch.Generator().manual_seed(0))
    b = augment_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    # every output row is a (possibly flipped, shifted, zero-padded) piece of the input
    values = set(x.flatten().tolist()) | {0.0}
    assert set(a.flatten().tolist()) <= values
