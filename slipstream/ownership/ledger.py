"""The ledger: a local record of every resource slipstream is about to create or has created.

A :class:`~slipstream.ownership.lease.Lease` writes an entry *before* the creating call is sent and
completes it when the call returns, so that even a crash between the two leaves a trace. The
ledger is a convenience for the reaper and for ``slipstream ls``, not the source of truth: every
resource also carries its ownership tags on the cloud itself, and the reaper finds resources by
those tags when the ledger is missing or corrupted.

SQLite in WAL mode, so a flow, the CLI and a reaper can use it at the same time.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from slipstream.paths import slipstream_home

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    entry_id    INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id      TEXT NOT NULL,
    pipeline    TEXT NOT NULL,
    cloud       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    resource_id TEXT,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'created', 'deleted', 'failed')),
    recorded_at TEXT NOT NULL,
    deleted_at  TEXT
);
CREATE INDEX IF NOT EXISTS entries_run ON entries (run_id);
-- What a run's cost report needs that the cloud may forget (slipstream report, runreport.py):
-- the planned worst case, and each server's flavour (Nova forgets it once a server is deleted).
CREATE TABLE IF NOT EXISTS run_worst_cases (
    run_id        TEXT PRIMARY KEY,
    pipeline      TEXT NOT NULL,
    cloud         TEXT NOT NULL,
    worst_case_su REAL NOT NULL,
    recorded_at   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS server_flavors (
    cloud     TEXT NOT NULL,
    server_id TEXT NOT NULL,
    flavor    TEXT NOT NULL,
    PRIMARY KEY (cloud, server_id)
);
-- Which process on which host holds a run's lease, so the reaper can tell a live plain-Python
-- run (whose generated id Prefect never heard of) from one whose process is gone.
CREATE TABLE IF NOT EXISTS run_processes (
    run_id      TEXT NOT NULL,
    pipeline    TEXT NOT NULL,
    cloud       TEXT NOT NULL,
    host        TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    pid_start   INTEGER NOT NULL,
    started_at  TEXT NOT NULL,
    PRIMARY KEY (run_id, host, pid, pid_start)
);
-- Every heartbeat renewal of a run's lease that changed something: how long the run's resources
-- were promised to live, and how many were stamped.
CREATE TABLE IF NOT EXISTS lease_renewals (
    run_id      TEXT NOT NULL,
    cloud       TEXT NOT NULL,
    host        TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    renewed_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    resources   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS lease_renewals_run ON lease_renewals (run_id);
"""


@dataclass(frozen=True)
class LedgerEntry:
    entry_id: int
    run_id: str
    pipeline: str
    cloud: str
    kind: str
    name: str
    resource_id: str | None
    state: str
    recorded_at: datetime
    deleted_at: datetime | None


@dataclass(frozen=True)
class RunProcess:
    """A process that held a run's lease: ``pid`` on ``host``, identified by its start time
    (clock ticks since boot) so that a reused pid is not mistaken for it."""

    run_id: str
    pipeline: str
    cloud: str
    host: str
    pid: int
    pid_start: int
    started_at: datetime


@dataclass(frozen=True)
class LeaseRenewalRecord:
    """One renewal of a run's lease on one cloud, as the ledger keeps it."""

    run_id: str
    cloud: str
    host: str
    pid: int
    renewed_at: datetime
    expires_at: datetime
    resources: int


