"""C6 under rules version 2: four parts decided alone (vertical_fine, naive_horizontal_hurts,
horizontal_hurts_however_done, because_gradients_explode), each verdict and the combined ones, the
degenerate cases (every arm at chance, steps censored for both arms), sensitivity, the v1 verdict
beside it, and the corrected account of what separates the arms."""

import math

import pytest

from bnlab.lab.claims import c6_recurrent as C6
from bnlab.lab.config import Context
from bnlab.lab.rnn_train import summarize_profile

from .conftest import SyntheticResults

SEEDS = [0, 1, 2, 3, 4]
CAP = 450
WOBBLE = [0.0, 0.4, -0.3, 0.2, -0.1, 0.3, -0.2, 0.1, 0.0, -0.4]  # points, per seed
ARM_OF = {(v["norm"], v["gamma_init"]): k for k, v in C6.ARMS.items()}
PARTS = list(C6.PART_NAMES)


def ctx(seeds=SEEDS, profile="quick", **over):
    # window 1: a run's steps to the target are exactly where its minibatch accuracy jumps
    return Context(profile=profile, seeds=list(seeds), settings=dict(C6.PROFILES[profile], steps=CAP, window=1, **over))


def _profile(growth: float, T: int = 32) -> list[float]:
    """||dL/dh_t|| for t = 1..T with ||dL/dh_3|| / ||dL/dh_T|| = growth (log-linear from t = 3), and a
    large h_1 (as LayerNorm's h_0 = 0 artefact)."""
    norms = [growth ** ((T - t) / (T - 3)) for t in range(3, T + 1)]
    return [50.0 * norms[0], 5.0 * norms[0]] + norms


def result(acc, steps=200, growth=1.0, jump_to=1.0, layers=2, diverged=False):
    """One synthetic run: test accuracy ``acc`` (%), minibatch accuracy 0.5 until ``steps`` (None:
    never, censored) then ``jump_to``; the growth ratio ``growth`` in every profile and layer."""
    stop = CAP + 1 if steps is None else steps
    batch = [0.5] * (stop - 1) + [jump_to] * (CAP - stop + 1)
    profiles = []
    for st in (0, 150, 300, 450):
        ls = []
        for l in range(layers):
            norms = _profile(growth)
            ls.append(dict({"layer": l, "norms": norms}, **summarize_profile(norms)))
        profiles.append({"step": st, "loss": 2.3, "param_grad_norm": 1.0, "layers": ls})
    strip = [[{k: v for k, v in la.items() if k != "norms"} for la in p["layers"]] for p in profiles]
    return {"test_acc": acc / 100, "train_acc": 0.99, "classes": 10, "steps_to_80": steps, "diverged": diverged,
            "steps_run": CAP, "final_loss": 0.1, "batch_acc": batch, "grad_profiles": profiles,
            "grad_init": strip[0], "grad_end": strip[-1],
            "clip": {"threshold": 1.0, "share_clipped": 0.3, "median": 0.8, "max": 3.0},
            "curve": {"step": [25, 50], "loss": [1.0, 0.5], "train_acc": [0.5, 0.9], "grad_norm": [1.0, 0.8],
                      "grad_norm_max": [2.0, 1.0], "clipped": [0.5, 0.2]}, "wall_s": 1.0}


NONE = 90.0


def synthetic(acc=None, steps=None, growth=None, noise=1.0, gnoise=0.2, **kw):
    """acc: {arm: shift from none (points)}; steps: {arm: steps or None}; growth: {arm: ratio}.
    Each seed wobbles by ``noise`` x WOBBLE points (growth: by a factor exp(``gnoise`` x WOBBLE)),
    arm by arm, so the differences have spread."""
    acc, steps, growth = acc or {}, steps or {}, growth or {}

    def make(cfg):
        arm = ARM_OF[(cfg["norm"], cfg["gamma_init"])]
        s = cfg["seed"]
        k = list(C6.ARMS).index(arm)
        w = noise * WOBBLE[(s + 3 * k) % 10] if arm != "none" else 0.0
        st = steps.get(arm, 200)
        g = growth.get(arm, 1.0)
        return result(NONE + acc.get(arm, 0.0) + w, st if st is None else int(st * (1 + 0.02 * WOBBLE[(s + k) % 10])),
                      g * math.exp(gnoise * WOBBLE[(s + 2 * k) % 10]), **kw)
    return SyntheticResults(make)


