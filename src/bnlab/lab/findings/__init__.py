"""The audit's findings: studies reported beside the claims ("Beyond the claims" in the report)
that decide no claim and carry no verdict.

A finding module ``f<N>_<name>.py`` in this package is discovered by its file name, imported with a
guard (a module that fails to import is reported, the audit goes on), and planned, run, stored and
re-rendered exactly as a claim is: its runs are ordinary run configs in the same SQLite store,
executed by the same workers, and ``bnlab report`` rebuilds it from the store. It defines:

``ID`` (``"F<N>"``: ``--claims F1`` selects it, as a claim id selects a claim), ``TITLE``,
``QUESTION`` (what the study asks, in one paragraph), ``SOURCES`` (list of str), ``DATASETS``.
``PROFILES``
    ``{profile: settings}``, each with ``"seeds"``. A finding runs in the profiles it lists (when
    ``--claims`` does not name the claims to run); a profile it does not list skips it.
``plan(ctx, results) -> Plan`` and ``plots(ctx, results, outdir) -> [(path, caption)]``
    As for a claim (:mod:`bnlab.lab.claims`).
``decide(ctx, results) -> dict``
    Called when every run is stored. Returns ``{"summary": str, "findings": [str], "tables":
    [{"title", "columns", "rows"}], "comparisons": [...], "metrics": {...}}``: numbers with their
    intervals (:mod:`bnlab.lab.stats`), never a verdict.

Optional: ``PROTOCOL_CHANGES`` (list of str), ``LIMITS`` (as for a claim), ``TAKES`` (the data sets
``--dataset`` may name, default ``DATASETS``: with another, an audit that runs everything leaves
the finding out, and one that names it stops with an error).
"""

from __future__ import annotations

import re
from types import ModuleType

from ..registry import discover

REQUIRED = ("ID", "TITLE", "QUESTION", "SOURCES", "PROFILES", "DATASETS", "plan", "decide", "plots")

FINDINGS: dict[str, ModuleType] = {}
BROKEN: dict[str, str] = {}  # module name -> the error that kept it out


def _discover() -> None:
    found, broken = discover(__name__, __path__, "f", REQUIRED)
    FINDINGS.update(found)
    BROKEN.update(broken)


def get(finding_id: str) -> ModuleType:
    fid = finding_id.strip().upper()
    if fid not in FINDINGS:
        raise KeyError(f"unknown finding {finding_id!r}; known: {', '.join(ids())}")
    return FINDINGS[fid]


def ids() -> list[str]:
    return sorted(FINDINGS, key=lambda f: (int(re.sub(r"\D", "", f) or 0), f))


def runs_in(profile: str) -> list[str]:
    """The findings that run in ``profile`` when the audit runs everything."""
    return [f for f in ids() if profile in FINDINGS[f].PROFILES]


_discover()
