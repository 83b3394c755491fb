"""The watch a :class:`~slipstream.dask_cluster.CloudDaskCluster` keeps over its worker VMs while
it runs, whether it is sized by ``adapt()`` or by ``scale()`` alone:

- the **health check** (every ``cloud_check_seconds``, one list call): a worker whose VM is in
  ERROR, was deleted behind the cluster's back, stopped by itself (SHUTOFF still costs 50 %), or
  is up without its worker joining long after its boot deadline (counted from when it was last
  asked for: created or unparked) is dropped and its VM deleted, as
  :data:`~slipstream.scaling.pool.WORKER_TABLE` says; under ``scale()`` a replacement is asked
  for (``adapt()``'s policy replaces it by itself). Workers parked longer than the idle
  policy's ``max_parked_seconds`` are deleted.
  A VM deleted as broken (ERROR, or up and never joined) counts towards
  :data:`~slipstream.dask_workers.MAX_BROKEN_IN_A_ROW`, after which no VM is created any more.
- the **give-up**: when no worker VM could be created for ``give_up_seconds`` since the pool
  last had a worker (every create
  refused: a quota of 0, no capacity for the flavour), or too many workers in a row were broken,
  and no worker is up or booting, the tasks waiting for a worker fail with
  :class:`~slipstream.dask_workers.NoWorkerVMs`, which carries the cloud's words, instead of
  waiting (and, for broken workers, billing a boot after boot) for ever.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from typing import TYPE_CHECKING

from slipstream.dask_workers import NoWorkerVMs
from slipstream.scaling.pool import WORKER_TABLE, Link, VmState, WorkerAction, WorkerObservation, vm_state

if TYPE_CHECKING:
    from slipstream.dask_cluster import CloudDaskCluster

log = logging.getLogger("slipstream.dask")

#: How often the watch wakes; the cloud is asked only every ``cloud_check_seconds``.
TICK_SECONDS = 0.2


async def watch(cluster: CloudDaskCluster) -> None:
    """Run until the cluster closes; a failed round is logged and the next one tried."""
    last_check = -float("inf")
    while not cluster.vms.closing:
        try:
            if cluster.scheduler.workers or _booting(cluster):
                cluster.vms.had_worker_at = time.monotonic()
            fail_tasks_nobody_can_run(cluster)
            if time.monotonic() - last_check >= cluster.cloud_check_seconds:
                last_check = time.monotonic()
                await check_vms(cluster)
        except Exception as err:  # noqa: BLE001 - a 5xx burst must not end the watch for the rest of the run
            log.warning("worker VM check failed this round: %s", err)
        await asyncio.sleep(TICK_SECONDS)


async def check_vms(cluster: CloudDaskCluster) -> None:
    """The health check of the module docstring: one list call, then the table's actions."""
    vms, pool = cluster.vms, cluster.vms.pool
    seen = await asyncio.to_thread(pool.observe_all)
    if vms.closing:
        return
    now = time.monotonic()
    joined = {ws.name for ws in cluster.scheduler.workers.values()}
    parked = set(pool.parked())
    late_after = vms.boot_timeout + cluster.config.boot_seconds
    dropped = []
    for name in [n for n in list(pool.servers) if n in cluster.worker_spec or n in parked]:
        since = vms.requested_at.get(name, now)
        link = Link.JOINED if name in joined else Link.LATE if now - since > late_after else Link.NOT_YET
        state = vm_state(seen.get(name), parked=name in parked)
        if state == VmState.STOPPED and name in vms.unparking and link == Link.NOT_YET:
            state = VmState.BOOTING  # still SHELVED/SHUTOFF just after the unpark call: give it its deadline
        action = WORKER_TABLE.action_for(WorkerObservation(name, state, link))
        if action in (WorkerAction.DELETE, WorkerAction.FORGET):
            log.warning("worker %s: %s, %s -> %s", name, state, link, action)
            cluster.repairs.append((name, action))
            if state == VmState.FAILED or link == Link.LATE:  # noted first: adapt() runs while we delete
                vms.note_broken(name, "its VM went to ERROR" if state == VmState.FAILED else
                                f"its VM was up but its Dask worker had not joined {late_after:.0f} s after it was "
                                "asked for (see the VM's console log: image, install, network to the scheduler)")
            if cluster.worker_spec.pop(name, None) is not None:
                dropped.append(name)
            await asyncio.to_thread(pool.delete, name)
    for name in await asyncio.to_thread(pool.expire_parked):
        log.info("deleted %s: parked longer than %.0f s", name, pool.idle.max_parked_seconds)
    if dropped and not cluster._adaptive_is_running() and not vms.closing and not vms.gave_up:
        cluster.worker_spec.update(cluster._new_specs(len(dropped)))  # scale() asked for that many
    if cluster.repairs:
        cluster.loop.add_callback(cluster._correct_state)  # closes the dropped workers, starts replacements


def _booting(cluster: CloudDaskCluster) -> bool:
    parked = set(cluster.vms.pool.parked())
    return any(n not in parked for n in list(cluster.vms.pool.servers))


def fail_tasks_nobody_can_run(cluster: CloudDaskCluster) -> None:
    """The give-up of the module docstring (no cloud call: cheap to run every tick)."""
    vms, s = cluster.vms, cluster.scheduler
    since = vms.failing_since() if not vms.gave_up else vms.failures[-1].at
    if since is None or s.workers or _booting(cluster):
        return  # a worker is up, or a VM exists and may still join
    # Counted from when the pool last had a worker: refusals while our own workers held the
    # quota say nothing about whether one fits now that they are gone.
    since = max(since, vms.had_worker_at)
    if vms.failures[-1].at < since or (not vms.gave_up and time.monotonic() - since < vms.give_up_seconds):
        return
    waiting = [*s.queued, *s.unrunnable]
    if not waiting:
        return
    if vms.gave_up:
        error = NoWorkerVMs(
            f"no Dask worker could be started: {vms.broken_in_a_row} worker VMs in a row were broken, "
            f"the last one said: {vms.failures[-1].error.rstrip('.')}. Fix the image or worker_packages and run again")
    else:
        error = NoWorkerVMs(
            f"no Dask worker VM could be created for {time.monotonic() - since:.0f} s "
            f"({len(vms.failures)} attempts); the cloud said: {vms.failures[-1].error.rstrip('.')}. Free quota or capacity in "
            "the project (or choose a smaller flavour, or fewer workers) and run again; "
            "CloudDaskCluster(give_up_seconds=...) sets how long to keep trying")
    log.error("failing %d waiting task(s): %s", len(waiting), error)
    stimulus = f"slipstream-no-worker-vms-{time.time()}"
    recommendations: dict = {}
    for ts in waiting:
        if ts.state in ("queued", "no-worker"):
            recommendations.update(s.transition(ts.key, "erred", exception=pickle.dumps(error), cause=ts.key,
                                                stimulus_id=stimulus))
    s.transitions(recommendations, stimulus_id=stimulus)
