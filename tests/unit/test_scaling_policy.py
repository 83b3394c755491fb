"""The scaling policy, rule by rule: flavour, demand, batches, boot-awareness, cooldown, min/max."""

from __future__ import annotations

import pytest

from slipstream.cloud.errors import InvalidRequest
from slipstream.scaling.policy import (
    ArrivalForecast,
    PoolState,
    ScalingConfig,
    ScalingPolicy,
    TaskNeeds,
    WorkerPhase,
    WorkerView,
    choose_flavor,
    idle_timeout_config,
    slots_per_worker,
    slurm_suspend_config,
    static_config,
    with_time_scale,
)

B, U, I, P = WorkerPhase.BOOTING, WorkerPhase.BUSY, WorkerPhase.IDLE, WorkerPhase.PARKED


def pool(*phases: WorkerPhase, idle_since: float = 0.0) -> tuple[WorkerView, ...]:
    return tuple(WorkerView(f"w{i}", ph, idle_since if ph == I else None) for i, ph in enumerate(phases))


def policy(**kw) -> ScalingPolicy:
    kw.setdefault("flavor", "m3.quad")  # 4 one-core slots per worker
    return ScalingPolicy(ScalingConfig(**kw))


# flavour -------------------------------------------------------------------------------------
def test_the_cheapest_flavour_per_slot_that_fits_the_task_is_chosen():
    assert choose_flavor(TaskNeeds(cores=1), ("m3.quad", "m3.tiny", "m3.small")) == "m3.tiny"
    # 2 cores + 10 GB: m3.small (6 GB) holds none; m3.quad (15 GB) one at 4 SU/h; m3.medium
    # (8 cores, 30 GB) three at 8 SU/h, 2.67 per task: the bigger one is cheaper per task.
    assert choose_flavor(TaskNeeds(cores=2, memory_gb=10), ("m3.small", "m3.quad")) == "m3.quad"
    assert choose_flavor(TaskNeeds(cores=2, memory_gb=10), ("m3.small", "m3.quad", "m3.medium")) == "m3.medium"
    # a quarter A100: g3.small holds 0.2 of one, so g3.medium it is.
    assert choose_flavor(TaskNeeds(cores=4, gpus=0.25), ("g3.small", "g3.medium", "g3.large")) == "g3.medium"


def test_a_bigger_flavour_is_chosen_when_max_workers_of_the_smallest_cannot_hold_the_peak():
    assert choose_flavor(TaskNeeds(cores=1), ("m3.tiny", "m3.small", "m3.quad"), peak_tasks=32, max_workers=10) == "m3.quad"


def test_gpu_flavours_cost_their_family_rate_so_cpu_work_stays_on_m3():
    assert choose_flavor(TaskNeeds(cores=4), ("g3.small", "m3.quad")) == "m3.quad"


def test_a_task_no_candidate_fits_is_refused_at_configuration_naming_the_flavours():
    with pytest.raises(InvalidRequest, match="no flavour among m3.tiny, m3.small fits one task of 4 cores"):
        ScalingConfig(flavors=("m3.tiny", "m3.small"), task=TaskNeeds(cores=4))


def test_bad_bounds_are_refused_with_what_to_give():
    with pytest.raises(InvalidRequest, match="0 <= min_workers <= max_workers"):
        ScalingConfig(min_workers=5, max_workers=2)
    with pytest.raises(InvalidRequest, match="unknown flavour"):
        ScalingConfig(flavor="m9.huge")


def test_slots_count_cores_memory_and_gpu():
    assert slots_per_worker("m3.quad", TaskNeeds(cores=1)) == 4
    assert slots_per_worker("m3.quad", TaskNeeds(cores=1, memory_gb=7)) == 2
    assert slots_per_worker("m3.quad", TaskNeeds(cores=1, gpus=0.1)) == 0


# scale up ------------------------------------------------------------------------------------
def test_backlog_scales_up_in_batches():
    d = policy(max_workers=10, batch_size=3).decide(PoolState(now=0, queued=40, running=0))
    assert (d.launch, d.target, d.flavor) == (3, 3, "m3.quad")


def test_workers_already_booting_are_not_launched_twice():
    p = policy(max_workers=10, batch_size=5)
    # 12 tasks = 3 workers of 4 slots; 3 are booting: nothing more to launch.
    assert p.decide(PoolState(now=1, queued=12, running=0, workers=pool(B, B, B))).launch == 0
    # 20 tasks = 5 workers; 3 booting: launch the 2 missing only.
    assert p.decide(PoolState(now=1, queued=20, running=0, workers=pool(B, B, B))).launch == 2


