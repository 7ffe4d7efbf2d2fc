"""Precise BN: recompute population statistics over data (Wu & Johnson 2021, arXiv 2105.07576).

Short training runs leave the running averages lagging the weights (EMA lag); evaluating with them
measures the lag, not the model. ``recalibrate`` runs the data through the model in training mode
(so every layer sees the inputs it saw in training), records each batch-norm layer's per-batch
mean and second moment in float64, and writes population statistics into the running buffers:

    mean = avg_b mean_b
    var  = avg_b (var_b + mean_b^2) - mean^2          (biased, each batch weighted equally)
    running_var = var * M / (M - 1)                    (unbiased, as torch's running estimate)

With equal-size batches these are exactly the statistics of the whole data set.

Other modules may join by defining ``recalibrate_begin()`` and ``recalibrate_end()``: between
the two calls, their training-mode forwards must accumulate population statistics themselves
(:class:`bnlab.nn.MaskedBatchNorm1d`, :class:`bnlab.nn.SequenceBatchNorm`). An optional
``recalibrate_abort()`` leaves that mode without writing anything (an interrupted pass). A batch
norm (a ``torch.nn.modules.batchnorm._BatchNorm``) with the two methods gets both: they are called
(e.g. to switch off training noise for the pass), and its statistics are recalibrated here.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.utils.rnn import PackedSequence

from ..kernels.stats import batch_stats
from ..policy import _LIMIT, bad_channels, bessel, raise_bad_batch

__all__ = ["recalibrate", "PROGRESS_AFTER_S"]

#: CPU float32/float64 layer inputs: per-batch statistics from bnlab's one-pass kernel
#: (:func:`bnlab.kernels.stats.batch_stats`); False: torch ops, as for every other input
_KERNEL_STATS = True


class _Accumulator:
    """Per-channel float64 sums of one layer's inputs over the pass, shifted by the first good
    batch's mean; each batch checked against the layer's non-finite policy before it counts."""

    def __init__(self, name: str, nonfinite: str, limit: float) -> None:
        self.name, self.nonfinite, self.limit = name, nonfinite, limit
        self.n_batches = 0
        self.count = 0
        self.shift = None
        self.sum_mean = None
        self.sum_m2 = None

    def __call__(self, module, args) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.numel() == 0 or x.dim() < 2:
            return
        count = x.numel() // x.shape[1]
        if _KERNEL_STATS and x.is_cpu and x.dtype in (torch.float32, torch.float64):
            # bnlab's statistics kernel: one pass over x (float64 sums shifted by each channel's
            # first value), where the torch ops below make four over a float64 copy of it
            stats, _ = batch_stats(x.detach(), 0.0)
            mean_b = torch.from_numpy(stats[0])
            shift = self.shift if self.shift is not None else mean_b
            bm = mean_b - shift  # shifted batch mean, (C,)
            bm2 = torch.from_numpy(stats[1]) + bm * bm  # shifted batch second moment, (C,)
        else:
            dims = [0] + list(range(2, x.dim()))
            xd = x.detach().to(torch.float64)
            shift = self.shift if self.shift is not None else xd.mean(dims)  # (N, C, *) -> (C,)
            xs = xd - shift.reshape([1, -1] + [1] * (x.dim() - 2))
            bm = xs.mean(dims)  # shifted batch mean, (C,)
            bm2 = (xs * xs).mean(dims)  # shifted batch second moment, (C,)
        bad, kinds = bad_channels(shift + bm, bm2 - bm * bm, count, self.limit)
        if bad:  # the layer's policy: this batch never reaches the sums
            if self.nonfinite == "skip":
                return
            raise_bad_batch(self.name, bad, kinds, self.limit)
        if self.shift is None:
            self.shift = shift
            self.sum_mean = torch.zeros_like(shift)
            self.sum_m2 = torch.zeros_like(shift)
        self.sum_mean += bm
        self.sum_m2 += bm2
        self.n_batches += 1
        self.count += count

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Population mean and unbiased variance (float64)."""
        mean_s = self.sum_mean / self.n_batches
        var = (self.sum_m2 / self.n_batches - mean_s * mean_s).clamp_min(0)  # biased
        return self.shift + mean_s, var * bessel(self.count)


