"""Dispatch between bnlab's fast CPU kernels and torch's native batch norm.

Contract (shared by every path, and by :mod:`bnlab.reference`, which defines the math):

``batch_norm_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
nonfinite, name) -> y``
    Training mode. ``y`` is differentiable with respect to ``x``, ``weight`` and ``bias`` through
    a hand-derived backward. If running buffers are given they are updated in place with the batch
    statistics (biased variance normalizes, unbiased variance enters ``running_var``);
    ``num_batches_tracked`` (if given) is incremented, and ``momentum=None`` means a cumulative
    average (factor ``1 / num_batches_tracked``). When a channel's statistics are non-finite (or
    too large for the buffers' dtype), ``nonfinite`` decides: ``"raise"`` raises
    :class:`NonFiniteBatchError` naming the channels and leaves every buffer untouched; ``"skip"``
    leaves every buffer untouched and returns ``y`` (:mod:`bnlab.policy`).

``batch_norm_eval(x, running_mean, running_var, weight, bias, eps) -> y``
    Normalize with the given statistics (constants for autograd).

Routing: the modules and :func:`bnlab.functional.batch_norm` first offer a call to the
small-call path (:mod:`.fast`: a training call on a contiguous ``(N, C)`` input of up to 2^20
values or an ``(N, C, *)`` / channels_last one of up to 2^20, and eval calls without autograd, as one C++ call with a C++ autograd node; it declines
anything else), then come here. CPU float32/float64 tensors go to bnlab's fused numba kernels
(:mod:`.cpu`); every other
device and dtype (CUDA, float16, bfloat16) goes to torch's kernel
(``aten._native_batch_norm_legit``), which computes half-precision statistics in float32 and
returns them from the same call: the non-finite check and the running update read those, with no
second pass over the input. While forward-mode AD or a ``torch.func``
transform is active (:func:`needs_reference`), every input takes the reference math in plain
torch ops (:mod:`bnlab.reference`), which torch differentiates in every mode; the running
statistics still go through :func:`bnlab.policy.update_buffers`, as on every path.

Capture: under ``torch.compile`` and ``torch.export`` batch norm is written in torch ops
(:func:`_compiled_train`: a shifted ``var_mean``, which inductor lowers to a Welford reduction,
and the affine), so inductor fuses it with the convolution, activation and residual add around
it as it does torch's own; the running statistics are updated in torch ops with the policy as a select, and one
non-mutating check op (``bnlab::check_batch_fast`` from :mod:`.fast`, else
:func:`bnlab.kernels.ops.check_batch`) raises for a bad batch (:func:`_compiled_update`). In
eval, ``torch.export`` (and so ``torch.onnx.export``) and ``torch.jit.trace`` record torch's
own ``aten.batch_norm``, the op every exporter, runtime and conv-bn folding pass knows (torch's
float32 eval math). ``torch.jit.trace`` in training mode and ``torch.jit.script`` raise one error
naming the alternatives (:func:`trace_training_error`, :func:`script_error`).

Autograd: first-order gradients come from the kernels' hand-derived backward. When a graph of the
backward is requested (``create_graph=True``: double backward, gradient penalties,
Hessian-vector products) the backward is the same formula in differentiable torch ops, with the
statistics recomputed from ``x`` so that their dependence on ``x`` is differentiated too.

The eager entry into the kernels:

* plain ``torch.autograd.Function`` classes (:class:`_TrainFn`, :class:`_EvalFn`) that call
  the kernels directly, with the running-statistics update (:func:`bnlab.policy.update_buffers`,
  C-sized work on the float64 statistics the kernel returned) inside the forward. A torch.library
  op's Python dispatch costs ~0.2 ms a call, more than the whole step on small shapes. When
  nothing needs a gradient (``torch.no_grad()``, inference, recalibration) the kernels are called
  directly, without an autograd node.

:mod:`.ops` also registers the kernels themselves as custom ops with fake functions and autograd
formulas (``bnlab::batch_norm_train`` and friends) for callers that want bnlab's kernel numerics
inside a captured graph; bnlab's layers trace to torch ops instead, which inductor can fuse.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor

from .. import reference as ref
from ..policy import NonFiniteBatchError, bad_channels, raise_bad_batch, update_buffers
from ..policy import _limit as _policy_limit
from . import cpu

__all__ = [
    "NonFiniteBatchError", "update_buffers", "device_update", "commit_running_stats", "uses_bnlab_kernel", "needs_reference",
    "batch_norm_train", "batch_norm_eval", "trace_training_error", "refuse_training_trace", "script_error",
]

_KERNEL_DTYPES = (torch.float32, torch.float64)

_is_tracing = torch._C._is_tracing  # inside torch.jit.trace
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)

_ALTERNATIVES = ("torch.compile(model) or torch.export.export(model, args), which both capture bnlab's batch norm "
                 "in training and eval")


def trace_training_error(name: str) -> str:
    """The error torch.jit.trace of a training-mode bnlab batch norm raises."""
    return (f"{name}: torch.jit.trace cannot record bnlab's batch norm in training mode (the kernels are numba code "
            "outside TorchScript, and the running-statistics update is Python a trace would freeze). Use "
            f"{_ALTERNATIVES}; or trace the model in eval mode (model.eval()), which records torch's eval batch norm.")


def refuse_training_trace(name: str) -> None:
    """Inside torch.jit.trace (not torch.compile), raise :func:`trace_training_error`: for a
    training-mode layer whose running-statistics update is Python no trace records."""
    if _is_tracing() and not torch.compiler.is_compiling():
        raise RuntimeError(trace_training_error(name))


def script_error(name: str) -> str:
    """The error torch.jit.script of a model with a bnlab batch-norm layer raises."""
    return (f"{name}: torch.jit.script cannot compile bnlab's batch norm (its forward calls numba kernels, which "
            f"TorchScript cannot represent). Use {_ALTERNATIVES}; torch.jit.trace of the model in eval mode; or "
            "convert the layers to torch's first: bnlab.convert(model, to=\"torch\").")

_transforms_active = torch._C._are_functorch_transforms_active

if hasattr(_fwad, "_current_level"):
    def _dual_level_open() -> bool:
        return _fwad._current_level >= 0
else:  # pragma: no cover - a torch without the module-level marker: assume a dual level may be open
    def _dual_level_open() -> bool:
        return True


def needs_reference() -> bool:
    """True while a mode the fused kernels cannot serve is active: forward-mode AD (a
    ``torch.autograd.forward_ad.dual_level`` is open: dual tensors do not set ``requires_grad``,
    so nothing else reveals them) or a ``torch.func`` transform (grad, vjp, jvp, vmap, ...: their
    wrapped tensors have no storage a kernel could read). Then every path takes the reference
    math in plain torch ops, which torch differentiates in every mode."""
    return _dual_level_open() or _transforms_active()


def commit_running_stats(running_mean, running_var, num_batches_tracked, stats, count, momentum, nonfinite, name, nbad=None):
    """:func:`bnlab.policy.update_buffers` from a ``(3, C)`` statistics array or tensor (mean, var, invstd)."""
    update_buffers(running_mean, running_var, num_batches_tracked, stats[0], stats[1], count, momentum, nonfinite,
                   name, nbad)


def uses_bnlab_kernel(x: Tensor) -> bool:
    """True when ``x`` is served by bnlab's own kernels (CPU float32/float64)."""
    return x.is_cpu and x.dtype in _KERNEL_DTYPES


