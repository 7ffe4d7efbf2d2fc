"""Batch-normalization modules with torch.nn's names, signatures, parameters, buffers and
state_dict keys: change one import to switch.

``_NormBase`` owns parameters, buffers, reset and state-dict versioning; ``_BatchNorm`` owns
forward; ``BatchNorm1d/2d/3d`` override only the input-dimension check.

Momentum convention: torch's. ``running = (1 - momentum) * running + momentum * batch`` with
``momentum=0.1`` by default; ``momentum=None`` is a cumulative average. Keras and Flax state the
other side of the same number: their ``momentum=0.99`` is torch's and bnlab's ``momentum=0.01``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Module, Parameter, init
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from .. import functional as BF
from .. import kernels

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
]


class _NormBase(Module):
    """Parameters, buffers, reset and state-dict versioning (shared by every bnlab norm)."""

    _version = 2
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.nonfinite = "raise"
        if affine:
            self.weight = Parameter(torch.empty(num_features, **factory_kwargs))
            if bias:
                self.bias = Parameter(torch.empty(num_features, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
            "track_running_stats={track_running_stats}".format(**self.__dict__)
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            # version 2 added num_batches_tracked; older checkpoints get 0
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = (
                    self.num_batches_tracked
                    if self.num_batches_tracked is not None and self.num_batches_tracked.device != torch.device("meta")
                    else torch.tensor(0, dtype=torch.long)
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class _BatchNorm(_NormBase):
    """Forward shared by BatchNorm1d/2d/3d.

    ``nonfinite`` ("raise" or "skip", keyword, default "raise"): what a training batch with nan/inf
    values does. Default: raise :class:`bnlab.functional.NonFiniteBatchError` naming the channels,
    running statistics untouched (torch would silently write nan into them). "skip": this batch's
    statistics update (and num_batches_tracked) is skipped.
    """

    def __init__(
        self,
        num_features: int,
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
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"{type(self).__name__}: nonfinite must be 'raise' or 'skip' (got {nonfinite!r})")
        self.nonfinite = nonfinite

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        name = type(self).__name__
        # parameters and buffers read once (each is a Module.__getattr__ lookup)
        weight, bias = self.weight, self.bias
        running_mean, running_var = self.running_mean, self.running_var
        BF.check_batch_norm_input(input, running_mean, running_var, weight, bias, self.training, name)
        # batch statistics in training, and in eval when there are no buffers (torch's rule)
        if self.training or (running_mean is None and running_var is None):
            if self.training and self.track_running_stats:
                nbt = self.num_batches_tracked
            else:
                running_mean = running_var = nbt = None
            return kernels.batch_norm_train(
                input, weight, bias, running_mean, running_var, nbt, self.momentum, self.eps, self.nonfinite, name
            )
        return kernels.batch_norm_eval(input, running_mean, running_var, weight, bias, self.eps)


class _LazyNormBase(LazyModuleMixin, _NormBase):
    weight: UninitializedParameter
    bias: UninitializedParameter

    def __init__(self, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None, dtype=None, *, bias=True) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__(0, eps, momentum, False, False, **factory_kwargs)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = UninitializedParameter(**factory_kwargs)
            self.bias = UninitializedParameter(**factory_kwargs) if bias else None
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory_kwargs)
            self.running_var = UninitializedBuffer(**factory_kwargs)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def initialize_parameters(self, input) -> None:
        if self.has_uninitialized_params():
            self.num_features = input.shape[1]
            if self.affine:
                self.weight.materialize((self.num_features,))
                if self.bias is not None:
                    self.bias.materialize((self.num_features,))
            if self.track_running_stats:
                self.running_mean.materialize((self.num_features,))
                self.running_var.materialize((self.num_features,))
            self.reset_parameters()


def _dim_error(layer: str, expected: str, input: Tensor) -> ValueError:
    return ValueError(f"{layer}: expected {expected} input (got {input.dim()}D input of shape {tuple(input.shape)})")


class BatchNorm1d(_BatchNorm):
    r"""Batch normalization over a 2D or 3D input (Ioffe & Szegedy 2015, arXiv 1502.03167).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Same constructor, parameters, buffers and state_dict keys as :class:`torch.nn.BatchNorm1d`.

    Args:
        num_features: C.
        eps: added to the variance (default 1e-5).
        momentum: running-statistics factor (default 0.1); None for a cumulative average.
            (Keras/Flax ``momentum=0.99`` is ``momentum=0.01`` here.)
        affine: learnable gamma (and beta) (default True).
        track_running_stats: keep running_mean/var (default True).
        bias: keyword; learnable beta when affine (default True).
        nonfinite: keyword; "raise" (default) or "skip" for training batches with nan/inf.

    Shape: input ``(N, C)`` or ``(N, C, L)``; output the same.

    Example:
        >>> import torch, bnlab
        >>> bn = bnlab.nn.BatchNorm1d(4)
        >>> y = bn(torch.randn(16, 4))
        >>> y.shape
        torch.Size([16, 4])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise _dim_error(type(self).__name__, "2D or 3D", input)


class BatchNorm2d(_BatchNorm):
    r"""Batch normalization over a 4D input ``(N, C, H, W)``; see :class:`BatchNorm1d`.

    NCHW and channels_last inputs are both served without layout copies.

    Example:
        >>> import torch, bnlab
        >>> bn = bnlab.nn.BatchNorm2d(3)
        >>> bn(torch.randn(2, 3, 5, 5)).shape
        torch.Size([2, 3, 5, 5])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise _dim_error(type(self).__name__, "4D", input)


class BatchNorm3d(_BatchNorm):
    r"""Batch normalization over a 5D input ``(N, C, D, H, W)``; see :class:`BatchNorm1d`.

    Example:
        >>> import torch, bnlab
        >>> bnlab.nn.BatchNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
        torch.Size([2, 2, 3, 3, 3])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise _dim_error(type(self).__name__, "5D", input)


class LazyBatchNorm1d(_LazyNormBase, _BatchNorm):
    """:class:`BatchNorm1d` with ``num_features`` inferred from the first input."""

    cls_to_become = BatchNorm1d

    def _check_input_dim(self, input: Tensor) -> None:
        BatchNorm1d._check_input_dim(self, input)


class LazyBatchNorm2d(_LazyNormBase, _BatchNorm):
    """:class:`BatchNorm2d` with ``num_features`` inferred from the first input."""

    cls_to_become = BatchNorm2d

    def _check_input_dim(self, input: Tensor) -> None:
        BatchNorm2d._check_input_dim(self, input)


class LazyBatchNorm3d(_LazyNormBase, _BatchNorm):
    """:class:`BatchNorm3d` with ``num_features`` inferred from the first input."""

    cls_to_become = BatchNorm3d

    def _check_input_dim(self, input: Tensor) -> None:
        BatchNorm3d._check_input_dim(self, input)
