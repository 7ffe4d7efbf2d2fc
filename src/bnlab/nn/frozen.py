"""Frozen batch normalization: a batch-norm layer turned into a fixed per-channel affine map.

``FrozenBatchNorm2d`` (and ``1d`` / ``3d``) holds a batch norm's statistics and parameters as
buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` (no parameters, nothing updates)
and computes

    y = x * scale + shift,   scale = weight / sqrt(running_var + eps),   shift = bias - running_mean * scale

in one fused multiply-add (``torch.addcmul``), in any mode. This is the layer detection and
segmentation backbones are fine-tuned with (small per-device batches make batch statistics
useless; the frozen layer applies the pretrained statistics): the same buffers and state_dict keys
as torchvision's and detectron2's ``FrozenBatchNorm2d``, so their checkpoints, and any batch norm's
state_dict (``num_batches_tracked`` is accepted and dropped), load as they are.

Decisions, written down here:

* The output has the input's dtype: ``scale`` and ``shift`` are computed in the buffers' dtype
  (float32 for a float32 model) and cast to the input's (so a bfloat16 activation under autocast
  stays bfloat16, as torch's batch norm returns it). Layout (channels_last) follows the input.
* ``from_batchnorm(bn)`` copies what the layer's eval-mode output uses: ``running_mean``,
  ``running_var``, ``eps``, ``weight`` (ones when ``affine=False``) and ``bias`` (zeros when absent).
  A layer without running statistics (``track_running_stats=False``) normalizes with batch
  statistics even in eval; freezing it cannot give its output, so it raises, naming the layer.
* ``convert_frozen_batchnorm(model)`` replaces every ``torch.nn.modules.batchnorm._BatchNorm``
  (torch's BatchNorm1d/2d/3d and SyncBatchNorm, bnlab's batch norms and ghost batch norms), in place
  where the model contains them (the model itself is returned frozen when it is a batch norm).
  The frozen class follows the layer's dimensionality; ``SyncBatchNorm``, whose dimensionality is
  not fixed, becomes ``FrozenBatchNorm2d``. Masked and sequence batch norm (other signatures, per-step
  statistics) are not ``_BatchNorm`` and are left alone.
* A converted layer remembers its qualified name, so a shape error names it:
  ``FrozenBatchNorm2d 'layer1.0.bn1': expected 4D input (got 3D input of shape (2, 3, 4))``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "convert_frozen_batchnorm"]


class _FrozenBatchNorm(nn.Module):
    """Shared by FrozenBatchNorm1d/2d/3d; see the module docstring."""

    _dims: tuple[int, ...] = ()
    _dims_text = ""

    def __init__(self, num_features: int, eps: float = 1e-5, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int (got {num_features!r})")
        if not eps > 0:
            raise ValueError(f"{type(self).__name__}: eps must be > 0 (got {eps!r})")
        self.num_features = num_features
        self.eps = float(eps)
        fk = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **fk))
        self.register_buffer("bias", torch.zeros(num_features, **fk))
        self.register_buffer("running_mean", torch.zeros(num_features, **fk))
        self.register_buffer("running_var", torch.ones(num_features, **fk))
        self._bnlab_name: str | None = None  # the qualified name given by convert_frozen_batchnorm

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def _layer(self) -> str:
        name = type(self).__name__
        return f"{name} {self._bnlab_name!r}" if self._bnlab_name else f"{name}({self.num_features})"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # a batch norm's state_dict loads as it is: its step counter (and bnlab's frozen-state entry,
        # see bnlab.tools.freeze) has no meaning here
        state_dict.pop(prefix + "num_batches_tracked", None)
        state_dict.pop(prefix + "bnlab_frozen", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """The per-channel ``(scale, shift)`` of ``y = x * scale + shift``, each of shape ``(C,)``."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() not in self._dims:
            raise ValueError(f"{self._layer()}: expected {self._dims_text} input "
                             f"(got {input.dim()}D input of shape {tuple(input.shape)})")
        if input.shape[1] != self.num_features:
            raise ValueError(f"{self._layer()}: expected {self.num_features} channels in dim 1 "
                             f"(got input of shape {tuple(input.shape)})")
        scale, shift = self.scale_shift()
        shape = [1, -1] + [1] * (input.dim() - 2)
        scale = scale.to(input.dtype).reshape(shape)
        shift = shift.to(input.dtype).reshape(shape)
        return torch.addcmul(shift, input, scale)

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, name: str | None = None) -> "_FrozenBatchNorm":
        """A frozen layer with the eval-mode output of batch-norm layer ``bn`` (any
        ``torch.nn.modules.batchnorm._BatchNorm``), on its device and in its dtype.

        Called on ``FrozenBatchNorm1d/2d/3d`` it returns that class; ``name`` (optional) is the
        layer's qualified name, used in error messages.
        """
        where = repr(name) if name else type(bn).__name__
        if isinstance(bn, _FrozenBatchNorm):
            raise TypeError(f"{cls.__name__}.from_batchnorm: {where} is frozen already")
        if not isinstance(bn, _TorchBatchNorm):
            raise TypeError(f"{cls.__name__}.from_batchnorm: expected a batch-norm layer "
                            f"(a torch.nn.modules.batchnorm._BatchNorm), got {type(bn).__name__} ({where})")
        if isinstance(bn, nn.modules.batchnorm._LazyNormBase) and bn.has_uninitialized_params():
            raise ValueError(f"{cls.__name__}.from_batchnorm: {where} is an uninitialized lazy layer "
                             f"({type(bn).__name__}): run one forward first")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"{cls.__name__}.from_batchnorm: {where} ({type(bn).__name__}) has no running statistics "
                "(track_running_stats=False): it normalizes with batch statistics even in eval, which no fixed "
                "affine map reproduces")
        natural = _frozen_class(bn)
        if cls is _FrozenBatchNorm:
            cls = natural
        elif cls is not natural and isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            raise TypeError(f"{cls.__name__}.from_batchnorm: {where} is a {type(bn).__name__}, whose frozen "
                            f"layer is {natural.__name__}")
        rm = bn.running_mean
        out = cls(bn.num_features, bn.eps, device=rm.device, dtype=rm.dtype)
        with torch.no_grad():
            out.running_mean.copy_(rm)
            out.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                out.weight.copy_(bn.weight)
            if bn.bias is not None:
                out.bias.copy_(bn.bias)
        out._bnlab_name = name
        return out

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """:func:`convert_frozen_batchnorm` (detectron2's spelling, as a classmethod)."""
        return convert_frozen_batchnorm(module)


