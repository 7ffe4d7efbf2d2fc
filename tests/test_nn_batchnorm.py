"""bnlab.nn.BatchNorm* against torch.nn.BatchNorm* on the same inputs: numbers, state, behaviour."""

import inspect
import itertools

import pytest
import torch
from torch import nn

import bnlab
import bnlab.functional as BF
from bnlab import nn as bnn
from bnlab.functional import NonFiniteBatchError

PAIRS = [(bnn.BatchNorm1d, nn.BatchNorm1d), (bnn.BatchNorm2d, nn.BatchNorm2d), (bnn.BatchNorm3d, nn.BatchNorm3d)]
SHAPES = {bnn.BatchNorm1d: [(16, 4), (8, 4, 7)], bnn.BatchNorm2d: [(6, 4, 5, 3)], bnn.BatchNorm3d: [(3, 4, 3, 2, 4)]}


def _cases():
    for ours, theirs in PAIRS:
        for shape in SHAPES[ours]:
            yield ours, theirs, shape


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ours,theirs,shape", list(_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("affine,bias,track", [(True, True, True), (True, False, True), (False, True, True), (True, True, False)])
def test_module_matches_torch_over_three_training_steps_and_eval(ours, theirs, shape, dtype, momentum, affine, bias, track):
    kw = dict(momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype, bias=bias)
    a, b = ours(shape[1], **kw), theirs(shape[1], **kw)
    if affine:
        with torch.no_grad():
            for p in a.parameters():
                p.uniform_(0.5, 1.5)
        b.load_state_dict(a.state_dict())
    for step in range(3):
        x = (2 * torch.randn(shape, dtype=dtype) + step).requires_grad_(True)
        xb = x.detach().clone().requires_grad_(True)
        ya, yb = a(x), b(xb)
        torch.testing.assert_close(ya, yb, **_tol(dtype))
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(x.grad, xb.grad, **_tol(dtype))
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, **_tol(dtype))
    for ka, kb in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka[0] == kb[0]
        torch.testing.assert_close(ka[1], kb[1], **_tol(dtype))
    a.eval(), b.eval()
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    xb = x.detach().clone().requires_grad_(True)
    ya, yb = a(x), b(xb)
    torch.testing.assert_close(ya, yb, **_tol(dtype))
    ya.sum().backward(), yb.sum().backward()
    torch.testing.assert_close(x.grad, xb.grad, **_tol(dtype))


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_constructor_signature_equals_torch(ours, theirs):
    sig_ours = inspect.signature(ours.__init__).parameters
    sig_theirs = inspect.signature(theirs.__init__).parameters
    for name, p in sig_theirs.items():
        assert name in sig_ours, name
        assert sig_ours[name].default == p.default, name
        assert sig_ours[name].kind == p.kind, name


def test_channels_last_input_matches_torch_and_keeps_its_layout():
    a, b = bnn.BatchNorm2d(8), nn.BatchNorm2d(8)
    x = torch.randn(4, 8, 6, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    xb = x.detach().clone().requires_grad_(True)
    ya, yb = a(x), b(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    ya.backward(torch.ones_like(ya)), yb.backward(torch.ones_like(yb))
    torch.testing.assert_close(x.grad, xb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.running_var, b.running_var)


def test_state_dict_round_trips_between_torch_and_bnlab_models():
    torch_net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5), nn.BatchNorm1d(5))
    torch_net(torch.randn(8, 3, 5, 5))
    ours = nn.Sequential(nn.Conv2d(3, 4, 3), bnn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5), bnn.BatchNorm1d(5))
    ours.load_state_dict(torch_net.state_dict())
    assert list(ours.state_dict()) == list(torch_net.state_dict())
    torch_net.eval(), ours.eval()
    x = torch.randn(3, 3, 5, 5)
    torch.testing.assert_close(ours(x), torch_net(x), rtol=1e-5, atol=1e-5)
    back = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5), nn.BatchNorm1d(5))
    back.load_state_dict(ours.state_dict())
    assert int(back[1].num_batches_tracked) == 1


