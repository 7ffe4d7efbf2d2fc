"""Inputs that cannot poison the store: one random generator per member, typed and validated
claim settings (``--set``), data sets read from --data-dir checked early and keyed by their
contents, ``--workers`` recorded as what ran, the code fingerprint's numeric environment, the
restricted unpickler for CIFAR-10, and the task registry / sequence views' structure."""

import argparse
import io
import os
import pickle
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from bnlab.lab import audit, data as D, tasks
from bnlab.lab import claims as registry
from bnlab.lab.config import Context, Limit, Schema, SettingError, Settings, claim_settings, config_key
from bnlab.lab.protocol import Plan, Run, classify_config, data_spec
from bnlab.lab.store import Store
from bnlab.lab.train import train_classify

from .test_data import fake_cifar, fake_mnist


# ---------------------------------------------------------------- one generator per member
def _cfg(members, norm, arch="mlp"):
    model = {"arch": "mlp", "widths": [24, 24], "norm": norm} if arch == "mlp" else \
        {"arch": "cnn", "channels": [4, 6], "norm": norm}
    return classify_config(data={"name": "digits", "subset": None, "val_fraction": 0.0}, model=model,
                           init={"kind": "kaiming"}, optim={"kind": "sgd", "momentum": 0.9}, batch=32, steps=12,
                           members=members)


@pytest.mark.parametrize("norm,arch,dropout", [("none", "mlp", 0.3), ("noisy", "mlp", 0.0), ("noisy", "mlp", 0.3),
                                               ("noisy", "cnn", 0.2)])
def test_a_member_draws_the_same_dropout_masks_and_noise_alone_or_beside_other_members(norm, arch, dropout):
    me = {"seed": 1, "lr": 0.05, "dropout": dropout}
    others = [{"seed": 0, "lr": 0.1, "dropout": 0.5}, {"seed": 2, "lr": 0.02, "dropout": 0.0}]
    alone = train_classify(_cfg([me], norm, arch))["members"][0]
    for members, at in (([others[0], me, others[1]], 1), ([me] + others, 0)):  # any position, any neighbours
        beside = train_classify(_cfg(members, norm, arch))["members"][at]
        for k in ("train_loss", "train_acc", "test_acc", "test_nll"):
            assert beside[k] == pytest.approx(alone[k], rel=1e-6, abs=1e-9), k


def test_noise_and_masks_differ_between_seeds_and_repeat_for_one_seed():
    a = train_classify(_cfg([{"seed": 0, "lr": 0.05, "dropout": 0.3}, {"seed": 0, "lr": 0.05, "dropout": 0.3},
                             {"seed": 1, "lr": 0.05, "dropout": 0.3}], "noisy"))["members"]
    assert a[0]["train_loss"] == pytest.approx(a[1]["train_loss"], rel=1e-9)  # same seed: same draws
    assert a[0]["train_loss"] != pytest.approx(a[2]["train_loss"], rel=1e-6)


# ---------------------------------------------------------------- typed, validated settings
_BASE = {"dataset": "digits", "widths": [64, 64], "batch": 32, "steps": 300, "lr": 0.1, "lrs": [0.01, 0.1],
         "dropouts": [0.0, 0.5], "target": 0.95, "momentum": 0.9, "subset": 1000, "arms": ["plain", "bn"],
         "grad_clip": None, "stop": True, "weight_decay": 5e-4, "net": {"act": "relu", "gain": 1.0}}
PROFILES = {"tiny": dict(_BASE, seeds=[0, 1], steps=20, subset=None),
            "quick": dict(_BASE, seeds=[0, 1, 2, 3, 4]),
            "full": dict(_BASE, seeds=list(range(10)))}


def _err(overrides, limits=None, profile="quick"):
    with pytest.raises(SettingError) as e:
        claim_settings("C9", PROFILES, profile, overrides, limits)
    return str(e.value)


