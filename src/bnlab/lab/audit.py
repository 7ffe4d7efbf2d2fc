"""``bnlab audit`` and ``bnlab report``.

Data flow: claims expand into run configs (``plan``) -> the store says which are done -> the rest
execute in the runner's workers -> each result is committed to the store as it finishes -> the
claims re-plan (later stages, e.g. runs at a selected learning rate) until nothing is missing ->
each claim decides from stored results -> the report renders. A repeated audit with the same
settings executes nothing and rebuilds the same verdicts, tables and figures.
"""

from __future__ import annotations

import heapq
import sys
import time
import traceback
from pathlib import Path

from . import claims as registry
from .config import Context, apply_overrides, parse_overrides
from .protocol import Plan, Results, Run, is_complete, missing
from .store import Store
from .tasks import fingerprint


class AuditError(RuntimeError):
    pass


def _parse_seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise AuditError(f"--seeds expects comma-separated integers, e.g. 0,1,2 (got {text!r})") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise AuditError(f"--seeds needs distinct integers (got {text!r})")
    return seeds


def contexts(args) -> dict[str, Context]:
    """One Context per selected claim, with the profile's settings and validated overrides."""
    wanted = [c.strip().upper() for c in args.claims.split(",") if c.strip()] if getattr(args, "claims", None) else registry.ids()
    for c in wanted:
        if c not in registry.CLAIMS:
            broken = [n for n in registry.BROKEN if n.lower().startswith(c.lower() + "_")]
            if broken:
                raise AuditError(f"claim {c} could not be loaded:\n{registry.BROKEN[broken[0]]}")
            raise AuditError(f"unknown claim {c!r}; known: {', '.join(registry.ids())}")
    overrides = parse_overrides(getattr(args, "set", None) or [])
    for c in overrides:
        if c not in registry.CLAIMS:
            raise AuditError(f"--set names unknown claim {c!r}; known: {', '.join(registry.ids())}")
    seeds = _parse_seeds(getattr(args, "seeds", None))
    out = {}
    for c in wanted:
        mod = registry.get(c)
        if args.profile not in mod.PROFILES:
            raise AuditError(f"{c} has no profile {args.profile!r} (has {', '.join(mod.PROFILES)})")
        try:
            settings = apply_overrides(mod.PROFILES[args.profile], overrides.get(c, {}), c)
        except ValueError as e:
            raise AuditError(str(e)) from None
        out[c] = Context(profile=args.profile, seeds=list(seeds or settings["seeds"]), settings=settings,
                         dataset=getattr(args, "dataset", None), data_dir=getattr(args, "data_dir", None),
                         workers=int(getattr(args, "workers", 2) or 2), extra={"seeds_given": seeds is not None})
    return out


def _plan(mod, ctx, results) -> Plan:
    plan = mod.plan(ctx, results)
    return plan if isinstance(plan, Plan) else Plan(list(plan))


