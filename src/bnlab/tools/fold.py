"""Fold eval-mode batch norms into the convolution or linear layer that feeds them.

In eval a batch norm is the per-channel affine map ``y = z * s + t`` with
``s = weight / sqrt(running_var + eps)`` and ``t = bias - running_mean * s``. When ``z`` is the
output of a convolution or linear layer ``z = W x + b`` and nothing else reads ``z``, the pair is
one layer: ``W' = s * W`` (scaled per output channel) and ``b' = s * b + t``. :func:`fold` finds
those pairs in the model's graph (torch.fx, so residual blocks and any traceable forward, not only
``nn.Sequential``), rewrites the producers' weights and removes the batch norms.

Decisions, written down here:

* **Only eval-mode batch norms fold.** A layer in training mode normalizes with batch statistics, so
  folding it (with its running statistics) would change the model's output: it is reported, not
  folded. Call ``model.eval()`` first. Layers without running statistics (``track_running_stats=False``)
  use batch statistics in eval too, and are reported. Frozen batch norms
  (:class:`bnlab.nn.FrozenBatchNorm2d`) fold in any mode.
* **Exact pairs only.** The producer must be a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or
  ``Linear`` module whose output feeds nothing but the batch norm; each is called once in the
  forward; neither has forward hooks; the producer's weight is a plain parameter (not parametrized,
  not shared with another module, not read elsewhere in the forward) and its output channels are the
  batch norm's. Groups, dilation, padding modes, ``bias=False`` (a bias is created), transposed
  convolutions (scaled along their output-channel axis, group by group) and channels_last weights are
  handled. New weights are computed in float64 and stored in the producer's dtype.
* **Batch dimension.** A batch norm normalizes dim 1; a linear layer's features are its last dim,
  so ``Linear -> BatchNorm1d`` folds exactly only on ``(N, C)`` input (and ``Conv1d -> BatchNorm1d``
  only on batched ``(N, C, L)`` input). Where the batch norm would also accept another rank, the
  folded producer gets a guard in the graph (``torch._assert`` on its input's rank; no cost at run
  time or in exports), so an input of another rank raises instead of giving a wrong answer. With
  ``example_inputs``, pairs whose shapes do not fit are reported, not folded.
* **What comes back.** A ``torch.fx.GraphModule`` (for every model, ``nn.Sequential`` included): the
  traced forward with the folded producers and without the folded batch norms; everything else is
  untouched. ``inplace=False`` (the default) works on a deep copy. ``inplace=True`` folds into the
  model's own layers, and replaces each folded batch norm in the model by ``nn.Identity``, so the
  model and the returned module both compute the folded network (no copy is made).
* **Models torch.fx cannot trace** (data-dependent control flow) raise :class:`UntraceableModelError`
  naming the module and torch.fx's reason. With ``untraceable="children"`` fold instead traces, one
  level down at a time, every submodule that holds a batch norm and folds each one it can trace; the
  model keeps its type with those submodules replaced by their folded GraphModules. This trusts the
  untraceable code not to call a folded layer outside its submodule's forward (fold cannot see it).
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from ..nn.frozen import _FrozenBatchNorm

__all__ = ["fold", "FoldEntry", "FoldReport", "UntraceableModelError"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PRODUCERS = _CONV + _CONV_T + (nn.Linear,)


class UntraceableModelError(RuntimeError):
    """torch.fx cannot trace the model (or one of its submodules) that :func:`fold` was given."""


@dataclass(frozen=True)
class FoldEntry:
    """One batch-norm layer: the layer that feeds it (``None`` when no module does), whether it was
    folded, and why not (or what guards the fold)."""

    producer: str | None
    bn: str
    folded: bool
    reason: str

    def __str__(self) -> str:
        pair = f"{self.producer or '?'} -> {self.bn}"
        return f"{'folded' if self.folded else 'not folded':<10}  {pair}: {self.reason}"


class FoldReport(list):
    """A list of :class:`FoldEntry`, one per batch-norm layer of the model, in graph order."""

    @property
    def folded(self) -> list[FoldEntry]:
        return [e for e in self if e.folded]

    @property
    def not_folded(self) -> list[FoldEntry]:
        return [e for e in self if not e.folded]

    def __str__(self) -> str:
        head = f"fold: {len(self.folded)} of {len(self)} batch-norm layer(s) folded"
        return "\n".join([head] + [f"  {e}" for e in self])


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with every batch norm and every bnlab module as a leaf (their forwards run
    bnlab's kernels and loops, which are not traced)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (_TorchBatchNorm, _FrozenBatchNorm)) or type(m).__module__.startswith("bnlab."):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, (_TorchBatchNorm, _FrozenBatchNorm))


def _trace(module: nn.Module) -> torch.fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(module)
    name = module.__class__.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def fold(model: nn.Module, *, inplace: bool = False, example_inputs=None,
         untraceable: str = "raise") -> tuple[nn.Module, FoldReport]:
    """Fold every eval-mode batch norm into the conv / linear layer feeding it, where that is exact.

    Args:
        model: the model, in eval mode (batch norms in training mode are reported, not folded).
        inplace: keyword; fold into the model's own layers, replacing each folded batch norm in it by
            ``nn.Identity`` (default False: work on a deep copy, the model is left as it is).
        example_inputs: keyword; a tensor or a tuple of the forward's positional inputs. When given,
            the shapes they produce are checked (e.g. ``Linear -> BatchNorm1d`` folds only on 2D
            input) and pairs that do not fit are reported instead of folded (default None: every
            fold carries a rank guard instead, see the module docstring).
        untraceable: keyword; ``"raise"`` (default): a model torch.fx cannot trace raises
            :class:`UntraceableModelError`; ``"children"``: fold, submodule by submodule, the parts
            torch.fx can trace.

    Returns:
        ``(folded_model, report)``: a ``torch.fx.GraphModule`` (with ``untraceable="children"`` on
        an untraceable model: the model's own type with folded submodules) and a :class:`FoldReport`
        with one :class:`FoldEntry` (producer, bn, folded, reason) per batch-norm layer.

    Example:
        >>> import torch, bnlab
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
        >>> folded, report = bnlab.tools.fold(net)
        >>> print(report)
        fold: 1 of 1 batch-norm layer(s) folded
          folded      0 -> 1: folded
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(folded(x), net(x), atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: expected an nn.Module, got {type(model).__name__}")
    if untraceable not in ("raise", "children"):
        raise ValueError(f"fold: untraceable must be 'raise' or 'children' (got {untraceable!r})")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    original = model
    if not inplace:
        model = copy.deepcopy(model)
    report = FoldReport()
    folded = _fold_module(model, "", example_inputs, untraceable, report)
    if inplace:
        _identity_in_place(original, {e.bn for e in report if e.folded})
    return folded, report


def _fold_module(module: nn.Module, prefix: str, example_inputs, untraceable: str, report: FoldReport) -> nn.Module:
    try:
        gm = _trace(module)
    except Exception as e:  # torch.fx raises TraceError, TypeError, NotImplementedError, ...
        where = repr(prefix) if prefix else "the model"
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if untraceable == "raise":
            raise UntraceableModelError(
                f"fold: torch.fx cannot trace {where} ({type(module).__name__}): {reason}. fold needs the forward's "
                "graph to know that a layer's output feeds only its batch norm. Make that forward traceable "
                "(torch.fx.wrap, concrete_args), or pass untraceable='children' to fold every submodule that "
                "torch.fx can trace.") from e
        for name, child in list(module.named_children()):
            cname = _join(prefix, name)
            if _is_bn(child):
                report.append(FoldEntry(None, cname, False,
                                        f"called from the forward of {where}, which torch.fx cannot trace ({reason})"))
            elif any(_is_bn(m) for m in child.modules()):
                new = _fold_module(child, cname, None, untraceable, report)
                if new is not child:
                    setattr(module, name, new)
        return module
    _fold_graph(gm, module, prefix, example_inputs, report)
    return gm


def _identity_in_place(model: nn.Module, folded_names: set[str]) -> None:
    """Replace, in the user's model, every folded batch norm (under each name it is registered by)."""
    targets = {id(m) for name, m in model.named_modules() if name in folded_names}
    for _, parent in model.named_modules(remove_duplicate=False):
        for cname, child in list(parent.named_children()):
            if id(child) in targets:
                setattr(parent, cname, nn.Identity())


def _describe(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return repr(node.target)
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    if node.op == "output":
        return "the model output"
    return f"{node.op} {node.name!r}"


def _batched_rank(producer: nn.Module) -> int:
    if isinstance(producer, nn.Linear):
        return 2
    return producer.weight.dim()  # conv weights: (out, in/g, *k) / (in, out/g, *k) -> k + 2


def _out_channels(producer: nn.Module) -> int:
    if isinstance(producer, nn.Linear):
        return producer.out_features
    return producer.out_channels


def _bn_dims(bn: nn.Module) -> tuple[int, ...] | None:
    """The input ranks a batch norm accepts, when fixed by its class."""
    if isinstance(bn, (nn.BatchNorm1d, nn.LazyBatchNorm1d)):
        return (2, 3)
    if isinstance(bn, (nn.BatchNorm2d, nn.LazyBatchNorm2d)):
        return (4,)
    if isinstance(bn, (nn.BatchNorm3d, nn.LazyBatchNorm3d)):
        return (5,)
    if isinstance(bn, _FrozenBatchNorm):
        return bn._dims
    return None


def _why_not(gm, node, bn, bn_name, prefix, calls, attr_refs, owners, shapes) -> tuple[str | None, str | None]:
    """``(producer name, reason it cannot fold)``; reason None when the pair folds."""
    modules = dict(gm.named_modules())
    src = node.args[0] if node.args else None
    known = isinstance(src, torch.fx.Node) and src.op == "call_module"
    pname = _join(prefix, src.target) if known else None
    if isinstance(bn, _TorchBatchNorm):
        if bn.training:
            return pname, ("in training mode: its output uses batch statistics, so folding would change the model; "
                          "call model.eval() first")
        if bn.running_mean is None or bn.running_var is None:
            return pname, "no running statistics (track_running_stats=False): it uses batch statistics in eval too"
    if calls[node.target] > 1:
        return pname, f"called {calls[node.target]} times in the forward (one set of statistics, several inputs)"
    if bn._forward_hooks or bn._forward_pre_hooks:
        return pname, "has forward hooks, which would no longer run"
    if _refs(attr_refs, node.target):
        return pname, "its parameters or buffers are also read elsewhere in the forward"
    residual_ok = len(node.args) == 2 and getattr(bn, "act", None) is not None  # a norm-act layer's residual
    if (len(node.args) != 1 and not residual_ok) or node.kwargs:
        return pname, "called with more than one input"
    if not known:
        return None, f"its input is {_describe(src) if isinstance(src, torch.fx.Node) else repr(src)}, not a layer's output"
    prod = modules[src.target]
    if not isinstance(prod, _PRODUCERS):
        return pname, f"fed by {type(prod).__name__}, which does not fold (Conv, ConvTranspose and Linear do)"
    if isinstance(prod, nn.modules.lazy.LazyModuleMixin) and prod.has_uninitialized_params():
        return pname, f"the producer is an uninitialized lazy layer ({type(prod).__name__}): run one forward first"
    if torch.nn.utils.parametrize.is_parametrized(prod):
        return pname, "the producer's weight is parametrized (weight or spectral norm): fold would be undone"
    if not prod.weight.is_floating_point():
        return pname, f"the producer's weight is {prod.weight.dtype}, not a floating-point tensor"
    if _out_channels(prod) != bn.num_features:
        return pname, f"the producer gives {_out_channels(prod)} channels, the batch norm takes {bn.num_features}"
    rank = _batched_rank(prod)
    dims = _bn_dims(bn)
    if dims is not None and rank not in dims:
        return pname, (f"{type(prod).__name__} gives {rank}D batched output, {type(bn).__name__} takes "
                       f"{'/'.join(map(str, dims))}D input")
    if calls[src.target] > 1:
        return pname, f"the producer is called {calls[src.target]} times in the forward"
    if len(src.users) > 1:
        others = ", ".join(_describe(u) for u in src.users if u is not node)
        return pname, f"the producer's output also feeds {others}"
    if prod._forward_hooks or prod._forward_pre_hooks:
        return pname, "the producer has forward hooks, which would see folded outputs"
    if _refs(attr_refs, src.target):
        return pname, "the producer's parameters are also read elsewhere in the forward"
    for pn in ("weight", "bias"):
        p = getattr(prod, pn)
        if p is not None and len(owners.get(id(p), ())) > 1:
            return pname, f"the producer's {pn} is shared with {sorted(set(owners[id(p)]) - {src.target})}"
    if shapes is not None:
        out = shapes.get(src.name)
        if out is not None and len(out) != rank:
            return pname, (f"on the example input the producer's output is {len(out)}D {tuple(out)}: the batch norm "
                           f"normalizes dim 1, not the {type(prod).__name__}'s channels; folding would change the model")
    return pname, None


def _refs(attr_refs: list[str], path: str) -> bool:
    return any(t == path or t.startswith(path + ".") for t in attr_refs)


_ACT_FN = {"relu": torch.relu, "silu": nn.functional.silu, "gelu": nn.functional.gelu}


def _fold_graph(gm: torch.fx.GraphModule, root: nn.Module, prefix: str, example_inputs, report: FoldReport) -> None:
    graph = gm.graph
    modules = dict(gm.named_modules())
    nodes = list(graph.nodes)
    calls = Counter(n.target for n in nodes if n.op == "call_module")
    attr_refs = [n.target for n in nodes if n.op == "get_attr"]
    owners: dict[int, list[str]] = {}
    for mname, m in gm.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mname)
    shapes = _shapes(gm, example_inputs) if example_inputs is not None else None

    seen = set()
    to_delete = []
    for node in nodes:
        if node.op != "call_module" or not _is_bn(modules[node.target]):
            continue
        bn = modules[node.target]
        bn_name = _join(prefix, node.target)
        if node.target in seen:
            continue
        seen.add(node.target)
        pname, why = _why_not(gm, node, bn, bn_name, prefix, calls, attr_refs, owners, shapes)
        if why is not None:
            report.append(FoldEntry(pname, bn_name, False, why))
            continue
        src = node.args[0]
        prod = modules[src.target]
        _fold_into(prod, bn)
        rank = _batched_rank(prod)
        dims = _bn_dims(bn)
        how = "folded"
        if dims is None or set(dims) - {rank}:  # the batch norm would also take another rank: guard it
            _insert_guard(graph, src, rank, pname, bn_name)
            how = f"folded (guard: {rank}D input only)"
        # bnlab's norm-act layers: the residual add and the activation stay, as functions
        act = getattr(bn, "act", "none")
        out = src
        with graph.inserting_before(node):
            if len(node.args) == 2:
                out = graph.call_function(operator.add, (out, node.args[1]))
                how += ", residual add kept"
            if act != "none":
                out = graph.call_function(_ACT_FN[act], (out,))
                how += f", {act} kept"
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        to_delete.append(node.target)
        report.append(FoldEntry(pname, bn_name, True, how))
    for target in to_delete:
        gm.delete_submodule(target)
    graph.lint()
    gm.recompile()
    # batch norms the traced forward does not call itself: inside a layer called as a whole, or unused
    called = {n.target for n in nodes if n.op == "call_module"}
    root_modules = dict(root.named_modules())
    for mname, m in root_modules.items():
        if not mname or not _is_bn(m) or mname in called:
            continue
        outer = next((c for c in called if mname.startswith(c + ".")), None)
        if outer is not None:
            why = f"inside {outer!r} ({type(root_modules[outer]).__name__}), a layer fold does not enter"
        else:
            why = "not called in the traced forward"
        report.append(FoldEntry(None, _join(prefix, mname), False, why))


def _insert_guard(graph: torch.fx.Graph, src: torch.fx.Node, rank: int, pname: str, bn_name: str) -> None:
    x = src.args[0] if src.args else None
    if not isinstance(x, torch.fx.Node):
        return
    msg = (f"bnlab.tools.fold: {pname!r} was folded with batch norm {bn_name!r}, exact only on {rank}D input "
           f"(where the batch norm's dim 1 is the layer's channels); this input has another rank: fold with "
           f"example_inputs of this shape, which leaves the pair unfolded")
    with graph.inserting_before(src):
        dim = graph.call_method("dim", (x,))
        ok = graph.call_function(operator.eq, (dim, rank))
        graph.call_function(torch._assert, (ok, msg))


def _shapes(gm: torch.fx.GraphModule, example_inputs: tuple) -> dict[str, tuple]:
    """Each node's output shape on the example inputs (training-mode batch norms' buffers restored)."""
    from torch.fx.passes.shape_prop import ShapeProp

    saved = {name: t.clone() for name, t in gm.named_buffers()}
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        with torch.no_grad():
            for name, t in gm.named_buffers():
                t.copy_(saved[name])
    out = {}
    for n in gm.graph.nodes:
        meta = n.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            out[n.name] = tuple(meta.shape)
    return out


def _fold_into(prod: nn.Module, bn: nn.Module) -> None:
    """Rewrite ``prod``'s weight and bias so that ``prod(x) == bn(prod_old(x))`` (bn in eval)."""
    with torch.no_grad():
        w, b, rm, rv = bn.weight, bn.bias, bn.running_mean, bn.running_var  # frozen layers: buffers
        rm = rm.to(torch.float64)
        scale = torch.rsqrt(rv.to(torch.float64) + bn.eps)
        if w is not None:
            scale = scale * w.to(torch.float64)
        shift = -rm * scale
        if b is not None:
            shift = shift + b.to(torch.float64)
        weight = prod.weight
        W = weight.to(torch.float64)
        scale = scale.to(W.device)
        shift = shift.to(W.device)
        if isinstance(prod, _CONV_T):
            g = prod.groups
            k = W.shape[2:]
            Wg = W.reshape(g, W.shape[0] // g, W.shape[1], *k)
            Wn = (Wg * scale.reshape(g, 1, W.shape[1], *([1] * len(k)))).reshape(W.shape)
        else:
            Wn = W * scale.reshape(-1, *([1] * (W.dim() - 1)))
        old_bias = prod.bias.to(torch.float64) if prod.bias is not None else torch.zeros_like(shift)
        new_bias = old_bias * scale + shift
        weight.copy_(Wn)
        if prod.bias is None:
            prod.bias = nn.Parameter(new_bias.to(device=weight.device, dtype=weight.dtype),
                                     requires_grad=weight.requires_grad)
        else:
            prod.bias.copy_(new_bias)