def _input_of(batch: Any) -> Any:
    """The model input in a batch: the batch itself (a tensor, a PackedSequence: passed as it is),
    the first item of a tuple/list (``(input, target)``), or ``batch["input"]`` (else the first
    value) of a dict."""
    if isinstance(batch, PackedSequence):  # a tuple subclass: never unpack it
        return batch
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("recalibrate: got an empty tuple/list as a batch; pass forward= to say how to run it")
        return batch[0]
    if isinstance(batch, dict):
        if "input" in batch:
            return batch["input"]
        if not batch:
            raise ValueError("recalibrate: got an empty dict as a batch; pass forward= to say how to run it")
        return next(iter(batch.values()))
    return batch


# A pass shorter than this shows no progress bar (seconds).
PROGRESS_AFTER_S = 2.0


def _new_progress(total: int | None):
    """A rich progress bar on stderr (transient: it disappears when the pass ends), started."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("recalibrate: batches"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=True)
    bar.start()
    return bar, bar.add_task("recalibrate", total=total)


class _Progress:
    """The pass's progress bar: ``progress=None`` shows it on a terminal (stderr a TTY) once the pass
    has run :data:`PROGRESS_AFTER_S`; ``True`` shows it from the first batch whatever stderr is;
    ``False`` never."""

    def __init__(self, progress: bool | None, total: int | None) -> None:
        if progress is None:
            isatty = getattr(sys.stderr, "isatty", None)
            self.on, self.after = bool(isatty and isatty()), PROGRESS_AFTER_S
        else:
            self.on, self.after = bool(progress), 0.0
        self.total = total
        self.t0 = time.perf_counter()
        self.bar = self.task = None

    def update(self, done: int) -> None:
        if not self.on:
            return
        if self.bar is None:
            if time.perf_counter() - self.t0 < self.after:
                return
            self.bar, self.task = _new_progress(self.total)
        self.bar.update(self.task, completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _total(data: Iterable, num_batches: int | None) -> int | None:
    """How many batches the pass will run, when it can be known in advance."""
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        n = None
    if num_batches is None:
        return n
    return num_batches if n is None else min(n, num_batches)


def _restore_buffer(module: nn.Module, name: str, original: torch.Tensor, saved: torch.Tensor) -> None:
    if module._buffers.get(name) is not original:  # replaced (a layer that grows its buffers): put it back
        module._buffers[name] = original
    if original.shape == saved.shape:
        original.copy_(saved)
    else:  # resized in place
        original.data = saved


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    data: Iterable,
    num_batches: int | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Recompute every batch-norm layer's running statistics over ``data`` (precise BN).

    Args:
        model: a model with bnlab or torch batch-norm layers (or modules with the
            ``recalibrate_begin``/``recalibrate_end`` protocol).
        data: an iterable of batches (a DataLoader works). Each batch is run as ``model(input)``
            where ``input`` is the batch itself when it is a tensor or a ``PackedSequence``
            (passed as it is, never unpacked), the first item of a tuple or list (``(input,
            target)``, whatever the input is), or ``batch["input"]`` (else the dict's first value)
            of a dict.
        num_batches: use at most this many batches (default: all).
        forward: keyword; ``forward(model, batch)`` runs one batch instead, for any other batch
            structure (``lambda m, b: m(**b)``, ``lambda m, b: m(b["x"], lengths=b["len"])``).
        progress: keyword; a progress bar (rich, on stderr, gone when the pass ends). ``None``
            (default): only on a terminal, and only once the pass has run 2 seconds
            (:data:`PROGRESS_AFTER_S`), so a short pass and a non-TTY run (logs, CI) print
            nothing; ``True``: always, from the first batch; ``False``: never.

    Non-finite batches follow each layer's ``nonfinite`` policy: ``"skip"`` leaves the batch out
    of that layer's statistics; ``"raise"`` (bnlab's default; also what torch's layers, which have
    no policy, get) raises :class:`bnlab.policy.NonFiniteBatchError` naming the layer. Statistics
    too large for a buffer's dtype count as non-finite ("overflow").

    What the pass changes, and what it puts back: the model runs in training mode, as the
    statistics must be those of training-mode activations, so dropout is active and every layer
    behaves as in a training step (batch statistics in batch norm). Every module's training flag,
    every batch-norm layer's momentum, and **every buffer of every module** (running statistics of
    layers not recalibrated here, such as instance norm with ``track_running_stats``, and
    ``num_batches_tracked`` counters) are restored afterwards; only the recalibrated running
    means and variances change. Parameters are never touched (no gradients are taken). If the pass
    is interrupted (an exception, KeyboardInterrupt), everything is restored in ``finally``, the
    modules in population mode leave it (``recalibrate_abort()``), and no statistics change.

    Layers frozen with :func:`bnlab.tools.freeze` (``stats=True``) keep their statistics: they are
    not recalibrated (they normalize with them throughout the pass, as in any training step).

    Returns the model, in the training mode it came in with.

    Example:
        >>> import torch, bnlab
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), bnlab.nn.BatchNorm1d(3))
        >>> x = torch.randn(100, 4)
        >>> _ = bnlab.tools.recalibrate(net, x.split(25))
        >>> torch.allclose(net[1].running_mean, net[0](x).mean(0), atol=1e-5)
        True
    """
    modules = dict(model.named_modules())
    custom = {m: n for n, m in modules.items() if hasattr(m, "recalibrate_begin") and hasattr(m, "recalibrate_end")}
    bns = {m: n for n, m in modules.items()
           if isinstance(m, _TorchBatchNorm) and m.track_running_stats and m.running_mean is not None
           and m.running_var is not None and not getattr(m, "frozen_stats", False)}
    modes = {m: m.training for m in modules.values()}
    momenta = {m: m.momentum for m in bns}
    saved = [(m, name, buf, buf.clone()) for m in modules.values() for name, buf in m._buffers.items()
             if buf is not None]
    accs = {}
    for m, n in bns.items():
        limit = _LIMIT.get(m.running_var.dtype, float("inf"))
        accs[m] = _Accumulator(f"{n or type(m).__name__} ({type(m).__name__})", getattr(m, "nonfinite", "raise"),
                               limit)
    hooks = [m.register_forward_pre_hook(accs[m]) for m in bns]
    begun, ended = [], set()
    ok = False
    bar = _Progress(progress, _total(data, num_batches))
    try:
        model.train()
        for m in custom:
            m.recalibrate_begin()
            begun.append(m)
        for i, batch in enumerate(data):
            if num_batches is not None and i >= num_batches:
                break
            if forward is not None:
                forward(model, batch)
            else:
                model(_input_of(batch))
            bar.update(i + 1)
        for m in custom:
            m.recalibrate_end()
            ended.add(m)
        ok = True
    finally:
        bar.close()
        for h in hooks:
            h.remove()
        if not ok:
            for m in begun:
                if m in ended:
                    continue
                abort = getattr(m, "recalibrate_abort", None)
                if abort is not None:
                    abort()
                else:  # no abort: end the mode; the buffers it wrote are restored just below
                    try:
                        m.recalibrate_end()
                    except Exception:  # noqa: BLE001 - already unwinding; the restore below still runs
                        pass
        for m, mode in modes.items():
            m.training = mode
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, name, buf, copy in saved:
            if ok and m in ended and m not in bns:
                continue  # the statistics they recalibrated themselves stay
            _restore_buffer(m, name, buf, copy)
    results = {}
    for m, acc in accs.items():
        if acc.n_batches == 0:
            continue
        mean, var = acc.result()
        bad, kinds = bad_channels(mean, var, 1, acc.limit)  # var is already unbiased
        if bad:
            if acc.nonfinite == "skip":
                continue
            raise_bad_batch(acc.name, bad, kinds, acc.limit, m.running_var.dtype)
        results[m] = (mean, var)
    for m, (mean, var) in results.items():
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
    return model
