"""The fused recurrent layers' pool of large output tensors: a tensor anything still uses is never
handed out again; one nothing uses is."""

from __future__ import annotations

import pytest
import torch

from bnlab.nn import BNLSTM, _buffers

BIG = (1024, 512)  # 2 MiB in float32: pooled


@pytest.fixture(autouse=True)
def _fresh_pool():
    _buffers.clear()
    yield
    _buffers.clear()


def test_a_held_tensor_is_never_handed_out_again():
    a = _buffers.empty(BIG, torch.float32).fill_(1.0)
    b = _buffers.empty(BIG, torch.float32).fill_(2.0)
    assert a.data_ptr() != b.data_ptr()
    assert bool((a == 1.0).all())


def test_a_view_or_a_saved_tensor_keeps_the_buffer():
    a = _buffers.empty(BIG, torch.float32)
    ptr = a.data_ptr()
    v = a[3:7]
    del a
    assert _buffers.empty(BIG, torch.float32).data_ptr() != ptr  # the view still uses it
    del v
    x = _buffers.empty(BIG, torch.float32).fill_(0.5).requires_grad_()
    px = x.data_ptr()
    loss = (x * x).sum()  # autograd saves x
    del x
    assert _buffers.empty(BIG, torch.float32).data_ptr() != px
    loss.backward()
    del loss
    assert _buffers.empty(BIG, torch.float32).data_ptr() in (ptr, px)  # free again: reused


def test_a_buffer_nothing_uses_is_reused_for_a_request_that_fits():
    a = _buffers.empty(BIG, torch.float64)
    ptr = a.data_ptr()
    del a
    b = _buffers.empty((BIG[0] - 10, BIG[1]), torch.float64)  # smaller, within twice: the same buffer
    assert b.data_ptr() == ptr and b.shape == (BIG[0] - 10, BIG[1]) and b.is_contiguous()
    del b
    assert _buffers.empty((10, 10), torch.float64).data_ptr() != ptr  # small: torch's allocator
    c = _buffers.empty(BIG, torch.float32)  # another dtype: not that buffer
    assert c.data_ptr() != ptr and c.dtype == torch.float32


def test_small_tensors_and_other_dtypes_are_not_pooled():
    _buffers.empty((8, 8), torch.float32)
    _buffers.empty(BIG, torch.int64)
    _buffers.empty(BIG, torch.bfloat16)
    assert _buffers.held_bytes() == 0


def test_the_pool_keeps_at_most_its_limit(monkeypatch):
    monkeypatch.setattr(_buffers, "LIMIT", 5 << 20)
    held = [_buffers.empty(BIG, torch.float32) for _ in range(6)]  # 12 MiB, all in use
    assert _buffers.held_bytes() <= 5 << 20
    assert len({t.data_ptr() for t in held}) == 6
    del held
    for _ in range(4):
        _buffers.empty(BIG, torch.float32)
    assert _buffers.held_bytes() <= 5 << 20


def test_a_kept_output_of_a_fused_layer_survives_the_next_steps(monkeypatch):
    """A training loop that keeps each step's output (and one graph with retain_graph): the next
    steps' outputs and gradients must not be written into them."""
    monkeypatch.setattr(_buffers, "FROM", 4096)  # every output of these sizes from the pool
    torch.manual_seed(0)
    m = BNLSTM(8, 96, batch_first=True, norm="per_timestep")
    kept, copies, grads = [], [], []
    for step in range(3):
        x = torch.randn(32, 40, 8, requires_grad=True)
        out = m(x)[0]
        assert _buffers.held_bytes() > 0  # the pooled path
        loss = out.pow(2).mean()
        loss.backward(retain_graph=(step == 0))
        kept.append(out)
        copies.append(out.detach().clone())
        grads.append((x.grad.clone(), x.grad))
        if step == 0:
            first_loss = loss
    for out, ref in zip(kept, copies):
        assert torch.equal(out.detach(), ref)
    for g_copy, g in grads:
        assert torch.equal(g, g_copy)
    # the retained graph still backpropagates to the same gradients
    xg = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    first_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert any(not torch.equal(p.grad, g) for p, g in zip(m.parameters(), xg))  # step 0's, not step 2's


