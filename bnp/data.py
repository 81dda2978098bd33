"""Datasets as tensors on the training device: batches are slices, no DataLoader.

``load(cfg, device)`` returns a ``Data`` with normalized float32 train / validation / test splits.
The validation split is held out of the training set with ``cfg.split_seed`` (the same for every
run); the test split is the official one (digits and synthetic hold one out the same way).

File lookup for the IDX datasets (Fashion-MNIST, MNIST) and CIFAR: ``data.root`` first, then (for
Fashion-MNIST) the Debian package location, then a torchvision download into ``data.root`` when
``data.download`` is true. If all fail, one error lists every place tried and how to get the data.
"""

from __future__ import annotations

import gzip
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from bnp.config import DataConfig

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


class DataError(RuntimeError):
    """Dataset files missing, corrupt or truncated; the message says where and what to do."""


@dataclass
class Data:
    name: str
    shape: tuple[int, ...]  # one sample, e.g. (1, 28, 28)
    classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    augment: bool = False  # random crop (pad 4) + horizontal flip, applied per batch on device

    @property
    def features(self) -> int:
        return math.prod(self.shape)


# ---------------------------------------------------------------------------------------- files
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw), checking its header against its size."""
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read ({err}); the file is corrupt or truncated, delete it and retry")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + math.prod(dims):
        raise DataError(
            f"{path}: truncated or corrupt: header says {dims} ({header + math.prod(dims)} bytes), "
            f"file has {len(raw)} bytes; delete it and retry"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_dir_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (raw or .gz), or None if any is missing."""
    found = {}
    for key, stem in IDX_FILES.items():
        candidates = [folder / stem, folder / f"{stem}.gz"]
        existing = [p for p in candidates if p.is_file()]
        if not existing:
            return None
        found[key] = existing[0]
    return found


def _torchvision_download(name: str, root: Path) -> None:
    import torchvision.datasets as tvd  # imported lazily: ~2 s

    cls = {"fashion_mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    root.mkdir(parents=True, exist_ok=True)
    cls(str(root), train=True, download=True)
    cls(str(root), train=False, download=True)


def _locate(cfg: DataConfig, places: list[tuple[str, Path]], read) -> dict[str, np.ndarray]:
    """Try each (description, folder) with ``read``; then the download; else one clear error."""
    tried = []
    for description, folder in places:
        result = read(folder)  # corrupt or truncated files raise here: never silently skipped
        if result is not None:
            return result
        tried.append(f"{description} {folder}: files not found")
    if cfg.download:
        try:
            _torchvision_download(cfg.name, Path(cfg.root))
            result = read(places[0][1])
            if result is not None:
                return result
            tried.append(f"torchvision download into {cfg.root}: finished, but the files are not where expected")
        except DataError:
            raise
        except Exception as err:  # no network, HTTP errors, checksum mismatches ...
            why = " ".join(str(err).split())[:200]  # one line: the error is shown on one line
            tried.append(f"torchvision download into {cfg.root}: {type(err).__name__}: {why}")
    else:
        tried.append("torchvision download: skipped (data.download=false)")
    raise DataError(
        f"data.name={cfg.name}: no usable copy found ({HOW_TO_GET[cfg.name]}). Tried: " + "; ".join(tried)
    )


HOW_TO_GET = {
    "fashion_mnist": "Get it with `apt-get install dataset-fashion-mnist` (Debian), or put the four IDX files "
    "(train/t10k images/labels, raw or .gz) in <data.root>/FashionMNIST/raw, or allow network access "
    "so torchvision can download them.",
    "mnist": "Put the four IDX files (train/t10k images/labels, raw or .gz) in <data.root>/MNIST/raw, "
    "or allow network access so torchvision can download them.",
    "cifar10": "Put the extracted python version (cifar-10-batches-py/) in <data.root>, or allow network "
    "access so torchvision can download it.",
    "cifar100": "Put the extracted python version (cifar-100-python/) in <data.root>, or allow network "
    "access so torchvision can download it.",
}


def _read_idx_folder(folder: Path) -> dict[str, np.ndarray] | None:
    files = _idx_dir_files(folder)
    if files is None:
        return None
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
            raise DataError(f"{folder}: {split} images and labels differ in count")
    arrays["train_x"] = arrays["train_x"][:, None]  # (N, 1, 28, 28)
    arrays["test_x"] = arrays["test_x"][:, None]
    return arrays


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as err:
        raise DataError(f"{path}: cannot unpickle ({type(err).__name__}); the file is corrupt or truncated")


def _read_cifar_folder(folder: Path, train_files: list[str], test_file: str, label_key: str):
    paths = [folder / f for f in train_files] + [folder / test_file]
    if not all(p.is_file() for p in paths):
        return None
    parts = [_unpickle(p) for p in paths]
    arrays = {}
    for split, batch in (("train", parts[:-1]), ("test", parts[-1:])):
        try:
            x = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batch])
            y = np.concatenate([np.asarray(b[label_key]) for b in batch])
        except KeyError as err:
            raise DataError(f"{folder}: {split} batch lacks key {err}; not a CIFAR python batch")
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
            raise DataError(f"{folder}: {split} data has shape {x.shape} for {len(y)} labels, expected (N, 3072)")
        arrays[f"{split}_x"] = x.reshape(-1, 3, 32, 32)
        arrays[f"{split}_y"] = y
    return arrays


