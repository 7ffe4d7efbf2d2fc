"""C5 - the learned scale and shift (gamma, beta) add flexibility and help.

Claim: BN's learnable gamma and beta restore the representational power that normalizing takes
away (e.g. BN can represent the identity), and they help accuracy.

Sources: Ioffe & Szegedy 2015 (arXiv 1502.03167): gamma/beta let BN represent the identity (this
matters for sigmoids, whose linear regime normalization would otherwise pin); Frankle et al. 2021
(arXiv 2003.00152): training only gamma/beta of a random frozen network reaches far above chance.
Against: with ReLU followed by a linear layer, gamma and beta are largely absorbed by the next
layer.

Reproduce: ``bnlab audit --profile quick --claims C5`` (``--profile full`` for 10 seeds;
``--dataset mnist1d`` for the other shipped data set).

Protocol (CLAIMS.md): digits; MLP 64 -> 128 -> 128 -> 128 -> 10 with BN before each activation,
sigmoid and ReLU, torch's default Linear init; arms: affine (gamma and beta), no affine, gamma
only, beta only (gamma fixed at 1), plain (no BN). Adam 3e-3, 800 steps, batch 64. One run per
(activation, seed set) trains the four BN arms x the set's seeds side by side: every member has
gamma and beta, and the arm freezes them per member at their initial 1 and 0 (zero gradients, so
Adam never moves them: "no affine" is then exactly BN without affine parameters); plain is one
more run per (activation, seed set). Each seed has its own train/test split, shared by every arm.
Sub-test (ReLU net): freeze every weight but gamma/beta, the output layer included, vs a control
that trains as many randomly chosen hidden-layer weights (768 per seed: 2 x 3 x 128), everything
else frozen (gamma = 1, beta = 0); one run per (sub-test arm, seed set). Identity diagnostic
(affine arms): share of BN units with |gamma/sigma_B - 1| < 0.1 and |beta - mu_B| < 0.1 sigma_B,
with mu_B, sigma_B the population statistics of the unit's input after precise BN.

Decision (rules version 2): three parts, each by the default rule on paired per-seed differences
in test-accuracy points (supported when the 95% t-interval of the mean lies above 0 and the mean
>= delta; refuted when the interval lies below delta; else inconclusive): (a) "sigmoid": affine -
no affine, sigmoid net, delta 0.5; (b) "relu": the same for the ReLU net, delta 0.5; (c)
"gamma_beta_only": gamma/beta-only - its control, delta 10. A part whose two arms are at chance in
every run (best run < c + 0.1 (1 - c)) is degenerate (inconclusive). The parts use no threshold,
so there is no sensitivity. Gamma only, beta only, plain and the identity diagnostic are findings.
Quick: seeds 0-4; full: seeds 0-9 (two seed sets of 5); nothing else differs.
"""

from __future__ import annotations

import math

import numpy as np

from .. import data as D
from .. import metrics as M
from .. import stats
from ..plots import color, figure, label, save
from ..protocol import Plan, Run, classify_config, data_spec, rule_versions, step_cost

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
DATASETS = ["digits", "mnist1d"]

_BASE = {"dataset": "digits", "widths": [128, 128, 128], "batch": 64, "steps": 800, "lr": 3e-3,
         "acts": ["sigmoid", "relu"], "arms": ["affine", "no-affine", "gamma", "beta", "plain"], "subtest_act": "relu"}
PROFILES = {
    "tiny": dict(_BASE, seeds=[0, 1], steps=30, widths=[32, 32]),
    "quick": dict(_BASE, seeds=[0, 1, 2, 3, 4]),
    "full": dict(_BASE, seeds=list(range(10))),
}
ARM_AFFINE = {"affine": "both", "no-affine": "none", "gamma": "gamma", "beta": "beta"}
DELTA_AFFINE = 0.5  # points: affine - no affine
DELTA_GB = 10.0  # points: gamma/beta only - control
PARTS = {"sigmoid": "affine helps the sigmoid net", "relu": "affine helps the ReLU net",
         "gamma_beta_only": "gamma/beta alone can train"}

