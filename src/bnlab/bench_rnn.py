"""Recurrent-layer benchmark: forward+backward of bnlab's BN-LSTM/GRU against torch's layers.

The figure of merit is the ratio torch time / bnlab time against torch.nn.LSTM (or GRU) of the same
size, fed the same input (above 1: bnlab is faster; the direction of every suite of ``bnlab bench``),
timed in the same run, interleaved (one call of each contender per round), median of the rounds:
absolute times drift on shared machines, ratios taken this way do not.

Sizes (batch, T, input, hidden, layers): (64, 40, 1, 64, 2), the audit's recurrent claim C6, and
(64, 50, 32, 128, 1); each with equal lengths and with variable lengths (a PackedSequence, lengths
spread evenly from T down to T/2, the same for torch), LSTM and GRU, every norm mode. Targets (bnlab's
layer at most this many times torch's time, i.e. a ratio of at least 1/target): norm="none" 1.0 (it
runs torch's own kernel: what it may cost is the wrapper's Python), "vertical" 1.1 (torch's kernel
with the input norm folded in), "horizontal", "per_timestep" and "layer" 1.3 (the fused time loop).
Beside each ratio, its noise band: the quartiles of the per-round ratios (the order alternating from
round to round). Each row against its target: "ok" (the median ratio reaches it), "MISSED" (the
whole band below it) or "within noise" (the median below, the band reaching it: not met, and not
told apart from it by this run). ``--loop`` adds the reference time loop (``force_loop=True``) of
every mode.

Each timed call follows an untimed call of the same layer (``settle``, default 1), as a step of a
training loop follows the layer's previous step. Whatever runs right after a fused normalized layer
pays for the caches and the heap that layer left (measured at 64x50x32->128x1: torch's LSTM 10.74 ms
a step right after the horizontal layer, 9.98 right after the vertical one; a 5 ms sleep in between
changed neither), and with one call of each a round that toll fell on whichever contenders the
order put after the fused ones: never on torch's layer, which ran first or after norm="none"
(vertical at 64x50 read 0.85 that way and 0.89 settled, in one process).

Beside the modes, the fused time loop with every normalization off (``fused, no norm``: norm="none"
through the fused call, as ``record_grad_norms`` runs it; no target): the floor the normalized fused
modes stand on. Where it is itself below a mode's target, no normalization however cheap meets that
target on this route.

Beside the times, each contender's minor page faults a step (the median over the rounds, the whole
process's count around the timed call): memory the allocator hands out fresh, which the kernel maps
and zeroes on first write, about 2 us a fault on the 2-core machine. It tells a compute difference
from an allocator one: torch's 2-layer LSTM at 64x40, called once a round between other layers,
faulted 2,900-5,000 times a step (about 20 MB of its workspace mapped anew each call with glibc's
defaults) and took up to twice its time; called right after itself it faults about never.
``--malloc kept`` runs the whole suite with glibc keeping freed memory (the audit workers' setting).

    python -m bnlab.bench_rnn              # table
    bnlab bench --suite rnn [--json FILE]  # the same, through the project's bench command
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch
from torch.nn.utils.rnn import pack_padded_sequence

from .nn._buffers import minor_faults
from .nn.recurrent import BNGRU, BNLSTM, BNRNN, NORM_MODES

__all__ = ["run_rnn_suite", "main", "TARGETS", "SHAPES", "format_table"]

TARGETS = {"none": 1.0, "vertical": 1.1, "horizontal": 1.3, "per_timestep": 1.3, "layer": 1.3}
SHAPES = ({"batch": 64, "steps": 40, "input": 1, "hidden": 64, "layers": 2},
          {"batch": 64, "steps": 50, "input": 32, "hidden": 128, "layers": 1})
_TORCH = {"LSTM": (torch.nn.LSTM, BNLSTM), "GRU": (torch.nn.GRU, BNGRU), "RNN": (torch.nn.RNN, BNRNN)}


def _step(model, x):
    """One training step's compute: forward, scalar loss, backward; grads reset first."""
    for p in model.parameters():
        p.grad = None
    out = model(x)[0]
    out = out.data if hasattr(out, "batch_sizes") else out
    out.float().pow(2).mean().backward()


#: the row of the fused loop with no normalization (no target: the floor of the normalized fused modes)
FLOOR = "fused, no norm"


def _contenders(kind: str, size: dict, modes, loop: bool) -> dict:
    tcls, bcls = _TORCH[kind]
    args = (size["input"], size["hidden"], size["layers"])
    torch.manual_seed(0)
    ref = tcls(*args, batch_first=True)
    out = {f"torch.nn.{kind}": ref}
    for mode in modes:
        m = bcls(*args, batch_first=True, norm=mode)
        if mode == "none":
            m.load_state_dict(ref.state_dict())
        out[f"BN{kind} {mode}"] = m
        if loop:
            r = bcls(*args, batch_first=True, norm=mode, force_loop=True)
            r.load_state_dict(m.state_dict())
            out[f"BN{kind} {mode} (loop)"] = r
    # the floor: norm="none" through the fused call every normalized mode runs (recording the steps'
    # gradient norms takes that path: the kernel computes them in every mode), torch's weights
    f = bcls(*args, batch_first=True, norm="none")
    f.load_state_dict(ref.state_dict())
    f.record_grad_norms = True
    out[f"BN{kind} {FLOOR}"] = f
    return out


