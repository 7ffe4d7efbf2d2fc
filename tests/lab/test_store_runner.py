"""The run store, config identity, overrides, code fingerprints and the local runner."""

import pytest

from bnlab.lab import tasks
from bnlab.lab.config import apply_overrides, canonical, config_key, parse_overrides
from bnlab.lab.protocol import classify_config, pick_best
from bnlab.lab.runner import LocalRunner, execute
from bnlab.lab.store import Store


def test_a_stored_run_is_durable_and_visible_to_a_new_connection(tmp_path):
    path = tmp_path / "sub" / "store.sqlite"
    with Store(path) as s:
        s.put("k1", "classify", "fp", {"a": 1}, {"members": [1.5]}, 2.0, {"pid": 1})
    with Store(path) as s:
        assert s.get("k1") == {"members": [1.5]}
        assert s.has(["k1", "k2"]) == {"k1"}
        rec = s.get_record("k1")
        assert rec["config"] == {"a": 1} and rec["wall_s"] == 2.0 and s.count() == 1
        aid = s.begin_audit("quick", {"C1": [0]}, ["C1"], 2)
        s.end_audit(aid, 3, 4, 5.0, {"C1": 1.0}, "ok")
        assert s.audits()[-1]["executed"] == 3 and s.audits()[-1]["claim_wall"] == {"C1": 1.0}


def test_config_identity_ignores_key_order_but_not_values_or_code():
    a = {"x": 1, "y": [0.1, 2]}
    b = {"y": [0.1, 2], "x": 1}
    assert canonical(a) == canonical(b) and config_key(a, "f") == config_key(b, "f")
    assert config_key(a, "f") != config_key(a, "g")
    assert config_key(a, "f") != config_key({"x": 1, "y": [0.1, 3]}, "f")


def test_dotted_overrides_are_parsed_and_unknown_keys_rejected():
    o = parse_overrides(["C1.steps=300", "c3.depths=[2,8]", "C2.nets=relu", "C4.x.y=true"])
    assert o == {"C1": {"steps": 300}, "C3": {"depths": [2, 8]}, "C2": {"nets": "relu"}, "C4": {"x.y": True}}
    settings = {"steps": 500, "model": {"width": 4}}
    assert apply_overrides(settings, {"steps": 3, "model.width": 8}, "C1") == {"steps": 3, "model": {"width": 8}}
    assert settings["steps"] == 500
    with pytest.raises(ValueError, match=r"C1: unknown setting 'stpes'.*known keys here: model, steps"):
        apply_overrides(settings, {"stpes": 3}, "C1")
    with pytest.raises(ValueError, match="claim id"):
        parse_overrides(["steps=3"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["C1.steps"])


def test_a_task_fingerprint_changes_when_its_code_changes(tmp_path, monkeypatch):
    (tmp_path / "lab").mkdir()
    f = tmp_path / "lab" / "mytask.py"
    f.write_text("x = 1\n")
    monkeypatch.setattr(tasks, "PACKAGE_DIR", tmp_path)
    tasks.register_task("test-fp", lambda c: {}, code=("lab/mytask.py",))
    try:
        fp1 = tasks.fingerprint("test-fp")
        f.write_text("x = 2\n")
        tasks._FINGERPRINTS.clear()
        assert tasks.fingerprint("test-fp") != fp1
    finally:
        tasks._TASKS.pop("test-fp", None)
        tasks._FINGERPRINTS.clear()


def tiny_config(lr=0.1):
    return classify_config(data={"name": "digits", "subset": None, "val_fraction": 0.0},
                           model={"arch": "mlp", "widths": [8], "norm": "batch"}, init={"kind": "kaiming"},
                           optim={"kind": "sgd"}, batch=32, steps=3, members=[{"seed": 0, "lr": lr}])


def test_execute_reports_a_failing_task_instead_of_raising():
    tasks.register_task("test-boom", lambda c: 1 / 0)
    try:
        out = execute({"task": "test-boom"})
    finally:
        tasks._TASKS.pop("test-boom", None)
    assert not out["ok"] and "ZeroDivisionError" in out["error"]


def test_the_process_pool_runs_configs_in_single_threaded_workers():
    runner = LocalRunner(workers=2)
    try:
        runner.submit("a", tiny_config(0.1))
        runner.submit("b", tiny_config(0.2))
        done = {}
        while len(done) < 2:
            done.update(dict(runner.wait()))
    finally:
        runner.close()
    assert all(o["ok"] for o in done.values())
    assert all(o["meta"]["threads"] == 1 for o in done.values())
    inline = LocalRunner(workers=1)
    inline.submit("a", tiny_config(0.1))
    (key, out), = inline.wait()
    inline.close()
    assert out["result"]["members"] == done["a"]["result"]["members"]  # same config, same numbers, any process


def test_shared_protocol_helpers():
    assert pick_best({0.1: 0.9, 0.01: 0.9, 1.0: 0.5}) == 0.01  # ties to the smaller rate
    assert pick_best({0.1: float("nan"), 1.0: 0.2}) == 1.0
