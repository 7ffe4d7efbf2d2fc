"""Each claim's decide() on synthetic result sets that must give each verdict."""

import pytest

from bnlab.lab.claims import c2_speed as c2
from bnlab.lab.claims import c4_regularization as c4

from .conftest import SyntheticResults, context


# ---------------------------------------------------------------- C2
def c2_results(steps):
    """steps[(act, norm)] -> steps to target (None: censored); BN per-step time = plain's."""
    def make(cfg):
        act, norm = cfg["model"]["act"], cfg["model"]["norm"]
        if cfg["data"]["val_fraction"]:
            return {"members": [{"seed": m["seed"], "lr": m["lr"],
                                 "curve": {"step": [5, 10], "val_acc": [0.5, 0.9 if m["lr"] == 0.1 else 0.6]}}
                                for m in cfg["members"]]}
        m = cfg["members"][0]
        n = steps[(act, norm)]
        t = None if n is None else n * 0.001
        return {"members": [{"seed": m["seed"], "lr": m["lr"], "steps_to_target": n, "time_to_target": t,
                             "curve": {"step": [5, n or 2000], "time": [0.005, (n or 2000) * 0.001],
                                       "test_acc": [0.5, 0.96 if n else 0.5]}}]}
    return SyntheticResults(make)


@pytest.mark.parametrize("sig,relu,verdict", [
    ((1000, 100, 110), (200, 50, 60), "supported"),
    ((1000, 100, 110), (50, 50, 50), "supported"),  # the ReLU net is reported, not decisive
    ((100, 150, 150), (50, 20, 20), "refuted"),
    ((100, 80, 80), (50, 40, 40), "inconclusive"),
    ((None, 100, 100), (50, 45, 45), "supported"),  # a censored plain arm still counts, at the cap
])
def test_c2_decide_gives_each_verdict(sig, relu, verdict):
    steps = {}
    for act, (p, b, n) in (("sigmoid", sig), ("relu", relu)):
        steps[(act, "none")], steps[(act, "batch")], steps[(act, "noisy")] = p, b, n
    d = c2.decide(context(c2), c2_results(steps))
    assert d["verdict"] == verdict
    assert any(f.startswith("relu net (reported, not decisive)") for f in d["findings"])
    assert any("ICS" in f for f in d["findings"])
    assert d["metrics"]["relu"]["per_net_rule"] in ("supported", "refuted", "inconclusive")


def test_c2_needs_the_wall_clock_win_too():
    steps = {("sigmoid", "none"): 1000, ("sigmoid", "batch"): 100, ("sigmoid", "noisy"): 100,
             ("relu", "none"): 1000, ("relu", "batch"): 100, ("relu", "noisy"): 100}
    res = c2_results(steps)
    make = res.make

    def slow_bn(cfg):  # BN reaches the target in fewer steps but 20x the time per step
        r = make(cfg)
        m = r["members"][0]
        if cfg["model"]["norm"] == "batch" and m.get("time_to_target") is not None:
            m["time_to_target"] *= 20
        return r
    d = c2.decide(context(c2), SyntheticResults(slow_bn))
    assert d["verdict"] == "inconclusive"


# ---------------------------------------------------------------- C4
def c4_results(gap, acc, nll):
    """gap/acc/nll[norm] -> function of dropout p (points / fraction / nats)."""
    def make(cfg):
        norm = cfg["model"]["norm"]
        out = []
        for m in cfg["members"]:
            p = m["dropout"]
            wobble = 0.001 * m["seed"]
            test = acc[norm](p) + wobble
            out.append({"seed": m["seed"], "dropout": p, "lr": m["lr"], "test_acc": test,
                        "train_acc": min(1.0, test + gap[norm](p) / 100), "test_nll": nll[norm]})
        return {"members": out}
    return SyntheticResults(make)


def _flat(v):
    return lambda p: v


@pytest.mark.parametrize("gaps,accs,nlls,verdict", [
    ({"none": _flat(10), "batch": _flat(7), "frozen-stats": _flat(9.5), "ghost": _flat(6)},
     {"none": lambda p: 0.80 + 0.02 * p, "batch": _flat(0.81), "frozen-stats": _flat(0.8), "ghost": _flat(0.8)},
     {"none": 1.0, "batch": 0.9, "frozen-stats": 0.95, "ghost": 0.9}, "supported"),
    ({"none": _flat(7), "batch": _flat(7.5), "frozen-stats": _flat(7.2), "ghost": _flat(7)},
     {k: _flat(0.8) for k in ("none", "batch", "frozen-stats", "ghost")},
     {"none": 1.0, "batch": 1.0, "frozen-stats": 1.0, "ghost": 1.0}, "refuted"),
    ({"none": _flat(10), "batch": _flat(7), "frozen-stats": _flat(7.5), "ghost": _flat(6)},
     {k: _flat(0.8) for k in ("none", "batch", "frozen-stats", "ghost")},
     {"none": 1.0, "batch": 0.9, "frozen-stats": 0.9, "ghost": 0.9}, "inconclusive"),  # frozen as good: not the noise
])
def test_c4_decide_gives_each_verdict(gaps, accs, nlls, verdict):
    d = c4.decide(context(c4), c4_results(gaps, accs, nlls))
    assert d["verdict"] == verdict
    assert len(d["per_seed"]) == 5
