"""The small-call path (bnlab.kernels.fast): the C++ extension against the reference math, torch
and bnlab's numba path, through the modules as users reach it."""

import os
import shutil

import pytest
import torch

import bnlab
import bnlab.nn.batchnorm as NB
from bnlab import reference as ref
from bnlab.functional import NonFiniteBatchError
from bnlab.kernels import fast

needs_ext = pytest.mark.skipif(fast.ext is None, reason="the small-call extension is not built (no C++ compiler)")


def test_the_extension_is_built_where_a_compiler_is():
    if os.environ.get("BNLAB_FAST", "1") == "0" or shutil.which("c++") is None:
        pytest.skip("no C++ compiler here (or BNLAB_FAST=0): the numba kernels serve every call")
    assert fast.ext is not None, "python -m bnlab.kernels.warmup builds it (make setup / make test)"


class _Counting:
    """Stands in for the extension module and counts the calls it serves."""

    def __init__(self, ext):
        self.ext, self.calls = ext, {"train": 0, "eval": 0}

    def train(self, *a):
        r = self.ext.train(*a)
        self.calls["train"] += r is not None
        return r

    def eval(self, *a):
        r = self.ext.eval(*a)
        self.calls["eval"] += r is not None
        return r


@pytest.fixture
def counting(monkeypatch):
    c = _Counting(fast.ext)
    monkeypatch.setattr(fast, "ext", c)
    return c


def _pair(cls, c, dtype, **kw):
    torch.manual_seed(0)
    a = cls(c, dtype=dtype, **kw)
    if a.weight is not None:
        with torch.no_grad():
            a.weight.uniform_(0.5, 1.5)
            a.bias.normal_()
    b = cls(c, dtype=dtype, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


def _run(m, x, g, steps=3):
    outs = []
    for i in range(steps):
        xi = (x + i).clone().requires_grad_()
        y = m(xi)
        y.backward(g)
        outs.append((y.detach(), xi.grad))
    grads = {n: p.grad for n, p in m.named_parameters()}
    return outs, grads, {k: v.clone() for k, v in m.state_dict().items()}


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
                         ids=["default", "cumulative", "no-affine", "untracked"])
