"""The stacked linear layers' products on CPU: G independent ``x_g @ W_g`` on bnlab's matrix
micro-kernel (:func:`bnlab.nn._recurrent_kernels.gemm`), forward and backward.

Why: the audit trains its MLP testbeds as G stacked members, so most of a step is G small
products (batch 32-256 rows, 64-256 features). torch runs them through ``bmm``, i.e. MKL, which
takes its AVX2 code path on the AMD machines this project is measured on: about 90 GFLOP/s on one
core for ``(35, 64, 128) @ (35, 128, 128)``, where the micro-kernel runs at about 210. The
micro-kernel also reads and writes each member's block where it lies in the stacked layout
``(N, G * in)``, so the transposes to and from ``(G, N, in)`` around ``bmm`` (a copy each way,
forward and backward) go away.

Every member's block is addressed as a 2-D array plus offsets: member g's input block is
``X[:, g * xo : g * xo + in]`` of a 2-D ``X`` (stacked: ``(N, G * in)``, ``xo = in``; shared:
``(N, in)``, ``xo = 0``) or rows ``g * xr ..`` of ``(G * N, in)`` (members first: ``xr = N``);
likewise the output (``yo``, ``yr``). :func:`stacked_matmul` is the autograd function; float32 and float64 on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import cpu as _cpu
from ..kernels._jit import recurrent_jit as _jit
from ..nn._recurrent_kernels import _OPTS, gemm, team

__all__ = ["stacked_matmul", "serves"]


@_jit(**_OPTS)
def _forward_part(th, nt, X, xo, xr, W, Y, yo, yr, G, N, K, M):
    """``Y_g = X_g @ W[g]`` for thread ``th``'s members (of ``nt`` threads): X_g the ``N x K`` block at
    flat offset ``g * xo`` (rows ``g * xr`` further down when members come first), Y_g likewise; W
    ``(G, K, M)``."""
    for g in range(G * th // nt, G * (th + 1) // nt):
        gemm(X, g * xo + g * xr * X.shape[1], False, W[g], 0, Y, g * yo + g * yr * Y.shape[1], N, M, K, False)


@_jit(**_OPTS)
def _input_grad_part(th, nt, DY, yo, yr, WT, DX, xo, xr, G, N, K, M, shared):
    """``dX_g = dY_g @ W[g]^T`` (``WT`` = W transposed, ``(G, M, K)``) for thread ``th``'s members; a
    shared input sums the members' gradients (in member order, one accumulating product per member:
    its caller gives it one thread)."""
    if shared:
        for g in range(G):
            gemm(DY, g * yo + g * yr * DY.shape[1], False, WT[g], 0, DX, 0, N, K, M, g > 0)
        return
    for g in range(G * th // nt, G * (th + 1) // nt):
        gemm(DY, g * yo + g * yr * DY.shape[1], False, WT[g], 0, DX, g * xo + g * xr * DX.shape[1], N, K, M, False)


@_jit(**_OPTS)
def _weight_grad_part(th, nt, X, xo, xr, DY, yo, yr, DW, G, N, K, M):
    """``dW[g] = X_g^T @ dY_g`` for thread ``th``'s members: op(A) the transpose of X's block, B dY's
    block (``b_off`` its first column; a members-first dY is passed as the member's rows)."""
    for g in range(G * th // nt, G * (th + 1) // nt):
        if yr:
            gemm(X, g * xo + g * xr * X.shape[1], True, DY[g * yr:(g + 1) * yr], 0, DW[g], 0, K, M, N, False)
        else:
            gemm(X, g * xo + g * xr * X.shape[1], True, DY, g * yo, DW[g], 0, K, M, N, False)


def _run(body, parts, *args):
    """``body`` on a team of :func:`bnlab.kernels.cpu.threads` threads, at most one per part (the
    calling thread alone where that is 1: one thread asked for, or a forked child that may only run
    serial code)."""
    team(body, min(_cpu.threads(), parts), args)


def serves(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`stacked_matmul` takes these tensors (CPU float32/float64, same dtype)."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype
            and x.dtype in (torch.float32, torch.float64) and not x.is_complex())


def _geometry(layout: str, x: Tensor, G: int, K: int):
    """``(X2d, xo, xr, N)``: the 2-D array member blocks are read from, the flat column offset and
    the row offset between members (see the module docstring)."""
    if layout == "stacked":  # (N, G*K)
        return x, K, 0, x.shape[0]
    if layout == "shared":  # (N, K)
        return x, 0, 0, x.shape[0]
    n = x.shape[1]  # members: (G, N, K) -> (G*N, K)
    return x.reshape(G * n, K), 0, n, n


class _StackedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, layout, members_first_out):
        G, K, M = weight.shape
        x = x.contiguous()
        X, xo, xr, N = _geometry(layout, x, G, K)
        w = weight.detach().contiguous()
        if members_first_out:
            y = torch.empty(G, N, M, dtype=x.dtype)
            Y, yo, yr = y.view(G * N, M), 0, N
        else:
            y = torch.empty(N, G * M, dtype=x.dtype)
            Y, yo, yr = y, M, 0
        _run(_forward_part, G, X.detach().numpy(), xo, xr, w.numpy(), Y.numpy(), yo, yr, G, N, K, M)
        ctx.save_for_backward(x, w)
        ctx.geo = (layout, members_first_out, G, N, K, M)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError("the stacked matmul has a first-order backward only (create_graph=True asks for more)")
        x, w = ctx.saved_tensors
        layout, members_first_out, G, N, K, M = ctx.geo
        X, xo, xr, _ = _geometry(layout, x, G, K)
        dy = dy.contiguous()
        if members_first_out:
            DY, yo, yr = dy.view(G * N, M), 0, N
        else:
            DY, yo, yr = dy, M, 0
        dyn = DY.numpy()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            DX, _, _, _ = _geometry(layout, dx, G, K)
            wt = w.transpose(1, 2).contiguous()
            shared = layout == "shared"  # the members' gradients summed in order: one part
            _run(_input_grad_part, 1 if shared else G, dyn, yo, yr, wt.numpy(), DX.numpy(), xo, xr, G, N, K, M, shared)
        if ctx.needs_input_grad[1]:
            dw = torch.empty(G, K, M, dtype=w.dtype)
            _run(_weight_grad_part, G, X.detach().numpy(), xo, xr, dyn, yo, yr, dw.numpy(), G, N, K, M)
        return dx, dw, None, None


def stacked_matmul(x: Tensor, weight: Tensor, layout: str = "stacked", members_first_out: bool = False) -> Tensor:
    """G products ``x_g @ weight[g]``, ``weight`` ``(G, K, M)``. ``layout``: how ``x`` holds the
    members' inputs: "stacked" ``(N, G*K)``, "shared" ``(N, K)`` (one input for all), "members"
    ``(G, N, K)``. Returns ``(N, G*M)``, or ``(G, N, M)`` with ``members_first_out``."""
    return _StackedMatmul.apply(x, weight, layout, members_first_out)
