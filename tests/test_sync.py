"""bnlab.nn.SyncBatchNorm: the group's statistics equal one process's statistics of the whole batch.

Three processes are spawned once (gloo, CPU); every scenario runs on the 3-process world and on a
2-process subgroup (ranks 0 and 1). Each process saves what its layer produced; the test process
rebuilds the concatenated batch and compares with single-process bnlab batch norm on it: outputs,
input gradients, the summed weight/bias gradients (DistributedDataParallel sums the per-process
shares), running statistics, across unequal batches, an empty process, float32 and float64, NCHW
and channels_last, masks, and a nan on one process.
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

import bnlab
from bnlab.nn.sync import SyncBatchNorm, combine_moments, sync_batch_norm
from bnlab.policy import NonFiniteBatchError

C = 4

# name -> settings. sizes: per-process batch sizes for the 3-process world; the 2-process subgroup
# uses the first two. tail: the dims after C.
SCENARIOS = {
    "f64_nchw": dict(dtype=torch.float64, tail=(3, 5), sizes=(3, 5, 2)),
    "f32_nchw": dict(dtype=torch.float32, tail=(3, 5), sizes=(4, 2, 3)),
    "f32_channels_last": dict(dtype=torch.float32, tail=(3, 5), sizes=(2, 3, 4), channels_last=True),
    "f64_channels_last": dict(dtype=torch.float64, tail=(4, 3), sizes=(3, 1, 2), channels_last=True),
    "empty_rank": dict(dtype=torch.float64, tail=(3, 3), sizes=(4, 0, 3)),
    "empty_rank0_f32": dict(dtype=torch.float32, tail=(3, 3), sizes=(0, 4, 3)),
    "2d_offset": dict(dtype=torch.float32, tail=(), sizes=(7, 9, 5), offset=1000.0),
    "3d_no_affine_cumulative": dict(dtype=torch.float64, tail=(6,), sizes=(2, 3, 1), affine=False, momentum=None),
    "untracked": dict(dtype=torch.float32, tail=(5,), sizes=(3, 3, 3), track=False),
    "masked": dict(dtype=torch.float64, tail=(6,), sizes=(3, 2, 4), mask=True),
    "masked_f32": dict(dtype=torch.float32, tail=(), sizes=(5, 3, 4), mask=True),
    "masked_rows": dict(dtype=torch.float64, tail=(5,), sizes=(3, 4, 2), mask="rows"),
    # the torch-ops path (CUDA/NCCL, float16/bfloat16, masks), here on CPU tensors
    "torch_ops_f32_channels_last": dict(dtype=torch.float32, tail=(3, 5), sizes=(2, 3, 4), channels_last=True,
                                        torch_ops=True),
    "torch_ops_f64_empty_rank": dict(dtype=torch.float64, tail=(4,), sizes=(3, 0, 5), torch_ops=True),
}
NAN = {  # a nan on process 1 only
    "nan_raise": dict(dtype=torch.float32, tail=(3, 3), sizes=(2, 2, 2), nan_rank=1, nonfinite="raise"),
    "nan_skip": dict(dtype=torch.float32, tail=(3, 3), sizes=(2, 2, 2), nan_rank=1, nonfinite="skip"),
}
GROUPS = ("world3", "sub2")
STEPS = 2  # two training steps: the running statistics accumulate


def _data(name: str, s: dict, world: int):
    """The whole batch (and dy, mask) of a scenario, the same in every process."""
    g = torch.Generator().manual_seed(sum(map(ord, name)) + world)
    sizes = s["sizes"][:world]
    n = sum(sizes)
    out = []
    for step in range(STEPS):
        x = torch.randn((n, C) + s["tail"], generator=g, dtype=torch.float64) * 2 + s.get("offset", 0.5)
        dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
        mask = None
        if s.get("mask"):
            mask = torch.rand((n,) if s["mask"] == "rows" else (n,) + s["tail"], generator=g) > 0.3
        out.append((x.to(s["dtype"]), dy.to(s["dtype"]), mask))
    return sizes, out


def _layout(t, s):
    return t.contiguous(memory_format=torch.channels_last) if s.get("channels_last") else t


def _params(s):
    w = torch.linspace(0.5, 1.5, C, dtype=s["dtype"])
    b = torch.linspace(-0.3, 0.4, C, dtype=s["dtype"])
    return w, b


def _make(cls, s, **kw):
    layer = cls(C, momentum=s.get("momentum", 0.1), affine=s.get("affine", True),
                track_running_stats=s.get("track", True), dtype=s["dtype"], **kw)
    if layer.affine:
        w, b = _params(s)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    return layer


def _run(name, s, group, rank, world):
    """This process's part of one scenario: what its layer gives, step by step."""
    sizes, steps = _data(name, s, world)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    layer = _make(SyncBatchNorm, s, process_group=group, nonfinite=s.get("nonfinite", "raise"))
    rec = {"steps": []}
    if s.get("torch_ops"):
        import bnlab.nn.sync as sync_mod

        orig = sync_mod.kernels.uses_bnlab_kernel
        sync_mod.kernels.uses_bnlab_kernel = lambda x: False
        try:
            return _steps(layer, s, steps, sizes, lo, hi, rank, rec)
        finally:
            sync_mod.kernels.uses_bnlab_kernel = orig
    return _steps(layer, s, steps, sizes, lo, hi, rank, rec)


