"""MaskedBatchNorm1d and SequenceBatchNorm against the reference math, torch, and closed forms."""

import pytest
import torch

import bnlab
from bnlab import reference as ref
from bnlab.nn import MaskedBatchNorm1d, SequenceBatchNorm


def _lengths_mask(lengths, L):
    return torch.arange(L)[None, :] < torch.as_tensor(lengths)[:, None]  # (N, L)


def _valid(x, mask):
    """The valid values of x (N, C, L) as a (M, C) matrix."""
    return x.transpose(1, 2)[mask]  # (N, L, C)[mask] -> (M, C)


def test_masked_output_equals_batchnorm_of_the_unpadded_values():
    x = torch.randn(5, 3, 7, dtype=torch.float64)
    mask = _lengths_mask([7, 2, 5, 1, 4], 7)
    bn = MaskedBatchNorm1d(3, dtype=torch.float64)
    y = bn(x, mask)
    plain = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    expect = plain(_valid(x, mask))
    torch.testing.assert_close(_valid(y, mask), expect)
    assert bool((y.transpose(1, 2)[~mask] == 0).all())
    torch.testing.assert_close(bn.running_mean, plain.running_mean)
    torch.testing.assert_close(bn.running_var, plain.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_masked_statistics_equal_reference_batch_stats_with_the_mask():
    x = 100 + torch.randn(6, 4, 9)
    mask = _lengths_mask([9, 3, 1, 6, 2, 8], 9)
    bn = MaskedBatchNorm1d(4, momentum=1.0)
    bn(x, mask)
    mean, var, count = ref.batch_stats(x, mask)
    torch.testing.assert_close(bn.running_mean, mean.float())
    torch.testing.assert_close(bn.running_var, (var * count / (count - 1)).float())


def test_two_dimensional_input_takes_a_row_mask():
    x = torch.randn(10, 3)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    y = MaskedBatchNorm1d(3)(x, mask)
    torch.testing.assert_close(y[mask], torch.nn.functional.batch_norm(x[mask], None, None, training=True))
    assert bool((y[~mask] == 0).all())


def test_an_all_masked_batch_leaves_the_running_statistics_untouched():
    bn = MaskedBatchNorm1d(3)
    bn(torch.randn(4, 3, 5), _lengths_mask([5, 2, 3, 1], 5))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    y = bn(torch.randn(4, 3, 5), torch.zeros(4, 5, dtype=torch.bool))
    assert bool((y == 0).all())
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_without_a_mask_it_matches_torch_batchnorm1d():
    x = torch.randn(8, 4, 6)
    ours, theirs = MaskedBatchNorm1d(4), torch.nn.BatchNorm1d(4)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_eval_uses_the_running_statistics_and_zeroes_masked_positions():
    bn = MaskedBatchNorm1d(2)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25]))
    bn.eval()
    x = torch.randn(3, 2, 4)
    mask = _lengths_mask([4, 1, 2], 4)
    y = bn(x, mask)
    expect = (x - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)
    torch.testing.assert_close(_valid(y, mask), _valid(expect, mask))
    assert bool((y.transpose(1, 2)[~mask] == 0).all())


def test_masked_batchnorm_passes_gradcheck_in_float64():
    bn = MaskedBatchNorm1d(3, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, -1.0], dtype=torch.float64))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    mask = _lengths_mask([4, 2, 3], 4)
    x = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    w, b = bn.weight, bn.bias

    def f(x, w, b):
        return torch.nn.functional.linear(bn(x, mask).transpose(1, 2), torch.eye(3, dtype=torch.float64))

    torch.autograd.gradcheck(f, (x, w, b))
    x2 = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: bn(x, torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)), (x2,))


def test_hand_derived_masked_backward_equals_autograd_of_the_unpadded_batch():
    x = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    mask = _lengths_mask([6, 1, 4, 3], 6)
    bn = MaskedBatchNorm1d(3, dtype=torch.float64)
    dy = torch.randn(4, 3, 6, dtype=torch.float64)
    (bn(x, mask) * dy).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    plain = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    (plain(_valid(x2, mask)) * _valid(dy, mask)).sum().backward()
    torch.testing.assert_close(_valid(x.grad, mask), _valid(x2.grad, mask))
    assert bool((x.grad.transpose(1, 2)[~mask] == 0).all())
    torch.testing.assert_close(bn.weight.grad, plain.weight.grad)
    torch.testing.assert_close(bn.bias.grad, plain.bias.grad)


