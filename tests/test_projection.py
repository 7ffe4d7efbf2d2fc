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
