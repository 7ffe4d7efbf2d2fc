"""The audit's data: nothing here downloads.

* ``digits``: scikit-learn's 8x8 handwritten digits (1797), pixels / 16, a stratified 1347/450
  train/test split drawn with the run's seed, standardized per pixel with train statistics.
* ``mnist1d``: generated locally with ``mnist1d.data.make_dataset(get_dataset_args())`` (4000/1000,
  length 40; the generator's own fixed seed), standardized per feature with train statistics.
  (``mnist1d.data.get_dataset`` downloads and is never called.)
* ``mnist`` / ``fashion-mnist``: IDX files (gzipped or not) from ``--data-dir``.
* ``cifar10``: the CIFAR-10 "python version" batches from ``--data-dir``. They are Python
  pickles: :class:`SafeUnpickler` admits only what those files hold (dicts, lists, bytes, str,
  numbers, numpy arrays), so a malicious file is refused and executes nothing.
  MNIST-style and CIFAR images are standardized per channel with train statistics.

A missing or malformed file raises :class:`DataError` naming the file and what was wrong.

Identity (:func:`source`): what a run's key records about its data. For a ``--data-dir`` set, the
sha256 of its files' contents (never their folder, so moving the files keeps the key and editing
them changes it; the loader checks the files it reads against it); for the shipped sets, their
generator (scikit-learn's digits, mnist1d's ``make_dataset`` with its arguments) and its version.

Views (:func:`prepare`): an optional seeded training subset, an optional stratified validation
split carved from the training set (CLAIMS.md: 20%, with the first seed of the set), and tensors
in float32 / int64. Other views (e.g. sequences) register with :func:`register_dataset`.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import pickle
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = ["DataError", "Dataset", "Split", "load", "prepare", "register_dataset", "read_idx", "load_cifar10",
           "SafeUnpickler", "DATA_DIR_SETS", "data_files", "files_sha256", "source"]


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


# mnist1d's generator arguments (its package defaults, get_dataset_args(), written out so that the
# run key names them without importing the generator, and an upgrade of the package that changed
# its defaults would not change the data silently)
MNIST1D_ARGS = {"num_samples": 5000, "train_split": 0.8, "template_len": 12, "padding": [36, 60], "scale_coeff": 0.4,
                "max_translation": 48, "corr_noise_scale": 0.25, "iid_noise_scale": 0.02, "shear_scale": 0.75,
                "shuffle_seq": False, "final_seq_length": 40, "seed": 42}


@lru_cache(maxsize=1)
def _mnist1d_raw() -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset
    from mnist1d.utils import ObjectView

    args = ObjectView(dict(vars(get_dataset_args()), **MNIST1D_ARGS))
    d = make_dataset(args)  # generated locally; get_dataset would download
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
        raise DataError(f"{what} is read from files (nothing is downloaded): needs --data-dir, the folder holding "
                        f"{', '.join(_IDX_NAMES.values())} (gzipped or not)")
    base = Path(data_dir)
    if not base.is_dir():
        raise DataError(f"{what}: --data-dir {data_dir} is not a folder")
    tried = []
    for sub in subdirs:
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
            p = base / sub / name if sub else base / name
            tried.append(str(p))
            if p.is_file():
                return p
    raise DataError(f"{what}: file {stem}[.gz] not found; looked at {', '.join(tried[:6])}"
                    + (" ..." if len(tried) > 6 else ""))


def _idx_files(name: str, data_dir: str | None) -> dict[str, Path]:
    return {k: _find(data_dir, _IDX_DIRS[name], stem, name) for k, stem in _IDX_NAMES.items()}


def _idx_dataset(name: str, data_dir: str | None) -> Dataset:
    paths = _idx_files(name, data_dir)
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
def _numpy_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled numpy array may name, under numpy 1's and numpy 2's module names."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # multiarray._reconstruct
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numeric._frombuffer (protocol 5)
    scalar = np.float64(0).__reduce__()[0]  # multiarray.scalar
    out: dict[tuple[str, str], object] = {}
    for core in ("numpy.core", "numpy._core"):
        out[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        out[(f"{core}.multiarray", "scalar")] = scalar
        out[(f"{core}.numeric", "_frombuffer")] = frombuffer
    out[("numpy", "ndarray")] = np.ndarray
    out[("numpy", "dtype")] = np.dtype
    out[("_codecs", "encode")] = _latin1_encode  # how protocol-2 pickles spell bytes
    return out


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it (str -> bytes), for latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {type(text).__name__} / {encoding!r} is not allowed")
    return text.encode("latin1")


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that admits only plain data: dicts, lists, tuples, bytes, str, numbers, and
    numpy arrays (numpy's array reconstructor, ``ndarray``, ``dtype``, scalars, and the latin-1
    ``_codecs.encode`` that protocol-2 pickles use for bytes). Any other global a pickle names
    (``os.system``, ``builtins.eval``, a class to instantiate, ...) raises
    :class:`pickle.UnpicklingError` before anything is called: a malicious file executes nothing.
    Object arrays (``dtype=object``) are refused too, as numpy would unpickle their items."""

    _ALLOWED: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str):
        allowed = SafeUnpickler._ALLOWED
        if allowed is None:
            allowed = SafeUnpickler._ALLOWED = _numpy_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(f"refused to load global {module}.{name} (only plain data and numpy arrays "
                                     "are allowed)")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id (only plain data and numpy arrays are allowed)")


