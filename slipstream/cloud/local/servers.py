"""LocalCloud servers: create in batches, list, and the lifecycle Nova offers.

Transitions (anything else raises :class:`~slipstream.cloud.errors.Conflict`):

==================  ==========================  ===================================================
call                from                        to
==================  ==========================  ===================================================
create_servers      -                           BUILD -> ACTIVE after the boot delay (or ERROR)
stop_server         ACTIVE                      SHUTOFF (processes ended, disk and host kept)
start_server        SHUTOFF                     ACTIVE after the boot delay
shelve_server       ACTIVE, SHUTOFF             SHELVED_OFFLOADED (processes ended, host released)
unshelve_server     SHELVED_OFFLOADED           ACTIVE after the boot delay (CapacityError if no host)
delete_server       any                         (-> DELETED, still listed) processes ended, then DELETED
                                                (address freed, dir removed)
==================  ==========================  ===================================================

A batch is all or nothing: quotas are checked for the whole batch before anything is created,
and if one server finds no host, every server of the batch goes to ERROR with Nova's fault
"No valid host was found..." (the call itself succeeds, as on Nova; waiting raises
CapacityError). Nova checks quotas a second time after accepting a batch; when that fails
(``FaultOptions.quota_recheck``), every server of the batch goes to ERROR with the quota fault and
waiting raises QuotaExceeded.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from slipstream.cloud.errors import CapacityError, InvalidRequest, NotFound
from slipstream.cloud.local import addresses, catalogue, vms
from slipstream.cloud.local.base import LocalCloudBase, api
from slipstream.cloud.local.capacity import NO_VALID_HOST, Placement, place_all
from slipstream.cloud.local.store import dumps, log_status, parse_iso, utc_iso
from slipstream.cloud.models import OWNER_TAG, Flavor, Image, Ownership, Server, ServerSpec, ServerStatus

S = ServerStatus


@dataclass(frozen=True)
class ServerHistory:
    """A server's life, also after deletion: for metering SUs (accounting.meter)."""

    id: str
    name: str
    flavor: str
    run_id: str | None
    created_at: datetime
    deleted_at: datetime | None
    log: list[tuple[ServerStatus, datetime]] = field(default_factory=list)


@dataclass
class _Batch:
    """What every server of one create_servers call shares."""

    spec: ServerSpec
    owner: Ownership
    flavor: Flavor
    image: catalogue.LocalImage
    now: float
    ssh_port: int
    metadata: dict[str, str]
    public_key: str | None = None