@pytest.mark.parametrize("shape", [(64, 24), (5, 3), (300, 130)])
def test_training_steps_equal_the_numba_path_and_torch(counting, monkeypatch, dtype, kw, shape):
    x = torch.randn(shape, dtype=dtype) * 3 + 7  # a mean far from 0: the shifted sums matter
    g = torch.randn(shape, dtype=dtype)
    fast_m, slow_m = _pair(bnlab.nn.BatchNorm1d, shape[1], dtype, **kw)
    got = _run(fast_m, x, g)
    assert counting.calls["train"] == 3
    monkeypatch.setattr(fast, "ext", None)
    want = _run(slow_m, x, g)
    tm = torch.nn.BatchNorm1d(shape[1], dtype=dtype, **kw)
    tm.load_state_dict(_pair(bnlab.nn.BatchNorm1d, shape[1], dtype, **kw)[0].state_dict())  # the start of both
    torch_res = _run(tm, x, g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    # torch sums the parameter gradients in float32 (bnlab in float64): up to ~1e-4 apart here
    torch_tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else tol
    for other, ptol in ((want, tol), (torch_res, torch_tol)):
        for (y, dx), (y2, dx2) in zip(got[0], other[0]):
            torch.testing.assert_close(y, y2, **tol)
            torch.testing.assert_close(dx, dx2, **tol)
        for n in got[1]:
            torch.testing.assert_close(got[1][n], other[1][n], **ptol)
        for k in got[2]:
            torch.testing.assert_close(got[2][k], other[2][k], **tol)


@needs_ext
def test_matches_the_reference_math_in_float64():
    torch.manual_seed(1)
    x = torch.randn(40, 7, dtype=torch.float64) * 1e3 + 1e6  # a large mean: float64 shifted sums
    w, b = torch.rand(7, dtype=torch.float64) + 0.5, torch.randn(7, dtype=torch.float64)
    y, stats, status = fast.ext.train(x, w, b, None, None, None, 0.1, 1e-5)
    mean, var, _ = ref.batch_stats(x)
    assert status == 0
    torch.testing.assert_close(stats[0], mean, rtol=1e-15, atol=0)
    torch.testing.assert_close(stats[1], var, rtol=1e-12, atol=0)
    torch.testing.assert_close(y, ref.normalize(x, mean, ref.invstd_from_var(var, 1e-5), w, b), rtol=1e-12, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("shape", [(9, 4), (3, 2, 3, 2)], ids=["2d", "nd"])
def test_gradcheck_and_gradgradcheck_in_float64(shape):
    torch.manual_seed(2)
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(c, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return fast.ext.train(x, w, b, None, None, None, 0.1, 1e-5)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@needs_ext
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("shape,cls,dtype", [((8, 4), bnlab.nn.BatchNorm1d, torch.float32),
                                             ((4, 4, 3, 3), bnlab.nn.BatchNorm2d, torch.float32),
                                             ((8, 4, 5, 5), bnlab.nn.BatchNorm2d, torch.bfloat16)],
                         ids=["2d", "nd", "nd-bf16"])  # bf16 (N, C, *): torch's kernel, the check in C++
def test_a_non_finite_batch_leaves_every_buffer_untouched(counting, nonfinite, shape, cls, dtype):
    m = cls(4, nonfinite=nonfinite)
    m(torch.randn(shape).to(dtype))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(shape).to(dtype)
    x[3, 1] = float("nan")
    if nonfinite == "raise":
        with pytest.raises(NonFiniteBatchError, match=r"channel\(s\) \[1\]"):
            m(x)
    else:
        m(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert counting.calls["train"] == 2


@needs_ext
def test_a_batch_that_would_overflow_float32_buffers_is_refused():
    m = bnlab.nn.BatchNorm1d(2)
    x = torch.tensor([[3e38, 0.0], [-3e38, 1.0]])  # finite, but the variance exceeds float32's range
    with pytest.raises(NonFiniteBatchError, match="overflow"):
        m(x)
    assert torch.equal(m.running_var, torch.ones(2)) and int(m.num_batches_tracked) == 0


@needs_ext
@pytest.mark.parametrize("shape,cls", [((32, 6), bnlab.nn.BatchNorm1d), ((4, 6, 5), bnlab.nn.BatchNorm1d),
                                       ((8, 6, 9, 9), bnlab.nn.BatchNorm2d), ((2, 6, 3, 4, 5), bnlab.nn.BatchNorm3d)])
def test_inference_equals_torch(counting, shape, cls):
    fast_m, _ = _pair(cls, 6, torch.float32)
    with torch.no_grad():
        fast_m.running_mean.normal_()
        fast_m.running_var.uniform_(0.5, 2.0)
    tm = getattr(torch.nn, cls.__name__)(6)
    tm.load_state_dict(fast_m.state_dict())
    fast_m.eval(), tm.eval()
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(fast_m(x), tm(x), rtol=1e-6, atol=1e-6)
    assert counting.calls["eval"] == 1


@needs_ext
def test_calls_it_does_not_serve_take_the_general_path_with_the_same_numbers(counting):
    m = bnlab.nn.BatchNorm1d(6)
    tm = torch.nn.BatchNorm1d(6)
    xs = [torch.randn(6, 10).t(),  # not contiguous
          torch.randn(64, 6, 3000)]  # 3-D in training above 2^20 values: the numba kernels
    for x in xs:
        torch.testing.assert_close(m(x), tm(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.running_var, tm.running_var, rtol=1e-6, atol=1e-6)
    assert counting.calls["train"] == 0
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        m(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 6))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(8, 6, dtype=torch.float64))


@needs_ext
def test_its_parallel_loops_run_on_torchs_threads():
    # the extension is built with OpenMP on torch's own runtime: without it at::parallel_for's
    # regions run on the calling thread alone, and with it they follow torch.set_num_threads
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert fast.ext.parallel_width() == 2
        torch.set_num_threads(1)
        assert fast.ext.parallel_width() == 1
    finally:
        torch.set_num_threads(prev)


@needs_ext
def test_one_and_two_threads_agree():
    x = torch.randn(8192, 64)  # above the extension's serial size: two row blocks on two threads
    w, b = torch.rand(64), torch.randn(64)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, s1, _ = fast.ext.train(x, w, b, None, None, None, 0.1, 1e-5)
        torch.set_num_threads(2)
        y2, s2, _ = fast.ext.train(x, w, b, None, None, None, 0.1, 1e-5)
    finally:
        torch.set_num_threads(prev)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s1, s2, rtol=1e-13, atol=1e-13)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_functional_form_takes_it_and_equals_torch(counting, dtype):
    import bnlab.functional as BF

    torch.manual_seed(3)
    x = torch.randn(50, 9, dtype=dtype) + 4
    w, b = torch.rand(9, dtype=dtype) + 0.5, torch.randn(9, dtype=dtype)
    rm, rv, nbt = torch.zeros(9, dtype=dtype), torch.ones(9, dtype=dtype), torch.tensor(0)
    trm, trv = rm.clone(), rv.clone()
    xg, txg = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = BF.batch_norm(xg, rm, rv, w, b, training=True, momentum=0.2, num_batches_tracked=nbt)
    ty = torch.nn.functional.batch_norm(txg, trm, trv, w, b, training=True, momentum=0.2)
    g = torch.randn_like(y)
    y.backward(g), ty.backward(g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, t in ((y, ty), (xg.grad, txg.grad), (rm, trm), (rv, trv)):
        torch.testing.assert_close(a, t, **tol)
    assert int(nbt) == 1
    with torch.no_grad():
        torch.testing.assert_close(BF.batch_norm(x, rm, rv, w, b), torch.nn.functional.batch_norm(x, rm, rv, w, b),
                                   **tol)
    assert counting.calls == {"train": 1, "eval": 1}
    # what the general path rejects is still rejected, with its message
    with pytest.raises(ValueError, match="momentum=None"):
        BF.batch_norm(x, rm, rv, training=True, momentum=None)
    with pytest.raises(ValueError, match="eps > 0"):
        BF.batch_norm(x, rm, rv, training=True, eps=0.0)
    with pytest.raises(ValueError, match="nonfinite must be"):
        BF.batch_norm(x, rm, rv, training=True, nonfinite="ignore")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_inputs_with_float32_parameters(counting, dtype):
    """A bfloat16/float16 input with float32 parameters and buffers (what a BatchNorm1d after a
    Linear sees under CPU autocast): torch's numbers within the input dtype's rounding, float32
    parameter gradients, and the non-finite guard."""
    torch.manual_seed(4)
    m = bnlab.nn.BatchNorm1d(16)
    tm = torch.nn.BatchNorm1d(16)
    tm.load_state_dict(m.state_dict())
    x = (torch.randn(32, 16) * 2 + 3).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, ty = m(xa), tm(xb)
    assert y.dtype == dtype
    g = torch.randn_like(y)
    y.backward(g), ty.backward(g)
    tol = dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y.float(), ty.float(), **tol)
    torch.testing.assert_close(xa.grad.float(), xb.grad.float(), **tol)
    assert m.weight.grad.dtype == torch.float32 and m.bias.grad.dtype == torch.float32
    torch.testing.assert_close(m.weight.grad, tm.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.running_var, tm.running_var, rtol=1e-6, atol=1e-6)
    assert counting.calls["train"] == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin = torch.nn.Linear(8, 16)
        h = lin(torch.randn(32, 8))
        assert h.dtype == torch.bfloat16
        m(h)
    assert counting.calls["train"] == 2
    before = m.running_mean.clone()
    bad = x.clone()
    bad[0, 5] = float("inf")
    with pytest.raises(NonFiniteBatchError, match=r"channel\(s\) \[5\]"):
        m(bad)
    assert torch.equal(m.running_mean, before)
    tm.load_state_dict(m.state_dict())
    m.eval(), tm.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x).float(), tm(x).float(), **tol)
    assert counting.calls["eval"] == 1