def test_old_checkpoint_without_num_batches_tracked_loads():
    bn = bnn.BatchNorm1d(3)
    sd = bn.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    bn.load_state_dict(sd)
    assert int(bn.num_batches_tracked) == 0


def test_convert_swaps_every_layer_and_keeps_state_and_mode():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=None), nn.Sequential(nn.Conv1d(6, 6, 1), nn.BatchNorm1d(6, affine=False)))
    with torch.no_grad():
        net[1](net[0](torch.randn(5, 4)))  # one training step of the first BN
    net.eval()
    x = torch.randn(7, 4)
    before = net[1](net[0](x))
    w = net[1].weight
    bnlab.convert(net, to="bnlab")
    assert isinstance(net[1], bnn.BatchNorm1d) and isinstance(net[2][1], bnn.BatchNorm1d)
    assert net[1].momentum is None and not net[2][1].affine and not net[1].training
    assert net[1].weight is w
    torch.testing.assert_close(net[1](net[0](x)), before)
    bnlab.convert(net, to="torch")
    assert type(net[1]) is nn.BatchNorm1d and type(net[2][1]) is nn.BatchNorm1d
    with pytest.raises(ValueError, match="to must be"):
        bnlab.convert(net, to="jax")


def test_zero_size_batch_returns_empty_output_and_counts_like_torch():
    a, b = bnn.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = a(x)
    b(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked)
    torch.testing.assert_close(a.running_mean, b.running_mean)


def test_eval_without_running_stats_uses_batch_statistics_like_torch():
    a, b = bnn.BatchNorm1d(3, track_running_stats=False).eval(), nn.BatchNorm1d(3, track_running_stats=False).eval()
    x = torch.randn(9, 3)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_lazy_batchnorm_infers_num_features_and_becomes_batchnorm():
    for lazy, shape, final in ((bnn.LazyBatchNorm1d, (4, 5), bnn.BatchNorm1d), (bnn.LazyBatchNorm2d, (2, 5, 3, 3), bnn.BatchNorm2d), (bnn.LazyBatchNorm3d, (2, 5, 2, 2, 2), bnn.BatchNorm3d)):
        m = lazy()
        m(torch.randn(shape))
        assert type(m) is final and m.num_features == 5 and m.weight.shape == (5,)
        assert int(m.num_batches_tracked) == 1


def test_batchnorm_raises_error_naming_the_layer_for_wrong_number_of_dimensions():
    with pytest.raises(ValueError, match=r"BatchNorm2d: expected 4D input \(got 3D input"):
        bnn.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"BatchNorm1d: expected 2D or 3D input \(got 4D"):
        bnn.BatchNorm1d(3)(torch.randn(2, 3, 4, 4))


def test_batchnorm_raises_error_if_channel_count_does_not_match():
    with pytest.raises(ValueError, match=r"BatchNorm1d: input has 5 channels .* expected num_features == 5"):
        bnn.BatchNorm1d(3)(torch.randn(4, 5))


def test_batchnorm_raises_error_if_less_than_one_value_per_channel_when_training():
    with pytest.raises(ValueError, match="expected more than 1 value per channel when training"):
        bnn.BatchNorm1d(3)(torch.randn(1, 3))
    bnn.BatchNorm1d(3).eval()(torch.randn(1, 3))  # fine in eval


def test_nonfinite_batch_raises_naming_the_channels_and_leaves_running_stats_untouched():
    bn = bnn.BatchNorm2d(4)
    bn(torch.randn(3, 4, 2, 2))
    saved = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(3, 4, 2, 2)
    x[1, 2, 0, 1] = float("nan")
    x[0, 3, 1, 1] = float("inf")
    with pytest.raises(NonFiniteBatchError, match=r"BatchNorm2d: non-finite .* channel\(s\) \[2, 3\]"):
        bn(x)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, saved[k], equal_nan=False)


