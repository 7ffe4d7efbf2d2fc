"""Fuse batch norm with the activation (and residual add) that follows it: BN -> ReLU becomes one
:class:`bnlab.nn.BatchNormAct2d` (or 1d/3d), BN -> add -> ReLU one layer with a residual input.

The model is traced with ``torch.fx``; a pattern is fused only where it is exactly that
computation:

* a bnlab batch norm (``bnlab.nn.BatchNorm1d/2d/3d``: run :func:`bnlab.convert` first) whose output
  has one user, an activation: ``nn.ReLU`` / ``torch.relu`` / ``F.relu`` / ``x.relu()``, ``nn.SiLU`` /
  ``F.silu``, or ``nn.GELU()`` / ``F.gelu`` in its exact (erf) form;
* or whose one user is an addition ``bn(x) + other`` (``+``, ``torch.add`` without ``alpha``, ``+=``)
  whose own one user is such an activation: the layer takes ``other`` as its residual.

Everything else stays as it was; the layers' parameters (the same Parameter objects), buffers and
modes are kept.
"""

from __future__ import annotations

import operator
import warnings

import torch
from torch import fx, nn

__all__ = ["fuse_activations", "trace"]

_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu"}
_ACT_FUNCTIONS = {torch.relu: "relu", nn.functional.relu: "relu", torch.nn.functional.silu: "silu",
                  nn.functional.gelu: "gelu", torch.relu_: "relu"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_ADDS = {operator.add, operator.iadd, torch.add}


def _act_of(node: fx.Node, modules: dict) -> str | None:
    """The activation ``node`` applies to its first argument, or None."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if type(m) in _ACT_MODULES:
            return _ACT_MODULES[type(m)]
        if type(m) is nn.GELU and m.approximate == "none":
            return "gelu"
        return None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        if node.target is nn.functional.gelu and node.kwargs.get("approximate", "none") != "none":
            return None
        if len(node.args) > 1:  # F.relu(x, inplace) and the like: only the input may be positional
            extra = node.args[1:]
            if node.target in (nn.functional.relu, nn.functional.silu) and len(extra) == 1 and isinstance(extra[0], bool):
                return _ACT_FUNCTIONS[node.target]
            return None
        return _ACT_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1:
        return _ACT_METHODS[node.target]
    return None


def _residual_of(add: fx.Node, bn: fx.Node) -> fx.Node | None:
    """``other`` when ``add`` is ``bn + other`` (either order), else None."""
    if add.op != "call_function" or add.target not in _ADDS or add.kwargs or len(add.args) != 2:
        return None
    a, b = add.args
    if a is bn and isinstance(b, fx.Node) and b is not bn:
        return b
    if b is bn and isinstance(a, fx.Node) and a is not bn:
        return a
    return None


class _Tracer(fx.Tracer):
    """torch.fx's tracer with bnlab's layers (and every batch norm) kept as calls, not traced into.
    bnlab's layers are the classes of :mod:`bnlab.nn`; a model defined elsewhere in bnlab (the
    benchmark's, the audit's) is traced into like any user's."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, nn.modules.batchnorm._NormBase) or type(m).__module__.startswith("bnlab.nn.")
                or super().is_leaf_module(m, qualname))


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with bnlab's layers kept whole (their forward has checks a
    symbolic trace cannot follow)."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return fx.GraphModule(tracer.root, graph, name)


def _set_module(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent, _, leaf = qualname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def fuse_activations(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Fuse every BN -> activation and BN -> add -> activation pattern of ``model`` into bnlab's
    norm-act layers. Returns ``(module, fused)``: a ``torch.fx.GraphModule`` (or ``model`` itself
    when nothing was fused or it cannot be traced, with a warning saying why) and the
    ``(layer name, what it absorbed)`` pairs."""
    from ..nn import act as nact
    from ..nn import batchnorm as bbn

    plain = (bbn.BatchNorm1d, bbn.BatchNorm2d, bbn.BatchNorm3d)
    try:
        gm = trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure: report it and fuse nothing
        warnings.warn(f"bnlab.convert(fuse_act=True): torch.fx cannot trace {type(model).__name__} "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); no activation was fused",
                      stacklevel=3)
        return model, []
    modules = dict(gm.named_modules())
    fused = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) not in plain or len(node.users) != 1:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        user = next(iter(node.users))
        residual, act_node = None, None
        kind = _act_of(user, modules)
        if kind is not None and user.args and user.args[0] is node:
            act_node = user
        else:
            other = _residual_of(user, node)
            if other is not None and len(user.users) == 1:
                nxt = next(iter(user.users))
                kind = _act_of(nxt, modules)
                if kind is not None and nxt.args and nxt.args[0] is user:
                    residual, act_node = other, nxt
        if act_node is None:
            continue
        bn = modules[node.target]
        layer = nact.from_batchnorm(bn, act=kind)
        _set_module(gm, node.target, layer)
        modules[node.target] = layer
        if residual is not None:
            add = next(iter(node.users))
            add.prepend(node)  # after every input of the add: the residual is defined before the layer runs
            node.args = (node.args[0], residual)
            act_node.replace_all_uses_with(node)
            gm.graph.erase_node(act_node)
            gm.graph.erase_node(add)
            fused.append((node.target, f"+ residual, {kind}"))
        else:
            act_node.replace_all_uses_with(node)
            gm.graph.erase_node(act_node)
            fused.append((node.target, kind))
    if not fused:
        return model, []
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.train(model.training)
    return gm, fused