@needs_ext
def test_the_compiled_update_checks_with_the_cpp_op_and_raises_the_policy_error():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch._dynamo.reset()
    m = bnlab.nn.BatchNorm1d(4)
    backend = AotEagerAndRecordGraphs()
    cm = torch.compile(m, backend=backend, fullgraph=True)
    cm(torch.randn(8, 4))
    assert "bnlab.check_batch_fast" in "\n".join(g.code for g in backend.fw_graphs)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(8, 4)
    x[2, 3] = float("nan")
    with pytest.raises(NonFiniteBatchError, match=r"channel\(s\) \[3\]"):
        cm(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    ok = torch.tensor(True)
    same = torch.ops.bnlab.check_batch_fast(ok, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                                            8, 3e38, "bn")
    assert bool(same) and same is not ok


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_output_is_the_float64_formula_rounded_once_even_with_a_large_mean(dtype):
    """The elementwise passes of a half-precision input run in float32 with a two-part mean: the
    output must still be the float64 formula rounded to the dtype (ties aside), however large the
    mean is against the spread."""
    torch.manual_seed(5)
    x = (torch.randn(256, 8, dtype=torch.float64) * 8 + 3000).to(dtype)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    y, _, _ = fast.ext.train(x, w, b, None, None, None, 0.1, 1e-5)
    xd = x.double()
    mean, var, _ = ref.batch_stats(xd)
    want = ref.normalize(xd, mean, ref.invstd_from_var(var, 1e-5), w.double(), b.double())
    exact = (y == want.to(dtype)).double().mean()
    assert exact > 0.99, float(exact)
    torch.testing.assert_close(y.double(), want, rtol=2.0 ** -7, atol=2.0 ** -7)
    g = torch.randn(256, 8, dtype=torch.float64).to(dtype)
    xg = x.clone().requires_grad_()
    fast.ext.train(xg, w, b, None, None, None, 0.1, 1e-5)[0].backward(g)
    dx_want = ref.batch_norm_backward(g.double(), xd, mean, ref.invstd_from_var(var, 1e-5), w.double())[0]
    torch.testing.assert_close(xg.grad.double(), dx_want, rtol=2.0 ** -7, atol=1e-3)


@needs_ext
@pytest.mark.parametrize("shape,fmt", [((512, 64), None), ((16, 32, 4, 4), torch.channels_last),
                                       ((8, 8, 4, 4), torch.channels_last)], ids=["2d", "cl", "cl-wide-rows"])
@pytest.mark.parametrize("mean", [0.0, 3000.0])
def test_a_float32_input_gradient_is_the_float64_formula_rounded_once(shape, fmt, mean):
    """The backward's elementwise pass on float32 data gathers the formula's per-channel constants
    into two fused multiply-adds in float64: the gradient must still be the float64 formula rounded
    to float32 (ties aside), with a mean far from 0 against the spread too."""
    torch.manual_seed(8)
    xd64 = torch.randn(shape, dtype=torch.float64) * 2 + mean
    x = xd64.float()
    g = torch.randn(shape, dtype=torch.float64).float()
    if fmt is not None:
        x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    c = shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    xg = x.clone().requires_grad_()
    fast.ext.train(xg, w, b, None, None, None, 0.1, 1e-5)[0].backward(g)
    dims = [0] + list(range(2, len(shape)))
    xd = x.double()
    mean_, var = xd.mean(dims), xd.var(dims, correction=0)
    inv = 1.0 / torch.sqrt(var + 1e-5)
    view = [1, c] + [1] * (len(shape) - 2)
    xhat = (xd - mean_.view(view)) * inv.view(view)
    gd = g.double()
    want = (w.double() * inv).view(view) * (gd - gd.mean(dims, keepdim=True)
                                            - xhat * (gd * xhat).mean(dims, keepdim=True))
    exact = (xg.grad == want.float()).double().mean()
    assert exact > 0.99, float(exact)
    torch.testing.assert_close(xg.grad.double(), want, rtol=2.0 ** -22, atol=1e-6)


@needs_ext
def test_odd_arguments_get_the_general_paths_errors_and_momentum_none_is_cumulative(counting):
    import bnlab.functional as BF

    x = torch.randn(16, 4)
    with pytest.raises(TypeError, match="weight"):
        BF.batch_norm(x, None, None, weight=[1.0, 1.0, 1.0, 1.0], training=True)
    rm, rv, nbt = torch.zeros(4), torch.ones(4), torch.tensor(0)
    for i in range(3):
        BF.batch_norm(x + i, rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
    assert counting.calls["train"] == 3 and int(nbt) == 3
    # the cumulative average of the three batches' means: the mean of x, plus 1
    torch.testing.assert_close(rm, x.mean(0) + 1, rtol=1e-6, atol=1e-6)
    # a negative momentum is a (strange) momentum, not the cumulative average
    rm2, rv2 = torch.zeros(4), torch.ones(4)
    trm, trv = rm2.clone(), rv2.clone()
    BF.batch_norm(x, rm2, rv2, training=True, momentum=-0.5)
    torch.nn.functional.batch_norm(x, trm, trv, training=True, momentum=-0.5)
    torch.testing.assert_close(rm2, trm, rtol=1e-6, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("kw", [{}, {"momentum": None}], ids=["default", "cumulative"])
def test_nd_half_precision_training_is_torchs_kernel_bit_for_bit(counting, monkeypatch, dtype, fmt, kw):
    """(N, C, *) bfloat16/float16 training (float32 parameters, as under CPU autocast): the
    extension calls torch's kernel, so output and gradients are torch's bit for bit, and its running
    update is the general path's (float64, from the kernel's statistics)."""
    torch.manual_seed(3)
    x = (torch.randn(64, 6, 9, 9) * 2 + 3).to(dtype).contiguous(memory_format=fmt)  # above 2^14 values
    g = torch.randn(64, 6, 9, 9).to(dtype).contiguous(memory_format=fmt)
    fast_m, slow_m = _pair(bnlab.nn.BatchNorm2d, 6, torch.float32, **kw)
    torch_m = torch.nn.BatchNorm2d(6, **kw)
    torch_m.load_state_dict(fast_m.state_dict())
    got = _run(fast_m, x, g)
    assert counting.calls["train"] == 3
    want_torch = _run(torch_m, x, g)
    for (y, dx), (ty, tdx) in zip(got[0], want_torch[0]):
        assert y.dtype == dtype and torch.equal(y, ty) and torch.equal(dx, tdx)
    for n in got[1]:
        assert torch.equal(got[1][n], want_torch[1][n]), n
    monkeypatch.setattr(fast, "ext", None)
    want = _run(slow_m, x, g)
    for k in got[2]:
        assert torch.equal(got[2][k], want[2][k]), k  # the same running update as the general path
    torch.testing.assert_close(got[2]["running_var"], want_torch[2]["running_var"], rtol=1e-5, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,cls", [((8, 6, 5, 5), bnlab.nn.BatchNorm2d), ((4, 6, 7), bnlab.nn.BatchNorm1d),
                                       ((2, 6, 2, 3, 2), bnlab.nn.BatchNorm3d), ((5, 6, 1, 1), bnlab.nn.BatchNorm2d)])
def test_small_nd_training_takes_it_and_equals_the_numba_path(counting, monkeypatch, shape, cls, dtype):
    """(N, C, *) training below 2^14 values (each channel's N runs summed, then normalized)."""
    torch.manual_seed(6)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 5).to(dtype)
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    fast_m, slow_m = _pair(cls, 6, dtype)
    got = _run(fast_m, x, g)
    assert counting.calls["train"] == 3
    monkeypatch.setattr(fast, "ext", None)
    want = _run(slow_m, x, g)
    tol = ptol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for (y, dx), (y2, dx2) in zip(got[0], want[0]):
        torch.testing.assert_close(y.double(), y2.double(), **tol)
        torch.testing.assert_close(dx.double(), dx2.double(), **tol)
    for n in got[1]:
        torch.testing.assert_close(got[1][n], want[1][n], **ptol)
    for k in got[2]:
        torch.testing.assert_close(got[2][k].double(), want[2][k].double(), **ptol)



@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,cls,fmt", [
    ((8, 16, 4, 4), bnlab.nn.BatchNorm2d, torch.channels_last),       # 128 rows of 16: read 8 rows at a time
    ((5, 16, 3, 3), bnlab.nn.BatchNorm2d, torch.channels_last),       # 45 rows: not a multiple of 8, row by row
    ((4, 48, 5, 6), bnlab.nn.BatchNorm2d, torch.channels_last),       # 120 rows of 48, 3 at a time
    ((2, 6, 3, 4, 5), bnlab.nn.BatchNorm3d, torch.channels_last_3d),
    ((64, 16, 32, 32), bnlab.nn.BatchNorm2d, torch.channels_last),    # 2^20 values: two threads
], ids=["cl-wide", "cl-narrow", "cl-48", "cl3d", "cl-large"])
def test_channels_last_training_takes_it_and_equals_the_numba_path_and_torch(counting, monkeypatch, dtype, shape,
                                                                             cls, fmt):
    """channels_last training up to 2^20 values: the (N * spatial, C) matrix of the 2-D kernels, few
    channels read several rows at a time; output, gradients and buffers as the numba path's, the
    output and gradient in channels_last."""
    torch.manual_seed(9)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 5).to(dtype).contiguous(memory_format=fmt)
    g = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    fast_m, slow_m = _pair(cls, shape[1], dtype)
    torch_m = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm3d)(shape[1], dtype=dtype)
    torch_m.load_state_dict(fast_m.state_dict())
    got = _run(fast_m, x, g, steps=2)
    assert counting.calls["train"] == 2
    for y, dx in got[0]:
        assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    want_torch = _run(torch_m, x, g, steps=2)
    monkeypatch.setattr(fast, "ext", None)
    want = _run(slow_m, x, g, steps=2)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for (y, dx), (y2, dx2), (y3, dx3) in zip(got[0], want[0], want_torch[0]):
        torch.testing.assert_close(y, y2, **tol)
        torch.testing.assert_close(dx, dx2, **tol)
        torch.testing.assert_close(y, y3, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dx, dx3, rtol=1e-4, atol=1e-4)
    for n in got[1]:
        torch.testing.assert_close(got[1][n], want[1][n], **tol)
    for k in got[2]:
        torch.testing.assert_close(got[2][k].double(), want[2][k].double(), **tol)


