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
:class:`SequenceBatchNorm` normalizes with bnlab's kernels and takes its statistics from
``reference.batch_stats``; its buffers move only through :func:`bnlab.policy.update_buffers`, after
every statistic of the forward has been checked (:func:`commit_stats`). Population statistics
(recalibration) are pooled in float64 with a per-row shift.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.nn import Module, Parameter

from .. import kernels
from .. import reference as ref
from ..policy import (_FAST_DTYPES, _LIMIT, NonFiniteBatchError, _write_running, bad_channels, bessel,
                      check_nonfinite_option, raise_bad_batch, stats_ok, update_buffers)
from . import _compat
from .batchnorm import _NormBase

__all__ = ["MaskedBatchNorm1d", "SequenceBatchNorm", "StatsUpdate", "commit_stats", "collect_stats"]


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
        _compat.norm_init(_NormBase.__init__, self, num_features, eps, momentum, affine, track_running_stats, device,
                          dtype, bias=bias)
        self.nonfinite = check_nonfinite_option(nonfinite, "MaskedBatchNorm1d")
        self._population: PopulationStats | None = None

    if not _compat.NORM_BIAS:  # an older torch's reset zeroes the bias unconditionally
        reset_parameters = _compat.reset_parameters

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
        kernels.refuse_training_trace(type(self).__name__)  # the update below is Python no trace records
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


class StatsUpdate:
    """Batch statistics bound for a :class:`SequenceBatchNorm`'s population statistics.

    ``rows``: the rows of the running buffers (time steps; all 0 for shared statistics), in the
    order the steps ran; ``mean``/``var``: float64 ``(k, C)`` tensors (biased variance), one row per
    entry of ``rows``; ``counts``: values per channel behind each row.
    """

    __slots__ = ("norm", "rows", "mean", "var", "counts")

    def __init__(self, norm: "SequenceBatchNorm", rows, mean, var, counts) -> None:
        self.norm = norm
        self.rows = [int(r) for r in rows]
        self.mean = torch.as_tensor(mean, dtype=torch.float64).reshape(len(self.rows), -1)
        self.var = torch.as_tensor(var, dtype=torch.float64).reshape(len(self.rows), -1)
        self.counts = [int(n) for n in counts]


def _all_good(updates: list[StatsUpdate]) -> bool:
    """One pass over everything: finite, and within every buffer's dtype (the common case)."""
    for u in updates:
        limit = _LIMIT.get(u.norm.running_var.dtype, math.inf)
        m, v = u.mean, u.var
        if m.is_cpu and v.is_cpu and m.dtype == torch.float64 and v.dtype == torch.float64:
            # one compiled pass over the numpy views (a handful of torch or numpy reductions per
            # entry cost several times more)
            if not stats_ok(m.contiguous().numpy(), v.contiguous().numpy(), limit):
                return False
            continue
        if not (bool(torch.isfinite(m).all()) and bool(torch.isfinite(v).all())):
            return False
        if math.isfinite(limit) and (float(m.abs().max()) > limit or 2.0 * float(v.max()) > limit):
            return False
    return True


def commit_stats(updates: list[StatsUpdate], nonfinite: str, name: str, labels: dict | None = None) -> bool:
    """Write batch statistics into the running buffers (or the recalibration sums) of their norms,
    every entry checked before any buffer moves.

    If any row of any entry has statistics :func:`bnlab.policy.update_buffers` would refuse (nan,
    inf, or too large for the buffers' dtype), nothing is written: ``nonfinite="raise"`` raises
    :class:`bnlab.policy.NonFiniteBatchError` naming the layer (``name``), the norms (``labels``:
    module -> name) and the steps; ``"skip"`` returns False. Otherwise every entry goes through
    :meth:`SequenceBatchNorm.write_stats` (``update_buffers``) and True is returned.
    """
    if not updates:
        return True
    if not _all_good(updates):
        where, kinds = [], []
        for u in updates:
            limit = _LIMIT.get(u.norm.running_var.dtype, math.inf)
            steps = []
            for r, m, v, n in zip(u.rows, u.mean, u.var, u.counts):
                bad, k = bad_channels(m, v, n, limit)
                if bad:
                    steps.append(r if u.norm.per_step else len(steps))
                    kinds += [x for x in k if x not in kinds]
            if steps:
                label = (labels or {}).get(u.norm, type(u.norm).__name__)
                shown = ", ".join(str(s) for s in sorted(set(steps))[:20])
                where.append(f"{label} at step(s) [{shown}]" if u.norm.per_step else
                             f"{label} ({len(steps)} of its {len(u.rows)} batch(es))")
        if nonfinite == "skip":
            return False
        raise NonFiniteBatchError(
            f"{name}: non-finite batch statistics ({'; '.join(kinds)}) in {', '.join(where)}; running statistics "
            "were left unchanged. Fix the input, or set nonfinite='skip' on the layer to skip this batch's statistics "
            "update."
        )
    for u in updates:
        if not u.norm._write_checked(u, nonfinite, name):
            u.norm.write_stats(u, nonfinite, name, checked=True)
    return True


