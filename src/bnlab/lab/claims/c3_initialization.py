"""C3 - BN makes weights easier to initialize, especially in deeper networks.

Claim: with BN after every layer the scale of the initial weights hardly matters, so deep
networks train from a wide range of initializations.

Sources: Ioffe & Szegedy 2015 (arXiv 1502.03167): with BN, scaling a layer's weights leaves the
forward pass unchanged. Against: Yang et al. 2019 (arXiv 1902.08129): plain deep BN nets (no skip
connections) have gradients that explode with depth at initialization; Fixup, SkipInit and NF-nets
fix initialization without BN.

Reproduce: ``bnlab audit --profile quick --claims C3`` (``--profile full`` for 5 seeds).

Protocol (CLAIMS.md): digits; ReLU MLP of width 64 and depth L in {2, 8, 16, 32} (hidden
layers), no skips; init N(0, g^2 * 2 / fan_in) for every layer with g in {0.25, 0.5, 1, 2, 4};
plain vs BN; momentum SGD 0.9, batch 64, 300 steps; lr from {0.01, 0.1} chosen per (arm, L) at
g = 1 only, by validation accuracy on a 20% split with the first seed (ties to the smaller rate).
One run per (arm, L) trains every (seed, g) pair side by side as stacked members; members with the
same seed share the base weights (scaled by g) and the batches. Metrics: trainable area (share of the 20 (L, g)
cells with test accuracy >= 80%, diverged runs at chance), spread of accuracy over g per depth
(max - min, averaged over depths), and the gradient-norm ratio ||dL/dW_1|| / ||dL/dW_out|| at
init (first batch).
Decision: supported if BN's area exceeds plain's by >= 0.25 (seed mean of per-seed areas) and
BN's spread is at most half of plain's; refuted if the areas are within one cell (0.05); else
inconclusive. The depth-32 gradient ratio is reported either way.
Quick: seeds 0-2; full: seeds 0-4; nothing else differs.
"""

from __future__ import annotations

import numpy as np

from .. import metrics as M
from ..plots import color, figure, label, save
from ..protocol import Plan, Run, classify_config, data_spec, pick_best, step_cost
from ..stats import bootstrap_ci, per_seed

ID = "C3"
TITLE = "BN makes initialization easier, especially in deep networks"
CLAIM = ("With batch normalization the initial weight scale hardly matters, so networks - deep ones especially - "
         "train from a much wider range of initializations.")
SOURCES = [
    "Ioffe & Szegedy 2015, arXiv 1502.03167 (BN output is invariant to the scale of the weights)",
    "Against: Yang et al. 2019, arXiv 1902.08129 (deep BN nets without skips: gradients explode at init)",
    "Fixup arXiv 1901.09321, SkipInit arXiv 2002.10444, NF-nets arXiv 2102.06171 (init without BN)",
]
PROTOCOL_CHANGES: list[str] = []

_BASE = {"dataset": "digits", "depths": [2, 8, 16, 32], "gains": [0.25, 0.5, 1.0, 2.0, 4.0], "width": 64,
         "batch": 64, "steps": 300, "lrs": [0.01, 0.1], "momentum": 0.9, "threshold": 0.8}
PROFILES = {
    "tiny": dict(_BASE, seeds=[0], depths=[2, 4], gains=[0.5, 2.0], steps=30),
    "quick": dict(_BASE, seeds=[0, 1, 2]),
    "full": dict(_BASE, seeds=[0, 1, 2, 3, 4]),
}
ARMS = {"plain": "none", "bn": "batch"}
CELL = None  # one cell of the grid, as a share of the area: 1 / (len(depths) * len(gains))
RULE = ("Trainable area = share of (depth, init scale) cells with test accuracy >= 80%. Supported if BN's area "
        "exceeds plain's by >= 0.25 and BN's spread of accuracy over init scales (max - min per depth, averaged "
        "over depths) is at most half of plain's; refuted if the areas are within one cell; else inconclusive.")


def _config(ctx, arm: str, depth: int, members: list[dict], val: bool = False, diag: bool = True) -> dict:
    s = ctx.settings
    return classify_config(
        data=data_spec(ctx, s["dataset"], val=val),
        model={"arch": "mlp", "widths": [s["width"]] * depth, "act": "relu", "norm": ARMS[arm]},
        init={"kind": "kaiming"}, optim={"kind": "sgd", "momentum": s["momentum"]}, batch=s["batch"],
        steps=s["steps"], members=members, diagnostics=("grad_ratio",) if diag else ())


