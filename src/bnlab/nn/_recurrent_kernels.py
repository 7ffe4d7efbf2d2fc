"""Whole-sequence CPU kernels of the normalized recurrent layers (numba), forward and backward.

One call runs the whole time loop of one layer and direction: per step the recurrent matmul
(BLAS ``?gemm`` called from compiled code, no Python in the loop), the normalizations of the
three sites, the gate nonlinearities and the state update; the backward is the hand-derived
backpropagation through time over the values the forward saved. :mod:`bnlab.nn.recurrent` wraps
the two in an autograd Function and checks them against its reference time loop (plain torch
ops, per-step :class:`bnlab.nn.SequenceBatchNorm`).

**Sites.** The LSTM computes ``pre = N_x(W_ih x_t) + N_h(W_hh h_{t-1})`` (gate bias in ``N_x``'s
shift), ``c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g)`` and ``h_t = sigmoid(o) tanh(N_c(c_t))``
(times ``W_hr`` with a projection); the GRU ``r, z = sigmoid(x_rz + h_rz)``,
``n = tanh(x_n + r h_n)``, ``h_t = n + z (h_{t-1} - n)`` with ``x = N_x(W_ih x_t)`` (plus
``b_ih``) and ``h = N_h(W_hh h_{t-1}) + b_hh``; the Elman RNN ``h_t = act(N_x(..) + N_h(..))``.
Gates are in torch's order (LSTM i, f, g, o; GRU r, z, n). Each site's normalization is chosen
per step (``kinds[t]``):

* ``NONE``: identity (plus the site's shift);
* ``BATCH``: batch normalization with the statistics of the step's rows (training);
* ``FIXED``: normalization with given per-step statistics (eval, or a training step with a
  single row, which has no batch statistics);
* ``ROW``: layer normalization of each row.

**Numerics** (as :mod:`bnlab.reference`): statistics in float64, the mean shifted by the step's
first row, the variance from ``x - mean`` formed directly (two passes over the step's rows, which
are in cache), biased variance to normalize, ``invstd = 1 / sqrt(var + eps)``. Pointwise math is
float64, rounded once to the data dtype where stored. The matmuls run in the data dtype. ``exp``,
``sigmoid`` and ``tanh`` are written out (Cody-Waite reduction, degree-13 polynomial, float64
round-off) so that they vectorize; numba's libm calls do not.

**Layout.** The recurrence works on packed rows: step ``t`` has ``bs[t]`` rows (non-increasing:
sequences sorted by length), at internal offset ``off[t]``. Inputs and outputs outside the kernel
are flat arrays addressed by ``base[t] + i * stride + j`` (row ``i`` of step ``t``, feature
``j``): batch-major, time-major, packed and one direction's half of a bidirectional buffer are
all read and written in place. ``rev=1`` runs the steps from last to first (the reverse direction
of a bidirectional layer): sequences join as their last step comes up, from ``h0``.

**Matrix products** (:func:`gemm`): a register-blocked micro-kernel written in LLVM vector IR (4
rows of A by 4 vectors of B and C held in registers across the k loop, ``llvm.fma``), 64-byte vectors
where the CPU has AVX-512, 32-byte ones elsewhere. On the 2-core AMD machines this project is
measured on it runs at about 2.4 times the float32 speed of the BLAS torch calls for these shapes
(MKL takes its AVX2 code path on AMD CPUs), and needs no BLAS at all.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import intrinsic, overload

__all__ = ["NONE", "BATCH", "FIXED", "ROW", "LSTM", "GRU", "RNN_TANH", "RNN_RELU", "gemm", "forward", "backward",
           "weight_grad", "moments", "vector_math", "VECTOR_BYTES"]

NONE, BATCH, FIXED, ROW = 0, 1, 2, 3
LSTM, GRU, RNN_TANH, RNN_RELU = 0, 1, 2, 3

_OPTS = dict(nogil=True, cache=True, error_model="numpy", fastmath=False)


# ------------------------------------------------------------------------------------------------
# matrix products: a register-blocked micro-kernel in LLVM vector IR

def _vector_bytes() -> int:
    """64 (AVX-512: 32 vector registers) or 32 bytes per vector, from the host CPU numba compiles for."""
    try:
        from llvmlite import binding as llvm

        features = llvm.get_host_cpu_features()
        return 64 if features.get("avx512f", False) else 32
    except Exception:  # pragma: no cover - unknown host: the smaller vectors lower everywhere
        return 32


VECTOR_BYTES = _vector_bytes()
_KC = 256  # rows of B per pass (the B panel stays in cache)


def _make_kernel(R: int, NV: int, trans_a: bool):
    """An intrinsic ``c[R, NV*VL] (+)= a[R, k] @ b[k, NV*VL]`` for one block: R rows of A
    (row-major, or its transpose with ``trans_a``: element (r, kk) at ``a_off + kk * lda + r``),
    NV vectors of VL elements of B and C, ``R * NV`` accumulators in registers across the k loop
    (``llvm.fma``: one rounding per multiply-add). ``k >= 1``."""

    @intrinsic
    def kernel(typingctx, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, k, accumulate):
        dt = c.dtype
        sig = types.void(a, a_off, lda, b, b_off, ldb, c, c_off, ldc, k, accumulate)

        def codegen(context, builder, signature, args):
            a_v, a_off_v, lda_v, b_v, b_off_v, ldb_v, c_v, c_off_v, ldc_v, k_v, acc_v = args
            tys = signature.args
            fl = context.get_value_type(dt)
            VL = VECTOR_BYTES // (4 if dt == types.float32 else 8)
            vt = ir.VectorType(fl, VL)
            i64 = ir.IntType(64)

            def as64(v, ty):
                return context.cast(builder, v, ty, types.int64)

            def base(arr, ty, off, off_ty):
                return builder.gep(context.make_array(ty)(context, builder, arr).data, [as64(off, off_ty)])

            pa = base(a_v, tys[0], a_off_v, tys[1])
            pb = base(b_v, tys[3], b_off_v, tys[4])
            pc = base(c_v, tys[6], c_off_v, tys[7])
            lda, ldb, ldc, kend = as64(lda_v, tys[2]), as64(ldb_v, tys[5]), as64(ldc_v, tys[8]), as64(k_v, tys[9])
            name = "llvm.fma.v%d%s" % (VL, "f32" if dt == types.float32 else "f64")
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]), name)
            zero = ir.Constant(vt, None)
            undef = ir.Constant(vt, ir.Undefined)
            splat = ir.Constant(ir.VectorType(ir.IntType(32), VL), [0] * VL)
            entry = builder.basic_block
            loop = builder.append_basic_block("mk.loop")
            done = builder.append_basic_block("mk.done")
            builder.branch(loop)
            builder.position_at_end(loop)
            kk = builder.phi(i64)
            kk.add_incoming(ir.Constant(i64, 0), entry)
            accs = [[builder.phi(vt) for _ in range(NV)] for _ in range(R)]
            for row in accs:
                for phi in row:
                    phi.add_incoming(zero, entry)
            brow = builder.gep(pb, [builder.mul(kk, ldb)])
            bvs = [builder.load(builder.bitcast(builder.gep(brow, [ir.Constant(i64, v * VL)]), vt.as_pointer()),
                                align=4) for v in range(NV)]
            new = []
            for r in range(R):
                if trans_a:
                    ap = builder.gep(pa, [builder.add(builder.mul(kk, lda), ir.Constant(i64, r))])
                else:
                    ap = builder.gep(pa, [builder.add(builder.mul(ir.Constant(i64, r), lda), kk)])
                one = builder.insert_element(undef, builder.load(ap), ir.Constant(ir.IntType(32), 0))
                sv = builder.shuffle_vector(one, undef, splat)
                new.append([builder.call(fma, [sv, bvs[v], accs[r][v]]) for v in range(NV)])
            kk1 = builder.add(kk, ir.Constant(i64, 1))
            kk.add_incoming(kk1, loop)
            for r in range(R):
                for v in range(NV):
                    accs[r][v].add_incoming(new[r][v], loop)
            builder.cbranch(builder.icmp_signed("<", kk1, kend), loop, done)
            builder.position_at_end(done)
            add = context.cast(builder, acc_v, tys[10], types.boolean)
            for r in range(R):
                crow = builder.gep(pc, [builder.mul(ir.Constant(i64, r), ldc)])
                for v in range(NV):
                    cp = builder.bitcast(builder.gep(crow, [ir.Constant(i64, v * VL)]), vt.as_pointer())
                    val = builder.select(add, builder.fadd(builder.load(cp, align=4), new[r][v]), new[r][v])
                    builder.store(val, cp, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


_K44, _K14, _K41, _K11 = (_make_kernel(r, v, False) for r, v in ((4, 4), (1, 4), (4, 1), (1, 1)))
_T44, _T14, _T41, _T11 = (_make_kernel(r, v, True) for r, v in ((4, 4), (1, 4), (4, 1), (1, 1)))


@njit(**_OPTS)
def gemm(A, a_off, trans_a, B, C, c_off, m, n, k, accumulate):
    """``C (+)= op(A) @ B[:k, :n]`` for 2-D C-contiguous arrays: op(A) is the ``m x k`` block of A
    starting at flat element ``a_off`` (row-major: element (i, kk) at ``a_off + i * lda + kk``;
    ``trans_a``: at ``a_off + kk * lda + i``, ``lda = A.shape[1]``), and C's ``m x n`` block starts
    at flat element ``c_off`` (a whole number of rows)."""
    lda = A.shape[1]
    ldb = B.shape[1]
    ldc = C.shape[1]
    c_row = c_off // ldc
    if k == 0:
        if not accumulate:
            for i in range(m):
                c = C[c_row + i]
                for j in range(n):
                    c[j] = 0.0
        return
    VL = VECTOR_BYTES // C.itemsize
    BN = 4 * VL
    n4 = n - n % BN
    n1 = n - n % VL
    m4 = m - m % 4
    Af = A.reshape(-1)
    for k0 in range(0, k, _KC):
        kc = min(_KC, k - k0)
        acc = accumulate or k0 > 0
        ao = a_off + (k0 * lda if trans_a else k0)
        bo = k0 * ldb
        for j in range(0, n4, BN):
            for i in range(0, m4, 4):
                if trans_a:
                    _T44(A, ao + i, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
                else:
                    _K44(A, ao + i * lda, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
            for i in range(m4, m):
                if trans_a:
                    _T14(A, ao + i, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
                else:
                    _K14(A, ao + i * lda, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
        for j in range(n4, n1, VL):
            for i in range(0, m4, 4):
                if trans_a:
                    _T41(A, ao + i, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
                else:
                    _K41(A, ao + i * lda, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
            for i in range(m4, m):
                if trans_a:
                    _T11(A, ao + i, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
                else:
                    _K11(A, ao + i * lda, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
        for i in range(m):  # columns past the last whole vector
            c = C[c_row + i]
            for j in range(n1, n):
                s = 0.0
                for q in range(kc):
                    e = ao + (q * lda + i if trans_a else i * lda + q)
                    s += Af[e] * B[k0 + q, j]
                c[j] = c[j] + s if acc else s


# ------------------------------------------------------------------------------------------------
# exp, sigmoid, tanh that vectorize (float64, ~1e-16 relative)

@intrinsic
def _i2f(typingctx, i):
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@intrinsic
def _f2i(typingctx, f):
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_ROUND = 6755399441055744.0  # 1.5 * 2**52: x + _ROUND - _ROUND rounds x to an integer
_SMALL = 0.17328679513998632  # |x| below which tanh uses expm1(-2|x|) directly


@njit(inline="always")
def _expm1_poly(r):
    """``exp(r) - 1`` for ``|r| <= ln(2) / 2``: Taylor to degree 13 (truncation < 2e-16)."""
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    return (p * r) * r + r


@njit(inline="always")
def _exp(x):
    x = -708.0 if x < -708.0 else x  # comparisons are false for nan: nan passes through
    x = 709.0 if x > 709.0 else x
    t = x * _INV_LN2 + _ROUND
    k = t - _ROUND
    r = (x - k * _LN2_HI) - k * _LN2_LO
    s = _i2f((_f2i(t) - _f2i(_ROUND) + 1023) << 52)
    return s + s * _expm1_poly(r)


@njit(inline="always")
def _sigmoid(x):
    return 1.0 / (1.0 + _exp(-x))


@njit(inline="always")
def _tanh(x):
    a = abs(x)
    u = -2.0 * a
    e_small = _expm1_poly(u)
    e_large = _exp(u) - 1.0
    em = e_small if a < _SMALL else e_large
    t = -em / (em + 2.0)
    return -t if x < 0 else t


@intrinsic
def _i2f32(typingctx, i):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _f2i32(typingctx, f):
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


# float32 twins (for float32 data, as torch computes its gates): every constant a float32, so that
# nothing promotes; degree-7 Taylor for expm1 on |r| <= ln(2)/2 (truncation < 6e-9); measured
# against float64: exp <= 1 ulp, sigmoid and tanh <= 2.5 ulp of float32
_F = np.float32
_LN2_HI32, _LN2_LO32, _INV_LN2_32 = _F(0.693145751953125), _F(1.428606765330187045e-06), _F(1.44269504088896341)
_ROUND32 = _F(12582912.0)  # 1.5 * 2**23
_E2, _E3, _E4, _E5, _E6, _E7 = _F(1 / 2), _F(1 / 6), _F(1 / 24), _F(1 / 120), _F(1 / 720), _F(1 / 5040)
_LO32, _HI32, _SMALL32 = _F(-87.0), _F(88.0), _F(_SMALL)
_ONE32, _TWO32, _ZERO32 = _F(1.0), _F(2.0), _F(0.0)


@njit(inline="always")
def _expm1_poly32(r):
    p = _E7
    p = p * r + _E6
    p = p * r + _E5
    p = p * r + _E4
    p = p * r + _E3
    p = p * r + _E2
    return (p * r) * r + r


@njit(inline="always")
def _exp32(x):
    x = _LO32 if x < _LO32 else x
    x = _HI32 if x > _HI32 else x
    t = x * _INV_LN2_32 + _ROUND32
    k = t - _ROUND32
    r = (x - k * _LN2_HI32) - k * _LN2_LO32
    s = _i2f32((_f2i32(t) - _f2i32(_ROUND32) + np.int32(127)) << np.int32(23))
    return s + s * _expm1_poly32(r)


@njit(inline="always")
def _sigmoid32(x):
    return _ONE32 / (_ONE32 + _exp32(-x))


@njit(inline="always")
def _tanh32(x):
    a = abs(x)
    u = -_TWO32 * a
    e_small = _expm1_poly32(u)
    e_large = _exp32(u) - _ONE32
    em = e_small if a < _SMALL32 else e_large
    t = -em / (em + _TWO32)
    return -t if x < _ZERO32 else t


def _sig(x):  # typed by its argument: float32 math for float32, float64 for float64
    raise NotImplementedError


def _th(x):
    raise NotImplementedError


@overload(_sig, inline="always")
def _sig_impl(x):
    if x == types.float32:
        return lambda x: _sigmoid32(x)
    return lambda x: _sigmoid(x)


@overload(_th, inline="always")
def _th_impl(x):
    if x == types.float32:
        return lambda x: _tanh32(x)
    return lambda x: _tanh(x)


@njit(**_OPTS)
def _vector_math(x, which):
    """``exp`` (0), ``sigmoid`` (1) or ``tanh`` (2) of a float32 or float64 array (for tests)."""
    y = np.empty_like(x)
    for i in range(x.size):
        if which == 0:
            y[i] = _exp32(x[i]) if x.itemsize == 4 else _exp(x[i])
        elif which == 1:
            y[i] = _sig(x[i])
        else:
            y[i] = _th(x[i])
    return y


# ------------------------------------------------------------------------------------------------
# Loops are written over 1-D row views indexed from 0 (``r = X[i]; r[j]``): numba's negative-index
# wraparound on an index it cannot prove non-negative (``X[o0 + i, 3 * H + j]``) keeps LLVM from
# vectorizing; row sums use 8 accumulators (a fixed order, no fastmath) so that they vectorize too.

@njit(inline="always")
def _sum_dev(v, n, s):
    """``sum_j (v[j] - s)`` and ``sum_j (v[j] - s)^2`` for ``j < n``, float64."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    q0 = q1 = q2 = q3 = q4 = q5 = q6 = q7 = 0.0
    m = n - n % 8
    for j in range(0, m, 8):
        d0 = np.float64(v[j]) - s
        d1 = np.float64(v[j + 1]) - s
        d2 = np.float64(v[j + 2]) - s
        d3 = np.float64(v[j + 3]) - s
        d4 = np.float64(v[j + 4]) - s
        d5 = np.float64(v[j + 5]) - s
        d6 = np.float64(v[j + 6]) - s
        d7 = np.float64(v[j + 7]) - s
        a0 += d0
        a1 += d1
        a2 += d2
        a3 += d3
        a4 += d4
        a5 += d5
        a6 += d6
        a7 += d7
        q0 += d0 * d0
        q1 += d1 * d1
        q2 += d2 * d2
        q3 += d3 * d3
        q4 += d4 * d4
        q5 += d5 * d5
        q6 += d6 * d6
        q7 += d7 * d7
    for j in range(m, n):
        d = np.float64(v[j]) - s
        a0 += d
        q0 += d * d
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)), ((q0 + q1) + (q2 + q3)) + ((q4 + q5) + (q6 + q7))