@needs_ext
@pytest.mark.parametrize("shape", [(6, 16, 2, 2), (3, 5)], ids=["channels_last", "2d-wide-rows"])
def test_gradcheck_channels_last_and_wide_rows_in_float64(shape):
    torch.manual_seed(2)
    x = torch.randn(shape, dtype=torch.float64)
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(48, 16, dtype=torch.float64)  # 48 rows of 16: read 8 rows at a time
    x.requires_grad_()
    w = torch.rand(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(x.shape[1], dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        r = fast.ext.train(x, w, b, None, None, None, 0.1, 1e-5)
        assert r is not None
        return r[0]

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,fmt", [((8, 16, 4, 4), torch.channels_last), ((5, 16, 3, 3), torch.channels_last),
                                       ((2, 6, 3, 4, 5), torch.channels_last_3d)], ids=["wide", "narrow", "3d"])
def test_channels_last_inference_takes_it_and_equals_torch(counting, dtype, shape, fmt):
    cls = bnlab.nn.BatchNorm2d if len(shape) == 4 else bnlab.nn.BatchNorm3d
    pdt = torch.float32 if dtype == torch.bfloat16 else dtype
    fast_m, _ = _pair(cls, shape[1], pdt)
    with torch.no_grad():
        fast_m.running_mean.normal_()
        fast_m.running_var.uniform_(0.5, 2.0)
    tm = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm3d)(shape[1], dtype=pdt)
    tm.load_state_dict(fast_m.state_dict())
    fast_m.eval(), tm.eval()
    x = (torch.randn(shape) * 3 + 1).to(dtype).contiguous(memory_format=fmt)
    with torch.no_grad():
        y = fast_m(x)
        want = tm(x)
    assert counting.calls["eval"] == 1 and y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    tol = dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, want, **tol)
    # the float64 formula, rounded once to the input's dtype
    r = ref.normalize(x.double(), fast_m.running_mean.double(),
                      ref.invstd_from_var(fast_m.running_var.double(), fast_m.eps), fast_m.weight.double(),
                      fast_m.bias.double())
    rt = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else \
        dict(rtol=2e-7, atol=2e-7) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(y.double(), r.to(dtype).double(), **rt)


