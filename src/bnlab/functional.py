"""bnlab's functional API, with torch's signatures.

``batch_norm`` here is a drop-in for :func:`torch.nn.functional.batch_norm`: same arguments, same
defaults, same numbers (to float rounding, with better statistics: shifted, float64-accumulated).
It validates its input, then dispatches (:mod:`bnlab.kernels`) to bnlab's fused CPU kernels for
float32/float64 CPU tensors and to torch's native kernel for everything else.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .kernels import fast as _fast
from .policy import NonFiniteBatchError, check_nonfinite_option

__all__ = ["batch_norm", "NonFiniteBatchError", "check_batch_norm_input"]

_HALF = (torch.float16, torch.bfloat16)
_ONE_VALUE = "more than 1 value per channel when training"  # in the one-value batch's error (modules extend it)
_is_tracing = torch._C._is_tracing
_is_compiling = torch.compiler.is_compiling
# the small-call path (bnlab.kernels.fast) serves float32/float64 training inputs of up to 2^20
# values (4 MB of float32) in every layout it takes: (N, C), contiguous (N, C, *) and channels_last.
# Measured fwd+bwd in one process against the numba kernels: its two-thread loops, reading the
# tensor from cache, are faster up to there; from 8 MB the numba kernels' prefetching, four streams a
# thread and non-temporal stores are (level at 16 MB). Half-precision (N, C, *) training at any size
# (torch's kernel, called from C++), and eval at any size (one pass, where the Python around the
# numba kernels costs more than their speed saves).
_FAST_MAX = 1 << 20


def _fast_train_size(x: Tensor) -> bool:
    return x.numel() <= _FAST_MAX or (x.dim() > 2 and x.dtype in _HALF)


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def check_batch_norm_input(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    name: str = "batch_norm",
    eps: float | None = None,
) -> None:
    """Raise a clear error for input batch norm cannot take (everything torch's batch norm rejects,
    and nothing it accepts). ``name`` names the layer in messages; ``eps``, when given, is checked
    too (positive in training, non-negative in eval, as torch requires).

    Running statistics must be 1-D ``(C,)`` tensors (weight and bias may have any shape with C
    elements, as torch allows), of the input's dtype (float32 also for a float16/bfloat16 input),
    on its device, and must not require grad: they are buffers, never differentiated.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor input (got {type(input).__name__})")
    if not torch.compiler.is_compiling() and _is_tracing():
        # torch.jit.trace: shapes are traced tensors here (every check would warn and be frozen);
        # the op it records, torch's batch norm, checks its input itself
        return
    if input.dim() < 2:
        raise ValueError(f"{name}: expected input of shape (N, C, *) with at least 2 dimensions (got {input.dim()}D input)")
    dtype = input.dtype
    if not input.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point input (got dtype {dtype})")
    shape = input.shape
    c = shape[1]
    device = input.device
    for what, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected {what} to be a torch.Tensor or None (got {type(t).__name__})")
        if t.numel() != c:
            raise ValueError(
                f"{name}: input has {c} channels (dim 1 of shape {tuple(shape)}) but {what} has "
                f"{t.numel()} elements; expected num_features == {c}"
            )
        tdt = t.dtype
        if tdt is not dtype and not (tdt is torch.float32 and dtype in _HALF):
            want = f"{dtype}" + (" (or torch.float32)" if dtype in _HALF else "")
            fix = (f"; convert the input (x.to({tdt})) or the layer (.to({dtype}))" if t.is_floating_point()
                   else "; batch-norm parameters and statistics are floating-point tensors")
            raise TypeError(
                f"{name}: expected {what} of the input's dtype {want} (got {what} of dtype {tdt} for an input "
                f"of dtype {dtype}){fix}"
            )
        if t.device != device:
            raise ValueError(f"{name}: expected {what} on the input's device {device} (got {t.device})")
        if what[0] == "r":  # the running statistics: 1-D buffers, never differentiated
            if t.dim() != 1:
                raise ValueError(f"{name}: expected {what} of shape ({c},) (got a {t.dim()}-D tensor of shape {_shape(t)})")
            if t.requires_grad:
                raise ValueError(
                    f"{name}: expected {what} not to require grad (got a tensor with requires_grad=True); running "
                    "statistics are buffers updated in place and constants for autograd: pass "
                    f"{what}.detach(), or make it a buffer rather than a Parameter"
                )
    if training:
        if (running_mean is None) != (running_var is None):
            given = "running_mean" if running_var is None else "running_var"
            raise ValueError(
                f"{name}: expected running_mean and running_var to be both given or both None in training "
                f"(got only {given})"
            )
        if eps is not None and eps <= 0:  # torch's test: a nan eps passes (and gives nan), as there
            raise ValueError(f"{name}: expected eps > 0 in training (got eps={eps})")
        if c and input.numel() > 0 and input.numel() // c == 1:
            raise ValueError(
                f"{name}: expected {_ONE_VALUE} (got input of shape "
                f"{tuple(shape)}, 1 value per channel); use a batch of at least 2 or call .eval()"
            )
    elif eps is not None and eps < 0:
        raise ValueError(f"{name}: expected eps >= 0 (got eps={eps})")


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Tensor | None = None,
    nonfinite: str = "raise",
    name: str = "batch_norm",
) -> Tensor:
    r"""Batch normalization (Ioffe & Szegedy 2015, arXiv 1502.03167).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    per channel (dim 1), with statistics over every other dim.

    Errors: every input torch's batch norm rejects raises here, with a message naming the layer
    (``name``), what was expected and what came in: see :func:`check_batch_norm_input`.

    Args:
        input: ``(N, C, *)``, any number of trailing dims.
        running_mean, running_var: ``(C,)`` buffers; in training they are updated in place
            (``running = (1 - momentum) * running + momentum * batch``, unbiased variance);
            in eval they normalize. May be None in training (no tracking).
        weight, bias: optional scale gamma and shift beta, ``C`` elements (any shape, as torch).
        training: use batch statistics (True) or the running buffers (False).
        momentum: update factor (default 0.1). bnlab extension: ``None`` with
            ``num_batches_tracked`` gives a cumulative average, as the modules do; ``None``
            without it is an error (torch's functional form rejects ``None`` too).
        eps: added to the variance inside the square root (default 1e-5); must be > 0 in
            training and >= 0 in eval, as torch requires.
        num_batches_tracked: optional long scalar buffer incremented per tracked batch.
        nonfinite: what a training batch with nan/inf statistics does to the buffers:
            ``"raise"`` (default) raises :class:`NonFiniteBatchError` naming the channels;
            ``"skip"`` skips the statistics update. Either way the buffers are never corrupted.
        name: the layer name used in error messages.

    Example:
        >>> import torch, bnlab.functional as BF
        >>> x = torch.randn(8, 3, 4, 4)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y = BF.batch_norm(x, rm, rv, training=True)
        >>> torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
        True
    """
    fx = _fast.ext
    if (fx is not None and not _is_compiling() and type(input) is Tensor and not _is_tracing()
            and (nonfinite == "raise" or nonfinite == "skip")
            and not kernels.needs_reference()):
        y = _fast_batch_norm(fx, input, running_mean, running_var, weight, bias, training, momentum, eps,
                             num_batches_tracked, nonfinite, name)
        if y is not None:
            return y
    x, weight, bias = _check_call(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                  num_batches_tracked, nonfinite, name)
    y = _batch_norm_checked(x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
                            nonfinite, name)
    return y if x is input else y.reshape(input.shape)


