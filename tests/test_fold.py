"""bnlab.tools.fold: eval-mode batch norms folded into the conv / linear layer feeding them, on traced
graphs (residual blocks, groups, dilation, bias=False, channels_last, transposed convs, linear heads),
exactly where it is exact and reported where it is not; the folded model exports to ONNX."""

import copy
import doctest
import importlib

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.tools import FoldReport, UntraceableModelError, fold


def _train_stats(model: nn.Module, make_input, steps: int = 3) -> nn.Module:
    """Move every batch norm's statistics and parameters away from their initial values; eval mode."""
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
        for _ in range(steps):
            model(make_input() * 2 + 0.5)
    return model.eval()


def _assert_same(folded, model, x):
    with torch.no_grad():
        ref = model(x)
        out = folded(x)
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * scale)


class Block(nn.Module):
    """A residual block: dilated grouped conv without bias, torch's and bnlab's batch norms."""

    def __init__(self, c, groups=1):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=2, dilation=2, groups=groups, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, groups=groups, padding_mode="reflect")
        self.b2 = bnn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(x + self.b2(self.c2(y)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(Block(8), Block(8, groups=4))
        self.up = nn.ConvTranspose2d(8, 12, 3, stride=2, groups=4, bias=False)
        self.bnu = nn.BatchNorm2d(12)
        self.side = nn.Conv2d(12, 12, 1)
        self.bns = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 6)
        self.bnf = bnn.BatchNorm1d(6)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        x = self.bnu(self.up(x))
        z = self.side(x)
        x = self.bns(z) + z  # side's output feeds the batch norm and the sum: not foldable
        return self.bnf(self.fc(x.mean((2, 3))))


def _net(channels_last=False) -> Net:
    torch.manual_seed(1)
    net = Net()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return _train_stats(net, lambda: torch.randn(8, 3, 12, 12))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_a_residual_conv_net_folds_to_the_eval_output(channels_last):
    net = _net(channels_last)
    before = copy.deepcopy(net.state_dict())
    folded, report = fold(net)
    assert isinstance(folded, torch.fx.GraphModule) and isinstance(report, FoldReport)
    assert {(e.producer, e.bn) for e in report.folded} == {
        ("stem", "bn"), ("blocks.0.c1", "blocks.0.b1"), ("blocks.0.c2", "blocks.0.b2"),
        ("blocks.1.c1", "blocks.1.b1"), ("blocks.1.c2", "blocks.1.b2"), ("up", "bnu"), ("fc", "bnf")}
    [skipped] = report.not_folded
    assert (skipped.producer, skipped.bn) == ("side", "bns") and "also feeds" in skipped.reason
    # the folded batch norms are gone, the other one is still there
    remaining = [n for n, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert remaining == ["bns"]
    assert folded.get_submodule("blocks.0.c1").bias is not None  # bias=False: a bias is created
    x = torch.randn(4, 3, 12, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        assert folded.get_submodule("stem").weight.is_contiguous(memory_format=torch.channels_last)
    _assert_same(folded, net, x)
    # the model given is left as it was (inplace=False)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    text = str(report)
    assert text.startswith("fold: 7 of 8 batch-norm layer(s) folded")
    assert "not folded  side -> bns: the producer's output also feeds" in text


@pytest.mark.parametrize("conv,bn,shape", [
    (lambda: nn.Conv1d(4, 6, 3, groups=2, dilation=2), nn.BatchNorm1d, (5, 4, 11)),
    (lambda: nn.Conv3d(4, 6, 3, bias=False), nn.BatchNorm3d, (3, 4, 5, 5, 5)),
    (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), nn.BatchNorm1d, (5, 4, 7)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, dilation=2, output_padding=1, bias=False), nn.BatchNorm2d,
     (3, 4, 5, 5)),
    (lambda: nn.ConvTranspose3d(6, 9, 2, stride=2, groups=3), nn.BatchNorm3d, (2, 6, 3, 3, 3)),
], ids=["conv1d-groups", "conv3d", "convT1d-groups", "convT2d-dilation", "convT3d-groups"])
def test_every_conv_kind_folds(conv, bn, shape):
    torch.manual_seed(2)
    c = conv()
    net = _train_stats(nn.Sequential(c, bn(c.out_channels), nn.ReLU()), lambda: torch.randn(*shape))
    folded, report = fold(net)
    assert len(report.folded) == 1
    _assert_same(folded, net, torch.randn(*shape))


def test_a_linear_net_folds_and_an_input_of_another_rank_is_refused():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8, bias=False),
                        bnn.BatchNorm1d(8), nn.Linear(8, 3))
    net = _train_stats(net, lambda: torch.randn(32, 10))
    folded, report = fold(net)
    assert [(e.producer, e.bn, e.folded) for e in report] == [("0", "1", True), ("3", "4", True)]
    assert "guard: 2D input only" in report[0].reason
    _assert_same(folded, net, torch.randn(7, 10))
    # (N, L, C) input: BatchNorm1d would normalize dim 1 (L), not the linear layer's features
    net3 = _train_stats(nn.Sequential(nn.Linear(10, 4), nn.BatchNorm1d(4)), lambda: torch.randn(8, 4, 10))
    folded3, _ = fold(net3)
    with pytest.raises(Exception, match=r"'0' was folded with batch norm '1', exact only on 2D input"):
        folded3(torch.randn(8, 4, 10))
    # with example inputs the pair is reported and left alone instead
    x3 = torch.randn(8, 4, 10)
    folded3, report3 = fold(net3, example_inputs=(x3,))
    assert not report3[0].folded and "output is 3D (8, 4, 4)" in report3[0].reason
    _assert_same(folded3, net3, x3)


