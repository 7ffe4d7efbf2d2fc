"""The fast paths of BNLSTM / BNGRU / BNRNN (vertical: torch's kernel with the input norm folded in;
horizontal / per_timestep / layer: the fused whole-sequence kernels) against the reference time loop
(force_loop=True): outputs, final states, every gradient and every buffer, in every layout, both
directions, with a projection; gradcheck through time in float64."""

import copy

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from bnlab.nn import BNGRU, BNLSTM, BNRNN
from bnlab.nn import _recurrent_kernels as rk

DT = torch.float64
LENGTHS = torch.tensor([7, 2, 5, 7, 1, 4])  # a sequence of length 1: steps with one row (no batch statistics)


def _build(cls, norm, bidirectional=False, proj=0, batch_first=True, dtype=DT, layers=2, **kw):
    torch.manual_seed(0)
    extra = {"proj_size": proj} if proj else {}
    m = cls(9 if norm == "layer" else 3, 5, layers, batch_first=batch_first, norm=norm, bidirectional=bidirectional,
            momentum=0.3, dtype=dtype, **extra, **kw)
    ref = copy.deepcopy(m)
    ref.force_loop = True
    return m, ref


def _run(m, x, lengths=None):
    """One training-style call: outputs, final states, input and parameter gradients, buffers."""
    for p in m.parameters():
        p.grad = None
    xx = x.clone().requires_grad_(True)
    out, st = m(xx, lengths=lengths)
    states = st if isinstance(st, tuple) else (st,)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * w).sum() + sum((s * s).sum() * (k + 1) for k, s in enumerate(states))
    loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    return out.detach(), [s.detach() for s in states], xx.grad, grads, {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b, **tol):
    out_a, st_a, dx_a, g_a, sd_a = a
    out_b, st_b, dx_b, g_b, sd_b = b
    torch.testing.assert_close(out_a, out_b, **tol, msg="output")
    for u, v in zip(st_a, st_b):
        torch.testing.assert_close(u, v, **tol, msg="final state")
    torch.testing.assert_close(dx_a, dx_b, **tol, msg="input gradient")
    assert g_a.keys() == g_b.keys()
    for n in g_a:
        assert (g_a[n] is None) == (g_b[n] is None), n
        if g_a[n] is not None:
            torch.testing.assert_close(g_a[n], g_b[n], **tol, msg=f"gradient of {n}")
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        torch.testing.assert_close(sd_a[k], sd_b[k], **tol, msg=f"buffer {k}")


def _input(m, B=6, T=7):
    g = torch.Generator().manual_seed(1)
    shape = (B, T, m.input_size) if m.batch_first else (T, B, m.input_size)
    return torch.randn(shape, generator=g, dtype=DT) * 1.5 + 0.3


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("layout", ["batch_first", "time_major", "lengths"])
@pytest.mark.parametrize("norm", ["vertical", "horizontal", "per_timestep", "layer"])
@pytest.mark.parametrize("cls", [BNLSTM, BNGRU, BNRNN], ids=["LSTM", "GRU", "RNN"])
def test_fast_path_equals_the_reference_loop_in_training_and_eval(cls, norm, layout, bidirectional):
    m, ref = _build(cls, norm, bidirectional, batch_first=layout != "time_major")
    x = _input(m)
    lengths = LENGTHS if layout == "lengths" else None
    for mode in ("train", "eval", "train"):
        getattr(m, mode)(), getattr(ref, mode)()
        _same(_run(m, x, lengths), _run(ref, x, lengths))


