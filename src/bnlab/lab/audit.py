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
from . import findings as finding_registry
from .config import Context, SettingError, claim_settings, parse_overrides
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
    """One Context per selected claim, with the profile's settings and validated overrides; and one
    per selected finding (:mod:`bnlab.lab.findings`: every finding that runs in the profile, or
    those ``--claims`` names), keyed by its id."""
    named = [c.strip().upper() for c in args.claims.split(",") if c.strip()] if getattr(args, "claims", None) else None
    wanted = [c for c in named if c not in finding_registry.FINDINGS] if named is not None else registry.ids()
    for c in wanted:
        if c not in registry.CLAIMS:
            broken = [n for n in list(registry.BROKEN) + list(finding_registry.BROKEN)
                      if n.lower().startswith(c.lower() + "_")]
            if broken:
                err = registry.BROKEN.get(broken[0]) or finding_registry.BROKEN[broken[0]]
                raise AuditError(f"claim {c} could not be loaded:\n{err}")
            raise AuditError(f"unknown claim {c!r}; known: {', '.join(registry.ids())}"
                             + (f"; findings: {', '.join(finding_registry.ids())}" if finding_registry.ids() else ""))
    overrides = parse_overrides(getattr(args, "set", None) or [])
    for c in overrides:
        if c not in registry.CLAIMS and c not in finding_registry.FINDINGS:
            raise AuditError(f"--set names unknown claim {c!r}; known: {', '.join(registry.ids() + finding_registry.ids())}")
    seeds = _parse_seeds(getattr(args, "seeds", None))
    _check_data(getattr(args, "dataset", None), getattr(args, "data_dir", None), "--dataset")
    workers = _workers(args)
    args.workers = workers  # what runs: the audit's record, the runner and the store's meta agree
    robust = robustness_on(args)
    out = {}
    for c in wanted:
        mod = registry.get(c)
        if args.profile not in mod.PROFILES:
            raise AuditError(f"{c} has no profile {args.profile!r} (has {', '.join(mod.PROFILES)})")
        try:  # typed and range-checked against the profile's defaults and the claim's LIMITS
            settings = claim_settings(c, mod.PROFILES, args.profile, overrides.get(c, {}), getattr(mod, "LIMITS", None))
            if seeds is not None:
                settings.schema.check("seeds", seeds)
        except SettingError as e:
            raise AuditError(str(e)) from None
        if not getattr(args, "dataset", None) and isinstance(settings.get("dataset"), str):
            _check_data(settings["dataset"], getattr(args, "data_dir", None), f"{c}.dataset")
        all_seeds = list(seeds or settings["seeds"])
        common = dict(profile=args.profile, settings=settings, data_dir=getattr(args, "data_dir", None),
                      workers=workers, selection_seed=all_seeds[0])
        if not robust:
            out[c] = Context(seeds=all_seeds, dataset=getattr(args, "dataset", None),
                             extra={"seeds_given": seeds is not None}, **common)
            continue
        if len(all_seeds) < 4:
            raise AuditError(f"{c}: robustness splits the seeds into two disjoint sets of >= 2 each; "
                             f"got {len(all_seeds)} seeds ({','.join(map(str, all_seeds))})")
        half = len(all_seeds) // 2
        sets = [all_seeds[:half], all_seeds[half:]]
        out[c] = Context(seeds=all_seeds, dataset=getattr(args, "dataset", None), seed_sets=sets,
                         extra={"seeds_given": seeds is not None}, **common)
        for dataset in _datasets(mod, getattr(args, "dataset", None)):
            for name, subset in zip(SEED_SET_NAMES, sets):
                out[cell_key(c, dataset, name)] = Context(
                    seeds=list(subset), dataset=dataset, seed_sets=[list(subset)],
                    extra={"seeds_given": True, "cell": {"dataset": dataset, "seed_set": name}}, **common)
    out.update(_finding_contexts(args, named, overrides, seeds, workers))
    return out