RULE_V1 = ("Supported if affine beats no-affine by >= 0.5 points (mean paired difference, affine ahead in >= 4/5 "
           "seeds) for at least the sigmoid net, and the gamma/beta-only net beats its random-weights control by "
           ">= 10 points; refuted if no-affine >= affine for both activations and gamma/beta-only is within 5 points "
           "of its control; else inconclusive.")
RULE = ("Three parts, each by the default rule on paired per-seed differences of test accuracy (points): (a) sigmoid: "
        "affine - no affine, delta 0.5; (b) relu: affine - no affine, delta 0.5; (c) gamma_beta_only: gamma/beta-only "
        "net - its control (as many random hidden weights trained), delta 10. Supported if the 95% t-interval of the "
        "mean lies above 0 and the mean is >= delta; refuted if the interval lies below delta (the opposite direction "
        "included); else inconclusive. A part whose two arms are at chance in every run is inconclusive (degenerate). "
        "The claim combines the parts (partly supported / partly refuted where they differ).")
RULES = rule_versions(RULE_V1, RULE, reason=(
    "v1 decided the claim jointly: supported needed the sigmoid net's gain (>= 0.5 points, ahead in 4/5 "
    "seeds) and the gamma/beta-only net >= 10 points above its control; refuted needed no gain in either "
    "net and gamma/beta-only within 5 points of its control, so 'helps' could be refuted only together "
    "with the sub-test; its interval was a percentile bootstrap over 5 seeds (about [min, max]). v2 decides "
    "the sigmoid net, the ReLU net and the gamma/beta-only sub-test as three parts, each supported or "
    "refuted by its own paired difference and t-interval, and calls a comparison of two arms at chance "
    "degenerate."))


# ------------------------------------------------------------------ runs
def _config(ctx, act: str, bn: bool, seeds: list[int], trainable: str = "all", arms: tuple[str, ...] = ()) -> dict:
    """One run per (activation, seed set) for the four BN arms (members: arm x seed, gamma/beta
    frozen per member as the arm says), one for plain, and one per (sub-test arm, seed set)."""
    s = ctx.settings
    if arms:
        members = [{"seed": sd, "lr": s["lr"], "affine": ARM_AFFINE[a]} for a in arms for sd in seeds]
    else:
        members = [{"seed": sd, "lr": s["lr"]} for sd in seeds]
    return classify_config(
        data=data_spec(ctx, s["dataset"]),
        model={"arch": "mlp", "widths": s["widths"], "act": act, "norm": "batch" if bn else "none",
               "norm_args": {"affine": "both"} if bn else {}},
        init={"kind": "default"}, optim={"kind": "adam"}, batch=s["batch"], steps=s["steps"], trainable=trainable,
        diagnostics=("identity",) if bn else (), members=members)


def _seed_sets(ctx) -> list[list[int]]:
    return [list(x) for x in (ctx.seed_sets or [ctx.seeds])]


def _bn_arms(ctx) -> tuple[str, ...]:
    return tuple(a for a in ctx.settings["arms"] if a != "plain")


def _subtest(ctx, seeds: list[int]) -> dict:
    a = ctx.settings["subtest_act"]
    return {"gb-only": _config(ctx, a, True, seeds, "norm_affine"),
            "control": _config(ctx, a, True, seeds, "random_hidden")}


def plan(ctx, results) -> Plan:
    s = ctx.settings
    runs = []
    for seeds in _seed_sets(ctx):
        n = len(seeds)
        cost = step_cost(n, s["steps"], len(s["widths"]), s["widths"][0], s["batch"], len(s["widths"]))
        tag = f"seeds {seeds[0]}-{seeds[-1]}"
        for act in s["acts"]:
            runs.append(Run(_config(ctx, act, True, seeds, arms=_bn_arms(ctx)), cost=cost * 1.5,
                            label=f"C5 {act} BN arms {tag}"))
            if "plain" in s["arms"]:
                runs.append(Run(_config(ctx, act, False, seeds), cost=cost * 0.6, label=f"C5 {act} plain {tag}"))
        runs += [Run(cfg, cost=cost, label=f"C5 {name} {tag}") for name, cfg in _subtest(ctx, seeds).items()]
    return Plan(runs)


