"""C5 - the learned scale and shift (gamma, beta) add flexibility and help.

Claim: BN's learnable gamma and beta restore the representational power that normalizing takes
away (e.g. BN can represent the identity), and they help accuracy.

Sources: Ioffe & Szegedy 2015 (arXiv 1502.03167): gamma/beta let BN represent the identity (this
matters for sigmoids, whose linear regime normalization would otherwise pin); Frankle et al. 2021
(arXiv 2003.00152): training only gamma/beta of a random frozen network reaches far above chance.
Against: with ReLU followed by a linear layer, gamma and beta are largely absorbed by the next
layer.

Reproduce: ``bnlab audit --profile quick --claims C5`` (quick and full are the same protocol).

Protocol (CLAIMS.md): digits; MLP 64 -> 128 -> 128 -> 128 -> 10 with BN before each activation,
sigmoid and ReLU, torch's default Linear init; arms: affine (gamma and beta), no affine, gamma
only, beta only (gamma fixed at 1), plain (no BN). Adam 3e-3, 800 steps, batch 64; 5 seeds even
in quick (the affine effect is near seed noise, about 1 point on 450 test digits). One run per
activation trains the four BN arms x 5 seeds side by side: every member has gamma and beta, and
the arm freezes them per member at their initial 1 and 0 (zero gradients, so Adam never moves
them: "no affine" is then exactly BN without affine parameters); plain is one more run. Each
seed has its own train/test split.
Sub-test (ReLU net): freeze every weight but gamma/beta, the output layer included, vs a control
that trains as many randomly chosen hidden-layer weights (768 per seed: 2 x 3 x 128), everything
else frozen (gamma = 1, beta = 0). Identity diagnostic (affine arms): share of BN units with
|gamma/sigma_B - 1| < 0.1 and |beta - mu_B| < 0.1 sigma_B, with mu_B, sigma_B the population
statistics of the unit's input after precise BN.
Decision: supported if affine beats no-affine by >= 0.5 points (mean of paired per-seed
differences, and affine ahead in >= 4/5 seeds) for at least the sigmoid net, and the
gamma/beta-only net beats its control by >= 10 points (mean); refuted if no-affine >= affine
(seed means) for both activations and gamma/beta-only ~ control (|mean difference| < 5 points,
half the supporting margin, as the default rule's delta/2); else inconclusive.
"""

from __future__ import annotations

import numpy as np

from .. import metrics as M
from ..plots import color, figure, label, save
from ..protocol import Plan, Run, classify_config, data_spec, step_cost
from ..stats import bootstrap_ci, needed, per_seed

ID = "C5"
TITLE = "gamma and beta add flexibility and help"
CLAIM = ("BN's learned scale and shift (gamma, beta) give back the flexibility normalization takes away "
         "(BN can represent the identity) and improve accuracy.")
SOURCES = [
    "Ioffe & Szegedy 2015, arXiv 1502.03167 (gamma/beta let BN represent the identity; matters for sigmoids)",
    "Frankle et al. 2021, arXiv 2003.00152 (training only gamma/beta of a random frozen net)",
    "Against: with ReLU followed by a linear layer, gamma and beta are largely absorbed",
]
PROTOCOL_CHANGES: list[str] = []

_BASE = {"dataset": "digits", "widths": [128, 128, 128], "batch": 64, "steps": 800, "lr": 3e-3,
         "acts": ["sigmoid", "relu"], "arms": ["affine", "no-affine", "gamma", "beta", "plain"], "subtest_act": "relu"}
PROFILES = {
    "tiny": dict(_BASE, seeds=[0, 1], steps=30, widths=[32, 32]),
    "quick": dict(_BASE, seeds=[0, 1, 2, 3, 4]),
    "full": dict(_BASE, seeds=[0, 1, 2, 3, 4]),
}
ARM_AFFINE = {"affine": "both", "no-affine": "none", "gamma": "gamma", "beta": "beta"}
RULE = ("Supported if affine beats no-affine by >= 0.5 points (mean paired difference, affine ahead in >= 4/5 seeds) "
        "for at least the sigmoid net, and the gamma/beta-only net beats its random-weights control by >= 10 points; "
        "refuted if no-affine >= affine for both activations and gamma/beta-only is within 5 points of its control; "
        "else inconclusive.")


