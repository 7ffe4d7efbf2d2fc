"""The report (lab/report.py): results.json carries every decision key for every claim and part,
the HTML opens with the forest plot and shows the verdict table, the robustness matrix (with "not
robust" where cells disagree), the history table and the sensitivity table; the forest plot puts
linear and log effects on one axis "effect / claimed size"; the terminal table shows parts."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from bnlab.lab import report, stats

REQUIRED = ("verdict", "effect", "effect_units", "delta", "n", "interval", "p_wilcoxon", "sign", "degenerate",
            "rule_version", "sensitivity")
SEEDS = list(range(10))
DATE_V1, DATE_V2 = "2026-11-25", "2026-12-01"


def _noise(mean, sd, seed, n=10):
    rng = np.random.default_rng(seed)
    return list(mean + sd * rng.standard_normal(n))


def _sens(verdicts, thresholds):
    return {"sensitivity": dict(zip(("stricter", "default", "looser"), verdicts)),
            "extra": {"thresholds": dict(zip(("stricter", "default", "looser"), thresholds))}}


def _entry(cid, title, decision, v1, reason, robustness=None, plots=()):
    e = {"id": cid, "title": title, "claim": f"The claim {cid} asserts something about batch normalization.",
         "sources": ["Ioffe & Szegedy 2015 (arXiv 1502.03167)"], "protocol_changes": [],
         "seeds": SEEDS, "seed_sets": [SEEDS[:5], SEEDS[5:]], "settings": {"steps": 100},
         "command": f"bnlab audit --profile full --claims {cid}", "runs": 40, "compute_s": 12.5,
         "run_keys": [], "status": "decided", "doc": "protocol", "plots": list(plots)}
    e.update(decision)
    e["history"] = [
        {"version": 1, "date": DATE_V1, "verdict": v1, "why": "v1 rule on the v2 runs", "text": "rule v1 text"},
        {"version": 2, "date": DATE_V2, "verdict": decision["verdict"], "why": decision.get("why", ""),
         "text": "rule v2 text", "reason": reason}]
    if robustness is not None:
        e["robustness"] = robustness
    return e


def _cells(claim_verdicts, part_verdicts=None, datasets=("digits", "mnist1d")):
    """Robustness cells in the order digits A, digits B, mnist1d A, mnist1d B."""
    cells, i = [], 0
    for ds in datasets:
        for ss, seeds in (("A", SEEDS[:5]), ("B", SEEDS[5:])):
            parts = {k: v[i] for k, v in (part_verdicts or {}).items()}
            cells.append({"dataset": ds, "seed_set": ss, "seeds": seeds, "verdict": claim_verdicts[i],
                          "parts": parts, "status": "decided"})
            i += 1
    verdicts = {c["verdict"] for c in cells}
    unstable = [k for k, v in (part_verdicts or {}).items() if len(set(v)) > 1]
    robust = len(verdicts) == 1 and not unstable
    summary = (f"robust: {cells[0]['verdict']} in all {len(cells)} cells" if robust else
               "not robust: " + "; ".join(f"{c['dataset']}/{c['seed_set']} {c['verdict']}" for c in cells))
    return {"cells": cells, "robust": robust, "summary": summary}


def synthetic_claims(plot_dir=None) -> dict:
    """Six claim entries shaped as decide_all makes them: parts, a degenerate part, log-scale parts,
    a non-inferiority part (negative margin), history, and robustness with a disagreeing cell."""
    plots = []
    if plot_dir is not None:
        from bnlab.lab.plots import figure, save
        fig, ax = figure()
        ax[0, 0].plot([1, 2, 3], [1, 4, 9])
        plots = [(str(save(fig, plot_dir / "c1_demo.png", "demo")), "a demo plot")]
    out = {}

    grid = "grid steps of max stable lr (BN - plain)"
    mlp = stats.part([3, 2, 3, 4, 2, 3, 3, 2, 3, 4], 2, units=grid, seeds=SEEDS, label="MLP on mnist1d",
                     **_sens(["supported", "supported", "supported"], ["loss < 0.8 ln 10", "loss < 0.9 ln 10",
                                                                       "loss < 1.0 ln 10"]))
    conv = stats.part([1, 0, 1, 2, 1, 0, 1, 1, 2, 1], 2, units=grid, seeds=SEEDS, label="conv net on digits",
                      **_sens(["refuted", "refuted", "inconclusive"], ["loss < 0.8 ln 10", "loss < 0.9 ln 10",
                                                                       "loss < 1.0 ln 10"]))
    out["C1"] = _entry("C1", "BN allows much higher learning rates",
                       stats.claim({"mlp": mlp, "conv": conv}, rule="d_s = grid index difference, delta 2"),
                       "supported", "v1's ratio threshold caught only half of the grid's one-step pairs",
                       _cells(["partly supported", "partly supported", "supported", "partly supported"],
                              {"mlp": ["supported"] * 4, "conv": ["refuted", "refuted", "supported", "refuted"]}),
                       plots)

    ratio = "ratio of steps to 95% (plain / BN)"
    sig = stats.part([math.log(x) for x in _noise(3.0, 0.4, 1)], math.log(2), units=ratio, seeds=SEEDS, log=True,
                     label="Ioffe replica (sigmoid)",
                     **_sens(["supported", "supported", "supported"], ["target 97%", "target 95%", "target 90%"]))
    relu = stats.part([None] * 6 + [0.1, -0.2, 0.0, 0.1], math.log(2), units=ratio, seeds=SEEDS, log=True,
                      label="ReLU net", degenerate="both arms censored at the cap in 6 of 10 seeds",
                      **_sens(["inconclusive"] * 3, ["target 97%", "target 95%", "target 90%"]))
    out["C2"] = _entry("C2", "BN speeds up training",
                       stats.claim({"sigmoid": sig, "relu": relu}, rule="d_s = log(plain steps / BN steps)"),
                       "supported", "v1 decided on the sigmoid net alone after the ReLU net's verdict flipped",
                       _cells(["partly supported"] * 3 + ["inconclusive"],
                              {"sigmoid": ["supported"] * 3 + ["inconclusive"], "relu": ["inconclusive"] * 4}))

    area = stats.part(_noise(0.22, 0.15, 3), 0.25, units="share of the (depth, init scale) grid", seeds=SEEDS,
                      label="BN's trainable area minus plain's",
                      **_sens(["inconclusive", "inconclusive", "supported"], ["trained: 90% of the way from "
                              "chance to best", "trained: 80% of the way", "trained: 70% of the way"]))
    out["C3"] = _entry("C3", "BN makes weights easier to initialize, especially in deeper networks",
                       stats.claim({"area": area}, rule="default rule on the paired area difference, delta 0.25"),
                       "refuted", "v1's absolute 80% threshold cannot be reached on mnist1d",
                       _cells(["inconclusive"] * 4))

    gap = stats.part(_noise(-0.4, 1.2, 4), 1.0, units="points of generalization gap (plain - BN)", seeds=SEEDS,
                     label="BN narrows the gap")
    dose = stats.part(_noise(0.15, 0.3, 5), 0.2, units="Spearman rho (ghost batch size vs gap)", seeds=SEEDS,
                      label="through batch noise (dose-response)",
                      decide=lambda e, lo, hi, d: "supported" if lo > 0 else ("refuted" if hi < d else "inconclusive"))
    drop = stats.part([], 1.0, units="points", seeds=[], label="so less dropout is needed",
                      degenerate="plain's best dropout is p = 0 in this profile: (c) is not evaluated")
    out["C4"] = _entry("C4", "BN reduces overfitting a little, like dropout, so less dropout is needed",
                       stats.claim({"gap": gap, "noise": dose, "dropout": drop}, rule="parts (a)-(c)"),
                       "inconclusive", "v1's frozen-statistics control was confounded",
                       _cells(["partly refuted"] * 2, {"gap": ["refuted"] * 2, "noise": ["inconclusive"] * 2,
                                                       "dropout": ["inconclusive"] * 2}, datasets=("mnist1d",)))

    pts = "points of test accuracy"
    a = stats.part(_noise(-0.3, 0.5, 6), 0.5, units=pts, seeds=SEEDS, label="affine helps the sigmoid net")
    b = stats.part(_noise(-0.1, 0.3, 7), 0.5, units=pts, seeds=SEEDS, label="affine helps the ReLU net")
    c = stats.part(_noise(35.0, 6.0, 8), 10.0, units=pts, seeds=SEEDS, label="gamma/beta alone can train")
    out["C5"] = _entry("C5", "the learned scale and shift (gamma, beta) add flexibility and help",
                       stats.claim({"sigmoid": a, "relu": b, "gamma_beta_only": c}, rule="parts (a)-(c)"),
                       "partly supported", "v2 decides each part by its own paired difference",
                       _cells(["partly supported"] * 2, {"sigmoid": ["refuted"] * 2, "relu": ["refuted"] * 2,
                                                         "gamma_beta_only": ["supported"] * 2}, datasets=("digits",)))

    vert = stats.part(_noise(0.3, 0.6, 9), -1.0, units=pts, seeds=SEEDS, label="vertical is fine (non-inferiority)",
                      decide=lambda e, lo, hi, d: "supported" if lo > d else ("refuted" if hi < d else "inconclusive"))
    horiz = stats.part(_noise(-1.5, 1.0, 10), 2.0, units=pts + " (none - horizontal)", seeds=SEEDS,
                       label="naive horizontal hurts")
    coo = stats.part(_noise(-0.4, 0.8, 11), 2.0, units=pts + " (none - per-time-step)", seeds=SEEDS,
                     label="horizontal hurts however done")
    expl = stats.part(_noise(18.0, 4.0, 12), math.log(10), units="growth ratio of ||dL/dh_t|| (naive / control)",
                      seeds=SEEDS, log=True, label="because gradients explode")
    out["C6"] = _entry("C6", 'BN is bad for RNNs: fine "vertically", harmful "horizontally"',
                       stats.claim({"vertical": vert, "horizontal": horiz, "cooijmans": coo, "explode": expl},
                                   rule="parts (a)-(d)"),
                       "refuted", "v1's gradient ratio counted the first steps, where h_0 = 0",
                       _cells(["partly supported"] * 4))
    return out


class _Fake:
    def records(self, keys):
        return [{"config": {"k": k}, "result": {}, "wall_s": 1.0} for k in keys]


PROV = {"generated": "2026-12-01 12:00:00 +0000", "profile": "full", "code_revision": "abc+dirty",
        "machine": {"load_average_1_5_15min": [1.0, 1.0, 1.0]},
        "wall_time": {"per_claim": {"C1": {"compute_s": 12.5}}, "this_invocation_s": 30.0, "executed": 3,
                      "from_store": 0}}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    claims = synthetic_claims(out / "plots")
    report.write_report(out, claims, PROV, _Fake())
    return out, claims


class _Sections(HTMLParser):
    """Text per <section id=...> and every <img> with the section it is in."""

    def __init__(self):
        super().__init__()
        self.stack, self.text, self.images = [], {}, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.stack.append(a.get("id"))
            self.text.setdefault(a.get("id"), "")
        if tag == "img":
            self.images.append((self.stack[-1] if self.stack else None, a.get("src", ""), a.get("alt", "")))

    def handle_endtag(self, tag):
        if tag == "section" and self.stack:
            self.stack.pop()

    def handle_data(self, data):
        if self.stack:
            self.text[self.stack[-1]] += data


def _parse(out):
    p = _Sections()
    p.feed((out / "report.html").read_text())
    return p


def test_results_json_has_every_decision_key_for_every_claim_and_part(written):
    out, claims = written
    res = json.loads((out / "results.json").read_text())
    assert set(res["claims"]) == set(claims)
    nparts = 0
    for cid, c in res["claims"].items():
        for k in REQUIRED + ("parts",):
            assert k in c, (cid, k)
        assert c["rule_version"] == 2
        assert c["parts"] or cid == "C3", cid
        for name, p in (c["parts"] or {"": c}).items():
            nparts += 1
            for k in REQUIRED:
                assert k in p, (cid, name, k)
            assert isinstance(p["sensitivity"], dict)
            if p["degenerate"] is None:
                assert set(p["interval"]) >= {"low", "high", "level", "method"}
                assert p["interval"]["low"] <= p["effect"] <= p["interval"]["high"]
                assert re.fullmatch(r"\d+/\d+", p["sign"])
    assert nparts == 2 + 2 + 1 + 3 + 3 + 4
    assert res["claims"]["C2"]["parts"]["relu"]["degenerate"].startswith("both arms censored")
    assert res["claims"]["C2"]["parts"]["relu"]["verdict"] == "inconclusive"
    assert res["claims"]["C1"]["parts"]["mlp"]["sensitivity"] == {"stricter": "supported", "default": "supported",
                                                                   "looser": "supported"}
    # the one-part claim carries its numbers at the top level and parts = null
    assert res["claims"]["C3"]["effect"] is not None and res["claims"]["C3"]["n"] == 10
    # robustness at the top level, history per claim; runs.jsonl and provenance kept
    assert set(res["robustness"]) == set(claims)
    assert res["robustness"]["C2"]["robust"] is False
    assert [h["version"] for h in res["claims"]["C1"]["history"]] == [1, 2]
    assert res["provenance"]["profile"] == "full"
    assert (out / "runs.jsonl").exists()
    assert (out / res["summary_plot"]["file"]).exists()


def test_one_part_claim_has_parts_null(tmp_path):
    claims = {"C3": synthetic_claims()["C3"]}
    res = report.results_json(claims, PROV, tmp_path)
    c = res["claims"]["C3"]
    assert c["parts"] is None and all(k in c for k in REQUIRED)
    assert "robustness" in res  # C3 has cells


def test_undecided_claims_still_carry_every_key(tmp_path):
    claims = {"C1": {"id": "C1", "title": "t", "claim": "c", "sources": [], "protocol_changes": [], "seeds": [0, 1],
                     "settings": {}, "command": "x", "runs": 3, "compute_s": 0.0, "status": "incomplete",
                     "verdict": "incomplete", "why": "3 runs not in the store"},
              "C2": {"id": "C2", "title": "t2", "claim": "c", "sources": [], "protocol_changes": [], "seeds": [0, 1],
                     "settings": {}, "command": "x", "runs": 0, "compute_s": 0.0, "status": "error",
                     "verdict": "error", "why": "Traceback ...\nValueError: boom"}}
    report.write_report(tmp_path, claims, PROV, _Fake())
    res = json.loads((tmp_path / "results.json").read_text())
    for c in res["claims"].values():
        assert all(k in c for k in REQUIRED + ("parts",))
        assert c["effect"] is None and c["interval"] is None and c["parts"] is None
    assert "robustness" not in res  # only with robustness cells (the full profile)
    html = _parse(tmp_path)
    assert "Robustness is checked in the full profile" in html.text["robustness"]


def test_html_opens_with_the_forest_plot_and_embeds_every_image(written):
    out, claims = written
    p = _parse(out)
    sections = [s for s in p.text]
    assert sections[:5] == ["summary", "verdicts", "robustness", "history", "sensitivity"]
    first = p.images[0]
    assert first[0] == "summary" and "forest plot" in first[2]
    for _, src, _ in p.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(p.images) == 1 + sum(len(c["plots"]) for c in claims.values())
    assert "http://" not in (out / "report.html").read_text() and "https://" not in (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert md.startswith("# bnlab audit report") and "plots/summary_forest.png" in md


def test_verdict_table_has_parts_and_degenerate_reason(written):
    out, _ = written
    t = _parse(out).text["verdicts"]
    for word in ("Wilcoxon p", "degenerate", "MLP on mnist1d", "both arms censored at the cap in 6 of 10 seeds",
                 "partly supported", "partly refuted"):
        assert word in t, word


def test_robustness_matrix_says_not_robust_where_cells_disagree(written):
    out, claims = written
    t = _parse(out).text["robustness"]
    assert "not robust" in t
    m = report.robustness_matrix(claims)
    assert [(c["dataset"], c["seed_set"]) for c in m["columns"]] == [("digits", "A"), ("digits", "B"),
                                                                      ("mnist1d", "A"), ("mnist1d", "B")]
    rows = {(r["claim"], r["kind"], r["label"]): r for r in m["rows"]}
    c2 = rows[("C2", "claim", "C2  BN speeds up training")]
    assert c2["robust"] is False and [x["differs"] for x in c2["cells"]] == [False, False, False, True]
    assert rows[("C3", "claim", "C3  BN makes weights easier to initialize, especially in deeper networks")]["robust"]
    conv = next(r for r in m["rows"] if r["claim"] == "C1" and r["kind"] == "part" and r["label"].startswith("conv"))
    assert conv["robust"] is False
    c5 = next(r for r in m["rows"] if r["claim"] == "C5" and r["kind"] == "claim")
    assert c5["cells"][2] is None and c5["robust"] is True  # digits only: mnist1d cells are not run
    md = (out / "report.md").read_text()
    assert "**not robust**" in md


def test_history_table_shows_both_versions_dates_and_reason(written):
    out, _ = written
    t = _parse(out).text["history"]
    for word in ("rules v1", "rules v2", DATE_V1, DATE_V2, "v1 decided on the sigmoid net alone"):
        assert word in t, word
    versions, rows = report.history_rows(synthetic_claims())
    assert versions == [1, 2]
    c2 = next(r for r in rows if r["claim"] == "C2")
    assert [h["verdict"] for h in c2["cells"]] == ["supported", "partly supported"] and c2["changed"]


def test_sensitivity_table_shows_verdicts_and_threshold_texts(written):
    out, _ = written
    t = _parse(out).text["sensitivity"]
    for word in ("stricter", "default", "looser", "target 97%", "loss < 1.0 ln 10", "no threshold in this rule"):
        assert word in t, word


def test_forest_normalization_linear_and_log():
    lin = stats.part([1.0, 3.0, 5.0, 3.0], 2.0, units="u", seeds=[0, 1, 2, 3])
    logp = stats.part([math.log(x) for x in (2.0, 8.0, 4.0, 4.0)], math.log(2.0), units="ratio", seeds=[0, 1, 2, 3],
                      log=True)
    neg = stats.part([0.2, 0.8, 0.5, 0.5], -1.0, units="points", seeds=[0, 1, 2, 3])
    deg = stats.part([None, None, 0.1, None], 2.0, units="u", seeds=[0, 1, 2, 3], degenerate="all censored")
    claims = {"CX": {"title": "x", "verdict": "partly supported",
                     **{"parts": {"lin": lin, "log": logp, "neg": neg, "deg": deg}}}}
    rows = {r["label"]: r for r in report.forest_rows(claims)}
    assert rows["CX  x"]["kind"] == "claim" and rows["CX  x"]["x"] is None
    r = rows["lin"]
    assert r["x"] == pytest.approx(3.0 / 2.0)
    assert r["x_low"] == pytest.approx(lin["interval"]["low"] / 2.0)
    assert r["x_high"] == pytest.approx(lin["interval"]["high"] / 2.0)
    assert r["delta_x"] == 1.0
    r = rows["log"]
    # geometric mean 4 against a claimed ratio of 2: log 4 / log 2 = 2
    assert logp["effect"] == pytest.approx(4.0)
    assert r["x"] == pytest.approx(2.0)
    assert r["x_low"] == pytest.approx(math.log(logp["interval"]["low"]) / math.log(2.0))
    assert r["x_high"] == pytest.approx(math.log(logp["interval"]["high"]) / math.log(2.0))
    assert r["delta_x"] == 1.0
    # a claimed margin below no effect (non-inferiority): scaled by |delta|, the margin sits at -1
    assert rows["neg"]["x"] == pytest.approx(0.5) and rows["neg"]["delta_x"] == -1.0
    assert rows["deg"]["degenerate"] == "all censored" and rows["deg"]["verdict"] == "inconclusive"
    assert "degenerate" not in rows["lin"]["raw"] and rows["lin"]["units"] == "u" and "n = 4" in rows["lin"]["raw"]
    # the raw effect as measured is printed at the right
    assert rows["log"]["raw"].startswith("4 [")
    assert report.common_scale(1.0, 2.0, "log") == 0.0
    assert report.common_scale(0.0, 0.0) is None and report.common_scale(1.0, 1.0, "log") is None
    assert report.common_scale(None, 2.0) is None


def test_forest_plot_draws_every_row(tmp_path):
    claims = synthetic_claims()
    path = report.summary_plot(claims, tmp_path)
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = report.forest_rows(claims)
    assert len(rows) == sum(1 + len(c["parts"] or {}) if c.get("parts") else 1 for c in claims.values())


def test_terminal_table_shows_parts_with_effect_interval_and_n():
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=220, color_system=None)
    claims = synthetic_claims()
    claims["C7"] = {"title": "undecided", "verdict": "incomplete", "status": "incomplete",
                    "why": "3 runs not in the store"}
    report.terminal_table(claims, console)
    text = buf.getvalue()
    mlp = claims["C1"]["parts"]["mlp"]
    line = next(x for x in text.splitlines() if "MLP on mnist1d" in x)
    assert "\u251c\u2500" in line or "\u2514\u2500" in line
    assert f"{mlp['effect']:.3g} [{mlp['interval']['low']:.3g}, {mlp['interval']['high']:.3g}]" in line
    assert line.rstrip(" |\u2502").endswith("10")
    assert "degenerate: both arms censored" in text
    assert "partly supported" in text and "3 runs not in the store" in text
