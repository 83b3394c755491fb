"""How many workers of which flavour an elastic pool should hold: one policy for Dask and Slurm.

The policy is pure: give it what the pool looks like now (:class:`PoolState`: work queued and
running, each worker booting / busy / idle-since / parked, the time) and it returns a
:class:`ScalingDecision` (launch so many, unpark these, release those). The Dask adapter
(:mod:`slipstream.dask_cluster`), the Slurm programs and the benchmark all call it, so one set of
rules spends the researcher's Service Units everywhere::

    config = ScalingConfig(max_workers=8, batch_size=4, cooldown_seconds=300,
                           task=TaskNeeds(cores=2, memory_gb=4))
    policy = ScalingPolicy(config)
    decision = policy.decide(PoolState(now=t, queued=20, running=0, workers=()))
    # -> launch 4 m3.small workers (one batch); the next call, with those 4 BOOTING, launches 4 more

The rules, in the order they apply:

1. **Flavour**: the cheapest per task slot among ``config.flavors`` that fits one task's cores,
   memory and GPU share, priced by :func:`slipstream.jetstream2.su_per_hour`; among equals the
   smallest (finer steps waste less), unless ``max_workers`` of it cannot hold ``peak_tasks``.
2. **Demand**: ``ceil((queued + running) / slots per worker)`` workers, clamped to
   ``[min_workers, max_workers]``.
3. **Scale up** when demand exceeds the workers held — booting ones count as held, so nothing is
   launched twice while a batch boots. Parked (shelved) workers are woken first: they come back
   without reinstalling. New VMs are launched ``batch_size`` at most per decision (one API call).
   Parked workers count against ``max_workers``: Nova counts them against the quota too.
   *Boot-aware*: when the queued work would be finished by the workers already up before a new
   one could boot (``queued_work_seconds / slots up < boot_seconds``), nothing is launched.
4. **Scale down**: workers still booting go first, at once (``cancel``: a VM deleted in BUILD has
   cost nothing yet, and one that never joined holds no work); then idle workers, only after
   ``cooldown_seconds`` idle, longest-idle first; never below ``min_workers`` or below demand.
5. **Keep warm** (boot-aware): an idle worker past its cooldown is still kept when the next work
   is expected (``PoolState.next_work_in``, see :class:`ArrivalForecast`) sooner than a new
   worker would take to boot (``boot_seconds``) — a forecast that is overdue by more than one
   usual gap has expired (the work stopped coming), so it keeps nobody. Why: releasing it saves at most that gap's SUs,
   while booting its replacement costs as much charged time (the install on ACTIVE) *and* makes
   the work wait for the boot. When the gap is longer, releasing wins, and the idle policy
   (:mod:`slipstream.scaling.idle`) decides between deleting and shelving.

The baselines of ``benchmarks/elastic_su.py`` are configurations of this same policy:
:func:`static_config` (a fixed pool sized for the peak), :func:`idle_timeout_config` (Dask's
Adaptive: scale down after a few seconds idle) and :func:`slurm_suspend_config` (Slurm's
``SuspendTime``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from enum import StrEnum

from slipstream.cost.accounting import PlannedServers
from slipstream.cloud.errors import InvalidRequest
from slipstream.jetstream2 import FLAVORS, su_per_hour
from slipstream.scaling.idle import IdlePolicy

#: General-purpose flavours, smallest first: the default candidates.
CPU_FLAVORS: tuple[str, ...] = ("m3.tiny", "m3.small", "m3.quad", "m3.medium", "m3.large", "m3.xl")


@dataclass(frozen=True)
class TaskNeeds:
    """What one task needs: cores, memory (GB) and a share of a GPU (0.25 = a quarter A100)."""

    cores: int = 1
    memory_gb: float = 0.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.cores < 1 or self.memory_gb < 0 or self.gpus < 0:
            raise InvalidRequest(f"task needs must be positive: {self!r}",
                                 hint="Give cores >= 1, memory_gb >= 0 and gpus >= 0 per task.")


def slots_per_worker(flavor_name: str, task: TaskNeeds) -> int:
    """How many tasks one worker of ``flavor_name`` runs at once (0 if one does not fit)."""
    f = FLAVORS[flavor_name]
    by_cores = f.vcpus // task.cores
    by_memory = int(f.ram_mb / 1024 // task.memory_gb) if task.memory_gb else by_cores
    if task.gpus:
        by_gpu = int(f.gpus / task.gpus + 1e-9) if f.gpus else 0
        return min(by_cores, by_memory, by_gpu)
    return min(by_cores, by_memory)


def choose_flavor(task: TaskNeeds, candidates: tuple[str, ...], *, peak_tasks: int | None = None,
                  max_workers: int | None = None) -> str:
    """The cheapest flavour per task slot that fits ``task`` (see rule 1 of the module doc)."""
    unknown = [c for c in candidates if c not in FLAVORS]
    if unknown:
        raise InvalidRequest(f"unknown flavour(s) {', '.join(unknown)}",
                             hint=f"Valid flavours: {', '.join(FLAVORS)}.")
    fitting = [(su_per_hour(FLAVORS[c]) / slots_per_worker(c, task), FLAVORS[c].vcpus, c)
               for c in candidates if slots_per_worker(c, task) > 0]
    if not fitting:
        raise InvalidRequest(
            f"no flavour among {', '.join(candidates)} fits one task of {task.cores} cores, "
            f"{task.memory_gb} GB, {task.gpus} GPU", resource="scaling config",
            hint="Add a bigger flavour to the candidates (r3.* for memory, g3.* for GPUs) or split the task.")
    fitting.sort()  # by (SUs per slot, vCPUs): cheapest first, the smallest among equals
    if peak_tasks and max_workers:
        roomy = [f for f in fitting if slots_per_worker(f[2], task) * max_workers >= peak_tasks]
        if roomy:
            return roomy[0][2]
    return fitting[0][2]


@dataclass(frozen=True)
class ScalingConfig:
    """Every knob of the policy, with the default that suits a Jetstream2 pool.

    - ``min_workers`` / ``max_workers``: bounds (default 0 and 10, Nova's instance quota).
    - ``batch_size``: most VMs created by one decision, in one API call (default 5).
    - ``cooldown_seconds``: how long a worker must be idle before it may go (default 300).
    - ``boot_seconds``: expected time from "create" to a worker taking tasks, installation
      included (default 180: about 60 s BUILD + 120 s cloud-init installing Dask or slurmd).
    - ``flavors``: candidate flavours (default the m3 family); ``flavor`` forces one.
    - ``task``: one task's needs; ``peak_tasks``: the most tasks expected at once (for rule 1).
    - ``keep_warm``: apply the boot-aware keep-warm rule (rule 5; default on).
    - ``idle``: what happens to a released worker (delete, or park by shelving).
    """

    min_workers: int = 0
    max_workers: int = 10
    batch_size: int = 5
    cooldown_seconds: float = 300.0
    boot_seconds: float = 180.0
    flavors: tuple[str, ...] = CPU_FLAVORS
    flavor: str | None = None
    task: TaskNeeds = field(default_factory=TaskNeeds)
    peak_tasks: int | None = None
    keep_warm: bool = True
    idle: IdlePolicy = field(default_factory=IdlePolicy)

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers:
            raise InvalidRequest(
                f"min_workers={self.min_workers} and max_workers={self.max_workers} are not 0 <= min <= max",
                resource="scaling config", hint="Give 0 <= min_workers <= max_workers.")
        if self.batch_size < 1:
            raise InvalidRequest(f"batch_size must be >= 1, got {self.batch_size}", resource="scaling config")
        if self.cooldown_seconds < 0 or self.boot_seconds < 0:
            raise InvalidRequest("cooldown_seconds and boot_seconds must be >= 0", resource="scaling config")
        if self.flavor is not None:
            object.__setattr__(self, "flavors", (self.flavor,))
        object.__setattr__(self, "flavors", tuple(self.flavors))
        self.idle.check_flavors(self.flavors)
        choose_flavor(self.task, self.flavors)  # fails now, naming the flavours, if none fits

    @property
    def chosen_flavor(self) -> str:
        return choose_flavor(self.task, self.flavors, peak_tasks=self.peak_tasks, max_workers=self.max_workers)

    @property
    def slots(self) -> int:
        return slots_per_worker(self.chosen_flavor, self.task)


class WorkerPhase(StrEnum):
    BOOTING = "booting"  # VM created or unparked, not taking tasks yet
    BUSY = "busy"        # running at least one task
    IDLE = "idle"        # up, running nothing (since ``idle_since``)
    PARKED = "parked"    # shelved/stopped by the idle policy


@dataclass(frozen=True)
class WorkerView:
    name: str
    phase: WorkerPhase
    idle_since: float | None = None  # same clock as PoolState.now


@dataclass(frozen=True)
class PoolState:
    """What the pool looks like at ``now`` (seconds on any one clock)."""

    now: float
    queued: int
    running: int
    workers: tuple[WorkerView, ...] = ()
    next_work_in: float | None = None       # forecast seconds until more work arrives
    queued_work_seconds: float | None = None  # estimated task-seconds waiting, if known


@dataclass(frozen=True)
class ScalingDecision:
    flavor: str
    target: int                      # workers held (booting + up) after this decision
    launch: int = 0                  # new VMs to create now, in one batch
    unpark: tuple[str, ...] = ()
    release: tuple[str, ...] = ()    # idle workers to let go (the idle policy: delete or park)
    cancel: tuple[str, ...] = ()     # booting workers no longer needed: delete them before they cost
    keep_warm: tuple[str, ...] = ()  # past cooldown but kept: work expected back within a boot
    reason: str = ""


class ScalingPolicy:
    """Applies the rules of the module docstring to a :class:`ScalingConfig`."""

    def __init__(self, config: ScalingConfig | None = None) -> None:
        self.config = config or ScalingConfig()

    def demand(self, state: PoolState) -> int:
        c = self.config
        need = math.ceil((state.queued + state.running) / c.slots)
        return max(c.min_workers, min(c.max_workers, need))

    def decide(self, state: PoolState) -> ScalingDecision:
        c = self.config
        flavor = c.chosen_flavor
        live = [w for w in state.workers if w.phase != WorkerPhase.PARKED]
        parked = [w.name for w in state.workers if w.phase == WorkerPhase.PARKED]
        wanted = self.demand(state)
        if wanted > len(live):
            return self._scale_up(state, flavor, wanted, live, parked)
        return self._scale_down(state, flavor, wanted, live)

    def _scale_up(self, state: PoolState, flavor: str, wanted: int, live: list[WorkerView],
                  parked: list[str]) -> ScalingDecision:
        c = self.config
        up = [w for w in live if w.phase != WorkerPhase.BOOTING]
        booting = len(live) - len(up)
        if (up and not booting and state.queued_work_seconds is not None
                and len(live) >= c.min_workers
                and state.queued_work_seconds / (len(up) * c.slots) < c.boot_seconds):
            return ScalingDecision(flavor, len(live), reason="the workers up finish the queue before a new one boots")
        short = wanted - len(live)
        unpark = tuple(parked[:short])
        room = c.max_workers - len(live) - len(parked)  # parked ones still hold quota
        launch = max(0, min(short - len(unpark), c.batch_size, room))
        target = len(live) + len(unpark) + launch
        why = f"demand {wanted} > {len(live)} held ({booting} booting)"
        return ScalingDecision(flavor, target, launch=launch, unpark=unpark, reason=why)

    def _scale_down(self, state: PoolState, flavor: str, wanted: int, live: list[WorkerView]) -> ScalingDecision:
        c = self.config
        surplus = len(live) - wanted
        if surplus <= 0:
            return ScalingDecision(flavor, len(live), reason="holding: demand met")
        # Booting workers first, newest first: a VM in BUILD has cost nothing, none holds work.
        cancel = tuple(w.name for w in reversed(live) if w.phase == WorkerPhase.BOOTING)[:surplus]
        surplus -= len(cancel)
        held = len(live) - len(cancel)
        idle = sorted((w for w in live if w.phase == WorkerPhase.IDLE and w.idle_since is not None),
                      key=lambda w: w.idle_since)  # type: ignore[arg-type, return-value]
        cooled = [w.name for w in idle if state.now - w.idle_since >= c.cooldown_seconds]  # type: ignore[operator]
        candidates = cooled[:surplus]
        why = f"{len(cancel)} booting no longer needed" if cancel else ""
        if not candidates:
            return ScalingDecision(flavor, held, cancel=cancel,
                                   reason=why or "holding: nobody idle past the cooldown")
        if c.keep_warm and state.next_work_in is not None and state.next_work_in < c.boot_seconds:
            return ScalingDecision(flavor, held, cancel=cancel, keep_warm=tuple(candidates),
                                   reason=f"work expected in {state.next_work_in:.0f} s, sooner than a "
                                          f"{c.boot_seconds:.0f} s boot")
        why = ", ".join(filter(None, [why, f"{len(candidates)} idle past the {c.cooldown_seconds:.0f} s cooldown"]))
        return ScalingDecision(flavor, held - len(candidates), release=tuple(candidates), cancel=cancel, reason=why)


@dataclass
class ArrivalForecast:
    """Guesses when the next burst of work arrives, from when earlier bursts arrived.

    A burst starts when work shows up while nothing was queued or running. The next one is
    expected one median gap after the last started (also while that one still runs: the work
    already here is demand, the forecast is about the *next* burst); with fewer than two bursts
    seen there is no forecast. A burst late by up to one more gap is still expected "now";
    later than that the pattern has broken and the forecast expires (None) until bursts
    resume — else a pool would keep warm workers for work that stopped coming, forever.
    """

    starts: list[float] = field(default_factory=list)
    _busy: bool = False

    def observe(self, now: float, queued: int, running: int) -> None:
        busy = queued + running > 0
        if busy and not self._busy:
            self.starts.append(now)
        self._busy = busy

    def next_work_in(self, now: float) -> float | None:
        """Seconds until the next burst is expected (work already here is demand, not forecast)."""
        if len(self.starts) < 2:
            return None
        gap = statistics.median(b - a for a, b in zip(self.starts, self.starts[1:], strict=False))
        due_in = self.starts[-1] + gap - now
        if due_in < -gap:
            return None  # overdue by more than a gap: the work stopped coming
        return max(0.0, due_in)


# The baselines, as configurations of the same policy ----------------------------------------
def static_config(workers: int, **kw) -> ScalingConfig:
    """A fixed pool sized for the peak: created at the start, deleted at the end."""
    return ScalingConfig(min_workers=workers, max_workers=workers, batch_size=workers,
                         keep_warm=False, **kw)


def idle_timeout_config(max_workers: int, idle_seconds: float = 3.0, **kw) -> ScalingConfig:
    """Dask's ``Adaptive`` as dask-cloudprovider uses it: scale to demand at once (no batches,
    no boot awareness) and close a worker after ``wait_count`` (3) × ``interval`` (1 s) idle."""
    return ScalingConfig(min_workers=0, max_workers=max_workers, batch_size=max_workers,
                         cooldown_seconds=idle_seconds, keep_warm=False, **kw)


def slurm_suspend_config(max_workers: int, suspend_time: float = 60.0, **kw) -> ScalingConfig:
    """Slurm power saving as on Jetstream2's virtual clusters: resume as many nodes as the pending
    jobs need, suspend (delete) a node idle for ``SuspendTime`` = 60 s."""
    return ScalingConfig(min_workers=0, max_workers=max_workers, batch_size=max_workers,
                         cooldown_seconds=suspend_time, keep_warm=False, **kw)


def with_time_scale(config: ScalingConfig, factor: float) -> ScalingConfig:
    """``config`` with every duration divided by ``factor`` (replaying a trace ``factor``× faster)."""
    idle = replace(config.idle, park_when_back_within_seconds=config.idle.park_when_back_within_seconds / factor,
                   max_parked_seconds=config.idle.max_parked_seconds / factor)
    return replace(config, cooldown_seconds=config.cooldown_seconds / factor,
                   boot_seconds=config.boot_seconds / factor, idle=idle)


def elastic_pool_plan(max_workers: int = 4, flavor: str = "m3.small", cores_per_task: int = 1,
                      max_hours: float = 1.0) -> list[PlannedServers]:
    """An elastic pool's worst case (for ``slipstream plan`` and the budget guard): ``max_workers``
    workers of the flavour the policy picks, ACTIVE for ``max_hours``."""
    if max_hours <= 0:
        raise InvalidRequest(f"max_hours must be positive, got {max_hours!r}", hint="Give the longest plausible run in hours.")
    config = ScalingConfig(max_workers=max_workers, flavor=flavor, task=TaskNeeds(cores=cores_per_task))
    return [PlannedServers(FLAVORS[config.chosen_flavor], max_workers, max_hours)]
