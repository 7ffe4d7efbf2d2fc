"""Batch-norm training state for whole models: freezing (``freeze``, ``unfreeze``) and
accumulation-aware statistics (``accumulate``).

Freezing is layer state, not a mode. torch's idiom, ``m.eval()`` on every batch norm, is undone by
the next ``model.train()``; a layer frozen here stays frozen through ``model.train()``, shows it in
its repr, and records it in the state_dict, so a model loaded from a frozen checkpoint is frozen.

Which layers: every ``torch.nn.modules.batchnorm._BatchNorm`` (torch's and bnlab's batch norms,
ghost, renorm and sync batch norm, third-party subclasses) and bnlab's masked and sequence batch
norms. How, by kind:

* bnlab's batch norms carry the frozen state themselves (:class:`bnlab.nn.batchnorm._Freezable`):
  a fresh bnlab model loading a frozen state_dict is frozen.
* torch's own ``BatchNorm1d/2d/3d`` (exact classes) are **converted in place** to bnlab's
  (``layer.__class__`` becomes ``bnlab.nn.BatchNorm2d``, a subclass of ``torch.nn.BatchNorm2d``;
  the module object, its Parameters, buffers and hooks are the same objects) and stay bnlab's after
  ``unfreeze``. They then run bnlab's kernels (torch's numbers to float rounding).
* every other class (torch subclasses such as ``torch.nn.SyncBatchNorm`` or timm's norm-act
  layers; bnlab's masked and sequence batch norms) gets a frozen twin class: a subclass that adds
  only the frozen state (its forward is the original class's), under the same name;
  ``unfreeze`` restores the original class. A fresh model of those classes does not know the
  state_dict entry: load with ``strict=False`` and call ``freeze`` again (or call ``freeze``
  before ``load_state_dict``).

The state_dict entry: ``<layer>.bnlab_frozen``, a uint8 tensor ``[stats, affine]``, present only
for frozen layers. torch's batch norms do not know it: a frozen model's state_dict loads into a
torch model with ``strict=False`` (the entries come back in ``unexpected_keys``); a torch
state_dict loads into a frozen model strictly and leaves it frozen.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.batchnorm import _LazyNormBase

from ..nn import batchnorm as bbn
from ..policy import check_accumulate_option

__all__ = ["freeze", "unfreeze", "accumulate"]

_TO_BNLAB = {
    nn.BatchNorm1d: bbn.BatchNorm1d,
    nn.BatchNorm2d: bbn.BatchNorm2d,
    nn.BatchNorm3d: bbn.BatchNorm3d,
}

_TWINS: dict[type, type] = {}


def _bnlab_norms() -> tuple:
    from ..nn.masked import MaskedBatchNorm1d, SequenceBatchNorm

    return (MaskedBatchNorm1d, SequenceBatchNorm)


def _norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = (_TorchBatchNorm,) + _bnlab_norms()
    return [(where, m) for where, m in model.named_modules() if isinstance(m, kinds)]


def _rebuild_twin(base: type) -> nn.Module:
    """Unpickling a frozen twin: an empty instance of the twin of ``base`` (pickle then restores
    its ``__dict__``)."""
    obj = base.__new__(base)
    obj.__class__ = _twin_class(base)
    return obj


def _twin_reduce_ex(self, protocol):
    # pickled by the original class (importable), rebuilt as its twin: torch.save(model) and
    # copy.deepcopy work on frozen models
    return (_rebuild_twin, (self._bnlab_twin_of,), self.__getstate__())


def _twin_class(cls: type) -> type:
    """The frozen twin of ``cls``: ``cls`` plus :class:`bnlab.nn.batchnorm._Freezable`, same name."""
    twin = _TWINS.get(cls)
    if twin is None:
        twin = type(cls.__name__, (bbn._Freezable, cls), {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "__reduce_ex__": _twin_reduce_ex,
            "_bnlab_twin_of": cls,
        })
        _TWINS[cls] = twin
    return twin


def _label(where: str, m: nn.Module) -> str:
    return f"{where or '<model>'} ({type(m).__name__})"


def _uninitialized(m: nn.Module) -> bool:
    return isinstance(m, _LazyNormBase) and m.has_uninitialized_params()


def freeze(model: nn.Module, stats: bool = True, affine: bool = False) -> nn.Module:
    """Freeze the batch-norm layers of ``model`` (in place; returns ``model``).

    Args:
        model: any module (a batch-norm layer itself included).
        stats: freeze the running statistics (default True): the layers normalize with their
            running statistics and never update them, whatever ``model.train()`` says (they stay
            in eval mode; ``train()`` calls are remembered for :func:`unfreeze`). Gradients still
            flow to the input, weight and bias.
        affine: also freeze weight and bias (``requires_grad=False``; default False).

    The frozen state shows in the layer's repr (``frozen=stats``) and is saved in the state_dict
    (``<layer>.bnlab_frozen``). See the module docstring for how torch's classes are handled and
    how a frozen state_dict loads into bnlab and torch models. Freezing adds to what is frozen
    (``freeze(m, affine=True)`` after ``freeze(m)`` freezes both); :func:`unfreeze` clears all.

    Raises ValueError, before any layer changes, for a layer whose statistics cannot be frozen:
    no running statistics (``track_running_stats=False``: freeze with ``stats=False`` to freeze
    only weight and bias) or an uninitialized lazy layer (run one forward first).

    Example:
        >>> import torch, bnlab
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), bnlab.nn.BatchNorm1d(8))
        >>> _ = bnlab.tools.freeze(net)
        >>> _ = net.train()
        >>> net[1].training, net[1]
        (False, BatchNorm1d(8, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, frozen=stats))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze: expected a torch.nn.Module (got {type(model).__name__})")
    if not (stats or affine):
        raise ValueError("freeze: nothing to freeze (stats=False, affine=False); pass stats=True and/or affine=True")
    layers = _norm_layers(model)
    problems = []
    for where, m in layers:
        if _uninitialized(m):
            problems.append(f"{_label(where, m)}: an uninitialized lazy layer; run one forward first")
        elif stats and (getattr(m, "running_mean", None) is None or getattr(m, "running_var", None) is None):
            problems.append(f"{_label(where, m)}: no running statistics to normalize with (track_running_stats="
                            f"{getattr(m, 'track_running_stats', None)}); freeze(..., stats=False, affine=True) "
                            "freezes only weight and bias")
    if problems:
        raise ValueError(f"freeze: cannot freeze the statistics of {len(problems)} layer(s), nothing was changed: "
                         + "; ".join(problems))
    for _, m in layers:
        if not isinstance(m, bbn._Freezable):
            cls = type(m)
            m.__class__ = _TO_BNLAB[cls] if cls in _TO_BNLAB else _twin_class(cls)
        m._bnlab_set_frozen(stats or m.frozen_stats, affine or m.frozen_affine)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze` on every layer of ``model`` (in place; returns ``model``).

    Frozen statistics: the layer returns to the training mode last asked for (``model.train()``
    / ``model.eval()`` while frozen, or the mode it had when frozen) and updates its running
    statistics in training again. Frozen affine: weight and bias get ``requires_grad=True``.
    Twin classes return to their original class; torch layers converted to bnlab's stay bnlab's.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfreeze: expected a torch.nn.Module (got {type(model).__name__})")
    for _, m in _norm_layers(model):
        if isinstance(m, bbn._Freezable):
            m._bnlab_set_frozen(False, False)
        base = type(m).__dict__.get("_bnlab_twin_of")
        if base is not None:
            m.__class__ = base
    return model


def _tracks(m: nn.Module) -> bool:
    return getattr(m, "running_mean", None) is not None or getattr(m, "running_var", None) is not None


def _accumulate_plan(model: nn.Module) -> list[tuple[nn.Module, type | None]]:
    """The layers :func:`accumulate` switches, each with the torch class it converts from (or None),
    or a ValueError naming the layers it cannot serve."""
    plan, problems = [], []
    for where, m in _norm_layers(model):
        if getattr(m, "frozen_stats", False) or not (_tracks(m) or _uninitialized(m)):
            continue  # frozen, or no running statistics: nothing to accumulate
        cls = type(m)
        if isinstance(m, bbn._BatchNorm) and cls.forward is bbn._BatchNorm.forward:
            plan.append((m, None))
        elif cls in _TO_BNLAB:
            plan.append((m, cls))
        elif _uninitialized(m):
            problems.append(f"{_label(where, m)}: an uninitialized lazy torch layer; run one forward first")
        else:
            problems.append(f"{_label(where, m)}: its forward has no accumulation (bnlab.nn.BatchNorm1d/2d/3d and "
                            "torch.nn.BatchNorm1d/2d/3d have it)")
    if problems:
        raise ValueError(f"accumulate: {len(problems)} batch-norm layer(s) cannot accumulate statistics, nothing was "
                         "changed: " + "; ".join(problems))
    return plan


@contextlib.contextmanager
def accumulate(model: nn.Module, k: int) -> Iterator[nn.Module]:
    """Accumulation-aware batch-norm statistics for a whole model, for the duration of a ``with``.

    Inside, every batch-norm layer updates its running statistics once per ``k`` training
    micro-batches, with the pooled statistics of the k (``accumulate=k`` of
    :class:`bnlab.nn.BatchNorm2d`): with gradient accumulation over k micro-batches of size b the
    running statistics, and ``num_batches_tracked``, end as one batch of k * b would leave them.
    Each micro-batch still normalizes with its own statistics.

    Layers: bnlab's ``BatchNorm1d/2d/3d`` (and their lazy forms) have the option; torch's own
    ``BatchNorm1d/2d/3d`` run as bnlab's inside the block (converted in place, converted back at
    exit). Frozen layers and layers without running statistics are left alone (they update
    nothing). Any other batch-norm layer (ghost, renorm, sync, masked, sequence batch norm, torch
    subclasses) raises ValueError before anything changes.

    At exit each layer's ``accumulate`` is restored. Pending micro-batches (a last window shorter
    than k): on a normal exit they are written as one update with their pooled statistics; when
    the block raises they are discarded. A layer's own pending window at entry is written first.

    Example:
        >>> import torch, bnlab
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> with bnlab.tools.accumulate(net, 4):
        ...     for x in torch.randn(4, 8, 3):        # 4 micro-batches of 8
        ...         net(x).sum().backward()
        >>> int(net[1].num_batches_tracked)            # one update, as one batch of 32
        1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accumulate: expected a torch.nn.Module (got {type(model).__name__})")
    k = check_accumulate_option(k, "accumulate")
    plan = _accumulate_plan(model)
    for m, torch_cls in plan:
        if torch_cls is None:
            m.flush_accumulated()  # a window of the layer's own accumulate setting
    saved = []
    for m, torch_cls in plan:
        if torch_cls is not None:
            m.__class__ = _TO_BNLAB[torch_cls]
        saved.append((m, torch_cls, m.__dict__.get("accumulate")))
        m.accumulate = k
    ok = False
    try:
        yield model
        ok = True
    finally:
        error = None
        for m, torch_cls, before in saved:
            try:
                m.flush_accumulated(discard=not ok)
            except Exception as e:  # the last window refused by the layer's policy: restore the rest first
                error = error or e
            if before is None:
                m.__dict__.pop("accumulate", None)
            else:
                m.accumulate = before
            if torch_cls is not None:
                m.__dict__.pop("_pending", None)
                m.__class__ = torch_cls
        if error is not None and ok:
            raise error
