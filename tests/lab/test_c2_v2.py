"""C2 (BN speeds up training) under rules v2: decide() on synthetic results giving each verdict,
the degenerate cases, sensitivity, the v1 rule, seed sets, the wall-clock task and an end-to-end
tiny audit in which every run is censored."""

import json
import math

import pytest

from bnlab.lab.claims import c2_speed as c2
from bnlab.lab.config import Context

from .conftest import SyntheticResults, context

SEEDS = [0, 1, 2, 3, 4]
NORMS = {"none": "plain", "batch": "bn", "noisy": "noisy"}
# accuracy levels of a synthetic curve: each clears one target (b = 0.98, chance 0.1:
# looser 0.9008, default 0.9536, stricter 0.9712)
LEVELS = (0.92, 0.96, 0.985)


def _member(seed, lr, reach, cap, every=5, levels=LEVELS):
    """A member whose test accuracy clears the looser / default / stricter targets at the steps
    in ``reach`` (one number: all three at once; None: never), checked every ``every`` steps."""
    if reach is None:
        reach = (None, None, None)
    elif not isinstance(reach, tuple):
        reach = (reach, reach, reach)
    done = [r for r in reach if r is not None]
    # the run stops at the first check once the stricter target is reached
    end = min(cap, every * math.ceil(max(done) / every)) if len(done) == 3 else cap
    steps = list(range(every, end + 1, every))
    acc = []
    for t in steps:
        a = 0.5
        for level, r in zip(levels, reach):
            if r is not None and t >= r:
                a = level
        acc.append(a)
    return {"seed": seed, "lr": lr, "diverged": False, "test_acc": acc[-1],
            "curve": {"step": steps, "time": [0.001 * t for t in steps], "test_acc": acc}}


def c2_results(steps, ref_acc=0.98, levels=LEVELS):
    """steps[(act, arm)] -> per-seed reach steps (a list over SEEDS, or one value for every seed);
    every arm's lr selection picks 0.1 (= the shared lr); the reference runs reach ``ref_acc``."""
    def make(cfg):
        if cfg["task"] == "c2_wallclock":
            return {"nets": {n: {"step_s": {"plain": 0.001, "bn": 0.0015, "noisy": 0.0016}} for n in cfg["nets"]},
                    "steps": cfg["steps"], "repeats": cfg["repeats"]}
        act, arm = cfg["model"]["act"], NORMS[cfg["model"]["norm"]]
        if cfg["data"]["val_fraction"]:  # lr selection: 0.1 wins for every arm
            return {"members": [{"seed": m["seed"], "lr": m["lr"],
                                 "curve": {"step": [5, 10], "val_acc": [0.5, 0.9 if m["lr"] == 0.1 else 0.6]}}
                                for m in cfg["members"]]}
        if not cfg["eval"]["every"]:  # reference run: b
            return {"members": [{"seed": m["seed"], "lr": m["lr"], "diverged": False, "test_acc": ref_acc}
                                for m in cfg["members"]]}
        v = steps[(act, arm)]
        return {"members": [_member(m["seed"], m["lr"], v[m["seed"] % 5] if isinstance(v, list) else v,
                                    cfg["steps"], cfg["eval"]["every"], levels)
                            for m in cfg["members"]]}
    return SyntheticResults(make)


def _steps(sig, relu):
    """sig / relu: (plain, bn, noisy) per-seed reach steps."""
    out = {}
    for act, arms in (("sigmoid", sig), ("relu", relu)):
        for arm, v in zip(("plain", "bn", "noisy"), arms):
            out[(act, arm)] = v
    return out


FAST = ([1000, 900, 1100, 950, 1050], [100, 110, 90, 105, 95], [120, 130, 110, 125, 115])  # ~10x: supported
SLOWER = ([100, 110, 90, 105, 95], [150, 160, 140, 155, 145], [150, 160, 140, 155, 145])  # BN slower: refuted
NOISY = ([100, 400, 50, 300, 100], [100, 50, 60, 80, 90], [100, 50, 60, 80, 90])  # wide interval: inconclusive
CENSORED = (None, None, None)


@pytest.mark.parametrize("sig,relu,verdict", [
    (FAST, FAST, "supported"),
    (SLOWER, SLOWER, "refuted"),
    (NOISY, NOISY, "inconclusive"),
    (FAST, SLOWER, "partly supported"),
    (SLOWER, NOISY, "partly refuted"),
])
def test_c2_decide_gives_each_verdict(sig, relu, verdict):
    d = c2.decide(context(c2), c2_results(_steps(sig, relu)))
    assert d["verdict"] == verdict
    assert set(d["parts"]) == {"sigmoid", "relu"}
    for p in d["parts"].values():
        assert p["n"] == 5 and p["scale"] == "log" and p["interval"]["method"] == "t"
        assert set(p["sensitivity"]) == {"stricter", "default", "looser"}
        assert set(p["thresholds"]) == {"stricter", "default", "looser"}
        assert math.isclose(p["delta"], 2.0)
        assert p["degenerate"] is None
    assert any(f.startswith("ICS") for f in d["findings"])
    assert any(f.startswith("Shared lr 0.1") for f in d["findings"])
    assert any(f.startswith("Wall-clock") and "Not a verdict input" in f for f in d["findings"])


