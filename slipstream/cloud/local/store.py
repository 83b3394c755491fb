"""The LocalCloud's state: one SQLite file (``<home>/cloud.db``) shared by every process.

A flow, the CLI and the reaper may all use the same local cloud at once, from different
processes. SQLite in WAL mode lets readers run while one writer writes; ``busy_timeout`` makes a
second writer wait instead of failing; every change runs in ``BEGIN IMMEDIATE`` so that a
read-check-write (quota, address allocation, a status transition) cannot interleave with
another process's.

Tables: ``servers`` (rows are kept after deletion, status DELETED, for metering and for
``reset``), ``state_log`` (every status change with its UTC time), ``keypairs``,
``floating_ips``, ``volumes`` and ``fault_counters`` (bursts and draw counters of fault
injection). Quota usage is computed from these tables, never stored twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS servers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    run_id TEXT,
    flavor TEXT NOT NULL,
    image TEXT NOT NULL,
    key_name TEXT,
    metadata TEXT NOT NULL,            -- JSON object
    tags TEXT NOT NULL,                -- JSON list
    status TEXT NOT NULL,
    pending TEXT,                      -- status reached at ready_at (lazy BUILD -> ACTIVE etc.)
    ready_at REAL,                     -- epoch seconds
    fault TEXT,
    created_at TEXT NOT NULL,
    deleted_at TEXT,
    address TEXT,
    host TEXT,                         -- hypervisor holding its capacity, NULL when released
    gpu_slot INTEGER,
    ssh_port INTEGER NOT NULL,
    boot INTEGER NOT NULL DEFAULT 0,   -- boot number: 1 at create, +1 per start/unshelve
    pid INTEGER,                       -- the guest process (leader of its own process group)
    pgid INTEGER,
    pid_start INTEGER,                 -- its start time in clock ticks (/proc/<pid>/stat field 22)
    vm_dir TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS servers_by_run ON servers(run_id);
CREATE TABLE IF NOT EXISTS state_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    server_id TEXT NOT NULL,
    status TEXT NOT NULL,
    at TEXT NOT NULL                   -- ISO 8601, UTC
);
CREATE INDEX IF NOT EXISTS state_log_by_server ON state_log(server_id);
CREATE TABLE IF NOT EXISTS keypairs (
    name TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS floating_ips (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL UNIQUE,
    server_id TEXT,
    run_id TEXT,
    tags TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    size_gb INTEGER NOT NULL,
    status TEXT NOT NULL,
    metadata TEXT NOT NULL,
    run_id TEXT,
    attached_to TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fault_counters (
    operation TEXT PRIMARY KEY,
    fail_next INTEGER NOT NULL DEFAULT 0,
    draws INTEGER NOT NULL DEFAULT 0
);
"""


def utc_iso(epoch: float | None = None) -> str:
    moment = datetime.now(UTC) if epoch is None else datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="microseconds")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text)


def dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True)


class Store:
    """One connection per process and LocalCloud, serialised by a lock (threads share it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._con: sqlite3.Connection | None = None
        self._pid = -1
        with self._lock:
            # Each statement is idempotent (IF NOT EXISTS): two processes may race here.
            self._connection().executescript(_SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork: a child process opens its own.
        if self._con is None or self._pid != os.getpid():
            con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                  isolation_level=None, check_same_thread=False)
            con.row_factory = sqlite3.Row
            con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable enough, fast
            self._con, self._pid = con, os.getpid()
        return self._con

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``): committed on success, rolled back on error."""
        with self._lock:
            con = self._connection()
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs."""
        with self._lock:
            con = self._connection()
            con.execute("BEGIN")
            try:
                yield con
            finally:
                con.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._con is not None and self._pid == os.getpid():
                self._con.close()
            self._con = None


def log_status(con: sqlite3.Connection, server_id: str, status: str, epoch: float | None = None) -> None:
    """Record a status change in the state log (the source of SU metering)."""
    con.execute("INSERT INTO state_log (server_id, status, at) VALUES (?, ?, ?)",
                (server_id, status, utc_iso(epoch)))