def test_set_values_are_checked_by_type_and_range_against_the_profile_default():
    assert _err({"steps": -5}) == "--set C9.steps=-5: expected a positive integer, got -5 (out of range)"
    assert _err({"steps": "3OO"}) == '--set C9.steps=3OO: expected a positive integer, got "3OO" (not a number)'
    assert "a float where an integer is expected" in _err({"steps": 300.5})
    assert "a float where an integer is expected" in _err({"batch": 32.0})
    assert "got true (a boolean)" in _err({"lr": True})  # bool is not a number
    assert "expected true or false, got 1 (a number)" in _err({"stop": 1})  # nor a number a bool
    assert "C9.lrs[1]: expected a positive number, got \"x\"" in _err({"lrs": [0.1, "x"]})
    assert "C9.widths[0]: expected a positive integer, got 6.5" in _err({"widths": [6.5]})
    assert "C9.arms[1]: expected a string, got 3 (a number)" in _err({"arms": ["plain", 3]})
    assert "got 0.1 (a number)" in _err({"lrs": 0.1})  # a list expected
    assert "(empty)" in _err({"lrs": []})
    assert "not a finite number" in _err({"lr": float("nan")})
    assert "expected a number in [0, 1), got 1.0" in _err({"dropouts": [0.0, 1.0]})
    assert "expected a number in (0, 1], got 95" in _err({"target": 95})
    assert "expected a number in [0, 1), got -0.9" in _err({"momentum": -0.9})
    assert "expected a number >= 0, got -1" in _err({"weight_decay": -1})
    assert "repeated items" in _err({"seeds": [0, 0, 1]})
    assert "C9.seeds[0]: expected an integer >= 0, got -1" in _err({"seeds": [-1, 2]})
    assert "--set C9.net.gain=0: expected a positive number" in _err({"net.gain": 0})
    assert "C9: unknown setting 'net.gian'" in _err({"net.gian": 2})
    assert "known keys here: arms, batch, dataset" in _err({"stpes": 3})


def test_valid_values_pass_and_numbers_are_widened_where_floats_are_expected():
    s = claim_settings("C9", PROFILES, "quick", {"steps": 50, "lr": 1, "lrs": [1, 0.5], "subset": None, "momentum": 0,
                                                 "weight_decay": 0,
                                                 "grad_clip": 0.5, "net.act": "tanh", "dropouts": [0, 0.9]})
    assert isinstance(s, Settings) and isinstance(s, dict)
    assert s["steps"] == 50 and s["lr"] == 1.0 and isinstance(s["lr"], float) and s["lrs"] == [1.0, 0.5]
    assert s["subset"] is None  # null allowed: another profile uses it
    assert s["grad_clip"] == 0.5 and s["net"] == {"act": "tanh", "gain": 1.0} and s["dropouts"] == [0.0, 0.9]
    assert PROFILES["quick"]["steps"] == 300  # the defaults stay as they are
    assert claim_settings("C9", PROFILES, "tiny") == PROFILES["tiny"]
    # the same object checks more overrides and --seeds
    assert s.schema.apply(s, {"steps": 7})["steps"] == 7
    assert s.schema.check("seeds", [3, 4]) == [3, 4]
    with pytest.raises(SettingError, match="repeated items"):
        s.schema.check("seeds", [3, 3])


def test_a_claim_declares_limits_of_its_own():
    limits = {"steps": (1, 1000), "lr": "(0, 1]", "arms": {"plain", "bn", "noisy"}, "net.act": ("relu", "tanh"),
              "grad_clip": Limit(0, None, low_open=True, kind="float", nullable=True)}
    ok = claim_settings("C9", PROFILES, "quick", {"arms": ["noisy"], "grad_clip": 2}, limits)
    assert ok["arms"] == ["noisy"] and ok["grad_clip"] == 2.0
    assert "expected an integer in [1, 1000], got 5000" in _err({"steps": 5000}, limits)
    assert "expected a number in (0, 1], got 2" in _err({"lr": 2}, limits)
    assert 'C9.arms[0]: expected one of "bn", "noisy", "plain", got "relu"' in _err({"arms": ["relu"]}, limits)
    assert 'expected one of "relu", "tanh", got "gelu"' in _err({"net.act": "gelu"}, limits)
    assert "expected a positive number or null, got \"x\"" in _err({"grad_clip": "x"}, limits)
    with pytest.raises(SettingError, match="LIMITS names unknown setting 'stpes'"):
        claim_settings("C9", PROFILES, "quick", {}, {"stpes": (1, None)})
    with pytest.raises(SettingError, match="profile 'quick' breaks the claim's LIMITS: C9.steps"):
        claim_settings("C9", PROFILES, "quick", {}, {"steps": (1, 100)})


def _fake_claim(plan=None):
    mod = types.ModuleType("c99_fake")
    mod.ID, mod.TITLE, mod.CLAIM, mod.SOURCES = "C99", "a fake claim", "nothing", []
    mod.PROFILES = PROFILES
    mod.LIMITS = {"steps": (1, 10_000)}
    mod.plan = plan or (lambda ctx, results: Plan([]))
    mod.decide = lambda ctx, results: {"verdict": "inconclusive", "why": "fake"}
    mod.plots = lambda ctx, results, outdir: []
    return mod


