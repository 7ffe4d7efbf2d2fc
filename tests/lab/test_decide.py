"""Each claim's decide() on synthetic result sets that must give each verdict."""

import pytest

from bnlab.lab.claims import c4_regularization as c4

from .conftest import SyntheticResults, context


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
