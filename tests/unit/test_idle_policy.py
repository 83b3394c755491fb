"""The idle policy: park by shelving when work is back soon, delete otherwise, never suspend a GPU VM;
a shelved worker costs 0 SU on the meter and comes back on demand (real LocalCloud VMs)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from slipstream.cost.accounting import meter
from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.models import ServerStatus
from slipstream.jetstream2 import FLAVORS, su_per_hour
from slipstream.ownership.lease import Lease
from slipstream.scaling.idle import IdleAction, IdlePolicy
from slipstream.scaling.policy import ScalingConfig
from slipstream.scaling.pool import WorkerPool
from tests.support import owner, wait_until


def test_delete_is_the_default():
    assert IdlePolicy().on_release(next_work_in=10) == IdleAction.DELETE


def test_shelve_parks_only_when_work_is_expected_back_within_the_horizon():
    p = IdlePolicy(IdleAction.SHELVE, park_when_back_within_seconds=3600)
    assert p.on_release(next_work_in=600) == IdleAction.SHELVE
    assert p.on_release(next_work_in=7200) == IdleAction.DELETE
    assert p.on_release(next_work_in=None) == IdleAction.DELETE  # no forecast: do not gamble
    assert IdlePolicy(IdleAction.SHELVE, max_parked=1).on_release(10, parked_now=1) == IdleAction.DELETE
    assert p.parked_status == ServerStatus.SHELVED_OFFLOADED and p.parked_charge_fraction == 0.0
    assert p.parked_too_long(25 * 3600) and not p.parked_too_long(60)


@pytest.mark.parametrize("flavor", ["g3.medium", "g3.large", "r3.large"])
def test_suspending_a_gpu_or_large_memory_pool_is_refused_when_configured(flavor):
    with pytest.raises(InvalidRequest, match=f"'suspend' is not allowed for {flavor}.*never suspends GPU"):
        ScalingConfig(flavor=flavor, idle=IdlePolicy(IdleAction.SUSPEND))


def test_shelving_a_gpu_pool_is_fine():
    assert ScalingConfig(flavor="g3.medium", idle=IdlePolicy(IdleAction.SHELVE)).idle.parks


def test_an_unknown_action_names_the_valid_ones():
    with pytest.raises(InvalidRequest, match="delete, shelve, stop, suspend"):
        IdlePolicy("hibernate")  # type: ignore[arg-type]


def test_a_shelved_worker_costs_nothing_on_the_meter():
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    log = [(ServerStatus.BUILD, t0), (ServerStatus.ACTIVE, t0 + timedelta(minutes=1)),
           (ServerStatus.SHELVED_OFFLOADED, t0 + timedelta(hours=1, minutes=1)),
           (ServerStatus.ACTIVE, t0 + timedelta(hours=5, minutes=1)),
           (ServerStatus.DELETED, t0 + timedelta(hours=6, minutes=1))]
    assert meter(FLAVORS["m3.quad"], log) == pytest.approx(2 * su_per_hour(FLAVORS["m3.quad"]))


def test_parking_shelves_a_real_vm_and_unparking_brings_it_back(local_cloud):
    who = owner("idle")
    with Lease(local_cloud, who) as lease:
        pool = WorkerPool(lease, flavor="m3.small", image="slipstream-noop", prefix="idle",
                          idle=IdlePolicy(IdleAction.SHELVE))
        (server,) = pool.launch(1)
        pool.wait_active([server.name], timeout=30)
        assert pool.release(server.name, next_work_in=60) == IdleAction.SHELVE
        wait_until(lambda: local_cloud.get_server(server.id).status == ServerStatus.SHELVED_OFFLOADED,
                   what="the worker shelved")
        assert pool.parked() == [server.name]
        pool.unpark(server.name)
        pool.wait_active([server.name], timeout=30)
        assert pool.release(server.name, next_work_in=None) == IdleAction.DELETE
        wait_until(lambda: not local_cloud.list_servers(run_id=who.run_id), what="the worker deleted")
        history = local_cloud.state_log(server.id)
    assert lease.proof.clean
    statuses = [s for s, _ in history]
    assert ServerStatus.SHELVED_OFFLOADED in statuses and statuses[-1] == ServerStatus.DELETED
    # Metered over the real state log, the shelved interval is free: the SUs equal the ACTIVE time's.
    flavor = FLAVORS["m3.small"]
    active = sum((b[1] - a[1]).total_seconds() for a, b in zip(history, history[1:], strict=False)
                 if a[0] == ServerStatus.ACTIVE)
    assert meter(flavor, history) == pytest.approx(su_per_hour(flavor) * active / 3600)
    shelved = sum((b[1] - a[1]).total_seconds() for a, b in zip(history, history[1:], strict=False)
                  if a[0] == ServerStatus.SHELVED_OFFLOADED)
    assert shelved > 0