def test_max_workers_caps_the_pool_and_parked_workers_count_against_it():
    p = policy(max_workers=4, batch_size=10)
    assert p.decide(PoolState(now=0, queued=100, running=0)).launch == 4
    d = p.decide(PoolState(now=0, queued=100, running=0, workers=pool(U, P)))
    assert d.unpark == ("w1",) and d.launch == 2 and d.target == 4


def test_parked_workers_are_woken_before_new_ones_are_launched():
    d = policy(batch_size=5).decide(PoolState(now=0, queued=8, running=0, workers=pool(P, P, P)))
    assert d.unpark == ("w0", "w1") and d.launch == 0


def test_min_workers_are_held_even_with_no_work():
    d = policy(min_workers=2).decide(PoolState(now=0, queued=0, running=0))
    assert d.launch == 2
    idle = pool(I, I, idle_since=0)
    assert policy(min_workers=2, cooldown_seconds=0).decide(PoolState(now=999, queued=0, running=0, workers=idle)).release == ()


def test_no_launch_when_the_workers_up_finish_the_queue_before_a_boot():
    p = policy(boot_seconds=180)
    # 2 workers x 4 slots; 800 task-seconds queued = 100 s each: done before a 180 s boot.
    state = PoolState(now=0, queued=12, running=8, workers=pool(U, U), queued_work_seconds=800)
    assert p.decide(state).launch == 0
    # 4000 task-seconds = 500 s: a new worker helps.
    assert p.decide(PoolState(now=0, queued=12, running=8, workers=pool(U, U), queued_work_seconds=4000)).launch == 3


# scale down ----------------------------------------------------------------------------------
def test_idle_workers_go_only_after_the_cooldown_longest_idle_first():
    p = policy(cooldown_seconds=300, keep_warm=False)
    workers = (WorkerView("a", I, 100.0), WorkerView("b", I, 50.0), WorkerView("c", U))
    assert p.decide(PoolState(now=300, queued=0, running=1, workers=workers)).release == ()
    d = p.decide(PoolState(now=360, queued=0, running=1, workers=workers))
    assert d.release == ("b",) and d.target == 2
    assert p.decide(PoolState(now=400, queued=0, running=1, workers=workers)).release == ("b", "a")


def test_busy_workers_are_never_released():
    d = policy(cooldown_seconds=0).decide(PoolState(now=100, queued=0, running=0, workers=pool(U, U)))
    assert d.release == () and d.cancel == ()


def test_booting_workers_are_cancelled_first_when_demand_disappears():
    # The work ended while 3 VMs boot: deleting a VM in BUILD costs nothing, so all 3 go at once,
    # without waiting for a cooldown; the busy one stays.
    p = policy(cooldown_seconds=300)
    d = p.decide(PoolState(now=10, queued=0, running=1, workers=pool(U, B, B, B)))
    assert d.cancel == ("w3", "w2", "w1") and d.release == () and d.target == 1
    # Demand for 2 workers (8 tasks) with 1 up and 3 booting: only the surplus goes, newest first.
    d = p.decide(PoolState(now=10, queued=4, running=4, workers=pool(U, B, B, B)))
    assert d.cancel == ("w3", "w2") and d.target == 2
    # Booting ones go before idle ones: nothing is released while a cancel covers the surplus.
    d = policy(cooldown_seconds=0).decide(PoolState(now=100, queued=0, running=0, workers=pool(I, B)))
    assert d.cancel == ("w1",) and d.release == ("w0",) and d.target == 0


def test_an_idle_worker_is_kept_warm_when_work_returns_sooner_than_a_reboot():
    p = policy(cooldown_seconds=60, boot_seconds=180)
    state = PoolState(now=1000, queued=0, running=0, workers=pool(I, idle_since=0), next_work_in=120)
    d = p.decide(state)
    assert d.release == () and d.keep_warm == ("w0",) and "sooner than a 180 s boot" in d.reason
    later = PoolState(now=1000, queued=0, running=0, workers=pool(I, idle_since=0), next_work_in=600)
    assert p.decide(later).release == ("w0",)


