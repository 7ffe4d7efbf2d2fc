"""BN-LSTM / BN-GRU / BN-RNN: torch equality with norm="none", masking, per-step statistics,
recalibration, gradcheck, errors."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import bnlab
from bnlab import reference as ref
from bnlab.nn import BNGRU, BNGRUCell, BNLSTM, BNLSTMCell, BNRNN, BNRNNCell, NORM_MODES

KINDS = [(BNLSTM, torch.nn.LSTM), (BNGRU, torch.nn.GRU), (BNRNN, torch.nn.RNN)]


def _h(state):
    return state[0] if isinstance(state, tuple) else state


def _pair(ours_cls, torch_cls, force_loop, **kw):
    theirs = torch_cls(3, 6, 2, dtype=torch.float64, **kw)
    ours = ours_cls(3, 6, 2, force_loop=force_loop, dtype=torch.float64, **kw)
    ours.load_state_dict(theirs.state_dict())  # strict: norm="none" has torch's keys exactly
    return ours, theirs


@pytest.mark.parametrize("force_loop", [False, True], ids=["delegated", "loop"])
@pytest.mark.parametrize("kinds", KINDS, ids=["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_norm_none_matches_torch_outputs_states_and_gradients(kinds, force_loop, batch_first):
    ours, theirs = _pair(*kinds, force_loop, batch_first=batch_first)
    x = torch.randn(5, 7, 3, dtype=torch.float64)
    h0 = torch.randn(2, 7 if not batch_first else 5, 6, dtype=torch.float64)
    hx = (h0, torch.randn_like(h0)) if kinds[0] is BNLSTM else h0
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_a, st_a = ours(xa, hx)
    out_b, st_b = theirs(xb, hx)
    torch.testing.assert_close(out_a, out_b)
    for a, b in zip(st_a if isinstance(st_a, tuple) else (st_a,), st_b if isinstance(st_b, tuple) else (st_b,)):
        torch.testing.assert_close(a, b)
    loss_a = out_a.pow(2).sum() + _h(st_a).sum()
    loss_b = out_b.pow(2).sum() + _h(st_b).sum()
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    grads_b = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads_b[n].grad, msg=n)


@pytest.mark.parametrize("force_loop", [False, True], ids=["delegated", "loop"])
@pytest.mark.parametrize("kinds", KINDS, ids=["LSTM", "GRU", "RNN"])
def test_norm_none_with_lengths_matches_torch_on_packed_input(kinds, force_loop):
    ours, theirs = _pair(*kinds, force_loop, batch_first=True)
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    lengths = torch.tensor([3, 6, 1, 4])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out_b, st_b = theirs(packed)
    out_b, _ = pad_packed_sequence(out_b, batch_first=True, total_length=6)
    out_a, st_a = ours(x, lengths=lengths)
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(_h(st_a), _h(st_b))
    out_p, st_p = ours(packed)  # PackedSequence in, PackedSequence out
    torch.testing.assert_close(pad_packed_sequence(out_p, batch_first=True, total_length=6)[0], out_b)
    torch.testing.assert_close(_h(st_p), _h(st_b))


def test_unbatched_input_works_like_torch():
    ours, theirs = _pair(BNLSTM, torch.nn.LSTM, True)
    x = torch.randn(5, 3, dtype=torch.float64)
    out_a, (h_a, c_a) = ours(x)
    out_b, (h_b, c_b) = theirs(x)
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(c_a, c_b)


@pytest.mark.parametrize("cls", [BNLSTM, BNGRU, BNRNN])
@pytest.mark.parametrize("norm", NORM_MODES)
def test_padded_and_packed_inputs_give_the_same_outputs_and_statistics(cls, norm):
    torch.manual_seed(1)
    a = cls(3, 5, 2, batch_first=True, norm=norm, force_loop=True)
    b = cls(3, 5, 2, batch_first=True, norm=norm, force_loop=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 7, 3)
    lengths = torch.tensor([7, 2, 5, 7, 3, 4])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    garbage = torch.where(mask[..., None], x, 1e3 * torch.randn_like(x))  # padding must not matter
    out_a, st_a = a(garbage, lengths=lengths)
    out_b, st_b = b(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    out_b, _ = pad_packed_sequence(out_b, batch_first=True, total_length=7)
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(_h(st_a), _h(st_b))
    assert bool((out_a[~mask] == 0).all())
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, msg=k)


@pytest.mark.parametrize("norm", ["none", "per_timestep", "layer"])
def test_each_sequence_in_a_padded_batch_equals_it_run_alone_in_eval(norm):
    torch.manual_seed(2)
    m = BNLSTM(2, 4, 2, batch_first=True, norm=norm, force_loop=True)
    m(torch.randn(8, 6, 2))  # give the per-step statistics some values
    m.eval()
    x = torch.randn(3, 6, 2)
    lengths = torch.tensor([6, 2, 4])
    out, (h, c) = m(x, lengths=lengths)
    for i, n in enumerate(lengths.tolist()):
        o1, (h1, c1) = m(x[i : i + 1, :n])
        torch.testing.assert_close(out[i, :n], o1[0])
        torch.testing.assert_close(h[:, i], h1[:, 0])
        torch.testing.assert_close(c[:, i], c1[:, 0])


def _proj(m, x, layer=0):
    """The gate pre-activations W_x x_t of layer 0, rows in BNLSTM's internal gate order."""
    perm = bnlab.nn.recurrent._lstm_perm(m.hidden_size)
    return x @ getattr(m, f"weight_ih_l{layer}")[perm].t()  # (B, T, F) -> (B, T, 4H)


