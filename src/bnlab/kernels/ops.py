"""bnlab's batch norm as torch.library custom ops, so that torch.compile and export see one op.

The eager path (:mod:`bnlab.kernels`) calls the numba kernels through a plain
``torch.autograd.Function``: a custom op's Python dispatch costs about 0.2 ms a call, too much on
small shapes. Under ``torch.compile`` the same kernels are reached through these ops instead,
which carry a fake (meta) function for tracing and an autograd formula:

``bnlab::batch_norm_train(x, weight, bias, eps) -> (y, stats)``
    Training forward; ``stats`` is float64 ``(3, C)``: mean, biased variance, invstd.
``bnlab::batch_norm_eval(x, weight, bias, stats) -> y``
    Normalize with given statistics (rows 0 and 2 of ``stats`` are read).
``bnlab::batch_norm_backward(dy, x, weight, stats, train) -> (dx, dweight, dbias)``
    The hand-derived backward (:func:`bnlab.kernels.cpu.rows_backward`); ``train=False`` treats
    the statistics as constants.
``bnlab::check_batch(ok, mean, var, count, limit, name) -> ok``
    The non-finite check of the compiled running update: raises :class:`bnlab.policy.NonFiniteBatchError`
    for a bad batch, else returns the flag.
``bnlab::update_running_stats(running_mean!, running_var!, num_batches_tracked!, stats, count,
momentum, cumulative, nonfinite, name) -> ()``
    The running-statistics update (mutating the buffers), with the non-finite policy applied
    inside (:func:`bnlab.policy.update_buffers`): non-finite statistics raise
    :class:`bnlab.policy.NonFiniteBatchError` or skip.

Every op runs on CPU float32/float64 tensors through :mod:`bnlab.kernels.cpu`; the update also
takes statistics computed elsewhere (torch's native path under compile) on any device.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..policy import bad_channels, raise_bad_batch, update_buffers
from . import cpu


@torch.library.custom_op("bnlab::batch_norm_train", mutates_args=())
def batch_norm_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    y, stats, _ = cpu.forward_train(x, weight, bias, eps)
    return y, torch.from_numpy(stats)


@batch_norm_train.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x), x.new_empty((3, x.shape[1]), dtype=torch.float64)


@torch.library.custom_op("bnlab::batch_norm_eval", mutates_args=())
def batch_norm_eval(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], stats: Tensor) -> Tensor:
    return cpu.forward_eval(x, weight, bias, stats.numpy())


@batch_norm_eval.register_fake
def _(x, weight, bias, stats):
    return torch.empty_like(x)


@torch.library.custom_op("bnlab::batch_norm_backward", mutates_args=())
def batch_norm_backward(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], stats: Tensor, train: bool
) -> tuple[Tensor, Tensor, Tensor]:
    dx, grads = cpu.backward(dy, x, weight, stats.numpy(), train)
    wdtype = weight.dtype if weight is not None else x.dtype
    return dx, torch.from_numpy(grads[1]).to(wdtype), torch.from_numpy(grads[0]).to(wdtype)


@batch_norm_backward.register_fake
def _(dy, x, weight, stats, train):
    wdtype = weight.dtype if weight is not None else x.dtype
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty((c,), dtype=wdtype), x.new_empty((c,), dtype=wdtype)


def _grads(ctx, dy, train):
    x, weight, stats = ctx.saved_tensors
    dx, dw, db = batch_norm_backward(dy, x, weight, stats, train)
    need = ctx.needs_input_grad
    return (dx if need[0] else None), (dw if need[1] else None), (db if need[2] else None)


def _train_setup_context(ctx, inputs, output):
    x, weight, _bias, _eps = inputs
    ctx.save_for_backward(x, weight, output[1])


def _train_backward(ctx, dy, _dstats):
    return (*_grads(ctx, dy, True), None)


batch_norm_train.register_autograd(_train_backward, setup_context=_train_setup_context)


def _eval_setup_context(ctx, inputs, output):
    x, weight, _bias, stats = inputs
    ctx.save_for_backward(x, weight, stats)


def _eval_backward(ctx, dy):
    return (*_grads(ctx, dy, False), None)


batch_norm_eval.register_autograd(_eval_backward, setup_context=_eval_setup_context)


@torch.library.custom_op(
    "bnlab::update_running_stats", mutates_args=("running_mean", "running_var", "num_batches_tracked")
)
def update_running_stats(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    stats: Tensor,
    count: int,
    momentum: float,
    cumulative: bool,
    nonfinite: str,
    name: str,
) -> None:
    update_buffers(running_mean, running_var, num_batches_tracked, stats[0], stats[1], count,
                   None if cumulative else momentum, nonfinite, name)


@update_running_stats.register_fake
def _(running_mean, running_var, num_batches_tracked, stats, count, momentum, cumulative, nonfinite, name):
    return None


@torch.library.custom_op("bnlab::check_batch", mutates_args=())
def check_batch(ok: Tensor, mean: Tensor, var: Tensor, count: int, limit: float, name: str) -> Tensor:
    """``ok`` (a 0-d bool: the batch's statistics may enter the buffers) passed through, or
    :class:`bnlab.policy.NonFiniteBatchError` naming the bad channels (the compiled update,
    :func:`bnlab.kernels._compiled_update`, selects the old buffer values on the returned flag, so
    the op stays in the graph and runs before any buffer is written)."""
    if not bool(ok):
        raise_bad_batch_stats(mean, var, count, limit, name)
    return ok.clone()


def raise_bad_batch_stats(mean: Tensor, var: Tensor, count: int, limit: float, name: str) -> None:
    """Raise :class:`bnlab.policy.NonFiniteBatchError` for a batch whose statistics the check
    refused (also called from the C++ op ``bnlab::check_batch_fast``, :mod:`bnlab.kernels.fast`)."""
    bad, kinds = bad_channels(mean, var, count, limit)
    raise_bad_batch(name, bad, kinds, limit)


@check_batch.register_fake
def _(ok, mean, var, count, limit, name):
    return torch.empty_like(ok)
