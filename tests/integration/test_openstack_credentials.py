"""Signing in to the lab as Jetstream2 users do, and where each setting comes from.

- An application credential is built from the given fields alone: a clouds.yaml lying in the
  current directory (or ~/.config/openstack/) is never merged in.
- A clouds.yaml cloud keeps its own region unless the block sets one; any region the project's
  catalogue offers is accepted (the lab's catalogue is widened to Jetstream2's regions at the HTTP
  layer: Keystone's own answer plus endpoints for TACC and RegionOne), others are refused with the
  list of offered regions.
- Every request has a timeout: a stalled TCP connection fails a poll instead of blocking it.
- A project without ``auto_allocated_network`` yet gets it from Neutron's auto-allocated-topology
  API (the lab's real Neutron, with the ``auto-allocated-topology`` extension).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import openstack.config.loader
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contract"))

from http_faults import canned, http_faults, http_faults_in_process, with_regions
from openstack_lab import NO_HOST_FLAVOR, lab_cloud_fixture, lab_clouds_yaml, open_lab_cloud  # noqa: F401
from support import owner as new_owner

from slipstream.cloud.errors import TransientError
from slipstream.cloud.models import ServerSpec, ServerStatus
from slipstream.cloud.openstack import CredentialError, connect
from slipstream.cloud.waiting import wait_for_servers
from slipstream.jetstream2 import DEFAULT_IMAGE
from slipstream.ownership.lease import Lease
from slipstream.ownership.ledger import Ledger
from slipstream.retry import RetryPolicy

pytestmark = pytest.mark.lab
TOKENS = r"/v3/auth/tokens$"


@pytest.fixture
def credential(lab_cloud, monkeypatch) -> dict:
    """The lab's application credential, as connect() arguments; no OS_* variables around."""
    for name in ("OS_CLOUD", "OS_REGION_NAME", "OS_USERNAME", "OS_PROJECT_NAME", "OS_PASSWORD",
                 "OS_CLIENT_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    auth = yaml.safe_load(lab_clouds_yaml().read_text())["clouds"]["lab"]["auth"]
    return {"auth_url": auth["auth_url"], "application_credential_id": auth["application_credential_id"],
            "application_credential_secret": auth["application_credential_secret"]}


@pytest.mark.parametrize("region", [None, "IU"])
def test_an_application_credential_ignores_a_clouds_yaml_in_the_working_directory(
        credential, tmp_path, monkeypatch, region):
    """A password-style clouds.yaml with one cloud in ./ (a teammate's, another project's) used to
    be merged in: its region replaced the given one, its project scope went into the credential."""
    (tmp_path / "clouds.yaml").write_text(yaml.safe_dump({"clouds": {"old-project": {
        "region_name": "RegionX",
        "auth": {"auth_url": "http://127.0.0.1:9/v3", "username": "someone", "password": "pw",
                 "project_name": "OTHER", "user_domain_name": "access", "project_domain_name": "access"},
    }}}))
    # openstacksdk fixes "the usual places" (./, ~/.config/openstack/, /etc/openstack/) at import
    monkeypatch.setattr(openstack.config.loader, "CONFIG_FILES",
                        [str(tmp_path / "clouds.yaml"), *openstack.config.loader.CONFIG_FILES])
    cloud = connect(**credential, region=region)
    try:
        assert cloud.region == "IU" and cloud.username == "labuser@access-ci.org"
        assert cloud.list_flavors(), "signed in to the lab's project with the credential alone"
    finally:
        cloud.close()


def test_a_clouds_yaml_cloud_keeps_its_region_when_the_block_sets_none(lab_cloud, tmp_path):
    """Exosphere writes one cloud per region (TRA160003_TACC); the block needs no region then."""
    from slipstream.blocks.openstack import OpenStackCredentials

    clouds = yaml.safe_load(lab_clouds_yaml().read_text())
    tacc = {**clouds["clouds"]["lab"], "region_name": "TACC"}
    path = tmp_path / "clouds.yaml"
    path.write_text(yaml.safe_dump({"clouds": {"TRA160003_TACC": tacc}}))
    with http_faults_in_process() as faults:
        faults.add("POST", TOKENS, with_regions("TACC", "RegionOne"))
        cloud = OpenStackCredentials(cloud="TRA160003_TACC", clouds_yaml_path=str(path)).get_cloud()
        try:
            assert cloud.region == "TACC" and cloud.name == "TRA160003_TACC:TACC"
            assert cloud.list_flavors()
        finally:
            cloud.close()
        overridden = connect("TRA160003_TACC", clouds_yaml_path=path, region="RegionOne")
        assert overridden.region == "RegionOne"  # the block's (or caller's) region wins when set
        overridden.close()


def test_any_region_the_catalogue_offers_is_accepted_and_others_are_refused_with_the_list(credential):
    from slipstream.blocks.openstack import OpenStackCredentials

    with http_faults_in_process() as faults:
        faults.add("POST", TOKENS, with_regions("RegionOne"))
        block = OpenStackCredentials(**credential, region="RegionOne")
        cloud = block.get_cloud()
        assert cloud.region == "RegionOne" and cloud.list_images()
        cloud.close()
        with pytest.raises(CredentialError) as caught:
            connect(**credential, region="Mars")
    text = str(caught.value)
    assert "'Mars'" in text and "IU, RegionOne" in text
    assert credential["application_credential_secret"] not in text


@pytest.fixture
def stalled_endpoint():
    """A loopback listener that takes connections and never answers (a stalled load balancer)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v2.1"
    listener.close()


def test_every_request_has_a_timeout_so_a_stalled_connection_fails_the_poll(lab_cloud, stalled_endpoint):
    default = lab_cloud.conn.session.timeout  # without any setting (documented: 60 s)
    assert default is not None and 0 < default <= 120
    # 3 s: short enough to see the stall fail, long enough for the lab's Keystone on a busy machine
    cloud = open_lab_cloud(api_timeout=3)
    assert cloud.conn.session.timeout == 3
    cloud.read_retry = RetryPolicy(attempts=1)  # one poll, not the listing's five tries
    cloud.conn.config.config["compute_endpoint_override"] = stalled_endpoint  # before compute's first use
    outcome: list[BaseException | object] = []

    def poll() -> None:
        try:
            outcome.append(cloud.list_servers())
        except BaseException as err:  # noqa: BLE001 - judged below
            outcome.append(err)

    started = time.monotonic()
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert outcome, "the poll is still blocked on the stalled connection after 120 s"
    assert isinstance(outcome[0], TransientError) and "timed out" in str(outcome[0]).lower()
    assert time.monotonic() - started < 60  # a few 3 s requests (version discovery, the listing)
    cloud.close()


def test_a_project_without_its_auto_allocated_network_gets_one_from_neutron(lab_cloud, tmp_path):
    """A fresh allocation lists no `auto_allocated_network` (answered here as Neutron answers
    such a project: an empty list); the topology API — the lab's real one — makes or returns it."""
    cloud = open_lab_cloud()
    owner = new_owner("auto-allocate")
    flavor = min((f for f in cloud.list_flavors() if f.gpus == 0 and f.name != NO_HOST_FLAVOR),
                 key=lambda f: (f.vcpus, f.ram_mb))
    with http_faults(cloud) as faults:
        faults.add("GET", r"/v2.0/networks\?.*name=auto_allocated_network",
                   lambda request, forward: canned(request, 200, {"networks": []}))
        topology = faults.add("GET", r"/v2.0/auto-allocated-topology/", lambda request, forward: forward())
        with Lease(cloud, owner, ledger=Ledger(tmp_path / "l.db"), delete_timeout=120) as lease:
            (server,) = lease.create_servers(ServerSpec("fresh", flavor.name, DEFAULT_IMAGE))
            (ready,) = wait_for_servers(cloud, owner.run_id, [server.id], timeout=120, poll_interval=0.5)
            assert ready.status == ServerStatus.ACTIVE
            networks = cloud.conn.compute.get_server(server.id).addresses
            assert list(networks) == ["auto_allocated_network"]
    assert len(topology.hits) == 1 and lease.proof.clean, lease.proof.summary()
    cloud.close()