def _any_requires_grad(x, weight, bias) -> bool:
    return x.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)


def _train_forward(x, weight, bias, eps, track, alloc=None):
    """Training forward on the kernels, then the running update: ``(y, stats)``."""
    y, stats, nbad = cpu.forward_train(x, weight, bias, eps, alloc=alloc)
    if track is not None:
        running_mean, running_var, num_batches_tracked, momentum, nonfinite, name = track
        count = x.numel() // x.shape[1] if x.shape[1] else 0
        update_buffers(running_mean, running_var, num_batches_tracked, stats[0], stats[1], count, momentum,
                       nonfinite, name, nbad)
    return y, stats


def _graph_backward_train(dy, x, weight, eps):
    """The training backward as a differentiable function of ``(dy, x, weight)``: the reference's
    hand-derived formula with the statistics recomputed from ``x`` in torch ops, so that autograd
    can differentiate it again (``create_graph=True``: gradient penalties, Hessian-vector
    products, MAML)."""
    mean, var, _ = ref.batch_stats(x)
    return ref.batch_norm_backward(dy, x, mean, ref.invstd_from_var(var, eps), weight)


def _graph_backward_eval(dy, x, weight, stats):
    """The eval backward as a differentiable function of ``(dy, x, weight)`` (statistics constant)."""
    mean, invstd = torch.from_numpy(stats[0]), torch.from_numpy(stats[2])
    return ref.batch_norm_backward_eval(dy, x, mean, invstd, weight)


