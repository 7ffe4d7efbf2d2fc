"""The reference math against closed forms and against float64 torch ops."""

import math

import pytest
import torch

from bnlab import reference as ref


def test_batch_stats_equal_float64_mean_and_biased_variance():
    x = torch.randn(7, 3, 5, 4)
    mean, var, count = ref.batch_stats(x)
    xd = x.double()
    assert count == 7 * 5 * 4
    torch.testing.assert_close(mean, xd.mean((0, 2, 3)))
    torch.testing.assert_close(var, xd.var((0, 2, 3), unbiased=False))
    assert mean.dtype == torch.float64 and var.dtype == torch.float64


def test_batch_stats_stay_accurate_with_a_large_offset():
    x = 1000 + torch.randn(64, 4, 8, 8)
    mean, var, _ = ref.batch_stats(x)
    xd = x.double()
    exact_var = ((xd - xd.mean((0, 2, 3), keepdim=True)) ** 2).mean((0, 2, 3))
    torch.testing.assert_close(var, exact_var, rtol=1e-10, atol=1e-10)


def test_masked_statistics_equal_the_statistics_of_the_valid_positions():
    x = torch.randn(4, 3, 6)
    lengths = torch.tensor([6, 2, 4, 1])
    mask = torch.arange(6)[None, :] < lengths[:, None]  # (N, L)
    mean, var, count = ref.batch_stats(x, mask)
    valid = torch.cat([x[i, :, : lengths[i]] for i in range(4)], dim=1).double()  # (C, sum(lengths))
    assert int(count) == int(lengths.sum())
    torch.testing.assert_close(mean, valid.mean(1))
    torch.testing.assert_close(var, valid.var(1, unbiased=False))


def test_normalized_output_has_zero_mean_and_unit_variance_per_channel():
    x = 3 + 2 * torch.randn(32, 5, 3, 3, dtype=torch.float64)
    y, *_ = ref.batch_norm_forward(x, None, None, eps=0.0)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.var((0, 2, 3), unbiased=False), torch.ones(5, dtype=torch.float64))


def test_running_statistics_equal_their_closed_form_after_one_step():
    x = torch.randn(10, 3, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    ref.batch_norm(x, rm, rv, training=True, momentum=0.25)
    torch.testing.assert_close(rm, 0.25 * x.mean(0))
    torch.testing.assert_close(rv, 0.75 + 0.25 * x.var(0, unbiased=True))


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 2, 3, 4)])
def test_hand_derived_backward_equals_autograd_of_the_forward(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    dy = torch.randn(shape, dtype=torch.float64)
    # autograd through plain ops (no hand-written backward anywhere)
    dims = [0] + list(range(2, x.dim()))
    bshape = [1, -1] + [1] * (x.dim() - 2)
    mu = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    y = (x - mu) / torch.sqrt(var + 1e-5) * w.reshape(bshape) + b.reshape(bshape)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    _, mean, invstd, _, _ = ref.batch_norm_forward(x.detach(), w.detach(), b.detach(), 1e-5)
    dx, dw, db = ref.batch_norm_backward(dy, x.detach(), mean, invstd, w.detach())
    torch.testing.assert_close(dx, gx)
    torch.testing.assert_close(dw, gw)
    torch.testing.assert_close(db, gb)


def test_masked_backward_is_zero_at_masked_positions_and_matches_autograd():
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    dy = torch.randn(3, 2, 5, dtype=torch.float64)
    w = mask[:, None, :].double()
    m = w.sum()
    mu = (x * w).sum((0, 2), keepdim=True) / m
    var = (((x - mu) ** 2) * w).sum((0, 2), keepdim=True) / m
    y = (x - mu) / torch.sqrt(var + 1e-5)
    (gx,) = torch.autograd.grad(y, x, dy * w)
    _, mean, invstd, _, _ = ref.batch_norm_forward(x.detach(), None, None, 1e-5, mask)
    dx, _, _ = ref.batch_norm_backward(dy, x.detach(), mean, invstd, None, mask)
    torch.testing.assert_close(dx, gx)
    assert torch.all(dx[~mask[:, None, :].expand_as(dx)] == 0)


def test_eval_backward_scales_by_gamma_times_invstd():
    x = torch.randn(5, 3, dtype=torch.float64)
    mean, invstd = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    w = torch.randn(3, dtype=torch.float64)
    dy = torch.randn(5, 3, dtype=torch.float64)
    dx, dw, db = ref.batch_norm_backward_eval(dy, x, mean, invstd, w)
    torch.testing.assert_close(dx, dy * w * invstd)
    torch.testing.assert_close(db, dy.sum(0))
    torch.testing.assert_close(dw, (dy * (x - mean) * invstd).sum(0))


def test_single_value_running_variance_update_does_not_divide_by_zero():
    rm, rv = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    ref.update_running_stats(rm, rv, torch.tensor([2.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64), 1, 0.5)
    assert math.isfinite(rv.item())
