"""The size-gated paths of bnlab's CPU kernels, forced on for small tensors.

From ``Thresholds.stream_from`` bytes the training forward stores ``y`` and the backward ``dx``
with non-temporal whole-cache-line stores (scalar heads and tails around the aligned body; in the
columns layout only for whole, aligned lines); from ``Thresholds.prefetch_from`` bytes the rows
layout with channel groups prefetches in software. The thresholds are an argument of the kernels'
entry points (``thresholds=``, default ``cpu.DEFAULT_THRESHOLDS``) and a key of the plan cache, so
the tests below pass small ones to force the paths on for small tensors.

The streamed path computes the same float64 operations in the same order as the regular one: its
results must be bit-identical, not merely close. Inputs cover the rows layout with channel groups
(odd spatial sizes: spans that are not whole lines, partial last groups), with few channels, 3-D and
5-D; the columns layout (2-D, channels_last, channels_last_3d, (N, C, L) with C innermost) with C a
multiple of a cache line and not; serial and threaded sizes; and views whose data pointer is not
64-byte aligned.
"""

import pytest
import torch

import bnlab
import bnlab.functional as BF
from bnlab.kernels import cpu
from bnlab.kernels.cpu import Thresholds
from bnlab.kernels.plan import make_plan

POOL = 2  # the thread count conftest sets; only a key of the plan cache in test_plan_*
NEVER = 1 << 62  # a threshold no tensor reaches
DEFAULT = cpu.DEFAULT_THRESHOLDS
OFF = Thresholds(prefetch_from=NEVER, stream_from=NEVER)
FORCED = Thresholds(prefetch_from=0, stream_from=0)  # both paths on from 0 bytes
STREAM_ONLY = Thresholds(prefetch_from=NEVER, stream_from=0)
PREFETCH_ONLY = Thresholds(prefetch_from=0, stream_from=NEVER)
EPS = 1e-5


# ----------------------------------------------------------------------------------------------
# inputs


def _randn(shape, dtype, seed):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def make(shape, layout, dtype, seed):
    """A deterministic input of ``shape`` in ``layout``:

    contiguous / channels_last / channels_last_3d; transposed: (N, C, L) view of (N, L, C) memory;
    offset: contiguous, one element past the start of its storage (data pointer not 64-byte
    aligned); offset_cl: channels_last, likewise; batch_slice: ``big[1:]`` of a batch one larger;
    row_slice: 2-D ``big[1:]`` (aligned or not, depending on C and the dtype).
    """
    n = 1
    for d in shape:
        n *= d
    if layout == "contiguous":
        return _randn(shape, dtype, seed)
    if layout == "channels_last":
        return _randn(shape, dtype, seed).contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return _randn(shape, dtype, seed).contiguous(memory_format=torch.channels_last_3d)
    if layout == "transposed":
        return _randn((shape[0], shape[2], shape[1]), dtype, seed).transpose(1, 2)
    if layout == "offset":
        return _randn(n + 1, dtype, seed)[1:].view(shape)
    if layout == "offset_cl":
        nn, c, h, w = shape
        return _randn(n + 1, dtype, seed)[1:].view(nn, h, w, c).permute(0, 3, 1, 2)
    if layout in ("batch_slice", "row_slice"):
        return _randn((shape[0] + 1, *shape[1:]), dtype, seed)[1:]
    raise ValueError(layout)


UNALIGNED = ("offset", "offset_cl", "batch_slice")