@pytest.mark.parametrize("norm", ["none", "vertical", "horizontal", "per_timestep", "layer"])
@pytest.mark.parametrize("cls", [BNLSTM, BNGRU, BNRNN], ids=["LSTM", "GRU", "RNN"])
def test_lengths_all_shorter_than_the_padded_input_run_every_path(cls, norm):
    """Padding past the longest sequence (every length below T): the packed steps are fewer than T;
    the fast paths equal the reference loop, and the output keeps T steps, zeros past each end."""
    m, ref = _build(cls, norm, True, batch_first=True)
    x = _input(m, B=6, T=9)
    lengths = torch.tensor([5, 2, 6, 1, 4, 6])
    for mode in ("train", "eval"):
        getattr(m, mode)(), getattr(ref, mode)()
        a = _run(m, x, lengths)
        _same(a, _run(ref, x, lengths))
        assert a[0].shape[:2] == (6, 9)
        for i, n in enumerate(lengths.tolist()):
            assert bool((a[0][i, n:] == 0).all())


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
@pytest.mark.parametrize("cls", [BNLSTM, BNGRU], ids=["LSTM", "GRU"])
def test_vertical_with_an_input_that_needs_no_gradient_equals_the_reference_loop(cls, batch_first):
    # the first layer's centred rows are then a constant (no rows gradient); the layers above read
    # the layer below in torch's time-major memory: same numbers as the loop, same output layout
    m, ref = _build(cls, "vertical", True, batch_first=batch_first, layers=3)
    x = _input(m)
    for mode in ("train", "eval"):
        getattr(m, mode)(), getattr(ref, mode)()
        res = []
        for mod in (m, ref):
            for p in mod.parameters():
                p.grad = None
            out, st = mod(x)
            h = st[0] if isinstance(st, tuple) else st
            (out.pow(2).sum() + h.sum()).backward()
            res.append((out.detach(), h.detach(), {n: p.grad for n, p in mod.named_parameters()},
                        {k: v.clone() for k, v in mod.state_dict().items()}))
        (out_a, h_a, g_a, sd_a), (out_b, h_b, g_b, sd_b) = res
        assert out_a.shape == out_b.shape == x.shape[:2] + (2 * 5,)
        torch.testing.assert_close(out_a, out_b)
        torch.testing.assert_close(h_a, h_b)
        for n in g_b:
            torch.testing.assert_close(g_a[n], g_b[n], msg=f"gradient of {n}")
        for k in sd_b:
            torch.testing.assert_close(sd_a[k], sd_b[k], msg=f"buffer {k}")


