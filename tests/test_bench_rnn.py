"""The recurrent benchmark's bookkeeping: alternating order, noise bands, targets (not timings)."""

import mmap
from types import SimpleNamespace

import bnlab.bench_rnn as BR


def test_rounds_alternate_the_order_and_time_every_model_once_a_round(monkeypatch):
    calls = []
    monkeypatch.setattr(BR, "_step", lambda m, x: calls.append(m))
    times = BR.time_rounds({"a": "A", "b": "B", "c": "C"}, None, repeats=4, warmup=1, settle=0)
    assert calls[:3] == ["A", "B", "C"]  # warm-up
    assert calls[3:] == ["A", "B", "C", "C", "B", "A", "A", "B", "C", "C", "B", "A"]
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}


def test_each_timed_call_follows_an_untimed_call_of_the_same_model(monkeypatch):
    # the timed call of "b" is slow only when another model ran right before it: with settle=1 every
    # timed call follows one of its own, so no model's time depends on the order
    state = {"last": None}
    clock = {"t": 0.0}

    def step(m, x):
        clock["t"] += 1.0 if state["last"] not in (None, m) else 0.5
        state["last"] = m

    monkeypatch.setattr(BR, "_step", step)
    monkeypatch.setattr(BR.time, "perf_counter", lambda: clock["t"])
    calls = []
    monkeypatch.setattr(BR, "_step", lambda m, x: (calls.append(m), step(m, x)))
    times = BR.time_rounds({"a": "A", "b": "B"}, None, repeats=4, warmup=0, settle=1)
    assert calls == ["A", "A", "B", "B", "B", "B", "A", "A"] * 2
    assert times == {"a": [0.5] * 4, "b": [0.5] * 4}
    calls.clear()
    times = BR.time_rounds({"a": "A", "b": "B"}, None, repeats=4, warmup=0, settle=0)
    assert calls == ["A", "B", "B", "A"] * 2
    assert times["b"] == [1.0, 0.5, 1.0, 0.5]  # after another model, then after itself


def test_rounds_count_each_calls_page_faults(monkeypatch):
    def step(m, x):
        if m == "maps":  # 2 MiB of fresh anonymous pages, each written: 512 first-touch faults
            buf = mmap.mmap(-1, 2 << 20)
            for off in range(0, len(buf), mmap.PAGESIZE):
                buf[off] = 1
            buf.close()

    monkeypatch.setattr(BR, "_step", step)
    flt = {}
    times = BR.time_rounds({"quiet": "quiet", "maps": "maps"}, None, repeats=5, warmup=1, faults=flt)
    assert set(flt) == set(times) and all(len(v) == 5 for v in flt.values())
    assert all(v >= 512 for v in flt["maps"]), flt["maps"]
    assert max(flt["quiet"]) < 64, flt["quiet"]


def test_without_a_fault_count_the_rows_say_so(monkeypatch):
    monkeypatch.setattr(BR, "_step", lambda m, x: None)
    monkeypatch.setattr(BR, "minor_faults", lambda: None)
    flt = {}
    BR.time_rounds({"a": "A"}, None, repeats=2, warmup=0, faults=flt)
    assert flt == {}
    row = {"kind": "LSTM", "shape": "s", "lengths": "equal", "name": "BNLSTM layer", "norm": "layer", "ms": 1.0,
           "torch_ms": 1.0, "ratio": 1.0, "ratio_iqr": [1.0, 1.0], "target": 1.3, "ok": True, "faults": None,
           "torch_faults": None}
    assert BR.format_table({"threads": 2, "repeats": 20, "rows": [row]}).splitlines()[-1].endswith(">=0.77 ok")


def test_band_is_the_quartiles_of_the_per_round_ratios():
    assert BR._band([2.0, 2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 4.0, 1.0, 2.0]) == [1.0, 2.0]
    assert BR._band([3.0], [1.5]) == [2.0, 2.0]


def test_the_suite_reports_every_mode_with_its_band_and_the_issue_targets(monkeypatch):
    monkeypatch.setattr(BR, "SHAPES", ({"batch": 8, "steps": 4, "input": 3, "hidden": 8, "layers": 1},))
    res = BR.run_rnn_suite(SimpleNamespace(repeats=3, threads=1, quick=True))
    assert BR.TARGETS["none"] == 1.0 and BR.TARGETS["vertical"] == 1.1
    rows = [r for r in res["rows"] if r["norm"] not in ("torch", BR.FLOOR)]
    assert {r["norm"] for r in rows} == set(BR.TARGETS) and {r["lengths"] for r in rows} == {"equal", "packed"}
    floor = [r for r in res["rows"] if r["norm"] == BR.FLOOR]
    assert len(floor) == 2 and all(r["target"] is None and r["ok"] is None and r["ratio"] > 0 for r in floor)
    assert res["settle"] == 1
    for r in rows:
        lo, hi = r["ratio_iqr"]
        assert 0 < lo <= hi and r["ratio"] > 0
        assert r["target"] == BR.TARGETS[r["norm"]] and r["ok"] == (r["ratio"] >= 1.0 / r["target"])
        assert r["faults"] >= 0 and r["torch_faults"] >= 0
    table = BR.format_table(res)
    assert "order alternating" in table and "noise band" in table and "page faults" in table
    flt = f"{rows[0]['faults']:.0f}/{rows[0]['torch_faults']:.0f}"
    assert any(rows[0]["name"] in line and flt in line for line in table.splitlines())
    assert sum(line.count("[") for line in table.splitlines()[2:]) == len(rows) + len(floor)  # every band


def test_status_tells_a_miss_from_noise_and_never_counts_noise_as_met():
    assert BR.status(0.80, [0.75, 0.85], 0.77) == "ok"
    assert BR.status(0.77, [0.70, 0.74], 0.77) == "ok"  # the median on the bar: met
    assert BR.status(0.99, [0.96, 1.05], 1.0) == "within noise"
    assert BR.status(0.75, [0.70, 0.77], 0.77) == "within noise"
    assert BR.status(0.67, [0.64, 0.71], 0.77) == "MISSED"
    assert BR.status(0.67, None, 0.77) == "MISSED"
    assert BR.status(0.5, [0.4, 0.6], None) is None


def test_the_table_prints_each_rows_status(monkeypatch):
    rows = [{"kind": "LSTM", "shape": "s", "lengths": "equal", "name": f"BNLSTM {n}", "norm": n, "ms": 1.0,
             "torch_ms": 1.0, "ratio": r, "ratio_iqr": band, "target": BR.TARGETS[n], "ok": r >= 1 / BR.TARGETS[n]}
            for n, r, band in (("none", 0.99, [0.96, 1.05]), ("vertical", 0.95, [0.9, 1.0]),
                               ("layer", 0.6, [0.55, 0.65]))]
    table = BR.format_table({"threads": 2, "repeats": 20, "rows": rows}).splitlines()
    assert table[-3].endswith(">=1.00 within noise") and table[-2].endswith(">=0.91 ok")
    assert table[-1].endswith(">=0.77 MISSED")