# ------------------------------------------------------------------ metrics


def _chance(ctx) -> float:
    """1 / classes of the data set the runs used."""
    spec = data_spec(ctx, ctx.settings["dataset"])
    return D.chance(spec["name"], spec.get("data_dir"))


def _by_seed(ctx, members: list[dict]) -> dict[int, dict]:
    return {m["seed"]: m for m in members if m["seed"] in set(ctx.seeds)}


def _members(results, ctx, act: str, arm: str) -> dict[int, dict]:
    """seed -> member of one arm, collected over the seed sets' runs."""
    out: dict[int, dict] = {}
    for seeds in _seed_sets(ctx):
        if arm == "plain":
            ms = results.get(_config(ctx, act, False, seeds))["members"]
        else:
            ms = [m for m in results.get(_config(ctx, act, True, seeds, arms=_bn_arms(ctx)))["members"]
                  if m["affine"] == ARM_AFFINE[arm]]
        out.update(_by_seed(ctx, ms))
    return out


def _sub_members(results, ctx, name: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for seeds in _seed_sets(ctx):
        out.update(_by_seed(ctx, results.get(_subtest(ctx, seeds)[name])["members"]))
    return out


def _accs(ctx, by_seed: dict[int, dict]) -> list[float | None]:
    """Test accuracy in points per seed of ctx.seeds (diverged = chance; None = no member)."""
    return [None if sd not in by_seed else 100 * M.acc_or_chance(by_seed[sd]) for sd in ctx.seeds]


def _collect(ctx, results) -> tuple[dict, dict]:
    s = ctx.settings
    acc = {act: {arm: _accs(ctx, _members(results, ctx, act, arm)) for arm in s["arms"]} for act in s["acts"]}
    sub = {k: _accs(ctx, _sub_members(results, ctx, k)) for k in ("gb-only", "control")}
    return acc, sub


def _diff(a: list, b: list) -> list[float | None]:
    return [None if x is None or y is None else x - y for x, y in zip(a, b)]


def _at_chance(a: list, b: list, chance: float) -> str | None:
    """A degenerate reason when every run of both arms is at chance (best run barely above it)."""
    v = stats.finite(list(a) + list(b))
    if not v:
        return None
    _, reason = stats.trained_threshold(chance, max(v) / 100)
    if reason is None:
        return None
    return f"both arms at chance in every run (best run {max(v):.1f}% against chance {100 * chance:.1f}%)"


def _mean(v) -> float | None:
    f = stats.finite(v)
    return float(np.mean(f)) if f else None


def _pm(x) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def decide(ctx, results) -> dict:
    s = ctx.settings
    chance = _chance(ctx)
    acc, sub = _collect(ctx, results)
    units = "test accuracy points"
    parts = {}
    for act in ("sigmoid", "relu"):
        name = PARTS[act]
        if act not in s["acts"] or "affine" not in s["arms"] or "no-affine" not in s["arms"]:
            parts[act] = stats.part([], DELTA_AFFINE, units=units, seeds=[], rule=RULE, label=name,
                                    degenerate=f"the {act} net's affine and no-affine arms are not in this profile")
            continue
        a, b = acc[act]["affine"], acc[act]["no-affine"]
        parts[act] = stats.part(_diff(a, b), DELTA_AFFINE, units=units, seeds=ctx.seeds, rule=RULE,
                                label=f"{name} (affine - no affine)", degenerate=_at_chance(a, b, chance))
    parts["gamma_beta_only"] = stats.part(
        _diff(sub["gb-only"], sub["control"]), DELTA_GB, units=units, seeds=ctx.seeds, rule=RULE,
        label=f"{PARTS['gamma_beta_only']} (gamma/beta-only - control, {s['subtest_act']} net)",
        degenerate=_at_chance(sub["gb-only"], sub["control"], chance))

    findings = []
    for act in s["acts"]:
        ref = acc[act].get("affine")
        others = [arm for arm in ("no-affine", "gamma", "beta", "plain") if arm in acc[act]]
        if ref is None:
            continue
        bits = []
        for arm in others:
            d = stats.finite(_diff(acc[act][arm], ref))
            iv = stats.t_interval(d)
            bits.append(f"{label(arm)} {_pm(_mean(d))}" + ("" if iv is None else f" [{iv[0]:+.2f}, {iv[1]:+.2f}]"))
        findings.append(f"{act} net, each arm minus affine (points, mean and 95% t-interval over seeds): "
                        + "; ".join(bits) + ".")
    ident = {}
    for act in s["acts"]:
        if "affine" not in s["arms"]:
            continue
        ms = _members(results, ctx, act, "affine").values()
        ident[act] = float(np.mean([m.get("identity_share") or 0.0 for m in ms])) if ms else None
        if ident[act] is not None:
            findings.append(f"Identity diagnostic ({act}, affine arm): {100 * ident[act]:.1f}% of BN units learned to "
                            "undo the normalization (|gamma/sigma - 1| < 0.1 and |beta - mu| < 0.1 sigma).")
    rows = [[act, label(arm), f"{_mean(acc[act][arm]):.2f}", " ".join(f"{x:.1f}" for x in stats.finite(acc[act][arm]))]
            for act in s["acts"] for arm in s["arms"]]
    rows += [[s["subtest_act"], k, f"{_mean(v):.2f}", " ".join(f"{x:.1f}" for x in stats.finite(v))]
             for k, v in sub.items()]
    return stats.claim(
        parts, rule=RULE, findings=findings,
        metrics={"test_acc": acc, "subtest": sub, "identity_share": ident, "chance": chance},
        tables=[{"title": "Test accuracy % (mean and per seed)", "columns": ["activation", "arm", "mean", "per seed"],
                 "rows": rows}])


def decide_v1(ctx, results) -> dict:
    """Rules version 1 (RULE_V1) on the runs this version makes."""
    s = ctx.settings
    if "affine" not in s["arms"] or "no-affine" not in s["arms"]:
        return {"verdict": "n/a", "why": "the affine and no-affine arms are not in this profile"}
    acc, sub = _collect(ctx, results)
    diff = {act: stats.finite(_diff(acc[act]["affine"], acc[act]["no-affine"])) for act in s["acts"]}
    need = max(1, math.ceil(0.8 * len(ctx.seeds) - 1e-9))  # v1: 4 of 5 seeds, ceil(0.8 n)
    helps = {act: float(np.mean(d)) >= 0.5 and sum(x > 0 for x in d) >= need for act, d in diff.items()}
    gb_mean = float(np.mean(stats.finite(_diff(sub["gb-only"], sub["control"]))))
    main_act = "sigmoid" if "sigmoid" in s["acts"] else s["acts"][0]
    if helps[main_act] and gb_mean >= 10:
        verdict = "supported"
    elif all(_mean(acc[a]["no-affine"]) >= _mean(acc[a]["affine"]) for a in s["acts"]) and abs(gb_mean) < 5:
        verdict = "refuted"
    else:
        verdict = "inconclusive"
    why = "; ".join(f"{act}: affine - no-affine {np.mean(d):+.2f} points, ahead in {sum(x > 0 for x in d)}/{len(d)} "
                    f"seeds" for act, d in diff.items())
    return {"verdict": verdict, "why": f"{why}; gamma/beta-only - control {gb_mean:+.1f} points"}


def plots(ctx, results, outdir) -> list:
    s = ctx.settings
    acc, sub = _collect(ctx, results)
    acc = {act: {arm: stats.finite(v) for arm, v in x.items()} for act, x in acc.items()}
    sub = {k: stats.finite(v) for k, v in sub.items()}
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
    ax.axhline(100 * _chance(ctx), color="#999999", ls=":", lw=1)
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Only gamma/beta trained ({s['subtest_act']})")
    return [(save(fig, f"{outdir}/c5_affine_ablation.png"),
             "C5: affine ablation per activation, and a frozen random net trained only through gamma/beta vs the same "
             "number of random hidden weights (bars: mean; dots: seeds)")]
