"""The provider contract runs every case on each cloud: the embedded LocalCloud and the lab.

``cloud`` is parametrised over ``["local", "lab"]``. "local" comes from the ``local_cloud``
fixture in tests/conftest.py; "lab" is the OpenStack lab (see openstack_lab.py: skipped when it
is not up, failed when ``SLIPSTREAM_REQUIRE_LAB=1``). Every case that creates proves
destruction afterwards: the ``lease`` fixture asserts an empty teardown proof.
"""

from __future__ import annotations

import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from openstack_lab import (  # noqa: F401  (the fixtures register themselves by import)
    NO_HOST_FLAVOR,
    lab_admin_cloud_fixture,
    lab_cloud_fixture,
    no_host_flavor_fixture,
)

from slipstream.cloud.models import Ownership, ServerSpec
from slipstream.cloud.port import CloudProvider
from slipstream.jetstream2 import DEFAULT_IMAGE
from slipstream.ownership.lease import Lease
from slipstream.ownership.ledger import Ledger

CLOUDS = ["local", "lab"]


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here not in item.path.parents:
            continue  # hooks in a conftest still see every item of the session
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any(v == "lab" for v in callspec.params.values()):
            item.add_marker(pytest.mark.lab)


@pytest.fixture(params=CLOUDS)
def cloud(request) -> CloudProvider:
    if request.param == "lab":
        return request.getfixturevalue("lab_cloud")
    try:
        return request.getfixturevalue("local_cloud")
    except pytest.FixtureLookupError:
        pytest.skip("the local_cloud fixture (tests/conftest.py) is not there yet")


@pytest.fixture
def owner(request) -> Ownership:
    return Ownership.new("contract", run_id=uuid.uuid4().hex, lease=timedelta(hours=1))


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(tmp_path / "ledger.db")


@pytest.fixture
def lease(cloud, owner, ledger):
    """A Lease for the test's run; afterwards, the teardown proof must be empty (CheckDestroy)."""
    with Lease(cloud, owner, ledger=ledger, delete_timeout=120) as held:
        yield held
    assert held.proof is not None and held.proof.clean, held.proof.summary()
    assert not held.proof.errors, held.proof.errors


@pytest.fixture
def small_flavor(cloud) -> str:
    flavors = [f for f in cloud.list_flavors() if f.gpus == 0 and f.name != NO_HOST_FLAVOR]
    return min(flavors, key=lambda f: (f.vcpus, f.ram_mb)).name


@pytest.fixture
def image(cloud) -> str:
    names = [i.name for i in cloud.list_images()]
    return DEFAULT_IMAGE if DEFAULT_IMAGE in names else min(names)


@pytest.fixture
def spec(small_flavor, image):
    def make(name: str = "worker", count: int = 1, **kwargs) -> ServerSpec:
        return ServerSpec(name, small_flavor, image, count=count, **kwargs)

    return make
