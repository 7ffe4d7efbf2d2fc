"""Accumulation-aware running statistics: ``accumulate=k`` on bnlab's batch norms and the
``bnlab.tools.accumulate(model, k)`` context manager. k micro-batches of size b leave the running
statistics and num_batches_tracked one batch of k * b leaves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from bnlab.functional import NonFiniteBatchError


def _micro_batches(shape, k, windows=1, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) * (1 + i) + 3 * i for i in range(k * windows)]


def _assert_same_stats(a, b, rtol=1e-12, atol=1e-12):
    torch.testing.assert_close(a.running_mean, b.running_mean, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=rtol, atol=atol)
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
@pytest.mark.parametrize("cls,shape", [(bnlab.nn.BatchNorm1d, (8, 5)), (bnlab.nn.BatchNorm1d, (4, 5, 3)),
                                       (bnlab.nn.BatchNorm2d, (4, 3, 2, 3))], ids=["1d", "1d-3D", "2d"])
def test_k_micro_batches_leave_the_statistics_of_one_batch(cls, shape, momentum):
    k, windows = 4, 3
    c = shape[1]
    acc = cls(c, momentum=momentum, accumulate=k, dtype=torch.float64)
    big = cls(c, momentum=momentum, dtype=torch.float64)
    theirs = getattr(nn, cls.__name__)(c, momentum=momentum, dtype=torch.float64)
    xs = _micro_batches(shape, k, windows)
    for w in range(windows):
        for i, x in enumerate(xs[w * k:(w + 1) * k]):
            acc(x)
            assert acc.pending_micro_batches == (i + 1) % k
        whole = torch.cat(xs[w * k:(w + 1) * k])
        big(whole)
        theirs(whole)
        _assert_same_stats(acc, big)
        _assert_same_stats(acc, theirs, rtol=1e-10, atol=1e-12)
    assert int(acc.num_batches_tracked) == windows


def test_float32_buffers_match_one_batch_to_rounding():
    acc, big = bnlab.nn.BatchNorm2d(3, accumulate=3), nn.BatchNorm2d(3)
    xs = _micro_batches((4, 3, 5, 5), 3, dtype=torch.float32)
    for x in xs:
        acc(x)
    big(torch.cat(xs))
    _assert_same_stats(acc, big, rtol=2e-6, atol=1e-6)


def test_each_micro_batch_normalizes_with_its_own_statistics():
    acc, plain = bnlab.nn.BatchNorm1d(5, accumulate=3), bnlab.nn.BatchNorm1d(5)
    with torch.no_grad():
        for m in (acc, plain):
            m.weight.copy_(torch.linspace(0.5, 2, 5))
            m.bias.copy_(torch.linspace(-1, 1, 5))
    for x in _micro_batches((6, 5), 3, dtype=torch.float32):
        xa, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yp = acc(xa), plain(xp)
        torch.testing.assert_close(ya, yp)
        g = torch.randn_like(ya)
        ya.backward(g)
        yp.backward(g)
        torch.testing.assert_close(xa.grad, xp.grad)
    torch.testing.assert_close(acc.weight.grad, plain.weight.grad)
    torch.testing.assert_close(acc.bias.grad, plain.bias.grad)


def test_pending_micro_batches_survive_eval_and_stay_out_of_the_state_dict():
    acc = bnlab.nn.BatchNorm1d(4, accumulate=3, dtype=torch.float64)
    big = bnlab.nn.BatchNorm1d(4, dtype=torch.float64)
    xs = _micro_batches((8, 4), 3)
    acc(xs[0])
    acc(xs[1])
    sd = acc.state_dict()
    assert list(sd) == list(nn.BatchNorm1d(4).state_dict())  # torch's keys, nothing pending in it
    assert torch.equal(sd["running_mean"], torch.zeros(4, dtype=torch.float64)) and int(sd["num_batches_tracked"]) == 0
    acc.eval()
    y = acc(xs[2])  # eval: the committed (initial) statistics, the window untouched
    torch.testing.assert_close(y, xs[2] / (1 + 1e-5) ** 0.5)
    assert acc.pending_micro_batches == 2
    acc.train()
    acc(xs[2])
    big(torch.cat(xs))
    _assert_same_stats(acc, big)


def test_load_state_dict_and_reset_discard_pending_micro_batches():
    acc = bnlab.nn.BatchNorm1d(4, accumulate=2)
    acc(torch.randn(8, 4))
    assert acc.pending_micro_batches == 1
    acc.load_state_dict(nn.BatchNorm1d(4).state_dict())
    assert acc.pending_micro_batches == 0
    acc(torch.randn(8, 4))
    acc.reset_running_stats()
    assert acc.pending_micro_batches == 0 and int(acc.num_batches_tracked) == 0


def test_flush_writes_a_partial_window_as_one_batch():
    acc = bnlab.nn.BatchNorm1d(4, accumulate=4, dtype=torch.float64)
    big = bnlab.nn.BatchNorm1d(4, dtype=torch.float64)
    xs = _micro_batches((8, 4), 2)
    for x in xs:
        acc(x)
    assert acc.flush_accumulated() == 2 and acc.pending_micro_batches == 0
    big(torch.cat(xs))
    _assert_same_stats(acc, big)
    acc(xs[0])
    assert acc.flush_accumulated(discard=True) == 1
    _assert_same_stats(acc, big)


def test_empty_micro_batches_count_as_part_of_the_window():
    acc = bnlab.nn.BatchNorm1d(4, accumulate=3, dtype=torch.float64)
    big = bnlab.nn.BatchNorm1d(4, dtype=torch.float64)
    xs = _micro_batches((8, 4), 2)
    xs.insert(1, torch.empty(0, 4, dtype=torch.float64))
    for x in xs:
        acc(x)
    big(torch.cat(xs))
    _assert_same_stats(acc, big)


def test_a_nan_micro_batch_under_raise_leaves_buffers_untouched_and_discards_the_window():
    acc = bnlab.nn.BatchNorm1d(4, accumulate=3, dtype=torch.float64)
    big = bnlab.nn.BatchNorm1d(4, dtype=torch.float64)
    xs = _micro_batches((8, 4), 3)
    acc(xs[0])
    bad = xs[1].clone()
    bad[2, 1] = float("nan")
    with pytest.raises(NonFiniteBatchError, match=r"BatchNorm1d: non-finite .*channel\(s\) \[1\].*accumulate=3: "
                                                  r"micro-batch 2; the pending accumulation window was discarded"):
        acc(bad)
    assert acc.pending_micro_batches == 0
    assert torch.equal(acc.running_mean, torch.zeros(4, dtype=torch.float64)) and int(acc.num_batches_tracked) == 0
    for x in xs:  # a new window of three
        acc(x)
    big(torch.cat(xs))
    _assert_same_stats(acc, big)


def test_a_nan_micro_batch_under_skip_skips_the_windows_update():
    acc = bnlab.nn.BatchNorm1d(4, accumulate=2, nonfinite="skip", dtype=torch.float64)
    big = bnlab.nn.BatchNorm1d(4, nonfinite="skip", dtype=torch.float64)
    xs = _micro_batches((8, 4), 2, windows=2)
    bad = xs[0].clone()
    bad[0, 0] = float("inf")
    acc(bad)
    acc(xs[1])
    big(torch.cat([bad, xs[1]]))  # one batch containing it: skipped too
    assert int(acc.num_batches_tracked) == 0 and torch.equal(acc.running_var, torch.ones(4, dtype=torch.float64))
    acc(xs[2])
    acc(xs[3])
    big(torch.cat(xs[2:]))
    _assert_same_stats(acc, big)
    assert int(acc.num_batches_tracked) == 1


def test_options_are_validated_and_shown():
    with pytest.raises(ValueError, match=r"BatchNorm2d: accumulate must be >= 1.*got 0"):
        bnlab.nn.BatchNorm2d(3, accumulate=0)
    for bad in (1.5, True, "2"):
        with pytest.raises(TypeError, match="BatchNorm1d: accumulate must be an int"):
            bnlab.nn.BatchNorm1d(3, accumulate=bad)
    assert "accumulate=4" in repr(bnlab.nn.BatchNorm1d(3, accumulate=4))
    assert "accumulate" not in repr(bnlab.nn.BatchNorm1d(3))
    lazy = bnlab.nn.LazyBatchNorm1d(accumulate=2, dtype=torch.float64)
    big = bnlab.nn.BatchNorm1d(4, dtype=torch.float64)
    xs = _micro_batches((8, 4), 2)
    for x in xs:
        lazy(x)
    big(torch.cat(xs))
    _assert_same_stats(lazy, big)


class _TwoBranches(nn.Module):
    """Each batch norm sees a function of the input alone (not of another batch norm's output), so
    that one big batch and k micro-batches feed every layer the same values."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn2d = nn.BatchNorm2d(3)
        self.bn1d = nn.BatchNorm1d(32)

    def forward(self, x):
        return self.bn2d(self.conv(x)).sum() + self.bn1d(x.flatten(1)).sum()


def _torch_model():
    torch.manual_seed(0)
    return _TwoBranches()


def test_context_manager_on_a_torch_model():
    model, ref = _torch_model(), _torch_model()
    xs = [torch.randn(4, 2, 4, 4) for _ in range(6)]
    with bnlab.tools.accumulate(model, 3) as m:
        assert m is model
        assert type(model.bn2d) is bnlab.nn.BatchNorm2d and model.bn2d.accumulate == 3
        for x in xs:
            model(x).square().backward()
    assert type(model.bn2d) is nn.BatchNorm2d and type(model.bn1d) is nn.BatchNorm1d
    assert "accumulate" not in vars(model.bn2d) and "_pending" not in vars(model.bn2d)
    ref(torch.cat(xs[:3]))
    ref(torch.cat(xs[3:]))
    for a, b in ((model.bn2d, ref.bn2d), (model.bn1d, ref.bn1d)):
        _assert_same_stats(a, b, rtol=1e-5, atol=1e-6)
        assert int(a.num_batches_tracked) == 2


def test_context_manager_commits_a_partial_window_at_exit_and_discards_it_on_error():
    model, ref = _torch_model(), _torch_model()
    xs = [torch.randn(4, 2, 4, 4) for _ in range(2)]
    with bnlab.tools.accumulate(model, 4):
        for x in xs:
            model(x)
    ref(torch.cat(xs))
    _assert_same_stats(model.bn2d, ref.bn2d, rtol=1e-5, atol=1e-6)
    _assert_same_stats(model.bn1d, ref.bn1d, rtol=1e-5, atol=1e-6)
    before = model.bn2d.running_mean.clone()
    with pytest.raises(KeyboardInterrupt):
        with bnlab.tools.accumulate(model, 4):
            model(xs[0])
            raise KeyboardInterrupt
    assert torch.equal(model.bn2d.running_mean, before) and int(model.bn2d.num_batches_tracked) == 1
    assert type(model.bn2d) is nn.BatchNorm2d


def test_context_manager_restores_bnlab_layers_options():
    bn = bnlab.nn.BatchNorm1d(3, accumulate=2)
    with bnlab.tools.accumulate(nn.Sequential(bn), 5):
        assert bn.accumulate == 5
    assert bn.accumulate == 2


def test_context_manager_refuses_layers_without_accumulation_and_changes_nothing():
    model = nn.Sequential(nn.BatchNorm1d(3), bnlab.nn.GhostBatchNorm1d(3, virtual_batch_size=4))
    with pytest.raises(ValueError, match=r"accumulate: 1 batch-norm layer\(s\) cannot .*1 \(GhostBatchNorm1d\)"):
        with bnlab.tools.accumulate(model, 2):
            pass
    assert type(model[0]) is nn.BatchNorm1d
    with pytest.raises(ValueError, match="accumulate: accumulate must be >= 1"):
        with bnlab.tools.accumulate(nn.Sequential(nn.BatchNorm1d(3)), 0):
            pass
    frozen = bnlab.tools.freeze(nn.Sequential(bnlab.nn.GhostBatchNorm1d(3)))
    with bnlab.tools.accumulate(frozen, 2):  # frozen layers update nothing: left alone
        pass
