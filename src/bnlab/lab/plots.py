"""The report's house style for matplotlib figures (Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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
