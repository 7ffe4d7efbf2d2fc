"""`bnlab audit` / `bnlab report` end to end on the tiny profile: verdicts, report files, a second
audit that executes nothing, re-rendering from the store, and resuming after kill -9."""

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bnlab.cli import main
from bnlab.lab import claims as registry
from bnlab.lab.protocol import VERDICTS


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.external = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        for k in ("src", "href"):
            if a.get(k, "").startswith(("http:", "https:", "//")):
                self.external.append(a[k])


def _audit(tmp, out, *extra):
    return main(["audit", "--profile", "tiny", "--store", str(tmp / "store.sqlite"), "--out", str(tmp / out),
                 "--no-progress", *extra])


@pytest.fixture(scope="module")
def tiny_audit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    assert _audit(tmp, "r1", "--workers", "2") == 0
    return tmp


def _claims(path):
    return json.loads((path / "results.json").read_text())["claims"]


def test_tiny_audit_decides_every_claim_and_writes_the_report(tiny_audit):
    out = tiny_audit / "r1"
    res = json.loads((out / "results.json").read_text())
    assert set(res["claims"]) == set(registry.ids())
    for cid, c in res["claims"].items():
        assert c["status"] == "decided", (cid, c.get("why"))
        assert c["verdict"] in VERDICTS
        for k in ("effect", "rule", "per_seed", "interval", "history"):
            assert k in c, (cid, k)
    prov = res["provenance"]
    for k in ("versions", "code_revision", "seeds", "machine", "wall_time", "budgets"):
        assert k in prov
    assert prov["wall_time"]["executed"] > 0 and set(prov["wall_time"]["per_claim"]) == set(res["claims"])
    assert (out / "report.md").read_text().startswith("# bnlab audit report")
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert runs and all({"config", "result", "wall_s", "claim"} <= set(r) for r in runs)


def test_the_html_report_parses_and_embeds_every_plot(tiny_audit):
    out = tiny_audit / "r1"
    parser = _Images()
    parser.feed((out / "report.html").read_text())
    plots = [p for c in _claims(out).values() for p in c["plots"]]
    plots += [p for f in json.loads((out / "results.json").read_text()).get("findings", {}).values() for p in f["plots"]]
    assert len(plots) >= 5 and len(parser.images) == len(plots) + 1  # + the summary forest plot
    assert not parser.external
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_audit_executes_nothing_and_rebuilds_the_same_report(tiny_audit):
    assert _audit(tiny_audit, "r2") == 0
    r1, r2 = tiny_audit / "r1", tiny_audit / "r2"
    prov = json.loads((r2 / "results.json").read_text())["provenance"]
    assert prov["wall_time"]["executed"] == 0 and prov["wall_time"]["from_store"] > 0
    assert _claims(r1) == _claims(r2)
    for png in (r1 / "plots").iterdir():
        assert png.read_bytes() == (r2 / "plots" / png.name).read_bytes()
    assert main(["report", "--profile", "tiny", "--store", str(tiny_audit / "store.sqlite"),
                 "--out", str(tiny_audit / "r3")]) == 0
    assert _claims(tiny_audit / "r3") == _claims(r1)


def test_report_marks_claims_it_cannot_decide_from_the_store(tiny_audit):
    assert main(["report", "--profile", "tiny", "--seeds", "7", "--claims", "C1", "--store",
                 str(tiny_audit / "store.sqlite"), "--out", str(tiny_audit / "r4")]) == 0
    c = _claims(tiny_audit / "r4")["C1"]
    assert c["verdict"] == "incomplete" and "not in the store" in c["why"]


def test_bad_arguments_are_refused_with_a_message(tmp_path, capsys):
    assert _audit(tmp_path, "x", "--claims", "C99") == 2
    assert "unknown claim 'C99'" in capsys.readouterr().err
    assert _audit(tmp_path, "x", "--claims", "C1", "--set", "C1.stepz=3") == 2
    assert "unknown setting 'stepz'" in capsys.readouterr().err
    assert _audit(tmp_path, "x", "--claims", "C1", "--seeds", "a,b") == 2
    assert main(["report", "--store", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "y")]) == 2


def _rows(store):
    if not store.exists():
        return {}
    try:
        with sqlite3.connect(store, timeout=5) as db:
            return dict(db.execute("SELECT key, finished FROM runs"))
    except sqlite3.OperationalError:
        return {}


def test_an_audit_killed_with_sigkill_resumes_without_rerunning_finished_runs(tmp_path):
    store = tmp_path / "store.sqlite"
    args = ["audit", "--profile", "tiny", "--claims", "C3", "--workers", "1", "--set", "C3.steps=300",
            "--store", str(store), "--no-progress"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "bnlab.cli", *args, "--out", str(tmp_path / "killed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and len(_rows(store)) < 2 and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = _rows(store)
    assert proc.returncode == -signal.SIGKILL and len(before) >= 2
    assert main([*args, "--out", str(tmp_path / "resumed")]) == 0
    after = _rows(store)
    total = len(after)
    assert len(before) < total  # it was killed mid-audit
    wall = json.loads((tmp_path / "resumed" / "results.json").read_text())["provenance"]["wall_time"]
    assert wall["from_store"] == len(before) and wall["executed"] == total - len(before)
    assert all(after[k] == v for k, v in before.items())  # the finished runs were not executed again
    assert _claims(tmp_path / "resumed")["C3"]["status"] == "decided"


def test_dataset_replaces_a_claims_data_with_idx_files_from_data_dir(tmp_path):
    import struct

    import numpy as np

    d = tmp_path / "data"
    d.mkdir()
    rng = np.random.default_rng(0)
    for stem, arr in (("train-images-idx3-ubyte", rng.integers(0, 256, (200, 28, 28))),
                      ("train-labels-idx1-ubyte", np.arange(200) % 10),
                      ("t10k-images-idx3-ubyte", rng.integers(0, 256, (50, 28, 28))),
                      ("t10k-labels-idx1-ubyte", np.arange(50) % 10)):
        head = bytes([0, 0, 8, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
        (d / stem).write_bytes(head + arr.astype(np.uint8).tobytes())
    assert _audit(tmp_path, "r", "--claims", "C1", "--dataset", "mnist", "--data-dir", str(tmp_path / "data")) == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["claims"]["C1"]["status"] == "decided"
    cfgs = [json.loads(line)["config"] for line in (tmp_path / "r" / "runs.jsonl").read_text().splitlines()]
    assert cfgs and all(c["data"]["name"] == "mnist" and c["data"]["data_dir"] == str(tmp_path / "data") for c in cfgs)
    assert all(c["data"]["source"] == cfgs[0]["data"]["source"] for c in cfgs)  # keyed by the files' contents
    assert {c["model"]["arch"] for c in cfgs} == {"mlp", "cnn"}  # MNIST holds images: both C1 testbeds run on it


def test_a_claim_that_cannot_plan_is_reported_and_the_others_still_decide(tmp_path, monkeypatch):
    def broken(ctx, results):
        raise RuntimeError("plan exploded")

    monkeypatch.setattr(registry.get("C1"), "plan", broken)
    assert _audit(tmp_path, "r", "--claims", "C1,C5", "--workers", "1") == 1
    claims = _claims(tmp_path / "r")
    assert claims["C1"]["verdict"] == "error" and "plan exploded" in claims["C1"]["why"]
    assert claims["C5"]["status"] == "decided"
    assert "plan exploded" in (tmp_path / "r" / "errors.txt").read_text()