class _TrainFn(torch.autograd.Function):
    """Training forward (statistics, y and the running update: one kernel call and C-sized work)
    and the hand-derived backward: one kernel call, or, when a graph of the backward is requested
    (``create_graph=True``), the same formula in differentiable torch ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, track, alloc=None):
        y, stats = _train_forward(x, weight, bias, eps, track, alloc)
        ctx.stats = stats
        ctx.eps = eps
        ctx.alloc = alloc
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        if not (torch.is_grad_enabled() or needs_reference()):
            try:
                dx, grads = cpu.backward(dy, x, weight, ctx.stats, True, alloc=ctx.alloc)  # (2, C) dbias, dweight
            except RuntimeError:  # a dy the kernel cannot read (jacobian(vectorize=True) batches it): below
                pass
            else:
                return (dx if need[0] else None, torch.from_numpy(grads[1]) if need[1] else None,
                        torch.from_numpy(grads[0]) if need[2] else None, None, None, None)
        # create_graph=True (a backward autograd can differentiate again), or a batched dy: torch ops
        dx, dw, db = _graph_backward_train(dy, x, weight, ctx.eps)
        return dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None, None, None


class _EvalFn(torch.autograd.Function):
    """Eval forward with given statistics, and its backward (the statistics are constants);
    differentiable torch ops when a graph of the backward is requested."""

    @staticmethod
    def forward(ctx, x, weight, bias, stats):
        ctx.stats = stats
        ctx.save_for_backward(x, weight)
        return cpu.forward_eval(x, weight, bias, stats)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        if not (torch.is_grad_enabled() or needs_reference()):
            try:
                dx, grads = cpu.backward(dy, x, weight, ctx.stats, False)
            except RuntimeError:  # a dy the kernel cannot read: below
                pass
            else:
                return (dx if need[0] else None, torch.from_numpy(grads[1]) if need[1] else None,
                        torch.from_numpy(grads[0]) if need[2] else None, None)
        dx, dw, db = _graph_backward_eval(dy, x, weight, ctx.stats)
        return dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None


def _track(running_mean, running_var, num_batches_tracked) -> bool:
    return running_mean is not None or running_var is not None or num_batches_tracked is not None


def _reference_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, nonfinite, name):
    """The reference math in plain torch ops (:mod:`bnlab.reference`), which torch differentiates in
    every mode (forward AD, torch.func transforms, any order), then the policy's buffer update."""
    mean, var, count = ref.batch_stats(x)
    y = ref.normalize(x, mean, ref.invstd_from_var(var, eps), weight, bias)
    if _track(running_mean, running_var, num_batches_tracked):
        with torch.no_grad():
            try:
                update_buffers(running_mean, running_var, num_batches_tracked, mean.detach(), var.detach(), count,
                               momentum, nonfinite, name)
            except NonFiniteBatchError:
                raise
            except RuntimeError as e:
                if not _transforms_active():
                    raise
                raise RuntimeError(
                    f"{name}: cannot update the running statistics inside this torch.func transform "
                    f"({str(e).splitlines()[0]}). Use the layer in eval mode, build it with "
                    "track_running_stats=False, call torch.func.replace_all_batch_norm_modules_(model), or, under "
                    "grad/vjp/jvp (not vmap: bnlab cannot update batched buffers), pass the buffers to the "
                    "transformed function as inputs (functional_call)."
                ) from e
    return y


