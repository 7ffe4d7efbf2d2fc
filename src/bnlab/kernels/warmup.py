"""Warm bnlab's kernel JIT cache: ``python -m bnlab.kernels.warmup`` (run by `make setup`/`make test`).

Compiles every kernel for every layout, dtype and parameter combination the library reaches
(rows and columns layouts, float32 and float64, with and without an affine weight, training and
eval, forward and backward, the running-statistics update; batch renormalization's forward and the
statistics-only kernel of :mod:`bnlab.kernels.stats`), small inputs (one thread) and large ones
(the thread pool) alike, and then the serial twins a forked child runs
(:func:`bnlab.kernels.cpu.serial_kernels`), so that the first batch norm in a fresh process, or in
a DataLoader fork worker, loads compiled code from numba's on-disk cache (``cache=True``, next to
the kernels' source) instead of compiling.

Then the fused batch norm + activation kernels (:func:`bnlab.kernels.cpu.act_kernels`) that
``bnlab.nn.BatchNormAct*`` runs: relu (silu and gelu run torch's activation after the kernels' batch
norm), with and without a residual, float32 and float64, both layouts, training and eval (and the
forwards without an activation, called directly, with and without a residual); on the thread pool
in float32 (float64: the float64 group); of their serial twins only relu's in float32 (a forked
child compiles the others on its first call of them, a few seconds each, once per cache).

Then the small-call path's C++ extension (:mod:`bnlab.kernels.fast`, about 40 s of one core alone
with a C++ compiler, under two minutes beside the numba compiles, in a process of its own): built once per
source, torch and Python version; without a compiler it is skipped with a note and the numba
kernels serve every call.

Then, unless ``--plain``, two more groups:

* ``float64``: the fused kernels' float64 variants on the thread pool (relu and none, with and
  without a residual), which a float64 tensor above ``Thresholds.serial_below`` elements reaches;
  in the extension's process, after its build;
* ``recurrent``: the recurrent layers' whole-sequence kernels (:func:`warm_recurrent`, with the
  audit's stacked linear products of :mod:`bnlab.lab._stacked`, which run on the same matrix
  micro-kernel), in a second process (``--jobs``, default 2: numba compiles on one core).

``--only GROUP...`` runs the named groups (kernels, float64, recurrent, fast) in this process, in
that order.

A warm cache makes this command itself take a few seconds. A cold one (a fresh checkout, or after
any edit to the kernels' sources, which recompiles them all: :mod:`bnlab.kernels._jit`) took about
7 minutes on a 2-core AVX2 machine (2026-12-03, a fresh clone: 403 s, the kernels group the
longest, the recurrent group 321 s beside it, the C++ extension 94 s and then the float64 group
162 s in the third process; on the same machine 610 s before the recurrent loops were compiled
once instead of as parallel and serial twins and the unused SiLU/GELU kernel variants were
removed); ``--plain`` stops after the plain kernels (about a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import torch


def warmup(fused: bool = True) -> float:
    import bnlab.functional as BF
    from bnlab.kernels import cpu

    t0 = time.perf_counter()
    shapes = [
        ((4, 3, 5, 5), None), ((4, 3, 5, 5), torch.channels_last), ((6, 3), None), ((4, 3, 5), None),
        ((2, 3, 2, 2, 2), None), ((2, 3, 2, 2, 2), torch.channels_last_3d),
        ((8, 3, 48, 48), None), ((8, 3, 48, 48), torch.channels_last), ((8192, 3), None),  # above SERIAL_BELOW
    ]
    assert 8 * 3 * 48 * 48 > cpu.SERIAL_BELOW
    for serial in (False, True):
        with _serial_kernels(cpu, serial):
            _pass(BF, shapes)
    if fused:
        for act in ("relu",):  # what bnlab.nn.BatchNormAct* fuses (silu, gelu: torch's activation after the batch norm)
            for dtype in (torch.float32, torch.float64):
                _fused_pass(cpu, act, dtype, (False, True))
        for dtype in (torch.float32, torch.float64):  # without an activation: the forwards, called directly
            # (a loaded C++ extension serves batch_norm's own training forward), with and without a residual
            _fused_pass(cpu, "none", dtype, (False, True))
        with _serial_kernels(cpu, True):
            _fused_pass(cpu, "relu", torch.float32, (False, True))
    return time.perf_counter() - t0


@contextlib.contextmanager
def _serial_kernels(cpu, on: bool):
    """Every kernel call on the serial twins (``on``) or as planned, back to as planned after."""
    cpu.use_serial_kernels(on)
    try:
        yield
    finally:
        cpu.use_serial_kernels(False)


def _pass(BF, shapes) -> None:
    from bnlab.kernels.stats import batch_stats
    from bnlab.nn.renorm import batch_renorm

    for dtype in (torch.float32, torch.float64):
        for shape, fmt in shapes:
            for affine in (True, False):
                x = torch.randn(shape, dtype=dtype)
                if fmt is not None:
                    x = x.contiguous(memory_format=fmt)
                x.requires_grad_(True)
                w = torch.ones(3, dtype=dtype, requires_grad=True) if affine else None
                b = torch.zeros(3, dtype=dtype, requires_grad=True) if affine else None
                rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
                nbt = torch.tensor(0)
                y = BF.batch_norm(x, rm, rv, w, b, training=True, num_batches_tracked=nbt)
                y.backward(torch.ones_like(y))
                ye = BF.batch_norm(x, rm, rv, w, b, training=False)
                ye.backward(torch.ones_like(ye))
                # batch renormalization's forward kernel (its backward is batch norm's) and the
                # statistics-only kernel (bnlab.kernels.stats)
                yr = batch_renorm(x, rm, rv, w, b, training=True, num_batches_tracked=nbt, r_max=2.0, d_max=1.0)
                yr.backward(torch.ones_like(yr))
                batch_stats(x.detach(), 1e-5)


_FUSED_SHAPES = (((4, 3, 5, 5), None), ((4, 3, 5, 5), torch.channels_last))  # a rows and a columns kernel


def _fused_pass(cpu, act, dtype, residuals, pool_only: bool = False) -> None:
    """Every kernel of one activation and dtype: the compiled signature depends on the dtype and on
    whether a residual is given, not on the shape within a layout or on the affine parameters.
    The pool's kernels run too in float32 (the float64 ones have their own group,
    :func:`warm_float64`); ``pool_only``: only them."""
    # the small shapes plan serial: the pool's kernels are reached by planning every size parallel
    pool = cpu.Thresholds(serial_below=0)
    if cpu._serial_only:  # a forked child: only the serial twins run
        plans = (cpu.DEFAULT_THRESHOLDS,)
    elif pool_only:
        plans = (pool,)
    elif dtype == torch.float32:
        plans = (cpu.DEFAULT_THRESHOLDS, pool)
    else:
        plans = (cpu.DEFAULT_THRESHOLDS,)
    for shape, fmt in _FUSED_SHAPES:
        x = torch.randn(shape, dtype=dtype)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        w, b = torch.ones(3, dtype=dtype), torch.zeros(3, dtype=dtype)
        for with_res in residuals:
            res = torch.randn_like(x) if with_res else None
            for th in plans:
                y, stats, _ = cpu.forward_train(x, w, b, 1e-5, act=act, residual=res, thresholds=th)
                cpu.forward_eval(x, w, b, stats, act=act, residual=res, thresholds=th)
                if act != "none":
                    for train in (True, False):
                        cpu.backward_act(torch.ones_like(y), x, w, b, stats, train, act, res, thresholds=th)


def warm_float64() -> float:
    """The fused kernels' float64 variants on numba's thread pool (relu and none, with and without
    a residual, both layouts): a float64 tensor above ``Thresholds.serial_below`` elements reaches
    them (the small ones run the serial twins the kernels group warms)."""
    from bnlab.kernels import cpu

    t0 = time.perf_counter()
    for act in ("relu", "none"):
        _fused_pass(cpu, act, torch.float64, (False, True), pool_only=True)
    return time.perf_counter() - t0


def warm_recurrent() -> float:
    """The recurrent layers' whole-sequence kernels (:mod:`bnlab.nn._recurrent_kernels`): forward,
    backward and weight gradient (each compiled once, run on the calling thread or by a team launch on
    numba's pool: :func:`bnlab.nn._recurrent_kernels.team`), float32 and float64, and the
    folded vertical norm's kernels; by running small BNLSTM / BNGRU / BNRNN layers (training and
    eval, equal and variable lengths) once on each thread count."""
    import bnlab.nn._projection as PR
    import bnlab.nn._recurrent_kernels as RK
    import bnlab.nn.recurrent as R
    from bnlab.kernels import cpu
    from bnlab.nn import BNGRU, BNLSTM, BNRNN

    t0 = time.perf_counter()
    old_from, old_proj, old_fold = R._PARALLEL_FROM, PR._PARALLEL_FROM, RK._FOLD_PARALLEL_FROM
    old_threads = torch.get_num_threads()
    # split every call (the input projection and the fold's rows gradient too), however small
    R._PARALLEL_FROM = PR._PARALLEL_FROM = RK._FOLD_PARALLEL_FROM = 0
    # 9 rows: blocks of 4 rows or more, enough for two threads (fewer run on the calling thread)
    lengths = torch.tensor([3, 1, 3, 2, 3, 3, 2, 1, 3])
    try:
        for nt in sorted({1, min(2, cpu._MAX_THREADS)}):
            torch.set_num_threads(nt)
            for dtype in (torch.float32, torch.float64):
                for cls, kw in ((BNLSTM, {}), (BNLSTM, {"proj_size": 3}), (BNGRU, {}), (BNRNN, {})):
                    for norm in ("vertical", "horizontal", "per_timestep", "layer"):  # their sites' array types differ
                        m = cls(3, 40, 1, batch_first=True, norm=norm, dtype=dtype, **kw)
                        for train in (True, False):
                            m.train(train)
                            for lens in (None, lengths):  # (unused final states get zero gradients: one signature)
                                x = torch.randn(9, 3, 3, dtype=dtype, requires_grad=True)
                                with warnings.catch_warnings():  # torch: "LSTM with projections ... oneDNN"
                                    warnings.simplefilter("ignore", UserWarning)
                                    m(x, lengths=lens)[0].sum().backward()
        _warm_stacked(cpu)
    finally:
        R._PARALLEL_FROM, PR._PARALLEL_FROM, RK._FOLD_PARALLEL_FROM = old_from, old_proj, old_fold
        torch.set_num_threads(old_threads)
    return time.perf_counter() - t0


def _warm_stacked(cpu) -> None:
    """The audit's stacked linear layers' products (:mod:`bnlab.lab._stacked`, on the recurrent
    layers' matrix micro-kernel): every layout, forward and backward, float32 and float64, serial
    and on numba's pool."""
    from bnlab.lab._stacked import stacked_matmul

    for nt in sorted({1, min(2, cpu._MAX_THREADS)}):
        torch.set_num_threads(nt)
        for dtype in (torch.float32, torch.float64):
            w = torch.randn(2, 3, 4, dtype=dtype, requires_grad=True)
            for layout, shape in (("stacked", (5, 6)), ("shared", (5, 3)), ("members", (2, 5, 3))):
                for members_first in (False, True):
                    x = torch.randn(shape, dtype=dtype, requires_grad=True)
                    stacked_matmul(x, w, layout, members_first).sum().backward()


def warm_fast() -> float:
    """Build (or load) the C++ extension of the small-call path; a failed build is reported and
    leaves the numba kernels serving every call."""
    import os

    from bnlab.kernels import fast

    t0 = time.perf_counter()
    if os.environ.get("BNLAB_FAST", "1") == "0":
        print("bnlab: BNLAB_FAST=0, the small-call extension is not built", flush=True)
        return 0.0
    if fast.ext is not None:
        # a build of this very source, flags, torch and Python loaded at import: nothing to do (torch's
        # builder would compile it again from another checkout, its ninja file naming the source's path)
        return time.perf_counter() - t0
    try:
        fast.build()
    except Exception as e:  # no compiler, no headers: the library runs without the extension
        lines = str(e).strip().splitlines()
        print(f"bnlab: the small-call C++ extension did not build ({type(e).__name__}: "
              f"{lines[-1] if lines else ''}); every batch norm runs on the numba kernels", flush=True)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bnlab.kernels.warmup", description=__doc__.splitlines()[0])
    p.add_argument("--plain", action="store_true", help="only the plain batch-norm kernels")
    p.add_argument("--only", nargs="+", choices=tuple(_GROUPS), default=None, metavar="GROUP",
                   help="the named groups, in the order given: kernels (the batch-norm kernels, plain and relu-fused), "
                        "float64 (the fused kernels' float64 variants on the thread pool), recurrent (the "
                        "recurrent layers' kernels), fast (the small-call C++ extension)")
    p.add_argument("--jobs", type=int, default=2,
                   help="processes compiling at once (numba compiles on one core; default: %(default)s)")
    a = p.parse_args(argv)
    if a.plain:
        warm_fast()
        print(f"bnlab kernels warm ({warmup(fused=False):.1f} s)", flush=True)
        return
    if a.only is not None:
        for group in a.only:
            print(f"bnlab {group} kernels warm ({_GROUPS[group]():.1f} s)", flush=True)
        return
    t0 = time.perf_counter()
    if a.jobs > 1:  # the recurrent kernels (the longest group) in a second process, at the same time
        import subprocess
        import sys

        child = subprocess.Popen([sys.executable, "-m", "bnlab.kernels.warmup", "--only", "recurrent"])
        # the extension's build (a C++ compiler on one core), then the float64 group
        ext = subprocess.Popen([sys.executable, "-m", "bnlab.kernels.warmup", "--only", "fast", "float64"])
        try:
            warmup()
        finally:
            if ext.wait() != 0:  # (a failed build has said so and is not fatal: this is the float64 group)
                raise SystemExit(f"bnlab.kernels.warmup: the extension and float64 process failed (exit {ext.returncode})")
            if child.wait() != 0:
                raise SystemExit(f"bnlab.kernels.warmup: the recurrent kernels' process failed (exit {child.returncode})")
    else:
        warm_fast()
        warmup()
        warm_float64()
        warm_recurrent()
    print(f"bnlab kernels warm, every group ({time.perf_counter() - t0:.1f} s)", flush=True)


_GROUPS = {"kernels": warmup, "float64": warm_float64, "recurrent": warm_recurrent, "fast": warm_fast}

if __name__ == "__main__":
    main()
