"""bnlab.kernels.stats: the statistics-only kernels and batch renormalization's forward kernel.

The statistics are those of bnlab's training forward bit for bit (same plan, shift and sums),
agree with the float64 reference and torch.var_mean (also with a large common offset), count
non-finite channels as the training kernels do, and come out the same from the serial twins and in
a forked child. The renorm kernel writes ``(x - mean) * invstd * gamma * r + gamma * d + beta``
with ``r`` and ``d`` clipped from the running statistics, is batch norm's output bit for bit with
``r = 1, d = 0``, and takes every path of the plan (parallel and serial, channel groups and rows,
columns, streamed stores, prefetch, strided input)."""

from __future__ import annotations

import math
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

import bnlab
from bnlab import reference as ref
from bnlab.kernels import cpu
from bnlab.kernels import stats as S
from bnlab.kernels.plan import COLUMNS, ROWS, Thresholds

EPS = 1e-5
NEVER = 1 << 62
PARALLEL = Thresholds(serial_below=0)  # the thread pool even for tiny tensors
SERIAL = Thresholds(serial_below=NEVER)  # the calling thread only
FORCED = Thresholds(serial_below=0, prefetch_from=0, stream_from=0)  # prefetch and streamed stores too
PATHS = {"parallel": PARALLEL, "serial": SERIAL, "forced": FORCED}

# (shape, memory format): rows with channel groups, rows split over single rows (few channels),
# columns (2-D, channels_last, channels_last_3d, (N, C, L) with C innermost), 1d/2d/3d
CASES = {
    "2d_rows_groups": ((6, 16, 5, 7), None),
    "2d_rows_single": ((6, 3, 5, 7), None),
    "2d_channels_last": ((6, 16, 5, 7), torch.channels_last),
    "2d_channels_last_few": ((8, 3, 4, 4), torch.channels_last),
    "1d_nc": ((200, 12), None),
    "1d_ncl": ((10, 12, 9), None),
    "1d_ncl_transposed": ((10, 12, 9), "transposed"),
    "3d_rows": ((3, 12, 3, 4, 5), None),
    "3d_channels_last": ((3, 12, 3, 4, 5), torch.channels_last_3d),
}


def _make(name, dtype=torch.float32, offset=0.0, seed=0):
    shape, fmt = CASES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.7 + offset
    x = x + torch.linspace(-1, 1, shape[1], dtype=torch.float64).view([1, -1] + [1] * (len(shape) - 2))
    x = x.to(dtype)
    if fmt == "transposed":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # (N, C, L) with C innermost
    elif fmt is not None:
        x = x.contiguous(memory_format=fmt)
    return x


# ---------------------------------------------------------------- batch_stats
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CASES))
def test_batch_stats_are_the_training_forwards_bit_for_bit(name, dtype, path):
    th = PATHS[path]
    x = _make(name, dtype)
    stats, nbad = S.batch_stats(x, EPS, thresholds=th)
    _, want, nbad_want = cpu.forward_train(x, None, None, EPS, thresholds=th)
    assert stats.dtype == np.float64 and stats.shape == (3, x.shape[1])
    np.testing.assert_array_equal(stats, want)
    assert nbad == nbad_want == 0


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["2d_rows_groups", "2d_rows_single", "2d_channels_last", "1d_nc", "3d_rows",
                                  "3d_channels_last"])
def test_batch_stats_match_the_reference_and_torch_var_mean(name, dtype, offset):
    """float64 sums of values shifted by each channel's first sample: a common offset of 1e4
    costs nothing measurable (float32 input is exact in float64, so the reference is the float64
    statistics of the same values)."""
    x = _make(name, dtype, offset)
    dims = [0] + list(range(2, x.dim()))
    var_t, mean_t = torch.var_mean(x.double(), dims, correction=0)
    mean_r, var_r, _ = ref.batch_stats(x)
    for th in (PARALLEL, SERIAL):
        stats, nbad = S.batch_stats(x, EPS, thresholds=th)
        assert nbad == 0
        for mean, var in ((mean_t, var_t), (mean_r, var_r)):
            np.testing.assert_allclose(stats[0], mean.numpy(), rtol=1e-13, atol=1e-13 * max(offset, 1.0))
            np.testing.assert_allclose(stats[1], var.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(stats[2], 1.0 / np.sqrt(var_t.numpy() + EPS), rtol=1e-10)


def test_batch_stats_large_tensors_on_the_pool():
    """Inputs above the default serial threshold (the thread pool, prefetch and the default plan):
    both layouts against torch.var_mean in float64."""
    g = torch.Generator().manual_seed(1)
    for x in (torch.randn(16, 32, 24, 24, generator=g) + 3.0,
              (torch.randn(16, 32, 24, 24, generator=g) - 2.0).contiguous(memory_format=torch.channels_last),
              torch.randn(64, 2, 40, 40, generator=g) * 4.0,
              torch.randn(8192, 24, generator=g)):
        assert x.numel() >= cpu.SERIAL_BELOW
        stats, nbad = S.batch_stats(x, EPS)
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x.double(), dims, correction=0)
        np.testing.assert_allclose(stats[0], mean.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats[1], var.numpy(), rtol=1e-10)
        np.testing.assert_array_equal(stats, cpu.forward_train(x, None, None, EPS)[1])
        assert nbad == 0