# ---------------------------------------------------------------------------------------- sources
def _fashion_mnist(cfg: DataConfig):
    root = Path(cfg.root)
    places = [("data.root", root / "FashionMNIST" / "raw"), ("data.root", root),
              ("Debian package dataset-fashion-mnist", DEBIAN_FASHION_MNIST)]
    return _locate(cfg, places, _read_idx_folder), 10


def _mnist(cfg: DataConfig):
    root = Path(cfg.root)
    return _locate(cfg, [("data.root", root / "MNIST" / "raw"), ("data.root", root)], _read_idx_folder), 10


def _cifar10(cfg: DataConfig):
    train = [f"data_batch_{i}" for i in range(1, 6)]
    read = lambda folder: _read_cifar_folder(folder, train, "test_batch", "labels")  # noqa: E731
    return _locate(cfg, [("data.root", Path(cfg.root) / "cifar-10-batches-py")], read), 10


def _cifar100(cfg: DataConfig):
    read = lambda folder: _read_cifar_folder(folder, ["train"], "test", "fine_labels")  # noqa: E731
    return _locate(cfg, [("data.root", Path(cfg.root) / "cifar-100-python")], read), 100


def _holdout(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(len(x))
    n_out = max(1, int(round(fraction * len(x))))
    return x[order[n_out:]], y[order[n_out:]], x[order[:n_out]], y[order[:n_out]]


def _digits(cfg: DataConfig):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)[:, None]  # (1797, 1, 8, 8), 0..255
    train_x, train_y, test_x, test_y = _holdout(x, bunch.target, cfg.test_fraction, cfg.split_seed + 1)
    return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y), 10


def _synthetic(cfg: DataConfig):
    """A fixed linear teacher on well-conditioned features, observed through a bad affine map
    (feature scales spanning 3 decades, means far from 0): the case preconditioning is for."""
    gen = torch.Generator().manual_seed(cfg.split_seed + 12345)
    features = math.prod(cfg.shape)
    z = torch.randn(cfg.samples, features, generator=gen)
    teacher = torch.randn(features, cfg.classes, generator=gen)
    y = (z @ teacher + 0.1 * torch.randn(cfg.samples, cfg.classes, generator=gen)).argmax(1)
    scale = torch.logspace(-1.5, 1.5, features)[torch.randperm(features, generator=gen)]
    offset = torch.linspace(2, 8, features)[torch.randperm(features, generator=gen)]
    x = (z * scale + offset).reshape(-1, *cfg.shape).numpy()
    train_x, train_y, test_x, test_y = _holdout(x, y.numpy(), cfg.test_fraction, cfg.split_seed + 1)
    return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y), cfg.classes