def _fast_batch_norm(fx, input, running_mean, running_var, weight, bias, training, momentum, eps,
                     num_batches_tracked, nonfinite, name, residual=None, relu=False):
    """:func:`batch_norm` on the small-call path (:mod:`bnlab.kernels.fast`), or None for a call it
    does not serve (the general path then serves it, and raises any error). The modules come here
    too (:meth:`bnlab.nn.batchnorm._BatchNorm._fast_forward`), the norm-act layers in training with
    their epilogue (``relu(y + residual)``; ``residual`` None, ``relu`` False: plain batch norm)."""
    if training:
        if (momentum is None and num_batches_tracked is None) or not _fast_train_size(input):
            return None  # the general path's error; or a large input, which the numba kernels stream faster
        try:
            r = fx.train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                         residual, relu)
        except TypeError:  # an argument of a type the extension does not take: the general path says what
            return None
        if r is None:
            return None
        y, stats, status = r
        if status:  # a non-finite batch (or one that would overflow the buffers): nothing was written
            kernels.commit_running_stats(running_mean, running_var, num_batches_tracked, stats,
                                         input.numel() // input.shape[1], momentum, nonfinite, name)
        return y
    if running_mean is None or running_var is None or (torch.is_grad_enabled() and (
            input.requires_grad or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad) or (residual is not None and residual.requires_grad))):
        return None
    try:
        return fx.eval(input, weight, bias, running_mean, running_var, eps, residual, relu)
    except TypeError:
        return None