def _reference_eval(x, running_mean, running_var, weight, bias, eps):
    return ref.normalize(x, running_mean, ref.invstd_from_var(running_var.to(torch.float64), eps), weight, bias)


def _native_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, nonfinite, name):
    """torch's kernel for every other device and dtype (CUDA, float16, bfloat16): one call gives the
    output and the batch statistics it normalized with (``save_mean``, ``save_invstd``: float32
    for half inputs), so the statistics cost no second pass over ``x``; the biased variance is
    recovered as ``invstd**-2 - eps`` in float64, and the buffers move through the policy."""
    y, mean, invstd = torch.ops.aten._native_batch_norm_legit.no_stats(x, weight, bias, True, 0.0, eps)
    if _track(running_mean, running_var, num_batches_tracked):
        count = x.numel() // x.shape[1] if x.shape[1] else 0
        if count and not mean.is_cpu and running_mean is not None and running_var is not None:
            with torch.no_grad():
                device_update(running_mean, running_var, num_batches_tracked, mean.detach(), invstd.detach(), eps,
                              count, momentum, nonfinite, name)
            return y
        with torch.no_grad():
            if count:
                mean = mean.detach()
                var = (invstd.detach().double().pow(-2) - eps).clamp_(min=0.0)
            else:
                mean = var = None
            update_buffers(running_mean, running_var, num_batches_tracked, mean, var, count, momentum, nonfinite, name)
    return y


def device_update(running_mean, running_var, num_batches_tracked, mean, invstd, eps, count, momentum, nonfinite,
                  name) -> None:
    """The policy's running update (:func:`bnlab.policy.update_buffers`: the factor, the Bessel
    correction, float64 arithmetic rounded once, the non-finite and overflow check before any buffer
    moves) for statistics that live on a GPU, in a dozen device ops and at most one read back to the
    host, where the generic policy reads two flags back and runs about twice the ops (each read waits
    for every kernel queued before it, which on a GPU costs more than the arithmetic).

    ``mean`` and ``invstd`` as torch's kernel returns them; the biased variance is ``invstd**-2 - eps``
    in float64. One flag says whether the batch may enter: every mean and unbiased variance finite
    and within the buffers' largest value (a nan compares false, an inf exceeds the finite limit).
    ``nonfinite="raise"`` reads that flag back (the one sync) and raises
    :class:`bnlab.policy.NonFiniteBatchError`, naming the channels, before a buffer is written;
    ``"skip"`` never leaves the device: the update selects the old values on the flag, and
    ``num_batches_tracked`` adds the flag. Needs both running buffers and ``count > 0`` (the caller
    takes the generic policy otherwise)."""
    limit = _policy_limit(running_mean, running_var)
    corr = count / (count - 1) if count > 1 else 1.0
    mean = mean.to(torch.float64)
    var = (invstd.to(torch.float64).pow(-2) - eps).clamp_(min=0.0)
    unbiased = var * corr
    ok = (torch.maximum(mean.abs(), unbiased) <= limit).all()
    select = None
    if nonfinite == "raise":
        if not bool(ok):
            bad, kinds = bad_channels(mean, var, count, limit)
            raise_bad_batch(name, bad, kinds, limit, running_var.dtype)
    else:
        select = ok
    if momentum is not None:
        factor, keep = float(momentum), 1.0 - float(momentum)
    elif num_batches_tracked is None:  # a cumulative average with nothing counting: nothing moves
        factor, keep = 0.0, 1.0
    else:  # cumulative average: 1 / the batches tracked, this one counted
        factor = 1.0 / (num_batches_tracked + 1).to(torch.float64)
        keep = 1.0 - factor
    for buf, new in ((running_mean, mean), (running_var, unbiased)):
        old = buf.to(torch.float64)
        upd = keep * old + factor * new
        buf.copy_(upd if select is None else torch.where(select, upd, old))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1 if select is None else select.to(num_batches_tracked.dtype))


