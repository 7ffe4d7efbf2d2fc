"""The audit's report: ``report.md``, a self-contained ``report.html`` (plots embedded as base64
PNG, inline CSS, no network), ``results.json`` and ``runs.jsonl`` (every run's config, result and
timing) in one folder.

The report opens with one summary figure (a forest plot: every claim's and part's effect with its
95% interval on the common axis "effect / claimed size"), then the verdict table, the robustness
matrix (claim x data set x seed set), the history of the rules, the sensitivity of each verdict to
its thresholds, and one section per claim.

results.json::

    {"claims": {"C1": {"verdict", "effect", "effect_units", "delta", "n",
                       "interval": {"low", "high", "level", "method"} | null, "p_wilcoxon", "sign",
                       "degenerate", "rule_version", "sensitivity", "parts": {name: {the same keys
                       but parts, "label", "thresholds"?, "per_seed", "scale", "rule", "why"}} | null,
                       "per_seed", "scale", "rule", "why", "history", "robustness"?, "tables",
                       "findings", "metrics", "protocol_changes", "seeds", "settings", "runs",
                       "compute_s", "plots"}, ...},
     "robustness": {claim: {"cells": [...], "robust", "summary"}}   (when robustness ran: full),
     "summary_plot": {"file", "caption"},
     "findings": {"F1": {"title", "question", "status", "summary", "findings", "tables", "comparisons",
                         "metrics", "notes", "seeds", "settings", "runs", "compute_s", "plots", ...}}
                 (the audit's findings, bnlab.lab.findings: numbers and intervals, no verdicts),
     "provenance": {"versions", "code_revision", "fingerprints", "profile", "seeds", "machine",
                    "workers", "wall_time", "budgets", ...}}

A claim that is incomplete or failed still carries every decision key (null where it has no number).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from . import plots
from .protocol import BUDGET_S
from .stats import LEVEL, RULE_VERSION
from .tasks import PACKAGE_DIR, fingerprint, task_names

TEMPLATES = Path(__file__).resolve().parent / "templates"
_PACKAGES = ["bnlab", "torch", "numpy", "numba", "scikit-learn", "mnist1d", "scipy", "matplotlib", "jinja2", "rich"]


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def code_revision() -> str:
    """``git describe``-like: the commit of the bnlab source tree, "+dirty" if its files differ."""
    root = PACKAGE_DIR.parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not rev:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(args, ctxs: dict, store, claims: dict, audit: dict | None, findings: dict | None = None) -> dict:
    """Versions, code revision, seeds, machine and wall times (per claim, per finding and for the audit)."""
    import torch

    profile = args.profile
    seeds = {c: x.seeds for c, x in ctxs.items()}
    executing = [a for a in store.audits() if a["profile"] == profile and a["seeds"] == seeds and a["executed"]
                 and a["status"] == "ok" and a["claims"] == list(ctxs)]
    last = executing[-1] if executing else None
    per_claim = {}
    for cid, c in claims.items():
        per_claim[cid] = {"runs": c.get("runs"), "compute_s": round(c.get("compute_s", 0.0), 2)}
        if audit and cid in audit.get("claim_elapsed_s", {}):
            per_claim[cid]["elapsed_s_this_audit"] = round(audit["claim_elapsed_s"][cid], 2)
        if last and last.get("claim_wall") and cid in last["claim_wall"]:
            per_claim[cid]["elapsed_s_when_executed"] = round(last["claim_wall"][cid], 2)
    wall = {"per_claim": per_claim}
    if findings:
        wall["per_finding"] = {fid: {"runs": f.get("runs"), "compute_s": round(f.get("compute_s", 0.0), 2),
                                     **({"elapsed_s_this_audit": round(audit["claim_elapsed_s"][fid], 2)}
                                        if audit and fid in audit.get("claim_elapsed_s", {}) else {})}
                               for fid, f in findings.items()}
    if audit:
        wall["this_invocation_s"] = round(audit["wall_s"], 2)
        wall["executed"] = audit["executed"]
        wall["from_store"] = audit["from_store"]
    if last:
        wall["last_executing_audit"] = {"wall_s": round(last["wall_s"], 2), "executed": last["executed"],
                                        "from_store": last["from_store"], "workers": last["workers"],
                                        "finished": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["finished"]))}
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": "bnlab " + args.command if hasattr(args, "command") else "bnlab",
        "profile": profile,
        "seeds": seeds,
        "dataset": getattr(args, "dataset", None),
        "workers": getattr(args, "workers", None),
        "torch_threads_per_worker": 1,
        "store": str(args.store),
        "versions": dict({"python": platform.python_version()}, **{p: _version(p) for p in _PACKAGES}),
        "code_revision": code_revision(),
        "fingerprints": {t: fingerprint(t) for t in task_names()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_default_threads": torch.get_num_threads(),
                    "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None},
        "wall_time": wall,
        "budgets": {k: {"seconds": v, "what": f"`bnlab audit --profile {k}` (claims C1-C5, 2 workers x 1 thread) wall clock"}
                    for k, v in BUDGET_S.items()},
    }


# ---------------------------------------------------------------- the decision fields
DECISION_KEYS = ("verdict", "effect", "effect_units", "delta", "n", "interval", "p_wilcoxon", "sign",
                 "degenerate", "rule_version", "sensitivity")
CLAIM_KEYS = DECISION_KEYS + ("parts",)
SENSITIVITY_ORDER = ("stricter", "default", "looser")
SUMMARY_PLOT = "summary_forest.png"
SUMMARY_CAPTION = (
    "Every claim's and part's effect with its 95% interval, on one axis: effect / claimed size (the effect "
    "divided by the claim's delta; for ratios, log(effect) / log(delta)), so 0 is no effect and 1 is the size the "
    "claim asserts. Colour: the verdict. Grey hollow markers: degenerate comparisons (the metric cannot separate "
    "the arms; inconclusive). The raw effect, its interval and units are at the right of each row.")


def _decision(d: dict, *, claim: bool) -> dict:
    """``d`` with every key results.json promises for a claim (``claim``) or a part; absent values
    are null (a claim that is incomplete or failed has no numbers)."""
    out = dict(d)
    for k in DECISION_KEYS:
        out.setdefault(k, None)
    if out["rule_version"] is None:
        out["rule_version"] = RULE_VERSION
    if out["sensitivity"] is None:
        out["sensitivity"] = {}
    iv = out["interval"]
    if iv is not None:
        out["interval"] = {"low": iv.get("low"), "high": iv.get("high"), "level": iv.get("level", LEVEL),
                           "method": iv.get("method")} | {k: v for k, v in iv.items()
                                                           if k not in ("low", "high", "level", "method")}
    if claim:
        parts = out.get("parts")
        out["parts"] = {str(k): _decision(p, claim=False) for k, p in parts.items()} if parts else None
    return out


def _parts(c: dict) -> dict:
    return c.get("parts") or {}


def _part_label(name: str, p: dict) -> str:
    lab = (p.get("label") or "").strip()
    return f"{name}: {lab}" if lab and lab != name else str(name)


# ---------------------------------------------------------------- rendering helpers
def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{digits}g}"
    return str(v)


def _interval_text(iv) -> str:
    if not iv:
        return "n/a"
    if isinstance(iv, (list, tuple)):
        return f"[{_fmt(iv[0])}, {_fmt(iv[1])}]"
    return f"[{_fmt(iv.get('low'))}, {_fmt(iv.get('high'))}]"


def effect_text(p: dict, units: bool = True) -> str:
    """"effect [low, high] units" as measured (ratios as geometric-mean ratios)."""
    if p.get("effect") is None:
        return "n/a"
    s = f"{_fmt(p['effect'])} {_interval_text(p.get('interval'))}"
    if units and p.get("effect_units"):
        s += f" {p['effect_units']}"
    return s


def _per_seed_str(per_seed) -> str:
    if not per_seed:
        return ""
    parts = []
    for p in per_seed:
        tag = f"{p['part']}:" if p.get("part") else ""
        seed = "" if p.get("seed") is None else f"s{p['seed']}="
        parts.append(f"{tag}{seed}{_fmt(p.get('value'))}")
    return ", ".join(parts)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None if obj != obj else ("inf" if obj > 0 else "-inf")
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():
        return _jsonable(obj.item())  # numpy scalars
    return obj


# ---------------------------------------------------------------- the summary forest plot
def common_scale(value, delta, scale: str = "linear") -> float | None:
    """``value`` on the forest plot's common axis "effect / claimed size": value / |delta| for a
    linear effect, log(value) / |log(delta)| for a ratio (scale "log": value and delta are ratios),
    so that 0 is no effect and +-1 the claimed size (-1 where the claimed size is a margin below 0,
    e.g. non-inferiority). None where there is no value or no usable delta (0, or a ratio of 1)."""
    if value is None or delta is None:
        return None
    try:
        v, d = float(value), float(delta)
    except (TypeError, ValueError):
        return None
    if v != v or d != d or math.isinf(d):
        return None
    if scale == "log":
        if d <= 0 or v < 0 or math.log(d) == 0:
            return None
        if v == 0:
            return float("-inf")
        return math.log(v) / abs(math.log(d))
    if d == 0:
        return None
    return v / abs(d)


def _delta_position(delta, scale: str) -> float | None:
    """Where the claimed size sits on the common axis: 1, or -1 for a margin below no effect."""
    one = common_scale(delta, delta, scale)
    return None if one is None else (1.0 if one > 0 else -1.0)


def _forest_row(cid: str, label: str, p: dict, kind: str) -> dict:
    scale = p.get("scale") or "linear"
    iv = p.get("interval") or {}
    delta = p.get("delta")
    row = {"claim": cid, "label": label, "kind": kind, "verdict": p.get("verdict"), "scale": scale, "units": "",
           "effect": p.get("effect"), "delta": delta,
           "x": common_scale(p.get("effect"), delta, scale),
           "x_low": common_scale(iv.get("low"), delta, scale),
           "x_high": common_scale(iv.get("high"), delta, scale),
           "delta_x": _delta_position(delta, scale), "degenerate": p.get("degenerate"), "note": None}
    if p.get("effect") is None:
        row["raw"] = (p.get("verdict") or "n/a") if p.get("verdict") in ("incomplete", "error") else \
            f"n/a   n = {p.get('n', 0)}"
        why = [x.strip() for x in (p.get("why") or "").strip().splitlines() if x.strip()]
        # a traceback's last line says what failed
        row["note"] = f"{p.get('verdict')}: {why[-1] if why else 'no effect'}" if p.get("verdict") in (
            "incomplete", "error") else "no effect measured"
    else:
        row["raw"] = f"{effect_text(p, units=False)}   n = {p.get('n')}"
        row["units"] = p.get("effect_units") or ""
        if row["x"] is None:
            row["note"] = f"delta {_fmt(delta)}: no claimed size to scale by"
    return row


def forest_rows(claims: dict) -> list[dict]:
    """One row per claim without parts, and per claim with parts a heading row followed by one row
    per part, each on the common axis (see :func:`common_scale`)."""
    rows = []
    for cid, c in claims.items():
        title = f"{cid}  {c.get('title', '')}".strip()
        parts = _parts(c)
        if parts:
            vs = [p.get("verdict") for p in parts.values()]
            k = sum(v == "supported" for v in vs)
            rows.append({"claim": cid, "label": title, "kind": "claim", "verdict": c.get("verdict"),
                         "raw": f"{c.get('verdict')} ({k} of {len(vs)} parts supported)",
                         "x": None, "x_low": None, "x_high": None, "delta_x": None, "degenerate": None})
            for name, p in parts.items():
                rows.append(_forest_row(cid, _part_label(name, p), p, "part"))
        else:
            rows.append(_forest_row(cid, title, c, "single"))
    return rows


def summary_plot(claims: dict, outdir: Path) -> Path | None:
    rows = forest_rows(claims)
    if not rows:
        return None
    return plots.forest(rows, Path(outdir) / "plots" / SUMMARY_PLOT,
                        title="Effects against the size each claim asserts (95% intervals)",
                        xlabel="effect / claimed size   (0 = no effect, 1 = the claimed size; ratios on a log scale)")


# ---------------------------------------------------------------- the tables (shared by Markdown, HTML, terminal)
def verdict_rows(claims: dict) -> list[dict]:
    """The verdict table: one row per claim, then one per part (claims with parts)."""
    rows = []

    def row(cid, title, part, p, kind):
        return {"claim": cid, "title": title, "part": part, "kind": kind, "verdict": p.get("verdict"),
                "effect": effect_text(p), "effect_num": effect_text(p, units=False),
                "units": p.get("effect_units") or "", "delta": _fmt(p.get("delta")), "n": _fmt(p.get("n")),
                "sign": p.get("sign") or "", "p": _fmt(p.get("p_wilcoxon")), "degenerate": p.get("degenerate") or "",
                "scale": p.get("scale") or "linear"}

    for cid, c in claims.items():
        parts = _parts(c)
        if parts:
            r = row(cid, c.get("title", ""), "all parts", c, "claim")
            r.update(effect="", effect_num="", units="", delta="", n="", sign="", p="")
            rows.append(r)
            for name, p in parts.items():
                rows.append(row(cid, c.get("title", ""), _part_label(name, p), p, "part"))
        else:
            r = row(cid, c.get("title", ""), "", c, "single")
            if c.get("status") in ("incomplete", "error"):
                r["degenerate"] = ""
            rows.append(r)
    return rows


def robustness_matrix(claims: dict) -> dict | None:
    """Claim (and part) x data set x seed set; None when no claim has robustness cells."""
    entries = {cid: c["robustness"] for cid, c in claims.items() if c.get("robustness")}
    if not entries:
        return None
    seen = []
    for r in entries.values():
        for cell in r.get("cells", []):
            k = (cell.get("dataset"), cell.get("seed_set"))
            if k not in seen:
                seen.append(k)
    datasets = list(dict.fromkeys(k[0] for k in seen))
    sets = sorted({k[1] for k in seen}, key=str)
    cols = [(d, s) for d in datasets for s in sets if (d, s) in seen]
    seeds = {}
    for r in entries.values():
        for cell in r.get("cells", []):
            seeds.setdefault(cell.get("seed_set"), [])
            t = list(cell.get("seeds") or [])
            if t not in seeds[cell.get("seed_set")]:
                seeds[cell.get("seed_set")].append(t)
    rows = []
    for cid, c in claims.items():
        r = entries.get(cid)
        if r is None:
            rows.append({"claim": cid, "label": f"{cid}  {c.get('title', '')}", "kind": "claim",
                         "headline": c.get("verdict"), "cells": [None] * len(cols), "robust": None,
                         "summary": "no robustness cells for this claim"})
            continue
        by = {(x.get("dataset"), x.get("seed_set")): x for x in r.get("cells", [])}

        def cell(k, verdict, headline):
            x = by.get(k)
            if x is None:
                return None
            return {"verdict": verdict, "seeds": list(x.get("seeds") or []), "differs": verdict != headline}

        head = c.get("verdict")
        # a row is robust when every cell it has gives the same verdict (and every cell was decided)
        verdicts = {x.get("verdict") for x in by.values()}
        decided = all(x.get("status", "decided") == "decided" for x in by.values())
        rows.append({"claim": cid, "label": f"{cid}  {c.get('title', '')}", "kind": "claim", "headline": head,
                     "cells": [cell(k, by[k].get("verdict"), head) if k in by else None for k in cols],
                     "robust": len(verdicts) <= 1 and decided if by else r.get("robust"),
                     "summary": r.get("summary", "")})
        names = list(_parts(c))
        for x in by.values():
            names += [n for n in (x.get("parts") or {}) if n not in names]
        for name in names:
            vs = [(by[k].get("parts") or {}).get(name) if k in by else None for k in cols]
            present = [v for v in vs if v is not None]
            phead = _parts(c).get(name, {}).get("verdict")
            rows.append({"claim": cid, "label": _part_label(name, _parts(c).get(name, {})), "kind": "part",
                         "headline": phead,
                         "cells": [cell(k, v, phead) if v is not None else None for k, v in zip(cols, vs)],
                         "robust": (len(set(present)) <= 1 and len(present) == len(by)) if present else None,
                         "summary": "" if present else "no cell reports this part"})
    return {"columns": [{"dataset": d, "seed_set": s} for d, s in cols], "rows": rows,
            "seed_sets": {str(k): v for k, v in seeds.items()}}


ROBUSTNESS_ABSENT = ("Robustness is checked in the full profile (every claim on each shipped data set its "
                     "architecture allows and on two disjoint seed sets); this report has no robustness cells.")


def history_rows(claims: dict) -> tuple[list[int], list[dict]]:
    """Rule versions present, and per claim its verdict under each version, with dates and the reason
    the latest version replaced the one before."""
    versions = sorted({h["version"] for c in claims.values() for h in (c.get("history") or [])})
    rows = []
    for cid, c in claims.items():
        hist = {h["version"]: h for h in (c.get("history") or [])}
        latest = hist[max(hist)] if hist else None
        cells = [hist.get(v) for v in versions]
        vs = {h.get("verdict") for h in hist.values()}
        rows.append({"claim": cid, "title": c.get("title", ""), "cells": cells,
                     "changed": len(vs) > 1 if hist else None,
                     "reason": (latest or {}).get("reason") or ("" if hist else c.get("verdict", ""))})
    return versions, rows


def sensitivity_rows(claims: dict) -> tuple[list[str], list[dict]]:
    """Claim/part x threshold setting (stricter, default, looser): the verdict and the threshold."""
    keys = list(SENSITIVITY_ORDER)
    entries = []
    for cid, c in claims.items():
        parts = _parts(c)
        if parts:
            entries.append((cid, f"{cid}  {c.get('title', '')}", "claim", c))
            entries += [(cid, _part_label(n, p), "part", p) for n, p in parts.items()]
        else:
            entries.append((cid, f"{cid}  {c.get('title', '')}", "single", c))
    for _, _, _, p in entries:
        keys += [k for k in (p.get("sensitivity") or {}) if k not in keys]
    rows = []
    for cid, label_, kind, p in entries:
        sens = p.get("sensitivity") or {}
        thr = p.get("thresholds") or {}
        rows.append({"claim": cid, "label": label_, "kind": kind, "verdict": p.get("verdict"),
                     "cells": [None if k not in sens else {"verdict": sens[k], "threshold": thr.get(k, "")}
                               for k in keys],
                     "none": not sens,
                     "stable": len(set(sens.values())) <= 1 if sens else None})
    return keys, rows


# ---------------------------------------------------------------- findings ("Beyond the claims")
BEYOND_TITLE = "Beyond the claims"
BEYOND_LEAD = ("Studies the audit runs beside the claims. They decide nothing: each reports its numbers with paired "
               "95% intervals, as the claims' parts do, and reads them without a verdict.")


def _findings_json(findings: dict, outdir: Path) -> dict:
    out = {}
    for fid, f in (findings or {}).items():
        d = {k: v for k, v in f.items() if k not in ("doc", "run_keys")}
        d["plots"] = [{"file": os.path.relpath(p, outdir), "caption": cap} for p, cap in f.get("plots") or []]
        out[fid] = d
    return out


def findings_lines(findings: dict, console) -> None:
    """One line per finding in the terminal: its summary, or why it has none."""
    for fid, f in (findings or {}).items():
        text = f.get("summary") if f.get("status") == "decided" else (
            f"{f.get('status')}: {((f.get('why') or '').strip().splitlines() or [''])[-1]}")
        console.print(f"[bold]{fid}[/] {f.get('title', '')}: {text}", markup=True, highlight=False)


def _findings_markdown(findings: dict, outdir: Path) -> list[str]:
    if not findings:
        return []
    L = [f"## {BEYOND_TITLE}", "", BEYOND_LEAD, ""]
    for fid, f in findings.items():
        L += [f"### {fid} - {f.get('title', '')}", "", f"> {f.get('question', '')}", ""]
        if f.get("status") != "decided":
            L += [f"Not computed: {f.get('status')}: {f.get('why', '')}", ""]
            continue
        L += [f"**{f.get('summary', '')}**", ""]
        L += [f"- {x}" for x in f.get("findings") or []]
        L += [f"- Note: {x}" for x in _as_list(f.get("notes"))]
        L.append("")
        for p, cap in f.get("plots") or []:
            L += [f"![{cap}]({os.path.relpath(p, outdir)})", "", f"*{cap}*", ""]
        for t in f.get("tables") or []:
            L += [f"**{t['title']}**", "", _md_table(t["columns"], t["rows"]), ""]
        for x in f.get("protocol_changes") or []:
            L.append(f"- Protocol change: {x}")
        L += ["Sources: " + "; ".join(f.get("sources") or []), "",
              f"Reproduce: `{f.get('command', '')}` ({f.get('runs', 0)} runs, {f.get('compute_s') or 0:.1f} s of "
              "compute)", ""]
    return L


def _findings_view(findings: dict) -> list[dict]:
    view = []
    for fid, f in (findings or {}).items():
        v = dict(f)
        v["images"] = [{"data": _image(p), "caption": cap, "name": Path(p).name} for p, cap in f.get("plots") or []]
        v["notes_list"] = _as_list(f.get("notes"))
        view.append(v)
    return view


# ---------------------------------------------------------------- results.json
def results_json(claims: dict, prov: dict, outdir: Path, summary: Path | None = None) -> dict:
    out = {}
    for cid, c in claims.items():
        d = {k: v for k, v in c.items() if k not in ("doc", "run_keys")}
        d = _decision(d, claim=True)
        d["plots"] = [{"file": os.path.relpath(p, outdir), "caption": cap} for p, cap in c.get("plots") or []]
        out[cid] = d
    res = {"claims": out}
    robustness = {cid: c["robustness"] for cid, c in claims.items() if c.get("robustness")}
    if robustness:
        res["robustness"] = robustness
    if summary is not None:
        res["summary_plot"] = {"file": os.path.relpath(summary, outdir), "caption": SUMMARY_CAPTION}
    res["provenance"] = prov
    return _jsonable(res)


# ---------------------------------------------------------------- the terminal table
_STYLES = {"supported": "bold green", "refuted": "bold red", "partly supported": "green",
           "partly refuted": "red", "inconclusive": "yellow", "incomplete": "dim", "error": "bold magenta"}


def terminal_table(claims: dict, console, title: str = "bnlab audit: verdicts") -> None:
    """The verdict table in the terminal (rich): one row per claim, its parts as indented rows, each
    with the effect, its 95% interval, delta and n."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=title, show_lines=False)
    t.add_column("claim", no_wrap=True)
    t.add_column("title / part")
    t.add_column("verdict", no_wrap=True)
    t.add_column("effect [95% interval]")
    t.add_column("delta", justify="right")
    t.add_column("n", justify="right")

    def effect_cell(p):
        if p.get("degenerate"):
            s = "" if p.get("effect") is None else effect_text(p) + " "
            return Text(s + f"(degenerate: {p['degenerate']})", style="dim")
        if p.get("effect") is None:
            return Text("")
        return Text(effect_text(p))

    for cid, c in claims.items():
        v = c.get("verdict", "")
        parts = _parts(c)
        if parts:
            t.add_row(Text(cid), Text(c.get("title", "")), Text(v, style=_STYLES.get(v, "")), Text(""), Text(""),
                      Text(""))
            names = list(parts)
            for i, name in enumerate(names):
                p = parts[name]
                pv = p.get("verdict", "")
                tree = "\u2514\u2500 " if i == len(names) - 1 else "\u251c\u2500 "
                t.add_row(Text(""), Text("  " + tree + _part_label(name, p)), Text(pv, style=_STYLES.get(pv, "")),
                          effect_cell(p), Text(_fmt(p.get("delta"))), Text(_fmt(p.get("n"))))
        else:
            undecided = c.get("status") in ("incomplete", "error")
            t.add_row(Text(cid), Text(c.get("title", "")), Text(v, style=_STYLES.get(v, "")),
                      Text((c.get("why") or "").strip().splitlines()[-1:][0] if undecided and c.get("why") else "",
                           style="dim") if undecided else effect_cell(c),
                      Text("" if undecided else _fmt(c.get("delta"))), Text("" if undecided else _fmt(c.get("n"))))
    console.print(t)


