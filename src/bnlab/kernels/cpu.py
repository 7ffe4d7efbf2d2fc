"""Fused CPU batch-norm kernels (numba), float32 and float64, called zero-copy through ``.numpy()``.

This module is the kernels' public face: the entry points below, the thread and fork policy, and
the choice of kernel. The code lives by level:

* :mod:`.plan`: the Python plan of a tensor (layout, loop parameters, size thresholds);
* :mod:`.rows` and :mod:`.cols`: the parallel kernels of the two loop layouts and their helpers;
* :mod:`._serial`: the compiled helpers both layouts share (spans, lane sums, statistics, the
  fused activation epilogue);
* :mod:`._llvm`: the LLVM intrinsics (prefetch, non-temporal lines, vector lane loops);
* :mod:`._jit`: compile options, the on-disk cache, kernel variants.

Two loop layouts cover every dense input without a layout copy:

* **rows**: contiguous ``(N, C, *spatial)`` (NCL, NCHW, NCDHW) seen as ``N * C`` rows of
  ``S = prod(spatial)`` values. With enough channels (``C >= 4 * threads``) the work is split
  over groups of channels: a thread owns whole channels, reads them once for their sums and again
  (from its own cache) to write ``y``; channels are grouped so that one sample's rows of a group
  are a contiguous run of about 4 KB (short rows, e.g. 8x8, would otherwise be read in scattered
  256-byte pieces). With few channels the work is split over rows, each row writing its own
  partial sums, combined per channel between the two parallel loops.
* **columns**: 2-D ``(M, C)`` input and channels_last / channels_last_3d (and ``(N, C, L)`` with
  C innermost), seen as ``M`` rows of ``C`` channels. The ``M`` rows are cut into one block per
  thread; each block writes per-channel partial sums, combined after the parallel loop.

Memory traffic, the limit of every pass on large tensors (measured on the 2-core machines this
project runs on, where one core's sequential read stream gets only 4-5 GB/s of a memory system
that gives two cores about 27 GB/s of copy bandwidth):

* **four read streams**: the columns layout reads its block as four interleaved streams (a row
  from each quarter per step), which more than doubles what a core reads per second.
* **software prefetch** (rows layout, from ``Thresholds.prefetch_from`` bytes): a channel is
  ``N`` runs far apart in memory and the hardware prefetcher stops at each run's page boundary,
  so the passes ask for each next run while working on this one, and the forward asks for the
  next group of channels while writing ``y``.
* **non-temporal stores** (from ``Thresholds.stream_from`` bytes): ``y`` and ``dx`` are written
  as whole 64-byte lines that go straight to memory, without the read-for-ownership of a normal
  store (one tensor size less traffic per pass) and without evicting the inputs the pass still
  reads. The line is computed as one explicit full-width vector with the scalar loop's operations
  in the scalar loop's order, so both paths give the same bits.

Other strides are made contiguous first (a copy; the output gets the strides of
``torch.empty_like(x)``). Inputs below ``Thresholds.serial_below`` elements run on the calling
thread only. Every entry point takes ``thresholds=`` (default :data:`DEFAULT_THRESHOLDS`).

One kernel call per pass: the training forward computes the statistics and writes ``y`` in one
call; the backward computes ``dbias``/``dweight`` and writes ``dx`` in one call. Per-channel
finishing math (mean, invstd, the backward coefficients) happens inside the kernel between its
parallel loops, so Python never touches per-element data.

**Fused activation** (:class:`Act`): ``forward_train`` and ``forward_eval`` take ``act`` (none,
relu) and an optional ``residual``, and write
``y = act(BN(x) + residual)`` in the same two passes over ``x``; :func:`backward_act` is its
backward, with ``dz = dy * act'(z)`` computed where the plain backward reads ``dy`` (both
passes), ``z`` recomputed from ``x``, the statistics, ``weight``, ``bias`` and ``residual`` (no
saved ``y``), and ``d(residual) = dz``. Each activation runs its own compiled variant of the
kernels (:func:`act_kernels`); without an activation and a residual the plain kernels run.
SiLU and GELU are not fused: an exp or erf per value, one value at a time in float64, made such
kernels 5-25x slower than torch's vectorized activation after the kernels' batch norm (measured at
64x64x8x8), which is what :class:`bnlab.nn.BatchNormAct2d` runs for them.

Numerical decisions (the same as :mod:`bnlab.reference`):

* Each channel is shifted by its first sample before summing, and every sum is float64. With the
  shift, ``x - k`` is of the order of the channel's spread, so the shifted one-pass variance
  ``E[(x-k)^2] - E[x-k]^2`` in float64 loses nothing measurable (the cancellation is bounded by
  ``(mean - k)^2 / var``, a few units for a sample ``k`` of the channel, against float64's 1e-16;
  for float32 input ``x - k`` is itself exact in float64 but for extreme magnitude gaps).
* ``y = (x - mean) * (invstd * gamma) + beta`` is formed in float64 with ``x - mean`` taken
  directly, then rounded once to the input dtype; ``dx`` likewise. With an epilogue the residual
  is added and the activation applied in float64 too, before that one rounding (torch rounds the
  batch-norm output, the sum and the activation each to the input dtype).
* ``fastmath`` stays off (no reassociation, exact IEEE semantics). The sums still vectorize:
  the rows layout accumulates a row into 16 float64 lanes (element ``j`` into lane ``j % 16``)
  held in vector registers by a hand-built loop (:mod:`._llvm`), the columns layout into one
  accumulator per channel, an elementwise loop over four rows at a time for LLVM.
  Indices are unsigned so that numba's negative-index wraparound cannot turn loads into gathers.

Layout of the statistics array ``stats`` (float64, ``(3, C)``): row 0 the mean, row 1 the biased
variance, row 2 ``invstd = 1 / sqrt(var + eps)``.
"""