def _finding_contexts(args, named, overrides, seeds, workers) -> dict[str, Context]:
    """The findings' contexts: headline only (no robustness cells), every seed in one set."""
    out = {}
    ids = [c for c in named if c in finding_registry.FINDINGS] if named is not None else \
        finding_registry.runs_in(args.profile)
    dataset = getattr(args, "dataset", None)
    for f in ids:
        mod = finding_registry.get(f)
        takes = list(getattr(mod, "TAKES", None) or mod.DATASETS)
        if args.profile not in mod.PROFILES or (dataset and dataset not in takes):
            if named is None:
                continue  # not part of this audit
            if args.profile not in mod.PROFILES:
                raise AuditError(f"{f} has no profile {args.profile!r} (has {', '.join(mod.PROFILES)})")
            raise AuditError(f"{f} runs on {', '.join(takes)} (got --dataset {dataset})")
        try:
            settings = claim_settings(f, mod.PROFILES, args.profile, overrides.get(f, {}), getattr(mod, "LIMITS", None))
            if seeds is not None:
                settings.schema.check("seeds", seeds)
        except SettingError as e:
            raise AuditError(str(e)) from None
        all_seeds = list(seeds or settings["seeds"])
        out[f] = Context(profile=args.profile, seeds=all_seeds, settings=settings, dataset=dataset,
                         data_dir=getattr(args, "data_dir", None), workers=workers, selection_seed=all_seeds[0],
                         extra={"seeds_given": seeds is not None, "finding": True})
    return out


def _module(cid: str):
    """The claim or finding module of a context key."""
    cid = claim_of(cid)
    return finding_registry.get(cid) if cid in finding_registry.FINDINGS else registry.get(cid)


SEED_SET_NAMES = ("A", "B")


def headline(ctxs: dict[str, Context]) -> dict[str, Context]:
    """The claims' own contexts, without the robustness cells."""
    return {k: v for k, v in ctxs.items() if "|" not in k}


def robustness_on(args) -> bool:
    """Robustness cells (claim x data set x seed set) run in the full profile, or with --robustness."""
    return bool(getattr(args, "robustness", False)) or getattr(args, "profile", None) == "full"


def cell_key(cid: str, dataset: str, seed_set: str) -> str:
    return f"{cid}|{dataset}|{seed_set}"


def claim_of(key: str) -> str:
    """The claim id of a context key ("C1" or a robustness cell "C1|digits|A")."""
    return key.split("|", 1)[0]


def _datasets(mod, chosen: str | None) -> list[str]:
    """The data sets a claim's robustness cells run on: the claim's DATASETS (default first), with
    a data set chosen by --dataset first when it is one of them."""
    ds = list(getattr(mod, "DATASETS", None) or [])
    if chosen and chosen not in ds:
        ds = [chosen] + ds
    elif chosen:
        ds = [chosen] + [d for d in ds if d != chosen]
    return ds


def _workers(args) -> int:
    """The number of runs that execute at once: ``--workers 0`` and ``1`` both run in-process."""
    from .runner import effective_workers

    try:
        return effective_workers(getattr(args, "workers", 2))
    except ValueError as e:
        raise AuditError(str(e)) from None


def _check_data(name: str | None, data_dir: str | None, where: str) -> None:
    """The data set is known, and one read from --data-dir has the folder and the folder its
    files: checked before any run (the run keys hash those files' contents)."""
    if not name:
        return
    from . import data as D

    try:
        D.data_files(name, data_dir)
    except D.DataError as e:
        raise AuditError(f"{where} {name}: {e}") from None
    except KeyError as e:
        raise AuditError(f"{where}: {e.args[0]}") from None


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