def _steps(layer, s, steps, sizes, lo, hi, rank, rec):
    for x_all, dy_all, mask_all in steps:
        x = _layout(x_all[lo:hi].clone(), s)
        if s.get("nan_rank") == rank:
            x.view(-1)[0] = float("nan")
        x.requires_grad_(True)
        mask = None if mask_all is None else mask_all[lo:hi]
        if layer.affine:
            layer.weight.grad = layer.bias.grad = None
        try:
            y = layer(x, mask=mask)
        except NonFiniteBatchError as e:
            rec["steps"].append({"error": f"NonFiniteBatchError: {e}", "buffers": _buffers(layer)})
            continue
        y.backward(_layout(dy_all[lo:hi].clone(), s))
        rec["steps"].append({
            "y": y.detach(), "dx": x.grad, "y_channels_last": y.is_contiguous(memory_format=torch.channels_last),
            "dw": layer.weight.grad if layer.affine else None, "db": layer.bias.grad if layer.affine else None,
            "buffers": _buffers(layer),
        })
    return rec


def _buffers(layer):
    return {k: v.detach().clone() for k, v in layer.named_buffers()}


def _count_collectives(rank, world):
    """Collective calls per training step and per eval step of one layer (world group)."""
    calls = {"all_gather_single": 0, "all_reduce": 0}
    orig = {k: getattr(dist, k) for k in calls}

    def counting(k):
        def f(*a, **kw):
            calls[k] += 1
            return orig[k](*a, **kw)
        return f

    layer = SyncBatchNorm(C)
    x = torch.randn(3, C, 4, requires_grad=True)
    for k in calls:
        setattr(dist, k, counting(k))
    try:
        layer(x).sum().backward()
        train = dict(calls)
        for k in calls:
            calls[k] = 0
        layer.eval()
        layer(x).sum().backward()
        evals = dict(calls)
    finally:
        for k, f in orig.items():
            setattr(dist, k, f)
    return {"train": train, "eval": evals}


