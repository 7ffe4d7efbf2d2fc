"""Synchronized batch normalization: statistics over every process of a ``torch.distributed`` group.

:class:`SyncBatchNorm` normalizes each process's input with the mean and variance of the whole
group's batch, so that data-parallel training with a small batch per process normalizes as one
large batch would. It has :class:`torch.nn.SyncBatchNorm`'s constructor, parameters, buffers and
state_dict keys, and bnlab's ``nonfinite`` keyword.

Communication, per layer and training step (eval mode communicates nothing):

* **forward: one all_gather** of a float64 ``(3, C)`` block per process, (count, mean, M2) with
  ``M2 = sum((x - mean)^2)`` over that process's values. Every process then combines the same
  gathered bytes in the same order (Chan et al.'s pairwise formula, summed over processes):

      N = sum_r n_r;  mean = sum_r n_r m_r / N;  M2 = sum_r M2_r + sum_r n_r (m_r - mean)^2

  which is exact for any split of the batch, including unequal and empty per-process batches, and
  has no cancellation (every term is a sum of squares of deviations). A sum-reducing all_reduce
  of raw sums would carry ``E[x^2] - E[x]^2``'s cancellation, or need a shift agreed by every
  process; gathering needs neither, and because every process computes the statistics from
  identical bytes, every process gets identical bits. That is what lets every process make the
  same non-finite decision (below) without a second collective. The price is ``world_size * 3C``
  float64 values per layer instead of ``3C`` (24 KB per layer at 8 processes and 128 channels).
* **backward: one all_reduce** (sum) of a float64 ``(2, C)`` block, each process's
  ``sum(dy)`` and ``invstd * sum(dy * (x - mean))``, from which every process forms its ``dx``.
  Skipped when the input needs no gradient (the same on every process for the same model).

Gradients (torch's convention, which :class:`torch.nn.parallel.DistributedDataParallel` relies
on): ``dx`` on each process is the gradient of the sum of every process's loss (the statistics
couple the processes); ``weight.grad`` and ``bias.grad`` are each process's own share, which
DistributedDataParallel's gradient all_reduce then sums (and averages, like every other
parameter's gradient). Summed over the processes, the shares are the single-process gradient of
the concatenated batch. The backward is hand-derived (see :func:`bnlab.reference.batch_norm_backward`
with ``M``, ``dbias`` and ``dweight`` taken over the group) and passes
``torch.autograd.gradcheck`` in float64.

Running statistics: :func:`bnlab.policy.update_buffers` on the group's statistics (count ``N``,
unbiased variance by ``N / (N - 1)``), so a nan or inf on any process reaches every process's
statistics alike: under ``nonfinite="raise"`` every process raises
:class:`bnlab.policy.NonFiniteBatchError` and no process touches its buffers; under ``"skip"`` no
process updates them. An input with ``N == 1`` value per channel over the whole group raises on
every process. A global batch of 0 values is counted in ``num_batches_tracked`` (torch's rule);
with a mask, a batch with no valid value is not counted (:class:`bnlab.nn.MaskedBatchNorm1d`'s rule).

Compute: CPU float32/float64 inputs use bnlab's kernels (:mod:`bnlab.kernels.cpu`): the local
statistics from ``forward_train``, the normalization with the group's statistics from
``forward_eval``, the local gradient sums from ``backward``, and ``dx`` from one more
``forward_eval`` pass and one addition; statistics are float64 throughout. Every other device and
dtype (CUDA with NCCL, float16/bfloat16) and masked inputs take the same formulas in torch ops
(float64 sums; the elementwise math in float64 on CPU and in float32, or float64 for float64
input, elsewhere). The collectives are device-agnostic: gloo for CPU tensors, NCCL for CUDA.

Single process: with a group of one process (and no mask) the layer is exactly
:class:`bnlab.nn.BatchNorm2d` (no collective); without an initialized process group, training
mode raises, naming ``torch.distributed.init_process_group`` and ``bnlab.nn.BatchNorm*d``.

Not supported in training mode: forward-mode AD and ``torch.func`` transforms (a clear error),
and double backward. ``torch.compile`` runs this layer eagerly (a graph break).

As with every collective, all processes must call the layer the same number of times with the
same number of channels; an error raised on one process only (e.g. a wrong input shape) leaves
the others waiting in the collective until the group's timeout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import batchnorm as _tbn

from .. import functional as BF
from .. import kernels
from .. import reference as ref
from ..kernels import cpu
from ..policy import update_buffers
from .batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm"]


def _gather(t: Tensor, group, world: int) -> Tensor:
    """All ``world`` processes' ``t`` (flat float64), stacked: ``(world, *t.shape)``."""
    flat = t.reshape(-1)
    out = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
    gather_single = getattr(dist, "all_gather_single", None)  # torch >= 2.13; older: all_gather_into_tensor
    if gather_single is not None:
        gather_single(out, flat, group=group)
    else:  # pragma: no cover - older torch
        dist.all_gather_into_tensor(out, flat, group=group)
    return out.view(world, *t.shape)


