"""The rows layout: contiguous ``(N, C, *spatial)`` (NCL, NCHW, NCDHW), seen as ``N * C`` rows of
``S = prod(spatial)`` values; ``x`` flat of length ``n * c * s``, (N, C, S) in memory order.

With enough channels (a group size ``g > 0``, :func:`bnlab.kernels.plan.make_plan`) the work is
split over groups of channels: a thread owns whole channels, reads them once for their sums and
again (from its own cache) to write the output; channels are grouped so that one sample's rows of
a group are a contiguous run of about 4 KB. With few channels (``g == 0``) the work is split over
rows, each row writing its own partial sums, combined per channel between the two parallel loops.

Fused epilogue (:mod:`._serial`): the module constant :data:`ACT` is the activation applied to
the output; it is :data:`NONE` here, and the variants that :func:`bnlab.kernels.cpu.act_kernels`
compiles replace it. ``res`` (a residual added before the activation) is an array or None. The
forwards apply the epilogue where they store ``y``; the backward recomputes ``z`` where it reads
``dy`` and uses ``dz = dy * act'(z)`` in its place (both passes), writing ``dres = dz`` when
``dres`` is an array. Without an epilogue the code below is the plain batch norm.

The statistics helpers (:func:`_group_stats`, :func:`_row_sums`, :func:`_rows_finish`) are the
one copy of the statistics math, called by :func:`rows_forward_train` and by the kernels of
:mod:`.stats`. The thin ones are inlined into their callers by numba (``inline="always"``): as
calls (one per row) they cost small tensors a few percent.
"""

from __future__ import annotations

import numpy as np
from numba import prange, uint64

from ._jit import PARALLEL, SERIAL, kernel_jit
from ._llvm import LANES, NONE, _buf_grad_lane_loop, _grad_lane_loop, _lane_loop, _store_fence
from ._serial import (AFFINE, CHUNK, DX, SCALE, _act, _act_dx_span, _act_dz, _act_lane_grad_sums, _act_span_write,
                      _count_nonfinite, _finish_stats, _lane_grad_sums, _lane_pair, _lane_sums, _lane_total,
                      _prefetch_runs, _span_write, _z)

ACT = NONE  # the activation of the fused epilogue (replaced in the act variants, see the module doc)


