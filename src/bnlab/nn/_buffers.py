"""Large output tensors of the fused recurrent layers, reused from call to call.

A training step of a fused layer returns tensors of a few MB (the input projection ``x W^T``, the
layer's output, the input projection's gradient), one set a step. Allocated afresh, glibc serves
them from memory it has just given back to the system (a block freed at the top of its heap is
trimmed; blocks past its mmap threshold are unmapped when freed), and the kernels then touch every
page of them again for the first time: measured on the 2-core machine, BNLSTM per_timestep
64x50x32->128 took 1,400-2,300 page faults and 10-16 ms of system time a training step (2 threads),
torch's own LSTM none; with these tensors taken from this pool, 0-830 (what is left: other
temporaries of the step) and about 2-7 ms.

:func:`empty` hands out a tensor on a buffer of the pool (a numpy array: ``torch.from_numpy``) that
nothing else holds: a buffer is free again when no tensor, view or saved tensor of autograd uses
it any more, which its reference count says (a tensor made with ``torch.from_numpy`` holds its
array until the last tensor sharing that memory is gone). So a tensor the caller keeps (an output
kept for logging, a graph kept with ``retain_graph``) is never handed out twice. The pool holds
at most :data:`LIMIT` bytes of buffers; past that a request gets a tensor of its own, as before.
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np
import torch

try:
    import resource
except ImportError:  # not a Unix: no fault count
    resource = None

__all__ = ["empty", "empty_np", "LIMIT", "FROM", "minor_faults"]

#: bytes: smaller tensors come from torch's allocator (glibc keeps such blocks in its heap)
FROM = 1 << 20
#: bytes of buffers the pool keeps at most
LIMIT = 256 << 20

_NP = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_lock = threading.Lock()
_bufs: list = []  # flat arrays, most recently used last


#: a buffer's reference count while only the pool holds it: the pool's list, the local name ``b``
#: in the loops below and getrefcount's own argument
_IDLE_REFS = 3


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor of ``shape`` and ``dtype`` (float32 or float64), on a pooled buffer
    when it is at least :data:`FROM` bytes (see the module docstring); any other dtype: ``torch.empty``."""
    shape = tuple(int(s) for s in shape)
    dt = _NP.get(dtype)
    n = math.prod(shape)
    if dt is None or n * dt.itemsize < FROM:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(_take(shape, n, dt))


def empty_np(shape, dtype) -> np.ndarray:
    """:func:`empty` as a C-contiguous numpy array (``dtype`` float32 or float64): the fused kernels'
    saved arrays (gates, cell states, the recurrent matmul's output and its gradient), which a
    training step allocates anew each call. A buffer stays in use while the array, or any view of
    it, lives (numpy's views hold the buffer they look at)."""
    shape = tuple(int(s) for s in shape)
    dt = np.dtype(dtype)
    n = math.prod(shape)
    if n * dt.itemsize < FROM:
        return np.empty(shape, dt)
    return _take(shape, n, dt)


def _take(shape: tuple, n: int, dt: np.dtype) -> np.ndarray:
    """A pooled buffer's first ``n`` values as an array of ``shape``: an idle buffer of ``dt`` holding
    n to 2n values, else a new one (kept while the pool has room)."""
    with _lock:
        found = None
        for i in range(len(_bufs) - 1, -1, -1):
            b = _bufs[i]
            if b.dtype == dt and n <= b.size <= 2 * n and sys.getrefcount(b) <= _IDLE_REFS:
                found = i
                break
            del b
        if found is not None:
            buf = _bufs.pop(found)
        else:
            buf = np.empty(n, dt)
            total = sum(b.nbytes for b in _bufs) + buf.nbytes
            i = 0
            while total > LIMIT and i < len(_bufs):  # make room: drop idle buffers, least recently used first
                b = _bufs[i]
                if sys.getrefcount(b) <= _IDLE_REFS:
                    total -= b.nbytes
                    del b
                    _bufs.pop(i)
                else:
                    del b
                    i += 1
            if total > LIMIT:
                return buf.reshape(shape)  # every kept buffer in use: this one not kept
        _bufs.append(buf)
        return buf[:n].reshape(shape)


def clear() -> None:
    """Drop every buffer the pool keeps (tensors still using one keep it alive themselves)."""
    with _lock:
        _bufs.clear()


def held_bytes() -> int:
    """Bytes of buffers the pool keeps (in use or idle)."""
    with _lock:
        return sum(b.nbytes for b in _bufs)


def minor_faults() -> int | None:
    """This process's minor page faults so far, every thread's (the figure this pool is measured
    by; the recurrent bench and the audit's run records report it); None where the platform has no
    count."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt
