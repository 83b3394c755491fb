"""A Dask cluster whose workers are cloud VMs, scaled by slipstream's policy and always torn down.

:class:`CloudDaskCluster` is a ``distributed`` :class:`~distributed.deploy.SpecCluster`: the
scheduler runs in your process; each worker is one VM (Jetstream2 flavour, created through a
:class:`~slipstream.ownership.lease.Lease`, so it carries ownership and the reaper can find it), started by
user_data that runs ``dask worker <scheduler> --host <the VM's address> --name <the VM's name>``.
New VMs are created in batches (one API call each); ``adapt()`` uses
:class:`~slipstream.scaling.policy.ScalingPolicy` — the same rules as the Slurm adapter: scale up
in batches on backlog without double-launching while VMs boot, scale down idle workers after a
cooldown, keep one warm when work is expected back sooner than a boot, and park (shelve, 0 SU)
instead of deleting where the idle policy says so. Closing the cluster deletes every VM and keeps
a teardown proof in :attr:`CloudDaskCluster.teardown_proof`::

    from slipstream.cloud.local import LocalCloud
    with CloudDaskCluster(LocalCloud(), scaling={"max_workers": 4, "task": {"cores": 1}}) as cluster:
        cluster.adapt(minimum=0, maximum=4)
        with distributed.Client(cluster) as client:
            print(da.random.random((20_000, 2_000), chunks=(1_000, 2_000)).mean().compute())
    print(cluster.teardown_proof.summary())

With Prefect::

    DaskTaskRunner(cluster_class="slipstream.dask_cluster.CloudDaskCluster",
                   cluster_kwargs={"cloud": provider, "scaling": {"max_workers": 4}},
                   adapt_kwargs={"minimum": 0, "maximum": 4})

Where the scheduler listens: ``scheduler_host`` (default ``127.0.0.1``, right for the LocalCloud,
whose VMs are processes on 127.64.x.y). On Jetstream2 give an address the VMs reach — the flow
host's private address on the same network, or ``0.0.0.0`` with ``contact_address`` set to it.
The scheduler port is plain TCP without TLS: keep it inside the project's network (security
group), never on a public address.

Worker images: the user_data installs Dask into ``/opt/slipstream-dask`` when ``dask`` is not on
PATH (Jetstream2's Featured images have python3 but not Dask), pinned to this process's versions
so the worker matches the scheduler (``worker_packages`` adds more, e.g. prefect and prefect-dask
for Prefect tasks, and the package your tasks live in). The LocalCloud skips the install: its
"image" has this process's venv, Dask included, on PATH.
A parked (shelved) worker is woken by unshelve and rejoins by itself: the user_data leaves a
cloud-init per-boot script that starts ``dask worker`` again at every boot (the LocalCloud runs
per-boot scripts too).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
import shlex
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

import dask
import distributed
import numpy
from distributed.core import Status
from distributed.deploy.adaptive import Adaptive
from distributed.deploy.spec import NoOpAwaitable, ProcessInterface, SpecCluster
from distributed.scheduler import Scheduler

from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.models import Ownership
from slipstream.cloud.port import CloudProvider
from slipstream.jetstream2 import DEFAULT_IMAGE
from slipstream.ownership.lease import EventCallback, Lease, TeardownProof
from slipstream.scaling.idle import IdlePolicy
from slipstream.scaling.policy import (
    ArrivalForecast,
    PoolState,
    ScalingConfig,
    ScalingDecision,
    ScalingPolicy,
    TaskNeeds,
    WorkerPhase,
    WorkerView,
)
from slipstream.scaling.pool import WORKER_TABLE, Batch, Link, WorkerAction, WorkerObservation, WorkerPool, vm_state

log = logging.getLogger("slipstream.dask")

DEFAULT_WORKER_PACKAGES: tuple[str, ...] = (
    f"dask[array]=={dask.__version__}", f"distributed=={distributed.__version__}", f"numpy=={numpy.__version__}")


def worker_user_data(scheduler_address: str, *, nthreads: int, packages: tuple[str, ...] = DEFAULT_WORKER_PACKAGES,
                     death_timeout: float = 60.0) -> str:
    """The ``#!`` user_data that turns a fresh VM into a Dask worker of ``scheduler_address``."""
    pkgs = " ".join(shlex.quote(p) for p in packages)
    sched = shlex.quote(scheduler_address)
    return f"""#!/bin/sh
# slipstream Dask worker: joins {scheduler_address} as this VM, on this VM's own address.
set -eu
name="${{SLIPSTREAM_VM_NAME:-}}"
addr="${{SLIPSTREAM_VM_ADDRESS:-}}"
if [ -z "$name" ]; then  # a real VM: its name from the metadata service, its first address
  name=$(curl -fsS http://169.254.169.254/openstack/latest/meta_data.json |
         python3 -c 'import json, sys; print(json.load(sys.stdin)["name"])')
  addr=$(hostname -I | cut -d' ' -f1)
fi
if ! command -v dask >/dev/null 2>&1; then
  # Featured images have python3 but not Dask: install the scheduler's versions into a venv.
  if [ ! -x /opt/slipstream-dask/bin/dask ]; then
    python3 -m venv /opt/slipstream-dask || {{ apt-get update -q && apt-get install -y -q python3-venv &&
                                               python3 -m venv /opt/slipstream-dask; }}
    /opt/slipstream-dask/bin/pip install -q {pkgs}
  fi
  PATH=/opt/slipstream-dask/bin:$PATH
fi
# Rejoin after an unshelve or a reboot: cloud-init runs per-boot scripts at every boot (the
# local cloud too, under the VM's disk). The worker stays in the boot's process group.
disk="${{SLIPSTREAM_VM_DISK:-}}"
mkdir -p "$disk/var/lib/cloud/scripts/per-boot" "$disk/var/log"
printf "#!/bin/sh\\n'%s' >>'%s' 2>&1 &\\n" "$0" "$disk/var/log/slipstream-dask.log" \\
  > "$disk/var/lib/cloud/scripts/per-boot/slipstream-dask.sh"
chmod +x "$disk/var/lib/cloud/scripts/per-boot/slipstream-dask.sh"
exec dask worker {sched} --host "$addr" --name "$name" --nthreads {int(nthreads)} \\
  --no-nanny --no-dashboard --death-timeout {death_timeout:.0f}
"""


