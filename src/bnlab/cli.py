"""The `bnlab` command: audit, report, bench, doctor, train-ddp (``bnlab --version``; ``bnlab COMMAND --help`` lists every option
with its default)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="bnlab", description="Batch normalization: the library's benchmark and the claims audit.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    datasets = ["digits", "mnist1d", "mnist", "fashion-mnist", "cifar10"]
    a = sub.add_parser("audit", help="train networks and decide each claim about batch normalization")
    a.add_argument("--profile", choices=["tiny", "quick", "full"], default="quick",
                   help="settings of every claim: tiny (a smoke test), quick, full (the stated protocols) "
                        "(default: %(default)s)")
    a.add_argument("--claims", default=None,
                   help="comma-separated claim ids, e.g. C1,C3, and finding ids, e.g. F1 (default: every claim, "
                        "and the findings the profile runs)")
    a.add_argument("--seeds", default=None, help="comma-separated seeds (default: the profile's)")
    a.add_argument("--dataset", default=None, choices=datasets,
                   help="run every claim on this data set (default: each claim's own)")
    a.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder with the files of mnist / fashion-mnist (IDX) or cifar10 (python batches); "
                        "nothing is downloaded (default: none; digits and mnist1d need no files)")
    a.add_argument("--workers", type=int, default=2,
                   help="runs executing at once, one process and one thread each; 0 or 1 run in-process "
                        "(default: %(default)s)")
    a.add_argument("--store", default="runs/store.sqlite", metavar="FILE",
                   help="SQLite store of finished runs, shared by audits (default: %(default)s)")
    a.add_argument("--out", default=None, metavar="DIR", help="report folder (default: runs/<timestamp>)")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, e.g. C1.steps=300; repeatable (default: none)")
    a.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    a.add_argument("--robustness", action="store_true",
                   help="also decide every claim on each shipped data set and on two disjoint seed sets "
                        "(default: off; always on in the full profile)")
    a.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="where runs execute: local (a process pool of --workers) or ray (one Ray task of 1 CPU "
                        "per run, as many at once as the cluster has CPUs; --workers does not apply; needs "
                        "pip install \"bnlab[ray]\") (default: %(default)s)")
    a.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                   help="with --backend ray: the cluster to run on, 'auto' for the one this machine belongs to "
                        "(started by `ray start --head`) or its HOST:PORT (default: a Ray instance started on "
                        "this machine for the audit, or RAY_ADDRESS when set)")

    r = sub.add_parser("report", help="re-render the report from stored results (executes nothing)")
    r.add_argument("--profile", choices=["tiny", "quick", "full"], default="quick",
                   help="the --profile of the audit to report (default: %(default)s)")
    r.add_argument("--claims", default=None, help="the --claims of the audit to report (default: all)")
    r.add_argument("--seeds", default=None, help="the --seeds of the audit to report (default: the profile's)")
    r.add_argument("--dataset", default=None, choices=datasets,
                   help="the --dataset of the audit to report (default: each claim's own)")
    r.add_argument("--data-dir", default=None, metavar="DIR",
                   help="the --data-dir of the audit to report (default: none)")
    r.add_argument("--store", default="runs/store.sqlite", metavar="FILE",
                   help="SQLite store to read (default: %(default)s)")
    r.add_argument("--out", default=None, metavar="DIR", help="report folder (default: runs/<timestamp>)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="the --set overrides of the audit to report; repeatable (default: none)")
    r.add_argument("--robustness", action="store_true",
                   help="the --robustness of the audit to report (default: off; always on in the full profile)")
    r.add_argument("--workers", type=int, default=2,
                   help="the --workers of the audit to report; no run is keyed by it, so any value re-renders "
                        "the same report (default: %(default)s)")

    b = sub.add_parser("bench", help="time bnlab's batch norm against torch's native kernel")
    b.add_argument("--suite", choices=["bn", "models", "rnn", "all"], default="all",
                   help="bn: batch-norm layers; models: whole training steps and inference of small models "
                        "(ResNet, MLP, LSTM classifier) in eager, channels_last, bf16 autocast, inference and "
                        "torch.compile; rnn: recurrent layers against torch.nn.LSTM; all: every suite "
                        "(default: %(default)s)")
    b.add_argument("--repeats", type=int, default=25,
                   help="timed rounds per figure, their median reported; at least 20 (--quick: at most 5) "
                        "(default: %(default)s)")
    b.add_argument("--threads", type=int, default=2,
                   help="threads for torch and bnlab's kernels alike (default: %(default)s)")
    b.add_argument("--quick", action="store_true",
                   help="a short smoke run: fewer shapes and repeats, not a measurement (default: off)")
    b.add_argument("--malloc", choices=["default", "kept"], default="default",
                   help="glibc's allocator for the whole run: default (as this process has it: freed blocks of "
                        "more than about 128 KiB-32 MiB go back to the kernel and are mapped anew, a page fault a "
                        "4 KiB page, on both sides) or kept (freed memory kept in the process, as the audit's workers "
                        "run: the state torch's LSTM is fastest in); recorded in the results (default: %(default)s)")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the models suite runs: cpu, or cuda (the first GPU; torch's batch-norm kernel on both "
                        "sides, bnlab's policy on top); the bn and rnn suites time CPU kernels and take cpu only "
                        "(default: %(default)s)")
    b.add_argument("--models", default=None, metavar="NAMES", type=_names("resnet", "mlp", "lstm"),
                   help="the models suite's models, comma-separated, of resnet, mlp, lstm (default: all three; "
                        "--quick: mlp,resnet)")
    b.add_argument("--configs", default=None, metavar="NAMES",
                   type=_names("eager", "channels_last", "bf16", "inference", "compile"),
                   help="the models suite's configurations, comma-separated, of eager, channels_last, bf16, inference, "
                        "compile (default: all; --quick: eager,inference)")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON (default: none)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")

    d = sub.add_parser("doctor", help="find batch-norm pitfalls in your model (exit 0 clean, 1 findings, 2 usage error)")
    d.add_argument("target", metavar="MODULE:FACTORY",
                   help="a dotted module or a path to a .py file, a colon, and a callable in it that returns the "
                        "model, e.g. mypkg.models:resnet18 or models.py:make_model (required, no default)")
    d.add_argument("--input-shape", action="append", default=None, metavar="C,H,W",
                   help="shape of one input sample without the batch dimension; repeat for a forward with several "
                        "inputs (default: inferred from the first Conv or Linear layer)")
    d.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="batch size of the random input, taken as the training batch size (default: %(default)s)")
    d.add_argument("--mode", choices=["auto", "train", "inference"], default="auto",
                   help="what the model is about to do: train, inference (also checks for batch norms left in "
                        "training mode), or auto: the model's own training flag decides (default: %(default)s)")
    d.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="also write the findings as JSON to FILE; without FILE, print only JSON to stdout "
                        "(default: none)")
    d.add_argument("--passes", type=int, default=None, metavar="N",
                   help="random batches for the train/eval gap check, in training and again in eval; fewer is "
                        "faster for large models, noisier (default: enough for 512 samples, 8 to 64)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: %(default)s)")

    t = sub.add_parser("train-ddp", help="data-parallel training with bnlab.nn.SyncBatchNorm (gloo, CPU), checked "
                                         "against one process training on the combined batch")
    t.add_argument("--nproc", type=int, default=2,
                   help="processes to start on this machine; under torchrun its processes are used instead "
                        "(default: %(default)s)")
    t.add_argument("--steps", type=int, default=20, help="SGD steps (default: %(default)s)")
    t.add_argument("--batch", type=int, default=64,
                   help="global batch size, split between the processes (default: %(default)s)")
    t.add_argument("--split", choices=["even", "uneven"], default="even",
                   help="even shares, or uneven ones proportional to 1, 2, 3, ... (default: %(default)s)")
    t.add_argument("--lr", type=float, default=0.1, help="learning rate (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="seed of the model and the batches (default: %(default)s)")
    t.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="parameters and data (default: %(default)s)")
    t.add_argument("--no-check", action="store_true",
                   help="skip the single-process reference training (default: run it and print the difference)")
    return p


def _names(*allowed: str):
    """An argparse type: a comma-separated list of ``allowed`` names, as a tuple, in the order given."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(allowed)} (got {text!r})")
        return names

    return parse


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from .bench import run as run_bench

        return run_bench(args) or 0
    if args.command == "audit":
        from .lab.audit import run_audit

        return run_audit(args) or 0
    if args.command == "doctor":
        from .tools.doctor import run_doctor

        return run_doctor(args)
    if args.command == "train-ddp":
        from .lab.ddp import run as run_ddp

        return run_ddp(args)
    if args.command == "report":
        from .lab.audit import run_report

        return run_report(args) or 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
