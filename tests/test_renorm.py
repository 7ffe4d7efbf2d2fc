"""bnlab.nn.BatchRenorm1d/2d/3d: batch norm when r_max=1 and d_max=0, the clipped and unclipped
corrections, a float64 reference formula (forward, gradients, gradcheck), the running statistics
as batch norm keeps them, warm-up, errors, the paths besides the fused kernels, precise BN, and
the training output of Keras 3's renorm layer for the same state."""

from __future__ import annotations

import doctest
import math
import warnings

import pytest
import torch

import bnlab
from bnlab.nn import renorm as R

# Keras reads torch tensors through np.array(tensor), which numpy 2 warns about inside Keras
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn.t accept a copy keyword:DeprecationWarning")
from bnlab.policy import NonFiniteBatchError

EPS = 1e-5
BN = {1: bnlab.nn.BatchNorm1d, 2: bnlab.nn.BatchNorm2d, 3: bnlab.nn.BatchNorm3d}
RN = {1: bnlab.nn.BatchRenorm1d, 2: bnlab.nn.BatchRenorm2d, 3: bnlab.nn.BatchRenorm3d}
SHAPES = {1: (12, 4), 2: (6, 3, 5, 4), 3: (4, 2, 3, 3, 2)}


def _pair(dim, dtype=torch.float32, **kw):
    """A renorm layer and a batch norm with the same random gamma, beta and running statistics."""
    c = SHAPES[dim][1]
    m, b = RN[dim](c, dtype=dtype, **kw), BN[dim](c, dtype=dtype)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2.0)
    b.load_state_dict(m.state_dict())
    return m, b


def _step(layer, x, dy):
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.backward(dy)
    return y.detach(), xg.grad, layer.weight.grad, layer.bias.grad


