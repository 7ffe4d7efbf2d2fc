"""C6 (BN in recurrent networks): decide() on synthetic result sets for each verdict, and a tiny real run."""

import math

import pytest

from bnlab.lab.claims import c6_recurrent as C6
from bnlab.lab.config import Context
from bnlab.lab.protocol import VERDICTS, Results
from bnlab.lab.tasks import run as run_task

SEEDS = [0, 1, 2, 3, 4]


def _ctx(profile="quick", seeds=SEEDS, **over):
    return Context(profile=profile, seeds=list(seeds), settings=dict(C6.PROFILES[profile], **over))


def _result(acc, steps=200, ratios=(1e-6, 1e-7), diverged=False):
    g = [{"layer": l, "g_first": r, "g_last": 1.0, "ratio": r} for l, r in enumerate(ratios)]
    return {"test_acc": acc / 100, "train_acc": 0.99, "steps_to_80": steps, "diverged": diverged, "steps_run": 600,
            "final_loss": 0.1, "grad_init": g, "grad_end": g,
            "curve": {"step": [25, 50], "loss": [1.0, 0.5], "train_acc": [0.5, 0.9]}, "wall_s": 1.0}


def _results(ctx, acc, steps=None, ratios=None):
    """acc / steps / ratios: {arm: per-seed list} (arms not given: none's values)."""
    extra = {}
    for arm in C6.ARMS:
        for i, seed in enumerate(ctx.seeds):
            a = acc.get(arm, acc["none"])[i]
            s = (steps or {}).get(arm, (steps or {}).get("none", [200] * len(ctx.seeds)))[i]
            r = (ratios or {}).get(arm, (1e-6, 1e-7))
            extra[Results.key(C6._config(ctx, "lstm", arm, seed))] = _result(a, s, r)
    return Results(None, extra)


NONE = [90.0, 91.0, 89.0, 90.0, 92.0]


def _shift(values, d):
    return [v + x for v, x in zip(values, d if isinstance(d, list) else [d] * len(values))]


def _parts(res):
    return {k: p["verdict"] for k, p in res["parts"].items()}


def test_everything_as_the_article_says_is_supported():
    ctx = _ctx()
    res = C6.decide(ctx, _results(ctx, {"none": NONE, "horizontal": _shift(NONE, -6), "per_step_g0.1": _shift(NONE, -5)},
                                  ratios={"horizontal": (50.0, 3.0)}))
    assert _parts(res) == {"vertical is fine": "supported", "horizontal hurts": "supported",
                           "because gradients explode": "supported"}
    assert res["verdict"] == "supported"
    assert res["effect"] == pytest.approx(6.0)


def test_naive_horizontal_hurts_but_cooijmans_does_not_is_partly_supported():
    ctx = _ctx()
    res = C6.decide(ctx, _results(ctx, {"none": NONE, "horizontal": _shift(NONE, -4)}, ratios={"horizontal": (5.0, 2.0)}))
    assert _parts(res) == {"vertical is fine": "supported", "horizontal hurts": "partly supported",
                           "because gradients explode": "inconclusive"}
    assert res["verdict"] == "partly supported"


def test_the_article_wrong_on_every_part_is_refuted():
    ctx = _ctx()
    res = C6.decide(ctx, _results(ctx, {"none": NONE, "vertical": _shift(NONE, -8)},
                                  steps={"none": [200] * 5, "vertical": [400] * 5},
                                  ratios={"horizontal": (0.01, 0.001)}))
    assert _parts(res) == {"vertical is fine": "refuted", "horizontal hurts": "refuted",
                           "because gradients explode": "refuted"}
    assert res["verdict"] == "refuted"


def test_noisy_arms_are_inconclusive():
    ctx = _ctx()
    acc = {"none": NONE, "vertical": _shift(NONE, [-6, 2, -2, -5, 1]), "horizontal": _shift(NONE, [4, -1, 3, -2, 0]),
           "per_step_g0.1": _shift(NONE, -3)}
    res = C6.decide(ctx, _results(ctx, acc, ratios={"horizontal": (3.0, 0.5)}))
    assert _parts(res) == {"vertical is fine": "inconclusive", "horizontal hurts": "inconclusive",
                           "because gradients explode": "inconclusive"}
    assert res["verdict"] == "inconclusive"


