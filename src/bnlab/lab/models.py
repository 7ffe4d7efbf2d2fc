"""Stacked testbeds: G independent MLPs or CNNs trained in one pass.

A small model pays Python and dispatch overhead per layer far more than arithmetic; training G
members (seeds, learning rates, init scales, dropout rates) side by side pays it once. Members
never interact: every parameter is member-major (``p.view(G, -1)[g]`` is member g's block), linear
layers are batched matmuls (on CPU bnlab's matrix micro-kernel, :mod:`bnlab.lab._stacked`; torch's
``bmm`` elsewhere), convolutions are grouped, and norms act per member (see :mod:`bnlab.lab.norms`).
A stacked model with G = 1 is an ordinary MLP/CNN.

Input: ``(N, *in)`` shared by all members, or ``(G, N, *in)`` one batch per member.
Output: logits ``(G, N, classes)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _stacked
from .norms import make_norm

__all__ = ["StackedLinear", "MemberDropout", "MLP", "CNN", "build_model", "ACTIVATIONS", "init_member"]

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class StackedLinear(nn.Module):
    """G independent ``Linear(in, out)``: weight ``(G, in, out)``, bias ``(G, out)``.

    ``forward`` takes the stacked layout ``(N, G*in)`` and returns ``(N, G*out)``, or, with
    ``out_members_first=True``, ``(G, N, out)``. The first layer also takes ``(N, in)`` (shared)
    or ``(G, N, in)``.
    """

    def __init__(self, members: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(members, out_features)) if bias else None
        with torch.no_grad():  # torch's Linear default until init_member says otherwise
            bound = 1.0 / math.sqrt(in_features)
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    @property
    def fan_in(self) -> int:
        return self.in_features

    def forward(self, x: Tensor, out_members_first: bool = False, layout: str = "stacked") -> Tensor:
        g = self.members
        if _stacked.serves(x, self.weight) and not torch.compiler.is_compiling():
            # CPU: the members' products on bnlab's micro-kernel, read and written in the stacked
            # layout (:mod:`bnlab.lab._stacked`); the same products as the torch ops below
            y = _stacked.stacked_matmul(x, self.weight, layout, out_members_first)
            if self.bias is not None:
                y = y + (self.bias.unsqueeze(1) if out_members_first else self.bias.reshape(1, -1))
            return y
        if layout == "shared":  # (N, in) @ (G, in, out) -> (G, N, out)
            y = torch.matmul(x, self.weight)
        elif layout == "members":  # (G, N, in) -> (G, N, out)
            y = torch.bmm(x, self.weight)
        else:  # (N, G*in) -> (G, N, in) -> (G, N, out)
            y = torch.bmm(x.reshape(x.shape[0], g, self.in_features).transpose(0, 1), self.weight)
        if self.bias is not None:
            y = y + self.bias.unsqueeze(1)
        if out_members_first:
            return y
        return y.transpose(0, 1).reshape(y.shape[1], g * self.out_features)  # (G, N, out) -> (N, G*out)


class MemberDropout(nn.Module):
    """Inverted dropout with a rate per member (0 for some members is allowed).

    Member g's mask is drawn from ``generators[g]`` (see :func:`bnlab.lab.norms.set_generators`)
    with the shape of its own block ``(N, C, ...)``, and a member with rate 0 draws nothing: the
    member's masks, and every later draw from its generator, are the same whether it trains alone
    or beside other members."""

    def __init__(self, members: int, channels: int, rates: list[float]) -> None:
        super().__init__()
        self.members, self.channels = members, channels
        self.rates = [float(p) for p in rates]
        keep = torch.tensor([1.0 - p for p in self.rates]).repeat_interleave(channels)  # (G,) -> (G*C,)
        self.register_buffer("keep", keep, persistent=False)
        self.active = any(p > 0 for p in self.rates)
        self.generator: torch.Generator | None = None  # one generator for every member (standalone use)
        self.generators: list[torch.Generator | None] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.active):
            return x
        gens = self.generators or [self.generator] * self.members
        block = (x.shape[0], self.channels) + tuple(x.shape[2:])
        masks = []
        for g, p in enumerate(self.rates):
            if p > 0:
                scale = 1.0 / (1.0 - p) if p < 1 else 0.0
                masks.append((torch.rand(block, generator=gens[g], dtype=x.dtype) >= p).to(x.dtype) * scale)
            else:
                masks.append(torch.ones(block, dtype=x.dtype))
        return x * torch.cat(masks, dim=1)


def init_member(model: nn.Module, g: int, kind: str, generator: torch.Generator, gain: float = 1.0,
                std: float | None = None) -> None:
    """Initialize member g's weights: ``kaiming`` N(0, gain^2 * 2 / fan_in), ``normal`` N(0, std^2),
    or ``default`` (torch's Linear/Conv default, U(+-1/sqrt(fan_in)), biases too); other biases 0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (StackedLinear, StackedConv2d)):
                w = m.member_weight(g)
                fan_in = m.fan_in
                if kind == "kaiming":
                    w.normal_(0.0, gain * math.sqrt(2.0 / fan_in), generator=generator)
                elif kind == "normal":
                    w.normal_(0.0, float(std) * gain, generator=generator)
                elif kind == "default":
                    bound = gain / math.sqrt(fan_in)
                    w.uniform_(-bound, bound, generator=generator)
                else:
                    raise ValueError(f"unknown init {kind!r} (kaiming, normal, default)")
                b = m.member_bias(g)
                if b is not None:
                    if kind == "default":
                        b.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=generator)
                    else:
                        b.zero_()


