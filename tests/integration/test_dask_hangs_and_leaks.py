"""CloudDaskCluster against a cloud that refuses, dawdles or kills: real Dask workers on LocalCloud
VMs. A quota of 0 must fail the run with the cloud's words instead of hanging; the health check
must run under ``scale()`` alone; closing while create calls are in flight must leave no VM."""

from __future__ import annotations

import time

import distributed
import pytest

from slipstream.cloud.local import LocalCloud, LocalCloudOptions
from slipstream.cloud.local.options import FaultOptions
from slipstream.dask_cluster import CloudDaskCluster
from slipstream.dask_workers import MAX_BROKEN_IN_A_ROW, NoWorkerVMs
from slipstream.jetstream2 import Quotas
from tests.support import wait_until

FAST = {"batch_size": 1, "cooldown_seconds": 1.0, "boot_seconds": 0.0, "flavor": "m3.small"}


def joined(cluster) -> list[str]:
    return sorted(w["name"] for w in cluster.scheduler_info["workers"].values())


def own_cloud(tmp_path, network: str, **options) -> LocalCloud:
    return LocalCloud(options=LocalCloudOptions(home=tmp_path / "lc", boot_delay=0.2, stop_grace=1.0,
                                                network=network, **options))


@pytest.mark.parametrize("sizing", ["adapt", "scale"])
def test_a_quota_of_zero_fails_the_waiting_work_with_the_clouds_words_instead_of_hanging(tmp_path, sizing):
    cloud = own_cloud(tmp_path, "127.64.253.0/24",
                      quotas=Quotas(instances=0, cores=150, ram_mb=600_000, floating_ips=10))
    try:
        with CloudDaskCluster(cloud, image="slipstream-noop", scaling={**FAST, "max_workers": 2},
                              give_up_seconds=2.0) as cluster:
            if sizing == "adapt":
                cluster.adapt(minimum=0, maximum=2, interval="0.2s")
            else:
                cluster.scale(2)
            started = time.monotonic()
            with distributed.Client(cluster) as client:
                future = client.submit(lambda: 1)
                with pytest.raises(NoWorkerVMs) as failed:
                    future.result(timeout=60)  # before: waited for ever (here: TimeoutError)
            assert time.monotonic() - started < 30
            message = str(failed.value)
            assert "no Dask worker VM could be created" in message and "uota" in message  # the cloud's words
            assert "give_up_seconds" in message  # and what to change
            assert cluster.launched == [] and not cloud.list_servers(run_id=cluster.run_id)
        assert cluster.teardown_proof.clean
    finally:
        cloud.reset()


def test_under_scale_alone_a_worker_vm_that_stops_by_itself_is_deleted_and_replaced(local_cloud):
    # Before: the health check ran only inside adapt(); under scale() a SHUTOFF VM (50 % of its
    # SUs) was kept until the cluster closed, and the computation lost its worker.
    with CloudDaskCluster(local_cloud, image="slipstream-noop", scaling={**FAST, "max_workers": 1},
                          cloud_check_seconds=0.3) as cluster:
        cluster.scale(1)
        wait_until(lambda: len(joined(cluster)) == 1, timeout=60, what="the worker joined")
        (victim,) = local_cloud.list_servers(run_id=cluster.run_id)
        local_cloud.stop_server(victim.id)
        wait_until(lambda: victim.id not in {s.id for s in local_cloud.list_servers(run_id=cluster.run_id)},
                   timeout=30, what="the stopped VM deleted")
        wait_until(lambda: len(joined(cluster)) == 1 and victim.name not in joined(cluster), timeout=60,
                   what="a replacement joined")
        with distributed.Client(cluster) as client:
            assert client.submit(lambda: 7).result(timeout=60) == 7
    assert cluster.teardown_proof.clean


def test_closing_while_create_calls_are_in_flight_leaves_no_vm_behind(tmp_path):
    # Create calls take 2 s. Before: adapt() kept launching while the close waited for the first
    # call, and VMs whose create returned after the teardown were never deleted (the closed
    # cluster's event loop never ran again), billing until the lease expired.
    cloud = own_cloud(tmp_path, "127.64.254.0/24", faults=FaultOptions(slow_calls={"create_servers": 2.0}))
    try:
        cluster = CloudDaskCluster(cloud, image="slipstream-noop", scaling={**FAST, "max_workers": 3})
        cluster.adapt(minimum=0, maximum=3, interval="0.1s")
        with distributed.Client(cluster) as client:
            futures = client.map(lambda i: time.sleep(30) or i, range(6), pure=False)  # noqa: F841 - demand
            pending = lambda: [e for e in cluster.lease.ledger.entries(cluster.run_id) if e.state == "pending"]  # noqa: E731
            wait_until(pending, timeout=15, what="a create call in flight")
            closing_at = time.time()
            cluster.close()
        wait_until(lambda: not pending(), timeout=30, what="every create call returned")
        wait_until(lambda: not cloud.list_servers(run_id=cluster.run_id), timeout=15,
                   what="the VMs created after the close deleted")
        asked_after = [e.name for e in cluster.lease.ledger.entries(cluster.run_id)
                       if e.recorded_at.timestamp() > closing_at]
        assert not asked_after, f"VMs asked for while the cluster was closing: {asked_after}"
        assert cluster.teardown_proof is not None
    finally:
        cloud.reset()


