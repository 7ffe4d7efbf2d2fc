"""The columns layout: 2-D ``(M, C)`` input and channels_last / channels_last_3d (and ``(N, C, L)``
with C innermost), seen as ``M`` rows of ``C`` channels; ``x`` flat of length ``m * c``, (M, C) in
memory order.

The ``M`` rows are cut into one block per thread; each block writes per-channel partial sums,
combined after the parallel loop. A block is read as four interleaved streams (a row from each
quarter per step), which more than doubles what a core reads per second.

Fused epilogue: as in :mod:`.rows` (the module constant :data:`ACT`, ``res``, ``dres``). Its loops
take the four streams a row at a time.

The statistics helpers (:func:`_cols_scratch`, :func:`_cols_sums`, :func:`_cols_finish`) are the
one copy of the statistics math, called by :func:`cols_forward_train` and by the kernels of
:mod:`.stats`; the thin ones are inlined by numba (``inline="always"``), as in :mod:`.rows`.
"""

from __future__ import annotations

import numpy as np
from numba import prange, uint64

from ._jit import PARALLEL, SERIAL, kernel_jit
from ._llvm import NONE, _nt_act_dx_line, _nt_act_line, _store_fence
from ._serial import AFFINE, DX, SCALE, _act, _act_dz, _aligned_head, _count_nonfinite, _finish_stats, _stream_line, _z

ACT = NONE  # the activation of the fused epilogue (replaced in the act variants, see :mod:`.rows`)