def combine_moments(gathered: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, var_biased, N)`` of the union of batches from their ``(count, mean, M2)`` rows.

    ``gathered``: float64 ``(world, 3, C)``. Exact for any counts (a process with count 0
    contributes nothing); the same bits wherever the same ``gathered`` is combined.
    """
    n, m, m2 = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    total = n.sum(0)  # (world, C) -> (C,)
    denom = total.clamp_min(1)
    mean = (n * m).sum(0) / denom
    d = m - mean
    var = (m2.sum(0) + (n * d * d).sum(0)) / denom
    return mean, var.clamp_min(0), total


def _local_moments_kernel(x: Tensor) -> Tensor:
    """float64 ``(3, C)`` (count, mean, M2) of a CPU float32/float64 input, from bnlab's kernel."""
    c = x.shape[1]
    count = x.numel() // c
    _, st, _ = cpu.forward_train(x, None, None, 1.0)  # eps plays no part in mean and variance
    out = torch.empty(3, c, dtype=torch.float64)
    out[0] = float(count)
    out[1] = torch.from_numpy(st[0])
    out[2] = torch.from_numpy(st[1]) * float(count)
    return out


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Elementwise dtype of the torch-ops path: float64 on CPU and for float64 input, else float32."""
    return torch.float64 if (x.is_cpu or x.dtype == torch.float64) else torch.float32


def _valid(x: Tensor, mask: Tensor | None, acc: torch.dtype) -> Tensor | None:
    """The 0/1 weight of valid positions, ``(N, 1, *spatial)``, or None without a mask."""
    if mask is None:
        return None
    return ref._mask_bool(x, mask).to(acc)


def _local_moments_torch(x: Tensor, mask: Tensor | None) -> Tensor:
    """float64 ``(3, C)`` (count, mean, M2) in torch ops (two passes: mean, then squared deviations)."""
    c = x.shape[1]
    dims = ref.reduce_dims(x)
    acc = _acc_dtype(x)
    xa = ref.mask_out(x, mask).to(acc)  # masked positions are 0 before any arithmetic
    w = _valid(x, mask, acc)
    if w is None:
        count = torch.full((c,), float(x.numel() // c), dtype=torch.float64, device=x.device)
    else:  # valid positions per channel: a (N,) mask on (N, C, L) counts whole rows of L
        count = w.expand([x.shape[0], 1] + list(x.shape[2:])).sum(dtype=torch.float64).expand(c)
    mean = xa.sum(dims, dtype=torch.float64) / count.clamp_min(1)
    xc = xa - mean.to(acc).reshape(ref.broadcast_shape(x))
    if w is not None:
        xc = xc * w
    m2 = (xc * xc).sum(dims, dtype=torch.float64)
    return torch.stack((count, mean, m2))


def _normalize_torch(x, mean, invstd, weight, bias, mask):
    """``(x - mean) * invstd * weight + bias`` in the path's dtype, masked positions 0."""
    acc = _acc_dtype(x)
    shape = ref.broadcast_shape(x)
    scale = invstd if weight is None else invstd * weight.reshape(-1).to(torch.float64)
    y = (ref.mask_out(x, mask).to(acc) - mean.to(acc).reshape(shape)) * scale.to(acc).reshape(shape)
    if bias is not None:
        y = y + bias.reshape(-1).to(acc).reshape(shape)
    return ref.mask_out(y.to(x.dtype), mask)


