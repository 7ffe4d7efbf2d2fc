"""bnlab.nn.BatchNormAct1d/2d/3d: batch norm, + residual, activation, fused in the kernels; and
bnlab.convert(fuse_act=True), which swaps them in for BN -> activation patterns."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnlab
from bnlab.nn.act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, from_batchnorm

ACTS = {"relu": torch.relu, "silu": nn.functional.silu, "gelu": nn.functional.gelu, None: lambda z: z}


def _pair(cls, tcls, c, act, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    ref = tcls(c, **kw).to(dtype)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours = cls(c, act=act, **kw).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


CASES = [
    (BatchNormAct1d, nn.BatchNorm1d, (32, 6)),
    (BatchNormAct1d, nn.BatchNorm1d, (8, 5, 7)),
    (BatchNormAct2d, nn.BatchNorm2d, (4, 6, 5, 7)),
    (BatchNormAct3d, nn.BatchNorm3d, (2, 3, 3, 4, 5)),
]


@pytest.mark.parametrize("act", ["relu", "silu", "gelu", None])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[2])) if isinstance(c, tuple) else None)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_equals_batch_norm_then_add_then_activation(case, act, residual, layout):
    cls, tcls, shape = case
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    ref, ours = _pair(cls, tcls, shape[1], act)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 2 + 1
    r = torch.randn(shape, generator=g) if residual else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        r = r.contiguous(memory_format=torch.channels_last) if r is not None else None
    for training in (True, False):
        ref.train(training)
        ours.train(training)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        rs = [None, None] if r is None else [r.clone().requires_grad_(), r.clone().requires_grad_()]
        z = ref(xs[0])
        yt = ACTS[act](z if rs[0] is None else z + rs[0])
        yb = ours(xs[1], rs[1])
        torch.testing.assert_close(yb, yt, rtol=1e-5, atol=1e-5)
        dy = torch.randn(shape, generator=g)
        yt.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
        if r is not None:
            torch.testing.assert_close(rs[1].grad, rs[0].grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
        ref.zero_grad()
        ours.zero_grad()


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck_in_float64(act, training):
    layer = BatchNormAct2d(3, act=act, dtype=torch.float64, track_running_stats=False).train(training)
    if not training:
        layer = BatchNormAct2d(3, act=act, dtype=torch.float64).eval()
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, r: layer(x, r), (x, r))
    assert torch.autograd.gradgradcheck(lambda x, r: layer(x, r), (x, r))
    # the parameters' gradients as well
    w, b = layer.weight, layer.bias
    assert torch.autograd.gradcheck(lambda x, w, b: _with_params(layer, w, b, x, r), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b: _with_params(layer, w, b, x, r), (x, w, b))


def _with_params(layer, w, b, x, r):
    """The layer's function with the parameters as explicit inputs (the path its forward takes)."""
    from bnlab import kernels

    if layer.training:
        return kernels.batch_norm_act_train(x, w, b, None, None, None, 0.1, layer.eps, act=layer.act, residual=r)
    return kernels.batch_norm_act_eval(x, layer.running_mean, layer.running_var, w, b, layer.eps, act=layer.act,
                                       residual=r)


def test_fused_kernels_serve_eager_cpu_float_and_the_guard_still_holds():
    layer = BatchNormAct2d(4)
    x = torch.randn(8, 4, 5, 5, requires_grad=True)
    y = layer(x)
    # one autograd node: the fused kernels (the small-call path's C++ node where it is built)
    assert "ActFn" in type(y.grad_fn).__name__ or y.grad_fn.name().endswith("CppNode<bnlab::BatchNorm>")
    before = layer.running_mean.clone()
    bad = torch.randn(8, 4, 5, 5)
    bad[0, 2, 0, 0] = float("nan")
    with pytest.raises(bnlab.functional.NonFiniteBatchError, match="channel"):
        layer(bad)
    assert torch.equal(layer.running_mean, before)


def test_state_dict_is_batch_norms_and_repr_shows_the_activation():
    bn = nn.BatchNorm2d(5)
    layer = BatchNormAct2d(5, act="silu")
    assert set(layer.state_dict()) == set(bn.state_dict())
    layer.load_state_dict(bn.state_dict())
    bn.load_state_dict(layer.state_dict())
    assert "act='silu'" in repr(layer)
    assert isinstance(layer, torch.nn.BatchNorm2d) and isinstance(layer, bnlab.nn.BatchNorm2d)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="BatchNormAct2d: act must be"):
        BatchNormAct2d(3, act="tanh")
    layer = BatchNormAct2d(3)
    with pytest.raises(ValueError, match=r"BatchNormAct2d: expected residual of the input's shape \(2, 3, 4, 4\)"):
        layer(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 1))


