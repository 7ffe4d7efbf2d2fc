"""Running statistics of the recurrent layers: one policy (bnlab.policy.update_buffers), every step's
statistics checked before any buffer moves (a nan at one step leaves every per-step buffer untouched),
padding kept out of every statistic on every path, and SequenceBatchNorm's combined updates equal
the sequential ones."""

import copy

import pytest
import torch

from bnlab import reference as ref
from bnlab.nn import BNGRU, BNLSTM, BNRNN, BNLSTMCell, SequenceBatchNorm
from bnlab.nn.masked import StatsUpdate, commit_stats
from bnlab.policy import NonFiniteBatchError

PATHS = [False, True]  # force_loop: the fast path, then the reference loop
NORMED = ["vertical", "horizontal", "per_timestep"]


def _buffers(m):
    return {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}


def _unchanged(m, before):
    after = _buffers(m)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("force_loop", PATHS, ids=["fast", "loop"])
@pytest.mark.parametrize("norm", NORMED)
@pytest.mark.parametrize("cls", [BNLSTM, BNGRU], ids=["LSTM", "GRU"])
def test_a_nan_at_one_step_leaves_every_per_step_buffer_untouched(cls, norm, force_loop):
    torch.manual_seed(0)
    m = cls(3, 5, 2, batch_first=True, norm=norm, bidirectional=True, force_loop=force_loop)
    m(torch.randn(4, 6, 3))  # every step's buffers hold something
    before = _buffers(m)
    x = torch.randn(4, 6, 3)
    x[2, 4, 1] = float("nan")  # steps 0-3 are clean: their statistics must not be written either
    with pytest.raises(NonFiniteBatchError, match=f"{cls.__name__}: non-finite batch statistics"):
        m(x)
    _unchanged(m, before)
    m.nonfinite = "skip"
    out, _ = m(x)
    assert torch.isnan(out).any()
    _unchanged(m, before)
    out, _ = m(torch.randn(4, 6, 3))  # a clean batch updates again
    assert any(not torch.equal(v, before[k]) for k, v in _buffers(m).items())


@pytest.mark.parametrize("force_loop", PATHS, ids=["fast", "loop"])
def test_the_error_names_the_norm_and_the_steps(force_loop):
    m = BNLSTM(3, 4, 1, batch_first=True, norm="per_timestep", force_loop=force_loop)
    x = torch.randn(5, 6, 3)
    x[0, 3] = float("inf")
    with pytest.raises(NonFiniteBatchError) as e:
        m(x)
    msg = str(e.value)
    assert "norm_ih_l0 at step(s) [3]" in msg and "norm_hh_l0" in msg and "nonfinite='skip'" in msg


def test_an_overflowing_input_is_refused_before_any_buffer_moves():
    m = BNRNN(2, 3, 1, batch_first=True, norm="per_timestep")
    before = _buffers(m)
    x = torch.randn(4, 5, 2)
    x[:, 2] *= 3e37  # finite, but its statistics are beyond float32
    with pytest.raises(NonFiniteBatchError, match="overflow|inf|nan"):
        m(x)
    _unchanged(m, before)


def test_a_cell_checks_all_its_norms_before_writing_any():
    cell = BNLSTMCell(3, 4, norm="per_timestep")
    cell(torch.randn(6, 3), step=0)
    before = _buffers(cell)
    h = torch.randn(6, 4)
    h[1, 0] = float("nan")  # the input path is clean; the recurrent path is not
    with pytest.raises(NonFiniteBatchError):
        cell(torch.randn(6, 3), (h, torch.randn(6, 4)), step=0)
    _unchanged(cell, before)