def test_c2_effect_is_the_geometric_mean_step_ratio():
    sig = ([400] * 5, [100, 100, 100, 100, 200], [100] * 5)
    d = c2.decide(context(c2), c2_results(_steps(sig, FAST)))
    p = d["parts"]["sigmoid"]
    assert math.isclose(p["effect"], math.exp((4 * math.log(4) + math.log(2)) / 5), rel_tol=1e-9)
    assert [x["value"] for x in p["per_seed"]] == pytest.approx([4, 4, 4, 4, 2])


def test_c2_censored_runs_count_at_the_cap():
    sig = ([None, None, 1000, None, None], [100] * 5, [100] * 5)
    p = c2.decide(context(c2), c2_results(_steps(sig, FAST)))["parts"]["sigmoid"]
    cap = c2.PROFILES["quick"]["cap"]
    assert [x["value"] for x in p["per_seed"]] == pytest.approx([cap / 100, cap / 100, 10, cap / 100, cap / 100])
    assert p["censored"]["plain"] == 4 and p["verdict"] == "supported"


def test_c2_every_run_censored_is_degenerate():
    d = c2.decide(context(c2), c2_results(_steps(CENSORED, CENSORED)))
    assert d["verdict"] == "inconclusive"
    for p in d["parts"].values():
        assert p["verdict"] == "inconclusive" and "censored" in p["degenerate"] and p["n"] == 0
        assert all(v == "inconclusive" for v in p["sensitivity"].values())


def test_c2_half_of_the_seeds_without_an_effect_is_degenerate():
    three = ([None, None, None, 1000, 1000], [None, None, None, 100, 100], [100] * 5)
    two = ([None, None, 1000, 1000, 1000], [None, None, 100, 110, 90], [100] * 5)
    d = c2.decide(context(c2), c2_results(_steps(three, two)))
    assert "3 of 5 seeds" in d["parts"]["sigmoid"]["degenerate"]
    assert d["parts"]["relu"]["degenerate"] is None and d["parts"]["relu"]["n"] == 3


def test_c2_nothing_trained_is_degenerate():
    d = c2.decide(context(c2), c2_results(_steps(FAST, FAST), ref_acc=0.12))
    for p in d["parts"].values():
        assert p["verdict"] == "inconclusive" and "nothing trained" in p["degenerate"]


def test_c2_target_is_relative_to_the_best_arm():
    d = c2.decide(context(c2), c2_results(_steps(FAST, FAST), ref_acc=0.98))
    t = d["parts"]["relu"]["targets"][0]
    assert t["default"] == pytest.approx(0.1 + 0.97 * 0.88, abs=1e-6)
    assert t["stricter"] == pytest.approx(0.1 + 0.99 * 0.88, abs=1e-6)
    assert t["looser"] == pytest.approx(0.1 + 0.91 * 0.88, abs=1e-6)
    assert d["parts"]["relu"]["b"] == [pytest.approx(0.98)]


def test_c2_sensitivity_can_differ_from_the_default():
    # BN reaches the looser and default targets 10x sooner, but the stricter one never (plain neither)
    plain = [(1000, 1000, None)] * 5
    bn = [(100, 100 + 5 * i, None) for i in range(5)]
    sig = (plain, bn, bn)
    p = c2.decide(context(c2), c2_results(_steps(sig, FAST)))["parts"]["sigmoid"]
    assert p["verdict"] == "supported"
    assert p["sensitivity"] == {"stricter": "inconclusive", "default": "supported", "looser": "supported"}


def test_c2_decide_v1_keeps_the_v1_rule():
    assert c2.decide_v1(context(c2), c2_results(_steps(FAST, SLOWER)))["verdict"] == "supported"
    assert c2.decide_v1(context(c2), c2_results(_steps(SLOWER, FAST)))["verdict"] == "refuted"
    # v1 would call every-run-censored refuted (ratio 1): the history table shows it beside v2's inconclusive
    v1 = c2.decide_v1(context(c2), c2_results(_steps(CENSORED, CENSORED)))
    assert v1["verdict"] == "refuted" and "ratio 1" in v1["why"]
    assert [r["version"] for r in c2.RULES] == [1, 2] and c2.RULES[0]["text"] == c2.RULE_V1 and c2.RULES[1]["reason"]


def test_c2_decide_v1_is_na_when_the_runs_stop_below_95():
    # b = 90%: the runs stop at the stricter target (89.2%) and never see 95%
    d = c2.decide_v1(context(c2), c2_results(_steps(FAST, FAST), ref_acc=0.9, levels=(0.85, 0.88, 0.9)))
    assert d["verdict"] == "n/a" and "95%" in d["why"]


