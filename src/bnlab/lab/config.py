"""Run configs: canonical JSON, identity hashes, dotted overrides, and the audit context.

A run config is a JSON-able dict that fully determines a run's result (with the code that
computes it). Its identity is ``config_key(config, fingerprint)``: a hash of the canonical JSON of
the config plus the code fingerprint of its task (see :func:`bnlab.lab.train.fingerprint`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


def canonical(obj: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, floats as repr (so 0.1 stays 0.1)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


def config_key(config: dict, fingerprint: str) -> str:
    """The identity of a run: sha256 of its canonical config and its task's code fingerprint."""
    h = hashlib.sha256()
    h.update(canonical(config).encode())
    h.update(b"\0")
    h.update(fingerprint.encode())
    return h.hexdigest()[:32]


def parse_value(text: str) -> Any:
    """``--set`` values: JSON when they parse (numbers, lists, true/false/null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["C1.steps=300", "C3.depths=[2,8]"]`` -> ``{"C1": {"steps": 300}, "C3": {"depths": [2, 8]}}``.

    Keys below the claim id may be dotted (``C2.nets.sigmoid.lr=1``); they are validated against
    the claim's settings by :func:`apply_overrides`.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE with KEY like C1.steps (got {item!r})")
        key, value = item.split("=", 1)
        parts = key.strip().split(".", 1)
        if len(parts) != 2 or not parts[1]:
            raise ValueError(f"--set key must start with a claim id, e.g. C1.steps=300 (got {key!r})")
        out.setdefault(parts[0].upper(), {})[parts[1]] = parse_value(value.strip())
    return out


def apply_overrides(settings: dict, overrides: dict[str, Any], where: str) -> dict:
    """A copy of ``settings`` with dotted ``overrides`` applied; unknown keys are rejected."""
    out = copy.deepcopy(settings)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                known = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
                raise ValueError(
                    f"{where}: unknown setting {'.'.join(parts[: i + 1])!r} in --set {dotted}={value!r}; "
                    f"known keys here: {known}"
                )
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return out


@dataclass
class Context:
    """What a claim needs to expand its runs: profile, seed set, resolved settings, data choice."""

    profile: str
    seeds: list[int]
    settings: dict
    dataset: str | None = None
    data_dir: str | None = None
    workers: int = 2
    extra: dict = field(default_factory=dict)
    # Seed sets (rules v2, robustness): the seeds are split into disjoint chunks and a claim makes
    # one run per (arm, chunk), so that a robustness cell on one seed set and the headline that
    # pools both sets share their runs. Default: one chunk holding every seed.
    seed_sets: list[list[int]] | None = None
    # The seed that learning-rate selection uses (the first seed of the whole seed list), shared
    # by the headline and every robustness cell so that they train at the same rates.
    selection_seed: int | None = None

    def __post_init__(self) -> None:
        if self.seed_sets is None:
            self.seed_sets = [list(self.seeds)]
        if self.selection_seed is None:
            self.selection_seed = self.seeds[0]

    @property
    def first_seed(self) -> int:
        """The seed learning-rate selection uses (CLAIMS.md shared settings)."""
        return self.selection_seed
