"""Bootstrap intervals and the decision-rule helpers shared by the claims (CLAIMS.md, shared
settings): every verdict comes with its effect, per-seed values, a bootstrap 95% interval over
seeds and the rule that produced it."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000


def finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def bootstrap_ci(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean, level: float = 0.95,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of ``stat`` over ``values`` (seeds), deterministic (seed 0).

    Infinite values (a ratio over a zero) are kept: they sort to the ends of the interval."""
    v = np.array([float(x) for x in values if x is not None and not math.isnan(float(x))], dtype=float)
    if len(v) == 0:
        return None
    if len(v) == 1:
        return [float(v[0]), float(v[0])]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(resamples, len(v)))
    with np.errstate(invalid="ignore"):
        stats = np.array([stat(v[i]) for i in idx]) if stat not in (np.mean, np.median) else \
            (v[idx].mean(1) if stat is np.mean else np.median(v[idx], axis=1))
    stats = stats[~np.isnan(stats)]
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def needed(n: int) -> int:
    """Seeds that must agree: 4 of 5, 3 of 3 (CLAIMS.md), i.e. ceil(0.8 n)."""
    return max(1, math.ceil(0.8 * n - 1e-9))


def default_rule(effects: Sequence[float], delta: float) -> tuple[str, str]:
    """CLAIMS.md's default rule on per-seed effects (positive = the claimed direction).

    supported: the direction holds in >= 4/5 seeds (3/3) and the mean effect >= delta;
    refuted: the opposite holds in >= 4/5 seeds, or the 95% interval lies inside (-delta/2, delta/2);
    else inconclusive. Returns (verdict, reason)."""
    e = finite(effects)
    n = len(e)
    need = needed(n)
    pos, neg = sum(x > 0 for x in e), sum(x < 0 for x in e)
    mean = float(np.mean(e)) if e else float("nan")
    ci = bootstrap_ci(e)
    if pos >= need and mean >= delta:
        return "supported", f"{pos}/{n} seeds in the claimed direction, mean {mean:.3g} >= {delta:g}"
    if neg >= need:
        return "refuted", f"{neg}/{n} seeds in the opposite direction"
    if ci is not None and -delta / 2 < ci[0] and ci[1] < delta / 2:
        return "refuted", f"95% interval [{ci[0]:.3g}, {ci[1]:.3g}] inside (-{delta / 2:g}, {delta / 2:g})"
    return "inconclusive", f"{pos}/{n} seeds in the claimed direction, mean {mean:.3g} (delta {delta:g})"


def per_seed(seeds: Sequence[int], values: Sequence[float | None], **extra) -> list[dict]:
    return [dict({"seed": int(s), "value": (None if v is None else float(v))}, **extra) for s, v in zip(seeds, values)]


def combine_parts(parts: dict[str, str]) -> str:
    """A claim with parts: all supported -> supported; all refuted -> refuted; some supported ->
    partly supported; otherwise inconclusive."""
    vs = list(parts.values())
    if vs and all(v == "supported" for v in vs):
        return "supported"
    if vs and all(v == "refuted" for v in vs):
        return "refuted"
    if any(v == "supported" for v in vs):
        return "partly supported"
    return "inconclusive"
