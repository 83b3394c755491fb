"""Crunch an array on Dask workers that appear with the work and vanish after it: ``dask_pipeline``.

"Generate a big random array, give me its mean and standard deviation, use as many workers as
the work needs, and don't leave any of them charging my allocation." The flow runs a dask.array
reduction on a :class:`~slipstream.dask_cluster.CloudDaskCluster` made by
:class:`~slipstream.tasks.dask_runner.CloudDaskTaskRunner`: the cluster starts with no worker,
slipstream's scaling policy launches VMs in batches when the chunks queue up, releases them after
the cooldown, and closing the cluster deletes every VM. While it runs, a progress line says how
many workers boot and have joined and how many tasks are done. The result carries the numbers,
the workers that existed, the SUs they were metered at and the teardown proof.

The workers run plain Dask tasks only (the array's chunks): the Prefect task that submits them
runs in the flow's process, so no Prefect setting, key or flow object reaches a worker, and
worker images need Dask and NumPy, not Prefect or slipstream.

From Python::

    from slipstream.flows.dask_pipeline import dask_pipeline
    r = dask_pipeline(rows=40_000, cols=2_000, max_workers=4)
    print(r.mean, r.std, r.su_spent, r.teardown_clean)

On Jetstream2: ``cloud="<block-type>/<name>"``, ``image="Featured-Ubuntu24"`` and a
``scheduler_host`` the VMs reach (see :mod:`slipstream.dask_cluster`).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Literal

import dask.array as da
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from pydantic import BaseModel

from slipstream.blocks import load_cloud
from slipstream import jetstream2
from slipstream.cost.accounting import MeteredServer, estimate
from slipstream.cloud.models import Ownership
from slipstream.ownership.lease import lease_for_walltime, teardown_run
from slipstream.ownership.ledger import Ledger
from slipstream.periodic import Periodic
from slipstream.scaling.policy import elastic_pool_plan
from slipstream.tasks.budget import guard_budget, resolve_allocation, watching_budget
from slipstream.tasks.dask_runner import CloudDaskTaskRunner
from slipstream.tasks.events import resource_event_emitter
from slipstream.tasks.hooks import TEARDOWN_HOOKS
from slipstream.tasks.report import report_run

class ArrayStatistics(BaseModel):
    mean: float
    std: float
    elements: int
    chunks: int
    workers_held_at_end: int | None = None  # by the cluster when the work (and drain) ended


class DaskPipelineResult(BaseModel):
    run_id: str
    cloud: str
    mean: float
    std: float
    elements: int
    chunks: int
    flavor: str
    workers_launched: list[str]
    peak_workers: int
    workers_held_at_end: int | None
    su_estimated: float
    su_spent: float
    metered: list[MeteredServer]
    teardown_clean: bool
    teardown_remaining: dict[str, list[str]]


@task(name="array-moments", cache_policy=NONE)
def array_moments(rows: int, cols: int, chunk_rows: int, seed: int) -> ArrayStatistics:
    """Mean and standard deviation of a seeded normal array, computed chunk by chunk on the
    cluster's workers (as plain Dask tasks: this task itself runs in the flow's process)."""
    client = _runner().client
    x = da.random.default_rng(seed).standard_normal((rows, cols), chunks=(chunk_rows, cols))
    mean, std = client.compute([x.mean(), x.std()], sync=True)
    return ArrayStatistics(mean=float(mean), std=float(std), elements=rows * cols, chunks=len(x.chunks[0]))


def _runner() -> CloudDaskTaskRunner:
    """This subflow's task runner (it made the cluster in this process)."""
    return FlowRunContext.get().task_runner


