"""The worker VMs of one elastic pool: launched in batches through a Lease, parked or deleted when idle.

:class:`WorkerPool` is the cloud side the Dask cluster, the Slurm programs and the benchmark share.
It never decides *how many* (that is :class:`~slipstream.scaling.policy.ScalingPolicy`); it does
what was decided, safely:

- ``launch(n)`` creates ``n`` servers in **one** API call through the run's
  :class:`~slipstream.ownership.lease.Lease`, so each carries ownership and is recorded before the call
  returns (a crash leaves nothing the reaper cannot find). A batch is named
  ``<prefix>-b<k>`` and its servers ``<prefix>-b<k>-<i>`` (Nova's multi-create names), so
  worker names are known before the VMs exist.
- ``release(name, next_work_in)`` applies the :class:`~slipstream.scaling.idle.IdlePolicy`:
  shelve (0 SU) when work is expected back soon, delete otherwise; ``unpark`` wakes it.
- ``reconcile(observed)`` turns what was seen of each worker — its VM's state, whether its
  scheduler sees it, what the policy wants — into an action with :data:`WORKER_TABLE`.

Thread-safe: Dask's event loop calls it from worker threads.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum

from slipstream.cloud.errors import NotFound
from slipstream.cloud.models import Server, ServerSpec, ServerStatus, check_name
from slipstream.cloud.waiting import wait_for_servers
from slipstream.ownership.lease import Lease, ResourceKind
from slipstream.retry import retry
from slipstream.scaling.idle import IdleAction, IdlePolicy
from slipstream.scaling.reconciler import ReconcileTable

log = logging.getLogger("slipstream.scaling.pool")


@dataclass(frozen=True)
class Batch:
    """Servers to create in one call: ``name`` is the ServerSpec name, ``names`` the servers'."""

    name: str
    names: tuple[str, ...]