from __future__ import annotations

import math
import os
from enum import IntEnum
from typing import NamedTuple

import numba
import numpy as np
import torch
from numba import get_num_threads, set_num_threads
from numba.np.ufunc import parallel as _numba_parallel
from torch import Tensor

from . import _llvm
from ._jit import PARALLEL as _JIT_PARALLEL
from ._jit import SERIAL as _JIT_SERIAL
from ._jit import variant as _variant
from ._serial import _fill_eval_stats, update_running
from .cols import cols_backward, cols_forward_eval, cols_forward_train
from .plan import COLUMNS, DEFAULT_THRESHOLDS, PLANS, ROWS, Layout, Plan, Thresholds, layout, plan
from .rows import rows_backward, rows_forward_eval, rows_forward_train

__all__ = [
    "forward_train", "forward_eval", "backward", "backward_act", "eval_stats", "update_running", "Act", "act_kernels",
    "layout", "plan", "threads", "use_serial_kernels", "serial_kernels", "start_runtime", "Thresholds",
    "DEFAULT_THRESHOLDS", "Plan", "PLANS", "Layout", "ROWS", "COLUMNS", "SERIAL_BELOW", "PREFETCH_FROM", "STREAM_FROM",
    "rows_forward_train", "rows_forward_eval", "rows_backward", "cols_forward_train", "cols_forward_eval",
    "cols_backward",
]

# the default thresholds (elements, bytes, bytes: see Thresholds)
SERIAL_BELOW = DEFAULT_THRESHOLDS.serial_below
PREFETCH_FROM = DEFAULT_THRESHOLDS.prefetch_from
STREAM_FROM = DEFAULT_THRESHOLDS.stream_from

_DUMMY = {torch.float32: np.zeros(1, np.float32), torch.float64: np.zeros(1, np.float64)}
_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


class Act(IntEnum):
    """The activation of the fused epilogue: ``y = act(BN(x) (+ residual))``. The entry points
    take a member, its value, or its name in lower case (``"relu"``)."""

    NONE = _llvm.NONE
    RELU = _llvm.RELU


_ACTS = {**{a.name.lower(): a for a in Act}, **{a: a for a in Act}}  # ints hash as their members
_NONE = Act.NONE


def _act(act, where: str) -> Act:
    a = _ACTS.get(act) if isinstance(act, (str, int)) and not isinstance(act, bool) else None
    if a is None:
        raise ValueError(f"{where}: act must be 'none' or 'relu' (or a bnlab.kernels.cpu.Act), got {act!r}; "
                         "silu and gelu are not fused: bnlab.nn.BatchNormAct* runs them after the batch norm")
    return a


