"""Rules v2 statistics: intervals against closed forms, coverage, the default rule, parts."""

import math

import numpy as np
import pytest
from scipy import stats as st

from bnlab.lab import stats as S


def test_t_interval_matches_the_closed_form():
    v = [1.0, 2.5, 0.5, 3.0, 2.0]
    lo, hi = S.t_interval(v)
    m, se = np.mean(v), np.std(v, ddof=1) / math.sqrt(5)
    q = st.t.ppf(0.975, 4)
    assert lo == pytest.approx(m - q * se) and hi == pytest.approx(m + q * se)
    # scipy's own interval of the mean agrees
    ref = st.t.interval(0.95, 4, loc=m, scale=se)
    assert (lo, hi) == pytest.approx(ref)


def test_t_interval_is_not_min_max():
    """The v1 percentile bootstrap over 3 seeds returned about [min, max]; the t-interval is wider."""
    v = [0.4, 0.5, 0.6]
    lo, hi = S.t_interval(v)
    assert lo < 0.4 and hi > 0.6
    b = S.v1_bootstrap(v, np.mean)
    assert b[0] >= 0.4 - 1e-12 and b[1] <= 0.6 + 1e-12


def test_t_interval_coverage_with_five_seeds():
    rng = np.random.default_rng(123)
    trials, covered = 4000, 0
    for _ in range(trials):
        x = rng.normal(1.0, 2.0, size=5)
        lo, hi = S.t_interval(x)
        covered += lo <= 1.0 <= hi
    assert covered / trials >= 0.93


def test_v1_bootstrap_undercovers_with_three_seeds():
    """The reason for rules v2: [min, max]-like intervals cover the truth far less than 95%."""
    rng = np.random.default_rng(7)
    trials, covered = 400, 0
    for _ in range(trials):
        x = rng.normal(0.0, 1.0, size=3)
        lo, hi = S.v1_bootstrap(x, np.mean, resamples=500)
        covered += lo <= 0.0 <= hi
    assert covered / trials < 0.85


def test_bootstrap_only_from_twenty():
    with pytest.raises(ValueError, match="n >= 20"):
        S.bootstrap_interval(list(range(10)))
    ci, method = S.interval(list(np.linspace(0, 1, 25)))
    assert method == "percentile bootstrap" and ci[0] < 0.5 < ci[1]
    _, method = S.interval([0.0, 1.0, 2.0])
    assert method == "t"


def test_wilcoxon_and_sign_match_scipy():
    v = [0.3, -0.1, 0.8, 1.2, 0.5, 0.9]
    assert S.wilcoxon_p(v) == pytest.approx(st.wilcoxon(v).pvalue)
    assert S.sign_count(v) == "5/6"
    assert S.wilcoxon_p([0.0, 0.0]) == 1.0
    assert S.sign_count([1.0, None, float("nan"), -1.0]) == "1/2"


@pytest.mark.parametrize("values, delta, verdict", [
    ([2.0, 2.5, 3.0, 2.2, 2.8], 1.0, "supported"),      # interval above 0, effect >= delta
    ([0.0, 0.1, -0.1, 0.05, -0.05], 1.0, "refuted"),    # interval entirely below delta
    ([-2.0, -2.5, -3.0, -2.2, -2.8], 1.0, "refuted"),   # the opposite direction
    ([0.5, 2.0, -0.5, 3.0, 1.0], 1.0, "inconclusive"),  # interval spans 0 and delta
    ([0.6, 0.7, 0.8, 0.65, 0.75], 1.0, "refuted"),      # above 0 but excludes delta
    ([0.8, 1.1, 0.9, 1.0, 0.95], 1.0, "inconclusive"),  # effect just under delta, interval straddles it
])
def test_default_rule(values, delta, verdict):
    p = S.part(values, delta, units="points", seeds=range(len(values)))
    assert p["verdict"] == verdict
    assert p["n"] == len(values) and p["interval"]["method"] == "t" and p["rule_version"] == 2


def test_degenerate_is_inconclusive_with_its_reason():
    p = S.part([5.0, 5.0, 5.0], 1.0, units="x", degenerate="every run censored at the cap")
    assert p["verdict"] == "inconclusive" and p["degenerate"] == "every run censored at the cap"
    p = S.part([None, 1.0, None], 1.0, units="x")
    assert p["verdict"] == "inconclusive" and "interval needs 2" in p["degenerate"]


def test_log_part_reports_geometric_mean_ratios():
    ratios = [2.0, 4.0, 8.0]
    p = S.part(S.log_ratios(ratios, [1, 1, 1]), math.log(2), units="x", log=True)
    assert p["effect"] == pytest.approx(4.0)  # geometric mean
    assert p["delta"] == pytest.approx(2.0)
    assert p["interval"]["low"] < 4.0 < p["interval"]["high"]
    assert p["scale"] == "log"
    assert S.log_ratios([1.0, None, 0.0], [2.0, 1.0, 1.0]) == [pytest.approx(math.log(0.5)), None, None]


@pytest.mark.parametrize("vs, out", [
    (["supported", "supported"], "supported"),
    (["refuted", "refuted"], "refuted"),
    (["inconclusive", "inconclusive"], "inconclusive"),
    (["supported", "refuted"], "partly supported"),
    (["supported", "inconclusive"], "partly supported"),
    (["refuted", "inconclusive"], "partly refuted"),
])
def test_combine(vs, out):
    assert S.combine(vs) == out


def test_claim_with_parts_combines_and_keeps_sensitivity():
    a = S.part([2.0, 2.1, 2.2], 1.0, units="pts", sensitivity={"stricter": "inconclusive", "default": "supported",
                                                                 "looser": "supported"})
    b = S.part([0.0, 0.1, -0.1], 1.0, units="pts")
    c = S.claim({"a": a, "b": b})
    assert c["verdict"] == "partly supported" and set(c["parts"]) == {"a", "b"}
    assert c["sensitivity"] == {"stricter": "partly refuted", "default": "partly supported", "looser": "partly supported"}
    one = S.claim({"a": a})
    assert one["verdict"] == "supported" and one["effect"] == pytest.approx(2.1) and one["parts"] is None


def test_trained_threshold():
    thr, why = S.trained_threshold(0.1, 0.97)
    assert thr == pytest.approx(0.1 + 0.8 * 0.87) and why is None
    thr, why = S.trained_threshold(0.1, 0.15)
    assert why is not None and "nothing trained" in why


def test_a_zero_width_interval_says_the_seeds_tied_at_the_metrics_resolution():
    # every seed landed on the same grid step: the t-interval has zero width, and the verdict (the
    # rule's, unchanged) comes with a sentence saying what that width does and does not mean
    p = S.part(S.log_ratios([2.0] * 5, [1.0] * 5), math.log(1.5), units="x", log=True)
    assert p["interval"]["low"] == p["interval"]["high"] == pytest.approx(2.0)
    assert p["verdict"] == "supported"
    assert "zero width" in p["why"] and "resolution" in p["why"]
    q = S.part([1.0, 2.0, 2.0, 3.0, 2.0], 1.0, units="points")
    assert q["interval"]["low"] < q["interval"]["high"] and "zero width" not in q["why"]
