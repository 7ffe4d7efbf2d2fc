"""torch's own BatchNorm module samples (torch.testing._internal.common_modules.module_db) run
through torch's module and bnlab's twin: outputs, gradients, running buffers and
num_batches_tracked must agree, with torch's default tolerances (torch.testing.assert_close).

The samples are torch's (module_inputs_func of the ModuleInfos for nn.BatchNorm1d/2d/3d): the
constructor arguments and inputs torch's own test_modules.py uses. module_db has no Lazy batch
norms; the lazy classes are run here on the same samples with ``num_features`` left out.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import bnlab

_NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
_DTYPES = (torch.float32, torch.float64)

# torch.testing._internal.common_utils (imported by common_modules) changes process-wide state when
# imported: it freezes torch.backends flags (disable_global_flags), reseeds every RNG and wraps
# TorchScript calls. The samples are therefore generated in a child process and handed over in a
# file; this process never imports it. It needs the expecttest package (the "test" extra).
_GENERATE = textwrap.dedent("""
    import sys, torch
    from torch.testing._internal import common_modules as cm
    names = {names!r}
    out = {{"infos": [], "samples": {{}}, "errors": {{}}}}
    for info in cm.module_db:
        name = info.module_cls.__name__
        if info.module_cls.__module__ != "torch.nn.modules.batchnorm" or name not in names:
            continue
        out["infos"].append(name)
        for dtype in (torch.float32, torch.float64):
            for training in (True, False):
                torch.manual_seed(0)
                rows = []
                for s in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                                 training=training):
                    f = s.forward_input
                    x = f.args[0] if f.args else f.kwargs["input"]
                    rows.append((s.constructor_input.args, s.constructor_input.kwargs, x.detach(), s.desc))
                out["samples"][(name, str(dtype), training)] = rows
        rows = []
        for e in info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                               training=True):
            s = e.module_error_input
            rows.append((s.constructor_input.args, s.constructor_input.kwargs, s.forward_input.args[0],
                         e.error_on.name, e.error_type, e.error_regex))
        out["errors"][name] = rows
    torch.save(out, sys.argv[1])
""").format(names=_NAMES)


@pytest.fixture(scope="module")
def torch_samples(tmp_path_factory):
    path = tmp_path_factory.mktemp("torch_samples") / "samples.pt"
    run = subprocess.run([sys.executable, "-c", _GENERATE, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"generating torch's module samples failed:\n{run.stderr[-3000:]}"
    return torch.load(path, weights_only=False)


def test_module_db_has_every_batch_norm(torch_samples):
    assert sorted(torch_samples["infos"]) == list(_NAMES)


def _randomize(m: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial parameters and running statistics (the defaults make eval the identity)."""
    with torch.no_grad():
        if m.weight is not None:
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=torch.float64) + 0.5)
        if m.bias is not None:
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=torch.float64))
        if m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)
            m.num_batches_tracked.fill_(3)


def _run(m: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor):
    """Two steps (the running statistics move twice); gradients of the second."""
    with torch.no_grad():
        m(x.detach() * 0.5 - 1.0)
    xi = x.detach().clone().requires_grad_(True)
    y = m(xi)
    y.backward(gy)
    return y.detach(), xi.grad


def _assert_same(mt: torch.nn.Module, mb: torch.nn.Module, x: torch.Tensor, what: str) -> None:
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    yt, gxt = _run(mt, x, gy)
    yb, gxb = _run(mb, x, gy)
    torch.testing.assert_close(yb, yt, msg=lambda m: f"{what}: output\n{m}")
    torch.testing.assert_close(gxb, gxt, msg=lambda m: f"{what}: input grad\n{m}")
    for p in ("weight", "bias"):
        pt, pb = getattr(mt, p), getattr(mb, p)
        assert (pt is None) == (pb is None), what
        if pt is not None:
            torch.testing.assert_close(pb.grad, pt.grad, msg=lambda m: f"{what}: {p} grad\n{m}")
    for buf in ("running_mean", "running_var"):
        bt, bb = getattr(mt, buf), getattr(mb, buf)
        assert (bt is None) == (bb is None), what
        if bt is not None:
            torch.testing.assert_close(bb, bt, msg=lambda m: f"{what}: {buf}\n{m}")
    nt, nb = mt.num_batches_tracked, mb.num_batches_tracked
    assert (nt is None) == (nb is None), what
    if nt is not None:
        assert int(nb) == int(nt), f"{what}: num_batches_tracked {int(nb)} != torch's {int(nt)}"


def _torch_class(name):
    return getattr(torch.nn, name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("name", _NAMES)
def test_torch_samples_match(torch_samples, name, dtype, training):
    theirs, ours = _torch_class(name), getattr(bnlab.nn, name)
    samples = torch_samples["samples"][(name, str(dtype), training)]
    assert samples, "torch's sample generator returned nothing"
    gen = torch.Generator().manual_seed(2)
    for args, kwargs, x, desc in samples:
        assert x.dtype == dtype
        what = f"{name}({args}, {kwargs}) {desc or 'default'} {dtype} training={training}"
        mt = theirs(*args, **kwargs).to(dtype)
        _randomize(mt, gen)
        mb = ours(*args, **kwargs).to(dtype)
        mb.load_state_dict(mt.state_dict())
        assert isinstance(mb, theirs)
        mt.train(training)
        mb.train(training)
        _assert_same(mt, mb, x, what)


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("name", _NAMES)
def test_torch_samples_match_lazy(torch_samples, name, dtype):
    """The lazy classes on the same samples (constructor without num_features)."""
    lazy_t, lazy_b = _torch_class("Lazy" + name), getattr(bnlab.nn, "Lazy" + name)
    for args, kwargs, x, desc in torch_samples["samples"][(name, str(dtype), True)]:
        args = args[1:]
        what = f"Lazy{name}({args}, {kwargs}) {desc or 'default'} {dtype}"
        mt, mb = lazy_t(*args, **kwargs, dtype=dtype), lazy_b(*args, **kwargs, dtype=dtype)
        _assert_same(mt, mb, x, what)
        assert type(mb) is getattr(bnlab.nn, name), what


@pytest.mark.parametrize("name", _NAMES)
def test_torch_error_samples(torch_samples, name):
    """torch's error samples (eps <= 0 in training) raise the same error type in bnlab, with a
    message naming the layer and eps."""
    errors = torch_samples["errors"][name]
    assert errors
    for args, kwargs, x, error_on, error_type, error_regex in errors:
        assert error_on == "FORWARD_ERROR"
        with pytest.raises(error_type, match=error_regex):
            _torch_class(name)(*args, **kwargs)(x)
        with pytest.raises(error_type, match=rf"^{name}: .*eps"):
            getattr(bnlab.nn, name)(*args, **kwargs)(x)
