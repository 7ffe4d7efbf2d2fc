"""Recurrent layers with batch normalization applied every way the literature does.

``BNLSTM``, ``BNGRU`` and ``BNRNN`` have torch.nn.LSTM/GRU/RNN's interface and parameter names
(``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, ..., gate order i, f, g, o for
the LSTM and r, z, n for the GRU): with ``norm="none"`` a torch layer's state_dict loads as is
and gives the same numbers. ``norm=`` picks where normalization goes:

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
    h_t = sigmoid(o) * tanh(N_c(c_t))

GRU: r, z = sigmoid(N_x(W_x x)_{rz} + b_ih + N_h(W_h h)_{rz} + b_hh),
n = tanh(N_x(W_x x)_n + b_ih,n + r * (N_h(W_h h)_n + b_hh,n)), h_t = (1 - z) n + z h_{t-1}.
RNN: h_t = tanh(N_x(W_x x_t) + b_ih + N_h(W_h h_{t-1}) + b_hh).

Internally the LSTM evaluates its gates in the order (i, f, o, g) so that one sigmoid and one tanh
cover them; the normalization parameters and statistics of the gate pre-activations (``norm_ih``,
``norm_hh``) are stored in that order. Weights keep torch's order.

Variable lengths: ``lengths`` (or a PackedSequence) run the recurrence on the packed layout, as
torch does: at step t only the sequences still running are computed, so padded steps never
enter any statistic, running statistic or output (outputs past a sequence's end are 0, h_n/c_n
are each sequence's state at its last step).

Speed: the input projections of all steps are one matmul (and vertical/per-step BN of them one
call) before the time loop; the loop holds only the recurrent matmul, the norms and the pointwise
gate math, on per-step slices that autograd gathers in one node.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module, Parameter
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .masked import SequenceBatchNorm, guard_running_stats

__all__ = ["BNLSTM", "BNGRU", "BNRNN", "BNLSTMCell", "BNGRUCell", "BNRNNCell", "NORM_MODES"]

NORM_MODES = ("none", "vertical", "horizontal", "per_timestep", "layer")
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_MIN_LAYERNORM_INPUT = 8


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

    forward_steps = forward  # rowwise: all steps at once is the same call


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


def _lstm_perm(hidden_size: int, device=None) -> Tensor:
    """Row order (i, f, o, g) from torch's (i, f, g, o)."""
    h = hidden_size
    return torch.cat([torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h)]).to(device)


# ---------------------------------------------------------------------------------------------
# The time loops. xs: per-step input projections (b_t, G), bias included; batch_sizes: b_t, non-
# increasing (packed layout); h, c: (b_0, H). Returns (outputs per step, h_n, c_n).
# ---------------------------------------------------------------------------------------------

def _shrink(b, h, c, done_h, done_c):
    done_h.append(h[b:])
    if c is not None:
        done_c.append(c[b:])
        c = c[:b]
    return h[:b], c


def _finals(h, done):
    return torch.cat([h] + done[::-1]) if done else h  # rows 0..B-1 in packed (sorted) order


def _lstm_loop(xs, batch_sizes, h, c, w_hh_t, nh, nc, nx, bias, t0):
    H = h.shape[1]
    outs, done_h, done_c = [], [], []
    split = [3 * H, H]
    for t, (xt, b) in enumerate(zip(xs, batch_sizes), t0):
        if b < h.shape[0]:
            h, c = _shrink(b, h, c, done_h, done_c)
        if nx is not None:
            xt = nx(xt, t, bias)
        g = torch.addmm(xt, h, w_hh_t) if nh is None else xt + nh(torch.mm(h, w_hh_t), t)
        s, u = g.split(split, 1)
        i, f, o = torch.sigmoid(s).chunk(3, 1)
        c = torch.addcmul(f * c, i, torch.tanh(u))
        h = o * torch.tanh(c if nc is None else nc(c, t))
        outs.append(h)
    return outs, _finals(h, done_h), _finals(c, done_c)


def _gru_loop(xs, batch_sizes, h, w_hh_t, b_hh, nh, nx, b_ih, t0):
    H = h.shape[1]
    outs, done_h = [], []
    split = [2 * H, H]
    for t, (xt, b) in enumerate(zip(xs, batch_sizes), t0):
        if b < h.shape[0]:
            h, _ = _shrink(b, h, None, done_h, None)
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


def _rnn_loop(xs, batch_sizes, h, w_hh_t, nh, nx, bias, t0, act):
    outs, done_h = [], []
    for t, (xt, b) in enumerate(zip(xs, batch_sizes), t0):
        if b < h.shape[0]:
            h, _ = _shrink(b, h, None, done_h, None)
        if nx is not None:
            xt = nx(xt, t, bias)
        h = act(torch.addmm(xt, h, w_hh_t) if nh is None else xt + nh(torch.mm(h, w_hh_t), t))
        outs.append(h)
    return outs, _finals(h, done_h), None


