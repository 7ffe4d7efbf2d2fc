"""C6 - BN is bad for RNNs: fine "vertically", harmful "horizontally" (exploding gradients).

Claim: batch normalization works between stacked recurrent layers (on the input-to-hidden path)
but hurts between time steps (on the hidden-to-hidden path), because it makes gradients explode.

Sources: Laurent et al. 2016 (arXiv 1510.01378): hidden-to-hidden BN did not help, input-to-hidden
BN trained faster; Deep Speech 2 (arXiv 1512.02595) normalizes only the vertical path. Against:
Cooijmans et al. 2016 (arXiv 1603.09025): horizontal BN works with per-time-step statistics and
gamma initialized at 0.1; LayerNorm (Ba et al. 2016, arXiv 1607.06450) needs no batch statistics.

Reproduce: ``bnlab audit --profile quick --claims C6`` (``--profile full`` for 5 seeds, 1000
steps and the tanh RNN as well).

Protocol (CLAIMS.md C6): digits read as a sequence (2 pixels a step, T = 32); 2-layer stacked
LSTM, hidden 64, a linear head on the last step; Adam 3e-3, gradient-norm clip 1.0, batch 64.
Arms (all ``bnlab.nn.BNLSTM`` norm modes): none; vertical; horizontal (gamma 1, one shared set of
population statistics: the naive way); per_timestep with gamma 1 and with gamma 0.1
(Cooijmans); layer. Precise BN (``bnlab.tools.recalibrate``, per step) before every evaluation.
Metrics: test accuracy in eval mode, steps to 80% train accuracy, diverged runs, and
||dL/dh_1|| / ||dL/dh_T|| per layer at init and at the end (:mod:`bnlab.lab.rnn_train`).
Quick: seeds 0-2, 450 steps, LSTM. Full: seeds 0-4, 1000 steps, LSTM, plus the same arms on a
2-layer tanh RNN reported as findings (the verdicts use the LSTM in both profiles).
"""

from __future__ import annotations

import math
import statistics

import numpy as np

from ..plots import figure, save
from ..protocol import Plan, Run
from ..rnn_train import DEFAULTS, train_rnn
from ..seqdata import SEQ_DATASETS
from ..stats import bootstrap_ci, default_rule, needed, per_seed
from ..tasks import register_task

register_task("rnn", train_rnn, code=("lab/rnn_train.py", "lab/seqdata.py", "lab/data.py", "nn/recurrent.py",
                                      "nn/masked.py"))

ID = "C6"
TITLE = "BN is bad for RNNs: fine vertically, harmful horizontally (exploding gradients)"
CLAIM = ("Batch normalization is fine 'vertically' (on the input-to-hidden path between stacked recurrent "
         "layers) but harmful 'horizontally' (on the hidden-to-hidden path between time steps), because "
         "there it makes gradients explode.")
SOURCES = [
    "Laurent et al. 2016, arXiv 1510.01378 (hidden-to-hidden BN did not help; input-to-hidden trained faster)",
    "Amodei et al. 2015 (Deep Speech 2), arXiv 1512.02595 (normalizes only the vertical path)",
    "Against: Cooijmans et al. 2016, arXiv 1603.09025 (per-time-step statistics, gamma 0.1: horizontal BN works)",
    "Ba et al. 2016, arXiv 1607.06450 (LayerNorm needs no batch statistics)",
]
PROTOCOL_CHANGES = [
    "Data: digits read as a sequence (CLAIMS.md allows it or mnist1d). In a trial here the plain 2-layer "
    "LSTM on mnist1d (1 value a step) reached only ~65% train accuracy after 1000 Adam steps (every arm "
    "would be censored at the 80% target); on digits it passes 80% train accuracy in ~250 steps. "
    "--dataset mnist1d runs the same protocol on mnist1d.",
    "Steps: 1000 (full), 450 (quick), fixed by the 15 / 3 minute budget of this claim on 2 cores (per-step "
    "BN arms cost ~3x the plain LSTM a step). In the trial the plain LSTM passes 80% windowed train accuracy "
    "at ~220 steps and sits near 0.9 at 450 (out of the undertrained regime, not converged: quick favours "
    "fast learners a little more than full does).",
    "Train accuracy for 'steps to 80%' is the accuracy on the training minibatches (training mode) averaged "
    "over the last 10 steps, checked every step: free, and it is what the optimizer saw.",
    "'No slower' (vertical is fine) is read as: median steps to 80% at most 1.1x none's (seed noise).",
    "'Naive variants' is the horizontal arm (gamma 1, shared population statistics); 'Cooijmans-style' is "
    "per_timestep with gamma 0.1. per_timestep with gamma 1 is reported beside them (it differs from "
    "horizontal in training only by the cell normalization, from Cooijmans only by gamma).",
    "Full also trains the tanh RNN (where the budget allows, CLAIMS.md); its results are findings, not "
    "verdict inputs, so quick and full decide by the same rule on the same arms.",
]

