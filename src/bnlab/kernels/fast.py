"""bnlab's small-call path: batch norm as one compiled C++ call with a C++ autograd node.

On small tensors batch norm costs more in its Python than in its arithmetic: validating the
call, planning the kernel, handing numpy views to numba's dispatcher, the running update, and
a Python ``autograd.Function`` forward and backward. Inside a model the interpreter runs cold (the
model's tensors have evicted it from the caches), so each of those steps costs several times what
it costs in a loop. This module compiles ``_fast.cpp`` (the numba kernels' math in C++, on torch's
intra-op threads) into a torch extension and exposes two calls:

``train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, residual=None, relu=False)``
    Training batch norm of a contiguous ``(M, C)``, contiguous ``(N, C, *)`` or channels_last
    CPU float32/float64 tensor (``(M, C)`` also bfloat16/float16 with float32 parameters and
    buffers; an ``(N, C, *)`` bfloat16/float16 one goes to torch's kernel, with the running update
    and the check here), the running update inside (``momentum`` None: the cumulative average),
    optionally followed by ``+ residual`` and ReLU (the norm-act layers' epilogue, in the same
    passes). Returns ``(y, stats, status)`` (``stats`` float64 ``(3, C)``, ``status`` 1 when the
    buffers were not written because the batch is non-finite or would overflow them: the caller
    then applies the non-finite policy, :func:`bnlab.policy.update_buffers`), or None for a call it
    does not serve.
``eval(x, weight, bias, running_mean, running_var, eps, residual=None, relu=False)``
    Eval batch norm of a contiguous or channels_last tensor without autograd (optionally followed
    by ``+ residual`` and ReLU, float32/float64), or None.

Its loops run on torch's intra-op threads (built with ``-fopenmp`` against torch's own OpenMP
runtime; ``ext.parallel_width()`` says how many) from 2^15 values, on one thread in a forked child.

The extension is built by ``python -m bnlab.kernels.warmup`` (``make setup``; a C++ compiler and
about a minute) into ``$BNLAB_CACHE`` (default ``~/.cache/bnlab``), keyed by the source, torch's
version and Python's. Importing bnlab never builds it: without a build (or with
``BNLAB_FAST=0``) :data:`ext` is None and every call takes the numba kernels.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

import torch

__all__ = ["ext", "build", "available", "build_dir"]

_SOURCE = Path(__file__).with_name("_fast.cpp")


_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden", "-fopenmp"]


def _key() -> str:
    h = hashlib.sha256(_SOURCE.read_bytes())
    h.update(" ".join(_CFLAGS).encode())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{sys.platform}".encode())
    return h.hexdigest()[:12]


def build_dir() -> Path:
    root = Path(os.environ.get("BNLAB_CACHE") or Path.home() / ".cache" / "bnlab")
    return root / f"fast-{_key()}"


def _name() -> str:
    return f"bnlab_fast_{_key()}"


def _load_built():
    if os.environ.get("BNLAB_FAST", "1") == "0":
        return None
    try:
        so = build_dir() / f"{_name()}.so"
        if not so.is_file():
            return None
        loader = importlib.machinery.ExtensionFileLoader(_name(), str(so))
        spec = importlib.util.spec_from_file_location(_name(), str(so), loader=loader)
        mod = importlib.util.module_from_spec(spec)
        loader.exec_module(mod)
        return mod
    except Exception:  # a stale or foreign build: the numba path serves
        return None


def build(verbose: bool = False):
    """Compile the extension (if not built yet) and load it; returns the module, or raises what
    the compiler said."""
    global ext
    from torch.utils import cpp_extension

    d = build_dir()
    d.mkdir(parents=True, exist_ok=True)
    mod = cpp_extension.load(name=_name(), sources=[str(_SOURCE)], build_directory=str(d),
                             extra_cflags=_CFLAGS, verbose=verbose)
    if os.environ.get("BNLAB_FAST", "1") != "0" and ext is None:
        ext = mod
        _register_fake()
    return mod


def available() -> bool:
    return ext is not None


def _register_fake() -> None:
    """The fake (meta) function of ``bnlab::check_batch_fast``, for torch.compile's tracing."""
    @torch.library.register_fake("bnlab::check_batch_fast")
    def _(ok, mean, var, count, limit, name):
        return torch.empty_like(ok)


def check_batch_op():
    """The non-finite check op the compiled running update calls: the C++ ``bnlab::check_batch_fast``
    with the extension, else the Python ``bnlab::check_batch`` (same arguments, same errors)."""
    if ext is not None:
        return torch.ops.bnlab.check_batch_fast
    from . import ops

    return ops.check_batch


ext = _load_built()
if ext is not None:
    _register_fake()
