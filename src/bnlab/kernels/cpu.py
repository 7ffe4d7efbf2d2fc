"""Fused CPU batch-norm kernels (numba), float32 and float64, called zero-copy through ``.numpy()``.

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
* **software prefetch** (rows layout, from ``PREFETCH_FROM`` bytes): a channel is ``N`` runs far
  apart in memory and the hardware prefetcher stops at each run's page boundary, so the passes
  ask for each next run while working on this one, and the forward asks for the next group of
  channels while writing ``y``.
* **non-temporal stores** (from ``STREAM_FROM`` bytes): ``y`` and ``dx`` are written as whole
  64-byte lines that go straight to memory, without the read-for-ownership of a normal store
  (one tensor size less traffic per pass) and without evicting the inputs the pass still reads.
  The line is computed as one explicit full-width vector with the scalar loop's operations in
  the scalar loop's order, so both paths give the same bits.

Other strides are made contiguous first (a copy; the output gets the strides of
``torch.empty_like(x)``). Inputs below ``SERIAL_BELOW`` elements run on the calling thread only.

One kernel call per pass: the training forward computes the statistics and writes ``y`` in one
call; the backward computes ``dbias``/``dweight`` and writes ``dx`` in one call. Per-channel
finishing math (mean, invstd, the backward coefficients) happens inside the kernel between its
parallel loops, so Python never touches per-element data.

Numerical decisions (the same as :mod:`bnlab.reference`):

* Each channel is shifted by its first sample before summing, and every sum is float64. With the
  shift, ``x - k`` is of the order of the channel's spread, so the shifted one-pass variance
  ``E[(x-k)^2] - E[x-k]^2`` in float64 loses nothing measurable (the cancellation is bounded by
  ``(mean - k)^2 / var``, a few units for a sample ``k`` of the channel, against float64's 1e-16;
  for float32 input ``x - k`` is itself exact in float64 but for extreme magnitude gaps).
* ``y = (x - mean) * (invstd * gamma) + beta`` is formed in float64 with ``x - mean`` taken
  directly, then rounded once to the input dtype; ``dx`` likewise.
* ``fastmath`` stays off (no reassociation, exact IEEE semantics). The sums still vectorize:
  the rows layout accumulates a row into 16 float64 lanes (element ``j`` into lane ``j % 16``)
  held in vector registers by a hand-built loop (:func:`_lane_loop`), the columns layout into one
  accumulator per channel, an elementwise loop over four rows at a time for LLVM.
  Indices are unsigned so that numba's negative-index wraparound cannot turn loads into gathers.

Layout of the statistics array ``stats`` (float64, ``(3, C)``): row 0 the mean, row 1 the biased
variance, row 2 ``invstd = 1 / sqrt(var + eps)``.
"""

from __future__ import annotations

import math
import os
import types as types_
from typing import NamedTuple

import numba
import numpy as np
import torch
from numba import get_num_threads, njit, prange, set_num_threads, uint64
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic
from numba.np.ufunc import parallel as _numba_parallel
from torch import Tensor

ROWS = 1
COLUMNS = 2

# Below this many elements a kernel runs on the calling thread alone: waking a worker costs more
# than it saves, and a worker that the OS has descheduled would stall the call.
SERIAL_BELOW = 1 << 14

# From this many bytes the rows layout's training forward prefetches in software: each next
# sample's run of a group while summing, and the next group while writing ``y`` (measured on
# 8-17 MB tensors streamed from memory: 5-15% off the forward; the backward, reading two streams,
# gained nothing and does not prefetch). Smaller tensors sit in cache, where it only costs.
PREFETCH_FROM = 4 << 20

# From this many bytes the training forward stores ``y`` and the backward ``dx`` non-temporally
# (whole 64-byte lines straight to memory, skipping the read-for-ownership a normal store makes):
# for a tensor this size the step's working set (x, y, dy, dx) outgrows the share of last-level
# cache two cores get, the output would be evicted before its next use anyway, and streaming it
# saves one of the seven tensor sizes of memory traffic per pass pair.
STREAM_FROM = 8 << 20

_JIT = dict(parallel=True, cache=True, fastmath=False, nogil=True)
_JIT_SERIAL = dict(cache=True, fastmath=False, nogil=True)

# channels <-> last axis permutations of a numpy view, by ndim
_TO_LAST = {3: (0, 2, 1), 4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}


# ----------------------------------------------------------------------------------------------
# software prefetch