ARMS = {
    "none": {"norm": "none", "gamma_init": None},
    "vertical": {"norm": "vertical", "gamma_init": None},
    "horizontal": {"norm": "horizontal", "gamma_init": 1.0},
    "per_step_g1": {"norm": "per_timestep", "gamma_init": 1.0},
    "per_step_g0.1": {"norm": "per_timestep", "gamma_init": 0.1},
    "layer": {"norm": "layer", "gamma_init": None},
}
ARM_LABELS = {"none": "none", "vertical": "vertical BN", "horizontal": "horizontal BN (naive, g=1)",
              "per_step_g1": "per-step BN, g=1", "per_step_g0.1": "per-step BN, g=0.1 (Cooijmans)",
              "layer": "LayerNorm"}
ARM_COLORS = {"none": "#7f7f7f", "vertical": "#1f5fbf", "horizontal": "#c0392b", "per_step_g1": "#e07b00",
              "per_step_g0.1": "#2a9d5c", "layer": "#8e44ad"}
NAIVE, COOIJMANS = "horizontal", "per_step_g0.1"
# what separates each pair of arms (the report says it beside the contrast)
PAIRS = [
    ("vertical", "none", "BN on W_x x_t (statistics over batch and time)"),
    ("horizontal", "vertical", "BN on W_h h_{t-1} (each step's batch statistics; one shared population set)"),
    ("per_step_g1", "horizontal", "training: the cell normalization only; eval: per-step population statistics"),
    ("per_step_g0.1", "per_step_g1", "gamma initialized at 0.1 instead of 1"),
    ("layer", "per_step_g0.1", "per-example LayerNorm statistics instead of per-step batch statistics (and gamma 1)"),
]

_BASE = {"dataset": "digits", "cells": ["lstm"], "hidden": 64, "layers": 2, "lr": 3e-3, "clip": 1.0, "batch": 64,
         "steps": 1000, "window": 10, "curve_every": 25, "probe": 256}
PROFILES = {
    "tiny": dict(_BASE, seeds=[0], steps=24, hidden=16, curve_every=4, window=4, probe=64),
    "quick": dict(_BASE, seeds=[0, 1, 2], steps=450),
    "full": dict(_BASE, seeds=[0, 1, 2, 3, 4], steps=1000, cells=["lstm", "rnn"]),
}

TARGET = 0.8
SLOWER = 1.1  # "no slower": median steps to 80% at most 1.1x none's
RULES = {
    "vertical is fine": (
        "supported if vertical's mean test accuracy >= none's - 1 point and it is no slower (median steps to "
        "80% train accuracy <= 1.1x none's, censored runs at the cap); refuted if the 95% interval of "
        "vertical - none lies below -1 point, or vertical is slower (> 1.1x) in >= 4/5 seeds (3/3); else "
        "inconclusive"),
    "horizontal hurts": (
        "the naive arm (horizontal) hurts when none - horizontal >= 2 points by the default rule (>= 4/5 seeds "
        "(3/3) in that direction and a mean >= 2); the blanket claim is refuted when Cooijmans-style "
        "(per-step, gamma 0.1) >= none - 1 point (mean). Naive hurts and Cooijmans does not: partly supported; "
        "both hurt: supported; the blanket claim refuted and the naive arm not shown to hurt: refuted; "
        "else inconclusive"),
    "because gradients explode": (
        "supported if the naive arm's ||dL/dh_1|| / ||dL/dh_T|| at init (median over seeds) exceeds 10 in "
        "either layer while none's stays below 1 in both; refuted if the naive arm's ratio is below 0.1 in "
        "both layers (vanishing); else inconclusive"),
}
RULE = ("Per part (CLAIMS.md C6), on the 2-layer LSTM: " + "; ".join(f"'{k}': {v}" for k, v in RULES.items())
        + ". Overall: all parts supported -> supported; all refuted -> refuted; any part supported or partly "
          "supported -> partly supported; else inconclusive.")