ARTICLE = dict(acc={"horizontal": -6, "per_step_g1": -5, "per_step_g0.1": -5},
               growth={"horizontal": 1e4, "none": 1e-4, "layer": 3.0})
AGAINST = dict(acc={"vertical": -8, "horizontal": 1.0, "per_step_g0.1": 1.5},
               growth={"horizontal": 2.0, "none": 1e-4, "layer": 30.0})


@pytest.mark.parametrize("setup,verdicts,verdict", [
    (ARTICLE, ("supported",) * 4, "supported"),
    (AGAINST, ("refuted",) * 4, "refuted"),
    (dict(acc={"vertical": -1.0, "horizontal": -1.0, "per_step_g0.1": -1.5}, growth={"horizontal": 8.0}, noise=6.0,
          gnoise=6.0),
     ("inconclusive",) * 4, "inconclusive"),
    (dict(acc={"horizontal": -6, "per_step_g0.1": 0.5}, growth={"horizontal": 1.0, "layer": 30.0}),
     ("supported", "supported", "refuted", "refuted"), "partly supported"),
    (dict(acc={"vertical": -1.0, "horizontal": 0.5, "per_step_g0.1": 0.5}, growth={"horizontal": 1.0, "layer": 30.0},
          noise=3.0),
     ("inconclusive", "refuted", "refuted", "refuted"), "partly refuted"),
])
def test_c6_decide_gives_each_verdict(setup, verdicts, verdict):
    d = C6.decide(ctx(), synthetic(**setup))
    assert list(d["parts"]) == PARTS
    assert tuple(p["verdict"] for p in d["parts"].values()) == verdicts, d["why"]
    assert d["verdict"] == verdict
    for name, p in d["parts"].items():
        assert p["n"] == 5 and p["interval"]["method"] == "t" and p["rule_version"] == 2
        assert p["sign"].endswith("/5") and p["p_wilcoxon"] is not None and p["degenerate"] is None
        assert set(p["sensitivity"]) == {"stricter", "default", "looser"}
        assert p["sensitivity"]["default"] == p["verdict"]
        assert set(p["thresholds"]) == {"stricter", "default", "looser"}
        assert len(p["per_seed"]) == 5 and p["rule"] == C6.RULE and p["label"]
    assert d["parts"]["because_gradients_explode"]["scale"] == "log"
    assert d["parts"]["because_gradients_explode"]["delta"] == pytest.approx(10.0)
    assert d["parts"]["vertical_fine"]["delta"] == pytest.approx(-1.0)
    assert d["tables"] and d["findings"] and d["metrics"]["arms"]["none"]["test_acc"]


def test_every_arm_at_chance_is_degenerate_for_the_accuracy_parts():
    d = C6.decide(ctx(), _at_chance())
    for name in PARTS[:3]:
        p = d["parts"][name]
        assert p["verdict"] == "inconclusive" and p["degenerate"].startswith("every arm at chance"), p
        assert set(p["sensitivity"].values()) == {"inconclusive"}
    # the gradient part does not need trained arms: it is still decided
    assert d["parts"]["because_gradients_explode"]["degenerate"] is None
    assert d["parts"]["because_gradients_explode"]["verdict"] == "supported"