@pytest.fixture
def fake_claim(monkeypatch):
    def install(plan=None):
        mod = _fake_claim(plan)
        monkeypatch.setitem(registry.CLAIMS, "C99", mod)
        return mod
    return install


def _args(**kw):
    base = dict(profile="quick", claims="C99", seeds=None, dataset=None, data_dir=None, workers=2, set=[],
                store=None, out=None, no_progress=True)
    base.update(kw)
    return argparse.Namespace(**base)


def test_audit_contexts_hold_validated_settings_and_refuse_bad_set_values_before_any_run(fake_claim):
    fake_claim()
    ctx = audit.contexts(_args(set=["C99.steps=40", "C99.lrs=[0.5,1]"]))["C99"]
    assert isinstance(ctx.settings, Settings) and ctx.settings["steps"] == 40 and ctx.settings["lrs"] == [0.5, 1.0]
    for bad, msg in [("C99.batch=-5", "positive integer, got -5"), ("C99.steps=3OO", "(not a number)"),
                     ("C99.steps=20000", "in [1, 10000]"), ("C99.dropouts=[0.5,true]", "(a boolean)")]:
        with pytest.raises(audit.AuditError, match=f"--set C99.{bad.split('.', 1)[1].split('=')[0]}=.*"):
            audit.contexts(_args(set=[bad]))
        with pytest.raises(audit.AuditError) as e:
            audit.contexts(_args(set=[bad]))
        assert msg in str(e.value)


def test_the_cli_exits_before_opening_the_store_on_a_bad_set_value(fake_claim, tmp_path, capsys):
    from bnlab.cli import main

    fake_claim()
    store = tmp_path / "store.sqlite"
    assert main(["audit", "--claims", "C99", "--set", "C99.batch=-5", "--store", str(store), "--no-progress"]) == 2
    assert "--set C99.batch=-5: expected a positive integer, got -5" in capsys.readouterr().err
    assert not store.exists()


# ---------------------------------------------------------------- data sets from --data-dir
def test_a_data_dir_set_without_data_dir_or_files_fails_before_any_run(fake_claim, tmp_path, capsys):
    from bnlab.cli import main

    fake_claim()
    for name in ("mnist", "fashion-mnist", "cifar10"):
        with pytest.raises(audit.AuditError, match=f"--dataset {name}: {name} is read from files.*needs --data-dir"):
            audit.contexts(_args(dataset=name))
    (tmp_path / "empty").mkdir()
    with pytest.raises(audit.AuditError, match=r"train-images-idx3-ubyte\[\.gz\] not found"):
        audit.contexts(_args(dataset="mnist", data_dir=str(tmp_path / "empty")))
    with pytest.raises(audit.AuditError, match="data_batch_1 not found"):
        audit.contexts(_args(dataset="cifar10", data_dir=str(tmp_path / "empty")))
    with pytest.raises(audit.AuditError, match="is not a folder"):
        audit.contexts(_args(dataset="mnist", data_dir=str(tmp_path / "nowhere")))
    fake_mnist(tmp_path / "m")
    assert audit.contexts(_args(dataset="mnist", data_dir=str(tmp_path / "m")))["C99"].dataset == "mnist"
    # the same through a claim's own dataset setting
    with pytest.raises(audit.AuditError, match="C99.dataset cifar10: cifar10 is read from files.*needs --data-dir"):
        audit.contexts(_args(set=["C99.dataset=cifar10"]))
    with pytest.raises(audit.AuditError, match="C99.dataset: unknown dataset 'mnsit'"):
        audit.contexts(_args(set=["C99.dataset=mnsit"]))
    store = tmp_path / "store.sqlite"
    assert main(["audit", "--claims", "C99", "--dataset", "mnist", "--store", str(store), "--no-progress"]) == 2
    assert "needs --data-dir" in capsys.readouterr().err and not store.exists()


def _ctx(dataset=None, data_dir=None):
    return Context(profile="quick", seeds=[0], settings={}, dataset=dataset, data_dir=data_dir)


def test_the_run_key_holds_the_data_files_contents_not_their_folder(tmp_path):
    a = fake_mnist(tmp_path / "a")
    b = tmp_path / "elsewhere" / "copy"
    shutil.copytree(a, b)
    fp = tasks.fingerprint("classify")
    key = lambda d: config_key(_data_cfg(data_spec(_ctx("mnist", str(d)), "digits")), fp)  # noqa: E731
    spec = data_spec(_ctx("mnist", str(a)), "digits")
    assert spec["data_dir"] == str(a) and len(spec["source"]["files_sha256"]) == 64
    assert key(a) == key(b)  # moved files: the same run
    c = tmp_path / "gz"
    fake_mnist(c, gz=True)
    assert key(c) == key(a)  # the same data gzipped: the same run
    raw = bytearray((b / "t10k-images-idx3-ubyte").read_bytes())
    raw[-1] ^= 0xFF
    (b / "t10k-images-idx3-ubyte").write_bytes(bytes(raw))
    os.utime(b / "t10k-images-idx3-ubyte", ns=(1, 1))
    assert key(b) != key(a)  # one byte changed: another run
    # a run never trains on files other than those its key names
    with pytest.raises(D.DataError, match=r"hash to .*, not to .*they changed"):
        D.prepare(dict(spec, data_dir=str(b)), 0)
    assert D.prepare(spec, 0).x_train.shape == (20, 1, 28, 28)


