"""GhostBatchNorm1d/2d against a chunk-by-chunk reference, gradcheck, running statistics, eval."""

import pytest
import torch
import torch.nn.functional as F

from bnlab.nn import BatchNorm1d, BatchNorm2d, GhostBatchNorm1d, GhostBatchNorm2d


def chunk_reference(x, weight, bias, vbs, eps=1e-5):
    """The obvious loop: ordinary training-mode batch norm on each chunk of vbs samples."""
    return torch.cat([F.batch_norm(c, None, None, weight, bias, True, 0.0, eps) for c in x.split(vbs)])


def chunk_running(x, vbs, momentum=0.1):
    """Expected running statistics after one forward from zeros/ones: count-weighted ghost means."""
    dims = [0] + list(range(2, x.dim()))
    chunks = x.double().split(vbs)
    n = sum(c.shape[0] for c in chunks)
    mean = sum(c.mean(dims) * c.shape[0] for c in chunks) / n
    var_u = sum(c.var(dims, unbiased=True) * c.shape[0] for c in chunks) / n
    return momentum * mean, (1 - momentum) + momentum * var_u


@pytest.mark.parametrize("cls,shape,vbs", [
    (GhostBatchNorm1d, (32, 6), 8),
    (GhostBatchNorm1d, (30, 6), 8),  # a smaller last ghost batch
    (GhostBatchNorm1d, (24, 4, 5), 6),
    (GhostBatchNorm2d, (12, 3, 4, 4), 4),
    (GhostBatchNorm2d, (10, 3, 4, 4), 4),
])
def test_ghost_batch_norm_matches_the_chunk_loop_in_output_gradients_and_running_stats(cls, shape, vbs):
    torch.manual_seed(0)
    c = shape[1]
    m = cls(c, virtual_batch_size=vbs)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
    x = (3 + 2 * torch.randn(shape)).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    w2 = m.weight.detach().clone().requires_grad_()
    b2 = m.bias.detach().clone().requires_grad_()
    y = m(x)
    y_ref = chunk_reference(x2, w2, b2, vbs)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.weight.grad, w2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.bias.grad, b2.grad, rtol=1e-4, atol=1e-4)
    rm, rv = chunk_running(x.detach(), vbs)
    torch.testing.assert_close(m.running_mean.double(), rm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_var.double(), rv, rtol=1e-5, atol=1e-6)
    assert int(m.num_batches_tracked) == 1


def test_ghost_batch_norm_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    m = GhostBatchNorm1d(3, virtual_batch_size=4, dtype=torch.float64, track_running_stats=False)
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)  # ghost batches of 4, 4 and 2
    weight = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, weight, bias):
        return torch.func.functional_call(m, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, weight, bias), eps=1e-6, atol=1e-5)


def test_ghost_batch_norm_in_eval_is_batch_norm_with_the_running_statistics():
    torch.manual_seed(0)
    g = GhostBatchNorm2d(3, virtual_batch_size=2)
    b = BatchNorm2d(3)
    for _ in range(3):
        g(torch.randn(8, 3, 2, 2) * 2 + 1)
    b.load_state_dict(g.state_dict())
    g.eval(), b.eval()
    x = torch.randn(5, 3, 2, 2)
    torch.testing.assert_close(g(x), b(x))


def test_a_training_batch_no_larger_than_the_virtual_batch_is_ordinary_batch_norm():
    torch.manual_seed(0)
    g = GhostBatchNorm1d(4, virtual_batch_size=16)
    b = BatchNorm1d(4)
    x = torch.randn(16, 4)
    torch.testing.assert_close(g(x), b(x))
    torch.testing.assert_close(g.running_var, b.running_var)


def test_ghost_batch_norm_has_batch_norm_state_dict_keys_and_rejects_a_bad_virtual_batch_size():
    assert set(GhostBatchNorm1d(3).state_dict()) == set(BatchNorm1d(3).state_dict())
    with pytest.raises(ValueError, match="virtual_batch_size must be >= 1"):
        GhostBatchNorm1d(3, virtual_batch_size=0)
    with pytest.raises(ValueError, match="GhostBatchNorm2d: expected 4D input"):
        GhostBatchNorm2d(3)(torch.randn(4, 3))


def test_a_one_sample_last_ghost_batch_is_rejected_in_training_like_batch_norm():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        GhostBatchNorm1d(3, virtual_batch_size=4)(torch.randn(9, 3))