def execute(ctxs: dict[str, Context], store: Store, workers: int, progress: bool = True, log=print,
            runner=None) -> dict:
    """Run everything the claims need that the store lacks; commit each result as it finishes.

    Scheduling: runs that later stages wait on (``Run.gate``) first, then the costliest first.
    The progress bar counts the runs this audit executes, weighted by their cost estimates.
    ``runner``: an already started runner (e.g. :class:`bnlab.lab.ray_backend.RayRunner`), which the
    caller closes; by default a :class:`bnlab.lab.runner.LocalRunner` of ``workers`` is started
    when there is something to run, and closed here."""
    from .runner import LocalRunner, effective_workers

    workers = effective_workers(workers)  # recorded as what runs (0 runs in-process, as 1)
    results = Results(store)
    given = runner
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
                    plan = _plan(_module(cid), ctx, results)
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
        if runner is not None and runner is not given:
            runner.close()
    elapsed = {cid: claim_last[cid] - claim_first[cid] for cid in claim_last if cid in claim_first}
    failed.update({f"plan {cid}": err for cid, err in plan_errors.items()})
    return {"executed": executed, "from_store": from_store or 0, "failed": failed,
            "wall_s": time.perf_counter() - t0, "claim_elapsed_s": elapsed}


def decide_all(ctxs: dict[str, Context], store: Store, outdir: Path | None) -> dict:
    """Each claim's decision (or why there is none), its rule history and plots, and, where the
    audit ran robustness cells, the claim x data set x seed set matrix; from stored results only."""
    results = Results(store)
    out = {}
    for cid, ctx in ctxs.items():
        if "|" in cid or cid in finding_registry.FINDINGS:
            continue
        mod = registry.get(cid)
        entry = {"id": cid, "title": mod.TITLE, "claim": mod.CLAIM, "sources": list(mod.SOURCES),
                 "protocol_changes": list(getattr(mod, "PROTOCOL_CHANGES", [])), "seeds": list(ctx.seeds),
                 "seed_sets": [list(x) for x in ctx.seed_sets], "dataset": _dataset_name(mod, ctx),
                 "settings": ctx.settings, "command": _command(cid, ctx),
                 "doc": (mod.__doc__ or "").strip()}
        status, decision = _decide(mod, ctx, results)
        entry.update(_run_accounting(mod, ctx, results, store))
        entry.update(decision)
        entry["status"] = status
        if status == "decided":
            entry["history"] = _history(mod, ctx, results, entry)
            if outdir is not None:
                try:
                    entry["plots"] = [(str(p), cap) for p, cap in mod.plots(ctx, results, str(outdir / "plots"))]
                except Exception:
                    entry["plots"] = []
                    entry.setdefault("notes", [])
                    entry["plot_error"] = traceback.format_exc(limit=4)
        cells = [(k, c) for k, c in ctxs.items() if claim_of(k) == cid and "|" in k]
        if cells:
            entry["robustness"] = _robustness(mod, cells, results)
        out[cid] = entry
    return out


def decide_findings(ctxs: dict[str, Context], store: Store, outdir: Path | None) -> dict:
    """Each finding's numbers, tables and plots (or why there are none), from stored results only;
    the report renders them under "Beyond the claims"."""
    results = Results(store)
    out = {}
    for fid, ctx in ctxs.items():
        if fid not in finding_registry.FINDINGS:
            continue
        mod = finding_registry.get(fid)
        entry = {"id": fid, "title": mod.TITLE, "question": mod.QUESTION, "sources": list(mod.SOURCES),
                 "protocol_changes": list(getattr(mod, "PROTOCOL_CHANGES", [])), "seeds": list(ctx.seeds),
                 "dataset": _dataset_name(mod, ctx), "settings": ctx.settings, "command": _command(fid, ctx),
                 "doc": (mod.__doc__ or "").strip(), "plots": []}
        entry.update(_run_accounting(mod, ctx, results, store))
        try:
            plan = _plan(mod, ctx, results)
            complete = is_complete(plan, results)
        except Exception:
            entry.update(status="error", why=traceback.format_exc(limit=4))
            out[fid] = entry
            continue
        if not complete:
            entry.update(status="incomplete", why=f"{len(missing(plan, results)) + len(plan.pending)} runs not in the "
                                                  "store (run `bnlab audit` with the same settings)")
            out[fid] = entry
            continue
        try:
            entry.update(mod.decide(ctx, results))
            entry["status"] = "decided"
        except Exception:
            entry.update(status="error", why=traceback.format_exc(limit=4))
            out[fid] = entry
            continue
        if outdir is not None:
            try:
                entry["plots"] = [(str(p), cap) for p, cap in mod.plots(ctx, results, str(outdir / "plots"))]
            except Exception:
                entry["plot_error"] = traceback.format_exc(limit=4)
        out[fid] = entry
    return out


