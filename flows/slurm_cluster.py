"""An elastic Slurm cluster for a batch of jobs: ``slurm_cluster``.

"Give me a Slurm cluster whose nodes exist only while my jobs run, run these batch scripts on it,
bring back their output, and delete everything." The flow stands up a head-node VM (slurmctld,
munge) with ``max_nodes`` cloud nodes (``State=CLOUD``): Slurm itself creates a node's VM when a
job needs it (``slipstream slurm resume``) and deletes it after ``suspend_time`` idle seconds
(``slipstream slurm suspend``). The flow submits the scripts with ``sbatch``, waits for them
(with a deadline, reporting progress and sweeping orphans), copies their output into
``results_dir``, and tears the whole cluster down with a teardown proof and each node's SUs::

    from slipstream.flows.slurm_cluster import slurm_cluster
    slurm_cluster(scripts=["align.sh", "count.sh"], max_nodes=2, suspend_time=60)

Every VM — head and workers — is owned by the flow run, so the lease (and, after a crash, the
reaper) deletes all of them. On the local cloud the Slurm commands reach slurmctld through the
cluster's ``SLURM_CONF`` on this machine; real clouds would need SSH to the head node (not yet).
"""

# No `from __future__ import annotations`: flow.serve() pickles the flow by value (see vm_job).
import shutil
import tempfile
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from pydantic import BaseModel

from slipstream.blocks import load_cloud
from slipstream.flows.vm_job import FlavorName
from slipstream import progress
from slipstream.cost.accounting import MeteredServer, estimate
from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.models import Ownership
from slipstream.ownership.lease import HeldResource, Lease, lease_for_walltime
from slipstream.slurm.cluster import ClusterPlan, ElasticCluster, slurm_cluster_plan, start_cluster
from slipstream.slurm.commands import JobInfo
from slipstream.slurm.power import SlurmPower
from slipstream.tasks import CLOUD_TASK_OPTIONS
from slipstream.tasks.budget import guard_budget, watching_budget
from slipstream.tasks.events import resource_event_emitter
from slipstream.tasks.hooks import TEARDOWN_HOOKS
from slipstream.tasks.report import report_run


class SlurmJobResult(BaseModel):
    script: str
    job_id: str
    state: str
    restarts: int
    output: str          # the copied output file in results_dir


class SlurmClusterResult(BaseModel):
    run_id: str
    cloud: str
    jobs: list[SlurmJobResult]
    resources: list[HeldResource]
    metered: list[MeteredServer]   # one line per VM: the head node and every worker the jobs used
    su_estimated: float
    su_spent: float
    teardown_clean: bool
    teardown_remaining: dict[str, list[str]]


@task(name="start-slurm-cluster", cache_policy=CLOUD_TASK_OPTIONS["cache_policy"])
def start_slurm_cluster(lease: Lease, plan: ClusterPlan) -> ElasticCluster:
    """Boot the head node, write slurm.conf and the power programs, wait for slurmctld."""
    cluster = start_cluster(lease, plan)
    get_run_logger().info("slurmctld of %s answers at %s; cloud nodes %s (State=CLOUD)", plan.name,
                          cluster.settings.head_address, cluster.settings.hostlist)
    return cluster


@task(name="submit-batch-scripts", cache_policy=CLOUD_TASK_OPTIONS["cache_policy"])
def submit_scripts(cluster: ElasticCluster, scripts: list[Path]) -> dict[str, Path]:
    """sbatch each script; returns {job id: its output file}."""
    out_dir = cluster.settings.dir / "outputs"
    out_dir.mkdir(exist_ok=True)
    jobs = {}
    for script in scripts:
        staged = out_dir / script.name  # the cluster's shared directory: the nodes read it there
        shutil.copyfile(script, staged)
        output = out_dir / f"{script.stem}.out"
        job_id = cluster.slurm.sbatch(staged, output=output, workdir=out_dir, job_name=script.stem)
        get_run_logger().info("submitted %s as job %s", script.name, job_id)
        jobs[job_id] = output
    return jobs