SOURCES = {"digits": _digits, "fashion_mnist": _fashion_mnist, "mnist": _mnist, "cifar10": _cifar10,
           "cifar100": _cifar100, "synthetic": _synthetic}


# ---------------------------------------------------------------------------------------- assembly
def load(cfg: DataConfig, device: torch.device | str = "cpu") -> Data:
    arrays, classes = SOURCES[cfg.name](cfg)
    train_x, train_y, val_x, val_y = _holdout(arrays["train_x"], arrays["train_y"], cfg.val_fraction, cfg.split_seed)
    if cfg.limit is not None:
        train_x, train_y = train_x[: cfg.limit], train_y[: cfg.limit]
    as_float = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
    raw = {"train": as_float(train_x), "val": as_float(val_x), "test": as_float(arrays["test_x"])}
    # standard normalization: per-channel mean and std of the training split ("synthetic" is left
    # unnormalized on purpose: it is the badly conditioned case)
    if cfg.name != "synthetic":
        dims = (0, *range(2, raw["train"].dim()))
        mean = raw["train"].mean(dims, keepdim=True)[0:1]
        std = raw["train"].std(dims, keepdim=True)[0:1].clamp_min(1e-6)
        raw = {k: (v - mean) / std for k, v in raw.items()}
    labels = {"train": train_y, "val": val_y, "test": arrays["test_y"]}
    t = {k: v.to(device) for k, v in raw.items()}
    lab = {k: torch.as_tensor(np.asarray(v, dtype=np.int64)).to(device) for k, v in labels.items()}
    augment = cfg.augments()
    return Data(cfg.name, tuple(t["train"].shape[1:]), classes, t["train"], lab["train"], t["val"], lab["val"],
                t["test"], lab["test"], augment=augment)


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip per sample, batched on x's device
    (``generator`` must live on the same device)."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    shift = torch.randint(0, 2 * pad + 1, (2, n, 1, 1, 1), generator=generator, device=x.device)
    rows = (shift[0] + torch.arange(h, device=x.device).view(1, 1, h, 1)).expand(n, c, h, w + 2 * pad)
    cols = (shift[1] + torch.arange(w, device=x.device).view(1, 1, 1, w)).expand(n, c, h, w)
    cropped = padded.gather(2, rows).gather(3, cols)
    flip = torch.rand(n, 1, 1, 1, generator=generator, device=x.device) < 0.5
    return torch.where(flip, cropped.flip(3), cropped)


class EpochBatches:
    """The training set in a seeded shuffle per epoch (train.seed and the epoch alone), cut into this
    process's part of each global batch, augmented where the data asks for it. Each epoch is shuffled
    in place into the same buffers: a captured CUDA-graph step reads them at fixed addresses."""

    def __init__(self, data: Data, seed: int, steps_per_epoch: int, batch_size: int, rank: int, world: int,
                 device: torch.device):
        self.data, self.seed, self.steps_per_epoch, self.device = data, seed, steps_per_epoch, device
        self.batch_size, self.local_batch, self.rank = batch_size, batch_size // world, rank
        self.aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
        self._cache = (-1, None, None)

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current epoch's shuffled buffers (refilled in place each epoch)."""
        return self._cache[1], self._cache[2]

    def _epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.data.train_x), generator=gen).to(self.device)
            _, x, y = self._cache
            if x is None:
                x, y = torch.empty_like(self.data.train_x), torch.empty_like(self.data.train_y)
            torch.index_select(self.data.train_x, 0, order, out=x)
            torch.index_select(self.data.train_y, 0, order, out=y)
            self._cache = (epoch, x, y)
        return self._cache[1], self._cache[2]

    def start(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The epoch buffers of ``step`` and where this process's batch starts in them."""
        epoch, position = divmod(step, self.steps_per_epoch)
        x_all, y_all = self._epoch(epoch)
        return x_all, y_all, position * self.batch_size + self.rank * self.local_batch

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's batch of ``step``."""
        x_all, y_all, start = self.start(step)
        x, y = x_all[start : start + self.local_batch], y_all[start : start + self.local_batch]
        if self.data.augment:
            x = augment_batch(x, self.aug_gen)
        return x, y