class _Progress:
    """A rich progress bar over all runs (cost-weighted ETA), or nothing with --no-progress."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._p = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._p = Progress(TextColumn("[bold]audit[/]"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                               TextColumn("runs {task.fields[runs]}"), TimeElapsedColumn(), TextColumn("ETA"),
                               TimeRemainingColumn(), TextColumn("{task.fields[what]}"), transient=False)
            self._p.start()
            self._task = self._p.add_task("audit", total=1.0, runs="0/0", what="")

    def update(self, done_cost: float, total_cost: float, done: int, total: int, what: str = "") -> None:
        if self._p is not None:
            self._p.update(self._task, completed=done_cost, total=max(total_cost, 1e-9), runs=f"{done}/{total}", what=what)

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()


def execute(ctxs: dict[str, Context], store: Store, workers: int, progress: bool = True, log=print) -> dict:
    """Run everything the claims need that the store lacks; commit each result as it finishes.

    Scheduling: runs that later stages wait on (``Run.gate``) first, then the costliest first.
    The progress bar counts the runs this audit executes, weighted by their cost estimates."""
    from .runner import LocalRunner

    results = Results(store)
    runner = None
    heap: list = []
    queued: dict[str, Run] = {}
    in_flight: set[str] = set()
    failed: dict[str, str] = {}
    plan_errors: dict[str, str] = {}
    labels: dict[str, str] = {}
    claim_first: dict[str, float] = {}
    claim_last: dict[str, float] = {}
    executed, order, from_store = 0, 0, None
    done_cost = 0.0
    bar = _Progress(progress)
    t0 = time.perf_counter()
    try:
        while True:
            todo_cost, todo_runs = 0.0, 0
            owners: dict[str, set[str]] = {}
            seen: set[str] = set()
            for cid, ctx in ctxs.items():
                if cid in plan_errors:
                    continue
                try:
                    plan = _plan(registry.get(cid), ctx, results)
                except Exception:  # a broken claim must not stop the others
                    plan_errors[cid] = traceback.format_exc(limit=4)
                    log(f"[claim {cid} cannot plan its runs]\n{plan_errors[cid]}")
                    continue
                todo_cost += sum(plan.pending)
                todo_runs += len(plan.pending)
                for run in plan.runs:
                    key = results.key(run.config)
                    owners.setdefault(key, set()).add(cid)
                    if key in seen:  # the same run asked for twice (within or across claims)
                        continue
                    seen.add(key)
                    labels[key] = run.label or key
                    if results.get(run.config) is not None:
                        continue
                    if key in failed:
                        continue
                    todo_cost += run.cost
                    todo_runs += 1
                    if key in in_flight or key in queued:
                        continue
                    order += 1
                    queued[key] = run
                    heapq.heappush(heap, (0 if run.gate else 1, -run.cost, order, key))
            if from_store is None:
                from_store = len(set(owners) - set(queued))
            bar.update(done_cost, done_cost + todo_cost, executed, executed + todo_runs)
            if runner is None and heap:
                runner = LocalRunner(workers)
            while heap and runner.in_flight < runner.capacity:
                key = heapq.heappop(heap)[3]
                run = queued[key]
                runner.submit(key, run.config)
                in_flight.add(key)
                for cid in owners.get(key, ()):
                    claim_first.setdefault(cid, time.perf_counter())
            if not in_flight:
                break
            for key, outcome in runner.wait():
                in_flight.discard(key)
                run = queued.pop(key)
                if outcome["ok"]:
                    cfg = run.config
                    store.put(key, cfg["task"], fingerprint(cfg["task"]), cfg, outcome["result"], outcome["wall_s"],
                              dict(outcome["meta"], workers=workers))
                    results.add(key, outcome["result"])
                    executed += 1
                    done_cost += run.cost
                else:
                    failed[key] = outcome["error"]
                    log(f"[run failed] {labels.get(key, key)}:\n{outcome['error']}")
                for cid in owners.get(key, ()):
                    claim_last[cid] = time.perf_counter()
    except KeyboardInterrupt:
        if runner is not None:
            runner.close(cancel=True)
            runner = None
        raise
    finally:
        bar.stop()
        if runner is not None:
            runner.close()
    elapsed = {cid: claim_last[cid] - claim_first[cid] for cid in claim_last if cid in claim_first}
    failed.update({f"plan {cid}": err for cid, err in plan_errors.items()})
    return {"executed": executed, "from_store": from_store or 0, "failed": failed,
            "wall_s": time.perf_counter() - t0, "claim_elapsed_s": elapsed}


def decide_all(ctxs: dict[str, Context], store: Store, outdir: Path | None) -> dict:
    """Each claim's decision (or why there is none) and its plots, from stored results only."""
    results = Results(store)
    out = {}
    for cid, ctx in ctxs.items():
        mod = registry.get(cid)
        entry = {"id": cid, "title": mod.TITLE, "claim": mod.CLAIM, "sources": list(mod.SOURCES),
                 "protocol_changes": list(getattr(mod, "PROTOCOL_CHANGES", [])), "seeds": list(ctx.seeds),
                 "settings": ctx.settings, "command": _command(cid, ctx),
                 "doc": (mod.__doc__ or "").strip()}
        try:
            plan = _plan(mod, ctx, results)
        except Exception:
            entry.update(status="error", verdict="error", why=traceback.format_exc(limit=4), runs=0, compute_s=0.0)
            out[cid] = entry
            continue
        keys = list(dict.fromkeys(results.key(r.config) for r in plan.runs))
        records = store.records(keys)
        entry["runs"] = len(keys)
        entry["compute_s"] = sum(r["wall_s"] for r in records)
        entry["run_keys"] = keys
        if not is_complete(plan, results):
            entry.update(status="incomplete", verdict="incomplete",
                         why=f"{len(missing(plan, results)) + len(plan.pending)} runs not in the store "
                             "(run `bnlab audit` with the same settings)")
            out[cid] = entry
            continue
        try:
            decision = mod.decide(ctx, results)
            entry.update(decision)
            entry["status"] = "decided"
            if outdir is not None:
                entry["plots"] = [(str(p), cap) for p, cap in mod.plots(ctx, results, str(outdir / "plots"))]
        except Exception:
            entry.update(status="error", verdict="error", why=traceback.format_exc(limit=4))
        out[cid] = entry
    return out


