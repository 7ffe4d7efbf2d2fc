"""One recurrent training run (the ``"rnn"`` task of claim C6): a pure function of its config.

A stacked BN-LSTM (or tanh BN-RNN) reads a sequence; a linear head classifies its last output.
Adam, gradient-norm clipping, seeded batches. Before evaluation the population statistics are
recomputed over the training set with :func:`bnlab.tools.recalibrate` (per step for per-step
statistics). Divergence (a non-finite loss) ends the run and is a result, not an error.

Metrics:

* ``test_acc``: eval-mode accuracy on the test set (chance, 1 / classes, when diverged).
* ``steps_to_80``: first step at which the training accuracy, averaged over the last ``window``
  minibatches (training mode, as the model saw them), reaches 80%; None if never (censored).
* ``grad_init`` / ``grad_end``: per layer, ||dL/dh_1||, ||dL/dh_T|| and their ratio, on a fixed
  probe batch of training data in training mode (a copy of the model, so nothing is updated).
* ``curve``: every ``curve_every`` steps, the mean loss and accuracy of those minibatches.
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

__all__ = ["SeqClassifier", "train_rnn", "gradient_ratio", "DEFAULTS"]

DEFAULTS = {
    "task": "rnn", "dataset": "digits", "seed": 0, "cell": "lstm", "norm": "none", "gamma_init": None,
    "hidden": 64, "layers": 2, "lr": 3e-3, "clip": 1.0, "batch": 64, "steps": 600, "window": 10,
    "curve_every": 25, "probe": 256, "recal_batch": 500,
}


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


def gradient_ratio(model: SeqClassifier, x, y) -> list[dict]:
    """Per layer: ||dL/dh_1||, ||dL/dh_T|| and ratio, in training mode, on a copy of the model."""
    m = copy.deepcopy(model).train()
    m.rnn.record_hidden = True
    loss = F.cross_entropy(m(x), y)
    hs = m.rnn.hidden_states
    wanted = [t for layer in hs for t in (layer[0], layer[-1])]
    grads = torch.autograd.grad(loss, wanted, allow_unused=True)
    out = []
    for l in range(len(hs)):
        g1, gT = grads[2 * l], grads[2 * l + 1]
        n1 = float(g1.norm()) if g1 is not None else 0.0
        nT = float(gT.norm()) if gT is not None else 0.0
        ratio = n1 / nT if nT > 0 else (math.inf if n1 > 0 else math.nan)
        out.append({"layer": l, "g_first": n1, "g_last": nT, "ratio": ratio})
    return out


@torch.no_grad()
def _accuracy(model, x, y, batch=500) -> float:
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch), y.split(batch)))
    return correct / max(len(y), 1)


def train_rnn(config: dict) -> dict:
    """Train one recurrent classifier; returns JSON-able metrics (see the module docstring)."""
    cfg = dict(DEFAULTS, **config)
    t0 = time.perf_counter()
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_sequences(cfg["dataset"], seed)
    classes = int(ytr.max()) + 1
    model = SeqClassifier(xtr.shape[2], classes, cfg["cell"], cfg["hidden"], cfg["layers"], cfg["norm"],
                          cfg["gamma_init"])
    gen = torch.Generator().manual_seed(seed)
    probe = torch.randperm(len(ytr), generator=gen)[: cfg["probe"]]
    xp, yp = xtr[probe], ytr[probe]
    grad_init = gradient_ratio(model, xp, yp)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    B, window, every = cfg["batch"], cfg["window"], cfg["curve_every"]
    order, pos = torch.randperm(len(ytr), generator=gen), 0
    accs, losses, curve = [], [], {"step": [], "loss": [], "train_acc": []}
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
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        opt.step()
        losses.append(float(loss.detach()))
        accs.append(float((logits.argmax(1) == yb).float().mean()))
        if steps_to_80 is None and len(accs) >= window and sum(accs[-window:]) / window >= 0.8:
            steps_to_80 = step
        if step % every == 0:
            curve["step"].append(step)
            curve["loss"].append(sum(losses[-every:]) / every)
            curve["train_acc"].append(sum(accs[-every:]) / every)
    if not diverged and not all(torch.isfinite(p).all() for p in model.parameters()):
        diverged = True
    grad_end = gradient_ratio(model, xp, yp) if not diverged else None
    if diverged:
        test_acc, train_acc = 1.0 / classes, 1.0 / classes
    else:
        bnlab.tools.recalibrate(model, xtr.split(cfg["recal_batch"]))
        test_acc, train_acc = _accuracy(model, xte, yte), _accuracy(model, xtr, ytr)
    return {
        "test_acc": test_acc, "train_acc": train_acc, "steps_to_80": steps_to_80, "diverged": diverged,
        "steps_run": step, "final_loss": (sum(losses[-every:]) / len(losses[-every:])) if losses else None,
        "grad_init": grad_init, "grad_end": grad_end, "curve": curve, "wall_s": time.perf_counter() - t0,
    }