def _check_residual(residual, x: Tensor, where: str) -> None:
    if not isinstance(residual, Tensor):
        raise TypeError(f"{where}: residual must be a tensor (or None), got {type(residual).__name__}")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"{where}: residual must have the input's shape, dtype and device: expected "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}, got {tuple(residual.shape)} {residual.dtype} "
                         f"on {residual.device}")


# ----------------------------------------------------------------------------------------------
# threads: torch's setting, numba's pool, and fork
#
# The kernels run on as many threads as ``torch.get_num_threads()`` says (at most numba's pool,
# ``NUMBA_NUM_THREADS``), so ``torch.set_num_threads`` and DataLoader workers (which set 1)
# govern them as they govern torch's own kernels. numba's thread count is thread-local; a call
# sets it for its own kernel launch only and puts back what it found.
#
# Threading layer, by measurement (2-core machine, 2 threads, training fwd+bwd, torch time / bnlab
# time in one process, interleaved, median of 41; shapes 64x64x32x32 NCHW, 8x128x64x64 NCHW,
# 64x64x32x32 channels_last, 32x256x8x8, 1024x512): numba's OpenMP layer ('omp', its default where
# TBB is absent) 2.18 / 1.81 / 1.33 / 1.81 / 0.96; TBB (the PyPI ``tbb`` package, libtbb preloaded
# by hand: numba does not find it in a venv) 1.59 / 1.55 / 0.90 / 1.21 / 0.58; 'workqueue' (also
# not thread-safe: concurrent calls abort the process) 1.28 / 1.26 / 1.31 / 0.87 / 0.39. OpenMP
# stays; bnlab does not change numba's choice (``NUMBA_THREADING_LAYER`` is honoured).
# GNU OpenMP cannot be used across fork(): numba kills a forked child at its first parallel launch
# if the parent had started the OpenMP pool ("fork() called from a process already using GNU
# OpenMP"), and torch's own OpenMP kernels hang there. So a child forked after the pool started
# (DataLoader fork workers, multiprocessing fork pools) runs serial twins of the kernels: the same
# code compiled without ``parallel=True`` (prange is range), on the calling thread, never touching
# the parent's pool; numerically they are the kernels with one thread. TBB and workqueue survive a
# fork by themselves, and a child of a process under them keeps the parallel kernels.


# numba's OpenMP layer starts its pool with omp_set_num_threads(NUMBA_NUM_THREADS) on the calling
# thread, and torch's kernels run on the same GNU OpenMP runtime, whose thread count is what
# torch.get_num_threads() reads: a user's torch.set_num_threads(1) would silently become 2 at
# bnlab's first parallel kernel (and a child forked with one thread would run torch's kernels on an
# OpenMP team it cannot have). The launch is wrapped once, here, to put torch's count back.
_numba_launch = _numba_parallel._launch_threads


def _launch_keeping_torch_threads() -> None:
    if _numba_parallel._is_initialized:
        return _numba_launch()
    n = torch.get_num_threads()
    try:
        _numba_launch()
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


if not getattr(_numba_launch, "_bnlab", False):
    _launch_keeping_torch_threads._bnlab = True
    _numba_parallel._launch_threads = _launch_keeping_torch_threads


def _numba_threads_first() -> int:
    """numba's thread count for this thread; the first call starts numba's pool, then the plain
    C getter and setter replace the public functions (which take a lock and run Python)."""
    global _numba_threads, _set_threads
    n = get_num_threads()
    _numba_threads = getattr(_numba_parallel, "_get_num_threads", get_num_threads)
    _set_threads = getattr(_numba_parallel, "_set_num_threads", set_num_threads)
    return n


_numba_threads = _numba_threads_first
_set_threads = set_num_threads
_MAX_THREADS = max(1, int(numba.config.NUMBA_NUM_THREADS))


class _Kernels(NamedTuple):
    rows_forward_train: object
    rows_forward_eval: object
    rows_backward: object
    cols_forward_train: object
    cols_forward_eval: object
    cols_backward: object


def _serial_twin(kernel):
    """``kernel`` compiled without ``parallel=True``, under its own name (numba's on-disk cache
    keys a function by name and bytecode, not by its flags: the twin must not load the parallel
    build, nor the parallel kernel the twin's)."""
    twin = _variant(kernel, "_serial", _JIT_SERIAL)
    twin.py_func.__doc__ = f"Serial twin of :func:`{kernel.py_func.__name__}` (used in a forked child)."
    return twin


