"""bnlab on a torch whose batch norms have no ``bias`` keyword (older releases in pyproject's range,
2.11 among them): the same layers, built by removing the bias after torch's constructor made it.
The older torch is simulated here by switching off the feature flag bnlab reads."""

import pytest
import torch

import bnlab
from bnlab import nn as bnn
from bnlab.nn import _compat


@pytest.fixture
def old_torch(monkeypatch):
    monkeypatch.setattr(_compat, "NORM_BIAS", False)


def test_this_torch_has_the_keyword_and_the_flag_says_so():
    import inspect

    assert _compat.NORM_BIAS == ("bias" in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters)


@pytest.mark.parametrize("make", [lambda **k: bnn.BatchNorm2d(4, **k), lambda **k: bnn.MaskedBatchNorm1d(4, **k),
                                  lambda **k: bnn.GhostBatchNorm1d(4, **k), lambda **k: bnn.BatchRenorm2d(4, **k),
                                  lambda **k: bnn.BatchNormAct2d(4, **k)],
                         ids=["bn", "masked", "ghost", "renorm", "act"])
@pytest.mark.parametrize("bias", [True, False])
def test_layers_without_the_keyword_equal_those_with_it(old_torch, make, bias):
    layer = make(bias=bias)
    assert (layer.bias is not None) == bias
    assert ("bias" in dict(layer.named_parameters())) == bias
    assert list(layer.state_dict()) == list(make(bias=bias).state_dict())
    with torch.no_grad():
        layer.weight.fill_(3.0)
        layer.running_mean.fill_(2.0)
    _compat.reset_parameters(layer)
    assert torch.equal(layer.weight, torch.ones(4)) and torch.equal(layer.running_mean, torch.zeros(4))
    if bias:
        assert torch.equal(layer.bias, torch.zeros(4))


def test_lazy_layers_without_the_keyword_refuse_bias_false_clearly(old_torch):
    with pytest.raises(ValueError, match=r"LazyBatchNorm2d: bias=False .* torch .* here has none"):
        bnn.LazyBatchNorm2d(bias=False)
    layer = bnn.LazyBatchNorm2d()
    _compat.reset_parameters(layer)  # before its parameters exist: nothing to reset, as torch's lazy base
    assert layer.has_uninitialized_params()
    layer(torch.randn(4, 3, 2, 2))
    assert layer.bias.shape == (3,)


def test_convert_to_torch_without_the_keyword(old_torch):
    model = torch.nn.Sequential(bnn.BatchNorm2d(3))
    out = bnlab.convert(model, to="torch")
    assert type(out[0]) is torch.nn.BatchNorm2d
    with pytest.raises(ValueError, match=r"convert to BatchNorm2d: bias=False"):
        bnlab.convert(torch.nn.Sequential(bnn.BatchNorm2d(3, bias=False)), to="torch")
    back = bnlab.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), to="bnlab")
    assert type(back[0]) is bnn.BatchNorm2d and back[0].bias is not None