def _act_pair(shape, act, running=False):
    """Two equal norm-act layers for ``shape`` (BatchNormAct2d for 4-D, else 1d), their affine (and
    with ``running``, their buffers) away from the defaults."""
    cls = bnlab.nn.BatchNormAct2d if len(shape) == 4 else bnlab.nn.BatchNormAct1d
    a, b = cls(shape[1], act=act), cls(shape[1], act=act)
    with torch.no_grad():
        a.weight.uniform_(0.5, 1.5)
        a.bias.normal_()
        if running:
            a.running_mean.normal_()
            a.running_var.uniform_(0.5, 2.0)
    b.load_state_dict(a.state_dict())
    return a, b


@needs_ext
@pytest.mark.parametrize("act", ["relu", "none"])
@pytest.mark.parametrize("with_res", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("shape,fmt", [((8, 16, 5, 5), torch.contiguous_format), ((8, 16, 4, 4), torch.channels_last),
                                       ((40, 24), torch.contiguous_format)], ids=["nchw", "channels_last", "2d"])
def test_norm_act_layers_take_it_with_their_epilogue_and_equal_the_numba_kernels(counting, monkeypatch, act,
                                                                                with_res, shape, fmt):
    """BatchNormAct's relu(BN(x) + residual) in training: one C++ call (the epilogue inside the
    kernels' passes), output, every gradient (the residual's too) and buffers as the numba path's."""
    torch.manual_seed(4)
    a, b = _act_pair(shape, act)
    x = (torch.randn(shape) * 2 + 3).contiguous(memory_format=fmt)
    r = torch.randn(shape).contiguous(memory_format=fmt) if with_res else None
    g = torch.randn(shape).contiguous(memory_format=fmt)

    def run(m):
        xi = x.clone().requires_grad_()
        ri = None if r is None else r.clone().requires_grad_()
        y = m(xi, ri)
        y.backward(g)
        return y.detach(), xi.grad, None if ri is None else ri.grad, m.weight.grad, m.bias.grad

    got = run(a)
    assert counting.calls["train"] == 1
    monkeypatch.setattr(fast, "ext", None)
    want = run(b)
    for u, v in zip(got, want):
        if u is not None:
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    if act == "relu":
        assert (got[0] >= 0).all() and (got[0] == 0).any()
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-6, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (6, 5)], ids=["nchw", "2d"])
def test_the_epilogue_passes_gradcheck_in_float64(shape):
    torch.manual_seed(5)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    r = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)

    def f(x, r, w, b):
        out = fast.ext.train(x, w, b, None, None, None, 0.1, 1e-5, r, True)
        assert out is not None
        return out[0]

    assert torch.autograd.gradcheck(f, (x, r, w, b))
    assert torch.autograd.gradgradcheck(f, (x, r, w, b))