# (shape, layout, the layout the kernels see, what it reaches)
CASES = [
    ((8, 32, 4, 4), "contiguous", cpu.ROWS, "rows, channel groups, whole-line spans"),
    ((4, 16, 9, 9), "contiguous", cpu.ROWS, "rows, channel groups, odd spans: heads and tails"),
    ((4, 20, 5, 7), "contiguous", cpu.ROWS, "rows, channel groups, a partial last group"),
    ((8, 32, 8, 8), "contiguous", cpu.ROWS, "rows, channel groups, on the thread pool"),
    ((6, 3, 20, 20), "contiguous", cpu.ROWS, "rows, few channels: split over rows"),
    ((8, 3, 32, 32), "contiguous", cpu.ROWS, "rows, few channels, on the thread pool"),
    ((4, 24, 33), "contiguous", cpu.ROWS, "rows 3-D (N, C, L)"),
    ((2, 3, 600), "contiguous", cpu.ROWS, "rows 3-D, lanes and a tail"),
    ((2, 8, 3, 4, 5), "contiguous", cpu.ROWS, "rows 5-D"),
    ((64, 48), "contiguous", cpu.COLUMNS, "columns 2-D, C a multiple of a line"),
    ((64, 32), "contiguous", cpu.COLUMNS, "columns 2-D, C two float32 lines"),
    ((96, 8), "contiguous", cpu.COLUMNS, "columns 2-D, C one float64 line, half a float32 one"),
    ((100, 7), "contiguous", cpu.COLUMNS, "columns 2-D, C not a multiple of a line: regular stores"),
    ((514, 48), "contiguous", cpu.COLUMNS, "columns 2-D, a block per thread, rows not a multiple of 4"),
    ((4, 32, 6, 6), "channels_last", cpu.COLUMNS, "columns, channels_last"),
    ((8, 32, 8, 8), "channels_last", cpu.COLUMNS, "columns, channels_last, on the thread pool"),
    ((4, 3, 5, 6), "channels_last", cpu.COLUMNS, "columns, channels_last, C not a line"),
    ((8, 16, 8, 8), "channels_last", cpu.COLUMNS, "columns, few channels: 8 rows read as one wide row"),
    ((3, 16, 5, 5), "channels_last", cpu.COLUMNS, "columns, few channels, an odd number of rows: no wide rows"),
    ((6, 12, 3, 6), "channels_last", cpu.COLUMNS, "columns, wide rows of 4 x 12, a tail past the four streams"),
    ((2, 16, 3, 4, 5), "channels_last_3d", cpu.COLUMNS, "columns, channels_last_3d"),
    ((6, 32, 10), "transposed", cpu.COLUMNS, "columns, (N, C, L) with C innermost"),
    ((64, 48), "row_slice", cpu.COLUMNS, "columns 2-D, torch.randn(65, 48)[1:] (192 bytes in: aligned)"),
    ((64, 48), "offset", cpu.COLUMNS, "columns 2-D, unaligned data pointer"),
    ((4, 32, 6, 6), "offset_cl", cpu.COLUMNS, "columns, channels_last, unaligned data pointer"),
    ((8, 32, 4, 4), "offset", cpu.ROWS, "rows, channel groups, unaligned data pointer"),
    ((4, 20, 5, 7), "batch_slice", cpu.ROWS, "rows, channel groups, big[1:]: unaligned"),
    ((6, 3, 20, 21), "batch_slice", cpu.ROWS, "rows, few channels, big[1:]: unaligned"),
]
IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay, _, _ in CASES]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


def check_input(x, layout, expected_layout):
    assert cpu.layout(x) == expected_layout, (tuple(x.shape), layout)
    if layout in UNALIGNED:
        assert x.data_ptr() % 64 != 0, "meant to be an unaligned view"


