"""bnlab.tools.freeze / unfreeze: freezing as layer state (survives model.train(), shows in repr,
saved in the state_dict)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import bnlab
from bnlab.tools import freeze, unfreeze


def _net(bn_cls=bnlab.nn.BatchNorm1d, **kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), bn_cls(6, **kw), nn.ReLU(), nn.Linear(6, 4), bn_cls(4, **kw))
    for _ in range(3):  # non-trivial running statistics
        net(torch.randn(16, 3) * 2 + 1)
    return net


def _bns(net):
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _buffers(net):
    return {k: v.clone() for k, v in net.named_buffers()}


def _assert_buffers_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("bn_cls", [bnlab.nn.BatchNorm1d, nn.BatchNorm1d], ids=["bnlab", "torch"])
def test_frozen_layers_survive_train_and_normalize_with_running_stats(bn_cls):
    net = _net(bn_cls)
    ref = copy.deepcopy(net).eval()  # torch's eval: what a frozen layer computes
    before = _buffers(net)
    assert freeze(net) is net
    net.train()  # torch's trap: this undoes m.eval(), not freezing
    assert net.training and net[0].training
    assert all(not m.training and m.frozen_stats and not m.frozen_affine for m in _bns(net))
    x = torch.randn(8, 3)
    torch.testing.assert_close(net(x), ref(x))
    _assert_buffers_equal(_buffers(net), before)  # nothing updated, num_batches_tracked included


def test_torch_layers_are_converted_in_place():
    net = _net(nn.BatchNorm1d)
    bn = net[1]
    params, bufs = (bn.weight, bn.bias), (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    freeze(net)
    assert net[1] is bn and type(bn) is bnlab.nn.BatchNorm1d and isinstance(bn, nn.BatchNorm1d)
    assert (bn.weight, bn.bias) == params
    assert all(a is b for a, b in zip((bn.running_mean, bn.running_var, bn.num_batches_tracked), bufs))
    unfreeze(net)
    assert type(bn) is bnlab.nn.BatchNorm1d  # stays bnlab's (documented)


def test_repr_shows_the_frozen_state():
    net = _net()
    freeze(net)
    assert "frozen=stats)" in repr(net[1])
    freeze(net, stats=False, affine=True)  # adds to what is frozen
    assert "frozen=stats+affine)" in repr(net[1])
    unfreeze(net)
    assert "frozen" not in repr(net)


def test_gradients_flow_to_input_and_affine_unless_frozen():
    for affine in (False, True):
        net = _net()
        freeze(net, affine=affine).train()
        x = torch.randn(8, 3, requires_grad=True)
        net(x).square().sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        for bn in _bns(net):
            assert bn.weight.requires_grad is (not affine) and bn.bias.requires_grad is (not affine)
            if affine:
                assert bn.weight.grad is None and bn.bias.grad is None
            else:
                assert bn.weight.grad.abs().sum() > 0 and bn.bias.grad.abs().sum() > 0
        assert net[0].weight.grad.abs().sum() > 0  # layers before a frozen BN still learn


def test_frozen_layer_gradcheck_float64():
    bn = bnlab.nn.BatchNorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3))
        bn.running_var.copy_(torch.rand(3) + 0.5)
        bn.weight.copy_(torch.rand(3) + 0.5)
    freeze(bn).train()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    # w and b are the layer's own Parameters: gradcheck's perturbations reach the forward
    assert torch.autograd.gradcheck(lambda x, w, b: bn(x), (x, bn.weight, bn.bias))


def test_state_dict_round_trip_keeps_the_layers_frozen():
    net = _net()
    freeze(net, affine=True)
    sd = net.state_dict()
    assert [k for k in sd if k.endswith("bnlab_frozen")] == ["1.bnlab_frozen", "4.bnlab_frozen"]
    assert sd["1.bnlab_frozen"].tolist() == [1, 1]
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = nn.Sequential(nn.Linear(3, 6), bnlab.nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4), bnlab.nn.BatchNorm1d(4))
    result = fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert not result.missing_keys and not result.unexpected_keys
    fresh.train()
    for bn in _bns(fresh):
        assert bn.frozen_stats and bn.frozen_affine and not bn.training
        assert not bn.weight.requires_grad and not bn.bias.requires_grad
    x = torch.randn(5, 3)
    torch.testing.assert_close(fresh(x), net(x))
    before = _buffers(fresh)
    fresh(torch.randn(8, 3))
    _assert_buffers_equal(_buffers(fresh), before)


def test_unfrozen_state_dict_has_torchs_keys():
    net = _net()
    torch_net = _net(nn.BatchNorm1d)
    freeze(net)
    unfreeze(net)
    assert list(net.state_dict()) == list(torch_net.state_dict())


def test_torch_state_dicts_and_frozen_state_dicts_across_libraries():
    frozen = freeze(_net())
    torch_net = _net(nn.BatchNorm1d)
    # a torch state_dict loads strictly into a frozen model and leaves it frozen
    frozen.load_state_dict(torch_net.state_dict())
    assert all(bn.frozen_stats for bn in _bns(frozen))
    torch.testing.assert_close(frozen[1].running_mean, torch_net[1].running_mean)
    # a frozen state_dict into torch's model: strict=False, the entries come back as unexpected
    with pytest.raises(RuntimeError, match="bnlab_frozen"):
        torch_net.load_state_dict(frozen.state_dict())
    result = torch_net.load_state_dict(frozen.state_dict(), strict=False)
    assert sorted(result.unexpected_keys) == ["1.bnlab_frozen", "4.bnlab_frozen"]


def test_unfreeze_restores_training_behaviour():
    net = _net()
    twin = _net(nn.BatchNorm1d)  # never frozen, same state
    freeze(net)
    net.train()
    unfreeze(net)
    assert all(bn.training and not bn.frozen_stats for bn in _bns(net))
    x = torch.randn(16, 3)
    torch.testing.assert_close(net(x), twin(x))
    for a, b in zip(_bns(net), _bns(twin)):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 4


def test_unfreeze_returns_to_the_mode_last_asked_for():
    net = _net()
    freeze(net)
    net.eval()
    unfreeze(net)
    assert not any(m.training for m in net.modules())
    net.eval()
    freeze(net)  # frozen in eval: unfreezing leaves eval
    unfreeze(net)
    assert not any(m.training for m in net.modules())
    freeze(net, affine=True)
    unfreeze(net)
    assert all(p.requires_grad for p in net.parameters())


class _BNAct(nn.BatchNorm2d):
    """A third-party-style subclass of torch's batch norm (norm + activation)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_torch_subclasses_get_a_frozen_twin():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), _BNAct(3))
    net(torch.randn(4, 2, 3, 3))
    ref = copy.deepcopy(net).eval()
    freeze(net).train()
    layer = net[1]
    assert type(layer) is not _BNAct and isinstance(layer, _BNAct) and type(layer).__name__ == "_BNAct"
    assert "frozen=stats" in repr(layer) and not layer.training
    x = torch.randn(2, 2, 3, 3)
    torch.testing.assert_close(net(x), ref(x))
    # torch.save of the whole model and deepcopy keep it frozen
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (loaded, copy.deepcopy(net)):
        other.train()
        assert other[1].frozen_stats and not other[1].training
        torch.testing.assert_close(other(x), ref(x))
    # a fresh model of that class: freeze, then load (the twin reads the entry)
    sd = net.state_dict()
    fresh = nn.Sequential(nn.Conv2d(2, 3, 1), _BNAct(3))
    freeze(fresh, stats=False, affine=True)
    fresh.load_state_dict(sd)
    assert fresh[1].frozen_stats and not fresh[1].frozen_affine and fresh[1].weight.requires_grad
    unfreeze(net)
    assert type(net[1]) is _BNAct and net[1].training


