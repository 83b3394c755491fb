"""LocalCloud servers: every status transition, the state log, addresses, ownership, the VM dir."""

from __future__ import annotations

import ipaddress
import json
import pickle
import uuid
from dataclasses import replace
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from slipstream.cloud.errors import Conflict, InvalidRequest, NotFound
from slipstream.cloud.local import LocalCloud, LocalCloudOptions
from slipstream.cloud.local.options import FaultOptions
from slipstream.cloud.local.processes import guest_alive
from slipstream.cloud.local.base import guest_of
from slipstream.cloud.models import OWNER_TAG, ServerSpec, ServerStatus
from slipstream.cloud.port import CloudProvider
from slipstream.cloud.waiting import wait_for_servers
from slipstream.jetstream2 import FLAVORS
from support import owner

S = ServerStatus
NOOP = "slipstream-noop"



def wait(cloud, who, servers, status=S.ACTIVE, timeout=20.0):
    return wait_for_servers(cloud, who.run_id, [s.id for s in servers], status=status,
                            timeout=timeout, poll_interval=0.05)



def guest(cloud, server_id):
    with cloud._store.read() as con:
        return guest_of(con.execute("SELECT * FROM servers WHERE id = ?", (server_id,)).fetchone())


def public_key() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def test_it_is_a_cloud_provider_with_the_jetstream2_catalogue(local_cloud):
    assert isinstance(local_cloud, CloudProvider)
    assert {f.name for f in local_cloud.list_flavors()} == set(FLAVORS)
    names = {i.name for i in local_cloud.list_images()}
    assert {"Featured-Ubuntu24", "Featured-Ubuntu22", "Featured-RockyLinux9", NOOP} <= names


def test_build_becomes_active_after_the_boot_delay_and_the_log_says_when(local_cloud):
    who = owner()
    (server,) = local_cloud.create_servers(ServerSpec("boot", "m3.tiny", NOOP), who)
    assert server.status == S.BUILD and server.created_at is not None
    (ready,) = wait(local_cloud, who, [server])
    assert ready.status == S.ACTIVE
    log = local_cloud.state_log(server.id)
    assert [s for s, _ in log] == [S.BUILD, S.ACTIVE]
    # ACTIVE is stamped at the end of the boot delay, not when someone happened to look.
    assert log[1][1] - log[0][1] == pytest.approx(timedelta(seconds=0.2), abs=timedelta(milliseconds=5))
    assert guest_alive(guest(local_cloud, server.id))


def test_boot_delay_depends_on_the_flavour_family(tmp_path):
    cloud = LocalCloud(options=LocalCloudOptions(home=tmp_path / "lc", boot_delay_by_family={"m3": 0.1, "g3": 0.3}))
    try:
        assert cloud.options.boot_seconds("m3") == 0.1 and cloud.options.boot_seconds("g3") == 0.3
        assert cloud.options.boot_seconds("r3") == 1.0  # unknown family: 1 s
        who = owner()
        (small,) = cloud.create_servers(ServerSpec("cpu", "m3.tiny", NOOP), who)
        (gpu,) = cloud.create_servers(ServerSpec("gpu", "g3.small", NOOP), who)
        wait(cloud, who, [small, gpu])
        delays = {}
        for s in (small, gpu):
            log = cloud.state_log(s.id)
            delays[s.name] = (log[1][1] - log[0][1]).total_seconds()
        assert delays == {"cpu": pytest.approx(0.1, abs=0.005), "gpu": pytest.approx(0.3, abs=0.005)}
    finally:
        cloud.reset()


def test_stop_start_shelve_unshelve_delete_walk_every_transition(local_cloud):
    who = owner()
    (server,) = local_cloud.create_servers(ServerSpec("walker", "m3.small", NOOP), who)
    wait(local_cloud, who, [server])
    first = guest(local_cloud, server.id)

    local_cloud.stop_server(server.id)
    assert local_cloud.get_server(server.id).status == S.SHUTOFF
    assert not guest_alive(first)  # the process group is gone once stop returns
    local_cloud.start_server(server.id)
    wait(local_cloud, who, [server])
    second = guest(local_cloud, server.id)
    assert second.pid != first.pid and guest_alive(second)

    local_cloud.shelve_server(server.id)
    assert local_cloud.get_server(server.id).status == S.SHELVED_OFFLOADED
    assert not guest_alive(second)
    local_cloud.unshelve_server(server.id)
    wait(local_cloud, who, [server])

    local_cloud.stop_server(server.id)  # shelving a stopped server is allowed too
    local_cloud.shelve_server(server.id)
    local_cloud.unshelve_server(server.id)
    wait(local_cloud, who, [server])
    last = guest(local_cloud, server.id)
    local_cloud.delete_server(server.id)
    assert not guest_alive(last)

    assert [s for s, _ in local_cloud.state_log(server.id)] == [
        S.BUILD, S.ACTIVE, S.SHUTOFF, S.ACTIVE, S.SHELVED_OFFLOADED, S.ACTIVE,
        S.SHUTOFF, S.SHELVED_OFFLOADED, S.ACTIVE, S.DELETED]
    times = [t for _, t in local_cloud.state_log(server.id)]
    assert times == sorted(times)