def _no_group_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"{name}: training mode synchronizes batch statistics over a torch.distributed process group, but none "
        "is initialized. Call torch.distributed.init_process_group(backend='gloo' for CPU or 'nccl' for CUDA, ...) "
        "in every process first (torchrun sets up its environment), or use bnlab.nn.BatchNorm1d/2d/3d for "
        "single-process training."
    )


class _SyncBatchNormFn(torch.autograd.Function):
    """Training forward over a process group (one all_gather) and its hand-derived backward (one
    all_reduce). ``track``: None, or ``(running_mean, running_var, num_batches_tracked, momentum,
    nonfinite, name)`` for the running-statistics update on the group's statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, mask, track):
        name = track[5] if track is not None else "SyncBatchNorm"
        fast = mask is None and kernels.uses_bnlab_kernel(x)
        local = _local_moments_kernel(x) if fast else _local_moments_torch(x, mask)
        world = dist.get_world_size(group)
        mean, var, total = combine_moments(_gather(local.to(x.device), group, world))
        count = float(total[0]) if total.numel() else 0.0
        if count == 1:
            raise ValueError(
                f"{name}: expected more than 1 value per channel when training (got 1 value per channel over the "
                f"whole process group; this process's input has shape {tuple(x.shape)}); use larger batches or call .eval()"
            )
        invstd = 1.0 / torch.sqrt(var + eps)  # division and sqrt, both correctly rounded, as the kernels
        if track is not None:
            running_mean, running_var, nbt, momentum, nonfinite, _ = track
            if not (mask is not None and count == 0):  # an all-masked batch is no batch
                with torch.no_grad():
                    update_buffers(running_mean, running_var, nbt, mean, var, int(count), momentum, nonfinite, name)
        ctx.eps, ctx.group, ctx.world, ctx.fast, ctx.count = eps, group, world, fast, count
        ctx.has_mask = mask is not None
        if fast:
            stats = torch.stack((mean, var, invstd)).numpy()
            ctx.stats = stats
            y = cpu.forward_eval(x, weight, bias, stats)
        else:
            y = _normalize_torch(x, mean, invstd, weight, bias, mask)
        ctx.save_for_backward(x, weight, mean, invstd, mask if mask is not None else x.new_empty(0))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd, mask = ctx.saved_tensors
        mask = mask if ctx.has_mask else None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.fast:
            # local sums over this process's values: grads = (sum dy, invstd * sum dy (x - mean)), float64;
            # dx_eval = invstd * dy (the eval backward), which dx below completes
            dx_eval, grads = cpu.backward(dy, x, None, ctx.stats, False)
            sums = torch.from_numpy(grads)
        else:
            acc = _acc_dtype(x)
            dims = ref.reduce_dims(x)
            shape = ref.broadcast_shape(x)
            dya = ref.mask_out(dy, mask).to(acc)
            xc = ref.mask_out(x, mask).to(acc) - mean.to(acc).reshape(shape)
            s1 = dya.sum(dims, dtype=torch.float64)
            s2 = (dya * xc).sum(dims, dtype=torch.float64) * invstd
            sums = torch.stack((s1, s2))
        dw = sums[1].clone() if need_w and weight is not None else None  # this process's share
        db = sums[0].clone() if need_b else None
        dx = None
        if need_x:
            if ctx.world > 1:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            m = max(ctx.count, 1.0)
            g = weight.reshape(-1).to(torch.float64) if weight is not None else None
            k = invstd if g is None else invstd * g  # (C,)
            mdy = sums[0] / m  # mean of dy over the group
            kx = invstd * sums[1] / m  # invstd^2 * sum(dy (x - mean)) / M
            # dx = k * (dy - mdy - (x - mean) * kx)
            if ctx.fast:
                # (x - mean) * (-k kx) - k mdy: one forward_eval pass (float64 inside, rounded once),
                # then + g * dx_eval
                st = torch.stack((mean, torch.zeros_like(mean), -k * kx)).numpy()
                const = (-k * mdy).to(x.dtype)
                dx = cpu.forward_eval(x, None, const, st)
                if g is None:
                    dx.add_(dx_eval)
                else:
                    dx.addcmul_(dx_eval, weight.reshape(-1).to(x.dtype).reshape(ref.broadcast_shape(x)))
            else:
                shape = ref.broadcast_shape(x)
                kk, mm, xx = (t.to(acc).reshape(shape) for t in (k, mdy, kx))
                dx = (kk * (dya - mm - xc * xx)).to(x.dtype)
                dx = ref.mask_out(dx, mask)
        if dw is not None:
            dw = dw.to(weight.dtype).reshape(weight.shape)
        if db is not None:
            bdtype = weight.dtype if weight is not None else x.dtype
            db = db.to(bdtype).reshape(-1)
        return dx, dw, db, None, None, None, None


@torch.compiler.disable
def sync_batch_norm(x, weight, bias, eps, group, mask=None, track=None):
    """The synchronized training forward (differentiable): ``y`` normalized with the group's statistics."""
    return _SyncBatchNormFn.apply(x, weight, bias, eps, group, mask, track)


