"""Capacity fallback (slipstream.cloud.fallback) on both clouds.

A flavour with no room ends in CapacityError ("No valid host was found"): on LocalCloud through
its capacity model (``faults.no_capacity``), on the lab through a flavour no host can take.
Each failed attempt must be deleted through the Lease before the next one, and at the end the
run owns only what booted — then nothing, after teardown.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from slipstream.cloud.errors import CapacityError, QuotaExceeded
from slipstream.cloud.fallback import Candidate, create_with_fallback
from slipstream.cloud.models import Ownership, ServerSpec, ServerStatus
from slipstream.ownership.lease import Lease
from slipstream.ownership.ledger import Ledger
from support import embedded_region

FULL = "g3.large"  # LocalCloud: a GPU flavour whose hosts are full


@pytest.fixture(params=["local", "lab"])
def setting(request, tmp_path):
    """(cloud, a flavour without capacity, a flavour that boots, image)."""
    if request.param == "lab":
        cloud = request.getfixturevalue("lab_cloud")
        yield cloud, request.getfixturevalue("no_host_flavor"), "m3.tiny", "Featured-Ubuntu24"
        return
    cloud = embedded_region(tmp_path / "region-a", no_capacity=(FULL,))
    yield cloud, FULL, "g3.medium", "Featured-Ubuntu24"
    cloud.reset()


@pytest.fixture
def owner() -> Ownership:
    return Ownership.new("fallback", run_id=uuid.uuid4().hex, lease=timedelta(hours=1))


def test_the_next_flavour_boots_after_the_failed_attempt_is_deleted(setting, owner, tmp_path):
    cloud, full, fits, image = setting
    told = []
    with Lease(cloud, owner, ledger=Ledger(tmp_path / "l.db"), delete_timeout=120) as lease:
        result = create_with_fallback(
            ServerSpec("trainer", full, image, count=2),
            [Candidate(lease, full), Candidate(lease, fits)],
            boot_timeout=300,
            poll_interval=0.3,
            on_fallback=lambda c, e: told.append(c.flavor),
        )
        assert result.candidate.flavor == fits and told == [full]
        assert [c.flavor for c, _ in result.failures] == [full]
        assert [s.status for s in result.servers] == [ServerStatus.ACTIVE] * 2
        owned = cloud.list_servers(run_id=owner.run_id)
        assert sorted(s.id for s in owned) == sorted(s.id for s in result.servers)
        assert {s.flavor for s in owned} == {fits}
        assert {h.id for h in lease.held} == {s.id for s in result.servers}
    assert lease.proof.clean, lease.proof.summary()


def test_when_nothing_has_room_the_error_names_every_choice_and_nothing_is_left(
    setting, owner, tmp_path
):
    cloud, full, _, image = setting
    with Lease(cloud, owner, ledger=Ledger(tmp_path / "l.db"), delete_timeout=120) as lease:
        with pytest.raises(CapacityError) as caught:
            create_with_fallback(
                ServerSpec("trainer", full, image),
                [Candidate(lease, full)] * 2,
                boot_timeout=300,
                poll_interval=0.3,
            )
        assert str(caught.value).count(full) >= 2
        assert cloud.list_servers(run_id=owner.run_id) == []
    assert lease.proof.clean


def test_quota_is_not_a_reason_to_try_the_next_choice(setting, owner, tmp_path):
    cloud, _, fits, image = setting
    biggest = max((f for f in cloud.list_flavors() if f.gpus == 0), key=lambda f: f.vcpus)
    with Lease(cloud, owner, ledger=Ledger(tmp_path / "l.db")) as lease:
        with pytest.raises(QuotaExceeded):
            create_with_fallback(
                ServerSpec("greedy", biggest.name, image, count=10),
                [Candidate(lease, biggest.name), Candidate(lease, fits)],
            )
        assert cloud.list_servers(run_id=owner.run_id) == []


def test_another_region_is_tried_when_the_first_is_full(tmp_path, owner):
    """Two LocalClouds stand for two regions (IU full for g3.large, TACC with room)."""
    iu = embedded_region(tmp_path / "iu", no_capacity=(FULL,))
    tacc = embedded_region(tmp_path / "tacc")
    try:
        ledger = Ledger(tmp_path / "l.db")
        with Lease(iu, owner, ledger=ledger) as at_iu, Lease(tacc, owner, ledger=ledger) as at_tacc:
            result = create_with_fallback(
                ServerSpec("trainer", FULL, "Featured-Ubuntu24"),
                [Candidate(at_iu, FULL), Candidate(at_tacc, FULL)],
                poll_interval=0.3,
            )
            assert result.candidate.lease is at_tacc
            assert iu.list_servers(run_id=owner.run_id) == []
            assert len(tacc.list_servers(run_id=owner.run_id)) == 1
        assert at_iu.proof.clean and at_tacc.proof.clean
    finally:
        iu.reset()
        tacc.reset()