def test_vertical_that_is_as_accurate_but_slower_is_not_fine():
    ctx = _ctx()
    res = C6.decide(ctx, _results(ctx, {"none": NONE}, steps={"none": [200] * 5, "vertical": [260] * 5}))
    assert _parts(res)["vertical is fine"] == "refuted"
    res = C6.decide(ctx, _results(ctx, {"none": NONE}, steps={"none": [200] * 5, "vertical": [215] * 5}))
    assert _parts(res)["vertical is fine"] == "supported"  # within the 1.1x tolerance


def test_exploding_ratio_needs_the_plain_lstm_below_one():
    ctx = _ctx()
    res = C6.decide(ctx, _results(ctx, {"none": NONE}, ratios={"horizontal": (50.0, 3.0), "none": (2.0, 1e-3)}))
    assert _parts(res)["because gradients explode"] == "inconclusive"


def test_three_seeds_need_all_three_in_the_direction():
    ctx = _ctx(seeds=[0, 1, 2])
    res = C6.decide(ctx, _results(ctx, {"none": NONE[:3], "horizontal": _shift(NONE[:3], [-6, -6, 1]),
                                         "per_step_g0.1": _shift(NONE[:3], -5)}))
    assert _parts(res)["horizontal hurts"] == "inconclusive"


def test_decision_carries_effect_interval_rule_tables_and_findings():
    ctx = _ctx()
    res = C6.decide(ctx, _results(ctx, {"none": NONE, "horizontal": _shift(NONE, -4)}))
    assert res["verdict"] in VERDICTS
    assert len(res["per_seed"]) == 5 and res["ci"][0] <= res["effect"] <= res["ci"][1]
    assert "2 points" in res["rule"] and res["tables"] and res["findings"]
    for p in res["parts"].values():
        assert p["verdict"] in VERDICTS and p["rule"] and "why" in p


def test_plan_covers_every_arm_seed_and_cell_and_fits_the_budget():
    quick, full = _ctx("quick", [0, 1, 2]), _ctx("full")
    pq, pf = C6.plan(quick, Results(None)), C6.plan(full, Results(None))
    assert len(pq.runs) == 6 * 3 and len(pf.runs) == 6 * 5 * 2
    assert {r.config["norm"] for r in pq.runs} == {"none", "vertical", "horizontal", "per_timestep", "layer"}
    assert {r.config["gamma_init"] for r in pq.runs if r.config["norm"] == "per_timestep"} == {1.0, 0.1}
    assert all(r.config["task"] == "rnn" and r.config["dataset"] == "digits" for r in pq.runs)
    # estimated one-core seconds over 2 workers: the claim's budget (3 and 15 minutes)
    assert sum(r.cost for r in pq.runs) / 2 <= 180
    assert sum(r.cost for r in pf.runs) / 2 <= 900


def test_dataset_option_switches_to_mnist1d_sequences():
    ctx = _ctx("quick", [0])
    ctx.dataset = "mnist1d"
    assert {r.config["dataset"] for r in C6.plan(ctx, Results(None)).runs} == {"mnist1d"}


def test_a_tiny_real_run_decides_and_plots(tmp_path):
    ctx = _ctx("tiny", [0])
    plan = C6.plan(ctx, Results(None))
    results = Results(None)
    for r in plan.runs:
        out = run_task(r.config)
        assert 0 <= out["test_acc"] <= 1 and len(out["grad_init"]) == 2
        assert all(math.isfinite(g["ratio"]) for g in out["grad_init"])
        results.add(Results.key(r.config), out)
    res = C6.decide(ctx, results)
    assert res["verdict"] in VERDICTS and set(res["parts"]) == set(C6.RULES)
    paths = C6.plots(ctx, results, str(tmp_path))
    assert paths and all(p.exists() and p.stat().st_size > 0 for p, _ in paths)
