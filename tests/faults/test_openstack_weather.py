"""The fault matrix on real OpenStack: the lab's Nova, Neutron and Cinder under Jetstream2 weather.

The lab's services are instant and never flaky, so the weather is added at the HTTP layer in
front of them (tests/http_faults.py): a 503 burst from the load balancer, Cinder's background
delete on a busy backend, Nova's MaxRetriesExceeded and its late fault, an unshelve Nova finds no
host for. Cinder's quota answer, two runs racing for the SSH group and a fallback into a cloud
without the run's key are the lab's (and LocalCloud's) own. Every case that creates proves its
teardown (empty proof), as the rest of the matrix does.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contract"))

from http_faults import CINDER_INVALID_VOLUME, canned, http_faults, rewritten
from openstack_lab import (  # noqa: F401  (the fixtures register themselves by import)
    NO_HOST_FLAVOR,
    lab_admin_cloud_fixture,
    lab_cloud_fixture,
    lab_lease_fixture,
    no_host_flavor_fixture,
    open_lab_cloud,
)
from support import embedded_region, owner as new_owner

from slipstream.cloud.errors import CapacityError, InvalidRequest, QuotaExceeded
from slipstream.cloud.fallback import Candidate, create_with_fallback
from slipstream.cloud.models import LeaseRenewal, ServerSpec, ServerStatus
from slipstream.cloud.waiting import wait_for_servers
from slipstream.jetstream2 import DEFAULT_IMAGE
from slipstream.ownership.lease import Lease, teardown_run
from slipstream.ownership.ledger import Ledger

pytestmark = pytest.mark.lab
S = ServerStatus
#: Cinder's answer to deleting a volume that is still `creating` (cinder/volume/api.py, Zed).
CINDER_BUSY = CINDER_INVALID_VOLUME


@pytest.fixture
def owner():
    return new_owner("weather")


@pytest.fixture
def lease(lab_lease):
    return lab_lease


@pytest.fixture(scope="module")
def tiny(lab_cloud) -> str:
    flavors = [f for f in lab_cloud.list_flavors() if f.gpus == 0 and f.name != NO_HOST_FLAVOR]
    return min(flavors, key=lambda f: (f.vcpus, f.ram_mb)).name


def boot(lab_cloud, lease, owner, spec: ServerSpec, status=S.ACTIVE):
    servers = lease.create_servers(spec)
    return wait_for_servers(lab_cloud, owner.run_id, [s.id for s in servers], status=status,
                            timeout=120, poll_interval=0.5)


# --- 503 burst during a boot wait -------------------------------------------------------------

def test_a_503_burst_during_a_boot_wait_is_ridden_out_honouring_retry_after(lab_cloud, lease, owner, tiny):
    """A 6-second 503 burst with Retry-After: 2 while a batch boots: the wait rides it out (the
    read retry alone gives up after ~3 s) and never asks sooner than the balancer allowed."""
    servers = lease.create_servers(ServerSpec("burst", tiny, DEFAULT_IMAGE, count=2))
    with http_faults(lab_cloud) as faults:
        burst = faults.burst("GET", r"/servers/detail", seconds=6, retry_after=2)
        ready = wait_for_servers(lab_cloud, owner.run_id, [s.id for s in servers], timeout=120,
                                 poll_interval=0.2)
    assert [s.status for s in ready] == [S.ACTIVE, S.ACTIVE]
    in_burst = [t for t in burst.hits if t < burst.until]
    assert len(in_burst) >= 3, "the burst must have hit the wait several times"
    gaps = [b - a for a, b in zip(in_burst, in_burst[1:])]
    assert min(gaps) >= 2 * 0.95, f"Retry-After: 2 was not honoured: {gaps}"


# --- lease renewal ----------------------------------------------------------------------------

def test_a_server_deleted_during_a_renewal_costs_the_others_nothing(lab_cloud, lease, owner, tiny):
    """An elastic pool deletes a worker between the renewal's listing and its update: Nova
    answers 404 for that one. The beat stopped there, so the run's other servers and volumes
    were not renewed, and a run that kept scaling could let its lease run out while it worked."""
    servers = boot(lab_cloud, lease, owner, ServerSpec("renewed", tiny, DEFAULT_IMAGE, count=2))
    volume = lease.create_volume("renewed", 1)
    _wait_available(lab_cloud, owner, volume.id)
    now = datetime.now(UTC).replace(microsecond=0)
    renewal = LeaseRenewal(now + timedelta(hours=3), now, "weather-host")
    with http_faults(lab_cloud) as faults:
        gone = faults.add("POST", r"/servers/[0-9a-f-]{36}/metadata$", lambda request, forward: canned(
            request, 404, {"itemNotFound": {"code": 404, "message": "Instance could not be found."}})
            if not gone.hits[1:] else forward())
        renewed = lab_cloud.renew_lease(owner.run_id, renewal, due_before=renewal.expires_at)
    assert len(gone.hits) == 2 and renewed == 2  # the "deleted" one skipped, the other server and the volume renewed
    held = [*lab_cloud.list_servers(owner.run_id), *lab_cloud.list_volumes(owner.run_id)]
    assert sorted(h.ownership.expires_at == renewal.expires_at for h in held) == [False, True, True]
    assert {s.id for s in servers} == {s.id for s in lab_cloud.list_servers(owner.run_id)}


# --- Cinder -----------------------------------------------------------------------------------

def _wait_available(cloud, owner, volume_id):
    deadline = time.monotonic() + 60
    while (v := next(v for v in cloud.list_volumes(owner.run_id) if v.id == volume_id)).status != "available":
        assert time.monotonic() < deadline, f"volume still {v.status}"
        time.sleep(0.3)


def test_a_slow_cinder_delete_is_waited_for_and_the_proof_is_clean(lab_cloud, owner, tmp_path):
    """Cinder accepts the delete and works in the background: the proof waits for the volume to
    go instead of counting it while it is `deleting`."""
    with http_faults(lab_cloud) as faults:
        with Lease(lab_cloud, owner, ledger=Ledger(tmp_path / "l.db"), delete_timeout=60) as lease:
            volume = lease.create_volume("slow", 1)
            _wait_available(lab_cloud, owner, volume.id)
            slow = faults.slow_cinder_delete(seconds=4)
            started = time.monotonic()
    assert lease.proof.clean and not lease.proof.errors, lease.proof.summary()
    assert [d.id for d in lease.proof.deleted] == [volume.id]
    assert slow.listed_deleting, "the proof's wait saw Cinder's `deleting` status"
    assert time.monotonic() - started >= 4
    assert lab_cloud.list_volumes(owner.run_id) == []


def test_a_volume_cinder_is_still_creating_is_deleted_once_it_may_be(lab_cloud, owner, tmp_path):
    """Cinder refuses (400) to delete a volume that is `creating`; the teardown asks again."""
    with http_faults(lab_cloud) as faults:
        busy = faults.cinder_busy_once(CINDER_BUSY)
        with Lease(lab_cloud, owner, ledger=Ledger(tmp_path / "l.db"), delete_timeout=60) as lease:
            volume = lease.create_volume("fresh", 1)
    assert len(busy.hits) >= 2, "refused once, then deleted"
    assert lease.proof.clean and not lease.proof.errors, lease.proof.summary()
    assert [d.id for d in lease.proof.deleted] == [volume.id]


def _stuck_volumes(lab_cloud, owner, tmp_path, status: str, *, count: int, delete_timeout: float):
    """Volumes the lease made, then held by Cinder in ``status`` while the lease tears down:
    (the lease, the DELETE rule, seconds its teardown took). Really deleted afterwards."""
    ledger = Ledger(tmp_path / "l.db")
    try:
        with http_faults(lab_cloud) as faults:
            with Lease(lab_cloud, owner, ledger=ledger, delete_timeout=delete_timeout) as lease:
                volumes = [lease.create_volume(f"stuck-{i}", 1) for i in range(count)]
                for volume in volumes:
                    _wait_available(lab_cloud, owner, volume.id)
                stuck = faults.cinder_stuck({v.id for v in volumes}, status)
                started = time.monotonic()
            took = time.monotonic() - started
    finally:  # Cinder recovers (the operator reset it): the run's volumes really go
        assert teardown_run(lab_cloud, owner.run_id, ledger=ledger).clean
    return lease, stuck, took


def test_volumes_cinder_is_already_deleting_are_waited_for_together_not_one_by_one(lab_cloud, owner, tmp_path):
    """A teardown run again (the reaper, a cancelled run's hook) finds volumes Cinder is still
    deleting; Cinder refuses another delete of each. That refusal means "at work": each is asked
    once, and all are waited for together for one delete_timeout — not retried one after another
    for a delete_timeout each (eight stuck worker volumes: 40 minutes of teardown)."""
    lease, stuck, took = _stuck_volumes(lab_cloud, owner, tmp_path, "deleting", count=3, delete_timeout=3)
    assert len(stuck.hits) == 3, "one delete per volume: Cinder is already deleting them"
    assert not lease.proof.clean
    errors = " ".join(lease.proof.errors)
    assert errors.count("(deleting)") == 3, errors
    assert took < 2 * 3, f"one shared wait, not one per volume ({took:.1f} s)"


def test_a_volume_stuck_in_error_deleting_is_reported_at_once_not_retried(lab_cloud, owner, tmp_path):
    """`error_deleting`: Cinder's backend failed the delete and only an admin can reset it;
    asking again for delete_timeout only delays the report that says so."""
    lease, stuck, took = _stuck_volumes(lab_cloud, owner, tmp_path, "error_deleting", count=1, delete_timeout=20)
    assert len(stuck.hits) == 1
    text = " ".join(lease.proof.errors)
    assert "error_deleting" in text and "reset" in text, text
    assert took < 10, f"reported at once ({took:.1f} s)"


def test_a_503_burst_during_teardown_is_ridden_out_and_the_proof_is_clean(lab_cloud, owner, tmp_path):
    """The balancer answers 503 (no Retry-After) for 8 s just as the run ends: the deletes are
    asked again until the lease's delete_timeout, not given up after the read retry's ~3 s
    (which leaves the run's resources billing until someone runs the reaper)."""
    ledger = Ledger(tmp_path / "l.db")
    try:
        with http_faults(lab_cloud) as faults:
            with Lease(lab_cloud, owner, ledger=ledger, delete_timeout=60) as lease:
                volume = lease.create_volume("weathered", 1)
                _wait_available(lab_cloud, owner, volume.id)
                burst = faults.burst("DELETE", r"/volumes/[0-9a-f-]{36}", seconds=8)
        assert sum(t < burst.until for t in burst.hits) >= 2, "the deletes met the burst"
        assert lease.proof.clean and not lease.proof.errors, (lease.proof.summary(), lease.proof.errors)
        assert [d.id for d in lease.proof.deleted] == [volume.id]
    finally:
        assert teardown_run(lab_cloud, owner.run_id, ledger=ledger).clean


def test_cinder_quota_is_a_quota_error_not_a_transient_one(lab_cloud, lease, owner):
    """Cinder answers quota with 413 *and* Retry-After: 0 (the lab's real answer)."""
    with pytest.raises(QuotaExceeded) as caught:
        lease.create_volume("greedy", 5000)
    assert "gigabytes" in str(caught.value) and "request a larger quota" in str(caught.value)
    assert lab_cloud.list_volumes(owner.run_id) == []


# --- Nova's capacity answers -------------------------------------------------------------------

def max_retries(server: dict) -> dict:
    """The fault Nova writes when every host it tried failed the build (nova/conductor/manager.py:
    MaxRetriesExceeded), in place of the lab's "No valid host"."""
    return {"code": 500, "created": server.get("updated"),
            "message": "Exceeded maximum number of retries. Exhausted all hosts available for "
                       f"retrying build failures for instance {server['id']}."}


def test_max_retries_exceeded_on_a_gpu_flavour_falls_back_to_the_next(lab_cloud, lease, owner, no_host_flavor, tiny):
    with http_faults(lab_cloud) as faults:
        faults.nova_fault(lambda server: max_retries(server))
        result = create_with_fallback(
            ServerSpec("vgpu", no_host_flavor, DEFAULT_IMAGE),
            [Candidate(lease, no_host_flavor), Candidate(lease, tiny)],
            boot_timeout=120, poll_interval=0.5)
    assert result.candidate.flavor == tiny and [s.status for s in result.servers] == [S.ACTIVE]
    ((failed, error),) = result.failures
    assert failed.flavor == no_host_flavor and "Exceeded maximum number of retries" in error.message


def test_error_before_novas_fault_is_written_is_read_again(lab_cloud, lease, owner, no_host_flavor):
    """Nova sets ERROR a moment before it writes the fault: the first reads show none."""
    hidden = {"reads": 0}

    def late(server: dict) -> dict | None:
        hidden["reads"] += 1
        return None if hidden["reads"] <= 2 else server.get("fault")

    (server,) = lease.create_servers(ServerSpec("late-fault", no_host_flavor, DEFAULT_IMAGE))
    with http_faults(lab_cloud) as faults, pytest.raises(CapacityError) as caught:
        faults.nova_fault(late)
        wait_for_servers(lab_cloud, owner.run_id, [server.id], timeout=60, poll_interval=0.3)
    assert hidden["reads"] > 2 and "No valid host" in caught.value.fault


def test_an_unshelve_without_a_host_fails_at_once_and_the_server_stays_shelved(lab_cloud, lease, owner, tiny):
    """Nova's conductor, finding no host for an unshelve, only clears the task state: the server
    stays SHELVED_OFFLOADED, no fault, no ERROR; its `unshelve` instance action ends in Error.
    Here the unshelve request is answered as Nova's API answers it (202) and its action as the
    conductor leaves it, on top of the lab's real action list."""
    (server,) = boot(lab_cloud, lease, owner, ServerSpec("shelf", tiny, DEFAULT_IMAGE))
    lab_cloud.shelve_server(server.id)
    wait_for_servers(lab_cloud, owner.run_id, [server.id], status=S.SHELVED_OFFLOADED, timeout=120,
                     poll_interval=0.5)

    def no_host(request, forward):
        body = request.body or b""
        return canned(request, 202) if b"unshelve" in (body if isinstance(body, bytes) else body.encode()) \
            else forward()

    def failed_unshelve(body: dict) -> None:
        actions = body["instanceActions"]
        shelve = next(a for a in actions if a["action"] == "shelve")
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
        actions.insert(0, {**shelve, "action": "unshelve", "message": "Error", "start_time": now,
                           "updated_at": now, "request_id": f"req-{uuid.uuid4()}"})

    with http_faults(lab_cloud) as faults:
        faults.add("POST", rf"/servers/{server.id}/action$", no_host)
        faults.add("GET", rf"/servers/{server.id}/os-instance-actions$",
                   lambda request, forward: rewritten(forward(), failed_unshelve))
        lab_cloud.unshelve_server(server.id)
        started = time.monotonic()
        with pytest.raises(CapacityError) as caught:
            wait_for_servers(lab_cloud, owner.run_id, [server.id], timeout=90, poll_interval=0.5)
    assert time.monotonic() - started < 15, "failed fast, not at the wait's timeout"
    assert "unshelve" in str(caught.value) and "SHELVED_OFFLOADED" in str(caught.value)
    assert lab_cloud.get_server(server.id).status == S.SHELVED_OFFLOADED


# --- Neutron: two runs racing for the SSH group --------------------------------------------------

@pytest.fixture
def ssh_range(lab_cloud):
    """A /32 of a documentation range nobody else uses, so the SSH group's name is fresh; its
    groups are removed after the test's lease (requested after this fixture) has deleted the server."""
    cidr = f"203.0.113.{uuid.uuid4().int % 250 + 1}/32"
    name = "slipstream-ssh-" + cidr.replace(".", "-").replace("/", "-")
    yield cidr, name
    network = lab_cloud.conn.network
    for group in network.security_groups(name=name):
        network.delete_security_group(group, ignore_missing=True)


def test_two_runs_racing_for_the_ssh_group_settle_on_one_that_nova_accepts(ssh_range, lab_cloud, lease, owner, tiny):
    """Both runs look (nothing yet), both create. Each run gets a group Nova takes (by id), the
    younger duplicate is deleted by the run that made it, every later run settles on the oldest,
    and a server given the group's *name* boots (passed by name, Nova answers 409 "Multiple
    security groups found matching")."""
    cidr, name = ssh_range
    runs = [open_lab_cloud(), open_lab_cloud()]
    both_looked = threading.Barrier(2, timeout=30)
    ids: list[str | None] = [None, None]
    errors: list[BaseException] = []

    def ensure(i: int) -> None:
        try:
            ids[i] = runs[i].ensure_ssh_security_group(cidr)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    try:
        with http_faults(runs[0]) as first, http_faults(runs[1]) as second:
            for faults in (first, second):
                looks = {"n": 0}

                def first_look_waits(request, forward, looks=looks):
                    answer = forward()
                    looks["n"] += 1
                    if looks["n"] == 1:
                        both_looked.wait()  # neither run creates before both have looked
                    return answer

                faults.add("GET", rf"/security-groups\?.*name={name}", first_look_waits)
            threads = [threading.Thread(target=ensure, args=(i,)) for i in (0, 1)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
        assert not errors, errors
        groups = {g.id: g for g in lab_cloud.conn.network.security_groups(name=name)}
        assert set(ids) <= set(groups) and 1 <= len(groups) <= 2
        oldest = min(groups.values(), key=lambda g: (str(g.created_at), g.id))
        assert lab_cloud.ensure_ssh_security_group(cidr) == oldest.id, "later runs settle on the oldest"
        assert all(any(r["remote_ip_prefix"] == cidr and r["port_range_min"] == 22
                       for r in g.security_group_rules) for g in groups.values() if g.id in ids)
        (server,) = boot(lab_cloud, lease, owner, ServerSpec("guarded", tiny, DEFAULT_IMAGE,
                                                             security_groups=(name,)))
        assert [g["name"] for g in lab_cloud.conn.compute.get_server(server.id).security_groups] == [name]
    finally:
        for run in runs:
            run.close()


# --- fallback to a region without the key --------------------------------------------------------


def test_fallback_to_a_region_without_the_key_imports_the_runs_key_there(lab_cloud, owner, no_host_flavor, tmp_path):
    """The lab has no room (no valid host); the other region — an embedded cloud, which has its own
    keypairs as a real second region does — has never seen the run's key. The key is imported
    there through that region's lease, and both regions end empty."""
    other = embedded_region(tmp_path / "other-region")
    public_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl weather@test"
    ledger = Ledger(tmp_path / "l.db")
    try:
        with Lease(lab_cloud, owner, ledger=ledger, delete_timeout=120) as here, \
                Lease(other, owner, ledger=ledger, delete_timeout=60) as there:
            key = here.create_keypair(public_key)
            result = create_with_fallback(
                ServerSpec("keyed", no_host_flavor, DEFAULT_IMAGE, key_name=key.name),
                [Candidate(here, no_host_flavor), Candidate(there, "m3.tiny")],
                boot_timeout=120, poll_interval=0.5)
            assert result.candidate.lease is there and result.servers[0].key_name == key.name
            assert [k.public_key for k in other.list_keypairs(owner.run_id)] == [public_key]
        assert here.proof.clean and there.proof.clean, (here.proof.summary(), there.proof.summary())
        assert "keypair" in {d.kind.value for d in there.proof.deleted}
    finally:
        other.reset()


def test_fallback_with_the_users_own_key_in_every_region_is_not_refused(lab_cloud, owner, no_host_flavor, tmp_path):
    """A researcher's own keypair (imported by hand into each region, not slipstream's) is in both
    regions: the fallback goes ahead instead of calling it missing, and touches neither copy."""
    other = embedded_region(tmp_path / "other-region")
    public_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl mine@test"
    mine = f"my-laptop-{uuid.uuid4().hex[:8]}"
    lab_cloud.conn.compute.create_keypair(name=mine, public_key=public_key)  # as `openstack keypair create`
    other.create_keypair(mine, public_key)
    ledger = Ledger(tmp_path / "l.db")
    try:
        with Lease(lab_cloud, owner, ledger=ledger, delete_timeout=120) as here, \
                Lease(other, owner, ledger=ledger, delete_timeout=60) as there:
            result = create_with_fallback(
                ServerSpec("mine", no_host_flavor, DEFAULT_IMAGE, key_name=mine),
                [Candidate(here, no_host_flavor), Candidate(there, "m3.tiny")],
                boot_timeout=120, poll_interval=0.5)
            assert result.candidate.lease is there and result.servers[0].key_name == mine
        assert here.proof.clean and there.proof.clean, (here.proof.summary(), there.proof.summary())
        assert lab_cloud.conn.compute.find_keypair(mine) is not None, "the user's own key is left alone"
    finally:
        lab_cloud.conn.compute.delete_keypair(mine, ignore_missing=True)
        other.reset()


def test_fallback_to_a_region_without_the_users_own_key_is_refused_naming_it(lab_cloud, owner, tiny, tmp_path):
    """The user's own key exists only in the first region: refused up front, naming key and region."""
    first = embedded_region(tmp_path / "first-region", no_capacity=("g3.large",))
    mine = f"my-laptop-{uuid.uuid4().hex[:8]}"
    first.create_keypair(mine, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a@b")
    ledger = Ledger(tmp_path / "l.db")
    try:
        with Lease(first, owner, ledger=ledger) as there, \
                Lease(lab_cloud, owner, ledger=ledger, delete_timeout=120) as here:
            with pytest.raises(InvalidRequest) as caught:
                create_with_fallback(
                    ServerSpec("mine", "g3.large", DEFAULT_IMAGE, key_name=mine),
                    [Candidate(there, "g3.large"), Candidate(here, tiny)],
                    boot_timeout=120, poll_interval=0.5)
        assert f"cannot fall back to {lab_cloud.name}" in str(caught.value) and mine in str(caught.value)
        assert first.server_history(owner.run_id) == [], "nothing was tried before the refusal"
    finally:
        first.reset()


def test_fallback_to_a_region_without_the_security_group_is_refused_before_anything_is_tried(
        lab_cloud, owner, tiny, tmp_path):
    """Security groups belong to one region: a spec naming one the lab lacks is refused up front,
    before the first region is even tried — not after its capacity ran out."""
    first = embedded_region(tmp_path / "first-region", no_capacity=("g3.large",))
    missing = f"only-in-another-region-{uuid.uuid4().hex[:8]}"
    ledger = Ledger(tmp_path / "l.db")
    try:
        with Lease(first, owner, ledger=ledger) as there, \
                Lease(lab_cloud, owner, ledger=ledger, delete_timeout=120) as here:
            with pytest.raises(InvalidRequest) as caught:
                create_with_fallback(
                    ServerSpec("grouped", "g3.large", DEFAULT_IMAGE, security_groups=(missing,)),
                    [Candidate(there, "g3.large"), Candidate(here, tiny)],
                    boot_timeout=120, poll_interval=0.5)
        text = str(caught.value)
        assert f"cannot fall back to {lab_cloud.name}" in text and missing in text
        assert "belong to one region" in text
        assert first.server_history(owner.run_id) == [], "nothing was tried before the refusal"
        assert there.proof.clean and here.proof.clean
    finally:
        first.reset()
