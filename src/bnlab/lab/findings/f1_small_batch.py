"""F1 - small batches: batch norm against ghost batch norm, batch renormalization, GroupNorm and
LayerNorm at batch sizes 2, 4, 8 and 32.

Question: batch norm's statistics come from the batch, so with a handful of examples per batch
they are noisy, and what a network learns to expect in training is not what it sees in eval. How
much accuracy does batch norm lose as the batch shrinks, and do the remedies proposed for it (batch
renormalization, which corrects the batch statistics towards the running ones; GroupNorm and
LayerNorm, which use no batch statistics at all) keep it? Ghost batch norm at batch 32 with
virtual batches of 2, 4 and 8 separates the two things a small batch changes: it has the small
batch's statistics but batch 32's gradients.

This is a finding of the audit, not a claim: it reports accuracies and paired differences with
their intervals, and no verdict.

Reproduce: ``bnlab audit --profile full --claims F1`` (it also runs in every full audit;
``--profile tiny`` is a smoke test).

Protocol: digits (each seed its own stratified 1347/450 split); the stacked CNN of
:mod:`bnlab.lab.models` (conv3x3 16 -> norm -> ReLU -> maxpool 2 -> conv3x3 32 -> norm -> ReLU ->
maxpool 2 -> global average -> linear), Kaiming init; SGD with momentum 0.9, learning rate 0.1 at
batch 32 scaled linearly with the batch (0.1 * B / 32: Goyal et al. 2017, as Wu & He 2018 train
GroupNorm's small-batch comparison), the same number of epochs at every batch size (12 in full:
every arm sees the same examples the same number of times; the last partial batch of an epoch is
dropped). Arms, one run per (arm, batch size) training every seed side by side:

* ``batch``: bnlab.nn.BatchNorm2d at training batch B;
* ``renorm``: bnlab.nn.BatchRenorm2d at batch B, r_max = 3, d_max = 5, warm-up as in Ioffe 2017
  (plain batch norm for the first 5k steps, d_max reached at 25k, r_max at 40k) with the step counts
  scaled by T / 100k for a run of T steps: held until 0.05 T, d_max at 0.25 T, r_max at 0.4 T;
* ``group``: GroupNorm, 8 groups; ``layer``: LayerNorm (GroupNorm with one group: every channel
  and position of a sample), both at batch B;
* ``ghost``: bnlab.nn.GhostBatchNorm2d with virtual batch B at training batch 32 (so at the
  learning rate and step count of batch 32). With B = 32 it is batch norm at batch 32, the same
  run as ``batch`` at 32, which stands in for it.

The same seed gives every arm the same split, the same initial convolution and linear weights and
(at the same training batch) the same batch order. Evaluation: test accuracy after training;
every batch-norm-type layer is recalibrated first (precise BN, :func:`bnlab.tools.recalibrate`,
over the training set), as every claim's evaluation is: the eval statistics are the population's,
so what is measured is what training at a small batch did to the network, not the lag of the
running averages. Batch renorm normalizes that pass as batch norm does; ghost batch norm with the
pass's own statistics.

Reported: test accuracy per (arm, batch size) (mean, sd and per seed); per batch size, each arm
minus batch norm at the same batch size, paired over seeds (mean, 95% t-interval, Wilcoxon p,
sign count, as the claims' parts report them, :mod:`bnlab.lab.stats`); per arm, each batch size
minus batch 32. Reading of a paired difference: "above BN" when its interval lies above 0, "below
BN" when below, "no clear difference" otherwise.
Seeds: full 0-9 (10 seeds); tiny (smoke test) 2 seeds, batches 8 and 32, one epoch of a 192-image
subset, 8 channels per convolution. Not in the quick profile: at 12 epochs the batch-2 runs alone take longer than the quick
audit's whole budget allows for one finding.
"""

from __future__ import annotations

import math

import numpy as np

from .. import data as D
from .. import metrics as M
from .. import stats
from ..plots import figure, save
from ..protocol import Plan, Run, classify_config, data_spec