def _reference(x, gamma, beta, rm, rv, r_max, d_max, eps=EPS):
    """Ioffe 2017 in float64 torch ops, r and d detached (the paper's stop_gradient)."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu = x.mean(dims)
    sigma_b = (x.var(dims, unbiased=False) + eps).sqrt()
    sigma = (rv + eps).sqrt()
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu - rm) / sigma).clamp(-d_max, d_max).detach()
    xhat = (x - mu.view(shape)) / sigma_b.view(shape)
    return gamma.view(shape) * (xhat * r.view(shape) + d.view(shape)) + beta.view(shape)


# ---------------------------------------------------------------- batch norm as a special case
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dim,channels_last", [(1, False), (2, False), (2, True), (3, False), (3, True)])
def test_r_max_1_d_max_0_is_batch_norm(dim, channels_last, fused, monkeypatch):
    monkeypatch.setattr(R, "_FUSE_IDENTITY", fused)  # False: the general path, r = 1 and d = 0 computed
    m, b = _pair(dim, r_max=1.0, d_max=0.0)
    x = torch.randn(SHAPES[dim]) * 3 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if dim == 2 else torch.channels_last_3d)
    dy = torch.randn_like(x)
    for _ in range(2):  # two steps: the second starts from updated buffers
        ym, dxm, dwm, dbm = _step(m, x, dy)
        yb, dxb, dwb, dbb = _step(b, x, dy)
        torch.testing.assert_close(ym, yb, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dxm, dxb, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dwm, dwb, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dbm, dbb, rtol=1e-6, atol=1e-6)
        m.zero_grad(), b.zero_grad()
    for k, v in b.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k  # the same buffers, bit for bit
    assert int(m.num_batches_tracked) == 2
    m.eval(), b.eval()
    torch.testing.assert_close(m(x), b(x), rtol=0, atol=0)  # eval is batch norm's


def test_without_affine_and_with_weight_only():
    x = torch.randn(8, 3, 4, 4) + 1
    dy = torch.randn_like(x)
    for kw in ({"affine": False}, {"bias": False}):
        m = bnlab.nn.BatchRenorm2d(3, r_max=1.0, d_max=0.0, **kw)
        b = bnlab.nn.BatchNorm2d(3, **kw)
        xm, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        m(xm).backward(dy)
        b(xb).backward(dy)
        torch.testing.assert_close(xm.grad, xb.grad, rtol=1e-6, atol=1e-6)
        if m.weight is not None:
            torch.testing.assert_close(m.weight.grad, b.weight.grad, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- the corrections
def test_large_gaps_are_clipped_to_r_max_and_d_max():
    torch.manual_seed(1)
    m = bnlab.nn.BatchRenorm2d(3, dtype=torch.float64, r_max=2.0, d_max=1.5)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
        m.running_mean.copy_(torch.tensor([50.0, -50.0, 0.0]))
        m.running_var.copy_(torch.tensor([1e-4, 1e-4, 1e4]))  # sigma_B/sigma: ~100, ~100, ~0.01
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    gamma, beta = m.weight.detach().clone(), m.bias.detach().clone()
    y = m(x)
    shape = [1, 3, 1, 1]
    xhat = (x - x.mean((0, 2, 3)).view(shape)) / (x.var((0, 2, 3), unbiased=False) + EPS).sqrt().view(shape)
    r = torch.tensor([2.0, 2.0, 0.5], dtype=torch.float64)  # clipped at r_max, r_max, 1 / r_max
    d = torch.tensor([-1.5, 1.5, 0.0], dtype=torch.float64)  # clipped at -d_max, +d_max; ~0 for channel 2
    d[2] = float((x[:, 2].mean() - 0.0) / math.sqrt(1e4 + EPS))
    want = gamma.view(shape) * (xhat * r.view(shape) + d.view(shape)) + beta.view(shape)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_unclipped_training_output_normalizes_with_the_running_statistics():
    """r and d inside their limits: x_hat r + d = (x - running_mean) / sigma, the eval formula
    with the statistics before the update (while the gradient flows through the batch's)."""
    m = bnlab.nn.BatchRenorm2d(3, dtype=torch.float64, r_max=math.inf, d_max=math.inf)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(10, 3, 4, 4, dtype=torch.float64) * 1.3 + 0.4
    y = m(x)
    ev = bnlab.nn.BatchNorm2d(3, dtype=torch.float64)
    ev.load_state_dict(before)
    torch.testing.assert_close(y, ev.eval()(x), rtol=1e-12, atol=1e-12)
    # and the buffers moved as batch norm's kernels move them, bit for bit (the numba kernels: the
    # small-call path, bnlab.kernels.fast, sums in another order)
    b = bnlab.nn.BatchNorm2d(3, dtype=torch.float64)
    b.load_state_dict(before)
    from bnlab.kernels import fast

    ext, fast.ext = fast.ext, None
    try:
        b(x)
    finally:
        fast.ext = ext
    for k, v in b.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_the_float64_reference_forward_and_gradients(channels_last):
    torch.manual_seed(3)
    m = bnlab.nn.BatchRenorm2d(4, dtype=torch.float64, r_max=1.2, d_max=0.3)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
        m.running_mean.copy_(torch.tensor([0.0, 0.5, -0.1, 2.0]))
        m.running_var.copy_(torch.tensor([1.0, 0.6, 1.5, 0.05]))  # some channels clipped, some not
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64) * 1.1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    xa = x.clone().requires_grad_()
    y = m(xa)
    y.backward(dy)
    xr = x.clone().requires_grad_()
    g, bt = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()
    yr = _reference(xr, g, bt, rm, rv, 1.2, 0.3)
    yr.backward(dy)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.weight.grad, g.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.bias.grad, bt.grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    """gradcheck needs the forward's own derivative, which equals batch renorm's gradient where r
    and d sit at their limits (they are then constants); gradgradcheck covers create_graph."""
    torch.manual_seed(4)
    rm = torch.tensor([3.0, -3.0, 50.0], dtype=torch.float64)
    rv = torch.tensor([0.01, 0.01, 100.0], dtype=torch.float64)
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return R.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, EPS, r_max=2.0, d_max=1.0)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    # the module, also without affine
    m = bnlab.nn.BatchRenorm1d(3, dtype=torch.float64, affine=False, r_max=2.0, d_max=1.0)

    def g(x):
        with torch.no_grad():
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
        return m(x)

    assert torch.autograd.gradcheck(g, (torch.randn(6, 3, dtype=torch.float64, requires_grad=True),))