def _input(size: dict, packed: bool):
    g = torch.Generator().manual_seed(1)
    B, T = size["batch"], size["steps"]
    x = torch.randn(B, T, size["input"], generator=g)
    if not packed:
        return x
    lengths = torch.linspace(T, T // 2, B).round().long()[torch.randperm(B, generator=g)]
    return pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)


def time_rounds(models: dict, x, repeats: int, warmup: int = 3, progress=None, task=None,
                faults: dict | None = None, settle: int = 1) -> dict:
    """Seconds of one fwd+bwd per model and round: every model once a round, the order reversed every
    other round, each timed call right after ``settle`` untimed calls of the same model (a training
    loop's steady state: no model's time depends on which other one ran before it), the garbage
    collector off while timing. ``faults``: a dict to fill with each model's minor page faults per
    round (the timed calls; left empty where the platform counts none)."""
    for _ in range(warmup):
        for m in models.values():
            _step(m, x)
    times = {k: [] for k in models}
    count = faults is not None and minor_faults() is not None
    if count:
        faults.update({k: [] for k in models})
    items = list(models.items())
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            for k, m in (items if r % 2 == 0 else items[::-1]):
                for _ in range(settle):
                    _step(m, x)
                f0 = minor_faults() if count else 0
                t0 = time.perf_counter()
                _step(m, x)
                times[k].append(time.perf_counter() - t0)
                if count:
                    faults[k].append(minor_faults() - f0)
            if progress is not None and task is not None:
                progress.advance(task)
    finally:
        if gc_was:
            gc.enable()
    return times


def _band(base: list, own: list) -> list:
    """First and third quartiles of the per-round ratios ``base / own``."""
    ratios = [a / b for a, b in zip(base, own)]
    if len(ratios) < 2:
        return [ratios[0], ratios[0]]
    q = statistics.quantiles(ratios, n=4, method="inclusive")
    return [q[0], q[2]]


def status(ratio: float, band, least: float | None) -> str | None:
    """A row against its bar (``least``: the least ratio it aims for): "ok" when the median ratio
    reaches it, "MISSED" when even the upper quartile of the per-round ratios stays below it, and
    "within noise" between the two (the median below the bar, the bar inside the noise band: this
    run cannot tell the two apart; not counted as met). None without a bar."""
    if least is None:
        return None
    if ratio >= least:
        return "ok"
    hi = band[1] if band else ratio
    return "within noise" if hi >= least else "MISSED"


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run_rnn_suite(args, progress=None) -> dict:
    """Time fwd+bwd of torch's recurrent layers against bnlab's in every norm mode.

    Args:
        args: has ``repeats`` (rounds; at least 20, at most 5 with ``quick``), ``threads``,
            ``quick`` (LSTM only, the first size) and optionally ``loop`` (add the reference loops)
            and ``kinds`` (a list, default LSTM and GRU).
        progress: a rich Progress to advance, or None.

    Returns a dict: ``{"suite": "rnn", "shapes": ..., "threads": ..., "repeats": ..., "loadavg_start",
    "loadavg_end", "rows": [{"kind", "shape", "lengths", "name", "norm", "ms", "torch_ms", "ratio",
    "ratio_iqr", "target", "ok", "status", "faults", "torch_faults"}]}`` with ratio = torch time / bnlab time (medians) against torch's
    layer of the same kind, size and input in the same interleaved run, ``ratio_iqr`` the quartiles
    of the per-round ratios; ``target``: the most times torch's time the layer may take (met when
    ratio >= 1 / target); ``status``: :func:`status` (ok, within noise, MISSED); ``faults`` and
    ``torch_faults``: the median minor page faults of a step of the row's layer and of torch's (None
    where the platform counts none).
    """
    quick = bool(getattr(args, "quick", False))
    repeats = int(getattr(args, "repeats", 25) or 25)
    repeats = min(repeats, 5) if quick else max(repeats, 20)
    threads = int(getattr(args, "threads", 2) or 2)
    loop = bool(getattr(args, "loop", False))
    settle = getattr(args, "settle", None)
    settle = 1 if settle is None else int(settle)
    if settle < 0:
        raise ValueError(f"bench_rnn: settle must be >= 0 untimed calls (got {settle})")
    kinds = ["LSTM"] if quick else list(getattr(args, "kinds", None) or ["LSTM", "GRU"])
    shapes = SHAPES[:1] if quick else SHAPES
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    load_start = _loadavg()
    try:
        for size in shapes:
            for kind in kinds:
                models = _contenders(kind, size, NORM_MODES, loop)
                for packed in (False, True):
                    x = _input(size, packed)
                    lengths = "packed" if packed else "equal"
                    shape = f"{size['batch']}x{size['steps']}x{size['input']}->{size['hidden']}x{size['layers']}"
                    task = (progress.add_task(f"rnn {kind} {shape} {lengths}", total=repeats)
                            if progress is not None else None)
                    flt: dict = {}
                    rounds = time_rounds(models, x, repeats, progress=progress, task=task, faults=flt,
                                         settle=settle)
                    med = {k: statistics.median(v) for k, v in rounds.items()}
                    base = med[f"torch.nn.{kind}"]
                    for name, sec in med.items():
                        norm = name.split(" ", 1)[1] if name.startswith("BN") else "torch"
                        mode = norm.replace(" (loop)", "")
                        target = TARGETS.get(mode) if "(loop)" not in norm else None
                        ratio = base / sec  # torch / bnlab, as every suite
                        band = _band(rounds[f"torch.nn.{kind}"], rounds[name])
                        least = None if target is None else 1.0 / target
                        rows.append({"kind": kind, "shape": shape, "lengths": lengths, "name": name, "norm": norm,
                                     "ms": sec * 1e3, "torch_ms": base * 1e3, "ratio": ratio, "ratio_iqr": band,
                                     "target": target, "ok": None if target is None else ratio >= least,
                                     "status": status(ratio, band, least),
                                     "faults": statistics.median(flt[name]) if flt else None,
                                     "torch_faults": statistics.median(flt[f"torch.nn.{kind}"]) if flt else None})
    finally:
        torch.set_num_threads(old_threads)
    return {"suite": "rnn", "shapes": list(shapes), "threads": threads, "repeats": repeats, "settle": settle,
            "rows": rows, "loadavg_start": load_start, "loadavg_end": _loadavg()}


