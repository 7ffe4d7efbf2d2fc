"""The audit's data: nothing here downloads.

* ``digits``: scikit-learn's 8x8 handwritten digits (1797), pixels / 16, a stratified 1347/450
  train/test split drawn with the run's seed, standardized per pixel with train statistics.
* ``mnist1d``: generated locally with ``mnist1d.data.make_dataset(get_dataset_args())`` (4000/1000,
  length 40; the generator's own fixed seed), standardized per feature with train statistics.
  (``mnist1d.data.get_dataset`` downloads and is never called.)
* ``mnist`` / ``fashion-mnist``: IDX files (gzipped or not) from ``--data-dir``.
* ``cifar10``: the CIFAR-10 "python version" batches from ``--data-dir``.
  MNIST-style and CIFAR images are standardized per channel with train statistics.

A missing or malformed file raises :class:`DataError` naming the file and what was wrong.

Views (:func:`prepare`): an optional seeded training subset, an optional stratified validation
split carved from the training set (CLAIMS.md: 20%, with the first seed of the set), and tensors
in float32 / int64. Other views (e.g. sequences) register with :func:`register_dataset`.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = ["DataError", "Dataset", "Split", "load", "prepare", "register_dataset", "read_idx", "load_cifar10"]


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file."""


@dataclass
class Dataset:
    """Raw train/test arrays (numpy), before any view."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


@dataclass
class Split:
    """A prepared view: float32 inputs, int64 labels; ``evals`` maps names ("test", "val") to (x, y)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    evals: dict[str, tuple[torch.Tensor, torch.Tensor]]
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


# ---------------------------------------------------------------- standardization and splits
def _standardize(train: np.ndarray, test: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=axes, keepdims=True)
    std = train.std(axis=axes, keepdims=True)
    std[std < 1e-8] = 1.0  # constant pixels (digit borders) stay 0 instead of dividing by 0
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def stratified_split(y: np.ndarray, n_second: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (first, second) with ``n_second`` in the second part, class proportions kept."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    a, b = train_test_split(idx, test_size=n_second, stratify=y, random_state=seed)
    return np.sort(a), np.sort(b)


# ---------------------------------------------------------------- built-in data sets
def _digits(seed: int, data_dir: str | None) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    tr, te = stratified_split(y, 450, seed)  # 1347 / 450
    xtr, xte = _standardize(x[tr], x[te], axes=(0,))
    return Dataset("digits", xtr, y[tr], xte, y[te], 10)


@lru_cache(maxsize=1)
def _mnist1d_raw() -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())  # generated locally; get_dataset would download
    return d["x"], d["y"], d["x_test"], d["y_test"]


def _mnist1d(seed: int, data_dir: str | None) -> Dataset:
    x, y, xt, yt = _mnist1d_raw()
    xtr, xte = _standardize(x, xt, axes=(0,))
    return Dataset("mnist1d", xtr, y.astype(np.int64), xte, yt.astype(np.int64), 10)


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
              0x0E: np.dtype(">f8")}