def _data_cfg(spec):
    return classify_config(data=spec, model={"widths": [8]}, init={}, optim={"kind": "sgd"}, batch=8, steps=1,
                           members=[{"seed": 0, "lr": 0.1}])


def test_shipped_data_sets_are_keyed_by_their_generator_version_and_arguments(monkeypatch):
    d = data_spec(_ctx(), "digits")
    m = data_spec(_ctx(), "mnist1d", val=True)
    assert "data_dir" not in d and d["source"]["generator"] == "sklearn.datasets.load_digits"
    assert d["source"]["version"] == D._version("scikit-learn") != "absent"
    assert m["source"]["args"] == D.MNIST1D_ARGS and m["source"]["version"] == D._version("mnist1d")
    fp = tasks.fingerprint("classify")
    before = config_key(_data_cfg(m), fp)
    monkeypatch.setattr(D, "_version", lambda dist: "9.9")
    assert config_key(_data_cfg(data_spec(_ctx(), "mnist1d", val=True)), fp) != before


def test_mnist1d_arguments_are_the_generators_own_defaults():
    from mnist1d.data import get_dataset_args

    defaults = {k: v for k, v in vars(get_dataset_args()).items() if k != "url"}
    assert defaults == D.MNIST1D_ARGS


# ---------------------------------------------------------------- --workers is what ran
def test_workers_0_is_recorded_as_the_one_in_process_worker_that_ran(fake_claim, tmp_path, monkeypatch):
    cfg = classify_config(data={"name": "digits", "subset": None, "val_fraction": 0.0},
                          model={"arch": "mlp", "widths": [8], "norm": "batch"}, init={"kind": "kaiming"},
                          optim={"kind": "sgd"}, batch=32, steps=2, members=[{"seed": 0, "lr": 0.1}],
                          timing={"workers": None})

    def plan(ctx, results):
        return Plan([Run(dict(cfg, timing={"workers": ctx.workers}), cost=1.0)])

    fake_claim(plan)
    args = _args(workers=0, store=str(tmp_path / "s.sqlite"), out=str(tmp_path / "out"))
    ctxs = audit.contexts(args)
    assert args.workers == 1 and ctxs["C99"].workers == 1  # C2-style timing runs are keyed by what ran
    with pytest.raises(audit.AuditError, match="--workers must be 0 or more"):
        audit.contexts(_args(workers=-2))
    import bnlab.lab.report as report

    for name, stub in (("provenance", lambda *a, **k: {}), ("write_report", lambda *a, **k: None),
                       ("terminal_table", lambda *a, **k: None)):  # the report is not under test here
        monkeypatch.setattr(report, name, stub, raising=False)
    assert audit.run_audit(_args(workers=0, store=str(tmp_path / "s.sqlite"), out=str(tmp_path / "out"))) == 0
    with Store(tmp_path / "s.sqlite") as store:
        (rec,) = store.records()
        assert rec["meta"]["workers"] == 1 and rec["meta"]["in_process"] is True
        assert rec["config"]["timing"] == {"workers": 1}
        assert store.audits()[-1]["workers"] == 1


# ---------------------------------------------------------------- code fingerprint
def test_the_fingerprint_holds_the_numba_version_and_the_cpu_the_kernels_are_compiled_for(monkeypatch):
    import llvmlite.binding as ll
    import numba
    from numba.core.codegen import get_host_cpu_features

    pid = tasks.platform_id()
    assert f"numba={numba.__version__}" in pid and f"cpu={ll.get_host_cpu_name()}" in pid
    assert f"cpu_features={get_host_cpu_features()}" in pid
    before = tasks.fingerprint("classify")
    monkeypatch.setattr(tasks, "_PLATFORM", None)
    monkeypatch.setattr(tasks, "_FINGERPRINTS", {})
    monkeypatch.setattr(tasks, "numba_target", lambda: ("some-other-cpu", "+64bit,-avx2"))
    assert tasks.fingerprint("classify") != before
    monkeypatch.setattr(tasks, "_PLATFORM", None)
    monkeypatch.setattr(tasks, "_FINGERPRINTS", {})
    monkeypatch.setattr(tasks, "_version", lambda dist: "0.0" if dist == "numba" else "x")
    monkeypatch.setattr(tasks, "numba_target", lambda: (ll.get_host_cpu_name(), "f"))
    assert "numba=0.0" in tasks.platform_id()