# --- padding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf"), 1e30])
@pytest.mark.parametrize("force_loop", PATHS, ids=["fast", "loop"])
@pytest.mark.parametrize("norm", ["none", "vertical", "horizontal", "per_timestep", "layer"])
@pytest.mark.parametrize("cls", [BNLSTM, BNGRU, BNRNN], ids=["LSTM", "GRU", "RNN"])
def test_padding_content_changes_nothing(cls, norm, force_loop, fill):
    torch.manual_seed(2)
    a = cls(9, 4, 2, batch_first=True, norm=norm, bidirectional=True, force_loop=force_loop)
    b = copy.deepcopy(a)
    x = torch.randn(5, 6, 9)
    lengths = torch.tensor([6, 2, 5, 1, 3])
    pad = torch.arange(6)[None, :] >= lengths[:, None]
    dirty = x.clone()
    dirty[pad] = fill
    results = []
    for m, inp in ((a, x), (b, dirty)):
        inp = inp.clone().requires_grad_(True)
        out, st = m(inp, lengths=lengths)
        h = st[0] if isinstance(st, tuple) else st
        (out.pow(2).sum() + h.sum()).backward()
        results.append((out, h, inp.grad, {n: p.grad for n, p in m.named_parameters()}, _buffers(m)))
    (oa, ha, ga, pa, ba), (ob, hb, gb, pb, bb) = results
    torch.testing.assert_close(oa, ob)
    torch.testing.assert_close(ha, hb)
    assert bool((ob[pad] == 0).all())
    torch.testing.assert_close(ga[~pad], gb[~pad])
    assert bool((gb[pad] == 0).all())
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], msg=n)
    for k in ba:
        torch.testing.assert_close(ba[k], bb[k], msg=k)


@pytest.mark.parametrize("force_loop", PATHS, ids=["fast", "loop"])
def test_per_step_statistics_of_the_fast_path_are_over_the_sequences_still_running(force_loop):
    m = BNGRU(3, 4, 1, batch_first=True, norm="per_timestep", momentum=1.0, force_loop=force_loop)
    x = torch.randn(5, 6, 3) * 2 + 1
    lengths = torch.tensor([6, 2, 3, 5, 3])
    m(x, lengths=lengths)
    p = (x @ m.weight_ih_l0.t()).detach()  # GRU gate order is torch's (r, z, n)
    for t in range(5):  # at t = 5 one sequence runs: no batch statistics, nothing written
        mean, var, n = ref.batch_stats(p[lengths > t, t])
        torch.testing.assert_close(m.norm_ih_l0.running_mean[t], mean.float())
        torch.testing.assert_close(m.norm_ih_l0.running_var[t], (var * n / (n - 1)).float())
    assert m.norm_ih_l0.num_batches_tracked.tolist() == [1, 1, 1, 1, 1]


# --- SequenceBatchNorm's writes ---------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_shared_row_updated_at_k_steps_equals_k_sequential_updates(momentum):
    torch.manual_seed(3)
    a = SequenceBatchNorm(4, per_step=False, momentum=momentum, dtype=torch.float64)
    b = copy.deepcopy(a)
    a.num_batches_tracked += 3  # a cumulative average in progress
    b.num_batches_tracked += 3
    xs = [torch.randn(8 - k, 4, dtype=torch.float64) * (k + 1) + k for k in range(5)]
    stats = [ref.batch_stats(x) for x in xs]
    commit_stats([StatsUpdate(a, [0] * 5, torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats]),
                              [s[2] for s in stats])], "raise", "test")
    for x in xs:  # one step at a time, each written at once
        b(x, 0)
    torch.testing.assert_close(a.running_mean, b.running_mean)
    torch.testing.assert_close(a.running_var, b.running_var)
    assert torch.equal(a.num_batches_tracked, b.num_batches_tracked) and int(a.num_batches_tracked[0]) == 8


def test_per_step_rows_written_in_one_call_equal_row_by_row():
    torch.manual_seed(4)
    a = SequenceBatchNorm(3, per_step=True, momentum=0.2)
    b = SequenceBatchNorm(3, per_step=True, momentum=0.2)
    xs = [torch.randn(6 if t < 3 else 4, 3) + t for t in range(5)]
    stats = [ref.batch_stats(x) for x in xs]
    commit_stats([StatsUpdate(a, [4, 3, 2, 1, 0][::-1], torch.stack([s[0] for s in stats]),
                              torch.stack([s[1] for s in stats]), [s[2] for s in stats])], "raise", "test")
    for t, x in enumerate(xs):
        b(x, t)
    torch.testing.assert_close(a.running_mean, b.running_mean)
    torch.testing.assert_close(a.running_var, b.running_var)
    assert a.num_batches_tracked.tolist() == b.num_batches_tracked.tolist() == [1] * 5


