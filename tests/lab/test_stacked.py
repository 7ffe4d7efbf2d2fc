"""The stacked linear layers' products on bnlab's micro-kernel against torch's ops."""

import pytest
import torch

from bnlab.lab._stacked import serves, stacked_matmul
from bnlab.lab.models import StackedLinear

G, N, K, M = 3, 7, 5, 6


def _input(layout, dtype):
    shape = {"stacked": (N, G * K), "shared": (N, K), "members": (G, N, K)}[layout]
    return torch.randn(shape, dtype=dtype, requires_grad=True)


def _reference(x, w, layout, members_first):
    if layout == "stacked":
        y = torch.bmm(x.reshape(N, G, K).transpose(0, 1), w)
    elif layout == "shared":
        y = torch.matmul(x, w)
    else:
        y = torch.bmm(x, w)
    return y if members_first else y.transpose(0, 1).reshape(N, G * M)


@pytest.mark.parametrize("layout", ["stacked", "shared", "members"])
@pytest.mark.parametrize("members_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_products_and_gradients_equal_torchs(layout, members_first, dtype, threads):
    torch.manual_seed(0)
    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = torch.randn(G, K, M, dtype=dtype, requires_grad=True)
        x = _input(layout, dtype)
        y = stacked_matmul(x, w, layout, members_first)
        dy = torch.randn_like(y)
        y.backward(dy)
        gx, gw = x.grad.clone(), w.grad.clone()
        x.grad = w.grad = None
        ref = _reference(x, w, layout, members_first)
        ref.backward(dy)
    finally:
        torch.set_num_threads(was)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, **tol)
    torch.testing.assert_close(gx, x.grad, **tol)  # a shared input: the members' gradients summed
    torch.testing.assert_close(gw, w.grad, **tol)


@pytest.mark.parametrize("layout", ["stacked", "shared", "members"])
def test_gradcheck_in_float64(layout):
    torch.manual_seed(1)
    w = torch.randn(G, K, M, dtype=torch.float64, requires_grad=True)
    x = _input(layout, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: stacked_matmul(a, b, layout, False), (x, w))
    assert torch.autograd.gradcheck(lambda a, b: stacked_matmul(a, b, layout, True), (x, w))


def test_a_member_gets_the_bits_it_gets_alone():
    # the stacked layout changes where a member's block lies, not how its products are summed
    torch.manual_seed(2)
    big = StackedLinear(G, K, M)
    x = torch.randn(N, G * K)
    y = big(x)
    for g in range(G):
        one = StackedLinear(1, K, M)
        with torch.no_grad():
            one.weight.copy_(big.weight[g:g + 1])
            one.bias.copy_(big.bias[g:g + 1])
        assert torch.equal(one(x[:, g * K:(g + 1) * K]), y[:, g * M:(g + 1) * M])


def test_what_it_does_not_serve_takes_torchs_ops():
    assert serves(torch.zeros(2, 3), torch.zeros(1, 3, 4))
    assert not serves(torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(1, 3, 4, dtype=torch.bfloat16))
    assert not serves(torch.zeros(2, 3), torch.zeros(1, 3, 4, dtype=torch.float64))
    lin = StackedLinear(2, 3, 4).to(torch.bfloat16)
    x = torch.randn(5, 6, dtype=torch.bfloat16)
    ref = torch.bmm(x.reshape(5, 2, 3).transpose(0, 1), lin.weight) + lin.bias.unsqueeze(1)
    torch.testing.assert_close(lin(x, out_members_first=True), ref)


def test_double_backward_says_it_is_first_order_only():
    w = torch.randn(G, K, M, dtype=torch.float64, requires_grad=True)
    x = _input("stacked", torch.float64)
    y = stacked_matmul(x, w).square().sum()
    with pytest.raises(RuntimeError, match="first-order backward only"):
        torch.autograd.grad(y, w, create_graph=True)
