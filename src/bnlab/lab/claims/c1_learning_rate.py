"""C1 - BN allows much higher learning rates.

Claim: with batch normalization a network trains at learning rates far above those at which
the same network without it diverges.

Sources: Ioffe & Szegedy 2015 (arXiv 1502.03167), BN-Inception at 5x and 30x the base rate;
Bjorck et al. 2018 (arXiv 1806.02375), larger rates are the main benefit; Santurkar et al. 2018
(arXiv 1805.11604), a wider range of usable rates. Against / nuance: De & Smith 2020
(arXiv 2002.10444), Fixup (arXiv 1901.09321).

Reproduce: ``bnlab audit --profile quick --claims C1`` (``--profile full`` for 10 seeds and both
shipped data sets).

Protocol (CLAIMS.md): two testbeds, the same grid and rule. "mlp": MLP 40 -> [128]x6 -> 10 on
mnist1d (flattened images on an image data set), ReLU, Kaiming init; Linear(bias=False) -> BN ->
ReLU vs Linear -> ReLU. "conv": on the claim's data set when it holds images, else on digits as
1x8x8 images (the protocol's conv testbed), three blocks of
conv3x3 (16 channels) -> BN -> ReLU (-> 2x2 max pooling), global average pooling, linear; the
plain arm's convolutions have a bias instead of BN. Plain SGD, batch 64, 500 steps; lr in
{0.01, 0.03, 0.1, 0.3, 1, 3, 10}. One run per (part, arm, seed set) trains every (seed, rate)
pair of that set side by side as stacked members; members with the same seed share the data
split, the init and the batches, in both arms. A second stage extends the grid by {30, 100} for
a seed set (both arms, every seed of the set) when either arm is stable at the top rate in some
seed of that set, by the loosest stability definition shown (final train loss < 1.0 ln K, or
the accuracy-based one).

Decision (rules version 2): see RULE. Stability (the verdict's): the loss stayed finite and the
final train loss (whole training set, eval mode after precise BN) < 0.9 ln K, K classes (ln 10
here). Per seed, d_s = BN's grid index of its max stable rate minus plain's (one index = one
half-decade step of the grid; 2 = 10x); delta = 2; default rule on the t-interval of the mean
d_s. Censored seeds (stable at the top of the extended grid) and seeds where an arm is never
stable give bounds, not values, and are marked. Sensitivity: loss thresholds 0.8 ln K (stricter)
and 1.0 ln K (looser: the loss of a uniform guess), both fixed before any run under rules v2,
and the accuracy-based stability (test accuracy at least halfway from chance to the arm's best
seed-mean accuracy over the grid) as its own row. The lr width (grid points within 2 accuracy
points of the arm's best seed-mean accuracy) is a finding.
Quick: seeds 0-4; full: seeds 0-9 (two seed sets of 5); nothing else differs.
"""

from __future__ import annotations

import dataclasses

import math
import statistics

import numpy as np

from .. import data as D
from .. import metrics as M
from .. import stats
from ..plots import color, figure, label, save
from ..protocol import Plan, Run, classify_config, data_spec, rule_versions, step_cost

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
PROTOCOL_CHANGES: list[str] = [
    "conv part: the testbed is bnlab's stacked CNN, which max-pools 2x2 after each conv-BN-ReLU block "
    "(8x8 -> 4x4 -> 2x2 -> 1x1 on digits) before the global average pooling and the linear layer, with 16 "
    "channels per block: small enough for the audit's budget; the pooling is part of that testbed, not chosen "
    "for this claim.",
]
DATASETS = ["mnist1d", "digits"]
IMAGE_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")  # data sets whose inputs are (C, H, W) images

_BASE = {"dataset": "mnist1d", "widths": [128] * 6, "conv_channels": [16, 16, 16], "batch": 64, "steps": 500,
         "conv_steps": 500, "lrs": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0], "extension": [30.0, 100.0]}