def _config(ctx, act: str, bn: bool, trainable: str = "all", arms: tuple[str, ...] = ()) -> dict:
    """One run per activation for the four BN arms (members: arm x seed, gamma/beta frozen per
    member as the arm says), one for plain, and one per sub-test arm."""
    s = ctx.settings
    if arms:
        members = [{"seed": sd, "lr": s["lr"], "affine": ARM_AFFINE[a]} for a in arms for sd in ctx.seeds]
    else:
        members = [{"seed": sd, "lr": s["lr"]} for sd in ctx.seeds]
    return classify_config(
        data=data_spec(ctx, s["dataset"]),
        model={"arch": "mlp", "widths": s["widths"], "act": act, "norm": "batch" if bn else "none",
               "norm_args": {"affine": "both"} if bn else {}},
        init={"kind": "default"}, optim={"kind": "adam"}, batch=s["batch"], steps=s["steps"], trainable=trainable,
        diagnostics=("identity",) if bn else (), members=members)


def _bn_arms(ctx) -> tuple[str, ...]:
    return tuple(a for a in ctx.settings["arms"] if a != "plain")


def _subtest(ctx) -> dict:
    a = ctx.settings["subtest_act"]
    return {"gb-only": _config(ctx, a, True, "norm_affine"), "control": _config(ctx, a, True, "random_hidden")}


def plan(ctx, results) -> Plan:
    s = ctx.settings
    n = len(ctx.seeds)
    cost = step_cost(n, s["steps"], len(s["widths"]), s["widths"][0], s["batch"], len(s["widths"]))
    runs = []
    for act in s["acts"]:
        runs.append(Run(_config(ctx, act, True, arms=_bn_arms(ctx)), cost=cost * 1.5, label=f"C5 {act} BN arms"))
        if "plain" in s["arms"]:
            runs.append(Run(_config(ctx, act, False), cost=cost * 0.6, label=f"C5 {act} plain"))
    runs += [Run(cfg, cost=cost, label=f"C5 {name}") for name, cfg in _subtest(ctx).items()]
    return Plan(runs)


def _members(results, ctx, act: str, arm: str) -> list[dict]:
    if arm == "plain":
        return results.get(_config(ctx, act, False))["members"]
    ms = results.get(_config(ctx, act, True, arms=_bn_arms(ctx)))["members"]
    return [m for m in ms if m["affine"] == ARM_AFFINE[arm]]


def _arm_accs(results, ctx, act: str, arm: str) -> list[float]:
    return [100 * M.acc_or_chance(m) for m in _members(results, ctx, act, arm)]


def _accs(results, cfg) -> list[float]:
    return [100 * M.acc_or_chance(m) for m in results.get(cfg)["members"]]