# seconds of one core per training step (LSTM, T = 32, hidden 64, batch 64), measured here
_STEP_S = {"none": 0.0085, "vertical": 0.0195, "horizontal": 0.0235, "per_timestep": 0.026, "layer": 0.0215}


def _dataset(ctx) -> str:
    return ctx.dataset if ctx.dataset in SEQ_DATASETS else ctx.settings["dataset"]


def _config(ctx, cell: str, arm: str, seed: int) -> dict:
    s = ctx.settings
    cfg = dict(DEFAULTS)
    cfg.update({k: s[k] for k in ("hidden", "layers", "lr", "clip", "batch", "steps", "window", "curve_every",
                                  "probe")})
    cfg.update(task="rnn", dataset=_dataset(ctx), seed=int(seed), cell=cell, **ARMS[arm])
    return cfg


def _cost(ctx, cell: str, arm: str) -> float:
    s = ctx.settings
    per_step = _STEP_S[ARMS[arm]["norm"]] * (SEQ_DATASETS[_dataset(ctx)]["steps"] / 32) * max(s["hidden"] / 64, 0.25)
    per_step *= 0.35 if cell == "rnn" else 1.0
    return 2.0 + s["steps"] * per_step


def plan(ctx, results) -> Plan:
    runs = [Run(_config(ctx, cell, arm, seed), cost=_cost(ctx, cell, arm), label=f"C6 {cell} {arm} seed {seed}")
            for cell in ctx.settings["cells"] for arm in ARMS for seed in ctx.seeds]
    return Plan(runs)


def _collect(ctx, results, cell: str) -> dict:
    return {arm: [results.get(_config(ctx, cell, arm, seed)) for seed in ctx.seeds] for arm in ARMS}


# --- metrics of one arm -------------------------------------------------------------------------
def _acc(runs) -> list[float]:
    return [100.0 * r["test_acc"] for r in runs]  # diverged runs are stored at chance


def _steps(runs, cap: int) -> list[float]:
    return [float(cap if r["steps_to_80"] is None else r["steps_to_80"]) for r in runs]


def _ratio(runs, when: str, layer: int) -> float:
    """Median over seeds of ||dL/dh_1|| / ||dL/dh_T|| in one layer (nan if unavailable)."""
    vals = [r[when][layer]["ratio"] for r in runs if r.get(when) and len(r[when]) > layer]
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return float(statistics.median(vals)) if vals else math.nan


def _layers(data) -> int:
    return len(data["none"][0]["grad_init"])


def _fmt_ratio(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.2g}"


def _ci_str(ci) -> str:
    return "n/a" if ci is None else f"[{ci[0]:.1f}, {ci[1]:.1f}]"


# --- the decision ---------------------------------------------------------------------------------
def _part_vertical(data, seeds, cap) -> dict:
    d = [v - n for v, n in zip(_acc(data["vertical"]), _acc(data["none"]))]
    mean_d, ci = float(np.mean(d)), bootstrap_ci(d)
    sv, sn = _steps(data["vertical"], cap), _steps(data["none"], cap)
    med_v, med_n = statistics.median(sv), statistics.median(sn)
    no_slower = med_v <= SLOWER * med_n
    slower_seeds = sum(a > SLOWER * b for a, b in zip(sv, sn))
    if mean_d >= -1 and no_slower:
        verdict = "supported"
    elif (ci is not None and ci[1] < -1) or slower_seeds >= needed(len(seeds)):
        verdict = "refuted"
    else:
        verdict = "inconclusive"
    why = (f"vertical - none = {mean_d:+.1f} points (95% CI {_ci_str(ci)}); median steps to 80% {med_v:g} vs "
           f"{med_n:g} (ratio {med_v / med_n:.2f}, slower in {slower_seeds}/{len(seeds)} seeds)")
    return {"verdict": verdict, "effect": mean_d, "effect_label": "vertical - none test accuracy (points)",
            "ci": ci, "per_seed": per_seed(seeds, d), "why": why, "rule": RULES["vertical is fine"]}