PROFILES = {
    "tiny": dict(_BASE, seeds=[0, 1], widths=[32, 32], conv_channels=[4, 4, 4], steps=40, conv_steps=40,
                 lrs=[0.1, 0.3, 1.0, 3.0], extension=[10.0]),
    "quick": dict(_BASE, seeds=[0, 1, 2, 3, 4]),
    "full": dict(_BASE, seeds=list(range(10))),
}
ARMS = {"plain": "none", "bn": "batch"}
PARTS = ("mlp", "conv")
DELTA = 2.0
UNITS = "grid steps (half-decades of the learning rate; 2 = 10x)"
LOSS_SHARES = {"stricter": 0.8, "default": 0.9, "looser": 1.0}  # stable: final train loss < share * ln K
ACC_SHARE = 0.5  # accuracy-based stability: test accuracy >= c + 0.5 (b - c), b = the arm's best seed-mean accuracy
ACC_KEY = "accuracy-based"

RULE_V1 = ("Per seed r_s = BN's max stable lr / plain's (stable: loss finite, final train loss < 0.9 ln 10). "
           "Supported if median r_s >= 10 (two grid points), r_s > 1 in every seed, and BN's lr width "
           "(grid points within 2 accuracy points of the arm's best, on seed-mean test accuracy) is larger; "
           "refuted if median r_s <= 3.16 (one grid point); else inconclusive.")
RULE = ("Two parts decided alone, the MLP ('mlp') and the conv net ('conv', on the data set's images, or on digits as 1x8x8 images when the data set has none). "
        "A run is stable when its loss stayed finite and its final train loss < 0.9 ln K (K classes; ln 10 here). "
        "Grid {0.01, 0.03, ..., 10}, extended by {30, 100} for a seed set where either arm is stable at 10 in some "
        "seed (by any stability definition shown). Per seed, d_s = BN's grid index of its max stable lr minus plain's"
        " (one index = one half-decade step; 2 = 10x); an arm with no stable rate counts as index -1 and one stable "
        "at the top of the (extended) grid is censored, so that seed's d_s is a bound (a lower bound when BN is "
        "censored or plain never stable). delta = 2. Supported if the 95% t-interval of the mean d_s lies above 0 and"
        " the mean is >= 2; refuted if the interval lies below 2; else inconclusive; a lower-bound d_s cannot refute "
        "and an upper-bound d_s cannot support (inconclusive instead). A seed where both arms sit at the same end of "
        "the grid (neither stable anywhere, or both censored) gives no d_s; the part is degenerate (inconclusive) "
        "when that holds for half the seeds or more. The loss threshold is also applied at 0.8 ln K (stricter) and "
        "1.0 ln K (looser), and the same rule is shown with accuracy-based stability (test accuracy >= c + 0.5 (b - "
        "c), c chance, b the arm's best seed-mean accuracy over the grid). lr width (grid points within 2 accuracy "
        "points of the arm's best seed-mean accuracy) is a finding.")
RULES = rule_versions(RULE_V1, RULE, reason=(
    "v1's interval was a percentile bootstrap of the median over 3-5 seeds (about [min, max] of the "
    "seeds) and its rule compared a median ratio with fixed cut-offs, no interval involved; BN stable "
    "at the top of the grid was read as a value although the grid ended there; one loss threshold "
    "alone decided stability; lr width, a finding, was a verdict input; and only an MLP was tested "
    "while most BN in the field sits in conv nets. v2 decides by the t-interval of the paired "
    "grid-index difference against delta 2, extends the grid and reports censored seeds as bounds, "
    "shows the verdict with accuracy-based stability and at two more loss thresholds, keeps lr width "
    "as a finding and adds a conv part."))


# ------------------------------------------------------------------ runs
def _dataset(ctx) -> str:
    return data_spec(ctx, ctx.settings["dataset"])["name"]


def _runs(ctx, part: str) -> bool:
    """Whether ``part`` runs: always (the conv part takes digits when the claim's data set has no
    images); kept as a hook for data sets neither testbed can read."""
    return part == "mlp" or _dataset(_part_ctx(ctx, part)) in IMAGE_DATASETS


def _part_ctx(ctx, part: str):
    """The context a part's runs are made in: the conv testbed reads digits as 1x8x8 images when
    the claim's data set is not an image set (mnist1d), as the protocol states."""
    if part == "conv" and _dataset(ctx) not in IMAGE_DATASETS:
        return dataclasses.replace(ctx, dataset="digits")
    return ctx


def _seed_sets(ctx) -> list[list[int]]:
    return [list(x) for x in (ctx.seed_sets or [ctx.seeds])]


def _extension(ctx) -> list[float]:
    s = ctx.settings
    ext = [float(x) for x in s["extension"]]
    if ext and min(ext) <= max(float(x) for x in s["lrs"]):
        raise ValueError(f"C1: the extension rates {ext} must lie above the grid {s['lrs']}")
    return ext


def _config(ctx, part: str, arm: str, seeds: list[int], lrs: list[float]) -> dict:
    s = ctx.settings
    if part == "mlp":
        model, steps = {"arch": "mlp", "widths": s["widths"], "act": "relu", "norm": ARMS[arm]}, s["steps"]
    else:
        model = {"arch": "cnn", "channels": s["conv_channels"], "act": "relu", "norm": ARMS[arm]}
        steps = s["conv_steps"]
    return classify_config(
        data=data_spec(_part_ctx(ctx, part), s["dataset"]), model=model, init={"kind": "kaiming"},
        optim={"kind": "sgd", "momentum": 0.0}, batch=s["batch"], steps=steps,
        members=[{"seed": seed, "lr": float(lr)} for seed in seeds for lr in lrs],
    )


def _cost(ctx, part: str, arm: str, members: int) -> float:
    """A rough cost (for the ETA): the conv net as an MLP of its depth and 3x its channels."""
    s = ctx.settings
    if part == "mlp":
        n, width, steps = len(s["widths"]), s["widths"][0], s["steps"]
    else:
        n, width, steps = len(s["conv_channels"]), 3 * s["conv_channels"][0], s["conv_steps"]
    return step_cost(members, steps, n, width, s["batch"], n if arm == "bn" else 0)


def _first_stage(ctx, results, part: str, seeds: list[int]) -> dict | None:
    """The base grid's members per arm for one seed set, or None while a run is missing."""
    out = {}
    for arm in ARMS:
        r = results.get(_config(ctx, part, arm, seeds, ctx.settings["lrs"]))
        if r is None:
            return None
        out[arm] = r["members"]
    return out


def _needs_extension(ctx, results, part: str, seeds: list[int], chance: float) -> bool | None:
    """Whether the seed set's grid is extended (None while the base grid's runs are missing): some
    seed of the set has an arm stable at the top rate by the loosest loss threshold or by accuracy."""
    first = _first_stage(ctx, results, part, seeds)
    if first is None:
        return None
    if not _extension(ctx):
        return False
    top = max(float(x) for x in ctx.settings["lrs"])
    loose = _loss_stable(LOSS_SHARES["looser"], chance)
    for ms in first.values():
        thr, _ = stats.trained_threshold(chance, _best_mean_acc(ms, chance), ACC_SHARE)
        for m in ms:
            if float(m["lr"]) == top and (loose(m) or M.is_stable_by_accuracy(m, thr)):
                return True
    return False


def plan(ctx, results) -> Plan:
    s = ctx.settings
    runs, pending = [], []
    ext = _extension(ctx)
    for part in PARTS:
        if not _runs(ctx, part):
            continue
        for seeds in _seed_sets(ctx):
            tag = f"seeds {seeds[0]}-{seeds[-1]}"
            for arm in ARMS:
                runs.append(Run(_config(ctx, part, arm, seeds, s["lrs"]),
                                cost=_cost(ctx, part, arm, len(s["lrs"]) * len(seeds)), label=f"C1 {part} {arm} {tag}"))
            if not ext:
                continue
            if _first_stage(ctx, results, part, seeds) is None:
                pending += [_cost(ctx, part, arm, len(ext) * len(seeds)) for arm in ARMS]
            elif _needs_extension(ctx, results, part, seeds, _chance(ctx)):
                runs += [Run(_config(ctx, part, arm, seeds, ext), cost=_cost(ctx, part, arm, len(ext) * len(seeds)),
                             label=f"C1 {part} {arm} {tag} grid extension") for arm in ARMS]
    return Plan(runs, pending)


# ------------------------------------------------------------------ metrics
def _chance(ctx) -> float:
    """1 / classes of the data set the runs used."""
    spec = data_spec(ctx, ctx.settings["dataset"])
    return D.chance(spec["name"], spec.get("data_dir"))


def _classes(chance: float) -> int:
    return int(round(1.0 / chance))


def _loss_stable(share: float, chance: float):
    """Loss-based stability: finite loss and final train loss < share * ln K."""
    limit = share * math.log(1.0 / chance)
    return lambda m: M.is_stable(m, limit)


def _by_lr(members: list[dict]) -> dict[float, list[dict]]:
    out: dict[float, list[dict]] = {}
    for m in members:
        out.setdefault(float(m["lr"]), []).append(m)
    return out


def _mean_acc(members: list[dict], chance: float) -> dict[float, float]:
    """Seed-mean test accuracy per rate (a diverged run counts at chance), over the seeds that ran it."""
    k = _classes(chance)
    return {lr: float(np.mean([M.acc_or_chance(m, classes=k) for m in ms]))
            for lr, ms in sorted(_by_lr(members).items())}


def _best_mean_acc(members: list[dict], chance: float) -> float:
    return max(_mean_acc(members, chance).values())


def _collect(ctx, results, part: str, chance: float) -> dict:
    """members[arm][seed][lr] -> member over every seed set's runs (extension included where it ran),
    and which seeds' grids were extended."""
    s = ctx.settings
    mem = {arm: {seed: {} for seed in ctx.seeds} for arm in ARMS}
    extended = {}
    for seeds in _seed_sets(ctx):
        ext = bool(_needs_extension(ctx, results, part, seeds, chance))
        for arm in ARMS:
            ms = list(results.get(_config(ctx, part, arm, seeds, s["lrs"]))["members"])
            if ext:
                ms += results.get(_config(ctx, part, arm, seeds, _extension(ctx)))["members"]
            for m in ms:
                if m["seed"] in mem[arm]:
                    mem[arm][m["seed"]][float(m["lr"])] = m
        extended.update({seed: ext for seed in seeds})
    return {"members": mem, "extended": extended,
            "grid": [float(x) for x in s["lrs"]] + (_extension(ctx) if any(extended.values()) else [])}


def _all(data: dict, arm: str) -> list[dict]:
    return [m for by_lr in data["members"][arm].values() for m in by_lr.values()]


def _seed_index(by_lr: dict[float, dict], stable) -> tuple[int, str]:
    """(grid index of the max stable rate, "none" | "top" | "")."""
    i = M.max_stable_index(by_lr, stable)
    return i, ("none" if i < 0 else "top" if i == len(by_lr) - 1 else "")


def _effects(ctx, data: dict, stable: dict) -> dict:
    """Per seed: each arm's index and flag, d_s (None: both arms at the same end of the grid) and
    whether d_s is a bound ("lower" / "upper")."""
    rows = []
    for seed in ctx.seeds:
        ib, fb = _seed_index(data["members"]["bn"][seed], stable["bn"])
        ip, fp = _seed_index(data["members"]["plain"][seed], stable["plain"])
        if fb == fp and fb in ("none", "top"):
            d, bound = None, "same end"
        else:
            d = float(ib - ip)
            bound = "lower" if (fb == "top" or fp == "none") else "upper" if (fp == "top" or fb == "none") else ""
        rows.append({"seed": seed, "bn": ib, "plain": ip, "bn_flag": fb, "plain_flag": fp, "d": d, "bound": bound})
    return {"rows": rows}