@njit(inline="always")
def _dots(dy, g, xh, n):
    """``sum_j dy[j] g[j]`` and ``sum_j dy[j] g[j] xh[j]`` for ``j < n``, float64."""
    a0 = a1 = a2 = a3 = 0.0
    q0 = q1 = q2 = q3 = 0.0
    m = n - n % 4
    for j in range(0, m, 4):
        e0 = dy[j] * g[j]
        e1 = dy[j + 1] * g[j + 1]
        e2 = dy[j + 2] * g[j + 2]
        e3 = dy[j + 3] * g[j + 3]
        a0 += e0
        a1 += e1
        a2 += e2
        a3 += e3
        q0 += e0 * np.float64(xh[j])
        q1 += e1 * np.float64(xh[j + 1])
        q2 += e2 * np.float64(xh[j + 2])
        q3 += e3 * np.float64(xh[j + 3])
    for j in range(m, n):
        e = dy[j] * g[j]
        a0 += e
        q0 += e * np.float64(xh[j])
    return (a0 + a1) + (a2 + a3), (q0 + q1) + (q2 + q3)


# ------------------------------------------------------------------------------------------------
# one normalization site, one step
#
# site = (kinds (T,) int8, gamma (C,) f64, beta (C,) f64, fixed_mean (T|0, C) f64, fixed_invstd
#         (T|0, C) f64, eps, hraw (N|0, C) dtype, invstd (T|0, C) f64, row_invstd (N|0,) f64,
#         mean (T|0, C) f64, var (T|0, C) f64, row_mean (N|0,) f64)
#
# A site reads its input rows where they already live (the input projection xp, the recurrent
# matmul's output written into ``hraw``, the cell state) and the backward reads them there again,
# recomputing xhat = (x - mean) * invstd in float64 from the saved statistics, as the batch-norm
# kernels do. Rows are addressed as ``X[x0 + i * xs]`` (row i of the step's b rows).

