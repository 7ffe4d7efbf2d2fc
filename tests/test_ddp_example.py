"""`bnlab train-ddp`: DistributedDataParallel with bnlab.nn.SyncBatchNorm on CPU (gloo) trains the
audit's CNN exactly as one process training on the combined batch does."""

import subprocess
import sys
import textwrap

import pytest
import torch

from bnlab.cli import build_parser
from bnlab.lab import ddp


@pytest.mark.parametrize("split", ["even", "uneven"])
def test_two_processes_match_single_process_training(split):
    cfg = ddp.DDPConfig(steps=3, batch=24, lr=0.2, seed=1, channels=[4, 8], dtype="float64", split=split)
    # fork: the children start with torch and bnlab imported; `bnlab train-ddp` itself spawns
    out = ddp.launch(cfg, nproc=2, start_method="fork")
    r0, r1 = out["ranks"]
    assert r0["sizes"] == ([12, 12] if split == "even" else [8, 16])
    # every process ends with the same model, and it is the single-process model
    assert ddp.max_difference(r0["state"], r1["state"]) == 0.0
    assert out["max_diff"] < 1e-10
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(out["single"]["losses"]), rtol=1e-12, atol=0)
    # and training moved it: the check compares something
    fresh = ddp.build_model(cfg, (1, 8, 8), 10).state_dict()
    assert ddp.max_difference(fresh, out["single"]["state"]) > 1e-3
    assert any(k.endswith("running_mean") for k in r0["state"])


def test_unsynchronized_batch_norm_would_differ():
    """The comparison has teeth: per-process statistics (plain BatchNorm under DDP) drift from it."""

    cfg = ddp.DDPConfig(steps=2, batch=24, lr=0.2, seed=1, channels=[4, 8], dtype="float64", split="uneven")
    single = ddp.train_single(cfg)
    x, y, classes = ddp._data(cfg)
    # what one process of two computes with its own statistics only (its share of the first batch)
    model = ddp.build_model(cfg, (1, 8, 8), classes)
    sizes = ddp.split_sizes(cfg.batch, 2, cfg.split)
    idx = ddp._batch(cfg, 0, len(y))[: sizes[0]]
    model(x[idx])
    rm_local = [v for k, v in model.state_dict().items() if k.endswith("running_mean")][0]
    ref = ddp.build_model(cfg, (1, 8, 8), classes)
    ref(x[ddp._batch(cfg, 0, len(y))])
    rm_global = [v for k, v in ref.state_dict().items() if k.endswith("running_mean")][0]
    assert (rm_local - rm_global).abs().max() > 1e-4
    assert single["losses"][0] > 0


def test_cli_options():
    a = build_parser().parse_args(["train-ddp", "--nproc", "3", "--steps", "5", "--split", "uneven", "--no-check"])
    assert (a.command, a.nproc, a.steps, a.split, a.no_check, a.batch, a.dtype) == \
        ("train-ddp", 3, 5, "uneven", True, 64, "float32")
    assert ddp.split_sizes(64, 3, "uneven") == [11, 21, 32] and sum(ddp.split_sizes(7, 3, "even")) == 7


def test_fork_after_numba_pool_started_compiles_in_children(tmp_path):
    """A forked child inherits numba's configuration, its pool size included. ``launch`` must not
    hand it a NUMBA_NUM_THREADS that differs from it: numba re-reads the environment at every
    compile, and a compile in the child (a kernel the parent never built, a cold on-disk cache)
    then raises. The script starts numba's pool, then makes each child compile a new function."""
    script = tmp_path / "fork_compile.py"
    script.write_text(textwrap.dedent("""
        import numba, torch
        import bnlab.nn as bnn
        from bnlab.lab import ddp

        @numba.njit(parallel=True)
        def _started(x):
            s = 0.0
            for i in numba.prange(x.shape[0]):
                s += x[i]
            return s

        _started(torch.randn(100000).numpy())  # the parent's pool is up
        train = ddp.train_ddp

        def compile_then_train(cfg, rank, world):
            numba.njit(lambda v: v + 1.0)(1.0)  # a compile in the child
            return train(cfg, rank, world)

        ddp.train_ddp = compile_then_train
        cfg = ddp.DDPConfig(steps=2, batch=24, lr=0.2, seed=1, channels=[4, 8], dtype="float64")
        out = ddp.launch(cfg, nproc=2, start_method="fork")
        print("max_diff", out["max_diff"])
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.split("max_diff")[1]) < 1e-10