def test_nonfinite_skip_skips_the_statistics_update_only():
    bn = bnn.BatchNorm1d(3, nonfinite="skip")
    x = torch.randn(8, 3)
    x[0, 1] = float("nan")
    y = bn(x)
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, 0]).all()
    assert int(bn.num_batches_tracked) == 0
    torch.testing.assert_close(bn.running_mean, torch.zeros(3))
    with pytest.raises(ValueError, match="nonfinite must be"):
        bnn.BatchNorm1d(3, nonfinite="ignore")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_fall_back_to_torch_with_float32_statistics(dtype):
    a, b = bnn.BatchNorm2d(3).to(dtype), nn.BatchNorm2d(3).to(dtype)
    x = torch.randn(4, 3, 5, 5).to(dtype)
    try:
        yb = b(x)
    except RuntimeError:
        pytest.skip(f"torch has no CPU batch norm for {dtype}")
    ya = a(x)
    assert ya.dtype == dtype
    torch.testing.assert_close(ya.float(), yb.float())
    torch.testing.assert_close(a.running_mean.float(), b.running_mean.float())


def test_functional_matches_torch_functional_in_training_and_eval():
    x = torch.randn(10, 6, 3)
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    w, b = torch.randn(6), torch.randn(6)
    for training in (True, False):
        y = BF.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-3)
        y2 = torch.nn.functional.batch_norm(x, rm2, rv2, w, b, training, 0.3, 1e-3)
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rm, rm2)
        torch.testing.assert_close(rv, rv2)
    with pytest.raises(ValueError, match="eval mode"):
        BF.batch_norm(x, None, None)


def test_functional_signature_matches_torch():
    ours = list(inspect.signature(BF.batch_norm).parameters.values())
    theirs = list(inspect.signature(torch.nn.functional.batch_norm).parameters.values())
    for p, q in itertools.zip_longest(ours[: len(theirs)], theirs):
        assert (p.name, p.default) == (q.name, q.default)


def test_training_output_has_zero_mean_unit_variance_and_eval_uses_the_buffers():
    bn = bnn.BatchNorm1d(5, dtype=torch.float64)
    x = 4 + 3 * torch.randn(200, 5, dtype=torch.float64)
    y = bn(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(5, dtype=torch.float64), atol=1e-4, rtol=0)
    bn.eval()
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(4.0)
    z = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(bn(z), (z - 1) / torch.sqrt(torch.tensor(4.0 + 1e-5, dtype=torch.float64)))


# ----------------------------------------------------------------------------------------------
# true subclasses of torch's batch norm: isinstance-based tools see them


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_bnlab_layers_are_instances_of_torchs_classes(ours, theirs):
    from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

    m = ours(4)
    assert isinstance(m, theirs) and isinstance(m, _BatchNorm) and isinstance(m, _NormBase)
    assert list(m.state_dict()) == list(theirs(4).state_dict())
    assert type(m).forward is not theirs.forward  # forward is bnlab's


@pytest.mark.parametrize("lazy,torch_lazy,shape,final", [
    (bnn.LazyBatchNorm1d, nn.LazyBatchNorm1d, (4, 5), bnn.BatchNorm1d),
    (bnn.LazyBatchNorm2d, nn.LazyBatchNorm2d, (2, 5, 3, 3), bnn.BatchNorm2d),
    (bnn.LazyBatchNorm3d, nn.LazyBatchNorm3d, (2, 5, 2, 2, 2), bnn.BatchNorm3d),
])
def test_lazy_layers_are_torch_lazy_layers_and_keep_the_nonfinite_option(lazy, torch_lazy, shape, final):
    m = lazy(nonfinite="skip", momentum=None)
    assert isinstance(m, torch_lazy) and m.nonfinite == "skip"
    x = torch.randn(shape)
    x[0, 1] = float("nan")
    m(x)
    assert type(m) is final and isinstance(m, torch_lazy.cls_to_become)
    assert m.nonfinite == "skip" and int(m.num_batches_tracked) == 0  # the nan batch was skipped
    with pytest.raises(ValueError, match="nonfinite must be"):
        lazy(nonfinite="ignore")