def test_double_backward_matches_the_reference():
    torch.manual_seed(5)
    m = bnlab.nn.BatchRenorm2d(2, dtype=torch.float64, r_max=1.1, d_max=0.1)
    with torch.no_grad():
        m.running_var.fill_(0.7)
        m.running_mean.fill_(0.2)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = m.weight.detach().clone().requires_grad_()
    ga = torch.autograd.grad((m(xa) ** 2).sum(), xa, create_graph=True)[0]
    gr = torch.autograd.grad((_reference(xr, g, torch.zeros(2, dtype=torch.float64), rm, rv, 1.1, 0.1) ** 2).sum(),
                             xr, create_graph=True)[0]
    torch.testing.assert_close(ga, gr, rtol=1e-10, atol=1e-12)
    ha = torch.autograd.grad(ga.sum(), (xa, m.weight))
    hr = torch.autograd.grad(gr.sum(), (xr, g))
    for a, b in zip(ha, hr):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_momentum_none_is_a_cumulative_average_as_batch_norm():
    m, b = _pair(2, momentum=None, r_max=1.5, d_max=0.5)
    b.momentum = None
    for i in range(3):
        x = torch.randn(SHAPES[2]) * (i + 1)
        m(x), b(x)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(m, k), getattr(b, k), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- torch conventions
def test_is_a_torch_batch_norm_with_batch_norms_state_dict():
    m = bnlab.nn.BatchRenorm2d(5)
    assert isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    assert not isinstance(m, torch.nn.BatchNorm2d)  # a plain BN in its place would drop the correction
    t = torch.nn.BatchNorm2d(5)
    assert list(m.state_dict()) == list(t.state_dict())
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias"]
    t(torch.randn(4, 5, 3, 3))
    m.load_state_dict(t.state_dict())  # torch checkpoints load as they are
    assert int(m.num_batches_tracked) == 1
    assert "r_max=3.0, d_max=5.0, warmup_steps=0" in repr(m)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        net = bnlab.convert(torch.nn.Sequential(m), to="torch")
    assert isinstance(net[0], bnlab.nn.BatchRenorm2d)  # no torch equivalent: kept, and said so
    assert any("BatchRenorm2d has no torch.nn equivalent" in str(x.message) for x in w)


def test_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"BatchRenorm2d: batch renormalization needs running statistics.*"
                                         r"track_running_stats=False.*bnlab.nn.BatchNorm2d"):
        bnlab.nn.BatchRenorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match=r"BatchRenorm1d: r_max must be a number >= 1 .*got r_max=0.5"):
        bnlab.nn.BatchRenorm1d(3, r_max=0.5)
    with pytest.raises(ValueError, match=r"d_max must be a number >= 0 .*got d_max=-1"):
        bnlab.nn.BatchRenorm1d(3, d_max=-1)
    with pytest.raises(ValueError, match=r"r_max must be"):
        bnlab.nn.BatchRenorm1d(3, r_max=float("nan"))
    with pytest.raises(ValueError, match=r"warmup_steps=\(start, r_end, d_end\) needs 0 <= start <= r_end"):
        bnlab.nn.BatchRenorm3d(3, warmup_steps=(10, 5, 20))
    with pytest.raises(TypeError, match=r"warmup_steps must be an int or a \(start, r_end, d_end\) tuple"):
        bnlab.nn.BatchRenorm3d(3, warmup_steps=2.5)
    with pytest.raises(ValueError, match=r"BatchRenorm2d: nonfinite must be 'raise' or 'skip'"):
        bnlab.nn.BatchRenorm2d(3, nonfinite="ignore")
    with pytest.raises(ValueError, match=r"BatchRenorm2d: expected 4D input \(got 3D input of shape \(2, 3, 4\)\)"):
        bnlab.nn.BatchRenorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"BatchRenorm1d: expected more than 1 value per channel when training"):
        bnlab.nn.BatchRenorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"needs running_mean and running_var"):
        R.batch_renorm(torch.randn(4, 3), None, None, training=True)


