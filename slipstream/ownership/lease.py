"""Lease: everything a run creates is owned, recorded, and deleted when the run ends.

Use it as a context manager around the work::

    owner = Ownership.new("my-pipeline")
    with Lease(cloud, owner) as lease:
        key = lease.create_keypair(keypair.public_key)
        servers = lease.create_servers(ServerSpec("analysis", "g3.medium", "Featured-Ubuntu24"))
        ...
    print(lease.proof)          # teardown proof: what remained after teardown (must be nothing)

Guarantees:

- every resource is stamped with ``owner`` by the creating call itself and noted in the
  :class:`~slipstream.ownership.ledger.Ledger` *before* that call is sent;
- on leaving the block — success, exception, ``KeyboardInterrupt``, cancellation — everything
  the run owns on the cloud (what this lease created, and anything else tagged with its run id)
  is deleted in dependency order (floating IPs, servers, volumes, keypairs) — the servers this
  lease holds first of all, since they charge the run — each delete retried
  on transient errors (a volume Cinder is still busy with — creating, detaching — until
  ``delete_timeout``; one already ``deleting`` waited for with the rest; one ``error_deleting``
  reported at once, since only an admin can reset it), "already gone" counted as done, and
  servers' and volumes' asynchronous deletes waited for — all of it within ONE deadline
  (``delete_timeout`` from the start of teardown, or the run's own ``teardown_deadline``), so
  that teardown costs at most what the run's worst case counts for it;
- :attr:`Lease.proof` then lists, by run id, every kind of resource on the cloud. An empty
  listing is the proof that nothing is left to charge the allocation.

Creating is idempotent within a run: asking again for servers whose names the run already has
(a retried task, a re-run of the same flow run) adopts them instead of booting duplicates.

A run that beats (``slipstream.tasks.heartbeat``) calls :meth:`Lease.renew` on every beat: the
lease on its servers and volumes is pushed to :data:`LEASE_AFTER_BEAT` after the beat once less
than half of that remains, so a reaper anywhere sees the run as held without asking any Prefect
server, and a run that dies silently frees its resources soon after its last beat.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from slipstream.cloud.errors import CloudError, Conflict, NotFound
from slipstream.cloud.models import FloatingIP, Keypair, LeaseRenewal, Ownership, Server, ServerSpec, Volume
from slipstream.cloud.port import CloudProvider
from slipstream.cloud.waiting import observe, wait_until_gone
from slipstream.ownership.ledger import LeaseRenewalRecord, Ledger, this_process
from slipstream.retry import DEFAULT_RETRY, RetryPolicy, retry

log = logging.getLogger("slipstream.ownership.lease")

#: How long a beating run's servers and volumes outlive its last lease renewal. Renewed when less
#: than half remains, so with one beat a minute about 15 beats may fail before the lease runs out.
LEASE_AFTER_BEAT = timedelta(minutes=30)
#: The lease a beating run's resources get when they are created: its beats renew it from then
#: on, but a slow first boot or a cloud refusing renewals for a while must not cost the run.
FIRST_LEASE = timedelta(hours=1)


class ResourceKind(StrEnum):
    FLOATING_IP = "floating_ip"
    SERVER = "server"
    VOLUME = "volume"
    KEYPAIR = "keypair"


#: Dependency order for deletion: addresses before the servers they point at, servers before the
#: volumes attached to them, keypairs last (they cost nothing and help debugging until the end).
#: The servers a Lease holds go first of all (they charge the run; Neutron frees an address whose
#: server is deleted), so nothing spends the teardown deadline before their deletes are sent.
TEARDOWN_ORDER = (ResourceKind.FLOATING_IP, ResourceKind.SERVER, ResourceKind.VOLUME, ResourceKind.KEYPAIR)
#: Seconds between deletes of a volume Cinder is still busy with (creating, detaching) or of
#: anything while the cloud answers 503/429 without saying how long to wait.
VOLUME_RETRY_INTERVAL = 1.0


@dataclass(frozen=True)
class HeldResource:
    kind: ResourceKind
    id: str
    name: str
    detail: str = ""  # flavour for servers, address for floating IPs, size for volumes
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class TeardownProof:
    """What a listing by run id found on the cloud after teardown, for every kind of resource."""

    run_id: str
    cloud: str
    deleted: list[HeldResource]
    remaining: dict[str, list[str]]
    errors: list[str]
    checked_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def clean(self) -> bool:
        return not any(self.remaining.values())

    def summary(self) -> str:
        if self.clean:
            kinds = ", ".join(self.remaining)
            return f"teardown proof for run {self.run_id} on {self.cloud}: no {kinds} remain"
        left = "; ".join(f"{k}: {', '.join(v)}" for k, v in self.remaining.items() if v)
        return (f"teardown INCOMPLETE for run {self.run_id} on {self.cloud}: {left} may still be "
                "charging. A delete already sent usually finishes shortly; `slipstream ls` shows what is "
                "left, and the reaper (`slipstream reap --yes`, or the `reaper` deployment) deletes it "
                "once this run has ended and its grace period has passed.")


EventCallback = Callable[[str, HeldResource], None]
"""Told ``("created" | "deleted", resource)``; the Prefect layer turns these into events."""


class Lease:
    def __init__(
        self,
        cloud: CloudProvider,
        owner: Ownership,
        *,
        ledger: Ledger | None = None,
        retry_policy: RetryPolicy = DEFAULT_RETRY,
        delete_timeout: float = 300.0,
        on_event: EventCallback | None = None,
        teardown_deadline: Callable[[], float] | None = None,
    ) -> None:
        """``teardown_deadline``, if given, says when teardown starts by when it must end (a
        ``time.monotonic()`` value): a run with a schedule (vm_job) ends it where its worst case
        says, whatever the gaps before it. A resource still there then is named in the proof
        (not clean) and left to the reaper, which deletes it once the run's lease expires."""
        self.cloud = cloud
        self.owner = owner
        self.ledger = ledger or Ledger()
        self.retry_policy = retry_policy
        self.delete_timeout = delete_timeout
        self.teardown_deadline = teardown_deadline or (lambda: time.monotonic() + self.delete_timeout)
        self.on_event = on_event
        self.held: list[HeldResource] = []
        self.proof: TeardownProof | None = None
        self._process_noted = False
        self._stamped = False  # has this process renewed the run's lease yet?
        #: The lease last stamped on the run's servers and volumes (by creation or a renewal).
        self.lease_ends = owner.expires_at

    # context manager ----------------------------------------------------------
    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            log.warning("run %s ended with %s; tearing down", self.owner.run_id, exc_type.__name__)
        self.teardown()

    # creating -----------------------------------------------------------------
    def create_servers(self, spec: ServerSpec) -> list[Server]:
        """Create ``spec.count`` servers in one call (adopting any the run already has)."""
        names = spec.server_names()
        existing = {s.name: s for s in self.cloud.list_servers(run_id=self.owner.run_id) if s.name in names}
        if existing:
            log.info("run %s already has %s; adopting instead of creating", self.owner.run_id, sorted(existing))
        missing = [n for n in names if n not in existing]
        created: list[Server] = []
        if len(missing) == len(names):
            created = self._create(ResourceKind.SERVER, names, lambda: self.cloud.create_servers(spec, self.owner))
        else:
            for name in missing:
                one = ServerSpec(**{**spec.__dict__, "name": name, "count": 1})
                created += self._create(ResourceKind.SERVER, [name], lambda one=one: self.cloud.create_servers(one, self.owner))
        for server in existing.values():
            self._hold(ResourceKind.SERVER, server.id, server.name, server.flavor)
        by_name = {s.name: s for s in [*existing.values(), *created]}
        return [by_name[n] for n in names]

    def create_keypair(self, public_key: str) -> Keypair:
        name = Keypair.name_for_run(self.owner.run_id)
        (kp,) = self._create(ResourceKind.KEYPAIR, [name], lambda: [self.cloud.create_keypair(name, public_key)])
        return kp

    def create_floating_ip(self) -> FloatingIP:
        (fip,) = self._create(ResourceKind.FLOATING_IP, ["floating-ip"], lambda: [self.cloud.create_floating_ip(self.owner)])
        return fip

    def create_volume(self, name: str, size_gb: int) -> Volume:
        (vol,) = self._create(ResourceKind.VOLUME, [name], lambda: [self.cloud.create_volume(name, size_gb, self.owner)])
        return vol

    def _note_process(self) -> None:
        if not self._process_noted:  # so the reaper knows this run is alive while this process is
            self.ledger.record_run_process(this_process(self.owner.run_id, self.owner.pipeline, self.cloud.name))
            self._process_noted = True

    # renewing -------------------------------------------------------------------------------
    def renew(self, after: timedelta = LEASE_AFTER_BEAT, *, now: datetime | None = None) -> int:
        """Extend the lease of the run's servers and volumes to ``after`` from now, where less
        than half of ``after`` remains (never shortening one); returns how many were renewed.
        A process's first call also stamps every resource of the run its own lease outlasts, so
        a retry that adopts a run elsewhere is seen as its holder at once, not 15 minutes later.

        Called on every heartbeat. Resources created later get the renewed expiry too. Each
        renewal that changed something is noted in the ledger."""
        self._note_process()  # a process that adopted its run's resources holds them too
        now = now or datetime.now(UTC)
        until, due = now + after, now + after / 2
        if not self._stamped:  # a process's first renewal stamps every resource its own lease outlasts:
            until = max(until, self.owner.expires_at)  # a retry elsewhere shows itself at once;
            due = until.replace(microsecond=0)  # leases are stamped to the second: not our own again
        renewal = LeaseRenewal(until, now, socket.gethostname(), os.getpid())
        try:
            renewed = self.cloud.renew_lease(self.owner.run_id, renewal, due_before=due)
        except CloudError as err:  # say what it costs: the lease is all a reaper elsewhere can see
            log.error("run %s: its lease could not be renewed (%s); unless a later beat renews it, a reaper may "
                      "delete its resources once %s UTC and its grace have passed, though the run still works",
                      self.owner.run_id, err, f"{self.lease_ends:%Y-%m-%d %H:%M}")
            raise
        self._stamped = True
        if renewal.expires_at > self.owner.expires_at:
            self.owner = replace(self.owner, expires_at=renewal.expires_at)
        if renewed:
            self.lease_ends = renewal.expires_at
            self.ledger.record_renewal(LeaseRenewalRecord(self.owner.run_id, self.cloud.name, renewal.renewed_by,
                                                          renewal.renewed_pid, now, renewal.expires_at, renewed))
            log.info("run %s: lease of %d resource(s) renewed until %s UTC", self.owner.run_id, renewed,
                     f"{renewal.expires_at:%H:%M:%S}")
        return renewed

    def _create(self, kind: ResourceKind, names: list[str], call: Callable[[], list]) -> list:
        self._note_process()
        entry_ids = self.ledger.record_pending(self.owner.run_id, self.owner.pipeline, self.cloud.name, kind, names)
        try:
            made = call()
        except BaseException:
            self.ledger.record_failed(entry_ids)
            raise
        for entry_id, res in zip(entry_ids, made, strict=False):
            res_id = getattr(res, "id", None) or res.name
            self.ledger.record_created(entry_id, res_id, getattr(res, "name", None) or getattr(res, "address", None))
            self._hold(kind, res_id, getattr(res, "name", "") or getattr(res, "address", ""), _detail(res))
        if kind == ResourceKind.SERVER:  # so a crashed run's servers can still be metered by flavour
            self.ledger.record_server_flavors(self.cloud.name, {s.id: s.flavor for s in made})
        return made

    def _hold(self, kind: ResourceKind, res_id: str, name: str, detail: str) -> None:
        held = HeldResource(kind, res_id, name, detail)
        self.held.append(held)
        if self.on_event:
            self.on_event("created", held)

    def forget(self, kind: ResourceKind, res_id: str) -> None:
        """Delete one resource now (e.g. a failed capacity attempt) and stop holding it."""
        self._delete(kind, res_id)
        self.held = [h for h in self.held if not (h.kind == kind and h.id == res_id)]

    # tearing down ---------------------------------------------------------------
    def owned_now(self) -> dict[ResourceKind, list[tuple[str, str]]]:
        """Everything tagged with this run on the cloud: kind -> [(id, name)], one list call per kind."""
        run = self.owner.run_id
        return {
            ResourceKind.FLOATING_IP: [(f.id, f.address) for f in self.cloud.list_floating_ips(run_id=run)],
            ResourceKind.SERVER: [(s.id, s.name) for s in self.cloud.list_servers(run_id=run)],
            ResourceKind.VOLUME: [(v.id, v.name) for v in self.cloud.list_volumes(run_id=run)],
            ResourceKind.KEYPAIR: [(k.name, k.name) for k in self.cloud.list_keypairs(run_id=run)],
        }

    def teardown(self) -> TeardownProof:
        """Delete everything the run owns, in dependency order, and prove it. Safe to call twice."""
        errors: list[str] = []
        deleted: list[HeldResource] = []
        deadline = self.teardown_deadline()  # one for every delete and wait: an outage costs it once
        # The servers are what charges the run and the lease knows them: their deletes go out
        # first, before a slow listing or another delete riding out 503s can spend the deadline.
        held_servers = {h.id: h.name for h in self.held if h.kind == ResourceKind.SERVER}
        sent = self._delete_each(ResourceKind.SERVER, held_servers, deadline, errors, deleted)
        try:
            found = self.owned_now()
        except CloudError as err:  # listing failed: still delete what we know we hold
            errors.append(f"listing the run's resources failed: {err}")
            found = {k: [] for k in TEARDOWN_ORDER}
        for kind in TEARDOWN_ORDER:
            targets = {h.id: h.name for h in self.held if h.kind == kind} | dict(found.get(kind, []))
            if kind == ResourceKind.SERVER:
                targets = {res_id: name for res_id, name in targets.items() if res_id not in held_servers}
            accepted = self._delete_each(kind, targets, deadline, errors, deleted)
            if kind == ResourceKind.SERVER:
                accepted |= sent
            if kind == ResourceKind.SERVER and accepted:
                try:  # only servers whose delete was accepted can vanish: waiting on others is futile
                    self._wait_servers_gone(accepted, deadline)
                except CloudError as err:
                    errors.append(str(err))
            if kind == ResourceKind.VOLUME and accepted:
                try:  # Cinder deletes in the background: the proof must not count `deleting` ones
                    self._wait_volumes_gone(accepted, deadline)
                except CloudError as err:
                    errors.append(str(err))
        try:
            remaining = {k.value: [name for _, name in v] for k, v in self.owned_now().items()}
        except CloudError as err:
            errors.append(f"the final listing failed: {err}")
            remaining = {"unknown": ["listing failed, cannot prove teardown"]}
        self.held = []
        self.proof = TeardownProof(self.owner.run_id, self.cloud.name, deleted, remaining, errors)
        (log.info if self.proof.clean else log.error)(self.proof.summary())
        return self.proof

    def _delete_each(self, kind: ResourceKind, targets: dict[str, str], deadline: float, errors: list[str],
                     deleted: list[HeldResource]) -> set[str]:
        """Delete every one of ``targets`` (id -> name); the ids whose delete the cloud accepted."""
        held_by_id = {h.id: h for h in self.held if h.kind == kind}
        accepted: set[str] = set()
        for res_id, name in targets.items():
            try:
                self._delete(kind, res_id, deadline)
                accepted.add(res_id)
                deleted.append(held_by_id.get(res_id, HeldResource(kind, res_id, name)))
            except CloudError as err:
                errors.append(f"deleting {kind} {name or res_id} failed: {err} "
                              "(run `slipstream reap --yes` later; the reaper will retry)")
        return accepted

    def _delete(self, kind: ResourceKind, res_id: str, deadline: float | None = None) -> None:
        """Delete one resource, riding out transient errors (and a volume Cinder is busy with)
        until ``deadline`` (``time.monotonic()``; default: ``delete_timeout`` from now)."""
        delete = {
            ResourceKind.FLOATING_IP: self.cloud.delete_floating_ip,
            ResourceKind.SERVER: self.cloud.delete_server,
            ResourceKind.VOLUME: self.cloud.delete_volume,
            ResourceKind.KEYPAIR: self.cloud.delete_keypair,
        }[kind]

        def attempt() -> None:
            try:
                delete(res_id)
            except NotFound:
                pass  # already gone: that is what we wanted

        deadline = deadline or time.monotonic() + self.delete_timeout
        while True:
            try:  # a 503/429 burst is ridden out until the deadline: giving up leaves it billing
                observe(lambda: retry(
                    attempt,
                    self.retry_policy,
                    on_retry=lambda n, err, d: log.warning("retrying delete of %s %s (attempt %d): %s", kind, res_id, n, err),
                ), deadline=deadline, poll_interval=VOLUME_RETRY_INTERVAL, what=f"deleting {kind} {res_id}")
                break
            except Conflict as err:
                # Cinder refuses (400 "status must be available or error ...") any volume that is
                # not at rest. Its status says why: still creating, attaching or detaching settles
                # on its own, so ask again; `deleting` is Cinder at work (a delete sent before:
                # wait with the others); `error_deleting` never settles without an admin.
                if kind != ResourceKind.VOLUME:
                    raise
                status = self._volume_status(res_id)
                if status in (None, "deleting"):
                    break
                if status == "error_deleting":
                    raise Conflict(
                        f"volume {res_id} is error_deleting: Cinder's backend failed to delete it "
                        "and refuses to try again", resource=res_id, cloud=self.cloud.name,
                        hint="Only the cloud's operators can reset it (Jetstream2: "
                        "help@jetstream-cloud.org, with the volume id); it is then deleted by "
                        "`slipstream reap --yes`.") from err
                if time.monotonic() > deadline:
                    raise
                log.info("volume %s is %s, deleting it again shortly: %s", res_id, status, err.message)
                time.sleep(min(VOLUME_RETRY_INTERVAL, max(0.0, deadline - time.monotonic())))
        self.ledger.record_deleted(self.cloud.name, kind, res_id)
        if self.on_event:
            self.on_event("deleted", HeldResource(kind, res_id, res_id))

    def _volume_status(self, volume_id: str) -> str | None:
        """The volume's status as Cinder lists it now (``None``: it is gone)."""
        return next((v.status for v in self.cloud.list_volumes(run_id=self.owner.run_id)
                     if v.id == volume_id), None)

    def _wait_servers_gone(self, server_ids: set[str], deadline: float) -> None:
        wait_until_gone(
            lambda: self.cloud.list_servers(run_id=self.owner.run_id), server_ids, what="servers",
            cloud=self.cloud.name, timeout=max(0.0, deadline - time.monotonic()), poll_interval=0.2,
            describe=lambda s: s.name, hint="Run `slipstream reap --yes` later; the reaper will retry.")

    def _wait_volumes_gone(self, volume_ids: set[str], deadline: float) -> None:
        """Cinder deletes in the background; the volumes left at the deadline are named with their
        status (``deleting``: Cinder is still at it)."""
        wait_until_gone(
            lambda: self.cloud.list_volumes(run_id=self.owner.run_id), volume_ids, what="volumes",
            cloud=self.cloud.name, timeout=max(0.0, deadline - time.monotonic()), poll_interval=VOLUME_RETRY_INTERVAL,
            describe=lambda v: f"{v.name} ({v.status})",
            hint="A volume still `deleting` is Cinder at work and usually goes; run "
            "`slipstream reap --yes` later to finish any other.")


