"""Sequence views of the audit's data sets, built on :mod:`bnlab.lab.data`'s loaders (nothing
here downloads, splits or standardizes on its own).

* ``digits``: :func:`bnlab.lab.data.load` ("digits": the stratified 1347/450 split drawn with the
  run's seed, standardized per pixel with train statistics) read row by row, 2 pixels a step:
  ``(N, 32, 2)``.
* ``mnist1d``: :func:`bnlab.lab.data.load` ("mnist1d": generated locally, 4000/1000, standardized
  per position with train statistics), one value a step: ``(N, 40, 1)``.

The conventions (split, standardization) are therefore exactly those of the other claims' runs
(CLAIMS.md, shared settings).
"""

from __future__ import annotations

import numpy as np
import torch

from . import data as D

__all__ = ["SEQ_DATASETS", "load_sequences"]

# name -> sequence shape: ``steps`` time steps of ``features`` values each
SEQ_DATASETS = {"digits": {"steps": 32, "features": 2}, "mnist1d": {"steps": 40, "features": 1}}


def load_sequences(name: str, seed: int, data_dir: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: float32 ``(N, T, F)`` inputs, int64 labels."""
    if name not in SEQ_DATASETS:
        raise ValueError(f"unknown sequence data set {name!r}; known: {', '.join(SEQ_DATASETS)}")
    shape = (SEQ_DATASETS[name]["steps"], SEQ_DATASETS[name]["features"])
    ds = D.load(name, int(seed), data_dir)
    arrays = (ds.x_train.reshape(-1, *shape), ds.y_train, ds.x_test.reshape(-1, *shape), ds.y_test)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
