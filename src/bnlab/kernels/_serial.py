"""Serial compiled helpers shared by both layouts: spans, lanes, statistics, the fused epilogue.

A *span* is a contiguous run of output values with per-span float64 operands; its kind (a named
constant below, a literal at every call site, so that each kind compiles to its own loop) says
what it computes. Every value is formed in float64 and rounded once to the output dtype. With
``stream`` the span's whole, 64-byte aligned cache lines are stored non-temporally
(:mod:`._llvm`), the same operations in the same order, so the same bits.

**Fused epilogue.** The batch-norm output ``z = (x - mean) * scale + beta``, plus a residual
``res`` when one is given, goes through an activation ``act`` before it is stored:
``y = act(z)``. Its backward needs ``dz = dy * act'(z)``, with ``z`` recomputed from ``x`` (and
``res``) in float64 by the same operations as in the forward, so the same ``z``. The kernels
choose between the plain loops and the epilogue's on their module constant ``ACT`` and on
``res is None``: numba prunes a branch on a global constant or on a None argument before typing,
so a kernel without an epilogue compiles the plain loops and nothing else, and an act variant
(:mod:`._jit`) only its epilogue. The epilogue helpers below get ``act`` as a literal argument
(numba compiles them once per activation, and LLVM folds the branches on it) and ``res`` as an
array or None (compiled apart).

Indices are uint64 on purpose: numba wraps negative signed indices, and that select turns a vector
load into a gather.
"""

from __future__ import annotations

import math

import numpy as np
from numba import uint64

from ._jit import SERIAL, kernel_jit
from ._llvm import LANES, RELU
from ._llvm import (_buf_grad_lane_loop, _grad_lane_loop, _lane_loop, _nt_act_dx_line, _nt_act_line, _nt_affine_line,
                    _nt_dx_line, _nt_scale_line, _prefetch)

# span kinds (module constants, not an IntEnum: numba passes a global int to a helper as a literal
# and compiles the helper once per kind; an IntEnum member it passes as one runtime type)
AFFINE = 0  # y = (x - p0) * p1 + p2
DX = 1  # dx = p1 * ((dy - p2) - (x - p0) * p3)
SCALE = 2  # dx = x * p0 (x standing for dy)

# the activations of the fused epilogue, NONE and RELU: module constants of :mod:`._llvm`

CHUNK = 512  # values of a span whose dz is computed at once into a float64 buffer (4 KB)


@kernel_jit(**SERIAL)
def _aligned_head(a, start, length):
    """How many elements from ``start`` until ``a``'s next 64-byte boundary (at most ``length``)."""
    size = uint64(a.itemsize)
    addr = uint64(a.ctypes.data) + uint64(start) * size
    head = ((uint64(64) - addr % uint64(64)) % uint64(64)) // size
    return min(head, uint64(length))


