"""Find batch-norm pitfalls in a model: ``bnlab.tools.doctor(model, example_input)`` and ``bnlab doctor``.

The doctor runs the model on a deep copy (the model given is never changed, nor the global random
state) and reports each pitfall with the qualified name of the module where it sits. Batch norms are
the ``torch.nn.modules.batchnorm._BatchNorm`` layers (torch's and bnlab's, ghost and sync batch
norm). What it checks (the ``check`` names of :class:`Finding`):

``bias-before-bn``
    A Conv/ConvTranspose/Linear layer with a bias whose output feeds only a batch norm that trains:
    the batch norm subtracts the batch mean, so the bias has no effect and zero gradient (wasted
    parameters; use ``bias=False``; the batch norm's own ``bias`` is the shift).
``dropout-before-bn``
    Dropout whose output reaches a batch norm directly or through linear layers only (conv, linear,
    pooling, reshapes). Dropout changes the variance of what the batch norm sees between training and
    eval, so the running variance does not fit eval inputs: the variance shift of Li et al. 2019
    ("Understanding the disharmony between dropout and batch normalization", arXiv 1801.05134). Put
    dropout after the last batch norm.
``small-batch-statistics``
    A batch norm whose training statistics come from few values per channel: fewer than
    ``min_values`` (batch size x spatial positions, default 32), or from a batch of fewer than
    ``min_batch`` samples (default 8), where many spatial positions of a few samples are correlated
    and do not make the estimate good (Wu & He 2018, arXiv 1803.08494). The finding says which.
    Ghost batch norms count their ghost batch. The example input's batch size is taken as the
    training batch size. Not checked at inference (eval uses running statistics).
``train-mode-at-inference``
    At inference (see ``mode``), a batch norm left in training mode: its outputs depend on the rest
    of the batch, a batch of one fails, and every forward overwrites its running statistics.
``no-running-statistics``
    At inference, a batch norm with ``track_running_stats=False`` (batch statistics in eval too) or
    whose running statistics were never updated (``num_batches_tracked == 0``, mean 0 and variance 1).
``shared-bn``
    One batch-norm module called at several sites in one forward (e.g. every time step of a recurrent
    loop): its running statistics average inputs with different distributions, so eval fits none of
    them (Cooijmans et al. 2016 keep statistics per time step: ``bnlab.nn.SequenceBatchNorm``).
``keras-momentum``
    ``momentum >= 0.9`` on a layer with torch's convention (``running = (1 - momentum) * running +
    momentum * batch``): Keras' and Flax's ``momentum=0.99`` is ``momentum=0.01`` here, and 0.99
    makes the running statistics follow the last batch.
``train-eval-gap``
    A batch norm whose inputs in eval do not have the statistics it normalizes them with. On the copy,
    running statistics are reset and averaged (cumulatively, so the check does not depend on momentum)
    over ``passes`` training forwards on random batches (enough for 512 samples, between 8 and 64
    batches); then as many eval forwards on random
    batches measure what each layer (each call site of a shared layer) sees in eval. The gap is the RMS
    over channels of the error of normalizing those inputs with the running statistics instead of
    their own, ``sqrt(mean_c(d_c^2 + (1 - r_c)^2))`` (``d``: mean shift in running standard
    deviations, ``r``: ratio of standard deviations), reported above ``gap_threshold`` (default 0.25).
    Dropout's variance shift and shared layers show here; the finding also gives the relative
    difference of the model's output between running and batch statistics on one random batch.
    Random batches: standard normal tensors of each floating example tensor's shape (other tensors
    are reused as they are).

``mode``: ``"train"`` (the model is about to be trained), ``"inference"`` (about to serve), or
``"auto"`` (default): the model's own ``training`` flag says which.

How the graph is found: forward hooks on every module and a ``torch.overrides.TorchFunctionMode``
record which layer or function produced each tensor and who consumed it, during one training-mode
forward on the example input. This works for any model that runs, including ones torch.fx cannot
trace; "feeds only" counts every consumer the forward shows (residual sums included).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

__all__ = ["doctor", "Finding", "DoctorError", "CHECKS", "run_doctor", "render"]

CHECKS = {
    "bias-before-bn": "a bias right before a batch norm (wasted parameters)",
    "dropout-before-bn": "dropout before a batch norm (variance shift, Li et al. 2019)",
    "small-batch-statistics": "batch-norm statistics from too few values per channel",
    "train-mode-at-inference": "a batch norm in training mode at inference",
    "no-running-statistics": "a batch norm without usable running statistics at inference",
    "shared-bn": "one batch norm called at several sites in a forward",
    "keras-momentum": "momentum in the Keras convention (>= 0.9 on a torch-convention layer)",
    "train-eval-gap": "a large train/eval output gap",
}

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LINEAR_LAYERS = _CONV + (nn.Linear, nn.Flatten, nn.Unflatten, nn.Identity, nn.AvgPool1d, nn.AvgPool2d,
                          nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_LEAF_TYPES = _CONV + (nn.Linear, _TorchBatchNorm) + _DROPOUT
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "contiguous", "permute", "transpose", "squeeze",
             "unsqueeze", "clone", "to", "linear", "conv1d", "conv2d", "conv3d", "avg_pool1d", "avg_pool2d",
             "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"}
_DROPOUT_FNS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}


class DoctorError(RuntimeError):
    """The doctor could not run the model (its forward failed, or the input cannot be made)."""


@dataclass
class Finding:
    """One pitfall: ``check`` (a key of :data:`CHECKS`), ``location`` (the module's qualified name,
    ``"<model>"`` for the root), ``message`` (what and why, with the fix), ``details`` (numbers)."""

    check: str
    location: str
    message: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"[{self.check}] {self.location}: {self.message}"


# ----------------------------------------------------------------------------------------------
# the recorded forward


@dataclass
class _Node:
    kind: str  # "module" | "function"
    name: str  # qualified module name, or the function's name
    scope: str  # the module whose forward made the call
    module: Any
    inputs: list  # producer node index per data input (-1: a model input)
    in_shapes: list
    consumers: list = field(default_factory=list)


class _Recorder(TorchFunctionMode):
    """Hooks and a torch-function mode that record, for one forward, which layer or function made
    each tensor and which consumed it."""

    def __init__(self, model: nn.Module, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names
        self.nodes: list[_Node] = []
        self.producer: dict[int, int] = {}
        self.keep: list = []  # the tensors whose ids are keys of producer (ids stay unique)
        self.stack: list[tuple[nn.Module, bool, int | None]] = []
        self.calls: dict[int, int] = {}
        self.handles = []
        for m in model.modules():
            self.handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._post, with_kwargs=True, always_call=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def add_inputs(self, inputs) -> None:
        for t in tree_leaves(inputs):
            if isinstance(t, torch.Tensor):
                self.producer[id(t)] = -1
                self.keep.append(t)

    def _in_leaf(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    def _record(self, kind: str, name: str, module, inputs) -> int:
        producers, shapes = [], []
        for t in tree_leaves(inputs):
            if isinstance(t, torch.Tensor) and id(t) in self.producer:
                producers.append(self.producer[id(t)])
                shapes.append(tuple(t.shape))
        scope = next((self.names.get(id(m), "") for m, _, _ in reversed(self.stack)), "")
        idx = len(self.nodes)
        self.nodes.append(_Node(kind, name, scope, module, producers, shapes))
        for p in set(producers):
            if p >= 0:
                self.nodes[p].consumers.append(idx)
        return idx

    def _outputs(self, idx: int, out) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.producer[id(t)] = idx
                self.keep.append(t)

    def _pre(self, module, args, kwargs):
        if self._in_leaf():
            self.stack.append((module, True, None))  # inside a leaf: not a node of the graph
            return None
        leaf = isinstance(module, _LEAF_TYPES) or not module._modules
        idx = None
        if leaf:
            self.calls[id(module)] = self.calls.get(id(module), 0) + 1
            idx = self._record("module", self.names.get(id(module), type(module).__name__), module, (args, kwargs))
        self.stack.append((module, leaf, idx))
        return None

    def _post(self, module, args, kwargs, output):
        if not self.stack:
            return None
        _, _, idx = self.stack.pop()
        if idx is not None:
            self._outputs(idx, output)
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._in_leaf():
            return out
        if not any(isinstance(t, torch.Tensor) for t in tree_leaves(out)):
            return out
        if not any(isinstance(t, torch.Tensor) and id(t) in self.producer for t in tree_leaves((args, kwargs))):
            return out
        name = getattr(func, "__name__", repr(func))
        idx = self._record("function", name, None, (args, kwargs))
        if name in _DROPOUT_FNS:
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            self.nodes[idx].module = {"p": p, "training": training}
        self._outputs(idx, out)
        return out


# ----------------------------------------------------------------------------------------------
# helpers


def _as_tuple(example_input) -> tuple:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def _random_like(inputs: tuple, gen: torch.Generator) -> tuple:
    def one(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            r = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(device=t.device, dtype=t.dtype)
            return r
        return t

    return tuple(torch.utils._pytree.tree_map(one, x) for x in inputs)


def _batch_size(inputs: tuple) -> int:
    return next((t.shape[0] for t in tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.dim()), 1)


def _with_batch(inputs: tuple, batch: int, gen: torch.Generator) -> tuple | None:
    """Random inputs like ``inputs`` with ``batch`` samples; None when a tensor is not floating."""
    leaves = [t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    if not leaves or any(not t.is_floating_point() or t.dim() == 0 for t in leaves):
        return None

    def one(t):
        if isinstance(t, torch.Tensor):
            return torch.randn((batch,) + tuple(t.shape[1:]), generator=gen).to(device=t.device, dtype=t.dtype)
        return t

    return tuple(torch.utils._pytree.tree_map(one, x) for x in inputs)


def _bns(model: nn.Module, names: dict[int, str]) -> list[tuple[str, nn.Module]]:
    return [(names[id(m)], m) for m in model.modules() if isinstance(m, _TorchBatchNorm)]


def _names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, m in model.named_modules():
        names.setdefault(id(m), name or "<model>")
    return names


def _shapes_text(inputs: tuple) -> str:
    return ", ".join(str(tuple(t.shape)) for t in tree_leaves(inputs) if isinstance(t, torch.Tensor))


def _forward(model: nn.Module, inputs: tuple, what: str):
    try:
        return model(*inputs)
    except Exception as e:
        raise DoctorError(f"doctor: the model's forward failed ({what}) on input of shape {_shapes_text(inputs)}: "
                          f"{type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------
# the checks


def doctor(model: nn.Module, example_input, *, mode: str = "auto", min_values: int = 32, min_batch: int = 8,
           gap_threshold: float = 0.25, passes: int | None = None, seed: int = 0) -> list[Finding]:
    """Find batch-norm pitfalls in ``model``; see the module docstring for every check.

    Args:
        model: the model (not changed: the doctor works on a deep copy).
        example_input: a tensor, or a tuple of the forward's positional inputs. In ``"train"`` mode its
            batch size is taken as the training batch size; at inference, where any batch size is
            fine, the training-mode forwards of the checks use random batches of at least 32 (when
            every input is a floating tensor). Its floating tensors' shapes give the random batches.
        mode: keyword; ``"train"``, ``"inference"`` or ``"auto"`` (default: ``model.training`` decides).
        min_values, min_batch: keywords; small-batch thresholds (defaults 32 values per channel, 8 samples).
        gap_threshold: keyword; train/eval gap threshold in channel standard deviations (default 0.25).
        passes: keyword; random batches for the gap check, in training and again in eval (default: enough
            for 512 samples, between 8 and 64).
        seed: keyword; of the random batches (default 0). Dropout draws from torch's generator,
            whose state is restored afterwards.

    Returns:
        A list of :class:`Finding`, empty when nothing was found.

    Raises:
        DoctorError: the model's forward failed on the input (the message names the mode and shapes).

    Example:
        >>> import torch, bnlab
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16, momentum=0.99))
        >>> for f in bnlab.tools.doctor(net, torch.randn(64, 8)):
        ...     print(f.check, f.location)
        bias-before-bn 0
        keras-momentum 1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"doctor: expected an nn.Module, got {type(model).__name__}")
    if mode not in ("auto", "train", "inference"):
        raise ValueError(f"doctor: mode must be 'auto', 'train' or 'inference' (got {mode!r})")
    if passes is not None and (not isinstance(passes, int) or passes < 1):
        raise ValueError(f"doctor: passes must be a positive int or None (got {passes!r})")
    inputs = _as_tuple(example_input)
    if mode == "auto":
        mode = "train" if model.training else "inference"
    findings: list[Finding] = []
    names = _names(model)
    bns = _bns(model, names)
    root_training = model.training
    # frozen by choice: a batch norm in eval inside a model in training (fine-tuning with fixed statistics)
    trains = {name: bn.training or not root_training for name, bn in bns}

    for name, bn in bns:
        if bn.momentum is not None and bn.momentum >= 0.9:
            findings.append(Finding(
                "keras-momentum", name,
                f"momentum={bn.momentum:g} in torch's convention keeps only {1 - bn.momentum:.0%} of the running "
                f"statistics per batch, so they follow the last batch; Keras' momentum={bn.momentum:g} is "
                f"momentum={1 - bn.momentum:.2g} here",
                {"momentum": bn.momentum, "torch_equivalent": round(1 - bn.momentum, 6)}))
    if mode == "inference":
        for name, bn in bns:
            if bn.training:
                findings.append(Finding(
                    "train-mode-at-inference", name,
                    "in training mode at inference: outputs depend on the rest of the batch, a batch of one fails, "
                    "and every forward overwrites the running statistics; call model.eval()",
                    {"training": True}))
            elif not bn.track_running_stats or bn.running_mean is None:
                findings.append(Finding(
                    "no-running-statistics", name,
                    "track_running_stats=False: it normalizes with each batch's statistics in eval too, so outputs "
                    "depend on the rest of the batch", {"track_running_stats": False}))
            elif (bn.num_batches_tracked is not None and int(bn.num_batches_tracked) == 0
                  and bool((bn.running_mean == 0).all()) and bool((bn.running_var == 1).all())):
                findings.append(Finding(
                    "no-running-statistics", name,
                    "running statistics never updated (mean 0, variance 1, num_batches_tracked 0): eval does not "
                    "normalize; train the model or run bnlab.tools.recalibrate", {"num_batches_tracked": 0}))

    if passes is None:
        batch = _batch_size(inputs) if mode == "train" else max(32, _batch_size(inputs))
        passes = min(64, max(8, math.ceil(512 / max(1, batch))))
    work = copy.deepcopy(model)
    wnames = _names(work)
    gen = torch.Generator().manual_seed(seed)
    train_inputs = inputs
    if mode == "inference":  # the example is an inference batch; training forwards get batches of 32
        train_inputs = _with_batch(inputs, max(32, _batch_size(inputs)), gen) or inputs
    devices = sorted({t.device.index or 0 for t in list(work.parameters()) + list(work.buffers())
                      if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():  # dropout's draws leave no trace
        torch.manual_seed(seed)
        rec = _record(work, wnames, train_inputs)
        findings += _graph_checks(rec, work, wnames, trains, mode, min_values, min_batch)
        findings += _gap_check(work, wnames, train_inputs, gen, passes, gap_threshold)
    order = list(CHECKS)
    return sorted(findings, key=lambda f: order.index(f.check))


def _record(work: nn.Module, names: dict[int, str], inputs: tuple) -> _Recorder:
    work.train()
    rec = _Recorder(work, names)
    rec.add_inputs(inputs)
    try:
        with rec:
            _forward(work, inputs, "training mode")
    finally:
        rec.remove()
    return rec


def _dropout_upstream(rec: _Recorder, idx: int, depth: int = 6) -> tuple[_Node, list[str]] | None:
    """The dropout reached from node ``idx`` going up through single-input linear nodes, with the path."""
    path = []
    node = rec.nodes[idx]
    for _ in range(depth):
        if len(node.inputs) != 1 or node.inputs[0] < 0:
            return None
        node = rec.nodes[node.inputs[0]]
        if node.kind == "module" and isinstance(node.module, _DROPOUT):
            return (node, path) if node.module.p > 0 else None
        if node.kind == "function" and node.name in _DROPOUT_FNS:
            info = node.module or {}
            return (node, path) if info.get("training", True) and info.get("p", 0.5) > 0 else None
        linear = (node.kind == "module" and isinstance(node.module, _LINEAR_LAYERS)) or \
                 (node.kind == "function" and node.name in _RESHAPES)
        if not linear:
            return None
        path.append(node.name)
    return None


def _graph_checks(rec: _Recorder, work, names, trains, mode, min_values, min_batch) -> list[Finding]:
    out: list[Finding] = []
    seen_small, seen_bias, seen_drop = set(), set(), set()
    for idx, node in enumerate(rec.nodes):
        if node.kind != "module" or not isinstance(node.module, _TorchBatchNorm):
            continue
        bn, bname = node.module, node.name
        # small batches
        if mode == "train" and trains.get(bname, True) and node.in_shapes and bname not in seen_small:
            shape = node.in_shapes[0]
            if len(shape) >= 2 and shape[1] > 0:
                n = shape[0]
                ghost = getattr(bn, "virtual_batch_size", None)
                if isinstance(ghost, int) and 0 < ghost < n:
                    n = ghost
                spatial = math.prod(shape[2:])
                values = n * spatial
                what = "ghost batch" if n != shape[0] else "batch"
                detail = {"batch": n, "spatial": spatial, "values_per_channel": values, "input_shape": list(shape)}
                if values < min_values:
                    cause = (f"the {what} size ({n})" if spatial == 1 else
                             f"the {what} size ({n}) and the spatial size ({spatial})" if n < min_batch else
                             f"the spatial size ({spatial})")
                    out.append(Finding(
                        "small-batch-statistics", bname,
                        f"statistics from {values} values per channel ({what} {n} x spatial {spatial}), below "
                        f"{min_values}: {cause} is too small, so batch statistics are noisy; use larger batches, "
                        "GroupNorm/LayerNorm, or frozen statistics", dict(detail, cause="values", threshold=min_values)))
                    seen_small.add(bname)
                elif n < min_batch:
                    out.append(Finding(
                        "small-batch-statistics", bname,
                        f"{what} of {n} samples (below {min_batch}): its {values} values per channel come from "
                        f"{n} samples whose {spatial} spatial positions are correlated, so batch statistics are "
                        "noisy (Wu & He 2018); use larger batches, GroupNorm, or frozen statistics",
                        dict(detail, cause="batch", threshold=min_batch)))
                    seen_small.add(bname)
        if not node.inputs or node.inputs[0] < 0:
            continue
        prod = rec.nodes[node.inputs[0]]
        # a bias right before a training batch norm
        if (prod.kind == "module" and isinstance(prod.module, _CONV + (nn.Linear,))
                and getattr(prod.module, "bias", None) is not None and trains.get(bname, True)
                and prod.consumers == [idx] and prod.name not in seen_bias):
            shape = node.in_shapes[0] if node.in_shapes else ()
            channels = prod.module.out_features if isinstance(prod.module, nn.Linear) else prod.module.out_channels
            aligned = len(shape) >= 2 and shape[1] == channels and (
                not isinstance(prod.module, nn.Linear) or len(shape) == 2)
            if aligned:
                seen_bias.add(prod.name)
                out.append(Finding(
                    "bias-before-bn", prod.name,
                    f"{type(prod.module).__name__} has a bias ({channels} parameters) and feeds only batch norm "
                    f"{bname!r}, which subtracts the batch mean: the bias has no effect and no gradient; use bias=False",
                    {"bn": bname, "parameters": channels}))
        # dropout before the batch norm
        hit = _dropout_upstream(rec, idx)
        if hit is not None:
            dnode, path = hit
            where = dnode.name if dnode.kind == "module" else f"{dnode.scope} (F.{dnode.name})"
            if (where, bname) not in seen_drop:
                seen_drop.add((where, bname))
                p = dnode.module.p if dnode.kind == "module" else (dnode.module or {}).get("p", 0.5)
                via = f" through {', '.join(map(repr, path))}" if path else ""
                out.append(Finding(
                    "dropout-before-bn", where,
                    f"dropout (p={p:g}) feeds batch norm {bname!r}{via}: dropout changes the variance the batch "
                    "norm sees between training and eval, so its running variance misfits eval inputs (variance "
                    "shift, Li et al. 2019, arXiv 1801.05134); put dropout after the last batch norm",
                    {"bn": bname, "p": p, "through": path}))
    # one batch norm at several call sites
    for m in work.modules():
        if isinstance(m, _TorchBatchNorm) and rec.calls.get(id(m), 0) > 1:
            calls = rec.calls[id(m)]
            out.append(Finding(
                "shared-bn", names[id(m)],
                f"called {calls} times in one forward: its running statistics average {calls} inputs whose "
                "distributions differ (e.g. time steps), so eval fits none of them; use one layer per call site or "
                "per-step statistics (bnlab.nn.SequenceBatchNorm)", {"calls": calls}))
    return out


def _gap_check(work: nn.Module, names, inputs: tuple, gen, passes: int, threshold: float) -> list[Finding]:
    bns = [m for m in work.modules() if isinstance(m, _TorchBatchNorm) and m.track_running_stats
           and m.running_mean is not None]
    if not bns:
        return []
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes
    work.train()
    for i in range(passes):
        _forward(work, _random_like(inputs, gen), f"training mode, random batch {i + 1}")
    # what each batch norm sees in eval, per call site: float64 moments over as many random batches
    moments: dict[int, list] = {id(m): [] for m in bns}
    calls = {id(m): 0 for m in bns}

    def accumulate(mod, args):
        x = args[0].detach()
        k = calls[id(mod)]
        calls[id(mod)] += 1
        acc = moments[id(mod)]
        if k == len(acc):
            acc.append([0, 0.0, 0.0])
        if x.dim() >= 2 and x.numel():
            xd = x.to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
            acc[k][0] += xd.shape[1]
            acc[k][1] = acc[k][1] + xd.sum(1)
            acc[k][2] = acc[k][2] + (xd * xd).sum(1)

    handles = [m.register_forward_pre_hook(accumulate) for m in bns]
    try:
        work.eval()
        for i in range(passes):
            for m in bns:
                calls[id(m)] = 0
            _forward(work, _random_like(inputs, gen), f"eval mode, random batch {i + 1}")
    finally:
        for h in handles:
            h.remove()
    # the model's output with running statistics and with the batch's own, on one more random batch
    x = _random_like(inputs, gen)
    y_eval = _forward(work, x, "eval mode, random batch")
    for m in bns:
        m.train()
        m.momentum = 0.0  # batch statistics, running statistics left as they are
    y_batch = _forward(work, x, "batch statistics, random batch")
    work.eval()
    out_gap = _rel_gap(y_eval, y_batch)
    out = []
    for m in bns:
        worst, at, parts = 0.0, 0, (0.0, 1.0)
        for k, (n, s1, s2) in enumerate(moments[id(m)]):
            if n < 2:
                continue
            g, parts_k = _shift(m, s1 / n, s2 / n - (s1 / n) ** 2)
            if g > worst:
                worst, at, parts = g, k, parts_k
        if worst > threshold:
            n_calls = len(moments[id(m)])
            site = f" (call {at + 1} of {n_calls})" if n_calls > 1 else ""
            out.append(Finding(
                "train-eval-gap", names[id(m)],
                f"in eval its inputs differ from the running statistics by {worst:.2f} channel standard deviations"
                f"{site} (mean shift {parts[0]:.2f}, std ratio {parts[1]:.2f}; threshold {threshold:g}), measured on "
                f"random batches after {passes} training passes: eval normalizes with statistics of another "
                f"distribution than training did (model outputs differ by {out_gap:.0%} from batch statistics)",
                {"gap": round(worst, 4), "mean_shift": round(parts[0], 4), "std_ratio": round(parts[1], 4),
                 "call": at + 1, "calls": n_calls, "output_gap": round(out_gap, 4), "threshold": threshold}))
    return out


def _shift(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> tuple[float, tuple[float, float]]:
    """RMS over channels of the error of normalizing eval inputs (``mean``, ``var``) with the running
    statistics instead of their own: ``sqrt(mean_c(d_c^2 + (1 - r_c)^2))`` with ``d`` the mean shift in
    running standard deviations and ``r`` the ratio of standard deviations."""
    rm = bn.running_mean.to(torch.float64).cpu()
    rs = torch.sqrt(bn.running_var.to(torch.float64).cpu() + bn.eps)
    d = (mean.cpu() - rm) / rs
    r = torch.sqrt(var.cpu().clamp_min(0) + bn.eps) / rs
    g = torch.sqrt((d * d + (1 - r) ** 2).mean()).item()
    if not math.isfinite(g):
        return float("inf"), (float("nan"), float("nan"))
    return g, (torch.sqrt((d * d).mean()).item(), torch.exp(torch.log(r).mean()).item())


def _rel_gap(a, b) -> float:
    num = den = 0.0
    for ta, tb in zip(tree_leaves(a), tree_leaves(b)):
        if isinstance(ta, torch.Tensor) and ta.is_floating_point():
            num += float(((ta.double() - tb.double()) ** 2).sum())
            den += float((tb.double() ** 2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# the command


def render(findings: list[Finding], console=None, header: str | None = None) -> None:
    """Print the findings as a rich table (or a green all-clear)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if header:
        console.print(header)
    if not findings:
        console.print("[green]No batch-norm pitfalls found.[/green]")
        return
    table = Table(title=f"{len(findings)} batch-norm pitfall(s)", show_lines=True)
    table.add_column("check", style="bold yellow", no_wrap=True)
    table.add_column("location", style="cyan")
    table.add_column("finding")
    for f in findings:
        table.add_row(f.check, f.location, f.message)
    console.print(table)


def _load_factory(target: str):
    mod_name, sep, attr = target.rpartition(":")
    if not sep or not mod_name or not attr:
        raise DoctorError(f"bnlab doctor: expected MODULE:FACTORY (a dotted module or a .py file, a colon, a "
                          f"callable that returns the model), got {target!r}")
    if mod_name.endswith(".py") or os.sep in mod_name or "/" in mod_name:
        path = os.path.abspath(mod_name)
        if not os.path.isfile(path):
            raise DoctorError(f"bnlab doctor: no such file: {mod_name!r}")
        name = "_bnlab_doctor_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, os.path.dirname(path))
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise DoctorError(f"bnlab doctor: importing {mod_name!r} failed: {type(e).__name__}: {e}") from e
        finally:
            sys.path.remove(os.path.dirname(path))
    else:
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:  # as `python -m` would: modules of the working directory import
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            raise DoctorError(f"bnlab doctor: cannot import module {mod_name!r}: {e}") from e
        except Exception as e:
            raise DoctorError(f"bnlab doctor: importing {mod_name!r} failed: {type(e).__name__}: {e}") from e
        finally:
            if added and cwd in sys.path:
                sys.path.remove(cwd)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise DoctorError(f"bnlab doctor: {mod_name!r} has no attribute {attr!r} (its callables: "
                              f"{', '.join(public) or 'none'})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DoctorError(f"bnlab doctor: {target!r} is a {type(obj).__name__}, not a callable that returns the model")
    return obj


def _parse_shape(text: str) -> tuple[int, ...]:
    parts = text.split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise DoctorError(f"bnlab doctor: --input-shape expects positive integers separated by commas, e.g. "
                          f"3,32,32 (got {text!r})")
    return tuple(int(p) for p in parts)


def _infer_shape(model: nn.Module) -> tuple[tuple[int, ...], str]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not isinstance(m, nn.modules.lazy.LazyModuleMixin):
            return (m.in_features,), name
        if isinstance(m, _CONV) and not isinstance(m, nn.modules.lazy.LazyModuleMixin):
            k = m.weight.dim() - 2
            size = {1: 64, 2: 32, 3: 16}[k]
            return (m.in_channels,) + (size,) * k, name
    raise DoctorError("bnlab doctor: cannot infer the input shape (no Conv or Linear layer to read it from): "
                      "pass --input-shape, e.g. --input-shape 3,32,32")


def run_doctor(args) -> int:
    """``bnlab doctor``: 0 when clean, 1 with findings, 2 for usage errors."""
    from rich.console import Console

    err = Console(stderr=True)
    json_to_stdout = args.json == "-"
    console = Console(stderr=True) if json_to_stdout else Console()
    try:
        if args.batch_size < 1:
            raise DoctorError(f"bnlab doctor: --batch-size must be >= 1 (got {args.batch_size})")
        passes = getattr(args, "passes", None)
        if passes is not None and passes < 1:
            raise DoctorError(f"bnlab doctor: --passes must be >= 1 (got {passes})")
        factory = _load_factory(args.target)
        try:
            model = factory()
        except Exception as e:
            raise DoctorError(f"bnlab doctor: {args.target} raised {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise DoctorError(f"bnlab doctor: {args.target} returned a {type(model).__name__}, not a torch.nn.Module")
        if args.input_shape:
            shapes = [_parse_shape(s) for s in args.input_shape]
            note = ""
        else:
            shape, where = _infer_shape(model)
            shapes = [shape]
            note = f" (inferred from {where!r}; --input-shape to choose)"
        try:
            ref = next(iter(model.parameters()))
            fk = {"device": ref.device, "dtype": ref.dtype if ref.is_floating_point() else torch.float32}
        except StopIteration:
            fk = {}
        gen = torch.Generator().manual_seed(args.seed)
        inputs = tuple(torch.randn((args.batch_size,) + s, generator=gen).to(**fk) for s in shapes)
        mode = args.mode if args.mode != "auto" else ("train" if model.training else "inference")
        header = (f"bnlab doctor: {type(model).__name__} from {args.target}, input "
                  f"{', '.join(str(tuple(t.shape)) for t in inputs)}{note}, mode {mode}")
        findings = doctor(model, inputs, mode=args.mode, seed=args.seed, passes=passes)
    except DoctorError as e:
        err.print(str(e), markup=False, highlight=False)
        return 2
    render(findings, console, header)
    if args.json is not None:
        doc = {"target": args.target, "model": type(model).__name__, "mode": mode,
               "input_shapes": [list(t.shape) for t in inputs], "clean": not findings,
               "findings": [f.to_dict() for f in findings]}
        text = json.dumps(doc, indent=2, default=str)
        if json_to_stdout:
            print(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text + "\n")
    return 1 if findings else 0