def _global_count_one(rank, group):
    """(N, C) batches of 1, 0, 0 rows: one value per channel over the group, an error everywhere."""
    layer = SyncBatchNorm(C, process_group=group)
    x = torch.randn(1 if rank == 0 else 0, C)
    try:
        layer(x)
    except ValueError as e:
        return str(e)
    return None


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sub = dist.new_group([0, 1])  # every process calls new_group, members or not
        out = {}
        for gname, group, members in (("world3", None, world), ("sub2", sub, 2)):
            if rank >= members:
                continue
            for name, s in {**SCENARIOS, **NAN}.items():
                out[(gname, name)] = _run(name, s, group, rank, members)
            out[(gname, "count_one")] = _global_count_one(rank, group)
        out["collectives"] = _count_collectives(rank, world)
        dist.barrier()
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    world = 3
    with tempfile.TemporaryDirectory() as d:
        # fork: the children start with torch and bnlab imported (seconds sooner than spawn); each
        # runs torch on one thread, as a forked DataLoader worker does (tests/test_fork.py)
        tmp.start_processes(_worker, args=(world, _free_port(), d), nprocs=world, join=True, start_method="fork")
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _reference(name, s, world):
    """Single-process bnlab batch norm on the concatenated batch (MaskedBatchNorm1d with a mask)."""
    sizes, steps = _data(name, s, world)
    masked = s.get("mask")
    cls = bnlab.nn.MaskedBatchNorm1d if masked else {0: bnlab.nn.BatchNorm1d, 1: bnlab.nn.BatchNorm1d,
                                                         2: bnlab.nn.BatchNorm2d, 3: bnlab.nn.BatchNorm3d}[len(s["tail"])]
    layer = _make(cls, s)
    out = []
    for x_all, dy_all, mask_all in steps:
        x = _layout(x_all.clone(), s).requires_grad_(True)
        if layer.affine:
            layer.weight.grad = layer.bias.grad = None
        y = layer(x, mask_all) if masked else layer(x)
        y.backward(_layout(dy_all.clone(), s))
        out.append({"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad if layer.affine else None,
                    "db": layer.bias.grad if layer.affine else None, "buffers": _buffers(layer)})
    return sizes, out


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_matches_single_process_on_the_concatenated_batch(results, group, name):
    s = SCENARIOS[name]
    world = 3 if group == "world3" else 2
    sizes, ref_steps = _reference(name, s, world)
    tol = _tol(s["dtype"])
    for step, ref in enumerate(ref_steps):
        parts = [results[r][(group, name)]["steps"][step] for r in range(world)]
        for r, p in enumerate(parts):
            assert p["y"].shape[0] == sizes[r]
            if s.get("channels_last") and sizes[r]:
                assert p["y_channels_last"], "output keeps the input's channels_last layout"
        torch.testing.assert_close(torch.cat([p["y"] for p in parts]), ref["y"], **tol)
        torch.testing.assert_close(torch.cat([p["dx"] for p in parts]), ref["dx"], **tol)
        if ref["dw"] is not None:
            # each process holds its share; DistributedDataParallel's all_reduce sums them
            torch.testing.assert_close(sum(p["dw"] for p in parts), ref["dw"], **tol)
            torch.testing.assert_close(sum(p["db"] for p in parts), ref["db"], **tol)
        for p in parts:
            assert p["buffers"].keys() == ref["buffers"].keys()
            for k, v in ref["buffers"].items():
                torch.testing.assert_close(p["buffers"][k], v, **tol)
        # every process holds the very same running statistics (the same gathered bytes)
        for p in parts[1:]:
            for k, v in parts[0]["buffers"].items():
                assert torch.equal(p["buffers"][k], v)


@pytest.mark.parametrize("group", GROUPS)
def test_nan_on_one_process_raises_on_every_process_and_touches_no_buffer(results, group):
    world = 3 if group == "world3" else 2
    fresh = _buffers(_make(SyncBatchNorm, NAN["nan_raise"]))
    for r in range(world):
        for step in results[r][(group, "nan_raise")]["steps"]:
            assert step.get("error", "").startswith("NonFiniteBatchError"), f"rank {r} did not raise"
            assert "nan" in step["error"] and "channel" in step["error"]
            for k, v in fresh.items():
                assert torch.equal(step["buffers"][k], v), f"rank {r} changed {k}"


@pytest.mark.parametrize("group", GROUPS)
def test_nan_on_one_process_skip_leaves_every_buffer_alone(results, group):
    world = 3 if group == "world3" else 2
    fresh = _buffers(_make(SyncBatchNorm, NAN["nan_skip"]))
    for r in range(world):
        steps = results[r][(group, "nan_skip")]["steps"]
        assert len(steps) == STEPS and "error" not in steps[-1]
        for k, v in fresh.items():
            assert torch.equal(steps[-1]["buffers"][k], v), f"rank {r} changed {k} (num_batches_tracked included)"


@pytest.mark.parametrize("group", GROUPS)
def test_one_value_per_channel_over_the_group_raises_everywhere(results, group):
    world = 3 if group == "world3" else 2
    for r in range(world):
        msg = results[r][(group, "count_one")]
        assert msg is not None and "more than 1 value per channel" in msg and "process group" in msg


def test_one_collective_forward_one_backward_none_in_eval(results):
    for r in range(3):
        assert results[r]["collectives"] == {"train": {"all_gather_single": 1, "all_reduce": 1},
                                             "eval": {"all_gather_single": 0, "all_reduce": 0}}


