"""Warm bnlab's kernel JIT cache: ``python -m bnlab.kernels.warmup`` (run by `make setup`).

Compiles every kernel for every layout and dtype once, so the first batch norm in a fresh process
loads compiled code from numba's on-disk cache instead of compiling.
"""

from __future__ import annotations

import time

import torch


def warmup() -> float:
    import bnlab.functional as BF

    t0 = time.perf_counter()
    for dtype in (torch.float32, torch.float64):
        for shape, cl in (((4, 3, 5, 5), False), ((4, 3, 5, 5), True), ((6, 3), False), ((4, 3, 5), False), ((2, 3, 2, 2, 2), False)):
            x = torch.randn(shape, dtype=dtype)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            w = torch.ones(3, dtype=dtype, requires_grad=True)
            b = torch.zeros(3, dtype=dtype, requires_grad=True)
            rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
            y = BF.batch_norm(x, rm, rv, w, b, training=True)
            y.backward(torch.ones_like(y))
            ye = BF.batch_norm(x, rm, rv, w, b, training=False)
            ye.backward(torch.ones_like(ye))
    return time.perf_counter() - t0


if __name__ == "__main__":
    print(f"bnlab kernels warm ({warmup():.1f} s)")
