"""`bnlab bench` runs end to end on tiny settings and writes sensible JSON (structure, not speed)."""

import json
import sys

import pytest
import torch

from bnlab import bench, cli


def test_bench_quick_bn_suite_writes_json_with_positive_figures(tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--suite", "bn", "--json", str(out), "--no-progress", "--repeats", "3"]) == 0
    res = json.loads(out.read_text())
    assert res["machine"]["threads"] == 2 and res["quick"] is True
    assert res["machine"]["isa"] == bench.vector_isa()
    assert res["machine"]["isa"]["bnlab"] in ("avx512", "avx2", "other")
    assert res["machine"]["isa"]["torch"] == str(torch.backends.cpu.get_cpu_capability())
    isa = res["machine"]["isa"]
    assert bench.machine_line().endswith(f"vector instructions: bnlab {isa['bnlab']}, torch {isa['torch']}")
    bw = res["bandwidth"]
    assert bw["memory_gbs"] > 0 and bw["cache_gbs"] > 0
    rows = res["bn"]["rows"]
    assert {(r["label"], r["path"], r["pass"]) for r in rows} >= {
        ("32x256x8x8", "functional", "fwd"), ("32x256x8x8 cl", "module", "fwd+bwd"), ("1024x512", "module", "fwd+bwd")}
    for r in rows:
        for key in ("bnlab_ms", "torch_ms", "ratio", "bnlab_gbs", "torch_gbs", "mb"):
            assert r[key] > 0, (key, r)
        sizes = bench.FWD_SIZES if r["pass"] == "fwd" else bench.STEP_SIZES
        assert abs(r["bnlab_gbs"] - sizes * r["mb"] / r["bnlab_ms"]) < 1e-6 * r["bnlab_gbs"]
        assert abs(r["ratio"] - r["torch_ms"] / r["bnlab_ms"]) < 1e-9 * r["ratio"]
        if r.get("layer", "BatchNorm") == "BatchNorm":  # the noise band: quartiles of the per-round ratios
            assert 0 < r["ratio_iqr"][0] <= r["ratio_iqr"][1], r
    first = res["first_call"]
    assert "error" not in first, first
    assert first["bnlab_kernel"] is True and first["nchw"]["first_s"] > 0 and first["nchw"]["later_s"] > 0
    assert all({"what", "ratio", "need", "ok"} <= set(c) for c in res["bar"])


def test_bench_rnn_suite_is_skipped_with_a_message_when_its_module_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bnlab.bench_rnn", None)  # import raises ImportError
    out = tmp_path / "rnn.json"
    assert cli.main(["bench", "--quick", "--suite", "rnn", "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert "skipped" in res["rnn"] and "bn" not in res


def test_bench_quick_models_suite_prints_one_direction_and_writes_json(tmp_path, capsys):
    out = tmp_path / "models.json"
    assert cli.main(["bench", "--quick", "--suite", "models", "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ratio = torch time / bnlab time" in printed and "models: one training step" in printed
    res = json.loads(out.read_text())
    assert "bn" not in res and "rnn" not in res
    rows = [r for r in res["models"]["rows"] if "skipped" not in r]
    assert {r["model"] for r in rows} >= {"mlp", "resnet"}
    for r in rows:
        assert r["torch_ms"] > 0 and r["bnlab_ms"] > 0
        assert abs(r["ratio"] - r["torch_ms"] / r["bnlab_ms"]) < 1e-9 * r["ratio"]
        assert 0 < r["ratio_iqr"][0] <= r["ratio_iqr"][1], r


def test_bench_models_suite_takes_the_models_and_configurations_asked_for(tmp_path):
    out = tmp_path / "models.json"
    assert cli.main(["bench", "--quick", "--suite", "models", "--models", "mlp", "--configs", "inference,eager",
                     "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())["models"]
    assert [(r["model"], r["config"]) for r in res["rows"]] == [("mlp", "inference"), ("mlp", "eager"),
                                                                ("mlp (BN+ReLU fused)", "eager")]
    assert res["device"] == "cpu"


@pytest.mark.parametrize("argv, message", [
    (["--models", "resnet,vgg"], "expected a comma-separated list of resnet, mlp, lstm (got 'resnet,vgg')"),
    (["--configs", ""], "expected a comma-separated list of eager, channels_last"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_bench_rejects_unknown_names_saying_what_it_takes(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--suite", "models", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bench_on_cuda_is_for_the_models_suite_and_needs_a_gpu(monkeypatch):
    import torch

    with pytest.raises(SystemExit, match="--device cuda applies to --suite models only"):
        cli.main(["bench", "--suite", "rnn", "--device", "cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="torch sees no CUDA device here"):
        cli.main(["bench", "--suite", "models", "--device", "cuda"])


def test_bench_rnn_suite_prints_its_table_as_plain_text(tmp_path, capsys, monkeypatch):
    import bnlab.bench_rnn as BR

    monkeypatch.setattr(BR, "SHAPES", ({"batch": 8, "steps": 4, "input": 3, "hidden": 8, "layers": 1},))
    out = tmp_path / "rnn.json"
    assert cli.main(["bench", "--quick", "--suite", "rnn", "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "[quartiles of the per-round ratios: the noise band]" in printed  # not eaten as rich markup
    rows = json.loads(out.read_text())["rnn"]["rows"]
    assert sum(line.count("BNLSTM") for line in printed.splitlines()) == sum(r["norm"] != "torch" for r in rows)


def test_time_pair_gives_the_quartiles_of_the_per_round_ratios_as_its_noise_band(monkeypatch):
    import torch

    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    calls = {"t": 0}

    def fb(x):  # bnlab: 1 s every round
        clock[0] += 1.0

    def ft(x):  # torch: 2 s and 4 s in turn
        clock[0] += 2.0 if calls["t"] % 2 == 0 else 4.0
        calls["t"] += 1

    x = torch.zeros(1)
    sec_b, sec_t, band = bench.time_pair(fb, ft, x, x.clone(), [], [], None, repeats=4, warmup=0)
    assert (sec_b, sec_t) == (1.0, 3.0)  # the ratio of the medians is 3
    assert band == (2.0, 4.0)  # the per-round ratios are 2, 4, 2, 4


def test_a_missed_bar_is_printed_with_its_noise_band():
    import io

    from rich.console import Console

    out = io.StringIO()
    check = {"what": "1024x512 module fwd+bwd vs torch nc", "ratio": 0.84, "ratio_iqr": [0.8, 0.9], "need": 1.0,
             "ok": False}
    bench._print_report(Console(file=out, width=200), {"bar": [check]})
    printed = out.getvalue()
    assert "bar: 0/1 checks met" in printed
    assert "1024x512 module fwd+bwd vs torch nc 0.84, noise band 0.80-0.90 (need >= 1.0)" in printed


def test_bench_records_the_allocator_state_it_ran_in(tmp_path, capsys, monkeypatch):
    import bnlab.bench_rnn as BR
    from bnlab.lab import runner

    calls = []
    monkeypatch.setattr(runner, "keep_freed_memory", lambda: calls.append(1) or True)  # not this test process's malloc
    monkeypatch.setattr(BR, "SHAPES", ({"batch": 8, "steps": 4, "input": 3, "hidden": 8, "layers": 1},))
    out = tmp_path / "rnn.json"
    assert cli.main(["bench", "--quick", "--suite", "rnn", "--malloc", "kept", "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert calls == [1] and res["malloc"] == "kept" and res["rnn"]["malloc"] == "kept"
    assert "allocator: kept" in capsys.readouterr().out
    monkeypatch.setattr(runner, "keep_freed_memory", lambda: False)  # not glibc: said, not hidden
    assert bench.set_malloc("kept") == "default (kept not available: not glibc)"
    assert bench.set_malloc("default") == "default"
    with pytest.raises(ValueError, match="'default' or 'kept'"):
        bench.set_malloc("huge")