def test_state_dict_keys_match_torch_batchnorm1d_and_load_both_ways():
    ours, theirs = MaskedBatchNorm1d(5), torch.nn.BatchNorm1d(5)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs(torch.randn(8, 5))
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)


def test_recalibrate_gives_the_exact_statistics_of_every_valid_value():
    torch.manual_seed(1)
    bn = MaskedBatchNorm1d(3, momentum=0.5)
    xs = [3 + torch.randn(4, 3, 5) for _ in range(3)]
    masks = [_lengths_mask(torch.randint(1, 6, (4,)), 5) for _ in range(3)]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn

        def forward(self, batch):
            return self.bn(*batch)

    net = Net().eval()
    bnlab.tools.recalibrate(net, [[(x, m)] for x, m in zip(xs, masks)])
    allv = torch.cat([_valid(x, m) for x, m in zip(xs, masks)]).double()
    torch.testing.assert_close(bn.running_mean, allv.mean(0).float())
    torch.testing.assert_close(bn.running_var, allv.var(0, unbiased=True).float())
    assert not bn.training


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(4, 3, 2, 2),), "MaskedBatchNorm1d: expected 2D or 3D input"),
        ((torch.randn(4, 5),), "MaskedBatchNorm1d: expected input with 3 channels"),
        ((torch.randn(4, 3, 6), torch.ones(4, 5, dtype=torch.bool)), r"MaskedBatchNorm1d: expected mask of shape"),
        ((torch.randn(4, 3), torch.ones(4, 2, dtype=torch.bool)), r"MaskedBatchNorm1d: expected mask of shape \(N,\)"),
    ],
)
def test_bad_input_raises_an_error_naming_the_layer(args, match):
    with pytest.raises(ValueError, match=match):
        MaskedBatchNorm1d(3)(*args)


# --- SequenceBatchNorm ---------------------------------------------------------------------------

def test_per_step_statistics_are_each_steps_batch_statistics():
    bn = SequenceBatchNorm(3, per_step=True, momentum=1.0)
    xs = [t + (t + 1) * torch.randn(16, 3) for t in range(4)]
    for t, x in enumerate(xs):
        y = bn(x, t)
        torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert bn.running_mean.shape == (4, 3)
    for t, x in enumerate(xs):
        mean, var, n = ref.batch_stats(x)
        torch.testing.assert_close(bn.running_mean[t], mean.float())
        torch.testing.assert_close(bn.running_var[t], (var * n / (n - 1)).float())


def test_eval_reuses_the_last_trained_step_past_the_training_length():
    bn = SequenceBatchNorm(2, per_step=True, max_steps=8, momentum=1.0)
    for t in range(5):
        bn(10 * t + torch.randn(8, 2), t)
    assert bn.tracked_steps == 5
    bn.eval()
    x = torch.randn(4, 2) + 40
    torch.testing.assert_close(bn(x, 7), bn(x, 4))
    torch.testing.assert_close(bn(x, 5), bn(x, 4))
    assert not torch.allclose(bn(x, 3), bn(x, 4))
    xs = torch.randn(4, 9, 2)  # (B, T, C)
    steps = bn.forward_steps(xs)
    torch.testing.assert_close(steps, torch.stack([bn(xs[:, t], t) for t in range(9)], 1))


def test_shared_statistics_serve_every_step():
    bn = SequenceBatchNorm(2, per_step=False, momentum=1.0)
    for t in range(3):
        bn(torch.randn(8, 2) + t, t)
    assert bn.running_mean.shape == (1, 2)
    bn.eval()
    x = torch.randn(4, 2)
    torch.testing.assert_close(bn(x, 0), bn(x, 17))


def test_forward_steps_equals_one_call_per_step_in_training():
    torch.manual_seed(3)
    a = SequenceBatchNorm(4, per_step=True, gamma_init=0.1)
    b = SequenceBatchNorm(4, per_step=True, gamma_init=0.1)
    x = torch.randn(8, 6, 4) * 3 + 1  # (B, T, C)
    offset = torch.randn(4)
    torch.testing.assert_close(a.forward_steps(x, offset), torch.stack([b(x[:, t], t) + offset for t in range(6)], 1))
    torch.testing.assert_close(a.running_mean, b.running_mean)
    torch.testing.assert_close(a.running_var, b.running_var)
    assert torch.equal(a.num_batches_tracked, b.num_batches_tracked)


