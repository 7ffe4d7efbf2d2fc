"""C5 under rules version 2: three parts decided alone (sigmoid, relu, gamma_beta_only), the
combined verdicts, the degenerate case (arms at chance), the v1 verdict beside it, and seed sets."""

import pytest

from bnlab.lab.claims import c5_affine as c5
from bnlab.lab.config import Context

from .conftest import SyntheticResults, context


def c5_results(acc):
    """acc(act, arm, seed) -> test accuracy, arm in affine/no-affine/gamma/beta/plain/gb-only/control."""
    inv = {v: k for k, v in c5.ARM_AFFINE.items()}

    def make(cfg):
        model = cfg["model"]
        out = []
        for m in cfg["members"]:
            if cfg["trainable"] == "norm_affine":
                arm = "gb-only"
            elif cfg["trainable"] == "random_hidden":
                arm = "control"
            elif model["norm"] == "none":
                arm = "plain"
            else:
                arm = inv[m["affine"]]
            out.append(dict({"seed": m["seed"], "lr": m["lr"], "test_acc": acc(model["act"], arm, m["seed"]),
                             "identity_share": 0.05},
                            **({"affine": m["affine"]} if "affine" in m else {})))
        return {"members": out}
    return SyntheticResults(make)


NOISE = [0.0, 0.004, -0.003, 0.002, -0.001, 0.003, -0.002, 0.001, 0.0, -0.004]


def arms(sig, relu, gb, control, noise=0.002):
    """sig/relu: affine's gain over no-affine (fraction); gb/control: sub-test accuracies. Each seed
    wobbles by up to ``noise`` (as a fraction) around that, arm by arm."""
    def acc(act, arm, s):
        w = noise * NOISE[s % 10] / 0.004
        if arm == "gb-only":
            return gb + w
        if arm == "control":
            return control - w
        if arm == "plain":
            return 0.95
        gain = sig if act == "sigmoid" else relu
        return 0.96 + (gain + w if arm == "affine" else 0.0)
    return acc


@pytest.mark.parametrize("acc,verdicts,verdict", [
    (arms(0.02, 0.02, 0.6, 0.3), ("supported", "supported", "supported"), "supported"),
    (arms(0.0, -0.01, 0.31, 0.30), ("refuted", "refuted", "refuted"), "refuted"),
    (arms(0.006, 0.006, 0.38, 0.30, noise=0.03), ("inconclusive",) * 3, "inconclusive"),
    (arms(0.02, 0.0, 0.6, 0.3), ("supported", "refuted", "supported"), "partly supported"),
    (arms(-0.03, 0.006, 0.30, 0.30, noise=0.03), ("refuted", "inconclusive", "refuted"), "partly refuted"),
])
def test_c5_decide_gives_each_verdict(acc, verdicts, verdict):
    d = c5.decide(context(c5), c5_results(acc))
    assert list(d["parts"]) == ["sigmoid", "relu", "gamma_beta_only"]
    assert tuple(p["verdict"] for p in d["parts"].values()) == verdicts, d["why"]
    assert d["verdict"] == verdict
    for name, p in d["parts"].items():
        assert p["n"] == 5 and p["interval"]["method"] == "t" and p["rule_version"] == 2
        assert p["sign"].endswith("/5") and p["p_wilcoxon"] is not None and p["degenerate"] is None
        assert p["delta"] == (10.0 if name == "gamma_beta_only" else 0.5)
        assert p["sensitivity"] == {}  # no threshold in these rules
    assert any("Identity diagnostic (sigmoid" in f for f in d["findings"])
    assert any(f.startswith("relu net, each arm minus affine") and "plain" in f.lower() for f in d["findings"])


def test_c5_helps_is_refuted_by_its_own_difference_not_by_the_subtest():
    d = c5.decide(context(c5), c5_results(arms(-0.01, -0.01, 0.6, 0.3)))
    assert d["parts"]["sigmoid"]["verdict"] == "refuted" and d["parts"]["gamma_beta_only"]["verdict"] == "supported"
    assert d["verdict"] == "partly supported"


