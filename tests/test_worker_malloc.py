"""The audit's worker processes keep freed memory (glibc mallopt, bnlab.lab.runner.keep_freed_memory)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"),
    reason="glibc only")

# where a 24 MB block lands: glibc's defaults map a block that large with mmap (fresh pages each time,
# returned to the kernel at free); a worker's allocator serves it from the heap, which it keeps
_PROBE = r"""
import json, sys
import numpy as np
import torch
from bnlab.lab import runner
if sys.argv[1] == "worker":
    runner._init_worker(1)
a = np.ones(3 << 20)  # 24 MB
p = a.ctypes.data
heap = [tuple(int(v, 16) for v in line.split()[0].split("-")) for line in open("/proc/self/maps")
        if line.rstrip().endswith("[heap]")]
torch.set_num_threads(1)  # as a worker runs: the same reduction order
torch.manual_seed(0)
x, w = torch.randn(512, 256), torch.randn(256, 128)
y = (x @ w).relu()
print(json.dumps({"malloc": runner._MALLOC, "in_heap": any(lo <= p < hi for lo, hi in heap),
                  "sum": float(y.sum()), "threads": torch.get_num_threads()}))
"""


@pytest.fixture(scope="module")
def probes():
    """The three probes, run at once (each a fresh interpreter importing torch)."""
    cases = {"plain": ("plain", {}), "worker": ("worker", {}),
             "opt_out": ("worker", {"BNLAB_WORKER_MALLOC": "default"})}
    procs = {k: subprocess.Popen([sys.executable, "-c", _PROBE, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=dict(os.environ, **env)) for k, (mode, env) in cases.items()}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        out[k] = json.loads(stdout.strip().splitlines()[-1])
    return out


def test_a_worker_serves_large_blocks_from_the_heap_it_keeps(probes):
    plain, worker = probes["plain"], probes["worker"]
    assert plain["malloc"] == "default" and not plain["in_heap"]  # glibc's default: mmap
    assert worker["malloc"] == "kept" and worker["in_heap"]
    assert worker["threads"] == 1
    assert worker["sum"] == plain["sum"]  # where memory comes from changes no number


def test_the_environment_can_leave_a_worker_at_glibcs_defaults(probes):
    worker = probes["opt_out"]
    assert worker["malloc"] == "default" and not worker["in_heap"]


def _touch_pages(config):
    import mmap

    buf = mmap.mmap(-1, config["mb"] << 20)  # fresh anonymous pages, each written once
    for off in range(0, len(buf), mmap.PAGESIZE):
        buf[off] = 1
    buf.close()
    return {"ok": True}


def test_each_run_records_its_page_faults():
    from bnlab.lab import runner, tasks

    tasks.register_task("test_touch_pages", _touch_pages)
    try:
        small = runner.execute({"task": "test_touch_pages", "mb": 1})
        big = runner.execute({"task": "test_touch_pages", "mb": 8})
    finally:
        tasks._TASKS.pop("test_touch_pages", None)
    assert small["ok"] and big["ok"], (small.get("error"), big.get("error"))
    assert big["meta"]["minor_faults"] >= (8 << 20) // 4096  # one a page at least
    assert small["meta"]["minor_faults"] < big["meta"]["minor_faults"]
    assert big["meta"]["malloc"] == "default"  # in-process: the caller's allocator is left alone
