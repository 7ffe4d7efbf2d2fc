"""C1 - BN allows much higher learning rates.

Claim: with batch normalization a network trains at learning rates far above those at which
the same network without it diverges.

Sources: Ioffe & Szegedy 2015 (arXiv 1502.03167), BN-Inception at 5x and 30x the base rate;
Bjorck et al. 2018 (arXiv 1806.02375), larger rates are the main benefit; Santurkar et al. 2018
(arXiv 1805.11604), a wider range of usable rates. Against / nuance: De & Smith 2020
(arXiv 2002.10444), Fixup (arXiv 1901.09321).

Reproduce: ``bnlab audit --profile quick --claims C1`` (``--profile full`` for 5 seeds).

Protocol (CLAIMS.md): mnist1d; MLP 40 -> [128]x6 -> 10, ReLU, Kaiming init;
Linear(bias=False) -> BN -> ReLU vs Linear -> ReLU; plain SGD, batch 64, 500 steps;
lr in {0.01, 0.03, 0.1, 0.3, 1, 3, 10} x seeds. One run per arm trains every (seed, rate) pair
side by side as stacked members; members with the same seed share the init and the batches.
A run is stable when its loss stays finite and its final train loss (full training set, eval
mode after precise BN) is below 0.9 ln 10. Per seed r_s = BN's max stable lr / plain's.
Quick: seeds 0-2; full: seeds 0-4; nothing else differs.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

from .. import metrics as M
from ..plots import color, figure, label, save
from ..protocol import Plan, Run, classify_config, data_spec, step_cost
from ..stats import bootstrap_ci, per_seed

ID = "C1"
TITLE = "BN allows much higher learning rates"
CLAIM = ("Batch normalization lets a network train at much higher learning rates: rates at which the "
         "plain network diverges train well with BN.")
SOURCES = [
    "Ioffe & Szegedy 2015, arXiv 1502.03167 (BN-Inception at 5x and 30x the base rate)",
    "Bjorck et al. 2018, arXiv 1806.02375 (larger rates are the main benefit)",
    "Santurkar et al. 2018, arXiv 1805.11604 (smoother loss, wider range of rates)",
    "Against/nuance: De & Smith 2020, arXiv 2002.10444; Fixup, arXiv 1901.09321",
]
PROTOCOL_CHANGES: list[str] = []

_BASE = {"dataset": "mnist1d", "widths": [128] * 6, "batch": 64, "steps": 500,
         "lrs": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]}
PROFILES = {
    "tiny": dict(_BASE, seeds=[0], widths=[32, 32], steps=40, lrs=[0.1, 10.0]),
    "quick": dict(_BASE, seeds=[0, 1, 2]),
    "full": dict(_BASE, seeds=[0, 1, 2, 3, 4]),
}
ARMS = {"plain": "none", "bn": "batch"}
RULE = ("Per seed r_s = BN's max stable lr / plain's (stable: loss finite, final train loss < 0.9 ln 10). "
        "Supported if median r_s >= 10 (two grid points), r_s > 1 in every seed, and BN's lr width "
        "(grid points within 2 accuracy points of the arm's best, on seed-mean test accuracy) is larger; "
        "refuted if median r_s <= 3.16 (one grid point); else inconclusive.")


def _config(ctx, arm: str) -> dict:
    s = ctx.settings
    return classify_config(
        data=data_spec(ctx, s["dataset"]),
        model={"arch": "mlp", "widths": s["widths"], "act": "relu", "norm": ARMS[arm]},
        init={"kind": "kaiming"}, optim={"kind": "sgd", "momentum": 0.0}, batch=s["batch"], steps=s["steps"],
        members=[{"seed": seed, "lr": float(lr)} for seed in ctx.seeds for lr in s["lrs"]],
    )


def plan(ctx, results) -> Plan:
    s = ctx.settings
    runs = []
    for arm in ARMS:
        cost = step_cost(len(s["lrs"]) * len(ctx.seeds), s["steps"], len(s["widths"]), s["widths"][0], s["batch"],
                         len(s["widths"]) if arm == "bn" else 0)
        runs.append(Run(_config(ctx, arm), cost=cost, label=f"C1 {arm}"))
    return Plan(runs)


def _collect(ctx, results) -> dict:
    """members[arm][seed] -> the seven learning rates' results."""
    out = {}
    for arm in ARMS:
        ms = results.get(_config(ctx, arm))["members"]
        out[arm] = {seed: [m for m in ms if m["seed"] == seed] for seed in ctx.seeds}
    return out