class Progress:
    """Workers booting / joined / parked and tasks done, as the in-process scheduler sees them.
    Task groups the scheduler has forgotten (their results delivered) count as done."""

    DONE = ("memory", "released", "forgotten", "erred")

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.groups: dict[str, tuple[int, int]] = {}  # task group -> (done, total)

    def line(self) -> str:
        s, cluster = self.cluster.scheduler, self.cluster
        current = {name: (sum(group.states.get(k, 0) for k in self.DONE), sum(group.states.values()))
                   for name, group in list(s.task_groups.items())}
        for name, (_, total) in self.groups.items():
            if name not in current:
                current[name] = (total, total)
        self.groups = current
        joined = {ws.name for ws in s.workers.values()}
        booting = len([n for n in cluster.worker_spec if n not in joined])
        line = (f"progress: {sum(d for d, _ in current.values())}/{sum(t for _, t in current.values())} tasks done; "
                f"workers: {len(joined)} joined, {booting} booting, {len(cluster.vms.pool.parked())} parked; "
                f"{len(cluster.launched)} VMs created so far")
        return line + (f"; not launching: {cluster.scaling_error}" if cluster.scaling_error else "")


@flow(name="dask-array-statistics")
def array_statistics(rows: int, cols: int, chunk_rows: int, seed: int, drain_seconds: float = 0.0,
                     budget_su: float | None = None, allocation: str | None = None,
                     budget_check_seconds: float = 60.0, progress_seconds: float = 15.0) -> ArrayStatistics:
    """The computation, on whatever task runner the caller gives it, watched against the budget:
    when it is spent the cluster is closed (so adapt cannot relaunch) and its VMs are deleted."""
    logger = get_run_logger()
    cluster = _runner().client.cluster
    progress = Progress(cluster)
    reporting = Periodic("dask-progress", lambda: logger.info(progress.line()), progress_seconds,
                        on_error=lambda err: logger.debug("no progress line this round: %s", err))
    with watching_budget(cluster.lease, budget_su, allocation=resolve_allocation(allocation),
                         interval=budget_check_seconds, stop_work=cluster.close):
        reporting.start()
        try:
            stats = array_moments(rows, cols, chunk_rows, seed)
        finally:
            reporting.stop()
        logger.info(progress.line())
        deadline = time.monotonic() + drain_seconds
        # drain_seconds > 0 shows the whole elastic cycle: the policy releases the idle workers.
        while cluster.worker_spec and time.monotonic() < deadline:
            time.sleep(0.2)
    return stats.model_copy(update={"workers_held_at_end": len(cluster.worker_spec)})


