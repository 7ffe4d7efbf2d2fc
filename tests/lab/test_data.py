"""The audit's data: built-in sets, and MNIST-style IDX / CIFAR-10 loaders on fabricated files."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from bnlab.lab import data as D


def write_idx(path, array, code=0x08, gz=False, dims=None):
    dims = array.shape if dims is None else dims
    raw = bytes([0, 0, code, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def fake_mnist(folder, n_train=20, n_test=10, gz=False, sub=""):
    d = folder / sub if sub else folder
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    write_idx(d / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_train, 28, 28)), gz=gz)
    write_idx(d / f"train-labels-idx1-ubyte{suffix}", np.arange(n_train) % 10, gz=gz)
    write_idx(d / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_test, 28, 28)), gz=gz)
    write_idx(d / f"t10k-labels-idx1-ubyte{suffix}", np.arange(n_test) % 10, gz=gz)
    return d


def test_digits_is_a_stratified_1347_450_split_that_follows_the_seed_and_is_standardized():
    a = D.load("digits", seed=0)
    b = D.load("digits", seed=1)
    assert a.x_train.shape == (1347, 1, 8, 8) and a.x_test.shape == (450, 1, 8, 8)
    assert np.bincount(a.y_test).min() >= 43  # stratified: every class 43-46 of 450
    assert not np.array_equal(a.y_test, b.y_test)
    np.testing.assert_allclose(a.x_train.reshape(1347, -1).mean(0), 0, atol=1e-5)
    stds = a.x_train.reshape(1347, -1).std(0)
    assert np.all((np.abs(stds - 1) < 1e-4) | (stds < 1e-6))


def test_mnist1d_is_generated_locally_with_4000_1000_examples_of_length_40():
    ds = D.load("mnist1d")
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert D.load("mnist1d", seed=3) is ds  # not seed-dependent: one cached copy


def test_prepare_carves_a_stratified_20_percent_validation_split_and_seeded_subsets():
    sp = D.prepare({"name": "digits", "val_fraction": 0.2}, 0)
    assert sp.x_train.shape[0] == 1078 and sp.evals["val"][0].shape[0] == 269
    assert sp.x_train.dtype == torch.float32 and sp.y_train.dtype == torch.int64
    s1 = D.prepare({"name": "mnist1d", "subset": 100}, 1)
    s2 = D.prepare({"name": "mnist1d", "subset": 100}, 2)
    assert s1.x_train.shape == (100, 40) and not torch.equal(s1.x_train, s2.x_train)
    assert D.prepare({"name": "mnist1d"}, 1) is D.prepare({"name": "mnist1d"}, 2)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files_load_gzipped_or_not(tmp_path, gz):
    fake_mnist(tmp_path, gz=gz)
    ds = D.load("mnist", data_dir=str(tmp_path))
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    assert ds.y_train.tolist() == [i % 10 for i in range(20)]
    assert abs(float(ds.x_train.mean())) < 1e-5


def test_fashion_mnist_is_found_in_its_own_folder(tmp_path):
    fake_mnist(tmp_path, sub="fashion-mnist")
    assert D.load("fashion-mnist", data_dir=str(tmp_path)).x_train.shape == (20, 1, 28, 28)


def test_read_idx_errors_name_the_file_and_the_problem(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(D.DataError, match=r"x-idx3-ubyte: not a valid gzip"):
        D.read_idx(p)
    p.write_bytes(b"PK\x03\x04" + b"\0" * 20)
    with pytest.raises(D.DataError, match=r"x-idx3-ubyte: not an IDX file"):
        D.read_idx(p)
    write_idx(p, np.zeros((3, 4, 4)), dims=(5, 4, 4))
    with pytest.raises(D.DataError, match=r"header says \(5, 4, 4\).*holds 48"):
        D.read_idx(p)
    write_idx(p, np.zeros((3, 4, 4)))
    with pytest.raises(D.DataError, match="expected 1 dimensions, the header says 3"):
        D.read_idx(p, ndim=1)
    p.write_bytes(b"\0\0\x08")
    with pytest.raises(D.DataError, match="too short"):
        D.read_idx(p)
    p.write_bytes(b"\0\0\x07\x01" + b"\0" * 8)
    with pytest.raises(D.DataError, match="unknown IDX data type 0x07"):
        D.read_idx(p)


def test_mnist_loader_reports_missing_files_mismatched_counts_and_bad_labels(tmp_path):
    with pytest.raises(D.DataError, match="needs --data-dir"):
        D.load("mnist", data_dir=None)
    with pytest.raises(D.DataError, match=r"--data-dir .*nothing is not a folder"):
        D.load("mnist", data_dir=str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match=r"train-images-idx3-ubyte\[\.gz\] not found"):
        D.load("mnist", data_dir=str(tmp_path / "empty"))
    d = fake_mnist(tmp_path / "a")
    write_idx(d / "t10k-labels-idx1-ubyte", np.arange(9) % 10)
    with pytest.raises(D.DataError, match=r"t10k-labels-idx1-ubyte: 9 labels for 10 images"):
        D.load("mnist", data_dir=str(d))
    d = fake_mnist(tmp_path / "b")
    write_idx(d / "train-labels-idx1-ubyte", np.full(20, 12))
    with pytest.raises(D.DataError, match=r"train-labels-idx1-ubyte: labels must be 0..9"):
        D.load("mnist", data_dir=str(d))


def fake_cifar(folder, n=6):
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}
        with open(root / name, "wb") as f:
            pickle.dump(d, f)
    return root


def test_cifar10_python_batches_load(tmp_path):
    fake_cifar(tmp_path)
    ds = D.load("cifar10", data_dir=str(tmp_path))
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    assert ds.y_train.tolist()[:6] == [0, 1, 2, 3, 4, 5]


def test_cifar10_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(D.DataError, match=r"data_batch_1 not found"):
        D.load_cifar10(str(tmp_path))
    root = fake_cifar(tmp_path / "a")
    (root / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(D.DataError, match=r"data_batch_3: not a CIFAR-10 python batch"):
        D.load_cifar10(str(tmp_path / "a"))
    root = fake_cifar(tmp_path / "b")
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(D.DataError, match=r"test_batch: data must be \(N, 3072\)"):
        D.load_cifar10(str(tmp_path / "b"))
    root = fake_cifar(tmp_path / "c")
    with open(root / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(D.DataError, match=r"data_batch_2: missing key labels"):
        D.load_cifar10(str(tmp_path / "c"))
    root = fake_cifar(tmp_path / "d")
    with open(root / "data_batch_5", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, f)
    with pytest.raises(D.DataError, match=r"data_batch_5: 1 labels for 2 images"):
        D.load_cifar10(str(tmp_path / "d"))


def test_a_cnn_trains_on_fabricated_cifar_through_the_classify_task(tmp_path):
    from bnlab.lab.protocol import classify_config
    from bnlab.lab.train import train_classify

    fake_cifar(tmp_path, n=16)
    cfg = classify_config(data={"name": "cifar10", "subset": None, "val_fraction": 0.0, "data_dir": str(tmp_path)},
                          model={"arch": "cnn", "channels": [4, 8], "norm": "batch"}, init={"kind": "kaiming"},
                          optim={"kind": "sgd", "momentum": 0.9}, batch=8, steps=3,
                          members=[{"seed": 0, "lr": 0.01}, {"seed": 0, "lr": 0.1}])
    r = train_classify(cfg)
    assert len(r["members"]) == 2 and all(m["test_acc"] is not None for m in r["members"])
