"""Batch-normalization variants built on bnlab's batch norm.

``GhostBatchNorm1d`` / ``GhostBatchNorm2d``: ghost batch normalization (Hoffer, Hubara & Soudry
2017, "Train longer, generalize better", arXiv 1705.08741).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as BF
from .. import kernels
from .. import reference as ref
from .batchnorm import BatchNorm1d, BatchNorm2d, _BatchNorm

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d"]


def _ghost_view(x: Tensor, groups: int, size: int) -> Tensor:
    """``(G*S, C, *) -> (S, G*C, *)``: ghost batch g's channel c becomes channel g*C + c."""
    rest = list(x.shape[1:])
    xg = x.reshape([groups, size] + rest)  # (G*S, C, *) -> (G, S, C, *)
    return xg.transpose(0, 1).reshape([size, groups * rest[0]] + rest[1:])  # -> (S, G*C, *)


def _unghost_view(y: Tensor, groups: int, size: int) -> Tensor:
    """Inverse of :func:`_ghost_view`: ``(S, G*C, *) -> (G*S, C, *)``."""
    rest = list(y.shape[2:])
    c = y.shape[1] // groups
    yg = y.reshape([size, groups, c] + rest)  # (S, G*C, *) -> (S, G, C, *)
    return yg.transpose(0, 1).reshape([groups * size, c] + rest)  # -> (G*S, C, *)


class _GhostBatchNorm(_BatchNorm):
    r"""Ghost batch normalization: normalize each "ghost" batch of ``virtual_batch_size``
    consecutive samples with its own statistics (Hoffer et al. 2017, arXiv 1705.08741).

    .. math:: y_i = \frac{x_i - \mathrm{E}_{g(i)}[x]}{\sqrt{\mathrm{Var}_{g(i)}[x] + \epsilon}} \gamma + \beta

    where :math:`g(i)` is the ghost batch of sample :math:`i`. Small ghost batches add
    batch-statistics noise (a regularizer) while the optimizer still sees the large batch.

    Decisions, written down here:

    * Vectorized: the ``N = G * S`` samples are viewed as ``S`` samples of ``G * C`` channels (ghost
      batch ``g``'s channel ``c`` is channel ``g * C + c``) and normalized by one batch-norm call with
      ``gamma`` and ``beta`` repeated ``G`` times; no Python loop over ghost batches.
    * ``N`` not a multiple of ``virtual_batch_size``: the last ``N mod S`` samples form one smaller
      ghost batch (as ``x.split(virtual_batch_size)`` would). In training every ghost batch needs
      more than one value per channel, as batch norm does.
    * Running statistics: one update per forward, with the count-weighted mean of the ghost
      batches' means and of their unbiased variances (the estimate of the population variance a
      ghost batch's variance estimates); ``momentum`` and ``momentum=None`` as in :class:`BatchNorm1d`.
    * Eval: ordinary batch norm with the running statistics. A training batch no larger than
      ``virtual_batch_size`` is ordinary batch norm too.

    Args:
        num_features: C.
        virtual_batch_size: samples per ghost batch (default 32).
        eps, momentum, affine, track_running_stats, device, dtype, bias, nonfinite: as in
            :class:`bnlab.nn.BatchNorm1d`.
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        nonfinite: str = "raise",
    ) -> None:
        if int(virtual_batch_size) < 1:
            raise ValueError(f"{type(self).__name__}: virtual_batch_size must be >= 1 (got {virtual_batch_size})")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         nonfinite=nonfinite)
        self.virtual_batch_size = int(virtual_batch_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def _normalize_groups(self, x: Tensor, groups: int, size: int) -> tuple[Tensor, Tensor, Tensor, int]:
        """Normalize ``groups`` ghost batches of ``size`` samples; return y and their statistics."""
        name = type(self).__name__
        xr = _ghost_view(x, groups, size) if groups > 1 else x
        w = self.weight.repeat(groups) if self.weight is not None and groups > 1 else self.weight
        b = self.bias.repeat(groups) if self.bias is not None and groups > 1 else self.bias
        y = BF.batch_norm(xr, None, None, w, b, True, 0.0, self.eps, name=name)  # no buffers here: momentum unused
        with torch.no_grad():
            mean, var, count = ref.batch_stats(xr.detach())  # (S, G*C, *) -> (G*C,) float64
        c = x.shape[1]
        y = _unghost_view(y, groups, size) if groups > 1 else y
        return y, mean.reshape(groups, c), var.reshape(groups, c), int(count)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        n, s = input.shape[0], self.virtual_batch_size
        if not self.training or n <= s:
            return super().forward(input)
        kernels.refuse_training_trace(type(self).__name__)  # the update below is Python no trace records
        BF.check_batch_norm_input(input, self.running_mean, self.running_var, self.weight, self.bias, True,
                                  type(self).__name__)
        full, tail = divmod(n, s)
        parts, stats = [], []  # stats: (means (G, C), unbiased vars (G, C), weight per ghost batch)
        if full:
            y, mean, var, m = self._normalize_groups(input[: full * s], full, s)
            parts.append(y)
            stats.append((mean, var * (m / (m - 1) if m > 1 else 1.0), m))
        if tail:
            y, mean, var, m = self._normalize_groups(input[full * s :], 1, tail)
            parts.append(y)
            stats.append((mean, var * (m / (m - 1) if m > 1 else 1.0), m))
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self.track_running_stats:
            with torch.no_grad():
                total = sum(mean.shape[0] * m for mean, _, m in stats)
                mean = sum(mean.sum(0) * m for mean, _, m in stats) / total  # (G, C) -> (C,)
                var_u = sum(var.sum(0) * m for _, var, m in stats) / total  # (G, C) -> (C,)
                # update_buffers turns a biased variance into the unbiased one with M / (M - 1):
                # hand it the averaged unbiased variance scaled back by (M - 1) / M
                m = s * (input.numel() // (n * input.shape[1]))
                kernels.update_buffers(self.running_mean, self.running_var, self.num_batches_tracked, mean,
                                       var_u * ((m - 1) / m if m > 1 else 1.0), m, self.momentum, self.nonfinite,
                                       type(self).__name__)
        return out


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost batch normalization over a 2D or 3D input ``(N, C)`` / ``(N, C, L)``.

    See :class:`_GhostBatchNorm` for the math and decisions; signature as
    :class:`bnlab.nn.BatchNorm1d` plus ``virtual_batch_size`` (default 32).

    Shape: input ``(N, C)`` or ``(N, C, L)``; output the same.

    Example:
        >>> import torch, bnlab
        >>> gbn = bnlab.nn.GhostBatchNorm1d(4, virtual_batch_size=8)
        >>> y = gbn(torch.randn(32, 4))
        >>> torch.allclose(y[:8].mean(0), torch.zeros(4), atol=1e-5)  # each ghost batch is centred
        True
    """

    def _check_input_dim(self, input: Tensor) -> None:
        BatchNorm1d._check_input_dim(self, input)


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost batch normalization over a 4D input ``(N, C, H, W)``; see :class:`GhostBatchNorm1d`.

    Example:
        >>> import torch, bnlab
        >>> bnlab.nn.GhostBatchNorm2d(3, virtual_batch_size=4)(torch.randn(8, 3, 5, 5)).shape
        torch.Size([8, 3, 5, 5])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        BatchNorm2d._check_input_dim(self, input)
