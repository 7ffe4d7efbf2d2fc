"""LLVM-level building blocks of bnlab's CPU kernels (numba intrinsics).

* :func:`_prefetch`: a software prefetch of one cache line.
* non-temporal lines: one whole 64-byte line of output computed as one explicit full-width float64
  vector, with the scalar loops' operations in the scalar loops' order (so the same bits), rounded
  to the output dtype and stored straight to memory, without the read-for-ownership of a normal
  store (:func:`_nt_affine_line`, :func:`_nt_dx_line`, :func:`_nt_scale_line`), and the fence a
  thread ends such stores with (:func:`_store_fence`). The fused activations' lines
  (:func:`_nt_act_line`, :func:`_nt_act_dx_line`) apply the activation, or its derivative, to the
  vector with the scalar code's operations in its order; ``exp`` (``llvm.exp``) and ``erf`` (the C
  library's, as numba calls it) are the same functions per element.
* lane loops: the rows layout's float64 sums over a span, accumulated in :data:`LANES` lanes held
  in vector registers for the whole loop (:func:`_lane_loop`, :func:`_grad_lane_loop`,
  :func:`_buf_grad_lane_loop`). Without ``fastmath`` LLVM does not vectorize a floating-point
  reduction by itself.

Everything here is typed on float32/float64 arrays and is called from the compiled helpers of
:mod:`._serial`, :mod:`.rows` and :mod:`.cols`.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

# activations of the fused epilogue: module constants (not an IntEnum: numba passes a global int to
# a helper as a literal and compiles the helper once per value; bnlab.kernels.cpu.Act names them)
NONE = 0  # y = z
RELU = 1  # y = max(z, 0)


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


def _splat(value: float, width: int):
    return ir.Constant(ir.VectorType(ir.DoubleType(), width), [value] * width)


def _vec_act(builder, z, act: int):
    """``act(z)``: the operations of :func:`bnlab.kernels._serial._act`, in its order."""
    if act == RELU:
        zero = _splat(0.0, z.type.count)
        return builder.select(builder.fcmp_ordered("<", z, zero), zero, z)
    return z


def _vec_act_dz(builder, g, z, act: int):
    """``dz = g * act'(z)``: the operations of :func:`bnlab.kernels._serial._act_dz`, in its order."""
    if act == RELU:
        zero = _splat(0.0, z.type.count)
        return builder.select(builder.fcmp_ordered(">", z, zero), g, zero)
    return g


def _act_literal(act):
    return act.literal_value if isinstance(act, types.IntegerLiteral) and act.literal_value in (
        NONE, RELU) else None


def _same_or_none(t, dtype) -> bool:
    return isinstance(t, types.NoneType) or (_float_arrays(t) and t.dtype == dtype)


def _z_line(context, builder, sig, args, ix, ires, idx, imean, iscale, ibeta, off, width):
    """``z = (x - mean) * scale + beta (+ res)`` of one line, and ``x - mean``."""
    xv = _line_load(context, builder, sig.args[ix], args[ix], idx)
    mu, sc, be = (_line_operand(context, builder, sig.args[i], args[i], off, width) for i in (imean, iscale, ibeta))
    d = builder.fsub(xv, mu)
    z = builder.fadd(builder.fmul(d, sc), be)
    if not isinstance(sig.args[ires], types.NoneType):
        z = builder.fadd(z, _line_load(context, builder, sig.args[ires], args[ires], idx))
    return z, d


@intrinsic
def _nt_act_line(typingctx, x, res, y, idx, mean, scale, beta, off, act):
    """``y = act((x - mean) * scale + beta (+ res))`` on one cache line of ``y`` from ``idx`` (64-byte
    aligned), stored non-temporally; operands as in :func:`_nt_affine_line`, ``res`` an array or
    None, ``act`` a literal activation."""
    a = _act_literal(act)
    if not (_float_arrays(x, y) and x.dtype == y.dtype and _same_or_none(res, x.dtype) and a is not None):
        return None

    def codegen(context, builder, sig, args):
        width = 64 // sig.args[0].dtype.bitwidth * 8
        z, _ = _z_line(context, builder, sig, args, 0, 1, args[3], 4, 5, 6, args[7], width)
        _line_store_nt(context, builder, sig.args[2], args[2], args[3], _vec_act(builder, z, a))
        return context.get_dummy_value()

    return types.void(x, res, y, idx, mean, scale, beta, off, act), codegen


@intrinsic
def _nt_act_dx_line(typingctx, x, dy, res, dx, dres, idx, mean, k, beta, mdz, kx, off, act, train):
    """The fused backward on one cache line from ``idx`` (64-byte aligned in ``dx`` and, if an
    array, ``dres``), stored non-temporally: ``z = (x - mean) * k + beta (+ res)``,
    ``dz = dy * act'(z)``; ``dx = k * ((dz - mdz) - (x - mean) * kx)`` when ``train``, else
    ``dz * k``; ``dres = dz``."""
    a = _act_literal(act)
    if not (_float_arrays(x, dy, dx) and x.dtype == dy.dtype == dx.dtype and _same_or_none(res, x.dtype)
            and _same_or_none(dres, x.dtype) and a is not None and isinstance(train, types.Boolean)):
        return None

    def codegen(context, builder, sig, args):
        width = 64 // sig.args[0].dtype.bitwidth * 8
        idx = args[5]
        z, d = _z_line(context, builder, sig, args, 0, 2, idx, 6, 7, 8, args[11], width)
        g = _vec_act_dz(builder, _line_load(context, builder, sig.args[1], args[1], idx), z, a)
        kk, md, kxx = (_line_operand(context, builder, sig.args[i], args[i], args[11], width) for i in (7, 9, 10))
        trained = builder.fmul(kk, builder.fsub(builder.fsub(g, md), builder.fmul(d, kxx)))
        r = builder.select(context.cast(builder, args[13], sig.args[13], types.boolean), trained, builder.fmul(g, kk))
        _line_store_nt(context, builder, sig.args[3], args[3], idx, r)
        if not isinstance(sig.args[4], types.NoneType):
            _line_store_nt(context, builder, sig.args[4], args[4], idx, g)
        return context.get_dummy_value()

    return types.void(x, dy, res, dx, dres, idx, mean, k, beta, mdz, kx, off, act, train), codegen


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


def _lane_loop_intrinsic(grad: bool, buffered: bool = False):
    def impl(typingctx, x, dy, start, count, ref, a1, a2):
        if not (_float_arrays(x, dy, a1, a2) and isinstance(ref, types.Float)
                and isinstance(start, types.Integer) and isinstance(count, types.Integer)):
            return None
        if not (dy.dtype == types.float64 if buffered else x.dtype == dy.dtype):
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
                g = _vec_load(context, builder, sig.args[1], args[1], i if buffered else idx, width)
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
#   buffered grad sums: the same, ``dy`` a float64 buffer read from its start (value j of the
#                       span at ``dy[j]``: the fused activation's gradient, computed a chunk at a time)
_lane_loop = _lane_loop_intrinsic(False)
_grad_lane_loop = _lane_loop_intrinsic(True)
_buf_grad_lane_loop = _lane_loop_intrinsic(True, buffered=True)
