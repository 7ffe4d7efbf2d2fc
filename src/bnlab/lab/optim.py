"""Per-member optimizers for stacked testbeds: each member has its own learning rate, and a
member can be frozen (learning rate 0) when it diverges. Semantics follow torch.optim: SGD with
``buf = momentum * buf + grad; p -= lr * buf`` (no dampening), and Adam as in Kingma & Ba with
bias correction. Every parameter is member-major (``p.view(G, -1)[g]`` is member g's block)."""

from __future__ import annotations

import torch
from torch import Tensor


class MemberOptimizer:
    def __init__(self, params: list[Tensor], members: int, lr: list[float] | float, kind: str = "sgd",
                 momentum: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if kind not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {kind!r} (sgd, adam)")
        self.params = [p for p in params if p.requires_grad]
        self.members, self.kind, self.momentum, self.betas, self.eps = members, kind, momentum, betas, eps
        lr = [float(lr)] * members if isinstance(lr, (int, float)) else [float(v) for v in lr]
        self.lr = torch.tensor(lr)
        self.steps = 0
        # full-size learning-rate tensors, one per parameter, so every update is one foreach op
        self._lr = [self._expand(self.lr, p) for p in self.params]
        self._bufs = [torch.zeros_like(p) for p in self.params] if (kind == "adam" or momentum) else None
        self._sq = [torch.zeros_like(p) for p in self.params] if kind == "adam" else None

    def _expand(self, per_member: Tensor, p: Tensor) -> Tensor:
        g = self.members
        return per_member.to(p.dtype).reshape(g, 1).expand(g, p.numel() // g).reshape(p.shape).contiguous()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def freeze(self, g: int) -> None:
        """Stop member g: learning rate 0, its parameters and optimizer state zeroed (finite)."""
        self.lr[g] = 0.0
        with torch.no_grad():
            for i, p in enumerate(self.params):
                self._lr[i].view(self.members, -1)[g] = 0.0
            for group in (self.params, self._bufs or [], self._sq or []):
                for t in group:
                    t.view(self.members, -1)[g] = 0.0

    @torch.no_grad()
    def step(self) -> None:
        ps = [p for p in self.params if p.grad is not None]
        if len(ps) != len(self.params):
            idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        else:
            idx = list(range(len(self.params)))
        if not idx:
            return
        if bool((self.lr == 0).any()):  # frozen members: no update, and no nan from their grads
            dead = (self.lr == 0).nonzero().flatten()
            for i in idx:
                self.params[i].grad.view(self.members, -1)[dead] = 0.0
        ps = [self.params[i] for i in idx]
        grads = [self.params[i].grad for i in idx]
        lrs = [self._lr[i] for i in idx]
        self.steps += 1
        if self.kind == "sgd":
            if self.momentum:
                bufs = [self._bufs[i] for i in idx]
                torch._foreach_mul_(bufs, self.momentum)
                torch._foreach_add_(bufs, grads)
                grads = bufs
            torch._foreach_addcmul_(ps, grads, lrs, value=-1.0)
            return
        b1, b2 = self.betas
        m = [self._bufs[i] for i in idx]
        v = [self._sq[i] for i in idx]
        torch._foreach_lerp_(m, grads, 1 - b1)  # m = b1 m + (1 - b1) g
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)  # v = b2 v + (1 - b2) g^2
        c1 = 1 - b1 ** self.steps
        c2 = 1 - b2 ** self.steps
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, c2 ** 0.5)
        torch._foreach_add_(denom, self.eps)  # sqrt(v_hat) + eps
        upd = torch._foreach_div(m, denom)
        torch._foreach_mul_(upd, lrs)
        torch._foreach_add_(ps, upd, alpha=-1.0 / c1)  # p -= lr * m_hat / (sqrt(v_hat) + eps)
