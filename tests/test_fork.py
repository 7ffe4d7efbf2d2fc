"""A process that used bnlab's kernels can fork, and the child computes correctly.

numba's default threading layer on Linux is GNU OpenMP, which cannot cross fork(): numba kills a
child at its first parallel launch ("fork() called from a process already using GNU OpenMP"). A
child forked after the pool started runs the kernels' serial twins (:mod:`bnlab.kernels.cpu`).

torch's own OpenMP kernels hang in such a child unless it runs torch on one thread (DataLoader
workers call ``torch.set_num_threads(1)``; a plain fork pool does not), so the children below
either set one thread, as DataLoader does, or keep torch's setting and touch only small tensors
outside bnlab's kernels.
"""

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
import torch

import bnlab
import bnlab.functional as BF
from bnlab.kernels import cpu

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")

TIMEOUT = int(os.environ.get("BNLAB_FORK_TIMEOUT", "240"))  # s; a hung child fails the test (a cold cache compiles ~10 s)

# inputs made before any fork: up to 2^20 values the small-call path (C++, torch's threads) serves
# them in training, above it the numba kernels (numba's pool); the parent runs both in parallel
_g = torch.Generator().manual_seed(0)
CASES = {
    "rows": torch.randn(8, 16, 24, 24, generator=_g),
    "rows_few_channels": torch.randn(16, 3, 24, 24, generator=_g),
    "channels_last": torch.randn(8, 16, 24, 24, generator=_g).contiguous(memory_format=torch.channels_last),
    "2d": torch.randn(4096, 24, generator=_g),
    # above the small-call path's serial size: its eval forward runs on torch's threads in the parent
    "rows_large": torch.randn(8, 16, 48, 48, generator=_g),
    # above 2^20 values: the numba kernels' pool in training
    "rows_numba": torch.randn(8, 16, 96, 96, generator=_g),
    "channels_last_numba": torch.randn(8, 16, 96, 96, generator=_g).contiguous(memory_format=torch.channels_last),
    "2d_numba": torch.randn(65536, 24, generator=_g),
}
DY = {k: torch.randn(v.shape, generator=_g).contiguous(memory_format=torch.channels_last) if k.startswith("channels_last")
      else torch.randn(v.shape, generator=_g) for k, v in CASES.items()}


def _compute(threads=None) -> dict:
    """Training forward and backward, and an eval forward, of every case: numpy arrays."""
    if threads is not None:
        torch.set_num_threads(threads)
    from bnlab.kernels import fast

    out = {"serial_only": cpu._serial_only, "pid": os.getpid(),
           "fast_forked": None if fast.ext is None else fast.ext.forked()}
    for name, x0 in CASES.items():
        c = x0.shape[1]
        x = x0.detach().requires_grad_(True)  # no copy: a large torch op could hang a forked child
        w = torch.linspace(0.5, 1.5, c).requires_grad_(True)
        b = torch.linspace(-1.0, 1.0, c).requires_grad_(True)
        rm, rv = torch.zeros(c), torch.ones(c)
        y = BF.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
        y.backward(DY[name])
        ye = BF.batch_norm(x0, rm, rv, w.detach(), b.detach(), training=False, eps=1e-5)
        out[name] = {"y": y.detach().numpy().copy(), "dx": x.grad.numpy().copy(), "dw": w.grad.numpy().copy(),
                     "db": b.grad.numpy().copy(), "rm": rm.numpy().copy(), "rv": rv.numpy().copy(),
                     "y_eval": ye.numpy().copy()}
    return out


def _assert_same(child: dict, parent: dict, exact_rows: bool = True) -> None:
    for name in CASES:
        for k, v in parent[name].items():
            got = child[name][k]
            if exact_rows and name.startswith("rows"):
                # the rows layout sums a channel on one thread whatever the thread count
                np.testing.assert_array_equal(got, v, err_msg=f"{name} {k}")
            else:
                # the columns layout combines per-thread partial sums: the last bits may differ
                np.testing.assert_allclose(got, v, rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")


@pytest.fixture(scope="module")
def parent():
    res = _compute()
    assert not res["serial_only"]
    assert numba.np.ufunc.parallel._is_initialized  # the pool the child must not touch has started
    return res


@pytest.mark.parametrize("child_threads", [1, None], ids=["one-thread-like-DataLoader", "torch-threads-unchanged"])
def test_fork_pool_child_computes_what_the_parent_computed(parent, child_threads):
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        child = pool.apply_async(_compute, (child_threads,)).get(TIMEOUT)
    assert child["pid"] != os.getpid()
    if numba.threading_layer() == "omp":
        assert child["serial_only"]  # the serial twins, never the parent's OpenMP pool
    assert child["fast_forked"] in (None, True) and parent["fast_forked"] in (None, False)  # the C++ path serial
    _assert_same(child, parent)
    assert not cpu._serial_only  # the parent still runs on its pool


def test_parent_keeps_working_after_forking(parent):
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        pool.apply_async(os.getpid).get(TIMEOUT)
    _assert_same(_compute(), parent)


class _BNDataset(torch.utils.data.Dataset):
    """Each item runs bnlab's training and eval batch norm on its own input (pool-sized)."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(4, 8, 32, 32, generator=g)
        rm, rv = torch.zeros(8), torch.ones(8)
        y = BF.batch_norm(x, rm, rv, None, None, training=True)
        bn = bnlab.nn.BatchNorm2d(8).eval()
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(rv)
        with torch.no_grad():
            ye = bn(x)
        return y, ye, torch.tensor(float(torch.get_num_threads())), torch.tensor(float(cpu._serial_only))


def test_dataloader_fork_workers_compute_what_the_parent_computes(parent):
    ds = _BNDataset()
    expected = [ds[i] for i in range(len(ds))]  # in the parent, on the pool
    assert not cpu._serial_only
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork",
                                         timeout=TIMEOUT)
    got = list(loader)
    assert len(got) == len(expected)
    for (y, ye, threads, serial), (y0, ye0, _, _) in zip(got, expected):
        assert threads.item() == 1.0  # DataLoader's workers run torch on one thread
        if numba.threading_layer() == "omp":
            assert serial.item() == 1.0
        torch.testing.assert_close(y, y0, rtol=0, atol=0)  # rows layout: the same bits
        torch.testing.assert_close(ye, ye0, rtol=0, atol=0)


_SCRIPT = textwrap.dedent("""
    import multiprocessing as mp, numba, numpy as np, torch
    import bnlab.functional as BF
    from bnlab.kernels import cpu
    torch.set_num_threads(2)
    x = torch.randn(8, 16, 96, 96, generator=torch.Generator().manual_seed(0))  # above 2^20: the numba kernels

    def run():
        torch.set_num_threads(1)
        return BF.batch_norm(x, None, None, training=True).numpy(), cpu._serial_only

    if __name__ == "__main__":
        y = BF.batch_norm(x, None, None, training=True).numpy()
        with mp.get_context("fork").Pool(1) as p:
            yc, serial = p.apply_async(run).get(200)
        assert numba.threading_layer() == "workqueue", numba.threading_layer()
        assert not serial  # a fork-safe layer keeps the parallel kernels in the child
        np.testing.assert_array_equal(yc, y)
        print("ok")
""")


def test_fork_under_the_workqueue_layer_keeps_the_parallel_kernels(tmp_path):
    script = tmp_path / "fork_workqueue.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=TIMEOUT + 60)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
