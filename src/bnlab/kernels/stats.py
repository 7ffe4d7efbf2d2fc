"""Kernels that stop at, or start from, the batch statistics: statistics only, and the training
forward of batch renormalization.

* :func:`batch_stats`: the per-channel mean, biased variance and invstd of a CPU float32/float64
  tensor in one parallel pass over it, without writing an output. The numbers are those of
  :func:`bnlab.kernels.cpu.forward_train` bit for bit: the same plan (:func:`.plan.plan`: layout,
  channel groups, threads) and the same statistics helpers as the training forwards call
  (:func:`.rows._group_stats`, :func:`.rows._row_sums` and :func:`.rows._rows_finish`;
  :func:`.cols._cols_scratch`, :func:`.cols._cols_sums` and :func:`.cols._cols_finish`): the same
  shift (each channel's first sample), the same float64 sums in the same order, the same finishing
  math (:func:`._serial._finish_stats`).
* :func:`renorm_forward`: the training forward of batch renormalization
  (:mod:`bnlab.nn.renorm`) in the passes of batch norm's training forward. The per-channel
  correction ``r = clip(sigma_B / sigma, 1 / r_max, r_max)``, ``d = clip((mean_B - running_mean)
  / sigma, -d_max, d_max)`` (``sigma = sqrt(running_var + eps)``, the running statistics before
  this batch's update) is computed inside the kernel where batch norm's kernel finishes a
  channel's statistics, and the output is written with ``weight' = gamma * r`` and ``bias' =
  gamma * d + beta``: ``y = (x - mean_B) * (invstd_B * gamma * r) + (gamma * d + beta)``, formed
  in float64 and rounded once. In the rows layout with channel groups a thread writes a group's
  output from its own cache right after summing it, so the layer reads ``x`` from memory once and
  writes ``y`` once (non-temporally on large tensors), as batch norm does; a statistics pass
  followed by a separate normalize pass would read ``x`` from memory twice. With ``r = 1``,
  ``d = 0`` the output is batch norm's, bit for bit.

Both have a rows and a columns kernel (:mod:`.rows`, :mod:`.cols`: the layouts, tasks and threads
of batch norm's kernels) and run, like every kernel, on ``threads()`` threads of numba's pool, or
on their serial twins (compiled without ``parallel=True``) where :mod:`.cpu` runs its own serial
twins: after :func:`bnlab.kernels.cpu.use_serial_kernels`, and in a child forked from a process
whose OpenMP pool had started. The choice is read from :mod:`.cpu` at every call, so its fork hook
and switch cover these kernels too.

Layouts of the arrays: ``stats`` float64 ``(3, C)``: mean, biased variance, invstd (as
:mod:`.cpu`); ``rd`` float64 ``(2, C)``: ``r`` and ``d``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import prange
from torch import Tensor

from . import cpu
from ._jit import PARALLEL, SERIAL, kernel_jit
from ._llvm import _store_fence
from ._serial import AFFINE, _count_nonfinite, _span_write
from .cols import _cols_affine, _cols_blocks, _cols_finish, _cols_scratch, _cols_sums, _tile
from .plan import DEFAULT_THRESHOLDS, ROWS, Thresholds, plan
from .rows import _group_affine, _group_scratch, _group_stats, _row_sums, _rows_finish

__all__ = ["batch_stats", "renorm_forward", "renorm_weight_grad", "rows_batch_stats", "cols_batch_stats",
           "rows_renorm_forward", "cols_renorm_forward", "serial_kernels"]


# ----------------------------------------------------------------------------------------------
# compiled helpers: the renorm correction (the statistics are those of the layouts' helpers,
# :func:`bnlab.kernels.rows._group_stats`, :func:`bnlab.kernels.rows._rows_finish`,
# :func:`bnlab.kernels.cols._cols_finish`, which the training forwards call too)


@kernel_jit(**SERIAL)
def _renorm_affines(stats, ch0, cn, w, b, has_w, has_b, rm, rv, eps, r_max, d_max, rd, w2, mean, scale, beta):
    """The renorm correction of channels ``ch0 .. ch0 + cn - 1`` from their batch statistics and the
    running ones: ``r`` and ``d`` into ``rd``, ``weight' = gamma * r`` (rounded to ``w2``'s dtype)
    into ``w2``, and the output's affine in float64 into ``mean[j]``, ``scale[j] = invstd * gamma *
    r``, ``beta[j] = gamma * d + beta`` for ``j = 0 .. cn - 1``. A non-finite statistic gives a
    non-finite ``r`` / ``d`` (the clip keeps a NaN). One loop over the channels (a call per channel
    costs about ten times as much)."""
    lo = 1.0 / r_max
    for j in range(cn):
        ch = ch0 + j
        sigma = math.sqrt(np.float64(rv[ch]) + eps)
        r = math.sqrt(stats[1, ch] + eps) / sigma
        if r < lo:
            r = lo
        if r > r_max:
            r = r_max
        d = (stats[0, ch] - np.float64(rm[ch])) / sigma
        if d < -d_max:
            d = -d_max
        if d > d_max:
            d = d_max
        gam = np.float64(w[ch]) if has_w else 1.0
        rd[0, ch] = r
        rd[1, ch] = d
        wr = gam * r
        w2[ch] = wr
        mean[j] = stats[0, ch]
        scale[j] = stats[2, ch] * wr
        beta[j] = gam * d + (np.float64(b[ch]) if has_b else 0.0)


@kernel_jit(**SERIAL)
def _renorm_dgamma(grads, rd, out):
    """``out = dweight' * r + dbias' * d`` per channel in float64, rounded once to ``out``'s dtype."""
    for ch in range(out.shape[0]):
        out[ch] = np.float64(grads[1, ch]) * rd[0, ch] + np.float64(grads[0, ch]) * rd[1, ch]


