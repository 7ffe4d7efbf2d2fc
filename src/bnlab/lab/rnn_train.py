"""One recurrent training run (the ``"rnn"`` task of claim C6): a pure function of its config.

A stacked BN-LSTM (or tanh BN-RNN) reads a sequence; a linear head classifies its last output.
Adam, gradient-norm clipping, seeded batches. Before evaluation the population statistics are
recomputed over the training set with :func:`bnlab.tools.recalibrate` (per step for per-step
statistics). Divergence (a non-finite loss) ends the run and is a result, not an error.

Metrics:

* ``test_acc``: eval-mode accuracy on the test set (chance, 1 / classes, when diverged);
  ``classes``: the number of classes.
* ``batch_acc``: the accuracy on each training minibatch (training mode, as the model saw it),
  one value per step run: steps to any train-accuracy target are computed from it afterwards
  (the target is relative to the data, CLAIMS.md rules v2).
* ``steps_to_80``: first step at which the training accuracy, averaged over the last ``window``
  minibatches, reaches 80%; None if never (censored). Kept for rules version 1.
* ``grad_profiles``: the gradient profile at init (step 0) and at three points of training
  (``profile_at``: one third, two thirds and the last step, by default): on a fixed probe batch
  of training data in training mode, on a copy of the model (nothing is updated), per layer the
  norm ||dL/dh_t|| of the loss gradient with respect to the layer's output h_t for every step
  t = 1..T, summarized by

  - ``growth``: ||dL/dh_3|| / ||dL/dh_T||, how much the gradient grows going back in time (the
    first two steps, where h_0 = 0 makes the gradient special, are left out);
  - ``back_slope``: minus the least-squares slope of log ||dL/dh_t|| over t >= 3, the gradient's
    log growth per step going back in time (> 0: it grows toward the start);
  - ``ratio``: ||dL/dh_1|| / ||dL/dh_T|| (rules version 1's summary), with ``g_first``, ``g_last``;

  and, for the whole model, ``param_grad_norm``: the norm of the parameters' gradient on the probe
  batch before any clipping. A run that diverges has no profile after it diverged.
* ``grad_init`` / ``grad_end``: the per-layer summaries of the first and last profile.
* ``clip``: the pre-clip gradient norm of every training step, summarized: ``share_clipped``
  (steps whose norm exceeded ``clip``), ``median``, ``max``; the curve has them per window.
* ``curve``: every ``curve_every`` steps, the mean loss and accuracy of those minibatches, their
  mean and largest pre-clip gradient norm and the share of them that were clipped.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab.nn import BNLSTM, BNRNN

from .seqdata import load_sequences

__all__ = ["SeqClassifier", "train_rnn", "gradient_profile", "gradient_ratio", "profile_steps",
           "summarize_profile", "DEFAULTS", "FIRST_STEP"]

DEFAULTS = {
    "task": "rnn", "dataset": "digits", "seed": 0, "cell": "lstm", "norm": "none", "gamma_init": None,
    "hidden": 64, "layers": 2, "lr": 3e-3, "clip": 1.0, "batch": 64, "steps": 600, "window": 10,
    "curve_every": 25, "probe": 256, "recal_batch": 500, "profile_at": [1 / 3, 2 / 3, 1.0],
}
FIRST_STEP = 3  # the growth ratio and slope start at h_3: h_1 and h_2 follow h_0 = 0


class SeqClassifier(nn.Module):
    """``BNLSTM`` / ``BNRNN`` (batch_first) -> last step's output -> Linear."""

    def __init__(self, features: int, classes: int, cell: str = "lstm", hidden: int = 64, layers: int = 2,
                 norm: str = "none", gamma_init: float | None = None) -> None:
        super().__init__()
        cls = {"lstm": BNLSTM, "rnn": BNRNN}[cell]
        self.rnn = cls(features, hidden, layers, batch_first=True, norm=norm, gamma_init=gamma_init)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out = self.rnn(x)[0]
        return self.head(out[:, -1])


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def summarize_profile(norms: list[float], first: int = FIRST_STEP) -> dict:
    """The summaries of one layer's profile ``norms`` (||dL/dh_t|| for t = 1..T): ``growth``
    (||dL/dh_first|| / ||dL/dh_T||), ``back_slope`` (minus the slope of log ||dL/dh_t|| over
    t >= first), and v1's ``ratio`` (||dL/dh_1|| / ||dL/dh_T||). None where undefined."""
    T = len(norms)
    n1, nT = (norms[0], norms[-1]) if T else (0.0, 0.0)
    ratio = n1 / nT if nT > 0 else (math.inf if n1 > 0 else math.nan)
    growth = None
    if T >= first and nT > 0 and math.isfinite(nT) and math.isfinite(norms[first - 1]):
        growth = norms[first - 1] / nT
    ts = [t for t in range(first, T + 1) if norms[t - 1] > 0 and math.isfinite(norms[t - 1])]
    slope = None
    if len(ts) >= 2:
        logs = [math.log(norms[t - 1]) for t in ts]
        tm, lm = sum(ts) / len(ts), sum(logs) / len(logs)
        den = sum((t - tm) ** 2 for t in ts)
        slope = -sum((t - tm) * (v - lm) for t, v in zip(ts, logs)) / den
    return {"g_first": n1, "g_last": nT, "ratio": ratio, "growth": growth, "back_slope": slope}