_SERIAL_KERNELS: _Kernels | None = None


def serial_kernels() -> _Kernels:
    """The serial twins of the six kernels (created on first use; compiled, or loaded from the
    on-disk cache, on their first call)."""
    global _SERIAL_KERNELS
    if _SERIAL_KERNELS is None:
        _SERIAL_KERNELS = _Kernels(*(_serial_twin(k) for k in _PARALLEL_KERNELS))
    return _SERIAL_KERNELS


_PARALLEL_KERNELS = _Kernels(rows_forward_train, rows_forward_eval, rows_backward,
                             cols_forward_train, cols_forward_eval, cols_backward)
_ACT_KERNELS: dict = {}  # (act, serial) -> _Kernels


def act_kernels(act: int, serial: bool = False) -> _Kernels:
    """The six kernels with the activation ``act`` fused (:class:`Act`), parallel or their serial
    twins: variants compiled from the same code with the kernel modules' constant ``ACT`` set
    (:func:`bnlab.kernels._jit.variant`), created on first use; ``Act.NONE`` gives the plain
    kernels (:data:`_PARALLEL_KERNELS`, :func:`serial_kernels`)."""
    if act == Act.NONE:
        return serial_kernels() if serial else _PARALLEL_KERNELS
    key = (int(act), bool(serial))
    ks = _ACT_KERNELS.get(key)
    if ks is None:
        a = Act(act)
        suffix = "_" + a.name.lower() + ("_serial" if serial else "")
        options = _JIT_SERIAL if serial else _JIT_PARALLEL
        ks = _ACT_KERNELS[key] = _Kernels(*(_variant(k, suffix, options, ACT=int(a)) for k in _PARALLEL_KERNELS))
    return ks
_kernels = _PARALLEL_KERNELS  # what the entry points below call
_serial_only = False  # every call on the serial twins, one thread
_forked_from_omp = False  # a child forked from a process whose OpenMP pool had started


def _omp_pool_started() -> bool:
    return bool(getattr(_numba_parallel, "_is_initialized", False)) and \
        getattr(_numba_parallel, "_threading_layer", None) == "omp"


def _after_fork_in_child() -> None:
    global _serial_only, _kernels, _forked_from_omp
    if not _forked_from_omp and _omp_pool_started():
        _forked_from_omp = _serial_only = True
        _kernels = serial_kernels()


os.register_at_fork(after_in_child=_after_fork_in_child)


def use_serial_kernels(on: bool = True) -> None:
    """Run every kernel call on the serial twins, on the calling thread: what a child forked from
    an OpenMP process does by itself (for tests, and for keeping bnlab off numba's thread pool).
    ``on=False`` goes back to the parallel kernels, except in such a child, where they cannot run."""
    global _serial_only, _kernels
    _serial_only = bool(on) or _forked_from_omp
    _kernels = serial_kernels() if _serial_only else _PARALLEL_KERNELS


def _kernels_for(act, serial: bool) -> _Kernels:
    """The kernels a call runs: the serial twins for a tensor planned serial (below
    ``Thresholds.serial_below`` elements: a parallel kernel launches numba's thread pool even on
    one thread, about 2.5 us a call, more than a small tensor's work) and wherever only they may
    run (:func:`use_serial_kernels`, a forked child), else the parallel kernels; with ``act`` fused."""
    if serial or _serial_only:
        return serial_kernels() if act == Act.NONE else act_kernels(act, True)
    return _kernels if act == Act.NONE else act_kernels(act, False)


def threads() -> int:
    """Threads a kernel call from this thread uses on a large input: ``torch.get_num_threads()``,
    at most numba's pool size; 1 where only the serial twins may run."""
    if _serial_only:
        return 1
    n = torch.get_num_threads()
    return n if n < _MAX_THREADS else _MAX_THREADS


def _enter(nt: int) -> int:
    """Set numba's thread count for this thread to ``nt`` for one kernel launch: the count to put
    back afterwards, or 0 when nothing changed."""
    if _serial_only:
        return 0
    prev = _numba_threads()
    if prev <= 0:
        prev = get_num_threads()
    if prev == nt:
        return 0
    _set_threads(nt)
    return prev