class _RecurrentCore(Module):
    """Shared by layers and cells: weights of one layer -> projection -> time loop."""

    mode: str
    norm: str
    #: what a training batch whose statistics are nan/inf does to the population statistics:
    #: "raise" (NonFiniteBatchError, buffers untouched) or "skip" (buffers untouched, no error)
    nonfinite: str = "raise"

    def _check_norm(self, norm: str) -> None:
        if norm not in NORM_MODES:
            raise ValueError(f"{type(self).__name__}: norm must be one of {NORM_MODES} (got {norm!r})")

    def _run_layer(self, data, batch_sizes, uniform, h, c, w_ih, w_hh, b_ih, b_hh, norms, t0=0):
        """One layer: returns (outputs per step, h_n, c_n).

        ``data``: batch-major ``(B, T, F)`` when ``uniform`` (every sequence runs every step), else
        the packed rows ``(sum b_t, F)`` with ``batch_sizes`` b_t.
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
        nx = nih if in_loop else None
        if uniform and t0 == 0:  # equal rows every step: the norms' per-step bookkeeping done once
            T = len(batch_sizes)
            nhh = nhh.stepper(T, h.shape[0]) if isinstance(nhh, SequenceBatchNorm) else nhh
            nc = nc.stepper(T, h.shape[0]) if isinstance(nc, SequenceBatchNorm) else nc
        if mode == "LSTM":
            return _lstm_loop(xs, batch_sizes, h, c, w_hh.t(), nhh, nc, nx, bias, t0)
        if mode == "GRU":
            return _gru_loop(xs, batch_sizes, h, w_hh.t(), b_hh, nhh, nx, bias, t0)
        act = torch.tanh if mode == "RNN_TANH" else torch.relu
        return _rnn_loop(xs, batch_sizes, h, w_hh.t(), nhh, nx, bias, t0, act)


class _BNRNNBase(_RecurrentCore):
    """Stacked recurrent layers with normalization: see the module docstring."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 norm: str = "none", gamma_init: float | None = None, momentum: float | None = 0.1,
                 eps: float = 1e-5, max_steps: int = 1, force_loop: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        name = type(self).__name__
        self._check_norm(norm)
        if bidirectional:
            raise NotImplementedError(f"{name}: bidirectional=True is not supported")
        if not (isinstance(num_layers, int) and num_layers >= 1):
            raise ValueError(f"{name}: num_layers must be a positive int (got {num_layers!r})")
        if not (isinstance(hidden_size, int) and hidden_size >= 1) or not (isinstance(input_size, int) and input_size >= 1):
            raise ValueError(f"{name}: input_size and hidden_size must be positive ints (got {input_size!r}, {hidden_size!r})")
        if not 0 <= dropout <= 1:
            raise ValueError(f"{name}: dropout must be in [0, 1] (got {dropout})")
        fk = {"device": device, "dtype": dtype}
        self.mode, self.norm = mode, norm
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional = False
        self.gamma_init = gamma_init
        self.force_loop = force_loop
        self.record_hidden = False
        self.hidden_states: list[list[Tensor]] = []
        g = _GATES[mode] * hidden_size
        for l in range(num_layers):
            fin = input_size if l == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{l}", Parameter(torch.empty(g, fin, **fk)))
            self.register_parameter(f"weight_hh_l{l}", Parameter(torch.empty(g, hidden_size, **fk)))
            if bias:
                self.register_parameter(f"bias_ih_l{l}", Parameter(torch.empty(g, **fk)))
                self.register_parameter(f"bias_hh_l{l}", Parameter(torch.empty(g, **fk)))
            norms = _make_norms(mode, fin, hidden_size, norm, gamma_init, momentum, eps, max_steps, fk)
            for k, m in norms.items():
                if m is not None:
                    self.add_module(f"norm_{k}_l{l}", m)
        self.reset_parameters()

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
        return s

    def _weights(self, l: int):
        return (getattr(self, f"weight_ih_l{l}"), getattr(self, f"weight_hh_l{l}"),
                getattr(self, f"bias_ih_l{l}", None), getattr(self, f"bias_hh_l{l}", None))

    def _norms(self, l: int):
        return tuple(getattr(self, f"norm_{k}_l{l}", None) for k in ("ih", "hh", "c"))

    def _flat_weights(self) -> list[Tensor]:
        return [w for l in range(self.num_layers) for w in self._weights(l) if w is not None]

    # --- input handling ------------------------------------------------------------------------
    def _check_hx(self, hx, B: int) -> tuple[Tensor | None, Tensor | None]:
        name = type(self).__name__
        want = (self.num_layers, B, self.hidden_size)
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
        for what, t in (("h_0", h0), ("c_0", c0)):
            if t is not None and tuple(t.shape) != want:
                raise ValueError(f"{name}: expected {what} of shape {want} (got {tuple(t.shape)})")
        return h0, c0

    def forward(self, input, hx=None, lengths: Tensor | None = None):
        """Run the stacked layers.

        Args:
            input: ``(T, B, F)`` (``(B, T, F)`` with batch_first), ``(T, F)`` unbatched, or a
                PackedSequence.
            hx: initial state ``(num_layers, B, H)``; for the LSTM a tuple ``(h_0, c_0)``. Default 0.
            lengths: optional ``(B,)`` valid lengths of a padded ``input`` (each in 1..T).

        Returns: ``output`` (same layout as input, H features, 0 past each sequence's end) and
        ``h_n`` (``(h_n, c_n)`` for the LSTM), each sequence's state at its last valid step.
        """
        name = type(self).__name__
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

        if self.norm == "none" and not self.force_loop and not self.record_hidden:
            out, hn, cn = self._torch_forward(data, bs_t if variable else None, h0, c0, B)
        else:
            with guard_running_stats(self, name, self.nonfinite):
                out, hn, cn = self._loop_forward(data, bs_t if variable else None, h0, c0, B, T)

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

    def _torch_forward(self, data, batch_sizes, h0, c0, B):
        """norm="none": torch's fused recurrent kernels, same weights."""
        zeros = data.new_zeros(self.num_layers, B, self.hidden_size)
        h0 = zeros if h0 is None else h0
        w, L, p, tr = self._flat_weights(), self.num_layers, self.dropout, self.training
        fn = {"LSTM": torch.lstm, "GRU": torch.gru, "RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu}[self.mode]
        hx = [h0, zeros if c0 is None else c0] if self.mode == "LSTM" else h0
        if batch_sizes is None:
            res = fn(data, hx, w, self.bias, L, p, tr, False, self.batch_first)
        else:
            res = fn(data, batch_sizes, hx, w, self.bias, L, p, tr, False)
        return res[0], res[1], (res[2] if self.mode == "LSTM" else None)

    def _loop_forward(self, data, batch_sizes, h0, c0, B, T):
        """The time loop (every norm mode, and norm="none" with force_loop).

        Equal lengths run batch-major: layer inputs and outputs are ``(B, T, F)`` (a stack of
        the steps' outputs along dim 1), so per-step statistics of all steps are one call on a
        ``(B, T*G)`` view and nothing is transposed. Variable lengths run on packed rows.
        """
        if batch_sizes is None:
            layer_in = data if self.batch_first else data.transpose(0, 1)  # (B, T, F)
            sizes, uniform = [B] * T, True
        else:
            layer_in, sizes, uniform = data, batch_sizes.tolist(), False
        H = self.hidden_size
        hns, cns = [], []
        self.hidden_states = []
        for l in range(self.num_layers):
            h = h0[l] if h0 is not None else layer_in.new_zeros(B, H)
            c = (c0[l] if c0 is not None else layer_in.new_zeros(B, H)) if self.mode == "LSTM" else None
            outs, hn, cn = self._run_layer(layer_in, sizes, uniform, h, c, *self._weights(l), self._norms(l))
            if self.record_hidden:
                self.hidden_states.append(outs)
            layer_in = torch.stack(outs, 1) if uniform else torch.cat(outs)  # (B, T, H) or packed (rows, H)
            if self.dropout and self.training and l < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, True)
            hns.append(hn)
            cns.append(cn)
        out = layer_in
        if uniform and not self.batch_first:
            out = out.transpose(0, 1).contiguous()  # (B, T, H) -> (T, B, H)
        return out, torch.stack(hns), (torch.stack(cns) if self.mode == "LSTM" else None)


