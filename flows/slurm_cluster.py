"""An elastic Slurm cluster for a batch of jobs: ``slurm_cluster``.

"Give me a Slurm cluster whose nodes exist only while my jobs run, run these batch scripts on it,
bring back their output, and delete everything." The flow stands up a head-node VM (slurmctld,
munge) with ``max_nodes`` cloud nodes (``State=CLOUD``): Slurm itself creates a node's VM when a
job needs it (``slipstream slurm resume``) and deletes it after ``suspend_time`` idle seconds
(``slipstream slurm suspend``). The flow submits the scripts with ``sbatch``, waits for them
(with a deadline, reporting the jobs and the nodes as they change and sweeping orphans), copies
each job's output and ``outputs`` into ``results_dir/<run id>/<job>/`` as soon as the job ends,
keeps the cluster's logs there, and tears the whole cluster down with a teardown proof and each
node's SUs. A job that ends in another state than COMPLETED fails the run (unless
``fail_on_job_failure=False``); one that can never start fails it at once::

    from slipstream.flows.slurm_cluster import slurm_cluster
    slurm_cluster(scripts=["align.sh", "count.sh"], max_nodes=2, suspend_time=60)

Every VM — head and workers — is owned by the flow run, so the lease (and, after a crash, the
reaper) deletes all of them. On the local cloud the Slurm commands reach slurmctld through the
cluster's ``SLURM_CONF`` on this machine; real clouds would need SSH to the head node (not yet).
"""

# No `from __future__ import annotations`: flow.serve() pickles the flow by value (see vm_job).
import shutil
import tempfile
import threading
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from slipstream.blocks import load_cloud
from slipstream.flows.vm_job import FlavorName
from slipstream import progress
from slipstream.cost.accounting import MeteredServer, estimate
from slipstream.cloud.errors import CloudError, InvalidRequest
from slipstream.cloud.models import Ownership
from slipstream.ownership.lease import HeldResource, Lease, lease_for_walltime
from slipstream.slurm.cluster import ClusterPlan, ElasticCluster, slurm_cluster_plan, start_cluster
from slipstream.slurm.commands import JobInfo
from slipstream.slurm.jobs import (BatchJob, JobsFailed, check_outputs, collect_outputs, describe_end, submit_batch,
                                   tail)
from slipstream.slurm.power import SlurmPower
from slipstream.slurm.watch import NodeWatch
from slipstream.tasks import CLOUD_TASK_OPTIONS
from slipstream.tasks.budget import guard_budget, watching_budget
from slipstream.tasks.events import resource_event_emitter
from slipstream.tasks.hooks import TEARDOWN_HOOKS
from slipstream.tasks.report import report_run


#: Job states worth a line every 10 s, and what the job waits for.
WAITING_STATES = {
    "PENDING": " (waiting for a node)",
    "CONFIGURING": " (its node is booting, or up and waiting for slurmctld 22.05, which starts jobs on "
                   "freshly booted nodes at its 30-s check)",
}


class SlurmJobResult(BaseModel):
    script: str
    job_id: str
    state: str
    exit_code: int | None
    signal: int | None          # the signal that ended the job, if one did
    restarts: int
    output: str                # the job's Slurm output (stdout + stderr) in the results
    outputs: list[str]         # every file brought back, the Slurm output first
    missing_outputs: list[str]  # the requested outputs the job did not leave


class SlurmClusterResult(BaseModel):
    run_id: str
    cloud: str
    results_dir: str
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
def submit_scripts(cluster: ElasticCluster, scripts: list[Path]) -> list[BatchJob]:
    """sbatch each script, each in a directory of its own on the cluster's shared disk."""
    jobs = submit_batch(cluster.slurm, scripts, cluster.settings.dir / "jobs")
    for job in jobs:
        get_run_logger().info("submitted %s as job %s", job.script.name, job.job_id)
    return jobs


