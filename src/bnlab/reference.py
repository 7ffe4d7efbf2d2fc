"""The batch-normalization math in plain torch ops: slow, obvious, and the single source of truth.

Every fast path in :mod:`bnlab.kernels` has the same contract as the functions here and is tested
against them. Nothing in this module holds state.

Layout convention: ``x`` has shape ``(N, C, *spatial)``; statistics are per channel (dim 1), reduced
over every other dimension. ``M`` is the number of values reduced per channel (N * prod(spatial),
or the number of unmasked positions when a mask is given).

Numerical decisions, made here once:

* **Shift before summing.** Each channel is shifted by one of its own samples (the first element of
  the channel) before the sums are taken. The variance of ``x - shift`` equals the variance of ``x``,
  but the sums no longer carry the large common offset that makes ``E[x^2] - E[x]^2`` cancel
  catastrophically (with ``x = 1000 + randn`` a float32 one-pass variance is off by ~8).
* **Accumulate in float64.** Per-channel sums are float64 whatever the input dtype; the statistics
  returned are float64 tensors of shape ``(C,)``.
* **Form ``x - mean`` directly** when normalizing, never ``x * invstd - mean * invstd``.
* **Biased variance to normalize, unbiased for the running estimate** (as torch and the paper):
  ``var_b = sum((x - mean)^2) / M`` normalizes; ``var_u = var_b * M / (M - 1)`` updates
  ``running_var``.
* **eps inside the square root:** ``invstd = 1 / sqrt(var_b + eps)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "reduce_dims",
    "broadcast_shape",
    "batch_stats",
    "invstd_from_var",
    "normalize",
    "update_running_stats",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_backward_eval",
    "batch_norm",
]


def reduce_dims(x: Tensor) -> list[int]:
    """All dims but the channel dim 1: ``(N, C, H, W) -> [0, 2, 3]``."""
    return [0] + list(range(2, x.dim()))


def broadcast_shape(x: Tensor) -> list[int]:
    """Shape that broadcasts a ``(C,)`` vector against ``x``: ``(N, C, H, W) -> [1, C, 1, 1]``."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _expand_mask(x: Tensor, mask: Tensor) -> Tensor:
    """A float64 0/1 weight of x's shape with the channel dim of size 1.

    mask (N,) for x (N, C) or (N, C, *); mask (N, L) for x (N, C, L).
    """
    return _mask_bool(x, mask).to(torch.float64).expand([x.shape[0], 1] + list(x.shape[2:]))


def _mask_bool(x: Tensor, mask: Tensor) -> Tensor:
    """The boolean mask shaped to broadcast against x: (N,) -> (N, 1[, 1...]); (N, L) -> (N, 1, L)."""
    if mask.dim() == 1:
        return mask.to(torch.bool).reshape([x.shape[0], 1] + [1] * (x.dim() - 2))
    return mask.to(torch.bool).unsqueeze(1)  # (N, L) -> (N, 1, L)


def mask_out(x: Tensor, mask: Tensor | None) -> Tensor:
    """``x`` with every masked position set to 0 (``torch.where``, never ``x * 0``: a padded inf or
    nan must not become nan). Differentiable; masked positions get no gradient."""
    if mask is None:
        return x
    return torch.where(_mask_bool(x, mask), x, x.new_zeros(()))


def batch_stats(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, int | Tensor]:
    """Per-channel mean and biased variance of ``x`` in float64, shifted.

    Args:
        x: ``(N, C, *)`` input.
        mask: optional boolean mask, True where a value is valid: ``(N,)``, or ``(N, L)`` for
            ``x`` of shape ``(N, C, L)``. Masked positions do not enter any sum, whatever they
            hold (inf and nan included: they are replaced by 0 before any arithmetic).

    Returns:
        ``(mean, var_biased, count)``: float64 ``(C,)`` tensors and the number of values ``M``
        reduced per channel (an int, or a 0-d tensor when a mask is given).
    """
    dims = reduce_dims(x)
    xd = mask_out(x, mask).to(torch.float64)
    first = 0
    if mask is not None and x.numel():
        # shift by the first *valid* sample of each channel (a padded one may hold anything)
        valid = _mask_bool(x, mask).expand([x.shape[0], 1] + list(x.shape[2:])).reshape(-1)
        first = valid.to(torch.uint8).argmax()
    # shift: one sample of each channel, (N, C, *) -> (C,)
    shift = xd.transpose(0, 1).reshape(x.shape[1], -1)[:, first] if x.numel() else xd.new_zeros(x.shape[1])
    xs = xd - shift.reshape(broadcast_shape(x))
    if mask is None:
        count = x.numel() // max(x.shape[1], 1)
        denom = max(count, 1)
        w = None
        s1 = xs.sum(dims)  # (N, C, *) -> (C,)
    else:
        w = _expand_mask(x, mask)
        count = w.sum()
        denom = count.clamp_min(1)
        s1 = (xs * w).sum(dims)  # (N, C, *) -> (C,)
    mean = shift + s1 / denom
    # second pass: (x - mean) formed directly, squared and summed in float64
    xc = xd - mean.reshape(broadcast_shape(x))
    sq = xc * xc if w is None else xc * xc * w
    var = sq.sum(dims) / denom  # (N, C, *) -> (C,)
    return mean, var, count


