"""vm_job for real on the OpenStack lab, under Prefect's test harness.

The flow a researcher runs — ``slipstream.flows.vm_job.vm_job`` with a saved OpenStack
Credentials block naming the lab's non-admin cloud — boots an m3.tiny whose guest
(lab/pylib/labguest_driver.py) is reached over SSH through its floating IP with the host key
checked against Nova's console log; the inputs go up, the script runs, the outputs come back, and
the lease deletes the server, keypair and floating IP with a clean teardown proof. No process of
the guest outlives the flow.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contract"))

from openstack_lab import (  # noqa: F401  (lab_cloud_fixture registers the fixture by import)
    GUEST_EXTERNAL_NETWORK,
    LAB_CLOUD,
    guest_processes,
    lab_cloud_fixture,
    lab_clouds_yaml,
    not_loopback,
    require_loopback_guests,
)

pytestmark = pytest.mark.lab

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


@pytest.fixture(scope="module", autouse=True)
def lab_and_prefect(lab_cloud, prefect_harness):
    # lab_cloud first: when the lab is down this skips (or fails under SLIPSTREAM_REQUIRE_LAB=1)
    # before a Prefect server is started for nothing.
    require_loopback_guests(lab_cloud)
    yield


def test_vm_job_uploads_runs_and_downloads_on_the_lab_and_leaves_nothing(lab_cloud, tmp_path):
    from slipstream.blocks.openstack import OpenStackCredentials
    from slipstream.flows.vm_job import vm_job

    block = f"lab-vm-job-{uuid.uuid4().hex[:8]}"
    OpenStackCredentials(cloud=LAB_CLOUD, clouds_yaml_path=str(lab_clouds_yaml()),
                         external_network=GUEST_EXTERNAL_NETWORK).save(block)
    numbers = tmp_path / "numbers.txt"
    numbers.write_text("1 2 3 4\n")
    script = tmp_path / "work.py"
    script.write_text(
        "import json, os\n"
        "x = [float(v) for v in open('numbers.txt').read().split()]\n"
        "json.dump({'sum': sum(x), 'user': os.environ['USER']}, open('out.json', 'w'))\n"
        "print('summed', len(x), 'numbers')\n"
    )

    result = vm_job(flavor="m3.tiny", script=str(script), inputs=[str(numbers)],
                    outputs=["out.json"], cloud=f"slipstream-openstack-credentials/{block}",
                    results_dir=str(tmp_path / "results"), boot_timeout_seconds=300)

    assert result.exit_status == 0 and "summed 4 numbers" in result.stdout_tail
    out = json.loads((tmp_path / "results" / "out.json").read_text())
    assert out == {"sum": 10.0, "user": "ubuntu"}  # ran as the image's login user
    deleted = {r.kind.value: r for r in result.resources}
    assert set(deleted) == {"server", "keypair", "floating_ip"}
    # it went through the floating IP, which is a loopback address of the lab's external network
    assert ipaddress.ip_address(deleted["floating_ip"].name) in LOOPBACK, not_loopback(
        f"floating IP {deleted['floating_ip'].name}")
    assert result.teardown_clean and not any(result.teardown_remaining.values())
    assert lab_cloud.list_servers(run_id=result.run_id) == []
    assert lab_cloud.list_floating_ips(run_id=result.run_id) == []
    assert lab_cloud.list_keypairs(run_id=result.run_id) == []
    assert guest_processes(deleted["server"].id) == []