@njit(**_OPTS)
def _site_forward(V, v0, vs, b, C, t, o0, site, Y, accumulate):
    """``Y[:b, :C]`` = (or += with ``accumulate``) the site's output for the rows ``V[v0 + i * vs]``.
    Batch statistics: float64 sums of ``x - x_first`` and of its square (the shifted one-pass form
    of bnlab's kernels) over the step's rows, then the normalizing pass."""
    kinds, gamma, beta, fmean, finv, eps, hraw, inv, rinv, mean, var, rmean = site
    kind = kinds[t]
    if kind == NONE:
        for i in range(b):
            vr = V[v0 + i * vs]
            yr = Y[i]
            if accumulate:
                for j in range(C):
                    yr[j] += np.float64(vr[j]) + beta[j]
            else:
                for j in range(C):
                    yr[j] = np.float64(vr[j]) + beta[j]
        return
    if kind == ROW:
        for i in range(b):
            vr = V[v0 + i * vs]
            yr = Y[i]
            first = np.float64(vr[0])
            s1, sq = _sum_dev(vr, C, first)
            d = s1 / C
            mu = first + d
            r = 1.0 / np.sqrt(max(sq / C - d * d, 0.0) + eps)
            rinv[o0 + i] = r
            rmean[o0 + i] = mu
            if accumulate:
                for j in range(C):
                    yr[j] += (np.float64(vr[j]) - mu) * r * gamma[j] + beta[j]
            else:
                for j in range(C):
                    yr[j] = (np.float64(vr[j]) - mu) * r * gamma[j] + beta[j]
        return
    if kind == BATCH:
        m = mean[t]
        s2 = var[t]
        iv = inv[t]
        first = V[v0]
        for j in range(C):
            m[j] = 0.0
            s2[j] = 0.0
        for i in range(b):
            vr = V[v0 + i * vs]
            for j in range(C):
                d = np.float64(vr[j]) - np.float64(first[j])
                m[j] += d
                s2[j] += d * d
        for j in range(C):
            d = m[j] / b
            m[j] = np.float64(first[j]) + d
            s2[j] = max(s2[j] / b - d * d, 0.0)
            iv[j] = 1.0 / np.sqrt(s2[j] + eps)
    else:
        m = fmean[t]
        iv = finv[t]
    for i in range(b):
        vr = V[v0 + i * vs]
        yr = Y[i]
        if accumulate:
            for j in range(C):
                yr[j] += (np.float64(vr[j]) - m[j]) * iv[j] * gamma[j] + beta[j]
        else:
            for j in range(C):
                yr[j] = (np.float64(vr[j]) - m[j]) * iv[j] * gamma[j] + beta[j]


