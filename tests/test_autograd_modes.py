"""Every autograd mode torch supports for batch norm, with torch's numbers: forward-mode AD
(forward_ad, torch.func.jvp), double backward (gradgradcheck), torch.func grad / vmap /
functional_call, for the functional form and the modules, training and eval."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import bnlab
import bnlab.functional as BF
from bnlab import kernels
from bnlab import nn as bnn

SHAPES = [(6, 3), (4, 3, 5), (3, 3, 4, 2)]


def _args(shape, dtype=torch.float64):
    c = shape[1]
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    w = torch.rand(c, dtype=dtype) + 0.5
    b = torch.randn(c, dtype=dtype)
    rm = torch.randn(c, dtype=dtype)
    rv = torch.rand(c, dtype=dtype) + 0.5
    return x, w, b, rm, rv


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# forward-mode AD


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("which", ["x", "weight", "bias", "all"])
def test_forward_ad_tangents_equal_torchs(shape, training, dtype, which):
    x, w, b, rm, rv = _args(shape, dtype)
    tangents = {k: torch.randn_like(v) if which in (k, "all") else None for k, v in (("x", x), ("weight", w), ("bias", b))}
    outs = []
    for f in (BF.batch_norm, F.batch_norm):
        rm_, rv_ = rm.clone(), rv.clone()
        with fwAD.dual_level():
            duals = [fwAD.make_dual(v, tangents[k]) if tangents[k] is not None else v
                     for k, v in (("x", x), ("weight", w), ("bias", b))]
            y = f(duals[0], rm_, rv_, duals[1], duals[2], training, 0.1, 1e-3)
            primal, tangent = fwAD.unpack_dual(y)
        assert tangent is not None, f.__module__
        outs.append((primal, tangent, rm_, rv_))
    (p1, t1, rm1, rv1), (p2, t2, rm2, rv2) = outs
    torch.testing.assert_close(p1, p2, **_tol(dtype))
    torch.testing.assert_close(t1, t2, **_tol(dtype))
    torch.testing.assert_close(rm1, rm2, **_tol(dtype))  # the buffers still move in training
    torch.testing.assert_close(rv1, rv2, **_tol(dtype))


@pytest.mark.parametrize("training", [True, False])
def test_module_under_forward_ad_gives_torchs_tangent_and_buffers(training):
    ours, theirs = bnn.BatchNorm2d(3).train(training), nn.BatchNorm2d(3).train(training)
    with torch.no_grad():
        ours.running_var.fill_(2.0)
        ours.weight.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    x, t = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    res = []
    for m in (ours, theirs):
        with fwAD.dual_level():
            y = m(fwAD.make_dual(x, t))
            res.append(fwAD.unpack_dual(y))
    torch.testing.assert_close(res[0].primal, res[1].primal, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res[0].tangent, res[1].tangent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


def test_a_dual_level_without_dual_inputs_still_gives_the_right_output():
    x, w, b, rm, rv = _args((5, 3, 4))
    with fwAD.dual_level():
        y = BF.batch_norm(x, rm.clone(), rv.clone(), w, b, True)
    torch.testing.assert_close(y, F.batch_norm(x, rm.clone(), rv.clone(), w, b, True))


@pytest.mark.parametrize("training", [True, False])
def test_torch_func_jvp_equals_torchs(training):
    x, w, b, rm, rv = _args((6, 3, 4))
    tx, tw, tb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)

    def ours(x, w, b):
        return BF.batch_norm(x, rm, rv, w, b, training) if not training else BF.batch_norm(x, None, None, w, b, True)

    def theirs(x, w, b):
        return F.batch_norm(x, rm, rv, w, b, training) if not training else F.batch_norm(x, None, None, w, b, True)

    p1, t1 = jvp(ours, (x, w, b), (tx, tw, tb))
    p2, t2 = jvp(theirs, (x, w, b), (tx, tw, tb))
    torch.testing.assert_close(p1, p2)
    torch.testing.assert_close(t1, t2)


def test_forward_over_reverse_hessian_vector_product_equals_torchs():
    x, w, b, _, _ = _args((5, 3))
    v = torch.randn_like(x)

    def loss(f):
        return lambda x: (f(x, None, None, w, b, True) ** 3).sum()

    hvp_ours = jvp(grad(loss(BF.batch_norm)), (x,), (v,))[1]
    hvp_torch = jvp(grad(loss(F.batch_norm)), (x,), (v,))[1]
    torch.testing.assert_close(hvp_ours, hvp_torch)


# ----------------------------------------------------------------------------------------------
# double backward


@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 4), (3, 2, 2, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
def test_gradgradcheck_train_and_eval_float64(shape, layout, affine):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    x = torch.randn(shape, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    c = shape[1]
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine else None
    inputs = (x, w, b) if affine else (x,)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5

    def train(x, w=None, b=None):
        return BF.batch_norm(x, None, None, w, b, training=True, eps=1e-3)

    def evaluate(x, w=None, b=None):
        return BF.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3)

    y = train(*inputs)
    # the kernels' node (the small-call path's C++ node for a contiguous 2-D input), differentiable again
    assert y.grad_fn.name() in ("_TrainFnBackward", "torch::autograd::CppNode<bnlab::BatchNorm>")
    assert torch.autograd.gradgradcheck(train, inputs)
    assert torch.autograd.gradgradcheck(evaluate, inputs)


@pytest.mark.parametrize("training", [True, False])
def test_double_backward_of_a_module_equals_torchs(training):
    ours, theirs = bnn.BatchNorm1d(4, dtype=torch.float64), nn.BatchNorm1d(4, dtype=torch.float64)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.running_mean.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    ours.train(training), theirs.train(training)
    x = torch.randn(7, 4, 3, dtype=torch.float64)
    res = []
    for m in (ours, theirs):
        xi = x.clone().requires_grad_()
        y = m(xi)
        (gx,) = torch.autograd.grad((y ** 3).sum(), xi, create_graph=True)
        penalty = gx.square().sum()  # a gradient penalty
        gw, gx2 = torch.autograd.grad(penalty, (m.weight, xi))
        res.append((gx.detach(), gw, gx2))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b)


def test_first_order_backward_still_uses_the_kernels():
    x = torch.randn(8, 3, 4, requires_grad=True)
    y = BF.batch_norm(x, None, None, training=True)
    assert y.grad_fn.name() in ("_TrainFnBackward", "torch::autograd::CppNode<bnlab::BatchNorm>")
    y.sum().backward()  # no graph: the kernel backward
    assert x.grad is not None


# ----------------------------------------------------------------------------------------------
# torch.func over models with bnlab layers


def _model(cls_bn=bnn.BatchNorm1d, track=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), cls_bn(4, track_running_stats=track), nn.ReLU(), nn.Linear(4, 2))


def _pair(track=True, training=False):
    ours = _model(bnn.BatchNorm1d, track)
    theirs = _model(nn.BatchNorm1d, track)
    theirs.load_state_dict(ours.state_dict())
    if track:
        for m in (ours, theirs):
            with torch.no_grad():
                m[1].running_mean.uniform_(-0.5, 0.5)
                m[1].running_var.uniform_(0.5, 2.0)
        theirs.load_state_dict(ours.state_dict())
    return ours.train(training), theirs.train(training)


@pytest.mark.parametrize("track,training", [(True, False), (False, True), (False, False)])
def test_torch_func_grad_of_functional_call_equals_torchs(track, training):
    ours, theirs = _pair(track, training)
    x, target = torch.randn(9, 5), torch.randn(9, 2)
    grads = []
    for m in (ours, theirs):
        params = {k: v.detach() for k, v in m.named_parameters()}
        buffers = dict(m.named_buffers())

        def loss(p):
            return ((functional_call(m, (p, buffers), (x,)) - target) ** 2).mean()

        grads.append(grad(loss)(params))
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("track,training", [(True, False), (False, True)])
def test_torch_func_vmap_equals_torchs(track, training):
    ours, theirs = _pair(track, training)
    xs = torch.randn(3, 6, 5)  # 3 independent batches of 6
    torch.testing.assert_close(vmap(ours)(xs), vmap(theirs)(xs), rtol=1e-5, atol=1e-6)
    # per-sample gradients: vmap over grad, batch statistics inside each batch
    params = {k: v.detach() for k, v in ours.named_parameters()}
    buffers = dict(ours.named_buffers())

    def loss(p, xb, m):
        return functional_call(m, (p, buffers if m is ours else dict(m.named_buffers())), (xb,)).square().sum()

    g1 = vmap(grad(loss), in_dims=(None, 0, None))(params, xs, ours)
    g2 = vmap(grad(loss), in_dims=(None, 0, None))(params, xs, theirs)
    for k in g2:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-5)


def test_training_with_buffers_passed_to_grad_updates_them_like_torch():
    ours, theirs = _pair(True, True)
    x = torch.randn(8, 5)
    bufs = []
    for m in (ours, theirs):
        params = {k: v.detach() for k, v in m.named_parameters()}
        b = {k: v.clone() for k, v in m.named_buffers()}
        grad(lambda p, b: functional_call(m, (p, b), (x,)).square().sum())(params, b)
        bufs.append(b)
    for k in bufs[1]:
        torch.testing.assert_close(bufs[0][k], bufs[1][k])
    assert int(bufs[0]["1.num_batches_tracked"]) == 1


def test_training_with_captured_buffers_under_a_transform_raises_one_clear_error():
    ours, _ = _pair(True, True)
    with pytest.raises(RuntimeError, match=r"BatchNorm1d: cannot update the running statistics inside this torch.func "
                                           r"transform.*track_running_stats=False.*replace_all_batch_norm_modules_"):
        grad(lambda x: ours(x).sum())(torch.randn(8, 5))
    with pytest.raises(RuntimeError, match="BatchNorm1d: cannot update the running statistics"):
        vmap(ours)(torch.randn(2, 8, 5))


def test_replace_all_batch_norm_modules_finds_bnlab_layers():
    ours, theirs = _pair(True, True)
    torch.func.replace_all_batch_norm_modules_(ours)
    torch.func.replace_all_batch_norm_modules_(theirs)
    assert ours[1].running_mean is None and not ours[1].track_running_stats
    xs = torch.randn(2, 8, 5)
    torch.testing.assert_close(vmap(ours)(xs), vmap(theirs)(xs), rtol=1e-5, atol=1e-6)


def test_needs_reference_is_false_outside_transforms_and_true_inside():
    assert not kernels.needs_reference()
    with fwAD.dual_level():
        assert kernels.needs_reference()
    seen = []
    vmap(lambda x: seen.append(kernels.needs_reference()) or x)(torch.randn(2, 3))
    assert seen == [True]
    assert not kernels.needs_reference()


@pytest.mark.parametrize("training", [True, False])
def test_vectorized_jacobian_over_the_fast_paths_backward_equals_torchs(training):
    x, w, b, rm, rv = _args((4, 3))

    def ours(x):
        return BF.batch_norm(x, rm.clone(), rv.clone(), w, b, training)

    def theirs(x):
        return F.batch_norm(x, rm.clone(), rv.clone(), w, b, training)

    jo = torch.autograd.functional.jacobian(ours, x, vectorize=True)  # vmap over _TrainFn/_EvalFn's backward
    jt = torch.autograd.functional.jacobian(theirs, x, vectorize=True)
    torch.testing.assert_close(jo, jt)
    torch.testing.assert_close(torch.autograd.functional.hessian(lambda x: (ours(x) ** 3).sum(), x),
                               torch.autograd.functional.hessian(lambda x: (theirs(x) ** 3).sum(), x))


def test_vmap_in_training_with_batched_buffers_raises_one_clear_error():
    """A limitation the README lists: torch's batch norm updates per-example buffers passed in
    batched under vmap; bnlab's running-statistics update cannot (yet), and says so."""
    ours, theirs = _pair(True, True)
    xs = torch.randn(3, 8, 5)

    def run(m):
        params = dict(m.named_parameters())
        bufs = {k: torch.stack([v.clone()] * 3) for k, v in m.named_buffers()}
        vmap(lambda b, x: functional_call(m, (params, b), (x,)), in_dims=(0, 0))(bufs, xs)
        return bufs

    assert int(run(theirs)["1.num_batches_tracked"][0]) == 1  # torch: works
    with pytest.raises(RuntimeError, match=r"BatchNorm1d: cannot update the running statistics inside this "
                                           r"torch.func transform.*not vmap"):
        run(ours)
