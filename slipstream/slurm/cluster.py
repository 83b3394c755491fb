"""Standing up an elastic Slurm cluster, submitting to it and metering it (the flow's core).

    owner = Ownership.new("slurm-cluster")
    with Lease(cloud, owner) as lease:
        cluster = start_cluster(lease, ClusterPlan(name="demo", directory=Path("/tmp/demo")))
        job = cluster.slurm.sbatch(Path("job.sh"), output=Path("/tmp/demo/out.txt"))
        cluster.wait_for_jobs([job], timeout=600)
        print(cluster.node_costs())
    # the Lease deleted the head node and every worker VM the cluster still had

Nothing but the head node is created here: the workers are created by Slurm itself, through
``slipstream slurm resume``, when jobs need them, and owned by the same run as the head node.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from slipstream.cost.accounting import MeteredServer, PlannedServers, meter_servers
from slipstream.cloud.errors import CloudError, InvalidRequest, WaitTimeout
from slipstream.cloud.models import ServerSpec
from slipstream.cloud.waiting import wait_for_servers
from slipstream.ownership.lease import Lease
from slipstream.jetstream2 import FLAVORS
from slipstream.slurm.attempts import GAVE_UP
from slipstream.slurm.commands import JobInfo, NodeInfo, Slurm, SlurmCommandError
from slipstream.slurm.config import PARTITION, ClusterSettings, write_cluster_files
from slipstream.slurm.jobs import NEVER_RUNNABLE, JobCannotRun, JobTracker
from slipstream.slurm.nodesetup import head_user_data

log = logging.getLogger("slipstream.slurm.cluster")


class NodesGaveUp(CloudError):
    """Every node of the cluster was given up after failed resumes; waiting cannot help."""


class WaitStopped(CloudError):
    """The wait was told to stop: the run is being torn down (its budget was spent)."""


@dataclass(frozen=True)
class ClusterPlan:
    """What the researcher chooses; everything else comes from the cloud and the run."""

    name: str
    directory: Path
    cloud: str = "local"
    head_flavor: str = "m3.tiny"
    flavor: str = "m3.tiny"
    image: str = "slipstream-noop"
    max_nodes: int = 2
    suspend_time: int = 300
    suspend_timeout: int = 30
    resume_timeout: int = 300
    min_job_age: int = 300
    max_resume_attempts: int = 3
    resume_backoff: int = 60
    requeue_delay: int = 120
    loopback: bool = True


@dataclass
class ElasticCluster:
    settings: ClusterSettings
    slurm: Slurm
    lease: Lease
    silence_limit: float = 120.0  # seconds slurmctld may fail to answer before the wait gives up

    def wait_for_jobs(self, job_ids: Sequence[str], *, timeout: float,
                      on_progress: Callable[[list[JobInfo]], None] | None = None,
                      on_end: Callable[[JobInfo], None] | None = None,
                      on_nodes: Callable[[dict[str, NodeInfo]], None] | None = None,
                      every: Callable[[], None] | None = None, poll: float = 1.0,
                      stop: threading.Event | None = None) -> list[JobInfo]:
        """Wait until every job has ended; returns each job's end (see :class:`JobTracker`).

        Each round: ``on_end`` for each job whose end is new, ``on_progress`` with every job,
        ``on_nodes`` with every node, ``every`` (the orphan sweep). A job that can never start
        is cancelled and raises :class:`JobCannotRun`; when every node has been given up (see
        :mod:`.attempts`) while jobs wait, :class:`NodesGaveUp`. A round where slurmctld does not
        answer is logged and asked again, up to ``silence_limit`` seconds of silence. Once
        ``stop`` is set (the budget watchdog is tearing the run down, slurmctld with it), the wait
        raises :class:`WaitStopped` within ``poll`` seconds instead of asking a vanished slurmctld."""
        tracker = JobTracker(job_ids)
        deadline = time.monotonic() + timeout
        answered = time.monotonic()
        stop = stop or threading.Event()
        while True:
            if stop.is_set():
                raise WaitStopped("stopped waiting for the jobs: the run is being torn down",
                                  resource=self.settings.name)
            try:
                snapshot, nodes = self.slurm.jobs(), self.slurm.nodes()
                answered = time.monotonic()
            except SlurmCommandError as err:  # one busy or restarting slurmctld is no reason to fail
                if stop.is_set():
                    continue  # it went with the cluster: stop, above, without a warning
                if time.monotonic() - answered > self.silence_limit:
                    raise
                log.warning("slurmctld did not answer (%s); asking again", err)
                stop.wait(poll)
                continue
            for job in tracker.observe(snapshot):
                if on_end:
                    on_end(job)
            if on_progress:
                on_progress(tracker.jobs)
            if on_nodes:
                on_nodes(nodes)
            if tracker.done:
                return tracker.jobs
            if stuck := tracker.never_runnable():
                self.slurm.cancel([j.job_id for j in stuck])
                raise JobCannotRun(
                    "; ".join(f"job {j.job_id} ({j.name}) can never start: Slurm says {j.reason}: "
                              f"{NEVER_RUNNABLE[j.reason]}" for j in stuck),
                    resource=self.settings.name, hint=f"Every node is a {self.settings.flavor} "
                    f"({self._node_size()}); ask for less in the script's #SBATCH lines or choose a larger flavor. "
                    "The job was cancelled.")
            mine = [nodes[n] for n in self.settings.node_names if n in nodes]
            if mine and all("DRAIN" in n.flags and n.reason.startswith(GAVE_UP) for n in mine):
                raise NodesGaveUp("no node of the cluster can run the waiting jobs: " + "; ".join(
                    f"{n.name}: {n.reason}" for n in mine), resource=self.settings.name,
                    hint="See power.log and slurmd-<node>.log in the run's results (cluster-logs/): "
                         "the node's VM booted but its slurmd never registered with slurmctld.")
            if time.monotonic() > deadline:
                raise WaitTimeout(f"jobs still running after {timeout:.0f} s (max_hours): "
                                  + ", ".join(f"{j.job_id} {j.state}" for j in tracker.jobs
                                              if j.job_id not in tracker.ended),
                                  resource=self.settings.name, hint="Give the flow a larger max_hours.")
            if every:
                every()
            stop.wait(poll)

    def cancel_all(self, timeout: float = 30.0) -> None:
        """Cancel every job and wait (up to ``timeout``) until no node still runs one, so the VMs
        are deleted under no job, which ends it the way Slurm does (its epilog, its output flushed).
        A VM deleted under a running job (a budget teardown) still ends the job's processes: the
        local cloud finds slurmstepd by slurmd's environment, and the job as its descendants
        (tests/integration/test_slurm_job_processes.py)."""
        self.slurm.run("scancel", f"--partition={PARTITION}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = [n for n in self.slurm.nodes().values()
                    if n.state in ("ALLOCATED", "MIXED") or "COMPLETING" in n.flags]
            if not busy:
                return
            time.sleep(0.5)
        log.warning("jobs still hold %s %.0f s after scancel; deleting the VMs anyway",
                    ", ".join(n.name for n in busy), timeout)

    def _node_size(self) -> str:
        f = FLAVORS[self.settings.flavor]
        gpus = f", {self.settings.gpus_per_node} GPU" if self.settings.gpus_per_node else ""
        return f"{f.vcpus} CPU(s), {f.ram_mb} MB{gpus}"

    def node_costs(self) -> list[MeteredServer]:
        """SUs of every VM the cluster ever had (head and workers), from the ledger and the
        cloud's state logs."""
        entries = [e for e in self.lease.ledger.entries(self.settings.run_id)
                   if e.kind == "server" and e.resource_id and e.state in ("created", "deleted")]
        flavors = self.lease.ledger.server_flavors(self.lease.cloud.name)
        triples = [(e.resource_id, e.name, flavors.get(e.resource_id, self.settings.flavor)) for e in entries]
        return meter_servers(self.lease.cloud, list(dict.fromkeys(triples)))


