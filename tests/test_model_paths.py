"""bnlab's batch norm on the paths whole models take: torch.compile (batch norm traced as torch ops
that inductor fuses), bf16/float16 autocast (torch's kernel, statistics from the same call), and the
model benchmark's models and configurations."""

from __future__ import annotations

import copy
import types

import pytest
import torch

import bnlab
from bnlab import bench_models as bm
from bnlab.policy import NonFiniteBatchError


class _Net(torch.nn.Module):
    def __init__(self, c: int = 6, conv: bool = True) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, c, 3, padding=1) if conv else torch.nn.Identity()
        self.bn = bnlab.nn.BatchNorm2d(c)

    def forward(self, x, r=None):
        y = self.bn(self.conv(x))
        if r is not None:
            y = y + r
        return torch.relu(y)


def _compiled_pair(dtype=torch.float32, conv=True, **bn):
    torch._dynamo.reset()
    eager = _Net(conv=conv).to(dtype)
    for k, v in bn.items():
        setattr(eager.bn, k, v)
    net = copy.deepcopy(eager)
    return eager, net, torch.compile(net, fullgraph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_training_with_a_large_mean_matches_eager(dtype):
    """The compiled statistics (one Welford var_mean) keep their precision when the mean dwarfs the
    spread: x = 1e4 + N(0, 1) in float32 (a naive E[x^2] - E[x]^2 would lose every digit)."""
    eager, net, compiled = _compiled_pair(dtype, conv=False)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x = (1e4 + torch.randn(8, 6, 7, 7, generator=g, dtype=torch.float64)).to(dtype)
        r = torch.randn(8, 6, 7, 7, generator=g, dtype=dtype)
        ye, yc = eager(x, r), compiled(x, r)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(yc, ye, **tol)
        ye.square().sum().backward()
        yc.square().sum().backward()
        for (name, pe), pc in zip(eager.named_parameters(), net.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-3 if dtype == torch.float32 else 1e-8,
                                       atol=1e-2 if dtype == torch.float32 else 1e-8, msg=name)
        torch.testing.assert_close(net.bn.running_mean, eager.bn.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(net.bn.running_var, eager.bn.running_var, rtol=1e-3, atol=1e-4)
        assert int(net.bn.num_batches_tracked) == step + 1
    eager.eval()
    net.eval()
    x = (1e4 + torch.randn(8, 6, 7, 7, generator=g, dtype=torch.float64)).to(dtype)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)


def test_compiled_cumulative_momentum_matches_eager():
    eager, net, compiled = _compiled_pair(momentum=None)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5)
        eager(x)
        compiled(x)
    torch.testing.assert_close(net.bn.running_mean, eager.bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.bn.running_var, eager.bn.running_var, rtol=1e-5, atol=1e-6)


def test_compiled_nonfinite_policy_raise_and_skip():
    _, net, compiled = _compiled_pair()
    compiled(torch.randn(4, 3, 5, 5))
    before = [b.clone() for b in net.bn.buffers()]
    bad = torch.randn(4, 3, 5, 5)
    bad[1, :, 2, 2] = float("inf")
    with pytest.raises(NonFiniteBatchError, match="non-finite"):
        compiled(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, net.bn.buffers()))
    _, net, compiled = _compiled_pair(nonfinite="skip")
    compiled(torch.randn(4, 3, 5, 5))
    before = [b.clone() for b in net.bn.buffers()]
    compiled(bad)  # skipped: no error, nothing moves
    assert all(torch.equal(a, b) for a, b in zip(before, net.bn.buffers()))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_compiled_update_follows_the_policy_like_eager(momentum):
    """The compiled running update (torch ops, a select on the policy's flag) against eager, step by
    step: an overflowing float32 batch (finite input, variance beyond float32's range) raises under
    "raise" and is skipped under "skip" without counting, and the cumulative factor of later
    batches counts only the batches that entered the buffers."""
    g = torch.Generator().manual_seed(0)
    good = [torch.randn(4, 6, 5, 5, generator=g) for _ in range(3)]
    over = torch.randn(4, 6, 5, 5, generator=g)
    over[0, 1] = 3e38
    over[1, 1] = -3e38
    eager, net, compiled = _compiled_pair(conv=False, momentum=momentum, nonfinite="skip")
    for x in (good[0], over, good[1], over, good[2]):
        eager(x)
        compiled(x)
        for name, be in eager.bn.named_buffers():
            bc = dict(net.bn.named_buffers())[name]
            torch.testing.assert_close(bc, be, rtol=1e-5, atol=1e-6, msg=name)
    assert int(net.bn.num_batches_tracked) == 3
    _, net, compiled = _compiled_pair(conv=False, momentum=momentum)
    compiled(good[0])
    before = [b.clone() for b in net.bn.buffers()]
    # (the compiled statistics are float32 sums, where this batch reads as inf; eager's float64 sums
    # see a finite mean and an overflowing variance)
    with pytest.raises(NonFiniteBatchError, match=r"(inf|overflow).*channel\(s\) \[1\]"):
        compiled(over)
    assert all(torch.equal(a, b) for a, b in zip(before, net.bn.buffers()))


