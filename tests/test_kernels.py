"""bnlab's fused CPU kernels against the reference math and against torch's native batch norm.

Every loop the kernels have is reached: the rows layout (contiguous NCL/NCHW/NCDHW) split over
channels and split over rows, with whole-row and partial lanes; the columns layout (2-D input,
channels_last, channels_last_3d, (N, C, L) with C innermost) in one block and in several; small
inputs on one thread (cpu.SERIAL_BELOW) and larger ones on the pool; odd strides (copied to
contiguous) and empty batches.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnlab.functional as BF
from bnlab import kernels
from bnlab import reference as ref
from bnlab.kernels import cpu
from bnlab.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d

# (shape, layout, the loop it reaches)
CASES = [
    ((16, 5), "contiguous", "columns, one block"),
    ((160, 128), "contiguous", "columns, one block per thread"),
    ((4, 3, 7), "contiguous", "rows split over rows"),
    ((2, 3, 600), "contiguous", "rows, lanes and a tail"),
    ((5, 9, 11), "contiguous", "rows split over channels"),
    ((6, 4, 3), "transposed", "columns from (N, L, C) memory"),
    ((4, 3, 5, 6), "contiguous", "rows split over rows"),
    ((3, 10, 4, 5), "contiguous", "rows split over channels"),
    ((4, 3, 5, 6), "channels_last", "columns"),
    ((16, 8, 12, 12), "channels_last", "columns, one block per thread"),
    ((8, 3, 32, 32), "contiguous", "rows split over rows, threads"),
    ((4, 16, 16, 20), "contiguous", "rows split over channels, threads"),
    ((4, 20, 4, 4), "contiguous", "rows, channel groups, a partial last group"),
    ((8, 44, 8, 8), "contiguous", "rows, channel groups, threads, a partial last group"),
    ((4, 3, 5, 6), "strided", "odd strides, copied"),
    ((2, 3, 3, 4, 2), "contiguous", "rows 5-D"),
    ((2, 3, 3, 4, 2), "channels_last_3d", "columns 5-D"),
    ((5, 6, 1, 1), "contiguous", "spatial size 1: columns"),
]
IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay, _ in CASES]


def make_input(shape, layout, dtype, scale=1.0, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # every other column of a wider tensor: neither layout
        x = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=dtype) * scale + offset)[..., ::2]
    elif layout == "transposed":  # (N, C, L) view of (N, L, C) memory
        x = (torch.randn(shape[0], shape[2], shape[1], generator=g, dtype=dtype) * scale + offset).transpose(1, 2)
    else:
        x = torch.randn(shape, generator=g, dtype=dtype) * scale + offset
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    assert (layout == "strided") == (cpu.layout(x) == 0)
    if layout == "transposed":
        assert cpu.layout(x) == cpu.COLUMNS
    return x


def module_pair(dim, c, **kw):
    ours = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}[dim](c, **kw)
    theirs = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[dim](c, **kw)
    if ours.weight is not None:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            if ours.bias is not None:
                ours.bias.uniform_(-0.5, 0.5)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape,layout,_what", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine,bias,track", [(True, True, True), (True, False, True), (False, True, True), (True, True, False)])
def test_kernel_path_matches_torch_native_over_two_steps_and_eval(shape, layout, _what, dtype, momentum, affine, bias, track):
    ours, theirs = module_pair(len(shape), shape[1], momentum=momentum, affine=affine, bias=bias,
                               track_running_stats=track, dtype=dtype)
    for step in range(2):
        x = make_input(shape, layout, dtype, scale=1.5, offset=0.3, seed=step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        dy = torch.randn(ya.shape, dtype=dtype, generator=torch.Generator().manual_seed(10 + step))
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(ya, yb, **tol(dtype))
        torch.testing.assert_close(xa.grad, xb.grad, **tol(dtype))
        for pa, pb in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, **tol(dtype))
        for name, ba in ours.named_buffers():
            torch.testing.assert_close(ba, dict(theirs.named_buffers())[name], **tol(dtype))
    ours.eval()
    theirs.eval()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(ya, yb, **tol(dtype))
    torch.testing.assert_close(xa.grad, xb.grad, **tol(dtype))


@pytest.mark.parametrize("shape,layout,_what", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_the_reference_math(shape, layout, _what, dtype):
    x = make_input(shape, layout, dtype, scale=3.0, offset=-2.0)
    c = shape[1]
    w = torch.rand(c, dtype=dtype) + 0.5
    b = torch.randn(c, dtype=dtype)
    dy = torch.randn(shape, dtype=dtype)
    y, stats, nbad = cpu.forward_train(x, w, b, 1e-5)
    yr, mean, invstd, var, _ = ref.batch_norm_forward(x, w, b, 1e-5)
    assert nbad == 0
    np.testing.assert_allclose(stats[0], mean.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats[1], var.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats[2], invstd.numpy(), rtol=1e-12)
    torch.testing.assert_close(y, yr, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-13)
    assert y.stride() == torch.empty_like(x).stride()
    dx, grads = cpu.backward(dy, x, w, stats, True)
    dxr, dwr, dbr = ref.batch_norm_backward(dy, x, mean, invstd, w)
    torch.testing.assert_close(dx, dxr, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-13)
    torch.testing.assert_close(torch.from_numpy(grads[1]), dwr, **tol(dtype))
    torch.testing.assert_close(torch.from_numpy(grads[0]), dbr, **tol(dtype))
    # eval: the same statistics as constants
    ye = cpu.forward_eval(x, w, b, stats)
    torch.testing.assert_close(ye, ref.normalize(x, mean, invstd, w, b), rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-13)
    dxe, ge = cpu.backward(dy, x, w, stats, False)
    dxer, dwer, dber = ref.batch_norm_backward_eval(dy, x, mean, invstd, w)
    torch.testing.assert_close(dxe, dxer, **tol(dtype))
    torch.testing.assert_close(torch.from_numpy(ge[1]), dwer, **tol(dtype))


@pytest.mark.parametrize("fmt,shape", [(torch.channels_last, (4, 3, 5, 6)), (torch.channels_last_3d, (2, 3, 3, 4, 2))])
def test_channels_last_in_gives_channels_last_out_and_grad(fmt, shape):
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    y = BF.batch_norm(x, None, None, torch.ones(3), torch.zeros(3), training=True)
    y.backward(torch.randn(shape).contiguous(memory_format=fmt))
    assert y.is_contiguous(memory_format=fmt) and not y.is_contiguous()
    assert x.grad.is_contiguous(memory_format=fmt)


def test_dy_in_another_layout_than_x_gives_the_same_gradient():
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    dy = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    grads = []
    for xl, dyl in ((x, dy), (x.contiguous(memory_format=torch.channels_last), dy), (x, dy.contiguous(memory_format=torch.channels_last))):
        xr = xl.clone().requires_grad_()
        BF.batch_norm(xr, None, None, training=True).backward(dyl)
        grads.append(xr.grad)
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-12, atol=1e-12)


def test_kernels_serve_cpu_float_inputs_through_bnlabs_autograd_function():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = BF.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
    # the small-call path's C++ node for this small input, the numba kernels' Function without it
    assert y.grad_fn.name() in ("_TrainFnBackward", "torch::autograd::CppNode<bnlab::BatchNorm>")
    y = BF.batch_norm(x, torch.zeros(3), torch.ones(3), training=False)
    assert type(y.grad_fn).__name__ == "_EvalFnBackward"
    assert kernels.uses_bnlab_kernel(x) and not kernels.uses_bnlab_kernel(x.bfloat16())


def test_empty_batch_gives_empty_output_and_zero_grads():
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    y = BF.batch_norm(x, rm, rv, w, None, training=True, num_batches_tracked=nbt)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros(3))
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3)) and int(nbt) == 1


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nonfinite_batch_raises_naming_channels_and_skip_leaves_buffers_untouched(layout):
    x = make_input((4, 5, 3, 3), layout, torch.float32)
    x[1, 3, 0, 0] = float("nan")
    x[0, 1, 2, 2] = float("inf")
    rm, rv, nbt = torch.zeros(5), torch.ones(5), torch.tensor(0)
    with pytest.raises(kernels.NonFiniteBatchError, match=r"bn7.*\[1, 3\]"):
        BF.batch_norm(x, rm, rv, training=True, num_batches_tracked=nbt, name="bn7")
    y = BF.batch_norm(x, rm, rv, training=True, num_batches_tracked=nbt, nonfinite="skip")
    assert y.shape == x.shape
    assert torch.equal(rm, torch.zeros(5)) and torch.equal(rv, torch.ones(5)) and int(nbt) == 0


def test_running_statistics_equal_their_closed_form_after_one_step():
    x = torch.randn(8, 4, 6, 6, dtype=torch.float64) * 2 + 3
    rm, rv, nbt = torch.full((4,), 0.5, dtype=torch.float64), torch.full((4,), 2.0, dtype=torch.float64), torch.tensor(0)
    BF.batch_norm(x, rm, rv, training=True, momentum=0.25, num_batches_tracked=nbt)
    m = x.numel() // 4
    mean = x.mean((0, 2, 3))
    var_u = x.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(rm, 0.75 * 0.5 + 0.25 * mean, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(rv, 0.75 * 2.0 + 0.25 * var_u, rtol=1e-13, atol=1e-13)
    assert int(nbt) == 1 and m == 288
    # cumulative average (momentum=None): the second batch gets weight 1/2
    x2 = torch.randn(8, 4, 6, 6, dtype=torch.float64)
    BF.batch_norm(x2, rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
    torch.testing.assert_close(rm, 0.5 * (0.75 * 0.5 + 0.25 * mean) + 0.5 * x2.mean((0, 2, 3)), rtol=1e-13, atol=1e-13)


def test_update_buffers_takes_torch_tensors_as_other_layers_pass_them():
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    mean = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    var = torch.tensor([4.0, 4.0, 4.0], dtype=torch.float64)
    kernels.update_buffers(rm, rv, nbt, mean, var, 5, 0.5, "raise", "bn")
    torch.testing.assert_close(rm, torch.tensor([0.5, 1.0, 1.5]))
    torch.testing.assert_close(rv, torch.full((3,), 0.5 + 0.5 * 5.0))
    assert int(nbt) == 1


@pytest.mark.parametrize("shape,layout,affine", [((5, 3), "contiguous", True), ((3, 2, 4), "contiguous", True),
                                                 ((3, 2, 2, 3), "channels_last", True), ((3, 2, 4), "transposed", False)])
def test_train_and_eval_backward_pass_gradcheck_in_float64(shape, layout, affine):
    x = make_input(shape, layout, torch.float64).requires_grad_()
    c = shape[1]
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine else None
    inputs = (x, w, b) if affine else (x,)

    def train(x, w=None, b=None):
        return BF.batch_norm(x, None, None, w, b, training=True, eps=1e-3)

    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5

    def evaluate(x, w=None, b=None):
        return BF.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3)

    assert torch.autograd.gradcheck(train, inputs)
    assert torch.autograd.gradcheck(evaluate, inputs)


def test_large_offset_keeps_dgamma_within_1e3_of_float64_and_beats_torch_channels_last():
    """x = 1000 + randn, 64x64x32x32 float32: shifted float64 statistics keep dgamma accurate."""
    g = torch.Generator().manual_seed(0)
    x = 1000 + torch.randn(64, 64, 32, 32, generator=g)
    dy = torch.randn(64, 64, 32, 32, generator=g)
    w = torch.ones(64)
    _, mean, invstd, _, _ = ref.batch_norm_forward(x.double(), None, None, 1e-5)
    _, dw_ref, _ = ref.batch_norm_backward(dy.double(), x.double(), mean, invstd, None)

    def dgamma(x, dy, native):
        xr = x.clone().requires_grad_()
        wr = w.clone().requires_grad_()
        f = torch.nn.functional.batch_norm if native else BF.batch_norm
        f(xr, None, None, wr, None, training=True).backward(dy)
        return wr.grad.double()

    scale = dw_ref.abs().max()
    errors = {}
    for layout in ("nchw", "channels_last"):
        xl, dyl = x, dy
        if layout == "channels_last":
            xl, dyl = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        errors[layout] = ((dgamma(xl, dyl, False) - dw_ref).abs().max() / scale).item()
        assert errors[layout] < 1e-3, errors
    native_cl = dgamma(x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last), True)
    assert errors["channels_last"] < ((native_cl - dw_ref).abs().max() / scale).item()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dims=st.integers(2, 5),
    n=st.integers(2, 6),
    c=st.integers(1, 9),
    spatial=st.lists(st.integers(1, 7), min_size=3, max_size=3),
    log_scale=st.floats(-3, 3),
    offset=st.floats(-1e3, 1e3),
    layout=st.sampled_from(["contiguous", "channels_last"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_property_normalized_output_has_zero_mean_unit_variance_and_matches_reference(dims, n, c, spatial, log_scale, offset, layout, dtype):
    shape = (n, c, *spatial[: dims - 2])
    scale = 10.0**log_scale
    layout = layout if dims in (4, 5) else "contiguous"
    if layout == "channels_last" and dims == 5:
        layout = "channels_last_3d"
    x = make_input(shape, layout, dtype, scale=scale, offset=offset)
    y, stats, nbad = cpu.forward_train(x, None, None, 0.0 if dtype == torch.float64 else 1e-5)
    yr, mean, invstd, var, _ = ref.batch_norm_forward(x, None, None, 0.0 if dtype == torch.float64 else 1e-5)
    assert nbad == 0
    np.testing.assert_allclose(stats[0], mean.numpy(), rtol=1e-12, atol=1e-12 * (abs(offset) + scale))
    np.testing.assert_allclose(stats[1], var.numpy(), rtol=1e-9, atol=1e-12 * scale**2)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-4 if dtype == torch.float32 else 1e-9)
    dims_r = ref.reduce_dims(x)
    spread = x.double().amax(dims_r) - x.double().amin(dims_r)
    ok = spread > 1e-3 * scale  # channels with real spread normalize to mean 0, variance 1
    if ok.any() and dtype == torch.float64:
        torch.testing.assert_close(y.mean(dims_r)[ok], torch.zeros(c, dtype=dtype)[ok], rtol=0, atol=1e-9)
        torch.testing.assert_close(y.var(dims_r, unbiased=False)[ok], torch.ones(c, dtype=dtype)[ok], rtol=1e-7, atol=1e-7)
    dy = torch.randn(shape, dtype=dtype)
    dx, grads = cpu.backward(dy, x, None, stats, True)
    eps = 0.0 if dtype == torch.float64 else 1e-5
    invstd = ref.invstd_from_var(var, eps)
    dxr, dwr, dbr = ref.batch_norm_backward(dy, x, mean, invstd, None)
    mag = dy.abs().max().item() * invstd.max().item()  # the size of dx's terms (dx itself may cancel to ~0)
    assert (dx - dxr).abs().max().item() <= (1e-4 if dtype == torch.float32 else 1e-9) * mag
    assert math.isclose(float(grads[0].sum()), float(dbr.sum()), rel_tol=1e-6, abs_tol=1e-6 * x.numel())
