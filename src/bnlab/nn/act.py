"""Batch norm fused with the activation that follows it, and optionally a residual add:
``y = act(BN(x) + residual)``.

On CPU float32/float64 in eager mode the activation (and the add) run inside the batch-norm
kernels' passes: the forward still reads ``x`` twice and writes ``y`` once, and the backward forms
``dz = dy * act'(z)`` where it reads ``dy``, so the separate activation passes (and, with a
residual, the add's) disappear, forward and backward. Elsewhere (half precision, CUDA,
``torch.compile``, forward AD, ``torch.func``) the same math runs in that path's ops.

The layers are bnlab batch norms (and so :class:`torch.nn.BatchNorm2d` etc.) with the same
constructor, parameters, buffers and state_dict keys, plus ``act``: a checkpoint of a plain batch
norm loads into them and back. Keep in mind that tools which treat every ``_BatchNorm`` as a plain
batch norm (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, ``torch.ao.quantization``'s fusers)
do not know about the activation; ``bnlab.tools.fold`` does.

``bnlab.convert(model, to="bnlab", fuse_act=True)`` finds BN -> activation and
BN -> add -> activation patterns with ``torch.fx`` and swaps in these layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "from_batchnorm", "ACTIVATIONS"]

ACTIVATIONS = ("relu", "silu", "gelu", None)


def _check_act(act, name: str) -> str:
    if act is None or act == "none":
        return "none"
    if act not in ("relu", "silu", "gelu"):
        raise ValueError(f"{name}: act must be 'relu', 'silu', 'gelu' or None (got {act!r})")
    return act


class _BatchNormAct(_BatchNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, act: str | None = "relu",
                 **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.act = _check_act(act, type(self).__name__)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act!r}"

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """``act(BN(input) + residual)``; ``residual`` (optional) has ``input``'s shape."""
        if residual is not None:
            if not isinstance(residual, Tensor):
                raise TypeError(f"{type(self).__name__}: expected residual to be a Tensor or None "
                                f"(got {type(residual).__name__})")
            if residual.shape != input.shape:
                raise ValueError(f"{type(self).__name__}: expected residual of the input's shape {tuple(input.shape)} "
                                 f"(got {tuple(residual.shape)})")
        return self._forward_any(input, self.act, residual)


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    """:class:`bnlab.nn.BatchNorm1d` followed by ``+ residual`` (optional) and ``act``, fused.

    Args: as :class:`bnlab.nn.BatchNorm1d`, plus ``act`` (keyword): ``"relu"`` (default),
    ``"silu"``, ``"gelu"`` (erf form) or None. ``forward(input, residual=None)``.

    Example:
        >>> import torch, bnlab
        >>> layer = bnlab.nn.BatchNormAct1d(4, act="relu")
        >>> bool((layer(torch.randn(8, 4)) >= 0).all())
        True
    """


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    """:class:`bnlab.nn.BatchNorm2d` followed by ``+ residual`` (optional) and ``act``, fused; see
    :class:`BatchNormAct1d`.

    Example:
        >>> import torch, bnlab
        >>> layer = bnlab.nn.BatchNormAct2d(3, act="silu")
        >>> x, skip = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        >>> layer(x, skip).shape
        torch.Size([2, 3, 4, 4])
    """


class BatchNormAct3d(_BatchNormAct, BatchNorm3d):
    """:class:`bnlab.nn.BatchNorm3d` followed by ``+ residual`` (optional) and ``act``, fused; see
    :class:`BatchNormAct1d`."""


_FOR = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}


def from_batchnorm(bn: torch.nn.modules.batchnorm._BatchNorm, act: str | None = "relu") -> _BatchNormAct:
    """The norm-act layer with ``bn``'s configuration, state and training mode; its weight and bias
    are ``bn``'s own Parameter objects (optimizers holding them stay valid)."""
    dims = {torch.nn.BatchNorm1d: 1, torch.nn.BatchNorm2d: 2, torch.nn.BatchNorm3d: 3}
    kind = next((d for cls, d in dims.items() if isinstance(bn, cls)), None)
    if kind is None:
        raise TypeError(f"from_batchnorm: expected a BatchNorm1d/2d/3d (got {type(bn).__name__})")
    ref = bn.weight if bn.weight is not None else bn.running_mean
    kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = _FOR[kind](bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, act=act,
                     bias=(bn.bias is not None) if bn.affine else True,
                     nonfinite=getattr(bn, "nonfinite", "raise"), **kw)
    new.load_state_dict(bn.state_dict())
    if bn.affine:
        new.weight = bn.weight
        if bn.bias is not None:
            new.bias = bn.bias
    new.train(bn.training)
    return new

