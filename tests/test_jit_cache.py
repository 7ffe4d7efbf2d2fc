"""The on-disk cache stamps: a cached kernel is stale when any file whose compiled code it links in
changed, not only its own (numba's default), for the batch-norm kernels and the recurrent ones."""

from __future__ import annotations

import os
import re
import shutil

import pytest
from numba.core.caching import NullCache
from numba.core.registry import CPUDispatcher

from bnlab.kernels import _jit


def _cached_dispatchers(mod):
    out = []
    for name in dir(mod):
        d = getattr(mod, name)
        if isinstance(d, CPUDispatcher) and d.py_func.__module__ == mod.__name__ and not isinstance(d._cache, NullCache):
            out.append(d)
    return out


@pytest.mark.parametrize("modname", ["bnlab.nn._recurrent_kernels", "bnlab.nn._projection", "bnlab.lab._stacked"])
def test_recurrent_kernels_carry_the_recurrent_stamp(modname):
    import importlib

    mod = importlib.import_module(modname)
    ds = _cached_dispatchers(mod)
    assert ds, f"no cached kernels found in {modname}"
    want = _jit.sources_stamp(_jit.RECURRENT_SOURCES)
    for d in ds:
        got = d._cache._impl.locator.get_source_stamp()
        assert got == want, f"{modname}.{d.py_func.__name__}: stamped {got!r}, not the recurrent sources' {want!r}"


def test_batchnorm_kernels_keep_their_stamp():
    from bnlab.kernels import stats

    ds = _cached_dispatchers(stats)
    assert ds
    for d in ds:
        assert d._cache._impl.locator.get_source_stamp() == _jit.sources_stamp()


def test_every_file_linking_the_recurrent_products_is_in_the_stamp():
    """A module whose cached kernels call gemm or team from the recurrent kernels must be one of the
    stamp's files (else an edit of the products would leave its cached copy stale)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(_jit.__file__)))
    listed = {os.path.normpath(os.path.join(root, "kernels", p)) for p in _jit.RECURRENT_SOURCES}
    for p in listed:
        assert os.path.isfile(p), p
    found = set()
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            text = open(path, encoding="utf-8").read()
            if "_recurrent_kernels" in text and re.search(r"@_jit\(|recurrent_jit", text) and "kernels/_jit.py" not in path:
                found.add(os.path.normpath(path))
    found.add(os.path.normpath(os.path.join(root, "nn", "_recurrent_kernels.py")))
    assert found <= listed, f"not stamped: {sorted(found - listed)}"


def test_stamp_moves_with_any_listed_file(tmp_path, monkeypatch):
    """The stamp is a hash over every listed file: editing any one of them changes it."""
    here = tmp_path / "pkg" / "kernels"
    here.mkdir(parents=True)
    for rel in _jit.RECURRENT_SOURCES:
        src = os.path.normpath(os.path.join(_jit._HERE, rel))
        dst = os.path.normpath(os.path.join(here, rel))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(src, dst)
    monkeypatch.setattr(_jit, "_HERE", str(here))
    stamp = _jit.sources_stamp.__wrapped__
    base = stamp(_jit.RECURRENT_SOURCES)
    assert base == stamp(_jit.RECURRENT_SOURCES)
    for rel in _jit.RECURRENT_SOURCES:
        path = os.path.normpath(os.path.join(here, rel))
        orig = open(path, "rb").read()
        with open(path, "ab") as f:
            f.write(b"\n# edited\n")
        assert stamp(_jit.RECURRENT_SOURCES) != base, rel
        with open(path, "wb") as f:
            f.write(orig)
    assert stamp(_jit.RECURRENT_SOURCES) == base
