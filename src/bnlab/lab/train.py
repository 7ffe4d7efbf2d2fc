"""One training run of a stacked classifier: the built-in task ``"classify"``.

``train_classify(config) -> dict`` is a pure function of its config (every generator is seeded
from it; one torch thread): G members (``config["members"]``, each with its own seed, learning
rate, init gain and dropout rate) trained side by side (:mod:`bnlab.lab.models`).

Config (every key explicit, so the config is the run's identity)::

    {"task": "classify",
     "data":  {"name": "digits", "subset": null, "val_fraction": 0.0, "data_dir": null},
     "model": {"arch": "mlp", "widths": [64, 64], "act": "relu", "norm": "batch", "norm_args": {}},
     "init":  {"kind": "kaiming", "std": null},
     "optim": {"kind": "sgd", "momentum": 0.9},
     "batch": 64, "steps": 300,            # or "epochs": 60 (steps = epochs * (M // batch))
     "eval":  {"every": 0, "target": null, "stop_at_target": false},
     "trainable": "all",                   # | "norm_affine" | "random_hidden"
     "diagnostics": [],                    # "grad_ratio", "identity"
     "members": [{"seed": 0, "lr": 0.1, "gain": 1.0, "dropout": 0.0}, ...]}

Protocol rules applied here (CLAIMS.md): precise BN (:func:`bnlab.tools.recalibrate` over the
whole training set) before every evaluation of a model with batch-norm layers; a member whose
loss turns non-finite is recorded as diverged at that step and frozen (its parameters zeroed,
learning rate 0), which leaves the other members untouched. Minibatches: a fresh permutation of
the training set per epoch per member seed, the last partial batch dropped. Dropout masks and
noisy-BN noise: one generator per member, seeded from that member's seed, so a member's numbers
do not depend on which other members train beside it.

Result: ``{"members": [{...metrics...}], "steps_run", "train_time_s", "eval_time_s"}`` with, per
member: ``diverged``, ``diverged_step``, ``train_loss``, ``train_acc``, ``test_acc``, ``test_nll``
(and ``val_*`` with a validation split), ``curve`` (when ``eval.every``), ``steps_to_target`` /
``time_to_target`` (when ``eval.target``; None if never reached), and the diagnostics asked for.
``time_*`` counts training steps only (no evaluation), in seconds of wall-clock.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.batchnorm import _BatchNorm
from ..tools.recalibrate import recalibrate
from . import data as D
from .models import StackedLinear, build_model, init_member
from .norms import precise_bn_pass, refresh_frozen_stats, set_generators
from .optim import MemberOptimizer

__all__ = ["train_classify", "setup", "Setup", "evaluate", "RECAL_MAX", "EVAL_CHUNK"]

RECAL_MAX = 8192  # precise BN uses at most this many training examples (all of them for the built-in data)
EVAL_CHUNK = 4096


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (the run's seeds and a purpose tag)."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def _chunks(x: Tensor, members_layout: bool, size: int) -> list[Tensor]:
    n = x.shape[1] if members_layout else x.shape[0]
    k = max(1, math.ceil(n / size))
    step = math.ceil(n / k)
    return [x[:, i : i + step] if members_layout else x[i : i + step] for i in range(0, n, step)]


@torch.no_grad()
def evaluate(model: nn.Module, sets: dict[str, tuple[Tensor, Tensor]], recal_x: Tensor | None,
             members_layout: bool) -> dict[str, tuple[Tensor, Tensor]]:
    """Precise BN over ``recal_x`` (if the model has BN), then per-member accuracy and mean NLL
    on each set, in eval mode. Returns ``{name: (acc (G,), nll (G,))}``."""
    model.input_layout = "members" if members_layout else "shared"
    if recal_x is not None and _has_bn(model):
        with precise_bn_pass(model):  # frozen-stats and ghost layers: the pass's own statistics
            recalibrate(model, _chunks(recal_x, members_layout, EVAL_CHUNK))
    was = model.training
    model.eval()
    out = {}
    for name, (x, y) in sets.items():
        correct, nll, n = 0, 0, 0
        for xc, yc in zip(_chunks(x, members_layout, EVAL_CHUNK), _chunks(y, members_layout, EVAL_CHUNK)):
            logits = model(xc).double()  # (G, n, K)
            g, m, k = logits.shape
            yy = yc if members_layout else yc.expand(g, m)
            nll = nll + F.cross_entropy(logits.reshape(g * m, k), yy.reshape(-1), reduction="none").view(g, m).sum(1)
            correct = correct + (logits.argmax(-1) == yy).sum(1)
            n += m
        out[name] = (correct.double() / n, nll / n)
    model.train(was)
    return out


def _identity_share(model: nn.Module, members: int) -> list[float]:
    """Share of BN units that learned to undo the normalization: |gamma/sigma - 1| < 0.1 and
    |beta - mu| < 0.1 sigma, with mu, sigma the population statistics of the BN input."""
    hits, total = torch.zeros(members), 0
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            c = m.num_features // members
            sigma = (m.running_var + m.eps).sqrt().view(members, c)
            mu = m.running_mean.view(members, c)
            gamma = m.weight.detach().view(members, c) if m.weight is not None else torch.ones(members, c)
            beta = m.bias.detach().view(members, c) if m.bias is not None else torch.zeros(members, c)
            ok = ((gamma / sigma - 1).abs() < 0.1) & ((beta - mu).abs() < 0.1 * sigma)
            hits += ok.sum(1)
            total += c
    return (hits / max(total, 1)).tolist()


def _trainable_masks(model: nn.Module, mode: str, members: int, gens: list[torch.Generator]) -> dict:
    """Freeze parameters per ``trainable``; return grad masks {param: 0/1 tensor} for subsets."""
    if mode == "all":
        return {}
    norm_params = [p for m in model.modules() if not isinstance(m, StackedLinear) and not hasattr(m, "member_weight")
                   for p in m.parameters(recurse=False)]
    norm_ids = {id(p) for p in norm_params}
    if mode == "norm_affine":  # gamma/beta only: every weight frozen, the output layer included
        for p in model.parameters():
            p.requires_grad_(id(p) in norm_ids and p.requires_grad)
        return {}
    if mode == "random_hidden":  # as many randomly chosen hidden weights as gamma/beta has, per member
        k = sum(p.numel() for p in norm_params) // members
        hidden = [m.weight for m in model.linears()[:-1]]
        for p in model.parameters():
            p.requires_grad_(False)
        sizes = [w.numel() // members for w in hidden]
        masks = {id(w): torch.zeros(members, sz) for w, sz in zip(hidden, sizes)}
        offsets = [0]
        for sz in sizes:
            offsets.append(offsets[-1] + sz)
        for g in range(members):
            chosen = torch.randperm(offsets[-1], generator=gens[g])[:k]
            for j, w in enumerate(hidden):
                sel = chosen[(chosen >= offsets[j]) & (chosen < offsets[j + 1])] - offsets[j]
                masks[id(w)][g, sel] = 1.0
        for w in hidden:
            w.requires_grad_(True)
        return {w: masks[id(w)].reshape(w.shape) for w in hidden}
    raise ValueError(f"unknown trainable {mode!r} (all, norm_affine, random_hidden)")


@dataclass
class Setup:
    """Everything a run starts from (built from the config alone)."""

    model: nn.Module
    opt: MemberOptimizer
    masks: dict
    x_train: Tensor
    y_train: Tensor
    eval_sets: dict
    data_shared: bool
    batch_members: bool
    seeds: list[int]
    order_gens: dict
    steps: int
    steps_per_epoch: int
    batch: int


def setup(cfg: dict) -> Setup:
    """Data, stacked model (initialized per member seed), trainable masks, optimizer, generators."""
    mem = cfg["members"]
    G = len(mem)
    seeds = [int(m["seed"]) for m in mem]
    splits = [D.prepare(cfg["data"], s) for s in seeds]
    data_shared = all(sp is splits[0] for sp in splits)
    sp0 = splits[0]
    if data_shared:
        x_train, y_train = sp0.x_train, sp0.y_train
        eval_sets = dict(sp0.evals)
    else:
        x_train = torch.stack([sp.x_train for sp in splits])  # (G, M, *in)
        y_train = torch.stack([sp.y_train for sp in splits])  # (G, M)
        eval_sets = {k: (torch.stack([sp.evals[k][0] for sp in splits]), torch.stack([sp.evals[k][1] for sp in splits]))
                     for k in sp0.evals}
    model = build_model(cfg["model"], G, sp0.input_shape, sp0.num_classes,
                        dropout=[float(m.get("dropout", 0.0)) for m in mem])
    init = cfg.get("init", {"kind": "kaiming"})
    gens = [torch.Generator().manual_seed(_mix(s, 1)) for s in seeds]
    for g in range(G):
        init_member(model, g, init["kind"], gens[g], float(mem[g].get("gain", 1.0)), init.get("std"))
    masks = _trainable_masks(model, cfg.get("trainable", "all"), G, gens)
    for p, m in _affine_masks(model, mem).items():
        masks[p] = masks[p] * m if p in masks else m
    oc = cfg["optim"]
    opt = MemberOptimizer(list(model.parameters()), G, [float(m["lr"]) for m in mem], oc["kind"],
                          momentum=float(oc.get("momentum", 0.0)))
    # one generator per member for its dropout masks and noise, seeded from its own seed only
    set_generators(model, [torch.Generator().manual_seed(_mix(s, 2)) for s in seeds])
    order_gens = {s: torch.Generator().manual_seed(_mix(s, 3)) for s in sorted(set(seeds))}
    M = sp0.x_train.shape[0]
    B = int(cfg["batch"])
    spe = M // B
    if spe == 0:
        raise ValueError(f"{cfg['data']['name']}: {M} training examples are fewer than one batch of {B}")
    T = int(cfg["steps"]) if cfg.get("steps") else int(cfg["epochs"]) * spe
    return Setup(model, opt, masks, x_train, y_train, eval_sets, data_shared,
                 not (data_shared and len(set(seeds)) == 1), seeds, order_gens, T, spe, B)


def _affine_masks(model: nn.Module, mem: list[dict]) -> dict:
    """Per-member gamma/beta freezing: a member's ``"affine"`` ("both", "none", "gamma", "beta")
    keeps that member's norm scale and/or shift at their initial 1 and 0 (zero gradients; Adam and
    SGD then never move them), so the affine ablation's arms train side by side in one model."""
    kinds = [m.get("affine") for m in mem]
    if all(k in (None, "both") for k in kinds):
        return {}
    g = len(mem)
    out = {}
    for mod in model.modules():
        if isinstance(mod, StackedLinear) or hasattr(mod, "member_weight"):
            continue
        for name in ("weight", "bias"):
            p = getattr(mod, name, None)
            if not isinstance(p, nn.Parameter) or not p.requires_grad:
                continue
            keep = [1.0 if k in (None, "both") or (k == "gamma" and name == "weight") or (k == "beta" and name == "bias")
                    else 0.0 for k in kinds]
            out[p] = torch.tensor(keep).repeat_interleave(p.numel() // g).reshape(p.shape)  # (G,) -> (G*C,)
    return out


def train_classify(cfg: dict, keep: dict | None = None) -> dict:
    """Train ``cfg`` (see the module docstring). ``keep``: a dict that receives the trained
    ``model`` and the ``setup`` (for tests and notebooks; not part of the result)."""
    st = setup(cfg)
    model, opt, masks = st.model, st.opt, st.masks
    x_train, y_train, eval_sets, data_shared = st.x_train, st.y_train, st.eval_sets, st.data_shared
    seeds, order_gens, T, spe, B = st.seeds, st.order_gens, st.steps, st.steps_per_epoch, st.batch
    mem = cfg["members"]
    G = len(mem)
    M = x_train.shape[1] if not data_shared else x_train.shape[0]
    ev = cfg.get("eval") or {}
    every, target = int(ev.get("every") or 0), ev.get("target")
    stop = bool(ev.get("stop_at_target"))
    diags = set(cfg.get("diagnostics") or [])
    recal_x = x_train if M <= RECAL_MAX else (x_train[:RECAL_MAX] if data_shared else x_train[:, :RECAL_MAX])
    batch_members = st.batch_members
    ar = torch.arange(G).unsqueeze(1)

    alive = torch.ones(G, dtype=torch.bool)
    diverged_step: list[int | None] = [None] * G
    curves = [{"step": [], "time": [], "train_loss": [], **{f"{k}_acc": [] for k in eval_sets}} for _ in range(G)]
    reached: list[int | None] = [None] * G
    reached_t: list[float | None] = [None] * G
    loss_sum, loss_n = torch.zeros(G, dtype=torch.float64), 0
    grad_info = None
    train_time = eval_time = 0.0
    perm = None
    t = 0
    model.train()
    for t in range(T):
        epoch, i = divmod(t, spe)
        if i == 0:
            perms = {s: torch.randperm(M, generator=gg) for s, gg in order_gens.items()}
            perm = torch.stack([perms[s] for s in seeds])  # (G, M)
            if epoch >= 1:
                model.input_layout = "shared" if data_shared else "members"
                refresh_frozen_stats(model, x_train)  # no-op without frozen-stats layers
        idx = perm[:, i * B : (i + 1) * B]  # (G, B)
        t0 = time.perf_counter()
        if not batch_members:
            xb, yb = x_train[idx[0]], y_train[idx[0]].expand(G, B)
            model.input_layout = "shared"
        else:
            xb = x_train[idx] if data_shared else x_train[ar, idx]  # (G, B, *in)
            yb = y_train[idx] if data_shared else y_train[ar, idx]  # (G, B)
            model.input_layout = "members"
        logits = model(xb)  # (G, B, K)
        k = logits.shape[-1]
        losses = F.cross_entropy(logits.reshape(G * B, k), yb.reshape(-1), reduction="none").view(G, B).mean(1)
        bad = alive & ~torch.isfinite(losses.detach())
        newly_dead = bad.nonzero().flatten().tolist()
        for g in newly_dead:
            diverged_step[g] = t
            alive[g] = False
        if not alive.any():
            for g in newly_dead:
                opt.freeze(g)
            train_time += time.perf_counter() - t0
            break
        opt.zero_grad()
        losses[alive].sum().backward()
        for g in newly_dead:  # after backward: the graph holds the parameters it used
            opt.freeze(g)
        if t == 0 and "grad_ratio" in diags:
            lin = model.linears()
            first, last = (lin[0].weight.grad.view(G, -1).norm(dim=1), lin[-1].weight.grad.view(G, -1).norm(dim=1))
            grad_info = (first.tolist(), last.tolist())
        for p, mask in masks.items():
            if p.grad is not None:
                p.grad.mul_(mask)
        opt.step()
        train_time += time.perf_counter() - t0
        loss_sum += torch.where(alive, losses.detach().double(), torch.zeros(G, dtype=torch.float64))
        loss_n += 1
        if every and (t + 1) % every == 0:
            e0 = time.perf_counter()
            res = evaluate(model, eval_sets, recal_x, not data_shared)
            model.train()
            eval_time += time.perf_counter() - e0
            for g in range(G):
                c = curves[g]
                c["step"].append(t + 1)
                c["time"].append(round(train_time, 6))
                c["train_loss"].append(float(loss_sum[g] / loss_n) if alive[g] else None)
                for name, (acc, _) in res.items():
                    c[f"{name}_acc"].append(float(acc[g]) if alive[g] else None)
                if target is not None and reached[g] is None and alive[g] and float(res["test"][0][g]) >= target:
                    reached[g], reached_t[g] = t + 1, round(train_time, 6)
            loss_sum.zero_()
            loss_n = 0
            if stop and target is not None and all(reached[g] is not None or not alive[g] for g in range(G)):
                break
    steps_run = t + 1
    e0 = time.perf_counter()
    final = evaluate(model, {"train": (x_train, y_train), **eval_sets}, recal_x, not data_shared)
    ident = _identity_share(model, G) if "identity" in diags else None
    eval_time += time.perf_counter() - e0
    out_members = []
    for g in range(G):
        r: dict = {"seed": seeds[g], "lr": float(mem[g]["lr"]), "gain": float(mem[g].get("gain", 1.0)),
                   **({"affine": mem[g]["affine"]} if "affine" in mem[g] else {}),
                   "dropout": float(mem[g].get("dropout", 0.0)), "diverged": not bool(alive[g]),
                   "diverged_step": diverged_step[g]}
        for name, (acc, nll) in final.items():
            ok = bool(alive[g]) and math.isfinite(float(nll[g]))
            r[f"{name}_acc"] = float(acc[g]) if ok else None
            r[f"{name}_nll"] = float(nll[g]) if ok else None
        r["train_loss"] = r.pop("train_nll")
        if every:
            r["curve"] = curves[g]
        if target is not None:
            r["steps_to_target"], r["time_to_target"] = reached[g], reached_t[g]
        if grad_info is not None:
            f, l = grad_info[0][g], grad_info[1][g]
            r["grad_first"], r["grad_last"] = f, l
            r["grad_ratio"] = f / l if l > 0 and math.isfinite(f) else None
        if ident is not None:
            r["identity_share"] = ident[g]
        out_members.append(r)
    if keep is not None:
        keep.update(model=model, setup=st)
    return {"members": out_members, "steps_run": steps_run, "train_time_s": train_time, "eval_time_s": eval_time}