def _as_config(scaling: ScalingConfig | dict | None) -> ScalingConfig:
    """A ScalingConfig from itself, or from plain data (what cluster_kwargs and forms carry)."""
    if scaling is None or isinstance(scaling, ScalingConfig):
        return scaling or ScalingConfig()
    data = dict(scaling)
    if isinstance(data.get("task"), dict):
        data["task"] = TaskNeeds(**data["task"])
    if isinstance(data.get("idle"), dict):
        data["idle"] = IdlePolicy(**data["idle"])
    try:
        return ScalingConfig(**data)
    except TypeError as err:
        raise InvalidRequest(f"bad scaling settings: {err}", resource="CloudDaskCluster",
                             hint="See slipstream.scaling.policy.ScalingConfig for the fields.") from None


class WorkerVMs:
    """Between SpecCluster's event loop and the pool's blocking cloud calls: one batch, one call."""

    def __init__(self, pool: WorkerPool, *, nthreads: int, packages: tuple[str, ...], boot_timeout: float) -> None:
        self.pool = pool
        self.nthreads = nthreads
        self.packages = packages
        self.boot_timeout = boot_timeout
        self.batch_of: dict[str, Batch] = {}
        self.launching: dict[str, asyncio.Future] = {}
        self.scheduler_address: str | None = None
        self.closing = False
        self.next_work_in = lambda: None  # set by the adaptive's forecast

    def plan(self, count: int) -> Batch:
        batch = self.pool.next_batch(count)
        self.batch_of.update({n: batch for n in batch.names})
        return batch

    def _launch(self, batch: Batch) -> None:
        if self.pool.user_data is None:
            self.pool.user_data = worker_user_data(self.scheduler_address or "", nthreads=self.nthreads,
                                                   packages=self.packages)
        self.pool.launch(batch)
        self.pool.wait_active(batch.names, timeout=self.boot_timeout)

    async def ready(self, name: str) -> None:
        """Return once ``name``'s VM is ACTIVE (created with its batch, or unparked)."""
        if name in self.pool.parked():
            await asyncio.to_thread(self.pool.unpark, name)
            await asyncio.to_thread(self.pool.wait_active, [name], self.boot_timeout)
            return
        batch = self.batch_of[name]
        if batch.name not in self.launching:
            self.launching[batch.name] = asyncio.ensure_future(asyncio.to_thread(self._launch, batch))
        await asyncio.shield(self.launching[batch.name])

    async def let_go(self, name: str) -> None:
        if self.closing or name not in self.pool.servers:
            return  # closing: the lease deletes everything at once, with a proof
        await asyncio.to_thread(self.pool.release, name, self.next_work_in())