# ---------------------------------------------------------------- Markdown
def _md_table(columns, rows) -> str:
    def cell(x):
        s = x if isinstance(x, str) else _fmt(x)
        return s.replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(map(str, columns)) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(cell(x) for x in r) + " |\n" for r in rows)


def _budget_lines(prov: dict) -> list[str]:
    w = prov.get("wall_time") or {}
    lines = [f"Budgets (wall clock, this 2-core machine kind): quick <= {BUDGET_S['quick'] // 60} min, "
             f"full <= {BUDGET_S['full'] // 60} min. This report: profile `{prov.get('profile')}`."]
    if "this_invocation_s" in w:
        lines.append(f"This invocation: {w['this_invocation_s']:.1f} s wall, {w['executed']} runs executed, "
                     f"{w['from_store']} taken from the store.")
    if "last_executing_audit" in w:
        la = w["last_executing_audit"]
        lines.append(f"The last audit of these settings that executed runs ({la['finished']}): "
                     f"{la['wall_s']:.1f} s wall, "
                     f"{la['executed']} runs executed, {la['from_store']} from the store, {la['workers']} workers.")
    total = sum(v.get("compute_s") or 0 for v in list((w.get("per_claim") or {}).values())
                + list((w.get("per_finding") or {}).values()))
    load = (prov.get("machine") or {}).get("load_average_1_5_15min")
    lines.append(f"Compute recorded for this report's runs: {total:.1f} s of one core in all (sum of run times; per "
                 "claim in the provenance). Wall times on a shared machine include other processes' load: the load "
                 f"average when this report was written was {load} (1, 5, 15 min).")
    return lines