def test_vertical_statistics_are_over_the_valid_steps_of_every_sequence():
    m = BNLSTM(3, 4, 1, batch_first=True, norm="vertical", momentum=1.0)
    x = torch.randn(5, 6, 3) + 2
    lengths = torch.tensor([6, 1, 3, 5, 2])
    mask = torch.arange(6)[None, :] < lengths[:, None]  # (B, T)
    m(x, lengths=lengths)
    p = _proj(m, x).detach().transpose(1, 2)  # (B, 4H, T)
    mean, var, n = ref.batch_stats(p, mask)
    torch.testing.assert_close(m.norm_ih_l0.running_mean[0], mean.float())
    torch.testing.assert_close(m.norm_ih_l0.running_var[0], (var * n / (n - 1)).float())


def test_per_step_statistics_use_only_the_sequences_still_running():
    m = BNLSTM(3, 4, 1, batch_first=True, norm="per_timestep", momentum=1.0)
    x = torch.randn(5, 6, 3) * 2 + 1
    lengths = torch.tensor([6, 2, 3, 5, 3])
    m(x, lengths=lengths)
    p = _proj(m, x).detach()  # (B, T, 4H)
    for t in range(5):  # at t = 5 only one sequence runs: no batch statistics, nothing updated
        rows = p[lengths > t, t]
        mean, var, n = ref.batch_stats(rows)
        torch.testing.assert_close(m.norm_ih_l0.running_mean[t], mean.float())
        torch.testing.assert_close(m.norm_ih_l0.running_var[t], (var * n / (n - 1)).float())
    assert m.norm_ih_l0.num_batches_tracked.tolist() == [1, 1, 1, 1, 1]
    assert m.norm_ih_l0.tracked_steps == 5


def test_per_step_population_statistics_are_used_in_eval_and_reused_past_the_training_length():
    torch.manual_seed(3)
    m = BNRNN(2, 4, 1, norm="per_timestep", momentum=1.0)
    m(torch.randn(5, 16, 2))  # trains 5 steps
    nih = m.norm_ih_l0
    assert nih.tracked_steps == 5
    m.eval()
    x = torch.randn(9, 3, 2)
    out, _ = m(x)
    assert nih.running_mean.shape[0] == 5  # eval never grows the statistics
    # reference computation: step t normalizes with row min(t, 4)
    w_ih, w_hh, b = m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0 + m.bias_hh_l0
    nhh = m.norm_hh_l0
    h = torch.zeros(3, 4)
    for t in range(9):
        r = min(t, 4)
        xi = (x[t] @ w_ih.t() - nih.running_mean[r]) / torch.sqrt(nih.running_var[r] + nih.eps) * nih.weight
        hh = (h @ w_hh.t() - nhh.running_mean[r]) / torch.sqrt(nhh.running_var[r] + nhh.eps) * nhh.weight
        h = torch.tanh(xi + hh + b)
        torch.testing.assert_close(out[t], h)