class ServerOps(LocalCloudBase):
    # catalogue ------------------------------------------------------------------------------
    @api("list_flavors")
    def list_flavors(self) -> list[Flavor]:
        return list(catalogue.flavors().values())

    @api("list_images")
    def list_images(self) -> list[Image]:
        return [i.image for i in catalogue.images().values()]

    # creating -------------------------------------------------------------------------------
    @api("create_servers")
    def create_servers(self, spec: ServerSpec, owner: Ownership) -> list[Server]:
        if not isinstance(owner, Ownership):
            raise InvalidRequest("servers must be created with an Ownership", cloud=self.name,
                                 hint="Pass Ownership.new(pipeline) (the Lease does this).")
        flavor = catalogue.flavor_named(spec.flavor, self.name)
        image = catalogue.image_named(spec.image, self.name)
        catalogue.check_network(spec.network, self.name)
        opts = self.options
        batch = _Batch(spec, owner, flavor, image, time.time(), opts.effective_ssh_port(),
                       {**{str(k): str(v) for k, v in spec.metadata.items()}, **owner.metadata()})
        ids: list[str] = []
        boots: list[tuple[str, int]] = []
        with self._changing() as con:
            batch.public_key = self._public_key(con, spec)
            self._check_server_quota(con, flavor, spec.count, spec.name)  # the whole batch, up front
            placements = place_all(self._hosts(con), [flavor] * spec.count, opts.faults.no_capacity)
            used = [r["address"] for r in con.execute(
                "SELECT address FROM servers WHERE status != 'DELETED' AND address IS NOT NULL")]
            ips = (addresses.allocate(opts.network, spec.count, used, what="server", cloud=self.name)
                   if placements else [None] * spec.count)
            for i, name in enumerate(spec.server_names()):
                sid, boots_now = self._record_server(con, batch, name, placements[i] if placements else None, ips[i])
                ids.append(sid)
                boots += [(sid, 1)] if boots_now else []
        self._start_guests(boots)
        with self._store.read() as con:
            floating = self._floating_by_server(con)
            rows = {r["id"]: r for r in con.execute(
                f"SELECT * FROM servers WHERE id IN ({','.join('?' * len(ids))})", ids)}
        return [self._to_server(rows[sid], floating) for sid in ids]

    def _public_key(self, con, spec: ServerSpec) -> str | None:
        if not spec.key_name:
            return None
        key = con.execute("SELECT public_key FROM keypairs WHERE name = ?", (spec.key_name,)).fetchone()
        if key is None:
            raise InvalidRequest(f"keypair {spec.key_name!r} does not exist", resource=spec.name,
                                 cloud=self.name, hint="Create it first with create_keypair().")
        return key["public_key"]

    def _record_server(self, con, b: _Batch, name: str, place: Placement | None,
                       ip: str | None) -> tuple[str, bool]:
        """Insert one server of a batch and make its directory; returns (id, boots now?)."""
        sid = str(uuid.uuid4())
        opts = self.options
        ready: float | None = b.now + opts.boot_seconds(b.flavor.family)
        if place is None:  # no valid host: recorded, and ERROR at once, as Nova's scheduler does
            pending, ready, fault = None, None, NO_VALID_HOST
        elif {b.flavor.name, b.flavor.family} & set(opts.faults.quota_recheck):
            limit = opts.quotas.cores  # Nova's recheck words it as if the cores were all taken
            pending, fault = S.ERROR, (f"Quota exceeded for cores: Requested {b.spec.count * b.flavor.vcpus}, "
                                       f"but already used {limit} of {limit} cores")
        elif b.flavor.name in opts.faults.error_flavors:
            pending, fault = S.ERROR, (f"Build of instance {sid} aborted: flavour {b.flavor.name} is set "
                                       "to fail (LocalCloud fault injection).")
        else:
            pending, fault = S.ACTIVE, None
        directory = vms.vm_dir(self.home, sid)
        con.execute(
            "INSERT INTO servers (id, name, run_id, flavor, image, key_name, metadata, tags, status, "
            "pending, ready_at, fault, created_at, address, host, gpu_slot, ssh_port, boot, vm_dir) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'BUILD', ?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
            (sid, name, b.owner.run_id, b.flavor.name, b.image.image.name, b.spec.key_name,
             dumps(b.metadata), dumps(b.owner.tags()), pending, ready, fault, utc_iso(b.now), ip,
             place.host if place else None, place.gpu_slot if place else None, b.ssh_port, str(directory)))
        log_status(con, sid, S.BUILD, b.now)
        if place is None:
            con.execute("UPDATE servers SET status = 'ERROR' WHERE id = ?", (sid,))
            log_status(con, sid, S.ERROR, b.now)
        vms.prepare(directory, server_id=sid, name=name, address=ip, flavor=b.flavor,
                    image=b.image.image.name, runs_sshd=b.image.runs_sshd, metadata=b.metadata,
                    tags=b.owner.tags(), key_name=b.spec.key_name, public_key=b.public_key,
                    user_data=b.spec.user_data, ssh_port=b.ssh_port, ssh_user=catalogue.login_user(),
                    host=place.host if place else None)
        if pending == S.ACTIVE:
            vms.write_boot(directory, 1, ready)  # type: ignore[arg-type]
        return sid, pending == S.ACTIVE

    # reading --------------------------------------------------------------------------------
    @api("list_servers")
    def list_servers(self, run_id: str | None = None) -> list[Server]:
        """Servers slipstream owns (of one run if given), in creation order; not deleted ones."""
        self._settle()
        query = "SELECT * FROM servers WHERE status != 'DELETED'"
        args: tuple = ()
        if run_id is not None:
            query, args = query + " AND run_id = ?", (run_id,)
        with self._store.read() as con:
            floating = self._floating_by_server(con)
            rows = con.execute(query + " ORDER BY rowid", args).fetchall()
        servers = [self._to_server(r, floating) for r in rows]
        return [s for s in servers if OWNER_TAG in s.tags and s.ownership is not None
                and (run_id is None or s.ownership.run_id == run_id)]

    @api("get_server")
    def get_server(self, server_id: str) -> Server:
        self._settle()
        with self._store.read() as con:
            return self._to_server(self._row(con, server_id), self._floating_by_server(con))

    @api("console_log")
    def console_log(self, server_id: str) -> str:
        with self._store.read() as con:
            row = self._row(con, server_id)
        try:
            return (vms.vm_dir(self.home, row["id"]) / "console.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @api("state_log")
    def state_log(self, server_id: str) -> list[tuple[ServerStatus, datetime]]:
        self._settle()
        with self._store.read() as con:
            if con.execute("SELECT 1 FROM servers WHERE id = ?", (str(server_id),)).fetchone() is None:
                raise NotFound("server not found", resource=str(server_id), cloud=self.name,
                               hint="The state log covers servers this local cloud created (until reset).")
            rows = con.execute("SELECT status, at FROM state_log WHERE server_id = ? ORDER BY seq",
                               (str(server_id),)).fetchall()
        return [(S(r["status"]), parse_iso(r["at"])) for r in rows]

    def server_history(self, run_id: str | None = None) -> list[ServerHistory]:
        """Every server (of ``run_id``, or all), deleted ones included, with its state log."""
        self._settle()
        query, args = "SELECT * FROM servers", ()
        if run_id is not None:
            query, args = query + " WHERE run_id = ?", (run_id,)
        with self._store.read() as con:
            rows = con.execute(query + " ORDER BY rowid", args).fetchall()
            logs: dict[str, list[tuple[ServerStatus, datetime]]] = {}
            for entry in con.execute("SELECT server_id, status, at FROM state_log ORDER BY seq"):
                logs.setdefault(entry["server_id"], []).append((S(entry["status"]), parse_iso(entry["at"])))
        return [ServerHistory(r["id"], r["name"], r["flavor"], r["run_id"], parse_iso(r["created_at"]),
                              parse_iso(r["deleted_at"]) if r["deleted_at"] else None, logs.get(r["id"], []))
                for r in rows]

    # lifecycle ------------------------------------------------------------------------------
    @api("stop_server")
    def stop_server(self, server_id: str) -> None:
        with self._changing() as con:
            row = self._row(con, server_id)
            self._require(row, "stop", [S.ACTIVE])
            self._power_off(con, row, S.SHUTOFF, release_host=False)
        self._end(row)

    @api("start_server")
    def start_server(self, server_id: str) -> None:
        with self._changing() as con:
            row = self._row(con, server_id)
            self._require(row, "start", [S.SHUTOFF])
            boot = self._power_on(con, row, host=None)
        self._start_guests([(row["id"], boot)])

    @api("shelve_server")
    def shelve_server(self, server_id: str) -> None:
        with self._changing() as con:
            row = self._row(con, server_id)
            self._require(row, "shelve", [S.ACTIVE, S.SHUTOFF])
            self._power_off(con, row, S.SHELVED_OFFLOADED, release_host=True)
        self._end(row)

    @api("unshelve_server")
    def unshelve_server(self, server_id: str) -> None:
        with self._changing() as con:
            row = self._row(con, server_id)
            self._require(row, "unshelve", [S.SHELVED_OFFLOADED])
            flavor = catalogue.flavors()[row["flavor"]]
            placed = place_all(self._hosts(con), [flavor], self.options.faults.no_capacity)
            if placed:
                boot = self._power_on(con, row, host=placed[0])
            else:
                con.execute("UPDATE servers SET fault = ? WHERE id = ?", (NO_VALID_HOST, row["id"]))
        if not placed:
            raise CapacityError(f"cannot unshelve: {NO_VALID_HOST}", resource=f"{row['name']} ({row['flavor']})",
                                cloud=self.name, hint="It stays shelved (and costs nothing); try again later.")
        self._start_guests([(row["id"], boot)])

    @api("delete_server")
    def delete_server(self, server_id: str) -> None:
        # In three steps, as Nova's task_state "deleting": marked (still listed, its processes
        # still findable), its processes ended, then DELETED. A crash between the steps leaves a
        # listed server that a second delete finishes, never a hidden one with live processes.
        with self._changing() as con:
            self._row(con, server_id)
            con.execute("UPDATE servers SET pending = 'DELETED', ready_at = NULL WHERE id = ?", (str(server_id),))
            row = self._row(con, server_id)  # as marked: a guest recorded before now is in it
        self._end(row)
        now = time.time()
        with self._store.write() as con:
            done = con.execute("UPDATE servers SET status = 'DELETED', pending = NULL, ready_at = NULL, host = NULL, "
                               "gpu_slot = NULL, deleted_at = ? WHERE id = ? AND status != 'DELETED'",
                               (utc_iso(now), row["id"]))
            if done.rowcount:  # (else a concurrent delete finished first)
                # Neutron keeps the floating IP (unattached); Nova detaches the volumes.
                con.execute("UPDATE floating_ips SET server_id = NULL WHERE server_id = ?", (row["id"],))
                con.execute("UPDATE volumes SET attached_to = NULL, status = 'available' WHERE attached_to = ?",
                            (row["id"],))
                log_status(con, row["id"], S.DELETED, now)
        vms.remove(vms.vm_dir(self.home, row["id"]))

    def _power_off(self, con, row, status: ServerStatus, *, release_host: bool) -> None:
        # The pid stays recorded for a deleted server only; here the next boot records its own.
        con.execute("UPDATE servers SET status = ?, pid = NULL, pgid = NULL, pid_start = NULL, "
                    "host = CASE WHEN ? THEN NULL ELSE host END, "
                    "gpu_slot = CASE WHEN ? THEN NULL ELSE gpu_slot END WHERE id = ?",
                    (status, release_host, release_host, row["id"]))
        log_status(con, row["id"], status)

    def _power_on(self, con, row, *, host) -> int:
        """Schedule the next boot (ACTIVE at ready_at); returns its number."""
        boot = row["boot"] + 1
        ready = time.time() + self.options.boot_seconds(row["flavor"].split(".", 1)[0])
        con.execute("UPDATE servers SET pending = 'ACTIVE', ready_at = ?, boot = ?, fault = NULL, "
                    "host = COALESCE(?, host), gpu_slot = CASE WHEN ? IS NULL THEN gpu_slot ELSE ? END "
                    "WHERE id = ?",
                    (ready, boot, host.host if host else None, host.host if host else None,
                     host.gpu_slot if host else None, row["id"]))
        vms.write_boot(vms.vm_dir(self.home, row["id"]), boot, ready)
        return boot