@njit(**_OPTS)
def _site_backward(DY, b, C, t, o0, site, X, x0, xs, DX, d0, ds, dgamma, dbeta, csum):
    """The site's backward for rows ``DY[:b]`` (float64 gradients of its output), its input rows at
    ``X[x0 + i * xs]``: writes the input gradients to ``DX[d0 + i * ds]`` and accumulates
    ``dgamma``, ``dbeta`` (float64)."""
    kinds, gamma, beta, fmean, finv, eps, hraw, inv, rinv, mean, var, rmean = site
    kind = kinds[t]
    if kind == NONE:
        for i in range(b):
            dy = DY[i]
            dx = DX[d0 + i * ds]
            for j in range(C):
                dx[j] = dy[j]
                dbeta[j] += dy[j]
        return
    if kind == ROW:
        xh = csum[2]
        for i in range(b):
            dy = DY[i]
            xr = X[x0 + i * xs]
            r = rinv[o0 + i]
            mu = rmean[o0 + i]
            for j in range(C):
                xh[j] = (np.float64(xr[j]) - mu) * r
            s1, s2 = _dots(dy, gamma, xh, C)
            s1 /= C
            s2 /= C
            dx = DX[d0 + i * ds]
            for j in range(C):
                dgamma[j] += dy[j] * xh[j]
                dbeta[j] += dy[j]
                dx[j] = r * (dy[j] * gamma[j] - s1 - xh[j] * s2)
        return
    if kind == FIXED:
        m = fmean[t]
        iv = finv[t]
        for i in range(b):
            dy = DY[i]
            xr = X[x0 + i * xs]
            dx = DX[d0 + i * ds]
            for j in range(C):
                dx[j] = dy[j] * gamma[j] * iv[j]
                dgamma[j] += dy[j] * ((np.float64(xr[j]) - m[j]) * iv[j])
                dbeta[j] += dy[j]
        return
    m = mean[t]
    iv = inv[t]
    s1 = csum[0]
    s2 = csum[1]
    for j in range(C):
        s1[j] = 0.0
        s2[j] = 0.0
    for i in range(b):
        dy = DY[i]
        xr = X[x0 + i * xs]
        for j in range(C):
            s1[j] += dy[j]
            s2[j] += dy[j] * ((np.float64(xr[j]) - m[j]) * iv[j])
    for j in range(C):
        dgamma[j] += s2[j]
        dbeta[j] += s1[j]
        s1[j] = s1[j] * gamma[j] / b
        s2[j] = s2[j] * gamma[j] / b
    for i in range(b):
        dy = DY[i]
        xr = X[x0 + i * xs]
        dx = DX[d0 + i * ds]
        for j in range(C):
            dx[j] = iv[j] * (dy[j] * gamma[j] - s1[j] - ((np.float64(xr[j]) - m[j]) * iv[j]) * s2[j])


