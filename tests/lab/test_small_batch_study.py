"""F1, the small-batch study (bnlab.lab.findings.f1_small_batch): its runs and their paired
comparisons on synthetic results, and a tiny study end to end through `bnlab audit` and
`bnlab report` (same store as the claims, "Beyond the claims" in the report with its plot and
tables)."""

from __future__ import annotations

import base64
import json
import sqlite3

import numpy as np
import pytest

from bnlab.cli import main
from bnlab.lab import findings
from bnlab.lab.findings import f1_small_batch as F1

from .conftest import SyntheticResults, context


def test_registered_as_a_finding_in_the_full_profile_only():
    assert findings.get("F1") is F1 and "F1" in findings.ids()
    assert findings.runs_in("full") == ["F1"] and "F1" not in findings.runs_in("quick")
    assert len(F1.PROFILES["full"]["seeds"]) >= 10 and F1.PROFILES["full"]["batches"] == [2, 4, 8, 32]


def test_plan_makes_one_run_per_arm_and_batch_and_ghost_at_batch_32_is_bns_run():
    ctx = context(F1, "full")
    plan = F1.plan(ctx, SyntheticResults(lambda c: None))
    cells = {(r.config["model"]["norm"], r.config["batch"], json.dumps(r.config["model"]["norm_args"], sort_keys=True))
             for r in plan.runs}
    assert len(plan.runs) == len(cells) == 4 * 4 + 3  # batch, renorm, group, layer x 4; ghost at 2, 4, 8
    ghosts = sorted(r.config["model"]["norm_args"]["virtual_batch_size"] for r in plan.runs
                    if r.config["model"]["norm"] == "ghost")
    assert ghosts == [2, 4, 8] and all(r.config["batch"] == 32 for r in plan.runs if r.config["model"]["norm"] == "ghost")
    for r in plan.runs:
        c = r.config
        assert c["model"]["arch"] == "cnn" and c["optim"] == {"kind": "sgd", "momentum": 0.9}
        assert [m["seed"] for m in c["members"]] == list(range(10))
        assert all(m["lr"] == pytest.approx(0.1 * c["batch"] / 32) for m in c["members"])  # linear scaling
        if c["model"]["norm"] == "renorm":
            steps = 12 * (1347 // c["batch"])
            hold, r_end, d_end = c["model"]["norm_args"]["warmup_steps"]
            assert (hold, r_end, d_end) == (round(0.05 * steps), round(0.4 * steps), round(0.25 * steps))
            assert c["model"]["norm_args"]["r_max"] == 3.0 and c["model"]["norm_args"]["d_max"] == 5.0


def _synthetic(effects: dict, noise: float = 0.3):
    """Test accuracy = 90 + effects[(norm, column batch)] + seed noise (paired: the same noise for
    every arm of a seed at a batch size)."""

    def make(cfg):
        norm, tb = cfg["model"]["norm"], cfg["batch"]
        col = cfg["model"]["norm_args"].get("virtual_batch_size", tb)
        members = []
        for m in cfg["members"]:
            rng = np.random.default_rng([m["seed"], col])
            acc = 90 + effects.get((norm, col), 0.0) + noise * rng.standard_normal() + 0.05 * rng.standard_normal()
            members.append({"seed": m["seed"], "test_acc": acc / 100})
        return {"members": members}

    return SyntheticResults(make)


def test_decide_reads_paired_differences_against_bn():
    ctx = context(F1, "full")
    effects = {("batch", 2): -8.0, ("batch", 4): -3.0, ("renorm", 2): -2.0, ("renorm", 4): -3.0,
               ("group", 2): 0.0, ("group", 4): 0.0, ("group", 8): 0.0, ("group", 32): 0.0,
               ("layer", 2): -12.0, ("ghost", 2): -7.9}
    out = F1.decide(ctx, _synthetic(effects))
    by = {(c["arm"], c["against"], c["batch"]): c for c in out["comparisons"]}
    renorm2 = by[("renorm", "BN", 2)]
    assert renorm2["effect"] == pytest.approx(6.0, abs=0.2) and renorm2["reading"] == "above BN"
    assert renorm2["interval"]["low"] > 0 and renorm2["n"] == 10 and renorm2["sign"] == "10/10"
    assert by[("layer", "BN", 2)]["reading"] == "below BN"
    assert by[("renorm", "BN", 4)]["reading"] == "no clear difference"  # equal on average
    assert ("ghost", "BN", 32) not in by  # ghost at batch 32 is BN's run: no comparison with itself
    assert by[("batch", "batch 32", 2)]["reading"] == "below batch 32"
    assert out["findings"][0].startswith("BN at batch 2 against batch 32: -8.") and "(below batch 32;" in out["findings"][0]
    assert out["summary"].startswith("At batch 2 the highest mean test accuracy is GroupNorm's")
    titles = [t["title"] for t in out["tables"]]
    assert titles[0].startswith("Test accuracy % (mean ± sd over 10 seeds)")
    diff = out["tables"][1]
    assert diff["columns"] == ["normalization", "batch 2", "batch 4", "batch 8", "batch 32"]
    assert diff["rows"][0][0] == "ghost BN" and diff["rows"][0][-1] == "= BN (the same run)"
    bn2 = out["metrics"]["test_acc"]["batch"]["2"]
    assert len(bn2) == 10 and np.mean(bn2) == pytest.approx(82.0, abs=0.5)
    ghost32 = out["metrics"]["test_acc"]["ghost"]["32"]
    assert ghost32 == out["metrics"]["test_acc"]["batch"]["32"]  # read from BN's run


def test_paired_readings():
    assert F1.paired([1.0, 2.0, 1.5], [0, 1, 2], "BN")["reading"] == "above BN"
    assert F1.paired([-1.0, -2.0, -1.5], [0, 1, 2], "BN")["reading"] == "below BN"
    assert F1.paired([-1.0, 2.0, 0.1], [0, 1, 2], "BN")["reading"] == "no clear difference"
    one = F1.paired([1.0, None], [0, 1], "BN")
    assert one["reading"] == "too few seeds for an interval" and one["n"] == 1 and one["interval"] is None


class _Images:
    def __init__(self, html: str):
        self.srcs = [s.split('"', 1)[0] for s in html.split('src="')[1:]]


def test_tiny_study_runs_decides_and_renders(tmp_path):
    store = tmp_path / "store.sqlite"
    args = ["--profile", "tiny", "--claims", "F1", "--store", str(store), "--no-progress", "--workers", "0"]
    assert main(["audit", *args, "--out", str(tmp_path / "r1")]) == 0
    res = json.loads((tmp_path / "r1" / "results.json").read_text())
    assert res["claims"] == {}
    f = res["findings"]["F1"]
    assert f["status"] == "decided", f.get("why")
    assert f["runs"] == 9 and f["compute_s"] > 0  # 5 arms x batches 8 and 32, ghost at 32 being BN's run
    assert [t["columns"][0] for t in f["tables"]] == ["normalization"] * 3 + ["normalization"]
    assert f["tables"][0]["columns"] == ["normalization", "batch 8", "batch 32"]
    assert len(f["tables"][0]["rows"]) == 5
    plot = tmp_path / "r1" / f["plots"][0]["file"]
    assert plot.exists() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the runs are in the same store as the claims' (one table, keyed by config and code)
    with sqlite3.connect(store) as db:
        tasks = [r[0] for r in db.execute("SELECT task FROM runs")]
    assert tasks == ["classify"] * 9
    md = (tmp_path / "r1" / "report.md").read_text()
    assert "## Beyond the claims" in md and "### F1 - small batches" in md
    assert "| normalization | batch 8 | batch 32 |" in md and "](plots/f1_small_batch.png)" in md
    html = (tmp_path / "r1" / "report.html").read_text()
    assert 'id="beyond"' in html and "Beyond the claims" in html and 'id="F1"' in html
    images = [s for s in _Images(html).srcs if s.startswith("data:image/png;base64,")]
    assert base64.b64decode(images[-1].split(",", 1)[1]) == plot.read_bytes()  # the plot, embedded
    assert "<th>batch 8</th>" in html and "Paired difference from BN" in html
    runs = [json.loads(x) for x in (tmp_path / "r1" / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 9 and {r["claim"] for r in runs} == {"F1"}
    # bnlab report rebuilds it from the store alone, with the same numbers
    assert main(["report", "--profile", "tiny", "--claims", "F1", "--store", str(store), "--out", str(tmp_path / "r2")]) == 0
    again = json.loads((tmp_path / "r2" / "results.json").read_text())["findings"]["F1"]
    assert again["tables"] == f["tables"] and again["comparisons"] == f["comparisons"]


def _ctxs(*argv):
    from bnlab.cli import build_parser
    from bnlab.lab import audit

    return audit.contexts(build_parser().parse_args(["audit", *argv]))


def test_which_audits_run_it():
    from bnlab.lab.audit import AuditError

    assert "F1" in _ctxs("--profile", "full") and "F1" not in _ctxs("--profile", "quick")
    only = _ctxs("--profile", "tiny", "--claims", "F1", "--seeds", "3,4", "--set", "F1.epochs=2")
    assert list(only) == ["F1"] and only["F1"].seeds == [3, 4] and only["F1"].settings["epochs"] == 2
    assert "F1" not in _ctxs("--profile", "full", "--dataset", "mnist1d")  # a 1-D data set: not for its CNN
    with pytest.raises(AuditError, match=r"F1 runs on digits, mnist, fashion-mnist, cifar10 \(got --dataset mnist1d\)"):
        _ctxs("--profile", "tiny", "--claims", "F1", "--dataset", "mnist1d")
    with pytest.raises(AuditError, match=r"F1 has no profile 'quick'"):
        _ctxs("--profile", "quick", "--claims", "F1")
    with pytest.raises(AuditError, match=r"F1.norms.*"):
        _ctxs("--profile", "tiny", "--claims", "F1", "--set", 'F1.norms=["batch","instance"]')