def test_threads_calling_a_fused_layer_at_once_get_their_own_outputs(monkeypatch):
    """Python threads running the same fused layer concurrently (inference, eval statistics): each
    call's output equals the same call run alone, none written into another's."""
    import threading

    monkeypatch.setattr(_buffers, "FROM", 4096)
    torch.manual_seed(1)
    m = BNLSTM(8, 64, batch_first=True, norm="per_timestep").eval()
    xs = [torch.randn(16, 20, 8) for _ in range(4)]
    with torch.no_grad():
        want = [m(x)[0].clone() for x in xs]
    got: list = [None] * len(xs)
    errors: list = []

    def work(i):
        try:
            with torch.no_grad():
                outs = [m(xs[i])[0] for _ in range(5)]  # all kept until compared
            got[i] = outs
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, outs in enumerate(got):
        for o in outs:
            assert torch.equal(o, want[i]), i
    ptrs = [o.data_ptr() for outs in got for o in outs]
    assert len(set(ptrs)) == len(ptrs)  # every kept output on its own buffer


def test_numpy_arrays_from_the_pool_follow_the_same_rule():
    import numpy as np

    a = _buffers.empty_np(BIG, np.float32)
    a.fill(1.0)
    b = _buffers.empty_np(BIG, np.float32)
    assert not np.shares_memory(a, b)
    v = a[5:9]
    addr = a.__array_interface__["data"][0]
    del a
    c = _buffers.empty_np(BIG, np.float32)  # the view still uses a's buffer
    c_addr = c.__array_interface__["data"][0]
    assert c_addr != addr and bool((v == 1.0).all())
    del v, c
    d = _buffers.empty_np(BIG, np.float32)  # a's and c's buffers free again: one of them reused
    assert d.__array_interface__["data"][0] in (addr, c_addr) and d.flags["C_CONTIGUOUS"] and d.shape == BIG
    assert not np.shares_memory(_buffers.empty_np((8, 8), np.float32), d)  # small: numpy's own


def test_a_retained_graph_backpropagates_its_own_step_after_later_steps(monkeypatch):
    """The fused call's saved arrays (gates, cell states, the recurrent matmul's output) come from
    the pool: a graph kept with retain_graph must still hold its own step's, not a later step's."""
    monkeypatch.setattr(_buffers, "FROM", 4096)
    torch.manual_seed(2)
    for mode in ("per_timestep", "horizontal", "layer"):
        m = BNLSTM(8, 48, num_layers=2, batch_first=True, norm=mode)
        x0 = torch.randn(16, 12, 8)
        loss0 = m(x0)[0].pow(2).mean()
        loss0.backward(retain_graph=True)
        want = [p.grad.clone() for p in m.parameters()]
        for _ in range(2):  # later steps on other inputs, their graphs freed
            m.zero_grad()
            m(torch.randn(16, 12, 8) * 3.0)[0].pow(2).mean().backward()
        m.zero_grad()
        loss0.backward()
        for p, g in zip(m.parameters(), want):
            assert torch.equal(p.grad, g), mode


def test_the_batch_norm_kernels_write_into_a_given_allocator():
    from bnlab.kernels import cpu

    torch.manual_seed(3)
    x = torch.randn(600, 512)
    w, b = torch.rand(512) + 0.5, torch.randn(512)
    y0, st0, _ = cpu.forward_train(x, w, b, 1e-5)
    y1, st1, _ = cpu.forward_train(x, w, b, 1e-5, alloc=_buffers.empty)
    assert torch.equal(y0, y1) and (st0 == st1).all()
    assert _buffers.held_bytes() >= y1.numel() * 4  # the pool's buffer
    dy = torch.randn_like(x)
    dx0, g0 = cpu.backward(dy, x, w, st0, True)
    dx1, g1 = cpu.backward(dy, x, w, st0, True, alloc=_buffers.empty)
    assert torch.equal(dx0, dx1) and (g0 == g1).all()
    assert not np_shares(y1, dx1)
    # a layout the allocator does not give (channels_last): torch's own, the same numbers
    x4 = torch.randn(8, 16, 5, 5).to(memory_format=torch.channels_last)
    y4, _, _ = cpu.forward_train(x4, None, None, 1e-5, alloc=_buffers.empty)
    assert y4.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y4, cpu.forward_train(x4, None, None, 1e-5)[0])


def np_shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    import numpy as np

    return bool(np.shares_memory(a.numpy(), b.numpy()))
