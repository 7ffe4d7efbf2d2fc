"""Batch normalization for padded and recurrent sequences.

* :class:`MaskedBatchNorm1d`: BatchNorm1d whose statistics skip padded positions (a mask says which
  values are valid). The math is :mod:`bnlab.reference`'s masked statistics and hand-derived
  backward, so it is held to the same source of truth as every other bnlab batch norm.
* :class:`SequenceBatchNorm`: the normalization a recurrent layer applies to its gate
  pre-activations, one call per time step. ``per_step=True`` keeps separate statistics for every
  step (Cooijmans et al. 2016, arXiv 1603.09025); ``per_step=False`` keeps one set shared by all
  steps (the naive "horizontal" BN, or "vertical" BN when called once on all rows of all steps).

Both take part in :func:`bnlab.tools.recalibrate` (precise BN) through ``recalibrate_begin()`` and
``recalibrate_end()``: between the two calls their training-mode forwards pool the exact
population statistics of every valid value they see (per step for ``per_step=True``), and
``recalibrate_end`` writes them into the running buffers.

Numerical decisions: :class:`MaskedBatchNorm1d` accumulates in float64 (reference.py).
:class:`SequenceBatchNorm` runs inside a time loop, where per-call overhead dominates at
recurrent-layer sizes, so it calls torch's fused native batch norm (one dispatch, one autograd
node per step); its statistics are tested against ``reference.batch_stats``. Population statistics
(recalibration) are pooled in float64 with a per-row shift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module, Parameter

from .. import kernels
from .. import reference as ref
from ..policy import bad_channels, check_nonfinite_option, raise_bad_batch
from .batchnorm import _NormBase

__all__ = ["MaskedBatchNorm1d", "SequenceBatchNorm", "guard_running_stats"]


class PopulationStats:
    """Exact pooled mean and biased variance over many batches, for ``R`` rows of ``C`` channels.

    Each batch adds, per row, its count n, mean m and biased variance v. Sums are float64 and
    shifted by the first batch's mean of each row (so a large common offset does not cancel):

        d = m - shift;  S1 += n d;  S2 += n (v + d^2);  N += n
        mean = shift + S1 / N;  var = S2 / N - (S1 / N)^2     (biased)

    With equal counts this weights batches equally, as :func:`bnlab.tools.recalibrate` does.
    """

    def __init__(self, rows: int, channels: int) -> None:
        z = torch.zeros(rows, channels, dtype=torch.float64)
        self.shift, self.s1, self.s2 = z.clone(), z.clone(), z
        self.n = torch.zeros(rows, dtype=torch.float64)

    def grow(self, rows: int) -> None:
        extra = rows - self.n.numel()
        if extra > 0:
            pad = torch.zeros(extra, self.s1.shape[1], dtype=torch.float64)
            self.shift, self.s1, self.s2 = (torch.cat([t, pad]) for t in (self.shift, self.s1, self.s2))
            self.n = torch.cat([self.n, torch.zeros(extra, dtype=torch.float64)])

    @torch.no_grad()
    def add(self, start: int, mean: Tensor, var: Tensor, count: Tensor | float) -> None:
        """Add a batch for rows ``start .. start + k``: ``mean``/``var`` ``(k, C)``, count ``(k,)`` or scalar."""
        mean, var = mean.detach().to("cpu", torch.float64), var.detach().to("cpu", torch.float64)  # sums live on CPU
        k = mean.shape[0]
        self.grow(start + k)
        sl = slice(start, start + k)
        count = torch.as_tensor(count).detach().to("cpu", torch.float64).expand(k)
        fresh = self.n[sl] == 0
        self.shift[sl][fresh] = mean[fresh]
        d = mean - self.shift[sl]
        self.s1[sl] += count[:, None] * d
        self.s2[sl] += count[:, None] * (var + d * d)
        self.n[sl] += count

    def add_batch(self, start: int, mean: Tensor, var: Tensor, count, nonfinite: str = "raise",
                  name: str = "batch norm") -> bool:
        """:meth:`add` under the non-finite policy (:mod:`bnlab.policy`): a batch with nan/inf
        statistics is dropped (``"skip"``) or raises :class:`bnlab.policy.NonFiniteBatchError`
        (``"raise"``); either way it never reaches the sums. Returns whether it was added."""
        bad, kinds = bad_channels(mean.detach().reshape(-1), var.detach().reshape(-1), count)
        if bad:
            if nonfinite == "skip":
                return False
            raise_bad_batch(name, [b % mean.shape[-1] for b in bad], kinds)
        self.add(start, mean, var, count)
        return True

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean, var_biased, count)`` per row; rows never seen have count 0."""
        n = self.n.clamp_min(1)[:, None]
        d = self.s1 / n
        return self.shift + d, (self.s2 / n - d * d).clamp_min(0), self.n


