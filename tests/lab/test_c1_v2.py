"""C1 under rules version 2: decide() on synthetic results gives each verdict, the degenerate and
censored cases, both parts (the conv part only on image data), the sensitivity to the stability
threshold and the accuracy-based definition, the grid extension, the v1 verdict beside it, and
the seed-set runs."""

import math

import pytest

from bnlab.lab import metrics as M
from bnlab.lab.claims import c1_learning_rate as c1
from bnlab.lab.config import Context
from bnlab.lab.protocol import Results

from .conftest import SyntheticResults, context

INF = math.inf


@pytest.fixture(autouse=True)
def _ten_classes(monkeypatch):
    """Chance 1/10 without generating mnist1d in every test (test_chance_comes_from_the_data checks it)."""
    monkeypatch.setattr(c1, "_chance", lambda ctx: 0.1)


def limits(plain, bn, conv_plain=None, conv_bn=None):
    """An outcome function from the largest stable rate per seed (a number for every seed, or a
    list indexed by seed; 0: nothing stable; INF: every rate): stable runs end at train loss 0.5 and
    60% test accuracy, the others diverge."""
    table = {("mlp", "plain"): plain, ("mlp", "bn"): bn,
             ("conv", "plain"): plain if conv_plain is None else conv_plain,
             ("conv", "bn"): bn if conv_bn is None else conv_bn}

    def outcome(part, arm, seed, lr):
        lim = table[(part, arm)]
        lim = lim[seed] if isinstance(lim, (list, tuple)) else lim
        return (0.5, 0.6) if lr <= lim else (None, None)
    return outcome


def c1_results(outcome, seen=None):
    """outcome(part, arm, seed, lr) -> (final train loss, test accuracy); loss None = diverged."""
    def make(cfg):
        part = "conv" if cfg["model"]["arch"] == "cnn" else "mlp"
        arm = "bn" if cfg["model"]["norm"] == "batch" else "plain"
        if seen is not None:
            seen.append(cfg)
        out = []
        for m in cfg["members"]:
            loss, acc = outcome(part, arm, m["seed"], m["lr"])
            out.append({"seed": m["seed"], "lr": m["lr"], "diverged": loss is None, "train_loss": loss,
                        "test_acc": acc})
        return {"members": out}
    return SyntheticResults(make)


def digits(profile="quick", seeds=None):
    ctx = context(c1, profile, seeds)
    return Context(profile=ctx.profile, seeds=ctx.seeds, settings=ctx.settings, dataset="digits")


# grid indices: 0.01 0, 0.03 1, 0.1 2, 0.3 3, 1 4, 3 5, 10 6, 30 7, 100 8
SUPPORTED = limits(0.3, [3.0, 3.0, 10.0, 3.0, 10.0])  # d = 2, 2, 3, 2, 3
REFUTED = limits(0.3, [1.0, 1.0, 1.0, 0.3, 1.0])  # d = 1, 1, 1, 0, 1
INCONCLUSIVE = limits(0.3, [0.3, 10.0, 0.3, 10.0, 1.0])  # d = 0, 3, 0, 3, 1: too spread to decide


@pytest.mark.parametrize("outcome,verdict", [
    (SUPPORTED, "supported"), (REFUTED, "refuted"), (INCONCLUSIVE, "inconclusive"),
    (limits(1.0, 0.3), "refuted"),  # BN's max stable rate is the lower one
])
def test_c1_mlp_part_gives_each_verdict(outcome, verdict):
    d = c1.decide(context(c1), c1_results(outcome))
    p = d["parts"]["mlp"]
    assert p["verdict"] == verdict, p["why"]
    assert p["rule_version"] == 2 and p["n"] == 5 and p["delta"] == 2 and p["interval"]["method"] == "t"
    assert p["degenerate"] is None and p["sign"].endswith("/5") and p["p_wilcoxon"] is not None
    assert [s["seed"] for s in p["per_seed"]] == [0, 1, 2, 3, 4]
    assert set(p["sensitivity"]) == {"stricter", "default", "looser", "accuracy-based"}
    assert p["sensitivity"]["default"] == verdict
    assert "0.8 ln K" in p["thresholds"]["stricter"] and "1.0 ln K" in p["thresholds"]["looser"]
    assert p["accuracy_based"]["verdict"] in ("supported", "refuted", "inconclusive")
    assert any("lr width" in f and "not a verdict input" in f for f in d["findings"])