def test_horizontal_uses_each_steps_batch_statistics_in_training_and_one_shared_set_in_eval():
    torch.manual_seed(4)
    m = BNRNN(2, 4, 1, norm="horizontal", momentum=1.0)
    x = torch.randn(4, 16, 2)
    out, _ = m(x)
    assert m.norm_hh_l0.running_mean.shape == (1, 4)
    w_hh, b = m.weight_hh_l0, m.bias_ih_l0 + m.bias_hh_l0
    xp = torch.nn.functional.batch_norm((x @ m.weight_ih_l0.t()).reshape(-1, 4), None, None, training=True)
    xp = xp.view(4, 16, 4)
    h = torch.zeros(16, 4)
    for t in range(4):
        h = torch.tanh(xp[t] + torch.nn.functional.batch_norm(h @ w_hh.t(), None, None, training=True) + b)
        torch.testing.assert_close(out[t], h)
    m.eval()
    out, _ = m(x)
    nhh = m.norm_hh_l0
    xin = torch.nn.functional.batch_norm((x @ m.weight_ih_l0.t()).reshape(-1, 4), m.norm_ih_l0.running_mean[0],
                                         m.norm_ih_l0.running_var[0]).view(4, 16, 4)
    h = torch.zeros(16, 4)
    for t in range(4):
        hh = torch.nn.functional.batch_norm(h @ w_hh.t(), nhh.running_mean[0], nhh.running_var[0])
        h = torch.tanh(xin[t] + hh + b)
        torch.testing.assert_close(out[t], h)


def test_recalibrate_recomputes_population_statistics_per_step():
    torch.manual_seed(5)
    m = BNLSTM(3, 4, 2, batch_first=True, norm="per_timestep", momentum=0.1)
    data = [torch.randn(8, 5, 3) + 1 for _ in range(4)]
    m(data[0])
    m.eval()
    bnlab.tools.recalibrate(m, data)
    assert not m.training
    allx = torch.cat(data)  # (32, 5, 3)
    p = _proj(m, allx).detach()
    for t in range(5):
        mean, var, n = ref.batch_stats(p[:, t])
        torch.testing.assert_close(m.norm_ih_l0.running_mean[t], mean.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.norm_ih_l0.running_var[t], (var * n / (n - 1)).float(), atol=1e-5, rtol=1e-5)
    assert m.norm_c_l1.running_mean.shape == (5, 4)


def test_recalibrate_pools_every_step_into_the_shared_horizontal_statistics():
    torch.manual_seed(6)
    m = BNLSTM(3, 4, 1, batch_first=True, norm="vertical")
    data = [torch.randn(8, 5, 3) for _ in range(3)]
    bnlab.tools.recalibrate(m, data)
    p = _proj(m, torch.cat(data)).detach().reshape(-1, 16)
    mean, var, n = ref.batch_stats(p)
    torch.testing.assert_close(m.norm_ih_l0.running_mean[0], mean.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell_cls", [BNLSTMCell, BNGRUCell, BNRNNCell])
@pytest.mark.parametrize("norm", ["none", "vertical", "horizontal", "per_timestep", "layer"])
def test_cells_pass_gradcheck_in_float64(cell_cls, norm):
    torch.manual_seed(7)
    cell = cell_cls(8, 3, norm=norm, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    hx = (h, torch.randn(5, 3, dtype=torch.float64)) if cell_cls is BNLSTMCell else h
    params = tuple(p for p in cell.parameters())

    def f(x, h, *ps):
        out = cell(x, (h, hx[1]) if cell_cls is BNLSTMCell else h, step=2)
        return out if isinstance(out, tuple) else (out,)

    torch.autograd.gradcheck(f, (x, h) + params)


def test_a_small_layer_with_lengths_passes_gradcheck_in_float64():
    torch.manual_seed(8)
    m = BNLSTM(2, 3, 2, norm="per_timestep", dtype=torch.float64)
    x = torch.randn(4, 5, 2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2, 3, 4, 2])
    torch.autograd.gradcheck(lambda x: m(x, lengths=lengths)[0], (x,))


def test_a_cell_loop_equals_the_layer():
    torch.manual_seed(9)
    layer = BNLSTM(3, 4, 1, norm="per_timestep", momentum=1.0)
    cell = BNLSTMCell(3, 4, norm="per_timestep", momentum=1.0)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in layer.state_dict().items()})
    x = torch.randn(1, 16, 3)  # one step, so per-step input statistics are the same in both
    out, (h, c) = layer(x)
    h2, c2 = cell(x[0], step=0)
    torch.testing.assert_close(out[0], h2)
    torch.testing.assert_close(c[0], c2)