@njit(inline="always")
def _copy_rows(src, dst, lo, hi, n):
    for i in range(lo, hi):
        s = src[i]
        d = dst[i]
        for j in range(n):
            d[j] = s[j]


# ------------------------------------------------------------------------------------------------
# the time loop, forward

@njit(**_OPTS)
def _forward(cell, rev, H, P, bs, off, xp, xr0, xrs, h0, c0, wt, wrt, bhh, sx, sh, sc,
             out, or0, ors, hn, cn, gates, cst, tcs, mst, hprev, cprev, ghn,
             A, Hs, Cs, Ms, Yx, Yh):
    """Run the recurrence over all steps; see the module docstring.

    ``xp`` ``(R, G)``: the input projections, step t's row i at ``xr0[t] + i * xrs``; ``out``
    ``(R', P)`` likewise with ``or0``/``ors``. ``h0``/``hn`` ``(B, P)``, ``c0``/``cn`` ``(B, H)``;
    ``wt`` = W_hh^T ``(P, G)``, ``wrt`` = W_hr^T ``(H, P)`` (LSTM with ``P != H``), ``bhh`` ``(G,)``
    (GRU), in the data dtype; ``Yx``/``Yh``: the sites' outputs, in the data dtype (the gates are
    computed in it, as torch does; the statistics in float64). Saved for the backward (internal
    rows): ``gates`` (activations), ``cst`` c_t, ``tcs`` tanh(N_c(c_t)), ``mst`` the unprojected h,
    ``hprev``/``cprev`` the states each step started from, ``ghn`` the GRU's N_h(..)_n + b_hn,
    the recurrent site's input (``sh``'s hraw) and every site's statistics. The rest is scratch.
    """
    T = bs.shape[0]
    B = h0.shape[0]
    G = wt.shape[1]
    proj = P != H
    lstm = cell == LSTM
    b0 = bhh[:H]
    b1 = bhh[H:2 * H]
    b2 = bhh[2 * H:]
    cur = 0 if rev else B
    if not rev:
        _copy_rows(h0, Hs, 0, B, P)
        if lstm:
            _copy_rows(c0, Cs, 0, B, H)
    for k in range(T):
        t = T - 1 - k if rev else k
        b = bs[t]
        o0 = off[t]
        if not rev and b < cur:  # sequences that ended at the previous step: their final state
            _copy_rows(Hs, hn, b, cur, P)
            if lstm:
                _copy_rows(Cs, cn, b, cur, H)
            cur = b
        elif rev and b > cur:  # sequences whose last step this is: they start from h0
            _copy_rows(h0, Hs, cur, b, P)
            if lstm:
                _copy_rows(c0, Cs, cur, b, H)
            cur = b
        for i in range(b):
            hs = Hs[i]
            hp = hprev[o0 + i]
            for j in range(P):
                hp[j] = hs[j]
            if lstm:
                cs = Cs[i]
                cp = cprev[o0 + i]
                for j in range(H):
                    cp[j] = cs[j]
        if sh[0][t] != NONE:  # the recurrent matmul straight into the storage the backward reads
            Ah, a0 = sh[6], o0
        else:
            Ah, a0 = A, 0
        gemm(Hs, 0, False, wt, Ah, a0 * G, b, G, P, False)  # rows a0.. of Ah = h_{t-1} W_hh^T
        _site_forward(xp, xr0[t], xrs, b, G, t, o0, sx, Yx, False)
        if cell == GRU:
            _site_forward(Ah, a0, 1, b, G, t, o0, sh, Yh, False)
            for i in range(b):
                yx = Yx[i]
                yh = Yh[i]
                x0, x1, x2 = yx[:H], yx[H:2 * H], yx[2 * H:]
                h_0, h_1, h_2 = yh[:H], yh[H:2 * H], yh[2 * H:]
                g = gates[o0 + i]
                g0, g1, g2 = g[:H], g[H:2 * H], g[2 * H:]
                gh = ghn[o0 + i]
                hs = Hs[i]
                for j in range(H):
                    r = _sig(x0[j] + h_0[j] + b0[j])
                    z = _sig(x1[j] + h_1[j] + b1[j])
                    gn = h_2[j] + b2[j]
                    n = _th(x2[j] + r * gn)
                    hp = hs[j]
                    g0[j] = r
                    g1[j] = z
                    g2[j] = n
                    gh[j] = gn
                    hs[j] = n + z * (hp - n)
        elif lstm:
            _site_forward(Ah, a0, 1, b, G, t, o0, sh, Yx, True)
            for i in range(b):
                yx = Yx[i]
                y0, y1, y2, y3 = yx[:H], yx[H:2 * H], yx[2 * H:3 * H], yx[3 * H:]
                g = gates[o0 + i]
                g0, g1, g2, g3 = g[:H], g[H:2 * H], g[2 * H:3 * H], g[3 * H:]
                cs = Cs[i]
                cr = cst[o0 + i]
                for j in range(H):
                    ig = _sig(y0[j])
                    fg = _sig(y1[j])
                    gg = _th(y2[j])
                    og = _sig(y3[j])
                    g0[j] = ig
                    g1[j] = fg
                    g2[j] = gg
                    g3[j] = og
                    c = fg * cs[j] + ig * gg
                    cs[j] = c
                    cr[j] = c
            _site_forward(cst, o0, 1, b, H, t, o0, sc, Yh, False)
            for i in range(b):
                yh = Yh[i]
                g3 = gates[o0 + i][3 * H:]
                tr = tcs[o0 + i]
                dst = Ms[i] if proj else Hs[i]
                for j in range(H):
                    tc = _th(yh[j])
                    tr[j] = tc
                    dst[j] = g3[j] * tc
                if proj:
                    mr = mst[o0 + i]
                    for j in range(H):
                        mr[j] = dst[j]
            if proj:
                gemm(Ms, 0, False, wrt, Hs, 0, b, P, H, False)  # h = m W_hr^T
        else:
            _site_forward(Ah, a0, 1, b, G, t, o0, sh, Yx, True)
            for i in range(b):
                yx = Yx[i]
                g = gates[o0 + i]
                hs = Hs[i]
                if cell == RNN_TANH:
                    for j in range(H):
                        v = _th(yx[j])
                        g[j] = v
                        hs[j] = v
                else:
                    for j in range(H):
                        v = yx[j]
                        v = 0.0 if v < 0.0 else v  # nan stays nan
                        g[j] = v
                        hs[j] = v
        q0 = or0[t]
        for i in range(b):
            dst = out[q0 + i * ors]
            hs = Hs[i]
            for j in range(P):
                dst[j] = hs[j]
    _copy_rows(Hs, hn, 0, cur, P)
    if lstm:
        _copy_rows(Cs, cn, 0, cur, H)