def test_non_finite_batches_never_touch_the_buffers():
    m = bnlab.nn.BatchRenorm2d(3)
    with torch.no_grad():
        m.running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 0] = float("nan")
    with pytest.raises(NonFiniteBatchError, match=r"BatchRenorm2d: non-finite batch statistics \(nan\).*\[2\]"):
        m(x.requires_grad_())
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k
    m.nonfinite = "skip"
    y = m(x)
    assert torch.isfinite(y[:, :2]).all()  # the good channels are renormalized
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k  # skipped: buffers and the step count unchanged


# ---------------------------------------------------------------- warm-up
def test_warmup_schedule_and_its_step_counter():
    m = bnlab.nn.BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup_steps=10)
    assert m.limits(0) == (1.0, 0.0)
    assert m.limits(5) == (2.0, 2.5)
    assert m.limits(10) == (3.0, 5.0) == m.limits(1000)
    p = bnlab.nn.BatchRenorm1d(2, warmup_steps=(5000, 40000, 25000))  # Ioffe 2017's small-minibatch schedule
    assert p.limits(5000) == (1.0, 0.0)
    assert p.limits(25000) == (pytest.approx(1 + 2 * 20000 / 35000), 5.0)
    assert p.limits(40000) == (3.0, 5.0)
    # step 0 of a warm-up is batch norm, even far from the running statistics
    b = bnlab.nn.BatchNorm1d(2)
    with torch.no_grad():
        m.running_mean.fill_(10.0)
        b.running_mean.fill_(10.0)
    x = torch.randn(16, 2)
    torch.testing.assert_close(m(x), b(x), rtol=0, atol=0)
    assert int(m.num_batches_tracked) == 1 and m.limits() == (1.2, 0.5)
    # the schedule reads num_batches_tracked, which a checkpoint carries
    q = bnlab.nn.BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup_steps=10)
    q.load_state_dict(m.state_dict())
    assert q.limits() == m.limits()