# ---------------------------------------------------------------- restricted unpickler
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    root = fake_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(root / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f)
    with pytest.raises(D.DataError, match=r"data_batch_2: not a CIFAR-10 python batch: refused to load global "
                                          r"(posix|os|nt)\.system .*nothing in it was executed"):
        D.load_cifar10(str(tmp_path))
    assert not marker.exists()
    for payload in ((eval, ("1",)), (getattr, (object, "__subclasses__"))):
        class Other:
            def __reduce__(self, p=payload):
                return p
        with open(root / "data_batch_2", "wb") as f:
            pickle.dump({b"data": Other(), b"labels": [0]}, f)
        with pytest.raises(D.DataError, match="refused to load global builtins"):
            D.load_cifar10(str(tmp_path))


def test_object_arrays_are_refused(tmp_path):
    root = fake_cifar(tmp_path)
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.array([1, "a"], dtype=object), b"labels": [0]}, f)
    with pytest.raises(D.DataError, match="refused"):
        D.load_cifar10(str(tmp_path))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_genuine_cifar_style_batches_load_through_the_restricted_unpickler(tmp_path, protocol):
    root = fake_cifar(tmp_path)
    rng = np.random.default_rng(1)
    batch = {b"batch_label": b"testing batch 1 of 1", b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
             b"labels": [3, 1, 4, 1], b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"],
             b"coarse": np.int64(7), b"mean": np.float32(0.5), b"shape": (3, 32, 32)}
    with open(root / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    with open(root / "test_batch", "rb") as f:
        back = D.safe_load(f, encoding="bytes")
    assert np.array_equal(back[b"data"], batch[b"data"]) and back[b"labels"] == [3, 1, 4, 1]
    assert back[b"filenames"][0] == b"a.png" and back[b"coarse"] == 7
    ds = D.load_cifar10(str(tmp_path))
    assert ds.x_test.shape == (4, 3, 32, 32) and ds.y_test.tolist() == [3, 1, 4, 1]


def test_numpy_1_module_names_and_py2_strings_load():
    # the official batches were written by Python 2 with numpy 1: numpy.core.multiarray, and
    # 8-bit strings (SHORT_BINSTRING) that encoding="bytes" reads as bytes
    arr = np.array([[1, 2], [3, 4]], np.uint8)
    raw = pickle.dumps(arr, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    buf = b"\x80\x02}q\x00(U\x06labelsq\x01]q\x02(K\x01K\x02eU\x04data" + raw[2:-1] + b"u."
    d = D.safe_load(io.BytesIO(buf), encoding="bytes")
    assert d[b"labels"] == [1, 2] and d[b"data"].tolist() == [[1, 2], [3, 4]] and d[b"data"].dtype == np.uint8
    with pytest.raises(pickle.UnpicklingError, match="_codecs.encode"):  # only str -> latin-1 bytes
        D.safe_load(io.BytesIO(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R."))


# ---------------------------------------------------------------- structure
def test_the_trainer_does_not_import_the_task_registry_and_classify_is_built_in():
    code = "import sys, bnlab.lab.train; print('bnlab.lab.tasks' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert tasks.get_task("classify").resolve() is train_classify and "classify" in tasks.task_names()


def test_sequence_views_are_the_data_loaders_sets_read_step_by_step():
    from bnlab.lab.seqdata import load_sequences

    for name, seed, shape in (("digits", 3, (32, 2)), ("mnist1d", 0, (40, 1))):
        xtr, ytr, xte, yte = load_sequences(name, seed)
        ds = D.load(name, seed)
        assert xtr.shape[1:] == shape and xtr.dtype == torch.float32 and ytr.dtype == torch.int64
        assert np.array_equal(xtr.numpy().reshape(len(xtr), -1), ds.x_train.reshape(len(ds.x_train), -1))
        assert np.array_equal(xte.numpy().reshape(len(xte), -1), ds.x_test.reshape(len(ds.x_test), -1))
        assert np.array_equal(ytr.numpy(), ds.y_train) and np.array_equal(yte.numpy(), ds.y_test)
    with pytest.raises(ValueError, match="unknown sequence data set"):
        load_sequences("cifar10", 0)