# ------------------------------------------------------------------------------------------------
# the time loop, backward

@njit(**_OPTS)
def _backward(cell, rev, H, P, bs, off, dout, or0, ors, dhn, dcn, w, wr, sx, sh, sc,
              xp, gates, cst, tcs, hprev, cprev, ghn,
              dxp, xr0, xrs, dh0, dc0, DA, DHP, dgx, dbx, dgh, dbh, dgc, dbc,
              DHs, DCs, Dd, DMd, DP, DPh, DX, DC, csum):
    """Backpropagation through time of :func:`_forward`.

    ``dout`` in the output's layout; ``dhn``/``dcn`` the gradients of the final states; ``xp``
    the forward's input projections. ``w`` = W_hh ``(G, P)``, ``wr`` = W_hr ``(P, H)``. Writes
    ``dxp`` (the input's layout), ``dh0``/``dc0``, ``DA`` (internal rows: the gradient of
    W_hh h_{t-1}, for dW_hh = DA^T hprev), ``DHP`` (LSTM with a projection: the gradient of each h_t,
    for dW_hr = DHP^T m), and accumulates the sites' ``dgamma``/``dbeta`` and the GRU's ``dbh``
    (float64).
    """
    T = bs.shape[0]
    B = dhn.shape[0]
    G = w.shape[0]
    proj = P != H
    lstm = cell == LSTM
    cur = B if rev else 0
    if rev:
        _copy_rows(dhn, DHs, 0, B, P)
        if lstm:
            _copy_rows(dcn, DCs, 0, B, H)
    for k in range(T):
        t = k if rev else T - 1 - k
        b = bs[t]
        o0 = off[t]
        if not rev and b > cur:  # the final states of sequences whose last step this is
            _copy_rows(dhn, DHs, cur, b, P)
            if lstm:
                _copy_rows(dcn, DCs, cur, b, H)
            cur = b
        elif rev and b < cur:  # sequences that started (from h0) at the step before
            _copy_rows(DHs, dh0, b, cur, P)
            if lstm:
                _copy_rows(DCs, dc0, b, cur, H)
            cur = b
        q0 = or0[t]
        for i in range(b):
            src = dout[q0 + i * ors]
            dh = DHs[i]
            for j in range(P):
                dh[j] += src[j]
        if lstm:
            if proj:
                for i in range(b):
                    dh = DHs[i]
                    dd = Dd[i]
                    dp = DHP[o0 + i]
                    for j in range(P):
                        dd[j] = dh[j]
                        dp[j] = dh[j]
                gemm(Dd, 0, False, wr, DMd, 0, b, H, P, False)  # dm = dh W_hr
                _copy_rows(DMd, DC, 0, b, H)
            else:
                _copy_rows(DHs, DC, 0, b, H)
            # DC holds dm; through h = o tanh(N_c(c)): do into DP's o block, d N_c(c) into DC
            for i in range(b):
                g3 = gates[o0 + i][3 * H:]
                tr = tcs[o0 + i]
                dp3 = DP[i][3 * H:]
                dc = DC[i]
                for j in range(H):
                    og = np.float64(g3[j])
                    tc = np.float64(tr[j])
                    dm = dc[j]
                    dp3[j] = dm * tc * og * (1.0 - og)
                    dc[j] = dm * og * (1.0 - tc * tc)
            _site_backward(DC, b, H, t, o0, sc, cst, o0, 1, DX, 0, 1, dgc, dbc, csum)
            for i in range(b):
                g = gates[o0 + i]
                g0, g1, g2 = g[:H], g[H:2 * H], g[2 * H:3 * H]
                dp = DP[i]
                dp0, dp1, dp2 = dp[:H], dp[H:2 * H], dp[2 * H:3 * H]
                dcs = DCs[i]
                dx = DX[i]
                cp = cprev[o0 + i]
                for j in range(H):
                    ig = np.float64(g0[j])
                    fg = np.float64(g1[j])
                    gg = np.float64(g2[j])
                    dc = dcs[j] + dx[j]
                    dp0[j] = dc * gg * ig * (1.0 - ig)
                    dp1[j] = dc * np.float64(cp[j]) * fg * (1.0 - fg)
                    dp2[j] = dc * ig * (1.0 - gg * gg)
                    dcs[j] = dc * fg
            hsrc = DP
        elif cell == GRU:
            for i in range(b):
                g = gates[o0 + i]
                g0, g1, g2 = g[:H], g[H:2 * H], g[2 * H:]
                gh = ghn[o0 + i]
                hp = hprev[o0 + i]
                dp = DP[i]
                dph = DPh[i]
                dp0, dp1, dp2 = dp[:H], dp[H:2 * H], dp[2 * H:]
                dq0, dq1, dq2 = dph[:H], dph[H:2 * H], dph[2 * H:]
                dhs = DHs[i]
                for j in range(H):
                    r = np.float64(g0[j])
                    z = np.float64(g1[j])
                    n = np.float64(g2[j])
                    dh = dhs[j]
                    dnp = dh * (1.0 - z) * (1.0 - n * n)
                    drp = dnp * np.float64(gh[j]) * r * (1.0 - r)
                    dzp = dh * (np.float64(hp[j]) - n) * z * (1.0 - z)
                    dp0[j] = drp
                    dp1[j] = dzp
                    dp2[j] = dnp
                    dq0[j] = drp
                    dq1[j] = dzp
                    dq2[j] = dnp * r
                    dhs[j] = dh * z  # the direct path h_{t-1} -> h_t
                for j in range(G):
                    dbh[j] += dph[j]
            hsrc = DPh
        else:
            for i in range(b):
                g = gates[o0 + i]
                dhs = DHs[i]
                dp = DP[i]
                if cell == RNN_TANH:
                    for j in range(H):
                        y = np.float64(g[j])
                        dp[j] = dhs[j] * (1.0 - y * y)
                else:
                    for j in range(H):
                        dp[j] = dhs[j] if g[j] > 0.0 else 0.0
            hsrc = DP
        # the input site: its gradients straight into dxp; the recurrent site's into DA
        _site_backward(DP, b, G, t, o0, sx, xp, xr0[t], xrs, dxp, xr0[t], xrs, dgx, dbx, csum)
        _site_backward(hsrc, b, G, t, o0, sh, sh[6], o0, 1, DA, o0, 1, dgh, csum[3], csum)  # no shift: dbeta to scratch
        gemm(DA, o0 * G, False, w, Dd, 0, b, P, G, False)  # dh_{t-1} = DA W_hh
        for i in range(b):
            dd = Dd[i]
            dhs = DHs[i]
            if cell == GRU:
                for j in range(P):
                    dhs[j] += dd[j]
            else:
                for j in range(P):
                    dhs[j] = dd[j]
    _copy_rows(DHs, dh0, 0, cur, P)
    if lstm:
        _copy_rows(DCs, dc0, 0, cur, H)


