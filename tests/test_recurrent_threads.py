"""The fused recurrent kernels on several threads: the same numbers as on one thread, the thread
count following ``torch.set_num_threads``, a forked child on the calling thread; and the per-step
gradient norms the layers record (``record_grad_norms``) on the fused path and on the loop."""

import copy
import multiprocessing as mp
import os
import subprocess
import sys

import numba
import numpy as np
import pytest
import torch

import bnlab.nn.recurrent as R
from bnlab.kernels import cpu
from bnlab.nn import BNGRU, BNLSTM, BNRNN
from bnlab.nn import _recurrent_kernels as rk

LENGTHS = torch.tensor([7, 2, 5, 7, 1, 4, 6, 7, 3])
TWO = min(2, cpu._MAX_THREADS)
needs_two = pytest.mark.skipif(TWO < 2 or cpu._serial_only, reason="numba's pool has one thread")


@pytest.fixture
def split_everything(monkeypatch):
    """Split every fused call over the threads, however small, and record each launch's split."""
    monkeypatch.setattr(R, "_PARALLEL_FROM", 0)
    seen = []
    real = R._split

    def spy(spec, dt):
        s = real(spec, dt)
        seen.append(s)
        return s

    monkeypatch.setattr(R, "_split", spy)
    return seen


@pytest.fixture
def torch_threads():
    numba.get_num_threads()  # numba's pool started first (starting it resets OpenMP's thread count)
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def _run(m, x, lengths=None):
    for p in m.parameters():
        p.grad = None
    xx = x.clone().requires_grad_(True)
    out, st = m(xx, lengths=lengths)
    states = st if isinstance(st, tuple) else (st,)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    ((out * w).sum() + sum((s * s).sum() * (k + 1) for k, s in enumerate(states))).backward()
    res = {"out": out.detach(), "dx": xx.grad}
    res.update({f"state{k}": s.detach() for k, s in enumerate(states)})
    res.update({"grad " + n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    res.update({"buffer " + k: v.clone() for k, v in m.state_dict().items() if k not in dict(m.named_parameters())})
    assert any(k.startswith("grad ") for k in res)
    return res


_LAYERS = [(BNLSTM, {}), (BNLSTM, {"bidirectional": True}), (BNLSTM, {"proj_size": 9}), (BNGRU, {}),
           (BNGRU, {"bidirectional": True}), (BNRNN, {}), (BNRNN, {"bidirectional": True})]
_IDS = [c.__name__[2:] + ("-" + "-".join(kw) if kw else "") for c, kw in _LAYERS]


@needs_two
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("norm", ["horizontal", "per_timestep", "layer"])
@pytest.mark.parametrize("cls,kw", _LAYERS, ids=_IDS)
def test_two_threads_give_the_one_thread_numbers(cls, kw, norm, dtype, split_everything, torch_threads):
    torch.manual_seed(0)
    H = 40 if dtype == torch.float32 else 20  # three vectors of units: thread parts of 1 and 2 (uneven)
    m = cls(9, H, 2, batch_first=True, norm=norm, dtype=dtype, momentum=0.3, **kw)
    x = torch.randn(9, 7, 9, dtype=dtype)
    for lengths in (None, LENGTHS):
        for mode in ("train", "eval"):
            res = {}
            for nt in (1, TWO):
                torch_threads(nt)
                mm = copy.deepcopy(m)
                getattr(mm, mode)()
                del split_everything[:]
                res[nt] = _run(mm, x, lengths)
                assert {s[0] for s in split_everything} == {nt}, split_everything
            one, two = res[1], res[TWO]
            assert one.keys() == two.keys()
            for k in one:
                if _row_summed(k):
                    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
                    torch.testing.assert_close(two[k], one[k], **tol, msg=f"{k} ({mode}, lengths {lengths is not None})")
                else:  # everything else: the same bits
                    torch.testing.assert_close(two[k], one[k], rtol=0, atol=0,
                                               msg=f"{k} ({mode}, lengths {lengths is not None})")


def _row_summed(name: str) -> bool:
    """Gradients summed over the rows of every step (the gates' biases, the norms' gamma and beta):
    split by rows, each thread sums its own rows and the partial sums are added."""
    name = name.removeprefix("grad ")
    return name.startswith("bias_") or (name.startswith("norm_") and name.endswith((".weight", ".bias")))


@needs_two
def test_the_split_follows_the_norms(split_everything, torch_threads):
    """Every mode splits by rows: with batch statistics in blocks set by the batch size and the
    machine (one per thread of numba's pool), never by the thread count asked for, the threads
    meeting at each step's statistics; else in blocks sized for the threads; at most one thread per
    block; torch.set_num_threads(1) runs the serial twins."""
    torch_threads(TWO)
    x = torch.randn(16, 5, 9, dtype=torch.float64)
    rb = R._stat_block(16)
    assert rb % 4 == 0 and 2 <= -(-16 // rb) <= min(cpu._MAX_THREADS, 4)
    for norm in ("per_timestep", "horizontal", "layer"):
        m = BNLSTM(9, 24, batch_first=True, norm=norm, dtype=torch.float64)
        del split_everything[:]
        m(x)
        want = (TWO, rb) if norm != "layer" else (TWO, 4)
        assert split_everything[0] == want, (norm, split_everything)
        m.eval()
        del split_everything[:]
        m(x)
        assert split_everything[0][0] == TWO
    for B in (4, 5, 9):  # one block below 8 rows: one thread
        del split_everything[:]
        BNLSTM(9, 24, batch_first=True, norm="per_timestep", dtype=torch.float64)(torch.randn(B, 3, 9, dtype=torch.float64))
        assert split_everything[0] == (min(TWO, -(-B // R._stat_block(B))), R._stat_block(B)), (B, split_everything)
        assert (B < 8) == (split_everything[0][0] == 1)
    torch_threads(1)
    del split_everything[:]
    BNLSTM(9, 24, batch_first=True, norm="per_timestep", dtype=torch.float64)(x)
    assert split_everything[0][0] == 1


def test_small_layers_stay_on_one_thread(torch_threads):
    torch_threads(TWO)
    spec = R._FusedSpec()
    spec.B, spec.H, spec.P, spec.G = 6, 5, 5, 20
    spec.sites = (R._Site(np.full(3, rk.BATCH, np.int8)), R._Site(np.zeros(3, np.int8)), R._Site(np.zeros(3, np.int8)))
    assert R._split(spec, np.float64)[0] == 1  # far below _PARALLEL_FROM
    spec.B, spec.H, spec.P, spec.G = 64, 128, 128, 512
    assert R._split(spec, np.float32)[0] == TWO


@needs_two
def test_the_launch_runs_on_the_requested_threads_and_puts_numba_back(monkeypatch, torch_threads):
    seen = []
    launch = rk._team_launch

    class Spy:
        def __call__(self, addr, nt, err, *args):
            seen.append((nt, numba.get_num_threads()))
            return launch(addr, nt, err, *args)

    monkeypatch.setattr(rk, "_team_launch", Spy())
    monkeypatch.setattr(R, "_PARALLEL_FROM", 0)
    torch_threads(TWO)
    before = numba.get_num_threads()
    BNLSTM(9, 24, batch_first=True, norm="per_timestep")(torch.randn(8, 4, 9))
    assert seen and all(s == (TWO, TWO) for s in seen)
    assert numba.get_num_threads() == before


@numba.njit(nogil=True)
def _tag_body(th, nt, out, bad):
    out[th] = th * 10 + nt
    if th == bad:
        raise ValueError("the bad thread")


@needs_two
def test_a_team_runs_each_part_once_and_reports_a_part_that_raised(torch_threads):
    torch_threads(TWO)
    out = np.full(TWO, -1, np.int64)
    rk.team(_tag_body, TWO, (out, -1))  # on numba's pool: each part called once, with its index
    assert out.tolist() == [th * 10 + TWO for th in range(TWO)]
    one = np.full(1, -1, np.int64)
    rk.team(_tag_body, 1, (one, -1))  # one thread: the body on the calling thread
    assert one.tolist() == [1]
    with pytest.raises(ValueError, match="the bad thread"):
        rk.team(_tag_body, 1, (one, 0))
    with pytest.raises(RuntimeError, match="_tag_body raised on 1 of its"):
        rk.team(_tag_body, TWO, (out, TWO - 1))


def _fused_in_child(threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = BNLSTM(9, 20, 2, batch_first=True, norm="per_timestep", dtype=torch.float64)
    out = _run(m, torch.randn(9, 7, 9, dtype=torch.float64), LENGTHS)
    return {k: v.numpy().copy() for k, v in out.items()}, cpu._serial_only, os.getpid()


@needs_two
@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_a_forked_child_runs_the_fused_layers_on_its_own_thread(monkeypatch, torch_threads):
    monkeypatch.setattr(R, "_PARALLEL_FROM", 0)  # inherited by the fork
    want, serial, _ = _fused_in_child(TWO)  # the parent, on numba's pool (started)
    assert not serial and numba.np.ufunc.parallel._is_initialized
    with mp.get_context("fork").Pool(1) as pool:
        got, serial, pid = pool.apply_async(_fused_in_child, (1,)).get(240)
    assert pid != os.getpid()
    if numba.threading_layer() == "omp":
        assert serial
    for k in want:  # batch statistics combined per block in block order: the one-thread bits
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# --- per-step gradient norms ----------------------------------------------------------------------

def _reference_norms(m, x, lengths=None):
    """||dL/dh_t|| from the reference loop's recorded states (autograd.grad on each of them)."""
    ref = copy.deepcopy(m)
    ref.record_hidden = True
    out = ref(x, lengths=lengths)[0]
    loss = (out ** 2).sum() + out.sum()
    hs = [h for layer in ref.hidden_states for h in layer]
    grads = torch.autograd.grad(loss, hs)
    T = len(ref.hidden_states[0])
    return torch.stack([g.to(torch.float64).norm() for g in grads]).view(-1, T)


@pytest.mark.parametrize("norm", ["none", "vertical", "horizontal", "per_timestep", "layer"])
@pytest.mark.parametrize("cls,kw", [(BNLSTM, {}), (BNLSTM, {"bidirectional": True}), (BNLSTM, {"proj_size": 3}),
                                    (BNGRU, {"bidirectional": True})], ids=["LSTM", "LSTM-bi", "LSTM-proj", "GRU-bi"])
def test_recorded_gradient_norms_equal_the_norms_of_the_states_gradients(cls, kw, norm):
    torch.manual_seed(0)
    m = cls(9, 6, 2, batch_first=True, norm=norm, dtype=torch.float64, **kw)
    x = torch.randn(5, 6, 9, dtype=torch.float64)
    for lengths in (None, torch.tensor([6, 2, 5, 6, 3])):
        want = _reference_norms(m, x, lengths)
        for force_loop in (False, True):  # the fused kernel's, and the loop's hooks
            mm = copy.deepcopy(m)
            mm.record_grad_norms, mm.force_loop = True, force_loop
            assert mm._path(x) == ("loop" if force_loop else "fused")
            out = mm(x, lengths=lengths)[0]
            assert len(mm.hidden_grad_norms) == want.shape[0] and all(g is None for g in mm.hidden_grad_norms)
            ((out ** 2).sum() + out.sum()).backward()
            got = torch.stack(mm.hidden_grad_norms)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_recording_gradient_norms_leaves_the_numbers_alone():
    torch.manual_seed(0)
    for norm in ("none", "vertical", "per_timestep"):
        m = BNLSTM(3, 8, 2, batch_first=True, norm=norm, dtype=torch.float64)
        x = torch.randn(4, 5, 3, dtype=torch.float64)
        a = _run(copy.deepcopy(m), x)
        r = copy.deepcopy(m)
        r.record_grad_norms = True
        b = _run(r, x)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-12, atol=1e-12, msg=k)
        assert all(g is not None and g.shape == (5,) for g in r.hidden_grad_norms)


@needs_two
def test_batch_statistics_run_on_one_thread_where_the_threads_cannot_meet(split_everything, torch_threads,
                                                                          monkeypatch):
    """A launch whose threads meet at a spin barrier needs every thread running at once: where the
    pool would give fewer (a capped OpenMP team) or the threading layer does not promise it, a
    call with batch statistics runs on one thread, with the same numbers."""
    torch_threads(TWO)
    torch.manual_seed(0)
    m = BNLSTM(9, 20, batch_first=True, norm="horizontal", dtype=torch.float64)
    x = torch.randn(9, 7, 9, dtype=torch.float64)
    want = _run(copy.deepcopy(m), x)
    assert split_everything[-1][0] == TWO
    real = rk.team_size
    monkeypatch.setattr(rk, "team_size", lambda nt: 1)
    del split_everything[:]
    got = _run(copy.deepcopy(m), x)
    assert split_everything[-1][0] == 1
    for k in want:  # the statistics combined per block: the same bits; sums over rows split by thread: close
        tol = dict(rtol=1e-12, atol=1e-12) if _row_summed(k) else dict(rtol=0, atol=0)
        torch.testing.assert_close(got[k], want[k], **tol, msg=k)
    monkeypatch.setattr(rk, "team_size", real)
    monkeypatch.setattr(numba, "threading_layer", lambda: "tbb")
    del split_everything[:]
    _run(copy.deepcopy(m), x)
    assert split_everything[-1][0] == 1


_CAPPED_TEAM = """
import torch, bnlab.nn.recurrent as R
from bnlab.nn import BNLSTM
from bnlab.nn import _recurrent_kernels as rk
torch.set_num_threads(2)
R._PARALLEL_FROM = 0
seen = []
real = R._split
R._split = lambda spec, dt: seen.append(real(spec, dt)) or seen[-1]
y, _ = BNLSTM(9, 20, batch_first=True, norm="horizontal")(torch.randn(9, 7, 9))
y.sum().backward()
import numba
print(rk.team_size(2), seen[0][0], numba.threading_layer())
"""


@needs_two
@pytest.mark.skipif(numba.config.THREADING_LAYER not in ("default", "omp"), reason="OpenMP's team cap")
def test_a_capped_openmp_team_runs_batch_statistics_on_one_thread_instead_of_hanging():
    """OMP_THREAD_LIMIT=1: a two-thread launch would run both iterations on one thread, and a spin
    barrier between them would never open; the probe sees the team of one and the call runs on one
    thread (a hang here ends in the timeout)."""
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    out = subprocess.run([sys.executable, "-c", _CAPPED_TEAM], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    team, threads, layer = out.stdout.split()
    if layer != "omp":
        pytest.skip(f"numba's threading layer is {layer}, not OpenMP")
    assert (team, threads) == ("1", "1"), out.stdout


@needs_two
@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("F", [1, 5, 20, 37])
def test_the_folds_moments_and_rows_gradient_match_the_reference_and_split_over_threads_bit_for_bit(
        torch_threads, monkeypatch, dt, F):
    """The vertical fold's covariance (its upper triangle in row blocks of whole vectors, mirrored)
    against the float64 reference, widths past whole vectors and several k panels included; the
    rows' gradient split over two threads gives the bits of one."""
    monkeypatch.setattr(rk, "_FOLD_PARALLEL_FROM", 0)
    rng = np.random.default_rng(F)
    N = 301
    x = (rng.standard_normal((N, F)) * 3 + 50).astype(dt)
    dxc = rng.standard_normal((N, F)).astype(dt)
    M = rng.standard_normal((F, F))
    M = M + M.T
    res = {}
    for nt in (1, TWO):
        torch_threads(nt)
        mu, sigma, mu_r = np.empty(F), np.full((F, F), np.nan), np.empty(F, dt)
        xc, drows = np.empty_like(x), np.empty_like(x)
        rk.moments(x, mu, mu_r, sigma, xc)
        rk.fold_rows_backward(dxc, xc, M, np.empty((F, F), dt), drows)
        res[nt] = (mu, mu_r, sigma, xc, drows)
    for a, b in zip(res[1], res[TWO]):
        np.testing.assert_array_equal(a, b)
    mu, mu_r, sigma, xc, drows = res[1]
    x64 = x.astype(np.float64)
    ref_mu = x64.mean(0)
    d = x64 - ref_mu
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-14)
    np.testing.assert_allclose(sigma, d.T @ d / N, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(sigma, sigma.T)
    np.testing.assert_array_equal(xc, (x - mu_r).astype(dt))
    ref_rows = dxc.astype(np.float64) - dxc.astype(np.float64).mean(0) + xc.astype(np.float64) @ (2 * M / N)
    tol = 1e-5 if dt == np.float32 else 1e-12
    np.testing.assert_allclose(drows, ref_rows, rtol=tol, atol=tol)
