"""bnlab.tools.interop: batch-norm weights and configs between torch/bnlab and Keras 3 (torch
backend) and Flax linen. Real layers compute the same eval outputs from converted weights; round
trips are exact; the momentum conventions agree on the running mean after a training step and
differ, as documented, on the variance (unbiased in torch, biased in Keras and Flax)."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

import bnlab
from bnlab.tools import interop

# Keras reads torch tensors through np.array(tensor), which numpy 2 warns about inside Keras
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn.t accept a copy keyword:DeprecationWarning")


def _trained(cls=bnlab.nn.BatchNorm2d, c=4, dtype=torch.float32, **kw):
    """A layer with non-trivial gamma, beta and running statistics (three training steps)."""
    torch.manual_seed(0)
    bn = cls(c, dtype=dtype, **kw)
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            if bn.bias is not None:
                bn.bias.uniform_(-1, 1)
    shape = (8, c, 3, 3) if isinstance(bn, torch.nn.BatchNorm2d) or "2d" in type(bn).__name__ else (16, c)
    for _ in range(3):
        bn(torch.randn(shape, dtype=dtype) * 2 + 0.5)
    return bn.eval()


def _same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- round trips and configs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"affine": False}])
def test_round_trips_are_exact(dtype, kw):
    for cls in (bnlab.nn.BatchNorm2d, torch.nn.BatchNorm1d):
        bn = _trained(cls, dtype=dtype, **kw)
        nbt = int(bn.num_batches_tracked)
        _same_state(interop.from_keras(interop.to_keras(bn), num_batches_tracked=nbt), bn.state_dict())
        _same_state(interop.from_flax(interop.to_flax(bn), num_batches_tracked=nbt), bn.state_dict())
        k = interop.to_keras(bn)
        assert set(k) == {"moving_mean", "moving_variance"} | ({"gamma"} if bn.weight is not None else set()) | (
            {"beta"} if bn.bias is not None else set())
        assert all(isinstance(v, np.ndarray) and v.dtype == np.dtype(str(dtype).split(".")[1]) for v in k.values())
        k2 = interop.to_keras(interop.from_keras(k))
        assert all(np.array_equal(k[n], k2[n]) for n in k)


def test_state_dict_with_a_prefix_and_clear_errors():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), _trained())
    sd = net.state_dict()
    k = interop.to_keras(sd, prefix="1.")
    assert np.array_equal(k["moving_variance"], net[1].running_var.numpy())
    with pytest.raises(ValueError, match=r"to_keras: expected running_mean and running_var under '0.'"):
        interop.to_keras(sd, prefix="0.")
    with pytest.raises(ValueError, match=r"track_running_stats=False has no running statistics"):
        interop.to_flax(torch.nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(TypeError, match=r"expected a batch-norm layer"):
        interop.to_keras(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"momentum=None \(a cumulative average\) has no Keras or Flax counterpart"):
        interop.keras_config(bnlab.nn.BatchNorm1d(3, momentum=None))
    with pytest.raises(ValueError, match=r"from_flax: expected variables\['batch_stats'\] with 'mean' and 'var'"):
        interop.from_flax({"params": {"scale": np.ones(3)}})
    with pytest.raises(ValueError, match=r"Flax linen has no batch renormalization"):
        interop.flax_config(bnlab.nn.BatchRenorm2d(3), training=True)


def test_configs_convert_momentum_and_eps_both_ways():
    bn = bnlab.nn.BatchNorm2d(3, eps=1e-3, momentum=0.01)
    kc = interop.keras_config(bn)
    assert kc == {"axis": 1, "momentum": 0.99, "epsilon": 1e-3, "center": True, "scale": True}
    assert interop.keras_config(bn, channels_last=True)["axis"] == -1
    assert interop.torch_config_from_keras(kc) == {"eps": 1e-3, "momentum": 0.01, "affine": True, "bias": True}
    assert interop.torch_config_from_keras({}) == {"eps": 1e-3, "momentum": 0.01, "affine": True, "bias": True}
    fc = interop.flax_config(bn.eval())
    assert fc == {"use_running_average": True, "axis": 1, "momentum": 0.99, "epsilon": 1e-3, "use_bias": True,
                  "use_scale": True}
    assert interop.flax_config(bn, training=True)["use_running_average"] is False
    assert interop.torch_config_from_flax({}) == {"eps": 1e-5, "momentum": 0.01, "affine": True, "bias": True}
    assert interop.torch_config_from_flax({"use_scale": False, "use_bias": True}) == {
        "eps": 1e-5, "momentum": 0.01, "affine": True, "bias": True}  # gamma fixed at 1: weight = ones
    assert interop.torch_config_from_keras({"scale": True, "center": False})["bias"] is False
    assert interop.torch_config_from_keras({"scale": False, "center": False})["affine"] is False
    assert interop.flip_momentum(0.1) == 0.9 and interop.flip_momentum(0.99) == 0.01
    rn = interop.keras_config(bnlab.nn.BatchRenorm2d(3, r_max=2.0, d_max=1.0, momentum=0.05))
    assert rn["renorm"] is True and rn["renorm_clipping"] == {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}
    assert rn["renorm_momentum"] == 0.95
    # beta without gamma (Keras scale=False) becomes weight = ones
    st = interop.from_keras({"beta": np.full(3, 0.5, np.float32), "moving_mean": np.zeros(3, np.float32),
                             "moving_variance": np.ones(3, np.float32)})
    assert torch.equal(st["weight"], torch.ones(3)) and list(st)[:2] == ["weight", "bias"]


def test_docstring_examples_run():
    result = doctest.testmod(interop, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- Keras 3
@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"affine": False}])
@pytest.mark.parametrize("channels_last", [False, True])
def test_keras_layer_computes_the_same_eval_output(keras_layer, kw, channels_last):
    bn = _trained(eps=1e-3, momentum=0.01, **kw)
    x = torch.randn(5, 4, 6, 6) * 2 + 0.5
    xk = x.permute(0, 2, 3, 1).contiguous() if channels_last else x
    layer = keras_layer(bn, [None] + list(xk.shape[1:]), channels_last=channels_last)
    yk = layer(xk, training=False).detach()
    if channels_last:
        yk = yk.permute(0, 3, 1, 2)
    torch.testing.assert_close(yk, bn(x), rtol=1e-5, atol=1e-5)
    # and back: the Keras layer's weights give the layer's state, bit for bit
    back = interop.from_keras(layer, num_batches_tracked=int(bn.num_batches_tracked))
    _same_state(back, bn.state_dict())
    cfg = interop.torch_config_from_keras(layer)
    assert cfg["eps"] == bn.eps and cfg["momentum"] == bn.momentum and cfg["affine"] == bn.affine


def test_keras_training_step_momentum_convention(keras_layer):
    """momentum 0.99 in Keras moves moving_mean exactly as momentum 0.01 moves running_mean; the
    variance differs by the Bessel factor (Keras: biased batch variance)."""
    bn = _trained(eps=1e-3, momentum=0.01).train()
    layer = keras_layer(bn, (None, 4, 3, 3))
    v0 = bn.running_var.clone()
    x = torch.randn(6, 4, 3, 3)
    yb = bn(x)
    yk = layer(x, training=True).detach()
    torch.testing.assert_close(yk, yb, rtol=1e-5, atol=1e-5)
    w = interop.keras_get_weights(layer)
    torch.testing.assert_close(torch.from_numpy(w["moving_mean"]), bn.running_mean, rtol=1e-6, atol=1e-7)
    var_b = x.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(torch.from_numpy(w["moving_variance"]), 0.99 * v0 + 0.01 * var_b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bn.running_var, 0.99 * v0 + 0.01 * var_b * 54 / 53, rtol=1e-6, atol=1e-7)


def test_keras_set_weights_says_what_does_not_fit(keras):
    layer = keras.layers.BatchNormalization(axis=1, center=False)
    with pytest.raises(ValueError, match=r"the layer has no weights yet; build it first"):
        interop.keras_set_weights(layer, {})
    layer.build((None, 4, 2, 2))
    with pytest.raises(ValueError, match=r"missing \[\], not in the layer \['beta'\]"):
        interop.keras_set_weights(layer, interop.to_keras(_trained()))


# ---------------------------------------------------------------- Flax linen
@pytest.fixture(scope="module")
def flax_linen():
    pytest.importorskip("jax")
    linen = pytest.importorskip("flax.linen")
    return linen


def _flax_reference(variables, x, axis, epsilon):
    """flax.linen.BatchNorm in inference, as its documentation states it:
    (x - mean) / sqrt(var + epsilon) * scale + bias, per feature along ``axis``."""
    shape = [1] * x.ndim
    shape[axis] = -1
    st, p = variables["batch_stats"], variables.get("params", {})
    y = (x - st["mean"].reshape(shape)) / np.sqrt(st["var"].reshape(shape) + epsilon)
    if "scale" in p:
        y = y * p["scale"].reshape(shape)
    if "bias" in p:
        y = y + p["bias"].reshape(shape)
    return y


@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"affine": False}])
@pytest.mark.parametrize("channels_last", [False, True])
def test_flax_batchnorm_computes_the_same_eval_output(flax_linen, kw, channels_last):
    import jax

    bn = _trained(**kw)
    cfg = interop.flax_config(bn, channels_last=channels_last)
    module = flax_linen.BatchNorm(**cfg)
    variables = interop.to_flax(bn)
    x = torch.randn(5, 4, 6, 6) * 2 + 0.5
    xf = x.permute(0, 2, 3, 1).contiguous() if channels_last else x
    # the variables Flax itself creates have the same structure and shapes
    made = module.init(jax.random.PRNGKey(0), xf.numpy())
    assert jax.tree_util.tree_structure(made) == jax.tree_util.tree_structure(variables)
    y = np.asarray(module.apply(variables, xf.numpy()))
    ref = _flax_reference(variables, xf.numpy(), cfg["axis"], cfg["epsilon"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    yt = torch.from_numpy(np.array(y))
    if channels_last:
        yt = yt.permute(0, 3, 1, 2)
    torch.testing.assert_close(yt, bn(x), rtol=1e-5, atol=1e-5)
    _same_state(interop.from_flax(jax.tree_util.tree_map(np.asarray, variables),
                                  num_batches_tracked=int(bn.num_batches_tracked)), bn.state_dict())
    assert interop.torch_config_from_flax(module) == {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine,
                                                     "bias": bn.bias is not None or not bn.affine}


def test_flax_training_step_momentum_convention(flax_linen):
    bn = _trained(momentum=0.1).train()
    module = flax_linen.BatchNorm(**interop.flax_config(bn))
    v0 = bn.running_var.clone()
    x = torch.randn(6, 4, 3, 3)
    y, updated = module.apply(interop.to_flax(bn), x.numpy(), mutable=["batch_stats"])
    torch.testing.assert_close(torch.from_numpy(np.array(y)), bn(x), rtol=1e-5, atol=1e-5)
    st = interop.from_flax(updated | {"params": interop.to_flax(bn)["params"]})
    torch.testing.assert_close(st["running_mean"], bn.running_mean, rtol=1e-6, atol=1e-7)
    var_b = x.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(st["running_var"], 0.9 * v0 + 0.1 * var_b, rtol=1e-6, atol=1e-7)  # biased in Flax
    torch.testing.assert_close(bn.running_var, 0.9 * v0 + 0.1 * var_b * 54 / 53, rtol=1e-6, atol=1e-7)
