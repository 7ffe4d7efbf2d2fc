"""Precise BN: recompute population statistics over data (Wu & Johnson 2021, arXiv 2105.07576).

Short training runs leave the running averages lagging the weights (EMA lag); evaluating with them
measures the lag, not the model. ``recalibrate`` runs the data through the model in training mode
(so every layer sees the inputs it saw in training), records each batch-norm layer's per-batch
mean and second moment in float64, and writes population statistics into the running buffers:

    mean = avg_b mean_b
    var  = avg_b (var_b + mean_b^2) - mean^2          (biased, each batch weighted equally)
    running_var = var * M / (M - 1)                    (unbiased, as torch's running estimate)

With equal-size batches these are exactly the statistics of the whole data set. Modules'
training modes, momenta, parameters and num_batches_tracked are restored afterwards.

Other modules may join by defining ``recalibrate_begin()`` and ``recalibrate_end()``: between
the two calls, their training-mode forwards must accumulate population statistics themselves.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from ..nn.batchnorm import _BatchNorm


class _Accumulator:
    def __init__(self) -> None:
        self.n_batches = 0
        self.count = 0
        self.shift = None
        self.sum_mean = None
        self.sum_m2 = None

    def __call__(self, module, args) -> None:
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return
        dims = [0] + list(range(2, x.dim()))
        xd = x.detach().to(torch.float64)
        if self.shift is None:
            self.shift = xd.mean(dims)  # (N, C, *) -> (C,)
            self.sum_mean = torch.zeros_like(self.shift)
            self.sum_m2 = torch.zeros_like(self.shift)
        xs = xd - self.shift.reshape([1, -1] + [1] * (x.dim() - 2))
        self.sum_mean += xs.mean(dims)  # shifted batch mean, (C,)
        self.sum_m2 += (xs * xs).mean(dims)  # shifted batch second moment, (C,)
        self.n_batches += 1
        self.count += x.numel() // x.shape[1]


def _batches(data, num_batches):
    for i, batch in enumerate(data):
        if num_batches is not None and i >= num_batches:
            break
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        elif isinstance(batch, dict):
            batch = batch.get("input", next(iter(batch.values())))
        yield batch


@torch.no_grad()
def recalibrate(model: nn.Module, data: Iterable, num_batches: int | None = None) -> nn.Module:
    """Recompute every batch-norm layer's running statistics over ``data`` (precise BN).

    Args:
        model: a model with bnlab or torch batch-norm layers (or modules with the
            ``recalibrate_begin``/``recalibrate_end`` protocol).
        data: an iterable of input tensors, or of tuples/lists whose first item is the input
            (a DataLoader works).
        num_batches: use at most this many batches (default: all).

    Returns the model, in the training mode it came in with.

    Example:
        >>> import torch, bnlab
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), bnlab.nn.BatchNorm1d(3))
        >>> x = torch.randn(100, 4)
        >>> _ = bnlab.tools.recalibrate(net, x.split(25))
        >>> torch.allclose(net[1].running_mean, net[0](x).mean(0), atol=1e-5)
        True
    """
    bns = [m for m in model.modules() if isinstance(m, (_BatchNorm, _TorchBatchNorm)) and m.track_running_stats]
    custom = [m for m in model.modules() if hasattr(m, "recalibrate_begin") and hasattr(m, "recalibrate_end")]
    modes = {m: m.training for m in model.modules()}
    saved = {m: (m.momentum, m.num_batches_tracked.clone(), m.running_mean.clone(), m.running_var.clone()) for m in bns}
    accs = {m: _Accumulator() for m in bns}
    hooks = [m.register_forward_pre_hook(accs[m]) for m in bns]
    try:
        model.train()
        for m in custom:
            m.recalibrate_begin()
        for x in _batches(data, num_batches):
            model(x)
        for m in custom:
            m.recalibrate_end()
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        for m, (momentum, nbt, rm, rv) in saved.items():
            m.momentum = momentum
            m.num_batches_tracked.copy_(nbt)
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
    for m, acc in accs.items():
        if acc.n_batches == 0:
            continue
        mean_s = acc.sum_mean / acc.n_batches
        var = (acc.sum_m2 / acc.n_batches - mean_s * mean_s).clamp_min(0)  # biased
        if acc.count > 1:
            var = var * acc.count / (acc.count - 1)
        m.running_mean.copy_((acc.shift + mean_s).to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
    return model