# ------------------------------------------------------------------------------------------------
# moments of a layer's input rows (the folded vertical norm)

@njit(**_OPTS)
def moments(x, mu, mu_r, sigma, xc, xd):
    """Float64 mean ``mu`` (shifted by the first row) and biased covariance ``sigma`` of the rows of
    ``x`` ``(N, F)``, the mean rounded to x's dtype in ``mu_r``, and ``xc = x - mu_r`` (in x's
    dtype, the rows the folded layer reads). ``xd`` ``(N, F)`` float64 scratch receives
    ``x - mu``; the covariance is ``xd^T xd / N`` in float64 through :func:`gemm`."""
    N, F = x.shape
    x0 = x[0]
    for j in range(F):
        mu[j] = 0.0
    for n in range(N):
        r = x[n]
        for j in range(F):
            mu[j] += np.float64(r[j]) - np.float64(x0[j])
    for j in range(F):
        mu[j] = np.float64(x0[j]) + mu[j] / N
        mu_r[j] = mu[j]
    for n in range(N):
        r = x[n]
        o = xc[n]
        d = xd[n]
        for j in range(F):
            d[j] = np.float64(r[j]) - mu[j]
            o[j] = r[j] - mu_r[j]
    gemm(xd, 0, True, xd, sigma, 0, F, F, N, False)
    for j in range(F):
        s = sigma[j]
        for k in range(F):
            s[k] = s[k] / N


