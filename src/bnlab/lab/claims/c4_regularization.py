"""C4 - BN reduces overfitting a little, like dropout, so less dropout is needed.

Claim: the noise of batch statistics regularizes: BN narrows the train/test gap a little, and a
BN network needs less (or no) dropout.

Sources: Ioffe & Szegedy 2015 (arXiv 1502.03167) removed dropout and cut weight decay; Luo et al.
2019 (arXiv 1809.00846), BN's regularization from batch noise; ghost BN (Hoffer et al. 2017,
arXiv 1705.08741) regularizes more with smaller virtual batches. Against: Li et al. 2019 (arXiv
1801.05134), dropout before BN causes a train/test variance shift; Bjorck et al. 2018 (arXiv
1806.02375), the generalization gain comes mostly through larger learning rates.

Reproduce: ``bnlab audit --profile full --claims C4`` (``--profile quick``: 30 epochs).

Protocol (CLAIMS.md): a 1000-example training subset of mnist1d (drawn with each seed); MLP
40 -> 256 -> 256 -> 10, ReLU, Kaiming init; Adam 1e-3 (fixed, so the rate is no confound), 60
epochs, batch 32 (31 steps an epoch, the last partial batch dropped). Arms: plain, BN,
BN-frozen-stats (after epoch 1, full-training-set statistics recomputed at the start of every
epoch with one batched forward and used, fixed, for that epoch: BN without the batch noise),
ghost BN with virtual batch 8; each with dropout p in {0, 0.2, 0.5} after every hidden activation.
One run per arm trains the 5 seeds x 3 dropout rates side by side. Metrics: test accuracy,
generalization gap (train - test accuracy, points), test NLL; gaps compared at p = 0.
Decision ((a) and (b) are one joint condition): (a) BN's gap >= 1 point below both plain's and
BN-frozen's in >= 4/5 seeds, and BN's test NLL below plain's in >= 4/5 seeds; (b) BN's best p <=
plain's best p (best = highest seed-mean test accuracy, ties to the smaller p) and BN at p = 0
within 1 point of plain at its best p. Supported if (a) and (b); refuted if BN's gap >= plain's
(seed means, p = 0) and BN's gap is within 1 point of BN-frozen's (the batch noise does
nothing); else inconclusive.
Seeds: 5 even in quick (seed noise is about +-2 points; the effect is 1-3 points).
Quick: 30 epochs instead of 60 (at 60 this claim is half of the quick audit's compute). Measured
at 30 epochs: at p = 0, where gaps are compared, plain and BN fit the training set (100%), frozen
99%, ghost 98%; the p = 0.5 arms are less fitted (about 70%) than at 60 epochs, which can move
"best p". Full: the protocol as stated.
"""

from __future__ import annotations

import numpy as np

from .. import metrics as M
from ..plots import color, figure, label, save
from ..protocol import Plan, Run, classify_config, data_spec, step_cost
from ..stats import bootstrap_ci, needed, per_seed

ID = "C4"
TITLE = "BN regularizes a little, like dropout"
CLAIM = ("Batch normalization reduces overfitting a little, as dropout does (through the noise of batch "
         "statistics), so a BN network needs less dropout.")
SOURCES = [
    "Ioffe & Szegedy 2015, arXiv 1502.03167 (dropout removed, weight decay cut)",
    "Luo et al. 2019, arXiv 1809.00846 (regularization from batch noise)",
    "Hoffer et al. 2017, arXiv 1705.08741 (ghost BN: smaller virtual batches regularize more)",
    "Against: Li et al. 2019, arXiv 1801.05134 (dropout before BN: variance shift); Bjorck et al. 2018, arXiv 1806.02375",
]
PROTOCOL_CHANGES = [
    "Quick profile only: 30 epochs instead of 60, to keep the quick audit within its 3-minute budget "
    "(full runs the stated 60). Chosen from timing measurements, before comparing verdicts.",
]

_BASE = {"dataset": "mnist1d", "subset": 1000, "widths": [256, 256], "batch": 32, "epochs": 60, "lr": 1e-3,
         "dropouts": [0.0, 0.2, 0.5], "virtual_batch": 8, "arms": ["plain", "bn", "frozen", "ghost"]}
