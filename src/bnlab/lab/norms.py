"""The norm registry, for stacked testbeds, and the audit's lab-only BN controls.

Stacked layout: the testbeds train G independent members at once, with activations of shape
``(N, G*C)`` (MLP) or ``(N, G*C, H, W)`` (CNN), member g's channel c being channel ``g*C + c``.
A per-channel norm over ``G*C`` channels is then exactly G independent norms: batch norm and its
variants are bnlab's own modules with ``G*C`` features; LayerNorm and GroupNorm become GroupNorm
with groups that never straddle two members.

Registry names: ``none``, ``batch``, ``noisy`` (Santurkar control), ``frozen-stats`` (C4
control), ``ghost`` (:class:`bnlab.nn.GhostBatchNorm1d` / ``2d``, recalibrated as ordinary BN:
:class:`LabGhostBatchNorm1d`), ``renorm`` (:class:`bnlab.nn.BatchRenorm1d` / ``2d``: batch
renormalization, batch norm during precise BN), ``layer``, ``group``.
Every batch-norm layer here uses ``nonfinite="skip"``: a diverging member is a result, and its nan
statistics must neither raise nor reach the buffers (precise BN recomputes them before any
evaluation anyway).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import Tensor, nn

from .. import functional as BF
from .. import reference as ref
from ..kernels.stats import batch_stats as kernel_batch_stats
from ..nn import BatchNorm1d, BatchNorm2d, GhostBatchNorm1d, GhostBatchNorm2d
from ..nn.renorm import BatchRenorm1d, BatchRenorm2d

__all__ = ["NORMS", "make_norm", "NoisyBatchNorm1d", "NoisyBatchNorm2d", "FrozenStatsBatchNorm1d",
           "FrozenStatsBatchNorm2d", "refresh_frozen_stats", "set_generator", "set_generators"]


class _Noisy:
    """Santurkar et al. 2018 (arXiv 1805.11604), "noisy BN": after normalizing, each unit is
    multiplied by s ~ U(0.5, 1.5) and shifted by m ~ U(-1, 1), drawn per unit and redrawn at every
    training forward; no noise in eval, nor while :func:`bnlab.tools.recalibrate` measures the
    population statistics (``recalibrate_begin``/``recalibrate_end``)."""

    noise_on = True
    members = 1  # set by the registry: the channels are ``members`` equal blocks, one per member
    generator: torch.Generator | None = None  # one generator for every member (standalone use)
    generators: list[torch.Generator | None] | None = None  # one per member (:func:`set_generators`)

    def _add_noise(self, y: Tensor) -> Tensor:
        if not (self.training and self.noise_on):
            return y
        c = y.shape[1] // self.members
        gens = self.generators or [self.generator] * self.members
        s, m = [], []
        for g in range(self.members):  # member g draws from its own generator, as if it trained alone
            s.append(torch.empty(c, dtype=y.dtype).uniform_(0.5, 1.5, generator=gens[g]))
            m.append(torch.empty(c, dtype=y.dtype).uniform_(-1.0, 1.0, generator=gens[g]))
        shape = [1, y.shape[1]] + [1] * (y.dim() - 2)
        return y * torch.cat(s).reshape(shape) + torch.cat(m).reshape(shape)

    def recalibrate_begin(self) -> None:
        self.noise_on = False

    def recalibrate_end(self) -> None:
        self.noise_on = True


class NoisyBatchNorm1d(_Noisy, BatchNorm1d):
    def forward(self, input: Tensor) -> Tensor:
        return self._add_noise(super().forward(input))


class NoisyBatchNorm2d(_Noisy, BatchNorm2d):
    def forward(self, input: Tensor) -> Tensor:
        return self._add_noise(super().forward(input))


class _FrozenStats:
    """BN without the batch noise (C4's control). Until :func:`refresh_frozen_stats` is first
    called it is ordinary BN; from then on a training forward normalizes with the stored
    full-training-set statistics, constants for autograd, which the trainer refreshes at the start
    of every epoch after the first with ONE batched forward of the whole training set. Eval:
    ordinary BN with the running (precise-BN) statistics.

    Precise BN (:func:`bnlab.tools.recalibrate` inside :func:`precise_bn_pass`) normalizes the
    recalibration pass with that pass's own statistics, as ordinary BN does, not with the
    statistics stored at the start of the last epoch: over the whole training set in one pass this
    is a refresh of the full-training-set statistics with the final weights, layer after layer, so
    each layer's population statistics are those of the inputs it sees at eval. The stored
    statistics, which training uses, are left as they were."""

    frozen = False
    collecting = False
    recalibrating = False

    def _init_frozen(self) -> None:
        self.register_buffer("frozen_mean", torch.zeros(self.num_features), persistent=False)
        self.register_buffer("frozen_var", torch.ones(self.num_features), persistent=False)

    def forward(self, input: Tensor) -> Tensor:
        if self.training and self.collecting:
            with torch.no_grad():
                x = input.detach()
                if x.is_cpu and x.dtype in (torch.float32, torch.float64):
                    # bnlab's statistics kernel: one pass, the shifted float64 sums of the reference
                    stats, _ = kernel_batch_stats(x, self.eps)
                    mean, var = torch.from_numpy(stats[0]), torch.from_numpy(stats[1])
                else:
                    mean, var, _ = ref.batch_stats(x)  # (N, C, *) -> (C,), biased, float64
                self.frozen_mean.copy_(mean)
                self.frozen_var.copy_(var)
            return BF.batch_norm(input, self.frozen_mean, self.frozen_var, self.weight, self.bias, False, 0.0, self.eps)
        if self.training and self.frozen and not self.recalibrating:
            return BF.batch_norm(input, self.frozen_mean, self.frozen_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(input)


class FrozenStatsBatchNorm1d(_FrozenStats, BatchNorm1d):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_frozen()


class FrozenStatsBatchNorm2d(_FrozenStats, BatchNorm2d):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_frozen()


class _PreciseGhost:
    """Ghost BN as the lab evaluates it: in training each ghost batch is normalized with its own
    statistics (:class:`bnlab.nn.GhostBatchNorm1d`); precise BN (:func:`bnlab.tools.recalibrate`
    inside :func:`precise_bn_pass`) normalizes its pass with the statistics of the whole pass, as
    ordinary BN does, so that each later layer's population statistics are those of the inputs it
    sees at eval (where every ghost layer normalizes with population statistics), whatever the
    virtual batch size. A virtual batch as large as the training batch is then BN in training,
    recalibration and eval alike."""

    recalibrating = False

    def forward(self, input: Tensor) -> Tensor:
        if self.training and self.recalibrating:
            return BatchNorm1d.forward(self, input)  # bnlab's _BatchNorm.forward: ordinary batch statistics
        return super().forward(input)


class LabGhostBatchNorm1d(_PreciseGhost, GhostBatchNorm1d):
    pass


class LabGhostBatchNorm2d(_PreciseGhost, GhostBatchNorm2d):
    pass


@contextmanager
def precise_bn_pass(model: nn.Module):
    """Around a precise-BN pass (:func:`bnlab.tools.recalibrate`): frozen-stats and ghost layers
    normalize with the pass's own batch statistics, as ordinary BN does, so that the population
    statistics of every later layer are those of the inputs it sees at eval. Precise BN itself
    treats them as ordinary batch-norm layers (their running statistics are what it measures)."""
    layers = [m for m in model.modules() if isinstance(m, (_FrozenStats, _PreciseGhost))]
    for m in layers:
        m.recalibrating = True
    try:
        yield model
    finally:
        for m in layers:
            m.recalibrating = False


@torch.no_grad()
def refresh_frozen_stats(model: nn.Module, x: Tensor) -> bool:
    """Recompute every frozen-stats layer's statistics over ``x`` (the whole training set) with
    one training-mode forward; layers later in the net see inputs normalized with the new
    statistics of the layers before them, as they will during the epoch. False if none."""
    layers = [m for m in model.modules() if isinstance(m, _FrozenStats)]
    if not layers:
        return False
    was = model.training
    model.train()
    for m in layers:
        m.collecting = True
    try:
        model(x)
    finally:
        for m in layers:
            m.collecting = False
            m.frozen = True
        model.train(was)
    return True


def set_generators(model: nn.Module, generators: list[torch.Generator]) -> None:
    """Give every member its own generator: member g's random draws in the lab's layers (noisy-BN
    noise, dropout masks) come from ``generators[g]`` only, layer by layer in forward order, so a
    member draws the same numbers whether it trains alone or beside other members."""
    for m in model.modules():
        if hasattr(m, "generators"):
            if len(generators) != m.members:
                raise ValueError(f"{type(m).__name__}: {len(generators)} generators for {m.members} members")
            m.generators = list(generators)


def set_generator(model: nn.Module, generator: torch.Generator) -> None:
    """Route every random draw of the lab's layers (noise, dropout) through one ``generator``
    shared by all members (their draws then interleave: for tests and standalone layers; the
    trainer uses :func:`set_generators`)."""
    for m in model.modules():
        if hasattr(m, "generators"):
            m.generators = [generator] * m.members


# ---------------------------------------------------------------- registry
def _affine_kwargs(affine: str) -> dict:
    if affine not in ("both", "none", "gamma", "beta"):
        raise ValueError(f"norm affine must be one of both|none|gamma|beta (got {affine!r})")
    return {"affine": affine != "none", "bias": affine in ("both", "beta")}


def _finish_affine(m: nn.Module, affine: str) -> nn.Module:
    if affine == "beta" and getattr(m, "weight", None) is not None:
        m.weight.requires_grad_(False)  # gamma fixed at 1: beta only
    return m


def _bn_factory(cls1d, cls2d, **fixed) -> Callable:
    def make(members: int, channels: int, spatial: bool, affine: str = "both", momentum: float | None = 0.1, **kw):
        cls = cls2d if spatial else cls1d
        m = cls(members * channels, momentum=momentum, nonfinite="skip", **_affine_kwargs(affine), **fixed, **kw)
        if isinstance(m, _Noisy):
            m.members = members
        return _finish_affine(m, affine)

    return make


def _group(members: int, channels: int, spatial: bool, affine: str = "both", groups: int = 8, **kw):
    if channels % groups:
        raise ValueError(f"group norm: {channels} channels do not split into {groups} groups")
    m = nn.GroupNorm(members * groups, members * channels, affine=affine != "none", **kw)
    if affine == "gamma":
        m.bias.requires_grad_(False)
    return _finish_affine(m, affine)


def _layer(members: int, channels: int, spatial: bool, affine: str = "both", **kw):
    return _group(members, channels, spatial, affine, groups=1, **kw)


def _none(members: int, channels: int, spatial: bool, **kw):
    return nn.Identity()


NORMS: dict[str, Callable[..., nn.Module]] = {
    "none": _none,
    "batch": _bn_factory(BatchNorm1d, BatchNorm2d),
    "noisy": _bn_factory(NoisyBatchNorm1d, NoisyBatchNorm2d),
    "frozen-stats": _bn_factory(FrozenStatsBatchNorm1d, FrozenStatsBatchNorm2d),
    "ghost": _bn_factory(LabGhostBatchNorm1d, LabGhostBatchNorm2d),
    "renorm": _bn_factory(BatchRenorm1d, BatchRenorm2d),
    "layer": _layer,
    "group": _group,
}


def make_norm(name: str, members: int, channels: int, spatial: bool = False, **kwargs) -> nn.Module:
    """The norm ``name`` for ``members`` stacked members of ``channels`` channels each."""
    if name not in NORMS:
        raise KeyError(f"unknown norm {name!r}; known: {', '.join(NORMS)}")
    return NORMS[name](members, channels, spatial, **kwargs)