def _part(ctx, data: dict, stable: dict, *, part: str, what: str, degenerate: str | None = None) -> tuple[dict, dict]:
    """One decided comparison of the max stable rates under one stability definition."""
    eff = _effects(ctx, data, stable)
    rows = eff["rows"]
    n = len(rows)
    same = [r["seed"] for r in rows if r["d"] is None]
    if degenerate is None and same and len(same) >= n / 2:
        ends = sorted({"no stable rate in either arm" if r["bn_flag"] == "none" else "both arms stable at the top"
                       for r in rows if r["d"] is None})
        degenerate = (f"{len(same)} of {n} seeds have both arms at the same end of the grid ({'; '.join(ends)}; "
                      f"stable = {what}): the max stable rate cannot separate the arms")
    lower = [r["seed"] for r in rows if r["bound"] == "lower"]
    upper = [r["seed"] for r in rows if r["bound"] == "upper"]
    guard = {}

    def rule(effect, low, high, delta):
        v = stats.default_rule(effect, low, high, delta)
        if v == "refuted" and lower:
            guard["note"] = (f"the interval lies below delta, but d_s is only a lower bound in seed(s) "
                             f"{', '.join(map(str, lower))}: it cannot refute, so inconclusive")
            return "inconclusive"
        if v == "supported" and upper:
            guard["note"] = (f"the interval clears delta, but d_s is only an upper bound in seed(s) "
                             f"{', '.join(map(str, upper))}: it cannot support, so inconclusive")
            return "inconclusive"
        return v

    p = stats.part([r["d"] for r in rows], DELTA, units=UNITS, seeds=ctx.seeds, degenerate=degenerate, rule=RULE,
                   label=_label(ctx, part), decide=rule)
    notes = []
    if lower:
        notes.append(f"d_s is a lower bound in seed(s) {', '.join(map(str, lower))} (BN stable at the top of the grid "
                     f"or plain stable nowhere), so the effect is a lower bound")
    if upper:
        notes.append(f"d_s is an upper bound in seed(s) {', '.join(map(str, upper))} (plain stable at the top of the "
                     "grid or BN stable nowhere)")
    if same and p["degenerate"] is None:
        notes.append(f"seed(s) {', '.join(map(str, same))} give no d_s (both arms at the same end of the grid)")
    if "note" in guard:
        notes.append(guard["note"])
    if notes:
        p["why"] = p["why"] + "; " + "; ".join(notes)
    p["censored"] = {"lower_bound_seeds": lower, "upper_bound_seeds": upper, "no_effect_seeds": same}
    return p, eff


def _label(ctx, part: str) -> str:
    name = _dataset(_part_ctx(ctx, part))
    if part == "mlp":
        return f"MLP on {name}"
    return f"conv net on {name} images" if _runs(ctx, part) else "conv net (needs images)"


def _not_run(ctx, part: str) -> dict:
    reason = (f"the conv testbed needs images; {_dataset(ctx)} is not an image data set (the conv part runs on "
              "digits and the image data sets read with --data-dir)")
    keys = list(LOSS_SHARES) + [ACC_KEY]
    return stats.part([], DELTA, units=UNITS, seeds=[], degenerate=reason, rule=RULE, label=_label(ctx, part),
                      sensitivity={k: "inconclusive" for k in keys}, extra={"thresholds": _thresholds(None)})


def _thresholds(acc_thr: dict | None) -> dict:
    out = {k: f"final train loss < {v:.1f} ln K" + (" (a uniform guess)" if v == 1.0 else "")
           for k, v in LOSS_SHARES.items()}
    acc = f"test acc >= c + {ACC_SHARE:g} (b - c), b the arm's best"
    if acc_thr:
        acc += " (" + ", ".join(f"{label(a)} {100 * t:.1f}%" for a, t in acc_thr.items()) + ")"
    out[ACC_KEY] = acc
    return out


