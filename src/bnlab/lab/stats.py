"""The audit's statistics, rules version 2 (docs/CLAIMS.md, "Rules, version 2").

Every comparison is *paired*: each seed gives one effect d_s (arm A minus arm B on the same seed,
split, batches and initial weights), signed so that positive is the direction the claim asserts.
From the d_s this module computes

- the effect: the mean of d_s (for ratios the d_s are log ratios and the effect is reported back
  as a geometric-mean ratio);
- its 95% interval: the Student t-interval of the mean (n - 1 degrees of freedom); a percentile
  bootstrap only when n >= 20, where it is trustworthy;
- the Wilcoxon signed-rank p (two-sided, scipy.stats.wilcoxon) and the sign count (seeds in the
  claimed direction, "k/n");
- the default rule: ``supported`` when the interval lies above 0 and the effect is at least
  delta, ``refuted`` when the interval lies below delta (the data exclude an effect as large as
  claimed, the opposite direction included), ``inconclusive`` otherwise;
- ``inconclusive`` with a reason whenever the metric is degenerate (it cannot separate the arms).

A *part* is a dict with the keys results.json promises for every claim and part::

    verdict, effect, effect_units, delta, n, interval {low, high, level, method}, p_wilcoxon,
    sign, degenerate, rule_version, sensitivity, per_seed, scale, rule, why

``combine`` turns parts into a claim's verdict (supported / refuted / inconclusive / partly
supported / partly refuted).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import stats as _st

RULE_VERSION = 2
LEVEL = 0.95
BOOTSTRAP_MIN_N = 20
VERDICTS = ("supported", "refuted", "inconclusive", "partly supported", "partly refuted")


def finite(values: Sequence[float | None]) -> list[float]:
    """The finite values of ``values`` (None, NaN and +-inf dropped)."""
    out = []
    for v in values:
        if v is None:
            continue
        f = float(v)
        if math.isfinite(f):
            out.append(f)
    return out


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float] | None:
    """Student t-interval of the mean (n - 1 degrees of freedom); None with fewer than 2 values.

    With zero spread the interval collapses to the mean (every seed gave the same effect)."""
    v = np.asarray(finite(values), dtype=float)
    n = len(v)
    if n < 2:
        return None
    mean = float(v.mean())
    se = float(v.std(ddof=1)) / math.sqrt(n)
    if se == 0.0:
        return (mean, mean)
    q = float(_st.t.ppf(0.5 + level / 2, df=n - 1))
    return (mean - q * se, mean + q * se)


def bootstrap_interval(values: Sequence[float], level: float = LEVEL, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (scipy.stats.bootstrap, deterministic); n >= 20 only."""
    v = np.asarray(finite(values), dtype=float)
    if len(v) < BOOTSTRAP_MIN_N:
        raise ValueError(f"a percentile bootstrap needs n >= {BOOTSTRAP_MIN_N} values (got {len(v)}); "
                         "use t_interval")
    if float(v.std()) == 0.0:
        return (float(v[0]), float(v[0]))
    res = _st.bootstrap((v,), np.mean, confidence_level=level, method="percentile", n_resamples=9999,
                        random_state=np.random.default_rng(seed))
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def interval(values: Sequence[float], level: float = LEVEL) -> tuple[tuple[float, float] | None, str]:
    """The interval rules v2 use for ``values``, and its method's name."""
    if len(finite(values)) >= BOOTSTRAP_MIN_N:
        return bootstrap_interval(values, level), "percentile bootstrap"
    return t_interval(values, level), "t"


