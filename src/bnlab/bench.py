"""``bnlab bench``: bnlab's batch norm against torch's native kernel, timed the same way.

Both sides run in one process, 2 threads (``--threads``) for torch and numba, training mode,
float32. A step is ``y = bn(x)`` (forward) or ``y = bn(x); y.backward(dy)`` with a fixed ``dy``
(forward+backward); every gradient is reset to None before each step, outside the timed region.
The two contenders alternate step by step (interleaved, the order flipping every round), and
each figure is the median of ``--repeats`` (at least 20) timed rounds after a warm-up. Absolute
times drift on shared machines; the ratios, taken in one run, are the figures to compare.

Reported per shape, layout, path (functional and module) and pass:

* median ms of bnlab and of torch, and the ratio torch / bnlab (> 1: bnlab is faster);
* effective GB/s under the minimal traffic model of a batch-norm step: the forward reads ``x``
  twice and writes ``y`` (3 tensor sizes); the backward reads ``x`` and ``dy`` twice and writes
  ``dx`` (5 more, 8 in all for forward+backward);
* the machine's streaming bandwidth measured in the same run (a parallel numba scale-copy over
  256 MB, and over 16 MB, which stays in the last-level cache; read + write counted, the
  write-allocate read not), what a plain copy gets: an effective figure above it means the
  kernel moves less than the model's tensor sizes through memory (bnlab's rows layout re-reads
  a channel from its own cache, and its large-tensor passes store whole lines non-temporally,
  without the write-allocate read);
* the cost of the first batch norm in a fresh process: a subprocess imports torch and bnlab
  (timed; importing bnlab starts numba's runtime), takes one torch.nn.BatchNorm2d step (torch's
  own one-time costs), then times bnlab's first NCHW and channels_last steps against the later
  ones, and reports whether bnlab's kernel served them and whether numba loaded them from its
  on-disk cache (filled by ``python -m bnlab.kernels.warmup``).

The targets ("bar") are checked on forward+backward, both paths: >= 1.4x native NCHW and >= 1.2x
native channels_last on the 4-D shapes of >= 8 MB, >= 1.0x on every other shape but the two small
2-D ones, where the Python around a call is a large share (>= 0.9x on 256x512 and 64x128), and the
first call < 0.3 s extra.

Shapes: 64x64x32x32, 256x32x16x16, 32x256x8x8, 8x128x64x64 (BatchNorm2d; NCHW and channels_last,
each against torch on the same layout), 1024x512, 256x512 and 64x128 (BatchNorm1d). ``--quick``
runs two small shapes with a few rounds (a smoke test, not a measurement).

Batch renormalization: on every 4-D shape and layout, :class:`bnlab.nn.BatchRenorm2d` (defaults:
r_max 3, d_max 5) is timed against bnlab's BatchNorm2d and torch's, the three interleaved in the
same rounds (rows with ``"layer": "BatchRenorm2d"``: ``bnlab_ms`` is the renorm layer's time,
``bnlab_bn_ms`` bnlab's batch norm's, ``vs_bnlab_bn`` their ratio, renorm / batch norm). They are
reported in their own table and are not part of the bar above.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numba
import numpy as np
import torch
from numba import njit, prange

import bnlab
import bnlab.functional as BF
from .bench_models import _quartiles

FULL_SHAPES = [(64, 64, 32, 32), (256, 32, 16, 16), (32, 256, 8, 8), (8, 128, 64, 64), (1024, 512), (256, 512),
               (64, 128)]
QUICK_SHAPES = [(32, 256, 8, 8), (1024, 512)]
FWD_SIZES = 3  # tensor sizes moved by a forward: read x twice, write y
STEP_SIZES = 8  # forward + backward: + read x and dy twice, write dx

# the targets, forward+backward, both paths
BAR_LARGE_MB = 8.0
BAR_NCHW = 1.4
BAR_CHANNELS_LAST = 1.2
BAR_EVERY = 1.0
BAR_SMALL_2D = 0.9  # 256x512 and 64x128: the Python around a call is a large share of it
SMALL_2D = ((256, 512), (64, 128))
BAR_FIRST_CALL_S = 0.3


# ----------------------------------------------------------------------------------------------
# streaming bandwidth


@njit(parallel=True, cache=True)
def _scale_copy(a, b, s):
    for i in prange(a.size):
        b[i] = a[i] * s


def streaming_bandwidth(nbytes: int, repeats: int) -> float:
    """GB/s of ``b = s * a`` over two float32 arrays of ``nbytes`` each (read + write counted)."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    _scale_copy(a, b, 1.0)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _scale_copy(a, b, 1.0)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------------------------