# ----------------------------------------------------------------------------------------------
# the kernels


@kernel_jit(**PARALLEL)
def rows_batch_stats(x, n, c, s, eps, stats, nt, g, pf):
    """Statistics only, rows layout (the tasks of :func:`bnlab.kernels.rows.rows_forward_train`:
    ``g > 0`` groups of channels, ``g == 0`` single rows). Fills ``stats``; returns the number of
    channels whose mean or variance is non-finite."""
    if g > 0:
        ngrp = (c + g - 1) // g
        for t in prange(nt):
            lo = t * ngrp // nt
            hi = (t + 1) * ngrp // nt
            acc, tail, kv = _group_scratch(g)
            for grp in range(lo, hi):
                _group_stats(x, grp, g, n, c, s, eps, stats, acc, tail, kv, pf)
    else:
        part = np.empty((2, n * c))
        for r in prange(n * c):
            _row_sums(x, r, c, s, part)
        _rows_finish(x, part, n, c, s, eps, stats)
    return _count_nonfinite(stats)


@kernel_jit(**PARALLEL)
def cols_batch_stats(x, m, c, eps, stats, nt):
    """Statistics only, columns layout (the blocks and wide rows of
    :func:`bnlab.kernels.cols.cols_forward_train`).
    Fills ``stats``; returns the number of channels whose mean or variance is non-finite."""
    g, mg, cg, nb = _cols_blocks(m, c, nt)
    part, shift, shift_g = _cols_scratch(x, c, g, nb)
    for blk in prange(nb):
        _cols_sums(x, blk * mg // nb, (blk + 1) * mg // nb, cg, shift_g, part[blk, 0], part[blk, 1])
    _cols_finish(part, nb, g, m, c, eps, shift, stats)
    return _count_nonfinite(stats)


@kernel_jit(**PARALLEL)
def rows_renorm_forward(x, y, w, b, has_w, has_b, rm, rv, n, c, s, eps, r_max, d_max, stats, rd, w2, nt, g, pf,
                        stream):
    """Batch renormalization's training forward, rows layout: the statistics, ``r`` and ``d``
    (``rd``), ``weight'`` (``w2``), and ``y``; returns the number of channels whose mean or
    variance is non-finite. Tasks, prefetching and streaming as
    :func:`bnlab.kernels.rows.rows_forward_train`."""
    if g > 0:
        # a thread sums a group, corrects it and writes its output from its own cache while
        # prefetching its next group (rows_forward_train's loop, with the correction)
        ngrp = (c + g - 1) // g
        for t in prange(nt):
            lo = t * ngrp // nt
            hi = (t + 1) * ngrp // nt
            acc, tail, kv = _group_scratch(g)
            mean = np.empty(g)
            scale = np.empty(g)
            beta = np.empty(g)
            for grp in range(lo, hi):
                ch0, gg = _group_stats(x, grp, g, n, c, s, eps, stats, acc, tail, kv, pf)
                _renorm_affines(stats, ch0, gg, w, b, has_w, has_b, rm, rv, eps, r_max, d_max, rd, w2, mean, scale,
                                beta)
                nxt = ch0 + g
                ng = min(g, c - nxt) if (pf and grp + 1 < hi) else 0
                _group_affine(x, y, ch0, gg, n, c, s, mean, scale, beta, nxt, ng, stream)
            if stream:
                _store_fence()
    else:
        part = np.empty((2, n * c))
        for r in prange(n * c):
            _row_sums(x, r, c, s, part)
        _rows_finish(x, part, n, c, s, eps, stats)
        mean = np.empty(c)
        scale = np.empty(c)
        beta = np.empty(c)
        _renorm_affines(stats, 0, c, w, b, has_w, has_b, rm, rv, eps, r_max, d_max, rd, w2, mean, scale, beta)
        for r in prange(n * c):
            ch = r % c
            _span_write(AFFINE, stream, x, x, y, r * s, s, mean[ch], scale[ch], beta[ch], 0.0)
            if stream:
                _store_fence()
    return _count_nonfinite(stats)


@kernel_jit(**PARALLEL)
def cols_renorm_forward(x, y, w, b, has_w, has_b, rm, rv, m, c, eps, r_max, d_max, stats, rd, w2, nt, stream):
    """Batch renormalization's training forward, columns layout (:func:`rows_renorm_forward`;
    blocks as :func:`bnlab.kernels.cols.cols_forward_train`)."""
    g, mg, cg, nb = _cols_blocks(m, c, nt)
    part, shift, shift_g = _cols_scratch(x, c, g, nb)
    for blk in prange(nb):
        _cols_sums(x, blk * mg // nb, (blk + 1) * mg // nb, cg, shift_g, part[blk, 0], part[blk, 1])
    _cols_finish(part, nb, g, m, c, eps, shift, stats)
    mean = np.empty(c)
    scale = np.empty(c)
    beta = np.empty(c)
    _renorm_affines(stats, 0, c, w, b, has_w, has_b, rm, rv, eps, r_max, d_max, rd, w2, mean, scale, beta)
    mean = _tile(mean, g)
    scale = _tile(scale, g)
    beta = _tile(beta, g)
    for blk in prange(nb):
        _cols_affine(x, y, blk * mg // nb, (blk + 1) * mg // nb, cg, mean, scale, beta, stream)
    return _count_nonfinite(stats)


# ----------------------------------------------------------------------------------------------
# serial twins, chosen where bnlab.kernels.cpu chooses its own

_PARALLEL = (rows_batch_stats, cols_batch_stats, rows_renorm_forward, cols_renorm_forward)
_SERIAL: tuple | None = None


def serial_kernels() -> tuple:
    """The serial twins of this module's four kernels (:func:`bnlab.kernels.cpu._serial_twin`:
    the same code without ``parallel=True``, under its own name), created on first use, in the
    order ``rows_batch_stats, cols_batch_stats, rows_renorm_forward, cols_renorm_forward``."""
    global _SERIAL
    if _SERIAL is None:
        _SERIAL = tuple(cpu._serial_twin(k) for k in _PARALLEL)
    return _SERIAL


def _kernels() -> tuple:
    return serial_kernels() if cpu._serial_only else _PARALLEL


# ----------------------------------------------------------------------------------------------
# entry points

_DUMMY = {torch.float32: np.zeros(1, np.float32), torch.float64: np.zeros(1, np.float64)}


def _empty_stats(c: int, eps: float) -> np.ndarray:
    """An empty batch's statistics, as :func:`bnlab.kernels.cpu.forward_train` gives them."""
    stats = np.zeros((3, c))
    stats[2] = 1.0 / math.sqrt(eps)
    return stats


def batch_stats(x: Tensor, eps: float, *, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> tuple[np.ndarray, int]:
    """The batch statistics of a CPU float32/float64 tensor ``(N, C, *)`` in one pass over it.

    Returns ``(stats, nbad)``: ``stats`` a float64 ``(3, C)`` ndarray (mean, biased variance,
    ``invstd = 1 / sqrt(var + eps)``), bit for bit those of
    :func:`bnlab.kernels.cpu.forward_train` on the same tensor and thresholds, and ``nbad`` the
    number of channels with a non-finite mean or variance. An empty batch gives mean 0 and
    variance 0. Any strides (odd ones are read from a contiguous copy).

    Example:
        >>> import torch
        >>> from bnlab.kernels.stats import batch_stats
        >>> x = torch.randn(8, 3, 4, 4, dtype=torch.float64) + 1e4
        >>> stats, nbad = batch_stats(x, 1e-5)
        >>> var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
        >>> bool(abs(stats[0] - mean.numpy()).max() < 1e-9), bool(abs(stats[1] - var.numpy()).max() < 1e-9), nbad
        (True, True, 0)
    """
    c = x.shape[1]
    if x.numel() == 0:
        return _empty_stats(c, eps), 0
    lay, n, c, s, perm, g, serial, nt, dense, pf, stream = plan(x, cpu.threads(), thresholds)
    xa = cpu._flat(x if dense else x.contiguous(), perm)
    stats = np.empty((3, c))
    k = _kernels()
    prev = cpu._enter(nt)
    try:
        if lay == ROWS:
            nbad = k[0](xa, n, c, s, float(eps), stats, nt, g, pf)
        else:
            nbad = k[1](xa, n, c, float(eps), stats, nt)
    finally:
        if prev:
            cpu._set_threads(prev)
    return stats, nbad


def renorm_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor, running_var: Tensor,
                   eps: float, r_max: float, d_max: float, *, thresholds: Thresholds = DEFAULT_THRESHOLDS):
    """Batch renormalization's training forward of a CPU float32/float64 tensor ``(N, C, *)``
    (the module docstring): one kernel call.

    ``weight``, ``bias`` (or None) and the running statistics are 1-D CPU tensors of ``x``'s
    dtype; the running statistics are read, not updated (the caller updates them afterwards from
    ``stats``). ``r_max >= 1``, ``d_max >= 0`` (``inf``: no clip).

    Returns ``(y, stats, rd, w2, nbad)``: ``y`` with the strides ``torch.empty_like(x)`` gives,
    ``stats`` float64 ``(3, C)`` (as :func:`batch_stats`), ``rd`` float64 ``(2, C)`` (``r``,
    ``d``), ``w2`` the tensor ``weight' = gamma * r`` in ``x``'s dtype, ``nbad`` the number of
    channels with a non-finite mean or variance (their ``r``, ``d`` and output are non-finite).
    """
    c = x.shape[1]
    npdt = np.float32 if x.dtype == torch.float32 else np.float64
    w2 = np.empty(c, npdt)
    rd = np.empty((2, c))
    dummy = _DUMMY[x.dtype]
    w, has_w = (dummy, False) if weight is None else (weight.numpy(force=True), True)
    b, has_b = (dummy, False) if bias is None else (bias.numpy(force=True), True)
    rm = running_mean.numpy(force=True)
    rv = running_var.numpy(force=True)
    if x.numel() == 0:
        stats = _empty_stats(c, eps)
        scratch = np.empty(c)  # the output's affine: nothing to write here
        _renorm_affines(stats, 0, c, w, b, has_w, has_b, rm, rv, float(eps), float(r_max), float(d_max), rd, w2,
                        scratch, scratch, scratch)
        return torch.empty_like(x), stats, rd, torch.from_numpy(w2), 0
    lay, n, c, s, perm, g, serial, nt, dense, pf, stream = plan(x, cpu.threads(), thresholds)
    xd = x if dense else x.contiguous()
    y = torch.empty_like(xd)
    xa = cpu._flat(xd, perm)
    ya = cpu._flat(y, perm)
    stats = np.empty((3, c))
    k = _kernels()
    prev = cpu._enter(nt)
    try:
        if lay == ROWS:
            nbad = k[2](xa, ya, w, b, has_w, has_b, rm, rv, n, c, s, float(eps), float(r_max), float(d_max), stats,
                        rd, w2, nt, g, pf, stream)
        else:
            nbad = k[3](xa, ya, w, b, has_w, has_b, rm, rv, n, c, float(eps), float(r_max), float(d_max), stats, rd,
                        w2, nt, stream)
    finally:
        if prev:
            cpu._set_threads(prev)
    if not dense:
        y = torch.empty_like(x).copy_(y)
    return y, stats, rd, torch.from_numpy(w2), nbad


def renorm_weight_grad(grads: np.ndarray, rd: np.ndarray) -> np.ndarray:
    """The gradient of batch renormalization's ``gamma`` from that of batch norm's backward with
    ``weight' = gamma * r`` and ``bias' = gamma * d + beta``: ``grads`` ``(2, C)`` (``dbias'``,
    ``dweight'``, as :func:`bnlab.kernels.cpu.backward` returns them) and ``rd`` ``(2, C)`` from
    :func:`renorm_forward` give ``dgamma = dweight' * r + dbias' * d``, formed in float64 and
    rounded once to the dtype of ``grads``."""
    out = np.empty(grads.shape[1], grads.dtype)
    _renorm_dgamma(grads, rd, out)
    return out