def safe_load(f, **kwargs):
    """``pickle.load`` through :class:`SafeUnpickler`; numpy object arrays are refused."""
    obj = SafeUnpickler(f, **kwargs).load()
    _refuse_object_arrays(obj)
    return obj


def _refuse_object_arrays(obj, depth: int = 0) -> None:
    if depth > 50:
        raise pickle.UnpicklingError("nesting too deep")
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise pickle.UnpicklingError("refused a numpy array of Python objects")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _refuse_object_arrays(k, depth + 1)
            _refuse_object_arrays(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _refuse_object_arrays(v, depth + 1)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = safe_load(f, encoding="bytes")  # the official format is a pickle: plain data only
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch: {e}; nothing in it was executed") from None
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


def _cifar_files(data_dir: str | None) -> dict[str, Path]:
    if not data_dir:
        raise DataError("cifar10 is read from files (nothing is downloaded): needs --data-dir, the folder holding "
                        "cifar-10-batches-py/ (data_batch_1..5, test_batch)")
    base = Path(data_dir)
    if not base.is_dir():
        raise DataError(f"cifar10: --data-dir {data_dir} is not a folder")
    root = base / "cifar-10-batches-py" if (base / "cifar-10-batches-py").is_dir() else base
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for n in names:
        if not (root / n).is_file():
            raise DataError(f"cifar10: file {root / n} not found (expected the python batches data_batch_1..5, test_batch)")
    return {n: root / n for n in names}


def load_cifar10(data_dir: str | None) -> Dataset:
    parts = [_cifar_batch(p) for p in _cifar_files(data_dir).values()]
    xtr = np.concatenate([p[0] for p in parts[:5]]).astype(np.float32) / 255.0
    ytr = np.concatenate([p[1] for p in parts[:5]])
    xte, yte = parts[5][0].astype(np.float32) / 255.0, parts[5][1]
    xtr, xte = _standardize(xtr, xte, axes=(0, 2, 3))
    return Dataset("cifar10", xtr, ytr, xte, yte, 10)


# ---------------------------------------------------------------- registry and views
@dataclass(frozen=True)
class _Entry:
    fn: Callable[[int, str | None], Dataset]
    seeded: bool
    files: Callable[[str | None], dict[str, Path]] | None
    source: dict | None
    classes: int | None


_LOADERS: dict[str, _Entry] = {}

DATA_DIR_SETS = ("mnist", "fashion-mnist", "cifar10")  # the built-in sets read from --data-dir


def register_dataset(name: str, fn: Callable[[int, str | None], Dataset], seeded: bool = False,
                     files: Callable[[str | None], dict[str, Path]] | None = None, source: dict | None = None,
                     classes: int | None = None) -> None:
    """Add a data set: ``fn(seed, data_dir) -> Dataset``. ``seeded``: whether the seed changes it.
    ``files(data_dir) -> {role: path}``: for a set read from ``--data-dir``, the files it reads
    (raising :class:`DataError` when one is missing); its identity is then their contents' hash.
    ``source``: for a shipped set, what generates it (its identity). ``classes``: its class count,
    when known without loading it (:func:`chance` then needs no data)."""
    _LOADERS[name] = _Entry(fn, seeded, files, source, classes)


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


register_dataset("digits", _digits, seeded=True, classes=10,
                 source={"generator": "sklearn.datasets.load_digits", "package": "scikit-learn"})
register_dataset("mnist1d", _mnist1d, classes=10,
                 source={"generator": "mnist1d.data.make_dataset", "package": "mnist1d", "args": MNIST1D_ARGS})
register_dataset("mnist", lambda seed, d: _idx_dataset("mnist", d), files=lambda d: _idx_files("mnist", d),
                 classes=10)
register_dataset("fashion-mnist", lambda seed, d: _idx_dataset("fashion-mnist", d),
                 files=lambda d: _idx_files("fashion-mnist", d), classes=10)
register_dataset("cifar10", lambda seed, d: load_cifar10(d), files=_cifar_files, classes=10)


def _entry(name: str) -> _Entry:
    if name not in _LOADERS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(names())}")
    return _LOADERS[name]


