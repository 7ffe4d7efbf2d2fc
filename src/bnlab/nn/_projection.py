"""The input projection of the fused recurrent layers, ``X W^T`` over the rows of every step, on
the recurrent kernels' matrix product (:func:`bnlab.nn._recurrent_kernels.gemm`).

The fused layers (``norm`` horizontal, per_timestep, layer; vertical for the GRU, the Elman RNN and
variable lengths) project the input of all steps in one product before the time loop. In torch
ops that is ``torch.matmul`` forward and two more products backward (the input's and the
weight's gradients), all BLAS, whose bits may change with the thread count. Here the three
products run on the micro-kernel the time loop uses (:mod:`bnlab.nn._recurrent_kernels`), the rows
(or the weight's rows) split over the kernels' threads (:func:`bnlab.kernels.cpu.threads`); every
element is one fused multiply-add chain over k in order, so the bits do not depend on the split.
Speed against torch's BLAS depends on the machine: on the 2-core AMD machines this project was first
measured on, torch's BLAS ran these shapes at less than half the micro-kernel's speed; on a 2-core
AVX-512 Xeon (2026-12-04) torch.mm was 1.1-1.5x faster than the micro-kernel (forward on
:func:`bnlab.nn._recurrent_kernels.pack_panels`' panels) and 1.3-1.6x for the weight gradient.
Kept in a module of its own: numba's cache of the recurrent kernels is keyed by their file.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..kernels import cpu as _cpu
from ..kernels._jit import recurrent_jit as _jit
from . import _buffers
from . import _recurrent_kernels as _rk

#: multiply-adds of a product from which it is split over threads (below: the calling thread)
_PARALLEL_FROM = 1 << 20


@_jit(**_rk._OPTS)
def _rows_product_part(th, nt, A, Bp, C):
    """Thread ``th``'s rows of ``C = A @ B`` (``(M, K) x (K, N)``, C-contiguous; B in
    :func:`bnlab.nn._recurrent_kernels.pack_panels`' panels), the rows of C split over ``nt`` threads."""
    M, K = A.shape
    N = C.shape[1]
    r0 = M * th // nt
    r1 = M * (th + 1) // nt
    if r1 > r0:
        _rk.gemm_panels(A, r0 * K, Bp, C, r0 * N, r1 - r0, N, K, False)