@kernel_jit(**SERIAL)
def _prefetch_runs(a, ch0, g, i0, i1, c, s):
    """Prefetch a group's runs (``g * s`` values from channel ``ch0``) of samples ``i0 .. i1 - 1``."""
    step = uint64(64 // a.itemsize)
    su = uint64(s)
    for i in range(uint64(i0), uint64(i1)):
        run = (i * uint64(c) + uint64(ch0)) * su
        for q in range(run, run + uint64(g) * su, step):
            _prefetch(a, q)


# ----------------------------------------------------------------------------------------------
# inner loops (serial; compiled once each, vectorized on their own, called from the parallel
# kernels). Indices are uint64 on purpose: numba wraps negative signed indices, and that select
# turns a vector load into a gather.


@kernel_jit(**SERIAL)
def _lane_sums(x, start, length, k, a1, a2):
    """Sums of ``x - k`` and ``(x - k)^2`` over ``length`` values from ``start``: value ``j`` goes to
    lane ``j % LANES`` of the float64 accumulators ``a1``, ``a2``; the last ``length % LANES``
    values are summed apart and returned."""
    st = uint64(start)
    full = (uint64(length) // LANES) * LANES
    _lane_loop(x, x, st, full, k, a1, a2)
    s1 = 0.0
    s2 = 0.0
    for j in range(st + full, st + uint64(length)):
        d = np.float64(x[j]) - k
        s1 += d
        s2 += d * d
    return s1, s2


@kernel_jit(**SERIAL)
def _lane_grad_sums(x, dy, start, length, mean, a1, a2):
    """Sums of ``dy`` and ``dy * (x - mean)``, laid out as in :func:`_lane_sums`."""
    st = uint64(start)
    full = (uint64(length) // LANES) * LANES
    _grad_lane_loop(x, dy, st, full, mean, a1, a2)
    s1 = 0.0
    s2 = 0.0
    for j in range(st + full, st + uint64(length)):
        g = np.float64(dy[j])
        s1 += g
        s2 += g * (np.float64(x[j]) - mean)
    return s1, s2


@kernel_jit(**SERIAL)
def _lane_total(a):
    s = 0.0
    for t in range(a.size):
        s += a[t]
    return s


@kernel_jit(**SERIAL)
def _span_scalar(kind, x, dy, out, lo, hi, p0, p1, p2, p3):
    """Output values ``[lo, hi)`` one by one, in float64 with one rounding; ``kind`` and the
    operands as in :func:`_stream_line`."""
    if kind == AFFINE:
        for j in range(uint64(lo), uint64(hi)):
            out[j] = (np.float64(x[j]) - p0) * p1 + p2
    elif kind == DX:
        for j in range(uint64(lo), uint64(hi)):
            out[j] = p1 * ((np.float64(dy[j]) - p2) - (np.float64(x[j]) - p0) * p3)
    else:
        for j in range(uint64(lo), uint64(hi)):
            out[j] = np.float64(x[j]) * p0


@kernel_jit(**SERIAL)
def _span_write(kind, stream, x, dy, out, start, length, p0, p1, p2, p3):
    """One span of output (:func:`_span_scalar`). ``stream``: its whole, aligned cache lines are
    stored non-temporally (:func:`_stream_line`, the same bits), the unaligned head and the tail
    one by one."""
    st = uint64(start)
    end = st + uint64(length)
    lo = st
    hi = st
    if stream:
        w = uint64(64 // out.itemsize)
        lo = st + _aligned_head(out, st, length)
        hi = lo + ((end - lo) // w) * w
        for q in range(lo, hi, w):
            _stream_line(kind, x, dy, out, q, p0, p1, p2, p3, 0)
        _span_scalar(kind, x, dy, out, st, lo, p0, p1, p2, p3)
    _span_scalar(kind, x, dy, out, hi, end, p0, p1, p2, p3)


@kernel_jit(**SERIAL)
def _stream_line(kind, x, dy, out, idx, p0, p1, p2, p3, ch):
    """One non-temporal output line from element ``idx``: ``kind`` AFFINE ``y = (x - p0) * p1 + p2``;
    DX ``dx = p1 * ((dy - p2) - (x - p0) * p3)``; SCALE ``dx = x * p0`` (``x`` standing for
    ``dy``). The operands are floats (a span's) or float64 arrays read from ``ch`` (the columns
    layout's channels)."""
    if kind == AFFINE:
        _nt_affine_line(x, out, idx, p0, p1, p2, ch)
    elif kind == DX:
        _nt_dx_line(x, dy, out, idx, p0, p1, p2, p3, ch)
    else:
        _nt_scale_line(x, out, idx, p0, ch)


@kernel_jit(**SERIAL)
def _finish_stats(stats, ch, s1, s2, m, eps, shift):
    """Mean, biased variance and invstd of one channel from its shifted float64 sums."""
    d = s1 / m
    var = s2 / m - d * d  # shifted one-pass: both terms are O(spread^2), nothing cancels badly
    if var < 0.0:
        var = 0.0
    stats[0, ch] = shift + d
    stats[1, ch] = var
    stats[2, ch] = 1.0 / math.sqrt(var + eps)


@kernel_jit(**SERIAL)
def _count_nonfinite(stats):
    bad = 0
    for ch in range(stats.shape[1]):
        if not (math.isfinite(stats[0, ch]) and math.isfinite(stats[1, ch])):
            bad += 1
    return bad


@kernel_jit(**SERIAL)
def _lane_pair():
    """Two zeroed float64 lane accumulators, 64 bytes apart (no 4K aliasing between them)."""
    acc = np.zeros(2 * LANES + 8)
    return acc[:LANES], acc[LANES + 8:]


@kernel_jit(**SERIAL)
def update_running(rm, rv, has_rm, has_rv, mean, var, count, factor):
    """``running = (1 - factor) * running + factor * batch`` in float64, the variance unbiased
    (``var * M / (M - 1)``), rounded once to the buffers' dtype: the formula of
    :func:`bnlab.reference.update_running_stats`, without a torch op per step."""
    corr = count / (count - 1.0) if count > 1 else 1.0
    for ch in range(mean.shape[0]):
        if has_rm:
            rm[ch] = (1.0 - factor) * np.float64(rm[ch]) + factor * mean[ch]
        if has_rv:
            rv[ch] = (1.0 - factor) * np.float64(rv[ch]) + factor * (var[ch] * corr)


@kernel_jit(**SERIAL)
def _fill_eval_stats(rm, rv, eps, stats):
    for ch in range(stats.shape[1]):
        v = np.float64(rv[ch])
        stats[0, ch] = np.float64(rm[ch])
        stats[1, ch] = v
        stats[2, ch] = 1.0 / math.sqrt(v + eps)


# ----------------------------------------------------------------------------------------------
# the fused epilogue: y = act(z), z = (x - mean) * scale + beta (+ res); dz = dy * act'(z)


@kernel_jit(**SERIAL)
def _z(x, res, j, mu, sc, be):
    """The batch-norm output of element ``j`` before the activation, in float64."""
    z = (np.float64(x[j]) - mu) * sc + be
    if res is not None:
        z += np.float64(res[j])
    return z


@kernel_jit(**SERIAL)
def _act(z, act):
    """``act(z)`` in float64 (torch's relu; NONE: z)."""
    if act == RELU:
        return 0.0 if z < 0.0 else z  # NaN stays NaN
    return z


@kernel_jit(**SERIAL)
def _act_dz(g, z, act):
    """``dz = g * act'(z)`` for an incoming gradient ``g``. relu passes ``g`` where ``z > 0`` and
    0 elsewhere (a select, as torch's threshold_backward: an infinite ``g`` gives 0, not NaN)."""
    if act == RELU:
        return g if z > 0.0 else 0.0
    return g


@kernel_jit(**SERIAL)
def _act_values(act, x, res, y, lo, hi, mu, sc, be):
    """``y = act(z)`` over ``[lo, hi)`` one by one, rounded once."""
    for j in range(uint64(lo), uint64(hi)):
        y[j] = _act(_z(x, res, j, mu, sc, be), act)


@kernel_jit(**SERIAL)
def _act_span_write(act, stream, x, res, y, start, length, mu, sc, be):
    """One span of ``y = act(z)``; ``stream``: its whole, aligned cache lines stored non-temporally
    (:func:`_nt_act_line`, the same bits), the unaligned head and the tail one by one."""
    st = uint64(start)
    end = st + uint64(length)
    lo = st
    hi = st
    if stream:
        w = uint64(64 // y.itemsize)
        lo = st + _aligned_head(y, st, length)
        hi = lo + ((end - lo) // w) * w
        for q in range(lo, hi, w):
            _nt_act_line(x, res, y, q, mu, sc, be, 0, act)
        _act_values(act, x, res, y, st, lo, mu, sc, be)
    _act_values(act, x, res, y, hi, end, mu, sc, be)


@kernel_jit(**SERIAL)
def _act_lane_grad_sums(act, x, dy, res, start, length, mu, sc, be, a1, a2, buf):
    """Sums of ``dz`` and ``dz * (x - mu)`` over ``length`` values from ``start``: ``dz`` is computed
    :data:`CHUNK` values at a time into ``buf`` and summed from there in the lanes ``a1``, ``a2``
    (:func:`_buf_grad_lane_loop`); each chunk's last ``% LANES`` values are summed apart and
    returned."""
    st = uint64(start)
    end = st + uint64(length)
    s1 = 0.0
    s2 = 0.0
    for c0 in range(st, end, uint64(CHUNK)):
        m = min(uint64(CHUNK), end - c0)
        for t in range(m):
            j = c0 + t
            buf[t] = _act_dz(np.float64(dy[j]), _z(x, res, j, mu, sc, be), act)
        full = (m // LANES) * LANES
        _buf_grad_lane_loop(x, buf, c0, full, mu, a1, a2)
        for t in range(full, m):
            g = buf[t]
            s1 += g
            s2 += g * (np.float64(x[c0 + t]) - mu)
    return s1, s2


@kernel_jit(**SERIAL)
def _act_dx_values(act, train, x, dy, res, dx, dres, lo, hi, mu, k, be, mdz, kx):
    """The fused backward over ``[lo, hi)`` one by one: ``z = (x - mu) * k + be (+ res)``,
    ``dz = dy * act'(z)``, ``dx = k * ((dz - mdz) - (x - mu) * kx)`` when ``train``, else ``dz * k``
    (the formulas of :func:`bnlab.kernels.rows.rows_backward`); ``dres = dz`` when ``dres`` is an
    array."""
    if train:
        for j in range(uint64(lo), uint64(hi)):
            g = _act_dz(np.float64(dy[j]), _z(x, res, j, mu, k, be), act)
            dx[j] = k * ((g - mdz) - (np.float64(x[j]) - mu) * kx)
            if dres is not None:
                dres[j] = g
    else:
        for j in range(uint64(lo), uint64(hi)):
            g = _act_dz(np.float64(dy[j]), _z(x, res, j, mu, k, be), act)
            dx[j] = g * k
            if dres is not None:
                dres[j] = g


@kernel_jit(**SERIAL)
def _act_dx_span(act, train, stream, x, dy, res, dx, dres, start, length, mu, k, be, mdz, kx):
    """One span of the fused backward (:func:`_act_dx_values`); ``stream``: whole aligned lines of
    ``dx`` and ``dres`` (aligned alike) stored non-temporally (:func:`_nt_act_dx_line`)."""
    st = uint64(start)
    end = st + uint64(length)
    lo = st
    hi = st
    if stream:
        w = uint64(64 // dx.itemsize)
        lo = st + _aligned_head(dx, st, length)
        hi = lo + ((end - lo) // w) * w
        for q in range(lo, hi, w):
            _nt_act_dx_line(x, dy, res, dx, dres, q, mu, k, be, mdz, kx, 0, act, train)
        _act_dx_values(act, train, x, dy, res, dx, dres, st, lo, mu, k, be, mdz, kx)
    _act_dx_values(act, train, x, dy, res, dx, dres, hi, end, mu, k, be, mdz, kx)