def test_a_step_with_one_running_sequence_uses_population_statistics_and_updates_nothing():
    bn = SequenceBatchNorm(3, per_step=True, momentum=1.0)
    bn(torch.randn(8, 3), 0)
    before = bn.running_mean.clone()
    y = bn(torch.randn(1, 3), 0)
    assert torch.isfinite(y).all()
    assert torch.equal(bn.running_mean, before)


def test_per_step_state_dict_loads_into_a_fresh_module_of_another_length():
    a = SequenceBatchNorm(3, per_step=True)
    for t in range(6):
        a(torch.randn(8, 3), t)
    b = SequenceBatchNorm(3, per_step=True)
    b.load_state_dict(a.state_dict())
    assert b.running_mean.shape == (6, 3) and b.tracked_steps == 6
    torch.testing.assert_close(b.running_var, a.running_var)


def test_cumulative_average_with_momentum_none():
    bn = SequenceBatchNorm(2, per_step=True, momentum=None)
    xs = [torch.randn(8, 2) for _ in range(3)]
    for x in xs:
        bn(x, 0)
    expect = torch.stack([x.mean(0) for x in xs]).mean(0)
    torch.testing.assert_close(bn.running_mean[0], expect)


@pytest.mark.parametrize("name", ["bnlab.nn.masked", "bnlab.nn.recurrent"])
def test_docstring_examples_run(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------------------------
# padding content changes nothing, inf and nan included


@pytest.mark.parametrize("fill", [float("inf"), float("-inf"), float("nan"), 3e38])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("training", [True, False])
def test_inf_and_nan_in_masked_positions_change_nothing(fill, dims, training):
    torch.manual_seed(1)
    if dims == 3:
        x = torch.randn(5, 3, 6)
        mask = _lengths_mask([6, 2, 4, 1, 5], 6)
        pad = ~mask[:, None, :].expand_as(x)
    else:
        x = torch.randn(8, 3)
        mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
        pad = ~mask[:, None].expand_as(x)
    dirty = x.masked_fill(pad, fill)
    clean_bn, dirty_bn = MaskedBatchNorm1d(3), MaskedBatchNorm1d(3)
    with torch.no_grad():
        for bn in (clean_bn, dirty_bn):
            bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            bn.running_var.fill_(2.0)
    outs = []
    for bn, inp in ((clean_bn, x), (dirty_bn, dirty)):
        bn.train(training)
        inp = inp.clone().requires_grad_()
        y = bn(inp, mask)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), inp.grad, bn.weight.grad, bn.bias.grad))
    for a, b in zip(*outs):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b)
    assert bool((outs[1][0][pad] == 0).all())  # padding gives 0, as documented
    assert bool((outs[1][1][pad] == 0).all())  # and no gradient
    for k, v in clean_bn.state_dict().items():
        torch.testing.assert_close(dirty_bn.state_dict()[k], v)


def test_a_padded_first_position_holding_a_huge_value_does_not_spoil_the_shift():
    x = 1000 + torch.randn(4, 2, 5, dtype=torch.float64)
    mask = _lengths_mask([3, 5, 5, 2], 5)
    mask[0, 0] = False  # the first position (the reference's shift) is padding
    dirty = x.clone()
    dirty[0, :, 0] = float("nan")
    mean, var, count = ref.batch_stats(dirty, mask)
    valid = _valid(x, mask)
    torch.testing.assert_close(mean, valid.mean(0))
    torch.testing.assert_close(var, valid.var(0, unbiased=False))


def test_forward_ad_through_the_masked_layer_equals_batchnorm_of_the_valid_rows():
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    x[~mask] = float("inf")
    ours, plain = MaskedBatchNorm1d(3, dtype=torch.float64), torch.nn.BatchNorm1d(3, dtype=torch.float64)
    for train in (True, False):
        ours.train(train), plain.train(train)
        with fwAD.dual_level():
            y, ty = fwAD.unpack_dual(ours(fwAD.make_dual(x, t), mask))
            ye, te = fwAD.unpack_dual(plain(fwAD.make_dual(x[mask], t[mask])))
        torch.testing.assert_close(y[mask], ye)
        torch.testing.assert_close(ty[mask], te)
        assert bool((ty[~mask] == 0).all()) and bool((y[~mask] == 0).all())
    torch.testing.assert_close(ours.running_mean, plain.running_mean)
