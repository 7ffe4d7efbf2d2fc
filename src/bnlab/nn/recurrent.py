"""Recurrent layers with batch normalization applied every way the literature does.

``BNLSTM``, ``BNGRU`` and ``BNRNN`` have torch.nn.LSTM/GRU/RNN's interface and parameter names
(``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, ``weight_hr_l0`` with
``proj_size``, ``..._reverse`` with ``bidirectional=True``; gate order i, f, g, o for the LSTM and
r, z, n for the GRU): with ``norm="none"`` a torch layer's state_dict loads as is and gives the
same numbers. ``norm=`` picks where normalization goes:

* ``"none"``: no normalization. Served by torch's own fused kernels unless ``force_loop=True``.
* ``"vertical"`` (Laurent et al. 2016, arXiv 1510.01378): BN on the input projection
  W_x x_t, statistics over batch and time, in one call on the projection of all steps.
* ``"horizontal"``: vertical, plus BN on W_h h_{t-1} with each step's batch statistics in
  training and one set of population statistics shared by all steps in eval (the naive way).
* ``"per_timestep"`` (Cooijmans et al. 2016, arXiv 1603.09025): BN on W_x x_t, on W_h h_{t-1} and
  (LSTM) on the cell c_t, each with its own statistics per time step in training and in eval,
  gamma initialized to 0.1 (``gamma_init``). Past the longest training length, eval reuses the
  last trained step's statistics (:class:`bnlab.nn.SequenceBatchNorm`).
* ``"layer"`` (Ba et al. 2016, arXiv 1607.06450): LayerNorm in the per_timestep places. The
  input path is left alone when the input has fewer than 8 features (LayerNorm of 1 value keeps
  only its sign).

Equations (LSTM; N_x, N_h, N_c are the chosen norms, identity when absent; b = b_ih + b_hh):

    [i, f, o, g] = N_h(W_h h_{t-1}) + N_x(W_x x_t) + b
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(N_c(c_t))            (times W_hr with proj_size)

GRU: r, z = sigmoid(N_x(W_x x)_{rz} + b_ih + N_h(W_h h)_{rz} + b_hh),
n = tanh(N_x(W_x x)_n + b_ih,n + r * (N_h(W_h h)_n + b_hh,n)), h_t = (1 - z) n + z h_{t-1}.
RNN: h_t = tanh(N_x(W_x x_t) + b_ih + N_h(W_h h_{t-1}) + b_hh).

The normalization parameters and statistics of the LSTM's gate pre-activations (``norm_ih``,
``norm_hh``) are stored in the gate order (i, f, o, g). Weights keep torch's order.

Bidirectional layers have their own norms per direction (``norm_hh_l0_reverse``...), so per-step
statistics are per direction; both directions key them by the time step t (the reverse direction
runs t = T-1 .. 0), and with variable lengths the rows at step t are the sequences longer than t
in both.

Variable lengths: ``lengths`` (or a PackedSequence) run the recurrence on the packed layout, as
torch does: at step t only the sequences still running are computed, so padded steps never
enter any statistic, running statistic or output (outputs past a sequence's end are 0, h_n/c_n
are each sequence's state at its last step; the reverse direction starts each sequence at its
last valid step).

Running statistics: every batch norm's statistics of one forward are collected and written once
the forward has run, through :func:`bnlab.policy.update_buffers`, after all of them have been
checked (:func:`bnlab.nn.masked.commit_stats`): a nan/inf at any step raises
:class:`bnlab.policy.NonFiniteBatchError` (``nonfinite="raise"``, the layer attribute) or skips
the update (``"skip"``), and no buffer of any step moves.

Speed (CPU float32/float64; the paths are tested against each other):

* ``"none"``: torch's fused kernel (``torch.lstm``/``gru``/``rnn_*``).
* ``"vertical"``: the normalized input projection is affine in x: with s = gamma / sqrt(var + eps),
  BN(W x)_j = s_j w_j . (x - mu) + beta_j. The layer runs torch's fused kernel (oneDNN's LSTM on
  CPU) on the centred input with the folded weights ``s W``, one layer at a time; the statistics
  of W x come from the input's float64 mean mu and covariance Sigma (mean = W mu, var =
  diag(W Sigma W^T); from W x itself when the input is wider than 1.5 times the gates), and the
  fold has a hand-derived backward (:class:`_FoldFn`; compiled on CPU), so the gradient is batch
  norm's own. Its float32 gradient is as accurate as torch's batch norm (the projections of
  batch norm's backward are applied after torch's float32 matmul, not before). A layer above the
  first reads the output below in torch's time-major memory (the statistics do not depend on the
  rows' order: no copy), and a first layer whose input needs no gradient skips the rows' gradient.
* ``"horizontal"``, ``"per_timestep"``, ``"layer"``: one compiled call per layer and direction
  runs the whole time loop (:mod:`bnlab.nn._recurrent_kernels`: the recurrent matmul in a
  register-blocked micro-kernel, the norms, the gates; backward through time hand-derived), inside
  one autograd node. The input projection of all steps is one product before it, on the same
  micro-kernel (:mod:`bnlab.nn._projection`). Horizontal's input norm (and vertical's on this
  path) is folded into W_ih as vertical's is (:class:`_FoldCpuFn`) when the input is narrow
  (features < gates / 4: its covariance costs less than passes over the projection), else it is
  one call of bnlab's batch-norm kernels over every row of every step of the projection.
* ``force_loop=True``, ``record_hidden``, forward-mode AD / ``torch.func``, other devices and dtypes:
  the reference time loop in torch ops (per-step :class:`bnlab.nn.SequenceBatchNorm` and
  LayerNorm modules), which autograd differentiates in every mode.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module, Parameter
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import kernels as _kernels
from ..kernels import cpu as _cpu
from .. import reference as _ref
from . import _buffers
from . import _recurrent_kernels as _rk
from ._projection import project as _project
from .masked import SequenceBatchNorm, StatsUpdate, collect_stats, commit_stats

__all__ = ["BNLSTM", "BNGRU", "BNRNN", "BNLSTMCell", "BNGRUCell", "BNRNNCell", "NORM_MODES"]

NORM_MODES = ("none", "vertical", "horizontal", "per_timestep", "layer")
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_CELL = {"LSTM": _rk.LSTM, "GRU": _rk.GRU, "RNN_TANH": _rk.RNN_TANH, "RNN_RELU": _rk.RNN_RELU}
_TORCH_OP = {"LSTM": torch.lstm, "GRU": torch.gru, "RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu}
_TORCH_CELL = {"GRU": torch.gru_cell, "RNN_TANH": torch.rnn_tanh_cell, "RNN_RELU": torch.rnn_relu_cell}
_MIN_LAYERNORM_INPUT = 8
_FUSED_DTYPES = (torch.float32, torch.float64)

#: why torch.compile runs the layers eagerly (dynamo shows it where it cannot, e.g. fullgraph=True)
_EAGER_UNDER_COMPILE = (
    "bnlab's BNLSTM / BNGRU / BNRNN run eagerly under torch.compile, at a graph break, as torch's own "
    "nn.LSTM / GRU / RNN do: their time loop is one compiled kernel call per layer and direction, "
    "which dynamo cannot trace (tracing the torch-ops reference loop instead unrolls every step: minutes "
    "of compilation and a slower step). Set torch._dynamo.config.allow_rnn = True to trace that loop "
    "instead (an eval model then compiles with fullgraph=True; training still breaks the graph where the "
    "running statistics are checked and written); torch.export always traces it"
)


def _traces_loop() -> bool:
    """Whether a compiler tracing the layer gets its torch-ops time loop: under torch.export (one
    whole graph), or with ``torch._dynamo.config.allow_rnn`` set (the switch torch's own recurrent
    layers follow). Otherwise torch.compile runs the layer eagerly (:func:`_run_eagerly`)."""
    if _kernels._is_exporting():
        return True
    from torch._dynamo import config as dynamo_config

    return bool(getattr(dynamo_config, "allow_rnn", True))


def _forward_eagerly(module, input, hx, lengths):
    return module._forward(input, hx, lengths)


_run_eagerly = torch.compiler.disable(_forward_eagerly, reason=_EAGER_UNDER_COMPILE)


class _RowLayerNorm(torch.nn.LayerNorm):
    """LayerNorm with the per-step call signature of SequenceBatchNorm (the step is ignored)."""

    def __init__(self, n: int, bias: bool, gamma_init: float, **fk) -> None:
        self.gamma_init = gamma_init  # read by reset_parameters, which LayerNorm's __init__ calls
        super().__init__(n, bias=bias, **fk)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.weight.fill_(self.gamma_init)

    def forward(self, x: Tensor, step: int = 0, offset: Tensor | None = None) -> Tensor:
        shift = self.bias if offset is None else (offset if self.bias is None else self.bias + offset)
        return F.layer_norm(x, self.normalized_shape, self.weight, shift, self.eps)

    def forward_steps(self, x: Tensor, offset: Tensor | None = None) -> Tensor:
        return self.forward(x, 0, offset)  # rowwise: all steps at once is the same call


def _make_norms(mode: str, input_size: int, hidden_size: int, norm: str, gamma_init: float | None,
                momentum: float | None, eps: float, max_steps: int, fk: dict) -> dict:
    """The norms of one layer: {"ih": ..., "hh": ..., "c": ...} (None where absent)."""
    g = _GATES[mode] * hidden_size
    gamma = (0.1 if norm == "per_timestep" else 1.0) if gamma_init is None else float(gamma_init)
    out = {"ih": None, "hh": None, "c": None}

    def bn(n, per_step, bias):
        return SequenceBatchNorm(n, per_step=per_step, max_steps=max_steps, eps=eps, momentum=momentum,
                                 bias=bias, gamma_init=gamma, **fk)

    if norm in ("vertical", "horizontal"):
        out["ih"] = bn(g, False, False)
        if norm == "horizontal":
            out["hh"] = bn(g, False, False)
    elif norm == "per_timestep":
        out["ih"], out["hh"] = bn(g, True, False), bn(g, True, False)
        if mode == "LSTM":
            out["c"] = bn(hidden_size, True, True)
    elif norm == "layer":
        if input_size >= _MIN_LAYERNORM_INPUT:
            out["ih"] = _RowLayerNorm(g, False, gamma, eps=eps, **fk)
        out["hh"] = _RowLayerNorm(g, False, gamma, eps=eps, **fk)
        if mode == "LSTM":
            out["c"] = _RowLayerNorm(hidden_size, True, gamma, eps=eps, **fk)
    return out


@functools.lru_cache(maxsize=64)
def _perm_cached(hidden_size: int, device) -> Tensor:
    h = hidden_size
    return torch.cat([torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h)]).to(device)


@functools.lru_cache(maxsize=256)
def _member_names(kind: str, l: int, d: int) -> tuple[str, ...]:
    """The attribute names of layer l, direction d: its weights (w_ih, w_hh, b_ih, b_hh, w_hr) or its
    norms (ih, hh, c)."""
    s = f"l{l}" + ("_reverse" if d else "")
    if kind == "weight":
        return (f"weight_ih_{s}", f"weight_hh_{s}", f"bias_ih_{s}", f"bias_hh_{s}", f"weight_hr_{s}")
    return (f"norm_ih_{s}", f"norm_hh_{s}", f"norm_c_{s}")


def _cached(fn):
    """``fn`` (an lru_cache) or, while dynamo traces, the function it wraps: dynamo ignores the cache
    and warns of it at every trace."""
    return fn.__wrapped__ if torch.compiler.is_compiling() else fn


@functools.lru_cache(maxsize=64)
def _lstm_perm_np(hidden_size: int) -> np.ndarray:
    """:func:`_lstm_perm` as a read-only int64 ndarray (the fused calls permute in numpy)."""
    p = _perm_cached(hidden_size, torch.device("cpu")).numpy().copy()
    p.flags.writeable = False
    return p


def _lstm_perm(hidden_size: int, device=None) -> Tensor:
    """Row order (i, f, o, g) from torch's (i, f, g, o); its own inverse (cached: do not modify)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return _cached(_perm_cached)(hidden_size, dev)


