"""The fused recurrent kernels' row sums (layer norm's statistics, its backward's dot products) are
vector code with a fixed order of additions: they must give exactly the sums of that order, written
out here in plain float64 arithmetic, for every length (whole vectors, tails, empty rows) and dtype."""

import numpy as np
import pytest
from numba import njit

from bnlab.nn import _recurrent_kernels as rk


@njit(cache=False)
def _sum_dev_of(v, n, s):
    return rk._sum_dev(v, n, s)


@njit(cache=False)
def _dots_of(dy, g, xh, n):
    return rk._dots(dy, g, xh, n)


def _ref_sum_dev(v, n, s):
    a, q = [0.0] * 8, [0.0] * 8
    m = n - n % 8
    for j in range(m):
        d = float(v[j]) - s
        a[j % 8] += d
        q[j % 8] += d * d
    for j in range(m, n):
        d = float(v[j]) - s
        a[0] += d
        q[0] += d * d
    def comb(x):
        return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]))
    return comb(a), comb(q)


def _ref_dots(dy, g, xh, n):
    a, q = [0.0] * 4, [0.0] * 4
    m = n - n % 4
    for j in range(n):
        e = float(dy[j]) * float(g[j])
        k = j % 4 if j < m else 0
        a[k] += e
        q[k] += e * float(xh[j])
    return (a[0] + a[1]) + (a[2] + a[3]), (q[0] + q[1]) + (q[2] + q[3])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_statistics_sums_are_the_fixed_order_sums(dtype):
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 16, 31, 128, 129, 515):
        for _ in range(4):
            v = (rng.standard_normal(n + 3) * rng.uniform(1e-2, 1e4) + rng.uniform(-1e5, 1e5)).astype(dtype)
            s = float(v[0]) if n else 0.25
            got = _sum_dev_of(v, n, s)
            want = _ref_sum_dev(v, n, s)
            assert got == want, (n, got, want)  # exactly: the same additions in the same order
    v = np.array([1.0, np.nan, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], dtype)
    assert all(np.isnan(_sum_dev_of(v, 9, 1.0)))


def test_layer_norm_backward_dot_products_are_the_fixed_order_sums():
    rng = np.random.default_rng(1)
    for n in (0, 1, 3, 4, 5, 127, 128, 130, 512):
        for _ in range(4):
            dy, g, xh = (rng.standard_normal(n + 2) * rng.uniform(1e-3, 1e3) for _ in range(3))
            got = _dots_of(dy, g, xh, n)
            assert got == _ref_dots(dy, g, xh, n), n
