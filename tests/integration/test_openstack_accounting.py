"""SU accounting against the OpenStack lab: metering from Nova's lifecycle, and Jetstream2's
`accounting` service found in the Keystone catalogue and used by the budget guard.

The lab has no accounting service of its own, so these tests play Jetstream2: a tiny HTTP server
on 127.0.0.1 serves the JSON Exosphere decodes, and the admin cloud registers it in the lab's
Keystone as a service of type ``accounting`` with a public endpoint in region IU (removed
afterwards). The project user — a fresh connection, whose token's catalogue then lists it —
must find it through the catalogue alone.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contract"))

from openstack_lab import (  # noqa: F401  (the fixtures register themselves by import)
    lab_admin_cloud_fixture,
    lab_cloud_fixture,
    lab_clouds_yaml,
    open_lab_cloud,
)

from slipstream.cost.accounting import PlannedServers, meter_servers, run_burn_rate
from slipstream.cost.budget import GPU, AccountingServiceBalances, check_plan
from slipstream.cloud.errors import BudgetExceeded, NotFound
from slipstream.cloud.models import Ownership, ServerSpec, ServerStatus
from slipstream.cloud.waiting import wait_for_servers
from slipstream.jetstream2 import FLAVORS
from slipstream.ownership.lease import Lease
from slipstream.ownership.ledger import Ledger
from slipstream.cost.watchdog import BudgetWatchdog
from support import wait_until

pytestmark = pytest.mark.lab

SERVICE_NAME = "slipstream-test-accounting"
ALLOCATIONS = [
    {"description": "TRA160003", "abstract": "lab", "service_units_allocated": 50000.0,
     "service_units_used": 1234.5, "start_date": "2026-01-01T00:00:00Z", "end_date": "2027-01-01T00:00:00Z",
     "resource": "jetstream2.indiana.xsede.org", "active": 1},
    {"description": "TRA160003", "abstract": "lab", "service_units_allocated": 300.0,
     "service_units_used": 100.0, "start_date": "2026-01-01T00:00:00Z", "end_date": "2027-01-01T00:00:00Z",
     "resource": GPU, "active": 1},
]


@pytest.fixture
def accounting_server():
    """Serves ALLOCATIONS on 127.0.0.1; ``seen`` records whether each GET carried a token."""
    seen: list[bool] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            seen.append(bool(self.headers.get("X-Auth-Token")))
            body = json.dumps(ALLOCATIONS).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/accounting/", seen
    server.shutdown()
    server.server_close()
    thread.join(10)


def _remove_test_services(identity) -> None:
    for service in identity.services(type="accounting"):
        if service.name == SERVICE_NAME:
            for endpoint in identity.endpoints(service_id=service.id):
                identity.delete_endpoint(endpoint, ignore_missing=True)
            identity.delete_service(service, ignore_missing=True)


@pytest.fixture
def accounting_service(lab_admin_cloud, accounting_server):
    """The test server registered in Keystone as type `accounting`; removed afterwards."""
    identity = lab_admin_cloud.conn.identity
    _remove_test_services(identity)  # a crashed earlier run may have left one
    url, seen = accounting_server
    service = identity.create_service(name=SERVICE_NAME, type="accounting", description="slipstream test")
    try:
        identity.create_endpoint(service_id=service.id, interface="public", url=url, region_id="IU")
        yield url, seen
    finally:
        _remove_test_services(identity)
    assert not [s for s in identity.services(type="accounting") if s.name == SERVICE_NAME]


def test_without_the_service_the_cloud_says_so_and_what_to_do():
    cloud = open_lab_cloud()
    try:
        with pytest.raises(NotFound, match="no `accounting` service in the Keystone catalogue.*fixed balance"):
            cloud.read_accounting()
    finally:
        cloud.close()


def test_the_adapter_finds_the_service_in_the_catalogue_and_the_guard_uses_its_balance(accounting_service):
    url, seen = accounting_service
    cloud = open_lab_cloud()  # a new token: its catalogue lists the service
    try:
        assert cloud.read_accounting() == ALLOCATIONS
        assert seen == [True], "one GET, authenticated with the project's token"
        balances = AccountingServiceBalances(cloud).read()
        assert balances[GPU].remaining == 200.0
        refused = check_plan([PlannedServers(FLAVORS["g3.large"], 1, 8)], balances=balances, allocation_id="TRA160003")
        assert refused.problems == [
            "worst case 256.00 SU exceeds the Jetstream2 GPU balance of allocation TRA160003: 200.00 SU left "
            "(300.00 allocated, 100.00 used; accounting service)"]
        assert not check_plan([PlannedServers(FLAVORS["m3.large"], 2, 8)], balances=balances).refused
    finally:
        cloud.close()


def test_a_flow_is_refused_by_the_accounting_balance_before_anything_is_created(
    accounting_service, lab_cloud, prefect_harness, monkeypatch, tmp_path
):
    monkeypatch.setenv("SLIPSTREAM_HOME", str(tmp_path / "slipstream"))
    from slipstream.blocks.allocation import AllocationBlock
    from slipstream.blocks.openstack import OpenStackCredentials
    from slipstream.flows.vm_job import gpu_job

    OpenStackCredentials(cloud="lab", clouds_yaml_path=str(lab_clouds_yaml())).save("lab-accounting", overwrite=True)
    AllocationBlock(allocation_id="TRA160003", balance_source="accounting-service",
                    cloud="slipstream-openstack-credentials/lab-accounting").save("lab-tra160003", overwrite=True)
    servers_before = {s.id for s in lab_cloud.list_servers()}
    with pytest.raises(BudgetExceeded, match="Jetstream2 GPU balance of allocation TRA160003: 200.00 SU left") as err:
        gpu_job(command="true", flavor="g3.large", max_hours=8, cloud="slipstream-openstack-credentials/lab-accounting",
                allocation="lab-tra160003")
    # 200 SU at 32 SU/h is 6.25 h, less the 0.67 h a vm_job may spend booting, transferring and
    # tearing down, which its worst case now counts.
    assert "Nothing was created" in str(err.value) and "shorten max_hours to 5.58 or less" in str(err.value)
    assert {s.id for s in lab_cloud.list_servers()} == servers_before
    assert not Ledger().entries()


def test_nova_lifecycle_meters_active_and_stopped_time(lab_cloud, tmp_path):
    """BUILD -> ACTIVE -> SHUTOFF -> DELETED from Nova's timestamps and instance actions: the meter
    charges the ACTIVE time fully and the SHUTOFF time at half, and the burn rate follows."""
    owner = Ownership.new("lab-metering", run_id=f"t{uuid.uuid4().hex[:12]}", lease=timedelta(hours=1))
    images = [i.name for i in lab_cloud.list_images()]
    started = time.time()
    with Lease(lab_cloud, owner, ledger=Ledger(tmp_path / "l.db"), delete_timeout=120) as lease:
        (server,) = lease.create_servers(ServerSpec("metered", "m3.tiny", "Featured-Ubuntu24" if "Featured-Ubuntu24" in images else images[0]))
        wait_for_servers(lab_cloud, owner.run_id, [server.id], timeout=300, poll_interval=0.5)
        assert run_burn_rate(lab_cloud, owner.run_id) == 1.0  # m3.tiny ACTIVE: 1 SU/h
        watchdog = BudgetWatchdog(lab_cloud, owner.run_id, budget_su=10.0)
        wait_until(lambda: watchdog.check() >= 2 / 3600, timeout=60, what="2 s of ACTIVE time on the meter")
        assert watchdog.su_per_hour == 1.0
        lab_cloud.stop_server(server.id)
        wait_for_servers(lab_cloud, owner.run_id, [server.id], status=ServerStatus.SHUTOFF, timeout=300, poll_interval=0.5)
        assert run_burn_rate(lab_cloud, owner.run_id) == 0.5
        before = watchdog.check()
        wait_until(lambda: watchdog.check() >= before + 0.5 * 2 / 3600, timeout=60, what="2 s of SHUTOFF time on the meter")
    assert lease.proof.clean, lease.proof.summary()
    elapsed_hours = (time.time() - started) / 3600
    log = lab_cloud.state_log(server.id)
    assert [s for s, _ in log] == [ServerStatus.BUILD, ServerStatus.ACTIVE, ServerStatus.SHUTOFF, ServerStatus.DELETED]
    (metered,) = meter_servers(lab_cloud, [(server.id, server.name, "m3.tiny")])
    (_, active_at), (_, stopped_at), (_, deleted_at) = log[1], log[2], log[3]
    active_h = (stopped_at - active_at).total_seconds() / 3600
    shutoff_h = (deleted_at - stopped_at).total_seconds() / 3600
    assert active_h >= 2 / 3600 and shutoff_h >= 2 / 3600
    assert metered.hours_active == pytest.approx(active_h)
    assert metered.su == pytest.approx(active_h * 1.0 + shutoff_h * 0.5)
    assert metered.su < elapsed_hours  # never more than the wall time at the ACTIVE rate