def _flat(t: Tensor, perm) -> np.ndarray:
    """A flat numpy view of ``t`` (CPU, the strides of the kernel's input), channels last when
    ``perm`` is given (never a copy: the kernels write through it)."""
    a = t.numpy(force=True)
    if perm is not None:
        a = a.transpose(perm)
    return a.reshape(-1, copy=False)


def _like(t: Tensor | None, xd: Tensor) -> Tensor | None:
    """``t`` with the strides of ``xd`` (a copy when they differ)."""
    if t is None or t.stride() == xd.stride():
        return t
    return torch.empty_like(xd).copy_(t)


def _empty_out(xd: Tensor, alloc) -> Tensor:
    """The output for a (dense) input ``xd``: ``torch.empty_like``, or ``alloc(shape, dtype)`` where
    one is given and ``xd`` is contiguous (the layout ``alloc`` gives)."""
    if alloc is not None and xd.is_contiguous():
        return alloc(xd.shape, xd.dtype)
    return torch.empty_like(xd)


def forward_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, *, act=_NONE,
                  residual: Tensor | None = None, thresholds: Thresholds = DEFAULT_THRESHOLDS, alloc=None):
    """Training forward of a CPU float32/float64 tensor ``(N, C, *)``:
    ``y = act(BN(x) + residual)`` (``act``: :class:`Act`, default none; ``residual``: a tensor of
    ``x``'s shape and dtype, or None), the statistics from ``x`` alone. ``alloc``: optional
    ``(shape, dtype) -> Tensor`` giving the output of a contiguous input (a caller's pool of reused
    buffers: see :mod:`bnlab.nn._buffers`).

    Returns ``(y, stats, nbad)``: ``y`` with the strides ``torch.empty_like(x)`` gives, ``stats``
    a float64 ``(3, C)`` ndarray (mean, biased variance, invstd), ``nbad`` the number of channels
    with a non-finite mean or variance. An empty batch gives mean 0 and variance 0, as
    :func:`bnlab.reference.batch_stats` does.
    """
    if act is not _NONE or residual is not None:
        act = _act(act, "bnlab.kernels.cpu.forward_train")
        if residual is not None:
            _check_residual(residual, x, "bnlab.kernels.cpu.forward_train")
    if x.numel() == 0:
        stats = np.zeros((3, x.shape[1]))
        stats[2] = 1.0 / math.sqrt(eps)
        return torch.empty_like(x), stats, 0
    lay, n, c, s, perm, g, serial, nt, dense, pf, stream = plan(x, threads(), thresholds)
    xd = x if dense else x.contiguous()
    y = _empty_out(xd, alloc)
    xa = xd.numpy(force=True)
    ya = y.numpy()
    if perm is not None:
        xa = xa.transpose(perm)
        ya = ya.transpose(perm)
    xa = xa.reshape(-1)
    ya = ya.reshape(-1, copy=False)  # never a copy: the kernel writes through it
    ra = None if residual is None else _flat(_like(residual, xd), perm)
    w, has_w = (_DUMMY[x.dtype], False) if weight is None else (weight.numpy(force=True), True)
    b, has_b = (_DUMMY[x.dtype], False) if bias is None else (bias.numpy(force=True), True)
    stats = np.empty((3, c))
    k = _kernels_for(act, serial)
    prev = 0 if serial else _enter(nt)
    try:
        if lay == ROWS:
            nbad = k.rows_forward_train(xa, ya, w, b, has_w, has_b, n, c, s, eps, stats, nt, g, pf, stream, ra)
        else:
            nbad = k.cols_forward_train(xa, ya, w, b, has_w, has_b, n, c, eps, stats, nt, stream, ra)
    finally:
        if prev:
            _set_threads(prev)
    if not dense:
        y = torch.empty_like(x).copy_(y)
    return y, stats, nbad