def test_workers_that_never_join_are_not_recreated_for_ever_and_the_work_fails(local_cloud):
    # A broken image: the VM boots, its Dask worker never starts. Before: the health check deleted
    # it after its boot deadline and the policy created another, for ever, each charged until its
    # deadline, while the computation waited.
    with CloudDaskCluster(local_cloud, image="slipstream-noop", scaling={**FAST, "max_workers": 1},
                          boot_timeout=1.0, cloud_check_seconds=0.2) as cluster:
        cluster.vms.pool.user_data = "#!/bin/sh\nexec sleep 300\n"  # what a broken image amounts to
        cluster.adapt(minimum=0, maximum=1, interval="0.2s")
        with distributed.Client(cluster) as client:
            with pytest.raises(NoWorkerVMs) as failed:
                client.submit(lambda: 1).result(timeout=90)
        assert "in a row were broken" in str(failed.value) and "never" not in str(failed.value).split("said:")[0]
        assert "had not joined" in str(failed.value)
        assert len(cluster.launched) == MAX_BROKEN_IN_A_ROW
        assert not local_cloud.list_servers(run_id=cluster.run_id)
    assert cluster.teardown_proof.clean


def test_a_worker_whose_shelve_keeps_failing_is_deleted_not_left_billing(local_cloud):
    # A 5xx burst on shelve outlasts the retries. Before: the release raised, and the VM (out of
    # the cluster's spec, not parked) stayed ACTIVE, at full price, until the cluster closed.
    scaling = {**FAST, "max_workers": 1, "idle": {"action": "shelve"}}
    with CloudDaskCluster(local_cloud, image="slipstream-noop", scaling=scaling) as cluster:
        cluster.adapt(minimum=0, maximum=1, interval="0.2s")
        cluster.vms.next_work_in = lambda: 60.0  # work expected back soon: the idle policy shelves
        local_cloud.fail_next("shelve_server", 20)
        with distributed.Client(cluster) as client:
            assert client.submit(lambda: 1).result(timeout=60) == 1
        wait_until(lambda: not local_cloud.list_servers(run_id=cluster.run_id), timeout=30,
                   what="the worker whose shelve failed deleted")
        assert not cluster.vms.pool.parked()
    assert cluster.teardown_proof.clean


def test_a_worker_cancelled_while_its_create_call_is_pending_is_deleted_when_the_call_returns(tmp_path):
    cloud = own_cloud(tmp_path, "127.64.250.0/24", faults=FaultOptions(slow_calls={"create_servers": 1.5}))
    try:
        with CloudDaskCluster(cloud, image="slipstream-noop", scaling={**FAST, "max_workers": 1}) as cluster:
            pending = lambda: [e for e in cluster.lease.ledger.entries(cluster.run_id) if e.state == "pending"]  # noqa: E731
            cluster.scale(1)
            wait_until(pending, timeout=15, what="the create call in flight")
            cluster.scale(0)  # demand gone before the cloud answered
            wait_until(lambda: not pending(), timeout=15, what="the create call returned")
            wait_until(lambda: not cloud.list_servers(run_id=cluster.run_id), timeout=15,
                       what="the VM made for a cancelled worker deleted")
            assert cluster.launched and not cluster.worker_spec
        assert cluster.teardown_proof.clean
    finally:
        cloud.reset()


def test_a_teardown_proof_is_never_clean_while_a_create_call_is_still_in_flight(tmp_path):
    # Before: closing waited a while for create calls, then the listing (which cannot see a VM the
    # cloud has not made yet) was reported as a clean teardown, and the VM appeared afterwards.
    cloud = own_cloud(tmp_path, "127.64.249.0/24", faults=FaultOptions(slow_calls={"create_servers": 3.0}))
    try:
        cluster = CloudDaskCluster(cloud, image="slipstream-noop", scaling={**FAST, "max_workers": 1})
        cluster.settle_seconds = 0.5  # a create call slower than the close is willing to wait
        pending = lambda: [e for e in cluster.lease.ledger.entries(cluster.run_id) if e.state == "pending"]  # noqa: E731
        cluster.scale(1)
        (entry,) = wait_until(pending, timeout=15, what="the create call in flight")
        cluster.close()
        assert not cluster.teardown_proof.clean
        assert any(entry.name in left for left in cluster.teardown_proof.remaining["server"])
        wait_until(lambda: not pending(), timeout=15, what="the create call returned")
        wait_until(lambda: not cloud.list_servers(run_id=cluster.run_id), timeout=15,
                   what="the VM made after the teardown deleted by its create call")
    finally:
        cloud.reset()


def test_refusals_while_our_own_worker_held_the_quota_do_not_fail_the_next_burst(tmp_path):
    # Room for one instance: the first burst wants two workers, the second create is refused.
    # Once our worker is released the quota is free again: the next burst must get a worker, not
    # a NoWorkerVMs for refusals that happened while that worker held the quota.
    cloud = own_cloud(tmp_path, "127.64.248.0/24", quotas=Quotas(instances=1, cores=150, ram_mb=600_000, floating_ips=10))
    try:
        with CloudDaskCluster(cloud, image="slipstream-noop", scaling={**FAST, "max_workers": 2},
                              give_up_seconds=2.0) as cluster:
            cluster.adapt(minimum=0, maximum=2, interval="0.2s")
            with distributed.Client(cluster) as client:
                burst = client.map(lambda i: time.sleep(1.5) or i, range(4), pure=False)
                wait_until(lambda: cluster.vms.failures, timeout=60, what="the second worker refused for quota")
                assert sum(client.gather(burst)) == 6
                del burst  # results no longer wanted: the idle worker may go
                wait_until(lambda: time.monotonic() - cluster.vms.failures[0].at > 3.0, timeout=10,
                           what="the refusals older than give_up_seconds")
                wait_until(lambda: not cloud.list_servers(run_id=cluster.run_id), timeout=30,
                           what="the idle worker released")
                assert client.submit(lambda: 5).result(timeout=60) == 5
        assert cluster.teardown_proof.clean
    finally:
        cloud.reset()