# ---------------------------------------------------------------------------------------------
# The reference time loops (torch ops). steps: (t, x_t, b_t) in the order the steps run (t = T-1 .. 0
# for the reverse direction), x_t the step's input projection (b_t, G), b_t non-increasing in t
# (packed layout); h0, c0: (B, *) initial states. Returns (outputs in run order, h_n, c_n).
# ---------------------------------------------------------------------------------------------

def _resize(b, h, c, h0, c0, done_h, done_c):
    """The state's rows for a step with ``b`` rows: sequences that ended hand their final state to
    ``done``; sequences that start here (reverse direction) start from ``h0``/``c0``."""
    n = h.shape[0]
    if b < n:
        done_h.append(h[b:])
        h = h[:b]
        if c is not None:
            done_c.append(c[b:])
            c = c[:b]
    elif b > n:
        h = torch.cat([h, h0[n:b]])
        if c is not None:
            c = torch.cat([c, c0[n:b]])
    return h, c


def _finals(h, done):
    return torch.cat([h] + done[::-1]) if done else h  # rows 0..B-1 in packed (sorted) order


def _start(h0, c0, rev):
    return (h0[:0], None if c0 is None else c0[:0]) if rev else (h0, c0)


def _lstm_loop(steps, h0, c0, w_hh_t, w_hr_t, nh, nc, nx, bias, rev):
    H = c0.shape[1]
    h, c = _start(h0, c0, rev)
    outs, done_h, done_c = [], [], []
    split = [3 * H, H]
    for t, xt, b in steps:
        h, c = _resize(b, h, c, h0, c0, done_h, done_c)
        if nx is not None:
            xt = nx(xt, t, bias)
        g = torch.addmm(xt, h, w_hh_t) if nh is None else xt + nh(torch.mm(h, w_hh_t), t)
        s, u = g.split(split, 1)
        i, f, o = torch.sigmoid(s).chunk(3, 1)
        c = torch.addcmul(f * c, i, torch.tanh(u))
        h = o * torch.tanh(c if nc is None else nc(c, t))
        if w_hr_t is not None:
            h = torch.mm(h, w_hr_t)
        outs.append(h)
    return outs, _finals(h, done_h), _finals(c, done_c)


def _gru_loop(steps, h0, w_hh_t, b_hh, nh, nx, b_ih, rev):
    H = h0.shape[1]
    h, _ = _start(h0, None, rev)
    outs, done_h = [], []
    split = [2 * H, H]
    for t, xt, b in steps:
        h, _ = _resize(b, h, None, h0, None, done_h, None)
        if nx is not None:
            xt = nx(xt, t, b_ih)
        if nh is None:
            gh = torch.mm(h, w_hh_t) if b_hh is None else torch.addmm(b_hh, h, w_hh_t)
        else:
            gh = nh(torch.mm(h, w_hh_t), t)
            gh = gh if b_hh is None else gh + b_hh
        xi_rz, xi_n = xt.split(split, 1)
        gh_rz, gh_n = gh.split(split, 1)
        r, z = torch.sigmoid(xi_rz + gh_rz).chunk(2, 1)
        n = torch.tanh(torch.addcmul(xi_n, r, gh_n))
        h = torch.addcmul(n, z, h - n)
        outs.append(h)
    return outs, _finals(h, done_h), None


def _rnn_loop(steps, h0, w_hh_t, nh, nx, bias, act, rev):
    h, _ = _start(h0, None, rev)
    outs, done_h = [], []
    for t, xt, b in steps:
        h, _ = _resize(b, h, None, h0, None, done_h, None)
        if nx is not None:
            xt = nx(xt, t, bias)
        h = act(torch.addmm(xt, h, w_hh_t) if nh is None else xt + nh(torch.mm(h, w_hh_t), t))
        outs.append(h)
    return outs, _finals(h, done_h), None


# ---------------------------------------------------------------------------------------------
# The folded input norm (vertical BN of W_ih x over every valid row of every step)
# ---------------------------------------------------------------------------------------------

class _FoldFn(torch.autograd.Function):
    """Training-mode fold of the vertical input norm of D directions sharing one input.

    ``BN(W x)_j = s_j w_j . (x - mu) + beta_j`` with mu the rows' mean and ``s = gamma / sqrt(v + eps)``,
    ``v = diag(W S W^T)`` the variance of W x (S the rows' biased covariance). Forward (statistics in
    float64): outputs the centred rows ``x - mu`` (the recurrent kernel's input: its matmul and the
    weight gradient then carry no large common offset), per direction ``W' = s W`` and ``shift =
    beta + s W (mu_rounded - mu)`` (the centring's rounding, folded back), in the data dtype, and the
    statistics ``(W mu, v)`` (not differentiable). Backward by hand: ``ds = rowsum(dW' * W)``,
    ``dv = -ds gamma / (2 (v + eps)^1.5)``, ``dW = s dW' + 2 dv (W S)``, and for the rows
    ``dX = dXc - mean(dXc) + 2 (x - mu) dS / N`` with ``dS = sum_d W^T diag(dv) W``.
    """

    @staticmethod
    def forward(ctx, eps, rows, *wgb):
        dt = rows.dtype
        n, F = rows.shape
        if rows.is_cpu and dt in _FUSED_DTYPES:  # one compiled pass (float64 sums, upper triangle)
            r = rows.detach().contiguous()
            mu, sigma = torch.empty(F, dtype=torch.float64), torch.empty(F, F, dtype=torch.float64)
            mu_r, xc = torch.empty(F, dtype=dt), torch.empty_like(r)
            _rk.moments(r.numpy(), mu.numpy(), mu_r.numpy(), sigma.numpy(), xc.numpy())
        else:
            xd = rows.detach().to(torch.float64)
            mu = xd.mean(0)
            xc64 = xd - mu
            sigma = (xc64.t() @ xc64) / n
            mu_r = mu.to(dt)
            xc = rows.detach() - mu_r
        delta = mu_r.to(torch.float64) - mu  # the rounding of the centring, folded into the shift
        outs, saved, stats = [xc], [xc, sigma], []
        for k in range(0, len(wgb), 3):
            w, gamma, beta = wgb[k:k + 3]
            wd = w.detach().to(torch.float64)
            ws = wd @ sigma
            var = (ws * wd).sum(1).clamp_min(0)
            inv = torch.rsqrt(var + eps)
            s = inv if gamma is None else inv * gamma.detach().to(torch.float64)
            shift = s * (wd @ delta)
            if beta is not None:
                shift = shift + beta.detach().to(torch.float64)
            mean = wd @ mu
            outs += [(s[:, None] * wd).to(w.dtype), shift.to(w.dtype), mean, var]
            saved += [wd, ws, inv, s]
            stats += [mean, var]
        ctx.mark_non_differentiable(*stats, *([] if ctx.needs_input_grad[1] else [xc]))
        ctx.dirs = len(wgb) // 3
        ctx.has = [(wgb[k + 1] is not None, wgb[k + 2] is not None) for k in range(0, len(wgb), 3)]
        ctx.dtypes = [wgb[k].dtype for k in range(0, len(wgb), 3)]
        ctx.gammas = [None if wgb[k + 1] is None else wgb[k + 1].detach().to(torch.float64)
                      for k in range(0, len(wgb), 3)]
        ctx.save_for_backward(*saved)
        return tuple(outs)

    @staticmethod
    def backward(ctx, dxc, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "vertical batch norm (folded into the recurrent kernel's input weights) has a first-order backward "
                "only (create_graph=True asks for a graph of it). Build the layer with force_loop=True, whose "
                "torch-ops time loop autograd differentiates to any order."
            )
        xc, sigma, *saved = ctx.saved_tensors
        n = xc.shape[0]
        ds_total = torch.zeros_like(sigma)
        result = []
        for d in range(ctx.dirs):
            wd, ws, inv, s = saved[4 * d:4 * d + 4]
            dwf, dshift = grads[4 * d], grads[4 * d + 1]
            has_g, has_b = ctx.has[d]
            dt = ctx.dtypes[d]
            if dwf is None:
                dw = torch.zeros_like(wd)
                dscale = torch.zeros_like(inv)
            else:
                dwf = dwf.to(torch.float64)
                dscale = (dwf * wd).sum(1)  # s enters W' = s W (its part in the shift is rounding)
                gamma = ctx.gammas[d]
                dvar = -0.5 * (dscale if gamma is None else dscale * gamma) * inv ** 3
                dw = s[:, None] * dwf + 2.0 * dvar[:, None] * ws
                ds_total += wd.t() @ (dvar[:, None] * wd)
            db = None
            if has_b and dshift is not None:
                db = dshift.to(dt)
            result += [dw.to(dt), (dscale * inv).to(dt) if has_g else None, db]
        if not ctx.needs_input_grad[1]:
            return (None, None, *result)
        dt = xc.dtype
        dxc = torch.zeros_like(xc) if dxc is None else dxc
        drows = torch.addmm(dxc - dxc.mean(0), xc, ((2.0 / n) * ds_total).to(dt))
        return (None, drows, *result)