class CloudWorker(ProcessInterface):
    """One Dask worker: one cloud VM whose user_data runs ``dask worker``."""

    def __init__(self, scheduler: str, name: str, vms: WorkerVMs) -> None:
        super().__init__(scheduler=scheduler, name=name)
        self.name = name
        self.vms = vms

    async def start(self) -> None:
        try:
            await self.vms.ready(self.name)
        except BaseException:
            self.status = Status.failed
            raise
        await super().start()

    async def close(self) -> None:
        try:
            await self.vms.let_go(self.name)
        finally:
            await super().close()


class PolicyAdaptive(Adaptive):
    """``Adaptive`` driven by :class:`ScalingPolicy` instead of Dask's own target and wait count."""

    def __init__(self, cluster: CloudDaskCluster, policy: ScalingPolicy, cloud_check_seconds: float = 10.0,
                 **kwargs: Any) -> None:
        self.policy = policy
        self.forecast = ArrivalForecast()
        self.idle_since: dict[str, float] = {}
        self.first_seen: dict[str, float] = {}
        self.decision: ScalingDecision | None = None
        self.decisions: list[ScalingDecision] = []
        self.repairs: list[tuple[str, WorkerAction]] = []
        self.cloud_check_seconds = cloud_check_seconds
        self._last_check = -math.inf
        cluster.vms.next_work_in = lambda: self.forecast.next_work_in(time.monotonic())
        super().__init__(cluster, wait_count=1, **kwargs)

    async def adapt(self) -> None:
        await self.check_vms()
        await super().adapt()

    async def check_vms(self) -> None:
        """Every ``cloud_check_seconds``, look at the workers' VMs (one list call) and apply
        :data:`~slipstream.scaling.pool.WORKER_TABLE`: a VM in ERROR, deleted behind our back, or
        up without its worker joining long after the boot deadline is dropped (and deleted), so
        the policy can replace it."""
        now = time.monotonic()
        if now - self._last_check < self.cloud_check_seconds:
            return
        self._last_check = now
        pool, vms = self.cluster.vms.pool, self.cluster.vms
        seen = await asyncio.to_thread(pool.observe_all)
        joined = {ws.name for ws in self.cluster.scheduler.workers.values()}
        for name in [n for n in self.cluster.worker_spec if n in pool.servers]:
            since = self.first_seen.setdefault(name, now)
            link = (Link.JOINED if name in joined
                    else Link.LATE if now - since > vms.boot_timeout + self.policy.config.boot_seconds else Link.NOT_YET)
            action = WORKER_TABLE.action_for(WorkerObservation(name, vm_state(seen.get(name)), link))
            if action in (WorkerAction.DELETE, WorkerAction.FORGET):
                log.warning("worker %s: %s -> %s", name, f"{vm_state(seen.get(name))}, {link}", action)
                self.repairs.append((name, action))
                self.cluster.worker_spec.pop(name, None)
                self.first_seen.pop(name, None)
                await asyncio.to_thread(pool.delete, name)
        if self.repairs:
            self.cluster.loop.add_callback(self.cluster._correct_state)  # closes the dropped workers

    def observe(self) -> PoolState:
        """The pool as the in-process scheduler sees it (no cloud call)."""
        s = self.cluster.scheduler
        now = time.monotonic()
        joined = {ws.name: ws for ws in s.workers.values()}
        views = []
        for name in self.cluster.worker_spec:
            ws = joined.get(name)
            if ws is None:
                views.append(WorkerView(name, WorkerPhase.BOOTING))
            elif ws.processing:
                self.idle_since.pop(name, None)
                views.append(WorkerView(name, WorkerPhase.BUSY))
            else:
                views.append(WorkerView(name, WorkerPhase.IDLE, self.idle_since.setdefault(name, now)))
        views += [WorkerView(n, WorkerPhase.PARKED) for n in self.cluster.vms.pool.parked()]
        queued = len(s.queued) + len(s.unrunnable)
        running = sum(len(ws.processing) for ws in s.workers.values())
        self.forecast.observe(now, queued, running)
        return PoolState(now, queued, running, tuple(views), self.forecast.next_work_in(now),
                         self._queued_work_seconds(queued))

    def _queued_work_seconds(self, queued: int) -> float | None:
        """Task-seconds waiting, from the durations Dask measured for each task prefix; None
        while any sampled prefix has no measurement yet (then the boot-aware rule stays out)."""
        s = self.cluster.scheduler
        sample = list(itertools.islice(itertools.chain(s.queued, s.unrunnable), 100))
        durations = [ts.prefix.duration_average for ts in sample]
        if not durations or min(durations) <= 0:
            return None
        return sum(durations) * queued / len(durations)

    async def target(self) -> int:
        self.decision = self.policy.decide(self.observe())
        if self.decision.launch or self.decision.unpark or self.decision.release:
            self.decisions.append(self.decision)
            log.info("scaling: %s -> %d workers (%s)", self.decision.flavor, self.decision.target, self.decision.reason)
        return self.decision.target

    async def recommendations(self, target: int) -> dict:
        d = self.decision
        if d is not None and (d.launch or d.unpark):
            return {"status": "up", "n": len(self.cluster.worker_spec) + d.launch + len(d.unpark)}
        if d is not None and d.release:
            for name in d.release:
                self.idle_since.pop(name, None)
            return {"status": "down", "workers": list(d.release)}
        return {"status": "same"}