@intrinsic
def _prefetch(typingctx, arr, idx):
    """``llvm.prefetch`` of the cache line holding ``arr[idx]`` (read, keep in every level).

    A hint only: it never faults and changes no value. The rows layout reads a channel as ``N``
    runs far apart in memory; the hardware prefetcher stops at each run's page boundary, so the
    kernels ask for the next run (and for the next group of channels) while working on this one.
    """
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i8p = builder.bitcast(ptr, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [i8p, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


def _line_operand(context, builder, ty, val, off, width):
    """A ``<width x double>`` operand: a float splat, or ``width`` float64 values of an array
    from ``off``."""
    vd = ir.VectorType(ir.DoubleType(), width)
    if isinstance(ty, types.Array):
        ary = context.make_array(ty)(context, builder, val)
        ptr = builder.bitcast(builder.gep(ary.data, [off]), vd.as_pointer())
        return builder.load(ptr, align=8)
    v = context.cast(builder, val, ty, types.float64)
    u = builder.insert_element(ir.Constant(vd, ir.Undefined), v, ir.IntType(32)(0))
    return builder.shuffle_vector(u, u, ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width))


def _line_load(context, builder, ty, val, idx):
    """One cache line of a float32/float64 array from element ``idx``, widened to float64."""
    width = 64 // ty.dtype.bitwidth * 8
    elt = context.get_value_type(ty.dtype)
    vt = ir.VectorType(elt, width)
    ary = context.make_array(ty)(context, builder, val)
    v = builder.load(builder.bitcast(builder.gep(ary.data, [idx]), vt.as_pointer()), align=ty.dtype.bitwidth // 8)
    return v if ty.dtype == types.float64 else builder.fpext(v, ir.VectorType(ir.DoubleType(), width))


def _line_store_nt(context, builder, ty, val, idx, vec):
    """Round ``vec`` to the array's dtype and store it as one cache line from element ``idx``
    (which must be 64-byte aligned), non-temporal: the line goes to memory without first being
    read into the cache."""
    width = 64 // ty.dtype.bitwidth * 8
    elt = context.get_value_type(ty.dtype)
    vt = ir.VectorType(elt, width)
    if ty.dtype != types.float64:
        vec = builder.fptrunc(vec, vt)
    ary = context.make_array(ty)(context, builder, val)
    st = builder.store(vec, builder.bitcast(builder.gep(ary.data, [idx]), vt.as_pointer()), align=64)
    st.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))


def _float_arrays(*tys) -> bool:
    return all(isinstance(t, types.Array) and t.dtype in (types.float32, types.float64) for t in tys)


@intrinsic
def _nt_affine_line(typingctx, x, y, idx, mean, scale, beta, off):
    """``y = (x - mean) * scale + beta`` on one cache line of ``y`` from ``idx`` (64-byte
    aligned), in float64, the same operations in the same order as the scalar loops (so the same
    bits), stored non-temporally. ``mean``/``scale``/``beta``: floats, or float64 arrays read from
    ``off`` (one value per element of the line: the columns layout's channels)."""
    if not (_float_arrays(x, y) and x.dtype == y.dtype):
        return None

    def codegen(context, builder, sig, args):
        width = 64 // sig.args[0].dtype.bitwidth * 8
        d = _line_load(context, builder, sig.args[0], args[0], args[2])
        mu, sc, be = (_line_operand(context, builder, sig.args[i], args[i], args[6], width) for i in (3, 4, 5))
        r = builder.fadd(builder.fmul(builder.fsub(d, mu), sc), be)
        _line_store_nt(context, builder, sig.args[1], args[1], args[2], r)
        return context.get_dummy_value()

    return types.void(x, y, idx, mean, scale, beta, off), codegen


@intrinsic
def _nt_dx_line(typingctx, x, dy, dx, idx, mean, k, mdy, kx, off):
    """``dx = k * ((dy - mdy) - (x - mean) * kx)`` on one cache line (see :func:`_nt_affine_line`)."""
    if not (_float_arrays(x, dy, dx) and x.dtype == dy.dtype == dx.dtype):
        return None

    def codegen(context, builder, sig, args):
        width = 64 // sig.args[0].dtype.bitwidth * 8
        xv = _line_load(context, builder, sig.args[0], args[0], args[3])
        gv = _line_load(context, builder, sig.args[1], args[1], args[3])
        mu, kk, md, kxx = (_line_operand(context, builder, sig.args[i], args[i], args[8], width) for i in (4, 5, 6, 7))
        r = builder.fmul(kk, builder.fsub(builder.fsub(gv, md), builder.fmul(builder.fsub(xv, mu), kxx)))
        _line_store_nt(context, builder, sig.args[2], args[2], args[3], r)
        return context.get_dummy_value()

    return types.void(x, dy, dx, idx, mean, k, mdy, kx, off), codegen


@intrinsic
def _nt_scale_line(typingctx, dy, dx, idx, k, off):
    """``dx = dy * k`` on one cache line (see :func:`_nt_affine_line`)."""
    if not (_float_arrays(dy, dx) and dy.dtype == dx.dtype):
        return None

    def codegen(context, builder, sig, args):
        width = 64 // sig.args[0].dtype.bitwidth * 8
        gv = _line_load(context, builder, sig.args[0], args[0], args[2])
        kk = _line_operand(context, builder, sig.args[3], args[3], args[4], width)
        _line_store_nt(context, builder, sig.args[1], args[1], args[2], builder.fmul(gv, kk))
        return context.get_dummy_value()

    return types.void(dy, dx, idx, k, off), codegen