def _select_config(ctx, arm: str, depth: int) -> dict:
    return _config(ctx, arm, depth, [{"seed": ctx.first_seed, "lr": float(lr), "gain": 1.0}
                                     for lr in ctx.settings["lrs"]], val=True, diag=False)


def _main_config(ctx, arm: str, depth: int, lr: float) -> dict:
    return _config(ctx, arm, depth, [{"seed": seed, "lr": float(lr), "gain": float(g)}
                                     for seed in ctx.seeds for g in ctx.settings["gains"]])


def _tuned(ctx, results, arm: str, depth: int) -> float | None:
    r = results.get(_select_config(ctx, arm, depth))
    if r is None:
        return None
    return pick_best({m["lr"]: (m["val_acc"] if m["val_acc"] is not None else -1.0) for m in r["members"]})


def _cost(ctx, arm: str, depth: int, members: int) -> float:
    s = ctx.settings
    return step_cost(members, s["steps"], depth, s["width"], s["batch"], depth if arm == "bn" else 0)


def plan(ctx, results) -> Plan:
    s = ctx.settings
    runs, pending = [], []
    for arm in ARMS:
        for depth in s["depths"]:
            runs.append(Run(_select_config(ctx, arm, depth), cost=_cost(ctx, arm, depth, len(s["lrs"])),
                            label=f"C3 lr selection {arm} L={depth}", gate=True))
            lr = _tuned(ctx, results, arm, depth)
            cost = _cost(ctx, arm, depth, len(s["gains"]) * len(ctx.seeds))
            if lr is None:
                pending.append(cost)
            else:
                runs.append(Run(_main_config(ctx, arm, depth, lr), cost=cost, label=f"C3 {arm} L={depth}"))
    return Plan(runs, pending)


def _grid(ctx, results) -> dict:
    """acc[arm][seed][(depth, gain)], ratio[arm][seed][(depth, gain)], tuned lr[arm][depth]."""
    s = ctx.settings
    acc = {a: {sd: {} for sd in ctx.seeds} for a in ARMS}
    ratio = {a: {sd: {} for sd in ctx.seeds} for a in ARMS}
    lrs = {a: {} for a in ARMS}
    for arm in ARMS:
        for depth in s["depths"]:
            lr = lrs[arm][depth] = _tuned(ctx, results, arm, depth)
            for m in results.get(_main_config(ctx, arm, depth, lr))["members"]:
                acc[arm][m["seed"]][(depth, m["gain"])] = M.acc_or_chance(m)
                ratio[arm][m["seed"]][(depth, m["gain"])] = M.grad_ratio(m)
    return {"acc": acc, "ratio": ratio, "lr": lrs}


def _spread(ctx, cells: dict) -> float:
    s = ctx.settings
    return float(np.mean([M.spread([cells[(d, float(g))] for g in s["gains"]]) for d in s["depths"]]))


