"""C3 under rules version 2: decide() on synthetic results gives each verdict, the degenerate
cases, the sensitivity to the trained share, the v1 verdict beside it, and the seed-set runs."""

import pytest

from bnlab.lab.claims import c3_initialization as c3
from bnlab.lab.config import Context

from .conftest import SyntheticResults, context


def c3_results(acc, seen=None):
    """acc(arm, depth, gain, seed) -> test accuracy (None: diverged); lr selection prefers 0.1."""
    def make(cfg):
        arm = "bn" if cfg["model"]["norm"] == "batch" else "plain"
        depth = len(cfg["model"]["widths"])
        if seen is not None:
            seen.append(cfg)
        out = []
        for m in cfg["members"]:
            a = acc(arm, depth, m["gain"], m["seed"])
            out.append({"seed": m["seed"], "lr": m["lr"], "gain": m["gain"], "test_acc": a,
                        "val_acc": 0.9 if m["lr"] == 0.1 else 0.5, "diverged": a is None,
                        "grad_ratio": (10.0 * depth) if arm == "bn" else 1.0})
        return {"members": out}
    return SyntheticResults(make)


def _ok(rule):
    """An acc function from trained(arm, depth, gain, seed) -> bool (0.95 if trained, else 0.12)."""
    return lambda arm, d, g, s: 0.95 if rule(arm, d, g, s) else 0.12


SUPPORTED = _ok(lambda arm, d, g, s: arm == "bn" or d <= 2 or g == 1 or (s % 2 and d == 8 and g == 2))
REFUTED = _ok(lambda arm, d, g, s: d <= 8 or (arm == "plain" and s % 2 and d == 16))
OPPOSITE = _ok(lambda arm, d, g, s: d <= 8 if arm == "bn" else d <= 16 or g == 1)
# BN's advantage differs wildly between seeds: 0.6, 0, 0.6, 0, 0.3 of the grid
_WIDE = {0: 1.0, 1: 0.4, 2: 1.0, 3: 0.4, 4: 0.7}
INCONCLUSIVE = _ok(lambda arm, d, g, s: d <= 2 or g == 1 or (arm == "bn" and (c3.PROFILES["quick"]["depths"].index(d)
                   * 5 + c3.PROFILES["quick"]["gains"].index(g)) / 20 < _WIDE[s] - 0.4 + 0.001))


@pytest.mark.parametrize("acc,verdict", [
    (SUPPORTED, "supported"),
    (REFUTED, "refuted"),
    (OPPOSITE, "refuted"),  # plain has the larger area: excluded the claimed effect
    (INCONCLUSIVE, "inconclusive"),
])
def test_c3_decide_gives_each_verdict(acc, verdict):
    d = c3.decide(context(c3), c3_results(acc))
    assert d["verdict"] == verdict, d["why"]
    assert d["rule_version"] == 2 and d["n"] == 5 and d["delta"] == 0.25 and d["interval"]["method"] == "t"
    assert d["degenerate"] is None and d["sign"].endswith("/5") and d["p_wilcoxon"] is not None
    assert [p["seed"] for p in d["per_seed"]] == [0, 1, 2, 3, 4]
    assert set(d["sensitivity"]) == {"stricter", "default", "looser"} and d["sensitivity"]["default"] == verdict
    assert "0.9" in d["thresholds"]["stricter"] and "0.7" in d["thresholds"]["looser"]
    assert any("Gradient-norm ratio" in f and "by depth 2, 8, 16, 32" in f for f in d["findings"])
    assert any(f.startswith("Spread of test accuracy") for f in d["findings"])


def test_c3_threshold_is_relative_to_the_best_cell():
    """The mnist1d case: no cell reaches 80%, so v1 finds both areas 0 and says refuted; relative to
    the best cell (70%), BN trains at every init scale and plain only near g = 1."""
    def acc(arm, d, g, s):
        if arm == "bn":
            return 0.66 + 0.002 * s if d <= 16 else 0.40
        return 0.70 - 0.003 * s if (g == 1 or (d == 2 and g in (0.5, 2.0))) else 0.15
    res = c3_results(acc)
    d = c3.decide(context(c3), res)
    assert d["verdict"] == "supported", d["why"]
    assert d["metrics"]["best"] == pytest.approx(0.694)
    assert d["metrics"]["threshold"]["default"] == pytest.approx(0.1 + 0.8 * (0.694 - 0.1))
    v1 = c3.decide_v1(context(c3), res)
    assert v1["verdict"] == "refuted" and "area" in v1["why"]