_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization with statistics over all processes of a ``torch.distributed`` group.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    with mean and biased variance over the concatenation of every process's batch (in training;
    eval uses the running statistics and communicates nothing). Constructor, parameters, buffers
    and state_dict keys of :class:`torch.nn.SyncBatchNorm`; momentum: torch's convention
    (Keras/Flax ``momentum=0.99`` is ``0.01`` here). The communication, numerics and gradient
    convention are described in :mod:`bnlab.nn.sync`.

    A ``torch.nn.modules.batchnorm._BatchNorm`` (and a bnlab batch norm) but deliberately not a
    :class:`torch.nn.SyncBatchNorm`: DistributedDataParallel refuses torch's class in CPU models,
    and bnlab's works on CPU (gloo) and CUDA (NCCL) alike.

    Args:
        num_features: C.
        eps: added to the variance (default 1e-5).
        momentum: running-statistics factor (default 0.1); None for a cumulative average.
        affine: learnable gamma (and beta) (default True).
        track_running_stats: keep running_mean/var (default True).
        process_group: the group to synchronize over (default None: the whole world).
        device, dtype: of the parameters and buffers.
        bias: keyword; learnable beta when affine (default True).
        nonfinite: keyword; "raise" (default) or "skip": what a training batch with nan/inf
            statistics anywhere in the group does (decided alike on every process).

    Shape: input ``(N, C, *)``, any number of trailing dims; ``N`` may differ between processes,
    and may be 0. Optional ``mask`` (forward keyword): ``(N,)`` or ``(N, *spatial)``, True where a
    value is valid (:class:`bnlab.nn.MaskedBatchNorm1d`'s semantics over the whole group: masked
    positions enter no statistic and their output and gradient are 0).

    Example (in every process, after ``torch.distributed.init_process_group``)::

        net = bnlab.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        nonfinite: str = "raise",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         nonfinite=nonfinite)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"{type(self).__name__}: expected input of shape (N, C, *) with at least 2 dimensions "
                f"(got {input.dim()}D input of shape {tuple(input.shape)})"
            )

    def _check_mask(self, input: Tensor, mask) -> Tensor:
        name = type(self).__name__
        if not isinstance(mask, Tensor):
            raise TypeError(f"{name}: expected mask to be a torch.Tensor or None (got {type(mask).__name__})")
        shape = tuple(input.shape)
        if tuple(mask.shape) not in ((shape[0],), (shape[0],) + shape[2:]):
            raise ValueError(
                f"{name}: expected mask of shape ({shape[0]},) or {(shape[0],) + shape[2:]} for input of shape "
                f"{shape} (got mask of shape {tuple(mask.shape)})"
            )
        return mask.to(device=input.device, dtype=torch.bool)

    def _group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor input (got {type(input).__name__})")
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{name}: expected input with {self.num_features} channels (dim 1) (got input of shape "
                f"{tuple(input.shape)})"
            )
        if mask is not None:
            mask = self._check_mask(input, mask)
        weight, bias = self.weight, self.bias
        running_mean, running_var = self.running_mean, self.running_var
        training = self.training
        batch_stats = training or (running_mean is None and running_var is None)
        # dtype, device, shape checks (the value-count rule is the group's: checked after gathering)
        BF.check_batch_norm_input(input, running_mean, running_var, weight, bias, False, name, self.eps)
        nonfinite = getattr(self, "nonfinite", "raise")
        x = input
        if x.dim() > 5:  # (N, C, *) with more than 3 spatial dims: the same batch norm on (N, C, prod(spatial))
            x = x.reshape(x.shape[0], x.shape[1], -1)
            if mask is not None and mask.dim() > 1:
                mask = mask.reshape(mask.shape[0], -1)
        if not batch_stats:  # eval with running statistics: no communication
            y = kernels.batch_norm_eval(ref.mask_out(x, mask), running_mean, running_var, weight, bias, self.eps)
            y = ref.mask_out(y, mask)
        elif not training:  # eval without buffers: this process's batch statistics, as torch does
            y = self._local_train(x, weight, bias, None, None, None, mask, nonfinite, name)
        else:
            if self.eps <= 0:
                raise ValueError(f"{name}: expected eps > 0 in training (got eps={self.eps})")
            if not (dist.is_available() and dist.is_initialized()):
                raise _no_group_error(name)
            if kernels.needs_reference():
                raise RuntimeError(
                    f"{name}: forward-mode AD and torch.func transforms are not supported in training mode (the "
                    "statistics come from other processes); use eval mode, or bnlab.nn.BatchNorm*d"
                )
            group = self._group()
            tracked = self.track_running_stats
            rm, rv = (running_mean, running_var) if tracked else (None, None)
            nbt = self.num_batches_tracked if tracked else None
            if dist.get_world_size(group) == 1 and mask is None:  # nothing to synchronize: bnlab's BatchNorm
                y = self._local_train(x, weight, bias, rm, rv, nbt, None, nonfinite, name)
            else:
                track = (rm, rv, nbt, self.momentum, nonfinite, name) if tracked else None
                y = sync_batch_norm(x, weight, bias, self.eps, group, mask, track)
        return y if y.shape == input.shape else y.reshape(input.shape)

    def _local_train(self, x, weight, bias, rm, rv, nbt, mask, nonfinite, name):
        if mask is None:
            BF.check_batch_norm_input(x, rm, rv, weight, bias, True, name, self.eps)
            return kernels.batch_norm_train(x, weight, bias, rm, rv, nbt, self.momentum, self.eps, nonfinite, name)
        y, *_ = ref.batch_norm_forward(ref.mask_out(x, mask), weight, bias, self.eps, mask)
        return ref.mask_out(y, mask)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.process_group is None else f", process_group={self.process_group}")

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every batch-norm layer of ``module`` by a bnlab :class:`SyncBatchNorm`.

        Converted: ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``,
        ``bnlab.nn.BatchNorm1d/2d/3d`` (their ``nonfinite`` kept) and
        ``bnlab.nn.MaskedBatchNorm1d`` (its ``mask`` argument is :class:`SyncBatchNorm`'s).
        The Parameter and buffer objects are kept (optimizers holding them stay valid), as are
        the training flag and ``qconfig``. Left alone: bnlab's ghost and sequence batch norms
        (their statistics are per ghost batch or per step, not synchronizable as one batch),
        other subclasses of torch's batch norm, and lazy layers not yet initialized. Returns the
        module (or the new layer when ``module`` is itself a batch norm), like torch's.
        """
        out = module
        if cls._convertible(module):
            ref_t = module.weight if module.weight is not None else module.running_mean
            kw = {} if ref_t is None else {"device": ref_t.device, "dtype": ref_t.dtype}
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group, bias=getattr(module, "bias", None) is not None or not module.affine,
                      nonfinite=getattr(module, "nonfinite", "raise"), **kw)
            if module.affine:
                out.weight = module.weight
                out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out

    @staticmethod
    def _convertible(m: nn.Module) -> bool:
        from .masked import MaskedBatchNorm1d

        if isinstance(m, _tbn._LazyNormBase) and m.has_uninitialized_params():
            return False
        if type(m) is MaskedBatchNorm1d:
            return True
        if isinstance(m, SyncBatchNorm):
            return False  # already synchronized (its process group is kept)
        t = type(m)
        return t in _CONVERTIBLE or any(t is getattr(_bnlab_bn(), n) for n in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"))


def _bnlab_bn():
    from . import batchnorm

    return batchnorm