def gradient_profile(model: SeqClassifier, x, y) -> dict:
    """||dL/dh_t|| for every layer and step, in training mode, on a copy of the model, with the
    summaries of :func:`summarize_profile` and the parameters' gradient norm (before clipping).

    The per-step norms come from the recurrent layer itself (``record_grad_norms``: its fused
    kernel's backward through time accumulates them, every norm mode), so the profile runs the
    same fast path as training instead of the reference time loop."""
    m = copy.deepcopy(model).train()
    m.rnn.record_grad_norms = True
    loss = F.cross_entropy(m(x), y)
    params = [p for p in m.parameters() if p.requires_grad]
    gp = torch.autograd.grad(loss, params, allow_unused=True)
    layers = []
    for l, g in enumerate(m.rnn.hidden_grad_norms):
        norms = [float(v) for v in g] if g is not None else [0.0] * x.shape[1]
        layers.append(dict({"layer": l, "norms": norms}, **summarize_profile(norms)))
    pn = math.sqrt(sum(float(g.pow(2).sum()) for g in gp if g is not None))
    return {"loss": _finite_or_none(float(loss.detach())), "param_grad_norm": _finite_or_none(pn), "layers": layers}


def gradient_ratio(model: SeqClassifier, x, y) -> list[dict]:
    """Per layer: ||dL/dh_1||, ||dL/dh_T||, their ratio, the growth ratio and slope (see
    :func:`gradient_profile`, without the full profile)."""
    return [{k: v for k, v in layer.items() if k != "norms"} for layer in gradient_profile(model, x, y)["layers"]]


def profile_steps(steps: int, fractions) -> list[int]:
    """The training steps at which the gradient profile is taken (besides init)."""
    return sorted({min(steps, max(1, int(round(f * steps)))) for f in fractions}) if steps > 0 else []


@torch.no_grad()
def _accuracy(model, x, y, batch=500) -> float:
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch), y.split(batch)))
    return correct / max(len(y), 1)


def _median(v: list[float]) -> float | None:
    if not v:
        return None
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def train_rnn(config: dict) -> dict:
    """Train one recurrent classifier; returns JSON-able metrics (see the module docstring)."""
    cfg = dict(DEFAULTS, **config)
    t0 = time.perf_counter()
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_sequences(cfg["dataset"], seed, cfg.get("data_dir"))
    classes = int(ytr.max()) + 1
    model = SeqClassifier(xtr.shape[2], classes, cfg["cell"], cfg["hidden"], cfg["layers"], cfg["norm"],
                          cfg["gamma_init"])
    gen = torch.Generator().manual_seed(seed)
    probe = torch.randperm(len(ytr), generator=gen)[: cfg["probe"]]
    xp, yp = xtr[probe], ytr[probe]

    def snapshot(step: int) -> dict:
        return dict({"step": step}, **gradient_profile(model, xp, yp))

    profiles = [snapshot(0)]
    at = set(profile_steps(int(cfg["steps"]), cfg["profile_at"]))
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    B, window, every, clip = cfg["batch"], cfg["window"], cfg["curve_every"], float(cfg["clip"])
    order, pos = torch.randperm(len(ytr), generator=gen), 0
    accs, losses, norms = [], [], []
    curve = {"step": [], "loss": [], "train_acc": [], "grad_norm": [], "grad_norm_max": [], "clipped": []}
    steps_to_80, diverged, step = None, False, 0
    model.train()
    for step in range(1, cfg["steps"] + 1):
        if pos + B > len(order):
            order, pos = torch.randperm(len(ytr), generator=gen), 0
        idx = order[pos : pos + B]
        pos += B
        xb, yb = xtr[idx], ytr[idx]
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        if not torch.isfinite(loss):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))  # the norm before clipping
        opt.step()
        losses.append(float(loss.detach()))
        accs.append(float((logits.argmax(1) == yb).float().mean()))
        norms.append(norm)
        if steps_to_80 is None and len(accs) >= window and sum(accs[-window:]) / window >= 0.8:
            steps_to_80 = step
        if step % every == 0:
            w = norms[-every:]
            curve["step"].append(step)
            curve["loss"].append(sum(losses[-every:]) / every)
            curve["train_acc"].append(sum(accs[-every:]) / every)
            curve["grad_norm"].append(_finite_or_none(sum(w) / len(w)))
            curve["grad_norm_max"].append(_finite_or_none(max(w)))
            curve["clipped"].append(sum(v > clip for v in w) / len(w))
        if step in at:
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                diverged = True
                break
            profiles.append(snapshot(step))
    if not diverged and not all(torch.isfinite(p).all() for p in model.parameters()):
        diverged = True
    if diverged:
        test_acc, train_acc = 1.0 / classes, 1.0 / classes
    else:
        bnlab.tools.recalibrate(model, xtr.split(cfg["recal_batch"]))
        test_acc, train_acc = _accuracy(model, xte, yte), _accuracy(model, xtr, ytr)
    summary = lambda p: [{k: v for k, v in layer.items() if k != "norms"} for layer in p["layers"]]  # noqa: E731
    fin = [v for v in norms if math.isfinite(v)]
    return {
        "test_acc": test_acc, "train_acc": train_acc, "classes": classes, "steps_to_80": steps_to_80,
        "diverged": diverged, "steps_run": step,
        "final_loss": (sum(losses[-every:]) / len(losses[-every:])) if losses else None,
        "batch_acc": [round(a, 6) for a in accs],
        "grad_profiles": profiles, "grad_init": summary(profiles[0]),
        "grad_end": summary(profiles[-1]) if len(profiles) > 1 and profiles[-1]["step"] == cfg["steps"] else None,
        "clip": {"threshold": clip, "share_clipped": (sum(v > clip for v in norms) / len(norms)) if norms else None,
                 "median": _median(fin), "max": max(fin) if fin else None},
        "curve": curve, "wall_s": time.perf_counter() - t0,
    }