class BNLSTM(_BNRNNBase):
    r"""LSTM with batch (or layer) normalization, torch.nn.LSTM's interface; see the module docstring.

    Args:
        input_size, hidden_size, num_layers (default 1), bias (default True), batch_first
            (default False), dropout (default 0, between layers): as torch.nn.LSTM.
        norm: "none" | "vertical" | "horizontal" | "per_timestep" | "layer" (default "none").
        gamma_init: initial gamma of every norm (default 0.1 for "per_timestep", 1 otherwise).
        momentum, eps: of the batch norms (defaults 0.1, 1e-5; torch's momentum convention).
        max_steps: per-step statistics rows allocated up front (grows on demand).
        force_loop: with norm="none", run bnlab's time loop instead of torch's kernel.

    Shape: input ``(T, B, F)`` or ``(B, T, F)`` with batch_first, or a PackedSequence;
    ``lengths`` ``(B,)``. Output ``(T, B, H)``; h_n, c_n ``(num_layers, B, H)``.

    Attributes: ``record_hidden`` (set True to keep each layer's per-step hidden states, graph
    attached, in ``hidden_states[layer][t]`` for gradient diagnostics).

    Example:
        >>> import torch, bnlab
        >>> rnn = bnlab.nn.BNLSTM(3, 16, num_layers=2, batch_first=True, norm="per_timestep")
        >>> out, (h, c) = rnn(torch.randn(8, 10, 3))
        >>> out.shape, h.shape
        (torch.Size([8, 10, 16]), torch.Size([2, 8, 16]))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, **kwargs) -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         **kwargs)


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
        with guard_running_stats(self, name, self.nonfinite):
            _, hn, cn = self._run_layer(x.unsqueeze(1), [B], True, h, c, self.weight_ih, self.weight_hh, self.bias_ih,
                                        self.bias_hh, (self.norm_ih, self.norm_hh, self.norm_c), t0=step)
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