@pytest.mark.parametrize("path", ["parallel", "serial"])
@pytest.mark.parametrize("name", ["2d_rows_groups", "2d_rows_single", "2d_channels_last", "1d_nc"])
def test_non_finite_channels_are_counted_as_the_training_kernel_counts_them(name, path):
    th = PATHS[path]
    x = _make(name)
    x[(0, 0) + (0,) * (x.dim() - 2)] = float("nan")  # the first sample of channel 0 (the shift itself)
    idx = [1, 2] + [0] * (x.dim() - 2)
    x[tuple(idx)] = float("inf")  # channel 2
    stats, nbad = S.batch_stats(x, EPS, thresholds=th)
    _, want, nbad_want = cpu.forward_train(x, None, None, EPS, thresholds=th)
    assert nbad == nbad_want == 2
    bad = ~(np.isfinite(stats[0]) & np.isfinite(stats[1]))
    assert list(np.flatnonzero(bad)) == [0, 2]
    np.testing.assert_array_equal(stats[:, ~bad], want[:, ~bad])


def test_empty_and_strided_inputs():
    stats, nbad = S.batch_stats(torch.empty(0, 5, 3), EPS)
    assert nbad == 0 and stats.shape == (3, 5)
    np.testing.assert_array_equal(stats[:2], 0.0)
    np.testing.assert_allclose(stats[2], 1.0 / math.sqrt(EPS))
    base = torch.randn(6, 4, 10, 8, dtype=torch.float64)
    x = base[:, :, ::2, 1:]  # neither layout: read from a contiguous copy
    assert cpu.layout(x) == 0
    stats, _ = S.batch_stats(x, EPS)
    np.testing.assert_array_equal(stats, S.batch_stats(x.contiguous(), EPS)[0])


def test_serial_twins_give_the_parallel_kernels_numbers():
    """use_serial_kernels (what a child forked from an OpenMP process does by itself) runs this
    module's serial twins: the rows layout sums a channel on one thread either way (the same bits);
    the columns layout combines per-block partial sums, so only the last bits may differ."""
    xs = [_make("2d_rows_groups"), _make("2d_rows_single"), _make("2d_channels_last"), _make("1d_nc")]
    w, b = torch.linspace(0.5, 1.5, 16), torch.linspace(-1, 1, 16)
    rm, rv = torch.full((16,), 0.3), torch.full((16,), 2.0)

    def run():
        out = []
        for x in xs:
            c = x.shape[1]
            out.append((S.batch_stats(x, EPS, thresholds=PARALLEL)[0],
                        S.renorm_forward(x, w[:c], b[:c], rm[:c], rv[:c], EPS, 1.5, 0.5, thresholds=PARALLEL)))
        return out

    par = run()
    cpu.use_serial_kernels(True)
    try:
        assert S._kernels() == S.serial_kernels()
        ser = run()
    finally:
        cpu.use_serial_kernels(False)
    assert S._kernels() == S._PARALLEL
    for x, (sp, rp), (ss, rs) in zip(xs, par, ser):
        exact = cpu.plan(x, 2, PARALLEL).layout == ROWS
        check = np.testing.assert_array_equal if exact else (lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12))
        check(ss, sp)
        check(rs[0].numpy(), rp[0].numpy())
        check(rs[2], rp[2])


# ---------------------------------------------------------------- renorm_forward
def _renorm_reference(x, w, b, rm, rv, r_max, d_max, eps=EPS):
    """Ioffe 2017 in float64 torch ops: (y, r, d)."""
    xd = x.double()
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    var, mean = torch.var_mean(xd, dims, correction=0)
    sigma = (rv.double() + eps).sqrt()
    r = ((var + eps).sqrt() / sigma).clamp(1 / r_max, r_max)
    d = ((mean - rm.double()) / sigma).clamp(-d_max, d_max)
    g = w.double() if w is not None else torch.ones_like(r)
    be = b.double() if b is not None else torch.zeros_like(r)
    y = (xd - mean.view(shape)) / (var + eps).sqrt().view(shape) * (g * r).view(shape) + (g * d + be).view(shape)
    return y, r, d


