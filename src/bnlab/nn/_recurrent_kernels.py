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

**Numerics** (as :mod:`bnlab.reference`): statistics in float64. A step's batch statistics are
taken per block of rows (the blocks fixed by the batch size): float64 sums of ``x - x_first`` and
of its square over the block, shifted by the block's first row, then the blocks' means and sums
of squared deviations combined in block order (Chan, Golub and LeVeque's pairwise update), so the
bits never depend on how many threads ran the blocks; layer norm's per row, shifted by its first
value. Biased variance to normalize, ``invstd = 1 / sqrt(var + eps)``. Pointwise math is
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
rows of A by 4 vectors of B and C held in registers across the k loop, ``llvm.fma``) with 64-byte
vectors where the CPU has AVX-512; 4 rows by 3 vectors of 32 bytes elsewhere (AVX2 has 16 vector
registers: 4 by 4 spills). On the 2-core AMD machines this project is measured on it ran at about
2.4 times the float32 speed of the BLAS torch calls for these shapes with AVX-512, and at 1.3 times
torch.mm's with AVX2 (72 against 56 GF/s, one thread), and needs no BLAS at all.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
from llvmlite import ir
from numba import get_thread_id, njit, prange, typeof, types
from numba._dispatcher import compute_fingerprint
from numba.core import cgutils
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import intrinsic, overload

from ..kernels import cpu as _cpu
from ..kernels._jit import recurrent_jit as _jit

