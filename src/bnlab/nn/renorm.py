r"""Batch renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence
in Batch-Normalized Models", arXiv 1702.03275).

In training, each channel is normalized with its batch statistics and then corrected towards the
running statistics:

.. math::

    \hat x = \frac{x - \mu_B}{\sigma_B}, \quad
    r = \mathrm{clip}\Big(\frac{\sigma_B}{\sigma}, \frac{1}{r_{max}}, r_{max}\Big), \quad
    d = \mathrm{clip}\Big(\frac{\mu_B - \mu}{\sigma}, -d_{max}, d_{max}\Big), \quad
    y = \gamma (\hat x \, r + d) + \beta

with :math:`\sigma_B = \sqrt{\mathrm{Var}_B[x] + \epsilon}` (the biased batch variance, as batch
norm normalizes) and :math:`\mu`, :math:`\sigma = \sqrt{\text{running\_var} + \epsilon}` the running
statistics *before* this batch's update. ``r`` and ``d`` are constants for autograd (the paper's
``stop_gradient``). In eval the layer is batch norm with the running statistics. With
``r_max=1, d_max=0`` it is batch norm in training too (``r = 1``, ``d = 0``); unclipped it
normalizes the forward pass with the running statistics while the gradient still flows through the
batch statistics.

Decisions, written down here:

* **Running statistics as torch's batch norm keeps them.** ``running_mean`` and ``running_var``
  are updated exactly as :class:`bnlab.nn.BatchNorm2d` updates them (one policy,
  :func:`bnlab.policy.update_buffers`: ``momentum`` or ``None`` for a cumulative average, the
  unbiased variance, the non-finite policy), and ``r`` and ``d`` are computed from them. The paper
  keeps a moving average of :math:`\sigma` itself; keeping the variance means the layer has batch
  norm's parameters, buffers and ``state_dict`` keys and nothing else, so checkpoints move freely
  between batch norm and batch renorm (its eval is batch norm's).
* **Warm-up** (``warmup_steps``): the paper starts with ``r_max = 1, d_max = 0`` (plain batch norm)
  and relaxes the limits as the running averages become trustworthy. ``warmup_steps=N`` ramps
  ``r_max`` linearly from 1 and ``d_max`` from 0 to their values over the first ``N`` training
  steps; ``warmup_steps=(start, r_end, d_end)`` holds 1 and 0 until step ``start`` and reaches
  ``r_max`` at step ``r_end`` and ``d_max`` at ``d_end`` (the paper's small-minibatch schedule is
  ``(5000, 40000, 25000)``). The step is ``num_batches_tracked`` before this batch: the training
  batches whose statistics entered the buffers, so the schedule resumes from a checkpoint and a
  batch skipped under ``nonfinite="skip"`` does not advance it. ``warmup_steps=0`` (default): the
  limits hold from the first step, as in Keras.
* **Without running statistics** (``running_mean is None``, e.g. after
  ``torch.func.replace_all_batch_norm_modules_``, or ``track_running_stats`` switched off after
  construction) there is nothing to correct towards and the layer is batch norm. Building the
  layer with ``track_running_stats=False`` is an error.
* **Precise BN**: :func:`bnlab.tools.recalibrate` calls ``recalibrate_begin`` / ``recalibrate_end``;
  in between the layer normalizes with batch statistics alone (batch norm), as every batch-norm
  layer does in that pass, so that later layers' population statistics are those of the inputs
  they see in eval.

Fast path (CPU float32/float64, eager): the layer is batch norm with the per-channel affine
``weight' = gamma * r``, ``bias' = gamma * d + beta`` (``r``, ``d`` detached), whose batch
statistics are needed before the affine. One kernel call
(:func:`bnlab.kernels.stats.renorm_forward`) computes the statistics, ``r`` and ``d`` from them
and the running statistics where batch norm's kernel finishes a channel's statistics, and writes
``y`` with ``weight'`` and ``bias'`` (formed in float64 and rounded once, as batch norm's), in the
passes of batch norm's training forward: the same memory traffic, ``y`` bit for bit batch norm's
when ``r = 1`` and ``d = 0``. Then the buffers' update (C-sized work). The backward is one call of
bnlab's batch-norm backward kernel with ``weight'`` (exactly batch norm's backward), with
``dgamma = dweight' * r + dbias' * d`` and ``dbeta = dbias'``. With ``r_max = 1, d_max = 0`` (the
start of a warm-up) the forward is batch norm's own kernel call. Every other case (CUDA, float16 /
bfloat16, ``torch.compile``, ``torch.func`` transforms, forward-mode AD) computes the batch
statistics in torch ops (:func:`bnlab.reference.batch_stats`) and calls bnlab's batch norm
(:func:`bnlab.kernels.batch_norm_train`) with ``weight'`` and ``bias'``, whose autograd gives the
same gradients. Under ``torch.compile`` the warm-up limits are computed from
``num_batches_tracked`` in tensor ops, so ``fullgraph=True`` traces the layer with a schedule too.

Keras (``keras.layers.BatchNormalization(renorm=True, renorm_clipping={"rmax": r_max, "rmin":
1 / r_max, "dmax": d_max})``) computes the same training output from the same statistics; it
differs in what it keeps: ``r`` and ``d`` come from separate ``renorm_mean`` / ``renorm_stddev``
moving averages (``renorm_momentum``) of the mean and of :math:`\sigma_B`, and its inference
variance is derived from a moving average of :math:`\sigma_B` (the biased variance plus epsilon).
:func:`bnlab.tools.interop.to_keras` fills those variables from this layer's buffers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .. import functional as BF
from .. import kernels
from .. import reference as ref
from ..kernels import cpu
from ..kernels import stats as kstats
from ..policy import update_buffers
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "batch_renorm", "renorm_correction"]

_is_tracing = torch._C._is_tracing


# ----------------------------------------------------------------------------------------------
# r and d


def renorm_correction(mean, var, running_mean, running_var, eps: float, r_max: float, d_max: float):
    """``(r, d)`` per channel from the batch's mean and biased variance and the running statistics.

    ``r = clip(sqrt(var + eps) / sqrt(running_var + eps), 1 / r_max, r_max)`` and
    ``d = clip((mean - running_mean) / sqrt(running_var + eps), -d_max, d_max)``, in float64.
    Works on float64 ndarrays (the kernels' statistics; the buffers are read as float64) and on
    torch tensors (any device; the result is float64 on that device). A non-finite statistic gives a
    non-finite ``r`` / ``d`` for that channel only.
    """
    if isinstance(mean, np.ndarray):
        rm = _as_f64(running_mean)
        rv = _as_f64(running_var)
        sigma = np.sqrt(rv + eps)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            r = np.clip(np.sqrt(var + eps) / sigma, 1.0 / r_max, r_max)
            d = np.clip((mean - rm) / sigma, -d_max, d_max)
        return r, d
    rm = running_mean.detach().to(torch.float64)
    rv = running_var.detach().to(torch.float64)
    sigma = torch.sqrt(rv + eps)
    if isinstance(r_max, Tensor):  # limits from a warm-up schedule traced by torch.compile
        r_max, d_max = r_max.to(sigma), d_max.to(sigma)
        r = torch.minimum(torch.maximum(torch.sqrt(var.to(torch.float64) + eps) / sigma, 1.0 / r_max), r_max)
        d = torch.minimum(torch.maximum((mean.to(torch.float64) - rm) / sigma, -d_max), d_max)
        return r, d
    r = torch.clamp(torch.sqrt(var.to(torch.float64) + eps) / sigma, 1.0 / r_max, r_max)
    d = torch.clamp((mean.to(torch.float64) - rm) / sigma, -d_max, d_max)
    return r, d


def _as_f64(t: Tensor) -> np.ndarray:
    a = t.detach().numpy(force=True)
    return a if a.dtype == np.float64 else a.astype(np.float64)


# ----------------------------------------------------------------------------------------------
# the fast path: bnlab's CPU kernels


_FUSE_IDENTITY = True  # r_max = 1, d_max = 0 through batch norm's own kernel (tests turn it off)
_IDENTITY: dict = {}  # C -> rd of r = 1, d = 0


def _identity(c: int) -> np.ndarray:
    rd = _IDENTITY.get(c)
    if rd is None:
        rd = _IDENTITY[c] = np.array([np.ones(c), np.zeros(c)])
    return rd


def _forward(x, weight, bias, track, eps, r_max, d_max):
    """One kernel call (:func:`bnlab.kernels.stats.renorm_forward`: the batch statistics, ``r`` and
    ``d`` from them and the running statistics, ``y`` with ``weight' = gamma r`` and ``bias' =
    gamma d + beta``), then the buffers' update. Returns ``(y, stats, rd, weight')``: ``rd`` the
    float64 ``(2, C)`` ndarray of ``r`` and ``d``, ``weight'`` a tensor of x's dtype (or None)."""
    running_mean, running_var, num_batches_tracked, momentum, nonfinite, name = track
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if r_max == 1.0 and d_max == 0.0 and _FUSE_IDENTITY:  # r = 1, d = 0 (a warm-up's start): batch norm
        y, stats, nbad = cpu.forward_train(x, weight, bias, eps)
        rd, w2 = _identity(stats.shape[1]), weight
    else:
        y, stats, rd, w2, nbad = kstats.renorm_forward(x, weight, bias, running_mean, running_var, eps, r_max, d_max)
    update_buffers(running_mean, running_var, num_batches_tracked, stats[0], stats[1], count, momentum, nonfinite,
                   name, nbad)  # after r and d were taken from the buffers
    return y, stats, rd, w2


class _RenormFn(torch.autograd.Function):
    """Forward: :func:`_forward`. Backward: bnlab's batch-norm backward kernel with
    ``weight' = gamma * r``, and ``dgamma = dweight' * r + dbias' * d``, ``dbeta = dbias'``; when a
    graph of the backward is requested (``create_graph=True``) the same formula in differentiable
    torch ops, with the statistics recomputed from ``x``."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, r_max, d_max, track):
        y, stats, rd, w2 = _forward(x, weight, bias, track, eps, r_max, d_max)
        ctx.stats, ctx.rd, ctx.eps = stats, rd, eps
        ctx.save_for_backward(x, weight, w2)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        if not (torch.is_grad_enabled() or kernels.needs_reference()):
            try:
                dx, grads = cpu.backward(dy, x, w2, ctx.stats, True)  # grads: (2, C) dbias', dweight'
            except RuntimeError:  # a dy the kernel cannot read (batched by jacobian(vectorize=True)): below
                pass
            else:
                dw = db = None
                if weight is not None and need[1]:
                    dw = torch.from_numpy(kstats.renorm_weight_grad(grads, ctx.rd))  # grads: weight's dtype
                if need[2]:
                    db = torch.from_numpy(grads[0]).to(x.dtype)
                return dx if need[0] else None, dw, db, None, None, None, None
        # create_graph=True, or a batched dy: the hand-derived formula in torch ops, differentiable
        # again (weight' rebuilt from the weight so that its dependence on gamma is in the graph)
        r = torch.from_numpy(ctx.rd[0]).to(x.dtype)
        d = torch.from_numpy(ctx.rd[1]).to(x.dtype)
        w2g = weight * r if weight is not None else r
        mean, var, _ = ref.batch_stats(x)
        dx, dw2, db2 = ref.batch_norm_backward(dy, x, mean, ref.invstd_from_var(var, ctx.eps), w2g)
        dw = dw2 * r + db2 * d if weight is not None and need[1] else None
        return dx if need[0] else None, dw, db2 if need[2] else None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# every other case: statistics in torch ops, then bnlab's batch norm with weight' and bias'


