"""bidirectional=True and proj_size as torch has them: parameter names and state_dict keys (``_reverse``,
``weight_hr``), torch checkpoints loading strictly with norm="none" and giving torch's numbers (outputs,
final states, every gradient), on torch's kernel and on the reference loop, equal and variable lengths."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bnlab.nn import BNGRU, BNLSTM, BNRNN, NORM_MODES

DT = torch.float64
CASES = [
    (BNLSTM, torch.nn.LSTM, {"bidirectional": True}),
    (BNLSTM, torch.nn.LSTM, {"proj_size": 3}),
    (BNLSTM, torch.nn.LSTM, {"bidirectional": True, "proj_size": 2}),
    (BNGRU, torch.nn.GRU, {"bidirectional": True}),
    (BNRNN, torch.nn.RNN, {"bidirectional": True}),
    (BNRNN, torch.nn.RNN, {"bidirectional": True, "nonlinearity": "relu", "bias": False}),
]
IDS = ["LSTM-bi", "LSTM-proj", "LSTM-bi-proj", "GRU-bi", "RNN-bi", "RNN-relu-bi-nobias"]


def _states(st):
    return st if isinstance(st, tuple) else (st,)


def _pair(ours_cls, torch_cls, kw, force_loop, batch_first=True):
    torch.manual_seed(0)
    theirs = torch_cls(3, 5, 2, batch_first=batch_first, dtype=DT, **kw)
    ours = ours_cls(3, 5, 2, batch_first=batch_first, force_loop=force_loop, dtype=DT, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # torch's keys, in torch's order
    ours.load_state_dict(theirs.state_dict())  # strict
    return ours, theirs


def _hx(m, B):
    D = 2 if m.bidirectional else 1
    h = torch.randn(D * m.num_layers, B, m.proj_size or m.hidden_size, dtype=DT)
    if isinstance(m, (BNLSTM, torch.nn.LSTM)):
        return h, torch.randn(D * m.num_layers, B, m.hidden_size, dtype=DT)
    return h


def _grads_equal(ours, theirs):
    g = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, g[n].grad, msg=n)


@pytest.mark.parametrize("force_loop", [False, True], ids=["torch-kernel", "loop"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_norm_none_equals_torch_with_equal_lengths(case, force_loop):
    ours_cls, torch_cls, kw = case
    for batch_first in (True, False):
        ours, theirs = _pair(ours_cls, torch_cls, kw, force_loop, batch_first)
        x = torch.randn((4, 6, 3) if batch_first else (6, 4, 3), dtype=DT)
        hx = _hx(theirs, 4)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_a, st_a = ours(xa, hx)
        out_b, st_b = theirs(xb, hx)
        torch.testing.assert_close(out_a, out_b)
        for a, b in zip(_states(st_a), _states(st_b)):
            torch.testing.assert_close(a, b)
        (out_a.pow(2).sum() + sum(s.sum() for s in _states(st_a))).backward()
        (out_b.pow(2).sum() + sum(s.sum() for s in _states(st_b))).backward()
        torch.testing.assert_close(xa.grad, xb.grad)
        _grads_equal(ours, theirs)


@pytest.mark.parametrize("force_loop", [False, True], ids=["torch-kernel", "loop"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_norm_none_equals_torch_on_packed_sequences(case, force_loop):
    ours_cls, torch_cls, kw = case
    ours, theirs = _pair(ours_cls, torch_cls, kw, force_loop)
    x = torch.randn(5, 6, 3, dtype=DT)
    lengths = torch.tensor([3, 6, 1, 4, 6])
    hx = _hx(theirs, 5)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out_b, st_b = theirs(packed, hx)
    out_a, st_a = ours(x, hx, lengths=lengths)
    padded_b, _ = pad_packed_sequence(out_b, batch_first=True, total_length=6)
    torch.testing.assert_close(out_a, padded_b)
    for a, b in zip(_states(st_a), _states(st_b)):
        torch.testing.assert_close(a, b)
    out_p, st_p = ours(packed, hx)  # PackedSequence in, PackedSequence out
    torch.testing.assert_close(out_p.data, out_b.data)
    (out_p.data.pow(2).sum() + _states(st_p)[0].sum()).backward()
    (out_b.data.pow(2).sum() + _states(st_b)[0].sum()).backward()
    _grads_equal(ours, theirs)


def test_normalized_layers_add_their_norms_per_direction_to_torchs_keys():
    m = BNLSTM(3, 5, 2, bidirectional=True, proj_size=2, norm="per_timestep")
    keys = set(m.state_dict())
    torch_keys = set(torch.nn.LSTM(3, 5, 2, bidirectional=True, proj_size=2).state_dict())
    assert torch_keys <= keys
    for l in range(2):
        for sfx in ("", "_reverse"):
            for site in ("ih", "hh", "c"):
                assert f"norm_{site}_l{l}{sfx}.running_mean" in keys
                assert f"norm_{site}_l{l}{sfx}.weight" in keys
    assert m.weight_ih_l1.shape == (20, 4) and m.weight_hh_l0_reverse.shape == (20, 2)
    assert m.weight_hr_l1_reverse.shape == (2, 5)
    out, (h, c) = m(torch.randn(6, 4, 3))
    assert out.shape == (6, 4, 4) and h.shape == (4, 4, 2) and c.shape == (4, 4, 5)


def test_a_torch_checkpoint_loads_into_every_norm_mode_with_its_norms_at_their_defaults():
    theirs = torch.nn.LSTM(3, 5, 2, bidirectional=True, proj_size=2)
    for norm in NORM_MODES:
        ours = BNLSTM(3, 5, 2, bidirectional=True, proj_size=2, norm=norm)
        missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("norm_") for k in missing), norm


@pytest.mark.parametrize("call, match", [
    (lambda: BNGRU(3, 4, proj_size=2), "BNGRU: proj_size is supported for the LSTM only"),
    (lambda: BNRNN(3, 4, proj_size=2), "BNRNN: proj_size is supported for the LSTM only"),
    (lambda: BNLSTM(3, 4, proj_size=4), r"BNLSTM: proj_size must be smaller than hidden_size \(got proj_size=4"),
    (lambda: BNLSTM(3, 4, proj_size=-1), "BNLSTM: proj_size must be an int >= 0"),
    (lambda: BNLSTM(3, 4, 2, bidirectional=True)(torch.randn(5, 2, 3), (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4))),
     r"BNLSTM: expected h_0 of shape \(4, 2, 4\)"),
    (lambda: BNLSTM(3, 4, proj_size=2)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))),
     r"BNLSTM: expected h_0 of shape \(1, 2, 2\)"),
])
def test_bad_arguments_raise_an_error_naming_the_layer(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_the_reverse_direction_reads_each_sequence_from_its_last_valid_step():
    """A bidirectional layer's reverse half at step 0 equals a reverse-only run over the valid steps."""
    torch.manual_seed(1)
    m = BNGRU(2, 3, 1, batch_first=True, bidirectional=True, norm="layer")
    m.eval()
    x = torch.randn(3, 5, 2)
    lengths = torch.tensor([5, 2, 4])
    out, h = m(x, lengths=lengths)
    for i, n in enumerate(lengths.tolist()):
        alone, h1 = m(x[i:i + 1, :n])
        torch.testing.assert_close(out[i, :n], alone[0])
        torch.testing.assert_close(h[:, i], h1[:, 0])