ID = "F1"
TITLE = "small batches: BN, ghost BN, batch renorm, GroupNorm, LayerNorm"
QUESTION = ("How much test accuracy does batch norm lose as the batch shrinks to 2, 4 and 8 examples, and do batch "
            "renormalization, GroupNorm and LayerNorm keep it? Ghost batch norm (virtual batch B at batch 32) gives "
            "the small batch's statistics with batch 32's gradients.")
SOURCES = [
    "Ioffe 2017, arXiv 1702.03275 (batch renormalization; small and non-i.i.d. minibatches)",
    "Wu & He 2018, arXiv 1803.08494 (GroupNorm; BN's error grows as the batch shrinks, GN's does not)",
    "Ba, Kiros & Hinton 2016, arXiv 1607.06450 (LayerNorm)",
    "Hoffer, Hubara & Soudry 2017, arXiv 1705.08741 (ghost batch norm)",
    "Goyal et al. 2017, arXiv 1706.02677 (the learning rate scaled linearly with the batch)",
]
PROTOCOL_CHANGES: list[str] = []
DATASETS = ["digits"]
TAKES = ("digits", "mnist", "fashion-mnist", "cifar10")  # image data: the CNN needs (C, H, W) input

NORMS = ("batch", "ghost", "renorm", "group", "layer")
NAMES = {"batch": "BN", "ghost": "ghost BN", "renorm": "batch renorm", "group": "GroupNorm", "layer": "LayerNorm"}
COLORS = {"batch": "#1f5fbf", "ghost": "#8e44ad", "renorm": "#e07b00", "group": "#2a9d5c", "layer": "#c0392b"}
WARMUP = (0.05, 0.4, 0.25)  # Ioffe 2017's schedule (5k, 40k, 25k steps) scaled by T / 100k: hold, r_max, d_max

_BASE = {"dataset": "digits", "subset": None, "channels": [16, 32], "norms": list(NORMS), "batches": [2, 4, 8, 32],
         "ghost_batch": 32, "epochs": 12, "lr": 0.1, "lr_batch": 32, "momentum": 0.9, "r_max": 3.0, "d_max": 5.0,
         "groups": 8}
PROFILES = {
    "tiny": dict(_BASE, seeds=[0, 1], subset=192, channels=[8, 8], batches=[8, 32], epochs=1),
    "full": dict(_BASE, seeds=list(range(10))),
}
LIMITS = {"norms": set(NORMS), "batches": (2, None), "ghost_batch": (2, None), "r_max": (1, None), "d_max": (0, None),
          "subset": (2, None), "momentum": "[0, 1)"}


# ------------------------------------------------------------------ runs
def _train_size(ctx) -> int:
    s = ctx.settings
    return int(D.prepare(data_spec(ctx, s["dataset"], subset=s["subset"]), ctx.first_seed).x_train.shape[0])


def _train_batch(ctx, norm: str, b: int) -> int:
    return int(ctx.settings["ghost_batch"]) if norm == "ghost" else int(b)


def _same_as_bn(ctx, norm: str, b: int) -> bool:
    """Ghost batch norm whose virtual batch holds the whole training batch is batch norm."""
    return norm == "ghost" and b >= ctx.settings["ghost_batch"]


