"""bnlab's torch.library custom ops: opcheck, gradcheck, and torch.compile(fullgraph=True) of a
small conv + BatchNorm2d + ReLU net matching eager mode (outputs, gradients, running statistics).
Compilation is slow on 2 cores: one compiled model, reused for every check."""

import copy

import pytest
import torch

import bnlab
from bnlab.kernels import NonFiniteBatchError, ops


def _inputs(layout, dtype=torch.float64):
    x = torch.randn(4, 3, 5, 5, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "2d":
        x = torch.randn(12, 3, dtype=dtype)
    w = (torch.rand(3, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=dtype, requires_grad=True)
    return x.requires_grad_(), w, b


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
def test_opcheck_passes_on_every_op(layout):
    x, w, b = _inputs(layout)
    y, stats = ops.batch_norm_train(x, w, b, 1e-5)
    torch.library.opcheck(ops.batch_norm_train, (x, w, b, 1e-5))
    torch.library.opcheck(ops.batch_norm_train, (x, None, None, 1e-5))
    torch.library.opcheck(ops.batch_norm_eval, (x, w, b, stats.detach()))
    dy = torch.randn_like(y)
    torch.library.opcheck(ops.batch_norm_backward, (dy, x.detach(), w.detach(), stats.detach(), True))
    torch.library.opcheck(ops.batch_norm_backward, (dy, x.detach(), None, stats.detach(), False))
    rm, rv, nbt = torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype), torch.tensor(0)
    torch.library.opcheck(ops.update_running_stats, (rm, rv, nbt, stats.detach(), 100, 0.1, False, "raise", "bn"))
    torch.library.opcheck(ops.update_running_stats, (None, None, nbt, stats.detach(), 100, 0.0, True, "raise", "bn"))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_custom_ops_pass_gradcheck_in_float64(layout):
    x, w, b = _inputs(layout)
    x = x.detach()[:2, :, :3, :3].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: ops.batch_norm_train(x, w, b, 1e-3)[0], (x, w, b))
    stats = ops.batch_norm_train(x, w, b, 1e-3)[1].detach()
    assert torch.autograd.gradcheck(lambda x, w, b: ops.batch_norm_eval(x, w, b, stats), (x, w, b))


def test_update_op_applies_the_nonfinite_policy_inside():
    rm, rv, nbt = torch.zeros(2), torch.ones(2), torch.tensor(0)
    stats = torch.tensor([[0.0, float("nan")], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    with pytest.raises(NonFiniteBatchError, match=r"bnX.*\[1\]"):
        ops.update_running_stats(rm, rv, nbt, stats, 10, 0.1, False, "raise", "bnX")
    ops.update_running_stats(rm, rv, nbt, stats, 10, 0.1, False, "skip", "bnX")
    assert torch.equal(rm, torch.zeros(2)) and torch.equal(rv, torch.ones(2)) and int(nbt) == 0


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = bnlab.nn.BatchNorm2d(6)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def test_compile_fullgraph_conv_bn_relu_matches_eager_in_training_and_eval():
    torch._dynamo.reset()
    eager = _Net()
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, fullgraph=True)
    for step in range(2):
        x = torch.randn(4, 3, 6, 6)
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        ye.square().sum().backward()
        yc.square().sum().backward()
        scale = float(eager.conv.weight.grad.abs().max())
        for (name, pe), pc in zip(eager.named_parameters(), compiled_net.parameters()):
            # the conv bias feeds a batch norm, so its gradient is 0 up to float32 rounding, whose
            # size depends on the order of the sums (torch's own compiled batch norm: ~1e-4 here)
            atol = 1e-5 * scale if name == "conv.bias" else 1e-5
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=atol, msg=name)
        torch.testing.assert_close(compiled_net.bn.running_mean, eager.bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled_net.bn.running_var, eager.bn.running_var, rtol=1e-5, atol=1e-6)
        assert int(compiled_net.bn.num_batches_tracked) == int(eager.bn.num_batches_tracked) == step + 1
    # a non-finite batch raises from inside the compiled graph and leaves the buffers alone
    before = compiled_net.bn.running_mean.clone()
    bad = torch.randn(4, 3, 6, 6)
    bad[0, :, 0, 0] = float("nan")
    with pytest.raises(Exception, match="non-finite"):
        compiled(bad)
    assert torch.equal(compiled_net.bn.running_mean, before) and int(compiled_net.bn.num_batches_tracked) == 2
    eager.eval()
    compiled_net.eval()
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


def test_on_an_unverified_torch_compiled_training_runs_each_batch_norm_eagerly(monkeypatch):
    """Where bnlab.kernels.COMPILED_TRAIN_OK is False (torch before 2.13: torch 2.11 gave zero
    gradients through the traced batch norm), a compiled model's batch norms break the graph and run
    eagerly: no call reaches the traced form, and the gradients are eager's."""
    from bnlab import kernels

    torch._dynamo.reset()
    monkeypatch.setattr(kernels, "COMPILED_TRAIN_OK", False)
    traced = []
    real = kernels._compiled_train
    monkeypatch.setattr(kernels, "_compiled_train", lambda *a, **k: traced.append(1) or real(*a, **k))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), bnlab.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    ref = copy.deepcopy(net)
    x = torch.randn(5, 3, 8, 8)
    out = torch.compile(net)(x)
    out.square().sum().backward()
    ref(x).square().sum().backward()
    assert traced == []
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=0, msg=k)
    torch._dynamo.reset()