def invstd_from_var(var: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(var + eps)`` in the dtype of ``var``."""
    return torch.rsqrt(var + eps)


def normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """``y = (x - mean) * invstd * weight + bias``, per channel, computed in float64, cast to x.dtype."""
    shape = broadcast_shape(x)
    y = (x.to(torch.float64) - mean.to(torch.float64).reshape(shape)) * invstd.to(torch.float64).reshape(shape)
    if weight is not None:
        y = y * weight.to(torch.float64).reshape(shape)
    if bias is not None:
        y = y + bias.to(torch.float64).reshape(shape)
    return y.to(x.dtype)


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var_biased: Tensor,
    count: int | Tensor,
    momentum: float,
) -> None:
    """In place: ``running = (1 - momentum) * running + momentum * batch``.

    ``running_var`` receives the unbiased variance ``var_b * M / (M - 1)`` (torch's convention).
    A cumulative average (torch's ``momentum=None``) is the caller's choice of
    ``momentum = 1 / num_batches_tracked``.
    """
    m = float(count)
    unbiased = var_biased * (m / (m - 1)) if m > 1 else var_biased
    if running_mean is not None:
        new = (1 - momentum) * running_mean.to(torch.float64) + momentum * mean
        running_mean.copy_(new.to(running_mean.dtype))
    if running_var is not None:
        new = (1 - momentum) * running_var.to(torch.float64) + momentum * unbiased
        running_var.copy_(new.to(running_var.dtype))


def batch_norm_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, int | Tensor]:
    """Training-mode forward. Returns ``(y, mean, invstd, var_biased, count)``; statistics float64."""
    mean, var, count = batch_stats(x, mask)
    invstd = invstd_from_var(var, eps)
    y = normalize(x, mean, invstd, weight, bias)
    return y, mean, invstd, var, count


def batch_norm_backward(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Hand-derived training-mode backward. Returns ``(dx, dweight, dbias)``.

    Derivation, per channel, with M values, xhat_i = (x_i - mu) * s, s = (var_b + eps)^(-1/2),
    y_i = g * xhat_i + b:

    1. dbias   = sum_i dy_i
    2. dweight = sum_i dy_i * xhat_i
    3. dxhat_i = g * dy_i
    4. mu and var_b depend on every x_j:  d mu / d x_j = 1/M,
       d var_b / d x_j = 2 (x_j - mu) / M   (the sum of (x_i - mu) is 0, so mu's own
       dependence drops out of var_b's derivative)
    5. d xhat_i / d x_j = s * (delta_ij - 1/M) - (x_i - mu) * s^3 * (x_j - mu) / M
                        = s * (delta_ij - 1/M - xhat_i * xhat_j / M)
    6. dx_j = sum_i dxhat_i * d xhat_i / d x_j
            = s * (dxhat_j - mean_i(dxhat_i) - xhat_j * mean_i(dxhat_i * xhat_i))
            = g * s / M * (M * dy_j - dbias - xhat_j * dweight)

    With a mask, sums and M run over valid positions only and masked positions get dx = 0,
    whatever ``x`` and ``dy`` hold there. All reductions are float64.
    """
    shape = broadcast_shape(x)
    dims = reduce_dims(x)
    x, dy = mask_out(x, mask), mask_out(dy, mask)  # padding content never enters a product
    dyd = dy.to(torch.float64)
    xhat = (x.to(torch.float64) - mean.reshape(shape)) * invstd.reshape(shape)
    if mask is not None:
        w = _expand_mask(x, mask)
        dyd = dyd * w
        m = w.sum().clamp_min(1)
    else:
        w = None
        m = x.numel() // max(x.shape[1], 1)
    dbias = dyd.sum(dims)  # (N, C, *) -> (C,)
    dweight = (dyd * xhat).sum(dims)  # (N, C, *) -> (C,)
    g = weight.to(torch.float64) if weight is not None else torch.ones_like(invstd)
    dx = (g * invstd / m).reshape(shape) * (m * dyd - dbias.reshape(shape) - xhat * dweight.reshape(shape))
    if w is not None:
        dx = dx * w
    wdtype = weight.dtype if weight is not None else x.dtype
    return dx.to(x.dtype), dweight.to(wdtype), dbias.to(wdtype)


def batch_norm_backward_eval(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Eval-mode backward: the statistics are constants, so ``dx = dy * g * s``."""
    shape = broadcast_shape(x)
    dims = reduce_dims(x)
    dyd = dy.to(torch.float64)
    xhat = (x.to(torch.float64) - mean.to(torch.float64).reshape(shape)) * invstd.to(torch.float64).reshape(shape)
    g = weight.to(torch.float64) if weight is not None else torch.ones_like(invstd, dtype=torch.float64)
    dx = dyd * (g * invstd.to(torch.float64)).reshape(shape)
    wdtype = weight.dtype if weight is not None else x.dtype
    return dx.to(x.dtype), (dyd * xhat).sum(dims).to(wdtype), dyd.sum(dims).to(wdtype)


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    mask: Tensor | None = None,
) -> Tensor:
    """Reference of ``torch.nn.functional.batch_norm`` (forward only, no autograd graph of its own).

    Differentiable through torch autograd, so it doubles as a check on the hand-derived backward.
    """
    if training:
        mean, var, count = batch_stats(x, mask)
        y = normalize(x, mean, invstd_from_var(var, eps), weight, bias)
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(), count, momentum)
        return y
    if running_mean is None or running_var is None:
        raise ValueError("reference.batch_norm: eval mode needs running_mean and running_var")
    return normalize(x, running_mean, invstd_from_var(running_var.to(torch.float64), eps), weight, bias)