def test_compiled_batch_norm_is_torch_ops_that_inductor_can_fuse():
    """No opaque bnlab op in the traced forward: batch norm appears as torch ops (so inductor fuses
    it with the convolution, the residual add and the ReLU); the running-statistics update is torch
    ops too (a select on the policy's flag, written into the buffers), and the only bnlab op is the
    non-finite check of that flag, on C-sized data."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch._dynamo.reset()
    net = _Net()
    backend = AotEagerAndRecordGraphs()
    torch.compile(net, backend=backend, fullgraph=True)(torch.randn(4, 3, 5, 5))
    code = "\n".join(g.code for g in backend.fw_graphs)
    assert "bnlab.batch_norm_train" not in code and "bnlab::batch_norm_train" not in code
    assert "var_mean" in code
    assert "update_running_stats" not in code
    assert "bnlab.check_batch" in code and "torch.ops.aten.where" in code
    assert "copy_" in code  # the buffers written in the graph


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_autocast_half_matches_torch_and_guards(half):
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    ours = bnlab.convert(copy.deepcopy(ref), to="bnlab", warn=False)
    x = torch.randn(16, 3, 9, 9) * 2 + 3
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = []
    for m, xi in zip((ref, ours), xs):
        with torch.autocast("cpu", dtype=half):
            y = m(xi)
        outs.append(y)
        y.float().square().mean().backward()
    assert outs[1].dtype == outs[0].dtype == half
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=0, atol=0)  # torch's kernel: same numbers
    torch.testing.assert_close(xs[1].grad, xs[0].grad)
    torch.testing.assert_close(ours[1].weight.grad, ref[1].weight.grad)
    torch.testing.assert_close(ours[1].running_mean, ref[1].running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1].running_var, ref[1].running_var, rtol=1e-5, atol=1e-6)
    # the guard still catches a NaN, and the buffers stay as they were
    before = ours[1].running_mean.clone()
    bad = x.clone()
    bad[2, 1, 4, 4] = float("nan")
    with torch.autocast("cpu", dtype=half), pytest.raises(NonFiniteBatchError, match=r"nan.*channel"):
        ours(bad)
    assert torch.equal(ours[1].running_mean, before)


def test_half_input_outside_autocast_uses_one_pass_statistics():
    bn, tb = bnlab.nn.BatchNorm1d(5).bfloat16(), torch.nn.BatchNorm1d(5).bfloat16()
    x = (torch.randn(64, 5) * 4 + 1).bfloat16()
    torch.testing.assert_close(bn(x).float(), tb(x).float(), rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var.float(), tb.running_var.float(), rtol=1e-2, atol=1e-2)


def test_model_suite_runs_every_model_and_configuration_quickly():
    args = types.SimpleNamespace(quick=True, repeats=3, models=("mlp", "resnet", "lstm"),
                                 configs=("eager", "channels_last", "bf16", "inference"), batch=8)
    res = bm.run_models_suite(args)
    assert res["batch"] == 8
    rows = {(r["model"], r["config"]): r for r in res["rows"]}
    assert "skipped" in rows[("mlp", "channels_last")]
    # torch's bf16 LSTM (oneDNN) has no kernel on CPUs without AVX-512: that row may say so instead
    assert "skipped" not in rows[("lstm", "bf16")] or "torch's own step fails" in rows[("lstm", "bf16")]["skipped"]
    for key in [("mlp", "eager"), ("resnet", "bf16"), ("resnet", "channels_last"), ("lstm", "inference")]:
        r = rows[key]
        assert r["torch_ms"] > 0 and r["bnlab_ms"] > 0
        assert r["ratio"] == pytest.approx(r["torch_ms"] / r["bnlab_ms"])
        lo, hi = r["ratio_iqr"]
        assert 0 < lo <= hi
    assert "torch time / bnlab time" in res["ratio"]
    table = bm.format_rows(res)
    assert len(table) == len(res["rows"])
    assert all(len(row) == 8 for row in table)


def test_a_torch_baseline_that_fails_here_is_reported_not_raised(monkeypatch):
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            raise RuntimeError("could not create a primitive descriptor\nmore")

    real = bm._pair
    monkeypatch.setattr(bm, "_pair", lambda model, fused=False: (Broken(), real(model, fused)[1]))
    args = types.SimpleNamespace(quick=True, repeats=3, models=("mlp",), configs=("inference",))
    (row,) = bm.run_models_suite(args)["rows"]
    assert row["skipped"] == ("torch's own step fails on this machine: RuntimeError: "
                              "could not create a primitive descriptor")
    assert bm.format_rows({"rows": [row]})[0][-1].startswith("not measured: torch's own step fails")


def test_quartiles_of_the_per_round_ratios():
    assert bm._quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0)
    assert bm._quartiles([0.9]) == (0.9, 0.9)


def test_model_suite_pairs_start_from_the_same_weights():
    ref, ours = bm._pair("resnet")
    assert sum(isinstance(m, bnlab.nn.BatchNorm2d) for m in ours.modules()) == 15
    assert not any(isinstance(m, bnlab.nn.BatchNorm2d) for m in ref.modules())
    x = torch.randn(2, 3, 32, 32)
    ref.eval()
    ours.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