def _analyse(ctx, results, part: str, chance: float) -> dict:
    """Every stability definition's part and per-seed effects for one testbed."""
    data = _collect(ctx, results, part, chance)
    parts, effs = {}, {}
    for key, share in LOSS_SHARES.items():
        st = _loss_stable(share, chance)
        parts[key], effs[key] = _part(ctx, data, {a: st for a in ARMS}, part=part,
                                      what=f"final train loss < {share:g} ln K")
    best = {a: _best_mean_acc(_all(data, a), chance) for a in ARMS}
    acc_thr, deg = {}, None
    for a in ARMS:
        acc_thr[a], why = stats.trained_threshold(chance, best[a], ACC_SHARE)
        if why and deg is None:
            deg = f"{label(a)}: {why}"
    parts[ACC_KEY], effs[ACC_KEY] = _part(
        ctx, data, {a: (lambda t: (lambda m: M.is_stable_by_accuracy(m, t)))(acc_thr[a]) for a in ARMS}, part=part,
        what=f"test accuracy >= c + {ACC_SHARE:g} (b - c)", degenerate=deg)
    main = parts["default"]
    main["sensitivity"] = {k: parts[k]["verdict"] for k in list(LOSS_SHARES) + [ACC_KEY]}
    main["thresholds"] = _thresholds(acc_thr)
    acc = parts[ACC_KEY]
    main["accuracy_based"] = {k: acc[k] for k in ("verdict", "effect", "interval", "n", "sign", "p_wilcoxon",
                                                   "degenerate", "per_seed", "why", "censored")}
    return {"part": main, "parts": parts, "effects": effs, "data": data, "best": best, "acc_threshold": acc_thr}


# ------------------------------------------------------------------ decision
def _lr_text(lr_index: int, flag: str, grid: list[float], extended: bool) -> str:
    if flag == "none":
        return f"none (< {grid[0]:g})"
    lr = grid[lr_index]
    if flag == "top":
        return f">= {lr:g} (censored" + ("" if extended else ", grid not extended") + ")"
    return f"{lr:g}"


def _d_text(r: dict) -> str:
    if r["d"] is None:
        return "none (same end)"
    sign = {"lower": ">= ", "upper": "<= "}.get(r["bound"], "")
    return f"{sign}{r['d']:+g}"


def _tables(ctx, an: dict, chance: float, name: str) -> list[dict]:
    data, grid = an["data"], an["data"]["grid"]
    k = _classes(chance)
    loss_stable = _loss_stable(LOSS_SHARES["default"], chance)
    rows = []
    for lr in grid:
        row = [f"{lr:g}" + ("" if lr in ctx.settings["lrs"] else " (extension)")]
        for arm in ARMS:
            ms = [by_lr[lr] for by_lr in data["members"][arm].values() if lr in by_lr]
            thr = an["acc_threshold"][arm]
            row += [f"{100 * np.mean([M.acc_or_chance(m, classes=k) for m in ms]):.1f}",
                    f"{sum(loss_stable(m) for m in ms)}/{len(ms)}",
                    f"{sum(M.is_stable_by_accuracy(m, thr) for m in ms)}/{len(ms)}"]
        rows.append(row)
    seeds_rows = []
    for i, seed in enumerate(ctx.seeds):
        row = [seed]
        for key in ("default", ACC_KEY):
            r = an["effects"][key]["rows"][i]
            row += [_lr_text(r["plain"], r["plain_flag"], grid, data["extended"][seed]),
                    _lr_text(r["bn"], r["bn_flag"], grid, data["extended"][seed]), _d_text(r)]
        seeds_rows.append(row)
    return [
        {"title": f"{name}: test accuracy % (seed mean, diverged = chance) and stable runs per learning rate "
                  "(loss: final train loss < 0.9 ln K; acc: halfway from chance to the arm's best)",
         "columns": ["lr", "plain acc %", "plain stable (loss)", "plain stable (acc)", "BN acc %", "BN stable (loss)",
                     "BN stable (acc)"], "rows": rows},
        {"title": f"{name}: max stable learning rate per seed and d_s (grid steps; >= : a lower bound, censored)",
         "columns": ["seed", "plain (loss)", "BN (loss)", "d_s (loss)", "plain (acc)", "BN (acc)", "d_s (acc)"],
         "rows": seeds_rows},
    ]


