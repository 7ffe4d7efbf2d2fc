"""What differs between the torch releases bnlab accepts (pyproject's range), found by feature,
not by version number.

torch's batch-norm constructors take ``bias=False`` (a weight without a bias) only in recent
releases; in older ones (2.11, for one) ``_NormBase.__init__`` has no ``bias`` keyword. bnlab's
layers take it everywhere: on an older torch the bias parameter is built and then removed, as the
newer torch does it.
"""

from __future__ import annotations

import inspect

import torch
from torch.nn import init
from torch.nn.modules import batchnorm as _tbn
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = ["NORM_BIAS", "norm_init", "bias_kw", "reset_parameters"]


def _takes(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - a signature inspect cannot read
        return False


# torch's batch norms take bias=... (every base bnlab builds on, or none of them)
NORM_BIAS = all(_takes(c.__init__, "bias") for c in (_tbn._NormBase, _tbn._BatchNorm, _tbn._LazyNormBase))


def _no_bias_error(what: str) -> ValueError:
    return ValueError(f"{what}: bias=False (a weight without a bias) needs a torch whose batch norms take the bias "
                      f"keyword; torch {torch.__version__} here has none")


def norm_init(base_init, self, *args, bias: bool = True, **kw) -> None:
    """``base_init(self, *args, bias=bias, **kw)``, torch's ``_NormBase``-family constructor; on a torch
    without the keyword, the same module: the bias parameter removed after the base made it."""
    if NORM_BIAS:
        base_init(self, *args, bias=bias, **kw)
        return
    if not bias and isinstance(self, LazyModuleMixin):
        raise _no_bias_error(type(self).__name__)  # the lazy base would materialize the missing bias
    base_init(self, *args, **kw)
    if not bias and self.affine:
        self.register_parameter("bias", None)


def bias_kw(bias: bool, what: str) -> dict:
    """The ``bias`` keyword for a torch batch-norm constructor: ``{}`` where torch has none and the
    layer has a bias; a clear error where it has none and the layer has no bias (torch cannot hold it)."""
    if NORM_BIAS:
        return {"bias": bias}
    if bias:
        return {}
    raise _no_bias_error(what)


def reset_parameters(self) -> None:
    """``_NormBase.reset_parameters`` where the bias may be None (what newer torch does; older
    torch zeroes the bias unconditionally). A lazy layer's parameters wait until they exist, as in
    torch's ``_LazyNormBase.reset_parameters``."""
    if isinstance(self, LazyModuleMixin) and self.has_uninitialized_params():
        return
    self.reset_running_stats()
    if self.affine:
        init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)