def test_starting_and_unshelving_take_a_boot_delay(local_cloud):
    who = owner()
    (server,) = local_cloud.create_servers(ServerSpec("slow", "m3.tiny", NOOP), who)
    wait(local_cloud, who, [server])
    # Power-on takes 3 s more than the fixture's 0.2 s boot, so the checks below see it in progress
    # even on a loaded machine.
    LocalCloud(options=replace(local_cloud.options, faults=FaultOptions(extra_boot_delay=3)))
    local_cloud.stop_server(server.id)
    local_cloud.start_server(server.id)
    assert local_cloud.get_server(server.id).status == S.SHUTOFF  # powering on, as Nova shows it
    with pytest.raises(Conflict, match="still changing state"):
        local_cloud.stop_server(server.id)
    wait(local_cloud, who, [server])


@pytest.mark.parametrize("operation, status", [
    ("stop_server", S.BUILD), ("start_server", S.ACTIVE), ("shelve_server", S.BUILD),
    ("unshelve_server", S.ACTIVE), ("stop_server", S.SHUTOFF), ("stop_server", S.SHELVED_OFFLOADED),
    ("start_server", S.SHELVED_OFFLOADED), ("shelve_server", S.SHELVED_OFFLOADED),
])
def test_invalid_transitions_are_conflicts(local_cloud, operation, status):
    if status == S.BUILD:
        # A boot that outlasts the test: under load a 0.2 s boot could end before the call.
        LocalCloud(options=replace(local_cloud.options, faults=FaultOptions(extra_boot_delay=60)))
    who = owner()
    (server,) = local_cloud.create_servers(ServerSpec("picky", "m3.tiny", NOOP), who)
    if status != S.BUILD:
        wait(local_cloud, who, [server])
    if status == S.SHUTOFF:
        local_cloud.stop_server(server.id)
    if status == S.SHELVED_OFFLOADED:
        local_cloud.shelve_server(server.id)
    before = local_cloud.state_log(server.id)
    with pytest.raises(Conflict) as err:
        getattr(local_cloud, operation)(server.id)
    assert server.id in str(err.value)
    assert local_cloud.state_log(server.id) == before


def test_deleted_servers_are_gone_but_their_log_stays(local_cloud):
    # Deleted while still in BUILD: a boot that outlasts the test, even on a loaded machine.
    LocalCloud(options=replace(local_cloud.options, faults=FaultOptions(extra_boot_delay=60)))
    who = owner()
    (server,) = local_cloud.create_servers(ServerSpec("gone", "m3.tiny", NOOP), who)
    vm_dir = local_cloud.home / "vms" / server.id
    assert (vm_dir / "disk" / "home").is_dir()
    local_cloud.delete_server(server.id)  # even while still in BUILD
    assert not vm_dir.exists()
    assert local_cloud.list_servers(run_id=who.run_id) == []
    for call in (local_cloud.get_server, local_cloud.delete_server, local_cloud.stop_server,
                 local_cloud.console_log):
        with pytest.raises(NotFound):
            call(server.id)
    assert [s for s, _ in local_cloud.state_log(server.id)] == [S.BUILD, S.DELETED]
    with pytest.raises(NotFound):
        local_cloud.state_log(str(uuid.uuid4()))
    (history,) = local_cloud.server_history(who.run_id)
    assert history.id == server.id and history.deleted_at is not None and history.log[-1][0] == S.DELETED


def test_addresses_are_sequential_loopback_and_freed_on_delete(local_cloud):
    who = owner()
    servers = local_cloud.create_servers(ServerSpec("net", "m3.tiny", NOOP, count=3), who)
    addrs = [ipaddress.ip_address(s.address) for s in servers]
    assert all(a in ipaddress.ip_network("127.64.0.0/16") for a in addrs)
    assert [int(a) - int(addrs[0]) for a in addrs] == [0, 1, 2] or len(set(addrs)) == 3
    assert all(int(a) & 0xFF not in (0, 255) for a in addrs)
    local_cloud.delete_server(servers[1].id)
    (again,) = local_cloud.create_servers(ServerSpec("reuse", "m3.tiny", NOOP), who)
    assert again.address == servers[1].address  # lowest free first


def test_listing_is_by_owner_and_run(local_cloud):
    a, b = owner(), owner()
    (sa,) = local_cloud.create_servers(ServerSpec("a", "m3.tiny", NOOP, metadata={"purpose": "x"}), a)
    (sb,) = local_cloud.create_servers(ServerSpec("b", "m3.tiny", NOOP), b)
    assert [s.id for s in local_cloud.list_servers(run_id=a.run_id)] == [sa.id]
    assert {s.id for s in local_cloud.list_servers()} == {sa.id, sb.id}
    (listed,) = local_cloud.list_servers(run_id=a.run_id)
    assert OWNER_TAG in listed.tags and a.run_tag in listed.tags
    stamped = listed.ownership
    assert (stamped.run_id, stamped.pipeline, stamped.creator) == (a.run_id, a.pipeline, a.creator)
    assert listed.metadata["purpose"] == "x"
    assert listed.ssh_user and listed.image == NOOP and listed.flavor == "m3.tiny"