def _bshape(x: Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _compiled_affine(x, mean, invstd, weight, bias):
    """``(x - mean) * invstd * weight + bias`` in torch ops, computed in the statistics' dtype
    (float32 for half inputs, as torch does) and returned in ``x``'s."""
    shape = _bshape(x)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    xs = x.to(mean.dtype)
    y = (xs - mean.view(shape)) * scale.view(shape)
    if bias is not None:
        y = y + bias.to(mean.dtype).view(shape)
    return y.to(x.dtype)


class _CompiledNorm(torch.autograd.Function):
    """Batch norm of ``d`` in torch ops, with the hand-derived backward (the formula of
    :func:`bnlab.reference.batch_norm_backward`) in torch ops too: traced by torch.compile into
    the graph inductor fuses, and more accurate than differentiating the ``var_mean``
    decomposition (whose float32 rounding leaves the sum of ``dx`` over a channel visibly off 0).
    Returns ``(y, mean, var, invstd)``; the statistics are not differentiable."""

    @staticmethod
    def forward(ctx, d, weight, bias, eps):
        dims = ref.reduce_dims(d)
        var, mean = torch.var_mean(d, dim=dims, correction=0)
        invstd = torch.rsqrt(var + eps)
        y = _compiled_affine(d, mean, invstd, weight, bias)
        ctx.save_for_backward(d, mean, invstd, weight)
        ctx.mark_non_differentiable(mean, var, invstd)
        return y, mean, var, invstd

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dinvstd):
        d, mean, invstd, weight = ctx.saved_tensors
        dims = ref.reduce_dims(d)
        shape = _bshape(d)
        dy = dy.to(mean.dtype)
        xhat = (d - mean.view(shape)) * invstd.view(shape)
        count = d.numel() // d.shape[1] if d.shape[1] else 1
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        dd = (dy - (sum_dy / count).view(shape) - xhat * (sum_dy_xhat / count).view(shape)) * scale.view(shape)
        need = ctx.needs_input_grad
        dw = sum_dy_xhat.to(weight.dtype) if need[1] else None
        db = sum_dy.to(weight.dtype if weight is not None else sum_dy.dtype) if need[2] else None
        return dd.to(d.dtype) if need[0] else None, dw, db, None


def _compiled_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, nonfinite, name):
    """What torch.compile traces in training: batch norm as plain torch ops, which inductor fuses
    with the ops around it (the convolution's epilogue, the activation, the residual add) and
    differentiates itself. The statistics are one ``var_mean`` reduction (inductor lowers it to a
    Welford reduction: no cancellation for inputs with a large mean), in float32 for half inputs;
    every value shifted by its channel's first value, as the kernels do; the running-statistics
    update is :func:`bnlab.kernels.ops.update_running_stats`, the one policy, with the
    non-finite check inside."""
    from . import ops

    xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if x.numel():
        # shifted by each channel's first value (a constant for autograd): the statistics and the
        # normalization see x - shift, whose mean is small, so a large common offset costs no digits
        # (the mean itself, rounded to float32, would be off by half an ulp of the offset)
        shift = xs[(0, slice(None)) + (0,) * (x.dim() - 2)].detach()
        d = xs - shift.view(_bshape(x))
    else:
        shift, d = None, xs
    y, dmean, var, invstd = _CompiledNorm.apply(d, weight, bias, eps)
    y = y.to(x.dtype)
    mean = dmean if shift is None else dmean + shift
    if _track(running_mean, running_var, num_batches_tracked):
        count = x.numel() // x.shape[1] if x.shape[1] else 0
        _compiled_update(running_mean, running_var, num_batches_tracked, mean.detach(), var.detach(), count,
                         momentum, nonfinite, name)
    return y


