"""The kernels follow ``torch.set_num_threads``, and their serial twins give the one-thread bits."""

import inspect
import os
import subprocess
import sys
import threading

import numba
import pytest
import torch

import bnlab.functional as BF
from bnlab.kernels import cpu, fast

LARGE = (8, 16, 24, 24)  # above cpu.SERIAL_BELOW: the thread pool's size
SHAPES = [((8, 16, 24, 24), None), ((16, 3, 24, 24), None), ((8, 16, 24, 24), torch.channels_last), ((4096, 24), None)]


@pytest.fixture(autouse=True)
def _numba_kernels_only(monkeypatch):
    """These tests are about the numba kernels' threads: the small-call path (bnlab.kernels.fast,
    torch's own intra-op threads; tests/test_fast.py) is switched off here."""
    monkeypatch.setattr(fast, "ext", None)


@pytest.fixture
def recorded(monkeypatch):
    """Every kernel launch, as (kernel, numba's thread count during the launch, the nt argument)."""
    seen = []

    def wrap(name, kern):
        at = list(inspect.signature(kern.py_func).parameters).index("nt")  # the kernel's thread-count argument

        def launch(*args):
            seen.append((name, numba.get_num_threads(), args[at]))
            return kern(*args)
        return launch

    monkeypatch.setattr(cpu, "_kernels", cpu._Kernels(*(wrap(n, k) for n, k in zip(cpu._Kernels._fields,
                                                                                     cpu._PARALLEL_KERNELS))))
    return seen


@pytest.fixture
def torch_threads():
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def _step(shape, fmt=None):
    x = torch.randn(shape)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x.requires_grad_(True)
    w = torch.ones(shape[1], requires_grad=True)
    y = BF.batch_norm(x, None, None, w, None, training=True)
    y.backward(torch.ones_like(y))
    with torch.no_grad():
        ye = BF.batch_norm(x, torch.zeros(shape[1]), torch.ones(shape[1]), w, None, training=False)
    return y.detach(), x.grad, w.grad, ye


def test_torch_set_num_threads_1_limits_the_kernels(recorded, torch_threads):
    before = numba.get_num_threads()
    torch_threads(1)
    _step(LARGE)
    assert {r[0] for r in recorded} == {"rows_forward_train", "rows_backward", "rows_forward_eval"}
    assert all(r[1] == 1 and r[2] == 1 for r in recorded), recorded
    assert numba.get_num_threads() == before  # numba's own setting is put back after each launch


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="numba's pool has one thread here")
def test_the_kernels_use_torchs_thread_count_up_to_numbas_pool(recorded, torch_threads):
    numba.set_num_threads(1)  # numba's own setting does not govern the kernels; torch's does
    try:
        torch_threads(2)
        _step(LARGE)
        assert recorded and all(r[1] == 2 and r[2] == 2 for r in recorded), recorded
        assert numba.get_num_threads() == 1
        recorded.clear()
        torch_threads(numba.config.NUMBA_NUM_THREADS + 3)  # more than the pool: the pool's size
        _step(LARGE)
        n = numba.config.NUMBA_NUM_THREADS
        assert recorded and all(r[1] == n and r[2] == n for r in recorded), recorded
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_small_inputs_run_the_serial_twins_on_the_calling_thread(recorded, torch_threads, monkeypatch):
    """Below ``serial_below`` elements the calls go to the serial twins (no thread-pool launch at
    all), on the caller's thread; the parallel kernels are not launched."""
    seen = []
    twins = cpu.serial_kernels()

    def wrap(name, kern):
        def launch(*args):
            seen.append((name, threading.get_ident()))
            return kern(*args)
        return launch

    monkeypatch.setattr(cpu, "serial_kernels", lambda: cpu._Kernels(*(wrap(n, k) for n, k in
                                                                      zip(cpu._Kernels._fields, twins))))
    torch_threads(2)
    _step((4, 3, 5, 5))
    assert not recorded, recorded
    assert {s[0] for s in seen} == {"rows_forward_train", "rows_backward", "rows_forward_eval"}
    assert all(s[1] == threading.get_ident() for s in seen)


def test_a_thread_with_its_own_torch_setting(recorded, torch_threads):
    """torch's setting is process-wide; numba's is per thread: a call from another thread
    follows torch's setting too."""
    torch_threads(1)
    t = threading.Thread(target=_step, args=(LARGE,))
    t.start()
    t.join()
    assert recorded and all(r[1] == 1 and r[2] == 1 for r in recorded), recorded


@pytest.mark.parametrize("shape,fmt", SHAPES, ids=["rows", "rows-few-channels", "channels_last", "2d"])
def test_serial_twins_give_the_bits_of_the_kernels_on_one_thread(shape, fmt, torch_threads):
    torch_threads(1)
    torch.manual_seed(0)
    one = _step(shape, fmt)
    cpu.use_serial_kernels(True)
    try:
        assert cpu.threads() == 1
        torch.manual_seed(0)
        twin = _step(shape, fmt)
    finally:
        cpu.use_serial_kernels(False)
    assert cpu._kernels is cpu._PARALLEL_KERNELS
    for a, b in zip(one, twin):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_numbas_pool_start_leaves_torchs_thread_count_alone(tmp_path):
    """numba's OpenMP layer starts its pool with omp_set_num_threads(NUMBA_NUM_THREADS) on the
    runtime torch's kernels share: without bnlab's wrap, a user's torch.set_num_threads(1) read 2
    after the first parallel batch norm. A fresh process, so that the pool starts inside the check."""
    script = tmp_path / "pool_start.py"
    script.write_text(
        "import torch\n"
        "import bnlab.nn as bnn\n"
        "from numba.np.ufunc import parallel\n"
        "torch.set_num_threads(1)\n"
        "assert not parallel._is_initialized\n"
        "bnn.BatchNorm2d(16)(torch.randn(64, 16, 64, 64, requires_grad=True)).sum().backward()\n"
        "assert parallel._is_initialized  # the check saw the pool start\n"
        "print(torch.get_num_threads())\n")
    env = {**os.environ, "NUMBA_NUM_THREADS": "2", "NUMBA_THREADING_LAYER": "omp"}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["1"]
