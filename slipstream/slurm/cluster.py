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

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from slipstream.cost.accounting import MeteredServer, PlannedServers, meter_servers
from slipstream.cloud.errors import InvalidRequest, WaitTimeout
from slipstream.cloud.models import ServerSpec
from slipstream.cloud.waiting import wait_for_servers
from slipstream.ownership.lease import Lease
from slipstream.slurm.commands import FINISHED_STATES, JobInfo, Slurm
from slipstream.slurm.config import ClusterSettings, write_cluster_files
from slipstream.slurm.nodesetup import head_user_data


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
    loopback: bool = True


@dataclass
class ElasticCluster:
    settings: ClusterSettings
    slurm: Slurm
    lease: Lease

    def wait_for_jobs(self, job_ids: Sequence[str], *, timeout: float,
                      on_progress: Callable[[list[JobInfo]], None] | None = None,
                      every: Callable[[], None] | None = None, poll: float = 1.0) -> list[JobInfo]:
        """Wait until every job has finished; ``every`` runs each round (the orphan sweep)."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = {j.job_id: j for j in self.slurm.jobs()}
            seen = [jobs.get(str(i)) or JobInfo(str(i), "UNKNOWN") for i in job_ids]
            if on_progress:
                on_progress(seen)
            if all(j.state in FINISHED_STATES for j in seen):
                return seen
            if time.monotonic() > deadline:
                raise WaitTimeout(f"jobs still running after {timeout:.0f} s: "
                                  + ", ".join(f"{j.job_id} {j.state}" for j in seen if j.state not in FINISHED_STATES),
                                  resource=self.settings.name, hint="Give the flow a longer job deadline.")
            if every:
                every()
            time.sleep(poll)

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
        env=passed)


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