def case_tensors(shape, layout, dtype):
    """x, dy (the same strides and storage offset as x), weight, bias, running mean and variance."""
    c = shape[1]
    x = make(shape, layout, dtype, seed=1)
    dy = make(shape, layout, dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    w = torch.rand(c, dtype=dtype, generator=g) + 0.5
    b = torch.randn(c, dtype=dtype, generator=g)
    rm = torch.randn(c, dtype=dtype, generator=g)
    rv = torch.rand(c, dtype=dtype, generator=g) + 0.5
    return x, dy, w, b, rm, rv


def train_step(x, dy, w, b, thresholds):
    """One training forward and backward through bnlab's kernels with ``thresholds``."""
    y, stats, nbad = cpu.forward_train(x, w, b, EPS, thresholds=thresholds)
    assert nbad == 0
    dx, grads = cpu.backward(dy, x, w, stats, True, thresholds=thresholds)
    return {"y": y, "x.grad": dx, "weight.grad": torch.from_numpy(grads[1]), "bias.grad": torch.from_numpy(grads[0]),
            "mean": torch.from_numpy(stats[0]), "var": torch.from_numpy(stats[1])}


def torch_train_step(x, dy, w, b):
    """The same step through torch's batch norm, on fresh leaves (x keeps its storage)."""
    xr, wr, br = x.detach().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    y = torch.nn.functional.batch_norm(xr, None, None, wr, br, training=True, eps=EPS)
    y.backward(dy)
    var, mean = torch.var_mean(x.double(), dim=[d for d in range(x.dim()) if d != 1], unbiased=False)
    return {"y": y, "x.grad": xr.grad, "weight.grad": wr.grad, "bias.grad": br.grad, "mean": mean, "var": var}


def eval_step(x, dy, w, b, stats, thresholds):
    y = cpu.forward_eval(x, w, b, stats, thresholds=thresholds)
    dx, grads = cpu.backward(dy, x, w, stats, False, thresholds=thresholds)
    return {"y": y, "x.grad": dx, "weight.grad": torch.from_numpy(grads[1]), "bias.grad": torch.from_numpy(grads[0])}


def plan_flags(x, thresholds):
    """(prefetch, stream) of the plan the kernels use for ``x`` with ``thresholds``."""
    p = cpu.plan(x, cpu.threads(), thresholds)  # the thread count the kernels key their plans by
    return p.prefetch, p.stream


def assert_bitwise(a, b, what):
    for k in a:
        assert a[k].stride() == b[k].stride(), (what, k)
        if not torch.equal(a[k], b[k]):
            diff = (a[k].double() - b[k].double()).abs()
            pytest.fail(f"{what}: {k} differs in {int((diff > 0).sum())} of {diff.numel()} values, "
                        f"max abs diff {diff.max().item():.3e}")


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def assert_close_all(ours, theirs, dtype, **override):
    for k in theirs:
        t = override.get(k, tol(dtype))
        torch.testing.assert_close(ours[k].to(theirs[k].dtype), theirs[k], **t, msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------------------------
# 1. forced on vs off: the same bits


@pytest.mark.parametrize("shape,layout,lay,_what", CASES, ids=IDS)
@DTYPES
def test_forced_paths_give_bitwise_the_same_training_step(shape, layout, lay, _what, dtype):
    x, dy, w, b, _, _ = case_tensors(shape, layout, dtype)
    check_input(x, layout, lay)

    assert plan_flags(x, DEFAULT) == (False, False)  # these small tensors take neither path by default
    off = train_step(x, dy, w, b, DEFAULT)

    pf, stream = plan_flags(x, FORCED)
    assert stream
    on = train_step(x, dy, w, b, FORCED)

    assert_bitwise(on, off, f"{shape} {layout} {dtype} (pf={pf})")


@pytest.mark.parametrize("shape,layout,lay,_what", [c for c in CASES if c[2] == cpu.ROWS][:4],
                         ids=[i for c, i in zip(CASES, IDS) if c[2] == cpu.ROWS][:4])
@pytest.mark.parametrize("th,flags", [(STREAM_ONLY, (False, True)), (PREFETCH_ONLY, (True, False))],
                         ids=["stream-only", "prefetch-only"])
def test_each_path_alone_gives_bitwise_the_same_training_step(shape, layout, lay, _what, th, flags):
    dtype = torch.float32
    x, dy, w, b, _, _ = case_tensors(shape, layout, dtype)
    off = train_step(x, dy, w, b, DEFAULT)
    assert plan_flags(x, th) == flags
    on = train_step(x, dy, w, b, th)
    assert_bitwise(on, off, f"{shape} {layout} {th}")


# ----------------------------------------------------------------------------------------------
# 2. forced on vs torch


@pytest.mark.parametrize("shape,layout,lay,_what", CASES, ids=IDS)
@DTYPES
def test_forced_paths_agree_with_torch(shape, layout, lay, _what, dtype):
    x, dy, w, b, _, _ = case_tensors(shape, layout, dtype)
    check_input(x, layout, lay)
    assert plan_flags(x, FORCED)[1]
    ours = train_step(x, dy, w, b, FORCED)
    assert_close_all(ours, torch_train_step(x, dy, w, b), dtype, mean=tol(torch.float64), var=tol(torch.float64))
    # bnlab's outputs take torch.empty_like(x)'s strides (torch's may not: (N, C, L) with C innermost)
    assert ours["y"].stride() == torch.empty_like(x).stride()
    assert ours["x.grad"].stride() == torch.empty_like(x).stride()


# ----------------------------------------------------------------------------------------------
# 3. eval mode (the backward's dx = k * dy, streamed with _nt_scale_line)

EVAL_CASES = [
    ((8, 32, 4, 4), "contiguous"),
    ((4, 16, 9, 9), "contiguous"),
    ((6, 3, 20, 20), "contiguous"),
    ((8, 32, 8, 8), "contiguous"),
    ((64, 48), "contiguous"),
    ((100, 7), "contiguous"),
    ((514, 48), "contiguous"),
    ((4, 32, 6, 6), "channels_last"),
    ((8, 16, 8, 8), "channels_last"),
    ((3, 16, 5, 5), "channels_last"),
    ((4, 32, 6, 6), "offset_cl"),
    ((4, 20, 5, 7), "batch_slice"),
    ((2, 16, 3, 4, 5), "channels_last_3d"),
    ((6, 32, 10), "transposed"),
]
EVAL_IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in EVAL_CASES]


def torch_eval_step(x, dy, w, b, rm, rv):
    xr, wr, br = x.detach().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    y = torch.nn.functional.batch_norm(xr, rm, rv, wr, br, training=False, eps=EPS)
    y.backward(dy)
    return {"y": y, "x.grad": xr.grad, "weight.grad": wr.grad, "bias.grad": br.grad}


@pytest.mark.parametrize("shape,layout", EVAL_CASES, ids=EVAL_IDS)
@DTYPES
def test_eval_forced_on_is_bitwise_the_same_and_agrees_with_torch(shape, layout, dtype):
    x, dy, w, b, rm, rv = case_tensors(shape, layout, dtype)
    if layout in UNALIGNED:
        assert x.data_ptr() % 64 != 0
    stats = cpu.eval_stats(rm, rv, EPS)

    assert plan_flags(x, DEFAULT) == (False, False)
    off = eval_step(x, dy, w, b, stats, DEFAULT)
    assert plan_flags(x, FORCED)[1]
    on = eval_step(x, dy, w, b, stats, FORCED)
    assert_bitwise(on, off, f"eval {shape} {layout} {dtype}")
    assert_close_all(on, torch_eval_step(x, dy, w, b, rm, rv), dtype)


# ----------------------------------------------------------------------------------------------
# 4. gradcheck through the streamed path


class _ForcedBatchNorm(torch.autograd.Function):
    """bnlab's kernels with both paths forced on (first-order backward only)."""

    @staticmethod
    def forward(ctx, x, w, b, stats):
        train = stats is None
        if train:
            y, stats, _ = cpu.forward_train(x, w, b, 1e-3, thresholds=FORCED)
        else:
            y = cpu.forward_eval(x, w, b, stats, thresholds=FORCED)
        ctx.stats, ctx.train = stats, train
        ctx.save_for_backward(x, w)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx, grads = cpu.backward(dy, x, w, ctx.stats, ctx.train, thresholds=FORCED)
        return dx, torch.from_numpy(grads[1]), torch.from_numpy(grads[0]), None


@pytest.mark.parametrize("shape,layout", [((12, 8), "contiguous"), ((4, 8, 3, 3), "contiguous"),
                                          ((4, 8, 3, 3), "channels_last")])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64_with_paths_forced_on(shape, layout, training):
    x, _, w, b, rm, rv = case_tensors(shape, layout, torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    assert plan_flags(x, FORCED)[1]
    stats = None if training else cpu.eval_stats(rm, rv, 1e-3)
    assert torch.autograd.gradcheck(lambda x, w, b: _ForcedBatchNorm.apply(x, w, b, stats), (x, w, b))


# ----------------------------------------------------------------------------------------------
# 5. the plans select the paths


@pytest.mark.parametrize("shape,layout,pf", [
    ((8, 32, 4, 4), "contiguous", True),  # rows with channel groups: prefetches
    ((8, 32, 8, 8), "contiguous", True),
    ((6, 3, 20, 20), "contiguous", False),  # rows over single rows: no groups, no prefetch
    ((64, 48), "contiguous", False),  # columns: never prefetches
    ((4, 32, 6, 6), "channels_last", False),
    ((100, 7), "contiguous", False),
])
def test_plan_selects_the_paths_from_the_thresholds(shape, layout, pf):
    x = make(shape, layout, torch.float32, seed=0)
    nbytes = x.numel() * x.element_size()

    p = cpu.plan(x, POOL, DEFAULT)
    assert (p.prefetch, p.stream) == (False, False)
    assert nbytes < min(DEFAULT.prefetch_from, DEFAULT.stream_from)

    p = cpu.plan(x, POOL, FORCED)
    assert p.stream is True
    assert p.prefetch is pf
    assert (p.group > 0) is pf  # pf exactly where the rows layout groups channels

    # the thresholds are inclusive lower bounds: from exactly nbytes on, not from one byte more
    p = cpu.plan(x, POOL, Thresholds(prefetch_from=nbytes, stream_from=nbytes))
    assert (p.prefetch, p.stream) == (pf, True)
    p = cpu.plan(x, POOL, Thresholds(prefetch_from=nbytes + 1, stream_from=nbytes + 1))
    assert (p.prefetch, p.stream) == (False, False)


def test_plan_serial_below_is_a_threshold_in_elements():
    x = make((8, 32, 4, 4), "contiguous", torch.float32, seed=0)  # 4096 elements
    assert cpu.plan(x, POOL, Thresholds(serial_below=4097)).serial
    p = cpu.plan(x, POOL, Thresholds(serial_below=4096))
    assert not p.serial and p.threads == POOL
    assert cpu.plan(x, 1, Thresholds(serial_below=4097)).threads == 1  # a pool of one is never "serial"
    assert not cpu.plan(x, 1, Thresholds(serial_below=4097)).serial


def test_plans_are_cached_per_thresholds():
    """A plan built with one thresholds argument is never served for another."""
    x = make((8, 32, 4, 4), "contiguous", torch.float32, seed=0)
    assert cpu.plan(x, POOL, FORCED).stream is True
    assert cpu.plan(x, POOL).stream is False  # the default thresholds
    assert cpu.plan(x, POOL, DEFAULT) is cpu.plan(x, POOL)
    assert cpu.plan(x, POOL, FORCED) is cpu.plan(x, POOL, Thresholds(prefetch_from=0, stream_from=0))
    assert cpu.plan(x, POOL, FORCED) == make_plan(x, POOL, FORCED)


# ----------------------------------------------------------------------------------------------
# 6. one tensor above the default thresholds


def test_just_above_8_mib_takes_both_paths_by_default_and_matches_torch_and_the_regular_path():
    shape = (2, 64, 128, 130)  # float32: 8,519,680 bytes, just above the default stream_from (8,388,608)
    dtype = torch.float32
    x, dy, w, b, rm, rv = case_tensors(shape, "contiguous", dtype)
    assert DEFAULT.stream_from <= x.numel() * x.element_size() < DEFAULT.stream_from * 1.05

    # the default path, end to end through bnlab's functional batch norm
    assert plan_flags(x, DEFAULT) == (True, True)
    xr, wr, br = x.detach().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    y = BF.batch_norm(xr, rm.clone(), rv.clone(), wr, br, training=True, momentum=0.1, eps=EPS)
    y.backward(dy)
    on = {"y": y.detach(), "x.grad": xr.grad, "weight.grad": wr.grad, "bias.grad": br.grad}
    # torch in float64 on the same values: bnlab's float32 results to float32 tolerances
    exact = torch_train_step(*(t.double() for t in (x, dy, w, b)))
    for k in on:
        assert on[k].dtype == dtype
        torch.testing.assert_close(on[k].double(), exact[k], **tol(dtype), msg=lambda m, k=k: f"{k}: {m}")
    # torch in float32: its dweight/dbias are float32 sums over 33,280 values per channel (off by
    # up to ~5e-4 from float64 at magnitudes ~400), hence the wider atol there
    theirs = torch_train_step(x, dy, w, b)
    wide = dict(rtol=1e-4, atol=2e-3)
    assert_close_all(on, {k: theirs[k] for k in on}, dtype, **{"weight.grad": wide, "bias.grad": wide})

    assert plan_flags(x, OFF) == (False, False)
    off = train_step(x, dy, w, b, OFF)
    assert_bitwise(on, {k: off[k] for k in on}, f"{shape} contiguous {dtype}, default thresholds vs paths off")


# ----------------------------------------------------------------------------------------------
# no autograd node when nothing needs a gradient


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(8, 32, 4, 4), (64, 48), (6, 3, 20, 20)])
def test_no_grad_path_matches_autograd_path(shape, train):
    torch.manual_seed(3)
    x = torch.randn(shape) * 2 + 0.5
    c = shape[1]
    mods = []
    for _ in range(2):
        m = (bnlab.nn.BatchNorm2d if len(shape) == 4 else bnlab.nn.BatchNorm1d)(c)
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 1.5, c))
            m.bias.copy_(torch.linspace(-1, 1, c))
            m.running_mean.copy_(torch.linspace(-0.2, 0.2, c))
            m.running_var.copy_(torch.linspace(0.5, 2.0, c))
        mods.append(m.train(train))
    y_grad = mods[0](x)  # weight requires grad: autograd node
    assert y_grad.grad_fn is not None
    with torch.no_grad():
        y_nograd = mods[1](x)
    assert y_nograd.grad_fn is None and not y_nograd.requires_grad
    assert torch.equal(y_grad.detach(), y_nograd)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(mods[0], name), getattr(mods[1], name)), name
    if train:
        assert int(mods[1].num_batches_tracked) == 1


def test_no_grad_train_nonfinite_still_guarded():
    m = bnlab.nn.BatchNorm1d(4)
    x = torch.randn(16, 4)
    x[3, 2] = float("nan")
    with torch.no_grad():
        with pytest.raises(bnlab.kernels.NonFiniteBatchError, match=r"\[2\]"):
            m(x)
    assert torch.equal(m.running_mean, torch.zeros(4)) and torch.equal(m.running_var, torch.ones(4))
    assert int(m.num_batches_tracked) == 0