def _dataset_name(mod, ctx: Context) -> str | None:
    ds = getattr(mod, "DATASETS", None)
    return ctx.dataset or (ds[0] if ds else None)


def _decide(mod, ctx: Context, results: Results) -> tuple[str, dict]:
    """("decided", decision) | ("incomplete" | "error", {verdict, why})."""
    try:
        plan = _plan(mod, ctx, results)
    except Exception:
        return "error", {"verdict": "error", "why": traceback.format_exc(limit=4)}
    if not is_complete(plan, results):
        return "incomplete", {"verdict": "incomplete",
                              "why": f"{len(missing(plan, results)) + len(plan.pending)} runs not in the store "
                                     "(run `bnlab audit` with the same settings)"}
    try:
        return "decided", mod.decide(ctx, results)
    except Exception:
        return "error", {"verdict": "error", "why": traceback.format_exc(limit=4)}


def _run_accounting(mod, ctx: Context, results: Results, store: Store) -> dict:
    try:
        plan = _plan(mod, ctx, results)
    except Exception:
        return {"runs": 0, "compute_s": 0.0}
    keys = list(dict.fromkeys(results.key(r.config) for r in plan.runs))
    records = store.records(keys)
    return {"runs": len(keys), "compute_s": sum(r["wall_s"] for r in records), "run_keys": keys}


def _history(mod, ctx: Context, results: Results, decision: dict) -> list[dict]:
    """The verdict under every version of the claim's rule, on the same stored runs."""
    rules = list(getattr(mod, "RULES", None) or [])
    out = []
    for r in rules:
        row = {"version": r["version"], "date": r.get("date"), "text": r.get("text", ""), "reason": r.get("reason")}
        if r["version"] == decision.get("rule_version"):
            row.update(verdict=decision["verdict"], why=decision.get("why", ""))
        elif r["version"] == 1 and hasattr(mod, "decide_v1"):
            try:
                v1 = mod.decide_v1(ctx, results)
                row.update(verdict=v1["verdict"], why=v1.get("why", ""))
            except Exception as e:  # an old rule that cannot be applied is shown as such
                row.update(verdict="n/a", why=f"v1 could not be applied: {type(e).__name__}: {e}")
        else:
            row.update(verdict="n/a", why="no implementation of this version")
        out.append(row)
    return out


def _robustness(mod, cells: list[tuple[str, Context]], results: Results) -> dict:
    """The claim's verdict (and each part's) in every cell data set x seed set; robust when every
    cell gives the same claim verdict."""
    rows = []
    for key, ctx in cells:
        status, d = _decide(mod, ctx, results)
        cell = ctx.extra["cell"]
        parts = {name: p["verdict"] for name, p in (d.get("parts") or {}).items()}
        rows.append({"dataset": cell["dataset"], "seed_set": cell["seed_set"], "seeds": list(ctx.seeds),
                     "verdict": d["verdict"], "parts": parts, "status": status})
    verdicts = {r["verdict"] for r in rows}
    robust = len(verdicts) == 1 and all(r["status"] == "decided" for r in rows)
    part_names = sorted({n for r in rows for n in r["parts"]})
    unstable_parts = [n for n in part_names if len({r["parts"].get(n) for r in rows}) > 1]
    if robust and not unstable_parts:
        summary = f"robust: {rows[0]['verdict']} in all {len(rows)} cells"
    elif robust:
        summary = (f"claim verdict robust ({rows[0]['verdict']} in all {len(rows)} cells); not robust parts: "
                   + ", ".join(unstable_parts))
    else:
        summary = "not robust: " + "; ".join(f"{r['dataset']}/{r['seed_set']} {r['verdict']}" for r in rows)
    return {"cells": rows, "robust": robust and not unstable_parts, "summary": summary}


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


