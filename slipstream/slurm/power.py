"""Slurm's power-saving programs for cloud nodes, on the cloud port: resume, suspend, resume-fail,
and the orphan sweep.

slurmctld calls them with a hostlist (``c-[1-3]``) through the cluster's ``bin/`` programs:

- :meth:`SlurmPower.resume` — expands the hostlist safely, adopts nodes whose VM already exists
  (resume is idempotent), creates every missing node of the call in ONE batch owned by the
  cluster's run (through a :class:`~slipstream.ownership.lease.Lease`, so each VM is in the ledger before
  the call is sent), waits for them, and records each VM in Slurm: ``NodeAddr=<VM address>
  Comment=instance=<id>``. Against a quota it creates what fits (halving the batch after each
  "Quota exceeded") and powers the rest down with the quota's message as their Reason, their jobs
  requeued, for Slurm's next resume. On any other failure it deletes what it created, requeues
  the nodes' jobs, powers the nodes down with the reason (slurmctld logs it) and raises. Nodes
  that failed to resume before are held back (see :mod:`.attempts`).
- :meth:`SlurmPower.suspend` — deletes the nodes' VMs and meters what each one cost.
- :meth:`SlurmPower.resume_fail` — the same, counts the failure, and powers the nodes down: to
  be used again after a back-off, or drained for good after ``max_resume_attempts``.
- :meth:`SlurmPower.sweep` — a :class:`~slipstream.scaling.reconciler.ReconcileTable` from
  (what Slurm says, what the cloud has) to an action: VMs without a powered-up node are
  deleted, nodes that claim to be up without a VM are powered down (their jobs requeued).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum

from slipstream.cost.accounting import MeteredServer, meter_servers
from slipstream.cloud.errors import CloudError, InvalidRequest, QuotaExceeded
from slipstream.cloud.models import Server, ServerSpec, ServerStatus, check_name
from slipstream.cloud.port import CloudProvider
from slipstream.cloud.waiting import wait_for_servers
from slipstream.ownership.lease import Lease, ResourceKind
from slipstream.ownership.ledger import Ledger
from slipstream.retry import retry
from slipstream.scaling.reconciler import ReconcileTable
from slipstream.slurm.attempts import GAVE_UP, ResumeAttempts
from slipstream.slurm.commands import Slurm
from slipstream.slurm.config import ClusterSettings
from slipstream.slurm.hostlist import expand
from slipstream.slurm.nodesetup import worker_user_data

log = logging.getLogger("slipstream.slurm.power")


@dataclass(frozen=True)
class NodeBatch(ServerSpec):
    """Servers with exactly these names, created in one call (a ServerSpec names them <name>-<i>)."""

    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.names) != self.count:
            raise InvalidRequest(f"a batch of {self.count} servers needs {self.count} names, got {len(self.names)}")
        for name in self.names:
            check_name(name, "server name")

    def server_names(self) -> list[str]:
        return list(self.names)


class ResumeFailed(CloudError):
    """A resume call could not bring every node up; the nodes were powered down again."""


# what the sweep sees and does ------------------------------------------------------------------
class SlurmSide(StrEnum):
    POWERED_DOWN = "powered down"
    POWERING_UP = "powering up"
    POWERING_DOWN = "powering down"
    UP = "up"                       # any state without a power flag: Slurm counts on a VM
    NOT_A_NODE = "no such node"     # a VM of the cluster whose name is no node of it


class VmSide(StrEnum):
    MISSING = "no VM"
    BOOTING = "VM booting"
    ACTIVE = "VM active"
    BROKEN = "VM in error/stopped"


class SweepAction(StrEnum):
    NOTHING = "nothing"
    DELETE_VM = "delete the VM (it is charging for nothing)"
    POWER_DOWN = "power the node down and requeue its jobs"
    DELETE_AND_POWER_DOWN = "delete the VM, power the node down, requeue its jobs"


@dataclass(frozen=True)
class NodeView:
    name: str
    slurm: SlurmSide
    vm: VmSide
    server: Server | None = None


S, V, A = SlurmSide, VmSide, SweepAction
SWEEP_TABLE: ReconcileTable[NodeView, SweepAction] = ReconcileTable(
    "slurm cloud nodes",
    {
        (S.POWERED_DOWN, V.MISSING): A.NOTHING,
        (S.POWERED_DOWN, V.BOOTING): A.DELETE_VM,        # orphan of an interrupted resume
        (S.POWERED_DOWN, V.ACTIVE): A.DELETE_VM,         # orphan: a suspend that never happened
        (S.POWERED_DOWN, V.BROKEN): A.DELETE_VM,
        (S.POWERING_UP, V.MISSING): A.NOTHING,           # resume is creating it (ResumeTimeout guards)
        (S.POWERING_UP, V.BOOTING): A.NOTHING,
        (S.POWERING_UP, V.ACTIVE): A.NOTHING,
        (S.POWERING_UP, V.BROKEN): A.DELETE_AND_POWER_DOWN,
        (S.POWERING_DOWN, V.MISSING): A.NOTHING,
        (S.POWERING_DOWN, V.BOOTING): A.DELETE_VM,
        (S.POWERING_DOWN, V.ACTIVE): A.DELETE_VM,
        (S.POWERING_DOWN, V.BROKEN): A.DELETE_VM,
        (S.UP, V.MISSING): A.POWER_DOWN,                 # claims to be up, but nothing runs it
        (S.UP, V.BOOTING): A.NOTHING,
        (S.UP, V.ACTIVE): A.NOTHING,
        (S.UP, V.BROKEN): A.DELETE_AND_POWER_DOWN,
        (S.NOT_A_NODE, V.BOOTING): A.DELETE_VM,
        (S.NOT_A_NODE, V.ACTIVE): A.DELETE_VM,
        (S.NOT_A_NODE, V.BROKEN): A.DELETE_VM,
    },
    classify=lambda view: (view.slurm, view.vm),
)


def slurm_side(flags: frozenset[str]) -> SlurmSide:
    if "POWERED_DOWN" in flags:
        return S.POWERED_DOWN
    if "POWERING_UP" in flags:
        return S.POWERING_UP
    if "POWERING_DOWN" in flags or "POWER_DOWN" in flags:
        return S.POWERING_DOWN
    return S.UP


def vm_side(server: Server | None) -> VmSide:
    if server is None or server.status == ServerStatus.DELETED:
        return V.MISSING
    if server.status == ServerStatus.BUILD:
        return V.BOOTING
    if server.status == ServerStatus.ACTIVE:
        return V.ACTIVE
    return V.BROKEN


@dataclass
class SweepReport:
    planned: list[tuple[NodeView, SweepAction]] = field(default_factory=list)
    done: list[str] = field(default_factory=list)

    @property
    def actions(self) -> list[tuple[str, SweepAction]]:
        return [(v.name, a) for v, a in self.planned if a != A.NOTHING]


class SlurmPower:
    """The power programs of one cluster (see the module docstring)."""

    def __init__(self, settings: ClusterSettings, cloud: CloudProvider, *, slurm: Slurm | None = None,
                 ledger: Ledger | None = None) -> None:
        self.settings = settings
        self.cloud = cloud
        self.slurm = slurm or Slurm(settings.conf_path)
        self.lease = Lease(cloud, settings.owner, ledger=ledger)  # never entered: VMs outlive a call
        self.attempts = ResumeAttempts(settings.dir / "resume-failures.json",
                                       max_attempts=settings.max_resume_attempts, backoff=settings.resume_backoff)

    # helpers -----------------------------------------------------------------------------------
    def nodes_in(self, hostlist: str) -> list[str]:
        """The cluster's nodes named by ``hostlist``; refuses names that are not its cloud nodes."""
        names = expand(hostlist, self.slurm)
        strangers = [n for n in names if n not in set(self.settings.node_names)]
        if strangers:
            raise InvalidRequest(f"{', '.join(strangers)} are not cloud nodes of cluster {self.settings.name}",
                                 hint=f"This cluster's cloud nodes are {self.settings.hostlist}.")
        return names

    def _vms(self) -> dict[str, Server]:
        """The cluster's live VMs by name (one list call)."""
        live = [s for s in self.cloud.list_servers(run_id=self.settings.run_id) if s.status != ServerStatus.DELETED]
        return {s.name: s for s in live}

    # resume ------------------------------------------------------------------------------------
    def resume(self, hostlist: str) -> list[Server]:
        names = self.nodes_in(hostlist)  # before anything is created
        s = self.settings
        for name, reason in self.attempts.holding(names, s.resume_timeout).items():
            log.warning("node %s not resumed: %s", name, reason)
            self._hold_back(name, reason)
            names.remove(name)
        if not names:
            return []
        started = time.monotonic()
        created: list[Server] = []
        blocked: dict[str, str] = {}
        try:
            # Transient cloud errors are retried (each attempt adopts what an earlier one made).
            wanted = retry(lambda: self._ensure_vms(names, created, blocked), on_retry=lambda n, err, d: log.warning(
                "creating VMs for %s failed (attempt %d), retrying in %.1f s: %s", hostlist, n, d, err))
            ready = wait_for_servers(self.cloud, s.run_id, [wanted[n] for n in names if n in wanted],
                                     timeout=s.boot_timeout) if wanted else []
            for vm in ready:
                addr = vm.address or vm.reachable_address
                self.slurm.update_node([vm.name], NodeAddr=addr, NodeHostname=addr if s.loopback else vm.name,
                                       Comment=f"instance={vm.id}")
                log.info("node %s: VM %s at %s", vm.name, vm.id, addr)
        except Exception as err:
            self._undo_resume(names, created, err)
            raise ResumeFailed(f"resume of {hostlist} failed: {err}", resource=s.name, cloud=self.cloud.name,
                               hint="The nodes were powered down and their jobs requeued; Slurm will "
                                    "try again when the jobs are scheduled.") from err
        if blocked:
            quota = next(iter(blocked.values()))
            log.warning("the quota blocks %s (%s); powering them down for Slurm's next resume",
                        ", ".join(blocked), quota)
            self.power_down(list(blocked), f"slipstream: the cloud's quota blocks this node: {quota}; "
                                           "Slurm resumes it again when its jobs are scheduled")
        log.info("resumed %s in %.1f s", ",".join(v.name for v in ready) or "nothing", time.monotonic() - started)
        return ready

    def _ensure_vms(self, names: list[str], created: list[Server], blocked: dict[str, str]) -> dict[str, str]:
        """{node: VM id} for ``names``: existing VMs adopted, the missing ones created in as few
        batches as the quota allows (appended to ``created``); nodes the quota blocks go to
        ``blocked`` with the cloud's message."""
        s = self.settings
        vms = self._vms()
        for name in names:  # a leftover of an earlier, timed-out resume is replaced
            old = vms.get(name)
            if old is not None and old.status not in (ServerStatus.ACTIVE, ServerStatus.BUILD):
                log.warning("node %s: VM %s is %s; replacing it", name, old.id, old.status)
                self.lease.forget(ResourceKind.SERVER, old.id)
                vms.pop(name)
        adopted = [vms[n] for n in names if n in vms]
        if adopted:
            log.info("adopting existing VMs of %s (resume is idempotent)", ", ".join(v.name for v in adopted))
        blocked.clear()
        missing = [n for n in names if n not in vms]
        size = len(missing)
        while missing:
            batch = missing[:size]
            try:
                made = self.lease.create_servers(NodeBatch(
                    batch[0], s.flavor, s.image, count=len(batch), names=tuple(batch),
                    user_data=worker_user_data(s), metadata={"slurm_cluster": s.name}))
            except QuotaExceeded as err:
                if size > 1:  # Nova refuses a whole batch over quota: try half of it
                    log.warning("a batch of %d VM(s) is over the quota (%s); trying %d", size, _short(err), size // 2)
                    size //= 2
                    continue
                blocked.update({n: _short(err) for n in missing})
                break
            created += made
            self.lease.ledger.record_server_flavors(self.cloud.name, {v.id: v.flavor for v in made})
            log.info("created %d VM(s) in one batch for %s", len(made), ", ".join(batch))
            missing = missing[len(batch):]
        return {v.name: v.id for v in [*adopted, *created] if v.name in names}

    def _hold_back(self, name: str, reason: str) -> None:
        """Keep a node that failed to resume from booting now: power it down again (its jobs go back
        to the queue, to another node if one can take them); a given-up node is drained too."""
        self.power_down([name], reason)
        if reason.startswith(GAVE_UP):
            self._drain_once_powered_down(name, reason)

    def _undo_resume(self, names: list[str], created: list[Server], err: Exception) -> None:
        log.error("resume of %s failed: %s; deleting %d new VM(s) and powering the nodes down",
                  ",".join(names), err, len(created))
        for vm in created:
            try:
                self.lease.forget(ResourceKind.SERVER, vm.id)
            except CloudError as del_err:  # the sweep, the flow's teardown or the reaper retries
                log.error("could not delete VM %s of node %s: %s", vm.id, vm.name, del_err)
        self.power_down(names, f"slipstream resume failed: {_short(err)}")

    def power_down(self, names: list[str], reason: str) -> None:
        """Requeue the nodes' jobs and power the nodes down (POWER_DOWN_FORCE) with ``reason``."""
        try:
            jobs = self.slurm.jobs_on(names)
            self.slurm.requeue([j.job_id for j in jobs])
            if jobs:
                log.info("requeued job(s) %s", ", ".join(j.job_id for j in jobs))
        except CloudError as err:
            log.error("could not requeue the jobs of %s: %s", ",".join(names), err)
        self.slurm.update_node(names, State="POWER_DOWN_FORCE", Reason=reason[:200])
        log.info("powered down %s: %s", ",".join(names), reason)

    # suspend -----------------------------------------------------------------------------------
    def suspend(self, hostlist: str) -> list[MeteredServer]:
        names = self.nodes_in(hostlist)
        return self._delete_vms(names, why="suspended")

    def resume_fail(self, hostlist: str) -> list[MeteredServer]:
        """slurmctld gave up waiting for the nodes (``ResumeTimeout``): delete their VMs, count the
        failure, and power them down, backing off or drained (see :mod:`.attempts`)."""
        names = self.nodes_in(hostlist)
        metered = self._delete_vms(names, why="failed to resume")
        why = f"its slurmd did not register within ResumeTimeout={self.settings.resume_timeout} s"
        for name in names:
            attempts = self.attempts.failed(name, why)
            reason = self.attempts.reason(name, attempts, self.settings.resume_timeout)
            log.error("node %s: %s", name, reason)
            self._hold_back(name, reason)
        return metered

    def _drain_once_powered_down(self, name: str, reason: str) -> None:
        """DRAIN a node after its power-down: with ``idle_on_node_suspend`` the power-down itself
        clears a DRAIN set earlier (seen on 22.05), and a drained node is never resumed."""
        deadline = time.monotonic() + self.settings.suspend_timeout + 30
        while time.monotonic() < deadline:
            node = self.slurm.nodes().get(name)
            if node is None or "POWERED_DOWN" in node.flags:
                break
            time.sleep(0.5)
        self.slurm.update_node([name], State="DRAIN", Reason=reason[:200])
        log.error("node %s drained: %s", name, reason)

    def _delete_vms(self, names: list[str], why: str) -> list[MeteredServer]:
        vms = self._vms()
        gone = [vms[n] for n in names if n in vms]
        for vm in gone:
            self.lease.forget(ResourceKind.SERVER, vm.id)
        for name in names:
            if name not in vms:
                log.info("node %s %s: it had no VM", name, why)
        metered = meter_servers(self.cloud, [(vm.id, vm.name, vm.flavor) for vm in gone])
        for m in metered:
            log.info("node %s %s: VM deleted; %s for %.0f s active cost %.4f SU",
                     m.name, why, m.flavor, m.hours_active * 3600, m.su)
        return metered

    # sweep -------------------------------------------------------------------------------------
    def observe(self) -> list[NodeView]:
        nodes = self.slurm.nodes()
        vms = self._vms()
        views = []
        for name in self.settings.node_names:
            info = nodes.get(name)
            side = slurm_side(info.flags) if info else S.POWERED_DOWN
            views.append(NodeView(name, side, vm_side(vms.get(name)), vms.get(name)))
        head = f"{self.settings.name}-head"
        for name, vm in vms.items():
            if name not in nodes and name != head and name not in self.settings.node_names:
                views.append(NodeView(name, S.NOT_A_NODE, vm_side(vm), vm))
        return views

    def sweep(self, *, dry_run: bool = False) -> SweepReport:
        report = SweepReport(SWEEP_TABLE.plan(self.observe()))
        for view, action in report.planned:
            if action == A.NOTHING:
                continue
            log.warning("sweep: %s (%s, %s): %s%s", view.name, view.slurm, view.vm, action,
                        " [dry run]" if dry_run else "")
            if dry_run:
                continue
            if action in (A.DELETE_VM, A.DELETE_AND_POWER_DOWN) and view.server:
                self.lease.forget(ResourceKind.SERVER, view.server.id)
                for m in meter_servers(self.cloud, [(view.server.id, view.name, view.server.flavor)]):
                    log.info("sweep: node %s VM deleted; it cost %.4f SU", m.name, m.su)
            if action in (A.POWER_DOWN, A.DELETE_AND_POWER_DOWN):
                self.power_down([view.name], f"slipstream sweep: {view.vm}")
            report.done.append(f"{view.name}: {action}")
        return report


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:150]
