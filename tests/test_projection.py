"""The fused recurrent layers' input projection (:mod:`bnlab.nn._projection`): ``x @ w.T`` and its
gradients on the recurrent kernels' matrix product, against torch, split over threads or not."""

import pytest
import torch

import bnlab.nn._projection as PR


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("split", [False, True], ids=["calling_thread", "threads"])
def test_projection_and_its_gradients_equal_torch(dtype, split, monkeypatch):
    if split:
        monkeypatch.setattr(PR, "_PARALLEL_FROM", 0)
        monkeypatch.setattr(PR._cpu, "threads", lambda: 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, 13, generator=g, dtype=dtype).transpose(0, 1)  # strided, as a time-major view
    w = torch.randn(37, 13, generator=g, dtype=dtype)  # rows past whole vectors: a scalar tail
    dy = torch.randn(9, 6, 37, generator=g, dtype=dtype)
    a = [t.clone().requires_grad_() for t in (x, w)]
    b = [t.clone().requires_grad_() for t in (x, w)]
    ya = PR.project(*a)
    yb = b[0] @ b[1].t()
    ya.backward(dy)
    yb.backward(dy)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(ya, yb, **tol)
    assert ya.shape == (9, 6, 37)
    torch.testing.assert_close(a[0].grad, b[0].grad, **tol)
    torch.testing.assert_close(a[1].grad, b[1].grad, **tol)


def test_the_bits_do_not_depend_on_the_split(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(50, 24, generator=g), torch.randn(40, 24, generator=g)
    one = PR.project(x, w)
    monkeypatch.setattr(PR, "_PARALLEL_FROM", 0)
    monkeypatch.setattr(PR._cpu, "threads", lambda: 2)
    assert torch.equal(PR.project(x, w), one)


def test_gradcheck_and_a_graph_of_the_backward():
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(PR.project, (x, w))
    assert torch.autograd.gradgradcheck(PR.project, (x, w))  # create_graph: the backward in torch ops


def test_other_dtypes_take_torch():
    x, w = torch.randn(4, 5, dtype=torch.bfloat16), torch.randn(3, 5, dtype=torch.bfloat16)
    torch.testing.assert_close(PR.project(x, w), x @ w.t())
    assert not PR.supported(x, w)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_panels_give_gemms_bits(dtype):
    """B packed into panels (pack_panels) multiplies to the bits gemm gives on B itself: whole panels,
    a partial last one (columns past the last whole vector included), k past one pass of _KC rows,
    a block of A's rows from an offset, and accumulation."""
    import numpy as np

    rk = PR._rk
    rng = np.random.default_rng(0)
    w = rk.panel_width(dtype)
    assert w == rk._WIDE * rk.VECTOR_BYTES // np.dtype(dtype).itemsize
    for n, k in ((2 * w, 7), (2 * w + 5, 300), (w // 2 + 3, 1), (3, 40)):
        W = rng.standard_normal((n, k)).astype(dtype)  # B = W^T, as a weight is stored
        Bp = rk.pack_panels(W)
        assert Bp.shape == (-(-n // w), k, w)
        assert np.array_equal(Bp.transpose(1, 0, 2).reshape(k, -1)[:, :n], W.T)
        assert np.array_equal(rk.pack_panels(np.ascontiguousarray(W.T).T), Bp)  # W as a transposed view
        A = rng.standard_normal((11, k)).astype(dtype)
        for acc in (False, True):
            C0 = rng.standard_normal((9, n)).astype(dtype)
            C1 = C0.copy()
            rk.gemm(A, 2 * k, False, np.ascontiguousarray(W.T), 0, C0, 0, 9, n, k, acc)  # rows 2..10 of A
            rk.gemm_panels(A, 2 * k, Bp, C1, 0, 9, n, k, acc)
            assert np.array_equal(C0, C1)
        ref = A[2:].astype(np.float64) @ W.T.astype(np.float64)
        C2 = np.empty((9, n), dtype)
        rk.gemm_panels(A, 2 * k, Bp, C2, 0, 9, n, k, False)
        np.testing.assert_allclose(C2, ref, rtol=1e-4 if dtype == "float32" else 1e-12, atol=1e-4)


def test_a_wide_output_is_split_whatever_its_multiply_adds(monkeypatch):
    """A narrow input's product (K = 1: few multiply-adds, a large output) goes to the threads by its
    output's size, with the bits of the calling thread's product."""
    calls = []
    real_team = PR._rk.team

    def team(body, nt, args):
        calls.append(nt)
        real_team(body, nt, args)

    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(640, 1, generator=g), torch.randn(256, 1, generator=g)
    monkeypatch.setattr(PR._cpu, "threads", lambda: 2)
    monkeypatch.setattr(PR._rk, "team", team)
    one = PR.project(x, w)  # 640 x 256 x 4 bytes: below the output's threshold
    monkeypatch.setattr(PR, "_PARALLEL_OUT_FROM", 640 * 256 * 4)
    two = PR.project(x, w)
    assert calls == [1, 2]
    assert torch.equal(one, two)
    assert torch.equal(one, x * w.t())  # K = 1: one rounding of each product


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_narrow_inputs_weight_gradient_formed_transposed_has_the_same_bits(dtype):
    """weight_grad forms D^T X as (X^T D)^T for a narrow X (transposed_ok): the bits of the direct
    product, on one thread or two, k past one pass of _KC rows; the projection's weight gradient too."""
    import numpy as np

    rk = PR._rk
    rng = np.random.default_rng(3)
    VL = rk.VECTOR_BYTES // np.dtype(dtype).itemsize
    for N, G, F in ((300, 4 * VL, VL), (37, 2 * VL, 2 * VL), (600, 8 * VL, 2 * VL)):
        assert rk.transposed_ok(G, F, np.dtype(dtype).itemsize)
        D = rng.standard_normal((N, G)).astype(dtype)
        X = rng.standard_normal((N, F)).astype(dtype)
        direct = np.empty((G, F), dtype)
        rk.team(rk._weight_grad_part, 1, (D, X, direct))
        for nt in (1, 2):
            out = np.empty((G, F), dtype)
            rk.weight_grad(D, X, out, nt)
            assert np.array_equal(out, direct)
        proj = np.empty((G, F), dtype)
        PR.weight_product(D, X, proj)
        assert np.array_equal(proj, direct)
        np.testing.assert_allclose(direct, D.T.astype(np.float64) @ X.astype(np.float64),
                                   rtol=1e-4 if dtype == "float32" else 1e-12, atol=1e-3)
    assert not rk.transposed_ok(4 * VL, rk._TRANSPOSED_MAX_F + VL, np.dtype(dtype).itemsize)  # a wide input
    assert not rk.transposed_ok(4 * VL, VL + 1, np.dtype(dtype).itemsize)  # a part vector: the direct product
