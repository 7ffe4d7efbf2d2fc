"""The recurrent benchmark's bookkeeping: alternating order, noise bands, targets (not timings)."""

from types import SimpleNamespace

import bnlab.bench_rnn as BR


def test_rounds_alternate_the_order_and_time_every_model_once_a_round(monkeypatch):
    calls = []
    monkeypatch.setattr(BR, "_step", lambda m, x: calls.append(m))
    times = BR.time_rounds({"a": "A", "b": "B", "c": "C"}, None, repeats=4, warmup=1)
    assert calls[:3] == ["A", "B", "C"]  # warm-up
    assert calls[3:] == ["A", "B", "C", "C", "B", "A", "A", "B", "C", "C", "B", "A"]
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}


def test_band_is_the_quartiles_of_the_per_round_ratios():
    assert BR._band([2.0, 2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 4.0, 1.0, 2.0]) == [1.0, 2.0]
    assert BR._band([3.0], [1.5]) == [2.0, 2.0]


def test_the_suite_reports_every_mode_with_its_band_and_the_issue_targets(monkeypatch):
    monkeypatch.setattr(BR, "SHAPES", ({"batch": 8, "steps": 4, "input": 3, "hidden": 8, "layers": 1},))
    res = BR.run_rnn_suite(SimpleNamespace(repeats=3, threads=1, quick=True))
    assert BR.TARGETS["none"] == 1.0 and BR.TARGETS["vertical"] == 1.1
    rows = [r for r in res["rows"] if r["norm"] != "torch"]
    assert {r["norm"] for r in rows} == set(BR.TARGETS) and {r["lengths"] for r in rows} == {"equal", "packed"}
    for r in rows:
        lo, hi = r["ratio_iqr"]
        assert 0 < lo <= hi and r["ratio"] > 0
        assert r["target"] == BR.TARGETS[r["norm"]] and r["ok"] == (r["ratio"] >= 1.0 / r["target"])
    table = BR.format_table(res)
    assert "order alternating" in table and "noise band" in table
    assert sum(line.count("[") for line in table.splitlines()[2:]) == len(rows)
