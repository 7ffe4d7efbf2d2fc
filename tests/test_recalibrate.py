"""Precise BN: recalibrate writes the full-data population statistics."""

import importlib

import pytest
import torch
from torch import nn

import bnlab
from bnlab import nn as bnn


def test_recalibrate_equals_full_data_statistics_with_equal_batches():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 8), bnn.BatchNorm1d(8, momentum=0.1), nn.ReLU(), nn.Linear(8, 4), nn.BatchNorm1d(4))
    data = 3 + 2 * torch.randn(120, 6)
    net.eval()
    bnlab.tools.recalibrate(net, data.split(30))
    assert not net.training and not net[1].training
    h = net[0](data).detach().double()
    torch.testing.assert_close(net[1].running_mean.double(), h.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var.double(), h.var(0, unbiased=True), rtol=1e-5, atol=1e-5)
    assert net[1].momentum == 0.1 and int(net[1].num_batches_tracked) == 0


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d", "float64"])
def test_the_kernel_statistics_and_the_torch_ops_give_the_population_statistics(layout, monkeypatch):
    # CPU float32/float64 inputs take bnlab's one-pass statistics kernel, other inputs torch ops: both
    # give the float64 statistics of the whole data, also for inputs with a large common offset
    torch.manual_seed(3)
    if layout == "2d":
        data = 1000 + 0.5 * torch.randn(96, 5)
    else:
        data = 1000 + 0.5 * torch.randn(96, 5, 3, 3)
        if layout == "channels_last":
            data = data.contiguous(memory_format=torch.channels_last)
    if layout == "float64":
        data = data.double()
    bn_cls = bnn.BatchNorm1d if layout == "2d" else bnn.BatchNorm2d
    dims = (0,) if layout == "2d" else (0, 2, 3)
    exact = data.double()
    results = []
    for kernel in (True, False):
        R = importlib.import_module("bnlab.tools.recalibrate")  # (bnlab.tools.recalibrate is also the function)

        if not kernel:  # the torch-ops path, which other devices and dtypes take
            monkeypatch.setattr(R, "_KERNEL_STATS", False)
            monkeypatch.setattr(R, "batch_stats", lambda *a, **k: (_ for _ in ()).throw(AssertionError("kernel")))
        bn = bn_cls(5, dtype=data.dtype).eval()
        try:
            bnlab.tools.recalibrate(bn, data.split(24))
        finally:
            monkeypatch.undo()
        results.append((bn.running_mean.double().clone(), bn.running_var.double().clone()))
        torch.testing.assert_close(bn.running_mean.double(), exact.mean(dims), rtol=0, atol=1e-4)
        torch.testing.assert_close(bn.running_var.double(), exact.var(dims, unbiased=True), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_recalibrate_takes_loader_style_batches_and_limits_the_count():
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))  # torch's layer works too
    xs = [torch.randn(4, 2, 3, 3) + i for i in range(5)]
    net.train()
    bnlab.tools.recalibrate(net, [(x, torch.zeros(4)) for x in xs], num_batches=2)
    assert net.training
    h = torch.cat([net[0](x) for x in xs[:2]]).detach()
    torch.testing.assert_close(net[1].running_mean, h.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, h.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# interrupted passes, the non-finite policy, every batch structure

import pytest  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

from bnlab.functional import NonFiniteBatchError  # noqa: E402


class _Mixed(nn.Module):
    """bnlab BN, torch BN, masked BN, a BN-LSTM (sequence BN inside) and an instance norm with
    running statistics (not recalibrated, but changed by a training-mode pass)."""

    def __init__(self, nonfinite="raise"):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = bnn.BatchNorm1d(4, nonfinite=nonfinite)
        self.tbn = nn.BatchNorm1d(4)
        self.masked = bnn.MaskedBatchNorm1d(4, nonfinite=nonfinite)
        self.lstm = bnn.BNLSTM(4, 5, 1, batch_first=True, norm="per_timestep")
        self.lstm.nonfinite = nonfinite
        self.inorm = nn.InstanceNorm1d(4, track_running_stats=True)

    def forward(self, x):  # x (B, T, 3)
        h = self.lin(x)  # (B, T, 4)
        flat = self.bn(h.reshape(-1, 4))
        flat = self.tbn(flat)
        seq = self.masked(flat.view(h.shape).transpose(1, 2))  # (B, 4, T)
        seq = self.inorm(seq)
        out, _ = self.lstm(seq.transpose(1, 2))
        return out


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def _trained_mixed(nonfinite="raise"):
    torch.manual_seed(0)
    m = _Mixed(nonfinite)
    for _ in range(2):
        m(torch.randn(6, 4, 3))
    return m


def test_an_interrupted_recalibration_leaves_every_layer_as_it_was():
    m = _trained_mixed()
    m.eval()
    m.lstm.train()  # mixed modes must come back too
    modes = {k: mod.training for k, mod in m.named_modules()}
    before = _state(m)

    def data():
        yield torch.randn(6, 4, 3)
        yield torch.randn(6, 4, 3)
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the pass

    with pytest.raises(KeyboardInterrupt):
        bnlab.tools.recalibrate(m, data())
    _assert_same_state(m, before)
    assert {k: mod.training for k, mod in m.named_modules()} == modes
    assert m.bn.momentum == 0.1 and not m.bn._forward_pre_hooks
    assert m.masked._population is None
    assert all(getattr(mod, "_population", None) is None for mod in m.modules())
    # nothing is stuck in population mode: training moves the running statistics again
    m.train()
    m(torch.randn(6, 4, 3) + 3)
    assert not torch.equal(m.masked.running_mean, before["masked.running_mean"])
    assert not torch.equal(m.lstm.norm_ih_l0.running_mean, before["lstm.norm_ih_l0.running_mean"])


def test_an_exception_inside_the_model_is_also_rolled_back():
    m = _trained_mixed()
    before = _state(m)
    calls = []

    def forward(model, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        model(batch)

    with pytest.raises(RuntimeError, match="boom"):
        bnlab.tools.recalibrate(m, [torch.randn(6, 4, 3) for _ in range(3)], forward=forward)
    _assert_same_state(m, before)


def test_only_the_recalibrated_statistics_change_after_a_pass():
    m = _trained_mixed()
    before = _state(m)
    bnlab.tools.recalibrate(m, [torch.randn(6, 4, 3) + 1 for _ in range(3)])
    after = m.state_dict()
    for k in before:
        changed = not torch.equal(after[k], before[k])
        recalibrated = ("running_mean" in k or "running_var" in k) and not k.startswith("inorm")
        assert changed == recalibrated, k


@pytest.mark.parametrize("where", [0, 1, 2])
def test_nonfinite_skip_keeps_a_nan_batch_out_of_every_layers_statistics(where):
    good = [torch.randn(6, 4, 3) + i for i in range(3)]
    bad = good[:where] + [torch.full((6, 4, 3), float("nan"))] + good[where:]
    a, b = _trained_mixed("skip"), _trained_mixed("skip")
    a.tbn = b.tbn = None  # torch's layer has no policy (it raises): leave it out here
    a.forward = _no_torch_bn(a)
    b.forward = _no_torch_bn(b)
    bnlab.tools.recalibrate(a, good)
    bnlab.tools.recalibrate(b, bad)
    for k, v in a.state_dict().items():
        assert torch.isfinite(b.state_dict()[k].double()).all(), k
        torch.testing.assert_close(b.state_dict()[k], v, msg=k)


def _no_torch_bn(m):
    def forward(x):
        h = m.lin(x)
        flat = m.bn(h.reshape(-1, 4))
        seq = m.masked(flat.view(h.shape).transpose(1, 2))
        seq = m.inorm(seq)
        return m.lstm(seq.transpose(1, 2))[0]
    return forward


def test_nonfinite_raise_names_the_layer_and_leaves_everything_unchanged():
    m = _trained_mixed("raise")
    before = _state(m)
    data = [torch.randn(6, 4, 3), torch.full((6, 4, 3), float("nan"))]
    with pytest.raises(NonFiniteBatchError, match=r"bn \(BatchNorm1d\): non-finite batch statistics \(nan\)"):
        bnlab.tools.recalibrate(m, data)
    _assert_same_state(m, before)
    torch_only = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(NonFiniteBatchError, match=r"1 \(BatchNorm1d\)"):  # torch's layers get "raise"
        bnlab.tools.recalibrate(torch_only, [torch.full((5, 3), float("nan"))])


def test_packed_sequence_batches_are_passed_as_they_are_and_equal_the_tensor_batches():
    torch.manual_seed(2)
    xs = [torch.randn(8, 5, 3) + 1 for _ in range(3)]
    a = bnn.BNLSTM(3, 4, 1, batch_first=True, norm="per_timestep")
    b = bnn.BNLSTM(3, 4, 1, batch_first=True, norm="per_timestep")
    b.load_state_dict(a.state_dict())
    bnlab.tools.recalibrate(a, xs)
    packed = [pack_padded_sequence(x, torch.full((8,), 5), batch_first=True) for x in xs]
    bnlab.tools.recalibrate(b, packed)
    assert torch.count_nonzero(b.norm_ih_l0.running_mean) > 0  # not the silent no-op it was
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, msg=k)
    c = bnn.BNLSTM(3, 4, 1, batch_first=True, norm="per_timestep")
    c.load_state_dict(a.state_dict())
    bnlab.tools.recalibrate(c, [(p, torch.zeros(8)) for p in packed])  # (input, target) with a packed input
    torch.testing.assert_close(c.norm_ih_l0.running_var, a.norm_ih_l0.running_var)


def test_batches_as_tuples_lists_dicts_and_a_forward_hook_give_the_same_statistics():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 3), bnn.BatchNorm1d(3))
    xs = [torch.randn(10, 4) * 2 + 1 for _ in range(3)]
    expect = None
    structures = {
        "tensor": (xs, None),
        "tuple": ([(x, torch.zeros(10)) for x in xs], None),
        "list": ([[x, torch.zeros(10)] for x in xs], None),
        "dict input": ([{"target": torch.zeros(10), "input": x} for x in xs], None),
        "dict first": ([{"x": x, "y": torch.zeros(10)} for x in xs], None),
        "forward hook": ([{"features": {"a": x}} for x in xs], lambda m, b: m(b["features"]["a"])),
    }
    for what, (data, fwd) in structures.items():
        net[1].reset_running_stats()
        bnlab.tools.recalibrate(net, data, forward=fwd)
        got = (net[1].running_mean.clone(), net[1].running_var.clone())
        if expect is None:
            expect = got
            h = net[0](torch.cat(xs)).detach()
            torch.testing.assert_close(got[0], h.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[0], expect[0], msg=what)
        torch.testing.assert_close(got[1], expect[1], msg=what)