@task(name="wait-for-slurm-jobs", cache_policy=CLOUD_TASK_OPTIONS["cache_policy"])
def wait_for_jobs(cluster: ElasticCluster, job_ids: list[str], timeout: float, sweep_every: float = 15.0) -> list[JobInfo]:
    """Wait for every job (deadline ``timeout``), reporting progress and sweeping orphans."""
    logger = get_run_logger()
    power = SlurmPower(cluster.settings, cluster.lease.cloud)
    last: dict[str, str] = {}
    next_sweep = [0.0]

    def show(jobs: list[JobInfo]) -> None:
        done = sum(j.state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") for j in jobs)
        progress.report("jobs", done, len(jobs), ", ".join(f"{j.job_id} {j.state}" for j in jobs))
        for j in jobs:
            if last.get(j.job_id) != j.state:
                logger.info("job %s: %s%s", j.job_id, j.state, f" on {j.nodes}" if j.nodes else "")
                last[j.job_id] = j.state

    def sweep() -> None:
        if time.monotonic() >= next_sweep[0]:
            next_sweep[0] = time.monotonic() + sweep_every
            for name, action in power.sweep().actions:
                logger.warning("sweep: %s: %s", name, action)

    return cluster.wait_for_jobs(job_ids, timeout=timeout, on_progress=show, every=sweep)


@flow(name="slurm-cluster", log_prints=True, **TEARDOWN_HOOKS)
def slurm_cluster(
    scripts: list[str],
    name: str = "slurm",
    cloud: str = "local",
    flavor: FlavorName = "m3.tiny",
    head_flavor: FlavorName = "m3.tiny",
    max_nodes: int = 2,
    image: str = "slipstream-noop",
    suspend_time: int = 300,
    suspend_timeout: int = 30,
    resume_timeout: int = 300,
    max_hours: float = 1.0,
    results_dir: str = "results",
    pipeline: str = "slurm-cluster",
    budget_su: float | None = None,
    allocation: str | None = None,
    override_budget: bool = False,
    budget_check_seconds: float = 60.0,
) -> SlurmClusterResult:
    """Run batch ``scripts`` on an elastic Slurm cluster and delete the cluster afterwards.

    Args:
        scripts: Local batch scripts (``#!`` + optional ``#SBATCH`` lines), one job each.
        name: Cluster name (a DNS label): nodes are <name>-1..<name>-<max_nodes>, the head <name>-head.
        cloud: "local" for the embedded cloud (the only one this flow supports so far).
        flavor: Flavour of every worker node (its CPUs and memory become the node's in Slurm).
        head_flavor: Flavour of the head node (slurmctld, munge).
        max_nodes: Most worker nodes the cluster may hold at once.
        image: Image of the head and worker VMs.
        suspend_time: Idle seconds after which Slurm deletes a worker node's VM.
        suspend_timeout: Seconds Slurm allows the suspend program.
        resume_timeout: Seconds Slurm allows a node to boot and register.
        max_hours: Deadline for all jobs; sets the lease expiry and the SU worst case.
        results_dir: Local directory for the jobs' output files.
        pipeline: Pipeline name stamped on every resource.
        budget_su: Most SUs the run may spend (default: the allocation's run budget, if any); a
            watchdog meters the cluster and tears it down when the budget is spent.
        allocation: A saved allocation block (its balances and run budget).
        override_budget: Run even if the worst case is over the budget or the balance.
        budget_check_seconds: How often the budget watchdog meters the cluster.
    """
    logger = get_run_logger()
    paths = [Path(s).expanduser() for s in scripts]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise InvalidRequest(f"batch scripts not found: {', '.join(missing) or '(none given)'}",
                             hint="Pass existing script files in scripts=[...].")
    if cloud != "local":
        raise InvalidRequest(f"slurm-cluster cannot submit on cloud {cloud!r} yet",
                             hint='Use cloud="local"; on real clouds jobs must be submitted over SSH to the head node.')
    planned = slurm_cluster_plan(head_flavor, flavor, max_nodes, max_hours)
    worst_case = estimate(planned)
    budget_su, held_allocation = guard_budget(planned, budget_su, allocation, override_budget)
    provider = load_cloud(cloud)
    owner = Ownership.new(pipeline, run_id=str(flow_run.get_id() or "") or None,
                          lease=lease_for_walltime(max_hours))
    plan = ClusterPlan(name=name, directory=Path(tempfile.mkdtemp(prefix=f"slurm-{name}-")), cloud=cloud,
                       head_flavor=head_flavor, flavor=flavor, image=image, max_nodes=max_nodes,
                       suspend_time=suspend_time, suspend_timeout=suspend_timeout, resume_timeout=resume_timeout)
    logger.info("plan: head %s + up to %d x %s for at most %.1f h: worst case %.2f SU",
                head_flavor, max_nodes, flavor, max_hours, worst_case)
    results = Path(results_dir) / owner.run_id
    lease = Lease(provider, owner, on_event=resource_event_emitter(owner, provider.name))
    try:
        with lease, watching_budget(lease, budget_su, allocation=held_allocation, interval=budget_check_seconds):
            cluster = start_slurm_cluster(lease, plan)
            jobs = submit_scripts(cluster, paths)
            finished = wait_for_jobs(cluster, list(jobs), timeout=max_hours * 3600)
            results.mkdir(parents=True, exist_ok=True)
            collected = []
            by_id = {j.job_id: j for j in finished}
            for (job_id, output), script in zip(jobs.items(), paths, strict=True):
                target = results / output.name
                if output.exists():
                    shutil.copyfile(output, target)
                j = by_id[job_id]
                collected.append(SlurmJobResult(script=str(script), job_id=job_id, state=j.state,
                                                restarts=j.restarts, output=str(target)))
            node_costs = cluster.node_costs()
            progress.report("teardown", 0, 1, "deleting the head node and every worker")
    finally:
        metered = report_run(provider, pipeline, lease.proof, worst_case) if lease.proof is not None else []
        shutil.rmtree(plan.directory, ignore_errors=True)
    proof = lease.proof
    progress.report("teardown", 1, 1, "clean" if proof.clean else "INCOMPLETE")
    for m in node_costs:
        logger.info("node %s (%s): %.0f s active, %.4f SU", m.name, m.flavor, m.hours_active * 3600, m.su)
    if not proof.clean:
        raise RuntimeError(proof.summary())
    return SlurmClusterResult(
        run_id=owner.run_id, cloud=provider.name, jobs=collected, resources=proof.deleted,
        metered=metered or node_costs, su_estimated=worst_case, su_spent=sum(m.su for m in (metered or node_costs)),
        teardown_clean=proof.clean, teardown_remaining=proof.remaining)