def _part_horizontal(data, seeds) -> dict:
    hurt = [n - h for n, h in zip(_acc(data["none"]), _acc(data[NAIVE]))]  # positive: horizontal hurts
    naive, naive_why = default_rule(hurt, 2.0)
    coij = [c - n for c, n in zip(_acc(data[COOIJMANS]), _acc(data["none"]))]
    coij_fine = float(np.mean(coij)) >= -1
    if naive == "supported":
        verdict = "partly supported" if coij_fine else "supported"
    elif coij_fine:
        verdict = "refuted"
    else:
        verdict = "inconclusive"
    why = (f"none - horizontal = {np.mean(hurt):+.1f} points (naive hurts: {naive}; {naive_why}); "
           f"Cooijmans - none = {np.mean(coij):+.1f} points (blanket claim "
           f"{'refuted' if coij_fine else 'not refuted'}: {'>=' if coij_fine else '<'} none - 1)")
    return {"verdict": verdict, "effect": float(np.mean(hurt)),
            "effect_label": "none - horizontal test accuracy (points; positive = horizontal hurts)",
            "ci": bootstrap_ci(hurt), "per_seed": per_seed(seeds, hurt), "why": why,
            "rule": RULES["horizontal hurts"], "naive": naive, "cooijmans_fine": coij_fine}


def _part_gradients(data, seeds) -> dict:
    L = _layers(data)
    naive = [_ratio(data[NAIVE], "grad_init", l) for l in range(L)]
    plain = [_ratio(data["none"], "grad_init", l) for l in range(L)]
    top = max((v for v in naive if not math.isnan(v)), default=math.nan)
    plain_top = max((v for v in plain if not math.isnan(v)), default=math.nan)
    if top > 10 and plain_top < 1:
        verdict = "supported"
    elif all(v < 0.1 for v in naive if not math.isnan(v)) and not math.isnan(top):
        verdict = "refuted"
    else:
        verdict = "inconclusive"
    per = []
    for r in data[NAIVE]:
        vals = [g["ratio"] for g in r["grad_init"]]
        per.append(max(vals))
    why = (f"at init, horizontal ||dL/dh_1||/||dL/dh_T|| per layer {', '.join(map(_fmt_ratio, naive))} "
           f"(median over seeds) vs none {', '.join(map(_fmt_ratio, plain))}")
    return {"verdict": verdict, "effect": math.log10(top) if top > 0 else -math.inf,
            "effect_label": "log10 of horizontal's gradient ratio at init (largest layer, median over seeds)",
            "ci": bootstrap_ci([math.log10(v) for v in per if v > 0], np.median),
            "per_seed": per_seed(seeds, per), "why": why, "rule": RULES["because gradients explode"]}


def combine(parts: dict[str, str]) -> str:
    vs = list(parts.values())
    if vs and all(v == "supported" for v in vs):
        return "supported"
    if vs and all(v == "refuted" for v in vs):
        return "refuted"
    if any(v in ("supported", "partly supported") for v in vs):
        return "partly supported"
    return "inconclusive"


def _arm_rows(data, cap) -> list[list]:
    L = _layers(data)
    rows = []
    for arm, runs in data.items():
        acc = _acc(runs)
        st = _steps(runs, cap)
        cens = sum(r["steps_to_80"] is None for r in runs)
        row = [ARM_LABELS[arm], f"{np.mean(acc):.1f}", _ci_str(bootstrap_ci(acc)),
               f"{statistics.median(st):g}" + (f" ({cens} censored)" if cens else ""),
               f"{sum(bool(r['diverged']) for r in runs)}/{len(runs)}"]
        row += [_fmt_ratio(_ratio(runs, "grad_init", l)) for l in range(L)]
        row += [_fmt_ratio(_ratio(runs, "grad_end", l)) for l in range(L)]
        rows.append(row)
    return rows