def reads_data_dir(name: str) -> bool:
    """Whether the data set ``name`` is read from ``--data-dir``."""
    return _entry(name).files is not None


def data_files(name: str, data_dir: str | None) -> dict[str, Path]:
    """The files a ``--data-dir`` set reads, by role (``{}`` for a shipped set); a
    :class:`DataError` naming what is missing when ``data_dir`` is unset or lacks one."""
    files = _entry(name).files
    return dict(files(data_dir)) if files is not None else {}


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """sha256 of a file's content (of the decompressed bytes for a gzipped file, so that the same
    data gzipped or not, or gzipped twice, is the same data); cached by path, size and mtime."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = hashlib.sha256(_open(path)).hexdigest()
    return _FILE_HASHES[key]


def files_sha256(name: str, data_dir: str | None) -> str:
    """One sha256 over the contents of every file a ``--data-dir`` set reads (by role, not path)."""
    h = hashlib.sha256()
    for role, path in sorted(data_files(name, data_dir).items()):
        h.update(f"{role}\0{_file_sha256(path)}\n".encode())
    return h.hexdigest()


def source(name: str, data_dir: str | None = None) -> dict:
    """The identity of a data set's content, for run keys: ``{"files_sha256": ...}`` for a set read
    from ``--data-dir`` (never the folder), else its generator, its version and arguments."""
    e = _entry(name)
    if e.files is not None:
        return {"files_sha256": files_sha256(name, data_dir)}
    src = copy.deepcopy(e.source) if e.source else {"generator": name}
    if "package" in src:
        src["version"] = _version(src["package"])
    return src


def names() -> list[str]:
    return sorted(_LOADERS)


def chance(name: str, data_dir: str | None = None) -> float:
    """Chance accuracy, 1 / classes, of a data set: from its registration where it declares its
    class count (every built-in set), else from loading it."""
    entry = _entry(name)
    k = entry.classes if entry.classes is not None else load(name, 0, data_dir).num_classes
    return 1.0 / k


@lru_cache(maxsize=16)
def _load_cached(name: str, seed: int, data_dir: str | None) -> Dataset:
    return _LOADERS[name].fn(seed, data_dir)


def load(name: str, seed: int = 0, data_dir: str | None = None) -> Dataset:
    seeded = _entry(name).seeded
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
    """The view a run trains on: ``cfg`` = {"name", "data_dir"?, "subset"?, "val_fraction"?,
    "source"?}. With ``source.files_sha256`` (the run key's hash of the files), the files in
    ``data_dir`` must still hash to it: a run never trains on other data than its key says."""
    expected = (cfg.get("source") or {}).get("files_sha256")
    if expected is not None:
        found = files_sha256(cfg["name"], cfg.get("data_dir"))
        if found != expected:
            raise DataError(f"{cfg['name']}: the files in {cfg.get('data_dir')} hash to {found[:16]}..., not to "
                            f"{expected[:16]}... as the run's config says (they changed since it was planned)")
    return _prepare_cached(cfg["name"], view_seed(cfg, seed), cfg.get("data_dir"), cfg.get("subset"),
                           float(cfg.get("val_fraction") or 0.0))


def view_seed(cfg: dict, seed: int) -> int:
    """The seed the view actually depends on: 0 for a fixed data set used whole (mnist1d, MNIST),
    so members with different seeds share one tensor."""
    name = cfg["name"]
    seeded = _LOADERS[name].seeded if name in _LOADERS else True
    if seeded or cfg.get("subset") is not None or cfg.get("val_fraction"):
        return int(seed)
    return 0