@_jit(**_rk._OPTS)
def _weight_product_part(th, nt, D, X, out):
    """Thread ``th``'s rows of ``out = D^T X`` (``(G, N) x (N, F)``), the rows of ``out`` split over ``nt`` threads: the
    columns in whole vectors on the micro-kernel (:func:`bnlab.nn._recurrent_kernels.gemm`), the
    columns past them (a narrow input: F = 1, 2, 3 ...) here, with the bits :func:`gemm` gives them.

    gemm forms such a column as a float64 sum in order over each pass of ``_KC_T`` rows (a transposed
    product's pass) of products rounded to the data dtype, added to the output pass by pass; it walks D down a column there
    (a stride of G values per product, one scalar at a time). The same sums run here row by row,
    vectorized over the units of the thread's part (D's rows are read along their length)."""
    N, G = D.shape
    F = X.shape[1]
    VL = _rk.VECTOR_BYTES // D.itemsize
    n1 = F - F % VL
    g0 = (G * th // nt) // 4 * 4
    g1 = G if th == nt - 1 else (G * (th + 1) // nt) // 4 * 4
    if g1 <= g0:
        return
    if n1 > 0:
        _rk.gemm(D, g0, True, X, 0, out, g0 * F, g1 - g0, n1, N, False)
    if n1 < F:
        ng = g1 - g0
        s = np.empty((F - n1, ng))
        for k0 in range(0, N, _rk._KC_T):
            k1 = min(k0 + _rk._KC_T, N)
            s[:] = 0.0
            for q in range(k0, k1):
                drow = D[q, g0:g1]
                for jj in range(F - n1):
                    b = X[q, n1 + jj]
                    sj = s[jj]
                    for g in range(ng):
                        sj[g] += drow[g] * b  # the product in the data dtype, summed in float64
            for jj in range(F - n1):
                sj = s[jj]
                for g in range(ng):
                    if k0 > 0:
                        out[g0 + g, n1 + jj] = out[g0 + g, n1 + jj] + sj[g]
                    else:
                        out[g0 + g, n1 + jj] = sj[g]


def _threads(m: int, n: int, k: int) -> int:
    return _cpu.threads() if m * n * k >= _PARALLEL_FROM else 1


#: bytes of a product's output from which it is split over threads whatever its multiply-adds: a
#: narrow input's product (K = 1, 2 ...) is the writing of its output. Measured (2560 x 1 by 1 x 256,
#: float32, 2.6 MB out): 160 us on one thread, 59 on two; 640 x 1 by 1 x 256: 21.5 and 19.9.
_PARALLEL_OUT_FROM = 1 << 21


def rows_product(A: np.ndarray, W: np.ndarray, C: np.ndarray) -> None:
    """``C = A @ W^T`` on the micro-kernel (2-D arrays of one dtype, A and C C-contiguous; ``W``
    ``(N, K)`` as a weight is stored, any strides: it is copied into the kernel's panels)."""
    M, K = A.shape
    N = W.shape[0]
    nt = _cpu.threads() if C.nbytes >= _PARALLEL_OUT_FROM else _threads(M, N, K)
    _rk.team(_rows_product_part, min(nt, max(1, M // 4)), (A, _rk.pack_panels(W), C))


def weight_product(D: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    """``out = D^T X`` (the weight gradient of ``Y = X W^T`` from ``D = dY``)."""
    N, G = D.shape
    F = X.shape[1]
    nt = _threads(N, G, F)
    if _rk.transposed_ok(G, F, D.itemsize):  # a narrow input: as the recurrent weights' (weight_grad)
        _rk.weight_grad(D, X, out, min(nt, G // (_rk.VECTOR_BYTES // D.itemsize)))
        return
    _rk.team(_weight_product_part, min(nt, max(1, G // 4)), (D, X, out))


def supported(x: Tensor, w: Tensor) -> bool:
    """Whether :class:`Projection` serves ``x @ w.T``: CPU float32/float64, one dtype, rows of
    at least one feature."""
    return (x.is_cpu and w.is_cpu and x.dtype in (torch.float32, torch.float64) and w.dtype == x.dtype
            and x.shape[-1] > 0 and w.shape[0] > 0)


class Projection(torch.autograd.Function):
    """``x @ w.T`` for ``x`` ``(..., F)`` and ``w`` ``(G, F)``, forward and backward on the
    micro-kernel: ``dx = dy w``, ``dw = dy^T x``; a backward that is itself to be differentiated
    (``create_graph=True``) runs in torch ops."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        F = x.shape[-1]
        G = w.shape[0]
        rows = x.detach().reshape(-1, F).contiguous()
        out = _buffers.empty((rows.shape[0], G), x.dtype)
        if rows.shape[0]:
            rows_product(rows.numpy(), w.detach().numpy(), out.numpy())
        ctx.save_for_backward(x, w)
        ctx.rows = rows
        return out.view(*x.shape[:-1], G)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w = ctx.saved_tensors
        G, F = w.shape
        need_x, need_w = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # a graph of the backward: differentiable torch ops
            d = dy.reshape(-1, G)
            return ((d @ w).view(x.shape) if need_x else None,
                    (d.t() @ x.reshape(-1, F)) if need_w else None)
        rows = ctx.rows
        d = dy.detach().reshape(-1, G).contiguous()
        dx = dw = None
        if need_x:
            dx = _buffers.empty((rows.shape[0], F), rows.dtype)
            if rows.shape[0]:
                rows_product(d.numpy(), w.detach().numpy().T, dx.numpy())
            dx = dx.view(x.shape)
        if need_w:
            dw = torch.zeros(G, F, dtype=w.dtype)
            if rows.shape[0]:
                weight_product(d.numpy(), rows.numpy(), dw.numpy())
        return dx, dw


def project(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T``: :class:`Projection` on CPU float32/float64, else ``torch.matmul``."""
    if supported(x, w):
        return Projection.apply(x, w)
    return torch.matmul(x, w.t())