# the forecast and the baselines -----------------------------------------------------------------
def test_the_forecast_expects_the_next_burst_one_median_gap_after_the_last():
    f = ArrivalForecast()
    for t, q in [(0, 5), (10, 0), (100, 3), (120, 0), (200, 4), (210, 0)]:
        f.observe(t, q, 0)
    assert f.starts == [0, 100, 200]
    assert f.next_work_in(250) == 50
    assert f.next_work_in(400) == 0.0  # overdue
    f.observe(401, 1, 0)  # the 4th burst: the next is expected a median gap (100 s) after it
    assert f.starts[-1] == 401 and f.next_work_in(402) == 99


@pytest.mark.parametrize("idle_for", [600, 3600, 24 * 3600])
def test_an_overdue_forecast_expires_and_idle_workers_are_released(idle_for):
    # Bursts every 100 s, then the work stops. Before the fix the forecast floored at 0 ("work
    # any second now"), sooner than a 180 s boot, so both idle workers were kept for ever.
    f = ArrivalForecast()
    for t, q in [(0, 5), (10, 0), (100, 3), (110, 0), (200, 4), (210, 0)]:
        f.observe(t, q, 0)
    p = policy(cooldown_seconds=60, boot_seconds=180)
    now = 210 + idle_for
    idle = pool(I, I, idle_since=210)
    d = p.decide(PoolState(now=now, queued=0, running=0, workers=idle, next_work_in=f.next_work_in(now)))
    assert d.release == ("w0", "w1") and d.keep_warm == () and d.target == 0
    # ...while a burst only a little late (within one usual gap) still keeps them warm.
    assert f.next_work_in(350) == 0.0
    assert p.decide(PoolState(now=350, queued=0, running=0, workers=idle, next_work_in=0.0)).keep_warm == ("w0", "w1")
    f.observe(now + 1, 2, 0)  # work is back: the forecast resumes from the new burst
    assert f.next_work_in(now + 2) is not None


def test_no_forecast_before_two_bursts():
    f = ArrivalForecast()
    f.observe(0, 1, 0)
    f.observe(5, 0, 0)
    assert f.next_work_in(6) is None


def test_the_baselines_are_configurations_of_the_same_policy():
    static = ScalingPolicy(static_config(6, flavor="m3.quad"))
    assert static.decide(PoolState(now=0, queued=0, running=0)).launch == 6
    assert static.decide(PoolState(now=9999, queued=0, running=0, workers=pool(*[I] * 6))).release == ()
    slurm = ScalingPolicy(slurm_suspend_config(8, flavor="m3.quad"))
    assert slurm.decide(PoolState(now=0, queued=32, running=0)).launch == 8  # every node at once
    assert slurm.decide(PoolState(now=61, queued=0, running=0, workers=pool(I, idle_since=0),
                                  next_work_in=1)).release == ("w0",)  # no keep-warm
    dask = idle_timeout_config(8, flavor="m3.quad")
    assert dask.cooldown_seconds == 3.0


def test_time_scaling_divides_every_duration():
    c = with_time_scale(ScalingConfig(cooldown_seconds=600, boot_seconds=120), 60)
    assert (c.cooldown_seconds, c.boot_seconds, c.idle.park_when_back_within_seconds) == (10, 2, 60)


# the pool's reconciliation table --------------------------------------------------------------
def test_the_worker_table_covers_every_situation_and_reads_right():
    from itertools import product

    from slipstream.scaling.pool import WORKER_TABLE, Link, VmState, Want, WorkerAction, WorkerObservation

    for vm, link, want in product(VmState, Link, Want):  # no UnhandledState for any combination
        WORKER_TABLE.action_for(WorkerObservation("w", vm, link, want))
    act = lambda *key: WORKER_TABLE.action_for(WorkerObservation("w", *key))  # noqa: E731
    assert act(VmState.UP, Link.JOINED, Want.RELEASE) == WorkerAction.RELEASE
    assert act(VmState.UP, Link.LATE, Want.KEEP) == WorkerAction.DELETE
    assert act(VmState.FAILED, Link.NOT_YET, Want.KEEP) == WorkerAction.DELETE
    assert act(VmState.PARKED, Link.NOT_YET, Want.UNPARK) == WorkerAction.UNPARK
    assert act(VmState.PARKED, Link.NOT_YET, Want.KEEP) == WorkerAction.NOTHING
    assert act(VmState.GONE, Link.JOINED, Want.KEEP) == WorkerAction.FORGET
    assert ("vm up + worker joined + policy releases it", "release (idle policy: park or delete)") in WORKER_TABLE.describe()
