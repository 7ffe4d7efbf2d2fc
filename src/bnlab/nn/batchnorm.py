"""Batch-normalization modules with torch.nn's names, signatures, parameters, buffers and
state_dict keys: change one import to switch.

They are true subclasses of torch's: ``bnlab.nn.BatchNorm2d`` is a
:class:`torch.nn.BatchNorm2d` (and a ``torch.nn.modules.batchnorm._BatchNorm``), so every tool
that finds batch norms by ``isinstance`` finds them: ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``,
``torch.func.replace_all_batch_norm_modules_``, the "freeze every BN" idiom. Parameters, buffers,
reset and state-dict versioning are torch's own code; bnlab overrides only ``forward`` (bnlab's
kernels, the non-finite policy, errors that name the layer) and ``_check_input_dim`` (the message).
``torch.ao.quantization.fuse_modules`` finds its fusers by exact type, so importing this module
registers bnlab's classes beside torch's in its default table (conv + bn (+ relu), linear + bn).

Options beyond torch's (keywords, defaults give torch's behaviour): ``nonfinite`` (what a training
batch with nan/inf statistics does to the buffers), ``accumulate`` (running statistics updated once
per k micro-batches with their pooled statistics: gradient accumulation), ``small_batch`` (what a
training batch with one value per channel does). Freezing (:func:`bnlab.tools.freeze`) is layer
state: a frozen layer normalizes with its running statistics whatever ``model.train()`` says, shows
it in its repr, and its state_dict records it (see :class:`_Freezable`).

Momentum convention: torch's. ``running = (1 - momentum) * running + momentum * batch`` with
``momentum=0.1`` by default; ``momentum=None`` is a cumulative average. Keras and Flax state the
other side of the same number: their ``momentum=0.99`` is torch's and bnlab's ``momentum=0.01``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules import batchnorm as _tbn

from .. import functional as BF
from . import _compat
from .. import kernels
from ..kernels import fast as _fast
from .. import reference as ref
from ..policy import (
    NonFiniteBatchError,
    PooledStats,
    _dtype,
    _limit,
    bad_channels,
    check_accumulate_option,
    check_nonfinite_option,
    check_small_batch_option,
    raise_bad_batch,
)

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
]

_fast_train_size = BF._fast_train_size  # the small-call path's training inputs (bnlab.kernels.fast)
_is_compiling = torch.compiler.is_compiling
_is_tracing = torch._C._is_tracing

# torch's base of every batch/instance norm: parameters, buffers, reset, state-dict versioning
_NormBase = _tbn._NormBase

#: the state_dict key (after the layer's prefix) that records a frozen layer's state
FROZEN_KEY = "bnlab_frozen"


class _Freezable:
    """Freezing as layer state (mixin; :func:`bnlab.tools.freeze` sets it, ``unfreeze`` clears it).

    * **stats frozen**: the layer stays in eval mode: ``train(True)`` (and so ``model.train()``)
      records the mode asked for and leaves ``training`` False, so the layer normalizes with its
      running statistics and never updates them. Unfreezing puts the layer in the last mode asked
      for. (Assigning ``layer.training = True`` directly bypasses this, as it bypasses ``train()``.)
    * **affine frozen**: ``weight`` and ``bias`` have ``requires_grad=False`` (unfreezing sets True).
    * ``extra_repr`` shows ``frozen=stats``, ``frozen=affine`` or ``frozen=stats+affine``.
    * ``state_dict``: a frozen layer adds one entry, ``<prefix>bnlab_frozen``, a uint8 tensor
      ``[stats, affine]`` (a tensor, so safetensors and weights-only loading take it; not a buffer,
      so ``.to()``, ``named_buffers()`` and DDP never see it). Loading a state_dict with the entry
      into a layer with this mixin (every bnlab batch norm) sets the layer's frozen state to it;
      a state_dict without it (torch's, an unfrozen layer's) leaves the frozen state as it is.
      torch's own classes do not know the key: load with ``strict=False`` (it is reported in
      ``unexpected_keys``) and freeze again.
    """

    _bnlab_frozen_stats = False
    _bnlab_frozen_affine = False
    _bnlab_mode = None  # the mode last asked for while the statistics are frozen

    @property
    def frozen_stats(self) -> bool:
        """True while the running statistics are frozen (:func:`bnlab.tools.freeze`)."""
        return self._bnlab_frozen_stats

    @property
    def frozen_affine(self) -> bool:
        """True while weight and bias are frozen (:func:`bnlab.tools.freeze` with ``affine=True``)."""
        return self._bnlab_frozen_affine

    def _bnlab_set_frozen(self, stats: bool, affine: bool) -> None:
        """Set the frozen state (idempotent); see the class docstring."""
        stats, affine = bool(stats), bool(affine)
        if stats and not self._bnlab_frozen_stats:
            self._bnlab_mode = self.training
            self._bnlab_frozen_stats = True
            super().train(False)
        elif not stats and self._bnlab_frozen_stats:
            mode = self._bnlab_mode
            self._bnlab_frozen_stats = False
            self._bnlab_mode = None
            super().train(self.training if mode is None else mode)
        if affine != self._bnlab_frozen_affine:
            for p in (getattr(self, "weight", None), getattr(self, "bias", None)):
                if p is not None:
                    p.requires_grad_(not affine)
            self._bnlab_frozen_affine = affine

    def train(self, mode: bool = True):
        if self._bnlab_frozen_stats:
            if not isinstance(mode, bool):
                raise ValueError("training mode is expected to be boolean")
            self._bnlab_mode = mode
            mode = False
        return super().train(mode)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        what = "+".join(k for k, on in (("stats", self._bnlab_frozen_stats), ("affine", self._bnlab_frozen_affine))
                        if on)
        return f"{s}, frozen={what}" if what else s

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._bnlab_frozen_stats or self._bnlab_frozen_affine:
            destination[prefix + FROZEN_KEY] = torch.tensor(
                [self._bnlab_frozen_stats, self._bnlab_frozen_affine], dtype=torch.uint8
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + FROZEN_KEY
        if key not in state_dict:
            return
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        value = state_dict[key]
        if not (isinstance(value, Tensor) and value.numel() == 2 and not value.is_floating_point()
                and bool(((value == 0) | (value == 1)).all())):
            got = f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}" if isinstance(value, Tensor) else (
                type(value).__name__)
            error_msgs.append(f"{type(self).__name__}: expected {key} to be the frozen state, a uint8 tensor "
                              f"[stats, affine] of 0/1 flags (got {got})")
            return
        stats, affine = (bool(v) for v in value.reshape(-1).tolist())
        self._bnlab_set_frozen(stats, affine)


def _one_value_per_channel(input: Tensor) -> bool:
    c, n = input.shape[1], input.numel()
    return bool(c and n and n // c == 1)


class _BatchNorm(_Freezable, _tbn._BatchNorm):
    """Forward shared by BatchNorm1d/2d/3d (a ``torch.nn.modules.batchnorm._BatchNorm``).

    ``nonfinite`` ("raise" or "skip", keyword, default "raise"): what a training batch with nan/inf
    values (or statistics too large for the buffers' dtype) does. Default: raise
    :class:`bnlab.functional.NonFiniteBatchError` naming the channels, running statistics untouched
    (torch would silently write nan or inf into them). "skip": this batch's statistics update (and
    num_batches_tracked) is skipped.

    ``accumulate`` (int k >= 1, keyword, default 1): the running statistics are updated once per k
    training micro-batches, with the pooled statistics of the k (count-weighted mean and variance,
    Chan's parallel formula in float64): k micro-batches of size b leave running_mean, running_var
    and num_batches_tracked as one batch of k * b would (momentum float or None). Each micro-batch
    still normalizes with its own statistics. Details:

    * cost: each micro-batch's statistics are computed once more in float64 (one extra pass over
      the input), for k > 1 only.
    * non-finite: each micro-batch is checked when it arrives. ``"raise"``: the error is raised at
      that micro-batch, the buffers are untouched and the pending window is discarded (the next
      micro-batch starts a new window, as after a skipped optimizer step). ``"skip"``: the window's
      update is skipped when it completes (one batch of k * b containing it would be skipped).
    * pending micro-batches (fewer than k since the last update) are layer state outside the
      state_dict: eval-mode forwards neither use nor change them, so train -> eval -> train in the
      middle of a window completes it; ``state_dict()`` holds the committed statistics only;
      ``load_state_dict`` and ``reset_running_stats`` discard them; :meth:`flush_accumulated`
      writes (or discards) a partial window; :attr:`pending_micro_batches` counts them.
    * a one-value batch under ``small_batch="running_stats"`` is no micro-batch (it updates nothing).

    ``small_batch`` ("error" or "running_stats", keyword, default "error"): what a training batch
    with one value per channel (one sample of a BatchNorm1d, a 1x1 map of a BatchNorm2d) does.
    "error": a ValueError naming the layer (torch's behaviour). "running_stats": it is normalized
    with the running statistics (as in eval; gradients flow to input, weight and bias) and nothing
    is updated (running statistics, num_batches_tracked, accumulation); a layer without running
    statistics raises instead.

    Freezing: see :class:`_Freezable`.
    """

    # class-level defaults: also what a torch layer converted in place (bnlab.tools.freeze and
    # accumulate) and a layer unpickled from an older bnlab read
    nonfinite = "raise"
    accumulate = 1
    small_batch = "error"
    _pending = None

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
        bias: bool = True,
        nonfinite: str = "raise",
        accumulate: int = 1,
        small_batch: str = "error",
    ) -> None:
        _compat.norm_init(_tbn._BatchNorm.__init__, self, num_features, eps, momentum, affine, track_running_stats,
                          device, dtype, bias=bias)
        _set_options(self, nonfinite, accumulate, small_batch)

    if not _compat.NORM_BIAS:  # an older torch's reset zeroes the bias unconditionally
        reset_parameters = _compat.reset_parameters

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling: one clear error instead
        # of TorchScript's (or numba's) failure deep inside the kernels
        raise RuntimeError(kernels.script_error(type(self).__name__))

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.accumulate != 1:
            s += f", accumulate={self.accumulate}"
        if self.small_batch != "error":
            s += f", small_batch={self.small_batch!r}"
        return s

    def forward(self, input: Tensor) -> Tensor:
        return self._forward_any(input, "none", None)

    def _forward_any(self, input: Tensor, act: str, residual: Tensor | None) -> Tensor:
        """The small-call path when it serves the call (``act`` "relu" or "none"), else
        :meth:`_forward`."""
        fx = _fast.ext
        if (fx is not None and (act == "none" or act == "relu") and type(input) is Tensor
                and (residual is None or type(residual) is Tensor) and not _is_compiling() and not _is_tracing()
                and (not self.training or _fast_train_size(input))):
            y = self._fast_forward(fx, input, act, residual)
            if y is not None:
                return y
        return self._forward(input, act, residual)

    def _fast_forward(self, fx, input: Tensor, act: str = "none", residual: Tensor | None = None) -> Tensor | None:
        """The small-call path (:mod:`bnlab.kernels.fast`): the whole layer as one C++ call, or None
        for a call it does not serve (then :meth:`_forward` serves it, and raises any error). In
        training it also takes the norm-act layers' epilogue (``+ residual``, relu)."""
        if kernels.needs_reference():
            return None
        self._check_input_dim(input)
        name = type(self).__name__
        weight, bias, eps, nonfinite = self.weight, self.bias, self.eps, self.nonfinite
        relu = act == "relu"
        running_mean, running_var = self.running_mean, self.running_var
        if self.training:
            if self.accumulate != 1 or self._pending is not None:
                return None
            if self.track_running_stats:
                return BF._fast_batch_norm(fx, input, running_mean, running_var, weight, bias, True, self.momentum,
                                           eps, self.num_batches_tracked, nonfinite, name, residual, relu)
        if self.training or (running_mean is None and running_var is None):
            # batch statistics, no buffer written (untracked in training; no buffers in eval, as torch does)
            return BF._fast_batch_norm(fx, input, None, None, weight, bias, True, 0.0, eps, None, nonfinite, name,
                                       residual, relu)
        return BF._fast_batch_norm(fx, input, running_mean, running_var, weight, bias, False, self.momentum, eps,
                                   None, nonfinite, name, residual, relu)

    def _forward(self, input: Tensor, act: str, residual: Tensor | None) -> Tensor:
        """The forward, followed by ``+ residual`` and ``act`` (fused by the kernels:
        :mod:`bnlab.nn.act`; ``"none"`` and None for plain batch norm)."""
        self._check_input_dim(input)
        name = type(self).__name__
        # parameters and buffers read once (each is a Module.__getattr__ lookup)
        weight, bias = self.weight, self.bias
        running_mean, running_var = self.running_mean, self.running_var
        training = self.training
        if training and self.small_batch != "error" and _one_value_per_channel(input):
            return self._small_batch_forward(input, weight, bias, running_mean, running_var, name, act, residual)
        # batch statistics in training, and in eval when there are no buffers (torch's rule)
        batch_stats = training or (running_mean is None and running_var is None)
        try:
            BF.check_batch_norm_input(input, running_mean, running_var, weight, bias, batch_stats, name, self.eps)
        except ValueError as e:
            if training and BF._ONE_VALUE in str(e):
                raise ValueError(f"{e}; or build the layer with small_batch='running_stats' to normalize such "
                                 "batches with the running statistics") from None
            raise
        if batch_stats:
            if training and self.track_running_stats:
                if self.accumulate != 1 or self._pending is not None:
                    return self._accumulating_forward(input, weight, bias, running_mean, running_var, name, act,
                                                      residual)
                nbt = self.num_batches_tracked
            else:
                running_mean = running_var = nbt = None
            return BF._batch_norm_checked(input, running_mean, running_var, weight, bias, True, self.momentum,
                                          self.eps, nbt, self.nonfinite, name, act=act, residual=residual)
        return BF._batch_norm_checked(input, running_mean, running_var, weight, bias, False, self.momentum, self.eps,
                                      None, self.nonfinite, name, act=act, residual=residual)

    def _small_batch_forward(self, input, weight, bias, running_mean, running_var, name, act="none",
                             residual=None) -> Tensor:
        """small_batch="running_stats": a one-value training batch, normalized as in eval."""
        if running_mean is None or running_var is None:
            raise ValueError(
                f"{name}: small_batch='running_stats' normalizes a training batch with one value per channel with "
                f"the running statistics, but this layer has none (track_running_stats={self.track_running_stats}); "
                f"got input of shape {tuple(input.shape)}. Use a batch of at least 2, or a layer with running "
                "statistics"
            )
        BF.check_batch_norm_input(input, running_mean, running_var, weight, bias, False, name, self.eps)
        return BF._batch_norm_checked(input, running_mean, running_var, weight, bias, False, self.momentum, self.eps,
                                      None, self.nonfinite, name, act=act, residual=residual)

    # accumulation (accumulate=k)
    @property
    def pending_micro_batches(self) -> int:
        """Training micro-batches seen since the last running-statistics update (``accumulate``)."""
        return 0 if self._pending is None else self._pending.batches

    def _accumulating_forward(self, input, weight, bias, running_mean, running_var, name, act="none",
                              residual=None) -> Tensor:
        window = self._pending if self._pending is not None else PooledStats()
        x = input.detach()
        count = x.numel() // x.shape[1] if x.shape[1] else 0
        mean = var = None
        bad = None
        if count:
            with torch.no_grad():
                mean, var, _ = ref.batch_stats(x)  # float64 (C,): the micro-batch's own statistics
            limit = _limit(running_mean, running_var)
            bad, kinds = bad_channels(mean, var, count, limit)
            if bad and self.nonfinite == "raise":
                self._pending = None
                try:
                    raise_bad_batch(name, bad, kinds, limit, _dtype(running_mean, running_var))
                except NonFiniteBatchError as e:
                    raise NonFiniteBatchError(
                        f"{e} (accumulate={self.accumulate}: micro-batch {window.batches + 1}; the pending "
                        f"accumulation window was discarded, the next micro-batch starts a new one)"
                    ) from None
        y = BF._batch_norm_checked(input, None, None, weight, bias, True, self.momentum, self.eps, None,
                                   self.nonfinite, name, act=act, residual=residual)
        if bad:
            window.mark_bad()
        else:
            window.add(mean, var, count)
        if window.batches >= self.accumulate:
            self._pending = None
            with torch.no_grad():
                window.commit(running_mean, running_var, self.num_batches_tracked, self.momentum, self.nonfinite, name)
        else:
            self._pending = window
        return y

    @torch.no_grad()
    def flush_accumulated(self, discard: bool = False) -> int:
        """Write the pending micro-batches (a partial accumulation window) into the running
        statistics now, as one update with their pooled statistics; ``discard=True`` drops them
        instead. Returns the number of micro-batches written or dropped."""
        window, self._pending = self._pending, None
        if window is None:
            return 0
        if not discard and self.track_running_stats:
            window.commit(self.running_mean, self.running_var, self.num_batches_tracked, self.momentum, self.nonfinite,
                          type(self).__name__)
        return window.batches

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self._pending = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._pending = None  # pending micro-batches belong to the statistics being replaced
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _set_options(layer, nonfinite: str, accumulate: int, small_batch: str) -> None:
    name = type(layer).__name__
    layer.nonfinite = check_nonfinite_option(nonfinite, name)
    layer.accumulate = check_accumulate_option(accumulate, name)
    layer.small_batch = check_small_batch_option(small_batch, name)


class _LazyBatchNorm(_tbn._LazyNormBase):
    """torch's lazy initialization, plus bnlab's ``nonfinite``, ``accumulate`` and ``small_batch``
    keywords."""

    def __init__(self, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None, dtype=None, *,
                 bias=True, nonfinite: str = "raise", accumulate: int = 1, small_batch: str = "error") -> None:
        # torch's lazy base by name: in the subclasses' MRO bnlab's _BatchNorm comes between
        _compat.norm_init(_tbn._LazyNormBase.__init__, self, eps, momentum, affine, track_running_stats, device, dtype,
                          bias=bias)
        _set_options(self, nonfinite, accumulate, small_batch)


def _dim_error(layer: str, expected: str, input: Tensor) -> ValueError:
    return ValueError(f"{layer}: expected {expected} input (got {input.dim()}D input of shape {tuple(input.shape)})")


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    r"""Batch normalization over a 2D or 3D input (Ioffe & Szegedy 2015, arXiv 1502.03167).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    A :class:`torch.nn.BatchNorm1d` (subclass): same constructor, parameters, buffers and state_dict
    keys; forward runs on bnlab's kernels.

    Args:
        num_features: C.
        eps: added to the variance (default 1e-5).
        momentum: running-statistics factor (default 0.1); None for a cumulative average.
            (Keras/Flax ``momentum=0.99`` is ``momentum=0.01`` here.)
        affine: learnable gamma (and beta) (default True).
        track_running_stats: keep running_mean/var (default True).
        bias: keyword; learnable beta when affine (default True).
        nonfinite: keyword; "raise" (default) or "skip" for training batches with nan/inf.
        accumulate: keyword; update the running statistics once per this many training
            micro-batches, with their pooled statistics (default 1: every batch).
        small_batch: keyword; "error" (default, torch's behaviour) or "running_stats": a training
            batch with one value per channel normalizes with the running statistics, updates nothing.

    Shape: input ``(N, C)`` or ``(N, C, L)``; output the same.

    Example:
        >>> import torch, bnlab
        >>> bn = bnlab.nn.BatchNorm1d(4)
        >>> y = bn(torch.randn(16, 4))
        >>> y.shape
        torch.Size([16, 4])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise _dim_error(type(self).__name__, "2D or 3D", input)


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    r"""Batch normalization over a 4D input ``(N, C, H, W)``; see :class:`BatchNorm1d`.

    NCHW and channels_last inputs are both served without layout copies.

    Example:
        >>> import torch, bnlab
        >>> bn = bnlab.nn.BatchNorm2d(3)
        >>> bn(torch.randn(2, 3, 5, 5)).shape
        torch.Size([2, 3, 5, 5])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise _dim_error(type(self).__name__, "4D", input)


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    r"""Batch normalization over a 5D input ``(N, C, D, H, W)``; see :class:`BatchNorm1d`.

    Example:
        >>> import torch, bnlab
        >>> bnlab.nn.BatchNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
        torch.Size([2, 2, 3, 3, 3])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise _dim_error(type(self).__name__, "5D", input)


class LazyBatchNorm1d(_LazyBatchNorm, _BatchNorm, torch.nn.LazyBatchNorm1d):
    """:class:`BatchNorm1d` with ``num_features`` inferred from the first input."""

    cls_to_become = BatchNorm1d

    def _check_input_dim(self, input: Tensor) -> None:
        BatchNorm1d._check_input_dim(self, input)


class LazyBatchNorm2d(_LazyBatchNorm, _BatchNorm, torch.nn.LazyBatchNorm2d):
    """:class:`BatchNorm2d` with ``num_features`` inferred from the first input."""

    cls_to_become = BatchNorm2d

    def _check_input_dim(self, input: Tensor) -> None:
        BatchNorm2d._check_input_dim(self, input)


class LazyBatchNorm3d(_LazyBatchNorm, _BatchNorm, torch.nn.LazyBatchNorm3d):
    """:class:`BatchNorm3d` with ``num_features`` inferred from the first input."""

    cls_to_become = BatchNorm3d

    def _check_input_dim(self, input: Tensor) -> None:
        BatchNorm3d._check_input_dim(self, input)


def _register_fusers() -> None:
    """Make ``torch.ao.quantization.fuse_modules`` fuse bnlab's batch norms as it fuses torch's.

    Its default table is keyed by exact module types, ``(nn.Conv2d, nn.BatchNorm2d)`` and so on; each
    entry naming a torch batch norm gets a twin naming bnlab's class, with the same fuser (the fusers
    read only the layer's parameters, buffers and eps). Private torch API: if it moves, fusion of
    bnlab layers needs ``fuse_custom_config_dict={"additional_fuser_method_mapping": ...}``.
    """
    try:
        from torch.ao.quantization import fuser_method_mappings as fmm
    except ImportError:  # pragma: no cover
        return
    table = getattr(fmm, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if not isinstance(table, dict):  # pragma: no cover
        return
    ours = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d, torch.nn.BatchNorm3d: BatchNorm3d}
    for key, fuser in list(table.items()):
        if isinstance(key, tuple) and any(k in ours for k in key):
            twin = tuple(ours.get(k, k) for k in key)
            table.setdefault(twin, fuser)


_register_fusers()