def _check_call(input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
                nonfinite, name):
    """Everything :func:`batch_norm` checks before it dispatches (:func:`check_batch_norm_input`,
    ``nonfinite``, ``momentum=None`` with ``num_batches_tracked``, running statistics in eval), for
    it and for the functional forms built on it (:func:`bnlab.nn.renorm.batch_renorm`). Returns
    ``(x, weight, bias)``: ``x`` the input with at most 5 dims (more than 3 spatial dims flattened
    into one: the same batch norm on ``(N, C, prod(spatial))``; the caller reshapes the output
    back when ``x is not input``), ``weight`` and ``bias`` 1-D (torch takes any shape with C
    elements)."""
    check_batch_norm_input(input, running_mean, running_var, weight, bias, training, name, eps)
    check_nonfinite_option(nonfinite, name)
    if momentum is None and num_batches_tracked is None:
        raise ValueError(
            f"{name}: momentum=None (a cumulative average) needs num_batches_tracked to count the batches "
            "(got num_batches_tracked=None); pass num_batches_tracked=<a long scalar tensor> or a float momentum"
        )
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"{name}: eval mode (training=False) needs running_mean and running_var (got None)")
    if weight is not None and weight.dim() != 1:
        weight = weight.reshape(-1)
    if bias is not None and bias.dim() != 1:
        bias = bias.reshape(-1)
    x = input if input.dim() <= 5 else input.reshape(input.shape[0], input.shape[1], -1)
    return x, weight, bias


def _batch_norm_checked(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    nonfinite: str,
    name: str,
    *,
    act: str = "none",
    residual: Tensor | None = None,
) -> Tensor:
    """:func:`batch_norm` after validation: the one path from bnlab's functional form and modules
    to :mod:`bnlab.kernels`.

    The caller has already checked what :func:`batch_norm` checks (:func:`check_batch_norm_input`,
    ``nonfinite``, ``momentum=None`` with ``num_batches_tracked``, running statistics in eval) and
    hands over an input of at most 5 dims with 1-D (or None) ``weight`` and ``bias``. The modules
    (:mod:`bnlab.nn.batchnorm`) call this directly: they validate once per call, with their own
    layer name, and their options are validated when they are built. ``training`` here means
    "normalize with the batch statistics"; running statistics given in training are updated.
    ``act`` and ``residual`` (the norm-act layers, :mod:`bnlab.nn.act`): ``act(y + residual)``,
    fused into the kernels' passes.
    """
    if act != "none" or residual is not None:  # bnlab.nn.BatchNormAct*: y = act(BN(x) + residual), fused
        if training:
            return kernels.batch_norm_act_train(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                                momentum, eps, nonfinite, name, act, residual)
        return kernels.batch_norm_act_eval(input, running_mean, running_var, weight, bias, eps, act, residual)
    if training:
        return kernels.batch_norm_train(
            input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, nonfinite, name
        )
    return kernels.batch_norm_eval(input, running_mean, running_var, weight, bias, eps)
