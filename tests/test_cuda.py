"""bnlab on a CUDA device: every layer, the recurrent layers, SyncBatchNorm on NCCL, the tools,
torch.compile and autocast, against torch's own CUDA layers or bnlab's CPU results.

On a GPU bnlab's batch norm runs torch's CUDA kernel and applies its own running-statistics policy
(the non-finite guard, the float64 update) to the statistics the kernel returns; the recurrent
layers run their reference time loop (the fused kernels are CPU code). These tests check that
path end to end. They skip where torch sees no GPU (CI has none); ``BNLAB_TEST_DEVICE=cpu`` runs
the same checks on CPU tensors, which checks the tests themselves.
"""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from torch import nn

import bnlab
from bnlab import nn as bnn
from bnlab.lab.ddp import _free_port
from bnlab.policy import NonFiniteBatchError

DEV = os.environ.get("BNLAB_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """Full float32 matmuls and convolutions (no TF32), so float32 tolerances mean what they say."""
    if DEV != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _tol(dtype):
    return {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]


def _close(a, b, dtype, what):
    torch.testing.assert_close(a.cpu().to(b.dtype) if torch.is_tensor(a) else a, b.cpu() if torch.is_tensor(b) else b,
                               **_tol(dtype), msg=lambda m: f"{what}: {m}")


def _same_state(ours: nn.Module, theirs: nn.Module, dtype, what: str):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b), what
    for k in a:
        if k.endswith("num_batches_tracked"):
            assert int(a[k]) == int(b[k]), f"{what}: {k} {int(a[k])} != {int(b[k])}"
        else:
            # the running variance: torch moves it in the input's dtype, bnlab in float64, rounded once
            _close(a[k], b[k], dtype if dtype == torch.float64 else torch.float32, f"{what}: {k}")


def _x(shape, dtype=torch.float32, seed=0, offset=0.5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype).to(DEV)


# ------------------------------------------------------------------------------ the batch-norm layers

SHAPES = {1: (16, 6), 2: (8, 6, 5, 7), 3: (4, 6, 3, 4, 5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_layers_match_torch(dim, dtype, channels_last, momentum):
    if channels_last and dim == 1:
        pytest.skip("channels_last needs 4-D or 5-D inputs")
    torch.manual_seed(3)
    theirs = getattr(nn, f"BatchNorm{dim}d")(6, momentum=momentum).to(DEV, dtype)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    ours = getattr(bnn, f"BatchNorm{dim}d")(6, momentum=momentum).to(DEV, dtype)
    ours.load_state_dict(theirs.state_dict())
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(SHAPES[dim]), torch.contiguous_format)
    for step in range(3):
        x = _x(SHAPES[dim], dtype, seed=step)
        if channels_last:
            x = x.contiguous(memory_format=fmt)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        _close(ya, yb, dtype, f"step {step} output")
        dy = _x(SHAPES[dim], dtype, seed=100 + step)
        ya.backward(dy)
        yb.backward(dy)
        _close(xa.grad, xb.grad, dtype, f"step {step} input gradient")
        _close(ours.weight.grad, theirs.weight.grad, dtype, f"step {step} weight gradient")
        _close(ours.bias.grad, theirs.bias.grad, dtype, f"step {step} bias gradient")
        ours.zero_grad(), theirs.zero_grad()
        _same_state(ours, theirs, dtype, f"step {step}")
        assert ours.running_mean.device == xa.device and ours.running_mean.dtype == dtype
    ours.eval(), theirs.eval()
    x = _x(SHAPES[dim], dtype, seed=9)
    _close(ours(x), theirs(x), dtype, "eval output")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_with_float32_parameters_match_torch(dtype):
    theirs = nn.BatchNorm2d(6).to(DEV)
    ours = bnn.BatchNorm2d(6).to(DEV)
    ours.load_state_dict(theirs.state_dict())
    for step in range(2):
        x = _x((8, 6, 5, 5), dtype, seed=step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert ya.dtype == dtype
        _close(ya, yb, dtype, "output")
        dy = _x((8, 6, 5, 5), dtype, seed=50 + step)
        ya.backward(dy)
        yb.backward(dy)
        _close(xa.grad, xb.grad, dtype, "input gradient")
        # the weight gradient sums dy * xhat over 200 values with cancellation: torch's two kernels
        # (cuDNN's and the native one) differ by more than half precision's epsilon here, so each
        # is held to the float64 gradient of the same half-precision data, bnlab's no worse
        x64 = x.double().requires_grad_()
        w64 = theirs.weight.detach().double().requires_grad_()
        y64 = nn.functional.batch_norm(x64, None, None, w64, theirs.bias.detach().double(), True, 0.0, 1e-5)
        (g64,) = torch.autograd.grad(y64, w64, dy.double())
        err_ours = (ours.weight.grad.double() - g64).abs().max().item()
        err_torch = (theirs.weight.grad.double() - g64).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-3 * g64.abs().max().item(), (err_ours, err_torch)
        ours.zero_grad(), theirs.zero_grad()
    _same_state(ours, theirs, dtype, "buffers")


def _net(bn=nn.BatchNorm2d):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), bn(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), bn(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _train_steps(model, steps=3, autocast=None, channels_last=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outs = []
    for step in range(steps):
        x = _x((16, 3, 12, 12), seed=step)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t = torch.arange(16, device=DEV) % 4
        opt.zero_grad()
        with torch.autocast(torch.device(DEV).type, dtype=autocast, enabled=autocast is not None):
            out = model(x)
            loss = nn.functional.cross_entropy(out.float(), t)
        loss.backward()
        opt.step()
        outs.append(out.detach().float())
    return outs


@pytest.mark.parametrize("how", ["eager", "channels_last", "bf16", "compile", "fused_act"])
def test_a_model_trains_as_torch_does(how):
    ref = _net().to(DEV)
    ours = bnlab.convert(copy.deepcopy(ref), to="bnlab", warn=False, fuse_act=how == "fused_act")
    if how == "channels_last":
        ref, ours = ref.to(memory_format=torch.channels_last), ours.to(memory_format=torch.channels_last)
    run_ours = torch.compile(ours) if how == "compile" else ours
    kw = dict(autocast=torch.bfloat16 if how == "bf16" else None, channels_last=how == "channels_last")
    dtype = torch.bfloat16 if how == "bf16" else torch.float32
    for i, (a, b) in enumerate(zip(_train_steps(run_ours, **kw), _train_steps(ref, **kw))):
        _close(a, b, dtype, f"{how}: step {i} output")
    _same_state(ours, ref, dtype, how)
    ours.eval(), ref.eval()
    with torch.no_grad():
        x = _x((5, 3, 12, 12), seed=7)
        _close(ours(x), ref(x), dtype, f"{how}: inference")


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_nan_batch_leaves_every_buffer_alone(policy):
    layer = bnn.BatchNorm2d(4, nonfinite=policy).to(DEV)
    layer(_x((6, 4, 3, 3)))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _x((6, 4, 3, 3), seed=1)
    x[2, 1, 0, 0] = float("nan")
    if policy == "raise":
        with pytest.raises(NonFiniteBatchError, match="channel"):
            layer(x)
    else:
        layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("layer", [lambda: bnn.BatchNorm2d(4, nonfinite="skip"),
                                   lambda: bnn.BatchNorm2d(4, momentum=None, nonfinite="skip"),
                                   lambda: bnn.BatchNormAct2d(4, nonfinite="skip")], ids=["ema", "cumulative", "act"])
def test_skip_never_waits_for_the_device(layer):
    """With nonfinite="skip" a training step reads nothing back to the host (torch's sync debug mode
    raises on any operation that synchronizes)."""
    if DEV != "cuda":
        pytest.skip("a CUDA check")
    m = layer().to(DEV)
    x = _x((6, 4, 3, 3)).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = m(x)
        y.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(m.num_batches_tracked) == 1


def test_overflowing_statistics_leave_float16_buffers_alone():
    # a float16 layer: the batch variance (1e10) does not fit its buffers; torch would write inf
    layer = bnn.BatchNorm1d(3).to(DEV, torch.float16)
    x = _x((8, 3), torch.float32, scale=1e5).to(torch.float16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(NonFiniteBatchError):
        layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------------ the variants

def test_ghost_batchnorm_is_torch_batchnorm_per_virtual_batch():
    ours = bnn.GhostBatchNorm2d(5, virtual_batch_size=4).to(DEV, torch.float64)
    x = _x((12, 5, 3, 3), torch.float64).requires_grad_()
    y = ours(x)
    parts = [nn.functional.batch_norm(c, None, None, ours.weight, ours.bias, True, 0.0, ours.eps)
             for c in x.split(4)]
    _close(y, torch.cat(parts), torch.float64, "ghost output")
    dy = _x(x.shape, torch.float64, seed=3)
    (ga,) = torch.autograd.grad(y, x, dy)
    (gb,) = torch.autograd.grad(torch.cat(parts), x, dy)
    _close(ga, gb, torch.float64, "ghost input gradient")
    assert ours.running_mean.device == x.device


def test_masked_batchnorm_is_torch_batchnorm_on_the_valid_rows():
    ours = bnn.MaskedBatchNorm1d(4).to(DEV, torch.float64)
    x = _x((5, 4, 6), torch.float64)
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(2)) > 0.3
    mask = mask.to(DEV)
    y = ours(x, mask)
    rows = x.permute(0, 2, 1)[mask]  # (valid, C)
    ref = nn.BatchNorm1d(4).to(DEV, torch.float64)
    yr = ref(rows)
    _close(y.permute(0, 2, 1)[mask], yr, torch.float64, "valid positions")
    assert bool((y.permute(0, 2, 1)[~mask] == 0).all()), "padding is zero"
    _close(ours.running_mean, ref.running_mean, torch.float64, "running mean")
    _close(ours.running_var, ref.running_var, torch.float64, "running var")


def test_sequence_batchnorm_per_step_is_torch_batchnorm_per_step():
    T = 3
    ours = bnn.SequenceBatchNorm(4, per_step=True, max_steps=T).to(DEV, torch.float64)
    x = _x((7, T, 4), torch.float64)
    y = ours.forward_steps(x)
    for t in range(T):
        ref = nn.BatchNorm1d(4).to(DEV, torch.float64)
        _close(y[:, t], ref(x[:, t]), torch.float64, f"step {t}")
        _close(ours.running_mean[t], ref.running_mean, torch.float64, f"step {t} running mean")
        _close(ours.running_var[t], ref.running_var, torch.float64, f"step {t} running var")


def _cpu_and_device(module, *inputs, dtype=torch.float64):
    """(outputs, input gradients, parameter gradients, state) of ``module`` on CPU and on DEV."""
    res = []
    for dev in ("cpu", DEV):
        m = copy.deepcopy(module).to(dev, dtype)
        ins = [t.detach().to(dev).requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t
               for t in inputs]  # (integer tensors, such as lengths, stay where they are)
        out = m(*ins)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out) + torch.linspace(0, 1, out.numel(), dtype=out.dtype,
                                                           device=out.device).view_as(out))
        res.append((out.detach().cpu(), [t.grad.cpu() for t in ins if torch.is_tensor(t) and t.grad is not None],
                    {k: p.grad.cpu() for k, p in m.named_parameters() if p.grad is not None},
                    {k: v.cpu() for k, v in m.state_dict().items()}))
    return res


@pytest.mark.parametrize("make", [
    lambda: bnn.BatchRenorm2d(5, warmup_steps=0),
    lambda: bnn.BatchNormAct2d(5, act="relu"),
    lambda: bnn.FrozenBatchNorm2d(5),
], ids=["renorm", "act", "frozen"])
def test_variants_on_the_device_match_cpu(make):
    torch.manual_seed(1)
    m = make()
    x = _x((6, 5, 4, 4), torch.float64).cpu()
    (oa, ia, pa, sa), (ob, ib, pb, sb) = _cpu_and_device(m, x)
    _close(ob, oa, torch.float64, "output")
    for a, b in zip(ib, ia):
        _close(a, b, torch.float64, "input gradient")
    assert pa.keys() == pb.keys()
    for k in pa:
        _close(pb[k], pa[k], torch.float64, f"{k} gradient")
    for k in sa:
        _close(sb[k], sa[k], torch.float64, k)


# ------------------------------------------------------------------------------ the recurrent layers

@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_norm_none_loads_torch_and_gives_torch_numbers(mode, bidirectional):
    torch.manual_seed(0)
    theirs = getattr(nn, mode)(5, 7, 2, batch_first=True, bidirectional=bidirectional).to(DEV, torch.float64)
    ours = getattr(bnn, f"BN{mode}")(5, 7, 2, batch_first=True, bidirectional=bidirectional,
                                     norm="none").to(DEV, torch.float64)
    ours.load_state_dict(theirs.state_dict())
    x = _x((4, 6, 5), torch.float64)
    ya, yb = ours(x)[0], theirs(x)[0]
    _close(ya, yb, torch.float64, "output")
    ga = torch.autograd.grad(ya.sum(), list(ours.parameters()))
    gb = torch.autograd.grad(yb.sum(), list(theirs.parameters()))
    for a, b in zip(ga, gb):
        _close(a, b, torch.float64, "gradient")


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("norm", ["vertical", "horizontal", "per_timestep", "layer"])
def test_recurrent_layers_on_the_device_match_cpu(mode, norm):
    torch.manual_seed(2)
    m = getattr(bnn, f"BN{mode}")(5, 6, 2, batch_first=True, bidirectional=True, norm=norm, max_steps=7,
                                  force_loop=True)
    x = _x((4, 7, 5), torch.float64).cpu()
    lengths = torch.tensor([7, 5, 7, 3])
    (oa, ia, pa, sa), (ob, ib, pb, sb) = _cpu_and_device(m, x, None, lengths)
    _close(ob, oa, torch.float64, "output")
    _close(ib[0], ia[0], torch.float64, "input gradient")
    for k in pa:
        _close(pb[k], pa[k], torch.float64, f"{k} gradient")
    for k in sa:
        _close(sb[k], sa[k], torch.float64, k)


@pytest.mark.parametrize("norm", ["vertical", "per_timestep"])
def test_recurrent_padding_never_reaches_a_statistic_on_the_device(norm):
    a = bnn.BNLSTM(3, 4, batch_first=True, norm=norm, max_steps=5).to(DEV, torch.float64)
    b = copy.deepcopy(a)
    x = _x((3, 5, 3), torch.float64)
    lengths = torch.tensor([5, 2, 4])
    x2 = x.clone()
    x2[1, 2:] = 1e6  # any values in the padding
    x2[2, 4:] = float("nan")
    y1, y2 = a(x, lengths=lengths)[0], b(x2, lengths=lengths)[0]
    for row, n in enumerate(lengths.tolist()):
        _close(y2[row, :n], y1[row, :n], torch.float64, f"row {row}")
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


# ------------------------------------------------------------------------------ SyncBatchNorm

def test_sync_batchnorm_on_one_process_nccl_is_bnlab_batchnorm():
    if DEV != "cuda":
        pytest.skip("NCCL needs CUDA tensors")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        sync, plain = bnn.SyncBatchNorm(3).to(DEV), bnn.BatchNorm2d(3).to(DEV)
        for step in range(2):
            x = _x((6, 3, 4, 4), seed=step)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = sync(xa), plain(xb)
            _close(ya, yb, torch.float32, "output")
            ya.sum().backward()
            yb.sum().backward()
            _close(xa.grad, xb.grad, torch.float32, "input gradient")
        _same_state(sync, plain, torch.float32, "buffers")
    finally:
        dist.destroy_process_group()


SIZES = (5, 3)  # two processes' batches, unequal


def _sync_worker(rank, world, port, outdir, backend):
    torch.cuda.set_device(0) if DEV == "cuda" else None
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = _x((sum(SIZES), 3, 4, 4), seed=11)
        dy = _x(x.shape, seed=12)
        lo = sum(SIZES[:rank])
        layer = bnn.SyncBatchNorm(3).to(DEV)
        mine = x[lo:lo + SIZES[rank]].clone().requires_grad_()
        y = layer(mine)
        y.backward(dy[lo:lo + SIZES[rank]])
        torch.save({"y": y.detach().cpu(), "dx": mine.grad.cpu(), "dw": layer.weight.grad.cpu(),
                    "state": {k: v.cpu() for k, v in layer.state_dict().items()}}, f"{outdir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_two_processes_on_gloo_equal_the_whole_batch():
    """Two processes share the GPU (NCCL refuses two ranks on one device; gloo carries the CUDA
    tensors): their combined statistics are those of the whole batch."""
    with tempfile.TemporaryDirectory() as d:
        tmp.spawn(_sync_worker, args=(2, _free_port(), d, "gloo"), nprocs=2, join=True)
        got = [torch.load(f"{d}/{r}.pt") for r in range(2)]
    x = _x((sum(SIZES), 3, 4, 4), seed=11).requires_grad_()
    dy = _x(x.shape, seed=12)
    ref = nn.BatchNorm2d(3).to(DEV)
    y = ref(x)
    y.backward(dy)
    _close(torch.cat([g["y"] for g in got]), y, torch.float32, "outputs")
    _close(torch.cat([g["dx"] for g in got]), x.grad, torch.float32, "input gradients")
    _close(got[0]["dw"] + got[1]["dw"], ref.weight.grad, torch.float32, "summed weight gradient")
    for g in got:
        for k, v in ref.state_dict().items():
            if k.endswith("num_batches_tracked"):
                assert int(g["state"][k]) == int(v)
            else:
                _close(g["state"][k], v, torch.float32, k)


# ------------------------------------------------------------------------------ the tools

def _trained_eval_net():
    net = bnlab.convert(_net().to(DEV), to="bnlab", warn=False)
    _train_steps(net, steps=2)
    return net.eval()


def test_fold_keeps_the_outputs():
    net = _trained_eval_net()
    folded, report = bnlab.tools.fold(net)
    assert len([e for e in report if e.folded]) == 2
    x = _x((4, 3, 12, 12), seed=5)
    with torch.no_grad():
        _close(folded(x), net(x), torch.float32, "folded output")
    assert next(folded.parameters()).device == x.device


def test_freeze_and_recalibrate():
    net = _trained_eval_net().train()
    bnlab.tools.freeze(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _train_steps(net, steps=1)
    for k, v in net.state_dict().items():
        if "running" in k or "num_batches" in k:
            assert torch.equal(v, before[k]), k
    bnlab.tools.unfreeze(net)
    data = [(_x((16, 3, 12, 12), seed=20 + i), None) for i in range(3)]
    bnlab.tools.recalibrate(net, data, progress=False)
    # precise BN: the running statistics are the mean and unbiased variance over all three batches
    first = net[0]
    with torch.no_grad():
        acts = torch.cat([first(x) for x, _ in data])
    c = acts.transpose(0, 1).reshape(8, -1).double()
    _close(net[1].running_mean, c.mean(1), torch.float32, "recalibrated mean")
    _close(net[1].running_var, c.var(1), torch.float32, "recalibrated variance")
    assert net[1].running_mean.device == acts.device


def test_doctor_runs_on_a_device_model():
    net = nn.Sequential(nn.Linear(5, 8), bnn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8),
                        bnn.BatchNorm1d(8)).to(DEV)
    found = {(f.check, f.location) for f in bnlab.tools.doctor(net, _x((4, 5)), mode="train")}
    assert {("dropout-before-bn", "3"), ("small-batch-statistics", "1"), ("bias-before-bn", "0")} <= found, found