@intrinsic
def _store_fence(typingctx):
    """A full fence: this thread's non-temporal stores are globally visible before it goes on
    (they are weakly ordered; a thread ends its share of a kernel with this)."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


LANES = 16  # float64 accumulator lanes of the rows layout's sums (element j of a span -> lane j % 16)


def _vec_load(context, builder, ty, val, idx, width):
    """``width`` consecutive values of a float32/float64 array from element ``idx``, as float64."""
    elt = context.get_value_type(ty.dtype)
    vt = ir.VectorType(elt, width)
    ary = context.make_array(ty)(context, builder, val)
    v = builder.load(builder.bitcast(builder.gep(ary.data, [idx]), vt.as_pointer()), align=ty.dtype.bitwidth // 8)
    return v if ty.dtype == types.float64 else builder.fpext(v, ir.VectorType(ir.DoubleType(), width))


def _lane_loop_intrinsic(grad: bool):
    def impl(typingctx, x, dy, start, count, ref, a1, a2):
        if not (_float_arrays(x, dy, a1, a2) and x.dtype == dy.dtype and isinstance(ref, types.Float)
                and isinstance(start, types.Integer) and isinstance(count, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            width = LANES
            vd = ir.VectorType(ir.DoubleType(), width)
            i64 = ir.IntType(64)
            start_v = context.cast(builder, args[2], sig.args[2], types.uint64)
            count_v = context.cast(builder, args[3], sig.args[3], types.uint64)
            refv = _line_operand(context, builder, sig.args[4], args[4], None, width)
            p1 = builder.bitcast(context.make_array(sig.args[5])(context, builder, args[5]).data, vd.as_pointer())
            p2 = builder.bitcast(context.make_array(sig.args[6])(context, builder, args[6]).data, vd.as_pointer())
            init1 = builder.load(p1, align=8)
            init2 = builder.load(p2, align=8)
            pre = builder.block
            loop = builder.append_basic_block("lanes.loop")
            done = builder.append_basic_block("lanes.done")
            builder.cbranch(builder.icmp_unsigned(">", count_v, i64(0)), loop, done)
            builder.position_at_end(loop)
            i = builder.phi(i64)
            acc1 = builder.phi(vd)
            acc2 = builder.phi(vd)
            idx = builder.add(start_v, i)
            d = builder.fsub(_vec_load(context, builder, sig.args[0], args[0], idx, width), refv)
            if grad:
                g = _vec_load(context, builder, sig.args[1], args[1], idx, width)
                n1 = builder.fadd(acc1, g)
                n2 = builder.fadd(acc2, builder.fmul(g, d))
            else:
                n1 = builder.fadd(acc1, d)
                n2 = builder.fadd(acc2, builder.fmul(d, d))
            inext = builder.add(i, i64(width))
            end = builder.block
            i.add_incoming(i64(0), pre)
            i.add_incoming(inext, end)
            acc1.add_incoming(init1, pre)
            acc1.add_incoming(n1, end)
            acc2.add_incoming(init2, pre)
            acc2.add_incoming(n2, end)
            builder.cbranch(builder.icmp_unsigned("<", inext, count_v), loop, done)
            builder.position_at_end(done)
            r1 = builder.phi(vd)
            r1.add_incoming(init1, pre)
            r1.add_incoming(n1, end)
            r2 = builder.phi(vd)
            r2.add_incoming(init2, pre)
            r2.add_incoming(n2, end)
            builder.store(r1, p1, align=8)
            builder.store(r2, p2, align=8)
            return context.get_dummy_value()

        return types.void(x, dy, start, count, ref, a1, a2), codegen

    return intrinsic(impl)


# ``count`` (a multiple of LANES) values from ``start`` into the LANES-wide float64 accumulators
# ``a1[:LANES]``, ``a2[:LANES]`` (value j into lane j % LANES), held in vector registers for the
# whole loop (an element-wise loop over accumulator arrays keeps them in memory: about half the
# speed once the data is in cache):
#   sums:      d = x - ref:  a1 += d;  a2 += d * d          (``dy`` unused: pass ``x``)
#   grad sums: d = x - ref:  a1 += dy; a2 += dy * d
_lane_loop = _lane_loop_intrinsic(False)
_grad_lane_loop = _lane_loop_intrinsic(True)


@njit(**_JIT_SERIAL)
def _aligned_head(a, start, length):
    """How many elements from ``start`` until ``a``'s next 64-byte boundary (at most ``length``)."""
    size = uint64(a.itemsize)
    addr = uint64(a.ctypes.data) + uint64(start) * size
    head = ((uint64(64) - addr % uint64(64)) % uint64(64)) // size
    return min(head, uint64(length))


@njit(**_JIT_SERIAL)
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


@njit(**_JIT_SERIAL)
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


@njit(**_JIT_SERIAL)
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


@njit(**_JIT_SERIAL)
def _lane_total(a):
    s = 0.0
    for t in range(a.size):
        s += a[t]
    return s


