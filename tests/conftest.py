"""Shared fixtures: small dataset files in the real formats, made by the tests themselves."""

import gzip
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


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


def cli(*args, env_extra=None, **kwargs):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "bnp.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def wandb_records(path: Path):
    """Decode a W&B transaction log (LevelDB log format of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, chunks, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        chunks = payload if kind in (1, 2) else chunks + payload  # FULL/FIRST start, MIDDLE/LAST append
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


def wandb_history(path: Path) -> dict[int, dict]:
    """The history rows of one W&B transaction log, by step."""
    import json

    history: dict[int, dict] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
    return history


def train_steps(model, pre, opt, batches) -> None:
    """Plain training steps with a preconditioner: forward, backward, pre.step(), opt.step()."""
    from torch.nn import functional as F

    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()