# ---------------------------------------------------------------------------------------------
# in this process: a 1-process gloo group (in-memory store), and no group at all


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_no_process_group_error_names_the_fixes():
    layer = SyncBatchNorm(3)
    with pytest.raises(RuntimeError, match=r"init_process_group.*bnlab\.nn\.BatchNorm1d/2d/3d"):
        layer(torch.randn(4, 3))
    layer.eval()  # eval needs no group
    assert layer(torch.randn(4, 3)).shape == (4, 3)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64(one_process_group, channels_last):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 3, 2, dtype=torch.float64, generator=g) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: sync_batch_norm(x, w, b, 1e-5, one_process_group)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    fn_none = lambda x: sync_batch_norm(x, None, None, 1e-5, one_process_group)  # noqa: E731
    assert torch.autograd.gradcheck(fn_none, (x,))


def test_gradcheck_float64_masked(one_process_group):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    fn = lambda x, w, b: sync_batch_norm(x, w, b, 1e-5, one_process_group, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_world_size_one_is_bnlab_batchnorm(one_process_group):
    x = torch.randn(6, 3, 4, 4)
    sync, plain = SyncBatchNorm(3), bnlab.nn.BatchNorm2d(3)
    for _ in range(2):
        torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)
    for k, v in plain.state_dict().items():
        assert torch.equal(sync.state_dict()[k], v)


def test_torch_signature_state_dict_and_isinstance():
    ours, theirs = SyncBatchNorm(5, 1e-3, 0.2, True, True, None), torch.nn.SyncBatchNorm(5, 1e-3, 0.2, True, True, None)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
    assert not isinstance(ours, torch.nn.SyncBatchNorm)  # DistributedDataParallel refuses that class on CPU
    with pytest.raises(ValueError, match="SyncBatchNorm: nonfinite"):
        SyncBatchNorm(3, nonfinite="zero")


def test_bad_input_errors_name_the_layer():
    layer = SyncBatchNorm(3)
    with pytest.raises(ValueError, match=r"SyncBatchNorm: expected input with 3 channels"):
        layer(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"SyncBatchNorm: expected input of shape \(N, C, \*\)"):
        layer(torch.randn(4))
    with pytest.raises(ValueError, match=r"SyncBatchNorm: expected mask of shape"):
        layer(torch.randn(4, 3, 2), mask=torch.ones(4, 3, dtype=torch.bool))


def test_convert_sync_batchnorm_keeps_state_and_parameters():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), bnlab.nn.BatchNorm2d(4, nonfinite="skip"),
        torch.nn.Sequential(torch.nn.BatchNorm1d(4), bnlab.nn.MaskedBatchNorm1d(4), bnlab.nn.GhostBatchNorm1d(4, 2)),
        torch.nn.SyncBatchNorm(4, momentum=None),
    )
    net[1].running_mean.fill_(0.5)
    w = net[1].weight
    net.eval()
    conv = SyncBatchNorm.convert_sync_batchnorm(net)
    assert conv is net
    assert all(isinstance(m, SyncBatchNorm) for m in (net[1], net[2], net[3][0], net[3][1], net[4]))
    assert isinstance(net[3][2], bnlab.nn.GhostBatchNorm1d)  # per-ghost-batch statistics: left alone
    assert net[1].weight is w and float(net[1].running_mean[0]) == 0.5 and not net[1].training
    assert net[2].nonfinite == "skip" and net[4].momentum is None
    single = SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm3d(2))
    assert isinstance(single, SyncBatchNorm) and single.num_features == 2


def test_combine_moments_is_exact_for_any_split():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 3, dtype=torch.float64, generator=g) * 3 + 1e4
    parts = [x[:7], x[7:7], x[7:31], x[31:]]
    rows = []
    for p in parts:
        n = p.shape[0]
        m = p.mean(0) if n else torch.zeros(3, dtype=torch.float64)
        rows.append(torch.stack((torch.full((3,), float(n), dtype=torch.float64), m, ((p - m) ** 2).sum(0))))
    mean, var, total = combine_moments(torch.stack(rows))
    torch.testing.assert_close(mean, x.mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(var, x.var(0, unbiased=False), rtol=1e-12, atol=0)
    assert total.tolist() == [50.0] * 3
