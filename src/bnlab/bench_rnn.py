"""Recurrent-layer benchmark: forward+backward of bnlab's BN-LSTM/GRU/RNN against torch's layers.

The figure of merit is the ratio torch time / bnlab time against torch.nn.LSTM (or GRU/RNN) of the
same size (above 1: bnlab is faster; the direction of every suite of ``bnlab bench``), timed in the
same run, interleaved (one call of each contender per round), median of the rounds: absolute
times drift on shared machines, ratios taken this way do not.

Default size (the audit's recurrent claim, C6): batch 64, T = 40, hidden 64, 2 layers, 1 input
feature, 2 threads. Targets (bnlab's layer at most this many times torch's time, i.e. a ratio of at
least 1/target): norm="none" 1.2 (it runs torch's own kernel), "vertical" 3, "per_timestep" 4.

    python -m bnlab.bench_rnn              # table
    bnlab bench --suite rnn [--json FILE]  # the same, through the project's bench command
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .nn.recurrent import BNGRU, BNLSTM, BNRNN, NORM_MODES

__all__ = ["run_rnn_suite", "main", "TARGETS"]

TARGETS = {"none": 1.2, "vertical": 3.0, "per_timestep": 4.0}
_TORCH = {"LSTM": (torch.nn.LSTM, BNLSTM), "GRU": (torch.nn.GRU, BNGRU), "RNN": (torch.nn.RNN, BNRNN)}


def _step(model, x):
    """One training step's compute: forward, scalar loss, backward; grads reset first."""
    for p in model.parameters():
        p.grad = None
    out = model(x)[0]
    out.float().pow(2).mean().backward()


def _contenders(kind: str, size: dict, modes) -> dict:
    tcls, bcls = _TORCH[kind]
    args = (size["input"], size["hidden"], size["layers"])
    torch.manual_seed(0)
    ref = tcls(*args, batch_first=True)
    out = {f"torch.nn.{kind}": ref}
    for mode in modes:
        m = bcls(*args, batch_first=True, norm=mode)
        if mode == "none":
            m.load_state_dict(ref.state_dict())
            loop = bcls(*args, batch_first=True, norm="none", force_loop=True)
            loop.load_state_dict(ref.state_dict())
            out[f"BN{kind} none"] = m
            out[f"BN{kind} none (loop)"] = loop
        else:
            out[f"BN{kind} {mode}"] = m
    return out


def time_interleaved(models: dict, x, repeats: int, warmup: int = 3, progress=None, task=None) -> dict:
    """Median seconds of one fwd+bwd per model, calls interleaved round by round."""
    for _ in range(warmup):
        for m in models.values():
            _step(m, x)
    times = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            t0 = time.perf_counter()
            _step(m, x)
            times[k].append(time.perf_counter() - t0)
        if progress is not None and task is not None:
            progress.advance(task)
    return {k: statistics.median(v) for k, v in times.items()}


def run_rnn_suite(args, progress=None) -> dict:
    """Time fwd+bwd of torch's recurrent layers against bnlab's in every norm mode.

    Args:
        args: has ``repeats`` (rounds; at least 20 are timed), ``threads`` and ``quick`` (LSTM
            only, at least 20 rounds).
        progress: a rich Progress to advance, or None.

    Returns a dict: ``{"size": ..., "threads": ..., "repeats": ..., "rows": [{"kind", "name",
    "norm", "ms", "ratio", "target", "ok"}]}`` with ratio = torch time / bnlab time against torch's
    layer of the same kind in the same interleaved run; ``target``: the most times torch's time the
    layer may take (met when ratio >= 1 / target).
    """
    repeats = max(int(getattr(args, "repeats", 25) or 25), 20)
    threads = int(getattr(args, "threads", 2) or 2)
    quick = bool(getattr(args, "quick", False))
    size = {"batch": 64, "steps": 40, "hidden": 64, "layers": 2, "input": 1}
    kinds = ["LSTM"] if quick else ["LSTM", "GRU", "RNN"]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for kind in kinds:
            models = _contenders(kind, size, NORM_MODES if kind == "LSTM" else ("none", "vertical", "per_timestep"))
            x = torch.randn(size["batch"], size["steps"], size["input"], generator=torch.Generator().manual_seed(1))
            task = progress.add_task(f"rnn {kind}", total=repeats) if progress is not None else None
            med = time_interleaved(models, x, repeats, progress=progress, task=task)
            base = med[f"torch.nn.{kind}"]
            for name, sec in med.items():
                norm = name.split(" ", 1)[1] if name.startswith("BN") else "torch"
                target = TARGETS.get(norm.replace(" (loop)", "")) if kind == "LSTM" and "(loop)" not in norm else None
                ratio = base / sec  # torch / bnlab, as every suite
                rows.append({"kind": kind, "name": name, "norm": norm, "ms": sec * 1e3, "ratio": ratio,
                             "target": target, "ok": None if target is None else ratio >= 1.0 / target})
    finally:
        torch.set_num_threads(old_threads)
    return {"suite": "rnn", "size": size, "threads": threads, "repeats": repeats, "rows": rows}


def format_table(result: dict) -> str:
    s = result["size"]
    lines = [f"recurrent fwd+bwd: batch {s['batch']}, T={s['steps']}, hidden {s['hidden']}, {s['layers']} layers, "
             f"{result['threads']} threads, median of {result['repeats']} interleaved rounds",
             f"{'layer':28s} {'ms':>8s} {'ratio':>8s} {'target':>7s}"]
    for r in result["rows"]:
        tgt = f">={1.0 / r['target']:.2f}" if r["target"] else ""
        flag = "" if r["ok"] is None else (" ok" if r["ok"] else " MISSED")
        lines.append(f"{r['name']:28s} {r['ms']:8.2f} {r['ratio']:8.2f} {tgt:>7s}{flag}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnlab.bench_rnn", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = run_rnn_suite(args)
    print(format_table(res))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
