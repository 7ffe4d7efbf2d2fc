"""The `bnlab` command: audit, report, bench (``bnlab --version``; ``bnlab COMMAND --help`` lists every option
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
    a.add_argument("--claims", default=None, help="comma-separated claim ids, e.g. C1,C3 (default: all)")
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
    b.add_argument("--suite", choices=["bn", "rnn", "all"], default="all",
                   help="bn: batch-norm layers; rnn: recurrent layers against torch.nn.LSTM; all: both "
                        "(default: %(default)s)")
    b.add_argument("--repeats", type=int, default=25,
                   help="timed rounds per figure, their median reported; at least 20 (--quick: at most 5) "
                        "(default: %(default)s)")
    b.add_argument("--threads", type=int, default=2,
                   help="threads for torch and bnlab's kernels alike (default: %(default)s)")
    b.add_argument("--quick", action="store_true",
                   help="a short smoke run: fewer shapes and repeats, not a measurement (default: off)")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON (default: none)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from .bench import run as run_bench

        return run_bench(args) or 0
    if args.command == "audit":
        from .lab.audit import run_audit

        return run_audit(args) or 0
    if args.command == "report":
        from .lab.audit import run_report

        return run_report(args) or 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