def _generic(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, r_max, d_max,
             nonfinite, name):
    with torch.no_grad():
        mean, var, _ = ref.batch_stats(x.detach())
        r, d = renorm_correction(mean, var, running_mean, running_var, eps, r_max, d_max)
    pdtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else running_mean.dtype)
    r, d = r.to(pdtype), d.to(pdtype)
    w2 = weight * r if weight is not None else r
    b2 = weight * d if weight is not None else d
    if bias is not None:
        b2 = b2 + bias
    # bnlab's batch norm updates the buffers with this batch's statistics (after r and d were taken)
    return kernels.batch_norm_train(x, w2, b2, running_mean, running_var, num_batches_tracked, momentum, eps,
                                    nonfinite, name)


def _fast_ok(x: Tensor, running_mean: Tensor, running_var: Tensor) -> bool:
    return (kernels.uses_bnlab_kernel(x) and not torch.compiler.is_compiling() and not _is_tracing()
            and not kernels.needs_reference() and running_mean.is_cpu and running_var.is_cpu)


def batch_renorm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    num_batches_tracked: Tensor | None = None,
    nonfinite: str = "raise",
    name: str = "batch_renorm",
) -> Tensor:
    r"""Batch renormalization (Ioffe 2017, arXiv 1702.03275), functional form; arguments as
    :func:`bnlab.functional.batch_norm` plus the clipping limits ``r_max`` (>= 1) and ``d_max``
    (>= 0) in force for this call (see the module docstring for the math).

    In training the running statistics are required (``r`` and ``d`` are computed from them
    before they are updated with this batch); in eval this is batch norm with them.

    Example:
        >>> import torch
        >>> from bnlab.nn.renorm import batch_renorm
        >>> x = torch.randn(8, 3, 4, 4)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y = batch_renorm(x, rm, rv, training=True, r_max=1.0, d_max=0.0)  # batch norm
        >>> torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
        True
    """
    x, weight, bias = BF._check_call(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                     num_batches_tracked, nonfinite, name)
    _check_limits(name, r_max, d_max)
    if not training:
        y = BF._batch_norm_checked(x, running_mean, running_var, weight, bias, False, momentum, eps, None, nonfinite,
                                   name)
    elif running_mean is None or running_var is None:
        raise ValueError(f"{name}: batch renormalization in training needs running_mean and running_var (got None): "
                         "r and d correct the batch statistics towards them")
    else:
        y = _train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, r_max, d_max,
                   nonfinite, name)
    return y if x is input else y.reshape(input.shape)