def this_process(run_id: str, pipeline: str, cloud: str) -> RunProcess:
    """The calling process as the holder of ``run_id``'s lease."""
    from slipstream.cloud.local.processes import proc_stat  # /proc reading lives there

    me = proc_stat(os.getpid())
    return RunProcess(run_id, pipeline, cloud, socket.gethostname(), os.getpid(), me.start if me else 0,
                      datetime.now(UTC))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Ledger:
    """Records resources by run. Safe to share between threads and processes."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or slipstream_home() / "ledger.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    def record_pending(self, run_id: str, pipeline: str, cloud: str, kind: str, names: list[str]) -> list[int]:
        """Note that resources ``names`` of ``kind`` are about to be created; returns entry ids."""
        with self._lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            ids = []
            for name in names:
                cur = db.execute(
                    "INSERT INTO entries (run_id, pipeline, cloud, kind, name, state, recorded_at)"
                    " VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                    (run_id, pipeline, cloud, kind, name, _now()),
                )
                ids.append(int(cur.lastrowid))
            db.execute("COMMIT")
            return ids

    def record_created(self, entry_id: int, resource_id: str, name: str | None = None) -> None:
        with self._lock, self._connect() as db:
            db.execute(
                "UPDATE entries SET state='created', resource_id=?, name=COALESCE(?, name)"
                " WHERE entry_id=?",
                (resource_id, name, entry_id),
            )

    def record_failed(self, entry_ids: list[int]) -> None:
        """The creating call failed: nothing was created under these entries."""
        with self._lock, self._connect() as db:
            db.executemany(
                "UPDATE entries SET state='failed' WHERE entry_id=? AND state='pending'",
                [(i,) for i in entry_ids],
            )

    def record_deleted(self, cloud: str, kind: str, resource_id: str) -> None:
        with self._lock, self._connect() as db:
            db.execute(
                "UPDATE entries SET state='deleted', deleted_at=?"
                " WHERE cloud=? AND kind=? AND resource_id=? AND state!='deleted'",
                (_now(), cloud, kind, resource_id),
            )

    def entries(self, run_id: str | None = None, *, live_only: bool = False) -> list[LedgerEntry]:
        sql = "SELECT * FROM entries"
        where, args = [], []
        if run_id:
            where.append("run_id=?")
            args.append(run_id)
        if live_only:
            where.append("state IN ('pending', 'created')")
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock, self._connect() as db:
            rows = db.execute(sql + " ORDER BY entry_id", args).fetchall()
        return [
            LedgerEntry(
                entry_id=r[0], run_id=r[1], pipeline=r[2], cloud=r[3], kind=r[4], name=r[5],
                resource_id=r[6], state=r[7], recorded_at=datetime.fromisoformat(r[8]),
                deleted_at=datetime.fromisoformat(r[9]) if r[9] else None,
            )
            for r in rows
        ]

    # a run's cost basis, for `slipstream report` --------------------------------------------
    def record_worst_case(self, run_id: str, pipeline: str, cloud: str, worst_case_su: float) -> None:
        """Note the planned worst-case SUs of ``run_id`` (the latest figure wins)."""
        with self._lock, self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO run_worst_cases (run_id, pipeline, cloud, worst_case_su, recorded_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (run_id, pipeline, cloud, float(worst_case_su), _now()),
            )

    def worst_case(self, run_id: str) -> float | None:
        """The worst-case SUs recorded for ``run_id``, or None if none was."""
        with self._lock, self._connect() as db:
            row = db.execute("SELECT worst_case_su FROM run_worst_cases WHERE run_id=?", (run_id,)).fetchone()
        return None if row is None else float(row[0])

    def record_server_flavors(self, cloud: str, flavors: dict[str, str]) -> None:
        """Note ``{server_id: flavour}`` so the servers can be metered after they are deleted."""
        with self._lock, self._connect() as db:
            db.executemany(
                "INSERT OR REPLACE INTO server_flavors (cloud, server_id, flavor) VALUES (?, ?, ?)",
                [(cloud, sid, flavor) for sid, flavor in flavors.items()],
            )

    def server_flavors(self, cloud: str) -> dict[str, str]:
        """Every recorded ``{server_id: flavour}`` on ``cloud``."""
        with self._lock, self._connect() as db:
            rows = db.execute("SELECT server_id, flavor FROM server_flavors WHERE cloud=?", (cloud,)).fetchall()
        return dict(rows)

    # which process holds a run's lease, for the reaper ------------------------------------
    def record_run_process(self, run: RunProcess) -> None:
        """Note that ``run.pid`` on ``run.host`` holds the lease of ``run.run_id`` (idempotent)."""
        with self._lock, self._connect() as db:
            db.execute(
                "INSERT OR IGNORE INTO run_processes (run_id, pipeline, cloud, host, pid, pid_start, started_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run.run_id, run.pipeline, run.cloud, run.host, run.pid, run.pid_start,
                 run.started_at.isoformat(timespec="milliseconds")),
            )

    def run_processes(self, run_id: str | None = None) -> list[RunProcess]:
        """Every recorded lease-holding process (of ``run_id`` if given), oldest first."""
        sql, args = "SELECT run_id, pipeline, cloud, host, pid, pid_start, started_at FROM run_processes", ()
        if run_id:
            sql, args = sql + " WHERE run_id=?", (run_id,)
        with self._lock, self._connect() as db:
            rows = db.execute(sql + " ORDER BY started_at", args).fetchall()
        return [RunProcess(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), datetime.fromisoformat(r[6])) for r in rows]

    # lease renewals ------------------------------------------------------------------------
    def record_renewal(self, record: LeaseRenewalRecord) -> None:
        """Note that ``record.resources`` resources of a run had their lease renewed."""
        with self._lock, self._connect() as db:
            db.execute(
                "INSERT INTO lease_renewals (run_id, cloud, host, pid, renewed_at, expires_at, resources)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record.run_id, record.cloud, record.host, record.pid,
                 record.renewed_at.isoformat(timespec="milliseconds"),
                 record.expires_at.isoformat(timespec="milliseconds"), record.resources),
            )

    def renewals(self, run_id: str) -> list[LeaseRenewalRecord]:
        """The renewals of ``run_id``'s lease, oldest first."""
        with self._lock, self._connect() as db:
            rows = db.execute("SELECT run_id, cloud, host, pid, renewed_at, expires_at, resources"
                              " FROM lease_renewals WHERE run_id=? ORDER BY renewed_at", (run_id,)).fetchall()
        return [LeaseRenewalRecord(r[0], r[1], r[2], int(r[3]), datetime.fromisoformat(r[4]),
                                   datetime.fromisoformat(r[5]), int(r[6])) for r in rows]
