"""Swap every batch-norm layer of a model between torch.nn and bnlab.nn, keeping its state."""

from __future__ import annotations

import torch
from torch import nn

from ..nn import batchnorm as bbn

_TO_BNLAB = {
    nn.BatchNorm1d: bbn.BatchNorm1d,
    nn.BatchNorm2d: bbn.BatchNorm2d,
    nn.BatchNorm3d: bbn.BatchNorm3d,
}
_TO_TORCH = {v: k for k, v in _TO_BNLAB.items()}


def _swap(m: nn.Module, cls: type) -> nn.Module:
    ref = m.weight if m.weight is not None else m.running_mean
    kw = {}
    if ref is not None:
        kw = {"device": ref.device, "dtype": ref.dtype}
    new = cls(
        m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
        track_running_stats=m.track_running_stats, bias=(m.bias is not None) if m.affine else True, **kw,
    )
    new.load_state_dict(m.state_dict())
    if m.affine:  # keep the Parameter objects so optimizers that hold them stay valid
        new.weight = m.weight
        if m.bias is not None:
            new.bias = m.bias
    new.train(m.training)
    return new


def convert(model: nn.Module, to: str = "bnlab") -> nn.Module:
    """Replace, in place, every batch-norm layer of ``model`` by the other library's equivalent.

    Args:
        model: any module (a batch-norm layer itself is returned converted).
        to: ``"bnlab"`` (torch.nn.BatchNorm* -> bnlab.nn.BatchNorm*) or ``"torch"`` (the reverse).

    Parameters (the same Parameter objects), buffers, training mode, device and dtype are kept.
    Lazy layers that are not yet initialized are left alone.

    Example:
        >>> import torch, bnlab
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> net = bnlab.convert(net, to="bnlab")
        >>> type(net[1]).__module__
        'bnlab.nn.batchnorm'
    """
    if to not in ("bnlab", "torch"):
        raise ValueError(f"convert: to must be 'bnlab' or 'torch' (got {to!r})")
    table = _TO_BNLAB if to == "bnlab" else _TO_TORCH
    if type(model) in table:
        return _swap(model, table[type(model)])
    for name, child in list(model.named_children()):
        if type(child) in table:
            setattr(model, name, _swap(child, table[type(child)]))
        else:
            convert(child, to)
    return model