def _train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, r_max, d_max, nonfinite,
           name):
    """The training forward after validation (the functional form's and the modules'): bnlab's
    kernels where they serve, else torch ops (:func:`_generic`)."""
    if _fast_ok(x, running_mean, running_var):
        track = (running_mean, running_var, num_batches_tracked, momentum, nonfinite, name)
        if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad)):
            return _RenormFn.apply(x, weight, bias, float(eps), float(r_max), float(d_max), track)
        return _forward(x, weight, bias, track, float(eps), float(r_max), float(d_max))[0]
    return _generic(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, r_max, d_max,
                    nonfinite, name)


# ----------------------------------------------------------------------------------------------
# the modules


def _check_limits(name: str, r_max, d_max) -> None:
    if not (isinstance(r_max, (int, float)) and r_max >= 1):  # nan fails too
        raise ValueError(f"{name}: r_max must be a number >= 1 (r is clipped to [1/r_max, r_max]; got r_max={r_max!r})")
    if not (isinstance(d_max, (int, float)) and d_max >= 0):
        raise ValueError(f"{name}: d_max must be a number >= 0 (d is clipped to [-d_max, d_max]; got d_max={d_max!r})")


def _warmup(name: str, warmup_steps) -> tuple[int, int, int]:
    """``(start, r_end, d_end)`` from an int N (``(0, N, N)``) or a 3-tuple."""
    if isinstance(warmup_steps, bool):
        raise TypeError(f"{name}: warmup_steps must be an int or a (start, r_end, d_end) tuple (got {warmup_steps!r})")
    if isinstance(warmup_steps, int):
        if warmup_steps < 0:
            raise ValueError(f"{name}: warmup_steps must be >= 0 (got {warmup_steps})")
        return (0, warmup_steps, warmup_steps)
    if (isinstance(warmup_steps, (tuple, list)) and len(warmup_steps) == 3
            and all(isinstance(s, int) and not isinstance(s, bool) for s in warmup_steps)):
        start, r_end, d_end = warmup_steps
        if start < 0 or r_end < start or d_end < start:
            raise ValueError(f"{name}: warmup_steps=(start, r_end, d_end) needs 0 <= start <= r_end and start <= d_end "
                             f"(got {tuple(warmup_steps)})")
        return (int(start), int(r_end), int(d_end))
    raise TypeError(f"{name}: warmup_steps must be an int or a (start, r_end, d_end) tuple of ints "
                    f"(got {warmup_steps!r})")


