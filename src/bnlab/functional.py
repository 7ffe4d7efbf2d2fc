"""bnlab's functional API, with torch's signatures.

``batch_norm`` here is a drop-in for :func:`torch.nn.functional.batch_norm`: same arguments, same
defaults, same numbers (to float rounding, with better statistics: shifted, float64-accumulated).
It validates its input, then dispatches (:mod:`bnlab.kernels`) to bnlab's fused CPU kernels for
float32/float64 CPU tensors and to torch's native kernel for everything else.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .kernels import NonFiniteBatchError

__all__ = ["batch_norm", "NonFiniteBatchError", "check_batch_norm_input"]

_NONFINITE = ("raise", "skip")


def check_batch_norm_input(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    name: str = "batch_norm",
) -> None:
    """Raise a clear error for input batch norm cannot take. ``name`` names the layer in messages."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor input (got {type(input).__name__})")
    if input.dim() < 2:
        raise ValueError(f"{name}: expected input of shape (N, C, *) with at least 2 dimensions (got {input.dim()}D input)")
    if not (input.is_floating_point()):
        raise TypeError(f"{name}: expected a floating-point input (got dtype {input.dtype})")
    c = input.shape[1]
    for what, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != c:
            raise ValueError(
                f"{name}: input has {c} channels (dim 1 of shape {tuple(input.shape)}) but {what} has "
                f"{t.numel()} elements; expected num_features == {c}"
            )
    if training and input.numel() > 0:
        per_channel = input.numel() // c
        if per_channel == 1:
            raise ValueError(
                f"{name}: expected more than 1 value per channel when training (got input of shape "
                f"{tuple(input.shape)}, 1 value per channel); use a batch of at least 2 or call .eval()"
            )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Tensor | None = None,
    nonfinite: str = "raise",
    name: str = "batch_norm",
) -> Tensor:
    r"""Batch normalization (Ioffe & Szegedy 2015, arXiv 1502.03167).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    per channel (dim 1), with statistics over every other dim.

    Args:
        input: ``(N, C, *)``.
        running_mean, running_var: ``(C,)`` buffers; in training they are updated in place
            (``running = (1 - momentum) * running + momentum * batch``, unbiased variance);
            in eval they normalize. May be None in training (no tracking).
        weight, bias: optional ``(C,)`` scale gamma and shift beta.
        training: use batch statistics (True) or the running buffers (False).
        momentum: update factor (default 0.1). bnlab extension: ``None`` with
            ``num_batches_tracked`` gives a cumulative average, as the modules do.
        eps: added to the variance inside the square root (default 1e-5).
        num_batches_tracked: optional long scalar buffer incremented per tracked batch.
        nonfinite: what a training batch with nan/inf statistics does to the buffers:
            ``"raise"`` (default) raises :class:`NonFiniteBatchError` naming the channels;
            ``"skip"`` skips the statistics update. Either way the buffers are never corrupted.
        name: the layer name used in error messages.

    Example:
        >>> import torch, bnlab.functional as BF
        >>> x = torch.randn(8, 3, 4, 4)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y = BF.batch_norm(x, rm, rv, training=True)
        >>> torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
        True
    """
    check_batch_norm_input(input, running_mean, running_var, weight, bias, training, name)
    if nonfinite not in _NONFINITE:
        raise ValueError(f"{name}: nonfinite must be one of {_NONFINITE} (got {nonfinite!r})")
    if training:
        return kernels.batch_norm_train(
            input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, nonfinite, name
        )
    if running_mean is None or running_var is None:
        raise ValueError(f"{name}: eval mode (training=False) needs running_mean and running_var (got None)")
    return kernels.batch_norm_eval(input, running_mean, running_var, weight, bias, eps)