def _unbiased(var: Tensor, count: Tensor) -> Tensor:
    """``var_b * M / (M - 1)`` per row where M > 1 (torch's running-variance convention)."""
    m = count.to(torch.float64)[:, None]
    return torch.where(m > 1, var * m / (m - 1).clamp_min(1), var)


def _mask_weight(x: Tensor, mask: Tensor) -> Tensor:
    """The 0/1 mask in x's dtype, shaped to broadcast against x: (N,) -> (N, 1[, 1]); (N, L) -> (N, 1, L)."""
    if mask.dim() == 1:
        return mask.to(x.dtype).reshape([x.shape[0]] + [1] * (x.dim() - 1))
    return mask.to(x.dtype).unsqueeze(1)


class _MaskedBatchNormFn(torch.autograd.Function):
    """Training forward and hand-derived backward from :mod:`bnlab.reference`, with a mask.

    Masked positions of the output are 0 and get no gradient; the statistics, dweight and dbias
    run over valid positions only (see ``reference.batch_norm_backward``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, mask):
        # x arrives with its masked positions already 0 (ref.mask_out): everything below is finite there
        y, mean, invstd, var, count = ref.batch_norm_forward(x, weight, bias, eps, mask)
        y = y * _mask_weight(y, mask)
        ctx.save_for_backward(x, weight, mean, invstd, mask)
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        x, weight, mean, invstd, mask = ctx.saved_tensors
        dx, dw, db = ref.batch_norm_backward(dy.contiguous(), x, mean, invstd, weight, mask)
        return dx, (dw if ctx.needs_input_grad[1] else None), (db if ctx.needs_input_grad[2] else None), None, None


class MaskedBatchNorm1d(_NormBase):
    r"""BatchNorm1d over padded data: masked positions enter no statistic (Ioffe & Szegedy 2015).

    .. math:: y = \frac{x - \mathrm{E}_{valid}[x]}{\sqrt{\mathrm{Var}_{valid}[x] + \epsilon}} \gamma + \beta

    with mean and biased variance per channel over the valid positions only (float64, shifted,
    :func:`bnlab.reference.batch_stats`). Masked positions of the output are 0. The running
    statistics are updated from the valid positions only (unbiased variance, as torch); a batch
    with no valid position leaves the running statistics and ``num_batches_tracked`` untouched.
    Same constructor, parameters, buffers and state_dict keys as :class:`bnlab.nn.BatchNorm1d`
    (momentum: torch's convention; Keras/Flax ``momentum=0.99`` is ``0.01`` here).

    Args:
        num_features: C.
        eps: added to the variance (default 1e-5).
        momentum: running-statistics factor (default 0.1); None for a cumulative average.
        affine: learnable gamma and beta (default True).
        track_running_stats: keep running_mean/var (default True).
        bias: keyword; learnable beta when affine (default True).
        nonfinite: keyword; "raise" (default) or "skip" for training batches with nan/inf.

    Shape: input ``(N, C)`` with mask ``(N,)``, or ``(N, C, L)`` with mask ``(N, L)`` (or
    ``(N,)``: whole rows); mask True where valid, default all valid. Output: as input.

    Example:
        >>> import torch, bnlab
        >>> bn = bnlab.nn.MaskedBatchNorm1d(3)
        >>> x = torch.randn(4, 3, 5)
        >>> mask = torch.arange(5) < torch.tensor([5, 3, 2, 1])[:, None]   # (N, L) from lengths
        >>> y = bn(x, mask)
        >>> bool((y[1, :, 3:] == 0).all())
        True
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 nonfinite: str = "raise") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.nonfinite = check_nonfinite_option(nonfinite, "MaskedBatchNorm1d")
        self._population: PopulationStats | None = None

    def _check_input(self, input: Tensor, mask: Tensor | None) -> Tensor:
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor input (got {type(input).__name__})")
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: expected 2D or 3D input (got {input.dim()}D input of shape {tuple(input.shape)})")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{name}: expected input with {self.num_features} channels (dim 1) (got shape {tuple(input.shape)})"
            )
        if mask is None:
            return torch.ones(input.shape[0], dtype=torch.bool, device=input.device)
        if not isinstance(mask, Tensor):
            raise TypeError(f"{name}: expected mask to be a torch.Tensor (got {type(mask).__name__})")
        ok = (mask.dim() == 1 and mask.shape[0] == input.shape[0]) or (
            input.dim() == 3 and mask.dim() == 2 and tuple(mask.shape) == (input.shape[0], input.shape[2])
        )
        if not ok:
            want = "(N,)" if input.dim() == 2 else "(N,) or (N, L)"
            raise ValueError(
                f"{name}: expected mask of shape {want} for input of shape {tuple(input.shape)} "
                f"(got mask of shape {tuple(mask.shape)})"
            )
        return mask.to(device=input.device, dtype=torch.bool)

    def __prepare_scriptable__(self):  # torch.jit.script: one clear error (see bnlab.nn.BatchNorm2d)
        raise RuntimeError(kernels.script_error(type(self).__name__))

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = self._check_input(input, mask)
        # padding content never enters any arithmetic: masked positions become 0 first (torch.where,
        # not a product, so a padded inf or nan cannot turn into nan), and 0 again on the way out
        x = ref.mask_out(input, mask)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats:
            y = kernels.batch_norm_eval(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)
            return ref.mask_out(y, mask)
        if kernels.needs_reference():  # forward AD / torch.func: the reference math, which torch differentiates
            y, mean, _, var, count = ref.batch_norm_forward(x, self.weight, self.bias, self.eps, mask)
            y, mean, var = ref.mask_out(y, mask), mean.detach(), var.detach()
        else:
            y, mean, var, count = _MaskedBatchNormFn.apply(x, self.weight, self.bias, self.eps, mask)
        if self._population is not None:
            if float(count) > 0:
                self._population.add_batch(0, mean[None], var[None], count, self.nonfinite, type(self).__name__)
        elif self.training and self.track_running_stats and float(count) > 0:
            # an all-masked batch is no batch: statistics and num_batches_tracked stay as they are
            # (so a cumulative average, momentum=None, is not diluted by it)
            with torch.no_grad():
                kernels.update_buffers(
                    self.running_mean, self.running_var, self.num_batches_tracked, mean, var, count,
                    self.momentum, self.nonfinite, type(self).__name__,
                )
        return y

    # precise BN (bnlab.tools.recalibrate)
    def recalibrate_begin(self) -> None:
        self._population = PopulationStats(1, self.num_features)

    def recalibrate_abort(self) -> None:
        """Leave population mode without writing anything (an interrupted recalibration)."""
        self._population = None

    @torch.no_grad()
    def recalibrate_end(self) -> None:
        pop, self._population = self._population, None
        if pop is None or not self.track_running_stats or float(pop.n[0]) == 0:
            return
        mean, var, n = pop.result()
        self.running_mean.copy_(mean[0])
        self.running_var.copy_(_unbiased(var, n)[0])