def test_gamma_defaults_follow_the_mode_and_are_configurable():
    assert torch.all(BNLSTM(2, 4, norm="per_timestep").norm_hh_l0.weight == 0.1)
    assert torch.all(BNLSTM(2, 4, norm="per_timestep", gamma_init=1.0).norm_c_l0.weight == 1.0)
    assert torch.all(BNLSTM(2, 4, norm="horizontal").norm_hh_l0.weight == 1.0)
    assert torch.all(BNLSTM(8, 4, norm="layer").norm_ih_l0.weight == 1.0)


def test_layer_norm_skips_the_input_path_for_inputs_with_fewer_than_8_features():
    names = dict(BNLSTM(1, 8, 2, norm="layer").named_children())
    assert "norm_ih_l0" not in names and "norm_hh_l0" in names and "norm_ih_l1" in names
    assert "norm_ih_l0" in dict(BNLSTM(8, 4, norm="layer").named_children())


def test_state_dict_with_per_step_statistics_loads_into_a_fresh_model():
    a = BNGRU(2, 4, 2, norm="per_timestep")
    a(torch.randn(7, 3, 2))
    b = BNGRU(2, 4, 2, norm="per_timestep")
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(9, 3, 2)
    torch.testing.assert_close(a(x)[0], b(x)[0])


def test_record_hidden_keeps_each_layers_states_with_their_graph():
    m = BNLSTM(1, 4, 2, batch_first=True, norm="horizontal")
    m.record_hidden = True
    out, _ = m(torch.randn(8, 6, 1))
    assert len(m.hidden_states) == 2 and len(m.hidden_states[0]) == 6
    g1, gT = torch.autograd.grad(out[:, -1].sum(), [m.hidden_states[0][0], m.hidden_states[0][-1]])
    assert g1.shape == (8, 4) and gT.abs().sum() > 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: BNLSTM(3, 4, norm="batch"), r"BNLSTM: norm must be one of .*'batch'"),
        (lambda: BNGRU(3, 4)(torch.randn(2, 3, 4, 3)), "BNGRU: expected 2D .* or 3D input .*got 4D"),
        (lambda: BNRNN(3, 4)(torch.randn(5, 2, 7)), "BNRNN: expected input with 3 features .*got shape"),
        (lambda: BNLSTM(3, 4)(torch.randn(5, 2, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))),
         r"BNLSTM: expected h_0 of shape \(1, 2, 4\)"),
        (lambda: BNLSTM(3, 4)(torch.randn(5, 2, 3), lengths=torch.tensor([6, 2])), "BNLSTM: lengths must lie in 1..5"),
        (lambda: BNLSTMCell(3, 4)(torch.randn(2, 5)), "BNLSTMCell: expected input with 3 features"),
        (lambda: BNRNN(3, 4, nonlinearity="sigmoid"), "BNRNN: nonlinearity"),
    ],
)
def test_bad_input_raises_an_error_naming_the_layer(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("cls", [BNLSTM, BNGRU, BNRNN])
@pytest.mark.parametrize("norm", ["horizontal", "per_timestep"])
def test_the_equal_length_fast_path_equals_the_packed_path(cls, norm):
    torch.manual_seed(10)
    a = cls(3, 5, 2, batch_first=True, norm=norm)
    b = cls(3, 5, 2, batch_first=True, norm=norm)
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 7, 3)
    packed = pack_padded_sequence(x, torch.full((6,), 7), batch_first=True)
    for mode in ("train", "eval"):
        getattr(a, mode)(), getattr(b, mode)()
        out_a, st_a = a(x)
        out_b, st_b = b(packed)
        out_b, _ = pad_packed_sequence(out_b, batch_first=True)
        torch.testing.assert_close(out_a, out_b)
        torch.testing.assert_close(_h(st_a), _h(st_b))
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(va, vb, msg=k)


@pytest.mark.parametrize("norm", ["vertical", "horizontal", "per_timestep"])
def test_nonfinite_training_batch_never_reaches_the_population_statistics(norm):
    from bnlab.functional import NonFiniteBatchError

    lstm = BNLSTM(3, 5, num_layers=2, norm=norm, batch_first=True)
    lstm(torch.randn(4, 6, 3))
    before = {k: v.clone() for k, v in lstm.state_dict().items() if "running" in k or "num_batches" in k}
    x = torch.randn(4, 6, 3)
    x[2, 3, 1] = float("nan")
    with pytest.raises(NonFiniteBatchError, match="BNLSTM: non-finite"):
        lstm(x)
    after = lstm.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    lstm.nonfinite = "skip"
    out, _ = lstm(x)
    assert torch.isnan(out).any()
    for k, v in before.items():
        assert torch.equal(lstm.state_dict()[k], v), k