def test_c3_sensitivity_can_differ_from_the_default():
    """BN's cells sit at 85% of the way from chance to the best: trained at shares 0.7 and 0.8, not 0.9."""
    def acc(arm, d, g, s):
        best = 0.95
        if d == 2 and g == 1:
            return best
        if arm == "bn":
            return 0.1 + 0.85 * (best - 0.1) + 0.001 * s
        return 0.1 + 0.85 * (best - 0.1) if g == 1 else 0.12
    d = c3.decide(context(c3), c3_results(acc))
    assert d["sensitivity"] == {"stricter": "refuted", "default": "supported", "looser": "supported"}


def test_c3_nothing_trained_is_degenerate():
    d = c3.decide(context(c3), c3_results(lambda arm, dd, g, s: 0.11 + 0.001 * s))
    assert d["verdict"] == "inconclusive" and "nothing trained" in d["degenerate"]
    assert set(d["sensitivity"].values()) == {"inconclusive"}


def test_c3_both_areas_full_is_degenerate():
    d = c3.decide(context(c3), c3_results(lambda arm, dd, g, s: 0.95 - 0.001 * s))
    assert d["verdict"] == "inconclusive" and "area is 1 in every seed" in d["degenerate"]


def test_c3_diverged_cells_count_as_untrained():
    acc = lambda arm, d, g, s: None if (arm == "plain" and g != 1 and d > 2) else 0.95 - 0.01 * (s % 2) * (d == 8)
    d = c3.decide(context(c3), c3_results(acc))
    assert d["verdict"] == "supported"
    assert d["metrics"]["area"]["plain"] == [0.4] * 5


def test_c3_decide_v1_keeps_the_v1_rule():
    assert c3.decide_v1(context(c3), c3_results(SUPPORTED))["verdict"] == "supported"
    assert c3.decide_v1(context(c3), c3_results(_ok(lambda arm, d, g, s: d <= 8)))["verdict"] == "refuted"
    assert [r["version"] for r in c3.RULES] == [1, 2] and c3.RULES[0]["text"] == c3.RULE_V1
    assert c3.RULES[1]["reason"] and c3.DATASETS == ["digits", "mnist1d"]


def test_c3_profiles_have_the_v2_seeds():
    assert c3.PROFILES["quick"]["seeds"] == [0, 1, 2, 3, 4]
    assert c3.PROFILES["full"]["seeds"] == list(range(10))
    assert len(c3.PROFILES["tiny"]["seeds"]) >= 2


def test_c3_one_run_per_seed_set_and_lr_selection_on_the_first_seed():
    s = c3.PROFILES["quick"]
    ctx = Context(profile="quick", seeds=list(range(10)), settings=s, seed_sets=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    seen = []
    res = c3_results(SUPPORTED, seen)
    runs = c3.plan(ctx, res).runs
    sel = [r for r in runs if r.gate]
    main = [r for r in runs if not r.gate]
    assert len(sel) == 2 * len(s["depths"]) and all({m["seed"] for m in r.config["members"]} == {0} for r in sel)
    assert len(main) == 2 * len(s["depths"]) * 2
    assert sorted({tuple(sorted({m["seed"] for m in r.config["members"]})) for r in main}) == [(0, 1, 2, 3, 4),
                                                                                              (5, 6, 7, 8, 9)]
    assert all(m["lr"] == 0.1 for r in main for m in r.config["members"])
    d = c3.decide(ctx, res)
    assert d["n"] == 10 and [p["seed"] for p in d["per_seed"]] == list(range(10))
    # a robustness cell on the second set selects with the shared first seed and reads the same runs
    cell = Context(profile="quick", seeds=[5, 6, 7, 8, 9], settings=s, selection_seed=0)
    assert {str(r.config) for r in c3.plan(cell, res).runs} <= {str(r.config) for r in runs}
    assert c3.decide(cell, res)["n"] == 5


def test_c3_tiny_audit_end_to_end_forces_the_degenerate_case(tmp_path):
    """One step at a negligible rate: nothing trains, so the relative threshold is degenerate."""
    import json

    from bnlab.cli import main

    assert main(["audit", "--profile", "tiny", "--claims", "C3", "--workers", "1", "--no-progress",
                 "--set", "C3.steps=1", "--set", "C3.lrs=[1e-06]", "--store", str(tmp_path / "s.sqlite"),
                 "--out", str(tmp_path / "out")]) == 0
    c = json.loads((tmp_path / "out" / "results.json").read_text())["claims"]["C3"]
    assert c["status"] == "decided" and c["verdict"] == "inconclusive" and "nothing trained" in c["degenerate"]
