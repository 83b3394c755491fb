"""Looking after a LocalCloud: ``status()`` (what runs where) and ``reset()`` (end it all).

These back ``slipstream local status`` and ``slipstream local reset``. ``reset`` ends every VM
process the cloud has recorded — each process group only after /proc shows that its leader is
still that VM's guest (same pid *and* start time), never a process that reused the number —
plus every process still carrying this home's marker (sshd sessions, daemons started by
user_data, a guest whose creator died before recording it), then clears the state and the VM
directories. The configuration (``config.json``) is kept.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from slipstream.cloud.local import catalogue
from slipstream.cloud.local.base import LocalCloudBase, guest_of, processes_of
from slipstream.cloud.local.capacity import usage
from slipstream.cloud.local.processes import HOME_MARKER, end_vms, guest_alive, processes_with


@dataclass(frozen=True)
class VmSummary:
    id: str
    name: str
    status: str
    flavor: str
    address: str | None
    floating_ip: str | None
    host: str | None
    pid: int | None
    alive: bool


@dataclass(frozen=True)
class LocalCloudStatus:
    """A snapshot of the local cloud: VMs, quota use, host use and processes."""

    home: Path
    vms: list[VmSummary]
    quota: dict[str, tuple[int, int]]  # resource -> (used, limit)
    hosts: list[dict[str, object]]
    processes: int  # processes carrying this home's marker (guests, sshd, user_data...)

    @property
    def by_status(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for vm in self.vms:
            counts[vm.status] = counts.get(vm.status, 0) + 1
        return counts

    @property
    def guests_alive(self) -> int:
        return sum(vm.alive for vm in self.vms)

    def render(self) -> str:
        lines = [f"LocalCloud at {self.home}"]
        states = ", ".join(f"{n} {s}" for s, n in sorted(self.by_status.items())) or "no VMs"
        lines.append(f"VMs: {states}; {self.guests_alive} guest(s) running, {self.processes} process(es) in all")
        for vm in self.vms:
            where = vm.address or "-"
            if vm.floating_ip:
                where += f" / {vm.floating_ip}"
            pid = f"pid {vm.pid}" + ("" if vm.alive else " (gone)") if vm.pid else ""
            lines.append(f"  {vm.name:<16} {vm.status:<17} {vm.flavor:<9} {where:<15} {vm.host or '-':<14} {pid}")
        compute = [k for k in ("instances", "cores", "ram_gb") if k in self.quota]
        lines.append("quota: " + ", ".join(f"{k} {self.quota[k][0]}/{self.quota[k][1]}" for k in compute))
        lines.append("       " + ", ".join(f"{k} {u}/{lim}" for k, (u, lim) in self.quota.items() if k not in compute))
        lines.append("hosts:")
        lines += [f"  {h['host']:<16} vcpus {h['vcpus']:<10} ram GB {h['ram_gb']:<14} gpus {h['gpus']}"
                  for h in self.hosts]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


@dataclass(frozen=True)
class ResetSummary:
    servers: int
    processes_signalled: int
    cleared: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        rest = ", ".join(f"{n} {k}" for k, n in self.cleared.items() if n)
        return (f"ended {self.servers} VM(s) ({self.processes_signalled} process(es) signalled)"
                + (f"; cleared {rest}" if rest else ""))


class AdminOps(LocalCloudBase):
    def status(self) -> LocalCloudStatus:
        """VMs by status, their addresses and processes, quota and host use."""
        self._settle()
        table = catalogue.flavors()
        with self._store.read() as con:
            rows = con.execute("SELECT * FROM servers WHERE status != 'DELETED' ORDER BY rowid").fetchall()
            floating = self._floating_by_server(con)
            fips = con.execute("SELECT COUNT(*) FROM floating_ips").fetchone()[0]
            vol_count, vol_gb = con.execute("SELECT COUNT(*), COALESCE(SUM(size_gb), 0) FROM volumes").fetchone()
            hosts = usage(self._hosts(con))
        vms = []
        for r in rows:
            guest = guest_of(r)
            vms.append(VmSummary(r["id"], r["name"], r["status"] + (f" -> {r['pending']}" if r["pending"] else ""),
                                 r["flavor"], r["address"], floating.get(r["id"]), r["host"],
                                 r["pid"], guest is not None and guest_alive(guest)))
        flavors = [table[r["flavor"]] for r in rows if r["flavor"] in table]
        q = self.options.quotas
        quota = {
            "instances": (len(rows), q.instances),
            "cores": (sum(f.vcpus for f in flavors), q.cores),
            "ram_gb": (sum(f.ram_mb for f in flavors) // 1024, q.ram_mb // 1024),
            "floating_ips": (fips, q.floating_ips),
            "volumes": (vol_count, q.volumes),
            "volume_gb": (vol_gb, q.volume_gb),
        }
        return LocalCloudStatus(self.home, vms, quota, hosts, len(processes_with(HOME_MARKER, str(self.home))))

    def reset(self) -> ResetSummary:
        """End every VM of this cloud (verified by /proc, see the module docstring), then clear
        all servers, state log, keypairs, floating IPs, volumes and fault counters."""
        with self._store.read() as con:
            rows = con.execute("SELECT * FROM servers").fetchall()
        live = sum(r["status"] != "DELETED" for r in rows)
        signalled = end_vms([processes_of(r) for r in rows],
                            self.options.stop_grace, home=str(self.home))
        cleared = {}
        with self._store.write() as con:
            for table in ("servers", "state_log", "keypairs", "floating_ips", "volumes", "fault_counters"):
                cleared[table] = con.execute(f"DELETE FROM {table}").rowcount
        shutil.rmtree(self.home / "vms", ignore_errors=True)
        (self.home / "vms").mkdir(parents=True, exist_ok=True)
        return ResetSummary(live, signalled, cleared)