# ----------------------------------------------------------------------------------------------
# progress bar


class _FakeBar:
    def __init__(self, total):
        self.total, self.done, self.stopped = total, [], False

    def update(self, task, completed):
        self.done.append(completed)

    def stop(self):
        self.stopped = True


def _spy(monkeypatch):
    import importlib

    R = importlib.import_module("bnlab.tools.recalibrate")  # the module (bnlab.tools.recalibrate is also the function)
    bars = []

    def new(total):
        bars.append(_FakeBar(total))
        return bars[-1], 0

    monkeypatch.setattr(R, "_new_progress", new)
    return R, bars


def _net_and_batches(n=5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), bnn.BatchNorm1d(3)), list(torch.randn(10 * n, 4).split(10))


def test_progress_true_shows_a_bar_over_every_batch_and_closes_it(monkeypatch):
    _, bars = _spy(monkeypatch)
    net, batches = _net_and_batches()
    bnlab.tools.recalibrate(net, batches, num_batches=4, progress=True)
    assert len(bars) == 1 and bars[0].total == 4 and bars[0].done == [1, 2, 3, 4] and bars[0].stopped


def test_progress_false_and_a_non_tty_default_show_nothing(monkeypatch):
    R, bars = _spy(monkeypatch)
    monkeypatch.setattr(R, "PROGRESS_AFTER_S", 0.0)
    net, batches = _net_and_batches()
    bnlab.tools.recalibrate(net, batches, progress=False)
    monkeypatch.setattr(R.sys, "stderr", type("NotATTY", (), {"isatty": lambda self: False})())
    bnlab.tools.recalibrate(net, batches)  # default: a non-TTY stderr (logs, CI) gets no bar
    assert bars == []


