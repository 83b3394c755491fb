"""The budget watchdog on real LocalCloud VMs: thresholds once each, in order; teardown when spent;
a bad round survived; stoppable and deadline-bounded."""

from __future__ import annotations

import threading

import pytest

from slipstream.cost.accounting import meter_servers
from slipstream.cloud.models import ServerSpec
from slipstream.cloud.waiting import wait_for_servers
from slipstream.ownership.lease import Lease, teardown_run
from slipstream.ownership.ledger import Ledger
from slipstream.cost.watchdog import BudgetWatchdog
from support import owner, wait_until

G3_MEDIUM_SU_PER_SECOND = 16 / 3600  # 8 vCPU x 2 SU


@pytest.fixture
def running(local_cloud, tmp_path):
    """One ACTIVE g3.medium held by a lease; yields (cloud, lease, server)."""
    who = owner("watchdog")
    with Lease(local_cloud, who, ledger=Ledger(tmp_path / "ledger.db")) as lease:
        (server,) = lease.create_servers(ServerSpec("burn", "g3.medium", "slipstream-noop"))
        wait_for_servers(local_cloud, who.run_id, [server.id], timeout=30, poll_interval=0.05)
        yield local_cloud, lease, server
    assert lease.proof.clean, lease.proof.summary()


def test_thresholds_fire_once_each_in_order_then_the_run_is_torn_down(running):
    cloud, lease, server = running
    run_id = lease.owner.run_id
    budget = 0.01  # 2.25 s of a g3.medium
    crossed: list[tuple[float, float]] = []
    spent_calls: list[float] = []
    torn_down = threading.Event()

    def on_exhausted(spent: float, budget_su: float) -> None:
        spent_calls.append(spent)
        proof = teardown_run(cloud, run_id, ledger=lease.ledger)
        assert proof.clean, proof.summary()
        torn_down.set()

    with BudgetWatchdog(cloud, run_id, budget, thresholds=(0.9, 0.5, 0.8), interval=0.05,
                        on_threshold=lambda f, s, b: crossed.append((f, s)), on_exhausted=on_exhausted) as dog:
        wait_until(torn_down.is_set, timeout=30, what="teardown after the budget was spent")
    assert [f for f, _ in crossed] == [0.5, 0.8, 0.9]
    assert all(spent >= f * budget for f, spent in crossed)
    assert len(spent_calls) == 1 and spent_calls[0] >= budget
    # It acts within about one round of the budget running out, not minutes later.
    assert spent_calls[0] < budget + G3_MEDIUM_SU_PER_SECOND * 1.0
    assert dog.exhausted and not dog.running
    assert cloud.list_servers(run_id=run_id) == []
    # What the watchdog saw is what the meter says the server cost (it stopped being charged).
    (metered,) = meter_servers(cloud, [(server.id, server.name, server.flavor)])
    assert metered.su == pytest.approx(dog.spent, abs=G3_MEDIUM_SU_PER_SECOND * 1.0)


def test_a_failed_round_is_logged_and_the_next_round_carries_on(running, caplog):
    cloud, lease, _ = running
    cloud.fail_next("list_servers", 2)
    fired = threading.Event()
    with BudgetWatchdog(cloud, lease.owner.run_id, 0.002, interval=0.05,
                        on_exhausted=lambda s, b: fired.set()) as dog:
        wait_until(fired.is_set, timeout=30, what="the budget spent despite two failed rounds")
    assert dog.failed_rounds == 2 and dog.rounds >= 1
    assert "budget check of run" in caplog.text and "will try again" in caplog.text


def test_stop_ends_the_watch_promptly_and_nothing_fires_under_budget(running):
    cloud, lease, _ = running
    calls: list = []
    dog = BudgetWatchdog(cloud, lease.owner.run_id, 1000.0, interval=0.05,
                         on_threshold=lambda *a: calls.append(a), on_exhausted=lambda *a: calls.append(a)).start()
    wait_until(lambda: dog.rounds >= 3, timeout=30, what="three metering rounds")
    assert dog.su_per_hour == 16.0  # one ACTIVE g3.medium
    dog.stop(timeout=5)
    assert not dog.running and calls == [] and not dog.exhausted


def test_the_watch_ends_by_itself_at_its_deadline(running):
    cloud, lease, _ = running
    dog = BudgetWatchdog(cloud, lease.owner.run_id, 1000.0, interval=0.05, max_seconds=0.3).start()
    wait_until(lambda: not dog.running, timeout=10, what="the watchdog's own deadline")
    assert dog.rounds >= 1 and not dog.exhausted


@pytest.mark.parametrize(("kwargs", "message"), [({"budget_su": 0}, "budget_su must be positive"),
                                                 ({"budget_su": 1, "interval": 0}, "interval must be positive")])
def test_bad_settings_are_refused(local_cloud, kwargs, message):
    with pytest.raises(ValueError, match=message):
        BudgetWatchdog(local_cloud, "run", **kwargs)
