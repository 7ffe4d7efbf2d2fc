"""The audit's report: ``report.md``, a self-contained ``report.html`` (plots embedded as base64
PNG, inline CSS, no network), ``results.json`` and ``runs.jsonl`` (every run's config, result and
timing) in one folder.

results.json::

    {"claims": {"C1": {"verdict", "effect", "effect_label", "ci", "rule", "per_seed", "why",
                       "parts"?, "tables", "findings"?, "metrics"?, "protocol_changes", "seeds",
                       "settings", "runs", "compute_s", "plots"}, ...},
     "provenance": {"versions", "code_revision", "fingerprints", "profile", "seeds", "machine",
                    "workers", "wall_time", "budgets", ...}}
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from .protocol import BUDGET_S
from .tasks import PACKAGE_DIR, fingerprint, task_names

TEMPLATES = Path(__file__).resolve().parent / "templates"
_PACKAGES = ["bnlab", "torch", "numpy", "numba", "scikit-learn", "mnist1d", "matplotlib", "jinja2", "rich"]


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


def provenance(args, ctxs: dict, store, claims: dict, audit: dict | None) -> dict:
    """Versions, code revision, seeds, machine and wall times (per claim and for the audit)."""
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


# ---------------------------------------------------------------- rendering helpers
def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{digits}g}"
    return str(v)


def _ci(ci) -> str:
    return "n/a" if not ci else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _per_seed_str(per_seed) -> str:
    if not per_seed:
        return ""
    parts = []
    for p in per_seed:
        tag = f"{p['part']}:" if p.get("part") else ""
        parts.append(f"{tag}s{p['seed']}={_fmt(p.get('value'))}")
    return ", ".join(parts)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None if obj != obj else ("inf" if obj > 0 else "-inf")
    return obj


def results_json(claims: dict, prov: dict, outdir: Path) -> dict:
    out = {}
    for cid, c in claims.items():
        d = {k: v for k, v in c.items() if k not in ("doc", "run_keys")}
        d["plots"] = [{"file": os.path.relpath(p, outdir), "caption": cap} for p, cap in c.get("plots", [])]
        out[cid] = d
    return _jsonable({"claims": out, "provenance": prov})


def _md_table(columns, rows) -> str:
    head = "| " + " | ".join(map(str, columns)) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(x) if not isinstance(x, str) else x for x in r) + " |\n" for r in rows)


def _budget_lines(prov: dict) -> list[str]:
    w = prov["wall_time"]
    lines = [f"Budgets (wall clock, C1-C5, this 2-core machine kind): quick <= {BUDGET_S['quick'] // 60} min, "
             f"full <= {BUDGET_S['full'] // 60} min. This report: profile `{prov['profile']}`."]
    if "this_invocation_s" in w:
        lines.append(f"This invocation: {w['this_invocation_s']:.1f} s wall, {w['executed']} runs executed, "
                     f"{w['from_store']} taken from the store.")
    if "last_executing_audit" in w:
        la = w["last_executing_audit"]
        lines.append(f"The last audit of these settings that executed runs ({la['finished']}): {la['wall_s']:.1f} s wall, "
                     f"{la['executed']} runs executed, {la['from_store']} from the store, {la['workers']} workers.")
    total = sum(v.get("compute_s", 0) for v in w["per_claim"].values())
    lines.append(f"Compute recorded for this report's runs: {total:.1f} s of one core in all (sum of run times; per "
                 "claim in the provenance). Wall times on a shared machine include other processes' load: the load "
                 f"average when this report was written was {prov['machine'].get('load_average_1_5_15min')} "
                 "(1, 5, 15 min) on 2 cores.")
    return lines


def write_markdown(path: Path, claims: dict, prov: dict, outdir: Path) -> None:
    L = ["# bnlab audit report", "",
         f"Profile `{prov['profile']}` - generated {prov['generated']} - code `{prov['code_revision']}`", ""]
    L += ["## Verdicts", ""]
    rows = [[cid, c["title"], f"**{c['verdict']}**", _fmt(c.get("effect")), c.get("effect_label", ""), _ci(c.get("ci")),
             ",".join(map(str, c["seeds"]))] for cid, c in claims.items()]
    L += [_md_table(["claim", "title", "verdict", "effect", "effect is", "95% CI", "seeds"], rows), ""]
    L += ["## Time", ""] + [f"- {x}" for x in _budget_lines(prov)] + [""]
    pc = [(cid, x) for cid, c in claims.items() for x in c.get("protocol_changes", [])]
    if pc:
        L += ["## Protocol changes from CLAIMS.md", ""] + [f"- {cid}: {x}" for cid, x in pc] + [""]
    for cid, c in claims.items():
        L += [f"## {cid} - {c['title']}", "", f"**Verdict: {c['verdict']}**", "", f"> {c['claim']}", ""]
        if c.get("status") != "decided":
            L += [f"Not decided: {c.get('why', '')}", ""]
            continue
        L += [f"- Effect: {_fmt(c.get('effect'))} ({c.get('effect_label', '')}), bootstrap 95% CI {_ci(c.get('ci'))}",
              f"- Per seed: {_per_seed_str(c.get('per_seed'))}", f"- Rule: {c.get('rule', '')}",
              f"- Why: {c.get('why', '')}"]
        for name, part in (c.get("parts") or {}).items():
            L.append(f"- Part *{name}*: **{part['verdict']}** - {part.get('why', '')}")
        L.append("")
        for f in c.get("findings") or []:
            L.append(f"- Finding: {f}")
        if c.get("findings"):
            L.append("")
        for t in c.get("tables") or []:
            L += [f"**{t['title']}**", "", _md_table(t["columns"], t["rows"]), ""]
        for p, cap in c.get("plots", []):
            L += [f"![{cap}]({os.path.relpath(p, outdir)})", "", f"*{cap}*", ""]
        for x in c.get("protocol_changes", []):
            L.append(f"- Protocol change: {x}")
        L += ["", "Sources: " + "; ".join(c["sources"]), "", f"Reproduce: `{c['command']}`", ""]
    L += ["## Provenance", "", "```json", json.dumps(_jsonable(prov), indent=2), "```", ""]
    path.write_text("\n".join(L))


def write_html(path: Path, claims: dict, prov: dict) -> None:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html", "j2"]))
    env.filters["fmt"] = _fmt
    env.filters["ci"] = _ci
    view = {}
    for cid, c in claims.items():
        v = dict(c)
        v["images"] = [{"data": base64.b64encode(Path(p).read_bytes()).decode("ascii"), "caption": cap,
                        "name": Path(p).name} for p, cap in c.get("plots", [])]
        v["per_seed_str"] = _per_seed_str(c.get("per_seed"))
        view[cid] = v
    text = env.get_template("report.html.j2").render(
        claims=view, prov=prov, budget_lines=_budget_lines(prov),
        prov_json=json.dumps(_jsonable(prov), indent=2), escape=html.escape)
    path.write_text(text)


def write_report(outdir: Path, claims: dict, prov: dict, store) -> Path:
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "results.json").write_text(json.dumps(results_json(claims, prov, outdir), indent=2))
    with open(outdir / "runs.jsonl", "w") as f:
        for cid, c in claims.items():
            for rec in store.records(c.get("run_keys", [])):
                f.write(json.dumps(_jsonable(dict(rec, claim=cid))) + "\n")
    write_markdown(outdir / "report.md", claims, prov, outdir)
    write_html(outdir / "report.html", claims, prov)
    return outdir