class _FoldCpuFn(torch.autograd.Function):
    """:class:`_FoldFn` on CPU float32/float64, its forward and backward in compiled code
    (:func:`bnlab.nn._recurrent_kernels.fold_direction` and friends): the same formulas, a few
    kernel calls instead of some forty small torch ops per layer.

    ``apply(eps, perm, sink, rows, w_0, gamma_0, beta_0, ...)``: gamma and beta in the norm's own
    channel order, ``perm`` (an int ndarray or None) the rows of W in that order (the LSTM's gate
    order differs from the norm's), applied here rather than as autograd index ops. Returns ``(xc,
    W'_0, shift_0, ...)``; the statistics of W x (float64 ndarrays, the norm's order) go to the list
    ``sink`` as ``(mean, var)`` per direction: not outputs, so they cost no autograd bookkeeping."""

    @staticmethod
    def forward(ctx, eps, perm, sink, rows, *wgb):
        dt = rows.dtype
        F = rows.shape[1]
        r = rows.detach().contiguous()
        mu, sigma, mu_r = np.empty(F), np.empty((F, F)), np.empty(F, _np_dtype(dt))
        xc = torch.empty_like(r)
        _rk.moments(r.numpy(), mu, mu_r, sigma, xc.numpy())
        outs, saved = [xc], []
        for k in range(0, len(wgb), 3):
            w, gamma, beta = wgb[k:k + 3]
            G = w.shape[0]
            g64 = np.ones(G) if gamma is None else _np(gamma)
            b64 = np.zeros(G) if beta is None else _np(beta)
            if perm is not None:
                g64, b64 = g64[perm], b64[perm]
            wd, ws = np.empty((G, F)), np.empty((G, F))
            wf, shift = torch.empty(G, F, dtype=w.dtype), torch.empty(G, dtype=w.dtype)
            st = np.empty((4, G))  # mean, var, invstd and scale of W x, in W's row order
            _rk.fold_direction(w.detach().contiguous().numpy(), g64, b64, eps, sigma, mu, mu_r, wd, ws,
                               wf.numpy(), shift.numpy(), st[0], st[1], st[2], st[3])
            outs += [wf, shift]
            sink.append((st[0], st[1]) if perm is None else (_unpermute(st[0], perm), _unpermute(st[1], perm)))
            saved.append((wd, ws, st[2], st[3], g64, w.dtype, gamma is not None, beta is not None))
        if not ctx.needs_input_grad[3]:
            # rows that need no gradient (a first layer's input): the centred rows are a constant
            # too, so the recurrent kernel's backward and this one skip their gradient
            ctx.mark_non_differentiable(xc)
        ctx.perm = perm
        ctx.saved = saved
        ctx.save_for_backward(xc)
        return tuple(outs)

    @staticmethod
    def backward(ctx, dxc, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "vertical batch norm (folded into the recurrent kernel's input weights) has a first-order backward "
                "only (create_graph=True asks for a graph of it). Build the layer with force_loop=True, whose "
                "torch-ops time loop autograd differentiates to any order."
            )
        (xc,) = ctx.saved_tensors
        n, F = xc.shape
        need_rows = ctx.needs_input_grad[3]
        perm = ctx.perm
        M = np.zeros((F, F))
        result = []
        for d, (wd, ws, inv, s, g64, wdt, has_g, has_b) in enumerate(ctx.saved):
            dwf, dshift = grads[2 * d], grads[2 * d + 1]
            G = wd.shape[0]
            dw = torch.zeros(G, F, dtype=wdt)
            dscale = np.zeros(G)
            if dwf is not None:
                _rk.fold_direction_backward(dwf.detach().contiguous().numpy(), wd, ws, inv, s, g64, dw.numpy(),
                                            dscale, np.empty((G, F)), M)
            dgamma = dbeta = None
            if has_g:
                dgamma = torch.from_numpy(_unpermute(dscale * inv, perm)).to(wdt)
            if has_b and dshift is not None:
                dbeta = dshift.detach().to(wdt) if perm is None else \
                    torch.from_numpy(_unpermute(dshift.detach().numpy(), perm)).to(wdt)
            result += [dw, dgamma, dbeta]
        if not need_rows:
            return (None, None, None, None, *result)
        dxc = torch.zeros_like(xc) if dxc is None else dxc.detach().contiguous()
        drows = torch.empty_like(xc)
        _rk.fold_rows_backward(dxc.numpy(), xc.numpy(), M, np.empty((F, F), dtype=_np_dtype(xc.dtype)), drows.numpy())
        return (None, None, None, drows, *result)


def _unpermute(a: np.ndarray, perm: np.ndarray | None) -> np.ndarray:
    """``a`` in W's row order back in the norm's channel order (``out[perm] = a``)."""
    if perm is None:
        return a
    out = np.empty_like(a)
    out[perm] = a
    return out


def _np_dtype(dt: torch.dtype):
    return np.float32 if dt == torch.float32 else np.float64


def _fold_layer(norms, weights, rows: Tensor, perm: Tensor | None, updates: list):
    """The vertical input norm of every direction of one layer, ``BN(X W_d^T)`` (one batch norm
    over every row: batch and time), as ``X' (s_d W_d)^T + shift_d``: returns ``(X', [(s_d W_d,
    shift_d)])``, X' the rows the recurrent kernel reads (in training the centred rows, in eval the
    rows themselves), the weights in their own gate order and dtype, all differentiable. Training
    batch statistics go to ``updates``."""
    n, F = rows.shape
    G = weights[0].shape[0]

    def affine(norm):
        gamma, beta = norm.weight, norm.bias
        if perm is not None:
            gamma = gamma[perm] if gamma is not None else None
            beta = beta[perm] if beta is not None else None
        return gamma, beta

    def record(norm, mean, var):
        md, vd = mean.detach(), var.detach()
        if perm is not None:
            md, vd = md[perm], vd[perm]
        updates.append(StatsUpdate(norm, [0], md.cpu()[None], vd.cpu()[None], [n]))

    out = []
    training = norms[0].training and n >= 2
    if training and F <= 1.5 * G:  # statistics from the input's covariance
        cpu = rows.is_cpu and rows.dtype in _FUSED_DTYPES and all(w.is_cpu and w.dtype == rows.dtype for w in weights)
        if cpu:
            args, sink = [], []
            for norm, w in zip(norms, weights):
                args += [w, norm.weight, norm.bias]
            res = _FoldCpuFn.apply(norms[0].eps, None if perm is None else perm.numpy(), sink, rows, *args)
            for d, norm in enumerate(norms):
                mean, var = sink[d]
                updates.append(StatsUpdate(norm, [0], torch.from_numpy(mean)[None], torch.from_numpy(var)[None], [n]))
                out.append((res[1 + 2 * d], res[2 + 2 * d]))
            return res[0], out
        args = []
        for norm, w in zip(norms, weights):
            args += [w, *affine(norm)]
        res = _FoldFn.apply(norms[0].eps, rows, *args)
        for d, norm in enumerate(norms):
            wf, shift, mean, var = res[1 + 4 * d:5 + 4 * d]
            record(norm, mean, var)
            out.append((wf, shift))
        return res[0], out
    if training:  # a wide input: the statistics of W x itself, on centred rows
        mu = rows.detach().to(torch.float64).mean(0)
        rows = rows - rows.to(torch.float64).mean(0).to(rows.dtype)
        mu_r = mu - rows.detach().to(torch.float64).mean(0)  # what was subtracted, float64
    for norm, w in zip(norms, weights):
        gamma, beta = affine(norm)
        wd = w.to(torch.float64)
        if training:
            var, mean = torch.var_mean((rows @ w.t()).to(torch.float64), 0, correction=0)  # of W (x - mu_r)
            record(norm, mean + wd.detach() @ mu_r, var)
            inv = torch.rsqrt(var + norm.eps)
        else:
            m, inv = norm.fixed_stats(1)
            mean, inv = m[0].to(w.device), inv[0].to(w.device)
            if perm is not None:
                mean, inv = mean[perm], inv[perm]
        s = inv if gamma is None else inv * gamma.to(torch.float64)
        shift = -s * mean
        if beta is not None:
            shift = shift + beta.to(torch.float64)
        out.append(((s[:, None] * wd).to(w.dtype), shift.to(w.dtype)))
    return rows, out


def _vertical_bn(norm: SequenceBatchNorm, p: Tensor, shift: Tensor | None, perm: Tensor | None, updates: list,
                 name: str) -> Tensor:
    """``norm`` over every row of ``p`` ``(N, G)`` (batch and time) with bnlab's kernels, plus
    ``shift``; in training the batch statistics go to ``updates`` (through float64 scratch buffers
    the kernel's policy writes with momentum 1: no buffer of the layer moves before the commit)."""
    gamma, beta = norm.weight, norm.bias
    if perm is not None:
        gamma = gamma[perm] if gamma is not None else None
        beta = beta[perm] if beta is not None else None
    if beta is not None:
        shift = beta if shift is None else shift + beta
    n, G = p.shape
    if not (norm.training and n >= 2):
        m, inv = norm.fixed_stats(1)
        mean, var = m[0], inv[0].pow(-2) - norm.eps
        if perm is not None:
            mean, var = mean[perm], var[perm]
        return _kernels.batch_norm_eval(p, mean.to(p), var.to(p), gamma, shift, norm.eps)
    sm = torch.zeros(G, dtype=torch.float64)
    sv = torch.ones(G, dtype=torch.float64)
    sn = torch.zeros((), dtype=torch.long)
    # the output and its gradient (N x G, a few MB a step) from the fused layers' buffer pool: fresh
    # memory the allocator hands out costs a page fault each 4 KiB
    y = _kernels.batch_norm_train(p, gamma, shift, sm, sv, sn, 1.0, norm.eps, "skip", name, alloc=_buffers.empty)
    if int(sn):  # written: mean and the unbiased variance of the batch
        mean, var = sm, sv * ((n - 1) / n)
    else:  # refused as non-finite: the statistics for the commit's check and message
        mean, var, _ = _ref.batch_stats(p.detach())
    if perm is not None:
        mean, var = mean[perm], var[perm]
    updates.append(StatsUpdate(norm, [0], mean[None], var[None], [n]))
    return y