def _mean_acc(members_by_seed: dict, lrs) -> dict[float, float]:
    return {float(lr): float(np.mean([M.acc_or_chance(next(m for m in ms if m["lr"] == float(lr)))
                                      for ms in members_by_seed.values()])) for lr in lrs}


def decide(ctx, results) -> dict:
    data = _collect(ctx, results)
    lrs = ctx.settings["lrs"]
    msl = {arm: {seed: M.max_stable_lr(ms) for seed, ms in data[arm].items()} for arm in ARMS}
    ratios = [M.lr_ratio(msl["bn"][s], msl["plain"][s]) for s in ctx.seeds]
    med = float(statistics.median(ratios))
    acc = {arm: _mean_acc(data[arm], lrs) for arm in ARMS}
    width = {arm: M.lr_width(acc[arm]) for arm in ARMS}
    if med >= 10 and all(r > 1 for r in ratios) and width["bn"] > width["plain"]:
        verdict = "supported"
    elif med <= 3.16:
        verdict = "refuted"
    else:
        verdict = "inconclusive"
    why = (f"median r_s = {med:.3g} (per seed {', '.join(f'{r:.3g}' for r in ratios)}); lr width BN {width['bn']} "
           f"vs plain {width['plain']} grid points")
    rows = []
    for lr in lrs:
        row = [f"{lr:g}"]
        for arm in ARMS:
            stable = sum(M.is_stable(next(m for m in ms if m["lr"] == float(lr))) for ms in data[arm].values())
            row += [f"{100 * acc[arm][float(lr)]:.1f}", f"{stable}/{len(ctx.seeds)}"]
        rows.append(row)
    seeds_rows = [[s, f"{msl['plain'][s]:g}", f"{msl['bn'][s]:g}", f"{r:.3g}"] for s, r in zip(ctx.seeds, ratios)]
    return {
        "verdict": verdict, "effect": med, "effect_label": "median over seeds of BN's max stable lr / plain's (x)",
        "per_seed": per_seed(ctx.seeds, ratios), "ci": bootstrap_ci(ratios, np.median), "rule": RULE, "why": why,
        "metrics": {"max_stable_lr": {a: {str(s): v for s, v in d.items()} for a, d in msl.items()},
                    "lr_width": width, "mean_test_acc": {a: {f"{k:g}": v for k, v in d.items()} for a, d in acc.items()}},
        "tables": [
            {"title": "Test accuracy (seed mean, diverged = chance) and stable runs per learning rate",
             "columns": ["lr", "plain acc %", "plain stable", "BN acc %", "BN stable"], "rows": rows},
            {"title": "Max stable learning rate per seed", "columns": ["seed", "plain", "BN", "r_s"], "rows": seeds_rows},
        ],
    }


def plots(ctx, results, outdir) -> list:
    data = _collect(ctx, results)
    lrs = [float(x) for x in ctx.settings["lrs"]]
    fig, axes = figure(2, 1, width=4.4)
    ax, ax2 = axes[0]
    for arm in ARMS:
        c = color(arm)
        means = []
        for lr in lrs:
            vals = [M.acc_or_chance(next(m for m in ms if m["lr"] == lr)) for ms in data[arm].values()]
            means.append(100 * np.mean(vals))
            for ms in data[arm].values():
                m = next(m for m in ms if m["lr"] == lr)
                ax.scatter([lr], [100 * M.acc_or_chance(m)], s=14, color=c, alpha=0.35,
                           marker="x" if m["diverged"] else "o", linewidths=1)
                loss = m["train_loss"]
                ax2.scatter([lr], [min(loss, 10.0) if loss is not None else 10.0], s=14, color=c, alpha=0.5,
                            marker="x" if m["diverged"] else "o", linewidths=1)
        ax.plot(lrs, means, "-o", color=c, label=label(arm), lw=2, ms=4)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (plain SGD)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy vs learning rate")
    ax.axhline(10, color="#bbbbbb", lw=1, ls=":")
    ax.legend(loc="lower left")
    ax2.axhline(M.STABLE_LOSS, color="#c0392b", lw=1, ls="--", label="0.9 ln 10 (stability limit)")
    ax2.set_xscale("log")
    ax2.set_ylim(0, 10.3)
    ax2.set_xlabel("learning rate (plain SGD)")
    ax2.set_ylabel("final train loss (x: diverged, shown at 10)")
    ax2.set_title("Final train loss per run")
    ax2.legend(loc="upper left")
    return [(save(fig, f"{outdir}/c1_accuracy_vs_lr.png"), "C1: accuracy and final train loss vs learning rate "
             "(lines: seed mean; dots: seeds; x: diverged)")]