PROFILES = {
    "tiny": dict(_BASE, seeds=[0, 1], epochs=2, subset=256, dropouts=[0.0, 0.5], widths=[32, 32]),
    "quick": dict(_BASE, seeds=[0, 1, 2, 3, 4], epochs=30),
    "full": dict(_BASE, seeds=[0, 1, 2, 3, 4]),
}
NORM = {"plain": "none", "bn": "batch", "frozen": "frozen-stats", "ghost": "ghost"}
RULE = ("(a) BN's gap (train - test acc, p = 0) >= 1 point below both plain's and BN-frozen's in >= 4/5 seeds, and "
        "BN's test NLL below plain's in >= 4/5 seeds; (b) BN's best dropout p <= plain's and BN at p = 0 within 1 "
        "point of plain at its best p. Supported if (a) and (b); refuted if BN's mean gap >= plain's and within 1 "
        "point of BN-frozen's; else inconclusive.")


def _config(ctx, arm: str) -> dict:
    s = ctx.settings
    norm_args = {"virtual_batch_size": s["virtual_batch"]} if arm == "ghost" else {}
    return classify_config(
        data=data_spec(ctx, s["dataset"], subset=s["subset"]),
        model={"arch": "mlp", "widths": s["widths"], "act": "relu", "norm": NORM[arm], "norm_args": norm_args},
        init={"kind": "kaiming"}, optim={"kind": "adam"}, batch=s["batch"], epochs=s["epochs"],
        members=[{"seed": sd, "lr": s["lr"], "dropout": float(p)} for sd in ctx.seeds for p in s["dropouts"]])