def _member_weight(self, g: int) -> Tensor:
    return self.weight.view(self.members, *self.weight.shape[1:])[g] if isinstance(self, StackedLinear) else \
        self.weight.view(self.members, -1, *self.weight.shape[1:])[g]


def _member_bias(self, g: int) -> Tensor | None:
    if self.bias is None:
        return None
    return self.bias.view(self.members, -1)[g]


StackedLinear.member_weight = _member_weight
StackedLinear.member_bias = _member_bias


class StackedConv2d(nn.Conv2d):
    """G independent ``Conv2d(cin, cout, k)`` as one grouped convolution on ``(N, G*cin, H, W)``."""

    def __init__(self, members: int, cin: int, cout: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__(members * cin, members * cout, kernel_size, padding=kernel_size // 2, groups=members, bias=bias)
        self.members, self.cin, self.cout = members, cin, cout

    @property
    def fan_in(self) -> int:
        return self.cin * self.kernel_size[0] * self.kernel_size[1]

    member_weight = _member_weight
    member_bias = _member_bias


class MLP(nn.Module):
    """``in -> [Linear -> norm -> act -> dropout] x len(widths) -> Linear -> classes``, G members.

    Linear layers before a norm have no bias (the norm's beta, or its mean subtraction, makes it
    redundant); without a norm they have one. ``input_layout``: "shared" (input ``(N, *in)``, the
    default) or "members" (input ``(G, N, *in)``), set by the trainer.
    """

    input_layout = "shared"

    def __init__(self, members: int, in_features: int, widths: list[int], classes: int, act: str = "relu",
                 norm: str = "none", norm_args: dict | None = None, dropout: list[float] | None = None) -> None:
        super().__init__()
        self.members = members
        dropout = dropout or [0.0] * members
        layers: list[nn.Module] = []
        d = in_features
        for w in widths:
            layers.append(StackedLinear(members, d, w, bias=norm == "none"))
            layers.append(make_norm(norm, members, w, spatial=False, **(norm_args or {})))
            layers.append(ACTIVATIONS[act]())
            if any(p > 0 for p in dropout):
                layers.append(MemberDropout(members, w, dropout))
            d = w
        self.hidden = nn.ModuleList(layers)
        self.out = StackedLinear(members, d, classes, bias=True)

    def linears(self) -> list[StackedLinear]:
        return [m for m in self.modules() if isinstance(m, StackedLinear)]

    def forward(self, x: Tensor) -> Tensor:
        g = self.members
        if self.input_layout == "members":
            layout, h = "members", x.reshape(g, x.shape[1], -1)  # (G, N, *in) -> (G, N, D)
        else:
            layout, h = "shared", x.reshape(x.shape[0], -1)  # (N, *in) -> (N, D)
        first = True
        for m in self.hidden:
            if isinstance(m, StackedLinear):
                h = m(h, layout=layout if first else "stacked")
                first = False
            else:
                h = m(h)
        if first:  # no hidden layer
            return self.out(h, out_members_first=True, layout=layout)
        return self.out(h, out_members_first=True)


class CNN(nn.Module):
    """``[conv3x3 -> norm -> act -> maxpool2] x len(channels) -> global average -> Linear``, G
    members (grouped convolutions); for image input ``(N, C, H, W)``.

    ``channels_last`` (default): the stacked members run in channels_last memory. The same math;
    on CPU it is the faster layout for many channels on small images (G * C channels of 8x8 on
    digits): torch's NCHW max-pool kernel loops over each of the N * G * C small planes, and took
    10.5 ms forward on a (64, 560, 8, 8) input on one thread, its channels_last kernel 0.9 ms; a
    whole training step of C1's 35-member CNN ran 1.5-1.7x faster."""

    def __init__(self, members: int, in_channels: int, channels: list[int], classes: int, act: str = "relu",
                 norm: str = "none", norm_args: dict | None = None, dropout: list[float] | None = None,
                 channels_last: bool = True) -> None:
        super().__init__()
        self.members, self.in_channels = members, in_channels
        layers: list[nn.Module] = []
        c = in_channels
        for w in channels:
            layers += [StackedConv2d(members, c, w, 3, bias=norm == "none"),
                       make_norm(norm, members, w, spatial=True, **(norm_args or {})), ACTIVATIONS[act](), nn.MaxPool2d(2)]
            if dropout and any(p > 0 for p in dropout):
                layers.append(MemberDropout(members, w, dropout))
            c = w
        self.features = nn.Sequential(*layers)
        self.out = StackedLinear(members, c, classes, bias=True)
        self.channels_last = channels_last

    def linears(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, (StackedConv2d, StackedLinear))]

    def forward(self, x: Tensor) -> Tensor:
        g = self.members
        if x.dim() == 5:  # (G, N, C, H, W) -> (N, G*C, H, W)
            x = x.transpose(0, 1).reshape(x.shape[1], g * x.shape[2], x.shape[3], x.shape[4])
        elif x.dim() == 4:  # (N, C, H, W) shared -> (N, G*C, H, W)
            x = x.repeat(1, g, 1, 1) if g > 1 else x
        else:
            raise ValueError(f"CNN: expected image input (N, C, H, W) or (G, N, C, H, W) (got shape {tuple(x.shape)})")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.features(x).mean((2, 3))  # (N, G*C, H, W) -> (N, G*C)
        return self.out(h, out_members_first=True)


def build_model(cfg: dict, members: int, input_shape: tuple[int, ...], classes: int,
                dropout: list[float] | None = None) -> nn.Module:
    """A testbed from ``cfg`` = {"arch": "mlp"|"cnn", "widths"|"channels", "act", "norm", "norm_args"}."""
    arch = cfg.get("arch", "mlp")
    kw = dict(act=cfg.get("act", "relu"), norm=cfg.get("norm", "none"), norm_args=cfg.get("norm_args"), dropout=dropout)
    if arch == "mlp":
        return MLP(members, int(math.prod(input_shape)), list(cfg["widths"]), classes, **kw)
    if arch == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs image data (C, H, W) (got input shape {input_shape}); use arch=mlp")
        return CNN(members, input_shape[0], list(cfg.get("channels", [16, 32])), classes, **kw)
    raise ValueError(f"unknown arch {arch!r} (mlp, cnn)")
