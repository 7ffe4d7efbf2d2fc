"""Batch-norm weights between torch / bnlab and Keras 3 and Flax linen, as plain dicts of arrays.

Nothing here imports Keras, JAX or Flax: the functions take and return numpy arrays (and torch
tensors on the torch side), which every framework reads.

The same numbers under three names:

========================  ==============================  ===============================
torch / bnlab             Keras ``BatchNormalization``    Flax linen ``BatchNorm``
========================  ==============================  ===============================
``weight`` (gamma)        ``gamma``                       ``params["scale"]``
``bias`` (beta)           ``beta``                        ``params["bias"]``
``running_mean``          ``moving_mean``                 ``batch_stats["mean"]``
``running_var``           ``moving_variance``             ``batch_stats["var"]``
``momentum=0.1``          ``momentum=0.9``                ``momentum=0.9``
``eps`` (default 1e-5)    ``epsilon`` (default 1e-3)      ``epsilon`` (default 1e-5)
``training`` / ``eval()``  ``training=`` call argument     ``use_running_average=not training``
channels at dim 1         ``axis`` (default -1)           ``axis`` (default -1)
========================  ==============================  ===============================

Momentum: torch's ``momentum`` is the weight of the *new* batch (``running = (1 - m) * running +
m * batch``); Keras' and Flax's is the weight of the *old* value, so each is one minus the other
(rounded to 15 significant digits, so that 0.99 gives 0.01). ``momentum=None`` (torch's cumulative
average) has no counterpart.

What converts exactly, and what does not:

* **Eval** (inference) is the same formula everywhere, ``(x - mean) / sqrt(var + eps) * gamma +
  beta``, so converted weights with the converted ``eps`` compute the same outputs.
* **Training updates differ in one respect:** torch (and bnlab) move ``running_var`` towards the
  *unbiased* batch variance (``M / (M - 1)`` times the biased one); Keras and Flax move it towards
  the *biased* one. The means move identically.
* ``num_batches_tracked`` exists only in torch; ``from_keras`` / ``from_flax`` set it (default 0).
* A layer without gamma but with beta (Keras ``scale=False, center=True``; Flax
  ``use_scale=False, use_bias=True``) has no torch form: its gamma is 1, so the state_dict carries
  ``weight = ones`` and the matching torch layer has ``affine=True``. A torch layer with
  ``bias=False`` is Keras ``center=False`` / Flax ``use_bias=False``; ``affine=False`` drops both.
* Batch renormalization (:class:`bnlab.nn.BatchRenorm2d`): ``to_keras(..., renorm=True)`` also
  fills Keras' renorm variables (``renorm_mean = running_mean``, ``renorm_stddev = moving_stddev =
  sqrt(running_var + eps)``), so that a Keras ``renorm=True`` layer computes the same training
  output from the same state; :func:`keras_config` gives its ``renorm_clipping``. Keras keeps its
  renorm statistics in those separate variables and its inference variance as a moving average
  of ``sqrt(var + eps)``; ``from_keras`` reads ``moving_mean`` / ``moving_variance`` only.

Example:
    >>> import torch, bnlab
    >>> from bnlab.tools import interop
    >>> bn = bnlab.nn.BatchNorm2d(3, momentum=0.01, eps=1e-3)
    >>> interop.keras_config(bn)
    {'axis': 1, 'momentum': 0.99, 'epsilon': 0.001, 'center': True, 'scale': True}
    >>> sorted(interop.to_keras(bn))
    ['beta', 'gamma', 'moving_mean', 'moving_variance']
    >>> state = interop.from_keras(interop.to_keras(bn), num_batches_tracked=int(bn.num_batches_tracked))
    >>> all(torch.equal(state[k], v) for k, v in bn.state_dict().items())
    True
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

__all__ = [
    "to_keras", "from_keras", "keras_config", "torch_config_from_keras", "keras_set_weights", "keras_get_weights",
    "to_flax", "from_flax", "flax_config", "torch_config_from_flax", "flip_momentum",
    "KERAS_EPSILON", "FLAX_EPSILON", "KERAS_MOMENTUM", "FLAX_MOMENTUM",
]

KERAS_EPSILON = 1e-3  # keras.layers.BatchNormalization's default epsilon
KERAS_MOMENTUM = 0.99  # its default momentum (torch's 0.01)
FLAX_EPSILON = 1e-5  # flax.linen.BatchNorm's defaults
FLAX_MOMENTUM = 0.99

_KERAS = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"), ("running_var", "moving_variance"))


def flip_momentum(momentum: float) -> float:
    """``1 - momentum``, rounded to 15 significant digits: torch's momentum (the new batch's
    weight) from Keras'/Flax's (the old value's weight), and back."""
    m = float(momentum)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] (got {momentum!r})")
    return float(f"{1.0 - m:.15g}")