def start_cluster(lease: Lease, plan: ClusterPlan, *, env: dict[str, str] | None = None,
                  timeout: float = 120.0) -> ElasticCluster:
    """Create the head node (through ``lease``), write the cluster's files and wait for slurmctld."""
    owner = lease.owner
    directory = Path(plan.directory)
    # The power programs must see the same ledger and (on the local cloud) the same cloud.
    env = {"SLIPSTREAM_HOME": str(lease.ledger.path.parent), **(env or {})}
    if getattr(lease.cloud, "home", None):
        env["SLIPSTREAM_LOCAL_HOME"] = str(lease.cloud.home)
    draft = _settings(plan, owner, directory, head_address="0.0.0.0", env=env)  # validates the plan first
    head_spec = ServerSpec(f"{plan.name}-head", plan.head_flavor, plan.image, user_data=head_user_data(draft),
                           metadata={"slurm_cluster": plan.name, "slurm_role": "head"})
    (head,) = lease.create_servers(head_spec)
    lease.ledger.record_server_flavors(lease.cloud.name, {head.id: head.flavor})
    (head,) = wait_for_servers(lease.cloud, owner.run_id, [head.id], timeout=timeout)
    settings = _settings(plan, owner, directory, head_address=head.address or "", env=env)
    write_cluster_files(settings)  # the head's user_data starts slurmctld once slurm.conf exists
    slurm = Slurm(settings.conf_path)
    deadline = time.monotonic() + timeout
    while not slurm.ping():
        if time.monotonic() > deadline:
            raise WaitTimeout(f"slurmctld of cluster {plan.name} did not answer within {timeout:.0f} s",
                              resource=head.name, cloud=lease.cloud.name,
                              hint=f"See {settings.dir / 'log' / 'slurmctld.log'} and the head's console log.")
        time.sleep(0.2)
    return ElasticCluster(settings, slurm, lease)


