"""The report's house style for matplotlib figures (Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

COLORS = {
    "plain": "#7f7f7f", "none": "#7f7f7f",
    "bn": "#1f5fbf", "batch": "#1f5fbf", "affine": "#1f5fbf",
    "noisy": "#e07b00", "frozen": "#2a9d5c", "frozen-stats": "#2a9d5c", "ghost": "#8e44ad",
    "no-affine": "#c0392b", "gamma": "#16a085", "beta": "#d4a017",
    "gb-only": "#1f5fbf", "control": "#7f7f7f",
}
LABELS = {"plain": "plain", "bn": "BN", "noisy": "noisy BN", "frozen": "BN frozen stats", "ghost": "ghost BN (8)",
          "affine": "BN + gamma, beta", "no-affine": "BN, no affine", "gamma": "BN + gamma only",
          "beta": "BN + beta only"}

STYLE = {
    "figure.dpi": 110, "savefig.dpi": 110, "font.size": 9.5, "axes.titlesize": 10.5, "axes.titleweight": "bold",
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25,
    "grid.linestyle": "-", "legend.frameon": False, "legend.fontsize": 8.5, "axes.prop_cycle":
        matplotlib.cycler(color=["#1f5fbf", "#7f7f7f", "#e07b00", "#2a9d5c", "#8e44ad", "#c0392b"]),
}


def color(arm: str) -> str:
    return COLORS.get(arm, "#333333")


def label(arm: str) -> str:
    return LABELS.get(arm, arm)


def figure(ncols: int = 1, nrows: int = 1, width: float = 4.6, height: float = 3.4, **kw):
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kw)
    return fig, axes


def save(fig, path: str | Path, title: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with plt.rc_context(STYLE):
        if title:
            fig.suptitle(title, fontsize=11, fontweight="bold")
        fig.tight_layout()
        fig.savefig(path, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def styled(fn):
    """Decorator: run a plotting function inside the house style."""

    def wrapper(*a, **k):
        with plt.rc_context(STYLE):
            return fn(*a, **k)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# ---------------------------------------------------------------- verdicts and the summary forest plot
# One palette for every verdict, diverging from supported (green) through inconclusive (grey) to
# refuted (red); the HTML report's badges use the same colours.
VERDICT_COLORS = {
    "supported": "#1e7e34", "partly supported": "#6a9a23", "inconclusive": "#6b7280",
    "partly refuted": "#d1603d", "refuted": "#b03a2e", "incomplete": "#9aa1ad", "error": "#8e44ad",
    "n/a": "#9aa1ad",
}
DEGENERATE_COLOR = "#a9b0bc"
VERDICT_ORDER = ("supported", "partly supported", "inconclusive", "partly refuted", "refuted", "incomplete", "error")


def verdict_color(verdict: str | None) -> str:
    return VERDICT_COLORS.get(verdict or "", "#333333")


def _shorten(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1].rstrip() + "\u2026"


def forest(rows: list[dict], path: str | Path, title: str | None = None,
           xlabel: str = "effect / claimed size") -> Path:
    """The report's summary figure: one row per claim or part, its effect and 95% interval on a
    common axis (0 = no effect, 1 = the size the claim asserts), coloured by verdict.

    Each row is a dict: ``label`` (left column), ``kind`` ("claim": a heading row of a claim with
    parts, drawn without a marker; "single" or "part": a decided comparison), ``verdict``, ``x``,
    ``x_low``, ``x_high`` (the effect and interval on the common axis, None where there is none),
    ``delta_x`` (where the claimed size sits on that axis: 1, or -1 for a claimed margin below 0),
    ``raw`` and ``units`` (the effect and interval as measured, and their units: the right column, two
    lines), ``degenerate`` (None or
    the reason: drawn grey and hollow, labelled) and ``note`` (why a row has no position)."""
    path = Path(path)
    n = max(len(rows), 1)
    with plt.rc_context(STYLE):
        row_h, top, bottom = 0.44, 1.05, 0.72
        lab_w = min(3.7, max(2.4, 0.064 * max([len(r["label"]) for r in rows] + [10])))
        raw_w = min(3.6, max(2.2, max([(0.075 if r.get("kind") == "claim" else 0.066) * len(r.get("raw") or "")
                                       for r in rows] + [0.66]),
                             0.057 * max([len(r.get("units") or "") for r in rows] + [10])))
        plot_w = 4.7
        gap = 0.12
        W = lab_w + plot_w + raw_w + 2 * gap
        H = top + bottom + row_h * n
        fig = plt.figure(figsize=(W, H))

        def box(x0, w):
            return [x0 / W, bottom / H, w / W, row_h * n / H]

        ax_l = fig.add_axes(box(0, lab_w))
        ax = fig.add_axes(box(lab_w + gap, plot_w))
        ax_r = fig.add_axes(box(lab_w + gap + plot_w + gap, raw_w))
        for a in (ax_l, ax_r):
            a.set_axis_off()
            a.set_xlim(0, 1)
        ys = [n - 1 - i for i in range(len(rows))]
        for a in (ax_l, ax, ax_r):
            a.set_ylim(-0.6, n - 0.4)

        xs = [v for r in rows for v in (r.get("x"), r.get("x_low"), r.get("x_high"), r.get("delta_x"))
              if v is not None and v == v and abs(v) != float("inf")]
        lo = max(-3.0, min([-0.5] + xs) - 0.25)
        hi = min(4.0, max([1.5] + xs) + 0.25)
        ax.set_xlim(lo, hi)

        # one light band per claim (its heading row and its parts), across all three columns
        band = blended_transform_factory(fig.transFigure, ax.transData)
        for a in (ax_l, ax, ax_r):
            a.set_facecolor("none")
        group, shade = None, False
        for r, y in zip(rows, ys):
            if r.get("claim") != group:
                group, shade = r.get("claim"), not shade
            if shade:
                fig.patches.append(Rectangle((0, y - 0.5), 1, 1, transform=band, color="#f1f3f8", lw=0, zorder=-1))
        ax.grid(False)
        ax.grid(axis="x", alpha=0.35, zorder=0.5)
        ax.set_yticks([])
        ax.spines["left"].set_visible(False)
        ax.axvline(0, color="#2b2f38", lw=1.1, zorder=1)
        ax.axvline(1, color=VERDICT_COLORS["supported"], lw=1.1, ls=(0, (4, 3)), zorder=1)
        ax.text(0, n - 0.4, "no effect", ha="center", va="bottom", fontsize=8, color="#2b2f38")
        ax.text(1, n - 0.4, "claimed size", ha="center", va="bottom", fontsize=8, color=VERDICT_COLORS["supported"])

        def clip(v):
            return min(max(v, lo), hi)

        for r, y in zip(rows, ys):
            kind = r.get("kind", "part")
            indent = 0.05 if kind == "part" else 0.0
            bold = "bold" if kind in ("claim", "single") else "normal"
            ax_l.text(0.01 + indent, y, _shorten(r["label"], int(lab_w / 0.064) - (4 if kind == "part" else 0)),
                      ha="left", va="center", fontsize=8.8, fontweight=bold, color="#1d2330")
            col = verdict_color(r.get("verdict"))
            deg = r.get("degenerate")
            if kind == "claim":
                ax_r.text(0.02, y, r.get("raw") or r.get("verdict", ""), ha="left", va="center", fontsize=8.6,
                          fontweight="bold", color=col)
                continue
            x, xl, xh = r.get("x"), r.get("x_low"), r.get("x_high")
            if deg:
                col = DEGENERATE_COLOR
            if r.get("delta_x") is not None and r["delta_x"] != 1:
                ax.plot([r["delta_x"]], [y], marker="d", ms=6, mfc="white", mec="#2b2f38", mew=1, zorder=2)
            if xl is not None and xh is not None:
                a, b = clip(xl), clip(xh)
                ax.plot([a, b], [y, y], color=col, lw=2.2, solid_capstyle="butt", zorder=3)
                for end, raw_end, m in ((a, xl, "<"), (b, xh, ">")):
                    if raw_end != end:
                        ax.plot([end], [y], marker=m, ms=6, color=col, zorder=3)
                    else:
                        ax.plot([end, end], [y - 0.14, y + 0.14], color=col, lw=1.4, zorder=3)
            if x is not None:
                inside = lo <= x <= hi
                marker = "o" if inside else (">" if x > hi else "<")
                if deg:
                    ax.plot([clip(x)], [y], marker=marker, ms=7, mfc="white", mec=col, mew=1.6, zorder=4)
                else:
                    ax.plot([clip(x)], [y], marker=marker, ms=8 if not inside else 7, color=col, mec="white",
                            mew=0.8, zorder=4)
                if not inside:  # off the axis: say where it is
                    right = x > hi
                    ax.text(hi - 0.035 * (hi - lo) if right else lo + 0.035 * (hi - lo), y + 0.02,
                            f"{x:.3g} \u2192" if right else f"\u2190 {x:.3g}", ha="right" if right else "left",
                            va="center", fontsize=7.8, color=col, fontweight="bold", zorder=5,
                            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
            text = None
            if deg:
                text = "degenerate: " + str(deg)
            elif x is None:
                text = r.get("note") or "no effect to show"
            if text:
                if x is not None and clip(x) < (lo + hi) / 2:
                    tx, ha = clip(x) + 0.04 * (hi - lo), "left"
                elif x is not None:
                    tx, ha = clip(x) - 0.04 * (hi - lo), "right"
                else:
                    tx, ha = lo + 0.02 * (hi - lo), "left"
                room = (hi - tx if ha == "left" else tx - lo) / (hi - lo) * plot_w
                ax.text(tx, y, _shorten(text, max(12, int(room / 0.058))), ha=ha, va="center", fontsize=7.8,
                        style="italic", color="#5b6475", zorder=5,
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
            units = r.get("units")
            ax_r.text(0.02, y + (0.17 if units else 0), r.get("raw") or "", ha="left", va="center", fontsize=8.4,
                      color="#5b6475" if deg else "#1d2330")
            if units:
                ax_r.text(0.02, y - 0.2, _shorten(units, int(raw_w / 0.057)), ha="left", va="center", fontsize=7.6,
                          color="#5b6475")
        ax.set_xlabel(xlabel, fontsize=9)
        ax.tick_params(axis="x", labelsize=8.5)

        # the verdicts drawn (undecided claims have no marker: their row says why)
        present = [v for v in VERDICT_ORDER[:5] if any(r.get("verdict") == v and not (r.get("degenerate")
                                                                                      and r.get("kind") != "claim")
                                                       for r in rows)]
        handles = [Line2D([], [], marker="o", ls="-", lw=2.2, ms=7, color=verdict_color(v), mec="white", label=v)
                   for v in present]
        if any(r.get("degenerate") for r in rows):
            handles.append(Line2D([], [], marker="o", ls="-", lw=2.2, ms=7, color=DEGENERATE_COLOR, mfc="white",
                                  mec=DEGENERATE_COLOR, mew=1.6, label="degenerate (inconclusive)"))
        if any(r.get("delta_x") not in (None, 1) for r in rows if r.get("kind") != "claim"):
            handles.append(Line2D([], [], marker="d", ls="none", ms=6, mfc="white", mec="#2b2f38",
                                  label="claimed margin below 0"))
        fig.legend(handles=handles, loc="lower center", ncol=max(1, len(handles) if len(handles) <= 7
                                                                 else (len(handles) + 1) // 2), frameon=False,
                   fontsize=8.6, bbox_to_anchor=(0.5, (bottom + row_h * n + 0.18) / H), handlelength=2.2,
                   columnspacing=1.4)
        ax_l.text(0.01, n - 0.4 + 0.05, "claim / part", ha="left", va="bottom", fontsize=8.2, color="#5b6475",
                  fontweight="bold")
        ax_r.text(0.02, n - 0.4 + 0.05, "effect [95% interval] units", ha="left", va="bottom", fontsize=8.2,
                  color="#5b6475", fontweight="bold")
        if title:
            fig.text(0.5, 1 - 0.18 / H, title, ha="center", va="top", fontsize=11.5, fontweight="bold",
                     color="#1d2330")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight", pad_inches=0.12, metadata={"Software": None}, facecolor="white")
    plt.close(fig)
    return path