@task(name="wait-for-slurm-jobs", cache_policy=CLOUD_TASK_OPTIONS["cache_policy"])
def wait_for_jobs(cluster: ElasticCluster, jobs: list[BatchJob], outputs: list[str], results: Path,
                  timeout: float, sweep_every: float = 15.0,
                  stop: threading.Event | None = None) -> dict[str, SlurmJobResult]:
    """Wait for every job (deadline ``timeout``, or until ``stop`` is set), bringing back each
    job's outputs as it ends, reporting the jobs and the nodes as they change, and sweeping orphans."""
    logger = get_run_logger()
    power = SlurmPower(cluster.settings, cluster.lease.cloud)
    by_id = {j.job_id: j for j in jobs}
    ended: dict[str, SlurmJobResult] = {}
    last: dict[str, str] = {}
    nodes = NodeWatch(cluster.settings.node_names)
    next_sweep = [0.0]

    since: dict[str, float] = {}

    def show(seen: list[JobInfo]) -> None:
        progress.report("jobs", len(ended), len(seen), ", ".join(f"{j.job_id} {j.state}" for j in seen))
        now = time.monotonic()
        for j in seen:
            if j.job_id in ended:
                continue
            where = f" on {j.nodes}" if j.nodes else ""
            if last.get(j.job_id) != j.state:
                logger.info("job %s: %s%s", j.job_id, j.state, where)
                last[j.job_id], since[j.job_id] = j.state, now
            elif j.state in WAITING_STATES and now - since[j.job_id] >= 10:  # never silent while nodes boot
                since[j.job_id] = now
                logger.info("job %s: still %s%s%s", j.job_id, j.state, where, WAITING_STATES[j.state])

    def collect(info: JobInfo) -> None:
        job = by_id[info.job_id]
        copied, missing = collect_outputs(job, outputs, results / job.label)
        ended[info.job_id] = SlurmJobResult(
            script=str(job.script), job_id=job.job_id, state=info.state, exit_code=info.exit_code, signal=info.signal,
            restarts=info.restarts, output=str(results / job.label / job.output.name),
            outputs=[str(c) for c in copied], missing_outputs=missing)
        where = f"{results / job.label}/"
        logger.info("job %s %s: %s, restarts %d%s; output in %s", job.job_id, job.script.name, describe_end(info),
                    info.restarts, f" on {info.nodes}" if info.nodes else "", where)
        if missing:
            logger.warning("job %s %s did not leave %s", job.job_id, job.script.name, ", ".join(missing))

    def watch_nodes(seen: dict) -> None:
        for level, line in nodes.see(seen):
            logger.log(level, line)

    def sweep() -> None:
        if time.monotonic() >= next_sweep[0]:
            next_sweep[0] = time.monotonic() + sweep_every
            for name, action in power.sweep().actions:
                logger.warning("sweep: %s: %s", name, action)

    cluster.wait_for_jobs(list(by_id), timeout=timeout, on_progress=show, on_end=collect, on_nodes=watch_nodes,
                          every=sweep, stop=stop)
    return ended


def stop_unfinished_jobs(cluster: ElasticCluster, jobs: list[BatchJob], outputs: list[str], results: Path,
                         cancel: bool = True) -> None:
    """The run is failing (deadline, an impossible job, a budget, Ctrl-C): cancel the jobs (unless
    the cluster is already being deleted), then bring back what the unfinished ones wrote so far,
    before the lease deletes the cluster."""
    logger = get_run_logger()
    try:
        if cancel:
            cluster.cancel_all()
    except CloudError as err:  # slurmctld may be gone with its VM: keep the outputs anyway
        logger.warning("could not cancel the cluster's jobs: %s", err)
    for job in jobs:
        if not (results / job.label).exists():  # ended jobs were collected as they ended
            copied, _ = collect_outputs(job, outputs, results / job.label)
            if copied:
                logger.warning("job %s %s did not end; what it wrote so far is in %s/", job.job_id,
                               job.script.name, results / job.label)


def raise_for_failed_jobs(collected: list[SlurmJobResult], run_id: str) -> None:
    failed = [j for j in collected if j.state != "COMPLETED"]
    if failed:
        raise JobsFailed("; ".join(
            f"job {j.job_id} {Path(j.script).name} ended {j.state}"
            + (f" by signal {j.signal}" if j.signal else f" with exit code {j.exit_code}" if j.exit_code is not None
               else "")
            + f"; last lines of its output ({j.output}):\n{tail(Path(j.output))}" for j in failed),
            resource=f"run {run_id}",
            hint="Fix the script (its output and outputs are in the results), or pass "
                 "fail_on_job_failure=False to return the job states instead of failing.")


