"""bnlab.kernels.device_update, the running update for statistics on a GPU, against the policy's
generic update (bnlab.policy.update_buffers) that every other path uses: the same buffers to the
bit, the same errors, the same refusals. Run here on CPU tensors (the function is device-agnostic;
tests/test_cuda.py runs it on a GPU through the layers)."""

import pytest
import torch

from bnlab import kernels
from bnlab.policy import NonFiniteBatchError, update_buffers

C = 5


def _case(dtype, seed, bad=None):
    g = torch.Generator().manual_seed(seed)
    rm = (torch.randn(C, generator=g, dtype=torch.float64)).to(dtype)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    nbt = torch.tensor(3)
    mean = torch.randn(C, generator=g, dtype=torch.float32) * 3
    invstd = torch.rand(C, generator=g, dtype=torch.float32) + 0.2
    if bad == "nan":
        mean[2] = float("nan")
    elif bad == "inf":
        mean[1] = float("inf")
    elif bad == "overflow":  # a variance the float16 buffers cannot hold
        invstd[3] = 1e-3
    return rm, rv, nbt, mean, invstd


def _both(dtype, seed, momentum, nonfinite, bad=None, count=12, eps=1e-5):
    rm, rv, nbt, mean, invstd = _case(dtype, seed, bad)
    ours = [t.clone() for t in (rm, rv, nbt)]
    ref = [t.clone() for t in (rm, rv, nbt)]
    errors = []
    try:
        kernels.device_update(*ours, mean, invstd, eps, count, momentum, nonfinite, "layer")
    except NonFiniteBatchError as e:
        errors.append(str(e))
    try:
        var = (invstd.double().pow(-2) - eps).clamp(min=0.0)
        update_buffers(*ref, mean, var, count, momentum, nonfinite, "layer")
    except NonFiniteBatchError as e:
        errors.append(str(e))
    return (rm, rv, nbt), ours, ref, errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("count", [12, 1])
def test_a_good_batch_moves_the_buffers_as_the_policy_does(dtype, momentum, nonfinite, count):
    before, ours, ref, errors = _both(dtype, 0, momentum, nonfinite, count=count)
    assert errors == []
    for a, b, old in zip(ours, ref, before):
        assert a.dtype == old.dtype and torch.equal(a, b), (a, b)
    assert not torch.equal(ours[0], before[0]) and int(ours[2]) == 4


@pytest.mark.parametrize("bad", ["nan", "inf", "overflow"])
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_a_bad_batch_touches_no_buffer_and_raises_as_the_policy_does(bad, nonfinite):
    dtype = torch.float16 if bad == "overflow" else torch.float32
    before, ours, ref, errors = _both(dtype, 1, 0.1, nonfinite, bad=bad)
    for a, b, old in zip(ours, ref, before):
        assert torch.equal(a, old) and torch.equal(b, old)
    if nonfinite == "raise":
        assert len(errors) == 2 and errors[0] == errors[1] and "layer" in errors[0]
    else:
        assert errors == []


def test_a_cumulative_average_without_a_counter_moves_nothing():
    rm, rv, _, mean, invstd = _case(torch.float32, 2)
    a, b = rm.clone(), rv.clone()
    kernels.device_update(a, b, None, mean, invstd, 1e-5, 8, None, "skip", "layer")
    assert torch.equal(a, rm) and torch.equal(b, rv)
