"""The provider contract: the same inputs give the same states and errors on every cloud.

Each case runs on LocalCloud and on the OpenStack lab (``cloud`` fixture). Each one that
creates something does it through a Lease whose teardown proof must come back empty.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from slipstream.cloud.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded
from slipstream.cloud.models import OWNER_TAG, Keypair, LeaseRenewal, ServerSpec, ServerStatus
from slipstream.cloud.waiting import wait_for_servers
from slipstream.ownership.lease import Lease
from slipstream.slurm.power import NodeBatch

BOOT_TIMEOUT = 300.0


def wait(cloud, owner, servers, status=ServerStatus.ACTIVE):
    return wait_for_servers(
        cloud,
        owner.run_id,
        [s.id for s in servers],
        status=status,
        timeout=BOOT_TIMEOUT,
        poll_interval=0.5,
    )


def wait_gone(cloud, owner, server_id, timeout=120.0):
    deadline = time.monotonic() + timeout
    while any(s.id == server_id for s in cloud.list_servers(run_id=owner.run_id)):
        assert time.monotonic() < deadline, (
            f"server {server_id} still listed {timeout:.0f} s after delete"
        )
        time.sleep(0.5)


def public_key() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return (
        key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).decode()
        + " contract@test"
    )


def statuses(log):
    return [status for status, _ in log]


def is_subsequence(wanted, seq):
    it = iter(seq)
    return all(any(x == w for x in it) for w in wanted)


# servers ---------------------------------------------------------------------------------
def test_a_batch_is_created_named_and_listed_by_its_owner(cloud, lease, owner, spec):
    servers = lease.create_servers(spec("batch", count=2))

    assert [s.name for s in servers] == ["batch-1", "batch-2"]
    listed = cloud.list_servers(run_id=owner.run_id)
    assert sorted(s.id for s in listed) == sorted(s.id for s in servers)
    for server in listed:
        assert OWNER_TAG in server.tags and owner.run_tag in server.tags
        stamped = server.ownership
        assert stamped is not None
        assert (stamped.run_id, stamped.pipeline, stamped.creator) == (
            owner.run_id,
            owner.pipeline,
            owner.creator,
        )
    assert {s.id for s in servers} <= {s.id for s in cloud.list_servers()}
    assert cloud.list_servers(run_id=f"t{uuid.uuid4().hex[:12]}") == []

    ready = wait(cloud, owner, servers)
    assert [s.status for s in ready] == [ServerStatus.ACTIVE] * 2
    assert all(s.address for s in ready)


def test_a_batch_can_name_each_of_its_servers(cloud, lease, owner, small_flavor, image):
    """Slurm's resume program creates exactly the nodes it was handed, in one batch: on Nova, which
    names a batch ``<name>-<i>``, the servers are renamed right after; waiting and listing see
    the node names."""
    nodes = NodeBatch("sw-2", small_flavor, image, count=3, names=("sw-2", "sw-3", "sw-7"))
    servers = lease.create_servers(nodes)
    assert [s.name for s in servers] == ["sw-2", "sw-3", "sw-7"]
    ready = wait(cloud, owner, servers)
    assert [s.name for s in ready] == ["sw-2", "sw-3", "sw-7"]
    assert sorted(s.name for s in cloud.list_servers(run_id=owner.run_id)) == ["sw-2", "sw-3", "sw-7"]


def test_user_metadata_travels_with_the_ownership(cloud, lease, owner, spec):
    (server,) = lease.create_servers(spec("meta", metadata={"purpose": "contract"}))
    (listed,) = cloud.list_servers(run_id=owner.run_id)
    assert listed.id == server.id
    assert listed.metadata["purpose"] == "contract"
    assert listed.ownership is not None


def test_shelve_and_unshelve(cloud, lease, owner, spec):
    (server,) = lease.create_servers(spec("shelf"))
    wait(cloud, owner, [server])

    cloud.shelve_server(server.id)
    (shelved,) = wait(cloud, owner, [server], ServerStatus.SHELVED_OFFLOADED)
    assert shelved.status == ServerStatus.SHELVED_OFFLOADED
    cloud.unshelve_server(server.id)
    wait(cloud, owner, [server])

    log = statuses(cloud.state_log(server.id))
    assert is_subsequence(
        [ServerStatus.ACTIVE, ServerStatus.SHELVED_OFFLOADED, ServerStatus.ACTIVE], log
    ), log


def test_stop_start_and_a_stop_too_many(cloud, lease, owner, spec):
    (server,) = lease.create_servers(spec("switch"))
    wait(cloud, owner, [server])

    cloud.stop_server(server.id)
    wait(cloud, owner, [server], ServerStatus.SHUTOFF)
    with pytest.raises(Conflict):
        cloud.stop_server(server.id)
    cloud.start_server(server.id)
    wait(cloud, owner, [server])


def test_delete_then_not_found_and_the_state_log_survives(cloud, lease, owner, spec):
    (server,) = lease.create_servers(spec("doomed"))
    wait(cloud, owner, [server])

    cloud.delete_server(server.id)
    wait_gone(cloud, owner, server.id)
    with pytest.raises(NotFound):
        cloud.delete_server(server.id)
    with pytest.raises(NotFound):
        cloud.get_server(server.id)
    log = statuses(cloud.state_log(server.id))
    assert log[-1] == ServerStatus.DELETED and ServerStatus.ACTIVE in log, log


def test_unknown_flavour_or_image_is_refused_before_anything_is_created(
    cloud, lease, owner, small_flavor, image
):
    with pytest.raises(InvalidRequest) as flavour_err:
        cloud.create_servers(ServerSpec("nope", "no-such-flavour", image), owner)
    assert small_flavor in str(flavour_err.value)
    with pytest.raises(InvalidRequest) as image_err:
        cloud.create_servers(ServerSpec("nope", small_flavor, "No-Such-Image"), owner)
    assert "No-Such-Image" in str(image_err.value)
    assert cloud.list_servers(run_id=owner.run_id) == []


def test_more_cores_than_the_quota_is_quota_exceeded_and_leaves_nothing(cloud, lease, owner, image):
    biggest = max((f for f in cloud.list_flavors() if f.gpus == 0), key=lambda f: f.vcpus)
    with pytest.raises(QuotaExceeded):
        lease.create_servers(ServerSpec("greedy", biggest.name, image, count=10))
    assert cloud.list_servers(run_id=owner.run_id) == []


def test_missing_resources_are_not_found(cloud):
    ghost = str(uuid.uuid4())
    for call in (
        cloud.get_server,
        cloud.delete_server,
        cloud.delete_volume,
        cloud.delete_floating_ip,
    ):
        with pytest.raises(NotFound):
            call(ghost)
    with pytest.raises(NotFound):
        cloud.delete_keypair(Keypair.name_for_run(uuid.uuid4().hex))


# keypairs, floating IPs, volumes -------------------------------------------------------------
def test_keypair_is_named_for_the_run_and_given_to_servers(cloud, lease, owner, spec):
    key = public_key()
    kp = lease.create_keypair(key)
    assert kp.name == Keypair.name_for_run(owner.run_id) and kp.run_id == owner.run_id
    assert [k.name for k in cloud.list_keypairs(run_id=owner.run_id)] == [kp.name]
    assert kp.fingerprint
    (server,) = lease.create_servers(spec("keyed", key_name=kp.name))
    assert cloud.get_server(server.id).key_name == kp.name


def test_an_unknown_network_is_refused(cloud, lease, owner, spec):
    with pytest.raises(InvalidRequest) as caught:
        cloud.create_servers(spec("lost", network="no-such-network"), owner)
    assert "no-such-network" in str(caught.value)
    assert cloud.list_servers(run_id=owner.run_id) == []


def test_floating_ip_is_owned_and_attaches(cloud, lease, owner, spec):
    fip = lease.create_floating_ip()
    assert fip.run_id == owner.run_id and fip.address
    assert [f.id for f in cloud.list_floating_ips(run_id=owner.run_id)] == [fip.id]

    (server,) = lease.create_servers(spec("exposed"))
    wait(cloud, owner, [server])
    attached = cloud.attach_floating_ip(fip.id, server.id)
    assert attached.server_id == server.id and attached.address == fip.address
    (listed,) = cloud.list_floating_ips(run_id=owner.run_id)
    assert listed.server_id == server.id


def test_volume_carries_ownership_metadata(cloud, lease, owner):
    vol = lease.create_volume("scratch", 1)
    assert vol.size_gb == 1 and vol.ownership is not None and vol.ownership.run_id == owner.run_id
    assert [v.id for v in cloud.list_volumes(run_id=owner.run_id)] == [vol.id]
    assert vol.id in {v.id for v in cloud.list_volumes()}


# the lease -------------------------------------------------------------------------------------
def test_a_lease_renewal_extends_due_servers_and_volumes_and_never_shortens(cloud, lease, owner, spec):
    (server,) = lease.create_servers(spec("renewed"))
    wait(cloud, owner, [server])  # Nova takes metadata updates once a server has booted
    vol = lease.create_volume("renewed", 1)
    deadline = time.monotonic() + 120
    while cloud.list_volumes(run_id=owner.run_id)[0].status != "available":
        assert time.monotonic() < deadline, "the volume did not become available within 120 s"
        time.sleep(0.5)
    now = datetime.now(UTC).replace(microsecond=0)
    renewal = LeaseRenewal(now + timedelta(hours=3), now, "contract-host")
    assert cloud.renew_lease(owner.run_id, renewal, due_before=renewal.expires_at) == 2
    (listed,) = cloud.list_servers(run_id=owner.run_id)
    (volume,) = cloud.list_volumes(run_id=owner.run_id)
    for held in (listed, volume):
        assert held.ownership.expires_at == renewal.expires_at and held.ownership.run_id == owner.run_id
        assert LeaseRenewal.from_metadata(held.metadata) == renewal
    assert volume.id == vol.id
    # Due only before the old expiry: nothing is, and nothing changes. Shortening is refused.
    assert cloud.renew_lease(owner.run_id, renewal, due_before=owner.expires_at) == 0
    with pytest.raises(InvalidRequest, match="would shorten"):
        cloud.renew_lease(owner.run_id, renewal, due_before=renewal.expires_at + timedelta(seconds=1))
    assert cloud.list_servers(run_id=owner.run_id)[0].ownership.expires_at == renewal.expires_at


def test_teardown_after_a_failure_leaves_nothing(cloud, owner, ledger, spec):
    lease = Lease(cloud, owner, ledger=ledger, delete_timeout=120)
    with pytest.raises(RuntimeError, match="the work failed"), lease:
        lease.create_keypair(public_key())
        lease.create_volume("results", 1)
        lease.create_floating_ip()
        lease.create_servers(spec("crew", count=2))
        raise RuntimeError("the work failed")
    assert lease.proof is not None and lease.proof.clean, lease.proof.summary()
    assert lease.proof.errors == []
    assert {k: v for k, v in lease.proof.remaining.items() if v} == {}
    assert len(lease.proof.deleted) == 5
