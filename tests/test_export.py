"""Capturing models with bnlab layers: torch.export (eval and train), ONNX export run by onnxruntime,
and torch.jit (trace in eval works; trace in training and script raise one clear error naming
the alternatives)."""

import copy
import warnings

import pytest
import torch

import bnlab
import bnlab.nn as bnn


class ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = bnn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def _trained_model() -> ConvBN:
    """A model whose running statistics have moved (so eval differs from a fresh layer)."""
    torch.manual_seed(0)
    m = ConvBN().train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(4, 3, 8, 8) * 2 + 1)
    return m.eval()


def _targets(ep) -> set:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


# ----------------------------------------------------------------------------------------------
# torch.export


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_eval_records_torchs_batch_norm_and_gives_the_eager_output(strict):
    m = _trained_model()
    x = torch.randn(4, 3, 8, 8)
    ep = torch.export.export(m, (x,), strict=strict)
    assert "aten.batch_norm.default" in _targets(ep)  # the op every exporter and runtime knows
    assert not any("bnlab" in t for t in _targets(ep))
    x2 = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x2), m(x2), rtol=1e-5, atol=1e-5)


def test_export_train_with_a_dynamic_batch_records_torch_ops_and_updates_the_buffers_like_eager():
    """In training, the exported graph is batch norm in torch ops (shifted var_mean and the affine,
    as under torch.compile), the running-statistics update in torch ops (the policy as a select),
    and bnlab's non-finite check of the batch."""
    torch.manual_seed(0)
    m = ConvBN().train()
    eager = copy.deepcopy(m)
    x = torch.randn(4, 3, 8, 8)
    ep = torch.export.export(m, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=2)}})
    targets = _targets(ep)
    assert ({"bnlab.check_batch.default", "bnlab.check_batch_fast.default"} & set(targets)
            and "bnlab.update_running_stats.default" not in targets)
    assert "bnlab.batch_norm_train.default" not in targets
    assert any("var_mean" in t for t in targets)
    em = ep.module()
    for n in (6, 3):  # batch sizes other than the example's
        xb = torch.randn(n, 3, 8, 8)
        torch.testing.assert_close(em(xb), eager(xb), rtol=1e-5, atol=1e-5)
    buffers = dict(em.named_buffers())
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(buffers[f"bn.{k}"], getattr(eager.bn, k), rtol=1e-6, atol=1e-6)
    assert buffers["bn.num_batches_tracked"].item() == 2


# ----------------------------------------------------------------------------------------------
# ONNX


def test_onnx_export_of_an_eval_model_runs_in_onnxruntime_with_torchs_outputs(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # torch.onnx.export's default (torch.export-based) exporter
    ort = pytest.importorskip("onnxruntime")
    m = _trained_model()
    x = torch.randn(4, 3, 8, 8)
    path = tmp_path / "convbn.onnx"
    torch.onnx.export(m, (x,), str(path), dynamo=True, dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    tm = bnlab.convert(copy.deepcopy(m), to="torch")  # torch.nn's own layers, the same state
    assert type(tm.bn) is torch.nn.BatchNorm2d
    for n in (4, 7):
        xb = torch.randn(n, 3, 8, 8)
        (out,) = sess.run(None, {name: xb.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), m(xb), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.from_numpy(out), tm(xb), rtol=1e-5, atol=1e-5)


def test_legacy_torchscript_onnx_export_of_an_eval_model_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    m = _trained_model()
    x = torch.randn(4, 3, 8, 8)
    path = tmp_path / "convbn_legacy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter announces its retirement
        torch.onnx.export(m, (x,), str(path), dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), m(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# torch.jit


def test_jit_trace_of_an_eval_model_works_without_tracer_warnings():
    m = _trained_model()
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        tm = torch.jit.trace(m, x)
    x2 = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(tm(x2), m(x2), rtol=1e-5, atol=1e-5)


def test_jit_trace_in_training_raises_one_clear_error_naming_the_alternatives():
    m = _trained_model().train()
    with pytest.raises(RuntimeError, match=r"BatchNorm2d: torch.jit.trace cannot record .* training") as e:
        torch.jit.trace(m, torch.randn(4, 3, 8, 8))
    msg = str(e.value)
    assert "torch.compile" in msg and "torch.export" in msg and "model.eval()" in msg


@pytest.mark.parametrize("layer, shape", [(lambda: bnn.GhostBatchNorm2d(3, virtual_batch_size=2), (4, 3, 5, 5)),
                                          (lambda: bnn.MaskedBatchNorm1d(3), (4, 3, 6)),
                                          (lambda: bnn.BatchRenorm2d(3), (4, 3, 5, 5))],
                         ids=["GhostBatchNorm2d", "MaskedBatchNorm1d", "BatchRenorm2d"])
def test_jit_trace_of_the_other_layers_in_training_raises_the_same_error_and_moves_no_buffer(layer, shape):
    # (a ghost batch norm raised a TypeError from inside its split; a masked one traced and its
    # traced module never updated the running statistics)
    m = layer()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"torch.jit.trace cannot record bnlab's batch norm in training mode"):
        torch.jit.trace(m, torch.randn(*shape), check_trace=False)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tm = torch.jit.trace(m, torch.randn(*shape) + 1, check_trace=False)
    x = torch.randn(*shape) * 2
    with torch.no_grad():
        torch.testing.assert_close(tm(x), m(x))


@pytest.mark.parametrize("layer", [lambda: bnn.BatchNorm2d(8), lambda: bnn.MaskedBatchNorm1d(8),
                                   lambda: bnn.SequenceBatchNorm(8, max_steps=5)],
                         ids=["BatchNorm2d", "MaskedBatchNorm1d", "SequenceBatchNorm"])
def test_jit_script_raises_one_clear_error_naming_the_alternatives(layer):
    m = torch.nn.Sequential(torch.nn.Identity(), layer())
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile bnlab's batch norm") as e:
        torch.jit.script(m)
    msg = str(e.value)
    assert "torch.compile" in msg and "torch.export" in msg and 'bnlab.convert(model, to="torch")' in msg


def test_jit_script_works_after_converting_to_torchs_layers():
    m = _trained_model()
    sm = torch.jit.script(bnlab.convert(copy.deepcopy(m), to="torch"))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(sm(x), m(x), rtol=1e-5, atol=1e-5)