def test_convert_sync_batchnorm_converts_bnlab_layers():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), bnn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 5), bnn.BatchNorm1d(5))
    net(torch.randn(4, 3, 4, 4))
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert type(sync[1]) is nn.SyncBatchNorm and type(sync[4]) is nn.SyncBatchNorm
    torch.testing.assert_close(sync[1].running_mean, net[1].running_mean)
    assert int(sync[1].num_batches_tracked) == 1


@pytest.mark.parametrize("relu", [False, True])
def test_fuse_modules_fuses_conv_and_bnlab_batchnorm_in_eval(relu):
    layers = [nn.Conv2d(3, 4, 3), bnn.BatchNorm2d(4)] + ([nn.ReLU()] if relu else [])
    net = nn.Sequential(*layers)
    for _ in range(3):
        net(torch.randn(8, 3, 6, 6) * 2 + 1)
    net.eval()
    x = torch.randn(2, 3, 6, 6)
    fused = torch.ao.quantization.fuse_modules(net, [[str(i) for i in range(len(layers))]])
    assert isinstance(fused[1], nn.Identity)
    torch.testing.assert_close(fused(x), net(x), rtol=1e-5, atol=1e-5)
    lin = nn.Sequential(nn.Linear(3, 4), bnn.BatchNorm1d(4))
    lin(torch.randn(8, 3))
    lin.eval()
    fused = torch.ao.quantization.fuse_modules(lin, [["0", "1"]])
    assert isinstance(fused[1], nn.Identity)


def test_the_freeze_every_bn_idiom_freezes_bnlab_layers():
    from torch.nn.modules.batchnorm import _BatchNorm

    net = nn.Sequential(nn.Linear(3, 4), bnn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4), bnlab.nn.GhostBatchNorm1d(4, 4))
    net.train()
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
    assert not net[1].training and not net[4].training and not net[1].weight.requires_grad
    before = net[1].running_mean.clone()
    net(torch.randn(8, 3))
    assert torch.equal(net[1].running_mean, before)


def test_convert_warns_about_the_layers_it_leaves_alone_and_why():
    class MyBN(nn.BatchNorm2d):  # a subclass (timm's norm-act layers are such)
        pass

    net = nn.Sequential(nn.BatchNorm2d(3), MyBN(3), nn.SyncBatchNorm(3), nn.LazyBatchNorm1d())
    with pytest.warns(UserWarning, match=r"left 3 batch-norm layer\(s\) alone: 1: MyBN subclasses torch's batch norm"
                                         r".*2: torch's SyncBatchNorm.*3: an uninitialized lazy layer"):
        bnlab.convert(net, to="bnlab")
    assert type(net[0]) is bnn.BatchNorm2d and type(net[1]) is MyBN and type(net[2]) is nn.SyncBatchNorm
    back = nn.Sequential(bnn.BatchNorm1d(3), bnlab.nn.GhostBatchNorm1d(3), bnlab.nn.MaskedBatchNorm1d(3))
    report = bnlab.tools.convert_report(back, to="torch")
    assert [w for w, _ in report] == ["1", "2"] and "no torch.nn equivalent" in report[0][1]
    with pytest.warns(UserWarning, match="GhostBatchNorm1d has no torch.nn equivalent"):
        bnlab.convert(back, to="torch")
    assert type(back[0]) is nn.BatchNorm1d
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnlab.convert(nn.Sequential(nn.BatchNorm1d(2)), to="bnlab")  # nothing left alone: no warning
        bnlab.convert(back, to="torch", warn=False)
