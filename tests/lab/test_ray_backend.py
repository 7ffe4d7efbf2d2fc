"""`bnlab audit --backend ray`: runs as Ray tasks on a local cluster give the local backend's
numbers, a killed worker's run is retried, and without Ray the flag is a clear error."""

import argparse
import glob
import os
import signal
import sys
import threading
import time

import pytest

from bnlab.cli import main
from bnlab.lab import audit
from bnlab.lab.protocol import classify_config
from bnlab.lab.runner import LocalRunner
from bnlab.lab.store import Store


def test_backend_ray_without_ray_names_the_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    store = tmp_path / "s.sqlite"
    rc = main(["audit", "--profile", "tiny", "--claims", "C5", "--backend", "ray", "--store", str(store),
               "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--backend ray needs Ray" in err and 'pip install "bnlab[ray]"' in err
    assert not store.exists()  # nothing started


@pytest.fixture(scope="module")
def ray_runner():
    pytest.importorskip("ray", reason='Ray is optional: pip install "bnlab[ray]"')
    from bnlab.lab.ray_backend import RayRunner

    runner = RayRunner(num_cpus=2)  # a local Ray instance of 2 CPUs, owned (and shut down) by the runner
    try:
        yield runner
    finally:
        runner.close()


def _metrics(result):
    """A run's result without its wall-clock timings (which differ from process to process)."""
    if isinstance(result, dict):
        return {k: _metrics(v) for k, v in result.items() if "time" not in k}
    if isinstance(result, list):
        return [_metrics(v) for v in result]
    return result


def _stored(path):
    with Store(path) as s:
        return {r["key"]: (r["result"], r["meta"]) for r in s.records()}


def test_a_tiny_audit_on_ray_stores_the_local_backends_metrics(ray_runner, tmp_path):
    args = argparse.Namespace(profile="tiny", claims="C5", seeds=None, dataset=None, data_dir=None, workers=0,
                              set=[], robustness=False)
    ctxs = audit.contexts(args)
    with Store(tmp_path / "local.sqlite") as s:
        local = audit.execute(ctxs, s, 0, progress=False)
    with Store(tmp_path / "ray.sqlite") as s:
        on_ray = audit.execute(ctxs, s, ray_runner.capacity, progress=False, runner=ray_runner)
    assert local["failed"] == {} and on_ray["failed"] == {}
    assert on_ray["executed"] == local["executed"] > 0
    a, b = _stored(tmp_path / "local.sqlite"), _stored(tmp_path / "ray.sqlite")
    assert a.keys() == b.keys()
    for key, (result, _) in a.items():
        assert _metrics(b[key][0]) == _metrics(result), key
        meta = b[key][1]
        assert meta["backend"] == "ray" and meta["threads"] == 1 and meta["numba_threads"] == 1
        assert not meta["in_process"] and meta["pid"] != os.getpid()


def _executing_ray_workers():
    """pids of Ray worker processes executing a run now (their title names the task)."""
    out = []
    for p in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(p, "rb") as f:
                cmd = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::_ray_execute"):
            out.append(int(p.split("/")[2]))
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the Ray worker through /proc")
def test_a_worker_killed_mid_run_is_retried_and_nothing_is_lost(ray_runner):
    config = classify_config(data={"name": "digits", "subset": None, "val_fraction": 0.0},
                             model={"arch": "mlp", "widths": [64, 64], "norm": "batch"}, init={"kind": "kaiming"},
                             optim={"kind": "sgd"}, batch=64, steps=300, members=[{"seed": 3, "lr": 0.1}])
    killed = []

    def kill_first():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            pids = _executing_ray_workers()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first)
    killer.start()
    ray_runner.submit("long", config)
    done = []
    while not done:
        done = ray_runner.wait()
    killer.join()
    assert killed, "no Ray worker was seen executing the run"
    (key, outcome), = done
    assert key == "long" and outcome["ok"], outcome.get("error")
    assert outcome["meta"]["pid"] != killed[0]  # a new worker ran it again
    here = LocalRunner(workers=1)  # in this process, one thread (restored on close)
    try:
        here.submit("long", config)
        (_, local), = here.wait()
    finally:
        here.close()
    assert _metrics(outcome["result"]) == _metrics(local["result"])