def decide(ctx, results) -> dict:
    s = ctx.settings
    grid = _grid(ctx, results)
    cell = 1.0 / (len(s["depths"]) * len(s["gains"]))
    area = {a: [M.trainable_area(grid["acc"][a][sd], s["threshold"]) for sd in ctx.seeds] for a in ARMS}
    spread = {a: [_spread(ctx, grid["acc"][a][sd]) for sd in ctx.seeds] for a in ARMS}
    diff = [b - p for b, p in zip(area["bn"], area["plain"])]
    mdiff = float(np.mean(diff))
    msp = {a: float(np.mean(v)) for a, v in spread.items()}
    if mdiff >= 0.25 and msp["bn"] <= 0.5 * msp["plain"]:
        verdict = "supported"
    elif abs(mdiff) <= cell + 1e-9:
        verdict = "refuted"
    else:
        verdict = "inconclusive"
    deepest = max(s["depths"])
    r32 = {a: [grid["ratio"][a][sd].get((deepest, 1.0)) for sd in ctx.seeds] for a in ARMS}

    def gmean(v):
        v = [x for x in v if x is not None and x > 0]
        return float(np.exp(np.mean(np.log(v)))) if v else None

    why = (f"area BN {np.mean(area['bn']):.2f} vs plain {np.mean(area['plain']):.2f} (difference {mdiff:+.2f}, one cell = "
           f"{cell:.2f}); spread over init scales BN {100 * msp['bn']:.1f} vs plain {100 * msp['plain']:.1f} points")
    findings = [f"Gradient-norm ratio ||dL/dW_1|| / ||dL/dW_out|| at init, depth {deepest}, g = 1 (geometric mean over "
                f"seeds): BN {M_fmt(gmean(r32['bn']))}, plain {M_fmt(gmean(r32['plain']))}."]
    rows = []
    for arm in ARMS:
        for d in s["depths"]:
            rows.append([label(arm), d, f"{grid['lr'][arm][d]:g}"] +
                        [f"{100 * np.mean([grid['acc'][arm][sd][(d, float(g))] for sd in ctx.seeds]):.1f}" for g in s["gains"]] +
                        [M_fmt(gmean([grid['ratio'][arm][sd].get((d, 1.0)) for sd in ctx.seeds]))])
    return {
        "verdict": verdict, "effect": mdiff, "effect_label": "BN's trainable area minus plain's (share of the grid)",
        "per_seed": per_seed(ctx.seeds, diff), "ci": bootstrap_ci(diff), "rule": RULE, "why": why,
        "findings": findings,
        "metrics": {"area": area, "spread": spread, "tuned_lr": {a: {str(d): v for d, v in x.items()} for a, x in grid["lr"].items()},
                    f"grad_ratio_depth{deepest}": r32},
        "tables": [{"title": "Test accuracy % (seed mean) by depth and init scale g, and the init gradient ratio at g = 1",
                    "columns": ["arm", "depth", "lr"] + [f"g={g:g}" for g in s["gains"]] + ["grad ratio (g=1)"],
                    "rows": rows}],
    }


def M_fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def plots(ctx, results, outdir) -> list:
    s = ctx.settings
    grid = _grid(ctx, results)
    fig, axes = figure(3, 1, width=3.9, height=3.3)
    for ax, arm in zip(axes[0][:2], ARMS):
        mat = np.array([[np.mean([grid["acc"][arm][sd][(d, float(g))] for sd in ctx.seeds]) for g in s["gains"]]
                        for d in s["depths"]]) * 100
        im = ax.imshow(mat, cmap="RdYlGn", vmin=10, vmax=100, aspect="auto", origin="lower")
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                ax.text(j, i, f"{mat[i, j]:.0f}", ha="center", va="center", fontsize=8,
                        fontweight="bold" if mat[i, j] >= 100 * s["threshold"] else "normal")
        ax.set_xticks(range(len(s["gains"])), [f"{g:g}" for g in s["gains"]])
        ax.set_yticks(range(len(s["depths"])), [str(d) for d in s["depths"]])
        ax.set_xlabel("init scale g")
        ax.set_ylabel("depth L")
        ax.grid(False)
        area = np.mean([M.trainable_area(grid["acc"][arm][sd], s["threshold"]) for sd in ctx.seeds])
        ax.set_title(f"{label(arm)}: test acc %, area {area:.2f}")
    fig.colorbar(im, ax=axes[0][1], fraction=0.046, pad=0.04)
    ax = axes[0][2]
    for arm in ARMS:
        ys = []
        for d in s["depths"]:
            v = [grid["ratio"][arm][sd].get((d, 1.0)) for sd in ctx.seeds]
            v = [x for x in v if x]
            ys.append(np.exp(np.mean(np.log(v))) if v else np.nan)
        ax.plot(s["depths"], ys, "-o", color=color(arm), label=label(arm), lw=2)
    ax.set_yscale("log")
    ax.axhline(1, color="#999999", ls=":", lw=1)
    ax.set_xlabel("depth L")
    ax.set_ylabel("||dL/dW_1|| / ||dL/dW_out|| at init")
    ax.set_title("Gradient ratio at init (g = 1)")
    ax.legend()
    return [(save(fig, f"{outdir}/c3_init_heatmaps.png"),
             "C3: seed-mean test accuracy over depth x init scale (bold: >= 80%, trainable), and the gradient-norm "
             "ratio first/last layer at initialization")]
