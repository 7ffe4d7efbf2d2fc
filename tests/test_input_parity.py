"""Input parity, table-driven: each case goes to torch and to bnlab. Every input torch accepts gives
torch's numbers (output, gradients, running buffers); every input torch rejects gets a clear error
from bnlab naming the layer, what was expected and what came in."""

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab.functional as BF
from bnlab import nn as bnn
from bnlab.functional import NonFiniteBatchError

NAME = "bn_under_test"


@dataclass
class Case:
    id: str
    make: Callable[[], dict]  # F.batch_norm keyword arguments
    error: str | None = None  # None: torch accepts and bnlab must match it; else a regex bnlab's message matches
    tol: dict = field(default_factory=dict)


def _x(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype) * 2 + 0.5


def _stats(c, dtype=torch.float32):
    return dict(running_mean=torch.randn(c, dtype=dtype), running_var=torch.rand(c, dtype=dtype) + 0.5)


def _kw(input, training=True, **kw):
    c = input.shape[1] if input.dim() > 1 else 1
    out = dict(input=input, running_mean=None, running_var=None, weight=None, bias=None, training=training,
               momentum=0.1, eps=1e-5)
    if training is not None:
        out.update(_stats(c, input.dtype if input.is_floating_point() else torch.float32))
    out.update(kw)
    return out


def _permuted7():
    return _x(3, 4, 2, 3, 1, 2, 2).permute(0, 1, 3, 2, 5, 4, 6)


ACCEPTED = [
    Case("6-D input, training", lambda: _kw(_x(2, 3, 2, 1, 2, 2))),
    Case("6-D input, eval", lambda: _kw(_x(2, 3, 2, 1, 2, 2), training=False)),
    Case("6-D input of spatial size 1", lambda: _kw(_x(4, 3, 1, 1, 1, 1))),
    Case("7-D non-contiguous input", lambda: _kw(_permuted7())),
    Case("7-D non-contiguous input, eval", lambda: _kw(_permuted7(), training=False)),
    Case("2-D weight and bias (1, C)", lambda: _kw(_x(5, 3, 4), weight=torch.rand(1, 3) + 0.5, bias=torch.randn(1, 3))),
    Case("2-D weight and bias (C, 1)", lambda: _kw(_x(5, 3), weight=torch.rand(3, 1) + 0.5, bias=torch.randn(3, 1))),
    Case("eps = 0 in eval", lambda: _kw(_x(5, 3, 4), training=False, eps=0.0)),
    Case("large eps", lambda: _kw(_x(5, 3, 4), eps=10.0)),
    Case("momentum 0 and 1", lambda: _kw(_x(5, 3, 4), momentum=1.0)),
    Case("negative momentum", lambda: _kw(_x(5, 3, 4), momentum=-0.5)),
    Case("non-contiguous running statistics", lambda: _kw(
        _x(5, 3, 4), running_mean=torch.randn(6)[::2], running_var=(torch.rand(6) + 0.5)[::2])),
    Case("float64", lambda: _kw(_x(5, 3, 4, dtype=torch.float64))),
    Case("no running statistics in training", lambda: _kw(_x(5, 3, 4), running_mean=None, running_var=None)),
    Case("empty batch", lambda: _kw(_x(0, 3, 4))),
    Case("zero channels", lambda: _kw(_x(4, 0), running_mean=torch.zeros(0), running_var=torch.ones(0))),
    Case("bfloat16 input with float32 parameters", lambda: _kw(
        _x(8, 3, 4).bfloat16(), weight=torch.rand(3) + 0.5, bias=torch.randn(3), running_mean=torch.zeros(3),
        running_var=torch.ones(3)), tol=dict(rtol=2e-2, atol=2e-2)),
    Case("channels_last", lambda: _kw(_x(4, 3, 5, 5).contiguous(memory_format=torch.channels_last))),
]