def test_c2_profiles_have_the_v2_seeds_and_both_nets():
    assert c2.PROFILES["quick"]["seeds"] == [0, 1, 2, 3, 4]
    assert c2.PROFILES["full"]["seeds"] == list(range(10))
    assert len(c2.PROFILES["tiny"]["seeds"]) >= 2
    assert set(c2.NETS) == {"sigmoid", "relu"} and c2.DATASETS[0] == "digits" and "mnist1d" in c2.DATASETS


def test_c2_one_run_per_seed_set_and_lr_selection_on_the_first_seed():
    s = c2.PROFILES["quick"]
    ctx = Context(profile="quick", seeds=list(range(10)), settings=s, seed_sets=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    res = c2_results(_steps(FAST, FAST))
    runs = c2.plan(ctx, res).runs
    classify = [r for r in runs if r.config["task"] == "classify"]
    sel = [r for r in classify if r.config["data"]["val_fraction"]]
    ref = [r for r in classify if not r.config["data"]["val_fraction"] and not r.config["eval"]["every"]]
    main = [r for r in classify if r.config["eval"]["every"] and not r.config["data"]["val_fraction"]]
    assert len(sel) == 6 and all({m["seed"] for m in r.config["members"]} == {0} for r in sel)
    assert len(ref) == 12 and all(r.gate for r in ref)
    assert len(main) == 12  # tuned lr = shared lr 0.1 here: one run per (net, arm, seed set)
    assert sorted({tuple(m["seed"] for m in r.config["members"]) for r in main}) == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    assert all(r.config["eval"]["stop_at_target"] for r in main)
    assert sum(r.config["task"] == "c2_wallclock" for r in runs) == 1
    d = c2.decide(ctx, res)
    assert all(p["n"] == 10 for p in d["parts"].values())
    assert [x["seed"] for x in d["parts"]["relu"]["per_seed"]] == list(range(10))
    # a robustness cell on the second set selects with the shared first seed and reads the same runs
    cell = Context(profile="quick", seeds=[5, 6, 7, 8, 9], settings=s, selection_seed=0)
    assert {str(r.config) for r in c2.plan(cell, res).runs} <= {str(r.config) for r in runs}
    assert all(p["n"] == 5 for p in c2.decide(cell, res)["parts"].values())


def test_c2_main_runs_wait_for_selection_and_reference():
    ctx = context(c2)
    empty = SyntheticResults(lambda cfg: None)
    plan = c2.plan(ctx, empty)
    assert {r.config["task"] for r in plan.runs} == {"classify", "c2_wallclock"}
    assert all(r.config["data"]["val_fraction"] for r in plan.runs if r.config["task"] == "classify")
    assert len(plan.pending) > 0


def test_c2_mnist1d_runs_on_its_own_data_and_check_interval():
    ctx = Context(profile="quick", seeds=SEEDS, settings=c2.PROFILES["quick"], dataset="mnist1d")
    runs = c2.plan(ctx, c2_results(_steps(FAST, FAST))).runs
    assert all(r.config["data"]["name"] == "mnist1d" for r in runs)
    classify = [r.config for r in runs if r.config["task"] == "classify"]
    assert {c["eval"]["every"] for c in classify if c["data"]["val_fraction"]} == {5}  # lr selection
    assert {c["eval"]["every"] for c in classify if c["eval"]["target"]} == {50}  # steps to the target
    d = c2.decide(ctx, c2_results(_steps(FAST, FAST)))
    assert d["verdict"] == "supported"


def test_c2_wallclock_task_times_every_arm_in_one_process():
    cfg = c2._timing_config(Context(profile="tiny", seeds=[0, 1], settings=dict(c2.PROFILES["tiny"],
                                                                            timing_steps=2, timing_repeats=2)))
    out = c2.time_steps(cfg)
    assert set(out["nets"]) == {"sigmoid", "relu"}
    for t in out["nets"].values():
        assert set(t["step_s"]) == {"plain", "bn", "noisy"} and all(v > 0 for v in t["step_s"].values())
        assert all(len(v) == 2 for v in t["blocks"].values()) and t["ratio"]["plain"] == 1.0


def test_c2_tiny_audit_end_to_end_every_run_censored_is_degenerate(tmp_path):
    """A cap no arm can reach (5 steps, one check): every run is censored, both parts inconclusive."""
    from bnlab.cli import main

    assert main(["audit", "--profile", "tiny", "--claims", "C2", "--workers", "1", "--no-progress",
                 "--set", "C2.cap=5", "--set", "C2.ref_steps=20", "--set", "C2.select_steps=10",
                 "--set", "C2.timing_steps=1", "--set", "C2.timing_repeats=1",
                 "--store", str(tmp_path / "s.sqlite"), "--out", str(tmp_path / "out")]) == 0
    c = json.loads((tmp_path / "out" / "results.json").read_text())["claims"]["C2"]
    assert c["status"] == "decided" and c["verdict"] == "inconclusive"
    for p in c["parts"].values():
        assert p["verdict"] == "inconclusive" and "censored" in p["degenerate"]