# ----------------------------------------------------------------------------------------------
# the torch side


def _state(bn: Any, prefix: str, what: str) -> dict[str, Tensor]:
    """The batch-norm tensors of a torch/bnlab layer or of a state_dict (keys under ``prefix``)."""
    if isinstance(bn, torch.nn.Module):
        if not isinstance(bn, _NormBase):
            raise TypeError(f"{what}: expected a batch-norm layer (a torch.nn.modules.batchnorm._NormBase) or a "
                            f"state_dict (got {type(bn).__name__})")
        src = bn.state_dict()
        prefix = ""
    elif isinstance(bn, Mapping):
        src = bn
    else:
        raise TypeError(f"{what}: expected a batch-norm layer or a state_dict (got {type(bn).__name__})")
    out = {k: src[prefix + k] for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
           if prefix + k in src and src[prefix + k] is not None}
    if "running_mean" not in out or "running_var" not in out:
        have = sorted(k for k in src if k.startswith(prefix))
        raise ValueError(f"{what}: expected running_mean and running_var{f' under {prefix!r}' if prefix else ''} "
                         f"(got keys {have}); a layer built with track_running_stats=False has no running statistics "
                         "to convert")
    return out


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _tensor(a: Any, dtype: torch.dtype | None) -> Tensor:
    t = torch.from_numpy(np.array(a, copy=True))  # jax and numpy arrays alike; bits as they are
    return t if dtype is None else t.to(dtype)


def _momentum(bn, what: str) -> float:
    if bn.momentum is None:
        raise ValueError(f"{what}: momentum=None (a cumulative average) has no Keras or Flax counterpart; "
                         "give the layer a float momentum")
    return flip_momentum(bn.momentum)


def _check_layer(bn, what: str) -> None:
    if not isinstance(bn, _NormBase):
        raise TypeError(f"{what}: expected a batch-norm layer (got {type(bn).__name__})")
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError(f"{what}: {type(bn).__name__} has no running statistics (track_running_stats=False); Keras "
                         "and Flax always normalize with them in inference")


# ----------------------------------------------------------------------------------------------
# Keras 3


def to_keras(bn: Any, *, prefix: str = "", renorm: bool | None = None, eps: float | None = None) -> dict[str, np.ndarray]:
    """Keras ``BatchNormalization`` weights from a torch/bnlab batch-norm layer or its state_dict.

    Returns ``{"gamma", "beta", "moving_mean", "moving_variance"}`` as numpy arrays (``gamma`` only
    when the layer has a weight, ``beta`` only when it has a bias). ``prefix``: the layer's key prefix
    in a model's state_dict (``"features.1."``). ``renorm``: also Keras' batch-renorm variables
    (``moving_stddev``, ``renorm_mean``, ``renorm_stddev``); default True for a bnlab
    ``BatchRenorm`` layer. ``eps``: the layer's eps, needed for ``renorm`` from a state_dict.
    Put them into a built layer with :func:`keras_set_weights`.
    """
    what = "to_keras"
    st = _state(bn, prefix, what)
    out = {k: _np(st[t]) for t, k in _KERAS if t in st}
    if renorm is None:
        renorm = isinstance(bn, torch.nn.Module) and hasattr(bn, "r_max") and hasattr(bn, "d_max")
    if renorm:
        if eps is None:
            if not isinstance(bn, torch.nn.Module):
                raise ValueError(f"{what}: renorm=True from a state_dict needs eps= (the layer's eps)")
            eps = bn.eps
        std = np.sqrt(out["moving_variance"].astype(np.float64) + float(eps)).astype(out["moving_variance"].dtype)
        out["moving_stddev"] = std
        out["renorm_mean"] = out["moving_mean"].copy()
        out["renorm_stddev"] = std.copy()
    return out


def keras_get_weights(layer: Any) -> dict[str, np.ndarray]:
    """A Keras layer's weights by name (``{"gamma": ..., "moving_mean": ...}``), as numpy arrays."""
    return {v.name: np.array(v, copy=True) if not hasattr(v, "numpy") else np.array(v.numpy(), copy=True)
            for v in layer.weights}


