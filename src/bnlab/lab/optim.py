"""Per-member optimizers for stacked testbeds: each member has its own learning rate, and a
member can be frozen when it diverges. Semantics follow torch.optim: SGD with
``buf = momentum * buf + grad; p -= lr * buf`` (no dampening), and Adam as in Kingma & Ba with bias
correction. Every parameter is member-major (``p.view(G, -1)[g]`` is member g's block).

When every member shares one Adam learning rate, torch's fused Adam does the update (one kernel:
Adam's half-dozen elementwise passes dominate a small model's step otherwise); per-member rates
use the foreach implementation here.
"""

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
        self.dead: list[int] = []
        self.steps = 0
        self._torch = None
        if kind == "adam" and len(set(lr)) == 1 and self.params:
            try:
                self._torch = torch.optim.Adam(self.params, lr=lr[0], betas=betas, eps=eps, fused=True)
            except (RuntimeError, TypeError, ValueError):
                self._torch = torch.optim.Adam(self.params, lr=lr[0], betas=betas, eps=eps, foreach=True)
            return
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

    def _state(self) -> list[Tensor]:
        if self._torch is not None:
            return [t for st in self._torch.state.values() for k, t in st.items()
                    if isinstance(t, Tensor) and k != "step" and t.dim() > 0]
        return (self._bufs or []) + (self._sq or [])

    def freeze(self, g: int) -> None:
        """Stop member g: its parameters and optimizer state zeroed (finite), no further updates."""
        if g not in self.dead:
            self.dead.append(g)
        self.lr[g] = 0.0
        with torch.no_grad():
            if self._torch is None:
                for t in self._lr:
                    t.view(self.members, -1)[g] = 0.0
            for t in self.params + self._state():
                t.view(self.members, -1)[g] = 0.0

    @torch.no_grad()
    def step(self) -> None:
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not idx:
            return
        if self.dead:  # frozen members: no update, and no nan from their gradients
            dead = torch.tensor(self.dead)
            for i in idx:
                self.params[i].grad.view(self.members, -1)[dead] = 0.0
        if self._torch is not None:
            self._torch.step()
            if self.dead:
                for i in idx:
                    self.params[i].view(self.members, -1)[dead] = 0.0
            return
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
