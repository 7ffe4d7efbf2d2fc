"""bnlab's fused batch norm + activation kernels (``bnlab.kernels.cpu``) against torch.

``y = act(BN(x) + residual)`` from :func:`cpu.forward_train` / :func:`cpu.forward_eval` and its
backward :func:`cpu.backward_act` (``dx``, ``dweight``, ``dbias``, ``dresidual``) against torch's
``F.batch_norm``, the residual add and ``F.relu`` in float64 on the same
values, for every activation, with and without a residual, float32 and float64, training and eval,
on inputs that reach every loop of both layouts: the rows layout (NCHW, 3-D, with channel groups
and split over rows), the columns layout (2-D (N, C), channels_last, channels_last_3d), odd sizes,
odd strides and unaligned views. Each case also runs with small :class:`cpu.Thresholds`, so that
the prefetching and non-temporal (streamed) paths and the thread pool are taken: the streamed and
prefetching paths must give the same bits as the regular ones.
"""

import pytest
import torch
import torch.nn.functional as F

from bnlab.kernels import cpu
from bnlab.kernels.cpu import Act, Thresholds

EPS = 1e-5
ACTS = ["none", "relu"]
TORCH_ACT = {"none": lambda z: z, "relu": F.relu}
FORCED = Thresholds(prefetch_from=0, stream_from=0)  # prefetch and streamed stores from 0 bytes
POOL = Thresholds(serial_below=0, prefetch_from=0, stream_from=0)  # ... and the thread pool for every size

# (shape, layout, what it reaches)
CASES = [
    ((4, 20, 5, 7), "contiguous", "rows, channel groups, a partial last group, odd spans"),
    ((8, 32, 8, 8), "contiguous", "rows, channel groups, on the thread pool"),
    ((6, 3, 20, 21), "contiguous", "rows, few channels: split over rows, odd spans"),
    ((3, 5, 1200), "contiguous", "rows 3-D, few channels, spans longer than a chunk of dz"),
    ((4, 32, 6, 6), "channels_last", "columns, channels_last, C a multiple of a line"),
    ((4, 3, 5, 6), "channels_last", "columns, channels_last, C not a line"),
    ((2, 16, 3, 4, 5), "channels_last_3d", "columns 5-D"),
    ((100, 7), "contiguous", "columns 2-D (N, C), odd"),
    ((514, 48), "contiguous", "columns 2-D, a block per thread, rows not a multiple of 4"),
    ((64, 48), "offset", "columns 2-D, unaligned data pointer"),
    ((4, 20, 5, 7), "batch_slice", "rows, big[1:]: unaligned"),
    ((4, 3, 5, 6), "strided", "odd strides: copied"),
]
IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay, _ in CASES]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


def make(shape, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    if layout == "offset":
        return torch.randn(n + 1, dtype=dtype, generator=g)[1:].view(shape)
    if layout == "batch_slice":
        return torch.randn((shape[0] + 1, *shape[1:]), dtype=dtype, generator=g)[1:]
    if layout == "strided":
        return torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, generator=g)[..., ::2]
    x = torch.randn(shape, dtype=dtype, generator=g)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def tensors(shape, layout, dtype):
    """x, dy, residual (x's layout), weight, bias, running mean and variance."""
    c = shape[1]
    x = make(shape, layout, dtype, 1) * 1.5 + 0.25
    dy = make(shape, layout, dtype, 2)
    res = make(shape, layout, dtype, 3)
    g = torch.Generator().manual_seed(4)
    w = torch.rand(c, dtype=dtype, generator=g) + 0.5
    b = torch.randn(c, dtype=dtype, generator=g) * 0.5
    rm = torch.randn(c, dtype=dtype, generator=g) * 0.2 + 0.25
    rv = torch.rand(c, dtype=dtype, generator=g) + 1.5
    return x, dy, res, w, b, rm, rv


def ours(x, dy, res, w, b, rm, rv, act, train, thresholds):
    if train:
        y, stats, nbad = cpu.forward_train(x, w, b, EPS, act=act, residual=res, thresholds=thresholds)
        assert nbad == 0
    else:
        stats = cpu.eval_stats(rm, rv, EPS)
        y = cpu.forward_eval(x, w, b, stats, act=act, residual=res, thresholds=thresholds)
    dx, grads, dres = cpu.backward_act(dy, x, w, b, stats, train, act, res, thresholds=thresholds)
    out = {"y": y, "dx": dx, "dweight": torch.from_numpy(grads[1]), "dbias": torch.from_numpy(grads[0])}
    if res is not None:
        out["dresidual"] = dres
    else:
        assert dres is None
    return out


def theirs(x, dy, res, w, b, rm, rv, act, train):
    """torch in float64: F.batch_norm, the residual add, the activation; autograd's gradients."""
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    rr = None if res is None else res.detach().double().requires_grad_()
    z = F.batch_norm(xr, None if train else rm.double(), None if train else rv.double(), wr, br, training=train,
                     eps=EPS)
    if rr is not None:
        z = z + rr
    y = TORCH_ACT[act](z)
    y.backward(dy.double())
    out = {"y": y.detach(), "dx": xr.grad, "dweight": wr.grad, "dbias": br.grad}
    if rr is not None:
        out["dresidual"] = rr.grad
    return out