def _width(an: dict, chance: float) -> dict:
    """lr width per arm on the seed-mean accuracies of the rates every seed ran."""
    data = an["data"]
    out = {}
    for arm in ARMS:
        common = set.intersection(*(set(b) for b in data["members"][arm].values()))
        accs = {lr: v for lr, v in _mean_acc(_all(data, arm), chance).items() if lr in common}
        out[arm] = M.lr_width(accs)
    return out


def _fmt_part(p: dict) -> str:
    if p["degenerate"]:
        return f"{p['verdict']} (degenerate: {p['degenerate']})"
    iv = p["interval"]
    return (f"{p['verdict']}, mean d_s {p['effect']:+.2f} grid steps [{iv['low']:+.2f}, {iv['high']:+.2f}], "
            f"n = {p['n']}")


def decide(ctx, results) -> dict:
    chance = _chance(ctx)
    parts, tables, findings, metrics = {}, [], [], {"chance": chance}
    findings.append("Stability thresholds fixed before any run under rules v2: final train loss < 0.9 ln K "
                    "(the verdict), 0.8 ln K (stricter) and 1.0 ln K (looser: the loss of a uniform guess); the "
                    "accuracy-based definition (test accuracy halfway from chance to the arm's best seed-mean "
                    "accuracy) is shown beside them as its own sensitivity row.")
    for part in PARTS:
        if not _runs(ctx, part):
            parts[part] = _not_run(ctx, part)
            findings.append(f"{part}: not run ({parts[part]['degenerate']}).")
            continue
        an = _analyse(ctx, results, part, chance)
        parts[part] = an["part"]
        name = "MLP" if part == "mlp" else "conv net"
        tables += _tables(ctx, an, chance, f"{name} ({_dataset(_part_ctx(ctx, part))})")
        width = _width(an, chance)
        ext = sorted(s for s, e in an["data"]["extended"].items() if e)
        findings.append(f"{part}: with accuracy-based stability: {_fmt_part(an['parts'][ACC_KEY])}; loss "
                        f"threshold 0.8 ln K: {an['parts']['stricter']['verdict']}, 1.0 ln K: "
                        f"{an['parts']['looser']['verdict']}.")
        findings.append(f"{part}: lr width (grid points within 2 accuracy points of the arm's best seed-mean accuracy, "
                        f"a finding, not a verdict input): BN {width['bn']} vs plain {width['plain']}.")
        cens = an["part"]["censored"]
        findings.append(f"{part}: grid extended by {', '.join(f'{x:g}' for x in _extension(ctx))} for seeds "
                        f"{', '.join(map(str, ext))}" if ext else f"{part}: no arm stable at the top rate "
                        f"{max(ctx.settings['lrs']):g} in any seed: the grid was not extended")
        if cens["lower_bound_seeds"]:
            findings.append(f"{part}: d_s is a lower bound (censored) in seeds "
                            f"{', '.join(map(str, cens['lower_bound_seeds']))}, so the effect is a lower bound.")
        metrics[part] = {
            "grid": an["data"]["grid"], "extended_seeds": ext, "lr_width": width, "best_mean_acc": an["best"],
            "acc_threshold": an["acc_threshold"],
            "mean_test_acc": {a: {f"{k:g}": v for k, v in _mean_acc(_all(an["data"], a), chance).items()}
                              for a in ARMS},
            "max_stable_lr": {key: {a: {str(r["seed"]): (None if r[f"{a}_flag"] == "none" else an["data"]["grid"][r[a]])
                                        for r in an["effects"][key]["rows"]} for a in ARMS}
                              for key in an["effects"]},
            "censored": {key: {a: [r["seed"] for r in an["effects"][key]["rows"] if r[f"{a}_flag"] == "top"]
                               for a in ARMS} for key in an["effects"]},
            "verdicts": {key: p["verdict"] for key, p in an["parts"].items()},
        }
    return stats.claim(parts, rule=RULE, tables=tables, findings=findings, metrics=metrics,
                       effect_label="BN's grid index of the max stable lr minus plain's (half-decade steps)")


