"""small_batch="error" | "running_stats": a training batch with one value per channel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab


def _trained(cls, c, **kw):
    torch.manual_seed(0)
    bn = cls(c, **kw)
    shape = (8, c) if cls is bnlab.nn.BatchNorm1d else (8, c, 3, 3)
    for _ in range(3):
        bn(torch.randn(shape) * 2 + 1)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2, c))
        bn.bias.copy_(torch.linspace(-1, 1, c))
    return bn


@pytest.mark.parametrize("cls,shape", [(bnlab.nn.BatchNorm1d, (1, 4)), (bnlab.nn.BatchNorm1d, (1, 4, 1)),
                                       (bnlab.nn.BatchNorm2d, (1, 4, 1, 1))], ids=["1d", "1d-3D", "2d"])
def test_default_is_torchs_error_naming_the_layer(cls, shape):
    x = torch.randn(shape)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        getattr(nn, cls.__name__)(4)(x)
    bn = cls(4)
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: expected more than 1 value per channel when training "
                                         r".*small_batch='running_stats'"):
        bn(x)
    assert int(bn.num_batches_tracked) == 0
    bn.eval()(x)  # eval takes it, as torch


@pytest.mark.parametrize("cls,shape", [(bnlab.nn.BatchNorm1d, (1, 4)), (bnlab.nn.BatchNorm2d, (1, 4, 1, 1))],
                         ids=["1d", "2d"])
def test_running_stats_normalizes_like_eval_and_updates_nothing(cls, shape):
    bn = _trained(cls, 4, small_batch="running_stats")
    ref = _trained(cls, 4).eval()
    before = {k: v.clone() for k, v in bn.named_buffers()}
    x = torch.randn(shape)
    xb, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yb, yr = bn(xb), ref(xr)
    assert bn.training
    torch.testing.assert_close(yb, yr)
    for k, v in bn.named_buffers():
        assert torch.equal(v, before[k]), k
    g = torch.randn_like(yb)
    yb.backward(g)
    yr.backward(g)
    torch.testing.assert_close(xb.grad, xr.grad)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad)
    assert xb.grad.abs().sum() > 0


def test_larger_batches_still_train_normally():
    bn = _trained(bnlab.nn.BatchNorm1d, 4, small_batch="running_stats")
    ref = _trained(bnlab.nn.BatchNorm1d, 4)
    x = torch.randn(2, 4)
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    empty = torch.empty(0, 4)  # no value at all: not a one-value batch (torch counts it)
    assert bn(empty).shape == (0, 4) and int(bn.num_batches_tracked) == 5


def test_without_running_stats_it_is_a_clear_error():
    bn = bnlab.nn.BatchNorm1d(4, track_running_stats=False, small_batch="running_stats")
    with pytest.raises(ValueError, match=r"^BatchNorm1d: small_batch='running_stats' .*has none "
                                         r"\(track_running_stats=False\); got input of shape \(1, 4\)"):
        bn(torch.randn(1, 4))
    bn(torch.randn(3, 4))  # normal batches are fine


def test_option_is_validated_shown_and_taken_by_lazy_layers():
    with pytest.raises(ValueError, match=r"BatchNorm2d: small_batch must be 'error' or 'running_stats' \(got 'skip'\)"):
        bnlab.nn.BatchNorm2d(3, small_batch="skip")
    assert "small_batch='running_stats'" in repr(bnlab.nn.BatchNorm1d(3, small_batch="running_stats"))
    assert "small_batch" not in repr(bnlab.nn.BatchNorm1d(3))
    lazy = bnlab.nn.LazyBatchNorm1d(small_batch="running_stats")
    x = torch.randn(1, 3)
    y = lazy(x)  # initialized by this batch, normalized with the initial statistics (mean 0, var 1)
    torch.testing.assert_close(y, x / (1 + 1e-5) ** 0.5)
    assert type(lazy) is bnlab.nn.BatchNorm1d and int(lazy.num_batches_tracked) == 0


def test_a_one_value_batch_is_no_micro_batch_of_an_accumulation_window():
    bn = bnlab.nn.BatchNorm1d(4, accumulate=2, small_batch="running_stats")
    bn(torch.randn(5, 4))
    bn(torch.randn(1, 4))
    assert bn.pending_micro_batches == 1
    bn(torch.randn(5, 4))
    assert bn.pending_micro_batches == 0 and int(bn.num_batches_tracked) == 1
