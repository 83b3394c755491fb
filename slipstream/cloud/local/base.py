"""What every part of the LocalCloud shares: its home, state, options, and the lazy clock.

Statuses that change with time (BUILD -> ACTIVE at the end of the boot delay, SHUTOFF -> ACTIVE
after a start) are not driven by a background thread: a server row records ``pending`` (the
status it will reach) and ``ready_at``, and every call first *settles* the rows whose time has
come, writing the state log entry with ``ready_at`` as its time. So the log is exact whichever
process looks first, and a cloud whose creator died still moves on. Settling also notices a
guest process that died (its VM goes to SHUTOFF, as Nova's power-state sync would do).
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from slipstream.cloud.errors import Conflict, NotFound, QuotaExceeded
from slipstream.cloud.local import catalogue, vms
from slipstream.cloud.local.capacity import Host, build_hosts
from slipstream.cloud.local.faults import FaultInjector
from slipstream.cloud.local.options import ConfigFile, LocalCloudOptions
from slipstream.cloud.local.processes import GuestProcess, VmProcesses, end_vms, guest_alive, vm_marker
from slipstream.cloud.local.store import Store, log_status, parse_iso
from slipstream.cloud.models import Flavor, Server, ServerStatus

F = TypeVar("F", bound=Callable[..., Any])

S = ServerStatus
#: SQL: a server neither deleted nor being deleted (``delete_server`` marks ``pending`` first).
_NOT_DELETING = "status != 'DELETED' AND pending IS NOT 'DELETED'"


def api(operation: str) -> Callable[[F], F]:
    """Marks a provider-port method: counted in ``api_calls``, subject to injected faults."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(self: LocalCloudBase, *args: Any, **kwargs: Any) -> Any:
            with self._count_lock:
                self.api_calls += 1
            self._faults.before(operation, self.options.faults)
            return fn(self, *args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def guest_of(row: sqlite3.Row) -> GuestProcess | None:
    if row["pid"] is None:
        return None
    return GuestProcess(pid=row["pid"], pgid=row["pgid"], start=row["pid_start"])


def processes_of(row: sqlite3.Row) -> VmProcesses:
    """How to find the processes of the current boot of the VM in ``row``."""
    return VmProcesses(guest_of(row), vm_marker(row["id"], row["boot"]), row["vm_dir"])


class LocalCloudBase:
    name = "local"

    def __init__(self, home: str | Path | None = None, options: LocalCloudOptions | None = None) -> None:
        if home is None:
            home = options.resolved_home() if options else LocalCloudOptions().resolved_home()
        self.home = Path(home).expanduser().absolute()
        (self.home / "vms").mkdir(parents=True, exist_ok=True)
        self._config = ConfigFile(self.home)
        self._store = Store(self.home / "cloud.db")
        self._faults = FaultInjector(self._store, self.name)
        self._count_lock = threading.Lock()
        self.api_calls = 0
        if options is not None:
            self._config.write(options.with_home(self.home))
            for operation, count in options.faults.fail_next.items():
                self._faults.fail_next(operation, count)

    # A LocalCloud travels (Prefect task inputs, Dask workers) as its home: everything else is
    # state on disk, and the receiving process opens its own database connection.
    def __getstate__(self) -> dict[str, Any]:
        return {"home": str(self.home), "api_calls": self.api_calls}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["home"])  # type: ignore[misc]
        self.api_calls = state["api_calls"]

    @property
    def options(self) -> LocalCloudOptions:
        """The options in force (``config.json``, re-read when another process changes it)."""
        return self._config.read()

    def fail_next(self, operation: str, count: int = 1) -> None:
        """Fault injection: the next ``count`` calls of ``operation`` (from any process) fail
        with TransientError."""
        self._faults.fail_next(operation, count)

    # rows -> port dataclasses ---------------------------------------------------------
    def _to_server(self, row: sqlite3.Row, floating: dict[str, str]) -> Server:
        status = S(row["status"])
        return Server(
            id=row["id"], name=row["name"], status=status, flavor=row["flavor"], image=row["image"],
            address=row["address"], floating_ip=floating.get(row["id"]), key_name=row["key_name"],
            metadata=json.loads(row["metadata"]), tags=tuple(json.loads(row["tags"])),
            fault=row["fault"] if status == S.ERROR else None,
            created_at=parse_iso(row["created_at"]), ssh_port=row["ssh_port"],
            ssh_user=catalogue.login_user(),
        )

    @staticmethod
    def _floating_by_server(con: sqlite3.Connection) -> dict[str, str]:
        return {r["server_id"]: r["address"] for r in
                con.execute("SELECT server_id, address FROM floating_ips WHERE server_id IS NOT NULL")}

    def _row(self, con: sqlite3.Connection, server_id: str) -> sqlite3.Row:
        """The live (not deleted) server row, or NotFound."""
        row = con.execute("SELECT * FROM servers WHERE id = ?", (str(server_id),)).fetchone()
        if row is None or row["status"] == S.DELETED:
            raise NotFound("server not found", resource=str(server_id), cloud=self.name,
                           hint="It was deleted, or never existed; list_servers() shows what exists.")
        return row

    def _require(self, row: sqlite3.Row, operation: str, allowed: Iterable[ServerStatus]) -> None:
        """Raise Conflict unless the server is in one of ``allowed`` and not changing state."""
        allowed = tuple(allowed)
        if row["pending"] is not None:
            raise Conflict(f"cannot {operation} server {row['name']}: it is still changing state "
                           f"({row['status']} -> {row['pending']})", resource=row["id"], cloud=self.name,
                           hint="Wait for the change to finish, then try again.")
        if row["status"] not in allowed:
            raise Conflict(f"cannot {operation} server {row['name']} while it is {row['status']}",
                           resource=row["id"], cloud=self.name,
                           hint=f"{operation} needs a server that is {' or '.join(allowed)}.")

    # the lazy clock ---------------------------------------------------------------------
    @contextmanager
    def _changing(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that first settles every due status change."""
        with self._store.write() as con:
            crashed = self._settle_in(con, time.time())
            yield con
        self._end_leftovers(crashed)

    def _settle(self) -> None:
        """Apply every status change whose time has come (see the module docstring)."""
        now = time.time()
        with self._store.read() as con:
            due = con.execute("SELECT 1 FROM servers WHERE pending IS NOT NULL AND ready_at <= ? LIMIT 1",
                              (now,)).fetchone()
            running = con.execute("SELECT pid, pgid, pid_start FROM servers WHERE status = 'ACTIVE' "
                                  "AND pending IS NULL AND pid IS NOT NULL").fetchall()
        if due or any(not guest_alive(guest_of(r)) for r in running):  # type: ignore[arg-type]
            with self._store.write() as con:
                crashed = self._settle_in(con, now)
            self._end_leftovers(crashed)

    def _end_leftovers(self, crashed: list[VmProcesses]) -> None:
        # A guest that died on its own may leave its sshd or user_data running: end them, so
        # that its address is free for the next boot.
        if crashed:
            end_vms(crashed, self.options.stop_grace)

    def _settle_in(self, con: sqlite3.Connection, now: float) -> list[VmProcesses]:
        """Settle due changes inside ``con``'s transaction; returns the VMs whose guest died."""
        crashed: list[VmProcesses] = []
        for row in con.execute("SELECT * FROM servers WHERE pending IS NOT NULL AND ready_at <= ?",
                               (now,)).fetchall():
            target, fault, guest = row["pending"], row["fault"], guest_of(row)
            if target == S.ACTIVE and guest is not None and not guest_alive(guest):
                crashed.append(processes_of(row))
                if row["status"] == S.BUILD:
                    target, fault = S.ERROR, "The VM's guest process ended during boot; see its console log."
                else:
                    target = S.SHUTOFF
            releases = target == S.ERROR
            if target != S.ACTIVE:
                guest = None
            con.execute(
                "UPDATE servers SET status = ?, pending = NULL, ready_at = NULL, fault = ?, "
                "pid = CASE WHEN ? THEN pid ELSE NULL END, "
                "host = CASE WHEN ? THEN NULL ELSE host END, "
                "gpu_slot = CASE WHEN ? THEN NULL ELSE gpu_slot END WHERE id = ?",
                (target, fault, guest is not None, releases, releases, row["id"]))
            log_status(con, row["id"], target, row["ready_at"])
        for row in con.execute("SELECT * FROM servers WHERE status = 'ACTIVE' AND pending IS NULL "
                               "AND pid IS NOT NULL").fetchall():
            if not guest_alive(guest_of(row)):  # type: ignore[arg-type]
                crashed.append(processes_of(row))
                con.execute("UPDATE servers SET status = 'SHUTOFF', pid = NULL, pgid = NULL, "
                            "pid_start = NULL WHERE id = ?", (row["id"],))
                log_status(con, row["id"], S.SHUTOFF, now)
        return crashed

    # quotas and hosts -------------------------------------------------------------------
    def _check_server_quota(self, con: sqlite3.Connection, flavor: Flavor, count: int, what: str) -> None:
        """Raise QuotaExceeded if ``count`` more ``flavor`` servers would pass a limit.

        Like Nova's legacy counting, every server that exists counts (also SHUTOFF, SHELVED
        and ERROR ones) until it is deleted."""
        table = catalogue.flavors()
        used = [table[r["flavor"]] for r in
                con.execute("SELECT flavor FROM servers WHERE status != 'DELETED'") if r["flavor"] in table]
        q = self.options.quotas
        checks = [
            ("instances", count, len(used), q.instances),
            ("cores", count * flavor.vcpus, sum(f.vcpus for f in used), q.cores),
            ("ram", count * flavor.ram_mb, sum(f.ram_mb for f in used), q.ram_mb),
        ]
        for resource, requested, in_use, limit in checks:
            if in_use + requested > limit:
                unit = " MB" if resource == "ram" else ""
                raise QuotaExceeded(
                    f"Quota exceeded for {resource}: Requested {requested}{unit}, but already used "
                    f"{in_use}{unit} of {limit}{unit} {resource}", resource=what, cloud=self.name,
                    hint="Delete servers you no longer need, pick a smaller flavour or fewer "
                         "servers, or ask for more quota.")

    def _hosts(self, con: sqlite3.Connection) -> list[Host]:
        table = catalogue.flavors()
        held = [(r["host"], r["gpu_slot"], table[r["flavor"]]) for r in con.execute(
            "SELECT host, gpu_slot, flavor FROM servers WHERE host IS NOT NULL") if r["flavor"] in table]
        return build_hosts(self.options.capacity, held)

    # guest processes --------------------------------------------------------------------
    def _start_guests(self, boots: list[tuple[str, int]]) -> None:
        """Start guests for (server id, boot) pairs and record them; a failed start is ERROR."""
        if not boots:
            return
        try:
            guests = vms.start_guests(self.home, boots)
        except (RuntimeError, OSError, ValueError) as err:
            with self._store.write() as con:
                for sid, boot in boots:
                    failed = con.execute(
                        "UPDATE servers SET status = 'ERROR', pending = NULL, ready_at = NULL, "
                        "host = NULL, gpu_slot = NULL, fault = ? WHERE id = ? AND boot = ? "
                        f"AND {_NOT_DELETING}", (f"The VM could not start: {err}", sid, boot))
                    if failed.rowcount:
                        log_status(con, sid, S.ERROR)
            return
        orphans = []
        with self._store.write() as con:
            for (sid, boot), guest in zip(boots, guests, strict=True):
                updated = con.execute(
                    "UPDATE servers SET pid = ?, pgid = ?, pid_start = ? WHERE id = ? AND boot = ? "
                    f"AND {_NOT_DELETING} AND pid IS NULL", (guest.pid, guest.pgid, guest.start, sid, boot))
                if updated.rowcount == 0:  # deleted (or being deleted) while we were starting it
                    orphans.append(VmProcesses(guest, vm_marker(sid, boot), str(vms.vm_dir(self.home, sid))))
        if orphans:
            end_vms(orphans, self.options.stop_grace)

    def _end(self, row: sqlite3.Row) -> None:
        """End the processes of the VM in ``row`` (its current boot)."""
        end_vms([processes_of(row)], self.options.stop_grace)