def _params(c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    # spread so that some channels' r and d are clipped at either limit and some are not
    rm = torch.linspace(-2, 2, c, dtype=torch.float64)[torch.randperm(c, generator=g)].to(dtype)
    rv = torch.linspace(0.05, 8, c, dtype=torch.float64)[torch.randperm(c, generator=g)].to(dtype)
    return w, b, rm, rv


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CASES))
def test_renorm_forward_matches_the_float64_formula(name, dtype, path):
    th = PATHS[path]
    x = _make(name, dtype, offset=0.3)
    c = x.shape[1]
    w, b, rm, rv = _params(c, dtype)
    rm0, rv0 = rm.clone(), rv.clone()
    y, stats, rd, w2, nbad = S.renorm_forward(x, w, b, rm, rv, EPS, 1.6, 0.4, thresholds=th)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)  # read, not updated
    assert nbad == 0 and y.dtype == dtype and y.stride() == torch.empty_like(x).stride()
    np.testing.assert_array_equal(stats, S.batch_stats(x, EPS, thresholds=th)[0])
    want, r, d = _renorm_reference(x, w, b, rm, rv, 1.6, 0.4)
    clipped = (r == 1.6) | (r == 1 / 1.6)
    assert clipped.any() and not clipped.all() and (d.abs() == 0.4).any() and (d.abs() < 0.4).any()
    np.testing.assert_allclose(rd[0], r.numpy(), rtol=1e-12)
    np.testing.assert_allclose(rd[1], d.numpy(), rtol=1e-12, atol=1e-14)
    assert w2.dtype == dtype
    torch.testing.assert_close(w2, (w.double() * torch.from_numpy(rd[0])).to(dtype), rtol=0, atol=0)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", list(CASES))
def test_renorm_forward_with_r_1_and_d_0_is_batch_norm_bit_for_bit(name, path):
    th = PATHS[path]
    x = _make(name, offset=-0.7)
    w, b, rm, rv = _params(x.shape[1], torch.float32, seed=1)
    y, stats, rd, w2, _ = S.renorm_forward(x, w, b, rm, rv, EPS, 1.0, 0.0, thresholds=th)
    yb, sb, _ = cpu.forward_train(x, w, b, EPS, thresholds=th)
    assert torch.equal(y, yb)
    np.testing.assert_array_equal(stats, sb)
    np.testing.assert_array_equal(rd, [np.ones(x.shape[1]), np.zeros(x.shape[1])])
    assert torch.equal(w2, w)


@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_renorm_forward_without_weight_or_bias(affine):
    x = _make("2d_channels_last", torch.float64)
    w, b, rm, rv = _params(16, torch.float64)
    w = w if affine == "weight" else None
    b = b if affine == "bias" else None
    for th in (PARALLEL, SERIAL):
        y, _, rd, w2, _ = S.renorm_forward(x, w, b, rm, rv, EPS, 2.0, 1.0, thresholds=th)
        want, r, _ = _renorm_reference(x, w, b, rm, rv, 2.0, 1.0)
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        r = torch.from_numpy(rd[0])
        torch.testing.assert_close(w2, r if w is None else w * r, rtol=0, atol=0)


def test_renorm_forward_unclipped_is_the_eval_formula_with_the_running_statistics():
    """r and d inside their limits: x_hat r + d = (x - running_mean) / sigma."""
    x = _make("2d_rows_groups", torch.float64)
    w, b, rm, rv = _params(16, torch.float64)
    for th in (PARALLEL, FORCED):
        y, *_ = S.renorm_forward(x, w, b, rm, rv, EPS, math.inf, math.inf, thresholds=th)
        want = cpu.forward_eval(x, w, b, cpu.eval_stats(rm, rv, EPS))
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["2d_rows_groups", "2d_rows_single", "2d_channels_last"])
def test_renorm_forward_non_finite_channel(name):
    x = _make(name)
    x[0, 1, 0, 3] = float("nan")
    w, b, rm, rv = _params(x.shape[1], torch.float32)
    for th in (PARALLEL, SERIAL):
        y, stats, rd, w2, nbad = S.renorm_forward(x, w, b, rm, rv, EPS, 1.5, 0.5, thresholds=th)
        assert nbad == 1
        assert np.isnan(rd[:, 1]).all() and np.isfinite(np.delete(rd, 1, axis=1)).all()
        assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()


