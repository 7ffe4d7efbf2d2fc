"""Sequence views of the audit's data sets (nothing here downloads).

* ``digits``: scikit-learn's 8x8 digits, pixels / 16, a stratified 1347/450 split drawn with the
  run's seed, standardized per pixel with train statistics, then read row by row 2 pixels a step:
  ``(N, 32, 2)``.
* ``mnist1d``: ``mnist1d.data.make_dataset(get_dataset_args())`` (generated locally, the
  generator's own fixed seed; 4000/1000), standardized per position with train statistics, one
  value a step: ``(N, 40, 1)``. (``get_dataset`` downloads and is never called.)

The conventions (split, standardization) are the shared settings of CLAIMS.md, as in
:mod:`bnlab.lab.data`.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

__all__ = ["SEQ_DATASETS", "load_sequences"]

SEQ_DATASETS = {"digits": {"steps": 32, "features": 2}, "mnist1d": {"steps": 40, "features": 1}}


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0, keepdims=True), train.std(0, keepdims=True)
    std[std < 1e-8] = 1.0  # constant pixels (digit borders) stay 0
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


@lru_cache(maxsize=4)
def _digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x, y = d.data / 16.0, d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=450, stratify=y, random_state=seed)
    tr, te = np.sort(tr), np.sort(te)
    xtr, xte = _standardize(x[tr], x[te])
    return xtr.reshape(-1, 32, 2), y[tr], xte.reshape(-1, 32, 2), y[te]  # (N, 64) -> (N, 32 steps, 2)


@lru_cache(maxsize=1)
def _mnist1d():
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    xtr, xte = _standardize(d["x"].astype(np.float64), d["x_test"].astype(np.float64))
    return xtr[..., None], d["y"].astype(np.int64), xte[..., None], d["y_test"].astype(np.int64)  # (N, 40, 1)


def load_sequences(name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: float32 ``(N, T, F)`` inputs, int64 labels."""
    if name == "digits":
        arrays = _digits(int(seed))
    elif name == "mnist1d":
        arrays = _mnist1d()
    else:
        raise ValueError(f"unknown sequence data set {name!r}; known: {', '.join(SEQ_DATASETS)}")
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