def test_c1_effect_is_the_mean_index_difference():
    d = c1.decide(context(c1), c1_results(SUPPORTED))
    p = d["parts"]["mlp"]
    assert [s["value"] for s in p["per_seed"]] == [2, 2, 3, 2, 3]
    assert p["effect"] == pytest.approx(2.4)
    assert p["interval"]["low"] == pytest.approx(2.4 - 2.7764451 * 0.5477226 / math.sqrt(5), rel=1e-5)


def test_c1_conv_part_reads_digits_images_when_the_claims_data_has_none():
    ctx = context(c1)
    runs = c1.plan(ctx, c1_results(SUPPORTED)).runs
    conv = [r.config for r in runs if r.config["model"]["arch"] == "cnn"]
    mlp = [r.config for r in runs if r.config["model"]["arch"] == "mlp"]
    assert conv and all(c["data"]["name"] == "digits" for c in conv)
    assert mlp and all(c["data"]["name"] == "mnist1d" for c in mlp)


@pytest.mark.parametrize("mlp,conv,parts,verdict", [
    (SUPPORTED, SUPPORTED, ("supported", "supported"), "supported"),
    (REFUTED, REFUTED, ("refuted", "refuted"), "refuted"),
    (SUPPORTED, REFUTED, ("supported", "refuted"), "partly supported"),
    (REFUTED, INCONCLUSIVE, ("refuted", "inconclusive"), "partly refuted"),
    (INCONCLUSIVE, INCONCLUSIVE, ("inconclusive", "inconclusive"), "inconclusive"),
])
def test_c1_on_images_both_parts_decide_alone(mlp, conv, parts, verdict):
    def outcome(part, arm, seed, lr):
        return (mlp if part == "mlp" else conv)(part, arm, seed, lr)
    seen = []
    d = c1.decide(digits(), c1_results(outcome, seen))
    assert (d["parts"]["mlp"]["verdict"], d["parts"]["conv"]["verdict"]) == parts
    assert d["verdict"] == verdict
    assert {cfg["model"]["arch"] for cfg in seen} == {"mlp", "cnn"}
    conv_cfg = next(cfg for cfg in seen if cfg["model"]["arch"] == "cnn")
    assert conv_cfg["data"]["name"] == "digits" and conv_cfg["model"]["channels"] == [16, 16, 16]
    assert conv_cfg["optim"] == {"kind": "sgd", "momentum": 0.0} and conv_cfg["batch"] == 64


@pytest.mark.parametrize("outcome,why", [
    (limits(0.0, [0.0, 0.0, 0.0, 1.0, 1.0]), "no stable rate in either arm"),
    (limits(INF, [INF, INF, INF, 1.0, 1.0]), "both arms stable at the top"),
])
def test_c1_both_arms_at_the_same_end_is_degenerate(outcome, why):
    d = c1.decide(context(c1), c1_results(outcome))
    p = d["parts"]["mlp"]
    assert p["verdict"] == "inconclusive" and p["degenerate"] is not None
    assert "3 of 5 seeds" in p["degenerate"] and why in p["degenerate"]
    assert p["why"].startswith("degenerate:")


def test_c1_a_few_same_end_seeds_only_drop_out():
    d = c1.decide(context(c1), c1_results(limits([0.0, 0.0, 0.3, 0.3, 0.3], [0.0, 3.0, 3.0, 3.0, 10.0])))
    p = d["parts"]["mlp"]
    assert p["degenerate"] is None and p["n"] == 4
    assert p["per_seed"][0]["value"] is None and "seed(s) 0 give no d_s" in p["why"]
    assert p["censored"]["lower_bound_seeds"] == [1]  # plain stable nowhere: BN's lead is at least 7 steps


def test_c1_extends_the_grid_when_an_arm_is_stable_at_the_top():
    ctx = context(c1)
    plan = c1.plan(ctx, Results(None))
    assert len(plan.runs) == 4 and len(plan.pending) == 4  # two parts x two arms; the extension may follow
    assert c1.plan(ctx, c1_results(REFUTED)).runs == plan.runs  # nobody stable at 10: no extension
    assert not c1.plan(ctx, c1_results(REFUTED)).pending
    runs = [r for r in c1.plan(ctx, c1_results(SUPPORTED)).runs if r.config["model"]["arch"] == "mlp"]
    ext = [r.config for r in runs[2:]]  # BN stable at 10 in seeds 2 and 4
    assert len(ext) == 2 and all([m["lr"] for m in cfg["members"]] == [30.0, 100.0] * 5 for cfg in ext)
    assert {cfg["model"]["norm"] for cfg in ext} == {"none", "batch"}