@flow(name="dask-pipeline", log_prints=True, **TEARDOWN_HOOKS)
def dask_pipeline(
    rows: int = 40_000,
    cols: int = 1_000,
    chunk_rows: int = 1_000,
    seed: int = 42,
    max_workers: int = 4,
    flavor: str = "m3.small",
    cores_per_task: int = 1,
    batch_size: int = 2,
    cooldown_seconds: float = 60.0,
    boot_seconds: float = 180.0,
    idle_action: Literal["delete", "shelve"] = "delete",
    cloud: str = "local",
    image: str = jetstream2.DEFAULT_IMAGE,
    scheduler_host: str = "127.0.0.1",
    max_hours: float = 1.0,
    drain_seconds: float = 0.0,
    pipeline: str = "dask-pipeline",
    budget_su: float | None = None,
    allocation: str | None = None,
    override_budget: bool = False,
    budget_check_seconds: float = 60.0,
    progress_seconds: float = 15.0,
    give_up_seconds: float = 600.0,
) -> DaskPipelineResult:
    """Mean and standard deviation of a ``rows`` × ``cols`` normal array on elastic Dask workers.

    Args:
        rows, cols, chunk_rows, seed: the array (one Dask task per ``chunk_rows`` rows).
        max_workers: most worker VMs at once; the pool starts (and ends) at 0.
        flavor: worker flavour (the policy checks one task fits; m3.small = 2 slots of 1 core).
        cores_per_task: cores one chunk task needs.
        batch_size: most VMs created in one API call.
        cooldown_seconds: how long a worker idles before it is released.
        boot_seconds: expected boot + install time (a worker is kept when work returns sooner).
        idle_action: a worker released while more work is expected within the hour is deleted
            ("delete"), or shelved ("shelve": 0 SU on Jetstream2; it keeps its installed Dask and
            rejoins when the next burst unshelves it).
        cloud: "local" or a saved cloud block ("<block-type>/<name>").
        image: worker image (Featured images get Dask installed by user_data).
        scheduler_host: where the scheduler listens; on Jetstream2 an address the VMs reach.
        max_hours: longest plausible run; sets the lease and the SU worst case.
        drain_seconds: wait up to this long after the work for the pool to shrink by itself
            before closing (0: close at once, the cheapest; the teardown deletes the workers).
        pipeline: the pipeline name stamped on every VM.
        budget_su: most SUs the run may spend (default: the allocation's run budget, if any).
        allocation: a saved allocation block (its balances and run budget).
        override_budget: run even if the worst case is over the budget or the balance.
        budget_check_seconds: how often the budget watchdog meters the workers.
        progress_seconds: how often a progress line (workers booting/joined, tasks done) is logged.
        give_up_seconds: when no worker VM could be created for this long (a quota of 0, no
            capacity) the run fails with the cloud's words instead of waiting (and tears down).
    """
    logger = get_run_logger()
    provider = load_cloud(cloud)
    (plan,) = elastic_pool_plan(max_workers, flavor, cores_per_task, max_hours)
    worst_case = estimate([plan])
    logger.info("plan: up to %d x %s on %s for at most %.1f h: worst case %.2f SU",
                max_workers, plan.flavor.name, provider.name, max_hours, worst_case)
    budget_su, _ = guard_budget([plan], budget_su, allocation, override_budget)
    run_id = str(flow_run.get_id() or "") or None
    lease_time = lease_for_walltime(max_hours)
    owner = Ownership.new(pipeline, run_id=run_id, lease=lease_time)
    scaling = {"max_workers": max_workers, "flavor": flavor, "batch_size": batch_size,
               "cooldown_seconds": cooldown_seconds, "boot_seconds": boot_seconds,
               "task": {"cores": cores_per_task}, "idle": {"action": idle_action}}
    runner = CloudDaskTaskRunner(
        cluster_kwargs={"cloud": provider, "run_id": owner.run_id, "pipeline": pipeline, "image": image,
                        "scaling": scaling, "scheduler_host": scheduler_host, "lease_hours": lease_time / timedelta(hours=1),
                        "give_up_seconds": give_up_seconds, "on_event": resource_event_emitter(owner, provider.name)},
        adapt_kwargs={"minimum": 0, "maximum": max_workers, "interval": "0.5s"},
    )
    try:
        stats = array_statistics.with_options(task_runner=runner)(
            rows, cols, chunk_rows, seed, drain_seconds, budget_su, allocation, budget_check_seconds, progress_seconds)
    finally:
        # The cluster deleted its workers when it closed; this lists by run id again, as the proof.
        proof = teardown_run(provider, owner.run_id)
        metered = report_run(provider, pipeline, proof, worst_case)
    workers, peak = _worker_history(owner.run_id)
    logger.info("mean %.6f, std %.6f over %d elements; %d worker VMs (peak %d), %.4f SU; %s",
                stats.mean, stats.std, stats.elements, len(workers), peak, sum(m.su for m in metered), proof.summary())
    if not proof.clean:
        raise RuntimeError(proof.summary())
    return DaskPipelineResult(
        run_id=owner.run_id, cloud=provider.name, mean=stats.mean, std=stats.std, elements=stats.elements,
        chunks=stats.chunks, flavor=plan.flavor.name, workers_launched=workers, peak_workers=peak,
        workers_held_at_end=stats.workers_held_at_end,
        su_estimated=worst_case, su_spent=sum(m.su for m in metered), metered=metered,
        teardown_clean=proof.clean, teardown_remaining=proof.remaining)


def _worker_history(run_id: str) -> tuple[list[str], int]:
    """The run's worker VMs from the ledger, and the most that existed at once."""
    servers = [e for e in Ledger().entries(run_id) if e.kind == "server" and e.resource_id]
    edges = sorted([(e.recorded_at, 1) for e in servers] + [(e.deleted_at, -1) for e in servers if e.deleted_at])
    peak = now = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return [e.name for e in servers], peak