@pytest.mark.parametrize("norm", ["vertical", "horizontal", "per_timestep", "layer"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_fast_path_with_a_projection_equals_the_reference_loop(norm, bidirectional):
    m, ref = _build(BNLSTM, norm, bidirectional, proj=3)
    x = _input(m)
    for lengths in (None, LENGTHS):
        _same(_run(m, x, lengths), _run(ref, x, lengths))
    m.eval(), ref.eval()
    _same(_run(m, x, LENGTHS), _run(ref, x, LENGTHS))


def test_packed_input_runs_the_fast_path_like_lengths():
    m, ref = _build(BNLSTM, "per_timestep", True)
    x = _input(m)
    packed = pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False)
    out_a, (h_a, c_a) = m(packed)
    out_b, (h_b, c_b) = ref(packed)
    torch.testing.assert_close(out_a.data, out_b.data)
    torch.testing.assert_close(h_a, h_b)
    torch.testing.assert_close(c_a, c_b)


@pytest.mark.parametrize("norm", ["vertical", "horizontal", "per_timestep", "layer"])
@pytest.mark.parametrize("cls", [BNLSTM, BNGRU], ids=["LSTM", "GRU"])
def test_float32_fast_path_is_as_accurate_as_the_float32_reference_loop(cls, norm):
    m, ref = _build(cls, norm, dtype=torch.float32)
    truth = copy.deepcopy(m).double()
    x = _input(m).float()
    a, b, t = _run(m, x, LENGTHS), _run(ref, x, LENGTHS), _run(truth, x.double(), LENGTHS)

    def err(u, v):  # relative to the largest value
        return float((u.double() - v).abs().max() / v.abs().max().clamp_min(1e-30))

    # float32 rounding through 7 steps, 2 layers and batch statistics of as few as 2 rows: both
    # implementations land within a few 1e-5 of the float64 truth, neither always closer
    for k in (0, 2):  # output, input gradient
        assert err(a[k], t[k]) <= max(1e-4, 4 * err(b[k], t[k])), k
    for n in t[3]:
        assert err(a[3][n], t[3][n]) <= max(2e-4, 4 * err(b[3][n], t[3][n])), n
    for k in t[4]:
        if t[4][k].is_floating_point():
            assert err(a[4][k], t[4][k]) <= max(1e-6, 4 * err(b[4][k], t[4][k])), k


def test_relu_rnn_and_a_layer_without_bias_equal_the_reference_loop():
    for kw in ({"nonlinearity": "relu"}, {"bias": False}):
        torch.manual_seed(3)
        m = BNRNN(3, 5, 2, batch_first=True, norm="per_timestep", dtype=DT, **kw)
        ref = copy.deepcopy(m)
        ref.force_loop = True
        x = _input(m)
        _same(_run(m, x, LENGTHS), _run(ref, x, LENGTHS))


@pytest.mark.parametrize("norm, cls, kw", [
    ("per_timestep", BNLSTM, {}),
    ("layer", BNLSTM, {"proj_size": 2}),
    ("horizontal", BNGRU, {}),
    ("per_timestep", BNGRU, {"bidirectional": True}),
    ("layer", BNRNN, {"nonlinearity": "relu"}),
    ("vertical", BNLSTM, {"bidirectional": True}),
])
def test_gradcheck_through_time_in_float64(norm, cls, kw):
    torch.manual_seed(4)
    m = cls(9 if norm == "layer" else 2, 3, 1, batch_first=True, norm=norm, dtype=DT, **kw)
    x = torch.randn(4, 3, m.input_size, dtype=DT, requires_grad=True)
    lengths = torch.tensor([3, 1, 2, 3])  # step 2 has one row: population statistics there
    params = [p for p in m.parameters()]

    def f(x, *ps):
        out, st = m(x, lengths=lengths)
        states = st if isinstance(st, tuple) else (st,)
        return (out, *states)

    assert torch.autograd.gradcheck(f, (x, *params), atol=1e-6)
    m.eval()
    assert torch.autograd.gradcheck(f, (x, *params), atol=1e-6)


def test_initial_states_get_gradients_through_the_fused_kernel():
    m, ref = _build(BNLSTM, "per_timestep", True, proj=2)
    x = _input(m)
    h0 = torch.randn(4, 6, 2, dtype=DT)
    c0 = torch.randn(4, 6, 5, dtype=DT)
    grads = []
    for mod in (m, ref):
        h, c = h0.clone().requires_grad_(True), c0.clone().requires_grad_(True)
        out, (hn, cn) = mod(x, (h, c), lengths=LENGTHS)
        (out.sum() + hn.pow(2).sum() + cn.sum()).backward()
        grads.append((h.grad, c.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@pytest.mark.parametrize("norm", ["vertical", "per_timestep"])
def test_double_backward_names_force_loop_and_force_loop_provides_it(norm):
    m, ref = _build(BNLSTM, norm, layers=1)
    x = _input(m).requires_grad_(True)
    out, _ = m(x)
    with pytest.raises(RuntimeError, match="first-order backward only .*force_loop=True"):
        torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(m(x)[0].pow(2).sum(), x)  # first order is fine
    assert torch.isfinite(g).all()
    out, _ = ref(x)
    (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    g.sum().backward()  # the reference loop differentiates to any order
    assert x.grad is not None


def test_vector_math_is_accurate_to_float64_rounding():
    x = np.concatenate([np.linspace(-40, 40, 20001), np.logspace(-12, 1, 500), -np.logspace(-12, 1, 500)])
    with np.errstate(over="ignore"):
        np.testing.assert_allclose(rk.vector_math(x, 0), np.exp(x), rtol=4e-16 * 8)
        np.testing.assert_allclose(rk.vector_math(x, 1), 1 / (1 + np.exp(-x)), rtol=4e-16 * 8)
    np.testing.assert_allclose(rk.vector_math(x, 2), np.tanh(x), rtol=4e-16 * 8, atol=0)
    special = np.array([np.nan, np.inf, -np.inf, 800.0, -800.0])
    t = rk.vector_math(special, 2)
    assert np.isnan(t[0]) and list(t[1:]) == [1.0, -1.0, 1.0, -1.0]
    s = rk.vector_math(special, 1)
    assert np.isnan(s[0]) and s[1] == 1.0 and s[2] < 1e-300 and s[3] == 1.0 and s[4] < 1e-300
    x32 = x.astype(np.float32)  # float32 data: float32 math, within 3 units in the last place
    xd = x32.astype(np.float64)
    for which, want in ((1, 1 / (1 + np.exp(-xd))), (2, np.tanh(xd))):
        got = rk.vector_math(x32, which).astype(np.float64)
        ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        assert np.max(np.abs(got - want) / ulp) <= 3.0, which
    t32 = rk.vector_math(special.astype(np.float32), 2)
    assert np.isnan(t32[0]) and list(t32[1:]) == [1.0, -1.0, 1.0, -1.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_micro_kernel_matrix_product_equals_numpy(dtype):
    rng = np.random.default_rng(0)
    for m, n, k in ((64, 256, 128), (7, 5, 3), (63, 70, 130), (9, 100, 600), (4, 64, 1), (5, 33, 0), (6, 40, 9)):
        A = rng.standard_normal((m + 3, k + 2)).astype(dtype)
        B = rng.standard_normal((k, n + 3)).astype(dtype)
        want = A[2:2 + m, 1:1 + k].astype(np.float64) @ B[:, 3:]
        C = np.full((m, n), 7.0, dtype)
        rk.gemm(A, 2 * A.shape[1] + 1, False, B, 3, C, 0, m, n, k, False)  # a block of A (row 2, column 1), of B
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(C, want, **tol)
        rk.gemm(A, 2 * A.shape[1] + 1, False, B, 3, C, 0, m, n, k, True)  # accumulate
        np.testing.assert_allclose(C, 2 * want, **tol)
        At = np.ascontiguousarray(A[2:2 + m, 1:1 + k].T)  # (k, m): the transposed operand
        D = np.empty((m, n), dtype)
        rk.gemm(At, 0, True, B, 3, D, 0, m, n, k, False)
        np.testing.assert_allclose(D, want, **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_column_block_of_the_matrix_product_has_the_bits_of_the_whole(dtype):
    """The fused kernels split a step's matmul by columns over threads: a block that starts a whole
    number of vectors into the product gets exactly the bits the whole product gives it."""
    rng = np.random.default_rng(2)
    vl = rk.VECTOR_BYTES // np.dtype(dtype).itemsize
    m, k = 13, 300  # past one k pass of either product
    n = 7 * vl + 5  # whole blocks of 4, 2 and 1 vectors, and a scalar tail
    A = rng.standard_normal((m, k)).astype(dtype)
    B = rng.standard_normal((k, n)).astype(dtype)
    whole = np.empty((m, n), dtype)
    rk.gemm(A, 0, False, B, 0, whole, 0, m, n, k, False)
    # the transposed operand (the weight gradients' D^T X: A's columns packed per panel of _KC_T rows)
    At = np.ascontiguousarray(A.T)
    tr = np.empty((m, n), dtype)
    rk.gemm(At, 0, True, B, 0, tr, 0, m, n, k, False)
    ref = A.astype(np.float64) @ B.astype(np.float64)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tr, ref, **tol)
    np.testing.assert_allclose(whole, ref, **tol)
    # within one pass of either (k up to the shorter pass), the two products have the same bits
    k1 = min(rk._KC, rk._KC_T)
    one, one_t = np.empty((m, n), dtype), np.empty((m, n), dtype)
    rk.gemm(A, 0, False, B, 0, one, 0, m, n, k1, False)
    rk.gemm(np.ascontiguousarray(A[:, :k1].T), 0, True, B, 0, one_t, 0, m, n, k1, False)
    assert np.array_equal(one, one_t)
    for j0, j1 in ((0, vl), (vl, 3 * vl), (3 * vl, n), (2 * vl, 7 * vl)):
        part = np.zeros((m, n), dtype)
        rk.gemm(A, 0, False, B, j0, part, j0, m, j1 - j0, k, False)
        assert np.array_equal(part[:, j0:j1], whole[:, j0:j1]), (j0, j1)
        rows = np.zeros((m, n), dtype)
        rk.gemm(A, 4 * k, False, B, j0, rows, 4 * n + j0, 5, j1 - j0, k, False)  # rows 4..8 alone
        assert np.array_equal(rows[4:9, j0:j1], whole[4:9, j0:j1]), (j0, j1)
        part_t = np.zeros((m, n), dtype)
        rk.gemm(At, 0, True, B, j0, part_t, j0, m, j1 - j0, k, False)  # a column block of the transposed
        assert np.array_equal(part_t[:, j0:j1], tr[:, j0:j1]), (j0, j1)
        rows_t = np.zeros((m, n), dtype)
        rk.gemm(At, 4, True, B, j0, rows_t, 4 * n + j0, 5, j1 - j0, k, False)  # rows 4..8 of the transposed
        assert np.array_equal(rows_t[4:9, j0:j1], tr[4:9, j0:j1]), (j0, j1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_weight_product_of_a_narrow_input_has_the_micro_kernels_bits(dtype, threads):
    """The input projection's weight gradient D^T X forms the columns past the last whole vector
    (inputs of 1, 2, 3 ... features) itself, vectorized: the bits the micro-kernel's own column
    tail gives, past one k panel, for narrow and wide inputs, on one thread and on two."""
    from bnlab.nn import _projection

    rng = np.random.default_rng(3)
    vl = rk.VECTOR_BYTES // np.dtype(dtype).itemsize
    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for N, G, F in ((600, 40, 1), (600, 40, 2), (300, 24, vl + 3), (513, 64, 2 * vl), (7, 8, 3), (2048, 256, 2),
                        (2048, 256, vl + 3)):  # the last two: products large enough to split over threads
            D = rng.standard_normal((N, G)).astype(dtype)
            X = rng.standard_normal((N, F)).astype(dtype)
            ours, theirs = np.full((G, F), np.nan, dtype), np.full((G, F), np.nan, dtype)
            _projection.weight_product(D, X, ours)
            rk.weight_grad(D, X, theirs, 1)
            assert np.array_equal(ours, theirs), (N, G, F)
            tol = dict(rtol=1e-4, atol=1e-3) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-9)
            np.testing.assert_allclose(ours, D.T.astype(np.float64) @ X.astype(np.float64), **tol)
    finally:
        torch.set_num_threads(was)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_input_moments_are_the_float64_mean_and_covariance(dtype):
    rng = np.random.default_rng(1)
    for n, f in ((257, 9), (5, 1), (301, 37), (130, 64)):
        x = (rng.standard_normal((n, f)) * 3 + 1e3).astype(dtype)  # a large common offset
        # rows formed in float64 a chunk at a time: every row at once, the default (0), chunks that divide nothing
        for chunk in (n, 0, 7, 1):
            mu, mu_r, sigma = np.empty(f), np.empty(f, dtype), np.full((f, f), np.nan)
            xc = np.empty_like(x)
            rk.moments(x, mu, mu_r, sigma, xc, chunk)
            xd = x.astype(np.float64)
            np.testing.assert_allclose(mu, xd.mean(0), rtol=1e-15)
            c = xd - xd.mean(0)
            np.testing.assert_allclose(sigma, c.T @ c / n, rtol=1e-12, atol=1e-12)
            assert np.array_equal(sigma, sigma.T)
            assert np.array_equal(xc, x - mu_r) and np.array_equal(mu_r, mu.astype(dtype))


def test_the_fold_of_the_vertical_norm_passes_gradcheck_and_both_implementations_agree():
    from bnlab.nn.recurrent import _FoldCpuFn, _FoldFn

    torch.manual_seed(5)
    rows = (torch.randn(11, 3, dtype=DT) + 3).requires_grad_()
    w0 = torch.randn(8, 3, dtype=DT, requires_grad=True)
    g0 = (torch.rand(8, dtype=DT) + 0.5).requires_grad_()
    b0 = torch.randn(8, dtype=DT, requires_grad=True)
    w1 = torch.randn(8, 3, dtype=DT, requires_grad=True)

    perm = np.array([0, 1, 2, 3, 6, 7, 4, 5])  # an LSTM's gate order against its norm's (hidden size 2)
    tperm = torch.from_numpy(perm)

    def folds(r, w0, g0, b0, w1, cpu, p=None):
        """(xc, W'_0, shift_0, W'_1, shift_1) and the statistics; two directions sharing the rows, the
        second without gamma and beta."""
        if cpu:
            sink = []
            res = _FoldCpuFn.apply(1e-5, p, sink, r, w0, g0, b0, w1, None, None)
            return res, [torch.from_numpy(a) for st in sink for a in st]
        gp, bp = (g0, b0) if p is None else (g0[tperm], b0[tperm])
        res = _FoldFn.apply(1e-5, r, w0, gp, bp, w1, None, None)
        stats = [res[3], res[4], res[7], res[8]]
        if p is not None:  # the statistics in the norm's order (perm is its own inverse)
            stats = [s[tperm] for s in stats]
        return (res[0], res[1], res[2], res[5], res[6]), stats

    for cpu in (False, True):  # torch ops (other devices), compiled (CPU)
        for p in (None, perm):
            assert torch.autograd.gradcheck(lambda *a: folds(*a, cpu=cpu, p=p)[0], (rows, w0, g0, b0, w1))
    for p in (None, perm):
        (a, sa), (b, sb) = folds(rows, w0, g0, b0, w1, True, p), folds(rows, w0, g0, b0, w1, False, p)
        for u, v in zip(list(a) + sa, list(b) + sb):
            torch.testing.assert_close(u, v)


@pytest.mark.parametrize("norm", ["none", "vertical", "horizontal"])
def test_a_parametrized_weight_is_read_through_its_parametrization(norm):
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    m, _ = _build(BNLSTM, norm, layers=1)
    x = _input(m)
    ref = m(x)[0].detach()
    parametrize.register_parametrization(m, "weight_hh_l0", Double())
    with torch.no_grad():
        m.parametrizations.weight_hh_l0.original.mul_(0.5)  # 2 * (w / 2): the same weight
    out = m(x)[0]
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert m.parametrizations.weight_hh_l0.original.grad is not None


@pytest.mark.parametrize("cls", [BNLSTM, BNGRU], ids=["LSTM", "GRU"])
def test_the_fused_layers_fold_a_narrow_inputs_norm_and_normalize_a_wide_ones_projection(cls, monkeypatch):
    # horizontal: layer 0 (3 inputs, 4 * 3 < G) folds its input norm into W_ih; layer 1 (5 inputs, bidirectional:
    # 10, 4 * 10 >= G) normalizes the projection; both equal the loop in training and eval
    import bnlab.nn.recurrent as R

    calls = []
    fold = R._fold_layer
    monkeypatch.setattr(R, "_fold_layer", lambda *a: calls.append(a[2].shape[-1]) or fold(*a))
    m, ref = _build(cls, "horizontal", True)
    x = _input(m)
    for mode in ("train", "eval"):
        getattr(m, mode)(), getattr(ref, mode)()
        calls.clear()
        _same(_run(m, x), _run(ref, x))
        assert calls == [3]


@pytest.mark.parametrize("norm", ["none", "vertical", "horizontal", "per_timestep", "layer"])
@pytest.mark.parametrize("cls", [BNLSTM, BNGRU, BNRNN], ids=["LSTM", "GRU", "RNN"])
def test_an_empty_batch_gives_torchs_shapes_and_moves_no_buffer(cls, norm):
    """A batch of 0 sequences (torch's layers accept one): outputs and final states of torch's
    shapes, a backward that runs, and no running statistic touched."""
    torch.manual_seed(0)
    extra = {"proj_size": 3} if cls is BNLSTM else {}
    m = cls(4, 5, 2, bidirectional=True, norm=norm, **extra)
    tcls = {BNLSTM: torch.nn.LSTM, BNGRU: torch.nn.GRU, BNRNN: torch.nn.RNN}[cls]
    ref = tcls(4, 5, 2, bidirectional=True, **extra)
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}
    x = torch.randn(6, 0, 4, requires_grad=True)
    out, st = m(x)
    out_t, st_t = ref(x)
    assert out.shape == out_t.shape == (6, 0, 2 * (3 if extra else 5))
    for a, b in zip(st if isinstance(st, tuple) else (st,), st_t if isinstance(st_t, tuple) else (st_t,)):
        assert a.shape == b.shape
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for k, v in m.state_dict().items():
        if k in before:
            torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("norm", ["none", "vertical", "horizontal", "per_timestep", "layer"])
def test_an_empty_batch_runs_through_every_cell(norm):
    from bnlab.nn import BNGRUCell, BNLSTMCell, BNRNNCell

    for cls, tcls in ((BNLSTMCell, torch.nn.LSTMCell), (BNGRUCell, torch.nn.GRUCell), (BNRNNCell, torch.nn.RNNCell)):
        m = cls(4, 5, norm=norm)
        before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}
        x = torch.randn(0, 4, requires_grad=True)
        out, out_t = m(x), tcls(4, 5)(x)
        outs = out if isinstance(out, tuple) else (out,)
        outs_t = out_t if isinstance(out_t, tuple) else (out_t,)
        assert [o.shape for o in outs] == [o.shape for o in outs_t]
        sum(o.sum() for o in outs).backward()
        assert x.grad.shape == x.shape
        for k, v in m.state_dict().items():
            if k in before:
                torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("norm", ["horizontal", "per_timestep"])
@pytest.mark.parametrize("cls", [BNLSTM, BNGRU], ids=["LSTM", "GRU"])
def test_a_one_row_training_step_on_torchs_batch_norm_survives_the_commit(cls, norm, monkeypatch):
    """A training step with one row normalizes with the running statistics; the forward's commit then
    moves those buffers before the backward. Where torch's batch norm serves the step (half
    precision here; other devices) and saves them for its backward, it must get copies: the
    backward runs, and on float32 (bnlab's kernels made to hand every call to torch's, as on a GPU)
    it gives the numbers bnlab's own kernels give."""
    import bnlab.kernels as K

    lengths = torch.tensor([7, 3, 2, 5, 1])  # steps 5 and 6: one row
    for dt in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        m = cls(9, 6, 2, norm=norm, dtype=dt)
        x = torch.randn(7, 5, 9, dtype=dt, requires_grad=True)
        for _ in range(2):  # the second call normalizes its one-row steps with buffers the first moved
            out = m(x, lengths=lengths)[0]
            out.float().sum().backward()
        assert torch.isfinite(x.grad.float()).all()
    m, ref = _build(cls, norm, layers=2, dtype=torch.float32)
    x = torch.randn(5, 7, m.input_size)
    want = [_run(ref, x, lengths) for _ in range(2)]
    monkeypatch.setattr(K, "uses_bnlab_kernel", lambda t: False)
    ref.load_state_dict(m.state_dict())  # rewind the buffers: the two calls again, on torch's batch norm
    got = [_run(ref, x, lengths) for _ in range(2)]
    for a, b in zip(got, want):
        _same(a, b, rtol=1e-4, atol=1e-5)