def _compiled_update(running_mean, running_var, num_batches_tracked, mean, var, count, momentum, nonfinite, name):
    """The running-statistics update under torch.compile, in torch ops that inductor fuses into the
    statistics' kernel: :func:`bnlab.policy.update_buffers`'s rules (the factor, the Bessel
    correction, float64 arithmetic rounded once, an empty batch counted and nothing else), with the
    non-finite policy as a select: a batch with a non-finite or overflowing statistic writes the old
    values back and leaves ``num_batches_tracked`` as it was, so no buffer moves whatever happens
    next. With ``nonfinite="raise"`` one flag then goes to :func:`bnlab.kernels.ops.check_batch`
    (or its C++ twin ``bnlab::check_batch_fast``, :mod:`bnlab.kernels.fast`), which raises :class:`NonFiniteBatchError` (naming the channels) for a bad batch.

    A custom op that mutates the buffers costs about 0.2 ms a call inside a compiled graph (its
    Python dispatch and the functionalization around a mutation); the flag check is one
    non-mutating op on C-sized data."""
    from . import fast

    if count == 0:  # an empty batch: torch counts it and leaves the statistics alone
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return
    limit = _policy_limit(running_mean, running_var)
    corr = count / (count - 1) if count > 1 else 1.0  # (no float(): a dynamic batch size stays symbolic)
    mean = mean.to(torch.float64)
    var = var.to(torch.float64)
    ok = torch.isfinite(mean).all() & torch.isfinite(var).all()
    if running_var is not None:
        ok = ok & (var * corr <= limit).all()
    if running_mean is not None:
        ok = ok & (mean.abs() <= limit).all()
    if nonfinite == "raise":
        ok = fast.check_batch_op()(ok, mean, var, count, limit, name)
    if momentum is None:  # cumulative average: 1 / the batches tracked, this one counted
        factor = 1.0 / (num_batches_tracked + 1).to(torch.float64) if num_batches_tracked is not None else 0.0
    else:
        factor = float(momentum)
    if running_mean is not None:
        old = running_mean.to(torch.float64)
        running_mean.copy_(torch.where(ok, (1.0 - factor) * old + factor * mean, old).to(running_mean.dtype))
    if running_var is not None:
        old = running_var.to(torch.float64)
        running_var.copy_(torch.where(ok, (1.0 - factor) * old + factor * (var * corr), old).to(running_var.dtype))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))


def batch_norm_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
    nonfinite: str = "raise",
    name: str = "batch_norm",
    *,
    alloc=None,
) -> Tensor:
    """Training batch norm of ``x`` ``(N, C, *)`` with bnlab's statistics and running-statistics
    policy, on the path that serves it (compiled graph, reference, torch's native kernel, or the CPU
    kernels). ``alloc``: optional ``(shape, dtype) -> Tensor`` for the CPU kernels' output and input
    gradient of a contiguous ``x`` (the fused recurrent layers' buffer pool)."""
    if torch.compiler.is_compiling():
        if not COMPILED_TRAIN_OK:  # a graph break: this call runs eagerly (see COMPILED_TRAIN_OK)
            return _eager_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                                nonfinite, name, alloc=alloc)
        return _compiled_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                               nonfinite, name)
    refuse_training_trace(name)
    if _dual_level_open() or _transforms_active():
        return _reference_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                                nonfinite, name)
    if not (x.is_cpu and x.dtype in _KERNEL_DTYPES):
        return _native_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, nonfinite, name)
    if running_mean is None and running_var is None and num_batches_tracked is None:
        track = None
    else:
        track = (running_mean, running_var, num_batches_tracked, momentum, nonfinite, name)
    if not (torch.is_grad_enabled() and _any_requires_grad(x, weight, bias)):
        return _train_forward(x, weight, bias, eps, track, alloc)[0]  # nothing to differentiate: no autograd node
    return _TrainFn.apply(x, weight, bias, eps, track, alloc)


# Training through torch.compile traces batch norm into the graph (_compiled_train) only on a torch
# where that was verified: on torch 2.11 (an H200 machine, CUDA and CPU tensors alike) the traced
# graph's backward gave zero gradients to every parameter before each batch norm while the outputs
# were right; 2.13 (this project's CI) gives torch's gradients. Elsewhere each training batch norm
# is a graph break and runs eagerly: correct, slower.
COMPILED_TRAIN_OK = torch.__version__ >= "2.13"
_eager_train = torch.compiler.disable(batch_norm_train, recursive=True)