REJECTED = [
    Case("1-D input", lambda: _kw(_x(7), training=False, running_mean=torch.zeros(7), running_var=torch.ones(7)),
         r"expected input of shape \(N, C, \*\) with at least 2 dimensions \(got 1D input\)"),
    Case("integer input", lambda: _kw(torch.ones(4, 3, dtype=torch.long), training=False,
                                      running_mean=torch.zeros(3), running_var=torch.ones(3)),
         r"expected a floating-point input \(got dtype torch.int64\)"),
    Case("eps = 0 in training", lambda: _kw(_x(5, 3), eps=0.0), r"expected eps > 0 in training \(got eps=0.0\)"),
    Case("eps < 0 in training", lambda: _kw(_x(5, 3), eps=-1e-5), r"expected eps > 0 in training \(got eps=-1e-05\)"),
    Case("eps < 0 in eval", lambda: _kw(_x(5, 3), training=False, eps=-1.0), r"expected eps >= 0 \(got eps=-1.0\)"),
    Case("momentum=None without num_batches_tracked", lambda: _kw(_x(5, 3), momentum=None),
         r"momentum=None \(a cumulative average\) needs num_batches_tracked .*\(got num_batches_tracked=None\)"),
    Case("2-D running_mean in training", lambda: _kw(_x(5, 3), running_mean=torch.zeros(1, 3)),
         r"expected running_mean of shape \(3,\) \(got a 2-D tensor of shape \(1, 3\)\)"),
    Case("2-D running_var in eval", lambda: _kw(_x(5, 3), training=False, running_var=torch.ones(3, 1)),
         r"expected running_var of shape \(3,\) \(got a 2-D tensor of shape \(3, 1\)\)"),
    Case("weight with the wrong number of elements", lambda: _kw(_x(5, 3), weight=torch.ones(4)),
         r"input has 3 channels .* but weight has 4 elements; expected num_features == 3"),
    Case("running_mean requiring grad, training", lambda: _kw(_x(5, 3), running_mean=torch.zeros(3, requires_grad=True)),
         r"expected running_mean not to require grad \(got a tensor with requires_grad=True\)"),
    Case("running_var requiring grad, eval", lambda: _kw(_x(5, 3), training=False,
                                                         running_var=torch.ones(3, requires_grad=True)),
         r"expected running_var not to require grad \(got a tensor with requires_grad=True\)"),
    Case("float64 statistics for a float32 input", lambda: _kw(_x(5, 3), **_stats(3, torch.float64)),
         r"expected running_mean of the input's dtype torch.float32 \(got running_mean of dtype torch.float64"),
    Case("float64 weight for a float32 input, eval", lambda: _kw(_x(5, 3), training=False,
                                                                 weight=torch.ones(3, dtype=torch.float64)),
         r"expected weight of the input's dtype torch.float32 \(got weight of dtype torch.float64"),
    Case("float32 statistics for a float64 input", lambda: _kw(_x(5, 3, dtype=torch.float64), **_stats(3)),
         r"expected running_mean of the input's dtype torch.float64 \(got running_mean of dtype torch.float32"),
    Case("integer running statistics", lambda: _kw(_x(5, 3), running_mean=torch.zeros(3, dtype=torch.long)),
         r"expected running_mean of the input's dtype torch.float32 \(got running_mean of dtype torch.int64"),
    Case("only running_mean in training", lambda: _kw(_x(5, 3), running_var=None),
         r"expected running_mean and running_var to be both given or both None in training \(got only running_mean\)"),
    Case("no running statistics in eval", lambda: _kw(_x(5, 3), training=False, running_mean=None, running_var=None),
         r"eval mode \(training=False\) needs running_mean and running_var \(got None\)"),
    Case("one value per channel in training", lambda: _kw(_x(1, 3)),
         r"expected more than 1 value per channel when training \(got input of shape \(1, 3\)"),
]


def _clone(kw):
    return {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) and v.is_leaf
                else v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _strided_like(kw, key, src):
    """Keep non-contiguous running statistics non-contiguous in the clone (views of a fresh base)."""
    t = src[key]
    if isinstance(t, torch.Tensor) and not t.is_contiguous():
        base = torch.empty(t.numel() * 2, dtype=t.dtype)
        view = base[::2]
        view.copy_(t)
        kw[key] = view


@pytest.mark.parametrize("case", ACCEPTED, ids=lambda c: c.id)
def test_every_input_torch_accepts_gives_torchs_numbers(case):
    torch.manual_seed(0)
    kw = case.make()
    theirs, ours = _clone(kw), _clone(kw)
    for key in ("running_mean", "running_var"):
        _strided_like(theirs, key, kw)
        _strided_like(ours, key, kw)
    for d in (theirs, ours):
        d["input"] = d["input"].detach().clone().requires_grad_(
            d["input"].numel() > 0)
        for k in ("weight", "bias"):
            if d[k] is not None:
                d[k].requires_grad_(True)
    yt = F.batch_norm(**theirs)
    yo = BF.batch_norm(**ours, name=NAME)
    tol = case.tol or {}
    torch.testing.assert_close(yo, yt, **tol)
    assert yo.shape == yt.shape and yo.dtype == yt.dtype
    if yt.requires_grad and yt.numel():
        dy = torch.randn_like(yt)
        go = torch.autograd.grad(yo, [ours[k] for k in ("input", "weight", "bias") if ours[k] is not None], dy)
        wrt = [k for k in ("input", "weight", "bias") if theirs[k] is not None]
        try:
            gt = torch.autograd.grad(yt, [theirs[k] for k in wrt], dy)
        except RuntimeError:  # torch's forward takes 2-D weights, its backward does not: compare with 1-D ones
            flat = {k: theirs[k].detach().reshape(-1).requires_grad_() if k in ("weight", "bias") else theirs[k]
                    for k in wrt}
            yt = F.batch_norm(flat["input"], None, None, flat.get("weight"), flat.get("bias"), True, 0.1, theirs["eps"])
            gt = [g.reshape(theirs[k].shape) for g, k in zip(torch.autograd.grad(yt, [flat[k] for k in wrt], dy), wrt)]
        for a, b, k in zip(go, gt, wrt):
            assert a.shape == ours[k].shape
            torch.testing.assert_close(a, b, **tol)
    for k in ("running_mean", "running_var"):
        if theirs[k] is not None:
            torch.testing.assert_close(ours[k], theirs[k], **tol)