def _open(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    return raw


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (gzipped or not): magic ``00 00 <type> <ndim>``, ndim big-endian uint32
    sizes, then the data."""
    path = Path(path)
    raw = _open(path)
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (magic starts {raw[:2].hex()}, expected 0000)")
    code, nd = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise DataError(f"{path}: unknown IDX data type 0x{code:02x}")
    if ndim is not None and nd != ndim:
        raise DataError(f"{path}: expected {ndim} dimensions, the header says {nd}")
    if len(raw) < 4 + 4 * nd:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes for {nd} dimensions)")
    dims = struct.unpack(">" + "I" * nd, raw[4 : 4 + 4 * nd])
    dtype = np.dtype(_IDX_TYPES[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * nd :]
    if len(body) != expected:
        raise DataError(f"{path}: header says {dims} ({expected} data bytes) but the file holds {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


_IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}
_IDX_DIRS = {"mnist": ("mnist", "MNIST/raw", "MNIST", ""), "fashion-mnist": ("fashion-mnist", "fashion_mnist",
                                                                             "FashionMNIST/raw", "FashionMNIST", "")}


def _find(data_dir: str | None, subdirs: tuple[str, ...], stem: str, what: str) -> Path:
    if not data_dir:
        raise DataError(f"{what}: needs --data-dir (the folder holding {stem}[.gz])")
    base = Path(data_dir)
    tried = []
    for sub in subdirs:
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
            p = base / sub / name if sub else base / name
            tried.append(str(p))
            if p.is_file():
                return p
    raise DataError(f"{what}: file {stem}[.gz] not found; looked at {', '.join(tried[:6])}"
                    + (" ..." if len(tried) > 6 else ""))


def _idx_dataset(name: str, data_dir: str | None) -> Dataset:
    paths = {k: _find(data_dir, _IDX_DIRS[name], stem, name) for k, stem in _IDX_NAMES.items()}
    arrays = {}
    for k, p in paths.items():
        arr = read_idx(p, 3 if k.endswith("x") else 1)
        if k.endswith("y") and (arr.size and (arr.min() < 0 or arr.max() > 9)):
            raise DataError(f"{p}: labels must be 0..9 (found {int(arr.min())}..{int(arr.max())})")
        arrays[k] = arr
    for part in ("train", "test"):
        nx, ny = len(arrays[f"{part}_x"]), len(arrays[f"{part}_y"])
        if nx != ny:
            raise DataError(f"{paths[part + '_y']}: {ny} labels for {nx} images in {paths[part + '_x']}")
    xtr = arrays["train_x"].astype(np.float32)[:, None] / 255.0
    xte = arrays["test_x"].astype(np.float32)[:, None] / 255.0
    xtr, xte = _standardize(xtr, xte, axes=(0, 2, 3))
    return Dataset(name, xtr, arrays["train_y"].astype(np.int64), xte, arrays["test_y"].astype(np.int64), 10)


# ---------------------------------------------------------------- CIFAR-10
def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")  # the official format is a pickle; read only files you trust
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch (unpickling failed: {type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict with b'data' and b'labels' (got {type(d).__name__})")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: missing key {'data' if data is None else 'labels'} (keys: {sorted(map(str, d))})")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: data must be (N, 3072) uint8 (got shape {data.shape})")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must be 0..9 (found {labels.min()}..{labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | None) -> Dataset:
    if not data_dir:
        raise DataError("cifar10: needs --data-dir (the folder holding cifar-10-batches-py/)")
    base = Path(data_dir)
    root = base / "cifar-10-batches-py" if (base / "cifar-10-batches-py").is_dir() else base
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for n in names:
        if not (root / n).is_file():
            raise DataError(f"cifar10: file {root / n} not found (expected the python batches data_batch_1..5, test_batch)")
    parts = [_cifar_batch(root / n) for n in names]
    xtr = np.concatenate([p[0] for p in parts[:5]]).astype(np.float32) / 255.0
    ytr = np.concatenate([p[1] for p in parts[:5]])
    xte, yte = parts[5][0].astype(np.float32) / 255.0, parts[5][1]
    xtr, xte = _standardize(xtr, xte, axes=(0, 2, 3))
    return Dataset("cifar10", xtr, ytr, xte, yte, 10)


# ---------------------------------------------------------------- registry and views
_LOADERS: dict[str, tuple[Callable[[int, str | None], Dataset], bool]] = {}


def register_dataset(name: str, fn: Callable[[int, str | None], Dataset], seeded: bool = False) -> None:
    """Add a data set: ``fn(seed, data_dir) -> Dataset``. ``seeded``: whether the seed changes it."""
    _LOADERS[name] = (fn, seeded)


register_dataset("digits", _digits, seeded=True)
register_dataset("mnist1d", _mnist1d)
register_dataset("mnist", lambda seed, d: _idx_dataset("mnist", d))
register_dataset("fashion-mnist", lambda seed, d: _idx_dataset("fashion-mnist", d))
register_dataset("cifar10", lambda seed, d: load_cifar10(d))


def names() -> list[str]:
    return sorted(_LOADERS)


@lru_cache(maxsize=16)
def _load_cached(name: str, seed: int, data_dir: str | None) -> Dataset:
    return _LOADERS[name][0](seed, data_dir)


def load(name: str, seed: int = 0, data_dir: str | None = None) -> Dataset:
    if name not in _LOADERS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(names())}")
    seeded = _LOADERS[name][1]
    return _load_cached(name, seed if seeded else 0, data_dir)


@lru_cache(maxsize=64)
def _prepare_cached(name: str, seed: int, data_dir: str | None, subset: int | None, val_fraction: float) -> Split:
    ds = load(name, seed, data_dir)
    x, y = ds.x_train, ds.y_train
    if subset is not None and subset < len(y):
        rng = np.random.default_rng([seed, 7919])
        keep = np.sort(rng.permutation(len(y))[:subset])  # a seeded random subset
        x, y = x[keep], y[keep]
    evals = {}
    if val_fraction:
        tr, va = stratified_split(y, int(round(len(y) * val_fraction)), seed)
        evals["val"] = (torch.from_numpy(x[va]), torch.from_numpy(y[va]))
        x, y = x[tr], y[tr]
    evals["test"] = (torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test))
    return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)), evals,
                 ds.num_classes)


def prepare(cfg: dict, seed: int) -> Split:
    """The view a run trains on: ``cfg`` = {"name", "data_dir"?, "subset"?, "val_fraction"?}."""
    return _prepare_cached(cfg["name"], view_seed(cfg, seed), cfg.get("data_dir"), cfg.get("subset"),
                           float(cfg.get("val_fraction") or 0.0))


def view_seed(cfg: dict, seed: int) -> int:
    """The seed the view actually depends on: 0 for a fixed data set used whole (mnist1d, MNIST),
    so members with different seeds share one tensor."""
    name = cfg["name"]
    seeded = _LOADERS[name][1] if name in _LOADERS else True
    if seeded or cfg.get("subset") is not None or cfg.get("val_fraction"):
        return int(seed)
    return 0