@kernel_jit(**SERIAL)
def _group_sums(x, ch0, g, n, c, s, k, acc, tail, pf):
    """Shifted sums of channels ``ch0 .. ch0 + g - 1`` over every sample, in memory order: for
    each sample the group's ``g`` rows are one contiguous run of ``g * s`` values.

    ``acc`` (g, 2, LANES + 8) receives the lanes of ``sum(x - k[j])`` and ``sum((x - k[j])^2)``
    (:func:`_lane_sums`), ``tail`` (g, 2) the rows' last ``s % LANES`` values.
    ``pf``: prefetch each next sample's run while summing this one.
    """
    su = uint64(s)
    full = (su // LANES) * LANES
    for i in range(uint64(n)):
        if pf and i + 1 < uint64(n):
            _prefetch_runs(x, ch0, g, i + 1, i + 2, c, s)
        run = (i * uint64(c) + uint64(ch0)) * su
        for j in range(uint64(g)):  # _lane_sums inline: a call per short run costs about 2x
            span = run + j * su
            kj = k[j]
            _lane_loop(x, x, span, full, kj, acc[j, 0], acc[j, 1])
            for q in range(span + full, span + su):
                d = np.float64(x[q]) - kj
                tail[j, 0] += d
                tail[j, 1] += d * d


@kernel_jit(**SERIAL)
def _group_scratch(g):
    """A thread's scratch for the statistics of groups of ``g`` channels (:func:`_group_stats`):
    ``acc`` (g, 2, LANES + 8), ``tail`` (g, 2), the shifts ``kv`` (g,)."""
    return np.zeros((g, 2, LANES + 8)), np.zeros((g, 2)), np.empty(g)  # + 8: no 4K aliasing between the lane rows


@kernel_jit(**SERIAL)
def _group_stats(x, grp, g, n, c, s, eps, stats, acc, tail, kv, pf):
    """The statistics of channel group ``grp`` (channels ``grp * g ...``, at most ``g``) into
    ``stats``: each channel shifted by its first sample, the group's sums (:func:`_group_sums`)
    and their finish. ``acc``, ``tail``, ``kv``: :func:`_group_scratch`. Returns the group's first
    channel and size."""
    ch0 = grp * g
    gg = min(g, c - ch0)
    acc[:] = 0.0
    tail[:] = 0.0
    for j in range(gg):
        kv[j] = np.float64(x[(ch0 + j) * s])  # shift: the channel's first sample
    _group_sums(x, ch0, gg, n, c, s, kv, acc, tail, pf)
    for j in range(gg):
        _finish_stats(stats, ch0 + j, tail[j, 0] + _lane_total(acc[j, 0, :LANES]),
                      tail[j, 1] + _lane_total(acc[j, 1, :LANES]), n * s, eps, kv[j])
    return ch0, gg


@kernel_jit(**SERIAL, inline="always")
def _row_sums(x, r, c, s, part):
    """Shifted sums of row ``r`` (its channel's first sample the shift) into ``part[:, r]`` (the
    tasks of single rows, ``g == 0``)."""
    a1, a2 = _lane_pair()
    t1, t2 = _lane_sums(x, r * s, s, np.float64(x[(r % c) * s]), a1, a2)
    part[0, r] = t1 + _lane_total(a1)
    part[1, r] = t2 + _lane_total(a2)


@kernel_jit(**SERIAL, inline="always")
def _fold_rows(part, n, c, ch):
    """Channel ``ch``'s totals of per-row sums ``part`` ``(2, N * C)``, the samples in order:
    (N*C,) -> (C,) for the tasks of single rows (the statistics' sums, and the backward's)."""
    s1 = 0.0
    s2 = 0.0
    for i in range(n):
        s1 += part[0, i * c + ch]
        s2 += part[1, i * c + ch]
    return s1, s2


@kernel_jit(**SERIAL, inline="always")
def _rows_finish(x, part, n, c, s, eps, stats):
    """Per-row sums ``part`` ``(2, N * C)`` (:func:`_row_sums`) -> the statistics of each channel."""
    for ch in range(c):
        s1, s2 = _fold_rows(part, n, c, ch)
        _finish_stats(stats, ch, s1, s2, n * s, eps, np.float64(x[ch * s]))


@kernel_jit(**SERIAL)
def _group_grad_sums(x, dy, ch0, g, n, c, s, mean, acc, tail, pf):
    """Sums of ``dy`` and ``dy * (x - mean[j])`` for a group of channels (see :func:`_group_sums`)."""
    su = uint64(s)
    full = (su // LANES) * LANES
    for i in range(uint64(n)):
        if pf and i + 1 < uint64(n):
            _prefetch_runs(x, ch0, g, i + 1, i + 2, c, s)
            _prefetch_runs(dy, ch0, g, i + 1, i + 2, c, s)
        run = (i * uint64(c) + uint64(ch0)) * su
        for j in range(uint64(g)):
            span = run + j * su
            mu = mean[j]
            _grad_lane_loop(x, dy, span, full, mu, acc[j, 0], acc[j, 1])
            for q in range(span + full, span + su):
                gv = np.float64(dy[q])
                tail[j, 0] += gv
                tail[j, 1] += gv * (np.float64(x[q]) - mu)


@kernel_jit(**SERIAL)
def _group_affine(x, y, ch0, g, n, c, s, mean, scale, beta, nch0, ng, stream):
    """``y = (x - mean[j]) * scale[j] + beta[j]`` over a group of channels, in memory order,
    prefetching the runs of the next group (``ng`` channels from ``nch0``; ``ng == 0``: none) in
    the order they will be summed. ``stream``: store ``y`` non-temporally (from
    ``Thresholds.stream_from`` bytes)."""
    su = uint64(s)
    for i in range(uint64(n)):
        if ng > 0:
            _prefetch_runs(x, nch0, ng, i, i + 1, c, s)
        run = (i * uint64(c) + uint64(ch0)) * su
        for j in range(uint64(g)):
            span = run + j * su
            if stream:
                _span_write(AFFINE, True, x, x, y, span, su, mean[j], scale[j], beta[j], 0.0)
            else:  # inline: a call per short run (8x8 rows) costs the cached case about 2x
                mu = mean[j]
                sc = scale[j]
                be = beta[j]
                for q in range(span, span + su):
                    y[q] = (np.float64(x[q]) - mu) * sc + be


@kernel_jit(**SERIAL)
def _group_dx(x, dy, dx, ch0, g, n, c, s, mean, k, mdy, kx, train, stream, pf):
    """Training ``dx = k * ((dy - mdy) - (x - mean) * kx)`` or eval ``dx = k * dy`` over a group.
    ``stream``: store ``dx`` non-temporally; ``pf``: prefetch each next sample's runs (a group
    larger than half the L2 cache is partly evicted by the time it is read again)."""
    su = uint64(s)
    for i in range(uint64(n)):
        if pf and i + 1 < uint64(n):
            _prefetch_runs(dy, ch0, g, i + 1, i + 2, c, s)
            if train:
                _prefetch_runs(x, ch0, g, i + 1, i + 2, c, s)
        run = (i * uint64(c) + uint64(ch0)) * su
        for j in range(uint64(g)):
            span = run + j * su
            kj = k[j]
            if stream:
                if train:
                    _span_write(DX, True, x, dy, dx, span, su, mean[j], kj, mdy[j], kx[j])
                else:
                    _span_write(SCALE, True, dy, dy, dx, span, su, kj, 0.0, 0.0, 0.0)
            elif train:  # inline, as in _group_affine
                mu = mean[j]
                md = mdy[j]
                kxj = kx[j]
                for q in range(span, span + su):
                    dx[q] = kj * ((np.float64(dy[q]) - md) - (np.float64(x[q]) - mu) * kxj)
            else:
                for q in range(span, span + su):
                    dx[q] = np.float64(dy[q]) * kj


# ----------------------------------------------------------------------------------------------
# the fused epilogue over a group of channels (the plain helpers' loops, with ``dz`` for ``dy``
# and ``act(z)`` for ``z``; ``scale``/``k`` is also the scale of ``z``, ``beta`` its bias)


@kernel_jit(**SERIAL)
def _group_act_grad_sums(act, x, dy, res, ch0, g, n, c, s, mean, scale, beta, acc, tail, pf, buf):
    """Sums of ``dz`` and ``dz * (x - mean[j])`` for a group of channels (:func:`_group_grad_sums`;
    ``buf``: :data:`CHUNK` values of scratch, :func:`_act_lane_grad_sums`)."""
    su = uint64(s)
    for i in range(uint64(n)):
        if pf and i + 1 < uint64(n):
            _prefetch_runs(x, ch0, g, i + 1, i + 2, c, s)
            _prefetch_runs(dy, ch0, g, i + 1, i + 2, c, s)
            if res is not None:
                _prefetch_runs(res, ch0, g, i + 1, i + 2, c, s)
        run = (i * uint64(c) + uint64(ch0)) * su
        for j in range(uint64(g)):  # _act_lane_grad_sums inline: a call per short run costs about 2x
            span = run + j * su
            mu = mean[j]
            sc = scale[j]
            be = beta[j]
            for c0 in range(span, span + su, uint64(CHUNK)):
                m = min(uint64(CHUNK), span + su - c0)
                for t in range(m):
                    buf[t] = _act_dz(np.float64(dy[c0 + t]), _z(x, res, c0 + t, mu, sc, be), act)
                full = (m // LANES) * LANES
                _buf_grad_lane_loop(x, buf, c0, full, mu, acc[j, 0], acc[j, 1])
                for t in range(full, m):
                    gv = buf[t]
                    tail[j, 0] += gv
                    tail[j, 1] += gv * (np.float64(x[c0 + t]) - mu)


@kernel_jit(**SERIAL)
def _group_act_affine(act, x, res, y, ch0, g, n, c, s, mean, scale, beta, nch0, ng, stream):
    """``y = act((x - mean[j]) * scale[j] + beta[j] (+ res))`` over a group of channels
    (:func:`_group_affine`)."""
    su = uint64(s)
    for i in range(uint64(n)):
        if ng > 0:
            _prefetch_runs(x, nch0, ng, i, i + 1, c, s)
        run = (i * uint64(c) + uint64(ch0)) * su
        for j in range(uint64(g)):
            span = run + j * su
            mu = mean[j]
            sc = scale[j]
            be = beta[j]
            if stream:
                _act_span_write(act, True, x, res, y, span, su, mu, sc, be)
            else:  # inline, as in _group_affine
                for q in range(span, span + su):
                    y[q] = _act(_z(x, res, q, mu, sc, be), act)


@kernel_jit(**SERIAL)
def _group_act_dx(act, x, dy, res, dx, dres, ch0, g, n, c, s, mean, k, beta, mdz, kx, train, stream, pf):
    """The fused backward's ``dx`` over a group (:func:`_group_dx`, ``dz`` for ``dy``); ``dres``, if
    an array, receives ``dz``."""
    su = uint64(s)
    for i in range(uint64(n)):
        if pf and i + 1 < uint64(n):
            _prefetch_runs(dy, ch0, g, i + 1, i + 2, c, s)
            _prefetch_runs(x, ch0, g, i + 1, i + 2, c, s)
            if res is not None:
                _prefetch_runs(res, ch0, g, i + 1, i + 2, c, s)
        run = (i * uint64(c) + uint64(ch0)) * su
        for j in range(uint64(g)):
            span = run + j * su
            kj = k[j]
            mu = mean[j]
            be = beta[j]
            if stream:
                _act_dx_span(act, train, True, x, dy, res, dx, dres, span, su, mu, kj, be, mdz[j], kx[j])
            elif train:  # inline, as in _group_dx
                md = mdz[j]
                kxj = kx[j]
                for q in range(span, span + su):
                    gv = _act_dz(np.float64(dy[q]), _z(x, res, q, mu, kj, be), act)
                    dx[q] = kj * ((gv - md) - (np.float64(x[q]) - mu) * kxj)
                    if dres is not None:
                        dres[q] = gv
            else:
                for q in range(span, span + su):
                    gv = _act_dz(np.float64(dy[q]), _z(x, res, q, mu, kj, be), act)
                    dx[q] = gv * kj
                    if dres is not None:
                        dres[q] = gv


# ----------------------------------------------------------------------------------------------
# the kernels


@kernel_jit(**PARALLEL)
def rows_forward_train(x, y, w, b, has_w, has_b, n, c, s, eps, stats, nt, g, pf, stream, res):
    """Training forward, rows layout. Fills ``stats``, writes ``y``; returns the number of
    channels whose mean or variance is non-finite. ``g > 0``: tasks of ``g`` channels;
    ``g == 0``: tasks of single rows (few channels). ``res``: a residual added before the
    activation :data:`ACT`, or None."""
    if g > 0:
        # split over groups of channels, a contiguous block of groups per thread: a thread sums
        # a group, then normalizes it from its own cache while prefetching its next group; a
        # group's rows of one sample are one contiguous run of memory
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
                for j in range(gg):
                    ch = ch0 + j
                    mean[j] = stats[0, ch]
                    scale[j] = stats[2, ch] * (np.float64(w[ch]) if has_w else 1.0)
                    beta[j] = np.float64(b[ch]) if has_b else 0.0
                nxt = ch0 + g
                ng = min(g, c - nxt) if (pf and grp + 1 < hi) else 0
                if ACT != NONE or res is not None:
                    _group_act_affine(ACT, x, res, y, ch0, gg, n, c, s, mean, scale, beta, nxt, ng, stream)
                else:
                    _group_affine(x, y, ch0, gg, n, c, s, mean, scale, beta, nxt, ng, stream)
            if stream:
                _store_fence()
    else:
        # split over rows: each (n, c) row writes its own partial sums, (N*C,) -> (C,) after
        part = np.empty((2, n * c))
        for r in prange(n * c):
            _row_sums(x, r, c, s, part)
        _rows_finish(x, part, n, c, s, eps, stats)
        for r in prange(n * c):
            ch = r % c
            scale = stats[2, ch] * (np.float64(w[ch]) if has_w else 1.0)
            beta = np.float64(b[ch]) if has_b else 0.0
            if ACT != NONE or res is not None:
                _act_span_write(ACT, stream, x, res, y, r * s, s, stats[0, ch], scale, beta)
            else:
                _span_write(AFFINE, stream, x, x, y, r * s, s, stats[0, ch], scale, beta, 0.0)
            if stream:
                _store_fence()
    return _count_nonfinite(stats)


@kernel_jit(**PARALLEL)
def rows_forward_eval(x, y, w, b, has_w, has_b, n, c, s, stats, nt, res):
    """Eval forward, rows layout: normalize with ``stats`` (mean in row 0, invstd in row 2);
    ``res`` and :data:`ACT` as in :func:`rows_forward_train`."""
    for r in prange(n * c):
        ch = r % c
        scale = stats[2, ch] * (np.float64(w[ch]) if has_w else 1.0)
        beta = np.float64(b[ch]) if has_b else 0.0
        if ACT != NONE or res is not None:
            _act_span_write(ACT, False, x, res, y, r * s, s, stats[0, ch], scale, beta)
        else:
            _span_write(AFFINE, False, x, x, y, r * s, s, stats[0, ch], scale, beta, 0.0)


@kernel_jit(**PARALLEL)
def rows_backward(x, dy, dx, w, b, has_w, has_b, n, c, s, stats, grads, train, nt, g, pf, stream, res, dres):
    """Backward, rows layout. ``grads[0]`` receives dbias, ``grads[1]`` dweight (summed in float64).

    Training, per channel with M values, xhat = (x - mean) * invstd, g = gamma (or 1):
        dbias   = sum(dy)
        dweight = sum(dy * xhat) = invstd * sum(dy * (x - mean))
        dx      = g * invstd / M * (M * dy - dbias - xhat * dweight)
                = g * invstd * ((dy - dbias / M) - (x - mean) * (invstd * dweight / M))
    (the derivation, step by step, is in :func:`bnlab.reference.batch_norm_backward`).
    Eval, the statistics being constants: dx = g * invstd * dy.

    With the activation :data:`ACT`, ``dz = dy * act'(z)`` takes the place of ``dy`` everywhere,
    ``z = (x - mean) * invstd * g + beta (+ res)`` recomputed from ``x``, ``b`` and ``res`` where
    ``dy`` is read; ``dres`` (an array, or None) receives ``dz``. (Without an activation ``dz`` is
    ``dy``: the caller takes ``dres = dy`` and passes neither ``res`` nor ``dres``.)
    Tasks as in :func:`rows_forward_train` (``g`` channels, or single rows for ``g == 0``).
    """
    m = n * s
    if g > 0:
        ngrp = (c + g - 1) // g
        for t in prange(nt):
            lo = t * ngrp // nt
            hi = (t + 1) * ngrp // nt
            acc = np.zeros((g, 2, LANES + 8))
            tail = np.zeros((g, 2))
            mean = np.empty(g)
            k = np.empty(g)
            mdy = np.empty(g)
            kx = np.empty(g)
            beta = mean  # the epilogue's bias and dz buffer (unused without one)
            buf = mean
            if ACT != NONE:
                beta = np.empty(g)
                buf = np.empty(CHUNK)
            for grp in range(lo, hi):
                ch0 = grp * g
                gg = min(g, c - ch0)
                acc[:] = 0.0
                tail[:] = 0.0
                for j in range(gg):
                    ch = ch0 + j
                    mean[j] = stats[0, ch]
                    if ACT != NONE:
                        k[j] = stats[2, ch] * (np.float64(w[ch]) if has_w else 1.0)
                        beta[j] = np.float64(b[ch]) if has_b else 0.0
                if ACT != NONE:
                    _group_act_grad_sums(ACT, x, dy, res, ch0, gg, n, c, s, mean, k, beta, acc, tail, pf, buf)
                else:
                    _group_grad_sums(x, dy, ch0, gg, n, c, s, mean, acc, tail, pf)
                for j in range(gg):
                    ch = ch0 + j
                    s1 = tail[j, 0] + _lane_total(acc[j, 0, :LANES])
                    s2 = tail[j, 1] + _lane_total(acc[j, 1, :LANES])
                    invstd = stats[2, ch]
                    grads[0, ch] = s1
                    grads[1, ch] = s2 * invstd
                    k[j] = invstd * (np.float64(w[ch]) if has_w else 1.0)
                    mdy[j] = s1 / m
                    kx[j] = invstd * invstd * s2 / m
                if ACT != NONE:
                    _group_act_dx(ACT, x, dy, res, dx, dres, ch0, gg, n, c, s, mean, k, beta, mdy, kx, train, stream, pf)
                else:
                    _group_dx(x, dy, dx, ch0, gg, n, c, s, mean, k, mdy, kx, train, stream, pf)
            if stream:
                _store_fence()
    else:
        part = np.empty((2, n * c))
        for r in prange(n * c):
            a1, a2 = _lane_pair()
            ch = r % c
            if ACT != NONE:
                sc = stats[2, ch] * (np.float64(w[ch]) if has_w else 1.0)
                be = np.float64(b[ch]) if has_b else 0.0
                t1, t2 = _act_lane_grad_sums(ACT, x, dy, res, r * s, s, stats[0, ch], sc, be, a1, a2,
                                             np.empty(min(s, CHUNK)))
            else:
                t1, t2 = _lane_grad_sums(x, dy, r * s, s, stats[0, ch], a1, a2)
            part[0, r] = t1 + _lane_total(a1)
            part[1, r] = t2 + _lane_total(a2)
        tot = np.empty((2, c))  # (N*C,) -> (C,), float64 whatever the dtype of grads
        for ch in range(c):
            s1, s2 = _fold_rows(part, n, c, ch)
            tot[0, ch] = s1
            tot[1, ch] = s2
            grads[0, ch] = s1
            grads[1, ch] = s2 * stats[2, ch]
        for r in prange(n * c):
            ch = r % c
            invstd = stats[2, ch]
            k = invstd * (np.float64(w[ch]) if has_w else 1.0)
            mdy = tot[0, ch] / m
            kx = invstd * invstd * tot[1, ch] / m
            if ACT != NONE:
                be = np.float64(b[ch]) if has_b else 0.0
                _act_dx_span(ACT, train, stream, x, dy, res, dx, dres, r * s, s, stats[0, ch], k, be, mdy, kx)
            elif train:
                _span_write(DX, stream, x, dy, dx, r * s, s, stats[0, ch], k, mdy, kx)
            else:
                _span_write(SCALE, stream, dy, dy, dx, r * s, s, k, 0.0, 0.0, 0.0)
            if stream:
                _store_fence()
