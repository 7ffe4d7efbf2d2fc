"""The run store: one SQLite file (default ``runs/store.sqlite``) shared by every audit.

Each finished run is one row, keyed by :func:`bnlab.lab.config.config_key` (config + code
fingerprint), and committed the moment it finishes: killing an audit (Ctrl-C, kill -9) loses no
finished run, and the next audit finds it. WAL journaling keeps readers (``bnlab report``) and a
running audit out of each other's way. Audits themselves are logged in ``audits`` (profile, seeds,
wall time, how many runs were executed and how many came from the store).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    config TEXT NOT NULL,
    result TEXT NOT NULL,
    wall_s REAL NOT NULL,
    meta TEXT NOT NULL,
    finished REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started REAL NOT NULL,
    finished REAL,
    profile TEXT,
    seeds TEXT,
    claims TEXT,
    workers INTEGER,
    executed INTEGER,
    from_store INTEGER,
    wall_s REAL,
    claim_wall TEXT,
    status TEXT
);
"""


class Store:
    """Finished runs by key. ``Store(path)`` creates the file (and its folder) if needed."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- runs ----
    def get(self, key: str) -> dict | None:
        row = self._db.execute("SELECT result FROM runs WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def get_record(self, key: str) -> dict | None:
        row = self._db.execute(
            "SELECT key, task, fingerprint, config, result, wall_s, meta, finished FROM runs WHERE key = ?", (key,)
        ).fetchone()
        return _record(row) if row else None

    def has(self, keys: Iterable[str]) -> set[str]:
        keys = list(keys)
        found: set[str] = set()
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = "SELECT key FROM runs WHERE key IN (%s)" % ",".join("?" * len(chunk))
            found.update(r[0] for r in self._db.execute(q, chunk))
        return found

    def put(self, key: str, task: str, fingerprint: str, config: dict, result: dict, wall_s: float, meta: dict) -> None:
        """Insert one finished run and commit it (autocommit: durable when this returns)."""
        self._db.execute(
            "INSERT OR REPLACE INTO runs (key, task, fingerprint, config, result, wall_s, meta, finished) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, task, fingerprint, json.dumps(config, sort_keys=True), json.dumps(result), float(wall_s),
             json.dumps(meta, sort_keys=True), time.time()),
        )

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    def records(self, keys: Iterable[str] | None = None) -> list[dict]:
        cols = "key, task, fingerprint, config, result, wall_s, meta, finished"
        if keys is None:
            return [_record(r) for r in self._db.execute(f"SELECT {cols} FROM runs ORDER BY finished")]
        keys = list(keys)
        out = []
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = f"SELECT {cols} FROM runs WHERE key IN (%s)" % ",".join("?" * len(chunk))
            out.extend(_record(r) for r in self._db.execute(q, chunk))
        return out

    # ---- audits ----
    def begin_audit(self, profile: str, seeds: Any, claims: list[str], workers: int) -> int:
        cur = self._db.execute(
            "INSERT INTO audits (started, profile, seeds, claims, workers, status) VALUES (?, ?, ?, ?, ?, 'running')",
            (time.time(), profile, json.dumps(seeds), json.dumps(claims), workers),
        )
        return int(cur.lastrowid)

    def end_audit(self, audit_id: int, executed: int, from_store: int, wall_s: float, claim_wall: dict, status: str) -> None:
        self._db.execute(
            "UPDATE audits SET finished = ?, executed = ?, from_store = ?, wall_s = ?, claim_wall = ?, status = ? WHERE id = ?",
            (time.time(), executed, from_store, wall_s, json.dumps(claim_wall), status, audit_id),
        )

    def audits(self) -> list[dict]:
        rows = self._db.execute(
            "SELECT id, started, finished, profile, seeds, claims, workers, executed, from_store, wall_s, claim_wall, status "
            "FROM audits ORDER BY id"
        ).fetchall()
        names = ["id", "started", "finished", "profile", "seeds", "claims", "workers", "executed", "from_store", "wall_s",
                 "claim_wall", "status"]
        out = []
        for r in rows:
            d = dict(zip(names, r))
            for k in ("seeds", "claims", "claim_wall"):
                d[k] = json.loads(d[k]) if d[k] else None
            out.append(d)
        return out


def _record(row) -> dict:
    key, task, fp, config, result, wall_s, meta, finished = row
    return {"key": key, "task": task, "fingerprint": fp, "config": json.loads(config), "result": json.loads(result),
            "wall_s": wall_s, "meta": json.loads(meta), "finished": finished}