def plan(ctx, results) -> Plan:
    s = ctx.settings
    steps = s["epochs"] * (s["subset"] // s["batch"])
    runs = [Run(_config(ctx, arm), cost=step_cost(len(ctx.seeds) * len(s["dropouts"]), steps, len(s["widths"]),
                                                  s["widths"][0], s["batch"], 0 if arm == "plain" else 2),
                label=f"C4 {arm}") for arm in s["arms"]]
    return Plan(runs)


def _table(ctx, results) -> dict:
    """m[arm][p][seed] -> member result."""
    out = {}
    for arm in ctx.settings["arms"]:
        out[arm] = {}
        for m in results.get(_config(ctx, arm))["members"]:
            out[arm].setdefault(m["dropout"], {})[m["seed"]] = m
    return out


def _gap(m) -> float:
    g = M.gap_points(m)
    return float("nan") if g is None else g


def _best_p(ctx, t, arm) -> float:
    accs = {p: np.mean([M.acc_or_chance(t[arm][p][sd]) for sd in ctx.seeds]) for p in sorted(t[arm])}
    return max(sorted(accs), key=lambda p: (round(accs[p], 12), -p))


def decide(ctx, results) -> dict:
    s = ctx.settings
    t = _table(ctx, results)
    seeds = ctx.seeds
    need = needed(len(seeds))
    gap = {arm: [_gap(t[arm][0.0][sd]) for sd in seeds] for arm in s["arms"]}
    nll = {arm: [t[arm][0.0][sd]["test_nll"] for sd in seeds] for arm in s["arms"]}
    a_gap = sum(gap["bn"][i] <= gap["plain"][i] - 1 and gap["bn"][i] <= gap["frozen"][i] - 1 for i in range(len(seeds)))
    a_nll = sum(nll["bn"][i] is not None and nll["plain"][i] is not None and nll["bn"][i] < nll["plain"][i]
                for i in range(len(seeds)))
    cond_a = a_gap >= need and a_nll >= need
    best = {arm: _best_p(ctx, t, arm) for arm in s["arms"]}
    acc = {arm: {p: float(np.mean([M.acc_or_chance(t[arm][p][sd]) for sd in seeds])) for p in t[arm]} for arm in s["arms"]}
    cond_b = best["bn"] <= best["plain"] and acc["bn"][0.0] >= acc["plain"][best["plain"]] - 0.01
    mg = {arm: float(np.nanmean(gap[arm])) for arm in s["arms"]}
    if cond_a and cond_b:
        verdict = "supported"
    elif mg["bn"] >= mg["plain"] and abs(mg["bn"] - mg["frozen"]) <= 1.0:
        verdict = "refuted"
    else:
        verdict = "inconclusive"
    effect = [p - b for p, b in zip(gap["plain"], gap["bn"])]
    why = (f"(a) BN's gap >= 1 point below plain's and frozen's in {a_gap}/{len(seeds)} seeds, NLL below plain's in "
           f"{a_nll}/{len(seeds)} -> {'holds' if cond_a else 'fails'}; (b) best p BN {best['bn']:g} vs plain "
           f"{best['plain']:g}, BN at p=0 {100 * acc['bn'][0.0]:.1f}% vs plain at best p {100 * acc['plain'][best['plain']]:.1f}% "
           f"-> {'holds' if cond_b else 'fails'}; mean gap at p=0: " + ", ".join(f"{label(a)} {mg[a]:.1f}" for a in s["arms"]))
    rows = []
    for arm in s["arms"]:
        for p in s["dropouts"]:
            ms = [t[arm][float(p)][sd] for sd in seeds]
            rows.append([label(arm), f"{p:g}", f"{100 * np.mean([M.acc_or_chance(m) for m in ms]):.1f}",
                         f"{np.nanmean([_gap(m) for m in ms]):.1f}",
                         f"{np.mean([m['test_nll'] for m in ms if m['test_nll'] is not None]):.3f}",
                         f"{100 * np.mean([m['train_acc'] or 0 for m in ms]):.1f}"])
    findings = []
    if "ghost" in s["arms"]:
        findings.append(f"Ghost BN (virtual batch {s['virtual_batch']}) mean gap at p=0: {mg['ghost']:.1f} points vs "
                        f"BN {mg['bn']:.1f} (Hoffer et al.: smaller ghost batches regularize more).")
    findings.append("Gap = train accuracy - test accuracy on the full 1000-example training subset and the 1000 test "
                    "examples, after precise BN (eval mode: no dropout).")
    return {
        "verdict": verdict, "effect": float(np.nanmean(effect)),
        "effect_label": "plain's gap minus BN's gap at p = 0 (accuracy points; > 0: BN overfits less)",
        "per_seed": per_seed(seeds, effect), "ci": bootstrap_ci(effect), "rule": RULE, "why": why,
        "findings": findings,
        "metrics": {"gap_p0": gap, "nll_p0": nll, "best_p": best,
                    "mean_test_acc": {a: {f"{p:g}": v for p, v in d.items()} for a, d in acc.items()}},
        "tables": [{"title": "Per arm and dropout rate (means over seeds)",
                    "columns": ["arm", "dropout p", "test acc %", "gap (points)", "test NLL", "train acc %"],
                    "rows": rows}],
    }


def plots(ctx, results, outdir) -> list:
    s = ctx.settings
    t = _table(ctx, results)
    fig, axes = figure(2, 1, width=4.8)
    ax, ax2 = axes[0]
    n_arm = len(s["arms"])
    w = 0.8 / n_arm
    for i, arm in enumerate(s["arms"]):
        for j, p in enumerate(s["dropouts"]):
            ms = [t[arm][float(p)][sd] for sd in ctx.seeds]
            gaps = [_gap(m) for m in ms]
            accs = [100 * M.acc_or_chance(m) for m in ms]
            x = j + (i - (n_arm - 1) / 2) * w
            ax.bar(x, np.nanmean(gaps), width=w * 0.92, color=color(arm), label=label(arm) if j == 0 else None, alpha=0.9)
            ax.scatter([x] * len(gaps), gaps, color="black", s=7, zorder=3)
            ax2.bar(x, np.mean(accs), width=w * 0.92, color=color(arm), label=label(arm) if j == 0 else None, alpha=0.9)
            ax2.scatter([x] * len(accs), accs, color="black", s=7, zorder=3)
    for a, title, ylab in ((ax, "Generalization gap", "train - test accuracy (points)"),
                           (ax2, "Test accuracy", "test accuracy (%)")):
        a.set_xticks(range(len(s["dropouts"])), [f"dropout {p:g}" for p in s["dropouts"]])
        a.set_title(title)
        a.set_ylabel(ylab)
    lo = min(100 * M.acc_or_chance(t[a][float(p)][sd]) for a in s["arms"] for p in s["dropouts"] for sd in ctx.seeds)
    ax2.set_ylim(max(0, lo - 5), None)
    ax.legend(loc="upper right", fontsize=7.5)
    return [(save(fig, f"{outdir}/c4_gap_by_arm_and_dropout.png"),
             "C4: generalization gap and test accuracy by arm and dropout rate (bars: seed mean; dots: seeds)")]
