"""Model benchmark (``bnlab bench --suite models``): whole training steps and inference of small
models built with bnlab's batch norm against the same models built with torch's.

Each model is built once with torch's layers; bnlab's copy is :func:`bnlab.convert` of a deep copy,
so both start from the same weights. A **training step** is forward, cross-entropy loss, backward
and an SGD step (``foreach``, momentum 0.9); **inference** is ``model.eval()`` under
``torch.no_grad()``. Both contenders alternate call by call (interleaved, the order flipping every
round) and each figure is the median of ``--repeats`` rounds (at least 15) after a warm-up; under
``torch.compile`` the first call (the compilation) is timed separately and left out of the median.

The figure of merit is the **ratio = torch time / bnlab time**, as in every suite of
``bnlab bench``: above 1, bnlab's model is faster.

Models:

* ``resnet``: a CIFAR-style ResNet (a 3x3 stem, three stages of 16/32/64 channels with two basic
  residual blocks each, 1x1 projection shortcuts where the shape changes), batch 64, 3x32x32
  inputs, 10 classes; 15 BatchNorm2d layers.
* ``mlp``: three Linear(512) -> BatchNorm1d -> ReLU blocks and a linear head, batch 256, 128
  input features.
* ``lstm``: a sequence classifier, one LSTM layer (32 inputs, 128 hidden, 50 steps, batch 64) and
  a linear head on the last hidden state: torch.nn.LSTM against bnlab's BNLSTM with
  ``norm="vertical"`` (one batch norm over the input projection). Informative, no bar: the two
  are not the same computation.

Configurations: ``eager`` (NCHW float32), ``channels_last`` (the ResNet's inputs and weights in
channels_last), ``bf16`` (the step under ``torch.autocast("cpu", torch.bfloat16)``), ``inference``
and ``compile`` (``torch.compile`` of the whole model; the step around it in eager).

With fused layers available (:class:`bnlab.nn.BatchNormAct2d`), the ResNet's and the MLP's eager
training steps are also timed with their BN -> ReLU pairs fused (``bnlab.convert(model,
fuse_act=True)``; the MLP's row has no bar).

``--device cuda`` runs the same suite on the first GPU: models, inputs and targets on the GPU,
``bf16`` under ``torch.autocast("cuda", torch.bfloat16)``, and each timed call ends with
``torch.cuda.synchronize()`` so that a step's time is the GPU's work, not its launch. On a GPU
both sides run torch's batch-norm kernel (bnlab's fused kernels are CPU code); bnlab's layer adds
its running-statistics policy (the non-finite check and the float64 update) on the statistics the
kernel returns, and with ``nonfinite="raise"`` (the default) that check reads one flag back to the
host per layer and step, which waits for every kernel queued before it. On a GPU the ResNet's and the
MLP's eager steps are also timed with every batch norm set to ``nonfinite="skip"``, which never
leaves the device (rows "(nonfinite=skip)", no bar).
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from contextlib import nullcontext

import torch
from torch import nn

import bnlab
from .bench_rnn import status

__all__ = ["run_models_suite", "format_rows", "resnet", "mlp", "lstm_classifier", "BARS", "CONFIGS"]

CONFIGS = ("eager", "channels_last", "bf16", "inference", "compile")
# the bar: ratio >= this in every configuration of these models (1.0 within the noise band)
BARS = {"resnet": 0.97, "mlp": 0.97}
FUSED_BAR = 1.1  # the ResNet's eager training step with BN -> ReLU fused


class _Block(nn.Module):
    """A basic residual block: conv-BN-ReLU-conv-BN, plus the (projected) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + (x if self.short is None else self.short(x)))


class ResNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(_Block(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet() -> nn.Module:
    """The suite's ResNet, with torch's layers (seeded: the same weights every call)."""
    torch.manual_seed(0)
    return ResNet()


def mlp(features: int = 128, width: int = 512, depth: int = 3, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    layers, cin = [], features
    for _ in range(depth):
        layers += [nn.Linear(cin, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        cin = width
    layers.append(nn.Linear(cin, classes))
    return nn.Sequential(*layers)


class LSTMClassifier(nn.Module):
    def __init__(self, rnn: nn.Module, hidden: int, classes: int = 10) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out = self.rnn(x)[0]
        return self.head(out[:, -1])


def lstm_classifier(bnlab_norm: str | None = None, inputs: int = 32, hidden: int = 128) -> nn.Module:
    """torch.nn.LSTM (``bnlab_norm=None``) or bnlab's BNLSTM with that norm mode, same head."""
    torch.manual_seed(0)
    if bnlab_norm is None:
        rnn = nn.LSTM(inputs, hidden, 1, batch_first=True)
    else:
        rnn = bnlab.nn.BNLSTM(inputs, hidden, 1, batch_first=True, norm=bnlab_norm)
    return LSTMClassifier(rnn, hidden)


def _inputs(model: str, batch: int | None = None):
    g = torch.Generator().manual_seed(1)
    if model == "resnet":
        n = batch or 64
        return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    if model == "mlp":
        n = batch or 256
        return torch.randn(n, 128, generator=g), torch.randint(0, 10, (n,), generator=g)
    n = batch or 64
    return torch.randn(n, 50, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _pair(model: str, variant: str = "") -> tuple[nn.Module, nn.Module]:
    """torch's model and bnlab's copy; ``variant``: "" (plain), "fused" (BN -> ReLU fused) or "skip"
    (every batch norm with ``nonfinite="skip"``)."""
    if model == "lstm":
        return lstm_classifier(None), lstm_classifier("vertical")
    ref = resnet() if model == "resnet" else mlp()
    ours = bnlab.convert(copy.deepcopy(ref), to="bnlab", warn=False, **({"fuse_act": True} if variant == "fused" else {}))
    if variant == "skip":
        for m in ours.modules():
            if hasattr(m, "nonfinite"):
                m.nonfinite = "skip"
    return ref, ours


class _Contender:
    """One model and its step in one configuration."""

    def __init__(self, model: nn.Module, config: str, x, target, device: str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        model, x, target = model.to(self.device), x.to(self.device), target.to(self.device)
        if config == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        self.x, self.target = x, target
        self.model = model
        if config == "inference":
            model.eval()
        else:
            model.train()
        self.fn = torch.compile(model) if config == "compile" else model
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
        self.compile_s = None

    def step(self) -> None:
        if self.config == "inference":
            with torch.no_grad():
                self.fn(self.x)
            self._sync()
            return
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.config == "bf16" else nullcontext()
        self.opt.zero_grad(set_to_none=True)
        with ctx:
            loss = nn.functional.cross_entropy(self.fn(self.x).float(), self.target)
        loss.backward()
        self.opt.step()
        self._sync()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartiles (``statistics.quantiles``, inclusive method)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _median_pair(a: _Contender, b: _Contender, repeats: int, warmup: int) -> tuple[float, float, tuple]:
    """Median seconds of ``a`` and ``b``, and the quartiles of the per-round ratios ``a / b``: the
    two steps of a round run back to back on the same machine state, so the spread of their ratio
    is the noise band of the figure (what another process on the cores did to both)."""
    for c in (a, b):
        if c.config == "compile":
            t0 = time.perf_counter()
            c.step()
            c.compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        a.step()
        b.step()
    ta, tb = [], []
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            order = ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta))
            for c, out in order:
                t0 = time.perf_counter()
                c.step()
                out.append(time.perf_counter() - t0)
    finally:
        if gc_was:
            gc.enable()
    return statistics.median(ta), statistics.median(tb), _quartiles([x / y for x, y in zip(ta, tb)])


def _applies(model: str, config: str) -> str | None:
    """None when the configuration applies to the model, else why it is not measured."""
    if config == "channels_last" and model != "resnet":
        return "no 4-D tensors"
    return None


def _baseline_fails(ref: _Contender) -> str | None:
    """None when torch's contender runs a step here, else why not: a RuntimeError from torch itself,
    e.g. oneDNN's bf16 LSTM, which has no kernel on a CPU without AVX-512 ("could not create a
    primitive descriptor"). The row then says so instead of ending the suite; bnlab's contender
    is never excused this way (its errors propagate)."""
    if ref.config == "compile":  # the first step is the compile, timed by _median_pair
        return None
    try:
        ref.step()
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        return f"torch's own step fails on this machine: {type(e).__name__}: {first[:120]}"
    return None


def check_device(device: str) -> str:
    """``device`` ("cpu" or "cuda"), or a ValueError that says what is missing."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"bnlab bench: --device must be cpu or cuda (got {device!r})")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("bnlab bench: --device cuda, but torch sees no CUDA device here "
                         f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    return device


def device_name(device: str) -> str:
    """What the suite ran on: "cpu", or "cuda: <the GPU's name>"."""
    return "cpu" if device == "cpu" else f"cuda: {torch.cuda.get_device_name(0)}"


def _has_fused() -> bool:
    return hasattr(bnlab.nn, "BatchNormAct2d")


def run_models_suite(args, progress=None) -> dict:
    """Time every (model, configuration); returns ``{"repeats", "rows": [...]}`` with one row per pair:
    ``{"model", "config", "torch_ms", "bnlab_ms", "ratio", "compile_s", "bar", "ok", "status", "skipped"}``
    (``status``: ok, within noise or MISSED, as :func:`bnlab.bench_rnn.status`)."""
    quick = bool(getattr(args, "quick", False))
    repeats = 3 if quick else max(15, int(getattr(args, "repeats", 15) or 15))
    warmup = 1 if quick else 3
    models = getattr(args, "models", None) or (("mlp", "resnet") if quick else ("resnet", "mlp", "lstm"))
    configs = getattr(args, "configs", None) or (("eager", "inference") if quick else CONFIGS)
    batch = getattr(args, "batch", None)  # (the tests' smoke runs: a smaller batch than each model's own)
    device = check_device(getattr(args, "device", None) or "cpu")
    plan = [(m, c, "") for m in models for c in configs]
    # after each eager row: on a GPU the policy without its read back (a finding, no bar); BN -> ReLU
    # fused (a bar for the ResNet; the MLP's row is a finding)
    variants = (["skip"] if device == "cuda" else []) + (["fused"] if _has_fused() else [])
    for m in ("resnet", "mlp"):
        if m in models and "eager" in configs:
            at = plan.index((m, "eager", "")) + 1
            plan[at:at] = [(m, "eager", v) for v in variants]
    task = progress.add_task("model steps", total=len(plan)) if progress is not None else None
    rows = []
    for model, config, variant in plan:
        why = _applies(model, config)
        label = {"fused": f"{model} (BN+ReLU fused)", "skip": f"{model} (nonfinite=skip)"}.get(variant, model)
        if why is not None:
            rows.append({"model": label, "config": config, "skipped": why})
        else:
            ref, ours = _pair(model, variant)
            x, target = _inputs(model, batch)
            a = _Contender(ref, config, x, target, device)
            b = _Contender(ours, config, x.clone(), target, device)
            why = _baseline_fails(a)
            if why is not None:
                rows.append({"model": label, "config": config, "skipped": why})
                if task is not None:
                    progress.advance(task)
                continue
            if config != "compile":
                b.step()  # (a step of each before the warm-up: they stay in step)
            sec_t, sec_b, band = _median_pair(a, b, repeats, warmup)
            bar = {"": BARS.get(model), "fused": FUSED_BAR if model == "resnet" else None}.get(variant)
            speed = sec_t / sec_b
            rows.append({"model": label, "config": config, "torch_ms": sec_t * 1e3, "bnlab_ms": sec_b * 1e3,
                         "ratio": speed, "ratio_iqr": list(band), "compile_s": None if config != "compile" else
                         {"torch": a.compile_s, "bnlab": b.compile_s},
                         "bar": bar, "ok": None if bar is None or quick else speed >= bar,
                         "status": None if bar is None or quick else status(speed, band, bar)})
            del a, b, ref, ours
            if config == "compile":
                torch._dynamo.reset()
        if task is not None:
            progress.advance(task)
    return {"repeats": repeats, "threads": torch.get_num_threads(), "batch": batch, "rows": rows,
            "device": device_name(device),
            "ratio": "torch time / bnlab time (> 1: bnlab is faster)"}


def format_rows(result: dict) -> list[tuple]:
    """Table rows: model, configuration, torch ms, bnlab ms, ratio, the per-round ratios' quartiles,
    bar, compile seconds."""
    out = []
    for r in result["rows"]:
        if "skipped" in r:
            out.append((r["model"], r["config"], "-", "-", "-", "-", "", f"not measured: {r['skipped']}"))
            continue
        band = r.get("ratio_iqr")
        band = "-" if not band else f"{band[0]:.2f}-{band[1]:.2f}"
        st = r.get("status") or (None if r["ok"] is None else status(r["ratio"], r.get("ratio_iqr"), r["bar"]))
        bar = "" if r["bar"] is None else (f">= {r['bar']:.2f} " + (st or ""))
        comp = r.get("compile_s")
        note = "" if not comp else f"compile {comp['torch']:.1f} s / {comp['bnlab']:.1f} s"
        out.append((r["model"], r["config"], f"{r['torch_ms']:.2f}", f"{r['bnlab_ms']:.2f}", f"{r['ratio']:.2f}",
                    band, bar, note))
    return out