@njit(**_JIT_SERIAL)
def _span_scalar(kind, x, dy, out, lo, hi, p0, p1, p2, p3):
    """Output values ``[lo, hi)`` one by one, in float64 with one rounding; ``kind`` and the
    operands as in :func:`_stream_line`: 0 ``y = (x - p0) * p1 + p2``, 1 ``dx = p1 * ((dy - p2) -
    (x - p0) * p3)``, 2 ``dx = x * p0`` (``x`` standing for ``dy``)."""
    if kind == 0:
        for j in range(uint64(lo), uint64(hi)):
            out[j] = (np.float64(x[j]) - p0) * p1 + p2
    elif kind == 1:
        for j in range(uint64(lo), uint64(hi)):
            out[j] = p1 * ((np.float64(dy[j]) - p2) - (np.float64(x[j]) - p0) * p3)
    else:
        for j in range(uint64(lo), uint64(hi)):
            out[j] = np.float64(x[j]) * p0


@njit(**_JIT_SERIAL)
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


@njit(**_JIT_SERIAL)
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


@njit(**_JIT_SERIAL)
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


@njit(**_JIT_SERIAL)
def _group_affine(x, y, ch0, g, n, c, s, mean, scale, beta, nch0, ng, stream):
    """``y = (x - mean[j]) * scale[j] + beta[j]`` over a group of channels, in memory order,
    prefetching the runs of the next group (``ng`` channels from ``nch0``; ``ng == 0``: none) in
    the order they will be summed. ``stream``: store ``y`` non-temporally (:data:`STREAM_FROM`)."""
    su = uint64(s)
    for i in range(uint64(n)):
        if ng > 0:
            _prefetch_runs(x, nch0, ng, i, i + 1, c, s)
        run = (i * uint64(c) + uint64(ch0)) * su
        for j in range(uint64(g)):
            span = run + j * su
            if stream:
                _span_write(0, True, x, x, y, span, su, mean[j], scale[j], beta[j], 0.0)
            else:  # inline: a call per short run (8x8 rows) costs the cached case about 2x
                mu = mean[j]
                sc = scale[j]
                be = beta[j]
                for q in range(span, span + su):
                    y[q] = (np.float64(x[q]) - mu) * sc + be


@njit(**_JIT_SERIAL)
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
                    _span_write(1, True, x, dy, dx, span, su, mean[j], kj, mdy[j], kx[j])
                else:
                    _span_write(2, True, dy, dy, dx, span, su, kj, 0.0, 0.0, 0.0)
            elif train:  # inline, as in _group_affine
                mu = mean[j]
                md = mdy[j]
                kxj = kx[j]
                for q in range(span, span + su):
                    dx[q] = kj * ((np.float64(dy[q]) - md) - (np.float64(x[q]) - mu) * kxj)
            else:
                for q in range(span, span + su):
                    dx[q] = np.float64(dy[q]) * kj


@njit(**_JIT_SERIAL)
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


@njit(**_JIT_SERIAL)
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


