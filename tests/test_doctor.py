"""bnlab.tools.doctor and `bnlab doctor`: every planted batch-norm pitfall is found at its location, clean
models give nothing, the model and the random state are left alone, exit codes 0/1/2 and --json."""

import copy
import doctest
import importlib
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab.nn as bnn
from bnlab.cli import main
from bnlab.tools import DoctorError, Finding, doctor

MODELS = textwrap.dedent('''
    import torch
    from torch import nn
    import bnlab.nn as bnn


    class Pitfalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)        # a bias right before a batch norm
            self.bn = nn.BatchNorm2d(8, momentum=0.99)       # Keras' convention
            self.drop = nn.Dropout(0.5)
            self.fc = nn.Linear(8, 16, bias=False)
            self.bn_fc = bnn.BatchNorm1d(16)                 # dropout -> linear -> batch norm
            self.cell = nn.Linear(16, 16, bias=False)
            self.bn_rec = nn.BatchNorm1d(16)                 # one layer for every time step
            self.tiny = nn.Conv2d(8, 4, 1, bias=False)
            self.bn_tiny = nn.BatchNorm2d(4)                 # after pooling to 1x1: few values per channel

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            t = self.bn_tiny(self.tiny(nn.functional.adaptive_avg_pool2d(y, 1)))
            h = self.bn_fc(self.fc(self.drop(y.mean((2, 3)))))
            for _ in range(4):
                h = torch.tanh(self.bn_rec(self.cell(h)) + h)
            return h, t


    def make():
        return Pitfalls()


    def clean():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), bnn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


    def broken():
        raise RuntimeError("no weights here")


    NOT_CALLABLE = 3
''')


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("doctor") / "models.py"
    path.write_text(MODELS)
    namespace: dict = {}
    exec(compile(MODELS, str(path), "exec"), namespace)
    return path, namespace


def _found(findings) -> set[tuple[str, str]]:
    return {(f.check, f.location) for f in findings}


def test_every_planted_pitfall_is_found_at_its_location(models):
    _, ns = models
    model = ns["make"]()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(16, 3, 8, 8)
    rng = torch.get_rng_state()
    findings = doctor(model, x)
    assert all(isinstance(f, Finding) for f in findings)
    found = _found(findings)
    assert {("bias-before-bn", "conv"), ("keras-momentum", "bn"), ("dropout-before-bn", "drop"),
            ("shared-bn", "bn_rec"), ("small-batch-statistics", "bn_tiny"), ("train-eval-gap", "bn_rec")} <= found
    assert not any(f.location in ("fc", "cell", "tiny") for f in findings)  # no bias there
    by = {(f.check, f.location): f for f in findings}
    assert by[("shared-bn", "bn_rec")].details["calls"] == 4
    assert by[("dropout-before-bn", "drop")].details == {"bn": "bn_fc", "p": 0.5, "through": ["fc"]}
    small = by[("small-batch-statistics", "bn_tiny")].details
    assert (small["batch"], small["spatial"], small["values_per_channel"]) == (16, 1, 16)
    assert by[("keras-momentum", "bn")].details["torch_equivalent"] == pytest.approx(0.01)
    assert by[("train-eval-gap", "bn_rec")].details["gap"] > 0.25
    assert "Li et al. 2019" in by[("dropout-before-bn", "drop")].message
    # the model, its mode and torch's random state are as they were
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training and torch.equal(torch.get_rng_state(), rng)


def test_clean_models_give_nothing_in_training_and_at_inference(models):
    _, ns = models
    assert doctor(ns["clean"](), torch.randn(32, 3, 8, 8)) == []
    mlp = nn.Sequential(nn.Linear(20, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                        nn.Linear(64, 32, bias=False), bnn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))
    assert doctor(mlp, torch.randn(64, 20)) == []
    with torch.no_grad():
        for _ in range(5):
            mlp(torch.randn(64, 20))
    assert doctor(mlp.eval(), torch.randn(1, 20)) == []  # inference: batch size 1 is fine in eval


def test_a_residual_use_keeps_the_bias_and_frozen_layers_keep_theirs():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            z = self.conv(x)
            return self.bn(z) + z + self.bn2(self.conv2(x))  # conv's output also feeds the sum

    model = Res()
    assert _found(doctor(model, torch.randn(32, 4, 6, 6))) == {("bias-before-bn", "conv2")}
    model.bn2.eval()  # frozen by choice while the model trains: the bias matters then
    assert doctor(model, torch.randn(32, 4, 6, 6)) == []


