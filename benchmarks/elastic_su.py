"""SUs and makespan of one bursty job trace under four scaling policies, on real LocalCloud VMs.

The trace (``TRACE``, in real seconds): seven bursts of one-core tasks of 3-8 minutes over about
2.5 hours, some bursts two minutes apart, others 25-50 minutes apart. It is replayed ``--speed``
times faster (default 60: one real minute per second) on a throwaway LocalCloud whose boots take
``BOOT``/speed seconds. A worker is an m3.quad (4 one-core slots; the flavour our policy picks for
this trace, given to every policy). A freshly created worker first spends ``SETUP`` seconds ACTIVE
installing its software (charged, as on Jetstream2 where cloud-init installs Dask or slurmd); a
worker woken from the shelf has its disk and skips that.

The four policies are configurations of the same :class:`~slipstream.scaling.policy.ScalingPolicy`,
driven by the same loop (dispatch FIFO to free slots, decide, launch/unpark/release through a
:class:`~slipstream.scaling.pool.WorkerPool` and its Lease):

(a) static   — 8 workers (the peak) from start to end;
(b) idle 3 s — Dask's Adaptive as dask-cloudprovider uses it: scale to demand at once, close a
               worker after 3 × 1 s idle, delete;
(c) slurm    — Slurm power saving as on Jetstream2's clusters: resume what pending jobs need,
               SuspendTime=60 s, delete;
(d) ours     — batches of 4, 60 s cooldown, keep a worker warm when the forecast says work is back
               within a boot (150 s), shelve (0 SU) instead of delete when back within an hour.

SUs are metered by :func:`slipstream.cost.accounting.meter` from each VM's state log on the cloud,
scaled back to real time; the lower bound is the work's core-hours × the m3 rate (1 SU per
core-hour). The task work itself is simulated by the driver's clock (no CPU is burnt); the VMs,
their boots, shelving and deletions are real. Run::

    .venv/bin/python benchmarks/elastic_su.py [--speed 60]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from slipstream.cost.accounting import meter
from slipstream.cloud.local import LocalCloud, LocalCloudOptions
from slipstream.cloud.models import Ownership, ServerStatus
from slipstream.jetstream2 import FLAVORS, SU_PER_VCPU_HOUR, Quotas
from slipstream.ownership.lease import Lease
from slipstream.scaling.idle import IdleAction, IdlePolicy
from slipstream.scaling.policy import (
    ArrivalForecast,
    PoolState,
    ScalingConfig,
    ScalingPolicy,
    TaskNeeds,
    WorkerPhase,
    WorkerView,
    idle_timeout_config,
    slurm_suspend_config,
    static_config,
    with_time_scale,
)
from slipstream.scaling.pool import WorkerPool

FLAVOR = "m3.quad"
PEAK = 8                   # workers; 32 one-core slots
BOOT = 60.0                # real seconds from create (or unshelve) to ACTIVE
SETUP = 90.0               # real seconds a fresh worker spends ACTIVE installing before taking tasks
TICK = 0.1                 # wall seconds between two looks at the pool
# (arrival minute, tasks) — bursts of one-core tasks
BURSTS = [(0, 40), (25, 24), (27, 24), (70, 48), (100, 16), (102, 16), (150, 32)]


@dataclass(frozen=True)
class Task:
    arrival: float   # real seconds
    duration: float  # real seconds


def trace(seed: int = 5) -> list[Task]:
    rng = random.Random(seed)
    return sorted((Task(minute * 60.0 + rng.uniform(0, 30), rng.uniform(180, 480))
                   for minute, n in BURSTS for _ in range(n)), key=lambda t: t.arrival)


def policies() -> dict[str, ScalingConfig]:
    common = {"flavor": FLAVOR, "task": TaskNeeds(cores=1)}
    return {
        "(a) static, sized for the peak": static_config(PEAK, **common),
        "(b) idle timeout 3 s (Dask Adaptive)": idle_timeout_config(PEAK, 3.0, **common),
        "(c) Slurm SuspendTime=60": slurm_suspend_config(PEAK, 60.0, **common),
        "(d) ours": ScalingConfig(max_workers=PEAK, batch_size=4, cooldown_seconds=60, boot_seconds=BOOT + SETUP,
                                  idle=IdlePolicy(IdleAction.SHELVE, park_when_back_within_seconds=3600), **common),
    }


@dataclass
class Worker:
    name: str
    ready_at: float | None = None      # wall time it takes tasks from (None: not ACTIVE yet)
    fresh: bool = True                 # a new VM installs first; an unshelved one does not
    running: list[float] = field(default_factory=list)  # wall end times of its tasks
    idle_since: float | None = None


@dataclass
class Outcome:
    name: str
    su: float
    makespan: float
    vms: int
    waits: list[float]
    clean: bool


class Replay:
    """One policy replaying the trace on its own Lease (own run id) of the shared cloud."""

    def __init__(self, name: str, config: ScalingConfig, cloud: LocalCloud, tasks: list[Task], speed: float) -> None:
        self.name, self.cloud, self.speed = name, cloud, speed
        self.config = with_time_scale(config, speed)
        self.policy = ScalingPolicy(self.config)
        self.tasks = tasks
        self.owner = Ownership.new("elastic-bench")
        self.outcome: Outcome | None = None

    def run(self) -> None:
        f = self.speed
        pending = list(self.tasks)
        queue: list[tuple[float, float]] = []  # (arrival wall, duration wall)
        workers: dict[str, Worker] = {}
        waits: list[float] = []
        forecast = ArrivalForecast()
        last_end = 0.0
        with Lease(self.cloud, self.owner) as lease:
            pool = WorkerPool(lease, flavor=FLAVOR, image="slipstream-noop", prefix="w", idle=self.config.idle)
            t0 = time.monotonic()
            while pending or queue or any(w.running for w in workers.values()):
                now = time.monotonic() - t0
                while pending and pending[0].arrival / f <= now:
                    t = pending.pop(0)
                    queue.append((t.arrival / f, t.duration / f))
                seen = {s.name: s for s in self.cloud.list_servers(run_id=self.owner.run_id)}
                parked = set(pool.parked())
                for name, w in workers.items():
                    s = seen.get(name)
                    if w.ready_at is None and s is not None and s.status == ServerStatus.ACTIVE and name not in parked:
                        w.ready_at = now + (SETUP / f if w.fresh else 0.0)
                    for end in [e for e in w.running if e <= now]:
                        w.running.remove(end)
                        last_end = max(last_end, end)
                    if not w.running and w.idle_since is None and w.ready_at is not None and now >= w.ready_at:
                        w.idle_since = now
                for w in workers.values():  # FIFO dispatch to free slots
                    while queue and w.ready_at is not None and now >= w.ready_at and w.name not in parked \
                            and len(w.running) < self.config.slots:
                        arrival, duration = queue.pop(0)
                        waits.append((now - arrival) * f)
                        w.running.append(now + duration)
                        w.idle_since = None
                running = sum(len(w.running) for w in workers.values())
                forecast.observe(now, len(queue), running)
                views = tuple(self._view(w, now, parked) for w in workers.values())
                d = self.policy.decide(PoolState(now, len(queue), running, views, forecast.next_work_in(now)))
                for name in d.unpark:
                    pool.unpark(name)
                    workers[name] = Worker(name, fresh=False)
                if d.launch:
                    for s in pool.launch(d.launch):
                        workers[s.name] = Worker(s.name)
                for name in d.cancel:  # booting, no longer needed: deleted before it costs more
                    pool.delete(name)
                    del workers[name]
                for name in d.release:
                    if pool.release(name, forecast.next_work_in(now)) == IdleAction.DELETE:
                        del workers[name]
                    else:
                        workers[name].ready_at, workers[name].idle_since = None, None
                for name in pool.expire_parked():
                    workers.pop(name, None)
                time.sleep(TICK)
        proof = lease.proof
        su = 0.0
        history = self.cloud.server_history(self.owner.run_id)
        for h in history:
            su += meter(FLAVORS[h.flavor], h.log) * f  # wall hours -> real hours
        first = self.tasks[0].arrival
        self.outcome = Outcome(self.name, su, last_end * f - first, len(history), waits, proof.clean)

    @staticmethod
    def _view(w: Worker, now: float, parked: set[str]) -> WorkerView:
        if w.name in parked:
            return WorkerView(w.name, WorkerPhase.PARKED)
        if w.ready_at is None or now < w.ready_at:
            return WorkerView(w.name, WorkerPhase.BOOTING)
        if w.running:
            return WorkerView(w.name, WorkerPhase.BUSY)
        return WorkerView(w.name, WorkerPhase.IDLE, w.idle_since if w.idle_since is not None else now)


def main(speed: float = 60.0) -> None:
    tasks = trace()
    core_hours = sum(t.duration for t in tasks) / 3600
    lower_su = core_hours * SU_PER_VCPU_HOUR[FLAVORS[FLAVOR].family]  # one core per task
    ideal_makespan = max(t.arrival + t.duration for t in tasks) - tasks[0].arrival
    with tempfile.TemporaryDirectory(prefix="slipstream-elastic-") as tmp:
        home = Path(tmp) / "cloud"
        cloud = LocalCloud(options=LocalCloudOptions(
            home=home, boot_delay=BOOT / speed, stop_grace=0.5, network="127.64.203.0/24",
            quotas=Quotas(instances=100, cores=400, ram_mb=400 * 4096, floating_ips=4)))
        try:
            # One LocalCloud object per thread, all on the same cloud (its state is in SQLite).
            replays = [Replay(name, config, LocalCloud(home=home), tasks, speed) for name, config in policies().items()]
            threads = [threading.Thread(target=r.run, name=r.name) for r in replays]
            started = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - started
        finally:
            cloud.reset()
    print(f"trace: {len(tasks)} one-core tasks in {len(BURSTS)} bursts over {ideal_makespan / 60:.0f} min, "
          f"{core_hours:.2f} core-hours; replayed {speed:g}x faster in {wall:.0f} s wall; "
          f"workers {FLAVOR}, boot {BOOT:.0f} s + install {SETUP:.0f} s (real)")
    print(f"lower bound: {lower_su:.2f} SU (core-hours x 1 SU/core-hour); ideal makespan {ideal_makespan / 60:.1f} min")
    print(f"{'policy':<38}{'SU':>8}{'x bound':>9}{'makespan':>10}{'x ideal':>9}{'VMs':>6}{'mean wait':>11}{'clean':>7}")
    for r in replays:
        o = r.outcome
        if o is None:
            print(f"{r.name:<38}  FAILED (see the traceback above)")
            continue
        wait = sum(o.waits) / len(o.waits) if o.waits else 0.0
        print(f"{o.name:<38}{o.su:>8.2f}{o.su / lower_su:>9.2f}{o.makespan / 60:>9.1f}m"
              f"{o.makespan / ideal_makespan:>9.2f}{o.vms:>6}{wait:>10.0f}s{str(o.clean):>7}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--speed", type=float, default=60.0, help="replay this many times faster than real time")
    main(parser.parse_args().speed)
