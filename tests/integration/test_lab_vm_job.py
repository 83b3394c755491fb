"""vm_job's provisioning story on the OpenStack lab, under Prefect's test harness.

The same tasks ``slipstream.flows.vm_job.vm_job`` runs — register the run's keypair, provision one server,
wait until it is ACTIVE, attach a floating IP from ``public`` — inside a flow, with a Lease on the
lab cloud signed in with the project's non-admin application credential; then the lease ends and
its teardown proof must be clean.

The story stops before SSH: the lab's Nova runs the fake virt driver, so its "VMs" have no
console, no network stack and no sshd. ``wait_for_ssh``, the upload, the remote command and the
download are covered on the embedded local cloud by ``test_vm_job_flow.py``.
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prefect import flow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contract"))

from openstack_lab import lab_cloud_fixture  # noqa: F401  (the fixture registers itself by import)

from slipstream import ssh
from slipstream.cloud.models import Keypair, Ownership, Server, ServerSpec, ServerStatus
from slipstream.jetstream2 import DEFAULT_IMAGE
from slipstream.ownership.lease import Lease, TeardownProof
from slipstream.ownership.ledger import Ledger
from slipstream.tasks.provision import attach_floating_ip, provision_servers, register_keypair, wait_until_active

pytestmark = pytest.mark.lab

BOOT_TIMEOUT = 300.0  # seconds: the deadline for ACTIVE (the fake driver takes a few)
DELETE_TIMEOUT = 120.0  # seconds: the lease's deadline for servers to be gone
FIP_SHOWN_TIMEOUT = 30.0  # seconds: deadline for Nova to show an associated floating IP


@pytest.fixture(scope="module", autouse=True)
def lab_and_prefect(lab_cloud, prefect_harness):
    # lab_cloud first: when the lab is down this skips (or fails under SLIPSTREAM_REQUIRE_LAB=1)
    # before a Prefect server is started for nothing.
    yield


@dataclass
class Provisioned:
    server: Server
    attached_by_task: str | None  # what the attach-floating-ip task's returned server showed
    neutron_fips: list[tuple[str, str | None]]  # (address, server id) Neutron has for the run
    keypair: Keypair
    keypairs_seen: list[str]
    proof: TeardownProof


@flow(name="lab-vm-job-provisioning", validate_parameters=False)
def provision_on_lab(cloud: Any, run_id: str, ledger_path: str, image: str) -> Provisioned:
    """vm_job's steps up to (not including) SSH, with the lease ended at the end of the flow."""
    owner = Ownership.new("lab-vm-job", run_id=run_id, lease=timedelta(hours=1))
    keypair = ssh.generate_keypair(comment=f"slipstream-{owner.run_id}")
    lease = Lease(cloud, owner, ledger=Ledger(Path(ledger_path)), delete_timeout=DELETE_TIMEOUT)
    with lease:
        kp = register_keypair(lease, keypair.public_key)
        keypairs_seen = [k.name for k in cloud.list_keypairs(run_id=owner.run_id)]
        spec = ServerSpec("lab-vm-job", "m3.tiny", image, key_name=kp.name)
        (server,) = wait_until_active(lease, provision_servers(lease, spec), timeout=BOOT_TIMEOUT)
        server = attach_floating_ip(lease, server)
        attached_by_task = server.floating_ip
        neutron_fips = [(f.address, f.server_id) for f in cloud.list_floating_ips(run_id=owner.run_id)]
        # Nova learns of the association from Neutron's network-changed event, asynchronously:
        # the server the task read right after attaching may not show it yet.
        deadline = time.monotonic() + FIP_SHOWN_TIMEOUT
        while not server.floating_ip and time.monotonic() < deadline:
            time.sleep(0.5)
            server = cloud.get_server(server.id)
    assert lease.proof is not None
    return Provisioned(server, attached_by_task, neutron_fips, kp, keypairs_seen, lease.proof)


def test_vm_job_provisioning_on_the_lab_leaves_nothing(lab_cloud, tmp_path):
    images = [i.name for i in lab_cloud.list_images()]
    image = DEFAULT_IMAGE if DEFAULT_IMAGE in images else min(images)
    run_id = uuid.uuid4().hex  # keypairs are owned only under run ids slipstream makes

    got = provision_on_lab(lab_cloud, run_id, str(tmp_path / "ledger.db"), image)

    # the keypair was registered under the run's name and listed as the run's
    assert got.keypair.name == Keypair.name_for_run(run_id)
    assert got.keypairs_seen == [got.keypair.name]
    # the server came up ACTIVE with the run's key and a floating IP Nova shows
    assert got.server.status == ServerStatus.ACTIVE
    assert got.server.name == "lab-vm-job"
    assert got.server.key_name == got.keypair.name
    assert got.neutron_fips == [(got.server.floating_ip, got.server.id)], got.neutron_fips
    assert got.server.floating_ip, f"Nova showed no floating IP within {FIP_SHOWN_TIMEOUT} s: {got.server}"
    assert got.server.floating_ip.startswith("203.0.113.")  # the lab's `public` range
    assert got.server.reachable_address == got.server.floating_ip
    deleted = {h.kind.value: h for h in got.proof.deleted}
    assert set(deleted) == {"server", "keypair", "floating_ip"}
    assert deleted["floating_ip"].name == got.server.floating_ip
    assert deleted["server"].id == got.server.id
    # the teardown proof is clean, and the project agrees: nothing of the run remains
    assert got.proof.clean and not got.proof.errors, got.proof.summary()
    assert lab_cloud.list_servers(run_id=run_id) == []
    assert lab_cloud.list_floating_ips(run_id=run_id) == []
    assert lab_cloud.list_keypairs(run_id=run_id) == []
