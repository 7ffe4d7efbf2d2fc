"""Warm bnlab's kernel JIT cache: ``python -m bnlab.kernels.warmup`` (run by `make setup`/`make test`).

Compiles every kernel for every layout, dtype and parameter combination the library reaches
(rows and columns layouts, float32 and float64, with and without an affine weight, training and
eval, forward and backward, the running-statistics update), small inputs (one thread) and large
ones (the thread pool) alike, and then the serial twins a forked child runs
(:func:`bnlab.kernels.cpu.serial_kernels`), so that the first batch norm in a fresh process, or in
a DataLoader fork worker, loads compiled code from numba's on-disk cache (``cache=True``, next to
the kernels' source) instead of compiling. A warm cache makes this command itself take about a
second; a cold one about 45 s on the 2-core machines here (the serial twins about 9 s of it).
"""

from __future__ import annotations

import time

import torch


def warmup() -> float:
    import bnlab.functional as BF
    from bnlab.kernels import cpu

    t0 = time.perf_counter()
    shapes = [
        ((4, 3, 5, 5), None), ((4, 3, 5, 5), torch.channels_last), ((6, 3), None), ((4, 3, 5), None),
        ((2, 3, 2, 2, 2), None), ((2, 3, 2, 2, 2), torch.channels_last_3d),
        ((8, 3, 48, 48), None), ((8, 3, 48, 48), torch.channels_last), ((8192, 3), None),  # above SERIAL_BELOW
    ]
    assert 8 * 3 * 48 * 48 > cpu.SERIAL_BELOW
    for serial in (False, True):
        cpu.use_serial_kernels(serial)
        try:
            _pass(BF, shapes)
        finally:
            cpu.use_serial_kernels(False)
    return time.perf_counter() - t0


def _pass(BF, shapes) -> None:
    for dtype in (torch.float32, torch.float64):
        for shape, fmt in shapes:
            for affine in (True, False):
                x = torch.randn(shape, dtype=dtype)
                if fmt is not None:
                    x = x.contiguous(memory_format=fmt)
                x.requires_grad_(True)
                w = torch.ones(3, dtype=dtype, requires_grad=True) if affine else None
                b = torch.zeros(3, dtype=dtype, requires_grad=True) if affine else None
                rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
                nbt = torch.tensor(0)
                y = BF.batch_norm(x, rm, rv, w, b, training=True, num_batches_tracked=nbt)
                y.backward(torch.ones_like(y))
                ye = BF.batch_norm(x, rm, rv, w, b, training=False)
                ye.backward(torch.ones_like(ye))


if __name__ == "__main__":
    print(f"bnlab kernels warm ({warmup():.1f} s)", flush=True)
