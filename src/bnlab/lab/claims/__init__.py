"""The claims registry: every module ``c<N>_<name>.py`` in this package is a claim.

How to add a claim
==================

Create ``src/bnlab/lab/claims/c<N>_<name>.py``. It is discovered by its file name (no list to
edit) and imported with a guard: a claim module that fails to import is reported by the audit
(``bnlab audit`` prints the error and audits the others) instead of breaking every claim.

The module opens with a docstring stating the claim, its sources and the command that
reproduces it (``bnlab audit --profile quick --claims C<N>``), then defines:

``ID`` (str)
    ``"C<N>"``, as in CLAIMS.md and on the command line (``--claims C1,C6``).
``TITLE`` (str), ``CLAIM`` (str), ``SOURCES`` (list of str)
    The claim in one line, its full text, and the literature it leans on.
``PROFILES`` (dict)
    ``{"tiny": {...}, "quick": {...}, "full": {...}}``: the protocol's settings per profile. Each
    must hold ``"seeds"`` (the default seed set). ``--set C<N>.key=value`` overrides any key
    (dotted for nested dicts); unknown keys, wrong types and out-of-range values are rejected
    (see below). ``tiny`` is the CI smoke profile and may shrink grids; ``quick`` may use fewer
    seeds and steps than ``full`` only (same arms, data and rules), and the claim file says so.
``plan(ctx, results) -> Plan``
    The runs the claim needs (:class:`bnlab.lab.protocol.Run`, each with a JSON-able ``config``
    whose ``"task"`` names its trainer) given the results so far, plus cost estimates of runs
    not yet expressible (``Plan.pending``), e.g. main runs waiting on lr selection. The audit
    calls ``plan`` again whenever a run finishes, until nothing is missing: protocols with
    stages (tune, then train) are written as plain code that looks up earlier results with
    ``results.get(config)``. ``ctx`` is a :class:`bnlab.lab.config.Context` (profile, seeds,
    seed_sets, selection seed, settings, dataset, data_dir, workers). Make one run per (arm,
    seed set in ``ctx.seed_sets``) so that robustness cells on one seed set and the headline
    that pools the sets share their runs; select learning rates with ``ctx.first_seed``.
``decide(ctx, results) -> dict``
    Called only when every run is stored. Returns ``bnlab.lab.stats.claim(parts, rule=...,
    tables=..., findings=..., metrics=...)``: each part made by :func:`bnlab.lab.stats.part`
    from paired per-seed effects (rules v2: effect, t-interval, Wilcoxon p, sign count, the
    default rule or the claim's own, degenerate detection, sensitivity at a stricter and a
    looser threshold). The verdict must come from ``results`` through the stated rule, nothing
    else; parts are fixed in advance and never dropped.
``decide_v1(ctx, results) -> {"verdict", "why"}``
    The claim's version-1 rule applied to the same runs, for the report's history table.
``RULES``
    ``[{"version", "date", "text", "reason"?}, ...]``: every version of the claim's rule.
``DATASETS``
    The shipped data sets the claim's architecture allows, default first: robustness cells run
    on each.
``plots(ctx, results, outdir) -> list[(path, caption)]``
    PNG files written into ``outdir`` (use :mod:`bnlab.lab.plots` for the house style).

Optional: ``PROTOCOL_CHANGES`` (list of str: changes to the documented protocol and why; the
report lists them), ``ORDER`` (int, sorts the claim table; default N), ``LIMITS`` (dict: dotted
setting -> constraint, e.g. ``{"steps": (1, None), "dropouts": "[0, 1)", "cells": {"lstm",
"rnn"}}``; see :func:`bnlab.lab.config.as_limit`).

Settings are typed (:class:`bnlab.lab.config.Schema`): each key's type comes from its default
(ints stay ints, numbers accept ints, lists check their items, ``null`` is allowed where some
profile uses it) and its range from generic rules (> 0 when the default is > 0, dropout rates and
momentum in [0, 1), accuracy targets and thresholds in (0, 1]) unless ``LIMITS`` says otherwise.
``--set`` values and ``--seeds`` are checked against it before any run.

Claim-specific trainers
=======================

A run's ``config["task"]`` is resolved through :mod:`bnlab.lab.tasks`. The built-in task
``"classify"`` (:mod:`bnlab.lab.train`) trains stacked MLP/CNN testbeds. A claim that trains
something else registers its own task at import time::

    from bnlab.lab.tasks import register_task
    register_task("rnn", train_rnn, code=("lab/claims/c6_recurrent.py", "nn/recurrent.py"))

Workers import this package before running a config whose task is not built in, so the
registration is seen in every process. ``code`` lists the files whose edits must invalidate the
task's stored runs.
"""

from __future__ import annotations

import re
from types import ModuleType

from ..registry import discover

REQUIRED = ("ID", "TITLE", "CLAIM", "SOURCES", "PROFILES", "plan", "decide", "plots", "RULES", "DATASETS")

CLAIMS: dict[str, ModuleType] = {}
BROKEN: dict[str, str] = {}  # module name -> the error that kept it out


def _discover() -> None:
    found, broken = discover(__name__, __path__, "c", REQUIRED)
    CLAIMS.update(found)
    BROKEN.update(broken)


def get(claim_id: str) -> ModuleType:
    cid = claim_id.strip().upper()
    if cid not in CLAIMS:
        raise KeyError(f"unknown claim {claim_id!r}; known: {', '.join(ids())}")
    return CLAIMS[cid]


def ids() -> list[str]:
    return sorted(CLAIMS, key=lambda c: (getattr(CLAIMS[c], "ORDER", None) or int(re.sub(r"\D", "", c) or 0), c))


_discover()
