"""The size-gated paths of bnlab's CPU kernels, forced on for small tensors.

From ``cpu.STREAM_FROM`` bytes the training forward stores ``y`` and the backward ``dx`` with
non-temporal whole-cache-line stores (scalar heads and tails around the aligned body; in the
columns layout only for whole, aligned lines); from ``cpu.PREFETCH_FROM`` bytes the rows layout
with channel groups prefetches in software. Both thresholds are read when a per-shape plan is built
(``cpu._make_plan``, cached in ``cpu._PLANS``), so the fixtures below patch them and clear the cache
before and after each test.

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
from bnlab.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d

DEFAULTS = {"STREAM_FROM": cpu.STREAM_FROM, "PREFETCH_FROM": cpu.PREFETCH_FROM}
POOL = 2  # the thread count conftest sets; only a key of the plan cache in test_plan_*
NEVER = 1 << 62  # a threshold no tensor reaches


@pytest.fixture
def thresholds(monkeypatch):
    """``set(stream=..., prefetch=...)``: patch the thresholds (bytes; None: the module default)
    and clear the plan cache, so the next call builds its plan with them. The cache is cleared
    before the test and after it, so no plan built with patched thresholds outlives the test."""
    cpu._PLANS.clear()

    def set_(stream=None, prefetch=None):
        monkeypatch.setattr(cpu, "STREAM_FROM", DEFAULTS["STREAM_FROM"] if stream is None else stream)
        monkeypatch.setattr(cpu, "PREFETCH_FROM", DEFAULTS["PREFETCH_FROM"] if prefetch is None else prefetch)
        cpu._PLANS.clear()

    yield set_
    cpu._PLANS.clear()


@pytest.fixture
def forced(thresholds):
    """Both paths on from 0 bytes, for the whole test."""
    thresholds(stream=0, prefetch=0)
    return thresholds


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


def train_step(fn, x, dy, w, b, rm, rv):
    """One training forward and backward through ``fn`` (bnlab's or torch's batch_norm) on fresh
    leaves; x keeps its storage (and so its alignment); w, b and the buffers are cloned."""
    xr = x.detach().requires_grad_()
    wr = w.clone().requires_grad_()
    br = b.clone().requires_grad_()
    rmr, rvr = rm.clone(), rv.clone()
    y = fn(xr, rmr, rvr, wr, br, training=True, momentum=0.1, eps=1e-5)
    y.backward(dy)
    return {"y": y, "x.grad": xr.grad, "weight.grad": wr.grad, "bias.grad": br.grad,
            "running_mean": rmr, "running_var": rvr}


def plan_flags(x):
    """(pf, stream) of the plan the kernels use for ``x``."""
    p = cpu._plan(x, cpu.threads())  # the thread count the kernels key their plans by
    return p[-2], p[-1]


def assert_bitwise(a, b, what):
    for k in a:
        assert a[k].stride() == b[k].stride(), (what, k)
        if not torch.equal(a[k], b[k]):
            diff = (a[k].double() - b[k].double()).abs()
            pytest.fail(f"{what}: {k} differs in {int((diff > 0).sum())} of {diff.numel()} values, "
                        f"max abs diff {diff.max().item():.3e}")


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# 1. forced on vs off: the same bits


@pytest.mark.parametrize("shape,layout,lay,_what", CASES, ids=IDS)
@DTYPES
def test_forced_paths_give_bitwise_the_same_training_step(thresholds, shape, layout, lay, _what, dtype):
    x, dy, w, b, rm, rv = case_tensors(shape, layout, dtype)
    check_input(x, layout, lay)

    thresholds()  # module defaults: these small tensors take neither path
    assert plan_flags(x) == (False, False)
    off = train_step(BF.batch_norm, x, dy, w, b, rm, rv)

    thresholds(stream=0, prefetch=0)
    pf, stream = plan_flags(x)
    assert stream
    on = train_step(BF.batch_norm, x, dy, w, b, rm, rv)

    assert_bitwise(on, off, f"{shape} {layout} {dtype} (pf={pf})")


@pytest.mark.parametrize("shape,layout,lay,_what", [c for c in CASES if c[2] == cpu.ROWS][:4],
                         ids=[i for c, i in zip(CASES, IDS) if c[2] == cpu.ROWS][:4])
@pytest.mark.parametrize("stream,prefetch", [(0, None), (None, 0)], ids=["stream-only", "prefetch-only"])
def test_each_path_alone_gives_bitwise_the_same_training_step(thresholds, shape, layout, lay, _what, stream, prefetch):
    dtype = torch.float32
    x, dy, w, b, rm, rv = case_tensors(shape, layout, dtype)
    thresholds()
    off = train_step(BF.batch_norm, x, dy, w, b, rm, rv)
    thresholds(stream=stream, prefetch=prefetch)
    assert plan_flags(x) == (prefetch == 0, stream == 0)
    on = train_step(BF.batch_norm, x, dy, w, b, rm, rv)
    assert_bitwise(on, off, f"{shape} {layout} stream={stream == 0} prefetch={prefetch == 0}")


# ----------------------------------------------------------------------------------------------
# 2. forced on vs torch


@pytest.mark.parametrize("shape,layout,lay,_what", CASES, ids=IDS)
@DTYPES
def test_forced_paths_agree_with_torch(forced, shape, layout, lay, _what, dtype):
    x, dy, w, b, rm, rv = case_tensors(shape, layout, dtype)
    check_input(x, layout, lay)
    assert plan_flags(x)[1]
    ours = train_step(BF.batch_norm, x, dy, w, b, rm, rv)
    theirs = train_step(torch.nn.functional.batch_norm, x, dy, w, b, rm, rv)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], **tol(dtype), msg=lambda m, k=k: f"{k}: {m}")
    # bnlab's outputs take torch.empty_like(x)'s strides (torch's may not: (N, C, L) with C innermost)
    assert ours["y"].stride() == torch.empty_like(x).stride()
    assert ours["x.grad"].stride() == torch.empty_like(x).stride()


# ----------------------------------------------------------------------------------------------
# 3. eval-mode backward (dx = k * dy, streamed with _nt_scale_line)

EVAL_CASES = [
    ((8, 32, 4, 4), "contiguous"),
    ((4, 16, 9, 9), "contiguous"),
    ((6, 3, 20, 20), "contiguous"),
    ((8, 32, 8, 8), "contiguous"),
    ((64, 48), "contiguous"),
    ((100, 7), "contiguous"),
    ((514, 48), "contiguous"),
    ((4, 32, 6, 6), "channels_last"),
    ((4, 32, 6, 6), "offset_cl"),
    ((4, 20, 5, 7), "batch_slice"),
    ((2, 16, 3, 4, 5), "channels_last_3d"),
    ((6, 32, 10), "transposed"),
]
EVAL_IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in EVAL_CASES]
OURS = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}
THEIRS = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


def eval_step(module, x, dy):
    xr = x.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(xr)
    y.backward(dy)
    return {"y": y, "x.grad": xr.grad, "weight.grad": module.weight.grad, "bias.grad": module.bias.grad}


def eval_pair(shape, dtype):
    _, _, w, b, rm, rv = case_tensors(shape, "contiguous", dtype)
    c = shape[1]
    ours, theirs = OURS[len(shape)](c, dtype=dtype).eval(), THEIRS[len(shape)](c, dtype=dtype).eval()
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(w)
            m.bias.copy_(b)
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
    return ours, theirs


@pytest.mark.parametrize("shape,layout", EVAL_CASES, ids=EVAL_IDS)
@DTYPES
def test_eval_backward_forced_on_is_bitwise_the_same_and_agrees_with_torch(thresholds, shape, layout, dtype):
    ours, theirs = eval_pair(shape, dtype)
    x = make(shape, layout, dtype, seed=1)
    dy = make(shape, layout, dtype, seed=2)
    if layout in UNALIGNED:
        assert x.data_ptr() % 64 != 0

    thresholds()
    assert plan_flags(x) == (False, False)
    off = eval_step(ours, x, dy)
    thresholds(stream=0, prefetch=0)
    assert plan_flags(x)[1]
    on = eval_step(ours, x, dy)
    assert_bitwise(on, off, f"eval {shape} {layout} {dtype}")

    ref = eval_step(theirs, x, dy)
    for k in on:
        torch.testing.assert_close(on[k], ref[k], **tol(dtype), msg=lambda m, k=k: f"{k}: {m}")
    assert not ours.training


# ----------------------------------------------------------------------------------------------
# 4. gradcheck through the streamed path


@pytest.mark.parametrize("shape,layout", [((12, 8), "contiguous"), ((4, 8, 3, 3), "contiguous"),
                                          ((4, 8, 3, 3), "channels_last")])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64_with_paths_forced_on(forced, shape, layout, training):
    x, _, w, b, rm, rv = case_tensors(shape, layout, torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    assert plan_flags(x)[1]

    def f(x, w, b):
        if training:
            return BF.batch_norm(x, None, None, w, b, training=True, eps=1e-3)
        return BF.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3)

    assert torch.autograd.gradcheck(f, (x, w, b))


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
def test_plan_selects_the_paths_from_the_thresholds(thresholds, shape, layout, pf):
    x = make(shape, layout, torch.float32, seed=0)
    nbytes = x.numel() * x.element_size()

    thresholds()
    p = cpu._plan(x, POOL)
    assert len(p) == 11 and (p[-2], p[-1]) == (False, False)
    assert nbytes < min(DEFAULTS.values())

    thresholds(stream=0, prefetch=0)
    p = cpu._plan(x, POOL)
    assert p[-1] is True
    assert p[-2] is pf
    assert (p[5] > 0) is pf  # pf exactly where the rows layout groups channels (p[5]: g)

    # the thresholds are inclusive lower bounds: from exactly nbytes on, not from one byte more
    thresholds(stream=nbytes, prefetch=nbytes)
    assert cpu._plan(x, POOL)[-2:] == (pf, True)
    thresholds(stream=nbytes + 1, prefetch=nbytes + 1)
    assert cpu._plan(x, POOL)[-2:] == (False, False)


def test_plan_cache_keeps_a_plan_until_cleared(thresholds, monkeypatch):
    """Why the fixtures clear ``cpu._PLANS``: a cached plan ignores a threshold changed later."""
    x = make((8, 32, 4, 4), "contiguous", torch.float32, seed=0)
    thresholds()
    assert cpu._plan(x, POOL)[-2:] == (False, False)
    monkeypatch.setattr(cpu, "STREAM_FROM", 0)
    assert cpu._plan(x, POOL)[-2:] == (False, False)
    cpu._PLANS.clear()
    assert cpu._plan(x, POOL)[-1] is True


# ----------------------------------------------------------------------------------------------
# 6. one tensor above the default thresholds


def test_just_above_8_mib_takes_both_paths_by_default_and_matches_torch_and_the_regular_path(thresholds):
    shape = (2, 64, 128, 130)  # float32: 8,519,680 bytes, just above STREAM_FROM (8,388,608)
    dtype = torch.float32
    x, dy, w, b, rm, rv = case_tensors(shape, "contiguous", dtype)
    assert DEFAULTS["STREAM_FROM"] <= x.numel() * x.element_size() < DEFAULTS["STREAM_FROM"] * 1.05

    thresholds()
    assert plan_flags(x) == (True, True)
    on = train_step(BF.batch_norm, x, dy, w, b, rm, rv)
    # torch in float64 on the same values: bnlab's float32 results to float32 tolerances
    exact = train_step(torch.nn.functional.batch_norm, *(t.double() for t in (x, dy, w, b, rm, rv)))
    for k in on:
        assert on[k].dtype == dtype
        torch.testing.assert_close(on[k].double(), exact[k], **tol(dtype), msg=lambda m, k=k: f"{k}: {m}")
    # torch in float32: its dweight/dbias are float32 sums over 33,280 values per channel (off by
    # up to ~5e-4 from float64 at magnitudes ~400), hence the wider atol there
    theirs = train_step(torch.nn.functional.batch_norm, x, dy, w, b, rm, rv)
    for k in on:
        t = dict(rtol=1e-4, atol=2e-3) if k in ("weight.grad", "bias.grad") else tol(dtype)
        torch.testing.assert_close(on[k], theirs[k], **t, msg=lambda m, k=k: f"{k}: {m}")

    thresholds(stream=NEVER, prefetch=NEVER)
    assert plan_flags(x) == (False, False)
    off = train_step(BF.batch_norm, x, dy, w, b, rm, rv)
    assert_bitwise(on, off, f"{shape} contiguous {dtype}, default thresholds vs paths off")


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
