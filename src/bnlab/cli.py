"""The `bnlab` command: audit, report, bench."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bnlab", description="Batch normalization: the library's benchmark and the claims audit.")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("audit", help="train networks and decide each claim about batch normalization")
    a.add_argument("--profile", choices=["tiny", "quick", "full"], default="quick")
    a.add_argument("--claims", default=None, help="comma-separated claim ids, e.g. C1,C3 (default: all)")
    a.add_argument("--seeds", default=None, help="comma-separated seeds (default: the profile's)")
    a.add_argument("--dataset", default=None, choices=["digits", "mnist1d", "mnist", "fashion-mnist", "cifar10"])
    a.add_argument("--data-dir", default=None)
    a.add_argument("--workers", type=int, default=2)
    a.add_argument("--store", default="runs/store.sqlite")
    a.add_argument("--out", default=None, help="report folder (default runs/<timestamp>)")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override, e.g. C1.steps=300")
    a.add_argument("--no-progress", action="store_true")
    a.add_argument("--robustness", action="store_true",
                   help="also decide every claim on each shipped data set and on two disjoint seed sets "
                        "(always on in the full profile)")

    r = sub.add_parser("report", help="re-render the report from stored results (executes nothing)")
    r.add_argument("--profile", choices=["tiny", "quick", "full"], default="quick")
    r.add_argument("--claims", default=None)
    r.add_argument("--seeds", default=None)
    r.add_argument("--dataset", default=None, choices=["digits", "mnist1d", "mnist", "fashion-mnist", "cifar10"])
    r.add_argument("--data-dir", default=None)
    r.add_argument("--store", default="runs/store.sqlite")
    r.add_argument("--out", default=None)
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--robustness", action="store_true", help="the --robustness of the audit to report")
    r.add_argument("--workers", type=int, default=2,
                   help="the --workers of the audit to report (C2's wall-clock runs are keyed by it)")

    b = sub.add_parser("bench", help="time bnlab's batch norm against torch's native kernel")
    b.add_argument("--suite", choices=["bn", "rnn", "all"], default="all")
    b.add_argument("--repeats", type=int, default=25)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--quick", action="store_true", help="a short smoke run (fewer shapes and repeats)")
    b.add_argument("--json", default=None, metavar="FILE")
    b.add_argument("--no-progress", action="store_true")
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