def batch_norm_eval(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    if torch.compiler.is_compiling():
        if _is_exporting() or not uses_bnlab_kernel(x):
            # torch.export (and the ONNX exporter on top of it): torch's own eval batch norm, the op
            # every exporter, runtime and conv-bn folding pass knows; the numbers are torch's
            return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
        # torch ops, which inductor fuses with the neighbours; the scale from float64 statistics
        sdt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        invstd = torch.rsqrt(running_var.to(torch.float64) + eps).to(sdt)
        return _compiled_affine(x, running_mean.to(sdt), invstd, weight, bias)
    if _dual_level_open() or _transforms_active():
        return _reference_eval(x, running_mean, running_var, weight, bias, eps)
    if not uses_bnlab_kernel(x) or _is_tracing():  # torch.jit.trace records torch's op
        return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    stats = cpu.eval_stats(running_mean, running_var, eps)
    if torch.is_grad_enabled() and _any_requires_grad(x, weight, bias):
        return _EvalFn.apply(x, weight, bias, stats)
    return cpu.forward_eval(x, weight, bias, stats)  # nothing to differentiate: no autograd node


# ------------------------------------------------------------------------------------------------
# Batch norm fused with an activation and a residual add: y = act(BN(x) + residual)

ACTIVATIONS = ("none", "relu", "silu", "gelu")


def apply_act(z: Tensor, act: str) -> Tensor:
    """The activation in torch ops (gelu: the erf form, torch's default)."""
    if act == "relu":
        return torch.relu(z)
    if act == "silu":
        return torch.nn.functional.silu(z)
    if act == "gelu":
        return torch.nn.functional.gelu(z)
    return z


def _epilogue(y: Tensor, residual: Tensor | None, act: str) -> Tensor:
    if residual is not None:
        y = y + residual
    return apply_act(y, act)


def _act_reference(x, weight, bias, residual, act, stats, eps):
    """The fused layer's forward in differentiable torch ops, for a graph of the backward: batch
    statistics recomputed from ``x`` (training, ``stats is None``) or the given constants."""
    if stats is None:
        mean, var, _ = ref.batch_stats(x)
        invstd = ref.invstd_from_var(var, eps)
    else:
        mean, invstd = torch.from_numpy(stats[0]), torch.from_numpy(stats[2])
    return _epilogue(ref.normalize(x, mean, invstd, weight, bias), residual, act)


def _act_graph_backward(ctx, dy, stats_const):
    x, weight, bias, residual = ctx.saved_tensors
    inputs = [t for t in (x, weight, bias, residual) if t is not None]
    with torch.enable_grad():
        y = _act_reference(x, weight, bias, residual, ctx.act, stats_const, ctx.eps)
        got = torch.autograd.grad(y, inputs, dy, create_graph=torch.is_grad_enabled(), allow_unused=True)
    it = iter(got)
    return tuple(None if t is None else next(it) for t in (x, weight, bias, residual))


class _TrainActFn(torch.autograd.Function):
    """Training forward of ``act(BN(x) + residual)`` in the kernels' two passes (the running
    update inside, as :class:`_TrainFn`), and its hand-derived backward: ``dz = dy * act'(z)``
    formed inside the batch-norm backward's passes, ``d residual = dz``."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, track, act):
        y, stats, nbad = cpu.forward_train(x, weight, bias, eps, act=act, residual=residual)
        if track is not None:
            running_mean, running_var, num_batches_tracked, momentum, nonfinite, name = track
            count = x.numel() // x.shape[1] if x.shape[1] else 0
            update_buffers(running_mean, running_var, num_batches_tracked, stats[0], stats[1], count, momentum,
                           nonfinite, name, nbad)
        ctx.stats, ctx.eps, ctx.act = stats, eps, act
        ctx.save_for_backward(x, weight, bias, residual)
        return y

    @staticmethod
    def backward(ctx, dy):
        need = ctx.needs_input_grad
        if not (torch.is_grad_enabled() or needs_reference()):
            x, weight, bias, residual = ctx.saved_tensors
            try:
                dx, grads, dres = cpu.backward_act(dy, x, weight, bias, ctx.stats, True, ctx.act, residual)
            except RuntimeError:  # a dy the kernel cannot read: below
                pass
            else:
                return (dx if need[0] else None, torch.from_numpy(grads[1]) if need[1] else None,
                        torch.from_numpy(grads[0]) if need[2] else None, dres if need[3] else None, None, None, None)
        g = _act_graph_backward(ctx, dy, None)
        return (*(gi if n else None for gi, n in zip(g, need[:4])), None, None, None)


class _EvalActFn(torch.autograd.Function):
    """Eval forward of ``act(BN(x) + residual)`` with given statistics, and its backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, stats, act):
        ctx.stats, ctx.act, ctx.eps = stats, act, 0.0
        ctx.save_for_backward(x, weight, bias, residual)
        return cpu.forward_eval(x, weight, bias, stats, act=act, residual=residual)

    @staticmethod
    def backward(ctx, dy):
        need = ctx.needs_input_grad
        if not (torch.is_grad_enabled() or needs_reference()):
            x, weight, bias, residual = ctx.saved_tensors
            try:
                dx, grads, dres = cpu.backward_act(dy, x, weight, bias, ctx.stats, False, ctx.act, residual)
            except RuntimeError:
                pass
            else:
                return (dx if need[0] else None, torch.from_numpy(grads[1]) if need[1] else None,
                        torch.from_numpy(grads[0]) if need[2] else None, dres if need[3] else None, None, None)
        g = _act_graph_backward(ctx, dy, ctx.stats)
        return (*(gi if n else None for gi, n in zip(g, need[:4])), None, None)