def _console():
    """A rich console; when stdout is not a terminal (CI logs, pipes) it is 150 columns wide, so
    the verdict table keeps one line per part instead of rich's 80-column wrap."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=150)


def run_audit(args) -> int:
    from rich.console import Console

    from .report import findings_lines, provenance, terminal_table, write_report

    console = _console()
    try:
        ctxs = contexts(args)
    except AuditError as e:
        print(f"bnlab audit: {e}", file=sys.stderr)
        return 2
    for name, err in registry.BROKEN.items():
        console.print(f"[yellow]claim module {name} not loaded:[/] {err.strip().splitlines()[-1]}")
    for name, err in finding_registry.BROKEN.items():
        console.print(f"[yellow]finding module {name} not loaded:[/] {err.strip().splitlines()[-1]}")
    outdir = _outdir(args)
    runner = None
    if getattr(args, "backend", "local") == "ray":
        from .ray_backend import RayRunner, RayUnavailable

        try:
            runner = RayRunner(address=getattr(args, "address", None))
        except RayUnavailable as e:
            print(f"bnlab audit: {e}", file=sys.stderr)
            return 2
        args.workers = runner.capacity  # recorded: the runs in flight at once, the cluster's CPUs
    t0 = time.time()
    with Store(args.store) as store:
        heads = headline(ctxs)
        audit_id = store.begin_audit(args.profile, {c: x.seeds for c, x in heads.items()}, list(heads), args.workers)
        try:
            ex = execute(ctxs, store, args.workers, progress=not args.no_progress,
                         log=lambda m: console.print(m, markup=False), runner=runner)
        except KeyboardInterrupt:
            if runner is not None:
                runner.close(cancel=True)
            store.end_audit(audit_id, 0, 0, time.time() - t0, {}, "interrupted")
            console.print("[yellow]interrupted: finished runs are in the store; rerun to resume[/]")
            return 130
        finally:
            if runner is not None:
                runner.close()
        claims_out = decide_all(ctxs, store, outdir)
        findings_out = decide_findings(ctxs, store, outdir)
        wall = time.time() - t0
        status = "ok" if not ex["failed"] else "failed runs"
        store.end_audit(audit_id, ex["executed"], ex["from_store"], wall, ex["claim_elapsed_s"], status)
        prov = provenance(args, heads, store, claims_out,
                          audit={"wall_s": wall, "executed": ex["executed"], "from_store": ex["from_store"],
                                 "claim_elapsed_s": ex["claim_elapsed_s"], "failed": len(ex["failed"])},
                          findings=findings_out)
        write_report(outdir, claims_out, prov, store, findings=findings_out)
    terminal_table(claims_out, console)
    findings_lines(findings_out, console)
    console.print(f"executed {ex['executed']} runs, {ex['from_store']} from the store, "
                  f"{wall:.1f} s wall; report: {outdir / 'report.html'}")
    if ex["failed"]:
        (outdir / "errors.txt").write_text("\n\n".join(f"{k}:\n{v}" for k, v in ex["failed"].items()))
        console.print(f"[bold red]{len(ex['failed'])} runs failed[/] (not stored; errors in {outdir / 'errors.txt'}); "
                      "fix and rerun to complete the audit")
    return 1 if ex["failed"] else 0


def run_report(args) -> int:
    from rich.console import Console

    from .report import findings_lines, provenance, terminal_table, write_report

    console = _console()
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
        findings_out = decide_findings(ctxs, store, outdir)
        prov = provenance(args, headline(ctxs), store, claims_out, audit=None, findings=findings_out)
        write_report(outdir, claims_out, prov, store, findings=findings_out)
    terminal_table(claims_out, console)
    findings_lines(findings_out, console)
    console.print(f"report: {outdir / 'report.html'}")
    return 0