@kernel_jit(**SERIAL)
def _cols_sums(x, r0, r1, c, shift, a1, a2):
    """Per-channel sums of ``x - shift`` and its square over rows ``[r0, r1)`` of ``(M, C)``.

    The rows are read as four streams, one per quarter of the range, a row of each per step (one
    accumulator update per four values): a single sequential stream per core leaves memory
    mostly idle on these machines (about 4-5 GB/s a core), four keep it busy (10-13)."""
    cu = uint64(c)
    qn = uint64((r1 - r0) // 4)
    for i in range(qn):
        b0 = (uint64(r0) + i) * cu
        b1 = b0 + qn * cu
        b2 = b1 + qn * cu
        b3 = b2 + qn * cu
        for ch in range(cu):
            k = shift[ch]
            d0 = np.float64(x[b0 + ch]) - k
            d1 = np.float64(x[b1 + ch]) - k
            d2 = np.float64(x[b2 + ch]) - k
            d3 = np.float64(x[b3 + ch]) - k
            a1[ch] += (d0 + d1) + (d2 + d3)
            a2[ch] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for r in range(uint64(r0) + 4 * qn, uint64(r1)):
        base = r * cu
        for ch in range(cu):
            d = np.float64(x[base + ch]) - shift[ch]
            a1[ch] += d
            a2[ch] += d * d


@kernel_jit(**SERIAL)
def _cols_grad_sums(x, dy, r0, r1, c, mean, a1, a2):
    """Per-channel sums of ``dy`` and ``dy * (x - mean)`` over rows ``[r0, r1)``, read as four
    streams (see :func:`_cols_sums`)."""
    cu = uint64(c)
    qn = uint64((r1 - r0) // 4)
    for i in range(qn):
        b0 = (uint64(r0) + i) * cu
        b1 = b0 + qn * cu
        b2 = b1 + qn * cu
        b3 = b2 + qn * cu
        for ch in range(cu):
            mu = mean[ch]
            g0 = np.float64(dy[b0 + ch])
            g1 = np.float64(dy[b1 + ch])
            g2 = np.float64(dy[b2 + ch])
            g3 = np.float64(dy[b3 + ch])
            a1[ch] += (g0 + g1) + (g2 + g3)
            a2[ch] += (g0 * (np.float64(x[b0 + ch]) - mu) + g1 * (np.float64(x[b1 + ch]) - mu)) + (
                g2 * (np.float64(x[b2 + ch]) - mu) + g3 * (np.float64(x[b3 + ch]) - mu))
    for r in range(uint64(r0) + 4 * qn, uint64(r1)):
        base = r * cu
        for ch in range(cu):
            g = np.float64(dy[base + ch])
            a1[ch] += g
            a2[ch] += g * (np.float64(x[base + ch]) - mean[ch])


@kernel_jit(**SERIAL)
def _cols_lines(out, r0, c):
    """True when rows ``[r0, ...)`` of ``out`` ``(M, C)`` are whole, 64-byte aligned cache lines
    (``C`` a multiple of a line, the block's start aligned): then they can be streamed."""
    return c % (64 // out.itemsize) == 0 and _aligned_head(out, uint64(r0) * uint64(c), 64) == 0


@kernel_jit(**SERIAL)
def _cols_stream(kind, x, dy, out, r0, r1, c, p0, p1, p2, p3):
    """Rows ``[r0, r1)`` of a columns-layout output written a whole cache line at a time,
    non-temporally (:func:`_stream_line`), reading four streams (see :func:`_cols_sums`), then a
    fence. The rows must be whole aligned lines (:func:`_cols_lines`)."""
    cu = uint64(c)
    w = uint64(64 // out.itemsize)
    qn = uint64((r1 - r0) // 4)
    for i in range(qn):
        b0 = (uint64(r0) + i) * cu
        for ch in range(uint64(0), cu, w):
            _stream_line(kind, x, dy, out, b0 + ch, p0, p1, p2, p3, ch)
            _stream_line(kind, x, dy, out, b0 + qn * cu + ch, p0, p1, p2, p3, ch)
            _stream_line(kind, x, dy, out, b0 + 2 * qn * cu + ch, p0, p1, p2, p3, ch)
            _stream_line(kind, x, dy, out, b0 + 3 * qn * cu + ch, p0, p1, p2, p3, ch)
    for r in range(uint64(r0) + 4 * qn, uint64(r1)):
        for ch in range(uint64(0), cu, w):
            _stream_line(kind, x, dy, out, r * cu + ch, p0, p1, p2, p3, ch)
    _store_fence()


@kernel_jit(**SERIAL)
def _cols_affine(x, y, r0, r1, c, mean, scale, beta, stream):
    """``y = (x - mean) * scale + beta`` over rows ``[r0, r1)``; ``stream``: whole cache lines of
    ``y`` stored non-temporally where the rows allow it (:func:`_cols_lines`)."""
    cu = uint64(c)
    if stream and _cols_lines(y, r0, c):
        _cols_stream(AFFINE, x, x, y, r0, r1, c, mean, scale, beta, beta)
        return
    qn = uint64((r1 - r0) // 4)
    for i in range(qn):
        b0 = (uint64(r0) + i) * cu
        b1 = b0 + qn * cu
        b2 = b1 + qn * cu
        b3 = b2 + qn * cu
        for ch in range(cu):
            mu = mean[ch]
            sc = scale[ch]
            be = beta[ch]
            y[b0 + ch] = (np.float64(x[b0 + ch]) - mu) * sc + be
            y[b1 + ch] = (np.float64(x[b1 + ch]) - mu) * sc + be
            y[b2 + ch] = (np.float64(x[b2 + ch]) - mu) * sc + be
            y[b3 + ch] = (np.float64(x[b3 + ch]) - mu) * sc + be
    for r in range(uint64(r0) + 4 * qn, uint64(r1)):
        base = r * cu
        for ch in range(cu):
            y[base + ch] = (np.float64(x[base + ch]) - mean[ch]) * scale[ch] + beta[ch]


@kernel_jit(**SERIAL)
def _cols_dx(x, dy, dx, r0, r1, c, mean, k, mdy, kx, stream):
    cu = uint64(c)
    if stream and _cols_lines(dx, r0, c):
        _cols_stream(DX, x, dy, dx, r0, r1, c, mean, k, mdy, kx)
        return
    qn = uint64((r1 - r0) // 4)
    for i in range(qn):
        b0 = (uint64(r0) + i) * cu
        b1 = b0 + qn * cu
        b2 = b1 + qn * cu
        b3 = b2 + qn * cu
        for ch in range(cu):
            kk = k[ch]
            md = mdy[ch]
            mu = mean[ch]
            kxx = kx[ch]
            dx[b0 + ch] = kk * ((np.float64(dy[b0 + ch]) - md) - (np.float64(x[b0 + ch]) - mu) * kxx)
            dx[b1 + ch] = kk * ((np.float64(dy[b1 + ch]) - md) - (np.float64(x[b1 + ch]) - mu) * kxx)
            dx[b2 + ch] = kk * ((np.float64(dy[b2 + ch]) - md) - (np.float64(x[b2 + ch]) - mu) * kxx)
            dx[b3 + ch] = kk * ((np.float64(dy[b3 + ch]) - md) - (np.float64(x[b3 + ch]) - mu) * kxx)
    for r in range(uint64(r0) + 4 * qn, uint64(r1)):
        base = r * cu
        for ch in range(cu):
            dx[base + ch] = k[ch] * ((np.float64(dy[base + ch]) - mdy[ch]) - (np.float64(x[base + ch]) - mean[ch]) * kx[ch])


@kernel_jit(**SERIAL)
def _cols_scale(dy, dx, r0, r1, c, k, stream):
    cu = uint64(c)
    if stream and _cols_lines(dx, r0, c):
        _cols_stream(SCALE, dy, dy, dx, r0, r1, c, k, k, k, k)
        return
    for r in range(uint64(r0), uint64(r1)):
        base = r * cu
        for ch in range(cu):
            dx[base + ch] = np.float64(dy[base + ch]) * k[ch]


@kernel_jit(**SERIAL)
def _num_blocks(m, c, nt):
    """Blocks of rows for the columns layout: one per thread, fewer for tiny inputs."""
    nb = (m * c) // 4096
    if nb > nt:
        nb = nt
    if nb < 1:
        nb = 1
    return nb



# ----------------------------------------------------------------------------------------------
# the fused epilogue: the plain helpers' loops (four streams, a row of each per step) with ``act(z)``
# for ``z`` and ``dz`` for ``dy``; where streaming, whole lines through the vector lines of
# :func:`bnlab.kernels._llvm._nt_act_line` and :func:`bnlab.kernels._llvm._nt_act_dx_line`


@kernel_jit(**SERIAL)
def _cols_act_affine(act, x, res, y, r0, r1, c, mean, scale, beta, stream):
    """``y = act((x - mean) * scale + beta (+ res))`` over rows ``[r0, r1)`` (:func:`_cols_affine`)."""
    cu = uint64(c)
    qn = uint64((r1 - r0) // 4)
    if stream and _cols_lines(y, r0, c):
        w = uint64(64 // y.itemsize)
        four = uint64(4)
        for r in range(uint64(r0), uint64(r1)):
            # rows in the four streams' order: i, i + qn, i + 2 qn, i + 3 qn, then the last rows
            i = r - uint64(r0)
            rr = uint64(r0) + (i // four + (i % four) * qn if i < four * qn else i)
            for ch in range(uint64(0), cu, w):
                _nt_act_line(x, res, y, rr * cu + ch, mean, scale, beta, ch, act)
        _store_fence()
        return
    for i in range(qn):
        b0 = (uint64(r0) + i) * cu
        b1 = b0 + qn * cu
        b2 = b1 + qn * cu
        b3 = b2 + qn * cu
        for ch in range(cu):
            mu = mean[ch]
            sc = scale[ch]
            be = beta[ch]
            y[b0 + ch] = _act(_z(x, res, b0 + ch, mu, sc, be), act)
            y[b1 + ch] = _act(_z(x, res, b1 + ch, mu, sc, be), act)
            y[b2 + ch] = _act(_z(x, res, b2 + ch, mu, sc, be), act)
            y[b3 + ch] = _act(_z(x, res, b3 + ch, mu, sc, be), act)
    for r in range(uint64(r0) + 4 * qn, uint64(r1)):
        base = r * cu
        for ch in range(cu):
            y[base + ch] = _act(_z(x, res, base + ch, mean[ch], scale[ch], beta[ch]), act)


@kernel_jit(**SERIAL)
def _cols_act_grad_sums(act, x, dy, res, r0, r1, c, mean, scale, beta, a1, a2):
    """Per-channel sums of ``dz`` and ``dz * (x - mean)`` over rows ``[r0, r1)``
    (:func:`_cols_grad_sums`)."""
    cu = uint64(c)
    qn = uint64((r1 - r0) // 4)
    for i in range(qn):
        b0 = (uint64(r0) + i) * cu
        b1 = b0 + qn * cu
        b2 = b1 + qn * cu
        b3 = b2 + qn * cu
        for ch in range(cu):
            mu = mean[ch]
            sc = scale[ch]
            be = beta[ch]
            g0 = _act_dz(np.float64(dy[b0 + ch]), _z(x, res, b0 + ch, mu, sc, be), act)
            g1 = _act_dz(np.float64(dy[b1 + ch]), _z(x, res, b1 + ch, mu, sc, be), act)
            g2 = _act_dz(np.float64(dy[b2 + ch]), _z(x, res, b2 + ch, mu, sc, be), act)
            g3 = _act_dz(np.float64(dy[b3 + ch]), _z(x, res, b3 + ch, mu, sc, be), act)
            a1[ch] += (g0 + g1) + (g2 + g3)
            a2[ch] += (g0 * (np.float64(x[b0 + ch]) - mu) + g1 * (np.float64(x[b1 + ch]) - mu)) + (
                g2 * (np.float64(x[b2 + ch]) - mu) + g3 * (np.float64(x[b3 + ch]) - mu))
    for r in range(uint64(r0) + 4 * qn, uint64(r1)):
        base = r * cu
        for ch in range(cu):
            mu = mean[ch]
            g = _act_dz(np.float64(dy[base + ch]), _z(x, res, base + ch, mu, scale[ch], beta[ch]), act)
            a1[ch] += g
            a2[ch] += g * (np.float64(x[base + ch]) - mu)


@kernel_jit(**SERIAL)
def _cols_act_dx_row(act, train, x, dy, res, dx, dres, base, c, mean, k, beta, mdz, kx):
    """:func:`_cols_act_dx` over the one row from ``base`` (its last rows, past the four streams)."""
    cu = uint64(c)
    for ch in range(cu):
        j = base + ch
        mu = mean[ch]
        g = _act_dz(np.float64(dy[j]), _z(x, res, j, mu, k[ch], beta[ch]), act)
        if train:
            dx[j] = k[ch] * ((g - mdz[ch]) - (np.float64(x[j]) - mu) * kx[ch])
        else:
            dx[j] = g * k[ch]
        if dres is not None:
            dres[j] = g


@kernel_jit(**SERIAL)
def _cols_act_dx(act, train, x, dy, res, dx, dres, r0, r1, c, mean, k, beta, mdz, kx, stream):
    """The fused backward's ``dx`` over rows ``[r0, r1)`` (:func:`_cols_dx`, :func:`_cols_scale`;
    ``k`` is also the scale of ``z``), ``dres = dz`` when ``dres`` is an array (aligned as ``dx``)."""
    cu = uint64(c)
    qn = uint64((r1 - r0) // 4)
    if stream and _cols_lines(dx, r0, c):
        w = uint64(64 // dx.itemsize)
        four = uint64(4)
        for r in range(uint64(r0), uint64(r1)):
            # rows in the four streams' order: i, i + qn, i + 2 qn, i + 3 qn, then the last rows
            i = r - uint64(r0)
            rr = uint64(r0) + (i // four + (i % four) * qn if i < four * qn else i)
            for ch in range(uint64(0), cu, w):
                _nt_act_dx_line(x, dy, res, dx, dres, rr * cu + ch, mean, k, beta, mdz, kx, ch, act, train)
        _store_fence()
        return
    if train:
        for i in range(qn):
            b0 = (uint64(r0) + i) * cu
            b1 = b0 + qn * cu
            b2 = b1 + qn * cu
            b3 = b2 + qn * cu
            for ch in range(cu):
                mu = mean[ch]
                kk = k[ch]
                be = beta[ch]
                md = mdz[ch]
                kxx = kx[ch]
                g0 = _act_dz(np.float64(dy[b0 + ch]), _z(x, res, b0 + ch, mu, kk, be), act)
                g1 = _act_dz(np.float64(dy[b1 + ch]), _z(x, res, b1 + ch, mu, kk, be), act)
                g2 = _act_dz(np.float64(dy[b2 + ch]), _z(x, res, b2 + ch, mu, kk, be), act)
                g3 = _act_dz(np.float64(dy[b3 + ch]), _z(x, res, b3 + ch, mu, kk, be), act)
                dx[b0 + ch] = kk * ((g0 - md) - (np.float64(x[b0 + ch]) - mu) * kxx)
                dx[b1 + ch] = kk * ((g1 - md) - (np.float64(x[b1 + ch]) - mu) * kxx)
                dx[b2 + ch] = kk * ((g2 - md) - (np.float64(x[b2 + ch]) - mu) * kxx)
                dx[b3 + ch] = kk * ((g3 - md) - (np.float64(x[b3 + ch]) - mu) * kxx)
                if dres is not None:
                    dres[b0 + ch] = g0
                    dres[b1 + ch] = g1
                    dres[b2 + ch] = g2
                    dres[b3 + ch] = g3
    else:
        for i in range(qn):
            b0 = (uint64(r0) + i) * cu
            b1 = b0 + qn * cu
            b2 = b1 + qn * cu
            b3 = b2 + qn * cu
            for ch in range(cu):
                mu = mean[ch]
                kk = k[ch]
                be = beta[ch]
                g0 = _act_dz(np.float64(dy[b0 + ch]), _z(x, res, b0 + ch, mu, kk, be), act)
                g1 = _act_dz(np.float64(dy[b1 + ch]), _z(x, res, b1 + ch, mu, kk, be), act)
                g2 = _act_dz(np.float64(dy[b2 + ch]), _z(x, res, b2 + ch, mu, kk, be), act)
                g3 = _act_dz(np.float64(dy[b3 + ch]), _z(x, res, b3 + ch, mu, kk, be), act)
                dx[b0 + ch] = g0 * kk
                dx[b1 + ch] = g1 * kk
                dx[b2 + ch] = g2 * kk
                dx[b3 + ch] = g3 * kk
                if dres is not None:
                    dres[b0 + ch] = g0
                    dres[b1 + ch] = g1
                    dres[b2 + ch] = g2
                    dres[b3 + ch] = g3
    for r in range(uint64(r0) + 4 * qn, uint64(r1)):
        _cols_act_dx_row(act, train, x, dy, res, dx, dres, r * cu, c, mean, k, beta, mdz, kx)


# ----------------------------------------------------------------------------------------------
# columns layout: x flat of length m * c, (M, C) in memory order


GROUP_WIDTH = 128  # few channels: rows are taken together until a wide row has this many values


@kernel_jit(**SERIAL)
def _row_group(m, c):
    """Rows taken together as one wide row when there are few channels: ``g`` (a power of two that
    divides ``m``) consecutive rows of ``C`` channels are read as one row of ``g * C`` values.

    Every loop here walks a row's channels as its inner loop; with ``C = 16`` that loop is too
    short to vectorize well and its per-row set-up dominates (measured: channels_last training
    at 64x16x32x32 ran at a third of the speed of C = 64 at the same size). A wide row's
    per-channel operands are the channel's, tiled ``g`` times (:func:`_tile`), and its partial
    sums fold back to ``C`` channels; the values and the order they are summed in per channel
    change, not the formulas."""
    g = 1
    while g * c < GROUP_WIDTH and m % (2 * g) == 0:
        g *= 2
    return g


@kernel_jit(**SERIAL)
def _tile(a, g):
    """``a`` (C,) repeated ``g`` times: the operands of a wide row (:func:`_row_group`)."""
    c = a.shape[0]
    out = np.empty(g * c)
    for j in range(g):
        for ch in range(c):
            out[j * c + ch] = a[ch]
    return out


@kernel_jit(**SERIAL)
def _block_sums(nb, c):
    """Zeroed per-block partial sums ``(nb, 2, C + 8)`` (padded: no 4K aliasing between rows)."""
    return np.zeros((nb, 2, c + 8))


@kernel_jit(**SERIAL)
def _cols_blocks(m, c, nt):
    """How a columns-layout kernel splits ``(M, C)``: ``g`` rows to a wide row (:func:`_row_group`),
    ``mg`` wide rows of ``cg = g * C`` values, ``nb`` blocks of wide rows (:func:`_num_blocks`)."""
    g = _row_group(m, c)
    mg = m // g
    cg = c * g
    return g, mg, cg, _num_blocks(mg, cg, nt)


@kernel_jit(**SERIAL, inline="always")
def _cols_scratch(x, c, g, nb):
    """The scratch of the columns layout's statistics: zeroed per-block sums of wide rows
    (:func:`_block_sums`, ``nb`` blocks of ``g * C`` values), and the shifts of the sums, each
    channel's first sample, ``(C,)`` and tiled for a wide row (:func:`_tile`)."""
    shift = np.empty(c)
    for ch in range(c):
        shift[ch] = np.float64(x[ch])
    return _block_sums(nb, c * g), shift, _tile(shift, g)


@kernel_jit(**SERIAL, inline="always")
def _fold_blocks(part, nb, g, c, ch):
    """Channel ``ch``'s totals of per-block sums of wide rows ``part`` ``(nb, 2, g * C + 8)``, the
    blocks in order: (nb, g, C) -> (C,) (the statistics' sums, and the backward's)."""
    s1 = 0.0
    s2 = 0.0
    for blk in range(nb):
        for j in range(g):
            s1 += part[blk, 0, j * c + ch]
            s2 += part[blk, 1, j * c + ch]
    return s1, s2


@kernel_jit(**SERIAL, inline="always")
def _cols_finish(part, nb, g, m, c, eps, shift, stats):
    """Per-block sums of ``x - shift`` (:func:`_cols_sums` over the blocks, :func:`_cols_scratch`)
    -> the statistics of each channel."""
    for ch in range(c):
        s1, s2 = _fold_blocks(part, nb, g, c, ch)
        _finish_stats(stats, ch, s1, s2, m, eps, shift[ch])


@kernel_jit(**SERIAL, inline="always")
def _cols_operands(stats, w, b, has_w, has_b, g):
    """The forward's per-channel operands, tiled for a wide row (:func:`_tile`): ``mean``,
    ``scale = invstd * weight`` (or ``invstd``) and ``beta = bias`` (or 0)."""
    c = stats.shape[1]
    mean = np.empty(c)
    scale = np.empty(c)
    beta = np.empty(c)
    for ch in range(c):
        mean[ch] = stats[0, ch]
        scale[ch] = stats[2, ch] * (np.float64(w[ch]) if has_w else 1.0)
        beta[ch] = np.float64(b[ch]) if has_b else 0.0
    return _tile(mean, g), _tile(scale, g), _tile(beta, g)


@kernel_jit(**PARALLEL)
def cols_forward_train(x, y, w, b, has_w, has_b, m, c, eps, stats, nt, stream, res):
    """Training forward, columns layout. Fills ``stats``, writes ``y``; returns the number of
    channels whose mean or variance is non-finite. ``res``: a residual added before the activation
    :data:`ACT`, or None."""
    g, mg, cg, nb = _cols_blocks(m, c, nt)  # mg wide rows of cg values (:func:`_row_group`)
    part, shift, shift_g = _cols_scratch(x, c, g, nb)
    for blk in prange(nb):
        _cols_sums(x, blk * mg // nb, (blk + 1) * mg // nb, cg, shift_g, part[blk, 0], part[blk, 1])
    _cols_finish(part, nb, g, m, c, eps, shift, stats)
    mean, scale, beta = _cols_operands(stats, w, b, has_w, has_b, g)
    for blk in prange(nb):
        if ACT != NONE or res is not None:
            _cols_act_affine(ACT, x, res, y, blk * mg // nb, (blk + 1) * mg // nb, cg, mean, scale, beta, stream)
        else:
            _cols_affine(x, y, blk * mg // nb, (blk + 1) * mg // nb, cg, mean, scale, beta, stream)
    return _count_nonfinite(stats)


@kernel_jit(**PARALLEL)
def cols_forward_eval(x, y, w, b, has_w, has_b, m, c, stats, nt, res):
    """Eval forward, columns layout; ``res`` and :data:`ACT` as in :func:`cols_forward_train`."""
    g, mg, cg, nb = _cols_blocks(m, c, nt)  # mg wide rows of cg values (:func:`_row_group`)
    mean, scale, beta = _cols_operands(stats, w, b, has_w, has_b, g)
    for blk in prange(nb):
        if ACT != NONE or res is not None:
            _cols_act_affine(ACT, x, res, y, blk * mg // nb, (blk + 1) * mg // nb, cg, mean, scale, beta, False)
        else:
            _cols_affine(x, y, blk * mg // nb, (blk + 1) * mg // nb, cg, mean, scale, beta, False)


@kernel_jit(**PARALLEL)
def cols_backward(x, dy, dx, w, b, has_w, has_b, m, c, stats, grads, train, nt, stream, res, dres):
    """Backward, columns layout; the formulas of :func:`bnlab.kernels.rows.rows_backward`, with the
    activation :data:`ACT` as there (``dz`` for ``dy``; ``dres``, if an array, receives ``dz``)."""
    g, mg, cg, nb = _cols_blocks(m, c, nt)  # mg wide rows of cg values (:func:`_row_group`)
    part = _block_sums(nb, cg)
    mean = np.empty(c)
    for ch in range(c):
        mean[ch] = stats[0, ch]
    mean_g = _tile(mean, g)
    k = np.empty(c)
    beta = mean_g  # the epilogue's bias and the scale of z (unused without one)
    k_g = mean_g
    if ACT != NONE:
        beta = np.empty(c)
        for ch in range(c):
            k[ch] = stats[2, ch] * (np.float64(w[ch]) if has_w else 1.0)  # the scale of z
            beta[ch] = np.float64(b[ch]) if has_b else 0.0
        beta = _tile(beta, g)
        k_g = _tile(k, g)
    for blk in prange(nb):
        if ACT != NONE:
            _cols_act_grad_sums(ACT, x, dy, res, blk * mg // nb, (blk + 1) * mg // nb, cg, mean_g, k_g, beta,
                                part[blk, 0], part[blk, 1])
        else:
            _cols_grad_sums(x, dy, blk * mg // nb, (blk + 1) * mg // nb, cg, mean_g, part[blk, 0], part[blk, 1])
    mdy = np.empty(c)
    kx = np.empty(c)
    for ch in range(c):
        s1, s2 = _fold_blocks(part, nb, g, c, ch)
        invstd = stats[2, ch]
        grads[0, ch] = s1
        grads[1, ch] = s2 * invstd
        k[ch] = invstd * (np.float64(w[ch]) if has_w else 1.0)
        mdy[ch] = s1 / m
        kx[ch] = invstd * invstd * s2 / m
    k_g = _tile(k, g)
    mdy = _tile(mdy, g)
    kx = _tile(kx, g)
    for blk in prange(nb):
        if ACT != NONE:
            _cols_act_dx(ACT, train, x, dy, res, dx, dres, blk * mg // nb, (blk + 1) * mg // nb, cg, mean_g, k_g, beta,
                         mdy, kx, stream)
        elif train:
            _cols_dx(x, dy, dx, blk * mg // nb, (blk + 1) * mg // nb, cg, mean_g, k_g, mdy, kx, stream)
        else:
            _cols_scale(dy, dx, blk * mg // nb, (blk + 1) * mg // nb, cg, k_g, stream)