class SequenceBatchNorm(Module):
    r"""Batch normalization of a recurrent layer's pre-activations, called once per time step.

    .. math:: y_t = \frac{x_t - \mu_t}{\sqrt{\sigma_t^2 + \epsilon}} \gamma + \beta

    In training :math:`\mu_t, \sigma_t^2` are the statistics of the rows given at step t (the
    batch, or its sequences still running). Population statistics:

    * ``per_step=True`` (Cooijmans et al. 2016, arXiv 1603.09025): one running mean/variance per
      step, rows of ``running_mean``/``running_var`` of shape ``(S, C)``; S grows in training to the
      longest sequence seen. In eval step t uses row t; **past the longest training length it
      reuses the last trained step's statistics** (rows with ``num_batches_tracked == 0`` never
      normalize).
    * ``per_step=False``: one running mean/variance ``(1, C)`` shared by every step (updated at every
      step in training); a single call on the rows of all steps gives statistics over batch and
      time ("vertical" BN, Laurent et al. 2016, arXiv 1510.01378).

    A training step with fewer than 2 rows (one sequence still running) cannot have batch
    statistics: it is normalized with that step's population statistics and updates nothing.

    Args:
        num_features: C.
        per_step: separate statistics per step (default True).
        max_steps: rows allocated up front for per-step statistics (default 1; grows on demand).
        eps: added to the variance (default 1e-5).
        momentum: running-statistics factor (default 0.1, torch's convention); None: cumulative.
        affine: learnable gamma (default True).
        bias: learnable beta when affine (default True). Gate pre-activations use False: the
            recurrent layer's own bias is the shift.
        gamma_init: initial gamma (default 1.0; Cooijmans use 0.1 to keep tanh/sigmoid unsaturated).

    Shape: ``forward(x, step)``: x ``(N, C)``; ``forward_steps(x)``: x ``(B, T, C)`` (batch-major),
    every step with the same B rows.

    Example:
        >>> import torch, bnlab
        >>> bn = bnlab.nn.SequenceBatchNorm(4, per_step=True, gamma_init=0.1)
        >>> ys = [bn(torch.randn(8, 4) + t, step=t) for t in range(3)]
        >>> bn.running_mean.shape
        torch.Size([3, 4])
    """

    def __init__(self, num_features: int, per_step: bool = True, max_steps: int = 1, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, bias: bool = True, gamma_init: float = 1.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.per_step = per_step
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.gamma_init = gamma_init
        rows = max(int(max_steps), 1) if per_step else 1
        self.weight = Parameter(torch.empty(num_features, **fk)) if affine else None
        self.bias = Parameter(torch.empty(num_features, **fk)) if affine and bias else None
        self.register_buffer("running_mean", torch.zeros(rows, num_features, **fk))
        self.register_buffer("running_var", torch.ones(rows, num_features, **fk))
        self.register_buffer("num_batches_tracked", torch.zeros(rows, dtype=torch.long, device=device))
        self._population: PopulationStats | None = None
        self._tracked: int | None = None
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()
        self._tracked = None

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            torch.nn.init.constant_(self.weight, self.gamma_init)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, per_step={self.per_step}, steps={self.running_mean.shape[0]}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, gamma_init={self.gamma_init}")

    @property
    def tracked_steps(self) -> int:
        """Steps with trained population statistics (the longest training length for per_step)."""
        if self._tracked is None:
            nz = self.num_batches_tracked.nonzero()
            self._tracked = int(nz.max()) + 1 if nz.numel() else 0
        return self._tracked

    def ensure_steps(self, steps: int) -> None:
        """Grow the per-step buffers to at least ``steps`` rows (new rows: mean 0, variance 1)."""
        rows = self.running_mean.shape[0]
        if not self.per_step or steps <= rows:
            return
        extra = steps - rows
        rm, rv, nbt = self.running_mean, self.running_var, self.num_batches_tracked
        self.running_mean = torch.cat([rm, rm.new_zeros(extra, rm.shape[1])])
        self.running_var = torch.cat([rv, rv.new_ones(extra, rv.shape[1])])
        self.num_batches_tracked = torch.cat([nbt, nbt.new_zeros(extra)])

    def _row(self, step: int) -> int:
        """The row of population statistics step ``step`` uses in eval."""
        if not self.per_step:
            return 0
        return min(step, max(self.tracked_steps, 1) - 1, self.running_mean.shape[0] - 1)

    def _factor(self, row: int) -> float:
        if self.momentum is not None:
            return self.momentum
        return 1.0 / float(self.num_batches_tracked[row])

    def _shift(self, offset: Tensor | None) -> Tensor | None:
        if offset is None:
            return self.bias
        return offset if self.bias is None else self.bias + offset

    def __prepare_scriptable__(self):  # torch.jit.script: one clear error (see bnlab.nn.BatchNorm2d)
        raise RuntimeError(kernels.script_error(type(self).__name__))

    def forward(self, x: Tensor, step: int = 0, offset: Tensor | None = None) -> Tensor:
        """Normalize the ``(N, C)`` rows of time step ``step``.

        ``offset`` (optional ``(C,)``) is added after normalization inside the same call: a
        recurrent layer passes its gate bias here instead of adding it in a separate op.
        """
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"SequenceBatchNorm: expected input of shape (N, {self.num_features}) "
                             f"(got shape {tuple(x.shape)})")
        shift = self._shift(offset)
        if not self.training or x.shape[0] < 2:
            r = self._row(step)
            return F.batch_norm(x, self.running_mean[r], self.running_var[r], self.weight, shift, False, 0.0, self.eps)
        if self._population is not None:
            return self._recal_forward(x, step, shift)
        r = step if self.per_step else 0
        self.ensure_steps(r + 1)
        self.num_batches_tracked[r] += 1
        if self._tracked is not None and r >= self._tracked:
            self._tracked = r + 1
        return F.batch_norm(x, self.running_mean[r], self.running_var[r], self.weight, shift, True,
                            self._factor(r), self.eps)

    def stepper(self, steps: int, rows: int):
        """A lean per-step normalizer ``f(x, step)`` for a time loop of ``steps`` steps that all have
        the same ``rows`` rows: the bookkeeping :meth:`forward` does every call (buffer growth,
        counters, row lookup) is done once here, so the loop pays one fused batch-norm call per step.
        Falls back to :meth:`forward` where that bookkeeping depends on the step (recalibration,
        a cumulative average, fewer than 2 rows)."""
        if self._population is not None or (self.training and (self.momentum is None or rows < 2)):
            return self
        w, b, eps = self.weight, self.bias, self.eps
        if self.training:
            if self.per_step:
                self.ensure_steps(steps)
                self.num_batches_tracked[:steps] += 1
                if self._tracked is not None and steps > self._tracked:
                    self._tracked = steps
            else:
                self.num_batches_tracked[0] += steps  # one update per step, as forward does
            rm, rv = self.running_mean.unbind(0), self.running_var.unbind(0)  # per-row views, updated in place
            mom = self.momentum
            if self.per_step:
                return lambda x, t: F.batch_norm(x, rm[t], rv[t], w, b, True, mom, eps)
            return lambda x, t: F.batch_norm(x, rm[0], rv[0], w, b, True, mom, eps)
        picked = [self._row(t) for t in range(steps)]
        rm = [self.running_mean[r] for r in picked]
        rv = [self.running_var[r] for r in picked]
        return lambda x, t: F.batch_norm(x, rm[t], rv[t], w, b, False, 0.0, eps)

    def forward_steps(self, x: Tensor, offset: Tensor | None = None) -> Tensor:
        """Normalize all steps of a batch-major ``x`` ``(B, T, C)`` at once: one dispatch, not T.

        Every step has the same B rows. With ``per_step=False`` the statistics are over batch and
        time (every row of every step). ``offset``: as in :meth:`forward`.
        """
        B, T, C = x.shape
        if not self.per_step:
            return self(x.reshape(B * T, C), 0, offset).view(B, T, C)  # statistics over batch and time
        if (self.training and (B < 2 or self.momentum is None)) or self._population is not None:
            return torch.stack([self(x[:, t], t, offset) for t in range(T)], 1)
        xb = x.reshape(B, T * C)  # (B, T, C) -> (B, T*C): one channel per (step, feature), no copy
        w = self.weight.repeat(T) if self.weight is not None else None
        shift = self._shift(offset)
        b = shift.repeat(T) if shift is not None else None
        if self.training:
            self.ensure_steps(T)
            self.num_batches_tracked[:T] += 1
            if self._tracked is not None and T > self._tracked:
                self._tracked = T
            y = F.batch_norm(xb, self.running_mean[:T].view(-1), self.running_var[:T].view(-1), w, b, True,
                             self.momentum, self.eps)
        else:
            rows = torch.arange(T, device=x.device).clamp_(max=self._row(T - 1))
            y = F.batch_norm(xb, self.running_mean[rows].view(-1), self.running_var[rows].view(-1), w, b, False,
                             0.0, self.eps)
        return y.view(B, T, C)

    def _recal_forward(self, x: Tensor, step: int, shift: Tensor | None) -> Tensor:
        with torch.no_grad():
            var, mean = torch.var_mean(x.detach().to(torch.float64), dim=0, unbiased=False)  # (N, C) -> (C,)
            self._population.add_batch(step if self.per_step else 0, mean[None], var[None], x.shape[0],
                                       getattr(self._population, "nonfinite", "raise"),
                                       getattr(self._population, "name", type(self).__name__))
        return F.batch_norm(x, None, None, self.weight, shift, True, 0.0, self.eps)

    # precise BN (bnlab.tools.recalibrate): population statistics per step
    def recalibrate_begin(self) -> None:
        self._population = PopulationStats(self.running_mean.shape[0], self.num_features)

    def recalibrate_abort(self) -> None:
        """Leave population mode without writing anything (an interrupted recalibration)."""
        self._population = None

    @torch.no_grad()
    def recalibrate_end(self) -> None:
        pop, self._population = self._population, None
        if pop is None:
            return
        mean, var, n = pop.result()
        self.ensure_steps(mean.shape[0])
        dev = self.running_mean.device
        seen = (n > 0).to(dev)
        k = mean.shape[0]
        self.running_mean[:k][seen] = mean.to(dev, self.running_mean.dtype)[seen]
        self.running_var[:k][seen] = _unbiased(var, n).to(dev, self.running_var.dtype)[seen]
        self.num_batches_tracked[:k][seen] = self.num_batches_tracked[:k][seen].clamp_min(1)
        self._tracked = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # per-step buffers have as many rows as the checkpoint's longest training length: take its shape
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            t = state_dict.get(prefix + name)
            if isinstance(t, Tensor) and t.shape != getattr(self, name).shape and t.dim() == getattr(self, name).dim():
                setattr(self, name, torch.empty_like(t, dtype=getattr(self, name).dtype))
        self._tracked = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class guard_running_stats:
    """Keep non-finite batches out of the population statistics of ``SequenceBatchNorm`` layers.

    The time loop updates per-step buffers inside torch's fused batch-norm call, one step at a
    time, so a nan/inf cannot be stopped before it lands. This context snapshots the buffers
    (``(S, C)``-sized, cheap) on entry and checks them on exit: if any became non-finite, every
    buffer is restored, and ``nonfinite="raise"`` raises :class:`bnlab.functional.NonFiniteBatchError`
    naming the layer and steps, while ``"skip"`` keeps the output and drops the update.
    """

    def __init__(self, module: Module, name: str, nonfinite: str = "raise") -> None:
        self.norms = [m for m in module.modules() if isinstance(m, SequenceBatchNorm)] if module.training else []
        self.name = name
        self.nonfinite = nonfinite
        self.saved = []

    def __enter__(self) -> "guard_running_stats":
        for m in self.norms:  # recalibration: the layer's policy decides over non-finite batches too
            if m._population is not None:
                m._population.nonfinite, m._population.name = self.nonfinite, self.name
        self.saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m._tracked)
                      for m in self.norms]
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        bad_steps: set[int] = set()
        for m, *_ in self.saved:
            finite = torch.isfinite(m.running_mean).all(1) & torch.isfinite(m.running_var).all(1)  # (S, C) -> (S,)
            bad_steps.update((~finite).nonzero().flatten().tolist())
        if not bad_steps and exc_type is None:
            return
        if bad_steps or exc_type is not None:
            for m, rm, rv, nbt, tracked in self.saved:  # buffers may have grown: restore the objects
                m.running_mean, m.running_var, m.num_batches_tracked, m._tracked = rm, rv, nbt, tracked
        if bad_steps and exc_type is None and self.nonfinite != "skip":
            steps = sorted(bad_steps)[:20]
            raise kernels.NonFiniteBatchError(
                f"{self.name}: non-finite values (nan or inf) reached the batch statistics at step(s) {steps}; "
                "population statistics were left unchanged. Fix the input, or set nonfinite='skip' on the "
                "layer to skip this batch's statistics update."
            )