def _arm_columns(L) -> list[str]:
    return (["arm", "test acc %", "95% CI", "median steps to 80%", "diverged"]
            + [f"ratio init L{l + 1}" for l in range(L)] + [f"ratio end L{l + 1}" for l in range(L)])


def _pair_rows(data) -> list[list]:
    rows = []
    for a, b, what in PAIRS:
        d = [x - y for x, y in zip(_acc(data[a]), _acc(data[b]))]
        rows.append([f"{ARM_LABELS[a]} - {ARM_LABELS[b]}", f"{np.mean(d):+.1f}", _ci_str(bootstrap_ci(d)), what])
    return rows


def decide(ctx, results) -> dict:
    seeds, cap = list(ctx.seeds), int(ctx.settings["steps"])
    cell = ctx.settings["cells"][0]
    data = _collect(ctx, results, cell)
    parts = {"vertical is fine": _part_vertical(data, seeds, cap),
             "horizontal hurts": _part_horizontal(data, seeds),
             "because gradients explode": _part_gradients(data, seeds)}
    verdict = combine({k: p["verdict"] for k, p in parts.items()})
    h = parts["horizontal hurts"]
    L = _layers(data)
    tables = [
        {"title": f"C6 {cell.upper()} arms on {_dataset(ctx)} (test accuracy in eval mode after precise BN; "
                  f"gradient ratio ||dL/dh_1||/||dL/dh_T|| median over seeds)",
         "columns": _arm_columns(L), "rows": _arm_rows(data, cap)},
        {"title": "Test accuracy per seed (%)", "columns": ["arm"] + [f"seed {s}" for s in seeds],
         "rows": [[ARM_LABELS[a]] + [f"{v:.1f}" for v in _acc(runs)] for a, runs in data.items()]},
        {"title": "What separates each pair of arms (difference in test accuracy, points)",
         "columns": ["pair", "mean", "95% CI", "what differs"], "rows": _pair_rows(data)},
    ]
    plain = [_ratio(data["none"], "grad_init", l) for l in range(L)]
    findings = [
        "The plain LSTM's own gradient ratio at init is " + ", ".join(map(_fmt_ratio, plain))
        + " (layers 1..L): every normalized arm is read beside it.",
        "Gradient ratio at init per arm (largest layer): " + "; ".join(
            f"{ARM_LABELS[a]} {_fmt_ratio(max(_ratio(r, 'grad_init', l) for l in range(L)))}" for a, r in data.items()),
    ]
    if parts["horizontal hurts"]["verdict"] in ("refuted", "inconclusive") and \
            parts["because gradients explode"]["verdict"] == "supported":
        findings.append("Horizontal BN's gradients are large at init, yet it did not train measurably worse: the "
                        "explosion at init did not translate into worse accuracy here (Adam and clipping at 1.0).")
    for other in ctx.settings["cells"][1:]:
        od = _collect(ctx, results, other)
        accs = ", ".join(f"{ARM_LABELS[a]} {np.mean(_acc(r)):.1f}" for a, r in od.items())
        findings.append(f"{other.upper()} (finding, not a verdict input): test accuracy % {accs}; horizontal - none "
                        f"{np.mean(_acc(od[NAIVE])) - np.mean(_acc(od['none'])):+.1f} points; horizontal's ratio at "
                        f"init {', '.join(_fmt_ratio(_ratio(od[NAIVE], 'grad_init', l)) for l in range(L))} vs none "
                        f"{', '.join(_fmt_ratio(_ratio(od['none'], 'grad_init', l)) for l in range(L))}.")
        tables.append({"title": f"C6 {other.upper()} arms (finding)", "columns": _arm_columns(L),
                       "rows": _arm_rows(od, cap)})
    why = "; ".join(f"{k}: {p['verdict']}" for k, p in parts.items())
    metrics = {a: {"test_acc": _acc(r), "steps_to_80": [x["steps_to_80"] for x in r],
                   "diverged": [bool(x["diverged"]) for x in r],
                   "grad_init": [[g["ratio"] for g in x["grad_init"]] for x in r],
                   "grad_end": [[g["ratio"] for g in x["grad_end"]] if x.get("grad_end") else None for x in r]}
               for a, r in data.items()}
    return {"verdict": verdict, "effect": h["effect"], "effect_label": h["effect_label"], "per_seed": h["per_seed"],
            "ci": h["ci"], "rule": RULE, "why": why,
            "parts": {k: {kk: vv for kk, vv in p.items() if kk not in ("naive", "cooijmans_fine")}
                      for k, p in parts.items()},
            "tables": tables, "findings": findings, "metrics": {"dataset": _dataset(ctx), "cell": cell, "arms": metrics}}