def test_renorm_forward_empty_batch_and_strided_input():
    w, b, rm, rv = _params(4, torch.float32)
    y, stats, rd, w2, nbad = S.renorm_forward(torch.empty(0, 4, 3), w, b, rm, rv, EPS, 3.0, 5.0)
    assert y.shape == (0, 4, 3) and nbad == 0
    sigma = np.sqrt(rv.double().numpy() + EPS)
    np.testing.assert_allclose(rd[0], np.clip(math.sqrt(EPS) / sigma, 1 / 3.0, 3.0))
    np.testing.assert_allclose(rd[1], np.clip(-rm.double().numpy() / sigma, -5.0, 5.0))
    x = torch.randn(5, 4, 9, 6)[:, :, 1::2, ::2]
    y, *_ = S.renorm_forward(x, w, b, rm, rv, EPS, 1.5, 0.5)
    assert y.shape == x.shape and y.is_contiguous()
    assert torch.equal(y, S.renorm_forward(x.contiguous(), w, b, rm, rv, EPS, 1.5, 0.5)[0])


def test_renorm_weight_grad():
    grads = np.array([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]], np.float32)
    rd = np.array([[1.5, 1.0, 0.5], [0.1, 0.0, -0.2]])
    got = S.renorm_weight_grad(grads, rd)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, (grads[1].astype(np.float64) * rd[0] + grads[0] * rd[1]).astype(np.float32))


def test_the_module_on_large_inputs_matches_the_reference():
    """BatchRenorm2d on inputs the default plan runs on the pool (streamed stores, prefetch, both
    layouts): output and gradients against the float64 formula, batch norm's backward with
    weight' = gamma r."""
    g = torch.Generator().manual_seed(2)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = (torch.randn(16, 32, 32, 64, generator=g, dtype=torch.float64) * 2 + 1).contiguous(memory_format=fmt)
        assert x.numel() * 8 >= cpu.STREAM_FROM
        m = bnlab.nn.BatchRenorm2d(32, dtype=torch.float64, r_max=1.5, d_max=0.5)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.uniform_(-1, 1, generator=g)
            m.running_mean.uniform_(0, 2, generator=g)
            m.running_var.uniform_(1, 8, generator=g)
        rm, rv = m.running_mean.clone(), m.running_var.clone()
        dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
        xa = x.clone().requires_grad_()
        ya = m(xa)
        ya.backward(dy)
        xr = x.clone().requires_grad_()
        gam, bet = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()
        _, r, d = _renorm_reference(x, gam.detach(), bet.detach(), rm, rv, 1.5, 0.5)  # constants for autograd
        assert (r == 1.5).any() and (r < 1.5).any()
        shape = [1, -1, 1, 1]
        var, mean = torch.var_mean(xr, [0, 2, 3], correction=0)
        xhat = (xr - mean.view(shape)) / (var + EPS).sqrt().view(shape)
        yr = gam.view(shape) * (xhat * r.view(shape) + d.view(shape)) + bet.view(shape)
        torch.testing.assert_close(ya, yr, rtol=1e-12, atol=1e-12)
        yr.backward(dy)
        torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m.weight.grad, gam.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(m.bias.grad, bet.grad, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- fork
_FORK_X = {"rows": torch.randn(8, 16, 24, 24), "cols": torch.randn(8, 16, 24, 24).contiguous(
    memory_format=torch.channels_last)}


def _child(q):
    try:
        torch.set_num_threads(1)  # as DataLoader workers do (torch's own OpenMP cannot run here)
        out = {"serial_only": cpu._serial_only, "twins": S._kernels() == S.serial_kernels()}
        w, b, rm, rv = _params(16, torch.float32)
        for k, x in _FORK_X.items():
            out[k] = (S.batch_stats(x, EPS)[0], S.renorm_forward(x, w, b, rm, rv, EPS, 1.5, 0.5)[0].numpy())
        q.put(out)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put(repr(e))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_a_forked_child_runs_the_serial_twins():
    w, b, rm, rv = _params(16, torch.float32)
    parent = {k: (S.batch_stats(x, EPS)[0], S.renorm_forward(x, w, b, rm, rv, EPS, 1.5, 0.5)[0].numpy())
              for k, x in _FORK_X.items()}
    pool_started = cpu._omp_pool_started()  # a child forked now must keep off the pool
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    try:
        out = q.get(timeout=240)
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    assert isinstance(out, dict), out
    if pool_started:
        assert out["serial_only"] and out["twins"]
    for k in _FORK_X:
        np.testing.assert_array_equal(out[k][0], parent[k][0]) if k == "rows" else \
            np.testing.assert_allclose(out[k][0], parent[k][0], rtol=1e-12)
        np.testing.assert_allclose(out[k][1], parent[k][1], rtol=1e-6, atol=1e-6)


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(S, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_layouts_are_both_covered():
    plans = [cpu.plan(_make(n), 2, PARALLEL) for n in CASES]
    layouts = {p.layout for p in plans}
    groups = {p.group > 0 for p in plans if p.layout == ROWS}
    assert layouts == {ROWS, COLUMNS} and groups == {True, False}
