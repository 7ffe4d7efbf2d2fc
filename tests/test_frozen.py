"""bnlab.nn.FrozenBatchNorm1d/2d/3d: a batch norm's eval-mode output as a fixed affine map, batch-norm
state_dicts loading as they are, model conversion, layouts, autocast, torch.compile, errors naming the layer."""

import copy
import doctest
import importlib

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.nn import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, convert_frozen_batchnorm


def _trained(bn: nn.Module, shape) -> nn.Module:
    """A batch norm whose statistics and parameters are all away from their initial values."""
    bn.train()
    with torch.no_grad():
        for _ in range(3):
            bn(torch.randn(*shape) * 3 + 1.5)
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 2.0)
        if bn.bias is not None:
            bn.bias.uniform_(-1.0, 1.0)
    return bn.eval()


CASES = [
    (nn.BatchNorm1d, FrozenBatchNorm1d, (8, 5)),
    (nn.BatchNorm1d, FrozenBatchNorm1d, (8, 5, 7)),
    (nn.BatchNorm2d, FrozenBatchNorm2d, (4, 5, 3, 3)),
    (nn.BatchNorm3d, FrozenBatchNorm3d, (4, 5, 2, 3, 3)),
    (bnn.BatchNorm2d, FrozenBatchNorm2d, (4, 5, 3, 3)),
    (lambda c: bnn.GhostBatchNorm1d(c, virtual_batch_size=4), FrozenBatchNorm1d, (8, 5)),
]


@pytest.mark.parametrize("make,frozen_cls,shape", CASES, ids=["1d-2D", "1d-3D", "2d", "3d", "bnlab-2d", "ghost-1d"])
def test_from_batchnorm_gives_the_eval_output_in_any_mode(make, frozen_cls, shape):
    bn = _trained(make(5), shape)
    f = frozen_cls.from_batchnorm(bn)
    assert type(f) is frozen_cls
    assert type(convert_frozen_batchnorm(copy.deepcopy(bn))) is frozen_cls  # the class follows the layer
    x = torch.randn(*shape) * 2 + 1
    with torch.no_grad():
        ref = bn(x)
        torch.testing.assert_close(f(x), ref, rtol=1e-6, atol=1e-6)
        f.train()  # frozen: training mode changes nothing, and nothing updates
        before = {k: v.clone() for k, v in f.state_dict().items()}
        torch.testing.assert_close(f(x), ref, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in f.state_dict().items())
    assert list(f.parameters()) == []
    assert sorted(dict(f.named_buffers())) == ["bias", "running_mean", "running_var", "weight"]


def test_affine_false_and_bias_false_layers_freeze_with_ones_and_zeros():
    for bn in (_trained(nn.BatchNorm2d(4, affine=False), (4, 4, 3, 3)),
               _trained(bnn.BatchNorm2d(4, bias=False), (4, 4, 3, 3))):
        f = FrozenBatchNorm2d.from_batchnorm(bn)
        x = torch.randn(3, 4, 3, 3)
        with torch.no_grad():
            torch.testing.assert_close(f(x), bn(x), rtol=1e-6, atol=1e-6)
        assert torch.equal(f.bias, torch.zeros(4))


def test_a_batchnorm_state_dict_loads_as_it_is_and_back():
    bn = _trained(nn.BatchNorm2d(6), (4, 6, 3, 3))
    f = FrozenBatchNorm2d(6)
    f.load_state_dict(bn.state_dict())  # strict; num_batches_tracked accepted and dropped
    x = torch.randn(2, 6, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(f(x), bn(x), rtol=1e-6, atol=1e-6)
    assert set(f.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    back = nn.BatchNorm2d(6).eval()
    back.load_state_dict(f.state_dict())  # the counter a frozen state_dict lacks starts at 0
    with torch.no_grad():
        torch.testing.assert_close(back(x), bn(x), rtol=1e-6, atol=1e-6)


def test_a_layer_without_running_statistics_cannot_freeze():
    bn = nn.BatchNorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        FrozenBatchNorm2d.from_batchnorm(bn)
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(nn.Conv2d(3, 3, 1), bn))
    with pytest.raises(ValueError, match=r"'1\.1' \(BatchNorm2d\) has no running statistics"):
        convert_frozen_batchnorm(net)
    assert type(net[0]) is nn.BatchNorm2d  # nothing converted before the error


def test_wrong_classes_are_refused():
    with pytest.raises(TypeError, match=r"FrozenBatchNorm2d.from_batchnorm: expected a batch-norm layer .* Linear"):
        FrozenBatchNorm2d.from_batchnorm(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="is a BatchNorm1d, whose frozen layer is FrozenBatchNorm1d"):
        FrozenBatchNorm2d.from_batchnorm(nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        FrozenBatchNorm2d(0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = bnn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 16, 10), nn.BatchNorm1d(10))

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def _trained_net() -> _Net:
    torch.manual_seed(1)
    net = _Net().train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, 4, 4) * 2 + 1)
    return net.eval()