def _settings(plan: ClusterPlan, owner, directory: Path, *, head_address: str,
              env: dict[str, str] | None) -> ClusterSettings:
    passed = {k: v for k, v in os.environ.items() if k in ("SLIPSTREAM_HOME", "SLIPSTREAM_LOCAL_HOME", "PATH")}
    passed.update(env or {})
    return ClusterSettings(
        name=plan.name, cloud=plan.cloud, run_id=owner.run_id, pipeline=owner.pipeline, creator=owner.creator,
        expires_at=owner.expires_at.isoformat(), directory=str(directory.resolve()), head_address=head_address,
        flavor=plan.flavor, image=plan.image, max_nodes=plan.max_nodes, loopback=plan.loopback,
        suspend_time=plan.suspend_time, suspend_timeout=plan.suspend_timeout, resume_timeout=plan.resume_timeout,
        min_job_age=plan.min_job_age, max_resume_attempts=plan.max_resume_attempts,
        resume_backoff=plan.resume_backoff, requeue_delay=plan.requeue_delay, env=passed)


def slurm_cluster_plan(head_flavor: str = "m3.tiny", flavor: str = "m3.tiny", max_nodes: int = 2,
                       max_hours: float = 1.0) -> list[PlannedServers]:
    """The worst case of the slurm-cluster flow: the head node and every cloud node ACTIVE for
    ``max_hours`` (in practice workers exist only while jobs need them)."""
    from slipstream.cost.planning import flavor_named  # the planning registry imports this module lazily

    if max_hours <= 0 or max_nodes < 1:
        raise InvalidRequest(f"max_hours must be positive and max_nodes at least 1 (got {max_hours}, {max_nodes})",
                             hint="Give the cluster's longest walltime in hours and its largest node count.")
    return [PlannedServers(flavor_named(head_flavor), 1, max_hours),
            PlannedServers(flavor_named(flavor), max_nodes, max_hours)]