class collect_stats:
    """While active, the training forwards of every :class:`SequenceBatchNorm` in ``module`` hand
    their batch statistics to ``updates`` (a list) instead of writing them; the caller commits the
    list with :func:`commit_stats` once its forward has run. Left on any exception (nothing written)."""

    def __init__(self, module: Module, updates: list) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, SequenceBatchNorm)]
        self.updates = updates

    def __enter__(self) -> list:
        for m in self.norms:
            m._pending = self.updates
        return self.updates

    def __exit__(self, *exc) -> None:
        for m in self.norms:
            m._pending = None


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

    The normalization is bnlab's (:func:`bnlab.kernels.batch_norm_train` / ``batch_norm_eval``),
    the statistics :func:`bnlab.reference.batch_stats`'s, and the running buffers move only through
    :func:`bnlab.policy.update_buffers` (:meth:`write_stats`), after a check of every statistic
    that is to be written: a batch with nan/inf statistics raises
    :class:`bnlab.policy.NonFiniteBatchError` (``nonfinite="raise"``) or is skipped (``"skip"``),
    and no buffer moves either way. Inside a recurrent layer the statistics of all steps are
    collected (:class:`collect_stats`) and written once the forward has run, so one bad step
    leaves every step's buffers untouched. A shared row updated at k steps of one forward gets
    the k updates in one ``update_buffers`` call: factor ``1 - (1 - momentum)^k`` and the
    statistics weighted as k sequential updates weight them (for ``momentum=None``, the
    cumulative average of the k), rounded once.

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
        nonfinite: keyword; "raise" (default) or "skip" for training batches with nan/inf
            statistics (used when the module is called on its own; a recurrent layer applies its
            own ``nonfinite``).

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
                 device=None, dtype=None, *, nonfinite: str = "raise") -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.per_step = per_step
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.gamma_init = gamma_init
        self.nonfinite = check_nonfinite_option(nonfinite, "SequenceBatchNorm")
        rows = max(int(max_steps), 1) if per_step else 1
        self.weight = Parameter(torch.empty(num_features, **fk)) if affine else None
        self.bias = Parameter(torch.empty(num_features, **fk)) if affine and bias else None
        self.register_buffer("running_mean", torch.zeros(rows, num_features, **fk))
        self.register_buffer("running_var", torch.ones(rows, num_features, **fk))
        self.register_buffer("num_batches_tracked", torch.zeros(rows, dtype=torch.long, device=device))
        self._population: PopulationStats | None = None
        self._pending: list | None = None
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

    def _last_row(self) -> int:
        return min(max(self.tracked_steps, 1) - 1, self.running_mean.shape[0] - 1)

    def _row(self, step: int) -> int:
        """The row of population statistics step ``step`` uses in eval."""
        if not self.per_step:
            return 0
        return min(step, self._last_row())

    def step_rows(self, steps: int) -> Tensor:
        """The rows steps ``0 .. steps - 1`` use in eval, ``(steps,)`` long."""
        if not self.per_step:
            return torch.zeros(steps, dtype=torch.long)
        return torch.arange(steps).clamp_(max=self._last_row())

    def fixed_stats(self, steps: int) -> tuple[Tensor, Tensor]:
        """Population mean and ``1 / sqrt(var + eps)`` of every step ``0 .. steps - 1``, float64
        ``(steps, C)`` on the CPU (what eval, or a training step with one row, normalizes with)."""
        rows = self.step_rows(steps).to(self.running_mean.device)
        mean = self.running_mean.detach()[rows].to("cpu", torch.float64)
        inv = torch.rsqrt(self.running_var.detach()[rows].to("cpu", torch.float64) + self.eps)
        return mean, inv

    def _shift(self, offset: Tensor | None) -> Tensor | None:
        if offset is None:
            return self.bias
        return offset if self.bias is None else self.bias + offset

    def __prepare_scriptable__(self):  # torch.jit.script: one clear error (see bnlab.nn.BatchNorm2d)
        raise RuntimeError(kernels.script_error(type(self).__name__))

    def record_stats(self, rows, mean, var, counts) -> None:
        """Hand batch statistics (float64 ``(k, C)`` mean and biased variance of rows ``rows``) to
        the collecting layer (:class:`collect_stats`), or write them now (:func:`commit_stats`)."""
        upd = StatsUpdate(self, rows, mean, var, counts)
        if self._pending is not None:
            self._pending.append(upd)
        else:
            commit_stats([upd], self.nonfinite, type(self).__name__)

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
            rm, rv = self.running_mean[r], self.running_var[r]
            if self.training:  # a training step of one row: the buffers move at this forward's commit, before
                # the backward, so a kernel that saves them for it (torch's, on other dtypes and devices) gets copies
                rm, rv = rm.clone(), rv.clone()
            return kernels.batch_norm_eval(x, rm, rv, self.weight, shift, self.eps)
        y = kernels.batch_norm_train(x, self.weight, shift, None, None, None, self.momentum, self.eps)
        with torch.no_grad():
            mean, var, _ = ref.batch_stats(x.detach())
        self.record_stats([step if self.per_step else 0], mean, var, [x.shape[0]])
        return y

    def stepper(self, steps: int, rows: int):
        """A per-step normalizer ``f(x, step)`` for a time loop (this module's :meth:`forward`)."""
        return self.forward

    def forward_steps(self, x: Tensor, offset: Tensor | None = None) -> Tensor:
        """Normalize all steps of a batch-major ``x`` ``(B, T, C)`` at once: one dispatch, not T.

        Every step has the same B rows. With ``per_step=False`` the statistics are over batch and
        time (every row of every step). ``offset``: as in :meth:`forward`.
        """
        B, T, C = x.shape
        if not self.per_step:
            return self(x.reshape(B * T, C), 0, offset).view(B, T, C)  # statistics over batch and time
        xb = x.reshape(B, T * C)  # (B, T, C) -> (B, T*C): one channel per (step, feature), no copy
        w = self.weight.repeat(T) if self.weight is not None else None
        shift = self._shift(offset)
        b = shift.repeat(T) if shift is not None else None
        if self.training and B >= 2:
            y = kernels.batch_norm_train(xb, w, b, None, None, None, self.momentum, self.eps)
            with torch.no_grad():
                mean, var, _ = ref.batch_stats(xb.detach())
            self.record_stats(range(T), mean.view(T, C), var.view(T, C), [B] * T)
        else:
            rows = self.step_rows(T).to(x.device)
            y = kernels.batch_norm_eval(xb, self.running_mean[rows].reshape(-1), self.running_var[rows].reshape(-1),
                                        w, b, self.eps)
        return y.view(B, T, C)

    def _write_checked(self, update: StatsUpdate, nonfinite: str, name: str) -> bool:
        """:meth:`write_stats` for the common case, one batch into shared CPU buffers, its statistics
        already checked finite by :func:`commit_stats` (so :func:`bnlab.policy.update_buffers` skips
        that scan), without the grad-mode switch and the device moves. False where the case is
        another: :meth:`write_stats` then does it."""
        rm = self.running_mean
        if self._population is not None or rm is None or not (rm.is_cpu and update.mean.is_cpu):
            return False
        if self.per_step:
            return self._write_steps_checked(update)
        if len(update.counts) != 1:
            return False
        update_buffers(rm[0], self.running_var[0], self.num_batches_tracked[0], update.mean[0], update.var[0],
                       update.counts[0], self.momentum, nonfinite, name, 0)
        return True

    def _write_steps_checked(self, update: StatsUpdate) -> bool:
        """The per-step case of :meth:`_write_checked` for one equal-length forward: steps ``r0 .. r0 + k
        - 1`` each once, in order, with equal counts, a momentum, float32/float64 CPU buffers and float64
        statistics. Every row's update of :func:`bnlab.policy.update_buffers` (the same arithmetic: its
        compiled ``_write_running``) in one call over the k x C values, which writes nothing if any
        value would overflow the buffers' dtype; then False, and :meth:`write_stats` takes the batch
        (and raises or skips with the policy's message). False for any other case, with nothing written.
        (Per row, ``write_stats`` costs some 90 us of Python around a 9 us update at 40 steps x 256
        channels.)"""
        rows, counts, mean, var = update.rows, update.counts, update.mean, update.var
        k = len(rows)
        rv = self.running_var
        if (self.momentum is None or k == 0 or rv is None or counts[0] < 1 or counts.count(counts[0]) != k
                or rows != list(range(rows[0], rows[0] + k)) or rows[0] < 0):
            return False
        rm = self.running_mean
        if (rm.dtype not in _FAST_DTYPES or rv.dtype != rm.dtype or not rv.is_cpu
                or mean.dtype != torch.float64 or var.dtype != torch.float64 or not var.is_cpu
                or mean.shape != (k, rm.shape[1]) or var.shape != mean.shape
                or rm.requires_grad or rv.requires_grad or mean.requires_grad or var.requires_grad):
            return False
        r0, r1 = rows[0], rows[0] + k
        if rm.shape[0] < r1:
            self.ensure_steps(r1)
            rm, rv = self.running_mean, self.running_var
        nbt = self.num_batches_tracked
        if not (rm.is_contiguous() and rv.is_contiguous() and nbt.is_cpu and nbt.is_contiguous()):
            return False
        # numpy views (a torch slice and view cost several times more at this size)
        over = _write_running(rm.numpy()[r0:r1].reshape(-1), rv.numpy()[r0:r1].reshape(-1), True, True,
                              mean.numpy().reshape(-1), var.numpy().reshape(-1), float(counts[0]),
                              float(self.momentum), _LIMIT[rm.dtype])
        if over:
            return False
        nbt.numpy()[r0:r1] += 1
        self._tracked = None
        return True

    @torch.no_grad()
    def write_stats(self, update: StatsUpdate, nonfinite: str = "raise", name: str | None = None,
                    checked: bool = False) -> None:
        """Apply checked statistics (:func:`commit_stats`): the recalibration sums in population
        mode, else the running buffers through :func:`bnlab.policy.update_buffers` (per-step rows
        with equal counts in one call; a shared row's k updates combined, see the class docstring).
        ``checked``: :func:`commit_stats` has found every value finite, so the policy's own scan for
        non-finite values is skipped (its overflow check against the buffers' dtype still runs)."""
        name = name or type(self).__name__
        rows, mean, var, counts = update.rows, update.mean, update.var, update.counts
        if self._population is not None:
            for r, m, v, n in zip(rows, mean, var, counts):
                self._population.add(r, m[None], v[None], n)
            return
        dev = self.running_mean.device
        if not self.per_step:
            self._write_shared(mean, var, counts, nonfinite, name)
        elif self.momentum is None or len(set(rows)) != len(rows):
            self.ensure_steps(max(rows) + 1)
            for r, m, v, n in zip(rows, mean, var, counts):
                update_buffers(self.running_mean[r], self.running_var[r], self.num_batches_tracked[r], m.to(dev),
                               v.to(dev), n, self.momentum, nonfinite, name)
        else:
            self.ensure_steps(max(rows) + 1)
            n = len(rows)
            order = sorted(range(n), key=rows.__getitem__)
            in_order = order == list(range(n))  # rows given in step order: runs are slices, no gather
            i = 0
            while i < n:  # runs of consecutive rows with equal counts: one call each (every step of an
                j = i + 1  # equal-length batch is one run)
                while j < n and rows[order[j]] == rows[order[j - 1]] + 1 and counts[order[j]] == counts[order[i]]:
                    j += 1
                r0, r1, sel = rows[order[i]], rows[order[i]] + (j - i), slice(i, j) if in_order else order[i:j]
                if update_buffers(self.running_mean[r0:r1].view(-1), self.running_var[r0:r1].view(-1), None,
                                  mean[sel].reshape(-1).to(dev), var[sel].reshape(-1).to(dev), counts[order[i]],
                                  self.momentum, nonfinite, name, 0 if checked else None):
                    self.num_batches_tracked[r0:r1] += 1
                i = j
        self._tracked = None

    def _write_shared(self, mean: Tensor, var: Tensor, counts: list[int], nonfinite: str, name: str) -> None:
        k = len(counts)
        dev = self.running_mean.device
        rm, rv, nbt = self.running_mean[0], self.running_var[0], self.num_batches_tracked[0]
        if k == 1:
            update_buffers(rm, rv, nbt, mean[0].to(dev), var[0].to(dev), counts[0], self.momentum, nonfinite, name)
            return
        # k sequential updates r <- (1 - f_i) r + f_i u_i in one: r <- (1 - f) r + f * sum_i w_i u_i / f
        if self.momentum is None:
            w = np.full(k, 1.0 / (int(nbt) + k))
        else:
            m = float(self.momentum)
            w = m * (1.0 - m) ** np.arange(k - 1, -1, -1, dtype=np.float64)
        f = float(w.sum())
        if f <= 0.0:  # momentum 0: nothing moves but the count
            nbt += k
            return
        wb = w * np.array([bessel(n) for n in counts])  # the weights of the biased variances
        if (mean.is_cpu and var.is_cpu and mean.dtype == torch.float64 and var.dtype == torch.float64
                and not (mean.requires_grad or var.requires_grad) and rm.is_cpu):
            # the common case, CPU float64 statistics: the sums in numpy (k x C values; a handful of
            # small torch ops cost several times more)
            cm = (w[:, None] * mean.numpy()).sum(0)
            cv = (wb[:, None] * var.numpy()).sum(0)
        else:
            cm = (torch.from_numpy(w).to(mean.device)[:, None] * mean).sum(0).to(dev)
            cv = (torch.from_numpy(wb).to(var.device)[:, None] * var).sum(0).to(dev)
        # update_buffers applies bessel(counts[-1]) itself
        if update_buffers(rm, rv, None, cm / f, cv / f / bessel(counts[-1]), counts[-1], f, nonfinite, name):
            nbt += k

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