def decide(ctx, results) -> dict:
    s = ctx.settings
    need = needed(len(ctx.seeds))
    acc = {act: {arm: _arm_accs(results, ctx, act, arm) for arm in s["arms"]} for act in s["acts"]}
    diff = {act: [a - b for a, b in zip(acc[act]["affine"], acc[act]["no-affine"])] for act in s["acts"]}
    helps = {act: float(np.mean(d)) >= 0.5 and sum(x > 0 for x in d) >= need for act, d in diff.items()}
    sub = {k: _accs(results, c) for k, c in _subtest(ctx).items()}
    gb = [a - b for a, b in zip(sub["gb-only"], sub["control"])]
    gb_mean = float(np.mean(gb))
    main_act = "sigmoid" if "sigmoid" in s["acts"] else s["acts"][0]
    if helps[main_act] and gb_mean >= 10:
        verdict = "supported"
    elif all(np.mean(acc[a]["no-affine"]) >= np.mean(acc[a]["affine"]) for a in s["acts"]) and abs(gb_mean) < 5:
        verdict = "refuted"
    else:
        verdict = "inconclusive"
    parts = {}
    for act in s["acts"]:
        d = diff[act]
        parts[f"affine helps ({act})"] = {
            "verdict": "supported" if helps[act] else ("refuted" if np.mean(d) <= 0 else "inconclusive"),
            "why": f"affine - no-affine {np.mean(d):+.2f} points (seeds: {', '.join(f'{x:+.1f}' for x in d)}); "
                   f"affine ahead in {sum(x > 0 for x in d)}/{len(d)} seeds",
            "effect": float(np.mean(d)), "ci": bootstrap_ci(d)}
    parts["gamma/beta-only vs control"] = {
        "verdict": "supported" if gb_mean >= 10 else ("refuted" if abs(gb_mean) < 5 else "inconclusive"),
        "why": f"gamma/beta-only {np.mean(sub['gb-only']):.1f}% vs control {np.mean(sub['control']):.1f}% "
               f"({gb_mean:+.1f} points)", "effect": gb_mean, "ci": bootstrap_ci(gb)}
    why = "; ".join(f"{k}: {v['why']}" for k, v in parts.items())
    ident = {}
    for act in s["acts"]:
        ms = _members(results, ctx, act, "affine")
        ident[act] = float(np.mean([m.get("identity_share") or 0.0 for m in ms]))
    findings = [f"Identity diagnostic ({act}, affine arm): {100 * v:.1f}% of BN units learned to undo the "
                f"normalization (|gamma/sigma - 1| < 0.1 and |beta - mu| < 0.1 sigma)." for act, v in ident.items()]
    rows = [[act, label(arm), f"{np.mean(acc[act][arm]):.2f}", " ".join(f"{x:.1f}" for x in acc[act][arm])]
            for act in s["acts"] for arm in s["arms"]]
    rows += [[s["subtest_act"], k, f"{np.mean(v):.2f}", " ".join(f"{x:.1f}" for x in v)] for k, v in sub.items()]
    return {
        "verdict": verdict, "effect": float(np.mean(diff[main_act])),
        "effect_label": f"affine minus no-affine test accuracy, {main_act} net (points)",
        "per_seed": per_seed(ctx.seeds, diff[main_act]), "ci": bootstrap_ci(diff[main_act]), "rule": RULE, "why": why,
        "parts": parts, "findings": findings,
        "metrics": {"test_acc": acc, "subtest": sub, "identity_share": ident},
        "tables": [{"title": "Test accuracy % (mean and per seed)", "columns": ["activation", "arm", "mean", "per seed"],
                    "rows": rows}],
    }


def plots(ctx, results, outdir) -> list:
    s = ctx.settings
    acc = {act: {arm: _arm_accs(results, ctx, act, arm) for arm in s["arms"]} for act in s["acts"]}
    sub = {k: _accs(results, c) for k, c in _subtest(ctx).items()}
    fig, axes = figure(len(s["acts"]) + 1, 1, width=3.9)
    for ax, act in zip(axes[0], s["acts"]):
        for i, arm in enumerate(s["arms"]):
            v = acc[act][arm]
            ax.bar(i, np.mean(v), color=color(arm), alpha=0.9, width=0.75)
            ax.scatter([i] * len(v), v, color="black", s=8, zorder=3)
        ax.set_xticks(range(len(s["arms"])), [label(a).replace("BN + ", "").replace("BN, ", "") for a in s["arms"]],
                      rotation=25, ha="right")
        lo = min(min(v) for v in acc[act].values())
        ax.set_ylim(max(0, lo - 3), 100)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Affine ablation, {act}")
    ax = axes[0][-1]
    names = list(sub)
    for i, k in enumerate(names):
        ax.bar(i, np.mean(sub[k]), color=color(k), alpha=0.9, width=0.7)
        ax.scatter([i] * len(sub[k]), sub[k], color="black", s=8, zorder=3)
    ax.set_xticks(range(len(names)), ["gamma/beta only", "random weights\n(same count)"])
    ax.axhline(10, color="#999999", ls=":", lw=1)
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Only gamma/beta trained ({s['subtest_act']})")
    return [(save(fig, f"{outdir}/c5_affine_ablation.png"),
             "C5: affine ablation per activation, and a frozen random net trained only through gamma/beta vs the same "
             "number of random hidden weights (bars: mean; dots: seeds)")]