def _history_cell(h) -> str:
    if not h:
        return "n/a"
    return f"{h.get('verdict', 'n/a')} ({h.get('date') or 'undated'})"


def write_markdown(path: Path, claims: dict, prov: dict, outdir: Path, summary: Path | None = None,
                   findings: dict | None = None) -> None:
    L = ["# bnlab audit report", "",
         f"Profile `{prov.get('profile')}` - generated {prov.get('generated')} - code `{prov.get('code_revision')}` - "
         f"rules version {RULE_VERSION}", ""]
    if summary is not None:
        L += ["## Summary", "", f"![summary: effects against claimed sizes]({os.path.relpath(summary, outdir)})", "",
              f"*{SUMMARY_CAPTION}*", ""]
    L += ["## Verdicts", ""]
    rows = []
    for r in verdict_rows(claims):
        claim_cell = "" if r["kind"] == "part" else f"{r['claim']} {r['title']}"
        part = f"&nbsp;&nbsp;{r['part']}" if r["kind"] == "part" else r["part"]
        verdict = f"**{r['verdict']}**" if r["kind"] != "part" else r["verdict"]
        rows.append([claim_cell, part, verdict, r["effect"] if r["effect"] != "n/a" else "", r["delta"], r["n"],
                     r["sign"], r["p"], r["degenerate"]])
    L += [_md_table(["claim", "part", "verdict", "effect [95% interval] units", "delta", "n", "sign",
                     "Wilcoxon p", "degenerate"], rows), ""]

    L += ["## Robustness", ""]
    m = robustness_matrix(claims)
    if m is None:
        L += [ROBUSTNESS_ABSENT, ""]
    else:
        cols = [f"{c['dataset']} / set {c['seed_set']}" for c in m["columns"]]
        rows = []
        for r in m["rows"]:
            cells = ["-" if x is None else (f"**{x['verdict']}**" if x["differs"] else x["verdict"])
                     for x in r["cells"]]
            rob = "n/a" if r["robust"] is None else ("robust" if r["robust"] else "**not robust**")
            lab = r["label"] if r["kind"] == "claim" else f"&nbsp;&nbsp;{r['label']}"
            rows.append([lab, r["headline"] or ""] + cells + [rob, r["summary"]])
        L += [_md_table(["claim / part", "headline (pooled)"] + cols + ["robust?", "summary"], rows), ""]
        L += ["Seed sets: " + "; ".join(f"{k} = seeds {', '.join(','.join(map(str, s)) for s in v)}"
                                        for k, v in m["seed_sets"].items())
              + ". Bold: a cell whose verdict differs from the headline; - : not run (the claim's architecture "
              "does not take that data set).", ""]

    L += ["## History of the rules", ""]
    versions, hrows = history_rows(claims)
    if versions:
        rows = [[r["claim"] + " " + r["title"]] + [_history_cell(h) for h in r["cells"]]
                + ["yes" if r["changed"] else ("no" if r["changed"] is not None else "n/a"), r["reason"] or ""]
                for r in hrows]
        L += [_md_table(["claim"] + [f"v{v} verdict" for v in versions] + ["verdict changed", "reason for the change"],
                        rows), ""]
    else:
        L += ["No claim was decided, so no rule history is shown.", ""]

    L += ["## Sensitivity", ""]
    keys, srows = sensitivity_rows(claims)
    rows = []
    for r in srows:
        lab = r["label"] if r["kind"] != "part" else f"&nbsp;&nbsp;{r['label']}"
        if r["none"]:
            cells = ["no threshold in this rule"] + [""] * (len(keys) - 1)
        else:
            cells = ["-" if x is None else x["verdict"] + (f" ({x['threshold']})" if x["threshold"] else "")
                     for x in r["cells"]]
        rows.append([lab] + cells)
    L += ["Each threshold a rule uses, applied one step stricter and one looser.", "",
          _md_table(["claim / part"] + keys, rows), ""]

    for cid, c in claims.items():
        L += [f"## {cid} - {c.get('title', '')}", "", f"**Verdict: {c.get('verdict')}**", "",
              f"> {c.get('claim', '')}", ""]
        if c.get("status") != "decided":
            L += [f"Not decided: {c.get('why', '')}", ""]
            continue
        if not _parts(c):
            L += [f"- Effect: {effect_text(c)} ({(c.get('interval') or {}).get('method', 'n/a')} interval), "
                  f"delta {_fmt(c.get('delta'))}, n = {_fmt(c.get('n'))}, sign {c.get('sign')}, "
                  f"Wilcoxon p = {_fmt(c.get('p_wilcoxon'))}",
                  f"- Per seed: {_per_seed_str(c.get('per_seed'))}"]
            if c.get("degenerate"):
                L.append(f"- Degenerate: {c['degenerate']}")
        L += [f"- Rule: {c.get('rule', '')}", f"- Why: {c.get('why', '')}"]
        for name, p in _parts(c).items():
            L.append(f"- Part *{_part_label(name, p)}*: **{p.get('verdict')}** - {p.get('why', '')}; per seed: "
                     f"{_per_seed_str(p.get('per_seed'))}")
            if p.get("rule") and p.get("rule") != c.get("rule"):
                L.append(f"  - rule: {p['rule']}")
        if c.get("robustness"):
            L.append(f"- Robustness: {c['robustness'].get('summary', '')}")
        for h in c.get("history") or []:
            L.append(f"- Rules v{h['version']} ({h.get('date')}): {h.get('verdict')} - {h.get('why', '')}")
        L.append("")
        for f in c.get("findings") or []:
            L.append(f"- Finding: {f}")
        for x in _as_list(c.get("notes")):
            L.append(f"- Note: {x}")
        L.append("")
        for t in c.get("tables") or []:
            L += [f"**{t['title']}**", "", _md_table(t["columns"], t["rows"]), ""]
        for p, cap in c.get("plots") or []:
            L += [f"![{cap}]({os.path.relpath(p, outdir)})", "", f"*{cap}*", ""]
        for x in c.get("protocol_changes") or []:
            L.append(f"- Protocol change: {x}")
        L += ["", "Sources: " + "; ".join(c.get("sources") or []), "", f"Reproduce: `{c.get('command', '')}`", ""]
    L += _findings_markdown(findings or {}, outdir)
    L += ["## Time", ""] + [f"- {x}" for x in _budget_lines(prov)] + [""]
    pc = [(cid, x) for cid, c in claims.items() for x in c.get("protocol_changes") or []]
    if pc:
        L += ["## Protocol changes from docs/CLAIMS.md", ""] + [f"- {cid}: {x}" for cid, x in pc] + [""]
    L += ["## Provenance", "", "```json", json.dumps(_jsonable(prov), indent=2), "```", ""]
    path.write_text("\n".join(L))