__all__ = ["NONE", "BATCH", "FIXED", "ROW", "LSTM", "GRU", "RNN_TANH", "RNN_RELU", "gemm", "gemm_panels", "pack_panels",
           "panel_width", "forward", "backward", "transposed_ok",
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
#: rows per pass of a transposed product (the weight gradients' ``D^T X``, long k): its packed A
#: panel (4 x kc) and the B panel (kc rows of the product's width) then stay in L1 while a group of
#: 4 rows passes over every column block. Measured (one thread, float32, AVX-512), 3200 x 512 by
#: 3200 x 128 (the W_hh gradient at 64x50x32->128): 4.94 ms at 256 rows a pass, 3.86 at 64, 3.97 at
#: 32; 2560 x 256 by 2560 x 64: 1.08 at 256, 0.89 at 64
_KC_T = 64


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


#: vectors of B and C per block of the widest kernel: 4 with AVX-512's 32 vector registers (16
#: accumulators, 4 loads of B, a broadcast of A), 3 with AVX2's 16 (4 x 4 spills its accumulators:
#: measured on a 2-core AVX2 EPYC, 32 x 128 @ 128 x 512 (a thread's rows of a step) in float32,
#: one thread, 37 GF/s at 4 x 4 against 72 at 4 x 3, 70 at 6 x 2; torch.mm 56; transposed A 27
#: against 70; float64 13 against 29)
_WIDE = 4 if VECTOR_BYTES == 64 else 3

_KW4, _KW1, _K42, _K12, _K41, _K11 = (_make_kernel(r, v, False) for r, v in ((4, _WIDE), (1, _WIDE), (4, 2), (1, 2),
                                                                             (4, 1), (1, 1)))
_TW4, _TW1, _T42, _T12, _T41, _T11 = (_make_kernel(r, v, True) for r, v in ((4, _WIDE), (1, _WIDE), (4, 2), (1, 2),
                                                                            (4, 1), (1, 1)))


@_jit(**_OPTS)
def gemm(A, a_off, trans_a, B, b_off, C, c_off, m, n, k, accumulate):
    """``C (+)= op(A) @ B[:k, b_off:b_off + n]`` for 2-D C-contiguous arrays: op(A) is the ``m x k``
    block of A starting at flat element ``a_off`` (row-major: element (i, kk) at ``a_off + i * lda + kk``;
    ``trans_a``: at ``a_off + kk * lda + i``, ``lda = A.shape[1]``), B's block starts at column
    ``b_off`` of row 0, and C's ``m x n`` block at flat element ``c_off``.

    Every element is one ``llvm.fma`` chain over k in order (columns past the last whole vector: a
    float64 sum), whatever the block sizes: a column block computed alone gives the bits it gets in
    a wider product, as long as its start lies a whole number of vectors from the wider one's.

    With ``trans_a`` (the weight gradients' ``D^T X``, long k) each group of 4 columns of A is
    copied per panel of ``_KC_T`` rows into a contiguous buffer first, then multiplied by every column
    block of B: A's 4 values a row of k stand a whole row of A apart otherwise (a new cache line and,
    every few rows, a new page each). Measured (one thread, 3200 x 512 by 3200 x 128, float32):
    52.6 GF/s without, 63.5 with; the same bits."""
    lda = A.shape[1]
    ldb = B.shape[1]
    ldc = C.shape[1]
    if k == 0:
        Cf0 = C.reshape(-1)
        if not accumulate:
            for i in range(m):
                for j in range(n):
                    Cf0[c_off + i * ldc + j] = 0.0
        return
    VL = VECTOR_BYTES // C.itemsize
    BN = _WIDE * VL
    n1 = n - n % VL
    nw = n1 // BN  # blocks of the widest kernel, then blocks of 2 vectors, then of 1
    if _WIDE == 3 and (n1 // VL) % 3 == 1 and nw > 0:
        # 3 + 1 vectors as 2 + 2: a block of 1 vector does 4 broadcasts a k for 4 multiply-adds. The
        # same bits; one thread, float32, against the 3 + 1 split: 32 x 512 by 128 4% faster, 32 x 128
        # by 512 (a step's dh) 12%, transposed 3200 x 256 by 128 (dW_hh) 22%, by 32 (dW_ih) 43%
        nw -= 1
    n4 = nw * BN
    n2 = n4 + (n1 - n4) // (2 * VL) * (2 * VL)
    m4 = m - m % 4
    Af = A.reshape(-1)
    Bf = B.reshape(-1)
    Cf = C.reshape(-1)
    pack = trans_a and m4 > 0 and n1 > 0
    KC = _KC_T if trans_a else _KC
    Pk = np.empty(4 * KC if pack else 0, A.dtype)
    for k0 in range(0, k, KC):
        kc = min(KC, k - k0)
        acc = accumulate or k0 > 0
        ao = a_off + (k0 * lda if trans_a else k0)
        bo = b_off + k0 * ldb
        if pack:  # A's 4 columns i.. of this panel, contiguous (see above), times every whole vector of B
            for i in range(0, m4, 4):
                for q in range(kc):
                    src = ao + q * lda + i
                    for r in range(4):
                        Pk[q * 4 + r] = Af[src + r]
                for j in range(0, n4, BN):
                    _TW4(Pk, 0, 4, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
                for j in range(n4, n2, 2 * VL):
                    _T42(Pk, 0, 4, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
                for j in range(n2, n1, VL):
                    _T41(Pk, 0, 4, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
        i4 = m4 if trans_a else 0  # transposed: the packed pass did the rows of 4 (or there are none to do)
        for j in range(0, n4, BN):
            for i in range(i4, m4, 4):
                _KW4(A, ao + i * lda, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
            for i in range(m4, m):
                if trans_a:
                    _TW1(A, ao + i, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
                else:
                    _KW1(A, ao + i * lda, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
        for j in range(n4, n2, 2 * VL):
            for i in range(i4, m4, 4):
                _K42(A, ao + i * lda, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
            for i in range(m4, m):
                if trans_a:
                    _T12(A, ao + i, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
                else:
                    _K12(A, ao + i * lda, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
        for j in range(n2, n1, VL):
            for i in range(i4, m4, 4):
                _K41(A, ao + i * lda, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
            for i in range(m4, m):
                if trans_a:
                    _T11(A, ao + i, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
                else:
                    _K11(A, ao + i * lda, lda, B, bo + j, ldb, C, c_off + i * ldc + j, ldc, kc, acc)
        for i in range(m):  # columns past the last whole vector
            for j in range(n1, n):
                s = 0.0
                for q in range(kc):
                    e = ao + (q * lda + i if trans_a else i * lda + q)
                    s += Af[e] * Bf[bo + q * ldb + j]
                ce = c_off + i * ldc + j
                Cf[ce] = Cf[ce] + s if acc else s


def panel_width(dtype) -> int:
    """Columns per panel of :func:`pack_panels` for ``dtype``: the widest micro-kernel block's."""
    return _WIDE * (VECTOR_BYTES // np.dtype(dtype).itemsize)


def pack_panels(W: np.ndarray) -> np.ndarray:
    """``B = W^T`` for ``W`` ``(n, k)`` (a weight as torch stores it) in panels of
    :func:`panel_width` columns, ``(ceil(n / w), k, w)``: panel p holds B's columns ``p * w ..``
    contiguously (zero past n), what :func:`gemm_panels` multiplies by. One copy, as the transpose
    it replaces, whether W is stored row-major or is itself a transposed view (B stored row-major)."""
    n, k = W.shape
    w = panel_width(W.dtype)
    npan = -(-n // w)
    B = W.T
    if n % w == 0:  # B's columns split into panels: a view, then the one copy
        return np.ascontiguousarray(B.reshape(k, npan, w).transpose(1, 0, 2))
    Bp = np.zeros((npan, k, w), W.dtype)
    for p in range(npan):
        c = B[:, p * w:(p + 1) * w]
        Bp[p, :, :c.shape[1]] = c
    return Bp


@_jit(**_OPTS)
def gemm_panels(A, a_off, Bp, C, c_off, m, n, k, accumulate):
    """``C (+)= A @ B[:k, :n]`` as :func:`gemm` (A row-major from flat element ``a_off``, C's block at
    ``c_off``) with B packed by :func:`pack_panels`: the same bits as :func:`gemm` on B itself (each
    panel's columns start a whole number of vectors from column 0), faster where B's rows lie a
    power-of-two stride apart. A panel's ``k x w`` values are contiguous and stay in L1 while every
    block of A's rows passes over it; as rows of a wide B, ``w`` columns of consecutive rows fall into
    few cache sets and are evicted in between. Measured (one thread, float32, AVX-512, 32 x 128 by
    128 x 512): 110 GF/s on B, 152 on its panels; the input projection (:mod:`bnlab.nn._projection`,
    2 threads) 2560 x 64 by 64 x 256 204 -> 297 GF/s, 3200 x 32 by 32 x 512 219 -> 230."""
    w = Bp.shape[2]
    for p in range(Bp.shape[0]):
        j0 = p * w
        if j0 >= n:
            break
        gemm(A, a_off, False, Bp[p], 0, C, c_off + j0, m, min(w, n - j0), k, accumulate)


# ------------------------------------------------------------------------------------------------
# exp, sigmoid, tanh that vectorize (float64, ~1e-16 relative)
#
# Each a compiled function of its own, which LLVM inlines into the loops that call it (and then
# vectorizes); numba's own always-inline would inline and type the whole chain (tanh -> exp -> the
# polynomial) again at each of the dozens of call sites: about 10 s more to compile a forward.

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


@_jit(**_OPTS)
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


@_jit(**_OPTS)
def _exp(x):
    x = -708.0 if x < -708.0 else x  # comparisons are false for nan: nan passes through
    x = 709.0 if x > 709.0 else x
    t = x * _INV_LN2 + _ROUND
    k = t - _ROUND
    r = (x - k * _LN2_HI) - k * _LN2_LO
    s = _i2f((_f2i(t) - _f2i(_ROUND) + 1023) << 52)
    return s + s * _expm1_poly(r)


@_jit(**_OPTS)
def _sigmoid(x):
    return 1.0 / (1.0 + _exp(-x))


@_jit(**_OPTS)
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


@_jit(**_OPTS)
def _expm1_poly32(r):
    p = _E7
    p = p * r + _E6
    p = p * r + _E5
    p = p * r + _E4
    p = p * r + _E3
    p = p * r + _E2
    return (p * r) * r + r


@_jit(**_OPTS)
def _exp32(x):
    x = _LO32 if x < _LO32 else x
    x = _HI32 if x > _HI32 else x
    t = x * _INV_LN2_32 + _ROUND32
    k = t - _ROUND32
    r = (x - k * _LN2_HI32) - k * _LN2_LO32
    s = _i2f32((_f2i32(t) - _f2i32(_ROUND32) + np.int32(127)) << np.int32(23))
    return s + s * _expm1_poly32(r)


@_jit(**_OPTS)
def _sigmoid32(x):
    return _ONE32 / (_ONE32 + _exp32(-x))


@_jit(**_OPTS)
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


@_jit(**_OPTS)
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
# vectorizing.
#
# A row's sums (layer norm's statistics forward, its two dot products backward) keep several running
# sums in a fixed order (no fastmath: the bits never depend on the machine's vector width). Written
# as scalars (8 or 4 accumulators) LLVM left them scalar: 2.1 cycles an element for the 8 sums of a
# float32 row of 512 (426 ns), 266 ns for the two dot products of a float64 row. Here they are
# emitted as vectors of 4 float64 lanes, each lane one of those running sums, so the additions are
# the same, in the same order: 87 ns and 141 ns, the same bits (checked against the scalar form for
# lengths 0-515 and data with large offsets).

def _loop(builder, start, stop, step, carried, body):
    """A counted loop in IR: ``j = start; while j < stop: carried = body(j, carried); j += step``;
    returns the carried values after it (``carried``: a list of IR values, ``body`` returns their
    next values)."""
    i64 = ir.IntType(64)
    pre = builder.basic_block
    head = builder.append_basic_block("vs.head")
    bod = builder.append_basic_block("vs.body")
    done = builder.append_basic_block("vs.done")
    builder.branch(head)
    builder.position_at_end(head)
    j = builder.phi(i64)
    j.add_incoming(start, pre)
    phis = []
    for val in carried:
        p = builder.phi(val.type)
        p.add_incoming(val, pre)
        phis.append(p)
    builder.cbranch(builder.icmp_signed("<", j, stop), bod, done)
    builder.position_at_end(bod)
    new = body(j, phis)
    j1 = builder.add(j, step)
    end = builder.basic_block
    j.add_incoming(j1, end)
    for p, v in zip(phis, new):
        p.add_incoming(v, end)
    builder.branch(head)
    builder.position_at_end(done)
    return phis


_V4 = ir.VectorType(ir.DoubleType(), 4)


def _load4(builder, data, j, f32):
    """Elements ``j .. j + 3`` at ``data`` (float32 widened, or float64) as a vector of 4 float64."""
    p = builder.gep(data, [j])
    if f32:
        x = builder.load(builder.bitcast(p, ir.VectorType(ir.FloatType(), 4).as_pointer()), align=4)
        return builder.fpext(x, _V4)
    return builder.load(builder.bitcast(p, _V4.as_pointer()), align=8)


def _load1(builder, data, j, f32):
    """Element ``j`` at ``data`` as a float64."""
    x = builder.load(builder.gep(data, [j]))
    return builder.fpext(x, ir.DoubleType()) if f32 else x


def _lanes(builder, vec):
    """The 4 lanes of a vector, as scalars."""
    return [builder.extract_element(vec, ir.Constant(ir.IntType(32), k)) for k in range(4)]


def _row(v) -> bool:
    return isinstance(v, types.Array) and v.ndim == 1 and v.layout == "C"


@intrinsic
def _sum_dev(typingctx, v, n, s):
    """``sum_j (v[j] - s)`` and ``sum_j (v[j] - s)^2`` for ``j < n`` (v: a contiguous 1-D float32/float64
    array, s float64), in float64: 8 running sums (element j into sum j mod 8, in order), the
    elements past the last 8 into sum 0, then ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)).
    Two vectors of 4 lanes hold the 8 sums; no reassociation, no fused multiply-add."""
    if not _row(v) or v.dtype not in (types.float32, types.float64):
        return None
    sig = types.UniTuple(types.float64, 2)(v, n, s)

    def codegen(context, builder, signature, args):
        aty, nty, sty = signature.args
        data = context.make_array(aty)(context, builder, args[0]).data
        f32 = aty.dtype == types.float32
        i64 = ir.IntType(64)
        n64 = context.cast(builder, args[1], nty, types.int64)
        s64 = context.cast(builder, args[2], sty, types.float64)
        splat = builder.insert_element(ir.Constant(_V4, ir.Undefined), s64, ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(splat, ir.Constant(_V4, ir.Undefined),
                                       ir.Constant(ir.VectorType(ir.IntType(32), 4), [0] * 4))
        m = builder.sub(n64, builder.srem(n64, ir.Constant(i64, 8)))
        zero = ir.Constant(_V4, None)

        def body(j, acc):
            aA, aB, qA, qB = acc
            dA = builder.fsub(_load4(builder, data, j, f32), splat)
            dB = builder.fsub(_load4(builder, data, builder.add(j, ir.Constant(i64, 4)), f32), splat)
            return [builder.fadd(aA, dA), builder.fadd(aB, dB),
                    builder.fadd(qA, builder.fmul(dA, dA)), builder.fadd(qB, builder.fmul(dB, dB))]

        aA, aB, qA, qB = _loop(builder, ir.Constant(i64, 0), m, ir.Constant(i64, 8), [zero] * 4, body)
        a = _lanes(builder, aA) + _lanes(builder, aB)
        q = _lanes(builder, qA) + _lanes(builder, qB)

        def tail(j, acc):
            a0, q0 = acc
            d = builder.fsub(_load1(builder, data, j, f32), s64)
            return [builder.fadd(a0, d), builder.fadd(q0, builder.fmul(d, d))]

        a[0], q[0] = _loop(builder, m, n64, ir.Constant(i64, 1), [a[0], q[0]], tail)

        def comb(x):
            return builder.fadd(builder.fadd(builder.fadd(x[0], x[1]), builder.fadd(x[2], x[3])),
                                builder.fadd(builder.fadd(x[4], x[5]), builder.fadd(x[6], x[7])))

        return context.make_tuple(builder, signature.return_type, [comb(a), comb(q)])

    return sig, codegen


@intrinsic
def _dots(typingctx, dy, g, xh, n):
    """``sum_j dy[j] g[j]`` and ``sum_j dy[j] g[j] xh[j]`` for ``j < n`` (contiguous 1-D float64
    arrays: float32 factors would multiply in float32 first) in float64: 4 running sums (element j
    into sum j mod 4, in order), the elements past the last 4 into sum 0, then (s0 + s1) + (s2 + s3);
    one vector of 4 lanes holds the 4 sums (no reassociation, no fused multiply-add)."""
    if not all(_row(a) and a.dtype == types.float64 for a in (dy, g, xh)):
        return None
    sig = types.UniTuple(types.float64, 2)(dy, g, xh, n)

    def codegen(context, builder, signature, args):
        tys = signature.args
        dyd, gd, xhd = (context.make_array(tys[k])(context, builder, args[k]).data for k in range(3))
        i64 = ir.IntType(64)
        n64 = context.cast(builder, args[3], tys[3], types.int64)
        m = builder.sub(n64, builder.srem(n64, ir.Constant(i64, 4)))
        zero = ir.Constant(_V4, None)

        def step(load, j, acc):
            a, q = acc
            e = builder.fmul(load(builder, dyd, j, False), load(builder, gd, j, False))
            return [builder.fadd(a, e), builder.fadd(q, builder.fmul(e, load(builder, xhd, j, False)))]

        a, q = _loop(builder, ir.Constant(i64, 0), m, ir.Constant(i64, 4), [zero, zero],
                     lambda j, acc: step(_load4, j, acc))
        av, qv = _lanes(builder, a), _lanes(builder, q)
        av[0], qv[0] = _loop(builder, m, n64, ir.Constant(i64, 1), [av[0], qv[0]],
                             lambda j, acc: step(_load1, j, acc))

        def comb(x):
            return builder.fadd(builder.fadd(x[0], x[1]), builder.fadd(x[2], x[3]))

        return context.make_tuple(builder, signature.return_type, [comb(av), comb(qv)])

    return sig, codegen


# ------------------------------------------------------------------------------------------------
# indexing, and the threads' rows
#
# Hot loops index 2-D arrays with unsigned indices (``X[r, k]``, r and k ``uint64``): no views are
# made per row or segment (numba counts the references of every view with atomic operations, which
# dominated these loops), and numba's negative-index wraparound, which keeps LLVM from vectorizing,
# does not apply to unsigned indices. ``np.uint64(i)`` converts (written out: an always-inlined helper is
# inlined and typed again at every one of its call sites, which cost seconds of compilation); uint64
# arithmetic stays uint64.


# ------------------------------------------------------------------------------------------------
# a spin barrier for the threads of one launch (rows split over threads, batch statistics met per step)
#
# ``bar`` (int64, 16 elements, zeros): element 0 counts the threads arrived, element 8 (its own cache
# line) is the generation. A thread reads the generation, then adds itself to the count; the last one
# resets the count and moves the generation on, the others spin until it moves. The atomics are
# sequentially consistent (the count), release (the generation's store) and acquire (its loads): what a
# thread wrote before the barrier is visible to every thread after it. A waiting thread checks 100
# times, then yields its core at each further check (other processes may need it). Every thread of the
# launch must reach every barrier, and the launch must run its ``nt`` iterations on ``nt`` threads at
# once (:func:`team_size` checks the pool gives them).

def _elem_ptr(context, builder, ty, arr, idx):
    """A pointer to element ``idx`` of the 1-D array ``arr`` (numba type ``ty``), for the atomics."""
    ary = context.make_array(ty)(context, builder, arr)
    return cgutils.get_item_pointer(context, builder, ty, ary, [idx])


@intrinsic
def _atomic_add(typingctx, arr, idx, val):
    sig = types.int64(arr, idx, types.int64)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return sig, codegen


@intrinsic
def _atomic_load(typingctx, arr, idx):
    sig = types.int64(arr, idx)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


@intrinsic
def _atomic_store(typingctx, arr, idx, val):
    sig = types.void(arr, idx, types.int64)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _yield_cpu(typingctx):
    """``sched_yield()`` (libc, resolved when the compiled code is linked into the process)."""
    sig = types.int32()

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        return builder.call(fn, [])

    return sig, codegen


#: checks a waiting thread spins before it yields its core at each further one: on cores shared with
#: other processes the partner it waits for may need this one's core to get there. Two processes
#: each training the horizontal LSTM (64x50x32->128) on 2 threads of a 2-core machine: 65-69 ms a
#: step with pure spinning, 54-58 yielding after 2000 checks, 50-51 after 100 (torch's own LSTM in
#: the same setting 33); alone, no change measured by the bench
_SPINS = 100


@njit(inline="always")
def _barrier(bar, nt):
    """Wait until the ``nt`` threads of the launch have all arrived (see above); one thread: returns."""
    if nt <= 1:
        return
    gen = _atomic_load(bar, 8)
    if _atomic_add(bar, 0, 1) == nt - 1:
        _atomic_store(bar, 0, 0)
        _atomic_add(bar, 8, 1)
    else:
        spins = 0
        while _atomic_load(bar, 8) == gen:
            spins += 1
            if spins > _SPINS:
                _yield_cpu()


def _team_loop(nt, ids):
    """Each of ``nt`` iterations records the pool thread that ran it."""
    for th in prange(nt):
        ids[th] = get_thread_id()


_team_par = _jit(parallel=True, nogil=True, cache=True)(_team_loop)


@functools.lru_cache(maxsize=None)
def team_size(nt: int) -> int:
    """How many distinct threads of numba's pool run a launch of ``nt`` iterations (``nt`` unless
    something caps the team: ``OMP_THREAD_LIMIT``, a nested parallel region); a launch whose threads
    meet at :func:`_barrier` may only run on a full team. Once per process and thread count."""
    if nt <= 1:
        return 1
    ids = np.full(nt, -1, np.int64)
    prev = _cpu._enter(nt)
    try:
        _team_par(nt, ids)
    finally:
        if prev:
            _cpu._set_threads(prev)
    return len(set(ids.tolist()))


@njit(inline="always")
def _copy_part(src, s0, dst, d0, lo, hi, c0, c1, rth, rnt, RB):
    """Rows ``lo <= i < hi`` of the thread's row blocks, columns ``c0 <= j < c1``:
    ``dst[d0 + i, j] = src[s0 + i, j]``."""
    n = np.uint64(c1 - c0)
    cu = np.uint64(c0)
    for blk in range(lo // RB, (hi + RB - 1) // RB):
        if blk % rnt != rth:
            continue
        for i in range(max(lo, blk * RB), min(hi, blk * RB + RB)):
            si = np.uint64(s0 + i)
            di = np.uint64(d0 + i)
            for j in range(n):
                k = cu + j
                dst[di, k] = src[si, k]


# ------------------------------------------------------------------------------------------------
# the normalization sites
#
# site = (kinds (T,) int8, gamma (C,) f64, beta (C,) f64, fixed_mean (T|0, C) f64, fixed_invstd
#         (T|0, C) f64, eps, hraw (N|0, C) dtype, invstd (T|0, C) f64, row_invstd (N|0,) f64,
#         mean (T|0, C) f64, var (T|0, C) f64, row_mean (N|0,) f64)
#
# A site reads its input rows where they already live (the input projection xp, the recurrent
# matmul's output written into ``hraw``, the cell state) and the backward reads them there again,
# recomputing xhat = (x - mean) * invstd in float64 from the saved statistics, as the batch-norm
# kernels do. Rows are addressed as ``X[x0 + i * xs]`` (row i of the step's b rows).
#
# A thread's part of a step: the rows in blocks ``rth, rth + rnt, ...`` of ``RB`` rows, every channel.
# Layer norm needs only the row's channels; batch statistics need every row of a channel: each
# thread sums its blocks, the threads meet at a barrier, each combines every block in block order.

def _rnd(v, z):  # v (float64) rounded to the type of the scalar z (a scalar: no array enters a hot loop's call)
    raise NotImplementedError


@overload(_rnd, inline="always")
def _rnd_impl(v, z):
    if z == types.float32:
        return lambda v, z: np.float32(v)
    return lambda v, z: v


@_jit(**_OPTS)
def _prep_channels(C, t, site, M, S):
    """The site's normalization at step t as ``y = (x - M[ch]) * S[ch] + beta[ch]`` for its ``C``
    channels (``S = invstd * gamma``): the given statistics (FIXED) or the identity (NONE: ``M = 0``,
    ``S = gamma = 1``). A ``ROW`` step is left to :func:`_prep_row`, row by row, a ``BATCH`` step
    to :func:`_part_sums` and :func:`_comb_stats`."""
    kinds, gamma, beta, fmean, finv, eps, hraw, inv, rinv, mean, var, rmean = site
    kind = kinds[t]
    if kind == ROW or kind == BATCH:
        return
    Cu = np.uint64(C)
    if kind == NONE:
        for k in range(Cu):
            M[k] = 0.0
            S[k] = gamma[k]
        return
    tt = np.uint64(t)
    for k in range(Cu):
        M[k] = fmean[tt, k]
        S[k] = finv[tt, k] * gamma[k]


@njit(inline="always")
def _prep_row(V, r, C, site, r_idx, M, S):
    """Layer norm of row ``r`` of V (``C`` channels): its float64 mean and ``1 / sqrt(var + eps)``
    (saved at ``r_idx`` for the backward), and ``M``, ``S`` as :func:`_prep_channels` has them."""
    gamma = site[1]
    first = np.float64(V[r, 0])
    s1, sq = _sum_dev(V[r], C, first)
    d = s1 / C
    mu = first + d
    rv = 1.0 / np.sqrt(max(sq / C - d * d, 0.0) + site[5])
    site[8][r_idx] = rv
    site[11][r_idx] = mu
    for j in range(np.uint64(C)):
        M[j] = mu
        S[j] = rv * gamma[j]


@_jit(**_OPTS)
def _part_sums(V, v0, vs, b, C, t, site, PBs, rth, rnt, RB):
    """Batch statistics split by rows, before the threads meet: for each of the thread's blocks of
    ``RB`` rows of step t (block q: rows ``q * RB`` on), the float64 sums of ``x - x_q`` and of its
    square over the block's rows (``x_q``: the block's first row, its own shift) into ``PBs[0, q]``
    and ``PBs[1, q]``, channels ``< C``. Nothing at a step whose kind is not BATCH."""
    if site[0][t] != BATCH:
        return
    nb = (b + RB - 1) // RB
    Cu = np.uint64(C)
    for blk in range(rth, nb, rnt):
        i0 = blk * RB
        s1 = PBs[0, blk]
        s2 = PBs[1, blk]
        f = np.uint64(v0 + i0 * vs)
        for j in range(Cu):
            s1[j] = 0.0
            s2[j] = 0.0
        for i in range(i0, min(i0 + RB, b)):
            r = np.uint64(v0 + i * vs)
            for j in range(Cu):
                d = np.float64(V[r, j]) - np.float64(V[f, j])
                s1[j] += d
                s2[j] += d * d


@_jit(**_OPTS)
def _comb_stats(V, v0, vs, b, C, t, site, PBs, RB, M, S, write):
    """Batch statistics split by rows, after the threads met: every block's sums (:func:`_part_sums`)
    combined in block order by Chan, Golub and LeVeque's pairwise update (each block's mean and sum
    of squared deviations from it; float64), so that the bits depend on the block size, never on the
    thread count; ``M``, ``S`` for every channel as :func:`_prep_channels` has them and, with
    ``write`` (one thread), the step's mean, biased variance and invstd saved in the site. Other
    kinds: :func:`_prep_channels` over every channel."""
    kinds, gamma, beta, fmean, finv, eps, hraw, inv, rinv, mean, var, rmean = site
    if kinds[t] != BATCH:
        _prep_channels(C, t, site, M, S)
        return
    nb = (b + RB - 1) // RB
    Cu = np.uint64(C)
    n = 0.0
    for blk in range(nb):
        i0 = blk * RB
        nq = np.float64(min(i0 + RB, b) - i0)
        s1 = PBs[0, blk]
        s2 = PBs[1, blk]
        f = np.uint64(v0 + i0 * vs)
        if blk == 0:
            for j in range(Cu):
                d = s1[j] / nq
                M[j] = np.float64(V[f, j]) + d
                S[j] = s2[j] - s1[j] * d
        else:
            w1 = nq / (n + nq)
            w2 = n * w1
            for j in range(Cu):
                d = s1[j] / nq
                delta = (np.float64(V[f, j]) + d) - M[j]
                M[j] += delta * w1
                S[j] += (s2[j] - s1[j] * d) + delta * delta * w2
        n += nq
    tt = np.uint64(t)
    for j in range(Cu):
        v = max(S[j] / b, 0.0)
        iv = 1.0 / np.sqrt(v + eps)
        if write:
            mean[tt, j] = M[j]
            var[tt, j] = v
            inv[tt, j] = iv
        S[j] = iv * gamma[j]


@njit(inline="always")
def _flush(s1, s2, PBs, blk, C):
    """A block's backward sums (the thread's ``s1``, ``s2``, channels ``< C``) into ``PBs[:, blk]``,
    and ``s1``, ``s2`` zeroed for the next block."""
    d1 = PBs[0, blk]
    d2 = PBs[1, blk]
    for j in range(np.uint64(C)):
        d1[j] = s1[j]
        d2[j] = s2[j]
        s1[j] = 0.0
        s2[j] = 0.0


@njit(inline="always")
def _sum_blocks(PBs, nb, C, s1, s2):
    """The step's backward sums: the ``nb`` blocks' sums (:func:`_flush`) added in block order."""
    Cu = np.uint64(C)
    for j in range(Cu):
        s1[j] = 0.0
        s2[j] = 0.0
    for q in range(nb):
        p1 = PBs[0, q]
        p2 = PBs[1, q]
        for j in range(Cu):
            s1[j] += p1[j]
            s2[j] += p2[j]


# ------------------------------------------------------------------------------------------------
# the time loop, forward: one step of one thread's part

@_jit(**_OPTS)
def _fwd_step(cell, rev, H, P, t, b, o0, prev_b, rth, rnt, RB,
              xp, xr0, xrs, h0, c0, wt, bhh, sx, sh, sc, hn, cn, Hin, Hout, Cs, Ms,
              out, or0, ors, gates, cst, tcs, mst, hprev, cprev, ghn, A, Yx, Yh, MS, PB, par, bar):
    """Step ``t`` (``b`` rows at internal offset ``o0``; ``prev_b`` rows ran the step before) for
    the thread's blocks of rows: reads h_{t-1} from ``Hin``, writes h_t to ``Hout`` (with a projection, the
    unprojected m_t to ``Ms``; :func:`_fwd_proj` finishes the step). ``MS`` ``(6, G)``: the thread's
    float64 scratch (each site's M and S, see :func:`_prep_channels`). A row's normalizations and
    gates run one after the other (its values stay in cache); the sites' batch statistics, which
    need every row, before: each of the ``rnt`` threads sums its blocks into ``PB[par, site]``, all
    wait at ``bar``, each combines every block (:func:`_comb_stats`)."""
    G = wt.shape[1]
    nq = G // H
    lstm = cell == LSTM
    proj = P != H
    if not rev and b < prev_b:  # sequences that ended at the previous step: their final state
        _copy_part(Hin, 0, hn, 0, b, prev_b, 0, P, rth, rnt, RB)
        if lstm:
            _copy_part(Cs, 0, cn, 0, b, prev_b, 0, H, rth, rnt, RB)
    elif rev and b > prev_b:  # sequences whose last step this is: they start from h0
        _copy_part(h0, 0, Hin, 0, prev_b, b, 0, P, rth, rnt, RB)
        if lstm:
            _copy_part(c0, 0, Cs, 0, prev_b, b, 0, H, rth, rnt, RB)
    nb = (b + RB - 1) // RB
    hasraw = sh[0][t] != NONE
    if hasraw:  # the recurrent matmul straight into the storage the backward reads
        Ah, a0 = sh[6], o0
    else:
        Ah, a0 = A, 0
    for blk in range(rth, nb, rnt):
        i0 = blk * RB
        i1 = min(i0 + RB, b)
        _copy_part(Hin, 0, hprev, o0, i0, i1, 0, P, 0, 1, RB)
        if lstm:
            _copy_part(Cs, 0, cprev, o0, i0, i1, 0, H, 0, 1, RB)
        gemm(Hin, i0 * P, False, wt, 0, Ah, (a0 + i0) * G, i1 - i0, G, P, False)  # rows a0 + i: h_{t-1} W_hh^T
    Mx, Sx, Mh, Sh = MS[0], MS[1], MS[2], MS[3]
    _part_sums(xp, xr0[t], xrs, b, G, t, sx, PB[par, 0], rth, rnt, RB)
    _part_sums(Ah, a0, 1, b, G, t, sh, PB[par, 1], rth, rnt, RB)
    if sx[0][t] == BATCH or sh[0][t] == BATCH:
        _barrier(bar, rnt)
    _comb_stats(xp, xr0[t], xrs, b, G, t, sx, PB[par, 0], RB, Mx, Sx, rth == 0)
    _comb_stats(Ah, a0, 1, b, G, t, sh, PB[par, 1], RB, Mh, Sh, rth == 0)
    rowx = sx[0][t] == ROW
    rowh = sh[0][t] == ROW
    bx = sx[2]
    bh = sh[2]
    x0t = xr0[t]
    Hu = np.uint64(H)
    H2, H3 = Hu + Hu, Hu + Hu + Hu
    z = Yx[0, 0] - Yx[0, 0]  # a scalar of the data dtype (for _rnd)
    for blk in range(rth, nb, rnt):
        for i in range(blk * RB, min(blk * RB + RB, b)):
            iu = np.uint64(i)
            oi = np.uint64(o0 + i)
            xr = np.uint64(x0t + i * xrs)
            ar = np.uint64(a0 + i)
            if rowx:
                _prep_row(xp, xr, G, sx, o0 + i, Mx, Sx)
            if rowh:
                _prep_row(Ah, ar, G, sh, o0 + i, Mh, Sh)
            if cell == GRU:  # x and h stay apart: r, z = sig(x + h), n = tanh(x_n + r h_n)
                for q in range(nq):
                    c = np.uint64(q * H)
                    for j in range(Hu):
                        k = c + j
                        Yx[iu, k] = (np.float64(xp[xr, k]) - Mx[k]) * Sx[k] + bx[k]
                        Yh[iu, k] = (np.float64(Ah[ar, k]) - Mh[k]) * Sh[k] + bh[k]
                g = gates[oi]  # one view per output block (LLVM vectorizes no loop that writes one array at
                g0, g1, g2 = g[:H], g[H:2 * H], g[2 * H:3 * H]  # offsets it only knows at run time)
                for k in range(Hu):
                    r = _sig(Yx[iu, k] + Yh[iu, k] + bhh[k])
                    z = _sig(Yx[iu, Hu + k] + Yh[iu, Hu + k] + bhh[Hu + k])
                    gn = Yh[iu, H2 + k] + bhh[H2 + k]
                    nn = _th(Yx[iu, H2 + k] + r * gn)
                    hp = Hin[iu, k]
                    g0[k] = r
                    g1[k] = z
                    g2[k] = nn
                    ghn[oi, k] = gn
                    Hout[iu, k] = nn + z * (hp - nn)
                continue
            # the pre-activation N_x(x) + N_h(h): each normalized tensor rounded to the data dtype, then their sum
            for q in range(nq):
                c = np.uint64(q * H)
                for j in range(Hu):
                    k = c + j
                    Yx[iu, k] = _rnd((np.float64(xp[xr, k]) - Mx[k]) * Sx[k] + bx[k], z) + \
                        ((np.float64(Ah[ar, k]) - Mh[k]) * Sh[k] + bh[k])
            if lstm:
                g = gates[oi]  # one view per output block (see the GRU's)
                g0, g1, g2, g3 = g[:H], g[H:2 * H], g[2 * H:3 * H], g[3 * H:]
                for k in range(Hu):
                    ig = _sig(Yx[iu, k])
                    fg = _sig(Yx[iu, Hu + k])
                    gg = _th(Yx[iu, H2 + k])
                    og = _sig(Yx[iu, H3 + k])
                    g0[k] = ig
                    g1[k] = fg
                    g2[k] = gg
                    g3[k] = og
                    cc = fg * Cs[iu, k] + ig * gg
                    Cs[iu, k] = cc
                    cst[oi, k] = cc
            elif cell == RNN_TANH:
                for k in range(Hu):
                    v = _th(Yx[iu, k])
                    gates[oi, k] = v
                    Hout[iu, k] = v
            else:
                for k in range(Hu):
                    v = Yx[iu, k]
                    v = 0.0 if v < 0.0 else v  # nan stays nan
                    gates[oi, k] = v
                    Hout[iu, k] = v
    if lstm:  # the cell's norm: its batch statistics need every row's c_t
        Mc, Sc = MS[4], MS[5]
        _part_sums(cst, o0, 1, b, H, t, sc, PB[par, 2], rth, rnt, RB)
        if sc[0][t] == BATCH:
            _barrier(bar, rnt)
        _comb_stats(cst, o0, 1, b, H, t, sc, PB[par, 2], RB, Mc, Sc, rth == 0)
        rowc = sc[0][t] == ROW
        gc, bc = sc[1], sc[2]
        # no cell norm (gamma 1, beta 0): tanh(c_t) straight from c_t. Otherwise N_c(c_t) in float64,
        # rounded into tcs, then tanh of that in a loop of its own: the float64 pass keeps to
        # half-width vectors, the tanh and the output gate run on full ones (the same bits as one loop)
        ident = sc[0][t] == NONE
        if ident:
            for k in range(Hu):
                if gc[k] != 1.0 or bc[k] != 0.0:
                    ident = False
        for blk in range(rth, nb, rnt):
            for i in range(blk * RB, min(blk * RB + RB, b)):
                iu = np.uint64(i)
                oi = np.uint64(o0 + i)
                if rowc:
                    _prep_row(cst, oi, H, sc, o0 + i, Mc, Sc)
                if ident:
                    for k in range(Hu):
                        tcs[oi, k] = _th(cst[oi, k])
                else:
                    for k in range(Hu):
                        tcs[oi, k] = _rnd((np.float64(cst[oi, k]) - Mc[k]) * Sc[k] + bc[k], z)
                    for k in range(Hu):
                        tcs[oi, k] = _th(tcs[oi, k])
                if proj:
                    for k in range(Hu):
                        v = gates[oi, H3 + k] * tcs[oi, k]
                        Ms[iu, k] = v
                        mst[oi, k] = v
                else:
                    for k in range(Hu):
                        Hout[iu, k] = gates[oi, H3 + k] * tcs[oi, k]
    if not proj:
        q0 = or0[t]
        for blk in range(rth, nb, rnt):
            i0 = blk * RB
            _copy_strided(Hout, i0, out, q0, ors, min(i0 + RB, b), 0, P)


@njit(inline="always")
def _copy_strided(src, i0, dst, q0, qs, i1, c0, c1):
    """``dst[q0 + i * qs, j] = src[i, j]`` for ``i0 <= i < i1``, ``c0 <= j < c1``."""
    n = np.uint64(c1 - c0)
    cu = np.uint64(c0)
    for i in range(i0, i1):
        si = np.uint64(i)
        di = np.uint64(q0 + i * qs)
        for j in range(n):
            k = cu + j
            dst[di, k] = src[si, k]


@_jit(**_OPTS)
def _fwd_proj(H, P, t, b, rth, rnt, RB, wrt, Ms, Hout, out, or0, ors):
    """The projection of step t, the thread's rows: h = m W_hr^T."""
    nb = (b + RB - 1) // RB
    q0 = or0[t]
    for blk in range(rth, nb, rnt):
        i0 = blk * RB
        i1 = min(i0 + RB, b)
        gemm(Ms, i0 * H, False, wrt, 0, Hout, i0 * P, i1 - i0, P, H, False)
        _copy_strided(Hout, i0, out, q0, ors, i1, 0, P)


@_jit(**_OPTS)
def _forward_loop(th, nt, RB, cell, rev, H, P, bs, off, xp, xr0, xrs, h0, c0, wt, wrt, bhh, sx, sh, sc,
                  out, or0, ors, hn, cn, gates, cst, tcs, mst, hprev, cprev, ghn, A, Hbuf, Cs, Ms, Yx, Yh, MS, PB, bar):
    """Thread ``th``'s part of the recurrence over all steps, on ``nt`` threads (:func:`forward`);
    see the module docstring.

    ``xp`` ``(R, G)``: the input projections, step t's row i at ``xr0[t] + i * xrs``; ``out``
    ``(R', P)`` likewise with ``or0``/``ors``. ``h0``/``hn`` ``(B, P)``, ``c0``/``cn`` ``(B, H)``;
    ``wt`` = W_hh^T ``(P, G)``, ``wrt`` = W_hr^T ``(H, P)`` (LSTM with ``P != H``), ``bhh`` ``(G,)``
    (GRU), in the data dtype; ``Yx``/``Yh``: the sites' outputs, in the data dtype (the gates are
    computed in it, as torch does; the statistics in float64). Saved for the backward (internal
    rows): ``gates`` (activations), ``cst`` c_t, ``tcs`` tanh(N_c(c_t)), ``mst`` the unprojected h,
    ``hprev``/``cprev`` the states each step started from, ``ghn`` the GRU's N_h(..)_n + b_hn,
    the recurrent site's input (``sh``'s hraw) and every site's statistics. The rest is scratch
    (``Hbuf`` ``(2, B, P)``: h_{t-1} and h_t; ``MS`` ``(nt, 6, G)`` float64, per thread).

    Each thread runs the whole loop on its blocks of ``RB`` rows (blocks ``th, th + nt, ...``): the
    recurrence couples no rows, only batch statistics do. Where a step has them, the threads meet
    (``bar``, int64 (16,) zeros): each sums its blocks into ``PB`` ``(2, 3, 2, ceil(B / RB), G)``
    float64 (step parity, site x/h/c, the two sums), waits, and combines every block in block order.
    The initial and final states are copied by blocks too: every row a thread reads or writes is its own.
    """
    T = bs.shape[0]
    B = h0.shape[0]
    proj = P != H
    lstm = cell == LSTM
    if not rev:
        _copy_part(h0, 0, Hbuf[0], 0, 0, B, 0, P, th, nt, RB)
        if lstm:
            _copy_part(c0, 0, Cs, 0, 0, B, 0, H, th, nt, RB)
    cur = 0 if rev else B
    for k in range(T):
        t = T - 1 - k if rev else k
        b = bs[t]
        _fwd_step(cell, rev, H, P, t, b, off[t], cur, th, nt, RB, xp, xr0, xrs, h0, c0, wt,
                  bhh, sx, sh, sc, hn, cn, Hbuf[k % 2], Hbuf[(k + 1) % 2], Cs, Ms, out, or0, ors, gates, cst,
                  tcs, mst, hprev, cprev, ghn, A, Yx, Yh, MS[th], PB, k % 2, bar)
        if proj:
            _fwd_proj(H, P, t, b, th, nt, RB, wrt, Ms, Hbuf[(k + 1) % 2], out, or0, ors)
        cur = b
    cur = B if rev else bs[T - 1]
    _copy_part(Hbuf[T % 2], 0, hn, 0, 0, cur, 0, P, th, nt, RB)
    if lstm:
        _copy_part(Cs, 0, cn, 0, 0, cur, 0, H, th, nt, RB)


# ------------------------------------------------------------------------------------------------
# the time loop, backward: one step of one thread's part, in two halves

@_jit(**_OPTS)
def _bwd_head(cell, rev, H, P, t, b, o0, bp, op, pending, final, rth, rnt, RB, th,
              dout, or0, ors, dhn, dcn, w, dh0, dc0, DA, DHP, gn, DHs, DCs, Dd):
    """The thread's rows at step t (backward order): finish the
    step before (``pending``: its ``bp`` rows at offset ``op`` get ``dh_{t} += DA W_hh``), take in the
    final-state gradients of sequences whose last step is t (the reverse direction: hand the
    gradient of h0 to sequences that started at the step before), add the output gradient, and
    accumulate ``||dL/dh_t||^2`` into ``gn[th, t]``. ``final``: the last call, after every step
    (hands ``dh0``/``dc0`` their rows)."""
    G = w.shape[0]
    Pu = np.uint64(P)
    lstm = cell == LSTM
    if pending:
        nbp = (bp + RB - 1) // RB
        for blk in range(rth, nbp, rnt):
            i0 = blk * RB
            i1 = min(i0 + RB, bp)
            gemm(DA, (op + i0) * G, False, w, 0, Dd, i0 * P, i1 - i0, P, G, False)  # dh_{t} = DA W_hh
            for i in range(i0, i1):
                iu = np.uint64(i)
                if cell == GRU:
                    for k in range(Pu):
                        DHs[iu, k] += Dd[iu, k]
                else:
                    for k in range(Pu):
                        DHs[iu, k] = Dd[iu, k]
    if final:
        _copy_part(DHs, 0, dh0, 0, 0, bp, 0, P, rth, rnt, RB)
        if lstm:
            _copy_part(DCs, 0, dc0, 0, 0, bp, 0, H, rth, rnt, RB)
        return
    if not rev and b > bp:  # the final states of sequences whose last step this is
        _copy_part(dhn, 0, DHs, 0, bp, b, 0, P, rth, rnt, RB)
        if lstm:
            _copy_part(dcn, 0, DCs, 0, bp, b, 0, H, rth, rnt, RB)
    elif rev and b < bp:  # sequences that started (from h0) at the step before
        _copy_part(DHs, 0, dh0, 0, b, bp, 0, P, rth, rnt, RB)
        if lstm:
            _copy_part(DCs, 0, dc0, 0, b, bp, 0, H, rth, rnt, RB)
    proj = P != H
    q0 = or0[t]
    nb = (b + RB - 1) // RB
    ss = 0.0
    for blk in range(rth, nb, rnt):
        for i in range(blk * RB, min(blk * RB + RB, b)):
            iu = np.uint64(i)
            qi = np.uint64(q0 + i * ors)
            for k in range(Pu):
                v = DHs[iu, k] + dout[qi, k]
                DHs[iu, k] = v
                ss += v * v
            if proj:
                oi = np.uint64(o0 + i)
                for k in range(Pu):
                    Dd[iu, k] = DHs[iu, k]
                    DHP[oi, k] = DHs[iu, k]
    gn[th, t] += ss


@njit(inline="always")
def _bwd_fin(s1, s2, ga, dg, db, b, c, n, own):
    """Batch statistics, after every row's sums: dgamma, dbeta (``own``: the thread that adds them;
    split by rows, every thread holds the step's sums), and the coefficients of dx."""
    for j in range(n):
        k = c + j
        if own:
            dg[k] += s2[k]
            db[k] += s1[k]
        s1[k] = s1[k] * ga[k] / b
        s2[k] = s2[k] * ga[k] / b


@njit(inline="always")
def _bwd_row(DY, dr, X, xr, r, mu, gamma, dgamma, dbeta, DX, xo, xh, C):
    """Layer norm's backward of one row (all ``C`` channels): row ``xo`` of DX, dgamma / dbeta
    accumulated (``xh``: scratch)."""
    for j in range(np.uint64(C)):
        xh[j] = (np.float64(X[xr, j]) - mu) * r
    s1, s2 = _dots(DY[dr], gamma, xh, C)
    s1 /= C
    s2 /= C
    for j in range(np.uint64(C)):
        dy = DY[dr, j]
        dgamma[j] += dy * xh[j]
        dbeta[j] += dy
        DX[xo, j] = r * (dy * gamma[j] - s1 - xh[j] * s2)


@njit(inline="always")
def _site_t(site, t):
    """``(kind, mean, invstd)`` of the site at step t (the per-channel statistics its backward reads;
    for ROW and NONE steps, unused rows)."""
    kinds, gamma, beta, fmean, finv, eps, hraw, inv, rinv, mean, var, rmean = site
    kind = kinds[t]
    if kind == BATCH:
        return kind, mean[t], inv[t]
    if kind == FIXED:
        return kind, fmean[t], finv[t]
    return kind, gamma, gamma


@_jit(**_OPTS)
def _bwd_body(cell, H, P, t, b, o0, rth, rnt, RB, wr, sx, sh, sc, xp, gates, cst, tcs, hprev, cprev, ghn,
              dxp, xr0, xrs, DA, acc, DHs, DCs, Dd, DMd, DP, DPh, DX, DC, csum, PB, par, bar):
    """The thread's rows at step t: from ``dL/dh_t`` (``DHs``) through the
    gates and the sites to the input projection's gradient (``dxp``) and to the recurrent matmul's
    (``DA``, rows at ``o0``); accumulates the sites' ``dgamma``/``dbeta`` and the GRU's ``dbh`` in
    the thread's ``acc`` (float64). ``csum`` ``(8, G)``: the thread's scratch.

    Three passes over the rows (a row's values stay in cache within a pass): (1) the LSTM's output
    gate and ``d N_c(c)``, and the cell norm's sums; (2) the cell norm's dx, the gates, the input
    and recurrent norms' sums; (3) their dx. A layer-norm site does a row's whole backward at once.
    (The per-kind loops are written out: an array handed to an inlined helper inside a row loop
    costs numba two atomic reference-count updates per call.) A batch site's sums are taken per block
    of ``RB`` rows into ``PB[par, site]``, the threads meet at ``bar`` and each adds every block's in
    block order (:func:`_sum_blocks`): the same bits on any number of threads.
    """
    G = gates.shape[1]
    nq = G // H
    Hu = np.uint64(H)
    H2, H3 = Hu + Hu, Hu + Hu + Hu
    lstm = cell == LSTM
    proj = P != H
    dgx, dbx, dgh, dbh, dgc, dbc, dscr = acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6]
    s1x, s2x, s1h, s2h, xh, s1c, s2c = csum[0], csum[1], csum[2], csum[3], csum[4], csum[5], csum[6]
    kx, mx, ix = _site_t(sx, t)
    kh, mh, ih = _site_t(sh, t)
    kc, mc, ic = _site_t(sc, t)
    gx, gh, gc = sx[1], sh[1], sc[1]
    Ah = sh[6] if kh != NONE else DA  # (no recurrent norm: no input rows stored, none read)
    DYh = DPh if cell == GRU else DP  # the recurrent site's output gradient
    x0t = xr0[t]
    nb = (b + RB - 1) // RB
    for q in range(nq):
        c = np.uint64(q * H)
        for j in range(Hu):
            k = c + j
            s1x[k] = 0.0
            s2x[k] = 0.0
            s1h[k] = 0.0
            s2h[k] = 0.0
    if lstm:
        for k in range(Hu):
            s1c[k] = 0.0
            s2c[k] = 0.0
        # (1) dm -> the output gate (DP's o block) and d N_c(c) (DC); the cell norm's sums
        for blk in range(rth, nb, rnt):
            i0 = blk * RB
            i1 = min(i0 + RB, b)
            if proj:
                gemm(Dd, i0 * P, False, wr, 0, DMd, i0 * H, i1 - i0, H, P, False)  # dm = dh W_hr
            for i in range(i0, i1):
                iu = np.uint64(i)
                oi = np.uint64(o0 + i)
                if proj:
                    for k in range(Hu):
                        og = np.float64(gates[oi, H3 + k])
                        tc = np.float64(tcs[oi, k])
                        dm = np.float64(DMd[iu, k])
                        DP[iu, H3 + k] = dm * tc * og * (1.0 - og)
                        DC[iu, k] = dm * og * (1.0 - tc * tc)
                else:
                    for k in range(Hu):
                        og = np.float64(gates[oi, H3 + k])
                        tc = np.float64(tcs[oi, k])
                        dm = DHs[iu, k]
                        DP[iu, H3 + k] = dm * tc * og * (1.0 - og)
                        DC[iu, k] = dm * og * (1.0 - tc * tc)
                if kc == ROW:
                    _bwd_row(DC, iu, cst, oi, sc[8][o0 + i], sc[11][o0 + i], gc, dgc, dbc, DX, iu, xh, H)
                elif kc == BATCH:
                    for k in range(Hu):
                        dy = DC[iu, k]
                        s1c[k] += dy
                        s2c[k] += dy * ((np.float64(cst[oi, k]) - mc[k]) * ic[k])
                elif kc == FIXED:
                    for k in range(Hu):
                        dy = DC[iu, k]
                        dgc[k] += dy * ((np.float64(cst[oi, k]) - mc[k]) * ic[k])
                        dbc[k] += dy
                else:
                    for k in range(Hu):
                        dbc[k] += DC[iu, k]
            if kc == BATCH:
                _flush(s1c, s2c, PB[par, 2], blk, H)
        if kc == BATCH:
            _barrier(bar, rnt)
            _sum_blocks(PB[par, 2], nb, H, s1c, s2c)
            _bwd_fin(s1c, s2c, gc, dgc, dbc, b, np.uint64(0), Hu, rth == 0)
    # (2) the cell norm's dx, the gates (DP; DPh for the GRU's recurrent site), the two gate sites' sums
    for blk in range(rth, nb, rnt):
        for i in range(blk * RB, min(blk * RB + RB, b)):
            iu = np.uint64(i)
            oi = np.uint64(o0 + i)
            if lstm:
                if kc == BATCH:
                    for k in range(Hu):
                        DX[iu, k] = ic[k] * (DC[iu, k] * gc[k] - s1c[k] -
                                             ((np.float64(cst[oi, k]) - mc[k]) * ic[k]) * s2c[k])
                elif kc == FIXED:
                    for k in range(Hu):
                        DX[iu, k] = DC[iu, k] * gc[k] * ic[k]
                elif kc == NONE:
                    for k in range(Hu):
                        DX[iu, k] = DC[iu, k]
                dp = DP[iu]  # one view per output block (LLVM vectorizes no loop that writes one array at
                dp0, dp1, dp2 = dp[:H], dp[H:2 * H], dp[2 * H:3 * H]  # offsets known at run time)
                for k in range(Hu):
                    ig = np.float64(gates[oi, k])
                    fg = np.float64(gates[oi, Hu + k])
                    gg = np.float64(gates[oi, H2 + k])
                    dcc = DCs[iu, k] + DX[iu, k]
                    dp0[k] = dcc * gg * ig * (1.0 - ig)
                    dp1[k] = dcc * np.float64(cprev[oi, k]) * fg * (1.0 - fg)
                    dp2[k] = dcc * ig * (1.0 - gg * gg)
                    DCs[iu, k] = dcc * fg
            elif cell == GRU:
                dp = DP[iu]  # one view per output block (see the LSTM's)
                dph = DPh[iu]
                dp0, dp1, dp2 = dp[:H], dp[H:2 * H], dp[2 * H:3 * H]
                dq0, dq1, dq2 = dph[:H], dph[H:2 * H], dph[2 * H:3 * H]
                for k in range(Hu):
                    r = np.float64(gates[oi, k])
                    z = np.float64(gates[oi, Hu + k])
                    nn = np.float64(gates[oi, H2 + k])
                    dh = DHs[iu, k]
                    dnp = dh * (1.0 - z) * (1.0 - nn * nn)
                    drp = dnp * np.float64(ghn[oi, k]) * r * (1.0 - r)
                    dzp = dh * (np.float64(hprev[oi, k]) - nn) * z * (1.0 - z)
                    dp0[k] = drp
                    dp1[k] = dzp
                    dp2[k] = dnp
                    dq0[k] = drp
                    dq1[k] = dzp
                    dq2[k] = dnp * r
                    DHs[iu, k] = dh * z  # the direct path h_{t-1} -> h_t
                for q in range(nq):
                    c = np.uint64(q * H)
                    for j in range(Hu):
                        k = c + j
                        dbh[k] += DPh[iu, k]
            elif cell == RNN_TANH:
                for k in range(Hu):
                    y = np.float64(gates[oi, k])
                    DP[iu, k] = DHs[iu, k] * (1.0 - y * y)
            else:
                for k in range(Hu):
                    DP[iu, k] = DHs[iu, k] if gates[oi, k] > 0.0 else 0.0
            xr = np.uint64(x0t + i * xrs)
            if kx == ROW:
                _bwd_row(DP, iu, xp, xr, sx[8][o0 + i], sx[11][o0 + i], gx, dgx, dbx, dxp, xr, xh, G)
            if kh == ROW:
                _bwd_row(DYh, iu, Ah, oi, sh[8][o0 + i], sh[11][o0 + i], gh, dgh, dscr, DA, oi, xh, G)
            for q in range(nq):
                c = np.uint64(q * H)
                if kx == BATCH:
                    for j in range(Hu):
                        k = c + j
                        dy = DP[iu, k]
                        s1x[k] += dy
                        s2x[k] += dy * ((np.float64(xp[xr, k]) - mx[k]) * ix[k])
                elif kx == FIXED:
                    for j in range(Hu):
                        k = c + j
                        dy = DP[iu, k]
                        dgx[k] += dy * ((np.float64(xp[xr, k]) - mx[k]) * ix[k])
                        dbx[k] += dy
                elif kx == NONE:
                    for j in range(Hu):
                        k = c + j
                        dbx[k] += DP[iu, k]
                if kh == BATCH:
                    for j in range(Hu):
                        k = c + j
                        dy = DYh[iu, k]
                        s1h[k] += dy
                        s2h[k] += dy * ((np.float64(Ah[oi, k]) - mh[k]) * ih[k])
                elif kh == FIXED:
                    for j in range(Hu):
                        k = c + j
                        dy = DYh[iu, k]
                        dgh[k] += dy * ((np.float64(Ah[oi, k]) - mh[k]) * ih[k])
                        dscr[k] += dy
        if kx == BATCH:
            _flush(s1x, s2x, PB[par, 0], blk, G)
        if kh == BATCH:
            _flush(s1h, s2h, PB[par, 1], blk, G)
    # (3) the gate sites' dx: into dxp (the input's layout) and DA (internal rows)
    if kx == ROW and kh == ROW:
        return
    if kx == BATCH or kh == BATCH:
        _barrier(bar, rnt)
        if kx == BATCH:
            _sum_blocks(PB[par, 0], nb, G, s1x, s2x)
        if kh == BATCH:
            _sum_blocks(PB[par, 1], nb, G, s1h, s2h)
    for q in range(nq):
        c = np.uint64(q * H)
        if kx == BATCH:
            _bwd_fin(s1x, s2x, gx, dgx, dbx, b, c, Hu, rth == 0)
        if kh == BATCH:
            _bwd_fin(s1h, s2h, gh, dgh, dscr, b, c, Hu, rth == 0)
    for blk in range(rth, nb, rnt):
        for i in range(blk * RB, min(blk * RB + RB, b)):
            iu = np.uint64(i)
            oi = np.uint64(o0 + i)
            xr = np.uint64(x0t + i * xrs)
            for q in range(nq):
                c = np.uint64(q * H)
                if kx == BATCH:
                    for j in range(Hu):
                        k = c + j
                        dxp[xr, k] = ix[k] * (DP[iu, k] * gx[k] - s1x[k] -
                                              ((np.float64(xp[xr, k]) - mx[k]) * ix[k]) * s2x[k])
                elif kx == FIXED:
                    for j in range(Hu):
                        k = c + j
                        dxp[xr, k] = DP[iu, k] * gx[k] * ix[k]
                elif kx == NONE:
                    for j in range(Hu):
                        k = c + j
                        dxp[xr, k] = DP[iu, k]
                if kh == BATCH:
                    for j in range(Hu):
                        k = c + j
                        DA[oi, k] = ih[k] * (DYh[iu, k] * gh[k] - s1h[k] -
                                             ((np.float64(Ah[oi, k]) - mh[k]) * ih[k]) * s2h[k])
                elif kh == FIXED:
                    for j in range(Hu):
                        k = c + j
                        DA[oi, k] = DYh[iu, k] * gh[k] * ih[k]
                elif kh == NONE:
                    for j in range(Hu):
                        k = c + j
                        DA[oi, k] = DYh[iu, k]


@_jit(**_OPTS)
def _backward_loop(th, nt, RB, cell, rev, H, P, bs, off, dout, or0, ors, dhn, dcn, w, wr, sx, sh, sc,
                   xp, gates, cst, tcs, hprev, cprev, ghn,
                   dxp, xr0, xrs, dh0, dc0, DA, DHP, acc, gn,
                   DHs, DCs, Dd, DMd, DP, DPh, DX, DC, csum, PB, bar):
    """Thread ``th``'s part of the backpropagation through time of :func:`_forward_loop` on ``nt``
    threads (the same split; :func:`backward`).

    ``dout`` in the output's layout; ``dhn``/``dcn`` the gradients of the final states; ``xp``
    the forward's input projections. ``w`` = W_hh ``(G, P)``, ``wr`` = W_hr ``(P, H)``. Writes
    ``dxp`` (the input's layout), ``dh0``/``dc0``, ``DA`` (internal rows: the gradient of
    W_hh h_{t-1}, for dW_hh = DA^T hprev), ``DHP`` (LSTM with a projection: the gradient of each h_t,
    for dW_hr = DHP^T m); accumulates per thread (``acc[th]`` ``(7, max(G, H))``, float64) the sites'
    ``dgamma``/``dbeta`` (rows 0-5: x, h (row 3: the GRU's ``dbh``), c) and ``gn[th, t]``, the
    squared norm of dL/dh_t. ``csum`` ``(nt, 8, G)``: per-thread scratch; ``PB``, ``bar``: as
    :func:`_forward_loop`'s.

    Each step is the thread's ``_bwd_head`` (the previous step's ``dh = DA W_hh`` for its rows, the
    output gradient) then its ``_bwd_body``, on its blocks of rows as in the forward.
    """
    T = bs.shape[0]
    B = dhn.shape[0]
    lstm = cell == LSTM
    if rev:
        _copy_part(dhn, 0, DHs, 0, 0, B, 0, P, th, nt, RB)
        if lstm:
            _copy_part(dcn, 0, DCs, 0, 0, B, 0, H, th, nt, RB)
    # the step functions are called with one type per argument wherever they are called (numba compiles a
    # callee once per signature, a few seconds to a few tens each): no literal constants (numba types a
    # constant argument as a Literal, a signature of its own)
    zero = np.int64(0)
    bp = B if rev else zero
    op = zero
    for k in range(T):
        t = k if rev else T - 1 - k
        b = bs[t]
        o0 = off[t]
        _bwd_head(cell, rev, H, P, t, b, o0, bp, op, k > 0, np.bool_(False), th, nt, RB, th, dout, or0,
                  ors, dhn, dcn, w, dh0, dc0, DA, DHP, gn, DHs, DCs, Dd)
        _bwd_body(cell, H, P, t, b, o0, th, nt, RB, wr, sx, sh, sc, xp, gates, cst, tcs, hprev, cprev,
                  ghn, dxp, xr0, xrs, DA, acc[th], DHs, DCs, Dd, DMd, DP, DPh, DX, DC, csum[th], PB, k % 2,
                  bar)
        bp = b
        op = o0
    _bwd_head(cell, rev, H, P, zero, zero, zero, bp, op, np.bool_(True), np.bool_(True), th, nt, RB, th, dout,
              or0, ors, dhn, dcn, w, dh0, dc0, DA, DHP, gn, DHs, DCs, Dd)

@_jit(**_OPTS)
def _weight_grad_part(th, nt, D, X, out):
    """Thread ``th``'s rows of ``out = D^T X`` (``(G, N) x (N, F)``: the weight gradient of
    ``y = x W^T`` from the rows' output gradients D ``(N, G)`` and inputs X ``(N, F)``), the rows
    of ``out`` split over ``nt`` threads (the bits do not depend on the split)."""
    G = D.shape[1]
    F = X.shape[1]
    N = D.shape[0]
    g0 = (G * th // nt) // 4 * 4
    g1 = G if th == nt - 1 else (G * (th + 1) // nt) // 4 * 4
    if g1 > g0:
        gemm(D, g0, True, X, 0, out, g0 * F, g1 - g0, F, N, False)


@_jit(**_OPTS)
def _weight_grad_t_part(th, nt, D, X, outT):
    """Thread ``th``'s columns of ``outT = X^T D`` (``(F, N) x (N, G)``: the transpose of
    :func:`_weight_grad_part`'s product), the columns split over ``nt`` threads in whole vectors."""
    G = D.shape[1]
    F = X.shape[1]
    N = D.shape[0]
    VL = VECTOR_BYTES // D.itemsize
    nv = G // VL
    g0 = nv * th // nt * VL
    g1 = nv * (th + 1) // nt * VL
    if g1 > g0:
        gemm(X, 0, True, D, g0, outT, g0, F, g1 - g0, N, False)


#: the widest input (F) whose weight gradient is formed transposed (see :func:`weight_grad`)
_TRANSPOSED_MAX_F = 32


def transposed_ok(G: int, F: int, itemsize: int) -> bool:
    """Whether :func:`weight_grad` forms ``D^T X`` (``D`` ``(N, G)``, ``X`` ``(N, F)``) as the transpose
    of ``X^T D``: for a narrow X (F up to :data:`_TRANSPOSED_MAX_F`), with F and G whole vectors, where
    the two products have the same bits (every element one fused multiply-add chain over the rows in
    order, ``_KC_T`` rows a pass, in both)."""
    VL = VECTOR_BYTES // itemsize
    return 0 < F <= _TRANSPOSED_MAX_F and F % VL == 0 and G > 0 and G % VL == 0


def _PRANGE_ONLY() -> dict:
    """numba's parallel options with only ``prange`` on: no loop fusion (two ``prange`` loops in a row
    are two launches, the end of the first a barrier the second relies on), no implicit parallel
    array expressions."""
    return dict(prange=True, fusion=False, comprehension=False, reduction=False, inplace_binop=False, setitem=False,
                numpy=False, stencil=False)


# ------------------------------------------------------------------------------------------------
# moments of a layer's input rows (the folded vertical norm)

#: float64 bytes of a chunk of :func:`moments`' rows: a chunk converted to float64 is still in L1
#: when the covariance's blocks read it. Measured (one thread, AVX-512, float32 rows),
#: us by chunk size 8, 16, 32, 64 KiB: 3200 x 32 rows 116, 112, 117, 115; 2560 x 64 263, 262, 270,
#: 266; 1000 x 128 388, 370, 459, 468
MOMENT_CHUNK_BYTES = 1 << 15


@_jit(**_OPTS)
def _cov_chunk(xd, nc, sigma):
    """``sigma += xd[:nc]^T xd[:nc]``, its upper triangle (and some values below the diagonal,
    which :func:`moments` overwrites): rows in groups of 4, each group from the whole vector its
    diagonal lies in (the micro-kernel reads xd's rows directly: a group's 4 values and the
    vectors they multiply lie in the same row, so nothing is packed); rows past the last group and
    columns past the last whole vector as float64 sums."""
    F = xd.shape[1]
    VL = VECTOR_BYTES // 8
    F1 = F - F % VL
    F4 = F - F % 4
    BW = _WIDE * VL
    for i in range(0, F4, 4):
        j = i - i % VL
        c0 = i * F
        while j + BW <= F1:
            _TW4(xd, i, F, xd, j, F, sigma, c0 + j, F, nc, True)
            j += BW
        while j + 2 * VL <= F1:
            _T42(xd, i, F, xd, j, F, sigma, c0 + j, F, nc, True)
            j += 2 * VL
        while j + VL <= F1:
            _T41(xd, i, F, xd, j, F, sigma, c0 + j, F, nc, True)
            j += VL
    for i in range(F):
        for j in range(max(F1, i) if i < F4 else i, F):
            acc = 0.0
            for q in range(nc):
                acc += xd[q, i] * xd[q, j]
            sigma[i, j] += acc


@_jit(**_OPTS)
def moments(x, mu, mu_r, sigma, xc, chunk=0):
    """Float64 mean ``mu`` (shifted by the first row) and biased covariance ``sigma`` of the rows of
    ``x`` ``(N, F)``, the mean rounded to x's dtype in ``mu_r``, and ``xc = x - mu_r`` (in x's
    dtype, the rows the folded layer reads). ``x - mu`` is formed in float64 a chunk of rows at a
    time (``chunk`` rows; 0: :data:`MOMENT_CHUNK_BYTES` of them), each chunk's ``xd^T xd`` added to
    the covariance (:func:`_cov_chunk`) while it is in cache; the upper triangle, mirrored below the
    diagonal, divided by N. One thread: measured (2560 x 64, float32
    rows) a second thread made the call slower. Against converting every row first, then one packed
    :func:`gemm` over them (one thread, AVX-512): 3200 x 32 rows 218 -> 112 us, 2560 x 64 448 -> 262."""
    N, F = x.shape
    Fu = np.uint64(F)
    x0 = np.empty(F)
    s = np.zeros(F)  # local: the row loops below vectorize (no alias with the arguments)
    for j in range(Fu):
        x0[j] = x[0, j]
    for n in range(N):
        r = x[n]
        for j in range(Fu):
            s[j] += np.float64(r[j]) - x0[j]
    m64 = np.empty(F)
    for j in range(Fu):
        m = x0[j] + s[j] / N
        mu[j] = m
        mu_r[j] = m
        m64[j] = m
    for j in range(Fu):
        for k in range(j, Fu):
            sigma[j, k] = 0.0
    mr = mu_r.copy()  # local, as m64
    R = chunk if chunk > 0 else max(1, min(N, MOMENT_CHUNK_BYTES // (8 * max(F, 1))))
    xd = np.empty((R, F))
    for n0 in range(0, N, R):
        nc = min(R, N - n0)
        for q in range(nc):
            r = x[n0 + q]
            o = xc[n0 + q]
            d = xd[q]
            for j in range(Fu):
                d[j] = np.float64(r[j]) - m64[j]
                o[j] = r[j] - mr[j]
        _cov_chunk(xd, nc, sigma)
    for j in range(Fu):
        for k in range(j, Fu):
            v = sigma[j, k] / N
            sigma[j, k] = v
            sigma[k, j] = v


@_jit(**_OPTS)
def _fold_means_part(th, nt, dxc, M, Md, cm):
    """Thread ``th``'s columns of the first half of :func:`fold_rows_backward`: ``cm`` the column
    means of ``dxc``, ``Md = 2 M / N``."""
    N, F = dxc.shape
    k0 = np.uint64(F * th // nt)
    k1 = np.uint64(F * (th + 1) // nt)
    for a in range(k0, k1):
        src = M[a]
        dst = Md[a]
        for k in range(F):
            dst[k] = 2.0 * src[k] / N
    for k in range(k0, k1):
        cm[k] = 0.0
    for n in range(N):
        r = dxc[n]
        for k in range(k0, k1):
            cm[k] += r[k]
    for k in range(k0, k1):
        cm[k] /= N


@_jit(**_OPTS)
def _fold_rows_part(th, nt, dxc, xc, Md, drows, cm):
    """Thread ``th``'s rows of the second half: ``drows = xc Md + dxc - cm``."""
    N, F = xc.shape
    n0 = (N * th // nt) // 4 * 4
    n1 = N if th == nt - 1 else (N * (th + 1) // nt) // 4 * 4
    if n1 > n0:
        gemm(xc, n0 * F, False, Md, 0, drows, n0 * F, n1 - n0, F, F, False)
    for n in range(n0, n1):
        r = dxc[n]
        o = drows[n]
        for k in range(F):
            o[k] += np.float64(r[k]) - cm[k]

#: multiply-adds (``N * F * F``) of a fold's rows' gradient from which it is split over threads (at
#: 2560 x 64 rows two threads gained nothing; at 8000 x 128, 2.2 ms against 4.7)
_FOLD_PARALLEL_FROM = 1 << 24


def fold_rows_backward(dxc, xc, M, Md, drows):
    """``drows = dxc - mean_rows(dxc) + xc (2 M / N)``: the rows' gradient through the centring and
    the covariance (``Md`` ``(F, F)`` scratch in the rows' dtype). On the threads a call of its size
    gets (1 below :data:`_FOLD_PARALLEL_FROM`), two teams: the column means' columns split over
    them, then the product's rows (the bits do not depend on the thread count)."""
    N, F = xc.shape
    nt = _cpu.threads() if N * F * F >= _FOLD_PARALLEL_FROM else 1
    cm = np.zeros(F)
    team(_fold_means_part, nt, (dxc, M, Md, cm))
    team(_fold_rows_part, nt, (dxc, xc, Md, drows, cm))


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


vector_math = _quiet(_vector_math)


# ------------------------------------------------------------------------------------------------
# teams: one compiled body, on the calling thread or on numba's pool
#
# A team body ``body(th, nt, *args)`` is thread ``th``'s part of a call on ``nt`` threads. On one
# thread :func:`team` calls it directly: nothing touches numba's pool (the path of a child forked
# from an OpenMP process). On more, :func:`_team_launch` (``parallel=True``) runs ``prange(nt)``, each
# iteration calling the body's compiled code through its address. Calling it by address, not by
# name, is what keeps the body compiled once: numba links a callee's code into every caller and
# optimizes and emits it again there, so a parallel twin of the time loop (``prange`` around the body,
# a second dispatcher) optimized and emitted the whole loop twice more (numba's pool function and
# its launcher): on the 2-core machine 32 s (forward) and 40 s (backward) of compiling per dtype, more
# than the serial twin's whole compile with every callee; the warm-up's recurrent group took 374 s
# of compiling with the twins and 204 s with the teams. The launcher is a few lines, compiled (and
# cached) once per argument signature in 2-3 s.

@intrinsic
def _call_at(typingctx, addr, th, nt, args):
    """Call the numba-compiled function whose native entry point is at ``addr`` (numba's calling
    convention, returning None) with ``(th, nt, *args)``; 0 if it returned, 1 if it raised. ``args``
    are the leaves of the function's arguments in order (its tuple arguments spliced in: numba's
    convention passes every argument as its flattened leaves, and a ``prange`` body cannot take a
    tuple holding arrays)."""
    argtys = (th, nt) + tuple(args.types)

    def codegen(context, builder, signature, llargs):
        a, t, n, tup = llargs
        vals = [t, n] + [builder.extract_value(tup, i) for i in range(len(argtys) - 2)]
        fnty = context.call_conv.get_function_type(types.none, argtys)
        fn = builder.inttoptr(a, fnty.as_pointer())
        status, _ = context.call_conv.call_function(builder, fn, types.none, argtys, vals)
        return builder.select(status.is_ok, ir.Constant(ir.IntType(8), 0), ir.Constant(ir.IntType(8), 1))

    return types.int8(addr, th, nt, args), codegen


def _team_launch(addr, nt, err, *args):
    """``nt`` iterations on numba's pool, iteration ``th`` calling the body at ``addr`` with
    ``(th, nt, *args)`` (``args``: the leaves, as :func:`_call_at` takes them); ``err[th]``: 1 where
    it raised."""
    for tid in prange(nt):
        err[tid] = _call_at(addr, np.int64(tid), nt, args)


_team_launch = _jit(parallel=_PRANGE_ONLY(), **_OPTS)(_team_launch)
_ADDRESSES: dict = {}  # (body, the arguments' fingerprints) -> native entry point


def _address(body, args) -> int:
    """The native entry point of ``body`` compiled for ``(int64, int64, *args)`` (compiled, or loaded
    from numba's cache, on first use)."""
    key = (body, tuple(map(compute_fingerprint, args)))
    addr = _ADDRESSES.get(key)
    if addr is None:
        sig = (types.int64, types.int64) + tuple(typeof(a) for a in args)
        body.compile(sig)
        cres = body.overloads[sig]
        addr = _ADDRESSES[key] = cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)
    return addr


def _leaves(args) -> list:
    out = []
    for a in args:
        if isinstance(a, tuple):
            out.extend(_leaves(a))
        else:
            out.append(a)
    return out


def team(body, nt, args) -> None:
    """``body(th, nt, *args)`` for ``th < nt`` on ``nt`` threads of numba's pool (its thread count set
    for this launch only, as :mod:`bnlab.kernels.cpu` does), or ``body(0, 1, *args)`` on the calling
    thread when ``nt`` is 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumbaIRAssumptionWarning)
        if nt <= 1:
            body(0, 1, *args)
            return
        addr = _address(body, args)
        err = np.zeros(nt, np.int8)
        prev = _cpu._enter(nt)
        try:
            _team_launch(addr, nt, err, *_leaves(args))
        finally:
            if prev:
                _cpu._set_threads(prev)
    if err.any():
        raise RuntimeError(f"bnlab: {body.py_func.__name__} raised on {int(err.sum())} of its {nt} threads")


def forward(nt, RB, *args):
    """:func:`_forward_loop` on a team of ``nt`` threads (:func:`team`), in blocks of ``RB`` rows."""
    team(_forward_loop, nt, (RB,) + args)


def backward(nt, RB, *args):
    """:func:`_backward_loop` on a team of ``nt`` threads (:func:`team`), in blocks of ``RB`` rows."""
    team(_backward_loop, nt, (RB,) + args)


def weight_grad(D, X, out, nt=1):
    """``out = D^T X`` (:func:`_weight_grad_part`) on ``nt`` threads.

    A narrow X (:func:`transposed_ok`) is multiplied the other way round, ``out^T = X^T D``: the
    product's rows are then X's few columns, and the micro-kernel packs 4 of them at a time from
    adjacent values of a row of X (one cache line), each packed group feeding a thread's share of
    G columns; ``D^T X`` packs 4 columns of D, each value a row of D (G values) from the next, and
    each packed group feeds only F columns. The same bits. Measured (2 threads, float32, AVX-512), alone: 3200 x 512 by 3200 x 32 0.88 -> 0.69
    ms, 2560 x 256 by 2560 x 64 0.52 -> 0.45 (torch.mm 0.53, 0.34), 3200 x 512 by 3200 x 128 1.78 ->
    1.93; inside a training step of the fused LSTM (its input projection's weight gradient) 1.17-1.25
    -> 0.98-1.00 ms at F = 32, no gain at F = 64: hence the limit on F."""
    if transposed_ok(D.shape[1], X.shape[1], D.itemsize):
        outT = np.empty((X.shape[1], D.shape[1]), D.dtype)
        team(_weight_grad_t_part, nt, (D, X, outT))
        out[...] = outT.T
        return
    team(_weight_grad_part, nt, (D, X, out))


# ------------------------------------------------------------------------------------------------
# the folded vertical norm, one direction (see recurrent._FoldCpuFn)

@_jit(**_OPTS)
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
    gemm(wd, 0, False, sigma, 0, ws, 0, G, F, F, False)
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


@_jit(**_OPTS)
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
    gemm(dvw, 0, True, wd, 0, M, 0, F, F, G, True)