@njit(**_JIT_SERIAL)
def _cols_lines(out, r0, c):
    """True when rows ``[r0, ...)`` of ``out`` ``(M, C)`` are whole, 64-byte aligned cache lines
    (``C`` a multiple of a line, the block's start aligned): then they can be streamed."""
    return c % (64 // out.itemsize) == 0 and _aligned_head(out, uint64(r0) * uint64(c), 64) == 0


@njit(**_JIT_SERIAL)
def _stream_line(kind, x, dy, out, idx, p0, p1, p2, p3, ch):
    """One non-temporal output line of the columns layout, per-channel operands from ``ch``:
    ``kind`` 0 ``y = (x - p0) * p1 + p2``; 1 ``dx = p1 * ((dy - p2) - (x - p0) * p3)``;
    2 ``dx = x * p0`` (``x`` standing for ``dy``)."""
    if kind == 0:
        _nt_affine_line(x, out, idx, p0, p1, p2, ch)
    elif kind == 1:
        _nt_dx_line(x, dy, out, idx, p0, p1, p2, p3, ch)
    else:
        _nt_scale_line(x, out, idx, p0, ch)


@njit(**_JIT_SERIAL)
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


@njit(**_JIT_SERIAL)
def _cols_affine(x, y, r0, r1, c, mean, scale, beta, stream):
    """``y = (x - mean) * scale + beta`` over rows ``[r0, r1)``; ``stream``: whole cache lines of
    ``y`` stored non-temporally where the rows allow it (:func:`_cols_lines`)."""
    cu = uint64(c)
    if stream and _cols_lines(y, r0, c):
        _cols_stream(0, x, x, y, r0, r1, c, mean, scale, beta, beta)
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


@njit(**_JIT_SERIAL)
def _cols_dx(x, dy, dx, r0, r1, c, mean, k, mdy, kx, stream):
    cu = uint64(c)
    if stream and _cols_lines(dx, r0, c):
        _cols_stream(1, x, dy, dx, r0, r1, c, mean, k, mdy, kx)
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


@njit(**_JIT_SERIAL)
def _cols_scale(dy, dx, r0, r1, c, k, stream):
    cu = uint64(c)
    if stream and _cols_lines(dx, r0, c):
        _cols_stream(2, dy, dy, dx, r0, r1, c, k, k, k, k)
        return
    for r in range(uint64(r0), uint64(r1)):
        base = r * cu
        for ch in range(cu):
            dx[base + ch] = np.float64(dy[base + ch]) * k[ch]


@njit(**_JIT_SERIAL)
def _finish_stats(stats, ch, s1, s2, m, eps, shift):
    """Mean, biased variance and invstd of one channel from its shifted float64 sums."""
    d = s1 / m
    var = s2 / m - d * d  # shifted one-pass: both terms are O(spread^2), nothing cancels badly
    if var < 0.0:
        var = 0.0
    stats[0, ch] = shift + d
    stats[1, ch] = var
    stats[2, ch] = 1.0 / math.sqrt(var + eps)


@njit(**_JIT_SERIAL)
def _count_nonfinite(stats):
    bad = 0
    for ch in range(stats.shape[1]):
        if not (math.isfinite(stats[0, ch]) and math.isfinite(stats[1, ch])):
            bad += 1
    return bad


@njit(**_JIT_SERIAL)
def _num_blocks(m, c, nt):
    """Blocks of rows for the columns layout: one per thread, fewer for tiny inputs."""
    nb = (m * c) // 4096
    if nb > nt:
        nb = nt
    if nb < 1:
        nb = 1
    return nb


@njit(**_JIT_SERIAL)
def _lane_pair():
    """Two zeroed float64 lane accumulators, 64 bytes apart (no 4K aliasing between them)."""
    acc = np.zeros(2 * LANES + 8)
    return acc[:LANES], acc[LANES + 8:]


# ----------------------------------------------------------------------------------------------
# rows layout: x flat of length n * c * s, (N, C, S) in memory order


@njit(**_JIT)
def rows_forward_train(x, y, w, b, has_w, has_b, n, c, s, eps, stats, nt, g, pf, stream):
    """Training forward, rows layout. Fills ``stats``, writes ``y``; returns the number of
    channels whose mean or variance is non-finite. ``g > 0``: tasks of ``g`` channels;
    ``g == 0``: tasks of single rows (few channels)."""
    m = n * s
    if g > 0:
        # split over groups of channels, a contiguous block of groups per thread: a thread sums
        # a group, then normalizes it from its own cache while prefetching its next group; a
        # group's rows of one sample are one contiguous run of memory
        ngrp = (c + g - 1) // g
        for t in prange(nt):
            lo = t * ngrp // nt
            hi = (t + 1) * ngrp // nt
            acc = np.zeros((g, 2, LANES + 8))  # + 8: no 4K aliasing between the two lane rows
            tail = np.zeros((g, 2))
            kv = np.empty(g)
            mean = np.empty(g)
            scale = np.empty(g)
            beta = np.empty(g)
            for grp in range(lo, hi):
                ch0 = grp * g
                gg = min(g, c - ch0)
                acc[:] = 0.0
                tail[:] = 0.0
                for j in range(gg):
                    kv[j] = np.float64(x[(ch0 + j) * s])  # shift: the channel's first sample
                _group_sums(x, ch0, gg, n, c, s, kv, acc, tail, pf)
                for j in range(gg):
                    ch = ch0 + j
                    _finish_stats(stats, ch, tail[j, 0] + _lane_total(acc[j, 0, :LANES]),
                                  tail[j, 1] + _lane_total(acc[j, 1, :LANES]), m, eps, kv[j])
                    mean[j] = stats[0, ch]
                    scale[j] = stats[2, ch] * (np.float64(w[ch]) if has_w else 1.0)
                    beta[j] = np.float64(b[ch]) if has_b else 0.0
                nxt = ch0 + g
                ng = min(g, c - nxt) if (pf and grp + 1 < hi) else 0
                _group_affine(x, y, ch0, gg, n, c, s, mean, scale, beta, nxt, ng, stream)
            if stream:
                _store_fence()
    else:
        # split over rows: each (n, c) row writes its own partial sums, (N*C,) -> (C,) after
        part = np.empty((2, n * c))
        for r in prange(n * c):
            a1, a2 = _lane_pair()
            t1, t2 = _lane_sums(x, r * s, s, np.float64(x[(r % c) * s]), a1, a2)
            part[0, r] = t1 + _lane_total(a1)
            part[1, r] = t2 + _lane_total(a2)
        for ch in range(c):
            s1 = 0.0
            s2 = 0.0
            for i in range(n):
                s1 += part[0, i * c + ch]
                s2 += part[1, i * c + ch]
            _finish_stats(stats, ch, s1, s2, m, eps, np.float64(x[ch * s]))
        for r in prange(n * c):
            ch = r % c
            scale = stats[2, ch] * (np.float64(w[ch]) if has_w else 1.0)
            beta = np.float64(b[ch]) if has_b else 0.0
            _span_write(0, stream, x, x, y, r * s, s, stats[0, ch], scale, beta, 0.0)
            if stream:
                _store_fence()
    return _count_nonfinite(stats)


@njit(**_JIT)
def rows_forward_eval(x, y, w, b, has_w, has_b, n, c, s, stats, nt):
    """Eval forward, rows layout: normalize with ``stats`` (mean in row 0, invstd in row 2)."""
    for r in prange(n * c):
        ch = r % c
        scale = stats[2, ch] * (np.float64(w[ch]) if has_w else 1.0)
        beta = np.float64(b[ch]) if has_b else 0.0
        _span_write(0, False, x, x, y, r * s, s, stats[0, ch], scale, beta, 0.0)


@njit(**_JIT)
def rows_backward(x, dy, dx, w, has_w, n, c, s, stats, grads, train, nt, g, pf, stream):
    """Backward, rows layout. ``grads[0]`` receives dbias, ``grads[1]`` dweight (summed in float64).

    Training, per channel with M values, xhat = (x - mean) * invstd, g = gamma (or 1):
        dbias   = sum(dy)
        dweight = sum(dy * xhat) = invstd * sum(dy * (x - mean))
        dx      = g * invstd / M * (M * dy - dbias - xhat * dweight)
                = g * invstd * ((dy - dbias / M) - (x - mean) * (invstd * dweight / M))
    (the derivation, step by step, is in :func:`bnlab.reference.batch_norm_backward`).
    Eval, the statistics being constants: dx = g * invstd * dy.
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
            for grp in range(lo, hi):
                ch0 = grp * g
                gg = min(g, c - ch0)
                acc[:] = 0.0
                tail[:] = 0.0
                for j in range(gg):
                    mean[j] = stats[0, ch0 + j]
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
                _group_dx(x, dy, dx, ch0, gg, n, c, s, mean, k, mdy, kx, train, stream, pf)
            if stream:
                _store_fence()
    else:
        part = np.empty((2, n * c))
        for r in prange(n * c):
            a1, a2 = _lane_pair()
            t1, t2 = _lane_grad_sums(x, dy, r * s, s, stats[0, r % c], a1, a2)
            part[0, r] = t1 + _lane_total(a1)
            part[1, r] = t2 + _lane_total(a2)
        tot = np.empty((2, c))  # (N*C,) -> (C,), float64 whatever the dtype of grads
        for ch in range(c):
            s1 = 0.0
            s2 = 0.0
            for i in range(n):
                s1 += part[0, i * c + ch]
                s2 += part[1, i * c + ch]
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
            if train:
                _span_write(1, stream, x, dy, dx, r * s, s, stats[0, ch], k, mdy, kx)
            else:
                _span_write(2, stream, dy, dy, dx, r * s, s, k, 0.0, 0.0, 0.0)
            if stream:
                _store_fence()


# ----------------------------------------------------------------------------------------------
# columns layout: x flat of length m * c, (M, C) in memory order


@njit(**_JIT_SERIAL)
def _block_sums(nb, c):
    """Zeroed per-block partial sums ``(nb, 2, C + 8)`` (padded: no 4K aliasing between rows)."""
    return np.zeros((nb, 2, c + 8))


@njit(**_JIT)
def cols_forward_train(x, y, w, b, has_w, has_b, m, c, eps, stats, nt, stream):
    """Training forward, columns layout. Fills ``stats``, writes ``y``; returns the number of
    channels whose mean or variance is non-finite."""
    nb = _num_blocks(m, c, nt)
    part = _block_sums(nb, c)
    shift = np.empty(c)
    for ch in range(c):
        shift[ch] = np.float64(x[ch])  # shift: the channel's first sample
    for blk in prange(nb):
        _cols_sums(x, blk * m // nb, (blk + 1) * m // nb, c, shift, part[blk, 0], part[blk, 1])
    mean = np.empty(c)
    scale = np.empty(c)
    beta = np.empty(c)
    for ch in range(c):
        s1 = 0.0
        s2 = 0.0
        for blk in range(nb):  # (nb, C) -> (C,)
            s1 += part[blk, 0, ch]
            s2 += part[blk, 1, ch]
        _finish_stats(stats, ch, s1, s2, m, eps, shift[ch])
        mean[ch] = stats[0, ch]
        scale[ch] = stats[2, ch] * (np.float64(w[ch]) if has_w else 1.0)
        beta[ch] = np.float64(b[ch]) if has_b else 0.0
    for blk in prange(nb):
        _cols_affine(x, y, blk * m // nb, (blk + 1) * m // nb, c, mean, scale, beta, stream)
    return _count_nonfinite(stats)


@njit(**_JIT)
def cols_forward_eval(x, y, w, b, has_w, has_b, m, c, stats, nt):
    """Eval forward, columns layout."""
    nb = _num_blocks(m, c, nt)
    mean = np.empty(c)
    scale = np.empty(c)
    beta = np.empty(c)
    for ch in range(c):
        mean[ch] = stats[0, ch]
        scale[ch] = stats[2, ch] * (np.float64(w[ch]) if has_w else 1.0)
        beta[ch] = np.float64(b[ch]) if has_b else 0.0
    for blk in prange(nb):
        _cols_affine(x, y, blk * m // nb, (blk + 1) * m // nb, c, mean, scale, beta, False)


@njit(**_JIT)
def cols_backward(x, dy, dx, w, has_w, m, c, stats, grads, train, nt, stream):
    """Backward, columns layout; the formulas of :func:`rows_backward`."""
    nb = _num_blocks(m, c, nt)
    part = _block_sums(nb, c)
    mean = np.empty(c)
    for ch in range(c):
        mean[ch] = stats[0, ch]
    for blk in prange(nb):
        _cols_grad_sums(x, dy, blk * m // nb, (blk + 1) * m // nb, c, mean, part[blk, 0], part[blk, 1])
    k = np.empty(c)
    mdy = np.empty(c)
    kx = np.empty(c)
    for ch in range(c):
        s1 = 0.0
        s2 = 0.0
        for blk in range(nb):  # (nb, C) -> (C,)
            s1 += part[blk, 0, ch]
            s2 += part[blk, 1, ch]
        invstd = stats[2, ch]
        grads[0, ch] = s1
        grads[1, ch] = s2 * invstd
        k[ch] = invstd * (np.float64(w[ch]) if has_w else 1.0)
        mdy[ch] = s1 / m
        kx[ch] = invstd * invstd * s2 / m
    for blk in prange(nb):
        if train:
            _cols_dx(x, dy, dx, blk * m // nb, (blk + 1) * m // nb, c, mean, k, mdy, kx, stream)
        else:
            _cols_scale(dy, dx, blk * m // nb, (blk + 1) * m // nb, c, k, stream)


@njit(**_JIT_SERIAL)
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


# ----------------------------------------------------------------------------------------------
# tensor adapters: layout detection and zero-copy numpy views


def layout(x: Tensor) -> int:
    """ROWS, COLUMNS, or 0 when ``x`` is neither (odd strides: the caller makes it contiguous)."""
    if x.is_contiguous():
        if x.dim() == 2 or x.numel() == x.shape[0] * x.shape[1]:
            return COLUMNS  # (M, C), or spatial size 1: the channels are the innermost run
        return ROWS
    d = x.dim()
    if d == 4:
        return COLUMNS if x.is_contiguous(memory_format=torch.channels_last) else 0
    if d == 5:
        return COLUMNS if x.is_contiguous(memory_format=torch.channels_last_3d) else 0
    if d == 3:
        return COLUMNS if x.transpose(1, 2).is_contiguous() else 0
    return 0


_DUMMY = {torch.float32: np.zeros(1, np.float32), torch.float64: np.zeros(1, np.float64)}
_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def _group(n: int, c: int, s: int, nt: int, itemsize: int) -> int:
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
    f = kernel.py_func
    g = types_.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__ + "_serial"
    g.__module__ = f.__module__
    g.__doc__ = f"Serial twin of :func:`{f.__name__}` (used in a forked child)."
    return njit(**_JIT_SERIAL)(g)


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


# A plan per (shape, strides, dtype, threads): the layout and loop parameters, worked out once.
# Small-shape steps are dominated by the Python around the kernels, so the hot path looks up a
# tuple instead of re-deriving it.
_PLANS: dict = {}


def _make_plan(x: Tensor, pool: int) -> tuple:
    lay = layout(x)
    dense = lay != 0
    shape = x.shape
    c = shape[1]
    if not dense:  # computed on x.contiguous(): rows, or columns when the spatial size is 1
        lay = COLUMNS if x.dim() == 2 or x.numel() == shape[0] * c else ROWS
    if lay == ROWS:
        n = shape[0]
        s = x.numel() // (n * c)
    else:
        n, s = x.numel() // c, 1
    serial = pool > 1 and n * c * s < SERIAL_BELOW
    nt = 1 if serial else pool
    perm = _TO_LAST[x.dim()] if lay == COLUMNS and x.dim() > 2 else None
    g = _group(n, c, s, nt, x.element_size()) if lay == ROWS else 0
    nbytes = x.numel() * x.element_size()
    pf = g > 0 and nbytes >= PREFETCH_FROM
    stream = nbytes >= STREAM_FROM
    return lay, n, c, s, perm, g, serial, nt, dense, pf, stream


def _plan(x: Tensor, pool: int) -> tuple:
    """``(layout, n, c, s, perm, g, serial, nt, dense, pf, stream)`` for a non-empty ``x``: ``(n, c, s)``
    are the rows layout's (N, C, prod(spatial)) or the columns layout's (M, C, 1); ``perm`` moves
    the channels last in a numpy view; ``serial``: run on one thread; ``dense``: no copy needed;
    ``pf``: the rows-layout training forward prefetches (:data:`PREFETCH_FROM`); ``stream``: the
    training passes store their output non-temporally (:data:`STREAM_FROM`)."""
    key = (x.shape, x.stride(), x.dtype, pool)
    p = _PLANS.get(key)
    if p is None:
        if len(_PLANS) >= 1024:
            _PLANS.clear()
        p = _PLANS[key] = _make_plan(x, pool)
    return p


def forward_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """Training forward of a CPU float32/float64 tensor ``(N, C, *)``.

    Returns ``(y, stats, nbad)``: ``y`` with the strides ``torch.empty_like(x)`` gives, ``stats``
    a float64 ``(3, C)`` ndarray (mean, biased variance, invstd), ``nbad`` the number of channels
    with a non-finite mean or variance. An empty batch gives mean 0 and variance 0, as
    :func:`bnlab.reference.batch_stats` does.
    """
    if x.numel() == 0:
        stats = np.zeros((3, x.shape[1]))
        stats[2] = 1.0 / math.sqrt(eps)
        return torch.empty_like(x), stats, 0
    lay, n, c, s, perm, g, serial, nt, dense, pf, stream = _plan(x, threads())
    xd = x if dense else x.contiguous()
    y = torch.empty_like(xd)
    xa = xd.numpy(force=True)
    ya = y.numpy()
    if perm is not None:
        xa = xa.transpose(perm)
        ya = ya.transpose(perm)
    xa = xa.reshape(-1)
    ya = ya.reshape(-1, copy=False)  # never a copy: the kernel writes through it
    if weight is None:
        w, has_w = _DUMMY[x.dtype], False
    else:
        w, has_w = weight.numpy(force=True), True
    if bias is None:
        b, has_b = _DUMMY[x.dtype], False
    else:
        b, has_b = bias.numpy(force=True), True
    stats = np.empty((3, c))
    k = _kernels
    prev = _enter(nt)
    try:
        if lay == ROWS:
            nbad = k.rows_forward_train(xa, ya, w, b, has_w, has_b, n, c, s, eps, stats, nt, g, pf, stream)
        else:
            nbad = k.cols_forward_train(xa, ya, w, b, has_w, has_b, n, c, eps, stats, nt, stream)
    finally:
        if prev:
            _set_threads(prev)
    if not dense:
        y = torch.empty_like(x).copy_(y)
    return y, stats, nbad


def forward_eval(x: Tensor, weight: Tensor | None, bias: Tensor | None, stats: np.ndarray) -> Tensor:
    """Eval forward: normalize with ``stats`` (float64 ``(3, C)``; rows 0 and 2 are read)."""
    if x.numel() == 0:
        return torch.empty_like(x)
    lay, n, c, s, perm, g, serial, nt, dense, pf, stream = _plan(x, threads())
    xd = x if dense else x.contiguous()
    y = torch.empty_like(xd)
    xa = xd.numpy(force=True)
    ya = y.numpy()
    if perm is not None:
        xa = xa.transpose(perm)
        ya = ya.transpose(perm)
    xa = xa.reshape(-1)
    ya = ya.reshape(-1, copy=False)
    w, has_w = (_DUMMY[x.dtype], False) if weight is None else (weight.numpy(force=True), True)
    b, has_b = (_DUMMY[x.dtype], False) if bias is None else (bias.numpy(force=True), True)
    k = _kernels
    prev = _enter(nt)
    try:
        if lay == ROWS:
            k.rows_forward_eval(xa, ya, w, b, has_w, has_b, n, c, s, stats, nt)
        else:
            k.cols_forward_eval(xa, ya, w, b, has_w, has_b, n, c, stats, nt)
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


@njit(**_JIT_SERIAL)
def _fill_eval_stats(rm, rv, eps, stats):
    for ch in range(stats.shape[1]):
        v = np.float64(rv[ch])
        stats[0, ch] = np.float64(rm[ch])
        stats[1, ch] = v
        stats[2, ch] = 1.0 / math.sqrt(v + eps)


def eval_stats(running_mean: Tensor, running_var: Tensor, eps: float) -> np.ndarray:
    """float64 ``(3, C)`` statistics from running buffers: mean, variance, ``1 / sqrt(var + eps)``
    (one numba call; the buffers are read in place when they are CPU float32/float64)."""
    stats = np.empty((3, running_mean.shape[0]))
    _fill_eval_stats(_as_f64(running_mean), _as_f64(running_var), float(eps), stats)
    return stats


def backward(dy: Tensor, x: Tensor, weight: Tensor | None, stats: np.ndarray, train: bool):
    """Backward of :func:`forward_train` (``train``) or :func:`forward_eval`.

    Returns ``(dx, grads)``: ``dx`` with the strides of ``torch.empty_like(x)``, ``grads`` a
    ``(2, C)`` ndarray (dbias, dweight) in the weight's dtype (float64 without a weight).
    """
    c = x.shape[1]
    gdtype = np.float64 if weight is None else _NP_DTYPE.get(weight.dtype, np.float64)
    if x.numel() == 0:
        return torch.empty_like(x), np.zeros((2, c), gdtype)
    lay, n, c, s, perm, g, serial, nt, dense, pf, stream = _plan(x, threads())
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
    w, has_w = (_DUMMY[x.dtype], False) if weight is None else (weight.numpy(force=True), True)
    grads = np.empty((2, c), gdtype)
    k = _kernels
    prev = _enter(nt)
    try:
        if lay == ROWS:
            k.rows_backward(xa, ga, da, w, has_w, n, c, s, stats, grads, train, nt, g, pf, stream)
        else:
            k.cols_backward(xa, ga, da, w, has_w, n, c, stats, grads, train, nt, stream)
    finally:
        if prev:
            _set_threads(prev)
    if not dense:
        dx = torch.empty_like(x).copy_(dx)
    return dx, grads


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