def tol(dtype):
    # bnlab forms every value in float64 and rounds once: float32 results are within an ulp or so
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def assert_matches(got, want, dtype, what):
    assert got.keys() == want.keys(), what
    for k in want:
        assert got[k].dtype == dtype, (what, k)
        torch.testing.assert_close(got[k].double(), want[k], **tol(dtype), msg=lambda m, k=k: f"{what} {k}: {m}")


def assert_bitwise(a, b, what):
    for k in a:
        assert a[k].stride() == b[k].stride(), (what, k)
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


# ----------------------------------------------------------------------------------------------
# against torch, on every loop, regular and forced paths


def check_every_path(shape, layout, act, residual, train, dtype):
    x, dy, res, w, b, rm, rv = tensors(shape, layout, dtype)
    res = res if residual else None
    want = theirs(x, dy, res, w, b, rm, rv, act, train)
    what = f"{act} residual={residual} train={train} {shape} {layout} {dtype}"

    got = ours(x, dy, res, w, b, rm, rv, act, train, cpu.DEFAULT_THRESHOLDS)
    assert_matches(got, want, dtype, what)
    like = torch.empty_like(x).stride()
    for k in ("y", "dx", "dresidual"):
        if k in got and not (act == "none" and k == "dresidual"):  # act none: dresidual is dy itself
            assert got[k].stride() == like, (what, k)

    # prefetch and streamed stores forced on: the same bits
    assert cpu.plan(x, cpu.threads(), FORCED).stream
    assert_bitwise(ours(x, dy, res, w, b, rm, rv, act, train, FORCED), got, what + " forced")
    # ... and on the thread pool for every size (other partial sums: close, not the same bits)
    if dtype == torch.float32:
        assert_matches(ours(x, dy, res, w, b, rm, rv, act, train, POOL), want, dtype, what + " pool")


@pytest.mark.parametrize("shape,layout,_what", CASES, ids=IDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@DTYPES
def test_fused_training_step_matches_torch_on_every_path(shape, layout, _what, act, residual, dtype):
    check_every_path(shape, layout, act, residual, True, dtype)


EVAL_CASES = [c for c in CASES if c[1] in ("contiguous", "channels_last")][::2]  # both layouts, both rows loops
EVAL_IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay, _ in EVAL_CASES]


@pytest.mark.parametrize("shape,layout,_what", EVAL_CASES, ids=EVAL_IDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@DTYPES
def test_fused_eval_matches_torch_on_every_path(shape, layout, _what, act, residual, dtype):
    """Eval: the statistics are constants (running buffers); the backward's dx is k * dz."""
    check_every_path(shape, layout, act, residual, False, dtype)


# ----------------------------------------------------------------------------------------------
# gradcheck


class _Fused(torch.autograd.Function):
    """A test-only autograd wrapper of the fused kernels (first order)."""

    @staticmethod
    def forward(ctx, x, w, b, res, act, stats, thresholds):
        train = stats is None
        if train:
            y, stats, _ = cpu.forward_train(x, w, b, 1e-3, act=act, residual=res, thresholds=thresholds)
        else:
            y = cpu.forward_eval(x, w, b, stats, act=act, residual=res, thresholds=thresholds)
        ctx.stats, ctx.train, ctx.act, ctx.thresholds = stats, train, act, thresholds
        ctx.save_for_backward(x, w, b, res)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, b, res = ctx.saved_tensors
        dx, grads, dres = cpu.backward_act(dy, x, w, b, ctx.stats, ctx.train, ctx.act, res,
                                           thresholds=ctx.thresholds)
        need = ctx.needs_input_grad
        return (dx, torch.from_numpy(grads[1]) if need[1] else None, torch.from_numpy(grads[0]) if need[2] else None,
                dres, None, None, None)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape,layout,thresholds", [
    ((3, 4, 2, 3), "contiguous", cpu.DEFAULT_THRESHOLDS),  # one thread: channel groups
    ((8, 5), "contiguous", cpu.DEFAULT_THRESHOLDS),
    ((3, 8, 2, 2), "channels_last", FORCED),  # float64 rows of 8 channels: whole lines, streamed
    ((4, 3, 2, 3), "contiguous", FORCED),  # split over rows
], ids=["rows", "2d", "channels_last-forced", "rows-split-forced"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(act, shape, layout, thresholds, train):
    x, _, res, w, b, rm, rv = tensors(shape, layout, torch.float64)
    for t in (x, res, w, b):
        t.requires_grad_()
    stats = None if train else cpu.eval_stats(rm, rv, 1e-3)
    assert torch.autograd.gradcheck(lambda x, w, b, r: _Fused.apply(x, w, b, r, act, stats, thresholds),
                                    (x, w, b, res))
    # without a residual, and without weight and bias
    assert torch.autograd.gradcheck(lambda x: _Fused.apply(x, None, None, None, act, stats, thresholds), (x,))


# ----------------------------------------------------------------------------------------------
# the API


def test_act_is_a_member_its_value_or_its_name():
    x, _, res, w, b, _, _ = tensors((4, 6, 5, 5), "contiguous", torch.float32)
    y = cpu.forward_train(x, w, b, EPS, act="relu", residual=res)[0]
    for act in (Act.RELU, int(Act.RELU), "relu"):
        assert torch.equal(cpu.forward_train(x, w, b, EPS, act=act, residual=res)[0], y)


def test_act_none_without_residual_is_the_plain_batch_norm():
    x, dy, _, w, b, _, _ = tensors((4, 6, 5, 5), "contiguous", torch.float32)
    y0, stats0, _ = cpu.forward_train(x, w, b, EPS)
    y, stats, _ = cpu.forward_train(x, w, b, EPS, act="none")
    assert torch.equal(y, y0) and (stats == stats0).all()
    dx0, grads0 = cpu.backward(dy, x, w, stats, True)
    dx, grads, dres = cpu.backward_act(dy, x, w, b, stats, True, "none")
    assert torch.equal(dx, dx0) and (grads == grads0).all() and dres is None


def test_act_none_residual_gradient_is_dy_itself():
    x, dy, res, w, b, _, _ = tensors((4, 6, 5, 5), "contiguous", torch.float32)
    stats = cpu.forward_train(x, w, b, EPS, residual=res)[1]
    dx, grads, dres = cpu.backward_act(dy, x, w, b, stats, True, Act.NONE, res)
    assert dres is dy
    assert torch.equal(dx, cpu.backward(dy, x, w, stats, True)[0])


def test_relu_gradient_is_a_select_not_a_product():
    """An infinite incoming gradient where relu is off gives 0 (torch's threshold_backward), not NaN."""
    x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])
    y, stats, _ = cpu.forward_train(x, None, None, EPS, act="relu")
    assert torch.equal(y[:2], torch.zeros(2, 1))
    dy = torch.tensor([[float("inf")], [1.0], [1.0], [1.0]])
    dx, grads, _ = cpu.backward_act(dy, x, None, None, stats, False, "relu")
    assert torch.equal(dx[0], torch.zeros(1))
    assert grads[0, 0] == 2.0