def test_convert_replaces_every_batch_norm_and_keeps_the_eval_output():
    net = _trained_net()
    ref = copy.deepcopy(net)
    out = convert_frozen_batchnorm(net)
    assert out is net
    assert type(net.bn) is FrozenBatchNorm2d and type(net.head[2]) is FrozenBatchNorm1d
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    x = torch.randn(5, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)
        net.train()  # frozen in training too: a fine-tuning forward uses the pretrained statistics
        torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)
    # detectron2's spelling, and a batch norm given on its own
    assert type(FrozenBatchNorm2d.convert_frozen_batchnorm(nn.BatchNorm3d(2))) is FrozenBatchNorm3d
    # SyncBatchNorm's dimensionality is not fixed: 2d
    assert type(convert_frozen_batchnorm(nn.Sequential(nn.SyncBatchNorm(2)))[0]) is FrozenBatchNorm2d


def test_a_layer_registered_twice_becomes_one_frozen_layer():
    bn = _trained(nn.BatchNorm1d(3), (6, 3))
    net = nn.Sequential(bn, nn.ReLU(), bn)
    convert_frozen_batchnorm(net)
    assert net[0] is net[2] and type(net[0]) is FrozenBatchNorm1d


def test_errors_name_the_layer_and_the_shape():
    net = convert_frozen_batchnorm(_trained_net())
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d 'bn': expected 4D input \(got 3D input of shape \(8, 4, 4\)\)"):
        net(torch.randn(3, 4, 4))  # unbatched: the conv accepts it, the frozen layer names itself
    with pytest.raises(ValueError, match=r"FrozenBatchNorm1d\(4\): expected 4 channels in dim 1 \(got input of shape \(2, 3\)\)"):
        FrozenBatchNorm1d(4)(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"FrozenBatchNorm3d\(2\): expected 5D input"):
        FrozenBatchNorm3d(2)(torch.randn(2, 2, 3, 3))


def test_channels_last_keeps_its_layout_and_values():
    f = FrozenBatchNorm2d.from_batchnorm(_trained(nn.BatchNorm2d(6), (4, 6, 5, 5)))
    x = torch.randn(3, 6, 5, 5)
    xc = x.contiguous(memory_format=torch.channels_last)
    y = f(xc)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, f(x), rtol=0, atol=1e-6)


def test_bfloat16_autocast_returns_the_input_dtype_like_torchs_batch_norm():
    net = _trained_net()
    frozen = convert_frozen_batchnorm(copy.deepcopy(net))
    x = torch.randn(4, 3, 4, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = net(x), frozen(x)
        inner = frozen.bn(frozen.conv(x))
    assert inner.dtype == torch.bfloat16
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.05, atol=0.1)


def test_gradients_flow_to_the_input_and_match_the_eval_batch_norm():
    bn = _trained(nn.BatchNorm2d(3), (4, 3, 2, 2)).double()
    f = FrozenBatchNorm2d.from_batchnorm(bn)
    assert f.weight.dtype == torch.float64
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x,))
    (g,) = torch.autograd.grad(f(x).sum(), x)
    (g_ref,) = torch.autograd.grad(bn(x).sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_torch_compile_fullgraph_gives_the_eager_output():
    net = convert_frozen_batchnorm(_trained_net())
    compiled = torch.compile(net, fullgraph=True)
    x = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)


def test_the_docstring_examples_run():
    result = doctest.testmod(importlib.import_module("bnlab.nn.frozen"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
