"""Swap every batch-norm layer of a model between torch.nn and bnlab.nn, keeping its state."""

from __future__ import annotations

import warnings

from torch import nn

from ..nn import _compat
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
    bias = (m.bias is not None) if m.affine else True
    # bnlab's layers take bias= on any torch; torch's own only where that torch has the keyword
    kw.update({"bias": bias} if issubclass(cls, bbn._BatchNorm) else _compat.bias_kw(bias, f"convert to {cls.__name__}"))
    new = cls(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
              track_running_stats=m.track_running_stats, **kw)
    new.load_state_dict(m.state_dict())
    if m.affine:  # keep the Parameter objects so optimizers that hold them stay valid
        new.weight = m.weight
        if m.bias is not None:
            new.bias = m.bias
    new.train(m.training)
    return new


def _frozen(m: nn.Module) -> bool:
    return bool(getattr(m, "frozen_stats", False) or getattr(m, "frozen_affine", False))


def _left_alone(m: nn.Module, to: str) -> str | None:
    """Why ``convert`` leaves this batch-norm-like layer alone, or None when it is not one."""
    name = type(m).__name__
    if to == "bnlab":
        if isinstance(m, bbn._BatchNorm) or isinstance(m, _bnlab_norms()):
            return None  # already bnlab's
        if isinstance(m, nn.modules.batchnorm._LazyNormBase) and m.has_uninitialized_params():
            return f"an uninitialized lazy layer ({name}): run one forward first, then convert"
        if isinstance(m, nn.SyncBatchNorm):
            return ("torch's SyncBatchNorm: kept as it is (bnlab.nn.SyncBatchNorm.convert_sync_batchnorm converts "
                    "it to bnlab's)")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return (f"{name} subclasses torch's batch norm ({type(m).__module__}); converting it would drop what the "
                    "subclass adds, so it is kept as it is")
        return None
    if _frozen(m):
        return (f"{name} is frozen (bnlab.tools.freeze), a state torch's class cannot hold; "
                "bnlab.tools.unfreeze it first")
    if isinstance(m, bbn._BatchNorm) or isinstance(m, _bnlab_norms()):
        if isinstance(m, nn.modules.batchnorm._LazyNormBase) and m.has_uninitialized_params():
            return f"an uninitialized lazy layer ({name}): run one forward first, then convert"
        return f"{name} has no torch.nn equivalent; kept as bnlab's"
    return None


def _bnlab_norms() -> tuple:
    from ..nn.masked import MaskedBatchNorm1d, SequenceBatchNorm

    return (MaskedBatchNorm1d, SequenceBatchNorm)


def convert(model: nn.Module, to: str = "bnlab", *, warn: bool = True, fuse_act: bool = False) -> nn.Module:
    """Replace, in place, every batch-norm layer of ``model`` by the other library's equivalent.

    Args:
        model: any module (a batch-norm layer itself is returned converted).
        to: ``"bnlab"`` (torch.nn.BatchNorm* -> bnlab.nn.BatchNorm*) or ``"torch"`` (the reverse).
        warn: keyword; warn (one ``UserWarning`` listing them) about the batch-norm layers left
            alone, and why (default True). :func:`convert_report` returns the same list.
        fuse_act: keyword, ``to="bnlab"`` only; also fuse each batch norm with the activation
            that follows it (ReLU, SiLU, exact GELU), and with a residual add between them, into
            :class:`bnlab.nn.BatchNormAct2d` (1d/3d) layers, found by tracing the model with
            ``torch.fx`` (:func:`bnlab.tools.fuse.fuse_activations`). The result is then a
            ``torch.fx.GraphModule`` computing the same function (default False).

    Parameters (the same Parameter objects), buffers, training mode, device and dtype are kept.
    Only the exact classes ``torch.nn.BatchNorm1d/2d/3d`` and ``bnlab.nn.BatchNorm1d/2d/3d`` are
    swapped. Left alone, and reported: subclasses of torch's batch norm (timm's norm-act layers,
    ``SyncBatchNorm``: converting would drop what they add), lazy layers not yet initialized, and
    (``to="torch"``) bnlab layers with no torch equivalent (ghost, masked, sequence batch norm).

    Example:
        >>> import torch, bnlab
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> net = bnlab.convert(net, to="bnlab")
        >>> type(net[1]).__module__
        'bnlab.nn.batchnorm'
    """
    if fuse_act and to != "bnlab":
        raise ValueError(f"convert: fuse_act=True fuses into bnlab's norm-act layers, so it needs to='bnlab' (got to={to!r})")
    model, skipped = _convert(model, to)
    if fuse_act:
        from .fuse import fuse_activations

        model, _ = fuse_activations(model)
    if warn and skipped:
        lines = "; ".join(f"{where or '<model>'}: {why}" for where, why in skipped)
        warnings.warn(f"bnlab.convert(to={to!r}) left {len(skipped)} batch-norm layer(s) alone: {lines}", stacklevel=2)
    return model


def convert_report(model: nn.Module, to: str = "bnlab") -> list[tuple[str, str]]:
    """The ``(qualified name, reason)`` of every batch-norm layer :func:`convert` would leave alone."""
    if to not in ("bnlab", "torch"):
        raise ValueError(f"convert: to must be 'bnlab' or 'torch' (got {to!r})")
    out = []
    for where, m in model.named_modules():
        table = _TO_BNLAB if to == "bnlab" else _TO_TORCH
        if type(m) in table and not _frozen(m):
            continue
        why = _left_alone(m, to)
        if why is not None:
            out.append((where, why))
    return out


def _convert(model: nn.Module, to: str) -> tuple[nn.Module, list[tuple[str, str]]]:
    skipped = convert_report(model, to)  # validates ``to``
    table = _TO_BNLAB if to == "bnlab" else _TO_TORCH
    if type(model) in table and not skipped:
        return _swap(model, table[type(model)]), skipped
    _convert_children(model, table)
    return model, skipped


def _convert_children(model: nn.Module, table: dict) -> None:
    for name, child in list(model.named_children()):
        if type(child) in table and not _frozen(child):
            setattr(model, name, _swap(child, table[type(child)]))
        else:
            _convert_children(child, table)
