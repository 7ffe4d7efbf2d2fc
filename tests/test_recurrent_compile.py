"""BNLSTM / BNGRU / BNRNN under torch.compile and torch.export.

As torch's own nn.LSTM / GRU / RNN, the layers run eagerly under torch.compile (a graph break) unless
``torch._dynamo.config.allow_rnn`` is set: their fused time loops are compiled kernel calls dynamo
cannot trace, and tracing the torch-ops reference loop instead unrolls every step. torch.export, and
torch.compile with allow_rnn, trace that loop. The dynamo backend here is "eager" (the graph capture
is what is under test, not inductor's code generation)."""

import copy

import pytest
import torch
import torch._dynamo

import bnlab.nn.recurrent as R
from bnlab.nn import BNGRU, BNLSTM, BNRNN


@pytest.fixture
def paths(monkeypatch):
    """The implementation each call of a layer took ("fused", "fold", "loop", "torch")."""
    seen = []
    orig = R._BNRNNBase._path

    def record(self, *a, **k):
        p = orig(self, *a, **k)
        seen.append(p)
        return p

    monkeypatch.setattr(R._BNRNNBase, "_path", record)
    torch._dynamo.reset()
    yield seen
    torch._dynamo.reset()


class _Classifier(torch.nn.Module):
    def __init__(self, rnn, hidden):
        super().__init__()
        self.rnn = rnn
        self.head = torch.nn.Linear(hidden, 3)

    def forward(self, x):
        return self.head(torch.relu(self.rnn(x)[0][:, -1]))


def _pair(cls, norm):
    torch.manual_seed(0)
    net = _Classifier(cls(4, 6, 2, norm=norm, batch_first=True, momentum=0.3), 6)
    return net, copy.deepcopy(net)


@pytest.mark.parametrize("norm", ["vertical", "horizontal", "per_timestep", "layer"])
@pytest.mark.parametrize("cls", [BNLSTM, BNGRU, BNRNN], ids=["LSTM", "GRU", "RNN"])
def test_torch_compile_runs_the_layers_eagerly_on_their_fast_paths(cls, norm, paths):
    net, ref = _pair(cls, norm)
    compiled = torch.compile(net, backend="eager")
    x = torch.randn(5, 7, 4)
    for step in range(2):  # a second call reuses the compiled frames around the layer
        paths.clear()
        out, expect = compiled(x), ref(x)
        assert len(paths) == 2 and paths[0] == paths[1] != "loop"  # the compiled call's and ref's
        torch.testing.assert_close(out, expect, rtol=0, atol=0)
        out.square().sum().backward()
        expect.square().sum().backward()
        for (name, a), b in zip(net.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
        for (name, a), b in zip(net.named_buffers(), ref.buffers()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    net.eval(), ref.eval()
    paths.clear()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x), rtol=0, atol=0)
    assert "loop" not in paths


def test_fullgraph_names_the_switch_that_traces_the_loop(paths):
    net, _ = _pair(BNLSTM, "horizontal")
    with pytest.raises(Exception, match="allow_rnn"):
        torch.compile(net, backend="eager", fullgraph=True)(torch.randn(5, 7, 4))


@pytest.mark.parametrize("cls", [BNLSTM, BNGRU], ids=["LSTM", "GRU"])
def test_allow_rnn_traces_the_reference_loop(cls, paths):
    net, ref = _pair(cls, "horizontal")
    x = torch.randn(5, 7, 4)
    ref(x)  # running statistics to evaluate with
    net.load_state_dict(ref.state_dict())
    net.eval(), ref.eval()
    import warnings

    with torch._dynamo.config.patch(allow_rnn=True), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        paths.clear()
        out = torch.compile(net, backend="eager", fullgraph=True)(x)
    assert paths == ["loop"]
    # the layer's lru_cache helpers are bypassed while dynamo traces (it would warn of each)
    assert not [w for w in seen if "lru_cache" in str(w.message)]
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)  # the loop against the fused kernel


def test_torch_export_traces_the_reference_loop(paths):
    net, ref = _pair(BNLSTM, "horizontal")
    x = torch.randn(5, 7, 4)
    ref(x)
    net.load_state_dict(ref.state_dict())
    net.eval(), ref.eval()
    ep = torch.export.export(net, (x,))
    assert "loop" in paths
    torch.testing.assert_close(ep.module()(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["none", "vertical", "horizontal", "per_timestep", "layer"])
@pytest.mark.parametrize("cls", [BNLSTM, BNGRU], ids=["LSTM", "GRU"])
def test_torch_jit_trace_records_the_reference_loop_in_eval(cls, norm, tmp_path, paths):
    import warnings

    torch.manual_seed(0)
    m = cls(3, 4, 2, norm=norm, batch_first=True, bidirectional=True)
    m(torch.randn(6, 5, 3))  # running statistics to evaluate with
    m.eval()
    ref = copy.deepcopy(m)
    ref.force_loop = True
    paths.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings about Python values it freezes
        traced = torch.jit.trace(m, (torch.randn(2, 5, 3),), check_trace=False)
    assert paths == (["torch"] if norm == "none" else ["loop"])  # torch ops, not the kernels' calls
    torch.jit.save(traced, tmp_path / "m.pt")
    loaded = torch.jit.load(tmp_path / "m.pt")
    x = torch.randn(2, 5, 3)  # new values, the traced shape
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], ref(x)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [BNLSTM, BNGRU], ids=["LSTM", "GRU"])
def test_torch_jit_trace_of_a_training_layer_with_batch_norm_is_refused(cls):
    from bnlab.nn import BNLSTMCell

    m = cls(3, 4, 1, norm="horizontal", batch_first=True)
    refused = r"torch.jit.trace cannot record bnlab.s batch norm in training mode.*model.eval\(\)"
    with pytest.raises(RuntimeError, match=refused):
        torch.jit.trace(m, (torch.randn(2, 5, 3),), check_trace=False)
    assert int(m.norm_hh_l0.num_batches_tracked.sum()) == 0  # refused before any statistic moved
    with pytest.raises(RuntimeError, match="torch.jit.trace cannot record"):
        torch.jit.trace(BNLSTMCell(3, 4, norm="per_timestep"), (torch.randn(2, 3),), check_trace=False)
    # a layer without running statistics traces in training mode too
    torch.jit.trace(cls(3, 4, 1, norm="layer", batch_first=True), (torch.randn(2, 5, 3),), check_trace=False)
