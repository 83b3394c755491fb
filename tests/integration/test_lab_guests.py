"""Lab servers that really boot (lab/pylib/labguest_driver.py), driven through OpenStackCloud.

A server made by the adapter gets a guest — LocalCloud's own runtime — on the 127.x address
Neutron gave its port: its sshd answers there with the host keys its console shows (read through
Nova's console-log API), it ran the user_data, and a floating IP from the external network reaches
it too. Deleting the server leaves no process of it.

Needs the lab seeded in loopback ranges (lab/seed.py: the project network in 127.80.0.0/16,
``public`` in 127.81.0.0/16). A lab seeded before then keeps documentation ranges, which nothing
may ever connect to: the test fails and says so (``lab/lab.sh reset && lab/lab.sh up`` reseeds).
``SLIPSTREAM_LAB_GUEST_NETWORK`` / ``SLIPSTREAM_LAB_GUEST_EXTERNAL_NETWORK`` name other
loopback networks of the project (default ``auto_allocated_network`` / ``public``).
"""

from __future__ import annotations

import ipaddress
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contract"))

from openstack_lab import (
    GUEST_EXTERNAL_NETWORK,
    GUEST_NETWORK,
    guest_processes,
    not_loopback,
    open_lab_cloud,
    require_loopback_guests,
)
from support import owner as new_owner

from slipstream import ssh
from slipstream.cloud.models import ServerSpec, ServerStatus
from slipstream.cloud.waiting import wait_for_servers
from slipstream.jetstream2 import DEFAULT_IMAGE
from slipstream.ownership.lease import Lease
from slipstream.ownership.ledger import Ledger

pytestmark = pytest.mark.lab

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
BOOT_TIMEOUT = 120.0  # seconds: create call until ACTIVE
SSH_TIMEOUT = 60.0  # seconds: ACTIVE until SSH answers with the console's host key
FIP_TIMEOUT = 30.0  # seconds: attach until Nova shows the floating IP and it answers SSH
USER_DATA = """#!/bin/sh
echo "user_data ran on $SLIPSTREAM_VM_ADDRESS" > "$HOME/user_data_ran"
chmod 644 "$HOME/user_data_ran"
"""


@pytest.fixture(scope="module")
def guest_cloud():
    cloud = open_lab_cloud(external_network=GUEST_EXTERNAL_NETWORK)
    require_loopback_guests(cloud)
    yield cloud
    cloud.close()


def test_a_lab_server_boots_a_guest_reachable_over_ssh_and_leaves_nothing(guest_cloud, tmp_path):
    cloud = guest_cloud
    who = new_owner("lab-guests")
    keypair = ssh.generate_keypair(comment=f"slipstream-{who.run_id}")
    with Lease(cloud, who, ledger=Ledger(tmp_path / "ledger.db"), delete_timeout=120) as lease:
        kp = lease.create_keypair(keypair.public_key)
        started = time.monotonic()
        (server,) = lease.create_servers(ServerSpec(
            "guest", "m3.tiny", DEFAULT_IMAGE, key_name=kp.name, network=GUEST_NETWORK,
            user_data=USER_DATA))
        (server,) = wait_for_servers(cloud, who.run_id, [server.id], timeout=BOOT_TIMEOUT,
                                     poll_interval=0.5)
        assert server.status == ServerStatus.ACTIVE
        assert ipaddress.ip_address(server.address) in LOOPBACK, server
        assert server.reachable_address == server.address  # no floating IP yet

        def target() -> ssh.SshTarget:  # re-read the console each try: the host keys come late
            return ssh.target_for(cloud.get_server(server.id), keypair,
                                  cloud.console_log(server.id))

        reached = ssh.wait_for_ssh(target, timeout=SSH_TIMEOUT, poll_interval=0.2)
        boot_to_ssh = time.monotonic() - started
        console = cloud.console_log(server.id)
        assert "-----BEGIN SSH HOST KEY FINGERPRINTS-----" in console
        assert reached.host == server.address and len(reached.expected_fingerprints) == 2
        result = ssh.run_command(reached, "cat user_data_ran; id -un", timeout=30)
        assert result.stdout.splitlines() == [f"user_data ran on {server.address}", "ubuntu"]
        assert guest_processes(server.id), "no process of the guest found while it runs"

        # A floating IP from the external network reaches the same guest (same host keys).
        fip = lease.create_floating_ip()
        assert ipaddress.ip_address(fip.address) in LOOPBACK, not_loopback(
            f"floating IP {fip.address}")
        cloud.attach_floating_ip(fip.id, server.id)
        shown = cloud.get_server(server.id)
        deadline = time.monotonic() + FIP_TIMEOUT  # Nova learns of it from Neutron, asynchronously
        while shown.floating_ip != fip.address:
            assert time.monotonic() < deadline, f"Nova never showed {fip.address}: {shown}"
            time.sleep(0.5)
            shown = cloud.get_server(server.id)
        assert shown.reachable_address == fip.address
        via_fip = ssh.wait_for_ssh(
            lambda: ssh.target_for(shown, keypair, cloud.console_log(server.id)),
            timeout=FIP_TIMEOUT, poll_interval=0.2)
        assert via_fip.host == fip.address
        assert ssh.run_command(via_fip, "cat user_data_ran", timeout=30).stdout.strip() == \
            f"user_data ran on {server.address}"
    assert lease.proof.clean, lease.proof.summary()
    assert cloud.list_servers(run_id=who.run_id) == []
    # Nova deletes the server (and the driver its guest) before the lease sees it gone.
    left = guest_processes(server.id)
    assert left == [], f"processes of deleted server {server.id} still run: {left}"
    print(f"boot to SSH: {boot_to_ssh:.1f} s")


