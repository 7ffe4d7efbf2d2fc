"""The claims' metrics, computed from run results (plain functions, tested on real tiny runs)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

LN10 = math.log(10.0)
STABLE_LOSS = 0.9 * LN10  # C1: a run is stable when its final train loss is below 0.9 ln 10


def is_stable(member: dict, max_loss: float = STABLE_LOSS) -> bool:
    """Loss stayed finite through training and the final (full training set) loss < ``max_loss``."""
    loss = member.get("train_loss")
    return (not member.get("diverged")) and loss is not None and math.isfinite(loss) and loss < max_loss


def max_stable_lr(members: Sequence[dict], max_loss: float = STABLE_LOSS) -> float:
    """The largest learning rate among stable members (0.0 if none is stable)."""
    stable = [float(m["lr"]) for m in members if is_stable(m, max_loss)]
    return max(stable) if stable else 0.0


def lr_ratio(bn_lr: float, plain_lr: float) -> float:
    """BN's max stable lr over plain's; inf when only BN has one, 1 when neither does."""
    if plain_lr > 0:
        return bn_lr / plain_lr
    return math.inf if bn_lr > 0 else 1.0


def lr_width(acc_by_lr: dict[float, float | None], points: float = 2.0) -> int:
    """Grid points whose accuracy is within ``points`` accuracy points of the arm's best."""
    accs = [a for a in acc_by_lr.values() if a is not None and math.isfinite(a)]
    if not accs:
        return 0
    best = max(accs)
    return sum(1 for a in accs if a >= best - points / 100.0)


def is_stable_by_accuracy(member: dict, threshold: float) -> bool:
    """Accuracy-based stability: the loss stayed finite through training and the test accuracy
    reached ``threshold`` (e.g. halfway from chance to the arm's best seed-mean accuracy)."""
    acc = member.get("test_acc")
    return (not member.get("diverged")) and acc is not None and math.isfinite(acc) and acc >= threshold


def max_stable_index(members_by_lr: dict[float, dict], stable: Callable[[dict], bool]) -> int:
    """Position, in the sorted rates of ``members_by_lr`` (one member per rate), of the largest
    rate whose member is ``stable``; -1 when none is (below the grid)."""
    grid = sorted(members_by_lr)
    ok = [i for i, lr in enumerate(grid) if stable(members_by_lr[lr])]
    return max(ok) if ok else -1


def acc_or_chance(member: dict, key: str = "test_acc", classes: int = 10) -> float:
    """A diverged member's accuracy is chance."""
    a = member.get(key)
    return 1.0 / classes if a is None else float(a)


def steps_to_target(curve: dict, target: float, key: str = "test_acc") -> int | None:
    """The first checked step whose ``key`` reaches ``target`` (None if never)."""
    for step, v in zip(curve["step"], curve[key]):
        if v is not None and v >= target:
            return int(step)
    return None


def censored(value: float | None, cap: float) -> tuple[float, bool]:
    """A never-reached target counts as the cap, flagged as censored."""
    return (float(cap), True) if value is None else (float(value), False)


def trainable_area(acc: dict[tuple, float], threshold: float = 0.8) -> float:
    """Share of (depth, gain) cells whose test accuracy reaches ``threshold``."""
    if not acc:
        return 0.0
    return sum(1 for a in acc.values() if a is not None and a >= threshold) / len(acc)


def spread(accs: Sequence[float]) -> float:
    """Max minus min accuracy (over init scales at one depth)."""
    a = [x for x in accs if x is not None]
    return (max(a) - min(a)) if a else 0.0


def gap_points(member: dict) -> float | None:
    """Generalization gap in accuracy points: 100 * (train acc - test acc)."""
    if member.get("train_acc") is None or member.get("test_acc") is None:
        return None
    return 100.0 * (member["train_acc"] - member["test_acc"])


def grad_ratio(member: dict) -> float | None:
    """||dL/dW_first|| / ||dL/dW_last|| at initialization (the first batch)."""
    return member.get("grad_ratio")