@pytest.mark.parametrize("first", [0, 2])
def test_consecutive_per_step_rows_of_one_count_written_at_once_equal_row_by_row(first):
    """Every step of a batch of equal lengths (one count, consecutive rows: one update of the rows'
    slice), from row 0 and from a row past the buffers' end (they grow first)."""
    torch.manual_seed(5)
    a = SequenceBatchNorm(3, per_step=True, momentum=0.2)
    b = SequenceBatchNorm(3, per_step=True, momentum=0.2)
    xs = [torch.randn(6, 3) * (t + 1) + t for t in range(5)]
    stats = [ref.batch_stats(x) for x in xs]
    commit_stats([StatsUpdate(a, list(range(first, first + 5)), torch.stack([s[0] for s in stats]),
                              torch.stack([s[1] for s in stats]), [s[2] for s in stats])], "raise", "test")
    for t, x in enumerate(xs):
        b(x, first + t)
    torch.testing.assert_close(a.running_mean, b.running_mean)
    torch.testing.assert_close(a.running_var, b.running_var)
    assert a.num_batches_tracked.tolist() == b.num_batches_tracked.tolist() == [0] * first + [1] * 5


def test_standalone_sequence_batch_norm_follows_its_own_nonfinite_policy():
    bn = SequenceBatchNorm(3, per_step=True)
    bn(torch.randn(4, 3), 0)
    before = _buffers(bn)
    x = torch.randn(4, 3)
    x[0, 1] = float("nan")
    with pytest.raises(NonFiniteBatchError, match="SequenceBatchNorm: non-finite"):
        bn(x, 0)
    _unchanged(bn, before)
    bn = SequenceBatchNorm(3, per_step=True, nonfinite="skip")
    bn(torch.randn(4, 3), 0)
    before = _buffers(bn)
    assert torch.isnan(bn(x, 0)).any()
    _unchanged(bn, before)
    with pytest.raises(ValueError, match="SequenceBatchNorm: nonfinite must be"):
        SequenceBatchNorm(3, nonfinite="ignore")


@pytest.mark.parametrize("norm", ["horizontal", "per_timestep"])
def test_recalibration_gives_the_same_statistics_on_the_fast_path_and_the_loop(norm):
    import bnlab

    torch.manual_seed(5)
    a = BNLSTM(3, 4, 1, batch_first=True, norm=norm, bidirectional=True)
    b = copy.deepcopy(a)
    b.force_loop = True
    data = [torch.randn(8, 5, 3) + 1 for _ in range(3)]
    bnlab.tools.recalibrate(a, data)
    bnlab.tools.recalibrate(b, data)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_one_call_write_of_an_equal_length_forward_equals_the_policys_row_by_row_write(dtype):
    """commit_stats' per-step write of consecutive rows with one count (one compiled update of the k x
    C values, bnlab.nn.masked.SequenceBatchNorm._write_steps_checked) leaves the same bits in every
    buffer as write_stats (update_buffers row by row), on buffers that already hold statistics; a
    batch that would overflow the buffers' dtype is declined with nothing written; the cases it
    does not take (rows in reverse, unequal counts, momentum None) are declined too."""
    torch.manual_seed(6)
    a = SequenceBatchNorm(5, per_step=True, momentum=0.3).to(dtype)
    for t in range(3):  # earlier batches, so the update starts from buffers that are not 0 and 1
        a(torch.randn(7, 5) * 3 + 2, t)
    b = copy.deepcopy(a)
    mean = torch.randn(4, 5, dtype=torch.float64) * 5
    var = torch.rand(4, 5, dtype=torch.float64) * 7
    rows = [1, 2, 3, 4]  # past the buffers' 3 rows: they grow first
    assert a._write_checked(StatsUpdate(a, rows, mean, var, [9] * 4), "raise", "test")
    b.write_stats(StatsUpdate(b, rows, mean, var, [9] * 4), "raise", "test")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.num_batches_tracked.tolist() == [1, 2, 2, 1, 1]
    before = _buffers(a)
    if dtype == torch.float32:  # a variance past float32's range (float64 buffers hold any finite one)
        huge = var.clone()
        huge[2, 3] = 1e39
        assert not a._write_checked(StatsUpdate(a, rows, mean, huge, [9] * 4), "raise", "test")
        _unchanged(a, before)
    for update in (StatsUpdate(a, rows[::-1], mean, var, [9] * 4), StatsUpdate(a, rows, mean, var, [9, 9, 8, 9])):
        assert not a._write_checked(update, "raise", "test")
    c = SequenceBatchNorm(5, per_step=True, momentum=None).to(dtype)
    assert not c._write_checked(StatsUpdate(c, [0, 1], mean[:2], var[:2], [9, 9]), "raise", "test")
    _unchanged(a, before)
