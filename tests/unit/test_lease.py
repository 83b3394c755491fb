"""The Lease on the local cloud: whatever ends the block, nothing owned by the run remains."""

from __future__ import annotations

import pytest

from slipstream.cloud.models import Ownership, ServerSpec, ServerStatus
from slipstream.cloud.waiting import wait_for_servers
from slipstream.ownership.ledger import Ledger
from slipstream.ownership.lease import Lease
from slipstream.retry import RetryPolicy
from slipstream.ssh import generate_keypair

FAST_RETRY = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05)


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(tmp_path / "ledger.db")


def _fill(lease: Lease) -> list:
    lease.create_keypair(generate_keypair("t").public_key)
    servers = lease.create_servers(ServerSpec("w", "m3.tiny", "slipstream-noop", count=2))
    fip = lease.create_floating_ip()
    lease.cloud.attach_floating_ip(fip.id, servers[0].id)
    lease.create_volume("scratch", 10)
    return servers


def _nothing_owned(cloud, run_id: str) -> bool:
    return not (cloud.list_servers(run_id) or cloud.list_floating_ips(run_id)
                or cloud.list_volumes(run_id) or cloud.list_keypairs(run_id))


def test_success_deletes_everything_and_proves_it(local_cloud, ledger):
    owner = Ownership.new("lease-test")
    with Lease(local_cloud, owner, ledger=ledger) as lease:
        servers = _fill(lease)
        wait_for_servers(local_cloud, owner.run_id, [s.id for s in servers], timeout=30, poll_interval=0.05)
    assert lease.proof.clean, lease.proof.summary()
    assert set(lease.proof.remaining) == {"floating_ip", "server", "volume", "keypair"}
    assert sorted(r.kind.value for r in lease.proof.deleted) == [
        "floating_ip", "keypair", "server", "server", "volume"]
    assert _nothing_owned(local_cloud, owner.run_id)
    assert all(e.state == "deleted" for e in ledger.entries(owner.run_id))


@pytest.mark.parametrize("ending", [RuntimeError("the analysis crashed"), KeyboardInterrupt()])
def test_an_exception_or_ctrl_c_still_tears_down(local_cloud, ledger, ending):
    owner = Ownership.new("lease-test")
    with pytest.raises(type(ending)):
        with Lease(local_cloud, owner, ledger=ledger) as lease:
            _fill(lease)
            raise ending
    assert lease.proof.clean
    assert _nothing_owned(local_cloud, owner.run_id)
    assert local_cloud.server_history(owner.run_id)  # they existed, and are DELETED now
    assert all(h.deleted_at and h.log[-1][0] == ServerStatus.DELETED for h in local_cloud.server_history(owner.run_id))


def test_a_transient_delete_failure_is_retried(local_cloud, ledger):
    owner = Ownership.new("lease-test")
    with Lease(local_cloud, owner, ledger=ledger, retry_policy=FAST_RETRY) as lease:
        lease.create_servers(ServerSpec("solo", "m3.tiny", "slipstream-noop"))
        local_cloud.fail_next("delete_server", 3)
    assert lease.proof.clean
    assert not lease.proof.errors
    assert _nothing_owned(local_cloud, owner.run_id)


def test_resources_are_recorded_before_the_creating_call_returns(local_cloud, ledger):
    owner = Ownership.new("lease-test")
    seen_during_create = []
    real_create = local_cloud.create_servers

    def spying_create(spec, own):
        seen_during_create.extend(e.state for e in ledger.entries(owner.run_id))
        return real_create(spec, own)

    local_cloud.create_servers = spying_create
    with Lease(local_cloud, owner, ledger=ledger) as lease:
        lease.create_servers(ServerSpec("w", "m3.tiny", "slipstream-noop", count=3))
    assert seen_during_create == ["pending"] * 3


def test_a_retried_create_adopts_instead_of_duplicating(local_cloud, ledger):
    owner = Ownership.new("lease-test")
    with Lease(local_cloud, owner, ledger=ledger) as lease:
        first = lease.create_servers(ServerSpec("w", "m3.tiny", "slipstream-noop", count=2))
        again = lease.create_servers(ServerSpec("w", "m3.tiny", "slipstream-noop", count=2))
        assert [s.id for s in again] == [s.id for s in first]
        assert len(local_cloud.list_servers(owner.run_id)) == 2
    assert lease.proof.clean


def test_teardown_leaves_other_runs_and_foreign_resources_alone(local_cloud, ledger):
    other = Ownership.new("someone-else")
    with Lease(local_cloud, other, ledger=ledger) as keeper:
        keeper.create_servers(ServerSpec("keep", "m3.tiny", "slipstream-noop"))
        owner = Ownership.new("lease-test")
        with Lease(local_cloud, owner, ledger=ledger) as lease:
            lease.create_servers(ServerSpec("mine", "m3.tiny", "slipstream-noop"))
        assert lease.proof.clean
        assert [s.name for s in local_cloud.list_servers(other.run_id)] == ["keep"]
    assert keeper.proof.clean