def wilcoxon_p(values: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p of the paired effects against 0 (zeros dropped).

    1.0 when every effect is 0; None with no values."""
    v = np.asarray(finite(values), dtype=float)
    if len(v) == 0:
        return None
    if not np.any(v != 0):
        return 1.0
    return float(_st.wilcoxon(v, zero_method="wilcox", alternative="two-sided").pvalue)


def sign_count(values: Sequence[float]) -> str:
    """Seeds whose effect is in the claimed direction (> 0), as "k/n"."""
    v = finite(values)
    return f"{sum(1 for x in v if x > 0)}/{len(v)}"


def log_ratios(num: Sequence[float | None], den: Sequence[float | None]) -> list[float | None]:
    """Per-seed log(num / den); None where either is missing or not positive."""
    out = []
    for a, b in zip(num, den):
        if a is None or b is None or not (a > 0 and b > 0) or not (math.isfinite(a) and math.isfinite(b)):
            out.append(None)
        else:
            out.append(math.log(a / b))
    return out


def default_rule(effect: float, low: float, high: float, delta: float) -> str:
    """Rules v2's default rule on an effect and its interval (positive = the claimed direction)."""
    if low > 0 and effect >= delta:
        return "supported"
    if high < delta:
        return "refuted"
    return "inconclusive"


def part(values: Sequence[float | None], delta: float, *, units: str, seeds: Sequence[int] | None = None,
         log: bool = False, degenerate: str | None = None, rule: str = "", label: str = "",
         decide: Callable[[float, float, float, float], str] | None = None,
         sensitivity: Mapping[str, str] | None = None, extra: Mapping | None = None) -> dict:
    """One decided comparison: the paired per-seed effects ``values`` (None = no effect for that
    seed, e.g. both arms censored) against ``delta``, both in the effect's units (log units when
    ``log``; the part then reports the geometric-mean ratio, its interval and delta as ratios).

    ``degenerate`` (a reason) forces ``inconclusive``. ``decide`` replaces the default rule (it
    receives effect, low, high, delta in the decision units). With fewer than two finite effects
    the interval is undefined and the part is degenerate."""
    vals = finite(values)
    n = len(vals)
    ci, method = interval(vals) if n >= 2 else (None, "t")
    mean = float(np.mean(vals)) if n else None
    if degenerate is None and n < 2:
        degenerate = f"only {n} seed(s) give an effect; an interval needs 2 or more"
    if degenerate is not None:
        verdict = "inconclusive"
    else:
        verdict = (decide or default_rule)(mean, ci[0], ci[1], delta)
    tr = math.exp if log else (lambda x: x)
    out = {
        "label": label,
        "verdict": verdict,
        "effect": None if mean is None else tr(mean),
        "effect_units": units,
        "delta": tr(delta),
        "n": n,
        "interval": None if ci is None else {"low": tr(ci[0]), "high": tr(ci[1]), "level": LEVEL, "method": method},
        "p_wilcoxon": wilcoxon_p(vals) if n else None,
        "sign": sign_count(vals),
        "degenerate": degenerate,
        "rule_version": RULE_VERSION,
        "sensitivity": dict(sensitivity or {}),
        "scale": "log" if log else "linear",
        "per_seed": [{"seed": None if seeds is None else int(s), "value": None if v is None else tr(float(v))}
                     for s, v in zip(seeds if seeds is not None else [None] * len(values), values)],
        "rule": rule,
    }
    out["why"] = why(out)
    if extra:
        out.update(extra)
    return out


def why(p: Mapping) -> str:
    """One sentence saying how a part's verdict follows from its numbers."""
    if p.get("degenerate"):
        return f"degenerate: {p['degenerate']}"
    iv = p.get("interval")
    if not iv:
        return "no interval"
    out = (f"effect {_g(p['effect'])} {p['effect_units']}, 95% {iv['method']} interval "
           f"[{_g(iv['low'])}, {_g(iv['high'])}] against delta {_g(p['delta'])}; {p['sign']} seeds in the claimed "
           f"direction, Wilcoxon p = {_g(p['p_wilcoxon'])} (n = {p['n']})")
    if iv["low"] == iv["high"]:
        out += (f"; every seed gave the same effect, so the interval has zero width: the seeds did not vary at "
                f"the metric's resolution (a grid's step, a share of a grid's cells), which says nothing about "
                f"variation finer than that step")
    return out


def _g(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}"


def combine(verdicts: Sequence[str]) -> str:
    """A claim's verdict from its parts' verdicts (rules v2, "Parts")."""
    vs = list(verdicts)
    if not vs:
        return "inconclusive"
    for v in ("supported", "refuted", "inconclusive"):
        if all(x == v for x in vs):
            return v
    if any(x == "supported" for x in vs):
        return "partly supported"
    if any(x == "refuted" for x in vs):
        return "partly refuted"
    return "inconclusive"


def claim(parts: Mapping[str, dict], **extra) -> dict:
    """A claim's top-level decision from its parts. A one-part claim carries that part's numbers
    at the top level; a claim with several parts carries ``parts`` and the combined verdict."""
    parts = dict(parts)
    if len(parts) == 1:
        (only,) = parts.values()
        out = dict(only)
        out["parts"] = None
    else:
        ns = [p["n"] for p in parts.values()]
        out = {"verdict": combine([p["verdict"] for p in parts.values()]), "effect": None, "effect_units": None,
               "delta": None, "n": min(ns) if ns else 0, "interval": None, "p_wilcoxon": None, "sign": None,
               "degenerate": None, "rule_version": RULE_VERSION,
               "sensitivity": _combined_sensitivity(parts), "per_seed": [], "parts": parts,
               "why": "; ".join(f"{k}: {p['verdict']}" for k, p in parts.items())}
    out.update(extra)
    return out


def _combined_sensitivity(parts: Mapping[str, dict]) -> dict:
    """The claim's verdict at each sensitivity setting its parts share (parts without that setting
    keep their own verdict)."""
    keys: list[str] = []
    for p in parts.values():
        keys += [k for k in p.get("sensitivity", {}) if k not in keys]
    return {k: combine([p.get("sensitivity", {}).get(k, p["verdict"]) for p in parts.values()]) for k in keys}


def trained_threshold(chance: float, best: float, share: float = 0.8) -> tuple[float, str | None]:
    """Rules v2's dataset-relative "trained" threshold c + share (b - c), with b the best seed-mean
    accuracy any arm reached; the second value is a degenerate reason when b is barely above
    chance (b - c < 0.1 (1 - c))."""
    thr = chance + share * (best - chance)
    if best - chance < 0.1 * (1 - chance):
        return thr, f"the best arm reached {100 * best:.1f}% against chance {100 * chance:.1f}%: nothing trained"
    return thr, None


# ------------------------------------------------------------------ v1, kept for the history table
def v1_bootstrap(values: Sequence[float], stat=np.median, resamples: int = 10_000, seed: int = 0) -> list[float] | None:
    """Rules v1's percentile bootstrap over seeds (for the history table only: with 3-5 seeds it is
    about [min, max] of the seeds)."""
    v = np.array([float(x) for x in values if x is not None and not math.isnan(float(x))], dtype=float)
    if len(v) == 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(resamples, len(v)))
    with np.errstate(invalid="ignore"):
        s = stat(v[idx], axis=1)
    s = s[~np.isnan(s)]
    lo, hi = np.quantile(s, [0.025, 0.975])
    return [float(lo), float(hi)]


def per_seed(seeds: Sequence[int], values: Sequence[float | None], **extra) -> list[dict]:
    return [dict({"seed": int(s), "value": (None if v is None else float(v))}, **extra) for s, v in zip(seeds, values)]