def format_table(result: dict) -> str:
    settle = result.get("settle", 0)
    lines = [f"recurrent fwd+bwd, float32, {result['threads']} threads, median of {result['repeats']} interleaved "
             f"rounds (order alternating, each timed call after {settle} untimed call(s) of the same layer); "
             "ratio = torch / bnlab (above 1: bnlab faster) [quartiles of the per-round "
             "ratios: the noise band], target = the least ratio the mode aims for: ok (the median reaches it), MISSED (the "
             "whole band below it) or within noise (the median below, the band reaching it: not met); faults = minor "
             "page faults a step (median), bnlab / torch; 'fused, no norm': the fused time loop with every normalization off "
             "(no target), the floor of the normalized fused modes"]
    if result.get("malloc"):
        lines.append(f"allocator: {result['malloc']} (bnlab bench --malloc default|kept)")
    if result.get("loadavg_start") is not None:
        lines.append(f"load average (1, 5, 15 min) at start {result['loadavg_start']}, at end "
                     f"{result.get('loadavg_end')}")
    lines.append(f"{'shape (B x T x F -> H x layers)':32s} {'lengths':7s} {'layer':30s} {'ms':>8s} {'torch ms':>9s} "
                 f"{'ratio':>6s} {'band':>11s} {'faults':>11s} {'target':>7s}")
    for r in result["rows"]:
        if r["norm"] == "torch":
            continue
        tgt = f">={1.0 / r['target']:.2f}" if r["target"] else ""
        lo, hi = r.get("ratio_iqr") or (r["ratio"], r["ratio"])
        st = r.get("status") or status(r["ratio"], (lo, hi), 1.0 / r["target"] if r["target"] else None)
        flag = "" if st is None else " " + st
        band = f"[{lo:.2f}-{hi:.2f}]"
        flt = f"{r['faults']:.0f}/{r['torch_faults']:.0f}" if r.get("faults") is not None else ""
        lines.append(f"{r['shape']:32s} {r['lengths']:7s} {r['name']:30s} {r['ms']:8.2f} {r['torch_ms']:9.2f} "
                     f"{r['ratio']:6.2f} {band:>11s} {flt:>11s} {tgt:>7s}{flag}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnlab.bench_rnn", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=25, help="timed rounds, at least 20 (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="LSTM, first size, 5 rounds: a smoke run")
    p.add_argument("--loop", action="store_true", help="also time the reference loop (force_loop=True) of every mode")
    p.add_argument("--settle", type=int, default=1,
                   help="untimed calls of a layer before each timed one, in a round (default: %(default)s)")
    p.add_argument("--kinds", default="LSTM,GRU", help="comma-separated, of LSTM, GRU, RNN (default: %(default)s)")
    p.add_argument("--malloc", choices=["default", "kept"], default="default",
                   help="glibc's allocator state for the run, as `bnlab bench --malloc` (default: %(default)s)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    from .bench import machine_line, set_malloc

    malloc = set_malloc(args.malloc)
    print(machine_line())
    res = run_rnn_suite(args)
    res["malloc"] = malloc
    print(format_table(res))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