def decide_v1(ctx, results) -> dict:
    """Rules version 1 (RULE_V1) on the runs this version makes: the MLP part's seven-rate grid
    (v1 had neither the grid extension nor the conv part)."""
    chance = _chance(ctx)
    data = _collect(ctx, results, "mlp", chance)
    lrs = [float(x) for x in ctx.settings["lrs"]]
    base = {a: {seed: [by_lr[lr] for lr in lrs] for seed, by_lr in data["members"][a].items()} for a in ARMS}
    msl = {a: {seed: M.max_stable_lr(ms) for seed, ms in base[a].items()} for a in ARMS}
    ratios = [M.lr_ratio(msl["bn"][s], msl["plain"][s]) for s in ctx.seeds]
    med = float(statistics.median(ratios))
    width = {a: M.lr_width({lr: float(np.mean([M.acc_or_chance(ms[i]) for ms in base[a].values()]))
                            for i, lr in enumerate(lrs)}) for a in ARMS}
    if med >= 10 and all(r > 1 for r in ratios) and width["bn"] > width["plain"]:
        verdict = "supported"
    elif med <= 3.16:
        verdict = "refuted"
    else:
        verdict = "inconclusive"
    why = (f"MLP, seven-rate grid: median r_s = {med:.3g} (per seed {', '.join(f'{r:.3g}' for r in ratios)}); lr width "
           f"BN {width['bn']} vs plain {width['plain']} grid points")
    return {"verdict": verdict, "why": why}


# ------------------------------------------------------------------ plots
def plots(ctx, results, outdir) -> list:
    chance = _chance(ctx)
    ran = [p for p in PARTS if _runs(ctx, p)]
    fig, axes = figure(2, len(ran), width=4.4)
    k = _classes(chance)
    for row, part in zip(axes, ran):
        data = _collect(ctx, results, part, chance)
        ax, ax2 = row
        name = "MLP" if part == "mlp" else "conv net"
        for arm in ARMS:
            c = color(arm)
            ms = _all(data, arm)
            means = _mean_acc(ms, chance)
            for m in ms:
                ax.scatter([m["lr"]], [100 * M.acc_or_chance(m, classes=k)], s=14, color=c, alpha=0.35,
                           marker="x" if m["diverged"] else "o", linewidths=1)
                loss = m["train_loss"]
                ax2.scatter([m["lr"]], [min(loss, 10.0) if loss is not None else 10.0], s=14, color=c, alpha=0.5,
                            marker="x" if m["diverged"] else "o", linewidths=1)
            ax.plot(list(means), [100 * v for v in means.values()], "-o", color=c, label=label(arm), lw=2, ms=4)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (plain SGD)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name}: test accuracy vs learning rate")
        ax.axhline(100 * chance, color="#bbbbbb", lw=1, ls=":")
        ax.legend(loc="lower left")
        lnk = math.log(1.0 / chance)
        for key, share in LOSS_SHARES.items():
            ax2.axhline(share * lnk, color="#c0392b", lw=1, ls="--" if key == "default" else ":",
                        label=f"{share:g} ln K" + (" (the verdict's limit)" if key == "default" else ""))
        ax2.set_xscale("log")
        ax2.set_ylim(0, 10.3)
        ax2.set_xlabel("learning rate (plain SGD)")
        ax2.set_ylabel("final train loss (x: diverged, shown at 10)")
        ax2.set_title(f"{name}: final train loss per run")
        ax2.legend(loc="upper left")
    return [(save(fig, f"{outdir}/c1_accuracy_vs_lr.png"),
             "C1: test accuracy and final train loss vs learning rate, per testbed (lines: seed mean; dots: seeds; "
             "x: diverged); the loss limits of the stability definitions are dashed/dotted")]