def test_c5_arms_at_chance_are_degenerate():
    def acc(act, arm, s):
        if arm in ("gb-only", "control"):
            return 0.10 + 0.001 * s
        return arms(0.02, 0.02, 0, 0)(act, arm, s)
    d = c5.decide(context(c5), c5_results(acc))
    p = d["parts"]["gamma_beta_only"]
    assert p["verdict"] == "inconclusive" and "at chance" in p["degenerate"]
    assert d["parts"]["sigmoid"]["verdict"] == "supported" and d["verdict"] == "partly supported"


def test_c5_diverged_runs_count_at_chance():
    def acc(act, arm, s):
        return None if arm in ("gb-only", "control") else arms(0.02, 0.02, 0, 0)(act, arm, s)
    d = c5.decide(context(c5), c5_results(acc))
    assert "at chance" in d["parts"]["gamma_beta_only"]["degenerate"]


def test_c5_a_part_missing_from_the_settings_is_degenerate_not_dropped():
    s = dict(c5.PROFILES["quick"], acts=["relu"])
    ctx = Context(profile="quick", seeds=[0, 1, 2, 3, 4], settings=s)
    d = c5.decide(ctx, c5_results(arms(0.02, 0.02, 0.6, 0.3)))
    assert list(d["parts"]) == ["sigmoid", "relu", "gamma_beta_only"]
    assert d["parts"]["sigmoid"]["verdict"] == "inconclusive" and d["parts"]["sigmoid"]["degenerate"]
    assert d["verdict"] == "partly supported"


def test_c5_decide_v1_keeps_the_v1_rule():
    assert c5.decide_v1(context(c5), c5_results(arms(0.02, 0.0, 0.6, 0.3)))["verdict"] == "supported"
    assert c5.decide_v1(context(c5), c5_results(arms(-0.005, -0.002, 0.32, 0.30)))["verdict"] == "refuted"
    assert c5.decide_v1(context(c5), c5_results(arms(0.02, 0.0, 0.35, 0.30)))["verdict"] == "inconclusive"
    assert [r["version"] for r in c5.RULES] == [1, 2] and c5.RULES[0]["text"] == c5.RULE_V1
    assert c5.RULES[1]["reason"] and c5.DATASETS == ["digits", "mnist1d"]


def test_c5_profiles_have_the_v2_seeds():
    assert c5.PROFILES["quick"]["seeds"] == [0, 1, 2, 3, 4]
    assert c5.PROFILES["full"]["seeds"] == list(range(10))
    assert len(c5.PROFILES["tiny"]["seeds"]) >= 2


def test_c5_one_run_per_arm_and_seed_set():
    s = c5.PROFILES["full"]
    ctx = Context(profile="full", seeds=list(range(10)), settings=s, seed_sets=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    runs = c5.plan(ctx, c5_results(arms(0.02, 0.02, 0.6, 0.3))).runs
    assert len(runs) == 2 * (2 * 2 + 2)  # per set: (BN arms, plain) x 2 activations + 2 sub-test arms
    sets = sorted({tuple(sorted({m["seed"] for m in r.config["members"]})) for r in runs})
    assert sets == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    d = c5.decide(ctx, c5_results(arms(0.02, 0.02, 0.6, 0.3)))
    assert all(p["n"] == 10 for p in d["parts"].values())
    assert [x["seed"] for x in d["parts"]["relu"]["per_seed"]] == list(range(10))
    cell = Context(profile="full", seeds=[5, 6, 7, 8, 9], settings=s, selection_seed=0)
    assert {str(r.config) for r in c5.plan(cell, None).runs} <= {str(r.config) for r in runs}


def test_c5_tiny_audit_end_to_end_forces_the_degenerate_case(tmp_path):
    """One step at a negligible rate: every arm stays at chance, so every part is degenerate."""
    import json

    from bnlab.cli import main

    assert main(["audit", "--profile", "tiny", "--claims", "C5", "--workers", "1", "--no-progress",
                 "--set", "C5.steps=1", "--set", "C5.lr=1e-06", "--store", str(tmp_path / "s.sqlite"),
                 "--out", str(tmp_path / "out")]) == 0
    c = json.loads((tmp_path / "out" / "results.json").read_text())["claims"]["C5"]
    assert c["status"] == "decided" and c["verdict"] == "inconclusive"
    assert all("at chance" in (p["degenerate"] or "") for p in c["parts"].values())
