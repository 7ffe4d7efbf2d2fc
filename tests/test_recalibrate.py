"""Precise BN: recalibrate writes the full-data population statistics."""

import torch
from torch import nn

import bnlab
from bnlab import nn as bnn


def test_recalibrate_equals_full_data_statistics_with_equal_batches():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 8), bnn.BatchNorm1d(8, momentum=0.1), nn.ReLU(), nn.Linear(8, 4), nn.BatchNorm1d(4))
    data = 3 + 2 * torch.randn(120, 6)
    net.eval()
    bnlab.tools.recalibrate(net, data.split(30))
    assert not net.training and not net[1].training
    h = net[0](data).detach().double()
    torch.testing.assert_close(net[1].running_mean.double(), h.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var.double(), h.var(0, unbiased=True), rtol=1e-5, atol=1e-5)
    assert net[1].momentum == 0.1 and int(net[1].num_batches_tracked) == 0


def test_recalibrate_takes_loader_style_batches_and_limits_the_count():
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))  # torch's layer works too
    xs = [torch.randn(4, 2, 3, 3) + i for i in range(5)]
    net.train()
    bnlab.tools.recalibrate(net, [(x, torch.zeros(4)) for x in xs], num_batches=2)
    assert net.training
    h = torch.cat([net[0](x) for x in xs[:2]]).detach()
    torch.testing.assert_close(net[1].running_mean, h.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, h.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