class WorkerPool:
    def __init__(self, lease: Lease, *, flavor: str, image: str, prefix: str, user_data: str | None = None,
                 idle: IdlePolicy | None = None, key_name: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        check_name(f"{prefix}-b1-1", "worker name prefix")
        self.lease = lease
        self.cloud = lease.cloud
        self.flavor = flavor
        self.image = image
        self.prefix = prefix
        self.user_data = user_data
        self.idle = idle or IdlePolicy()
        self.key_name = key_name
        self.metadata = dict(metadata or {})
        self.servers: dict[str, Server] = {}   # by name: every worker VM the pool holds
        self.parked_since: dict[str, float] = {}
        self._batches = itertools.count(1)
        self._lock = threading.Lock()

    # launching -------------------------------------------------------------------------------
    def next_batch(self, count: int) -> Batch:
        """Names for the next ``count`` workers (one batch), before anything is created."""
        with self._lock:
            k = next(self._batches)
        name = f"{self.prefix}-b{k}"
        names = (name,) if count == 1 else tuple(f"{name}-{i}" for i in range(1, count + 1))
        return Batch(name, names)

    def launch(self, batch: Batch | int) -> list[Server]:
        """Create a batch of workers in one API call; returns them (BUILD)."""
        if isinstance(batch, int):
            batch = self.next_batch(batch)
        spec = ServerSpec(batch.name, self.flavor, self.image, count=len(batch.names), key_name=self.key_name,
                          user_data=self.user_data, metadata={**self.metadata, "slipstream:pool": self.prefix})
        created = self.lease.create_servers(spec)
        # Noted for metering: a scaled-down worker is deleted long before the run's report.
        self.lease.ledger.record_server_flavors(self.cloud.name, {s.id: s.flavor for s in created})
        with self._lock:
            self.servers.update({s.name: s for s in created})
        log.info("launched %d x %s: %s", len(created), self.flavor, ", ".join(s.name for s in created))
        return created

    def wait_active(self, names: list[str] | tuple[str, ...], timeout: float = 600.0,
                    poll_interval: float = 0.5) -> list[Server]:
        """Wait (one list call per round) until the named workers are ACTIVE."""
        ids = [self.servers[n].id for n in names]
        up = wait_for_servers(self.cloud, self.lease.owner.run_id, ids, timeout=timeout, poll_interval=poll_interval)
        with self._lock:
            self.servers.update({s.name: s for s in up})
        return up

    # letting go and coming back ----------------------------------------------------------------
    def release(self, name: str, next_work_in: float | None = None) -> IdleAction:
        """Let go of an idle worker as the idle policy says: park it (shelve/stop) or delete it."""
        with self._lock:
            parked_now = len(self.parked_since)
        action = self.idle.on_release(next_work_in, parked_now)
        server = self.servers[name]
        if action == IdleAction.DELETE:
            self.delete(name)
            return action
        call = self.cloud.shelve_server if action == IdleAction.SHELVE else self.cloud.stop_server
        retry(lambda: call(server.id), self.lease.retry_policy)
        with self._lock:
            self.parked_since[name] = time.monotonic()
        log.info("parked %s (%s): work expected back in %s s", name, action, next_work_in)
        return action

    def unpark(self, name: str) -> Server:
        """Wake a parked worker (unshelve or start); it boots again and keeps its disk."""
        server = self.servers[name]
        call = self.cloud.unshelve_server if self.idle.action == IdleAction.SHELVE else self.cloud.start_server
        retry(lambda: call(server.id), self.lease.retry_policy)
        with self._lock:
            self.parked_since.pop(name, None)
        log.info("unparked %s", name)
        return server

    def delete(self, name: str) -> None:
        """Delete one worker now (idempotent: an already-gone VM is fine)."""
        with self._lock:
            server = self.servers.pop(name, None)
            self.parked_since.pop(name, None)
        if server is None:
            return
        try:
            self.lease.forget(ResourceKind.SERVER, server.id)
        except NotFound:
            pass
        log.info("deleted %s", name)

    def parked(self) -> list[str]:
        with self._lock:
            return sorted(self.parked_since, key=self.parked_since.__getitem__)

    def expire_parked(self) -> list[str]:
        """Delete workers parked longer than the idle policy allows; returns their names."""
        now = time.monotonic()
        old = [n for n, since in list(self.parked_since.items()) if self.idle.parked_too_long(now - since)]
        for name in old:
            self.delete(name)
        return old

    def observe_all(self) -> dict[str, Server]:
        """The pool's VMs as the cloud sees them now (one list call), by name; a VM the pool
        holds but the cloud no longer lists is missing from the answer."""
        seen = {s.name: s for s in self.cloud.list_servers(run_id=self.lease.owner.run_id)}
        with self._lock:
            return {n: seen[n] for n in self.servers if n in seen}

    def reconcile(self, observed: list[WorkerObservation]) -> list[tuple[WorkerObservation, WorkerAction]]:
        return WORKER_TABLE.plan(observed)


# the reconciliation table ----------------------------------------------------------------------
class VmState(StrEnum):
    BOOTING = "vm booting"
    UP = "vm up"
    PARKED = "vm parked"
    STOPPED = "vm stopped by itself"  # SHUTOFF/SHELVED/… though the pool did not park it
    FAILED = "vm in error"
    GONE = "vm gone"


class Link(StrEnum):
    JOINED = "worker joined"          # the scheduler (Dask, slurmctld) sees the worker
    NOT_YET = "worker not joined"     # not yet: booting or installing
    LATE = "worker never joined"      # not joined well past the boot deadline: broken


class Want(StrEnum):
    KEEP = "policy keeps it"
    RELEASE = "policy releases it"
    UNPARK = "policy wants it back"


class WorkerAction(StrEnum):
    NOTHING = "nothing"
    RELEASE = "release (idle policy: park or delete)"
    UNPARK = "unpark"
    DELETE = "delete vm"
    FORGET = "forget (already gone)"


@dataclass(frozen=True)
class WorkerObservation:
    name: str
    vm: VmState
    link: Link
    want: Want = Want.KEEP
    extra: dict = field(default_factory=dict, compare=False)


def vm_state(server: Server | None, *, parked: bool = False) -> VmState:
    """A worker VM's state for the table; ``parked``: the pool itself parked it. A VM that shut
    itself off (a guest ``poweroff``, a crash) is STOPPED, not parked: SHUTOFF costs 50 % for as
    long as it lasts."""
    if server is None or server.status == ServerStatus.DELETED:
        return VmState.GONE
    return {ServerStatus.BUILD: VmState.BOOTING, ServerStatus.ACTIVE: VmState.UP,
            ServerStatus.ERROR: VmState.FAILED}.get(server.status, VmState.PARKED if parked else VmState.STOPPED)


def _rows() -> dict[tuple[VmState, Link, Want], WorkerAction]:
    rows: dict[tuple[VmState, Link, Want], WorkerAction] = {}
    for link, want in itertools.product(Link, Want):
        rows[(VmState.FAILED, link, want)] = WorkerAction.DELETE   # an ERROR VM never recovers
        rows[(VmState.STOPPED, link, want)] = WorkerAction.DELETE  # charged, useless: replace it
        rows[(VmState.GONE, link, want)] = WorkerAction.FORGET     # deleted behind our back
        # parked: wake it if wanted, delete it if released for good, else leave it (0 SU)
        rows[(VmState.PARKED, link, want)] = {Want.UNPARK: WorkerAction.UNPARK,
                                              Want.RELEASE: WorkerAction.DELETE}.get(want, WorkerAction.NOTHING)
        # booting: BUILD is not charged; a VM no longer wanted goes before it starts costing
        rows[(VmState.BOOTING, link, want)] = WorkerAction.DELETE if want == Want.RELEASE else WorkerAction.NOTHING
        # up, never joined after its deadline: broken (charged and useless) -> delete
        rows[(VmState.UP, Link.LATE, want)] = WorkerAction.DELETE
    rows.update({
        (VmState.UP, Link.JOINED, Want.KEEP): WorkerAction.NOTHING,
        (VmState.UP, Link.JOINED, Want.UNPARK): WorkerAction.NOTHING,
        (VmState.UP, Link.JOINED, Want.RELEASE): WorkerAction.RELEASE,
        (VmState.UP, Link.NOT_YET, Want.KEEP): WorkerAction.NOTHING,     # installing its software
        (VmState.UP, Link.NOT_YET, Want.UNPARK): WorkerAction.NOTHING,
        (VmState.UP, Link.NOT_YET, Want.RELEASE): WorkerAction.DELETE,   # not set up yet: nothing to keep
    })
    return rows


#: Observed worker -> action. ``WORKER_TABLE.describe()`` prints it as a two-column table.
WORKER_TABLE: ReconcileTable[WorkerObservation, WorkerAction] = ReconcileTable(
    "pool workers", _rows(), classify=lambda o: (o.vm, o.link, o.want))