def test_functional_dropout_and_small_batches_of_large_images():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, bias=False)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x):
            return self.bn(self.conv(F.dropout2d(x, 0.2, training=self.training)))

    findings = doctor(Net(), torch.randn(4, 3, 10, 10))
    by = {(f.check, f.location): f for f in findings}
    assert ("dropout-before-bn", "<model> (F.dropout2d)") in by
    small = by[("small-batch-statistics", "bn")]
    assert small.details["cause"] == "batch" and small.details["values_per_channel"] == 256
    assert "batch of 4 samples" in small.message
    ghost = nn.Sequential(nn.Linear(5, 8, bias=False), bnn.GhostBatchNorm1d(8, virtual_batch_size=4))
    [f] = [f for f in doctor(ghost, torch.randn(64, 5)) if f.check == "small-batch-statistics"]
    assert f.location == "1" and "ghost batch 4" in f.message


def test_inference_mode_finds_layers_left_in_training_mode_and_missing_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4, track_running_stats=False))
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 8, 8))
    model[4].reset_running_stats()  # never trained
    model.eval()
    model[1].train()  # left in training mode
    found = _found(doctor(model, torch.randn(2, 3, 8, 8)))
    assert {("train-mode-at-inference", "1"), ("no-running-statistics", "4"),
            ("no-running-statistics", "7")} <= found
    # the same model about to train: none of these
    assert not {c for c, _ in _found(doctor(model, torch.randn(32, 3, 8, 8), mode="train"))} & {
        "train-mode-at-inference", "no-running-statistics"}


def test_a_forward_that_fails_raises_naming_the_shapes():
    with pytest.raises(DoctorError, match=r"forward failed \(training mode\) on input of shape \(4, 5\)"):
        doctor(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), torch.randn(4, 5))
    with pytest.raises(ValueError, match="mode must be"):
        doctor(nn.Linear(2, 2), torch.randn(2, 2), mode="serve")


# ----------------------------------------------------------------------------------------------
# the command


def test_cli_exit_codes_and_json(models, tmp_path, capsys, monkeypatch):
    path, _ = models
    assert main(["doctor", f"{path}:make", "--input-shape", "3,8,8", "--batch-size", "16",
                 "--json", str(tmp_path / "f.json")]) == 1
    out = capsys.readouterr().out
    assert "bias-before-bn" in out and "shared-bn" in out
    doc = json.loads((tmp_path / "f.json").read_text())
    assert doc["clean"] is False and doc["mode"] == "train" and doc["input_shapes"] == [[16, 3, 8, 8]]
    assert {"check": "shared-bn", "location": "bn_rec"}.items() <= next(
        f for f in doc["findings"] if f["check"] == "shared-bn").items()

    # a dotted module from the working directory; the input shape read from the first conv
    monkeypatch.chdir(path.parent)
    monkeypatch.syspath_prepend(str(path.parent))
    assert main(["doctor", "models:clean", "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # --json alone: stdout is JSON only
    assert doc == {"target": "models:clean", "model": "Sequential", "mode": "train",
                   "input_shapes": [[32, 3, 32, 32]], "clean": True, "findings": []}
    assert "No batch-norm pitfalls found" in captured.err


@pytest.mark.parametrize("target,message", [
    ("models:nope", r"'models' has no attribute 'nope' \(its callables: .*clean.*make"),
    ("no_such_module_xyz:make", r"cannot import module 'no_such_module_xyz'"),
    ("does/not/exist.py:make", r"no such file: 'does/not/exist.py'"),
    ("models", r"expected MODULE:FACTORY"),
    ("models:broken", r"models:broken raised RuntimeError: no weights here"),
    ("models:NOT_CALLABLE", r"is a int, not a callable"),
])
def test_cli_usage_errors_exit_2_with_a_clear_message(models, capsys, monkeypatch, target, message):
    path, _ = models
    monkeypatch.chdir(path.parent)
    monkeypatch.syspath_prepend(str(path.parent))
    assert main(["doctor", target]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert __import__("re").search(message, err), err


def test_cli_bad_input_shape_and_a_failing_forward_exit_2(models, capsys):
    path, _ = models
    assert main(["doctor", f"{path}:clean", "--input-shape", "3,x"]) == 2
    assert "--input-shape expects positive integers" in capsys.readouterr().err
    assert main(["doctor", f"{path}:clean", "--input-shape", "5,8,8"]) == 2
    assert "forward failed (training mode) on input of shape (32, 5, 8, 8)" in " ".join(capsys.readouterr().err.split())
    assert main(["doctor", f"{path}:clean", "--passes", "0"]) == 2
    assert "--passes must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["doctor", f"{path}:clean", "--mode", "serve"])
    assert e.value.code == 2


def test_the_docstring_examples_run():
    result = doctest.testmod(importlib.import_module("bnlab.tools.doctor"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
