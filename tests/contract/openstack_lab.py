"""Finding the OpenStack lab (lab/lab.sh) from tests: its clouds.yaml and a signed-in cloud.

The lab is a real Keystone/Nova/Neutron/Cinder/Glance on 127.0.0.1 that `lab/lab.sh up` starts
and leaves running. Tests never start or stop it. When it is not up, lab tests skip with the
reason — or FAIL when ``SLIPSTREAM_REQUIRE_LAB=1`` (CI sets it), so a broken lab can never turn
a red suite green.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from slipstream import lab
from slipstream.cloud.errors import CloudError, TransientError
from slipstream.cloud.openstack import OpenStackCloud, connect

LAB_CLOUD = lab.CLOUD
LAB_ADMIN_CLOUD = lab.ADMIN_CLOUD
NO_HOST_FLAVOR = "slipstream-test-nohost"
# Where lab servers boot real guests (lab/pylib/labguest_driver.py): networks in 127.0.0.0/8.
# Other loopback networks of the project can be named (e.g. beside a lab seeded before them).
GUEST_NETWORK = os.environ.get("SLIPSTREAM_LAB_GUEST_NETWORK", "auto_allocated_network")
GUEST_EXTERNAL_NETWORK = os.environ.get("SLIPSTREAM_LAB_GUEST_EXTERNAL_NETWORK", "public")


def lab_clouds_yaml() -> Path:
    """The lab's clouds.yaml (``$SLIPSTREAM_LAB_HOME/clouds.yaml``), as slipstream.lab says."""
    return lab.clouds_yaml()


def lab_required() -> bool:
    return os.environ.get("SLIPSTREAM_REQUIRE_LAB", "") not in ("", "0", "false", "no")


def lab_unavailable(reason: str) -> None:
    """Skip (or fail, when the lab is required) with ``reason``."""
    text = f"OpenStack lab not available: {reason} (start it with `lab/lab.sh up`)"
    if lab_required():
        pytest.fail(text + "; SLIPSTREAM_REQUIRE_LAB is set, so this is a failure", pytrace=False)
    pytest.skip(text)


def open_lab_cloud(cloud: str = LAB_CLOUD, **kwargs) -> OpenStackCloud:
    path = lab_clouds_yaml()
    if not path.is_file():
        lab_unavailable(f"no clouds.yaml at {path}")
    try:
        return connect(cloud, clouds_yaml_path=path, **kwargs)
    except TransientError as err:
        lab_unavailable(f"it does not answer ({err})")
    except CloudError as err:  # a lab that is up but refuses us is a real failure
        pytest.fail(f"the lab answered but connecting failed: {err}", pytrace=False)
    raise AssertionError("unreachable")


def not_loopback(what: str) -> str:
    return (f"lab {what}, not in 127.0.0.0/8: the lab was seeded before loopback ranges, and "
            "nothing may connect to its documentation ranges. "
            "Reseed it: lab/lab.sh reset && lab/lab.sh up")


def require_loopback_guests(cloud: OpenStackCloud) -> None:
    """Fail unless the guests' network is in 127.0.0.0/8 (its floating IPs are checked when
    made: the external network's subnets are the admin's)."""
    import ipaddress

    net = cloud.conn.network.get_network(cloud._network_id(GUEST_NETWORK))
    cidrs = [cloud.conn.network.get_subnet(s).cidr for s in net.subnet_ids]
    loopback = ipaddress.ip_network("127.0.0.0/8")
    if not cidrs or not all(ipaddress.ip_network(c).subnet_of(loopback) for c in cidrs):
        pytest.fail(not_loopback(f"network {GUEST_NETWORK!r} has subnets {cidrs}"), pytrace=False)


def guest_processes(server_id: str) -> list[str]:
    """Command lines of running processes that belong to the server's guest: its guest process
    and sshd name the guest's directory; sessions and user_data carry its id in their
    environment."""
    found = []
    marker = f"SLIPSTREAM_SERVER_ID={server_id}".encode()
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if entry.name.isdigit() and (
                    server_id.encode() in cmdline
                    or marker in (entry / "environ").read_bytes().split(b"\0")):
                found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass  # gone meanwhile
    return found


# Fixtures are declared under other function names (``name=``) so that modules importing them
# do not shadow the imported name with the test's parameter.
@pytest.fixture(scope="session", name="lab_cloud")
def lab_cloud_fixture(request) -> OpenStackCloud:
    cloud = open_lab_cloud()
    yield cloud
    _report_leftovers(cloud, request.config)
    cloud.close()


def _report_leftovers(cloud: OpenStackCloud, config) -> None:
    """Name, at the end of the session, anything slipstream-owned still on the lab, with when it
    was made and when its lease ends: every test proves its own teardown, so a line here points at
    something made outside a Lease (or a clock that jumped under a running suite)."""
    from slipstream.ownership.reaper import owned_by_run

    try:
        left = owned_by_run(cloud)
    except CloudError as err:
        left, note = {}, f"could not list what is left on the lab: {err}"
    else:
        note = ""
    lines = [f"  run {run_id}: {r.kind.value} {r.name} created {r.created_at} lease ends {r.expires_at}"
             for run_id, resources in sorted(left.items()) for r in resources]
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not (lines or note):
        return
    with capture.global_and_fixture_disabled():  # shown in CI's output, not swallowed with the teardown's
        reporter.write_line("")
        reporter.write_line(note or f"slipstream-owned resources left on the lab after the session "
                                   f"(now {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC):")
        for line in lines:
            reporter.write_line(line)


@pytest.fixture(scope="session", name="lab_admin_cloud")
def lab_admin_cloud_fixture() -> OpenStackCloud:
    cloud = open_lab_cloud(LAB_ADMIN_CLOUD)
    yield cloud
    cloud.close()


@pytest.fixture(scope="session", name="no_host_flavor")
def no_host_flavor_fixture(lab_admin_cloud, lab_cloud) -> str:
    """A public flavour no lab host can take (a root disk larger than any host), so Nova answers
    "No valid host was found" like a full GPU region. Flavours are admin-made: this is set-up;
    the tests themselves run as the project user."""
    compute = lab_admin_cloud.conn.compute
    flavor = compute.find_flavor(NO_HOST_FLAVOR, ignore_missing=True) or compute.create_flavor(
        name=NO_HOST_FLAVOR, vcpus=1, ram=512, disk=50_000_000, is_public=True
    )
    lab_cloud._flavors = None  # the project user's flavour cache must see it
    yield flavor.name
    compute.delete_flavor(flavor, ignore_missing=True)
    lab_cloud._flavors = None


@pytest.fixture(name="lab_lease")
def lab_lease_fixture(lab_cloud, owner, tmp_path):
    """A Lease on the lab for the test's ``owner``; afterwards its teardown proof must be empty."""
    from slipstream.ownership.lease import Lease
    from slipstream.ownership.ledger import Ledger

    with Lease(lab_cloud, owner, ledger=Ledger(tmp_path / "ledger.db"), delete_timeout=120) as held:
        yield held
    assert held.proof.clean and not held.proof.errors, held.proof.summary()