@needs_ext
def test_the_epilogue_declines_a_residual_it_cannot_read_in_place(counting):
    m = bnlab.nn.BatchNormAct2d(4)
    x = torch.randn(2, 4, 3, 3)
    m(x, torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last))  # another layout
    m(x, torch.randn(2, 4, 3, 3, dtype=torch.float64))  # another dtype: the general path's rule
    assert counting.calls["train"] == 0
    m(x, torch.randn(2, 4, 3, 3))
    assert counting.calls["train"] == 1


@needs_ext
@pytest.mark.parametrize("act", ["relu", "none"])
@pytest.mark.parametrize("with_res", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("shape,fmt", [((8, 16, 5, 5), torch.contiguous_format), ((8, 16, 4, 4), torch.channels_last),
                                       ((40, 24), torch.contiguous_format), ((64, 16, 32, 32), torch.contiguous_format)],
                         ids=["nchw", "channels_last", "2d", "nchw-large"])
def test_norm_act_inference_takes_it_and_equals_the_numba_kernels(counting, monkeypatch, act, with_res, shape, fmt):
    torch.manual_seed(8)
    a, b = _act_pair(shape, act, running=True)
    a.eval(), b.eval()
    x = (torch.randn(shape) * 2 + 0.5).contiguous(memory_format=fmt)
    r = torch.randn(shape).contiguous(memory_format=fmt) if with_res else None
    with torch.no_grad():
        y = a(x, r)
        assert counting.calls["eval"] == 1 and y.is_contiguous(memory_format=fmt)
        monkeypatch.setattr(fast, "ext", None)
        want = b(x, r)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    if act == "relu":
        assert (y >= 0).all() and (y == 0).any()