# ---------------------------------------------------------------------------------------------
# The fused time loop (one autograd node per layer and direction)
# ---------------------------------------------------------------------------------------------

class _Site:
    """One normalization site of the fused kernel: per-step kinds and what they need."""

    __slots__ = ("kinds", "fixed", "eps", "norm", "shared", "perm")

    def __init__(self, kinds, fixed=None, eps=0.0, norm=None, shared=False, perm=None) -> None:
        self.kinds, self.fixed, self.eps, self.norm, self.shared, self.perm = kinds, fixed, eps, norm, shared, perm


class _FusedSpec:
    """Everything about one fused call that is not a differentiable input."""

    __slots__ = ("cell", "rev", "H", "P", "G", "B", "bs", "off", "xrow0", "xrows", "orow0", "orows",
                 "out_shape", "sites", "stats", "name", "grad_norms", "gperm")


_EMPTY2 = {dt: np.empty((0, 0), dt) for dt in (np.float32, np.float64)}


def _np(t: Tensor | None, dtype=np.float64, n: int = 0) -> np.ndarray:
    if t is None:
        return np.zeros(n, dtype)
    return t.detach().to("cpu", torch.float64 if dtype is np.float64 else t.dtype).contiguous().numpy()


def _np_perm(t: Tensor | None, perm: np.ndarray | None) -> np.ndarray | None:
    """``t`` as float64 numpy, its channels in ``perm``'s order (None: as they are); None for None."""
    if t is None:
        return None
    a = _np(t)
    return a[perm] if perm is not None else a


def _site_arrays(site: _Site, gamma: np.ndarray | None, beta: np.ndarray | None, N: int, T: int, C: int, dt,
                 raw: bool = False):
    """The kernel's tuple for one site (``gamma``, ``beta``: float64, in the kernel's channel order, or
    None); ``raw``: the site's input needs storage of its own (the recurrent matmul's output; the
    input projection and the cell state are kept anyway)."""
    k = site.kinds
    has = {kind: bool((k == kind).any()) for kind in (_rk.BATCH, _rk.FIXED, _rk.ROW)}
    gamma = np.ones(C) if gamma is None else gamma
    beta = np.zeros(C) if beta is None else beta
    if has[_rk.FIXED]:
        fm, fi = site.fixed
    else:
        fm = fi = np.empty((0, C))
    normed = has[_rk.BATCH] or has[_rk.FIXED] or has[_rk.ROW]
    hraw = _buffers.empty_np((N if normed and raw else 0, C), dt)
    inv = np.empty((T if has[_rk.BATCH] else 0, C))
    rinv = np.empty(N if has[_rk.ROW] else 0)
    mean = np.empty((T if has[_rk.BATCH] else 0, C))
    var = np.empty_like(mean)
    rmean = np.empty_like(rinv)
    return (k, gamma, beta, fm, fi, float(site.eps), hraw, inv, rinv, mean, var, rmean)


def _VERTICAL_FUSED(mode: str, packed: bool) -> bool:
    """Whether norm="vertical" runs the fused time loop (the input norm one batch norm before it)
    rather than torch's kernel with the norm folded into the input weights: measured faster for
    the GRU and the Elman RNN (torch's CPU kernels for them are plain ATen loops) and for variable
    lengths (torch's packed LSTM is too); torch's LSTM on equal lengths is oneDNN's."""
    return mode != "LSTM" or packed


#: the recurrent matmul's multiply-adds per step (B * G * P) from which a fused call is split over threads
_PARALLEL_FROM = 1 << 18