@pytest.mark.parametrize("half", [torch.bfloat16])
def test_half_precision_and_compile_take_the_same_math(half):
    ref, ours = _pair(BatchNormAct2d, nn.BatchNorm2d, 4, "relu")
    x = torch.randn(8, 4, 5, 5).to(half)
    r = torch.randn(8, 4, 5, 5).to(half)
    torch.testing.assert_close(ours(x, r).float(), torch.relu(ref(x) + r).float(), rtol=1e-2, atol=1e-2)
    torch._dynamo.reset()
    ref, ours = _pair(BatchNormAct2d, nn.BatchNorm2d, 4, "gelu")
    compiled = torch.compile(copy.deepcopy(ours), fullgraph=True)
    x = torch.randn(8, 4, 5, 5)
    torch.testing.assert_close(compiled(x), ours(x), rtol=1e-5, atol=1e-5)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.bn3 = nn.BatchNorm2d(4)
        self.bn4 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.act1(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + x)  # residual
        z = self.bn3(self.conv3(y))  # two users: not fused
        w = nn.functional.gelu(self.bn4(z + z), approximate="tanh")  # tanh gelu: not fused
        return z * 2 + w + nn.functional.silu(z)


def test_convert_fuse_act_fuses_exact_patterns_and_keeps_the_numbers():
    torch.manual_seed(0)
    ref = _Block()
    fused = bnlab.convert(copy.deepcopy(ref), to="bnlab", fuse_act=True)
    kinds = {name: type(m).__name__ for name, m in fused.named_modules() if "bn" in name}
    assert kinds == {"bn1": "BatchNormAct2d", "bn2": "BatchNormAct2d", "bn3": "BatchNorm2d", "bn4": "BatchNorm2d"}
    assert fused.bn1.act == "relu" and fused.bn2.act == "relu"
    assert not hasattr(fused, "act1")  # the absorbed ReLU module is gone
    for training in (True, False):
        ref.train(training)
        fused.train(training)
        x = torch.randn(3, 4, 6, 6)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        yr, yf = ref(xs[0]), fused(xs[1])
        torch.testing.assert_close(yf, yr, rtol=1e-5, atol=1e-5)
        yr.sum().backward()
        yf.sum().backward()
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-4)
    for (n, a), b in zip(ref.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)


def test_convert_fuse_act_traces_into_nested_blocks_and_bnlab_defined_models():
    """Submodules holding the patterns are traced into, also when their class is defined inside
    bnlab (the model benchmark's ResNet): only bnlab.nn's layers stay whole. 13 of the ResNet's 15
    batch norms are fused (the stem's and each block's two: BN -> ReLU and BN -> add -> ReLU); the
    two projection shortcuts' feed the fused layer's residual."""
    from bnlab.bench_models import resnet

    torch.manual_seed(0)
    ref = resnet()
    fused = bnlab.convert(copy.deepcopy(ref), to="bnlab", fuse_act=True)
    kinds = [type(m).__name__ for m in fused.modules()]
    assert kinds.count("BatchNormAct2d") == 13 and kinds.count("BatchNorm2d") == 2
    x = torch.randn(4, 3, 16, 16)
    for training in (True, False):
        ref.train(training)
        fused.train(training)
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)


def test_fold_keeps_a_norm_act_layers_activation_and_residual():
    torch.manual_seed(0)
    fused = bnlab.convert(_Block(), to="bnlab", fuse_act=True)
    x = torch.randn(2, 4, 6, 6)
    for _ in range(2):
        fused(torch.randn(8, 4, 6, 6))
    fused.eval()
    folded, report = bnlab.tools.fold(fused)
    names = {e.bn: e for e in report}
    assert names["bn1"].folded and names["bn2"].folded
    torch.testing.assert_close(folded(x), fused(x), rtol=1e-5, atol=1e-5)


def test_from_batchnorm_keeps_parameters_and_mode():
    bn = bnlab.nn.BatchNorm1d(3, momentum=None).eval()
    layer = from_batchnorm(bn, act="gelu")
    assert layer.weight is bn.weight and layer.momentum is None and not layer.training
    with pytest.raises(TypeError, match="expected a BatchNorm1d/2d/3d"):
        from_batchnorm(nn.LayerNorm(3))