def _at_chance():
    """Every arm near 10% (chance) in every seed, nothing ever passes the steps target."""
    def make(cfg):
        arm = ARM_OF[(cfg["norm"], cfg["gamma_init"])]
        g = {"horizontal": 1e4, "none": 1e-4}.get(arm, 1.0) * math.exp(0.2 * WOBBLE[cfg["seed"]])
        r = result(10.0 + WOBBLE[cfg["seed"]], None, g)
        r["batch_acc"] = [0.1 + 0.01 * WOBBLE[cfg["seed"]]] * CAP
        return r
    return SyntheticResults(make)


def test_none_never_reaching_the_target_with_vertical_censored_too_is_degenerate():
    d = C6.decide(ctx(), synthetic(acc={"horizontal": -6}, steps={"none": None, "vertical": None},
                                   growth={"horizontal": 1e4}))
    p = d["parts"]["vertical_fine"]
    assert p["verdict"] == "inconclusive" and p["degenerate"].startswith("steps censored for both arms"), p
    assert d["parts"]["naive_horizontal_hurts"]["verdict"] == "supported"  # other parts are unaffected
    assert d["verdict"] == "partly supported"


def test_vertical_faster_than_a_censored_none_is_no_slower():
    d = C6.decide(ctx(), synthetic(steps={"none": None, "vertical": 150}))
    p = d["parts"]["vertical_fine"]
    assert p["degenerate"] is None and p["steps"]["no_slower"] and p["verdict"] == "supported"


def test_vertical_as_accurate_but_slower_is_refuted_in_the_interval_sense():
    d = C6.decide(ctx(), synthetic(steps={"none": 200, "vertical": 300}))
    p = d["parts"]["vertical_fine"]
    assert p["steps"]["slower_in_interval"] and p["verdict"] == "refuted"
    assert p["steps"]["ratio_interval"][0] > 1.1
    d = C6.decide(ctx(), synthetic(steps={"none": 200, "vertical": 215}))
    p = d["parts"]["vertical_fine"]
    assert p["verdict"] == "supported" and p["steps"]["median_ratio"] <= 1.1  # within the 1.1x tolerance
    assert p["sensitivity"]["stricter"] == "refuted"  # 1.05x: 215/200 is slower there, in the interval's sense


def test_vertical_non_inferiority_margin_sensitivity():
    # vertical 0.8 points below none, tightly: above -1 (supported) but not above -0.5 (stricter)
    d = C6.decide(ctx(), synthetic(acc={"vertical": -0.8}, noise=0.2))
    p = d["parts"]["vertical_fine"]
    assert p["verdict"] == "supported" and p["interval"]["low"] > -1
    assert p["sensitivity"] == {"stricter": "refuted", "default": "supported", "looser": "supported"}


def test_cooijmans_within_one_point_refutes_but_between_one_and_two_does_not():
    d = C6.decide(ctx(), synthetic(acc={"per_step_g0.1": -0.3}, noise=0.3))
    assert d["parts"]["horizontal_hurts_however_done"]["verdict"] == "refuted"
    d = C6.decide(ctx(), synthetic(acc={"per_step_g0.1": -1.5}, noise=0.3))
    p = d["parts"]["horizontal_hurts_however_done"]
    assert 1 < p["interval"]["low"] and p["interval"]["high"] < 2
    assert p["verdict"] == "inconclusive"  # CLAIMS.md: refuted only within 1 point of none (or better)
    assert any("plain default rule" in f and "'refuted'" in f for f in d["findings"])
    assert p["sensitivity"]["looser"] == "supported"  # delta 1 point


def test_layernorm_is_the_control_for_the_gradient_part():
    # horizontal grows 100x, as much as LayerNorm: no explosion relative to the safe control
    d = C6.decide(ctx(), synthetic(growth={"horizontal": 100.0, "layer": 100.0, "none": 1e-6}))
    p = d["parts"]["because_gradients_explode"]
    assert p["verdict"] == "refuted" and 0.5 < p["effect"] < 2
    # against none alone it would have "exploded"; the part uses the larger of none and LayerNorm
    d = C6.decide(ctx(), synthetic(growth={"horizontal": 100.0, "layer": 1.0, "none": 1e-6}))
    assert d["parts"]["because_gradients_explode"]["verdict"] == "supported"


