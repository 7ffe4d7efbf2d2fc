"""What a claim hands the audit (Run, Plan), the store view claims read (Results), and the shared
protocol settings of CLAIMS.md that several claims use (learning-rate selection, seeds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from . import data as D
from .config import config_key
from .data import DATA_DIR_SETS  # noqa: F401  (the sets read from --data-dir)
from .tasks import fingerprint

# CLAIMS.md, shared settings
VAL_FRACTION = 0.2  # the validation split carved from the training set for lr selection
QUICK_SEEDS = [0, 1, 2, 3, 4]  # rules v2: quick >= 5 seeds per claim, full >= 10
FULL_SEEDS = list(range(10))
VERDICTS = ("supported", "refuted", "inconclusive", "partly supported", "partly refuted")
BUDGET_S = {"quick": 180, "full": 1200}  # the audit's wall-clock bar (C1-C5, 2 cores)


RULE_DATES = {1: "2026-11-25", 2: "2026-12-01"}  # when each version of the audit's rules was fixed


def rule_versions(v1: str, v2: str, reason: str) -> list[dict]:
    """A claim's ``RULES``: its rule text under each version, with the dates and why v2 replaced v1."""
    return [{"version": 1, "date": RULE_DATES[1], "text": v1},
            {"version": 2, "date": RULE_DATES[2], "text": v2, "reason": reason}]


@dataclass
class Run:
    """One run a claim needs. Only ``config`` is the run's identity (with the code fingerprint).

    cost: a relative cost estimate (any unit, consistent across claims: about a second of one
        core on the reference machine), used for the ETA and to schedule long runs first.
    gate: True for runs that later runs wait on (lr selection); they are scheduled first.
    """

    config: dict
    cost: float = 1.0
    label: str = ""
    gate: bool = False


@dataclass
class Plan:
    """The runs a claim needs given the results so far, plus cost estimates of the runs it will
    need once those results exist (e.g. the main runs waiting on lr selection)."""

    runs: list[Run]
    pending: list[float] = field(default_factory=list)


class Results:
    """Read-only view of stored results by config (the key adds each task's code fingerprint)."""

    def __init__(self, store, extra: dict[str, dict] | None = None) -> None:
        self.store = store
        self._cache: dict[str, dict] = dict(extra or {})

    @staticmethod
    def key(config: dict) -> str:
        return config_key(config, fingerprint(config["task"]))

    def get(self, config: dict) -> dict | None:
        k = self.key(config)
        if k not in self._cache:
            r = self.store.get(k) if self.store is not None else None
            if r is None:
                return None
            self._cache[k] = r
        return self._cache[k]

    def __contains__(self, config: dict) -> bool:
        return self.get(config) is not None

    def add(self, key: str, result: dict) -> None:
        self._cache[key] = result

    def all(self, configs: Iterable[dict]) -> list[dict] | None:
        """Results of every config, or None if any is missing."""
        out = []
        for c in configs:
            r = self.get(c)
            if r is None:
                return None
            out.append(r)
        return out


def missing(plan: Plan, results: Results) -> list[Run]:
    return [r for r in plan.runs if r.config not in results]


def is_complete(plan: Plan, results: Results) -> bool:
    return not plan.pending and not missing(plan, results)


def pick_best(scores: dict[float, float]) -> float:
    """CLAIMS.md: best validation accuracy wins, ties to the smaller rate (NaN scores lose)."""
    best_lr, best = None, -math.inf
    for lr in sorted(scores):
        s = scores[lr]
        s = -math.inf if s is None or (isinstance(s, float) and math.isnan(s)) else s
        if best_lr is None or s > best:
            best_lr, best = lr, s
    return best_lr


def members(**axes: Any) -> list[dict]:
    """``members(lr=[0.1, 1])`` -> ``[{"lr": 0.1}, {"lr": 1}]``; several axes make the product."""
    out: list[dict] = [{}]
    for name, values in axes.items():
        out = [dict(m, **{name: v}) for m in out for v in values]
    return out


def data_spec(ctx, default: str, subset: int | None = None, val: bool = False) -> dict:
    """The data part of a run config: ``--dataset`` replaces the claim's default.

    ``source`` is the data's identity (:func:`bnlab.lab.data.source`): for a set read from
    ``--data-dir``, the sha256 of its files' contents; for a shipped set, its generator, version
    and arguments. ``data_dir`` tells the run where the files lie but is not part of its key
    (:func:`bnlab.lab.config.identity`): the same files in another folder are the same run."""
    name = ctx.dataset or default
    spec = {"name": name, "subset": subset, "val_fraction": VAL_FRACTION if val else 0.0,
            "source": D.source(name, ctx.data_dir)}
    if D.reads_data_dir(name):
        spec["data_dir"] = str(ctx.data_dir)
    return spec


def classify_config(*, data: dict, model: dict, init: dict, optim: dict, batch: int, members: list[dict],
                    steps: int | None = None, epochs: int | None = None, eval: dict | None = None,
                    trainable: str = "all", diagnostics: tuple[str, ...] = (), **extra) -> dict:
    """A complete config for the built-in ``classify`` task (every key present)."""
    model = dict({"arch": "mlp", "act": "relu", "norm": "none", "norm_args": {}}, **model)
    cfg = {
        "task": "classify", "data": data, "model": model, "init": dict({"kind": "kaiming", "std": None}, **init),
        "optim": dict({"momentum": 0.0}, **optim), "batch": int(batch), "steps": steps, "epochs": epochs,
        "eval": dict({"every": 0, "target": None, "stop_at_target": False}, **(eval or {})),
        "trainable": trainable, "diagnostics": sorted(diagnostics),
        "members": [dict({"gain": 1.0, "dropout": 0.0}, **m) for m in members],
    }
    cfg.update(extra)
    return cfg


def step_cost(members: int, steps: int, layers: int, width: int, batch: int, bn_layers: int = 0) -> float:
    """A rough cost in seconds of one core: per-step overhead plus arithmetic (for the ETA)."""
    flops = 6.0 * members * batch * width * width * layers
    return steps * (2.5e-4 + 6e-5 * layers + 5e-4 * bn_layers + flops / 1.2e11)