def forward_eval(x: Tensor, weight: Tensor | None, bias: Tensor | None, stats: np.ndarray, *, act=_NONE,
                 residual: Tensor | None = None, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> Tensor:
    """Eval forward: normalize with ``stats`` (float64 ``(3, C)``; rows 0 and 2 are read), then
    ``act`` and ``residual`` as in :func:`forward_train`."""
    if act is not _NONE or residual is not None:
        act = _act(act, "bnlab.kernels.cpu.forward_eval")
        if residual is not None:
            _check_residual(residual, x, "bnlab.kernels.cpu.forward_eval")
    if x.numel() == 0:
        return torch.empty_like(x)
    lay, n, c, s, perm, g, serial, nt, dense, pf, stream = plan(x, threads(), thresholds)
    xd = x if dense else x.contiguous()
    y = torch.empty_like(xd)
    xa = xd.numpy(force=True)
    ya = y.numpy()
    if perm is not None:
        xa = xa.transpose(perm)
        ya = ya.transpose(perm)
    xa = xa.reshape(-1)
    ya = ya.reshape(-1, copy=False)
    ra = None if residual is None else _flat(_like(residual, xd), perm)
    w, has_w = (_DUMMY[x.dtype], False) if weight is None else (weight.numpy(force=True), True)
    b, has_b = (_DUMMY[x.dtype], False) if bias is None else (bias.numpy(force=True), True)
    k = _kernels_for(act, serial)
    prev = 0 if serial else _enter(nt)
    try:
        if lay == ROWS:
            k.rows_forward_eval(xa, ya, w, b, has_w, has_b, n, c, s, stats, nt, ra)
        else:
            k.cols_forward_eval(xa, ya, w, b, has_w, has_b, n, c, stats, nt, ra)
    finally:
        if prev:
            _set_threads(prev)
    if not dense:
        y = torch.empty_like(x).copy_(y)
    return y


def _as_f64(t: Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype not in _DUMMY or not t.is_cpu:
        t = t.to("cpu", torch.float64)
    return t.numpy()


def eval_stats(running_mean: Tensor, running_var: Tensor, eps: float) -> np.ndarray:
    """float64 ``(3, C)`` statistics from running buffers: mean, variance, ``1 / sqrt(var + eps)``
    (one numba call; the buffers are read in place when they are CPU float32/float64)."""
    stats = np.empty((3, running_mean.shape[0]))
    _fill_eval_stats(_as_f64(running_mean), _as_f64(running_var), float(eps), stats)
    return stats


def backward(dy: Tensor, x: Tensor, weight: Tensor | None, stats: np.ndarray, train: bool, *,
             thresholds: Thresholds = DEFAULT_THRESHOLDS, alloc=None):
    """Backward of :func:`forward_train` (``train``) or :func:`forward_eval`, without an
    activation or a residual (:func:`backward_act` is the backward with them); ``alloc`` as
    :func:`forward_train`'s, for ``dx``.

    Returns ``(dx, grads)``: ``dx`` with the strides of ``torch.empty_like(x)``, ``grads`` a
    ``(2, C)`` ndarray (dbias, dweight) in the weight's dtype (float64 without a weight).
    """
    c = x.shape[1]
    gdtype = np.float64 if weight is None else _NP_DTYPE.get(weight.dtype, np.float64)
    if x.numel() == 0:
        return torch.empty_like(x), np.zeros((2, c), gdtype)
    lay, n, c, s, perm, g, serial, nt, dense, pf, stream = plan(x, threads(), thresholds)
    xd = x if dense else x.contiguous()
    if dy.stride() != xd.stride():
        dy = torch.empty_like(xd).copy_(dy)
    dx = _empty_out(xd, alloc)
    xa = xd.numpy(force=True)
    ga = dy.numpy(force=True)
    da = dx.numpy()
    if perm is not None:
        xa = xa.transpose(perm)
        ga = ga.transpose(perm)
        da = da.transpose(perm)
    xa = xa.reshape(-1)
    ga = ga.reshape(-1)
    da = da.reshape(-1, copy=False)
    w, has_w = (_DUMMY[x.dtype], False) if weight is None else (weight.numpy(force=True), True)
    b = _DUMMY[x.dtype]  # the bias only enters the fused activation's backward
    grads = np.empty((2, c), gdtype)
    k = _kernels_for(_NONE, serial)
    prev = 0 if serial else _enter(nt)
    try:
        if lay == ROWS:
            k.rows_backward(xa, ga, da, w, b, has_w, False, n, c, s, stats, grads, train, nt, g, pf, stream, None, None)
        else:
            k.cols_backward(xa, ga, da, w, b, has_w, False, n, c, stats, grads, train, nt, stream, None, None)
    finally:
        if prev:
            _set_threads(prev)
    if not dense:
        dx = torch.empty_like(x).copy_(dx)
    return dx, grads


def backward_act(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, stats: np.ndarray, train: bool,
                 act, residual: Tensor | None = None, *, thresholds: Thresholds = DEFAULT_THRESHOLDS):
    """Backward of ``y = act(BN(x) + residual)`` (:func:`forward_train` with ``train``,
    :func:`forward_eval` without), given ``dy``, the forward's inputs and ``stats``.

    ``z = BN(x) + residual`` is recomputed from ``x``, ``stats``, ``weight``, ``bias`` and
    ``residual`` (pass the same tensors as to the forward; ``y`` is not needed), and
    ``dz = dy * act'(z)`` goes through the batch-norm backward in place of ``dy``.

    Returns ``(dx, grads, dresidual)``: ``dx`` and ``grads`` as :func:`backward` gives them
    (``grads[0]`` dbias ``= sum(dz)``, ``grads[1]`` dweight ``= sum(dz * xhat)``), and
    ``dresidual = dz`` when a residual was given (the strides of ``torch.empty_like(x)``; with
    ``act`` none it is ``dy`` itself), else None.
    """
    act = _act(act, "bnlab.kernels.cpu.backward_act")
    if residual is not None:
        _check_residual(residual, x, "bnlab.kernels.cpu.backward_act")
    if act is _NONE:
        dx, grads = backward(dy, x, weight, stats, train, thresholds=thresholds)
        return dx, grads, (dy if residual is not None else None)
    c = x.shape[1]
    gdtype = np.float64 if weight is None else _NP_DTYPE.get(weight.dtype, np.float64)
    if x.numel() == 0:
        return torch.empty_like(x), np.zeros((2, c), gdtype), None if residual is None else torch.empty_like(x)
    lay, n, c, s, perm, g, serial, nt, dense, pf, stream = plan(x, threads(), thresholds)
    xd = x if dense else x.contiguous()
    if dy.stride() != xd.stride():
        dy = torch.empty_like(xd).copy_(dy)
    dx = torch.empty_like(xd)
    xa = xd.numpy(force=True)
    ga = dy.numpy(force=True)
    da = dx.numpy()
    if perm is not None:
        xa = xa.transpose(perm)
        ga = ga.transpose(perm)
        da = da.transpose(perm)
    xa = xa.reshape(-1)
    ga = ga.reshape(-1)
    da = da.reshape(-1, copy=False)
    if residual is None:
        ra = dra = dres = None
    else:
        dres = torch.empty_like(xd)
        if (dres.data_ptr() - dx.data_ptr()) % 64:
            stream = False  # the streamed lines store dx and dres at one alignment (torch's allocations: 64 bytes)
        ra = _flat(_like(residual, xd), perm)
        dra = _flat(dres, perm)
    w, has_w = (_DUMMY[x.dtype], False) if weight is None else (weight.numpy(force=True), True)
    b, has_b = (_DUMMY[x.dtype], False) if bias is None else (bias.numpy(force=True), True)
    grads = np.empty((2, c), gdtype)
    k = _kernels_for(act, serial)
    prev = 0 if serial else _enter(nt)
    try:
        if lay == ROWS:
            k.rows_backward(xa, ga, da, w, b, has_w, has_b, n, c, s, stats, grads, train, nt, g, pf, stream, ra, dra)
        else:
            k.cols_backward(xa, ga, da, w, b, has_w, has_b, n, c, stats, grads, train, nt, stream, ra, dra)
    finally:
        if prev:
            _set_threads(prev)
    if not dense:
        dx = torch.empty_like(x).copy_(dx)
        if dres is not None:
            dres = torch.empty_like(x).copy_(dres)
    return dx, grads, dres


# ----------------------------------------------------------------------------------------------
# numba's runtime, started at import

_EMPTY64 = np.zeros(0)


def start_runtime() -> None:
    """Start numba's compiled-code runtime by loading the smallest cached kernel.

    The first numba call of a process initializes numba's CPU target (its registries, LLVM, and
    an import of scipy.linalg): about 0.3 s here, however warm the on-disk cache is. Doing it when
    bnlab is imported keeps it out of the first batch norm, which then only loads its own cached
    kernels (a few milliseconds each). ``python -m bnlab.kernels.warmup`` fills the cache; without
    it this call compiles ``update_running`` (about a second) instead.
    """
    update_running(_EMPTY64, _EMPTY64, False, False, _EMPTY64, _EMPTY64, 2.0, 0.0)


start_runtime()
