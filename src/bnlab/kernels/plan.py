"""The Python side of bnlab's CPU kernels: which layout and loop parameters a tensor gets.

A :class:`Plan` is worked out once per (shape, strides, dtype, thread pool, :class:`Thresholds`)
and cached (:func:`plan`): small-shape steps are dominated by the Python around the kernels, so
the hot path looks up a tuple instead of re-deriving it.

The size thresholds that switch paths on and off are one :class:`Thresholds` argument (their
defaults, :data:`DEFAULT_THRESHOLDS`, are the measured ones below), so that a caller, a test in
particular, can force a path on for a small tensor without touching module state.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

import torch
from torch import Tensor


class Layout(IntEnum):
    """How the kernels walk a tensor (:mod:`.rows`, :mod:`.cols`)."""

    STRIDED = 0  # neither: made contiguous first (a copy)
    ROWS = 1  # contiguous (N, C, *spatial): N * C rows of prod(spatial) values
    COLUMNS = 2  # (M, C) with C innermost: 2-D, channels_last, channels_last_3d, (N, C, L) transposed


ROWS = Layout.ROWS
COLUMNS = Layout.COLUMNS


class Thresholds(NamedTuple):
    """Input sizes from which the kernels switch a path on (the defaults: measured on the 2-core
    machines this project runs on)."""

    serial_below: int = 1 << 14
    """Below this many elements a kernel runs on the calling thread alone: waking a worker costs
    more than it saves, and a worker that the OS has descheduled would stall the call."""

    prefetch_from: int = 4 << 20
    """From this many bytes the rows layout with channel groups prefetches in software: each next
    sample's run of a group while summing, and the next group while writing ``y`` (measured on
    8-17 MB tensors streamed from memory: 5-15% off the forward). Smaller tensors sit in cache,
    where it only costs."""

    stream_from: int = 8 << 20
    """From this many bytes the training forward stores ``y`` and the backward ``dx`` non-temporally
    (whole 64-byte lines straight to memory, skipping the read-for-ownership a normal store makes):
    for a tensor this size the step's working set (x, y, dy, dx) outgrows the share of last-level
    cache two cores get, the output would be evicted before its next use anyway, and streaming it
    saves one of the seven tensor sizes of memory traffic per pass pair."""


DEFAULT_THRESHOLDS = Thresholds()


class Plan(NamedTuple):
    """The loop parameters of one tensor (see :func:`make_plan`)."""

    layout: Layout  # ROWS or COLUMNS (a strided input is planned as its contiguous copy)
    n: int  # rows layout: N; columns layout: M, the number of rows of C channels
    c: int  # channels
    s: int  # rows layout: prod(spatial); columns layout: 1
    perm: tuple | None  # axes permutation that moves the channels last in a numpy view (columns, ndim > 2)
    group: int  # rows layout: channels per task (0: tasks of single rows); columns layout: 0
    serial: bool  # run on the calling thread only (below serial_below elements)
    threads: int  # threads of the kernel launch: 1 when serial, else the pool size
    dense: bool  # the kernels read the tensor as it is (False: a contiguous copy first)
    prefetch: bool  # the rows layout with channel groups prefetches (from prefetch_from bytes)
    stream: bool  # outputs stored non-temporally (from stream_from bytes)


# channels <-> last axis permutations of a numpy view, by ndim
_TO_LAST = {3: (0, 2, 1), 4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}


def layout(x: Tensor) -> Layout:
    """ROWS, COLUMNS, or STRIDED (0) when ``x`` is neither (odd strides: the caller makes it
    contiguous)."""
    if x.is_contiguous():
        if x.dim() == 2 or x.numel() == x.shape[0] * x.shape[1]:
            return COLUMNS  # (M, C), or spatial size 1: the channels are the innermost run
        return ROWS
    d = x.dim()
    if d == 4:
        return COLUMNS if x.is_contiguous(memory_format=torch.channels_last) else Layout.STRIDED
    if d == 5:
        return COLUMNS if x.is_contiguous(memory_format=torch.channels_last_3d) else Layout.STRIDED
    if d == 3:
        return COLUMNS if x.transpose(1, 2).is_contiguous() else Layout.STRIDED
    return Layout.STRIDED


def channel_group(n: int, c: int, s: int, nt: int, itemsize: int) -> int:
    """Channels per task in the rows layout, or 0 for tasks of single rows (few channels).

    Channels are grouped until one sample's rows of a group make a 4 KB run (whole pages for the
    prefetcher), while a group's data stays within 1 MB (it is read again from cache to write the
    output) and there are at least two groups per thread."""
    if c < 4 * nt and n * c >= 2 * nt:
        return 0
    g = 1
    row = s * itemsize
    while g * row < 4096 and 2 * g <= c // (2 * nt) and 2 * g * n * row <= 1 << 20:
        g *= 2
    return g


def make_plan(x: Tensor, pool: int, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> Plan:
    """The plan of a non-empty ``x`` on a pool of ``pool`` threads."""
    lay = layout(x)
    dense = lay != Layout.STRIDED
    shape = x.shape
    c = shape[1]
    if not dense:  # computed on x.contiguous(): rows, or columns when the spatial size is 1
        lay = COLUMNS if x.dim() == 2 or x.numel() == shape[0] * c else ROWS
    if lay == ROWS:
        n = shape[0]
        s = x.numel() // (n * c)
    else:
        n, s = x.numel() // c, 1
    serial = pool > 1 and n * c * s < thresholds.serial_below
    nt = 1 if serial else pool
    perm = _TO_LAST[x.dim()] if lay == COLUMNS and x.dim() > 2 else None
    g = channel_group(n, c, s, nt, x.element_size()) if lay == ROWS else 0
    nbytes = x.numel() * x.element_size()
    pf = g > 0 and nbytes >= thresholds.prefetch_from
    stream = nbytes >= thresholds.stream_from
    return Plan(lay, n, c, s, perm, g, serial, nt, dense, pf, stream)


PLANS: dict = {}  # plan() cache; at most 1024 entries


def plan(x: Tensor, pool: int, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> Plan:
    """:func:`make_plan`, cached by (shape, strides, dtype, pool, thresholds)."""
    key = (x.shape, x.stride(), x.dtype, pool) if thresholds is DEFAULT_THRESHOLDS else \
        (x.shape, x.stride(), x.dtype, pool, thresholds)  # the defaults' key without them: no tuple to hash
    p = PLANS.get(key)
    if p is None:
        if len(PLANS) >= 1024:
            PLANS.clear()
        p = PLANS[key] = make_plan(x, pool, thresholds)
    return p