def _ramp(step: int, start: int, end: int) -> float:
    """0 until ``start``, 1 from ``end`` on, linear in between."""
    if step >= end:
        return 1.0
    if step <= start:
        return 0.0
    return (step - start) / (end - start)


class _BatchRenorm(_BatchNorm):
    r"""Batch renormalization (Ioffe 2017, arXiv 1702.03275); see :mod:`bnlab.nn.renorm` for the
    math and the decisions.

    A ``torch.nn.modules.batchnorm._BatchNorm`` (so tools that find batch norms by ``isinstance``
    find it) with batch norm's parameters, buffers and ``state_dict`` keys and nothing else; not a
    ``torch.nn.BatchNorm2d`` (replacing it by one would silently drop the correction).

    Args:
        num_features, eps, momentum, affine, device, dtype, bias, nonfinite: as in
            :class:`bnlab.nn.BatchNorm2d`.
        track_running_stats: must be True (the correction needs the running statistics).
        r_max: keyword; ``r`` is clipped to ``[1 / r_max, r_max]`` (default 3, >= 1; ``inf``: no clip).
        d_max: keyword; ``d`` is clipped to ``[-d_max, d_max]`` (default 5, >= 0).
        warmup_steps: keyword; ``N``: ``r_max`` ramps from 1 and ``d_max`` from 0 over the first
            ``N`` training steps; ``(start, r_end, d_end)``: held at 1 and 0 until ``start``,
            reaching ``r_max`` at ``r_end`` and ``d_max`` at ``d_end``; 0 (default): no warm-up.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int | tuple[int, int, int] = 0,
        bias: bool = True,
        nonfinite: str = "raise",
    ) -> None:
        name = type(self).__name__
        if not track_running_stats:
            raise ValueError(
                f"{name}: batch renormalization needs running statistics (r and d correct the batch statistics "
                f"towards them); got track_running_stats=False. Use bnlab.nn.{name.replace('Renorm', 'Norm')} for "
                "batch norm without running statistics"
            )
        _check_limits(name, r_max, d_max)
        schedule = _warmup(name, warmup_steps)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         nonfinite=nonfinite)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps if isinstance(warmup_steps, int) else tuple(schedule)
        self._schedule = schedule
        self._plain = False  # batch norm while bnlab.tools.recalibrate measures population statistics

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}"

    def limits(self, step: int | None = None) -> tuple[float, float]:
        """``(r_max, d_max)`` in force at training step ``step`` (default: the next step,
        ``num_batches_tracked``), after the warm-up schedule."""
        start, r_end, d_end = self._schedule
        if r_end == 0 and d_end == 0:
            return self.r_max, self.d_max
        if step is None:
            nbt = self.num_batches_tracked
            step = int(nbt) if nbt is not None else 0
        tr, td = _ramp(step, start, r_end), _ramp(step, start, d_end)
        r = 1.0 if tr == 0.0 else (self.r_max if tr == 1.0 or math.isinf(self.r_max) else 1.0 + (self.r_max - 1.0) * tr)
        d = 0.0 if td == 0.0 else (self.d_max if td == 1.0 or math.isinf(self.d_max) else self.d_max * td)
        return r, d

    def _limits_traced(self) -> tuple[Tensor, Tensor]:
        """:meth:`limits` at the next step, as float64 tensors computed from ``num_batches_tracked``."""
        start, r_end, d_end = self._schedule
        step = self.num_batches_tracked.to(torch.float64)

        def ramp(end):
            if end <= start:
                return (step >= start).to(torch.float64)
            return ((step - start) / (end - start)).clamp(0.0, 1.0)

        tr, td = ramp(r_end), ramp(d_end)
        one = torch.ones_like(tr)
        r = torch.where(tr <= 0, one, torch.where(tr >= 1, one * self.r_max, 1.0 + (self.r_max - 1.0) * tr))
        d = torch.where(td <= 0, one * 0.0, torch.where(td >= 1, one * self.d_max, self.d_max * td))
        return r, d

    # precise BN (bnlab.tools.recalibrate): batch norm for the pass
    def recalibrate_begin(self) -> None:
        self._plain = True

    def recalibrate_end(self) -> None:
        self._plain = False

    def recalibrate_abort(self) -> None:
        self._plain = False

    def forward(self, input: Tensor) -> Tensor:
        running_mean, running_var = self.running_mean, self.running_var
        if (not self.training or running_mean is None or running_var is None or not self.track_running_stats
                or self._plain):
            return super().forward(input)  # eval, or batch norm (nothing to correct towards / precise BN)
        self._check_input_dim(input)
        name = type(self).__name__
        weight, bias = self.weight, self.bias
        BF.check_batch_norm_input(input, running_mean, running_var, weight, bias, True, name, self.eps)
        if torch.compiler.is_compiling() and self._schedule != (0, 0, 0) and self.num_batches_tracked is not None:
            r_max, d_max = self._limits_traced()  # tensors: no data-dependent Python for torch.compile
        else:
            r_max, d_max = self.limits()
        return _train(input, weight, bias, running_mean, running_var, self.num_batches_tracked, self.momentum, self.eps,
                      r_max, d_max, getattr(self, "nonfinite", "raise"), name)


class BatchRenorm1d(_BatchRenorm):
    r"""Batch renormalization over a 2D or 3D input ``(N, C)`` / ``(N, C, L)`` (Ioffe 2017, arXiv
    1702.03275).

    .. math:: y = \gamma \left(\frac{x - \mu_B}{\sigma_B} r + d\right) + \beta

    with ``r``, ``d`` the clipped corrections towards the running statistics (constants for
    autograd); batch norm in eval. Signature as :class:`bnlab.nn.BatchNorm1d` plus the keywords
    ``r_max`` (default 3), ``d_max`` (default 5) and ``warmup_steps`` (default 0); see
    :class:`_BatchRenorm` and :mod:`bnlab.nn.renorm`.

    Shape: input ``(N, C)`` or ``(N, C, L)``; output the same.

    Example:
        >>> import torch, bnlab
        >>> m = bnlab.nn.BatchRenorm1d(4, r_max=3.0, d_max=5.0)
        >>> m(torch.randn(16, 4)).shape
        torch.Size([16, 4])
        >>> isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        True
    """

    def _check_input_dim(self, input: Tensor) -> None:
        BatchNorm1d._check_input_dim(self, input)


class BatchRenorm2d(_BatchRenorm):
    """Batch renormalization over a 4D input ``(N, C, H, W)``; see :class:`BatchRenorm1d`.

    NCHW and channels_last inputs are both served without layout copies.

    Example:
        >>> import torch, bnlab
        >>> m = bnlab.nn.BatchRenorm2d(3, warmup_steps=(5000, 40000, 25000))
        >>> m(torch.randn(2, 3, 5, 5)).shape
        torch.Size([2, 3, 5, 5])
        >>> sorted(m.state_dict()) == sorted(torch.nn.BatchNorm2d(3).state_dict())
        True
    """

    def _check_input_dim(self, input: Tensor) -> None:
        BatchNorm2d._check_input_dim(self, input)


class BatchRenorm3d(_BatchRenorm):
    """Batch renormalization over a 5D input ``(N, C, D, H, W)``; see :class:`BatchRenorm1d`.

    Example:
        >>> import torch, bnlab
        >>> bnlab.nn.BatchRenorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
        torch.Size([2, 2, 3, 3, 3])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        BatchNorm3d._check_input_dim(self, input)
