"""A Dask cluster whose workers are cloud VMs, scaled by slipstream's policy and always torn down.

:class:`CloudDaskCluster` is a ``distributed`` :class:`~distributed.deploy.SpecCluster`: the
scheduler runs in your process; each worker is one VM (Jetstream2 flavour, created through a
:class:`~slipstream.ownership.lease.Lease`, so it carries ownership and the reaper can find it), started by
user_data that runs ``dask worker tls://<scheduler> --host <the VM's address> --name <the VM's name>``.
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

With Prefect, use :class:`slipstream.tasks.dask_runner.CloudDaskTaskRunner` (it keeps Prefect's
API key and the cluster's settings off the workers)::

    CloudDaskTaskRunner(cloud="local", scaling={"max_workers": 4}, adapt_kwargs={"minimum": 0, "maximum": 4})

Security: scheduler, workers and clients speak mutual TLS with keys made for this cluster alone
(:class:`~slipstream.dask_workers.ClusterTLS`): reaching the scheduler's port is not enough to
join it or to submit work, and task payloads travel encrypted. ``Client(cluster)`` picks the
keys up from ``cluster.security``. Where the scheduler listens: ``scheduler_host`` (default
``127.0.0.1``, right for the LocalCloud, whose VMs are processes on 127.64.x.y). On Jetstream2
give an address the VMs reach — the flow host's private address on the same network, or
``0.0.0.0`` with ``contact_address`` set to it — and keep the port inside the project's
security group anyway.

Releasing workers: only a worker the scheduler could retire is let go (one holding results no
other worker has stays, with its VM); a worker still booting when demand disappears is deleted
at once; a VM that shut itself off, failed, or whose worker never joined is deleted and
replaced; a parked one is deleted after ``max_parked_seconds``. A create call refused for quota
or capacity backs off (5 s doubling to 5 min), is logged and shown in
:attr:`CloudDaskCluster.scaling_error`; the workers it could not create are forgotten.
The health check runs by itself, under ``adapt()`` or ``scale()`` (:mod:`slipstream.dask_watch`),
and nothing waits for ever: when no worker VM could be created for ``give_up_seconds``, or
workers keep coming up broken, the tasks waiting for one fail with
:class:`~slipstream.dask_workers.NoWorkerVMs`.

Worker names are ``dask-<run>-<cluster>-b<batch>[-<i>]``: unique per cluster, so two clusters of
one run never share one.

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
import secrets
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

from distributed.core import Status
from distributed.deploy.adaptive import Adaptive
from distributed.deploy.spec import NoOpAwaitable, ProcessInterface, SpecCluster
from distributed.scheduler import Scheduler

from slipstream.cloud import open_cloud
from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.models import Ownership
from slipstream.cloud.port import CloudProvider
from slipstream.dask_watch import watch
from slipstream.dask_workers import DEFAULT_WORKER_PACKAGES, ClusterTLS, JoinedNames, WorkerVMs, worker_user_data
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
from slipstream.scaling.pool import WorkerAction, WorkerPool

__all__ = ["DEFAULT_WORKER_PACKAGES", "CloudDaskCluster", "PolicyAdaptive", "worker_user_data"]

log = logging.getLogger("slipstream.dask")


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


class CloudWorker(ProcessInterface):
    """One Dask worker: one cloud VM whose user_data runs ``dask worker``. Starting it asks for
    the VM and returns at once (the boot happens in the background, outside the cluster's lock);
    the worker is up when it joins the scheduler."""

    def __init__(self, scheduler: str, name: str, vms: WorkerVMs) -> None:
        super().__init__(scheduler=scheduler, name=name)
        self.name = name
        self.vms = vms

    async def start(self) -> None:
        self.vms.request(self.name)
        await super().start()

    async def close(self) -> None:
        try:
            cluster = self._cluster() if getattr(self, "_cluster", None) else None
            if cluster is not None:
                await cluster._worker_closing(self.name)
        finally:
            await super().close()


class PolicyAdaptive(Adaptive):
    """``Adaptive`` driven by :class:`ScalingPolicy` instead of Dask's own target and wait count."""

    def __init__(self, cluster: CloudDaskCluster, policy: ScalingPolicy, cloud_check_seconds: float | None = None,
                 **kwargs: Any) -> None:
        self.policy = policy
        self.forecast = ArrivalForecast()
        self.idle_since: dict[str, float] = {}
        self.decision: ScalingDecision | None = None
        self.decisions: list[ScalingDecision] = []
        if cloud_check_seconds is not None:  # the cluster's health check runs that often from now on
            cluster.cloud_check_seconds = cloud_check_seconds
        cluster.vms.next_work_in = lambda: self.forecast.next_work_in(time.monotonic())
        super().__init__(cluster, wait_count=1, **kwargs)

    @property
    def repairs(self) -> list[tuple[str, WorkerAction]]:
        """Workers the cluster's health check dropped, and what it did with each VM."""
        return self.cluster.repairs

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
        decision = self.policy.decide(self.observe())
        if (decision.launch or decision.unpark) and self.cluster.vms.backing_off():
            decision = replace(decision, launch=0, unpark=(),
                               target=decision.target - decision.launch - len(decision.unpark),
                               reason=f"{decision.reason}; backing off after: {self.cluster.vms.error}")
        if decision.launch and self.cluster.vms.in_flight():  # its answer may be a quota refusal: wait for it
            decision = replace(decision, launch=0, target=decision.target - decision.launch,
                               reason=f"{decision.reason}; waiting for the create call in flight")
        self.decision = decision
        if decision.launch or decision.unpark or decision.release or decision.cancel:
            self.decisions.append(decision)
            log.info("scaling: %s -> %d workers (%s)", decision.flavor, decision.target, decision.reason)
        return decision.target

    async def recommendations(self, target: int) -> dict:
        d = self.decision
        if d is not None and (d.launch or d.unpark):
            return {"status": "up", "n": len(self.cluster.worker_spec) + d.launch + len(d.unpark)}
        if d is not None and (d.release or d.cancel):
            for name in d.release:
                self.idle_since.pop(name, None)
            return {"status": "down", "workers": [*d.cancel, *d.release]}
        return {"status": "same"}


class CloudDaskCluster(SpecCluster):
    """Dask workers on cloud VMs (see the module docstring).

    Args:
        cloud: ``"local"``, a saved cloud block ``"<block-type>/<name>"`` (needs Prefect's block
            store), or a provider object (a ``LocalCloud``, an ``OpenStackCloud``).
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
        boot_timeout: seconds a worker may take from being asked for to joining the scheduler.
        cloud_check_seconds: how often the health check lists the workers' VMs (one call).
        give_up_seconds: how long launches may fail, with no worker up or booting, before the
            tasks waiting for a worker fail with :class:`~slipstream.dask_workers.NoWorkerVMs`.
    """

    def __init__(self, cloud: CloudProvider | str = "local", *, n_workers: int = 0,
                 scaling: ScalingConfig | dict | None = None,
                 image: str = DEFAULT_IMAGE, pipeline: str = "dask", run_id: str | None = None,
                 lease_hours: float = 24.0, scheduler_host: str = "127.0.0.1", scheduler_port: int = 0,
                 contact_address: str | None = None, worker_packages: tuple[str, ...] | list[str] = (),
                 boot_timeout: float = 900.0, cloud_check_seconds: float = 10.0, give_up_seconds: float = 600.0,
                 key_name: str | None = None, on_event: EventCallback | None = None,
                 asynchronous: bool = False, loop: Any = None, name: str | None = None) -> None:
        cloud = open_cloud(cloud) if isinstance(cloud, str) else cloud
        if contact_address and "://" in contact_address and not contact_address.startswith("tls://"):
            raise InvalidRequest(f"contact_address {contact_address!r} is not a TLS address", resource="CloudDaskCluster",
                                 hint="The scheduler speaks TLS only: give 'tls://host:port' or just 'host:port'.")
        self.config = _as_config(scaling)
        for knob, value in (("boot_timeout", boot_timeout), ("cloud_check_seconds", cloud_check_seconds),
                            ("give_up_seconds", give_up_seconds)):
            if not value > 0:
                raise InvalidRequest(f"{knob} must be a positive number of seconds, got {value!r}",
                                     resource="CloudDaskCluster", hint=f"Give {knob} > 0 (see the class docstring).")
        images = {i.name for i in cloud.list_images()}
        if image not in images:
            raise InvalidRequest(f"image {image!r} is not on {cloud.name}", resource="CloudDaskCluster",
                                 hint=f"Images there: {', '.join(sorted(images))}.")
        self.owner = Ownership.new(pipeline, run_id=run_id, lease=timedelta(hours=lease_hours))
        self.lease = Lease(cloud, self.owner, on_event=on_event)
        self.cloud = cloud
        self.teardown_proof: TeardownProof | None = None
        self.cloud_check_seconds = cloud_check_seconds
        self.repairs: list[tuple[str, WorkerAction]] = []  # what the health check did (dask_watch)
        self._watch: asyncio.Task | None = None
        self.settle_seconds = 120.0  # how long closing waits for create calls in flight before the teardown
        # Unique per cluster, not only per run: two clusters of one run never share a worker name.
        run = re.sub(r"[^a-z0-9]", "", self.owner.run_id.lower())[:8] or "pool"
        prefix = f"dask-{run}-{secrets.token_hex(3)}"
        self.tls = ClusterTLS.new(prefix)
        pool = WorkerPool(self.lease, flavor=self.config.chosen_flavor, image=image, prefix=prefix,
                          idle=self.config.idle, key_name=key_name, metadata={"slipstream:role": "dask-worker"})
        self.vms = WorkerVMs(pool, nthreads=self.config.slots, packages=(*DEFAULT_WORKER_PACKAGES, *worker_packages),
                             boot_timeout=boot_timeout, give_up_seconds=give_up_seconds, tls=self.tls, on_failed=self._forget_failed)
        # The scheduler's HTTP endpoints (health, metrics) listen on its host too, on a free port:
        # never Dask's default of every interface, nor a fixed 8787 another cluster may hold.
        security = self.tls.security()
        scheduler = {"cls": Scheduler, "options": {"host": scheduler_host, "port": scheduler_port, "dashboard": False,
                                                   "dashboard_address": f"{scheduler_host}:0", "protocol": "tls",
                                                   "contact_address": contact_address, "security": security}}
        workers = self._new_specs(min(n_workers, self.config.max_workers))
        super().__init__(workers=workers, scheduler=scheduler, asynchronous=asynchronous, loop=loop,
                         security=security, name=name or f"CloudDaskCluster({cloud.name}, {self.flavor})")

    @property
    def flavor(self) -> str:
        """The flavour the pool boots (the policy sizes for this one's slots)."""
        return self.vms.pool.flavor

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
        self.scheduler.add_plugin(JoinedNames(self.vms), name="slipstream-joined-names")
        self._watch = asyncio.ensure_future(watch(self))  # with adapt() or scale() alone

    def _adaptive_is_running(self) -> bool:
        adaptive = getattr(self, "_adaptive", None)
        return adaptive is not None and adaptive.state in ("starting", "running")

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
        """Adaptive scaling by :class:`ScalingPolicy` between ``minimum`` and ``maximum`` workers.

        The bounds can change the flavour the policy picks (rule 1); the pool boots that one
        while it has booted none yet, else the policy keeps sizing for the flavour already booted."""
        hi = self.config.max_workers if math.isinf(maximum) else int(maximum)
        config = replace(self.config, min_workers=int(minimum), max_workers=hi)
        pool = self.vms.pool
        if not self.vms.created and not self.vms.batch_of:
            pool.flavor = config.chosen_flavor
            self.vms.nthreads = config.slots
        else:
            config = replace(config, flavor=pool.flavor)
        self.config = config
        return super().adapt(Adaptive=PolicyAdaptive, minimum=int(minimum), maximum=hi, interval=interval,
                             policy=ScalingPolicy(config), **kwargs)

    def _forget_failed(self, names: tuple[str, ...]) -> None:
        """Workers whose VMs could not be created: out of the spec, never counted as launched."""
        for name in names:
            self.worker_spec.pop(name, None)
        self.loop.add_callback(self._correct_state)

    async def _worker_closing(self, name: str) -> None:
        """A worker object closes: release its VM only if the cluster let it go and the
        scheduler retired it. The scheduler refuses to retire a worker holding results no other
        worker has; such a worker goes back into the pool with its VM, so no result is lost and
        no task runs twice."""
        if self.vms.closing or name in self.worker_spec:
            return  # closing (the lease deletes all), or still wanted: the worker left by itself
        if name in {ws.name for ws in self.scheduler.workers.values()}:
            retired = await self.scheduler_comm.retire_workers(names=[name], remove=True, close_workers=True)
            if name not in {info.get("name") for info in retired.values()}:
                log.info("worker %s kept: it holds results the scheduler could not move elsewhere", name)
                self.worker_spec[name] = self._spec()
                self.loop.add_callback(self._correct_state)
                return
        await self.vms.let_go(name)

    async def _close(self) -> None:
        self.vms.closing = True  # from here no VM is asked for, and a create that returns is undone
        try:
            if getattr(self, "_adaptive", None) is not None:
                self._adaptive.stop()
            if self._watch is not None:
                await asyncio.wait([self._watch], timeout=30)
            await self.vms.settle(timeout=self.settle_seconds)  # a create call in flight must not outlive the teardown
            await super()._close()
        finally:
            if self.teardown_proof is None:
                self.teardown_proof = await asyncio.to_thread(self.lease.teardown)
                if in_flight := self.vms.in_flight():  # the listing cannot see them yet: say so, never "clean"
                    self.teardown_proof.remaining.setdefault("server", []).extend(
                        f"{name} (create call still in flight; it deletes what it makes when it returns)"
                        for name in in_flight)

    # what the run held -------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.owner.run_id

    @property
    def launched(self) -> list[str]:
        """Names of every worker VM this cluster created, in order (never one it could not create)."""
        return list(self.vms.created)

    @property
    def scaling_error(self) -> str | None:
        """Why no new worker VM is being asked for right now (quota, capacity…), or None."""
        return self.vms.error