def _as_list(x) -> list:
    if not x:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


# ---------------------------------------------------------------- HTML
def _image(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def write_html(path: Path, claims: dict, prov: dict, summary: Path | None = None,
               findings: dict | None = None) -> None:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html", "j2"]))
    env.filters["fmt"] = _fmt
    env.filters["interval"] = _interval_text
    env.filters["effect"] = effect_text
    env.filters["vclass"] = lambda v: "v-" + str(v or "na").replace(" ", "-").replace("/", "")
    view = {}
    for cid, c in claims.items():
        v = dict(c)
        v["images"] = [{"data": _image(p), "caption": cap, "name": Path(p).name} for p, cap in c.get("plots") or []]
        v["per_seed_str"] = _per_seed_str(c.get("per_seed"))
        v["part_views"] = [dict(p, name=name, display=_part_label(name, p),
                                per_seed_str=_per_seed_str(p.get("per_seed"))) for name, p in _parts(c).items()]
        v["notes_list"] = _as_list(c.get("notes"))
        v["metrics_json"] = json.dumps(_jsonable(c.get("metrics")), indent=2) if c.get("metrics") else ""
        view[cid] = v
    versions, hrows = history_rows(claims)
    skeys, srows = sensitivity_rows(claims)
    text = env.get_template("report.html.j2").render(
        claims=view, prov=prov, budget_lines=_budget_lines(prov), rule_version=RULE_VERSION,
        summary=None if summary is None else {"data": _image(summary), "caption": SUMMARY_CAPTION},
        verdicts=verdict_rows(claims), robustness=robustness_matrix(claims), robustness_absent=ROBUSTNESS_ABSENT,
        history_versions=versions, history=hrows, sens_keys=skeys, sensitivity=srows,
        verdict_colors=plots.VERDICT_COLORS, prov_json=json.dumps(_jsonable(prov), indent=2), escape=html.escape,
        findings=_findings_view(findings), beyond_title=BEYOND_TITLE, beyond_lead=BEYOND_LEAD)
    path.write_text(text)


def write_report(outdir: Path, claims: dict, prov: dict, store, findings: dict | None = None) -> Path:
    """Write results.json, runs.jsonl, the summary figure, report.md and report.html into ``outdir``;
    ``findings`` (:func:`bnlab.lab.audit.decide_findings`) go under "Beyond the claims"."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    summary = summary_plot(claims, outdir)
    res = results_json(claims, prov, outdir, summary)
    if findings:
        res = {**{k: v for k, v in res.items() if k != "provenance"}, "findings": _jsonable(_findings_json(findings, outdir)),
               "provenance": res["provenance"]}
    (outdir / "results.json").write_text(json.dumps(res, indent=2))
    with open(outdir / "runs.jsonl", "w") as f:
        for cid, c in list(claims.items()) + list((findings or {}).items()):
            for rec in store.records(c.get("run_keys", [])):
                f.write(json.dumps(_jsonable(dict(rec, claim=cid))) + "\n")
    write_markdown(outdir / "report.md", claims, prov, outdir, summary, findings=findings)
    write_html(outdir / "report.html", claims, prov, summary, findings=findings)
    return outdir