@njit(**_OPTS)
def weight_grad(D, X, out):
    """``out = D^T X`` (``(G, N) x (N, F)``: the weight gradient of ``y = x W^T`` from the rows'
    output gradients D ``(N, G)`` and inputs X ``(N, F)``)."""
    gemm(D, 0, True, X, out, 0, D.shape[1], X.shape[1], D.shape[0], False)


def _quiet(kernel):
    """``kernel`` called with numba's NumbaIRAssumptionWarning silenced: a pedantic internal check that
    fires while it compiles the always-inlined float32/float64 math (the compiled code is right)."""

    @functools.wraps(kernel.py_func)
    def call(*args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NumbaIRAssumptionWarning)
            return kernel(*args)

    call.kernel = kernel
    return call


forward = _quiet(_forward)
backward = _quiet(_backward)
vector_math = _quiet(_vector_math)


# ------------------------------------------------------------------------------------------------
# the folded vertical norm, one direction (see recurrent._FoldCpuFn)

@njit(**_OPTS)
def fold_direction(W, gamma, beta, eps, sigma, mu, mu_r, wd, ws, Wf, shift, mean, var, inv, s):
    """For ``W`` ``(G, F)``: ``wd`` = W in float64, ``ws = wd sigma``, per row j the mean
    ``w_j . mu`` and variance ``w_j . ws_j`` of W x, ``inv = 1 / sqrt(var + eps)``,
    ``s = gamma * inv``, the folded weights ``Wf = s W`` and ``shift = s w_j . (mu_r - mu) + beta``
    (the rounding of the centred input, folded back)."""
    G, F = W.shape
    for j in range(G):
        src = W[j]
        dst = wd[j]
        for k in range(F):
            dst[k] = src[k]
    gemm(wd, 0, False, sigma, ws, 0, G, F, F, False)
    for j in range(G):
        w = wd[j]
        q = ws[j]
        v = 0.0
        m = 0.0
        dl = 0.0
        for k in range(F):
            v += q[k] * w[k]
            m += w[k] * mu[k]
            dl += w[k] * (np.float64(mu_r[k]) - mu[k])
        v = max(v, 0.0)
        iv = 1.0 / np.sqrt(v + eps)
        sc = iv * gamma[j]
        mean[j] = m
        var[j] = v
        inv[j] = iv
        s[j] = sc
        shift[j] = sc * dl + beta[j]
        wf = Wf[j]
        for k in range(F):
            wf[k] = sc * w[k]


@njit(**_OPTS)
def fold_direction_backward(dWf, wd, ws, inv, s, gamma, dW, dscale, dvw, M):
    """The backward of :func:`fold_direction` for ``dWf`` ``(G, F)``: ``dscale`` (the gradient of
    s), ``dW = s dWf + 2 dv ws`` with ``dv = -dscale gamma inv^3 / 2``, and ``M += wd^T diag(dv) wd``
    (``dvw`` ``(G, F)`` float64 scratch)."""
    G, F = wd.shape
    for j in range(G):
        w = wd[j]
        g = dWf[j]
        ds = 0.0
        for k in range(F):
            ds += np.float64(g[k]) * w[k]
        dscale[j] = ds
        dv = -0.5 * ds * gamma[j] * inv[j] * inv[j] * inv[j]
        q = ws[j]
        out = dW[j]
        e = dvw[j]
        sj = s[j]
        for k in range(F):
            out[k] = sj * np.float64(g[k]) + 2.0 * dv * q[k]
            e[k] = dv * w[k]
    gemm(dvw, 0, True, wd, M, 0, F, F, G, True)


@njit(**_OPTS)
def fold_rows_backward(dxc, xc, M, Md, drows):
    """``drows = dxc - mean_rows(dxc) + xc (2 M / N)``: the rows' gradient through the centring and
    the covariance (``Md`` ``(F, F)`` scratch in the rows' dtype)."""
    N, F = xc.shape
    for a in range(F):
        src = M[a]
        dst = Md[a]
        for k in range(F):
            dst[k] = 2.0 * src[k] / N
    gemm(xc, 0, False, Md, drows, 0, N, F, F, False)
    cm = np.zeros(F)
    for n in range(N):
        r = dxc[n]
        for k in range(F):
            cm[k] += r[k]
    for k in range(F):
        cm[k] /= N
    for n in range(N):
        r = dxc[n]
        o = drows[n]
        for k in range(F):
            o[k] += np.float64(r[k]) - cm[k]
