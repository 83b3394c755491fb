"""OpenStack-only behaviour against the lab (a real Keystone/Nova/Neutron/Cinder on 127.0.0.1).

What is checked here and not in the contract: how many HTTP requests create/wait/delete cost,
the ownership and Exosphere metadata Nova really stores, Nova's ERROR with its fault turned into
CapacityError, capacity fallback, quota numbers read from the project, the floating-IP
description fallback, and Keystone's answers to bad credentials. Every case that creates
proves destruction (empty teardown proof).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contract"))

from openstack_lab import (  # noqa: F401  (the fixtures register themselves by import)
    NO_HOST_FLAVOR,
    lab_admin_cloud_fixture,
    lab_cloud_fixture,
    lab_lease_fixture,
    lab_clouds_yaml,
    no_host_flavor_fixture,
    open_lab_cloud,
)

from slipstream.cloud.errors import CapacityError, Conflict, InvalidRequest, NotFound, QuotaExceeded
from slipstream.cloud.models import Ownership, ServerSpec, ServerStatus
from slipstream.cloud.openstack import CredentialError, connect
from slipstream.cloud.waiting import wait_for_servers
from slipstream.jetstream2 import DEFAULT_IMAGE
from slipstream.ownership.lease import Lease
from slipstream.ownership.ledger import Ledger

pytestmark = pytest.mark.lab


@pytest.fixture
def owner() -> Ownership:
    return Ownership.new("lab-test", run_id=f"t{uuid.uuid4().hex[:12]}", lease=timedelta(hours=1))


@pytest.fixture
def lease(lab_lease):
    return lab_lease


@pytest.fixture(scope="module")
def small(lab_cloud) -> tuple[str, str]:
    flavors = [f for f in lab_cloud.list_flavors() if f.gpus == 0 and f.name != NO_HOST_FLAVOR]
    images = [i.name for i in lab_cloud.list_images()]
    image = DEFAULT_IMAGE if DEFAULT_IMAGE in images else min(images)
    return min(flavors, key=lambda f: (f.vcpus, f.ram_mb)).name, image


def wait(cloud, owner, servers, status=ServerStatus.ACTIVE):
    return wait_for_servers(
        cloud, owner.run_id, [s.id for s in servers], status=status, timeout=300, poll_interval=0.5
    )


# request counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [2, 5])
def test_request_counts_for_create_wait_delete(
    lab_cloud, lease, owner, small, count, record_property
):
    """Create and wait cost the same whatever N; deleting costs one request per server, also for a
    fresh process (the reaper) that only listed the run first."""
    flavor, image = small
    lab_cloud.list_flavors(), lab_cloud.list_images()  # catalogue cached: count only the work
    lab_cloud._network_id("auto_allocated_network")

    before = lab_cloud.api_calls
    servers = lease.create_servers(ServerSpec("count", flavor, image, count=count))
    create_calls = lab_cloud.api_calls - before  # Lease's adoption check + POST + listing

    before = lab_cloud.api_calls
    rounds = []
    wait_for_servers(
        lab_cloud,
        owner.run_id,
        [s.id for s in servers],
        timeout=300,
        poll_interval=0.5,
        on_progress=lambda ready, total, view: rounds.append(ready),
    )
    wait_calls = lab_cloud.api_calls - before

    reaper = open_lab_cloud()  # a fresh process: warm its one-time costs (version discovery,
    reaper.list_servers(run_id="warm-up")  # the image id -> name map) with another run's listing
    reaper.list_images()
    before = reaper.api_calls
    listed = reaper.list_servers(run_id=owner.run_id)
    for server in listed:
        reaper.delete_server(server.id)
    delete_calls = reaper.api_calls - before
    reaper.close()

    numbers = {
        "n": count,
        "create": create_calls,
        "wait": wait_calls,
        "wait_rounds": len(rounds),
        "list_and_delete": delete_calls,
    }
    record_property("api_calls", numbers)
    print(f"\napi calls {numbers}")
    assert create_calls == 3, (
        "one POST for the whole batch, one listing to find it, one adoption check"
    )
    assert wait_calls == len(rounds), "one listing per poll round, whatever the batch size"
    assert len(listed) == count
    assert delete_calls == count + 1, "one listing, then one DELETE per server and no look-ups"


# what Nova stores -------------------------------------------------------------------------------------
def test_tags_metadata_user_data_and_exosphere_metadata_are_in_the_create_request(
    tmp_path, owner, small
):
    cloud = open_lab_cloud(exosphere_metadata=True)
    flavor, image = small
    with Lease(cloud, owner, ledger=Ledger(tmp_path / "l.db")) as lease:
        (server,) = lease.create_servers(
            ServerSpec(
                "marked",
                flavor,
                image,
                user_data="#!/bin/sh\necho hi\n",
                metadata={"purpose": "lab"},
            )
        )
        nova = cloud.conn.compute.get_server(server.id)
        assert sorted(nova.tags) == sorted(owner.tags())
        assert (
            nova.metadata["slipstream:run_id"] == owner.run_id and nova.metadata["purpose"] == "lab"
        )
        assert nova.metadata["exoServerVersion"] == "6"
        assert nova.metadata["exoCreatorUsername"] == cloud.username
        assert json.loads(nova.metadata["exoSetup"])["status"] == "complete"
        assert cloud.get_server(server.id).ssh_user in ("ubuntu", "rocky")
        wait(cloud, owner, [server])
        assert cloud.console_log(server.id) is not None
    assert lease.proof.clean
    cloud.close()


# ERROR, capacity and fallback ---------------------------------------------------------------------------
def test_no_valid_host_is_a_capacity_error_with_novas_fault(
    lab_cloud, lease, owner, small, no_host_flavor
):
    _, image = small
    servers = lease.create_servers(ServerSpec("gpu", no_host_flavor, image))
    with pytest.raises(CapacityError) as caught:
        wait(lab_cloud, owner, servers)
    assert "No valid host" in caught.value.fault
    (failed,) = lab_cloud.list_servers(run_id=owner.run_id)
    assert failed.status == ServerStatus.ERROR and "No valid host" in failed.fault
    assert lab_cloud.state_log(failed.id)[-1][0] == ServerStatus.ERROR


# quotas ------------------------------------------------------------------------------------------------
def test_asking_for_more_cores_than_the_project_has_is_quota_exceeded(
    lab_cloud, lease, owner, small
):
    flavor_name, image = small
    quota = lab_cloud.conn.compute.get_quota_set(lab_cloud.conn.current_project_id)
    flavor = next(f for f in lab_cloud.list_flavors() if f.name == flavor_name)
    assert quota.cores > 0, "the lab project must have a finite cores quota"
    count = quota.cores // flavor.vcpus + 1
    if count > quota.instances:  # then instances would trip first: use the biggest flavour
        flavor = max((f for f in lab_cloud.list_flavors() if f.gpus == 0), key=lambda f: f.vcpus)
        count = min(quota.instances, quota.cores // flavor.vcpus + 1)
    assert count * flavor.vcpus > quota.cores
    with pytest.raises(QuotaExceeded) as caught:
        lease.create_servers(ServerSpec("greedy", flavor.name, image, count=count))
    assert (
        "cores" in str(caught.value)
        or "instances" in str(caught.value)
        or "ram" in str(caught.value)
    )
    assert lab_cloud.list_servers(run_id=owner.run_id) == []


# errors ------------------------------------------------------------------------------------------------
def test_wrong_state_and_missing_things_map_onto_the_hierarchy(lab_cloud, lease, owner, small):
    flavor, image = small
    (server,) = lease.create_servers(ServerSpec("state", flavor, image))
    wait(lab_cloud, owner, [server])
    with pytest.raises(Conflict):
        lab_cloud.unshelve_server(server.id)  # not shelved
    with pytest.raises(NotFound):
        lab_cloud.console_log(str(uuid.uuid4()))
    with pytest.raises(NotFound):
        lab_cloud.state_log(str(uuid.uuid4()))


def test_only_slipstream_keypair_names_are_made_or_deleted(lab_cloud):
    """Nova keypairs carry no tags: the name is the ownership, so other names are refused."""
    with pytest.raises(InvalidRequest, match="not a slipstream keypair"):
        lab_cloud.create_keypair("someones-laptop", "ssh-ed25519 AAAA x")
    with pytest.raises(InvalidRequest, match="not a slipstream keypair"):
        lab_cloud.delete_keypair("someones-laptop")


def test_a_server_slipstream_did_not_create_is_never_touched(lab_cloud, small):
    flavor, image = small
    compute = lab_cloud.conn.compute
    net = lab_cloud._network_id("auto_allocated_network")
    foreign = compute.create_server(
        name="not-ours",
        flavor_id=lab_cloud._flavor(flavor).id,
        image_id=lab_cloud._image(image).id,
        networks=[{"uuid": net}],
    )
    try:
        assert foreign.id not in {s.id for s in lab_cloud.list_servers()}
        with pytest.raises(InvalidRequest, match="not created by slipstream"):
            lab_cloud.delete_server(foreign.id)
    finally:
        compute.delete_server(foreign.id)


# floating IPs ---------------------------------------------------------------------------------------------
def test_an_untagged_floating_ip_is_still_found_by_its_description(lab_cloud, owner, tmp_path):
    """A crash between Neutron's create and the tagging call leaves no tags: the description
    written in the create request still ties it to the run, so teardown and the reaper find it."""
    from slipstream.cloud.openstack.convert import owner_description

    net = lab_cloud._network_id(lab_cloud.external_network, external=True)
    raw = lab_cloud.conn.network.create_ip(
        floating_network_id=net, description=owner_description(owner)
    )
    (found,) = lab_cloud.list_floating_ips(run_id=owner.run_id)
    assert found.id == raw.id and found.run_id == owner.run_id
    proof = Lease(lab_cloud, owner, ledger=Ledger(tmp_path / "l.db")).teardown()
    assert proof.clean and [d.id for d in proof.deleted] == [raw.id]


@pytest.fixture
def ssh_group(lab_cloud):
    """The group for a documentation range; removed afterwards (it is shared and free, but the
    lab should end as it began)."""
    cidr = "203.0.113.0/24"
    yield cidr
    network = lab_cloud.conn.network
    for group in network.security_groups(name="slipstream-ssh-203-0-113-0-24"):
        network.delete_security_group(group, ignore_missing=True)


def test_ssh_security_group_is_made_once_and_reused(lab_cloud, ssh_group, small, owner, tmp_path):
    group_id = lab_cloud.ensure_ssh_security_group(ssh_group)
    before = lab_cloud.api_calls
    assert lab_cloud.ensure_ssh_security_group(ssh_group) == group_id
    assert lab_cloud.api_calls - before == 1, "an existing group with its rule costs one look-up"
    name = "slipstream-ssh-203-0-113-0-24"
    groups = list(lab_cloud.conn.network.security_groups(name=name))
    assert len(groups) == 1 and groups[0].id == group_id and "slipstream" in groups[0].tags
    assert any(
        r["port_range_min"] == 22 and r["remote_ip_prefix"] == ssh_group
        for r in groups[0].security_group_rules
    )
    flavor, image = small
    with Lease(lab_cloud, owner, ledger=Ledger(tmp_path / "l.db"), delete_timeout=120) as lease:
        (server,) = lease.create_servers(
            ServerSpec("guarded", flavor, image, security_groups=(group_id,))
        )
        wait(lab_cloud, owner, [server])
        assert name in {
            g["name"] for g in lab_cloud.conn.compute.get_server(server.id).security_groups or []
        }
    assert lease.proof.clean


def test_volumes_are_listed_by_cinders_metadata_filter(lab_cloud, lease, owner):
    mine = lease.create_volume("mine", 1)
    other = Ownership.new("lab-test", run_id=f"t{uuid.uuid4().hex[:12]}")
    theirs = lab_cloud.create_volume("theirs", 1, other)
    try:
        before = lab_cloud.api_calls
        assert [v.id for v in lab_cloud.list_volumes(run_id=owner.run_id)] == [mine.id]
        assert lab_cloud.api_calls - before == 1
    finally:
        deadline = time.monotonic() + 60
        while True:
            try:
                lab_cloud.delete_volume(theirs.id)
                break
            except Conflict:
                assert time.monotonic() < deadline
                time.sleep(0.5)


# credentials -------------------------------------------------------------------------------------------------
def _lab_credential() -> dict:
    path = lab_clouds_yaml()
    if not path.is_file():
        pytest.skip(f"no lab clouds.yaml at {path}")
    auth = yaml.safe_load(path.read_text())["clouds"]["lab"]["auth"]
    return auth


def test_a_wrong_secret_is_a_clear_credential_error_without_the_secret(lab_cloud, monkeypatch):
    auth = _lab_credential()
    wrong = "wrong-" + uuid.uuid4().hex
    for name in (
        "OS_USERNAME",
        "OS_PROJECT_NAME",
        "OS_PASSWORD",
        "OS_PROJECT_ID",
        "OS_USER_DOMAIN_NAME",
    ):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(CredentialError) as caught:
        connect(
            auth_url=auth["auth_url"],
            application_credential_id=auth["application_credential_id"],
            application_credential_secret=wrong,
        )
    text = str(caught.value)
    assert "401" in text and "Application Credentials" in text and "today" in text
    assert wrong not in text and auth["application_credential_secret"] not in text


def test_the_right_credential_signs_in_and_a_region_outside_the_catalogue_is_named(
    lab_cloud, monkeypatch
):
    auth = _lab_credential()
    args = {
        "auth_url": auth["auth_url"],
        "application_credential_id": auth["application_credential_id"],
        "application_credential_secret": auth["application_credential_secret"],
    }
    cloud = connect(**args, region=lab_cloud.region)
    assert cloud.api_calls >= 1 and cloud.username
    cloud.close()
    with pytest.raises(CredentialError) as caught:
        connect(**args, region="TACC")
    assert "TACC" in str(caught.value) and lab_cloud.region in str(caught.value)
    assert auth["application_credential_secret"] not in str(caught.value)


def test_leftover_os_variables_are_caught_before_keystone_is_asked(lab_cloud, monkeypatch):
    auth = _lab_credential()
    monkeypatch.setenv("OS_PROJECT_NAME", "TRA160003")
    monkeypatch.setenv("OS_USER_DOMAIN_NAME", "access")
    with pytest.raises(CredentialError) as caught:
        connect(
            auth_url=auth["auth_url"],
            application_credential_id=auth["application_credential_id"],
            application_credential_secret=auth["application_credential_secret"],
        )
    assert "OS_PROJECT_NAME" in str(caught.value) and "OS_USER_DOMAIN_NAME" in str(caught.value)
    cloud = connect(
        auth_url=auth["auth_url"],
        application_credential_id=auth["application_credential_id"],
        application_credential_secret=auth["application_credential_secret"],
        ignore_environment=True,
    )
    cloud.close()
