"""Batch-normalization modules with torch.nn's names, signatures, parameters, buffers and
state_dict keys: change one import to switch.

They are true subclasses of torch's: ``bnlab.nn.BatchNorm2d`` is a
:class:`torch.nn.BatchNorm2d` (and a ``torch.nn.modules.batchnorm._BatchNorm``), so every tool
that finds batch norms by ``isinstance`` finds them: ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``,
``torch.func.replace_all_batch_norm_modules_``, the "freeze every BN" idiom. Parameters, buffers,
reset and state-dict versioning are torch's own code; bnlab overrides only ``forward`` (bnlab's
kernels, the non-finite policy, errors that name the layer) and ``_check_input_dim`` (the message).
``torch.ao.quantization.fuse_modules`` finds its fusers by exact type, so importing this module
registers bnlab's classes beside torch's in its default table (conv + bn (+ relu), linear + bn).

Momentum convention: torch's. ``running = (1 - momentum) * running + momentum * batch`` with
``momentum=0.1`` by default; ``momentum=None`` is a cumulative average. Keras and Flax state the
other side of the same number: their ``momentum=0.99`` is torch's and bnlab's ``momentum=0.01``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules import batchnorm as _tbn

from .. import functional as BF
from .. import kernels
from ..policy import check_nonfinite_option

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
]

# torch's base of every batch/instance norm: parameters, buffers, reset, state-dict versioning
_NormBase = _tbn._NormBase


class _BatchNorm(_tbn._BatchNorm):
    """Forward shared by BatchNorm1d/2d/3d (a ``torch.nn.modules.batchnorm._BatchNorm``).

    ``nonfinite`` ("raise" or "skip", keyword, default "raise"): what a training batch with nan/inf
    values (or statistics too large for the buffers' dtype) does. Default: raise
    :class:`bnlab.functional.NonFiniteBatchError` naming the channels, running statistics untouched
    (torch would silently write nan or inf into them). "skip": this batch's statistics update (and
    num_batches_tracked) is skipped.
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
        self.nonfinite = check_nonfinite_option(nonfinite, type(self).__name__)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling: one clear error instead
        # of TorchScript's (or numba's) failure deep inside the kernels
        raise RuntimeError(kernels.script_error(type(self).__name__))

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        name = type(self).__name__
        # parameters and buffers read once (each is a Module.__getattr__ lookup)
        weight, bias = self.weight, self.bias
        running_mean, running_var = self.running_mean, self.running_var
        training = self.training
        # batch statistics in training, and in eval when there are no buffers (torch's rule)
        batch_stats = training or (running_mean is None and running_var is None)
        BF.check_batch_norm_input(input, running_mean, running_var, weight, bias, batch_stats, name, self.eps)
        if batch_stats:
            if training and self.track_running_stats:
                nbt = self.num_batches_tracked
            else:
                running_mean = running_var = nbt = None
            return kernels.batch_norm_train(
                input, weight, bias, running_mean, running_var, nbt, self.momentum, self.eps,
                getattr(self, "nonfinite", "raise"), name
            )
        return kernels.batch_norm_eval(input, running_mean, running_var, weight, bias, self.eps)


class _LazyBatchNorm(_tbn._LazyNormBase):
    """torch's lazy initialization, plus bnlab's ``nonfinite`` keyword."""

    def __init__(self, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None, dtype=None, *,
                 bias=True, nonfinite: str = "raise") -> None:
        # torch's lazy base by name: in the subclasses' MRO bnlab's _BatchNorm comes between
        _tbn._LazyNormBase.__init__(self, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.nonfinite = check_nonfinite_option(nonfinite, type(self).__name__)


def _dim_error(layer: str, expected: str, input: Tensor) -> ValueError:
    return ValueError(f"{layer}: expected {expected} input (got {input.dim()}D input of shape {tuple(input.shape)})")


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    r"""Batch normalization over a 2D or 3D input (Ioffe & Szegedy 2015, arXiv 1502.03167).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    A :class:`torch.nn.BatchNorm1d` (subclass): same constructor, parameters, buffers and state_dict
    keys; forward runs on bnlab's kernels.

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


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
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


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    r"""Batch normalization over a 5D input ``(N, C, D, H, W)``; see :class:`BatchNorm1d`.

    Example:
        >>> import torch, bnlab
        >>> bnlab.nn.BatchNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
        torch.Size([2, 2, 3, 3, 3])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise _dim_error(type(self).__name__, "5D", input)


class LazyBatchNorm1d(_LazyBatchNorm, _BatchNorm, torch.nn.LazyBatchNorm1d):
    """:class:`BatchNorm1d` with ``num_features`` inferred from the first input."""

    cls_to_become = BatchNorm1d

    def _check_input_dim(self, input: Tensor) -> None:
        BatchNorm1d._check_input_dim(self, input)


class LazyBatchNorm2d(_LazyBatchNorm, _BatchNorm, torch.nn.LazyBatchNorm2d):
    """:class:`BatchNorm2d` with ``num_features`` inferred from the first input."""

    cls_to_become = BatchNorm2d

    def _check_input_dim(self, input: Tensor) -> None:
        BatchNorm2d._check_input_dim(self, input)


class LazyBatchNorm3d(_LazyBatchNorm, _BatchNorm, torch.nn.LazyBatchNorm3d):
    """:class:`BatchNorm3d` with ``num_features`` inferred from the first input."""

    cls_to_become = BatchNorm3d

    def _check_input_dim(self, input: Tensor) -> None:
        BatchNorm3d._check_input_dim(self, input)


def _register_fusers() -> None:
    """Make ``torch.ao.quantization.fuse_modules`` fuse bnlab's batch norms as it fuses torch's.

    Its default table is keyed by exact module types, ``(nn.Conv2d, nn.BatchNorm2d)`` and so on; each
    entry naming a torch batch norm gets a twin naming bnlab's class, with the same fuser (the fusers
    read only the layer's parameters, buffers and eps). Private torch API: if it moves, fusion of
    bnlab layers needs ``fuse_custom_config_dict={"additional_fuser_method_mapping": ...}``.
    """
    try:
        from torch.ao.quantization import fuser_method_mappings as fmm
    except ImportError:  # pragma: no cover
        return
    table = getattr(fmm, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if not isinstance(table, dict):  # pragma: no cover
        return
    ours = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d, torch.nn.BatchNorm3d: BatchNorm3d}
    for key, fuser in list(table.items()):
        if isinstance(key, tuple) and any(k in ours for k in key):
            twin = tuple(ours.get(k, k) for k in key)
            table.setdefault(twin, fuser)


_register_fusers()