class CloudDaskCluster(SpecCluster):
    """Dask workers on cloud VMs (see the module docstring).

    Args:
        cloud: the provider (``slipstream.blocks.load_cloud("local")``, a ``LocalCloud``, an ``OpenStackCloud``).
        n_workers: workers to start with (default 0: let ``adapt`` or ``scale`` add them).
        scaling: a :class:`ScalingConfig` or its fields as a dict (flavour candidates, task needs,
            batch size, cooldown, boot time, idle policy); ``adapt(minimum, maximum)`` overrides
            the bounds.
        image: the VM image (default Jetstream2's Featured Ubuntu).
        pipeline / run_id / lease_hours: the ownership stamped on every VM (run_id defaults to a
            new id; a Prefect flow passes its flow-run id).
        scheduler_host / scheduler_port / contact_address: where the scheduler listens and the
            address the workers are told (see the module docstring).
        worker_packages: pip requirements installed on images without Dask.
        boot_timeout: seconds for a batch to become ACTIVE.
    """

    def __init__(self, cloud: CloudProvider, *, n_workers: int = 0, scaling: ScalingConfig | dict | None = None,
                 image: str = DEFAULT_IMAGE, pipeline: str = "dask", run_id: str | None = None,
                 lease_hours: float = 24.0, scheduler_host: str = "127.0.0.1", scheduler_port: int = 0,
                 contact_address: str | None = None, worker_packages: tuple[str, ...] | list[str] = (),
                 boot_timeout: float = 900.0, key_name: str | None = None, on_event: EventCallback | None = None,
                 asynchronous: bool = False, loop: Any = None, name: str | None = None) -> None:
        self.config = _as_config(scaling)
        images = {i.name for i in cloud.list_images()}
        if image not in images:
            raise InvalidRequest(f"image {image!r} is not on {cloud.name}", resource="CloudDaskCluster",
                                 hint=f"Images there: {', '.join(sorted(images))}.")
        self.flavor = self.config.chosen_flavor
        self.owner = Ownership.new(pipeline, run_id=run_id, lease=timedelta(hours=lease_hours))
        self.lease = Lease(cloud, self.owner, on_event=on_event)
        self.cloud = cloud
        self.teardown_proof: TeardownProof | None = None
        prefix = "dask-" + (re.sub(r"[^a-z0-9]", "", self.owner.run_id.lower())[:8] or "pool")
        pool = WorkerPool(self.lease, flavor=self.flavor, image=image, prefix=prefix, idle=self.config.idle,
                          key_name=key_name, metadata={"slipstream:role": "dask-worker"})
        self.vms = WorkerVMs(pool, nthreads=self.config.slots,
                             packages=(*DEFAULT_WORKER_PACKAGES, *worker_packages), boot_timeout=boot_timeout)
        # The scheduler's HTTP endpoints (health, metrics) listen on its host too, on a free port:
        # never Dask's default of every interface, nor a fixed 8787 another cluster may hold.
        scheduler = {"cls": Scheduler, "options": {"host": scheduler_host, "port": scheduler_port, "dashboard": False,
                                                   "dashboard_address": f"{scheduler_host}:0",
                                                   "contact_address": contact_address}}
        workers = self._new_specs(min(n_workers, self.config.max_workers))
        super().__init__(workers=workers, scheduler=scheduler, asynchronous=asynchronous, loop=loop,
                         name=name or f"CloudDaskCluster({cloud.name}, {self.flavor})")

    # SpecCluster hooks --------------------------------------------------------------------------
    def _spec(self) -> dict:
        return {"cls": CloudWorker, "options": {"vms": self.vms}}

    def _new_specs(self, count: int) -> dict[str, dict]:
        """Specs for ``count`` more workers: parked VMs first, then new VMs in batches."""
        specs = {name: self._spec() for name in self.vms.pool.parked()[:count]}
        count -= len(specs)
        while count > 0:
            size = min(count, self.config.batch_size)
            specs.update({n: self._spec() for n in self.vms.plan(size).names})
            count -= size
        return specs

    async def _start(self) -> None:
        await super()._start()
        self.vms.scheduler_address = self.scheduler.address  # contact address when one was given

    def scale(self, n: int = 0, memory: Any = None, cores: Any = None):
        n = min(int(n), self.config.max_workers)
        if n < len(self.worker_spec) or self.status in (Status.closing, Status.closed):
            return super().scale(n)
        self.worker_spec.update(self._new_specs(n - len(self.worker_spec)))
        self.loop.add_callback(self._correct_state)
        if self.asynchronous:
            return NoOpAwaitable()
        return None

    def adapt(self, Adaptive: type[Adaptive] = PolicyAdaptive, minimum: float = 0,  # noqa: N803 - distributed's name
              maximum: float = math.inf, interval: str | float = "1s", **kwargs: Any) -> Adaptive:
        """Adaptive scaling by :class:`ScalingPolicy` between ``minimum`` and ``maximum`` workers."""
        hi = self.config.max_workers if math.isinf(maximum) else int(maximum)
        config = replace(self.config, min_workers=int(minimum), max_workers=hi)
        self.config = config
        return super().adapt(Adaptive=PolicyAdaptive, minimum=int(minimum), maximum=hi, interval=interval,
                             policy=ScalingPolicy(config), **kwargs)

    async def _correct_state_internal(self) -> None:
        try:
            await super()._correct_state_internal()
        except Exception as err:  # a batch that failed (quota, capacity): forget it so adapt can retry
            failed = [n for n, w in self.workers.items() if w.status == Status.failed]
            for name in failed:
                self.worker_spec.pop(name, None)
                self.workers.pop(name, None)
                await asyncio.to_thread(self.vms.pool.delete, name)
            log.warning("workers %s failed to start: %s", ", ".join(map(str, failed)), err)
            raise

    async def _close(self) -> None:
        self.vms.closing = True
        try:
            await super()._close()
        finally:
            if self.teardown_proof is None:
                self.teardown_proof = await asyncio.to_thread(self.lease.teardown)

    # what the run held -------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.owner.run_id

    @property
    def launched(self) -> list[str]:
        """Names of every worker VM this cluster created, in order."""
        return list(self.vms.batch_of)