def keras_set_weights(layer: Any, weights: Mapping[str, Any]) -> None:
    """Assign ``weights`` (by name, as :func:`to_keras` returns them) to a built Keras layer; every
    variable of the layer must be given, and nothing else."""
    names = [v.name for v in layer.weights]
    if not names:
        raise ValueError("keras_set_weights: the layer has no weights yet; build it first (layer.build(input_shape))")
    missing = [n for n in names if n not in weights]
    extra = [n for n in weights if n not in names]
    if missing or extra:
        raise ValueError(f"keras_set_weights: the layer has weights {names}; missing {missing}, not in the layer "
                         f"{extra} (check scale/center/renorm in keras_config)")
    for v in layer.weights:
        a = np.asarray(weights[v.name])
        if tuple(a.shape) != tuple(v.shape):
            raise ValueError(f"keras_set_weights: {v.name} has shape {tuple(v.shape)} in the layer, {tuple(a.shape)} "
                             "given")
        v.assign(a)


def from_keras(weights: Any, *, num_batches_tracked: int = 0, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """A torch/bnlab batch-norm state_dict from Keras ``BatchNormalization`` weights: a dict by name
    (as :func:`to_keras` or :func:`keras_get_weights` gives it) or a built Keras layer.

    ``num_batches_tracked`` fills torch's counter (Keras has none); ``dtype`` casts (default: the
    arrays' own). A missing ``gamma`` with a ``beta`` present becomes ``weight = ones`` (see the
    module docstring). Keras' renorm variables, if present, are not part of a torch state.
    """
    if not isinstance(weights, Mapping) and hasattr(weights, "weights"):
        weights = keras_get_weights(weights)
    missing = [k for k in ("moving_mean", "moving_variance") if k not in weights]
    if missing:
        raise ValueError(f"from_keras: expected moving_mean and moving_variance (got {sorted(weights)})")
    out = {}
    for t, k in _KERAS:
        if k in weights:
            out[t] = _tensor(weights[k], dtype)
    if "weight" not in out and "bias" in out:
        out["weight"] = torch.ones_like(out["bias"])
    out = {k: out[k] for k in ("weight", "bias", "running_mean", "running_var") if k in out}
    out["num_batches_tracked"] = torch.tensor(int(num_batches_tracked), dtype=torch.long)
    return out


def keras_config(bn: Any, *, channels_last: bool = False) -> dict:
    """Keyword arguments of ``keras.layers.BatchNormalization`` for a torch/bnlab batch-norm layer:
    ``axis`` (1 for channels-first data, as torch lays it out; -1 with ``channels_last=True``),
    ``momentum = 1 - momentum``, ``epsilon = eps``, ``center`` / ``scale`` (bias / weight present).
    A bnlab ``BatchRenorm`` layer adds ``renorm=True``, ``renorm_clipping={"rmax": r_max, "rmin":
    1 / r_max, "dmax": d_max}`` and ``renorm_momentum`` (its running statistics' momentum)."""
    what = "keras_config"
    _check_layer(bn, what)
    cfg = {"axis": -1 if channels_last else 1, "momentum": _momentum(bn, what), "epsilon": float(bn.eps),
           "center": bn.bias is not None, "scale": bn.weight is not None}
    if hasattr(bn, "r_max") and hasattr(bn, "d_max"):
        cfg.update(renorm=True, renorm_clipping={"rmax": bn.r_max, "rmin": 1.0 / bn.r_max, "dmax": bn.d_max},
                   renorm_momentum=cfg["momentum"])
    return cfg


def _config_of(config: Any) -> Mapping:
    if not isinstance(config, Mapping) and hasattr(config, "get_config"):
        config = config.get_config()
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a config dict or a layer with get_config() (got {type(config).__name__})")
    return config


def torch_config_from_keras(config: Any) -> dict:
    """Keyword arguments of a torch/bnlab batch-norm layer (less ``num_features``) from a Keras
    ``BatchNormalization`` config (a dict, ``layer.get_config()``, or the layer): ``eps``,
    ``momentum = 1 - momentum``, ``affine`` and ``bias``. Keras' defaults fill what is absent
    (epsilon 1e-3, momentum 0.99, center and scale True)."""
    c = _config_of(config)
    scale, center = bool(c.get("scale", True)), bool(c.get("center", True))
    return {"eps": float(c.get("epsilon", KERAS_EPSILON)), "momentum": flip_momentum(c.get("momentum", KERAS_MOMENTUM)),
            "affine": scale or center, "bias": center or not scale}


# ----------------------------------------------------------------------------------------------
# Flax linen


def to_flax(bn: Any, *, prefix: str = "") -> dict[str, dict[str, np.ndarray]]:
    """Flax linen ``BatchNorm`` variables from a torch/bnlab batch-norm layer or its state_dict:
    ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}`` as numpy arrays (``params``
    holds what the layer has; it is omitted when the layer has no affine). Pass them to
    ``module.apply(variables, x)``."""
    st = _state(bn, prefix, "to_flax")
    params = {}
    if "weight" in st:
        params["scale"] = _np(st["weight"])
    if "bias" in st:
        params["bias"] = _np(st["bias"])
    out = {"batch_stats": {"mean": _np(st["running_mean"]), "var": _np(st["running_var"])}}
    if params:
        out = {"params": params, **out}
    return out


def from_flax(variables: Mapping, *, num_batches_tracked: int = 0, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """A torch/bnlab batch-norm state_dict from Flax linen ``BatchNorm`` variables
    (``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``; ``FrozenDict`` and JAX
    arrays are fine). ``num_batches_tracked`` and ``dtype`` as in :func:`from_keras`; a missing
    ``scale`` with a ``bias`` present becomes ``weight = ones``."""
    if "batch_stats" not in variables or not {"mean", "var"} <= set(variables["batch_stats"]):
        raise ValueError(f"from_flax: expected variables['batch_stats'] with 'mean' and 'var' (got "
                         f"{ {k: sorted(v) if isinstance(v, Mapping) else type(v).__name__ for k, v in variables.items()} })")
    params = variables.get("params", {}) or {}
    out = {}
    if "scale" in params:
        out["weight"] = _tensor(params["scale"], dtype)
    if "bias" in params:
        out["bias"] = _tensor(params["bias"], dtype)
        if "weight" not in out:
            out = {"weight": torch.ones_like(out["bias"]), **out}
    out["running_mean"] = _tensor(variables["batch_stats"]["mean"], dtype)
    out["running_var"] = _tensor(variables["batch_stats"]["var"], dtype)
    out["num_batches_tracked"] = torch.tensor(int(num_batches_tracked), dtype=torch.long)
    return out


def flax_config(bn: Any, *, channels_last: bool = False, training: bool | None = None) -> dict:
    """Keyword arguments of ``flax.linen.BatchNorm`` for a torch/bnlab batch-norm layer:
    ``use_running_average = not training`` (default: the layer's own mode), ``axis`` (1, or -1 with
    ``channels_last=True``), ``momentum = 1 - momentum``, ``epsilon = eps``, ``use_bias`` /
    ``use_scale``."""
    what = "flax_config"
    _check_layer(bn, what)
    train = bn.training if training is None else bool(training)
    if train and hasattr(bn, "r_max") and hasattr(bn, "d_max"):
        raise ValueError(f"{what}: Flax linen has no batch renormalization; {type(bn).__name__} converts for inference "
                         "only (training=False), where it is batch norm")
    return {"use_running_average": not train,
            "axis": -1 if channels_last else 1, "momentum": _momentum(bn, what), "epsilon": float(bn.eps),
            "use_bias": bn.bias is not None, "use_scale": bn.weight is not None}


def torch_config_from_flax(config: Any) -> dict:
    """Keyword arguments of a torch/bnlab batch-norm layer (less ``num_features``) from Flax linen
    ``BatchNorm`` attributes (a dict, or the module itself): ``eps``, ``momentum = 1 - momentum``,
    ``affine``, ``bias``. Flax's defaults fill what is absent (epsilon 1e-5, momentum 0.99)."""
    if not isinstance(config, Mapping):
        config = {k: getattr(config, k) for k in ("epsilon", "momentum", "use_bias", "use_scale") if hasattr(config, k)}
    scale, center = bool(config.get("use_scale", True)), bool(config.get("use_bias", True))
    eps = float(config.get("epsilon", FLAX_EPSILON))
    if not math.isfinite(eps):
        raise ValueError(f"torch_config_from_flax: epsilon must be finite (got {eps})")
    return {"eps": eps, "momentum": flip_momentum(config.get("momentum", FLAX_MOMENTUM)), "affine": scale or center,
            "bias": center or not scale}