def test_the_default_shows_a_bar_on_a_terminal_only_once_the_pass_runs_long(monkeypatch):
    R, bars = _spy(monkeypatch)
    monkeypatch.setattr(R.sys, "stderr", type("TTY", (), {"isatty": lambda self: True})())
    net, batches = _net_and_batches()
    bnlab.tools.recalibrate(net, batches)  # a short pass: under PROGRESS_AFTER_S
    assert bars == []
    monkeypatch.setattr(R, "PROGRESS_AFTER_S", 0.0)  # every pass "long"
    bnlab.tools.recalibrate(net, iter(batches))  # no len(): a bar without a total
    assert len(bars) == 1 and bars[0].total is None and bars[0].done == [1, 2, 3, 4, 5] and bars[0].stopped


def test_an_interrupted_pass_closes_its_bar(monkeypatch):
    _, bars = _spy(monkeypatch)
    net, batches = _net_and_batches()

    def data():
        yield batches[0]
        raise KeyboardInterrupt

    try:
        bnlab.tools.recalibrate(net, data(), progress=True)
    except KeyboardInterrupt:
        pass
    assert len(bars) == 1 and bars[0].stopped


def test_the_real_rich_bar_runs_and_changes_no_statistic(capsys):
    net, batches = _net_and_batches()
    bnlab.tools.recalibrate(net, batches, progress=True)
    quiet, _ = _net_and_batches()
    bnlab.tools.recalibrate(quiet, batches, progress=False)
    torch.testing.assert_close(net[1].running_mean, quiet[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(net[1].running_var, quiet[1].running_var, rtol=0, atol=0)