def _steps(ctx, train_b: int, m: int) -> int:
    return int(ctx.settings["epochs"]) * (m // train_b)


def _warmup(steps: int) -> list[int]:
    hold, r_end, d_end = (int(round(f * steps)) for f in WARMUP)
    return [hold, max(r_end, hold), max(d_end, hold)]


def _config(ctx, norm: str, b: int, m: int) -> dict:
    s = ctx.settings
    tb = _train_batch(ctx, norm, b)
    args: dict = {}
    if norm == "ghost":
        args = {"virtual_batch_size": int(b)}
    elif norm == "renorm":
        args = {"r_max": float(s["r_max"]), "d_max": float(s["d_max"]), "warmup_steps": _warmup(_steps(ctx, tb, m))}
    elif norm == "group":
        args = {"groups": int(s["groups"])}
    return classify_config(
        data=data_spec(ctx, s["dataset"], subset=s["subset"]),
        model={"arch": "cnn", "channels": list(s["channels"]), "act": "relu", "norm": norm, "norm_args": args},
        init={"kind": "kaiming"}, optim={"kind": "sgd", "momentum": float(s["momentum"])}, batch=tb,
        epochs=int(s["epochs"]),
        members=[{"seed": sd, "lr": float(s["lr"]) * tb / float(s["lr_batch"])} for sd in ctx.seeds])


def _cells(ctx) -> list[tuple[str, int]]:
    s = ctx.settings
    return [(n, int(b)) for n in s["norms"] for b in s["batches"]]


def _source(ctx, norm: str, b: int) -> tuple[str, int]:
    """The run that holds an arm's numbers (ghost at the full batch: batch norm's)."""
    return ("batch", int(ctx.settings["ghost_batch"])) if _same_as_bn(ctx, norm, b) else (norm, b)


def plan(ctx, results) -> Plan:
    s = ctx.settings
    m = _train_size(ctx)
    runs, seen = [], set()
    cells = _cells(ctx)
    if any(_same_as_bn(ctx, n, b) for n, b in cells):
        cells.append(("batch", int(s["ghost_batch"])))
    for norm, b in cells:
        norm, b = _source(ctx, norm, b)
        if (norm, b) in seen:
            continue
        seen.add((norm, b))
        tb = _train_batch(ctx, norm, b)
        steps = _steps(ctx, tb, m)
        cost = steps * (6e-4 + 8e-5 * len(ctx.seeds)) * (2.0 if norm == "ghost" else 1.0)
        runs.append(Run(_config(ctx, norm, b, m), cost=cost, label=f"F1 {NAMES[norm]} batch {b}"
                        + (f" (trained at {tb})" if tb != b else "")))
    return Plan(runs)


# ------------------------------------------------------------------ numbers
def _accs(ctx, results) -> dict[str, dict[int, list[float | None]]]:
    """Test accuracy in points per seed of ctx.seeds, by arm and batch size (diverged = chance)."""
    m = _train_size(ctx)
    classes = round(1 / _chance(ctx))
    out: dict[str, dict[int, list[float | None]]] = {}
    for norm, b in _cells(ctx):
        src = _source(ctx, norm, b)
        res = results.get(_config(ctx, src[0], src[1], m))
        by_seed = {mm["seed"]: mm for mm in res["members"]}
        out.setdefault(norm, {})[b] = [None if sd not in by_seed else 100 * M.acc_or_chance(by_seed[sd], classes=classes)
                                       for sd in ctx.seeds]
    return out


def _chance(ctx) -> float:
    spec = data_spec(ctx, ctx.settings["dataset"])
    return D.chance(spec["name"], spec.get("data_dir"))


def _diff(a: list, b: list) -> list[float | None]:
    return [None if x is None or y is None else x - y for x, y in zip(a, b)]


def paired(values: list[float | None], seeds: list[int], what: str) -> dict:
    """A paired comparison as the claims' parts report it (mean, 95% interval and its method,
    Wilcoxon p, sign count, n, per seed), with a reading instead of a verdict."""
    v = stats.finite(values)
    n = len(v)
    mean = float(np.mean(v)) if n else None
    ci, method = stats.interval(v) if n >= 2 else (None, "t")
    if ci is None:
        reading = "too few seeds for an interval"
    elif ci[0] > 0:
        reading = f"above {what}"
    elif ci[1] < 0:
        reading = f"below {what}"
    else:
        reading = "no clear difference"
    return {"effect": mean, "effect_units": "test accuracy points", "n": n,
            "interval": None if ci is None else {"low": ci[0], "high": ci[1], "level": stats.LEVEL, "method": method},
            "p_wilcoxon": stats.wilcoxon_p(v) if n else None, "sign": stats.sign_count(v), "reading": reading,
            "per_seed": stats.per_seed(seeds, values)}


def _fmt_cmp(c: dict) -> str:
    if c["effect"] is None:
        return "n/a"
    iv = c["interval"]
    s = f"{c['effect']:+.2f}"
    if iv is not None:
        s += f" [{iv['low']:+.2f}, {iv['high']:+.2f}]"
    return s + f" ({c['sign']}, p={c['p_wilcoxon']:.2g})" if c["p_wilcoxon"] is not None else s


def _mean_sd(v: list) -> str:
    f = stats.finite(v)
    if not f:
        return "n/a"
    sd = float(np.std(f, ddof=1)) if len(f) > 1 else 0.0
    return f"{np.mean(f):.2f} ± {sd:.2f}"


def decide(ctx, results) -> dict:
    s = ctx.settings
    acc = _accs(ctx, results)
    norms = [n for n in NORMS if n in s["norms"]]
    batches = sorted(int(b) for b in s["batches"])
    big = batches[-1]
    seeds = list(ctx.seeds)
    vs_bn: dict[str, dict[int, dict]] = {}
    if "batch" in norms:
        for n in norms:
            if n == "batch":
                continue
            vs_bn[n] = {b: paired(_diff(acc[n][b], acc["batch"][b]), seeds, "BN") for b in batches
                        if not _same_as_bn(ctx, n, b)}
    vs_big = {n: {b: paired(_diff(acc[n][b], acc[n][big]), seeds, f"batch {big}") for b in batches if b != big}
              for n in norms}
    chance = _chance(ctx)
    best = max((np.mean(stats.finite(v)) for x in acc.values() for v in x.values() if stats.finite(v)), default=0.0)
    _, nothing = stats.trained_threshold(chance, best / 100)

    ghost_note = (f"ghost BN: virtual batch = the column, trained at batch {s['ghost_batch']} "
                  f"(at {s['ghost_batch']} it is BN's run)")
    tables = [{"title": f"Test accuracy % (mean ± sd over {len(seeds)} seeds); {ghost_note}",
               "columns": ["normalization"] + [f"batch {b}" for b in batches],
               "rows": [[NAMES[n]] + [_mean_sd(acc[n][b]) for b in batches] for n in norms]}]
    if vs_bn:
        tables.append({"title": "Paired difference from BN at the same batch size: test accuracy points, mean "
                                "[95% t-interval] (seeds above BN, Wilcoxon p)",
                       "columns": ["normalization"] + [f"batch {b}" for b in batches],
                       "rows": [[NAMES[n]] + [_fmt_cmp(vs_bn[n][b]) if b in vs_bn[n] else "= BN (the same run)"
                                              for b in batches] for n in vs_bn]})
    tables.append({"title": f"Paired change from batch {big}, per normalization: points, mean [95% t-interval] "
                            f"(seeds above batch {big}, Wilcoxon p)",
                   "columns": ["normalization"] + [f"batch {b} - {big}" for b in batches if b != big],
                   "rows": [[NAMES[n]] + [_fmt_cmp(vs_big[n][b]) for b in batches if b != big] for n in norms]})
    tables.append({"title": "Test accuracy % per seed",
                   "columns": ["normalization", "batch"] + [f"seed {sd}" for sd in seeds],
                   "rows": [[NAMES[n], b] + ["n/a" if a is None else f"{a:.1f}" for a in acc[n][b]]
                            for n in norms for b in batches]})

    findings = []
    small = batches[0]
    if "batch" in norms and small != big:
        c = vs_big["batch"][small]
        findings.append(f"BN at batch {small} against batch {big}: {_fmt_cmp(c)} points ({c['reading']}; "
                        f"{_mean(acc['batch'][small]):.1f}% against {_mean(acc['batch'][big]):.1f}%).")
    for n, by_b in vs_bn.items():
        bits = "; ".join(f"batch {b}: {_fmt_cmp(c)} - {c['reading']}" for b, c in by_b.items())
        findings.append(f"{NAMES[n]} minus BN, paired by seed: {bits}.")
    for n in norms:
        if n != "batch" and small != big:
            c = vs_big[n][small]
            findings.append(f"{NAMES[n]} at batch {small} against batch {big}: {_fmt_cmp(c)} points ({c['reading']}).")
    at_small = sorted(((np.mean(stats.finite(acc[n][small])), n) for n in norms if stats.finite(acc[n][small])),
                      reverse=True)
    summary = (f"At batch {small} the highest mean test accuracy is {NAMES[at_small[0][1]]}'s "
               f"({at_small[0][0]:.1f}%), the lowest {NAMES[at_small[-1][1]]}'s ({at_small[-1][0]:.1f}%)"
               if at_small else "no accuracies")
    if "batch" in norms and small != big:
        summary += (f"; BN moves by {vs_big['batch'][small]['effect']:+.2f} points from batch {big} to {small} "
                    f"({vs_big['batch'][small]['reading']})")
    summary += "."
    notes = []
    if nothing:
        notes.append(f"Nothing trained ({nothing}): the differences compare networks at chance.")
    comparisons = [dict(c, arm=n, against="BN", batch=b) for n, by_b in vs_bn.items() for b, c in by_b.items()]
    comparisons += [dict(c, arm=n, against=f"batch {big}", batch=b) for n, by_b in vs_big.items() for b, c in by_b.items()]
    return {"summary": summary, "findings": findings, "notes": notes, "tables": tables, "comparisons": comparisons,
            "metrics": {"test_acc": {n: {str(b): v for b, v in x.items()} for n, x in acc.items()}, "chance": chance,
                        "train_size": _train_size(ctx)}}


def _mean(v) -> float:
    f = stats.finite(v)
    return float(np.mean(f)) if f else math.nan


def plots(ctx, results, outdir) -> list:
    s = ctx.settings
    acc = _accs(ctx, results)
    norms = [n for n in NORMS if n in s["norms"]]
    batches = sorted(int(b) for b in s["batches"])
    fig, axes = figure(2, 1, width=4.7, height=3.6)
    ax = axes[0][0]
    for i, n in enumerate(norms):
        off = (i - (len(norms) - 1) / 2) * 0.035
        xs = [b * 2 ** off for b in batches]
        means = [_mean(acc[n][b]) for b in batches]
        ax.plot(xs, means, "-o", color=COLORS[n], label=NAMES[n], ms=4, lw=1.6)
        for x, b in zip(xs, batches):
            v = stats.finite(acc[n][b])
            ax.scatter([x] * len(v), v, color=COLORS[n], s=6, alpha=0.35, zorder=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size (ghost BN: virtual batch, trained at %d)" % s["ghost_batch"])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy by batch size")
    lo = min((min(stats.finite(v)) for x in acc.values() for v in x.values() if stats.finite(v)), default=0.0)
    chance = 100 * _chance(ctx)
    ax.set_ylim(max(0.0, lo - 2.0), min(100.0, ax.get_ylim()[1] + 0.5))
    if chance >= lo - 2.0:
        ax.axhline(chance, color="#999999", ls=":", lw=1)
    ax.set_xlim(batches[0] / 1.5, batches[-1] * 1.5)
    ax.legend(loc="best")
    ax = axes[0][1]
    others = [n for n in norms if n != "batch"]
    if "batch" in norms and others:
        for i, n in enumerate(others):
            off = (i - (len(others) - 1) / 2) * 0.05
            for b in batches:
                if _same_as_bn(ctx, n, b):
                    continue
                c = paired(_diff(acc[n][b], acc["batch"][b]), list(ctx.seeds), "BN")
                if c["effect"] is None:
                    continue
                x = b * 2 ** off
                iv = c["interval"]
                if iv is not None:
                    ax.plot([x, x], [iv["low"], iv["high"]], color=COLORS[n], lw=1.6)
                ax.plot([x], [c["effect"]], "o", color=COLORS[n], ms=4.5,
                        label=NAMES[n] if b == batches[0] else None)
        ax.set_xlim(batches[0] / 1.5, batches[-1] * 1.5)
        ax.axhline(0, color="#333333", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("minus BN at the same batch (points)")
        ax.set_title("Paired difference from BN (95% t-intervals)")
        ax.legend(loc="best")
    else:
        ax.set_axis_off()
    return [(save(fig, f"{outdir}/f1_small_batch.png"),
             "F1: test accuracy by batch size per normalization (lines: seed means; dots: seeds), and each arm minus "
             "BN at the same batch size, paired by seed, with its 95% t-interval. Ghost BN's column is its virtual "
             f"batch at training batch {s['ghost_batch']}.")]
