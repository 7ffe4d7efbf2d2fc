"""Execute run configs: a local process pool (default 2 workers x 1 torch thread each).

The runner only executes; the audit decides what to run and stores each result as it arrives.
``workers <= 1`` runs in the calling process (no pool), which is also what tests use: one run at a
time, so ``--workers 0`` is the same as ``--workers 1`` and is recorded as 1
(:func:`effective_workers`).

Scale-out backends implement the same interface: ``submit(key, config)``,
``wait() -> list[(key, outcome)]``, ``close(cancel=False)``, ``capacity`` and ``in_flight``, with
``outcome`` the dict that :func:`execute` returns; :class:`bnlab.lab.ray_backend.RayRunner`
(``bnlab audit --backend ray``) runs each config as a Ray task, executed by :func:`execute` in a
worker set up by :func:`_init_worker` as a pool worker is.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

_THREADS = 1


def effective_workers(workers: int | None) -> int:
    """How many runs execute at once for a requested ``--workers``: ``workers <= 1`` runs in the
    calling process, one at a time (so 0 is 1). Negative counts are an error."""
    n = 2 if workers is None else int(workers)
    if n < 0:
        raise ValueError(f"--workers must be 0 or more (got {n})")
    return max(1, n)


_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def _set_threads(threads: int) -> tuple[int, int | None]:
    """Set torch's and numba's thread counts; return the previous ones. Both matter: bnlab's CPU
    kernels are numba-parallel, and two workers each running 2 numba threads on 2 cores thrash."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    numba_before = None
    try:
        import numba

        numba_before = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except Exception:  # numba absent, or its thread pool fixed at import
        pass
    return before, numba_before


_IN_POOL = False  # True in a pool worker (set by its initializer)

#: glibc ``mallopt`` settings of a worker (see :func:`keep_freed_memory`): blocks below 32 MiB from
#: the heap, and freed heap memory kept unless 256 MiB of it lie free at the top
_MMAP_THRESHOLD = 32 << 20
_TRIM_THRESHOLD = 256 << 20
_MALLOC_ENV = "BNLAB_WORKER_MALLOC"  # "default": leave a worker's allocator as glibc sets it
_MALLOC = "default"  # what this process's worker set-up did: "kept" or "default"


def keep_freed_memory() -> bool:
    """Have glibc's allocator keep freed memory in this process instead of returning it to the
    kernel (``mallopt``: ``M_MMAP_THRESHOLD`` 32 MiB, ``M_TRIM_THRESHOLD`` 256 MiB). True if set.

    Why: a training step frees and allocates the same few-MB tensors every step. Left to its
    defaults, glibc serves many of them with fresh ``mmap`` pages (or trims the heap they came from),
    so every step pays a minor page fault per 4 KiB written first: measured on the 2-core machine,
    one classification run of the audit (C1's CNN, 35 members, 500 steps) 2.0-2.2 million faults and
    39-45 s, with these settings 0.24 million and 32-37 s; the smaller MLP runs 1.1-1.2 million ->
    0.04 million and 21-23 s -> 17-18 s. The arithmetic is untouched (the same bits; only where
    memory comes from changes); the cost is that a worker holds on to up to its peak heap plus 256
    MiB. Only the audit's own worker processes call it (:func:`_init_worker`); the calling process
    of an in-process audit and ``bnlab bench`` keep the allocator as the user has it. Not glibc
    (musl, macOS, Windows): nothing is done and False is returned. ``BNLAB_WORKER_MALLOC=default``
    leaves workers at glibc's defaults.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def _init_worker(threads: int) -> None:
    global _MALLOC
    if os.environ.get(_MALLOC_ENV, "").strip().lower() != "default" and keep_freed_memory():
        _MALLOC = "kept"
    for k in _THREAD_ENV:
        os.environ[k] = str(threads)
    import torch

    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    _set_threads(threads)
    global _THREADS, _IN_POOL
    _THREADS = threads
    _IN_POOL = True


def _numba_threads() -> int | None:
    try:
        import numba

        return numba.get_num_threads()
    except Exception:
        return None


def execute(config: dict) -> dict:
    """Run one config; never raises. Returns ``{"ok", "result" | "error", "wall_s", "meta"}``."""
    import torch

    from ..nn._buffers import minor_faults
    from .tasks import run

    if torch.get_num_threads() != _THREADS:
        _set_threads(_THREADS)
    f0 = minor_faults()
    t0 = time.perf_counter()
    try:
        result = run(config)
        ok, err = True, None
    except Exception:  # a bug, not a diverged run: reported, not stored
        result, ok, err = None, False, traceback.format_exc()
    wall = time.perf_counter() - t0
    f1 = minor_faults()
    meta = {"pid": os.getpid(), "host": platform.node(), "threads": torch.get_num_threads(),
            "numba_threads": _numba_threads(), "in_process": not _IN_POOL, "malloc": _MALLOC,
            "minor_faults": None if f0 is None or f1 is None else f1 - f0}
    return {"ok": ok, "result": result, "error": err, "wall_s": wall, "meta": meta}


class LocalRunner:
    """A pool of ``workers`` processes (spawned, 1 torch thread each), or in-process when <= 1."""

    def __init__(self, workers: int = 2, threads: int = 1) -> None:
        self.workers = effective_workers(workers)
        self.threads = threads
        self._pool: ProcessPoolExecutor | None = None
        self._futures: dict[Future, str] = {}
        self._inline: list[tuple[str, dict]] = []
        self._restore: tuple[int, int | None] | None = None
        if self.workers > 1:
            # spawned workers inherit the environment: set the thread counts before they import
            # torch and numba (numba sizes its pool from NUMBA_NUM_THREADS at import)
            # (numba refuses a NUMBA_NUM_THREADS that changes after its threads start, so every
            # worker must be spawned while it is set: the pool spawns lazily, one per submit, so
            # ping each worker once before restoring the caller's environment)
            saved = {k: os.environ.get(k) for k in _THREAD_ENV}
            os.environ.update({k: str(threads) for k in _THREAD_ENV})
            try:
                self._pool = ProcessPoolExecutor(
                    max_workers=self.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                    initargs=(threads,),
                )
                for f in [self._pool.submit(os.getpid) for _ in range(self.workers)]:
                    f.result()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        else:
            global _THREADS
            _THREADS = threads
            self._restore = _set_threads(threads)

    @property
    def capacity(self) -> int:
        """How many runs may be in flight at once."""
        return self.workers

    @property
    def in_flight(self) -> int:
        return len(self._futures) + len(self._inline)

    def submit(self, key: str, config: dict) -> None:
        if self._pool is None:
            self._inline.append((key, config))
        else:
            self._futures[self._pool.submit(execute, config)] = key

    def wait(self) -> list[tuple[str, dict]]:
        """Block until at least one submitted run finishes; return the finished ones."""
        if self._pool is None:
            key, config = self._inline.pop(0)
            return [(key, execute(config))]
        done, _ = wait(list(self._futures), return_when=FIRST_COMPLETED)
        out = []
        for f in done:
            key = self._futures.pop(f)
            try:
                out.append((key, f.result()))
            except Exception:  # the worker process died
                out.append((key, {"ok": False, "result": None, "error": traceback.format_exc(), "wall_s": 0.0, "meta": {}}))
        return out

    def close(self, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
            self._pool = None
        if self._restore is not None:  # in-process: give the caller its thread counts back
            import torch

            torch.set_num_threads(self._restore[0])
            if self._restore[1] is not None:
                import numba

                numba.set_num_threads(self._restore[1])
            self._restore = None
        self._futures.clear()
        self._inline.clear()