# ---------------------------------------------------------------- the other paths
def _twins(dtype=torch.float64, **kw):
    a, _ = _pair(2, dtype=dtype, **kw)
    b = bnlab.nn.BatchRenorm2d(3, dtype=dtype, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


def test_the_torch_ops_path_gives_the_kernels_numbers(monkeypatch):
    """Every case the fused kernels do not serve (CUDA, half precision, torch.compile, torch.func,
    forward AD) takes the statistics from bnlab.reference and calls bnlab's batch norm with
    weight' = gamma r and bias' = gamma d + beta: the same output, gradients and buffers."""
    torch.manual_seed(6)
    fast, ops = _twins(r_max=1.3, d_max=0.4)
    x = torch.randn(SHAPES[2], dtype=torch.float64) * 2 + 0.5
    dy = torch.randn_like(x)
    y1, dx1, dw1, db1 = _step(fast, x, dy)
    monkeypatch.setattr(R, "_fast_ok", lambda *a: False)
    y2, dx2, dw2, db2 = _step(ops, x, dy)
    for a, b in ((y1, y2), (dx1, dx2), (dw1, dw2), (db1, db2)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for k, v in fast.state_dict().items():
        torch.testing.assert_close(ops.state_dict()[k], v, rtol=1e-12, atol=0)


def test_torch_func_grad_and_forward_ad():
    torch.manual_seed(7)
    a, b = _twins(r_max=1.3, d_max=0.4)
    x = torch.randn(SHAPES[2], dtype=torch.float64)
    dy = torch.randn_like(x)
    _, _, dw, _ = _step(a, x, dy)

    def loss(w, bufs):  # buffers passed as inputs, as batch norm under torch.func wants them
        return (torch.func.functional_call(b, ({"weight": w, "bias": b.bias.detach()}, bufs), (x,)) * dy).sum()

    bufs = {k: v.clone() for k, v in b.named_buffers()}
    g = torch.func.grad(loss)(b.weight.detach().clone(), bufs)
    torch.testing.assert_close(g, dw, rtol=1e-10, atol=1e-12)
    assert int(bufs["num_batches_tracked"]) == 1  # the buffers moved once, through the policy
    torch.testing.assert_close(bufs["running_mean"], a.running_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(bufs["running_var"], a.running_var, rtol=1e-12, atol=0)
    # forward AD where r and d sit at their limits: the tangent is the forward's true derivative
    c = bnlab.nn.BatchRenorm2d(3, dtype=torch.float64, r_max=1.01, d_max=0.01)
    with torch.no_grad():
        c.running_mean.fill_(5.0)
        c.running_var.fill_(100.0)  # r ~ 0.1 and d ~ -0.5: both at their limits in every channel
    t = torch.randn_like(x)
    import torch.autograd.forward_ad as fwad

    state = {k: v.clone() for k, v in c.state_dict().items()}
    with fwad.dual_level():
        jvp = fwad.unpack_dual(c(fwad.make_dual(x, t))).tangent
    h = 1e-6
    outs = []
    for s in (h, -h):
        c.load_state_dict(state)
        outs.append(c(x + s * t))
    torch.testing.assert_close(jvp, (outs[0] - outs[1]) / (2 * h), rtol=1e-5, atol=1e-6)


def test_bfloat16_input_takes_torchs_kernel_and_keeps_float32_buffers():
    torch.manual_seed(8)
    m = bnlab.nn.BatchRenorm2d(3, r_max=1.5, d_max=0.5)
    ref32 = bnlab.nn.BatchRenorm2d(3, r_max=1.5, d_max=0.5)
    x = torch.randn(8, 3, 4, 4) + 1
    y16 = m(x.to(torch.bfloat16))
    y32 = ref32(x.to(torch.bfloat16).float())
    assert y16.dtype == torch.bfloat16 and m.running_mean.dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, rtol=0.02, atol=0.03)
    torch.testing.assert_close(m.running_mean, ref32.running_mean, rtol=1e-3, atol=1e-3)


def test_precise_bn_recalibrates_as_batch_norm():
    """bnlab.tools.recalibrate: in the pass the layer is batch norm (the population statistics of
    later layers are those of eval's inputs); afterwards the running statistics are the data's."""
    torch.manual_seed(9)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), bnlab.nn.BatchRenorm1d(3, r_max=2.0, d_max=2.0),
                              torch.nn.Linear(3, 2), bnlab.nn.BatchRenorm1d(2))
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), bnlab.nn.BatchNorm1d(3), torch.nn.Linear(3, 2),
                               bnlab.nn.BatchNorm1d(2))
    twin.load_state_dict(net.state_dict())
    x = torch.randn(96, 4) * 2 + 1
    bnlab.tools.recalibrate(net, x.split(32))
    bnlab.tools.recalibrate(twin, x.split(32))
    for (k, v), (_, w) in zip(net.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(v, w, rtol=1e-6, atol=1e-7, msg=k)
    torch.testing.assert_close(net[1].running_mean, net[0](x).mean(0), rtol=1e-5, atol=1e-5)
    assert int(net[1].num_batches_tracked) == 0 and not net[1]._plain  # the pass left no trace


def test_replace_all_batch_norm_modules_makes_it_batch_norm():
    m, b = _pair(2, r_max=1.5, d_max=0.5)
    torch.func.replace_all_batch_norm_modules_(m)
    torch.func.replace_all_batch_norm_modules_(b)
    x = torch.randn(SHAPES[2]) * 2
    torch.testing.assert_close(m(x), b(x), rtol=0, atol=0)


def test_docstring_examples_run():
    result = doctest.testmod(R, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- Keras 3
@pytest.mark.parametrize("r_max,d_max", [(1.5, 0.5), (3.0, 5.0)])
def test_keras_renorm_computes_the_same_training_step(keras_layer, r_max, d_max):
    """Keras' BatchNormalization(renorm=True) on the torch backend, its renorm and moving
    variables filled from the same state (bnlab.tools.interop.to_keras): the training output,
    the gradients of x, gamma and beta, and the moving mean after the step agree. What differs
    by design: Keras keeps r and d's statistics in renorm_mean / renorm_stddev and its inference
    variance as a moving average of sqrt(var_B + eps) (biased), bnlab the unbiased variance."""
    from bnlab.tools import interop

    torch.manual_seed(10)
    c, eps = 3, 1e-3
    m = bnlab.nn.BatchRenorm2d(c, eps=eps, momentum=0.01, r_max=r_max, d_max=d_max)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
        m.running_mean.copy_(torch.tensor([0.8, -0.3, 0.0]))
        m.running_var.copy_(torch.tensor([0.3, 4.0, 1.0]))
    layer = keras_layer(m, (None, c, 5, 5))
    x = torch.randn(6, c, 5, 5) * 1.5 + 0.2
    dy = torch.randn_like(x)
    ym, dxm, dwm, dbm = _step(m, x, dy)
    xk = x.clone().requires_grad_()
    yk = layer(xk, training=True)
    yk.backward(dy)
    torch.testing.assert_close(ym, yk.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dxm, xk.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dwm, layer.gamma.value.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dbm, layer.beta.value.grad, rtol=1e-4, atol=1e-4)
    after = interop.keras_get_weights(layer)
    torch.testing.assert_close(torch.from_numpy(after["moving_mean"]), m.running_mean, rtol=1e-6, atol=1e-6)
    # the variance: bnlab moves towards the unbiased batch variance, Keras towards sqrt(var_B + eps)
    var_b = x.var((0, 2, 3), unbiased=False)
    sd = 0.99 * torch.sqrt(torch.tensor([0.3, 4.0, 1.0]) + eps) + 0.01 * torch.sqrt(var_b + eps)
    torch.testing.assert_close(torch.from_numpy(after["moving_variance"]), sd * sd - eps, rtol=1e-5, atol=1e-6)
    m_count = x.numel() // c
    torch.testing.assert_close(m.running_var, 0.99 * torch.tensor([0.3, 4.0, 1.0]) + 0.01 * var_b * m_count / (m_count - 1),
                               rtol=1e-6, atol=1e-7)
    # inference: both are batch norm with the moving statistics they hold
    m.eval()
    mk = interop.from_keras(after)
    ev = bnlab.nn.BatchNorm2d(c, eps=eps)
    ev.load_state_dict(mk)
    torch.testing.assert_close(layer(x, training=False).detach(), ev.eval()(x), rtol=1e-5, atol=1e-5)


def test_bench_times_renorm_against_both_batch_norms_outside_the_bar():
    from bnlab import bench

    shape = (4, 8, 6, 6)
    x, dy = bench._make_case(shape, True)
    rows = bench._renorm_rows(shape, True, x, dy, x.numel() * 4 / 1e6, repeats=3, warmup=1)
    assert [(r["pass"], r["layer"], r["layout"]) for r in rows] == [
        ("fwd", "BatchRenorm2d", "channels_last"), ("fwd+bwd", "BatchRenorm2d", "channels_last")]
    for r in rows:
        assert r["bnlab_ms"] > 0 and r["bnlab_bn_ms"] > 0 and r["torch_ms"] > 0
        assert r["vs_bnlab_bn"] == pytest.approx(r["bnlab_ms"] / r["bnlab_bn_ms"])
        assert r["ratio"] == pytest.approx(r["torch_ms"] / r["bnlab_ms"])
    assert bench.check_bar(rows, None) == []  # batch norm's bar only


def test_torch_compile_fullgraph_with_a_warmup_schedule():
    """torch.compile traces the layer whole (fullgraph), the warm-up limits included (computed from
    num_batches_tracked as tensors): the eager layer's outputs, gradients and buffers, step by step."""
    torch.manual_seed(11)

    def make():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False),
                                   bnlab.nn.BatchRenorm2d(4, r_max=1.5, d_max=0.5, warmup_steps=(1, 4, 3)))

    eager, net = make(), make()
    net.load_state_dict(eager.state_dict())
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    for i in range(5):
        x = torch.randn(8, 3, 6, 6) * (1 + i) + i
        w = torch.randn(8, 4, 4, 4)
        ye, yc = eager(x), compiled(x)
        (ye * w).sum().backward()
        (yc * w).sum().backward()
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        g = eager[0].weight.grad
        torch.testing.assert_close(net[0].weight.grad, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))
        for k, v in eager[1].state_dict().items():
            torch.testing.assert_close(net[1].state_dict()[k], v, rtol=1e-6, atol=1e-7)
    assert eager[1].limits() == (1.5, 0.5) and int(net[1].num_batches_tracked) == 5