def keep_cluster_logs(directory: Path, results: Path, failed: BaseException | None) -> Path | None:
    """Copy the power programs' log and the Slurm daemons' logs into ``results/cluster-logs``
    (the cluster's directory is deleted next); on failure also publish their tails as an artifact."""
    logs = [directory / "power.log", *sorted((directory / "log").glob("*.log"))]
    logs = [p for p in logs if p.is_file()]
    if not logs:
        return None
    kept = results / "cluster-logs"
    kept.mkdir(parents=True, exist_ok=True)
    for path in logs:
        shutil.copyfile(path, kept / path.name)
    if failed is not None:
        sections = "".join(f"\n### {p.name}\n\n```\n{tail(p, 40)}\n```\n" for p in logs)
        try:
            create_markdown_artifact(key="slurm-cluster-logs", description="the cluster's logs when the run failed",
                                     markdown=f"## Slurm cluster logs (run failed: {failed})\n\n"
                                              f"Whole files kept in `{kept}`.\n{sections}")
        except Exception as err:  # the logs are on disk: an unreachable API must not hide the run's error
            get_run_logger().warning("could not publish the cluster logs as an artifact: %s", err)
    return kept


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
    outputs: list[str] | None = None,
    fail_on_job_failure: bool = True,
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
        outputs: Files or directories each job leaves in its working directory to bring back
            (paths relative to it, kept as given); a missing one is named, the rest still come back.
        fail_on_job_failure: Fail the run when a job ends in another state than COMPLETED (its
            exit code and the tail of its output in the error); False returns the states instead.
        results_dir: Where ``<run id>/<job>/`` with each job's Slurm output and ``outputs`` go,
            and ``<run id>/cluster-logs/`` with the power programs' and Slurm daemons' logs.
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
    wanted_outputs = check_outputs(outputs or [])
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
    failure: BaseException | None = None
    budget_spent = threading.Event()  # set by the watchdog just before it deletes the whole cluster
    try:
        with lease, watching_budget(lease, budget_su, allocation=held_allocation, interval=budget_check_seconds,
                                    stop_work=budget_spent.set):
            cluster = start_slurm_cluster(lease, plan)
            jobs = submit_scripts(cluster, paths)
            try:
                ended = wait_for_jobs(cluster, jobs, wanted_outputs, results, timeout=max_hours * 3600,
                                      stop=budget_spent)
            except BaseException:
                stop_unfinished_jobs(cluster, jobs, wanted_outputs, results, cancel=not budget_spent.is_set())
                raise
            collected = [ended[j.job_id] for j in jobs]
            if fail_on_job_failure:
                raise_for_failed_jobs(collected, owner.run_id)  # the lease still tears everything down
            node_costs = cluster.node_costs()
            progress.report("teardown", 0, 1, "deleting the head node and every worker")
    except BaseException as err:
        failure = err
        raise
    finally:
        metered = report_run(provider, pipeline, lease.proof, worst_case) if lease.proof is not None else []
        kept = keep_cluster_logs(plan.directory, results, failure)
        if failure is not None and kept:
            logger.error("the cluster's logs (power programs, slurmctld, slurmd) are kept in %s", kept)
        shutil.rmtree(plan.directory, ignore_errors=True)
    proof = lease.proof
    progress.report("teardown", 1, 1, "clean" if proof.clean else "INCOMPLETE")
    for m in node_costs:
        logger.info("node %s (%s): %.0f s active, %.4f SU", m.name, m.flavor, m.hours_active * 3600, m.su)
    if not proof.clean:
        raise RuntimeError(proof.summary())
    spent = metered or node_costs
    logger.info("SU spent %.4f of a worst case %.2f; teardown clean: %s", sum(m.su for m in spent), worst_case,
                proof.clean)
    return SlurmClusterResult(
        run_id=owner.run_id, cloud=provider.name, results_dir=str(results), jobs=collected, resources=proof.deleted,
        metered=spent, su_estimated=worst_case, su_spent=sum(m.su for m in spent),
        teardown_clean=proof.clean, teardown_remaining=proof.remaining)
