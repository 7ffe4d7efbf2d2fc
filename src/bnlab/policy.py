"""The running-statistics policy, written once.

Every path that moves running statistics (the fused kernels, torch's native fallback, the compiled
ops, the reference path used under forward AD and ``torch.func``, ghost and masked batch norm,
recalibration) calls :func:`update_buffers`, which owns:

* **the non-finite policy** (``nonfinite="raise" | "skip"``, validated by
  :func:`check_nonfinite_option`): a batch whose statistics are nan, inf, or too large for the
  buffers' dtype (``x = 3e38`` in float32: the float64 variance 9e76 is finite but would be stored
  as inf) never reaches the buffers. ``"raise"`` raises :class:`NonFiniteBatchError` naming the
  channels and what went wrong (nan / inf / overflow); ``"skip"`` leaves every buffer, and
  ``num_batches_tracked``, as it was. Either way no buffer is ever corrupted.
* **the empty batch**: counted in ``num_batches_tracked``, statistics untouched (torch's rule).
* **the factor** (:func:`ema_factor`): ``momentum``, or ``1 / num_batches_tracked`` (after the
  increment) for ``momentum=None``, a cumulative average.
* **the Bessel correction** (:func:`bessel`): ``running_var`` receives the unbiased variance
  ``var_b * M / (M - 1)``; the biased one normalizes.
* **the update** ``running = (1 - f) * running + f * batch``, in float64, rounded once to the
  buffers' dtype: :func:`bnlab.reference.update_running_stats` is the formula; CPU float32/float64
  buffers take the same arithmetic in one compiled call (:func:`_write_running`) with the overflow
  check inside, because this runs once per training step and small steps are dominated by the
  Python around the kernels.

Two layer options decide *when* a training batch reaches the buffers; both are validated here and
both end in :func:`update_buffers`:

* **accumulation** (``accumulate=k``, :func:`check_accumulate_option`): the statistics of k
  micro-batches are pooled (:class:`PooledStats`: count-weighted mean and variance, Chan's
  parallel formula in float64) and written once, so that k micro-batches of size b leave the
  running statistics and ``num_batches_tracked`` one batch of k * b would leave.
* **the one-value batch** (``small_batch``, :func:`check_small_batch_option`): ``"error"``
  (torch's behaviour) or ``"running_stats"``: such a training batch normalizes with the running
  statistics and updates nothing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit
from torch import Tensor

from . import reference as ref

__all__ = [
    "NONFINITE",
    "NonFiniteBatchError",
    "check_nonfinite_option",
    "bessel",
    "ema_factor",
    "bad_channels",
    "raise_bad_batch",
    "update_buffers",
    "SMALL_BATCH",
    "check_small_batch_option",
    "check_accumulate_option",
    "PooledStats",
]

NONFINITE = ("raise", "skip")
SMALL_BATCH = ("error", "running_stats")

_FAST_DTYPES = (torch.float32, torch.float64)
_LIMIT = {d: float(torch.finfo(d).max) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


class NonFiniteBatchError(ValueError):
    """A training batch had non-finite (or overflowing) statistics; the running statistics were left
    untouched."""


def check_nonfinite_option(nonfinite: str, name: str) -> str:
    """``nonfinite`` if it is one of :data:`NONFINITE`, else a ValueError naming the layer."""
    if nonfinite not in NONFINITE:
        raise ValueError(f"{name}: nonfinite must be 'raise' or 'skip' (got {nonfinite!r})")
    return nonfinite


def check_small_batch_option(small_batch: str, name: str) -> str:
    """``small_batch`` if it is one of :data:`SMALL_BATCH`, else a ValueError naming the layer."""
    if small_batch not in SMALL_BATCH:
        raise ValueError(f"{name}: small_batch must be 'error' or 'running_stats' (got {small_batch!r})")
    return small_batch


def check_accumulate_option(accumulate, name: str) -> int:
    """``accumulate`` (micro-batches per running-statistics update) as an int >= 1, else an error
    naming the layer."""
    if isinstance(accumulate, bool) or not isinstance(accumulate, (int, np.integer)):
        raise TypeError(f"{name}: accumulate must be an int >= 1, the micro-batches per update (got {accumulate!r})")
    if accumulate < 1:
        raise ValueError(f"{name}: accumulate must be >= 1, the micro-batches per update (got {accumulate})")
    return int(accumulate)


def bessel(count) -> float:
    """The Bessel correction ``M / (M - 1)`` that turns a biased variance of M values into the
    unbiased one (1 for ``M <= 1``)."""
    m = float(count)
    return m / (m - 1.0) if m > 1 else 1.0


def ema_factor(momentum: float | None, batches: int | None) -> float:
    """The update factor: ``momentum``, or for ``momentum=None`` (a cumulative average)
    ``1 / batches``, the number of batches tracked counting this one (0 when nothing counts)."""
    if momentum is not None:
        return float(momentum)
    return 1.0 / batches if batches else 0.0


def _limit(running_mean, running_var) -> float:
    buf = running_var if running_var is not None else running_mean
    return _LIMIT.get(buf.dtype, math.inf) if buf is not None else math.inf


def bad_channels(mean, var, count, limit: float = math.inf) -> tuple[list[int], list[str]]:
    """Channels whose statistics may not enter the buffers, and what is wrong with them.

    ``mean``, ``var`` (biased): float ``(C,)`` tensors or ndarrays. Kinds, read off the mean (a nan in
    the input makes the mean nan, an inf makes it inf, +inf and -inf together nan): ``"nan"``,
    ``"inf"``, and ``"overflow"``: a finite mean with a variance that is not finite (the sums
    overflowed) or exceeds ``limit``, the buffers' largest finite value, in its unbiased form.
    """
    corr = bessel(count)
    if isinstance(mean, Tensor):  # torch ops: also under torch.func transforms, on any device
        mean, var = mean.detach(), var.detach()
        isnan, isinf = torch.isnan(mean), torch.isinf(mean)
        over = torch.isfinite(mean) & (~torch.isfinite(var) | (var * corr > limit) | (mean.abs() > limit))
        bad = (isnan | isinf | over).nonzero().flatten().tolist()
    else:
        with np.errstate(invalid="ignore", over="ignore"):
            isnan, isinf = np.isnan(mean), np.isinf(mean)
            over = np.isfinite(mean) & (~np.isfinite(var) | (var * corr > limit) | (np.abs(mean) > limit))
        bad = np.flatnonzero(isnan | isinf | over).tolist()
    kinds = [k for k, hit in (("nan", isnan), ("inf", isinf), ("overflow", over)) if bool(hit.any())]
    return bad, kinds


def raise_bad_batch(name: str, channels: list[int], kinds: list[str], limit: float = math.inf,
                    dtype: torch.dtype | None = None) -> None:
    """Raise :class:`NonFiniteBatchError` naming the layer, the channels and what went wrong."""
    shown = channels[:20]
    more = f" (and {len(channels) - 20} more)" if len(channels) > 20 else ""
    said = []
    for k in kinds:
        if k == "overflow":
            if not math.isfinite(limit):
                where = "float64's range"
            else:
                where = f"{limit:.3g}, the largest value of the buffers' dtype" + (f" {dtype}" if dtype else "")
            said.append(f"overflow: the input is finite but its variance exceeds {where}")
        else:
            said.append(k)
    hint = "Fix the input"
    if "overflow" in kinds:
        hint = "Rescale the input (or use float64)"
    raise NonFiniteBatchError(
        f"{name}: non-finite batch statistics ({'; '.join(said)}) in the training batch in channel(s) "
        f"{shown}{more}; running statistics were left unchanged. {hint}, or pass nonfinite='skip' to skip "
        "this batch's statistics update."
    )


@njit(cache=True, nogil=True)
def _write_running(rm, rv, has_rm, has_rv, mean, var, count, factor, limit):
    """The update of :func:`bnlab.reference.update_running_stats` on CPU float32/float64 buffers
    (float64 arithmetic, rounded once), written only if no channel exceeds ``limit``; returns the
    number of channels that would (0: written)."""
    corr = count / (count - 1.0) if count > 1 else 1.0
    over = 0
    for ch in range(mean.shape[0]):
        if (has_rv and not var[ch] * corr <= limit) or (has_rm and not abs(mean[ch]) <= limit):
            over += 1
    if over:
        return over
    for ch in range(mean.shape[0]):
        if has_rm:
            rm[ch] = (1.0 - factor) * np.float64(rm[ch]) + factor * mean[ch]
        if has_rv:
            rv[ch] = (1.0 - factor) * np.float64(rv[ch]) + factor * (var[ch] * corr)
    return 0


_ABS_BITS = np.uint64(0x7FFF_FFFF_FFFF_FFFF)
_EXP_BITS = np.uint64(0x7FF0_0000_0000_0000)  # |x| at or above it as bits: inf or nan


@njit(cache=True, nogil=True)
def _stats_bits_ok(mb, vb, lim_m, lim_v):
    """:func:`stats_ok` on the values' bits (``uint64`` views): for non-negative doubles the bits
    order as the values do, so the largest |mean| and the largest variance are integer maxima, a
    reduction the compiler vectorizes (a float one with nan checks it leaves scalar)."""
    am = np.uint64(0)
    for i in range(mb.size):
        a = mb[i] & _ABS_BITS
        am = a if a > am else am
    av = np.uint64(0)
    sv = np.int64(-1)  # the largest variance's bits as signed (a negative value's bits are negative)
    for i in range(vb.size):
        a = vb[i] & _ABS_BITS
        av = a if a > av else av
        b = np.int64(vb[i])
        sv = b if b > sv else sv
    return am < _EXP_BITS and av < _EXP_BITS and am <= lim_m and sv <= np.int64(lim_v)


def stats_ok(mean: np.ndarray, var: np.ndarray, limit: float) -> bool:
    """Whether a batch's float64 statistics (``mean`` and biased ``var``, C-contiguous ndarrays of
    any shape) may reach buffers whose dtype's largest value is ``limit``: every value finite,
    ``|mean| <= limit`` and ``2 var <= limit`` (the Bessel factor is at most 2). One compiled pass
    over their bits: the check before a recurrent layer's statistics are written runs every
    training step over every step's statistics, where numpy's reductions (finite, abs, max) made
    four passes and their temporaries."""
    lim = np.array([limit, limit / 2.0]).view(np.uint64)
    return bool(_stats_bits_ok(mean.reshape(-1).view(np.uint64), var.reshape(-1).view(np.uint64), lim[0], lim[1]))


def _fast(t: Tensor | None) -> bool:
    return t is None or (t.is_cpu and t.dtype in _FAST_DTYPES and not t.requires_grad and t.dim() == 1
                         and t.is_contiguous())


def update_buffers(
    running_mean, running_var, num_batches_tracked, mean, var, count, momentum, nonfinite, name, nbad=None
) -> bool:
    """Apply one batch's statistics to the running buffers, the policy first. Returns whether the
    statistics were written.

    ``mean`` and ``var`` (biased) are float64 ``(C,)`` tensors or ndarrays; ``count`` the number of
    values per channel behind them (an int or a 0-d tensor); ``nbad``, when the caller already
    knows it, the number of channels with non-finite statistics (0 lets the non-finite scan be
    skipped; the overflow check still runs). See the module docstring for the rules.
    """
    if running_mean is None and running_var is None and num_batches_tracked is None:
        return False
    if count == 0:  # an empty batch: torch counts it and leaves the statistics alone
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return False
    limit = _limit(running_mean, running_var)
    if (isinstance(mean, Tensor) and mean.is_cpu and not mean.requires_grad and mean.dtype in _FAST_DTYPES
            and var.is_cpu and var.dtype in _FAST_DTYPES and _fast(running_mean) and _fast(running_var)):
        # CPU statistics into CPU float buffers (torch's kernel for half inputs): C-sized ndarrays and
        # the compiled update below cost less than a handful of small torch ops
        try:
            mean_np = np.asarray(mean.numpy(), dtype=np.float64)
            var_np = np.asarray(var.numpy(), dtype=np.float64)
        except RuntimeError:  # no storage to read (a torch.func transform's wrapped tensor): torch ops below
            pass
        else:
            mean, var = mean_np, var_np
            if nbad is None:
                nbad = 0 if (np.isfinite(mean).all() and np.isfinite(var).all()) else None
    if nbad is None and isinstance(mean, Tensor):  # one check (one sync) first; the details only if needed
        nbad = 0 if bool((torch.isfinite(mean).all() & torch.isfinite(var).all())) else None
    if nbad is None or nbad:
        bad, kinds = bad_channels(mean, var, count, limit)
        if bad:
            if nonfinite == "skip":
                return False
            raise_bad_batch(name, bad, kinds, limit, _dtype(running_mean, running_var))
    if running_mean is None and running_var is None:
        num_batches_tracked.add_(1)
        return True
    # the factor counts this batch: computed before the increment so that a refused batch is not counted
    factor = ema_factor(momentum, None if momentum is not None or num_batches_tracked is None
                        else int(num_batches_tracked.item()) + 1)
    if isinstance(mean, np.ndarray) and _fast(running_mean) and _fast(running_var):
        rm = running_mean.numpy() if running_mean is not None else None
        rv = running_var.numpy() if running_var is not None else None
        dummy = rm if rm is not None else rv
        over = _write_running(dummy if rm is None else rm, dummy if rv is None else rv, rm is not None,
                              rv is not None, mean, var, float(count), factor, limit)
    else:
        if isinstance(mean, np.ndarray):
            mean, var = torch.from_numpy(mean), torch.from_numpy(var)
        over = _torch_overflow(mean, var, count, limit)
        if not over:
            ref.update_running_stats(running_mean, running_var, mean, var, count, factor)
    if over:
        if nonfinite == "skip":
            return False
        bad, kinds = bad_channels(mean, var, count, limit)
        raise_bad_batch(name, bad, kinds, limit, _dtype(running_mean, running_var))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return True


def _dtype(running_mean, running_var):
    buf = running_var if running_var is not None else running_mean
    return None if buf is None else buf.dtype


def _torch_overflow(mean: Tensor, var: Tensor, count, limit: float) -> bool:
    if not math.isfinite(limit):
        return False
    big = (var.detach() * bessel(count) > limit) | (mean.detach().abs() > limit)
    return bool(big.any())


class PooledStats:
    """The pooled statistics of several batches (micro-batches of one accumulation window).

    ``add(mean, var, count)`` takes one batch's float64 mean and biased variance of ``count``
    values per channel and combines them with the batches before (Chan, Golub & LeVeque's
    parallel formula, float64: ``M2 = M2_a + M2_b + delta^2 * n_a * n_b / n``), so that
    :meth:`commit` hands :func:`update_buffers` exactly the mean, biased variance and count of
    the union of the batches: one update, one ``num_batches_tracked`` increment, the Bessel
    correction of the pooled count. ``mark_bad()`` records a batch whose statistics may not enter
    the buffers (``nonfinite="skip"``): the whole window's update is then skipped, as the update
    of one batch containing it would be. ``batches`` counts every batch seen, empty ones included.
    """

    __slots__ = ("batches", "count", "mean", "m2", "bad")

    def __init__(self) -> None:
        self.batches = 0
        self.count = 0
        self.mean = None
        self.m2 = None
        self.bad = False

    def add(self, mean: Tensor, var: Tensor, count: int) -> None:
        self.batches += 1
        if not count or self.bad:
            return
        mean, m2 = mean.to(torch.float64), var.to(torch.float64) * count
        if self.mean is None:
            self.mean, self.m2, self.count = mean.clone(), m2, count
            return
        n = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / n)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * count / n)
        self.count = n

    def mark_bad(self) -> None:
        self.batches += 1
        self.bad = True

    def commit(self, running_mean, running_var, num_batches_tracked, momentum, nonfinite, name) -> bool:
        """One :func:`update_buffers` with the pooled statistics; returns whether they were
        written (a window with a refused batch writes nothing, and counts nothing)."""
        if self.bad or not self.batches:
            return False
        if not self.count:  # only empty batches: counted, statistics untouched (as one empty batch)
            return update_buffers(running_mean, running_var, num_batches_tracked, None, None, 0, momentum, nonfinite,
                                  name)
        mean, var = self.mean, self.m2 / self.count
        return update_buffers(running_mean, running_var, num_batches_tracked, mean, var, self.count, momentum,
                              nonfinite, name)