def _stat_block(B: int) -> int:
    """Rows per block of a fused call with batch statistics: one block for each thread of numba's
    pool (the most a call can have), at least four rows a block, rounded up to whole groups of four
    rows (the matmul micro-kernel's). Set by the batch size and the machine, never by
    ``torch.set_num_threads``: the statistics' bits do not depend on the thread count. (One block
    a thread: on 2 threads, 64 rows in 2 blocks ran the horizontal LSTM's step 4-7% faster than in 4.)"""
    n = max(1, min(_cpu._MAX_THREADS, B // 4))
    return -(-(-(-B // n)) // 4) * 4


def _meets(nt: int) -> bool:
    """Whether ``nt`` threads may meet at a spin barrier inside one launch: numba's threading layer
    runs each iteration of a ``prange(nt)`` on its own thread at once (OpenMP's static schedule,
    the workqueue's one chunk a worker; TBB's tasks make no such promise) and the pool gives the
    launch ``nt`` threads (no ``OMP_THREAD_LIMIT`` or nested region capping it)."""
    if _rk.team_size(nt) < nt:
        return False
    return numba.threading_layer() in ("omp", "workqueue")


def _split(spec, dt) -> tuple[int, int]:
    """``(threads, RB)`` of one fused call (:func:`bnlab.nn._recurrent_kernels.forward`): the
    threads :func:`bnlab.kernels.cpu.threads` allows (1 below :data:`_PARALLEL_FROM`), each running
    the whole loop on its blocks of ``RB`` rows (the recurrence couples no rows). With batch
    statistics the blocks are :func:`_stat_block`'s and the threads meet at each step's statistics
    (partial sums per block, combined in block order), at most one thread per block, and only on a
    pool that runs the threads at once (:func:`_meets`)."""
    batch = False
    for site in spec.sites:
        batch = batch or bool((site.kinds == _rk.BATCH).any())
    B, P, G = spec.B, spec.P, spec.G
    nt = _cpu.threads()
    if nt > 1 and B * G * P < _PARALLEL_FROM:
        nt = 1
    if batch:
        RB = _stat_block(B)
        nt = min(nt, -(-B // RB))
        if nt > 1 and not _meets(nt):
            nt = 1
        return nt, RB
    nt = min(nt, -(-B // 4))
    if nt == 1:
        return 1, B
    return nt, max(4, -(-B // (8 * nt)) * 4)  # about two blocks of rows per thread


class _FusedRecurrence(torch.autograd.Function):
    """One layer and direction over all steps: :func:`bnlab.nn._recurrent_kernels.forward` and its
    hand-derived backward through time."""

    @staticmethod
    def forward(ctx, spec, xp, h0, c0, w_hh, w_hr, b_hh, gx, gh, gc, bc, b1, b2, nbx, shift):
        # gx, gh, nbx: the input and recurrent norms' gamma and the input norm's beta in the norms'
        # channel order (spec.gperm, its own inverse, takes them to the kernel's gate order); the input
        # site's shift is (b1 + b2) + nbx, or + shift (the folded norm's, in gate order), summed here in
        # the parameters' dtype as autograd's adds would, then taken to float64
        dt = np.float32 if xp.dtype == torch.float32 else np.float64
        H, P, G, B = spec.H, spec.P, spec.G, spec.B
        T, N = len(spec.bs), int(spec.off[-1])
        lstm, gru, proj = spec.cell == _rk.LSTM, spec.cell == _rk.GRU, spec.P != spec.H
        perm = spec.gperm
        bx = None
        for t, p in ((b1, None), (b2, None), (nbx, perm), (shift, None)):
            if t is not None:
                a = t.detach().cpu().numpy()
                a = a[p] if p is not None else a
                bx = a if bx is None else bx + a
        sx = _site_arrays(spec.sites[0], _np_perm(gx, perm), None if bx is None else bx.astype(np.float64), N, T, G,
                          dt)
        sh = _site_arrays(spec.sites[1], _np_perm(gh, perm), None, N, T, G, dt, raw=True)
        sc = _site_arrays(spec.sites[2], None if gc is None else _np(gc), None if bc is None else _np(bc),
                          N if lstm else 0, T, H, dt)
        out = _buffers.empty(spec.out_shape, xp.dtype)
        hn = torch.empty(B, P, dtype=xp.dtype)
        cn = torch.empty(B, H if lstm else 0, dtype=xp.dtype)
        e = _EMPTY2[dt]
        # saved for the backward, a few MB a step: from the buffer pool (fresh memory faults a page at a time)
        pool = _buffers.empty_np
        gates = pool((N, G), dt)
        cst = pool((N, H), dt) if lstm else e
        tcs = pool((N, H), dt) if lstm else e
        mst = pool((N, H), dt) if proj else e
        hprev = pool((N, P), dt)
        cprev = pool((N, H), dt) if lstm else e
        ghn = pool((N, H), dt) if gru else e
        c0n = _np(c0, dt) if lstm else e
        nt, RB = _split(spec, dt)
        _rk.forward(nt, RB, spec.cell, int(spec.rev), H, P, spec.bs, spec.off,
                    xp.detach().view(-1, G).numpy(), spec.xrow0, spec.xrows, _np(h0, dt), c0n,
                    w_hh.detach().t().contiguous().numpy(), w_hr.detach().t().contiguous().numpy() if proj else e,
                    (_np(b_hh, dt) if b_hh is not None else np.zeros(G, dt)) if gru else np.zeros(G, dt), sx, sh, sc,
                    out.view(-1, P).numpy(), spec.orow0, spec.orows, hn.numpy(), cn.numpy(), gates, cst, tcs, mst,
                    hprev, cprev, ghn,
                    np.empty((B, G), dt), np.empty((2, B, P), dt), np.empty((B, H), dt), np.empty((B, H), dt),
                    np.empty((B, G), dt), np.empty((B, G), dt), np.empty((nt, 6, G)),
                    np.empty((2, 3, 2, -(-B // RB), G)), np.zeros(16, np.int64))
        ctx.split = (nt, RB)
        ctx.dtypes = [getattr(t, "dtype", None) for t in (spec, xp, h0, c0, w_hh, w_hr, b_hh, gx, gh, gc, bc, b1, b2,
                                                          nbx, shift)]
        spec.stats = (sx, sh, sc)
        ctx.spec = spec
        ctx.arrays = (sx, sh, sc, gates, cst, tcs, mst, hprev, cprev, ghn)
        ctx.save_for_backward(w_hh, w_hr, xp)
        return out, hn, cn

    @staticmethod
    def backward(ctx, dout, dhn, dcn):
        spec = ctx.spec
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{spec.name}: the fused time loop has a first-order backward only (create_graph=True asks for a "
                "graph of it: double backward, gradient penalties). Build the layer with force_loop=True, whose "
                "torch-ops time loop autograd differentiates to any order."
            )
        w_hh, w_hr, xp = ctx.saved_tensors
        sx, sh, sc, gates, cst, tcs, mst, hprev, cprev, ghn = ctx.arrays
        dt = np.float32 if xp.dtype == torch.float32 else np.float64
        H, P, G, B = spec.H, spec.P, spec.G, spec.B
        N = int(spec.off[-1])
        lstm, gru, proj = spec.cell == _rk.LSTM, spec.cell == _rk.GRU, spec.P != spec.H
        e = _EMPTY2[dt]
        dxp = _buffers.empty(xp.shape, xp.dtype)
        dh0 = torch.empty(B, P, dtype=xp.dtype)
        dc0 = torch.empty(B, H if lstm else 0, dtype=xp.dtype)
        DA = _buffers.empty_np((N, G), dt)
        DHP = _buffers.empty_np((N, P), dt) if proj else e
        nt, RB = ctx.split
        T = len(spec.bs)
        accs = np.zeros((nt, 7, max(G, H)))
        gn = np.zeros((nt, T))
        _rk.backward(nt, RB, spec.cell, int(spec.rev), H, P, spec.bs, spec.off,
                     dout.detach().contiguous().view(-1, P).numpy(), spec.orow0, spec.orows,
                     _np(dhn, dt), _np(dcn, dt) if lstm else e, w_hh.detach().contiguous().numpy(),
                     w_hr.detach().contiguous().numpy() if proj else e, sx, sh, sc, xp.detach().view(-1, G).numpy(),
                     gates, cst, tcs, hprev, cprev, ghn,
                     dxp.view(-1, G).numpy(), spec.xrow0, spec.xrows, dh0.numpy(), dc0.numpy(), DA, DHP, accs, gn,
                     np.empty((B, P)), np.empty((B, H)), np.empty((B, P), dt), np.empty((B, H), dt), np.empty((B, G)),
                     np.empty((B, G)), np.empty((B, G)), np.empty((B, H)), np.empty((nt, 8, G)),
                     np.empty((2, 3, 2, -(-B // RB), G)), np.zeros(16, np.int64))
        acc = accs[0] if nt == 1 else accs.sum(0)
        dgx, dbx, dgh, dbh, dgc, dbc = acc[0, :G], acc[1, :G], acc[2, :G], acc[3, :G], acc[4, :H], acc[5, :H]
        spec.grad_norms = np.sqrt(gn.sum(0))
        need = ctx.needs_input_grad
        perm = spec.gperm

        def vec(a, i, permuted=False):  # (the permutation is its own inverse)
            if not need[i]:
                return None
            a = a[perm] if permuted and perm is not None else a.copy()
            return torch.from_numpy(a).to(ctx.dtypes[i])

        dw_hh = dw_hr = None
        if need[4]:  # dW_hh = DA^T hprev
            dw_hh = torch.empty(G, P, dtype=xp.dtype)
            _rk.weight_grad(DA, hprev, dw_hh.numpy(), nt)
        if proj and need[5]:  # dW_hr = DHP^T m
            dw_hr = torch.empty(P, H, dtype=xp.dtype)
            _rk.weight_grad(DHP, mst, dw_hr.numpy(), nt)
        return (None, dxp if need[1] else None, dh0 if need[2] else None, dc0 if lstm and need[3] else None,
                dw_hh, dw_hr, vec(dbh, 6) if gru else None, vec(dgx, 7, True), vec(dgh, 8, True),
                vec(dgc, 9) if lstm else None, vec(dbc, 10) if lstm else None, vec(dbx, 11), vec(dbx, 12),
                vec(dbx, 13, True), vec(dbx, 14))


def _norm_hooks(outs: list) -> list:
    """A list that receives, per step, the squared norm of the gradient of ``outs[t]`` (float64)
    from a hook on that tensor (the total gradient: every use of it summed), None until then."""
    vals: list = [None] * len(outs)

    def hook(t):
        def record(g):
            vals[t] = float(g.detach().to(torch.float64).pow(2).sum())
        return record

    for t, h in enumerate(outs):
        if h.requires_grad:
            h.register_hook(hook(t))
    return vals


def _layout(kind: str, B: int, T: int, off: np.ndarray):
    """``(row0 (T,), row_stride)``: step t's row i is row ``row0[t] + i * row_stride`` of the
    ``(rows, features)`` view of ``"batch"`` (B, T, *), ``"time"`` (T, B, *) or ``"packed"`` data."""
    if kind == "batch":
        return np.arange(T, dtype=np.int64), T
    if kind == "time":
        return np.arange(T, dtype=np.int64) * B, 1
    return off[:-1].copy(), 1


class _RecurrentCore(Module):
    """Shared by layers and cells: weights of one layer -> projection -> reference time loop."""

    mode: str
    norm: str
    #: what a training batch whose statistics are nan/inf does to the population statistics:
    #: "raise" (NonFiniteBatchError, no buffer moves) or "skip" (no buffer moves, no error)
    nonfinite: str = "raise"

    def _check_trace(self) -> None:
        """torch.jit.trace records torch ops; the running statistics are written after the forward,
        from the batch statistics it collected, which no trace records: a traced training-mode layer
        would never update them. Refused with the batch-norm layers' error instead."""
        if self.training and _kernels._is_tracing() and any(isinstance(m, SequenceBatchNorm)
                                                             for m in self.modules()):
            _kernels.refuse_training_trace(type(self).__name__)

    def _check_norm(self, norm: str) -> None:
        if norm not in NORM_MODES:
            raise ValueError(f"{type(self).__name__}: norm must be one of {NORM_MODES} (got {norm!r})")

    def _labels(self) -> dict:
        return {m: n for n, m in self.named_children()}

    def _run_layer(self, data, batch_sizes, uniform, h, c, w_ih, w_hh, b_ih, b_hh, norms, w_hr=None, rev=False,
                   t0=0):
        """One layer and direction on the reference loop: returns (outputs indexed by step, h_n, c_n).

        ``data``: batch-major ``(B, T, F)`` when ``uniform`` (every sequence runs every step), else
        the packed rows ``(sum b_t, F)`` with ``batch_sizes`` b_t. ``rev``: the reverse direction.
        """
        mode, H = self.mode, self.hidden_size
        nih, nhh, nc = norms
        if mode == "LSTM":
            perm = _lstm_perm(H, data.device)
            w_ih, w_hh = w_ih[perm], w_hh[perm]  # (4H, F): torch's i,f,g,o -> i,f,o,g
            bias = (b_ih + b_hh)[perm] if b_ih is not None else None
        elif mode == "GRU":
            bias = b_ih
        else:
            bias = b_ih + b_hh if b_ih is not None else None
        rows = data.reshape(-1, data.shape[-1])  # (B, T, F) -> (B*T, F), or packed rows
        in_loop = isinstance(nih, SequenceBatchNorm) and nih.per_step and not uniform
        if nih is None:
            xp = torch.mm(rows, w_ih.t()) if bias is None else torch.addmm(bias, rows, w_ih.t())  # (rows, G)
        else:
            xp = torch.mm(rows, w_ih.t())  # (rows, G)
            if not in_loop:
                if uniform and t0 == 0:
                    xp = nih.forward_steps(xp.view(data.shape[0], data.shape[1], -1), bias)  # (B, T, G)
                else:
                    xp = nih(xp, t0, bias)  # one step (cells), or pooled over all rows (vertical)
        if uniform:
            xs = xp.view(data.shape[0], data.shape[1], -1).unbind(1)  # (B, T, G) -> T x (B, G), strided
        else:
            xs = xp.split(batch_sizes)  # packed rows -> (b_t, G) per step
        if t0:  # a cell: one step, numbered t0
            steps = [(t0, xs[0], batch_sizes[0])]
        else:
            order = range(len(xs) - 1, -1, -1) if rev else range(len(xs))
            steps = [(t, xs[t], batch_sizes[t]) for t in order]
        nx = nih if in_loop else None
        if mode == "LSTM":
            outs, hn, cn = _lstm_loop(steps, h, c, w_hh.t(), None if w_hr is None else w_hr.t(), nhh, nc, nx, bias,
                                      rev)
        elif mode == "GRU":
            outs, hn, cn = _gru_loop(steps, h, w_hh.t(), b_hh, nhh, nx, bias, rev)
        else:
            act = torch.tanh if mode == "RNN_TANH" else torch.relu
            outs, hn, cn = _rnn_loop(steps, h, w_hh.t(), nhh, nx, bias, act, rev)
        return (outs[::-1] if rev else outs), hn, cn


class _BNRNNBase(_RecurrentCore):
    """Stacked recurrent layers with normalization: see the module docstring."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0, *,
                 norm: str = "none", gamma_init: float | None = None, momentum: float | None = 0.1,
                 eps: float = 1e-5, max_steps: int = 1, force_loop: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        name = type(self).__name__
        self._check_norm(norm)
        if not (isinstance(num_layers, int) and num_layers >= 1):
            raise ValueError(f"{name}: num_layers must be a positive int (got {num_layers!r})")
        if not (isinstance(hidden_size, int) and hidden_size >= 1) or not (isinstance(input_size, int) and input_size >= 1):
            raise ValueError(f"{name}: input_size and hidden_size must be positive ints (got {input_size!r}, {hidden_size!r})")
        if not 0 <= dropout <= 1:
            raise ValueError(f"{name}: dropout must be in [0, 1] (got {dropout})")
        if not isinstance(proj_size, int) or isinstance(proj_size, bool) or proj_size < 0:
            raise ValueError(f"{name}: proj_size must be an int >= 0, 0 for no projection (got {proj_size!r})")
        if proj_size and mode != "LSTM":
            raise ValueError(f"{name}: proj_size is supported for the LSTM only, as in torch (got proj_size={proj_size})")
        if proj_size >= hidden_size:
            raise ValueError(f"{name}: proj_size must be smaller than hidden_size (got proj_size={proj_size}, "
                             f"hidden_size={hidden_size})")
        fk = {"device": device, "dtype": dtype}
        self.mode, self.norm = mode, norm
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bool(bidirectional), proj_size
        self.gamma_init = gamma_init
        self.force_loop = force_loop
        self.record_hidden = False
        self.hidden_states: list[list[Tensor]] = []
        self.record_grad_norms = False
        self._grad_norm_sources: list = []
        g = _GATES[mode] * hidden_size
        out = proj_size or hidden_size
        for l in range(num_layers):
            fin = input_size if l == 0 else out * self.num_directions
            for d in range(self.num_directions):
                sfx = f"l{l}" + ("_reverse" if d else "")
                self.register_parameter(f"weight_ih_{sfx}", Parameter(torch.empty(g, fin, **fk)))
                self.register_parameter(f"weight_hh_{sfx}", Parameter(torch.empty(g, out, **fk)))
                if bias:
                    self.register_parameter(f"bias_ih_{sfx}", Parameter(torch.empty(g, **fk)))
                    self.register_parameter(f"bias_hh_{sfx}", Parameter(torch.empty(g, **fk)))
                if proj_size:
                    self.register_parameter(f"weight_hr_{sfx}", Parameter(torch.empty(proj_size, hidden_size, **fk)))
                norms = _make_norms(mode, fin, hidden_size, norm, gamma_init, momentum, eps, max_steps, fk)
                for k, m in norms.items():
                    if m is not None:
                        self.add_module(f"norm_{k}_{sfx}", m)
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """torch's init: every weight and bias U(-1/sqrt(H), 1/sqrt(H)); norms to their defaults."""
        std = 1.0 / math.sqrt(self.hidden_size)
        for n, p in self.named_parameters(recurse=False):
            torch.nn.init.uniform_(p, -std, std)
        for m in self.children():
            m.reset_parameters()

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, norm={self.norm!r}"
        if self.norm != "none":
            s += f", gamma_init={self.gamma_init}"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        return s

    def _sfx(self, l: int, d: int) -> str:
        return f"l{l}" + ("_reverse" if d else "")

    def _weights(self, l: int, d: int = 0):
        """``(w_ih, w_hh, b_ih, b_hh, w_hr)`` of layer l, direction d (None where absent)."""
        return tuple(self._member(n) for n in _cached(_member_names)("weight", l, d))

    def _norms(self, l: int, d: int = 0):
        return tuple(self._member(n) for n in _cached(_member_names)("norm", l, d))

    def _member(self, name: str):
        """A parameter or submodule by name, None where the layer has none (a dict lookup in the common
        case: ``getattr`` on a Module name it lacks raises and catches an AttributeError inside)."""
        v = self._parameters.get(name)
        if v is None:
            v = self._modules.get(name)
        if v is None and (name in self.__dict__ or hasattr(type(self), name)):  # a parametrization's property
            v = getattr(self, name)
        return v

    def _flat_weights(self) -> list[Tensor]:
        """torch's flat weight order: per layer, per direction, w_ih, w_hh[, b_ih, b_hh][, w_hr]."""
        return [w for l in range(self.num_layers) for d in range(self.num_directions) for w in self._weights(l, d)
                if w is not None]

    # --- input handling ------------------------------------------------------------------------
    def _check_hx(self, hx, B: int) -> tuple[Tensor | None, Tensor | None]:
        name = type(self).__name__
        LD = self.num_layers * self.num_directions
        want_h = (LD, B, self.proj_size or self.hidden_size)
        want_c = (LD, B, self.hidden_size)
        if self.mode == "LSTM":
            if hx is None:
                return None, None
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise ValueError(f"{name}: expected hx to be a tuple (h_0, c_0)")
            h0, c0 = hx
        else:
            if hx is None:
                return None, None
            if not isinstance(hx, Tensor):
                raise ValueError(f"{name}: expected hx to be a tensor h_0 (got {type(hx).__name__})")
            h0, c0 = hx, None
        for what, t, want in (("h_0", h0, want_h), ("c_0", c0, want_c)):
            if t is not None and tuple(t.shape) != want:
                raise ValueError(f"{name}: expected {what} of shape {want} (got {tuple(t.shape)})")
        return h0, c0

    def forward(self, input, hx=None, lengths: Tensor | None = None):
        """Run the stacked layers (under torch.compile: eagerly, at a graph break, unless
        ``torch._dynamo.config.allow_rnn`` is set, as for torch's recurrent layers).

        Args:
            input: ``(T, B, F)`` (``(B, T, F)`` with batch_first), ``(T, F)`` unbatched, or a
                PackedSequence.
            hx: initial state ``(D * num_layers, B, H_out)`` (D = 2 if bidirectional; H_out =
                proj_size or hidden_size); for the LSTM a tuple ``(h_0, c_0)`` with c_0
                ``(D * num_layers, B, hidden_size)``. Default 0.
            lengths: optional ``(B,)`` valid lengths of a padded ``input`` (each in 1..T).

        Returns: ``output`` (same layout as input, D * H_out features, 0 past each sequence's end)
        and ``h_n`` (``(h_n, c_n)`` for the LSTM), each sequence's state at its last valid step
        (the reverse direction's at step 0).
        """
        if torch.compiler.is_compiling() and not _traces_loop():
            return _run_eagerly(self, input, hx, lengths)
        return self._forward(input, hx, lengths)

    def _forward(self, input, hx, lengths):
        name = type(self).__name__
        self._check_trace()
        packed_in = isinstance(input, PackedSequence)
        unbatched = False
        sorted_idx = unsorted_idx = None
        if packed_in:
            if lengths is not None:
                raise ValueError(f"{name}: lengths must be None for a PackedSequence input (it has its own)")
            data, bs_t, sorted_idx, unsorted_idx = input
            T, B = len(bs_t), int(bs_t[0])
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"{name}: expected a Tensor or PackedSequence input (got {type(input).__name__})")
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: expected 2D (unbatched) or 3D input (got {input.dim()}D input of shape "
                                 f"{tuple(input.shape)})")
            if input.dim() == 2:
                unbatched = True
                input = input.unsqueeze(0 if self.batch_first else 1)
                hx = None if hx is None else (tuple(t.unsqueeze(1) for t in hx) if isinstance(hx, (tuple, list))
                                              else hx.unsqueeze(1))
            T, B = (input.shape[1], input.shape[0]) if self.batch_first else input.shape[:2]
            data = input
        feat = data.shape[-1]
        if feat != self.input_size:
            raise ValueError(f"{name}: expected input with {self.input_size} features (last dim) (got shape "
                             f"{tuple(data.shape)})")
        h0, c0 = self._check_hx(hx, B)
        if lengths is not None:
            lengths = torch.as_tensor(lengths).to("cpu", torch.long)
            if lengths.dim() != 1 or lengths.numel() != B:
                raise ValueError(f"{name}: expected lengths of shape ({B},) (got {tuple(lengths.shape)})")
            if B and (int(lengths.min()) < 1 or int(lengths.max()) > T):
                raise ValueError(f"{name}: lengths must lie in 1..{T} (got min {int(lengths.min())}, max "
                                 f"{int(lengths.max())})")
            if bool((lengths == T).all()):
                lengths = None  # every sequence full: the uniform path gives the same numbers
            else:
                p = pack_padded_sequence(input, lengths, batch_first=self.batch_first, enforce_sorted=False)
                data, bs_t, sorted_idx, unsorted_idx = p
        variable = packed_in or lengths is not None
        if sorted_idx is not None:
            h0 = h0.index_select(1, sorted_idx) if h0 is not None else None
            c0 = c0.index_select(1, sorted_idx) if c0 is not None else None

        batch_sizes = bs_t if variable else None
        # an empty batch: no row to normalize and no statistic to take, so torch's kernel on the layer's
        # own weights gives every output its shape (and the weights their zero gradients, as torch's layer)
        path = "torch" if B == 0 else self._path(data, variable)
        self._grad_norm_sources = []
        if path == "torch":
            self.hidden_states = []  # (record_hidden: no step ran a loop; nothing of an earlier call stays)
            out, hn, cn = self._torch_forward(data, batch_sizes, h0, c0, B)
        else:
            updates: list = []
            if path == "fold":  # the fold records its statistics itself: no norm module runs a forward
                out, hn, cn = self._fold_forward(data, batch_sizes, h0, c0, B, updates)
            else:
                with collect_stats(self, updates):
                    if path == "fused":
                        out, hn, cn = self._fused_forward(data, batch_sizes, h0, c0, B, T, updates)
                    else:
                        out, hn, cn = self._loop_forward(data, batch_sizes, h0, c0, B, T)
            commit_stats(updates, self.nonfinite, name, self._labels() if updates else None)

        if sorted_idx is not None:
            hn = hn.index_select(1, unsorted_idx)
            cn = cn.index_select(1, unsorted_idx) if cn is not None else None
        if packed_in:
            output = PackedSequence(out, bs_t, sorted_idx, unsorted_idx)
        elif variable:
            output, _ = pad_packed_sequence(PackedSequence(out, bs_t, sorted_idx, unsorted_idx),
                                            batch_first=self.batch_first, total_length=T)
        else:
            output = out
        if unbatched:
            output = output.squeeze(0 if self.batch_first else 1)
            hn = hn.squeeze(1)
            cn = cn.squeeze(1) if cn is not None else None
        return (output, (hn, cn)) if self.mode == "LSTM" else (output, hn)

    def _path(self, data: Tensor, packed: bool = False) -> str:
        """Which implementation serves this call: "torch", "fold", "fused" or "loop" (``packed``:
        variable lengths)."""
        if self.force_loop or self.record_hidden or _kernels.needs_reference():
            return "loop"
        if self.norm == "none" and not self.record_grad_norms:
            return "torch"
        if torch.compiler.is_compiling() or _kernels._is_tracing():  # torch ops all the way (compiled
            return "loop"  # code cannot call numba; torch.jit.trace records torch ops only)
        fused = data.is_cpu and data.dtype in _FUSED_DTYPES
        if self.record_grad_norms:  # torch's kernels cannot give the gradient of each step's state
            return "fused" if fused else "loop"
        if self.norm == "vertical" and not (fused and _VERTICAL_FUSED(self.mode, packed)):
            return "fold"
        return "fused" if fused else "loop"

    @property
    def hidden_grad_norms(self) -> list[Tensor | None]:
        """With ``record_grad_norms = True``: for each layer and direction (index ``layer * D +
        direction``) of the last forward, the float64 ``(T,)`` norms ``||dL/dh_t||`` (over the batch:
        the rows running at step t) of the loss gradient with respect to the layer's output h_t, the
        total gradient (through the layers above and through the steps after t), once a backward
        through that forward ran; None before (or for a direction the backward did not reach)."""
        out = []
        for src in self._grad_norm_sources:
            if isinstance(src, _FusedSpec):
                g = getattr(src, "grad_norms", None)
                out.append(None if g is None else torch.from_numpy(g))
            else:  # the reference loop's hooks: squared norms per step, None where no gradient came
                out.append(None if all(v is None for v in src) else
                           torch.tensor([0.0 if v is None else v for v in src], dtype=torch.float64).sqrt())
        return out

    def _initial(self, h0, c0, l: int, d: int, B: int, like: Tensor):
        k = l * self.num_directions + d
        P, H = self.proj_size or self.hidden_size, self.hidden_size
        h = h0[k] if h0 is not None else like.new_zeros(B, P)
        c = (c0[k] if c0 is not None else like.new_zeros(B, H)) if self.mode == "LSTM" else None
        return h, c

    def _between_layers(self, x: Tensor, l: int) -> Tensor:
        if self.dropout and self.training and l < self.num_layers - 1:
            return F.dropout(x, self.dropout, True)
        return x

    def _torch_forward(self, data, batch_sizes, h0, c0, B):
        """norm="none": torch's fused recurrent kernels, same weights."""
        LD = self.num_layers * self.num_directions
        zeros = data.new_zeros(LD, B, self.proj_size or self.hidden_size)
        h0 = zeros if h0 is None else h0
        w, L, p, tr = self._flat_weights(), self.num_layers, self.dropout, self.training
        fn = _TORCH_OP[self.mode]
        hx = [h0, data.new_zeros(LD, B, self.hidden_size) if c0 is None else c0] if self.mode == "LSTM" else h0
        if batch_sizes is None:
            res = fn(data, hx, w, self.bias, L, p, tr, self.bidirectional, self.batch_first)
        else:
            res = fn(data, batch_sizes, hx, w, self.bias, L, p, tr, self.bidirectional)
        return res[0], res[1], (res[2] if self.mode == "LSTM" else None)

    def _fold_forward(self, data, batch_sizes, h0, c0, B, updates):
        """norm="vertical": per layer, the input norm folded into W_ih and the bias, then torch's
        fused kernel for one layer (both directions)."""
        fn = _TORCH_OP[self.mode]
        perm = _lstm_perm(self.hidden_size, data.device) if self.mode == "LSTM" else None
        x = data
        bf = self.batch_first
        hns, cns = [], []
        D = self.num_directions
        for l in range(self.num_layers):
            if x.dim() == 3 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous():
                # a layer's output in torch's time-major memory, seen batch-first: its rows in that
                # memory order (the statistics do not depend on the rows' order), no copy
                x, bf = x.transpose(0, 1), not bf
            rows = x.reshape(-1, x.shape[-1])  # every valid row of every step (uniform or packed)
            rows, folded = _fold_layer([self._norms(l, d)[0] for d in range(D)],
                                       [self._weights(l, d)[0] for d in range(D)], rows, perm, updates)
            x = rows.view(x.shape)  # the centred rows in training
            params = []
            for d in range(D):
                w_ih, w_hh, b_ih, b_hh, w_hr = self._weights(l, d)
                w_f, shift = folded[d]
                b_f = shift if b_ih is None else b_ih + shift
                b_hh = torch.zeros_like(b_f) if b_hh is None else b_hh
                params += [w_f, w_hh, b_f, b_hh] + ([w_hr] if w_hr is not None else [])
            # the layer's initial states, both directions: (D, B, *) slices of h0 / c0, or zeros
            hx = h0[l * D:(l + 1) * D] if h0 is not None else data.new_zeros(D, B, self.proj_size or self.hidden_size)
            if self.mode == "LSTM":
                hx = [hx, c0[l * D:(l + 1) * D] if c0 is not None else data.new_zeros(D, B, self.hidden_size)]
            bi = self.bidirectional
            if batch_sizes is None:
                res = fn(x, hx, params, True, 1, 0.0, self.training, bi, bf)
            else:
                res = fn(x, batch_sizes, hx, params, True, 1, 0.0, self.training, bi)
            x = self._between_layers(res[0], l)
            hns.append(res[1])
            if self.mode == "LSTM":
                cns.append(res[2])
        if x.dim() == 3 and bf != self.batch_first:
            x = x.transpose(0, 1)
        return x, torch.cat(hns), (torch.cat(cns) if self.mode == "LSTM" else None)

    def _site(self, norm, T: int, sizes: np.ndarray, gates: bool) -> _Site:
        """The kernel's site for ``norm`` (a SequenceBatchNorm, a LayerNorm or None)."""
        if norm is None:
            return _Site(np.zeros(T, np.int8))
        if isinstance(norm, _RowLayerNorm):
            return _Site(np.full(T, _rk.ROW, np.int8), eps=norm.eps, norm=norm)
        perm = _lstm_perm(self.hidden_size).numpy() if gates and self.mode == "LSTM" else None
        if norm.training:
            kinds = np.where(sizes >= 2, _rk.BATCH, _rk.FIXED).astype(np.int8)
        else:
            kinds = np.full(T, _rk.FIXED, np.int8)
        fixed = None
        if (kinds == _rk.FIXED).any():
            m, inv = norm.fixed_stats(T)
            m, inv = m.numpy(), inv.numpy()
            fixed = (m[:, perm], inv[:, perm]) if perm is not None else (m, inv)
            fixed = (np.ascontiguousarray(fixed[0]), np.ascontiguousarray(fixed[1]))
        return _Site(kinds, fixed, norm.eps, norm, not norm.per_step, perm)

    def _fused_forward(self, data, batch_sizes, h0, c0, B, T, updates):
        """horizontal / per_timestep / layer: one fused call per layer and direction."""
        mode, H = self.mode, self.hidden_size
        P = self.proj_size or H
        G = _GATES[mode] * H
        if batch_sizes is None:
            layout = "batch" if self.batch_first else "time"
            bs = np.full(T, B, np.int64)
        else:
            layout = "packed"
            bs = batch_sizes.numpy().astype(np.int64)
            T = len(bs)  # the packed steps: fewer than the padded input's when every length stops short of it
        off = np.zeros(T + 1, np.int64)
        np.cumsum(bs, out=off[1:])
        row0, rows = _layout(layout, B, T, off)
        gperm = _lstm_perm(H, data.device) if mode == "LSTM" else None
        gperm_np = None if gperm is None else _cached(_lstm_perm_np)(H)
        x = data
        hns, cns = [], []
        name = type(self).__name__
        # one batch norm over every row, before the loop (norm="vertical" comes here with record_grad_norms)
        vertical_in = self.norm in ("horizontal", "vertical")
        D = self.num_directions
        for l in range(self.num_layers):
            outs = []
            folded = None
            if vertical_in and x.shape[-1] * 4 < G:
                # a narrow input: the input norm folded into W_ih (its statistics from the input's
                # covariance, as norm="vertical" does for torch's kernel), so no pass over the
                # projection's N x G values forward or backward
                xc, folded = _fold_layer([self._norms(l, d)[0] for d in range(D)],
                                         [self._weights(l, d)[0] for d in range(D)],
                                         x.reshape(-1, x.shape[-1]), gperm, updates)
                xin = xc.view(x.shape)
            for d in range(D):
                w_ih, w_hh, b_ih, b_hh, w_hr = self._weights(l, d)
                nih, nhh, nc = self._norms(l, d)
                # the input site's shift, summed inside the call (no autograd node per term, none per
                # permutation): the gate bias b_ih (+ b_hh, but the GRU's b_hh, which is its own input),
                # then the input norm's beta or the folded norm's shift
                b1, b2 = b_ih, (None if mode == "GRU" else b_hh)
                gx = nbx = shift = None
                if folded is not None:
                    # the folded norm's shift and the gate bias: the input site's shift, added inside the
                    # kernel (not a pass over the projection's N x G values forward and one backward)
                    w_f, shift = folded[d]
                    xp = _project(xin, w_f)
                    sx = _Site(np.zeros(T, np.int8))
                elif vertical_in:
                    bias = b_ih if mode == "GRU" or b_ih is None else b_ih + b_hh
                    xp = _project(x, w_ih)
                    xp = _vertical_bn(nih, xp.view(-1, G), bias, gperm, updates,
                                      f"{name} norm_ih_{self._sfx(l, d)}").view(xp.shape)
                    sx, b1, b2 = _Site(np.zeros(T, np.int8)), None, None
                else:
                    xp = _project(x, w_ih)
                    sx = self._site(nih, T, bs, True)
                    if nih is not None:
                        gx, nbx = nih.weight, getattr(nih, "bias", None)
                sh = self._site(nhh, T, bs, True)
                gh = None if nhh is None else nhh.weight
                sc = self._site(nc, T, bs, False)
                gc = None if nc is None else nc.weight
                bc = None if nc is None else nc.bias
                spec = _FusedSpec()
                spec.cell, spec.rev, spec.H, spec.P, spec.G, spec.B = _CELL[mode], bool(d), H, P, G, B
                spec.bs, spec.off, spec.xrow0, spec.xrows, spec.orow0, spec.orows = bs, off, row0, rows, row0, rows
                spec.out_shape = tuple(xp.shape[:-1]) + (P,)
                spec.sites, spec.name, spec.gperm = (sx, sh, sc), name, gperm_np
                h, c = self._initial(h0, c0, l, d, B, data)
                spec.grad_norms = None
                if self.record_grad_norms:
                    self._grad_norm_sources.append(spec)
                out, hn, cn = _FusedRecurrence.apply(spec, xp.contiguous(), h, c, w_hh, w_hr,
                                                     b_hh if mode == "GRU" else None, gx, gh, gc, bc, b1, b2, nbx,
                                                     shift)
                self._collect_fused(spec, d, T, bs, updates)
                outs.append(out)
                hns.append(hn)
                if mode == "LSTM":
                    cns.append(cn)
            x = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
            x = self._between_layers(x, l)
        return x, torch.stack(hns), (torch.stack(cns) if mode == "LSTM" else None)

    @staticmethod
    def _collect_fused(spec, d: int, T: int, bs: np.ndarray, updates: list) -> None:
        """The batch statistics of the fused call's BATCH steps, in the order the steps ran."""
        for site, arrays in zip(spec.sites, spec.stats):
            kinds = site.kinds
            if site.norm is None or not isinstance(site.norm, SequenceBatchNorm) or not (kinds == _rk.BATCH).any():
                continue
            steps = np.flatnonzero(kinds == _rk.BATCH)
            mean, var = arrays[9], arrays[10]
            if len(steps) < T:
                mean, var = mean[steps], var[steps]
            if d:
                steps = steps[::-1]
                mean, var = mean[::-1], var[::-1]
            if site.perm is not None:  # np.take: a C-ordered result (an index on the second axis gives an
                # F-ordered one, which every later flat view would have to copy)
                mean, var = np.take(mean, site.perm, axis=1), np.take(var, site.perm, axis=1)
            elif d:
                mean, var = np.ascontiguousarray(mean), np.ascontiguousarray(var)
            # (every step's statistics, no permutation: the site's own arrays, which nothing writes again)
            rows = [0] * len(steps) if site.shared else steps.tolist()
            updates.append(StatsUpdate(site.norm, rows, torch.from_numpy(mean), torch.from_numpy(var),
                                       bs[steps].tolist()))

    def _loop_forward(self, data, batch_sizes, h0, c0, B, T):
        """The reference time loop (every norm mode, and norm="none" with force_loop).

        Equal lengths run batch-major: layer inputs and outputs are ``(B, T, F)`` (a stack of
        the steps' outputs along dim 1), so per-step statistics of all steps are one call on a
        ``(B, T*G)`` view. Variable lengths run on packed rows.
        """
        if batch_sizes is None:
            layer_in = data if self.batch_first else data.transpose(0, 1)  # (B, T, F)
            sizes, uniform = [B] * T, True
        else:
            layer_in, sizes, uniform = data, batch_sizes.tolist(), False
        hns, cns = [], []
        self.hidden_states = []
        for l in range(self.num_layers):
            outs_d = []
            for d in range(self.num_directions):
                h, c = self._initial(h0, c0, l, d, B, layer_in)
                w_ih, w_hh, b_ih, b_hh, w_hr = self._weights(l, d)
                outs, hn, cn = self._run_layer(layer_in, sizes, uniform, h, c, w_ih, w_hh, b_ih, b_hh,
                                               self._norms(l, d), w_hr=w_hr, rev=bool(d))
                if self.record_hidden:
                    self.hidden_states.append(outs)
                if self.record_grad_norms:
                    self._grad_norm_sources.append(_norm_hooks(outs))
                outs_d.append(torch.stack(outs, 1) if uniform else torch.cat(outs))  # (B, T, H) or (rows, H)
                hns.append(hn)
                cns.append(cn)
            layer_in = outs_d[0] if len(outs_d) == 1 else torch.cat(outs_d, -1)
            layer_in = self._between_layers(layer_in, l)
        out = layer_in
        if uniform and not self.batch_first:
            out = out.transpose(0, 1).contiguous()  # (B, T, H) -> (T, B, H)
        return out, torch.stack(hns), (torch.stack(cns) if self.mode == "LSTM" else None)


class BNLSTM(_BNRNNBase):
    r"""LSTM with batch (or layer) normalization, torch.nn.LSTM's interface; see the module docstring.

    Args:
        input_size, hidden_size, num_layers (default 1), bias (default True), batch_first
            (default False), dropout (default 0, between layers), bidirectional (default False),
            proj_size (default 0): as torch.nn.LSTM (``_reverse`` parameters and norms per
            direction; ``weight_hr_l{k}`` with a projection).
        norm: "none" | "vertical" | "horizontal" | "per_timestep" | "layer" (default "none").
        gamma_init: initial gamma of every norm (default 0.1 for "per_timestep", 1 otherwise).
        momentum, eps: of the batch norms (defaults 0.1, 1e-5; torch's momentum convention).
        max_steps: per-step statistics rows allocated up front (grows on demand).
        force_loop: run the reference time loop (torch ops, per-step norm modules) instead of
            torch's kernel (norm="none"), the folded torch kernel ("vertical") or the fused loop.

    Shape: input ``(T, B, F)`` or ``(B, T, F)`` with batch_first, or a PackedSequence;
    ``lengths`` ``(B,)``. Output ``(T, B, D * H_out)`` (D = 2 if bidirectional, H_out = proj_size
    or hidden_size); h_n ``(D * num_layers, B, H_out)``, c_n ``(D * num_layers, B, H)``.

    Attributes: ``record_hidden`` (set True to keep each layer's per-step hidden states, graph
    attached, in ``hidden_states[layer * D + direction][t]`` for gradient diagnostics; runs the
    reference loop); ``nonfinite`` ("raise" or "skip": a training batch whose statistics are
    nan/inf at any step raises NonFiniteBatchError, or skips the update; no buffer moves either way).

    Example:
        >>> import torch, bnlab
        >>> rnn = bnlab.nn.BNLSTM(3, 16, num_layers=2, batch_first=True, norm="per_timestep")
        >>> out, (h, c) = rnn(torch.randn(8, 10, 3))
        >>> out.shape, h.shape
        (torch.Size([8, 10, 16]), torch.Size([2, 8, 16]))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 **kwargs) -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, **kwargs)


class BNGRU(_BNRNNBase):
    """GRU with batch (or layer) normalization, torch.nn.GRU's interface; arguments as :class:`BNLSTM`.

    Example:
        >>> import torch, bnlab
        >>> out, h = bnlab.nn.BNGRU(3, 16, norm="vertical")(torch.randn(10, 8, 3))
        >>> out.shape
        torch.Size([10, 8, 16])
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, **kwargs) -> None:
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         **kwargs)


class BNRNN(_BNRNNBase):
    """Elman RNN (tanh, or relu) with batch (or layer) normalization, torch.nn.RNN's interface.

    ``nonlinearity``: "tanh" (default) or "relu"; other arguments as :class:`BNLSTM`.

    Example:
        >>> import torch, bnlab
        >>> out, h = bnlab.nn.BNRNN(3, 16, norm="horizontal")(torch.randn(10, 8, 3))
        >>> h.shape
        torch.Size([1, 8, 16])
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 **kwargs) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"BNRNN: nonlinearity must be 'tanh' or 'relu' (got {nonlinearity!r})")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size, num_layers,
                         bias, batch_first, dropout, bidirectional, **kwargs)


class _BNCellBase(_RecurrentCore):
    """One step of a normalized recurrent layer, for custom loops (torch.nn.LSTMCell's names)."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, bias: bool = True, *, norm: str = "none",
                 gamma_init: float | None = None, momentum: float | None = 0.1, eps: float = 1e-5,
                 max_steps: int = 1, device=None, dtype=None) -> None:
        super().__init__()
        self._check_norm(norm)
        fk = {"device": device, "dtype": dtype}
        self.mode, self.norm = mode, norm
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        self.gamma_init = gamma_init
        g = _GATES[mode] * hidden_size
        self.weight_ih = Parameter(torch.empty(g, input_size, **fk))
        self.weight_hh = Parameter(torch.empty(g, hidden_size, **fk))
        self.bias_ih = Parameter(torch.empty(g, **fk)) if bias else None
        self.bias_hh = Parameter(torch.empty(g, **fk)) if bias else None
        norms = _make_norms(mode, input_size, hidden_size, norm, gamma_init, momentum, eps, max_steps, fk)
        self.norm_ih, self.norm_hh, self.norm_c = norms["ih"], norms["hh"], norms["c"]
        self.reset_parameters()

    reset_parameters = _BNRNNBase.reset_parameters

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, norm={self.norm!r}"

    def forward(self, input: Tensor, hx=None, step: int = 0):
        """One step. ``step`` picks the per-step statistics (per_timestep); with "vertical" or
        "horizontal" a cell sees one step, so its input statistics are over this call's batch."""
        name = type(self).__name__
        self._check_trace()
        if not isinstance(input, Tensor) or input.dim() not in (1, 2):
            got = f"{input.dim()}D input" if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"{name}: expected 1D (unbatched) or 2D (B, F) input (got {got})")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"{name}: expected input with {self.input_size} features (got shape {tuple(input.shape)})")
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        B, H = x.shape[0], self.hidden_size
        if hx is None:
            z = x.new_zeros(B, H)
            h, c = z, (z if self.mode == "LSTM" else None)
        elif self.mode == "LSTM":
            h, c = hx
            h, c = (h.unsqueeze(0), c.unsqueeze(0)) if unbatched else (h, c)
        else:
            h, c = (hx.unsqueeze(0) if unbatched else hx), None
        if tuple(h.shape) != (B, H) or (c is not None and tuple(c.shape) != (B, H)):
            raise ValueError(f"{name}: expected hidden state of shape {(B, H)} (got {tuple(h.shape)})")
        if B == 0:  # an empty batch (as for the layers): torch's cell on the raw weights, no statistics
            w = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
            if self.mode == "LSTM":
                hn, cn = torch.lstm_cell(x, (h, c), *w)
            else:
                hn, cn = _TORCH_CELL[self.mode](x, h, *w), None
        else:
            updates = []
            with collect_stats(self, updates):
                _, hn, cn = self._run_layer(x.unsqueeze(1), [B], True, h, c, self.weight_ih, self.weight_hh,
                                            self.bias_ih, self.bias_hh, (self.norm_ih, self.norm_hh, self.norm_c),
                                            t0=step)
            commit_stats(updates, self.nonfinite, name, self._labels() if updates else None)
        if unbatched:
            hn, cn = hn.squeeze(0), (cn.squeeze(0) if cn is not None else None)
        return (hn, cn) if self.mode == "LSTM" else hn


class BNLSTMCell(_BNCellBase):
    """One LSTM step with normalization (see :class:`BNLSTM`); returns ``(h, c)``.

    Example:
        >>> import torch, bnlab
        >>> cell = bnlab.nn.BNLSTMCell(3, 8, norm="per_timestep")
        >>> h, c = None, None
        >>> x = torch.randn(5, 4, 3)
        >>> for t in range(5):
        ...     h, c = cell(x[t], None if h is None else (h, c), step=t)
        >>> h.shape
        torch.Size([4, 8])
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, **kwargs) -> None:
        super().__init__("LSTM", input_size, hidden_size, bias, **kwargs)


class BNGRUCell(_BNCellBase):
    """One GRU step with normalization (see :class:`BNGRU`); returns ``h``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, **kwargs) -> None:
        super().__init__("GRU", input_size, hidden_size, bias, **kwargs)


class BNRNNCell(_BNCellBase):
    """One tanh (or relu) RNN step with normalization (see :class:`BNRNN`); returns ``h``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 **kwargs) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"BNRNNCell: nonlinearity must be 'tanh' or 'relu' (got {nonlinearity!r})")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size, bias,
                         **kwargs)