def test_c1_censored_seeds_are_lower_bounds_and_cannot_refute():
    # plain stable to 3 (index 5); BN to 10 (index 6), and to 100 (the top, censored) in seed 0 where plain
    # reaches 30: d = >=1, 1, 1, 1, 0: the interval lies below 2, but seed 0's d_s is only a lower bound
    outcome = limits([30.0, 3.0, 3.0, 3.0, 3.0], [INF, 10.0, 10.0, 10.0, 3.0])
    d = c1.decide(context(c1), c1_results(outcome))
    p = d["parts"]["mlp"]
    assert [s["value"] for s in p["per_seed"]] == [1, 1, 1, 1, 0]
    assert p["interval"]["high"] < 2 and p["verdict"] == "inconclusive"
    assert "lower bound" in p["why"] and "cannot refute" in p["why"]
    assert p["censored"]["lower_bound_seeds"] == [0]
    seeds_table = next(t for t in d["tables"] if "per seed" in t["title"])
    assert seeds_table["rows"][0][2].startswith(">= 100 (censored")
    assert seeds_table["rows"][0][3] == ">= +1"
    assert any("lower bound (censored)" in f for f in d["findings"])
    assert d["metrics"]["mlp"]["grid"][-2:] == [30.0, 100.0]
    assert d["metrics"]["mlp"]["extended_seeds"] == [0, 1, 2, 3, 4]


def test_c1_censored_bn_can_still_support():
    d = c1.decide(context(c1), c1_results(limits(0.3, [INF, 10.0, 30.0, 10.0, 10.0])))
    p = d["parts"]["mlp"]
    assert [s["value"] for s in p["per_seed"]] == [5, 3, 4, 3, 3]
    assert p["verdict"] == "supported" and "lower bound" in p["why"]


def test_c1_sensitivity_to_the_loss_threshold_and_to_accuracy():
    # BN at 3 and 10 ends at train loss 1.9 (below 0.9 ln 10 = 2.07, above 0.8 ln 10 = 1.84) with 60%
    # accuracy; plain is stable to 0.3: d = 3 by loss at 0.9 and 1.0 ln 10, d = 1 at 0.8 ln 10
    def outcome(part, arm, seed, lr):
        if arm == "plain":
            return (0.5, 0.6 + 0.01 * seed) if lr <= 0.3 else (None, None)
        if lr <= 1.0:
            return (0.5, 0.6)
        return (1.9, 0.6) if lr <= 10.0 else (None, None)
    d = c1.decide(context(c1), c1_results(outcome))
    p = d["parts"]["mlp"]
    assert p["verdict"] == "supported"
    assert p["sensitivity"] == {"stricter": "refuted", "default": "supported", "looser": "supported",
                                "accuracy-based": "supported"}
    assert d["sensitivity"]["stricter"] == "refuted"  # the claim's verdict at that setting (both parts alike here)
    assert d["metrics"]["mlp"]["max_stable_lr"]["stricter"]["bn"]["0"] == 1.0


def test_c1_accuracy_based_stability_can_disagree():
    # BN's runs at 1-10 keep a low loss by the loss limit (2.0 < 2.07) but sit near chance (15%)
    def outcome(part, arm, seed, lr):
        if lr <= 0.3:
            return (0.5, 0.7)
        if arm == "bn" and lr <= 10.0:
            return (2.0, 0.15)
        return (None, None)
    d = c1.decide(context(c1), c1_results(outcome))
    p = d["parts"]["mlp"]
    assert p["verdict"] == "supported"  # loss-based: BN to 10 (index 6), plain to 0.3 (index 3)
    acc = p["accuracy_based"]
    assert acc["verdict"] == "refuted" and acc["effect"] == 0  # both to 0.3 by accuracy (threshold 40%)
    assert p["sensitivity"]["accuracy-based"] == "refuted"
    assert "40.0%" in p["thresholds"]["accuracy-based"]
    assert any("with accuracy-based stability: refuted" in f for f in d["findings"])


