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

Routing: CPU float32/float64 tensors go to bnlab's fused numba kernels (:mod:`.cpu`); every other
device and dtype (CUDA, float16, bfloat16) goes to ``torch.nn.functional.batch_norm``, which
computes half-precision statistics in float32.

Two entries into the same kernels:

* eager: plain ``torch.autograd.Function`` classes (:class:`_TrainFn`, :class:`_EvalFn`) that call
  the kernels directly, with the running-statistics update (:func:`commit_running_stats`, C-sized
  work on the float64 statistics the kernel returned) inside the forward. A torch.library op's
  Python dispatch costs ~0.2 ms a call, more than the whole step on small shapes. When nothing
  needs a gradient (``torch.no_grad()``, inference, recalibration) the kernels are called
  directly, without an autograd node.
* under ``torch.compile``: the custom ops of :mod:`.ops` (fake functions, autograd formulas, and a
  mutating op for the running statistics with the non-finite policy inside), so that
  ``fullgraph=True`` traces a network containing bnlab's batch norm.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor

from .. import reference as ref
from ..policy import NonFiniteBatchError, update_buffers
from . import cpu

__all__ = [
    "NonFiniteBatchError", "update_buffers", "commit_running_stats", "uses_bnlab_kernel", "needs_reference",
    "batch_norm_train", "batch_norm_eval",
]

_KERNEL_DTYPES = (torch.float32, torch.float64)

_transforms_active = torch._C._are_functorch_transforms_active

if hasattr(_fwad, "_current_level"):
    def _dual_level_open() -> bool:
        return _fwad._current_level >= 0
else:  # pragma: no cover - a torch without the module-level marker: assume a dual level may be open
    def _dual_level_open() -> bool:
        return True


def needs_reference() -> bool:
    """True while a mode the fused kernels cannot serve is active: forward-mode AD (a
    ``torch.autograd.forward_ad.dual_level`` is open: dual tensors do not set ``requires_grad``,
    so nothing else reveals them) or a ``torch.func`` transform (grad, vjp, jvp, vmap, ...: their
    wrapped tensors have no storage a kernel could read). Then every path takes the reference
    math in plain torch ops, which torch differentiates in every mode."""
    return _dual_level_open() or _transforms_active()


def commit_running_stats(running_mean, running_var, num_batches_tracked, stats, count, momentum, nonfinite, name, nbad=None):
    """:func:`bnlab.policy.update_buffers` from a ``(3, C)`` statistics array or tensor (mean, var, invstd)."""
    update_buffers(running_mean, running_var, num_batches_tracked, stats[0], stats[1], count, momentum, nonfinite,
                   name, nbad)


def uses_bnlab_kernel(x: Tensor) -> bool:
    """True when ``x`` is served by bnlab's own kernels (CPU float32/float64)."""
    return x.is_cpu and x.dtype in _KERNEL_DTYPES


def _no_double_backward():
    raise RuntimeError(
        "bnlab batch norm: the backward of the fused CPU kernel is not itself differentiable "
        "(create_graph=True / double backward is not supported); use bnlab.reference.batch_norm for that"
    )


def _any_requires_grad(x, weight, bias) -> bool:
    return x.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)


def _train_forward(x, weight, bias, eps, track):
    """Training forward on the kernels, then the running update: ``(y, stats)``."""
    y, stats, nbad = cpu.forward_train(x, weight, bias, eps)
    if track is not None:
        running_mean, running_var, num_batches_tracked, momentum, nonfinite, name = track
        count = x.numel() // x.shape[1] if x.shape[1] else 0
        update_buffers(running_mean, running_var, num_batches_tracked, stats[0], stats[1], count, momentum,
                       nonfinite, name, nbad)
    return y, stats


class _TrainFn(torch.autograd.Function):
    """Training forward (statistics, y and the running update: one kernel call and C-sized work)
    and the hand-derived backward (one kernel call)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, track):
        y, stats = _train_forward(x, weight, bias, eps, track)
        ctx.stats = stats
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            _no_double_backward()
        x, weight = ctx.saved_tensors
        dx, grads = cpu.backward(dy, x, weight, ctx.stats, True)
        need = ctx.needs_input_grad  # grads: (2, C) dbias, dweight
        return (dx if need[0] else None, torch.from_numpy(grads[1]) if need[1] else None,
                torch.from_numpy(grads[0]) if need[2] else None, None, None)


class _EvalFn(torch.autograd.Function):
    """Eval forward with given statistics, and its backward (the statistics are constants)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stats):
        ctx.stats = stats
        ctx.save_for_backward(x, weight)
        return cpu.forward_eval(x, weight, bias, stats)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            _no_double_backward()
        x, weight = ctx.saved_tensors
        dx, grads = cpu.backward(dy, x, weight, ctx.stats, False)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, torch.from_numpy(grads[1]) if need[1] else None,
                torch.from_numpy(grads[0]) if need[2] else None, None)


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


def _compiled_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, nonfinite, name):
    """What torch.compile traces: custom ops only (no data-dependent Python)."""
    from . import ops

    if uses_bnlab_kernel(x):
        y, stats = ops.batch_norm_train(x, weight, bias, eps)
    else:
        with torch.no_grad():
            xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            var, mean = torch.var_mean(xf, dim=ref.reduce_dims(x), unbiased=False)
            stats = torch.stack((mean, var, var))
        y = torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if running_mean is not None or running_var is not None or num_batches_tracked is not None:
        count = x.numel() // x.shape[1] if x.shape[1] else 0
        ops.update_running_stats(running_mean, running_var, num_batches_tracked, stats.detach(), count,
                                 0.0 if momentum is None else float(momentum), momentum is None, nonfinite, name)
    return y


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
    if torch.compiler.is_compiling():
        return _compiled_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                               nonfinite, name)
    if not (x.is_cpu and x.dtype in _KERNEL_DTYPES):
        return _native_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, nonfinite, name)
    if running_mean is None and running_var is None and num_batches_tracked is None:
        track = None
    else:
        track = (running_mean, running_var, num_batches_tracked, momentum, nonfinite, name)
    if not (torch.is_grad_enabled() and _any_requires_grad(x, weight, bias)):
        return _train_forward(x, weight, bias, eps, track)[0]  # nothing to differentiate: no autograd node
    return _TrainFn.apply(x, weight, bias, eps, track)


def batch_norm_eval(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    if not uses_bnlab_kernel(x):
        return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    if torch.compiler.is_compiling():
        from . import ops

        mean, var = running_mean.to(torch.float64), running_var.to(torch.float64)
        return ops.batch_norm_eval(x, weight, bias, torch.stack((mean, var, torch.rsqrt(var + eps))))
    stats = cpu.eval_stats(running_mean, running_var, eps)
    if torch.is_grad_enabled() and _any_requires_grad(x, weight, bias):
        return _EvalFn.apply(x, weight, bias, stats)
    return cpu.forward_eval(x, weight, bias, stats)  # nothing to differentiate: no autograd node