def _frozen_class(bn: nn.Module) -> type:
    """The frozen class for a batch-norm layer's dimensionality (2d when it is not fixed)."""
    for torch_cls, frozen in ((nn.BatchNorm1d, FrozenBatchNorm1d), (nn.BatchNorm2d, FrozenBatchNorm2d),
                              (nn.BatchNorm3d, FrozenBatchNorm3d)):
        if isinstance(bn, torch_cls):
            return frozen
    name = type(bn).__name__  # bnlab's ghost batch norms and other subclasses of the base: by their name
    for suffix, frozen in (("1d", FrozenBatchNorm1d), ("2d", FrozenBatchNorm2d), ("3d", FrozenBatchNorm3d)):
        if name.endswith(suffix):
            return frozen
    return FrozenBatchNorm2d


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """A batch norm frozen into ``y = x * scale + shift`` over a 2D or 3D input ``(N, C)`` / ``(N, C, L)``.

    Buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` (no parameters); see
    :class:`FrozenBatchNorm2d`.
    """

    _dims = (2, 3)
    _dims_text = "2D or 3D"


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """A batch norm frozen into ``y = x * scale + shift`` over a 4D input ``(N, C, H, W)``.

    Args:
        num_features: C.
        eps: added to ``running_var`` (default 1e-5).
        device, dtype: keywords, of the buffers (default: torch's defaults).

    Buffers (no parameters): ``weight`` (ones), ``bias`` (zeros), ``running_mean`` (zeros),
    ``running_var`` (ones), the state_dict keys of a batch norm, whose state_dict loads as it is.

    Example:
        >>> import torch, bnlab
        >>> bn = torch.nn.BatchNorm2d(3).eval()
        >>> frozen = bnlab.nn.FrozenBatchNorm2d.from_batchnorm(bn)
        >>> x = torch.randn(2, 3, 4, 4)
        >>> torch.allclose(frozen(x), bn(x), atol=1e-6)
        True
        >>> net = bnlab.nn.convert_frozen_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), bn))
        >>> type(net[1]).__name__, len(list(net[1].parameters()))
        ('FrozenBatchNorm2d', 0)
    """

    _dims = (4,)
    _dims_text = "4D"


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """A batch norm frozen into ``y = x * scale + shift`` over a 5D input ``(N, C, D, H, W)``; see
    :class:`FrozenBatchNorm2d`."""

    _dims = (5,)
    _dims_text = "5D"


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every batch-norm layer of ``module`` by a frozen one with its eval-mode output.

    Every ``torch.nn.modules.batchnorm._BatchNorm`` (torch's and bnlab's batch norms, ghost batch
    norm, SyncBatchNorm) becomes ``FrozenBatchNorm1d/2d/3d`` by its dimensionality (SyncBatchNorm:
    2d), in place; the model is returned (a frozen layer when ``module`` itself is a batch norm).
    Layers without running statistics raise a ``ValueError`` naming them, before anything changes.

    Example:
        >>> import torch, bnlab
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), bnlab.nn.BatchNorm1d(8))
        >>> bnlab.nn.convert_frozen_batchnorm(net)[1]
        FrozenBatchNorm1d(8, eps=1e-05)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_frozen_batchnorm: expected an nn.Module, got {type(module).__name__}")
    targets = [(name, m) for name, m in module.named_modules()
               if isinstance(m, _TorchBatchNorm) and not isinstance(m, _FrozenBatchNorm)]
    frozen = {id(m): _FrozenBatchNorm.from_batchnorm(m, name or None) for name, m in targets}  # all checks first
    if id(module) in frozen:
        return frozen[id(module)]
    _replace(module, frozen)
    return module


def _replace(module: nn.Module, frozen: dict) -> None:
    for child_name, child in list(module._modules.items()):  # every registration, repeated ones included
        if child is None:
            continue
        if id(child) in frozen:
            setattr(module, child_name, frozen[id(child)])  # a layer registered twice becomes one frozen layer
        else:
            _replace(child, frozen)