# contenders


def _label(shape, channels_last: bool) -> str:
    return "x".join(map(str, shape)) + (" cl" if channels_last else "")


def _make_case(shape, channels_last: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    dy = torch.randn(shape, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    return x, dy


def _contenders(shape, path: str):
    """``(bnlab_fn, torch_fn, params_b, params_t)``: callables of x for one path."""
    c = shape[1]
    if path == "module":
        bcls = bnlab.nn.BatchNorm2d if len(shape) == 4 else bnlab.nn.BatchNorm1d
        tcls = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
        mb, mt = bcls(c).train(), tcls(c).train()
        return mb, mt, list(mb.parameters()), list(mt.parameters())

    def state():
        return torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True), torch.zeros(c), torch.ones(c)

    wb, bb, rmb, rvb = state()
    wt, bt, rmt, rvt = state()

    def fb(x):
        return BF.batch_norm(x, rmb, rvb, wb, bb, training=True, momentum=0.1, eps=1e-5)

    def ft(x):
        return torch.nn.functional.batch_norm(x, rmt, rvt, wt, bt, training=True, momentum=0.1, eps=1e-5)

    return fb, ft, [wb, bb], [wt, bt]


def _timed(fn, x, params, dy):
    x.grad = None
    for p in params:
        p.grad = None
    t = time.perf_counter()
    y = fn(x)
    if dy is not None:
        y.backward(dy)
    return time.perf_counter() - t


def time_pair(fb, ft, xb, xt, pb, pt, dy, repeats: int, warmup: int, advance=None) -> tuple[float, float, tuple]:
    """Median seconds of bnlab and torch, one step each per round, order flipped every round, and
    the noise band: the quartiles of the per-round ratios torch / bnlab (the two steps of a round
    run back to back, so the band is what the machine's other work did to the pair; as in the
    model suite, :func:`bnlab.bench_models._quartiles`)."""
    tb, tt = [], []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for i in range(warmup + repeats):
            if i % 2 == 0:
                b = _timed(fb, xb, pb, dy)
                t = _timed(ft, xt, pt, dy)
            else:
                t = _timed(ft, xt, pt, dy)
                b = _timed(fb, xb, pb, dy)
            if i >= warmup:
                tb.append(b)
                tt.append(t)
                if advance is not None:
                    advance()
    finally:
        if gc_was:
            gc.enable()
    return statistics.median(tb), statistics.median(tt), _quartiles([t / b for t, b in zip(tt, tb)])


def time_many(fns: dict, xs: dict, params: dict, dy, repeats: int, warmup: int, advance=None) -> dict:
    """Median seconds of each contender, one step each per round, the order rotating every round."""
    keys = list(fns)
    times: dict = {k: [] for k in keys}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for i in range(warmup + repeats):
            order = keys[i % len(keys):] + keys[:i % len(keys)]
            if i % 2:
                order.reverse()
            for k in order:
                t = _timed(fns[k], xs[k], params[k], dy)
                if i >= warmup:
                    times[k].append(t)
            if i >= warmup and advance is not None:
                advance()
    finally:
        if gc_was:
            gc.enable()
    return {k: statistics.median(v) for k, v in times.items()}


def _renorm_rows(shape, cl: bool, x, dy, mb: float, repeats: int, warmup: int, advance=None) -> list[dict]:
    """bnlab's BatchRenorm2d against bnlab's BatchNorm2d and torch's, in the same rounds."""
    c = shape[1]
    fns = {"renorm": bnlab.nn.BatchRenorm2d(c).train(), "bn": bnlab.nn.BatchNorm2d(c).train(),
           "torch": torch.nn.BatchNorm2d(c).train()}
    xs = {k: x.clone().requires_grad_() for k in fns}
    params = {k: list(m.parameters()) for k, m in fns.items()}
    for k in fns:
        for _ in range(warmup):
            _timed(fns[k], xs[k], params[k], dy)
    rows = []
    for pss in ("fwd", "fwd+bwd"):
        sec = time_many(fns, xs, params, dy if pss == "fwd+bwd" else None, repeats, warmup, advance)
        sizes = FWD_SIZES if pss == "fwd" else STEP_SIZES
        rows.append({
            "shape": list(shape), "label": _label(shape, cl), "dims": len(shape),
            "layout": "channels_last" if cl else "nchw", "mb": mb, "path": "BatchRenorm2d module",
            "layer": "BatchRenorm2d", "pass": pss,
            "bnlab_ms": sec["renorm"] * 1e3, "torch_ms": sec["torch"] * 1e3, "ratio": sec["torch"] / sec["renorm"],
            "bnlab_gbs": sizes * mb / 1e3 / sec["renorm"], "torch_gbs": sizes * mb / 1e3 / sec["torch"],
            "bnlab_bn_ms": sec["bn"] * 1e3, "vs_bnlab_bn": sec["renorm"] / sec["bn"],
        })
    return rows


def run_bn_suite(args, progress=None) -> dict:
    quick = bool(getattr(args, "quick", False))
    repeats = int(getattr(args, "repeats", 25) or 25)
    repeats = min(repeats, 5) if quick else max(repeats, 20)
    warmup = 2 if quick else 5
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    cases = [(s, cl) for s in shapes for cl in ((False, True) if len(s) == 4 else (False,))]
    paths, passes = ("functional", "module"), ("fwd", "fwd+bwd")
    task = None
    if progress is not None:
        n4 = sum(1 for s_, _ in cases if len(s_) == 4)  # + BatchRenorm2d on each 4-D case
        task = progress.add_task("bn kernels", total=(len(cases) * len(paths) + n4) * len(passes) * repeats)
    advance = (lambda: progress.advance(task)) if progress is not None else None
    rows = []
    for shape, cl in cases:
        x, dy = _make_case(shape, cl)
        mb = x.numel() * x.element_size() / 1e6
        contenders = {}
        for path in paths:
            fb, ft, pb, pt = _contenders(shape, path)
            contenders[path] = (fb, ft, x.clone().requires_grad_(), x.clone().requires_grad_(), pb, pt)
        # one warm-up over every case of the shape first, so that the allocator holds the step's
        # working set before the first timed case (else that case pays fresh-page faults)
        for fb, ft, xb, xt, pb, pt in contenders.values():
            for _ in range(warmup):
                _timed(fb, xb, pb, dy)
                _timed(ft, xt, pt, dy)
        for path in paths:
            fb, ft, xb, xt, pb, pt = contenders[path]
            for pss in passes:
                sec_b, sec_t, band = time_pair(fb, ft, xb, xt, pb, pt, dy if pss == "fwd+bwd" else None, repeats,
                                               warmup, advance)
                sizes = FWD_SIZES if pss == "fwd" else STEP_SIZES
                rows.append({
                    "shape": list(shape), "label": _label(shape, cl), "dims": len(shape),
                    "layout": "channels_last" if cl else ("nchw" if len(shape) == 4 else "nc"),
                    "mb": mb, "path": path, "pass": pss,
                    "bnlab_ms": sec_b * 1e3, "torch_ms": sec_t * 1e3, "ratio": sec_t / sec_b, "ratio_iqr": list(band),
                    "bnlab_gbs": sizes * mb / 1e3 / sec_b, "torch_gbs": sizes * mb / 1e3 / sec_t,
                })
        if len(shape) == 4:
            rows += _renorm_rows(shape, cl, x, dy, mb, repeats, warmup, advance)
    return {"repeats": repeats, "warmup": warmup, "rows": rows}


# ----------------------------------------------------------------------------------------------
# first call in a fresh process

_FIRST_CALL = r"""
import json, statistics, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import bnlab
from bnlab.kernels import cpu
t2 = time.perf_counter()
threads, later = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
import numba
numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
out = {"import_torch_s": t1 - t0, "import_bnlab_s": t2 - t1}

def timing(bn, cl):
    x = torch.randn(8, 16, 8, 8)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dy = torch.randn_like(x)
    def step():
        x.grad = None
        bn.weight.grad = bn.bias.grad = None
        t = time.perf_counter()
        y = bn(x)
        y.backward(dy)
        return time.perf_counter() - t, y
    first, y = step()
    rest = statistics.median(step()[0] for _ in range(later))
    return {"first_s": first, "later_s": rest, "extra_s": first - rest, "grad_fn": y.grad_fn.name()}

# torch's own first batch-norm step pays torch's one-time costs (autograd, dispatch); take it first
# so that what follows is bnlab's own first-call cost
out["torch"] = timing(torch.nn.BatchNorm2d(16), False)
for name, cl in (("nchw", False), ("channels_last", True)):
    out[name] = timing(bnlab.nn.BatchNorm2d(16), cl)
kern = [cpu.rows_forward_train, cpu.rows_backward, cpu.cols_forward_train, cpu.cols_backward, cpu.update_running]
out["kernel_signatures"] = sum(len(k.signatures) for k in kern)
out["cache_hits"] = sum(sum(k.stats.cache_hits.values()) for k in kern)
out["cache_misses"] = sum(sum(k.stats.cache_misses.values()) for k in kern)
print(json.dumps(out))
"""


# the autograd nodes of bnlab's training batch norm: the numba kernels' Function, the C++ node of the
# small-call path (bnlab.kernels.fast)
BNLAB_NODES = ("_TrainFnBackward", "torch::autograd::CppNode<bnlab::BatchNorm>")


def first_call_cost(threads: int, later: int = 20) -> dict:
    """Run a fresh interpreter that imports bnlab and times its first BatchNorm2d steps.

    The subprocess first takes one torch.nn.BatchNorm2d step (torch's own one-time costs), then
    bnlab's first NCHW step and first channels_last step, each against the median of later steps.
    ``import_bnlab_s`` includes starting numba's runtime (:func:`bnlab.kernels.cpu.start_runtime`).
    """
    proc = subprocess.run(
        [sys.executable, "-c", _FIRST_CALL, str(threads), str(later)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # bnlab's kernels served the calls when the autograd nodes are bnlab's own (the numba kernels'
    # Function, or the small-call path's C++ node for the small NCHW input) and the numba kernels
    # were loaded (from the on-disk cache when cache_misses == 0)
    res["bnlab_kernel"] = all(res[k]["grad_fn"] in BNLAB_NODES for k in ("nchw", "channels_last")) and (
        res["kernel_signatures"] > 0
    )
    res["extra_s"] = max(res["nchw"]["extra_s"], res["channels_last"]["extra_s"])
    return res


# ----------------------------------------------------------------------------------------------
# the bar, report, entry point


def check_bar(rows: list[dict], first: dict | None) -> list[dict]:
    checks = []
    for r in rows:
        if r["pass"] != "fwd+bwd" or r.get("layer", "BatchNorm") != "BatchNorm":
            continue
        need = BAR_SMALL_2D if tuple(r["shape"]) in SMALL_2D else BAR_EVERY
        if r["dims"] == 4 and r["mb"] >= BAR_LARGE_MB:
            need = BAR_CHANNELS_LAST if r["layout"] == "channels_last" else BAR_NCHW
        checks.append({"what": f"{r['label']} {r['path']} fwd+bwd vs torch {r['layout']}", "ratio": r["ratio"],
                       "ratio_iqr": r.get("ratio_iqr"), "need": need, "ok": r["ratio"] >= need})
    if first is not None and "error" not in first:
        checks.append({"what": "first call in a fresh process, extra seconds", "ratio": first["extra_s"],
                       "need": BAR_FIRST_CALL_S, "ok": first["extra_s"] < BAR_FIRST_CALL_S and first["bnlab_kernel"]})
    return checks


def set_malloc(mode: str) -> str:
    """The allocator state a bench runs in, for the whole process (both contenders alike): ``"default"``
    leaves glibc as the process has it; ``"kept"`` has it keep freed memory
    (:func:`bnlab.lab.runner.keep_freed_memory`, the audit workers' setting; it cannot be undone in
    the process). Returns the state recorded with the results: ``"default"``, ``"kept"``, or
    ``"default (kept not available: not glibc)"``. Why it matters: a layer that frees and maps its
    workspace anew each call (torch's 2-layer LSTM at 64x40 faults about 5,000 times a step with
    glibc's defaults) is timed with that cost in one state and without it in the other, and
    ratios against it move by a third between the two."""
    if mode == "default":
        return "default"
    if mode != "kept":
        raise ValueError(f"malloc must be 'default' or 'kept', got {mode!r}")
    from .lab.runner import keep_freed_memory

    return "kept" if keep_freed_memory() else "default (kept not available: not glibc)"


def vector_isa() -> dict:
    """The vector instructions each contender's kernels run on here: bnlab's numba kernels compile for
    the host CPU (``avx512`` where it has AVX-512F, else ``avx2`` or ``other``); torch reports the
    capability its CPU kernels dispatched to (``AVX512``, ``AVX2``, ...). Recurrent ratios differ
    between machine kinds mostly by these (torch's LSTM is oneDNN's, which uses AVX-512 where it can)."""
    try:
        from llvmlite import binding as llvm

        f = llvm.get_host_cpu_features()
        ours = "avx512" if f.get("avx512f", False) else "avx2" if f.get("avx2", False) else "other"
    except Exception:  # pragma: no cover - llvmlite always has it where numba runs
        ours = "unknown"
    try:
        theirs = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - older torch
        theirs = "unknown"
    return {"bnlab": ours, "torch": theirs}


def machine_line() -> str:
    """The line a run prints above its tables: the cores and :func:`vector_isa`."""
    isa = vector_isa()
    return f"machine: {os.cpu_count()} cores, vector instructions: bnlab {isa['bnlab']}, torch {isa['torch']}"


def machine_info(threads: int) -> dict:
    cpu_name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_name, "isa": vector_isa(), "cores": os.cpu_count(), "threads": threads, "gpu": gpu,
            "torch": torch.__version__,
            "numba": numba.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "numba_threading_layer": _threading_layer(), "bnlab": bnlab.__version__}


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _threading_layer() -> str:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        return "unset"


def _print_report(console, result: dict) -> None:
    from rich.table import Table

    bw = result.get("bandwidth")
    bn = result.get("bn")
    if bn is not None:
        t = Table(title=f"batch norm, float32, training, {result['machine']['threads']} threads, "
                        f"median of {bn['repeats']} interleaved rounds (ratio = torch / bnlab; noise band: "
                        "quartiles of the per-round ratios)")
        for col in ("shape", "layout", "MB", "path", "pass", "bnlab ms", "bnlab GB/s", "torch ms", "torch GB/s",
                    "ratio", "noise band"):
            t.add_column(col, justify="left" if col in ("shape", "layout", "path", "pass") else "right")
        for r in bn["rows"]:
            if r.get("layer", "BatchNorm") != "BatchNorm":
                continue
            ratio = f"{r['ratio']:.2f}"
            band = r.get("ratio_iqr")
            t.add_row("x".join(map(str, r["shape"])), r["layout"], f"{r['mb']:.1f}", r["path"], r["pass"],
                      f"{r['bnlab_ms']:.3f}", f"{r['bnlab_gbs']:.1f}", f"{r['torch_ms']:.3f}",
                      f"{r['torch_gbs']:.1f}", ratio, "-" if band is None else f"{band[0]:.2f}-{band[1]:.2f}")
        console.print(t)
        rn = [r for r in bn["rows"] if r.get("layer") == "BatchRenorm2d"]
        if rn:
            t = Table(title="BatchRenorm2d (r_max 3, d_max 5) against bnlab's BatchNorm2d and torch's, same rounds, "
                            "median ms (renorm / BN: > 1 is slower than bnlab's batch norm)")
            for col in ("shape", "layout", "MB", "pass", "renorm ms", "bnlab BN ms", "torch BN ms", "renorm / bnlab BN",
                        "torch / renorm"):
                t.add_column(col, justify="left" if col in ("shape", "layout", "pass") else "right")
            for r in rn:
                t.add_row("x".join(map(str, r["shape"])), r["layout"], f"{r['mb']:.1f}", r["pass"], f"{r['bnlab_ms']:.3f}",
                          f"{r['bnlab_bn_ms']:.3f}", f"{r['torch_ms']:.3f}", f"{r['vs_bnlab_bn']:.2f}", f"{r['ratio']:.2f}")
            console.print(t)
    if bw is not None:
        console.print(f"streaming bandwidth (numba scale-copy, {result['machine']['threads']} threads): "
                      f"{bw['memory_gbs']:.1f} GB/s over {bw['memory_mb']:.0f} MB, "
                      f"{bw['cache_gbs']:.1f} GB/s over {bw['cache_mb']:.0f} MB")
    first = result.get("first_call")
    if first is not None:
        if "error" in first:
            console.print(f"first call in a fresh process: failed ({first['error']})")
        else:
            console.print(
                f"first call in a fresh process (BatchNorm2d fwd+bwd, 8x16x8x8): import torch {first['import_torch_s']:.2f} s, "
                f"import bnlab {first['import_bnlab_s']:.2f} s (with numba's runtime start); torch's first step "
                f"{first['torch']['first_s'] * 1e3:.0f} ms vs later {first['torch']['later_s'] * 1e3:.2f} ms; bnlab NCHW first "
                f"{first['nchw']['first_s'] * 1e3:.0f} ms vs later {first['nchw']['later_s'] * 1e3:.2f} ms; channels_last first "
                f"{first['channels_last']['first_s'] * 1e3:.0f} ms vs later {first['channels_last']['later_s'] * 1e3:.2f} ms; "
                f"bnlab kernel: {first['bnlab_kernel']} (numba cache hits {first['cache_hits']}, misses {first['cache_misses']})")
    if result.get("loadavg_start") is not None:
        console.print(f"load average (1, 5, 15 min) at start {result['loadavg_start']}, at end {result.get('loadavg_end')}: "
                      "other processes on these cores slow both contenders; compare ratios from one quiet run")
    checks = result.get("bar")
    if checks:
        bad = [c for c in checks if not c["ok"]]
        console.print(f"bar: {len(checks) - len(bad)}/{len(checks)} checks met"
                      + ("" if not bad else "; missed: " + "; ".join(
                          f"{c['what']} {c['ratio']:.2f}"
                          + (f", noise band {c['ratio_iqr'][0]:.2f}-{c['ratio_iqr'][1]:.2f}"
                             if c.get("ratio_iqr") else "")
                          + f" (need {'<' if 'first' in c['what'] else '>='} {c['need']})"
                          for c in bad)))
    models = result.get("models")
    if models is not None:
        from .bench_models import format_rows

        where = models.get("device", "cpu")
        where = f"{models['threads']} threads" if where == "cpu" else where
        t = Table(title=f"models: one training step (forward, loss, backward, SGD step) or one inference call, "
                        f"{where}, median of {models['repeats']} interleaved rounds "
                        "(ratio = torch / bnlab; noise band: quartiles of the per-round ratios)")
        for col in ("model", "configuration", "torch ms", "bnlab ms", "ratio", "noise band", "bar", "note"):
            t.add_column(col, justify="left" if col in ("model", "configuration", "bar", "note") else "right")
        for row in format_rows(models):
            t.add_row(*row)
        console.print(t)
    rnn = result.get("rnn")
    if isinstance(rnn, dict) and "rows" in rnn:
        try:
            from .bench_rnn import format_table

            console.print(format_table(rnn), markup=False, highlight=False, soft_wrap=True)  # plain text: "[...]" is not markup
        except ImportError:
            pass
    elif isinstance(rnn, dict) and "skipped" in rnn:
        console.print(f"rnn suite skipped: {rnn['skipped']}")


def run(args) -> int:
    """Entry point of ``bnlab bench`` (see :mod:`bnlab.cli`)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    threads = int(getattr(args, "threads", 2) or 2)
    suite = getattr(args, "suite", "all") or "all"
    device = getattr(args, "device", None) or "cpu"
    if device != "cpu":
        from .bench_models import check_device

        if suite != "models":
            raise SystemExit(f"bnlab bench: --device {device} applies to --suite models only (the bn and rnn suites "
                             f"time bnlab's CPU kernels; got --suite {suite})")
        try:
            check_device(device)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    quick = bool(getattr(args, "quick", False))
    old_torch = torch.get_num_threads()
    old_numba = numba.get_num_threads()
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    console = Console() if sys.stdout.isatty() else Console(width=150)
    console.print("ratio = torch time / bnlab time in every table: above 1, bnlab is faster")
    malloc = set_malloc(getattr(args, "malloc", "default") or "default")
    console.print(f"allocator: {malloc}")
    console.print(machine_line())
    result: dict = {"suite": suite, "quick": quick, "malloc": malloc, "loadavg_start": _loadavg()}
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=bool(getattr(args, "no_progress", False)), transient=True)
    try:
        with progress:
            if suite in ("bn", "all"):
                reps = 3 if quick else 7
                task = progress.add_task("streaming bandwidth", total=2)
                mem_mb, cache_mb = (64, 8) if quick else (256, 16)
                mem = streaming_bandwidth(mem_mb * 2**20 // 2, reps)
                progress.advance(task)
                cache = streaming_bandwidth(cache_mb * 2**20 // 2, reps * 5)
                progress.advance(task)
                result["bandwidth"] = {"memory_gbs": mem, "memory_mb": mem_mb, "cache_gbs": cache, "cache_mb": cache_mb,
                                       "kernel": "b = s * a, float32, read + write counted"}
                result["bn"] = run_bn_suite(args, progress)
                task = progress.add_task("first call in a fresh process", total=1)
                result["first_call"] = first_call_cost(threads, later=5 if quick else 20)
                progress.advance(task)
                result["bar"] = check_bar(result["bn"]["rows"], result["first_call"])
            if suite in ("models", "all"):
                from .bench_models import run_models_suite

                result["models"] = run_models_suite(args, progress)
            if suite in ("rnn", "all"):
                try:
                    from .bench_rnn import run_rnn_suite
                except ImportError as e:
                    result["rnn"] = {"skipped": f"bnlab.bench_rnn is not available ({e})"}
                else:
                    result["rnn"] = run_rnn_suite(args, progress)
                    result["rnn"]["malloc"] = malloc
        result["machine"] = machine_info(threads)
        result["loadavg_end"] = _loadavg()
    finally:
        torch.set_num_threads(old_torch)
        numba.set_num_threads(old_numba)
    _print_report(console, result)
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        console.print(f"wrote {args.json}")
    return 0
