"""Shared fixtures: small dataset files in the real formats, made by the tests themselves."""

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train=64, n_test=32, compress=True, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, array in files.items():
        data = idx_bytes(array)
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


def write_cifar(root: Path, hundred=False, n_per_batch=16, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    key, classes = ("fine_labels", 100) if hundred else ("labels", 10)
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (n_per_batch, 3072)).astype(np.uint8),
                 key: list(rng.integers(0, classes, n_per_batch))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data.root holding small Fashion-MNIST, MNIST, CIFAR-10 and CIFAR-100 files."""
    root = tmp_path_factory.mktemp("data")
    write_idx_set(root / "FashionMNIST" / "raw", compress=True)
    write_idx_set(root / "MNIST" / "raw", compress=False, seed=1)
    write_cifar(root)
    write_cifar(root, hundred=True)
    return root


@pytest.fixture(scope="session")
def compose():
    """compose(*overrides) -> the real primary config, as `python -m bnp.train` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import bnp.train  # noqa: F401  (registers the config resolvers)

    def _compose(*overrides):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))

    return _compose


TINY = ["logger=none", "train.steps=2", "train.batch_size=4", "train.eval_batch_size=64", "train.device=cpu",
        "data.limit=40"]