def wait_status(cloud, server_id: str, status: ServerStatus, timeout: float = BOOT_TIMEOUT):
    deadline = time.monotonic() + timeout
    while (server := cloud.get_server(server_id)).status != status:
        assert time.monotonic() < deadline, (
            f"{server_id} is {server.status}, not {status}, after {timeout} s")
        time.sleep(0.5)
    return server


def ssh_in(cloud, server_id: str, keypair) -> ssh.SshTarget:
    return ssh.wait_for_ssh(
        lambda: ssh.target_for(cloud.get_server(server_id), keypair, cloud.console_log(server_id)),
        timeout=SSH_TIMEOUT, poll_interval=0.2)


def test_stop_start_reboot_shelve_and_unshelve_act_on_the_guest_as_on_a_vm(guest_cloud, tmp_path):
    cloud = guest_cloud
    who = new_owner("lab-guests")
    keypair = ssh.generate_keypair(comment=f"slipstream-{who.run_id}")
    user_data = '#!/bin/sh\necho run >> "$HOME/runs"; chmod 644 "$HOME/runs"\n'
    with Lease(cloud, who, ledger=Ledger(tmp_path / "ledger.db"), delete_timeout=120) as lease:
        kp = lease.create_keypair(keypair.public_key)
        (server,) = lease.create_servers(ServerSpec(
            "cycle", "m3.tiny", DEFAULT_IMAGE, key_name=kp.name, network=GUEST_NETWORK,
            user_data=user_data))
        wait_status(cloud, server.id, ServerStatus.ACTIVE)
        first = ssh_in(cloud, server.id, keypair)

        def after(what: str) -> None:
            """The guest answers again, same host keys, and user_data ran once in all."""
            target = ssh_in(cloud, server.id, keypair)
            assert target.expected_fingerprints == first.expected_fingerprints, what
            assert ssh.run_command(target, "cat runs", timeout=30).stdout.split() == ["run"], what

        cloud.stop_server(server.id)
        wait_status(cloud, server.id, ServerStatus.SHUTOFF)
        assert guest_processes(server.id) == []  # powered off: nothing of it runs
        cloud.start_server(server.id)
        wait_status(cloud, server.id, ServerStatus.ACTIVE)
        after("start")

        boots = cloud.console_log(server.id).count("running 'init'")
        cloud.conn.compute.reboot_server(server.id, "SOFT")
        deadline = time.monotonic() + BOOT_TIMEOUT  # a reboot shows as a new boot on the console
        while cloud.console_log(server.id).count("running 'init'") == boots:
            assert time.monotonic() < deadline, "no new boot on the console after a reboot"
            time.sleep(0.5)
        wait_status(cloud, server.id, ServerStatus.ACTIVE)
        after("reboot")

        cloud.shelve_server(server.id)
        wait_status(cloud, server.id, ServerStatus.SHELVED_OFFLOADED)
        assert guest_processes(server.id) == []  # offloaded: no process, only its disk is kept
        cloud.unshelve_server(server.id)
        wait_status(cloud, server.id, ServerStatus.ACTIVE)
        after("unshelve")
    assert lease.proof.clean, lease.proof.summary()
    assert guest_processes(server.id) == []