def first_lease(boot_timeout: timedelta) -> timedelta:
    """The lease a beating run's resources get when created: at least :data:`FIRST_LEASE`, and
    long enough for the slowest boot the run allows plus a renewal window (Nova does not let a
    building server's lease be renewed)."""
    return max(FIRST_LEASE, boot_timeout + LEASE_AFTER_BEAT)


def lease_for_walltime(max_hours: float) -> timedelta:
    """How long the resources of a run that does *not* beat may live (its Ownership lease) when
    its work may take up to ``max_hours``: half as long again, plus half an hour to boot and tear
    down. After that the reaper deletes them even if the run still looks alive. A run that beats
    uses :data:`FIRST_LEASE` and renews it."""
    return timedelta(hours=max_hours * 1.5 + 0.5)


def teardown_run(
    cloud: CloudProvider,
    run_id: str,
    *,
    ledger: Ledger | None = None,
    on_event: EventCallback | None = None,
    retry_policy: RetryPolicy = DEFAULT_RETRY,
) -> TeardownProof:
    """Delete everything tagged with ``run_id`` on ``cloud`` and prove it, without the run's Lease.

    For code that outlives or replaces the process that held the lease: Prefect's cancellation
    and crash hooks, and the reaper. Idempotent: a run with nothing left yields a clean proof.
    """
    owner = Ownership(run_id=run_id, pipeline="teardown", creator="slipstream", expires_at=datetime.now(UTC))
    return Lease(cloud, owner, ledger=ledger, on_event=on_event, retry_policy=retry_policy).teardown()


def _detail(res: object) -> str:
    if isinstance(res, Server):
        return res.flavor
    if isinstance(res, FloatingIP):
        return res.address
    if isinstance(res, Volume):
        return f"{res.size_gb} GB"
    return ""