# --- plots ----------------------------------------------------------------------------------------
def plots(ctx, results, outdir) -> list:
    out = []
    cap = int(ctx.settings["steps"])
    for cell in ctx.settings["cells"]:
        data = _collect(ctx, results, cell)
        arms = list(data)
        L = _layers(data)
        fig, axes = figure(3, 1, width=4.3)
        ax, ax2, ax3 = axes[0]
        for i, arm in enumerate(arms):
            acc = _acc(data[arm])
            c = ARM_COLORS[arm]
            ax.bar(i, np.mean(acc), color=c, alpha=0.35)
            ax.scatter([i] * len(acc), acc, color=c, s=16, zorder=3,
                       marker="o")
            for r, a in zip(data[arm], acc):
                if r["diverged"]:
                    ax.scatter([i], [a], color="k", marker="x", s=30, zorder=4)
        lo = min(min(_acc(r)) for r in data.values())
        ax.set_ylim(max(0, lo - 5), 100)
        ax.set_xticks(range(len(arms)), [ARM_LABELS[a].split(" (")[0] for a in arms], rotation=35, ha="right")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{cell.upper()}: accuracy per arm")
        width = 0.8 / (2 * L)
        for i, arm in enumerate(arms):
            for l in range(L):
                for j, when in enumerate(("grad_init", "grad_end")):
                    v = _ratio(data[arm], when, l)
                    if not math.isnan(v) and v > 0:
                        x = i - 0.4 + width * (2 * l + j + 0.5)
                        ax2.bar(x, v, width=width, color=ARM_COLORS[arm], alpha=0.9 if j == 0 else 0.4,
                                hatch="" if l == 0 else "//", log=True)
        ax2.axhline(1, color="#555555", lw=0.8, ls=":")
        ax2.axhline(10, color="#c0392b", lw=0.8, ls="--")
        ax2.axhline(0.1, color="#1f5fbf", lw=0.8, ls="--")
        ax2.set_xticks(range(len(arms)), [ARM_LABELS[a].split(" (")[0] for a in arms], rotation=35, ha="right")
        ax2.set_ylabel("||dL/dh_1|| / ||dL/dh_T||")
        ax2.set_title("Gradient ratio (init solid, end pale; L2 hatched)")
        for arm in arms:
            curves = [r["curve"] for r in data[arm] if r["curve"]["step"]]
            if not curves:
                continue
            n = min(len(c["step"]) for c in curves)
            mean = np.mean([c["train_acc"][:n] for c in curves], axis=0)
            ax3.plot(curves[0]["step"][:n], 100 * mean, color=ARM_COLORS[arm], label=ARM_LABELS[arm], lw=1.6)
        ax3.axhline(100 * TARGET, color="#bbbbbb", lw=1, ls=":")
        ax3.set_xlim(0, cap)
        ax3.set_xlabel("step")
        ax3.set_ylabel("train accuracy on minibatches (%)")
        ax3.set_title("Learning curves (seed mean)")
        ax3.legend(loc="lower right", fontsize=7)
        path = save(fig, f"{outdir}/c6_{cell}.png")
        out.append((path, f"C6 {cell.upper()} on {_dataset(ctx)}: test accuracy per arm (bars: seed mean, dots: "
                          "seeds, x: diverged), gradient ratio per arm and layer at init and end (dashed: 10 and "
                          "0.1), learning curves"))
    return out