def test_c1_accuracy_based_is_degenerate_when_an_arm_never_trains():
    def outcome(part, arm, seed, lr):
        if arm == "plain":
            return (2.2, 0.105) if lr <= 1.0 else (None, None)
        return (0.5, 0.6) if lr <= 10.0 else (None, None)
    p = c1.decide(context(c1), c1_results(outcome))["parts"]["mlp"]
    assert p["accuracy_based"]["verdict"] == "inconclusive"
    assert "plain" in p["accuracy_based"]["degenerate"] and "nothing trained" in p["accuracy_based"]["degenerate"]


def test_c1_decide_v1_applies_the_old_rule_to_the_seven_rate_grid():
    assert c1.RULES[0]["text"] == c1.RULE_V1 and c1.RULES[1]["text"] == c1.RULE and c1.RULES[1]["reason"]
    assert c1.DATASETS == ["mnist1d", "digits"]
    v1 = c1.decide_v1(context(c1), c1_results(REFUTED))
    assert v1["verdict"] == "inconclusive" and "median r_s = 3.33" in v1["why"]  # 1 / 0.3 is above v1's 3.16
    assert c1.decide_v1(context(c1), c1_results(limits(0.3, 0.3)))["verdict"] == "refuted"
    v1 = c1.decide_v1(context(c1), c1_results(limits(0.1, [INF, 10.0, 10.0, 10.0, 10.0])))
    assert "median r_s = 100" in v1["why"]  # the extension (BN to 100 in seed 0) is not v1's input
    # v1 also asks for a wider lr width; here every stable rate has the same accuracy
    assert v1["verdict"] == "supported"


def test_c1_seed_sets_make_one_run_per_arm_and_set_and_pool_in_decide():
    settings = c1.PROFILES["full"]
    ctx = Context(profile="full", seeds=list(range(10)), settings=settings,
                  seed_sets=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    # BN stable at 10 only in set B: only set B's grid is extended
    res = c1_results(limits(0.3, [3.0] * 5 + [10.0] * 5))
    runs = [r for r in c1.plan(ctx, res).runs if r.config["model"]["arch"] == "mlp"]
    seeds = [sorted({m["seed"] for m in r.config["members"]}) for r in runs]
    assert seeds == [[0, 1, 2, 3, 4]] * 2 + [[5, 6, 7, 8, 9]] * 4
    d = c1.decide(ctx, res)
    p = d["parts"]["mlp"]
    assert p["n"] == 10 and [s["value"] for s in p["per_seed"]] == [2] * 5 + [3] * 5
    assert d["metrics"]["mlp"]["extended_seeds"] == [5, 6, 7, 8, 9]
    cell = Context(profile="full", seeds=[5, 6, 7, 8, 9], settings=settings, seed_sets=[[5, 6, 7, 8, 9]])
    cell_runs = [r.config for r in c1.plan(cell, res).runs if r.config["model"]["arch"] == "mlp"]
    assert cell_runs == [r.config for r in runs[2:]]


def test_c1_profiles_use_enough_seeds():
    assert c1.PROFILES["quick"]["seeds"] == [0, 1, 2, 3, 4]
    assert c1.PROFILES["full"]["seeds"] == list(range(10))
    assert len(c1.PROFILES["tiny"]["seeds"]) >= 2


def test_c1_new_metrics():
    ms = {0.1: {"diverged": False, "train_loss": 0.5, "test_acc": 0.6},
          1.0: {"diverged": False, "train_loss": 3.0, "test_acc": 0.1},
          0.3: {"diverged": False, "train_loss": 0.6, "test_acc": 0.55},
          3.0: {"diverged": True, "train_loss": None, "test_acc": None}}
    assert M.max_stable_index(ms, M.is_stable) == 1  # 0.3, the second of 0.1, 0.3, 1, 3
    assert M.max_stable_index(ms, lambda m: False) == -1
    assert M.is_stable_by_accuracy(ms[0.3], 0.55) and not M.is_stable_by_accuracy(ms[0.3], 0.56)
    assert not M.is_stable_by_accuracy(ms[3.0], 0.0)


def test_chance_comes_from_the_data(monkeypatch):
    monkeypatch.undo()
    assert c1._chance(digits()) == pytest.approx(0.1)