def test_the_vm_directory_holds_disk_console_and_metadata(local_cloud):
    who = owner()
    local_cloud.create_keypair("slipstream-" + who.run_id, public_key())
    (server,) = local_cloud.create_servers(
        ServerSpec("meta", "g3.medium", NOOP, key_name="slipstream-" + who.run_id,
                   user_data="#!/bin/sh\necho hi\n", metadata={"k": "v"}), who)
    vm_dir = local_cloud.home / "vms" / server.id
    meta = json.loads((vm_dir / "meta.json").read_text())
    assert meta["uuid"] == server.id and meta["name"] == "meta" and meta["address"] == server.address
    assert meta["flavor"]["name"] == "g3.medium" and meta["flavor"]["gpus"] == 0.25
    assert meta["metadata"]["k"] == "v" and meta["public_keys"]
    assert (vm_dir / "user_data").read_text() == "#!/bin/sh\necho hi\n" == open(meta["user_data"]).read()
    assert (vm_dir / "console.log").exists() and (vm_dir / "disk" / "home").is_dir()


def test_bad_requests_are_refused_before_anything_is_created(local_cloud):
    who = owner()
    with pytest.raises(InvalidRequest) as err:
        local_cloud.create_servers(ServerSpec("x", "m3.huge", NOOP), who)
    assert "m3.tiny" in str(err.value) and "g3.xl" in str(err.value)  # names the valid choices
    with pytest.raises(InvalidRequest, match="Featured-Ubuntu24"):
        local_cloud.create_servers(ServerSpec("x", "m3.tiny", "Windows-11"), who)
    with pytest.raises(InvalidRequest, match="auto_allocated_network"):
        local_cloud.create_servers(ServerSpec("x", "m3.tiny", NOOP, network="private"), who)
    with pytest.raises(InvalidRequest, match="keypair"):
        local_cloud.create_servers(ServerSpec("x", "m3.tiny", NOOP, key_name="nobody"), who)
    assert local_cloud.list_servers() == []
    assert not any((local_cloud.home / "vms").iterdir())


def test_a_cloud_pickles_as_its_home(local_cloud):
    local_cloud.list_flavors()
    copy = pickle.loads(pickle.dumps(local_cloud))
    assert copy.home == local_cloud.home and copy.api_calls == local_cloud.api_calls
    assert copy.options == local_cloud.options


def test_api_calls_counts_every_port_call(local_cloud):
    start = local_cloud.api_calls
    local_cloud.list_flavors()
    local_cloud.list_servers()
    with pytest.raises(NotFound):
        local_cloud.get_server("nope")
    assert local_cloud.api_calls == start + 3
    local_cloud.status()  # administration is not an API call
    assert local_cloud.api_calls == start + 3


def test_keypairs_floating_ips_and_volumes(local_cloud):
    who = owner()
    key = public_key()
    kp = local_cloud.create_keypair(f"slipstream-{who.run_id}", key)
    assert kp.fingerprint.count(":") == 15 and kp.run_id == who.run_id
    with pytest.raises(Conflict):
        local_cloud.create_keypair(kp.name, key)
    with pytest.raises(InvalidRequest):
        local_cloud.create_keypair("broken", "ssh-ed25519 not-base64!")
    local_cloud.create_keypair("someone-elses", key)
    assert [k.name for k in local_cloud.list_keypairs()] == [kp.name]  # only slipstream's

    fip = local_cloud.create_floating_ip(who)
    assert ipaddress.ip_address(fip.address) in ipaddress.ip_network("127.65.0.0/16")
    (server,) = local_cloud.create_servers(ServerSpec("fip", "m3.tiny", NOOP), who)
    assert local_cloud.attach_floating_ip(fip.id, server.id).server_id == server.id
    assert local_cloud.get_server(server.id).floating_ip == fip.address
    meta = json.loads((local_cloud.home / "vms" / server.id / "meta.json").read_text())
    assert meta["floating_ip"] == fip.address
    local_cloud.delete_server(server.id)
    (left,) = local_cloud.list_floating_ips(run_id=who.run_id)
    assert left.server_id is None  # Neutron keeps it, unattached

    vol = local_cloud.create_volume("data", 5, who)
    (server2,) = local_cloud.create_servers(ServerSpec("vol", "m3.tiny", NOOP), who)
    assert local_cloud.attach_volume(vol.id, server2.id).status == "in-use"
    with pytest.raises(Conflict):
        local_cloud.delete_volume(vol.id)
    local_cloud.delete_server(server2.id)
    (vol_after,) = local_cloud.list_volumes(run_id=who.run_id)
    assert vol_after.status == "available" and vol_after.ownership.run_id == who.run_id
    for delete, rid in ((local_cloud.delete_volume, vol.id), (local_cloud.delete_floating_ip, fip.id),
                        (local_cloud.delete_keypair, kp.name)):
        delete(rid)
        with pytest.raises(NotFound):
            delete(rid)