@pytest.mark.parametrize("case", REJECTED, ids=lambda c: c.id)
def test_every_input_torch_rejects_gets_a_clear_error_naming_the_layer(case):
    kw = case.make()
    with pytest.raises(Exception):
        F.batch_norm(**_clone(kw))
    with pytest.raises((ValueError, TypeError)) as err:
        BF.batch_norm(**_clone(kw), name=NAME)
    msg = str(err.value)
    assert msg.startswith(f"{NAME}: "), msg
    assert __import__("re").search(case.error, msg), msg


# ----------------------------------------------------------------------------------------------
# module-level cases


def test_float32_input_into_a_double_model_raises_a_dtype_error_naming_the_layer():
    for train in (True, False):
        with pytest.raises(RuntimeError):
            nn.BatchNorm1d(3).double().train(train)(torch.randn(4, 3))
        with pytest.raises(TypeError, match=r"BatchNorm1d: expected weight of the input's dtype torch.float32 \(got "
                                            r"weight of dtype torch.float64 .*\.to\(torch.float32\)"):
            bnn.BatchNorm1d(3).double().train(train)(torch.randn(4, 3))


def test_eps_zero_module_raises_in_training_like_torch_and_runs_in_eval():
    with pytest.raises(ValueError):
        nn.BatchNorm2d(3, eps=0.0)(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"BatchNorm2d: expected eps > 0 in training \(got eps=0.0\)"):
        bnn.BatchNorm2d(3, eps=0.0)(torch.randn(2, 3, 2, 2))
    a, b = bnn.BatchNorm2d(3, eps=0.0).eval(), nn.BatchNorm2d(3, eps=0.0).eval()
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["module", "functional", "bfloat16"])
def test_statistics_overflowing_the_buffers_dtype_are_caught_and_say_overflow(dtype, layout):
    big = 3e38 if dtype == torch.float32 else 1e300
    x = torch.tensor([[big, -big, big, -big]], dtype=dtype).T.expand(4, 3).contiguous()  # finite, var > max
    if layout == "bfloat16":
        if dtype == torch.float64:
            pytest.skip("bfloat16 inputs take float32 buffers")
        x = torch.tensor([[3e38, -3e38, 3e38, -3e38]]).T.expand(4, 3).bfloat16()
    bn = bnn.BatchNorm1d(3, dtype=dtype)
    if layout == "bfloat16":
        bn = bnn.BatchNorm1d(3)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(NonFiniteBatchError, match=r"BatchNorm1d: .*overflow.*channel\(s\) \[0, 1, 2\]; running "
                                                  r"statistics were left unchanged"):
        if layout == "functional":
            BF.batch_norm(x, bn.running_mean, bn.running_var, training=True, name="BatchNorm1d")
        else:
            bn(x)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    skip = bnn.BatchNorm1d(3, dtype=dtype, nonfinite="skip")
    if layout == "bfloat16":
        skip = bnn.BatchNorm1d(3, nonfinite="skip")
    y = skip(x)
    assert torch.isfinite(skip.running_var).all() and int(skip.num_batches_tracked) == 0
    if layout != "bfloat16" and dtype == torch.float32:  # float64 statistics normalize it right (torch's give 0)
        torch.testing.assert_close(y, torch.sign(x), rtol=1e-3, atol=1e-3)


def test_nonfinite_messages_say_which_kind():
    x = torch.randn(6, 3)
    x[0, 0] = float("nan")
    x[1, 2] = float("inf")
    with pytest.raises(NonFiniteBatchError, match=r"non-finite batch statistics \(nan; inf\) .*channel\(s\) \[0, 2\]"):
        bnn.BatchNorm1d(3)(x)