def test_growth_starts_at_step_three():
    norms = _profile(4.0)
    s = summarize_profile(norms)
    assert s["growth"] == pytest.approx(4.0) and s["ratio"] == pytest.approx(200.0)
    assert s["back_slope"] == pytest.approx(math.log(4.0) / 29)


def test_undefined_growth_is_degenerate():
    def make(cfg):
        r = result(90.0)
        for p in r["grad_profiles"]:
            for la in p["layers"]:
                la["growth"] = None
        return r
    d = C6.decide(ctx(), SyntheticResults(make))
    p = d["parts"]["because_gradients_explode"]
    assert p["verdict"] == "inconclusive" and "undefined" in p["degenerate"]


def test_decide_v1_applies_the_old_rule_to_v2_runs():
    assert C6.RULES[0]["version"] == 1 and C6.RULES[0]["text"] == C6.RULE_V1
    assert C6.RULES[1]["version"] == 2 and C6.RULES[1]["text"] == C6.RULE and C6.RULES[1]["reason"]
    v1 = C6.decide_v1(ctx(), synthetic(**ARTICLE))
    assert v1["verdict"] in ("supported", "partly supported", "inconclusive", "refuted") and v1["why"]
    # v1 read ||dL/dh_1|| / ||dL/dh_T|| at init, which the h_0 = 0 artefact (50x at t = 1) inflates: with no
    # growth from h_3 on (horizontal as LayerNorm) v1 calls the explosion supported, v2 refutes it
    res = synthetic(acc={"horizontal": -6, "per_step_g0.1": -5}, growth={"horizontal": 1.0, "layer": 1.0, "none": 1e-4})
    v1 = C6.decide_v1(ctx(), res)
    assert "because gradients explode: supported" in v1["why"] and v1["verdict"] == "supported"
    assert C6.decide(ctx(), res)["parts"]["because_gradients_explode"]["verdict"] == "refuted"


def test_the_report_says_what_separates_horizontal_from_per_step_gamma_one():
    d = C6.decide(ctx(), synthetic())
    rows = {r[0]: r[-1] for r in d["tables"][2]["rows"]}
    what = rows[f"{C6.ARM_LABELS['per_step_g1']} - {C6.ARM_LABELS['horizontal']}"]
    assert "cell normalization" in what and "input statistics" in what and "pooled over batch and time" in what


def test_fewer_seeds_than_rules_v2_ask_are_said():
    d = C6.decide(ctx([0, 1, 2]), synthetic(**ARTICLE))
    assert any(f.startswith("Seeds: 3, fewer than the 5") for f in d["findings"])
    assert all(p["n"] == 3 for p in d["parts"].values())
    # the profiles run the seeds rules v2 ask for, so only a --seeds list gives the finding
    assert C6.PROFILES["quick"]["seeds"] == [0, 1, 2, 3, 4] and C6.PROFILES["full"]["seeds"] == list(range(10))
    assert not any(f.startswith("Seeds:") for f in C6.decide(ctx([0, 1, 2, 3, 4]), synthetic(**ARTICLE))["findings"])
    assert any("Seeds: quick 5" in c for c in C6.PROTOCOL_CHANGES)
    assert len(C6.PROFILES["tiny"]["seeds"]) >= 2


def test_seed_sets_share_runs_with_the_pooled_seeds():
    full = Context(profile="full", seeds=SEEDS, settings=C6.PROFILES["full"], seed_sets=[[0, 1], [2, 3, 4]])
    cell = Context(profile="full", seeds=[2, 3, 4], settings=C6.PROFILES["full"], seed_sets=[[2, 3, 4]],
                   dataset="digits")
    keys = {repr(sorted(r.config.items())) for r in C6.plan(full, None).runs}
    assert {repr(sorted(r.config.items())) for r in C6.plan(cell, None).runs} <= keys
    assert C6.DATASETS == ["digits", "mnist1d"]