# activations the kernels fuse: ReLU (and none, for a residual alone). SiLU and GELU take the
# kernels' batch norm and then torch's vectorized activation (fused, a float64 exp/erf one value at
# a time ran 5-25x slower than torch's activation at 64x64x8x8: the kernels no longer have them)
_FUSED_ACTS = ("none", "relu")


def _fusable(x: Tensor, residual: Tensor | None, act: str = "relu") -> bool:
    """The fused kernels serve this call: CPU float32/float64, eager, an activation they fuse
    fast, and a residual (if any) of ``x``'s shape and dtype on the CPU."""
    if (act not in _FUSED_ACTS or not uses_bnlab_kernel(x) or torch.compiler.is_compiling() or _is_tracing()
            or needs_reference()):
        return False
    return residual is None or (residual.is_cpu and residual.dtype == x.dtype and residual.shape == x.shape)


def batch_norm_act_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                         nonfinite="raise", name="batch_norm", act="relu", residual=None) -> Tensor:
    """:func:`batch_norm_train` followed by ``+ residual`` and the activation, fused into the
    kernels' passes on CPU float32/float64 in eager mode; elsewhere (half precision, CUDA,
    ``torch.compile``, forward AD / ``torch.func``) the same math in the path's own ops."""
    if not _fusable(x, residual, act):
        y = batch_norm_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                             nonfinite, name)
        return _epilogue(y, residual, act)
    if running_mean is None and running_var is None and num_batches_tracked is None:
        track = None
    else:
        track = (running_mean, running_var, num_batches_tracked, momentum, nonfinite, name)
    if not (torch.is_grad_enabled() and (_any_requires_grad(x, weight, bias)
                                         or (residual is not None and residual.requires_grad))):
        y, stats, nbad = cpu.forward_train(x, weight, bias, eps, act=act, residual=residual)
        if track is not None:
            count = x.numel() // x.shape[1] if x.shape[1] else 0
            update_buffers(running_mean, running_var, num_batches_tracked, stats[0], stats[1], count, momentum,
                           nonfinite, name, nbad)
        return y
    return _TrainActFn.apply(x, weight, bias, residual, eps, track, act)


def batch_norm_act_eval(x, running_mean, running_var, weight, bias, eps, act="relu", residual=None) -> Tensor:
    """:func:`batch_norm_eval` followed by ``+ residual`` and the activation (fused as
    :func:`batch_norm_act_train`)."""
    if not _fusable(x, residual, act):
        return _epilogue(batch_norm_eval(x, running_mean, running_var, weight, bias, eps), residual, act)
    stats = cpu.eval_stats(running_mean, running_var, eps)
    if torch.is_grad_enabled() and (_any_requires_grad(x, weight, bias)
                                    or (residual is not None and residual.requires_grad)):
        return _EvalActFn.apply(x, weight, bias, residual, stats, act)
    return cpu.forward_eval(x, weight, bias, stats, act=act, residual=residual)