def test_masked_batch_norm_is_frozen_too():
    bn = bnlab.nn.MaskedBatchNorm1d(3)
    bn(torch.randn(6, 3, 5))
    before = _buffers(bn)
    freeze(bn).train()
    x, mask = torch.randn(4, 3, 5), torch.arange(5) < torch.tensor([5, 3, 2, 1])[:, None]
    y = bn(x, mask)
    _assert_buffers_equal(_buffers(bn), before)
    ref = bnlab.nn.MaskedBatchNorm1d(3)
    ref.load_state_dict({k: v for k, v in bn.state_dict().items() if not k.endswith("bnlab_frozen")})
    torch.testing.assert_close(y, ref.eval()(x, mask))


def test_freeze_refuses_layers_without_running_stats_and_changes_nothing():
    net = nn.Sequential(bnlab.nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"freeze: cannot freeze .*1 \(BatchNorm1d\): no running statistics.*stats=False"):
        freeze(net)
    assert not net[0].frozen_stats and net[0].training and type(net[1]) is nn.BatchNorm1d
    freeze(net, stats=False, affine=True)  # weight and bias only: fine
    assert not net[1].weight.requires_grad and net[1].training


def test_freeze_argument_errors():
    with pytest.raises(ValueError, match="nothing to freeze"):
        freeze(_net(), stats=False, affine=False)
    with pytest.raises(ValueError, match="uninitialized lazy layer"):
        freeze(nn.Sequential(nn.LazyBatchNorm1d()))
    with pytest.raises(TypeError, match="freeze: expected a torch.nn.Module"):
        freeze("model")


def test_a_malformed_frozen_entry_is_a_load_error():
    bn = bnlab.nn.BatchNorm1d(3)
    sd = bn.state_dict()
    sd["bnlab_frozen"] = torch.tensor([0.5, 1.0])
    with pytest.raises(RuntimeError, match=r"BatchNorm1d: expected bnlab_frozen to be the frozen state"):
        bn.load_state_dict(sd)


def test_docstring_examples_run():
    import doctest
    import importlib

    mod = importlib.import_module("bnlab.tools.freeze")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_recalibrate_leaves_frozen_layers_statistics_alone():
    import bnlab

    net = torch.nn.Sequential(torch.nn.Linear(4, 3), bnlab.nn.BatchNorm1d(3), torch.nn.Linear(3, 3),
                              bnlab.nn.BatchNorm1d(3))
    bnlab.tools.freeze(net[1])
    before = net[1].running_mean.clone(), net[1].running_var.clone()
    x = torch.randn(64, 4) * 3 + 2
    bnlab.tools.recalibrate(net, x.split(16))
    assert torch.equal(net[1].running_mean, before[0]) and torch.equal(net[1].running_var, before[1])
    h = net[2](net[1](net[0](x)))
    torch.testing.assert_close(net[3].running_mean, h.mean(0), rtol=1e-4, atol=1e-5)


def test_convert_to_torch_leaves_a_frozen_layer_alone_and_says_why():
    net = torch.nn.Sequential(bnlab.nn.BatchNorm1d(3), bnlab.nn.BatchNorm1d(3))
    freeze(net[0])
    with pytest.warns(UserWarning, match=r"frozen \(bnlab.tools.freeze\).*unfreeze it first"):
        bnlab.convert(net, to="torch")
    assert type(net[0]) is bnlab.nn.BatchNorm1d and type(net[1]) is torch.nn.BatchNorm1d