def test_training_mode_and_statistics_free_layers_are_reported_not_folded():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                        nn.BatchNorm2d(4, track_running_stats=False))
    net.eval()
    net[1].train()
    before = copy.deepcopy(net.state_dict())
    folded, report = fold(net, example_inputs=torch.randn(4, 3, 5, 5))
    assert not report.folded
    assert report[0].producer == "0"
    assert "in training mode" in report[0].reason and "model.eval()" in report[0].reason
    # checking shapes ran a forward: the training-mode layer's statistics are restored
    assert all(torch.equal(v, before[k]) for k, v in folded.state_dict().items())
    assert "track_running_stats=False" in report[1].reason
    with torch.no_grad():
        x = torch.randn(4, 3, 5, 5)
        torch.testing.assert_close(folded(x), copy.deepcopy(net)(x))


class Shared(nn.Module):
    """A batch norm called twice, a conv called twice, a conv fed functionally."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.bn_twice = nn.BatchNorm2d(3)
        self.b = nn.Conv2d(3, 3, 1)
        self.bn_b = nn.BatchNorm2d(3)
        self.bn_fn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn_twice(self.a(x)) + self.bn_twice(x)
        z = self.bn_b(self.b(y)) + self.b(x)
        return self.bn_fn(torch.nn.functional.conv2d(z, self.a.weight))


def test_shared_layers_and_functional_producers_are_reported():
    net = _train_stats(Shared(), lambda: torch.randn(4, 3, 5, 5))
    folded, report = fold(net)
    reasons = {e.bn: e.reason for e in report}
    assert not report.folded
    assert "called 2 times" in reasons["bn_twice"]
    assert "the producer is called 2 times" in reasons["bn_b"]
    assert "not a layer's output" in reasons["bn_fn"]
    _assert_same(folded, net, torch.randn(2, 3, 5, 5))


def test_tied_weights_are_not_folded():
    lin = nn.Linear(4, 4)
    net = nn.Sequential(lin, nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    net[2].weight = lin.weight  # tied: folding one would change the other
    net = _train_stats(net, lambda: torch.randn(16, 4))
    folded, report = fold(net)
    assert not report.folded and all("shared with" in e.reason for e in report)
    _assert_same(folded, net, torch.randn(5, 4))


def test_inplace_folds_into_the_models_own_layers():
    net = _net()
    ref = copy.deepcopy(net)
    folded, report = fold(net, inplace=True)
    assert folded.get_submodule("stem") is net.stem
    assert isinstance(net.bn, nn.Identity) and isinstance(net.blocks[0].b1, nn.Identity)
    assert isinstance(net.bns, nn.BatchNorm2d)  # not folded, kept
    x = torch.randn(3, 3, 12, 12)
    _assert_same(folded, ref, x)
    _assert_same(net, ref, x)  # the model itself computes the folded network


def test_frozen_batch_norms_fold_too():
    net = _train_stats(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)), lambda: torch.randn(4, 3, 6, 6))
    frozen = bnn.convert_frozen_batchnorm(copy.deepcopy(net)).train()  # frozen layers fold in any mode
    folded, report = fold(frozen)
    assert len(report.folded) == 1
    _assert_same(folded, net, torch.randn(2, 3, 6, 6))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2))

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:  # data-dependent control flow
            y = y * 2
        return self.head(y.mean((2, 3)))


def test_an_untraceable_model_raises_naming_the_cause_or_folds_its_children():
    net = _train_stats(Untraceable(), lambda: torch.randn(4, 3, 6, 6))
    with pytest.raises(UntraceableModelError, match=r"torch.fx cannot trace the model \(Untraceable\): TraceError"):
        fold(net)
    folded, report = fold(net, untraceable="children")
    assert type(folded) is Untraceable
    assert {(e.producer, e.bn) for e in report.folded} == {("body.0", "body.1"), ("head.0", "head.1")}
    _assert_same(folded, net, torch.randn(2, 3, 6, 6))


class _Layer(nn.Module):
    """A layer that holds a batch norm and is a leaf for fold (as bnlab's own layers are)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x))


_Layer.__module__ = "bnlab.nn.example"


def test_batch_norms_inside_layers_fold_does_not_enter_are_reported():
    model = _train_stats(nn.Sequential(nn.ReLU(), _Layer()), lambda: torch.randn(4, 3, 2, 2))
    folded, report = fold(model)
    [entry] = report
    assert (entry.bn, entry.folded) == ("1.bn", False) and "inside '1' (_Layer)" in entry.reason
    _assert_same(folded, model, torch.randn(2, 3, 2, 2))


def test_the_folded_model_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    net = _net()
    folded, report = fold(net)
    x = torch.randn(4, 3, 12, 12)
    path = tmp_path / "folded.onnx"
    torch.onnx.export(folded, (x,), str(path), dynamo=True, dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("BatchNormalization") == 1  # only the layer that could not fold
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for n in (4, 6):
        xb = torch.randn(n, 3, 12, 12)
        (out,) = sess.run(None, {name: xb.numpy()})
        with torch.no_grad():
            ref = net(xb)
        torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_the_docstring_examples_run():
    result = doctest.testmod(importlib.import_module("bnlab.tools.fold"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
