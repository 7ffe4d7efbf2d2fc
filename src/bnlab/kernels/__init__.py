"""Dispatch between bnlab's fast CPU kernels and torch's native batch norm.

Contract (shared by every path, and by :mod:`bnlab.reference`, which defines the math):

``batch_norm_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
nonfinite, name) -> y``
    Training mode. ``y`` is differentiable with respect to ``x``, ``weight`` and ``bias`` through
    a hand-derived backward. If running buffers are given they are updated in place with the batch
    statistics (biased variance normalizes, unbiased variance enters ``running_var``);
    ``num_batches_tracked`` (if given) is incremented, and ``momentum=None`` means a cumulative
    average (factor ``1 / num_batches_tracked``). When a channel's statistics are non-finite,
    ``nonfinite`` decides: ``"raise"`` raises :class:`NonFiniteBatchError` naming the channels and
    leaves every buffer untouched; ``"skip"`` leaves every buffer untouched and returns ``y``.

``batch_norm_eval(x, running_mean, running_var, weight, bias, eps) -> y``
    Normalize with the given statistics (constants for autograd).

Routing: CPU float32/float64 tensors go to bnlab's kernels; every other device and dtype
(CUDA, float16, bfloat16) goes to ``torch.nn.functional.batch_norm``, which computes half-precision
statistics in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference as ref


class NonFiniteBatchError(ValueError):
    """A training batch had non-finite statistics; the running statistics were left untouched."""


def nonfinite_channels(mean: Tensor, var: Tensor) -> list[int]:
    bad = ~(torch.isfinite(mean) & torch.isfinite(var))
    return bad.nonzero().flatten().tolist()


def raise_nonfinite(name: str, channels: list[int]) -> None:
    shown = channels[:20]
    more = f" (and {len(channels) - 20} more)" if len(channels) > 20 else ""
    raise NonFiniteBatchError(
        f"{name}: non-finite values (nan or inf) in the training batch in channel(s) {shown}{more}; "
        "running statistics were left unchanged. Fix the input, or pass nonfinite='skip' to skip "
        "this batch's statistics update."
    )


def update_buffers(
    running_mean, running_var, num_batches_tracked, mean, var, count, momentum, nonfinite, name
) -> None:
    """The running-statistics update shared by every CPU path (float64 statistics in)."""
    if running_mean is None and running_var is None and num_batches_tracked is None:
        return
    if count == 0:  # an empty batch: torch counts it and leaves the statistics alone
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return
    bad = nonfinite_channels(mean, var)
    if bad:
        if nonfinite == "skip":
            return
        raise_nonfinite(name, bad)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        factor = 1.0 / float(num_batches_tracked.item()) if num_batches_tracked is not None else 0.0
    else:
        factor = float(momentum)
    ref.update_running_stats(running_mean, running_var, mean, var, count, factor)


def uses_bnlab_kernel(x: Tensor) -> bool:
    """True when ``x`` is served by bnlab's own kernels (CPU float32/float64)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


class _ReferenceTrainFn(torch.autograd.Function):
    """Training forward and hand-derived backward from :mod:`bnlab.reference` (the slow path)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, invstd, var, count = ref.batch_norm_forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, mean, invstd = ctx.saved_tensors
        dx, dw, db = ref.batch_norm_backward(dy.contiguous(), x, mean, invstd, weight)
        return dx, (dw if weight is not None else None), (db if ctx.needs_input_grad[2] else None), None


class _ReferenceEvalFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mean, invstd, weight, bias):
        ctx.save_for_backward(x, mean, invstd, weight)
        return ref.normalize(x, mean, invstd, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, mean, invstd, weight = ctx.saved_tensors
        dx, dw, db = ref.batch_norm_backward_eval(dy, x, mean, invstd, weight)
        return dx, None, None, (dw if weight is not None else None), (db if ctx.needs_input_grad[4] else None)


def _native_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, nonfinite, name):
    # statistics first (cheap, float32 for half inputs) so non-finite batches never reach the buffers
    track = running_mean is not None or running_var is not None
    if track and x.numel() > 0:
        with torch.no_grad():
            xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            var, mean = torch.var_mean(xf, dim=ref.reduce_dims(x), unbiased=False)
        bad = nonfinite_channels(mean, var)
        if bad:
            if nonfinite == "raise":
                raise_nonfinite(name, bad)
            return torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        factor = 1.0 / float(num_batches_tracked.item()) if num_batches_tracked is not None else 0.0
    else:
        factor = momentum
    return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, True, factor, eps)


def batch_norm_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
    nonfinite: str = "raise",
    name: str = "batch_norm",
) -> Tensor:
    if not uses_bnlab_kernel(x):
        return _native_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, nonfinite, name)
    y, mean, var = _ReferenceTrainFn.apply(x, weight, bias, eps)
    count = x.numel() // max(x.shape[1], 1)
    with torch.no_grad():
        update_buffers(running_mean, running_var, num_batches_tracked, mean, var, count, momentum, nonfinite, name)
    return y


def batch_norm_eval(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    if not uses_bnlab_kernel(x):
        return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    mean = running_mean.to(torch.float64)
    invstd = ref.invstd_from_var(running_var.to(torch.float64), eps)
    return _ReferenceEvalFn.apply(x, mean, invstd, weight, bias)