def test_empty_batch():
    x = torch.empty(0, 3, 4, 4)
    y, stats, nbad = cpu.forward_train(x, None, None, EPS, act="relu", residual=torch.empty(0, 3, 4, 4))
    assert y.shape == x.shape and nbad == 0
    dx, grads, dres = cpu.backward_act(torch.empty_like(x), x, None, None, stats, True, "relu", torch.empty_like(x))
    assert dx.shape == x.shape and dres.shape == x.shape and (grads == 0).all()


@pytest.mark.parametrize("shape,fmt", [((8, 16, 24, 24), None), ((16, 3, 24, 24), None),
                                       ((8, 16, 24, 24), torch.channels_last)],
                         ids=["rows", "rows-few-channels", "channels_last"])
def test_serial_twins_of_the_fused_kernels_give_the_one_thread_bits(shape, fmt):
    x = torch.randn(shape)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    dy, res = torch.randn_like(x), torch.randn_like(x)
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = ours(x, dy, res, w, b, None, None, "relu", True, cpu.DEFAULT_THRESHOLDS)
        cpu.use_serial_kernels(True)
        try:
            assert cpu.act_kernels(Act.RELU, True).rows_backward.py_func.__name__ == "rows_backward_relu_serial"
            twin = ours(x, dy, res, w, b, None, None, "relu", True, cpu.DEFAULT_THRESHOLDS)
        finally:
            cpu.use_serial_kernels(False)
    finally:
        torch.set_num_threads(old)
    assert_bitwise(twin, one, f"serial twins {shape}")


@pytest.mark.parametrize("bad", ["tanh", "RELU ", "silu", "gelu", 2, 7, None, True, 1.0, [1]])
def test_an_unknown_activation_is_refused_by_name(bad):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"forward_train: act must be 'none' or 'relu'.*got .*silu and gelu are not fused"):
        cpu.forward_train(x, None, None, EPS, act=bad)
    with pytest.raises(ValueError, match=r"backward_act: act must be 'none' or 'relu'"):
        cpu.backward_act(x, x, None, None, cpu.forward_train(x, None, None, EPS)[1], True, bad)


def test_a_residual_must_match_the_input():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match=r"forward_eval: residual must have the input's shape, dtype and device: "
                                         r"expected \(4, 3, 2, 2\) torch.float32 on cpu, got \(4, 3, 2\)"):
        cpu.forward_eval(x, None, None, cpu.forward_train(x, None, None, EPS)[1], act="relu",
                         residual=torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match=r"forward_train: residual .* got \(4, 3, 2, 2\) torch.float64"):
        cpu.forward_train(x, None, None, EPS, residual=x.double())
    with pytest.raises(TypeError, match=r"forward_train: residual must be a tensor \(or None\), got ndarray"):
        cpu.forward_train(x, None, None, EPS, residual=x.numpy())