def _command(cid: str, ctx: Context) -> str:
    cmd = f"bnlab audit --profile {ctx.profile} --claims {cid}"
    if ctx.extra.get("seeds_given"):
        cmd += " --seeds " + ",".join(map(str, ctx.seeds))
    if ctx.dataset:
        cmd += f" --dataset {ctx.dataset}"
    return cmd


def _outdir(args) -> Path:
    if getattr(args, "out", None):
        return Path(args.out)
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def _verdict_table(claims: dict, console) -> None:
    from rich.table import Table

    t = Table(title="bnlab audit: verdicts", show_lines=False)
    for col in ("claim", "title", "verdict", "effect", "95% CI", "seeds"):
        t.add_column(col)
    styles = {"supported": "bold green", "refuted": "bold red", "partly supported": "bold yellow",
              "inconclusive": "yellow", "incomplete": "dim", "error": "bold magenta"}
    for cid, c in claims.items():
        eff = c.get("effect")
        ci = c.get("ci")
        t.add_row(cid, c["title"], f"[{styles.get(c['verdict'], '')}]{c['verdict']}[/]",
                  "" if eff is None else f"{eff:.3g}", "" if not ci else f"[{ci[0]:.3g}, {ci[1]:.3g}]",
                  ",".join(map(str, c.get("seeds", []))))
    console.print(t)


def run_audit(args) -> int:
    from rich.console import Console

    from .report import provenance, write_report

    console = Console(stderr=False)
    try:
        ctxs = contexts(args)
    except AuditError as e:
        print(f"bnlab audit: {e}", file=sys.stderr)
        return 2
    for name, err in registry.BROKEN.items():
        console.print(f"[yellow]claim module {name} not loaded:[/] {err.strip().splitlines()[-1]}")
    outdir = _outdir(args)
    t0 = time.time()
    with Store(args.store) as store:
        audit_id = store.begin_audit(args.profile, {c: x.seeds for c, x in ctxs.items()}, list(ctxs), args.workers)
        try:
            ex = execute(ctxs, store, args.workers, progress=not args.no_progress,
                         log=lambda m: console.print(m, markup=False))
        except KeyboardInterrupt:
            store.end_audit(audit_id, 0, 0, time.time() - t0, {}, "interrupted")
            console.print("[yellow]interrupted: finished runs are in the store; rerun to resume[/]")
            return 130
        claims_out = decide_all(ctxs, store, outdir)
        wall = time.time() - t0
        status = "ok" if not ex["failed"] else "failed runs"
        store.end_audit(audit_id, ex["executed"], ex["from_store"], wall, ex["claim_elapsed_s"], status)
        prov = provenance(args, ctxs, store, claims_out, audit={"wall_s": wall, "executed": ex["executed"],
                                                                  "from_store": ex["from_store"],
                                                                  "claim_elapsed_s": ex["claim_elapsed_s"],
                                                                  "failed": len(ex["failed"])})
        write_report(outdir, claims_out, prov, store)
    _verdict_table(claims_out, console)
    console.print(f"executed {ex['executed']} runs, {ex['from_store']} from the store, "
                  f"{wall:.1f} s wall; report: {outdir / 'report.html'}")
    if ex["failed"]:
        (outdir / "errors.txt").write_text("\n\n".join(f"{k}:\n{v}" for k, v in ex["failed"].items()))
        console.print(f"[bold red]{len(ex['failed'])} runs failed[/] (not stored; errors in {outdir / 'errors.txt'}); "
                      "fix and rerun to complete the audit")
    return 1 if ex["failed"] else 0


def run_report(args) -> int:
    from rich.console import Console

    from .report import provenance, write_report

    console = Console()
    try:
        ctxs = contexts(args)
    except AuditError as e:
        print(f"bnlab report: {e}", file=sys.stderr)
        return 2
    if not Path(args.store).exists():
        print(f"bnlab report: no store at {args.store} (run `bnlab audit` first)", file=sys.stderr)
        return 2
    outdir = _outdir(args)
    with Store(args.store) as store:
        claims_out = decide_all(ctxs, store, outdir)
        prov = provenance(args, ctxs, store, claims_out, audit=None)
        write_report(outdir, claims_out, prov, store)
    _verdict_table(claims_out, console)
    console.print(f"report: {outdir / 'report.html'}")
    return 0
