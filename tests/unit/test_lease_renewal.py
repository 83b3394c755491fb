"""A beating run renews the lease on its resources themselves, in one request per beat on the
LocalCloud, never shortening a lease, and the ledger keeps each renewal."""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.local import FaultOptions, LocalCloud
from slipstream.cloud.models import Keypair, LeaseRenewal, Ownership, ServerSpec
from slipstream.cloud.waiting import wait_for_servers
from slipstream.ownership.lease import FIRST_LEASE, LEASE_AFTER_BEAT, Lease, first_lease
from slipstream.ownership.ledger import Ledger

NOOP = "slipstream-noop"


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(tmp_path / "ledger.db")


def expiries(cloud, run_id: str) -> list[datetime]:
    return [s.ownership.expires_at for s in cloud.list_servers(run_id)] + \
           [v.ownership.expires_at for v in cloud.list_volumes(run_id)]


def test_a_renewal_pushes_every_server_and_volume_in_one_request_and_is_recorded(local_cloud, ledger):
    owner = Ownership.new("renew", lease=timedelta(minutes=10))
    with Lease(local_cloud, owner, ledger=ledger) as lease:
        made = lease.create_servers(ServerSpec("w", "m3.tiny", NOOP, count=3))
        lease.create_volume("scratch", 1)
        wait_for_servers(local_cloud, owner.run_id, [s.id for s in made], timeout=20, poll_interval=0.05)
        calls = local_cloud.api_calls
        now = datetime.now(UTC)
        assert lease.renew(timedelta(minutes=30), now=now) == 4
        assert local_cloud.api_calls == calls + 1  # one request for every kind and resource
        assert expiries(local_cloud, owner.run_id) == [now.replace(microsecond=0) + timedelta(minutes=30)] * 4
        (server, *_) = local_cloud.list_servers(owner.run_id)
        stamp = LeaseRenewal.from_metadata(server.metadata)
        assert stamp.renewed_by == socket.gethostname() and stamp.renewed_at == now.replace(microsecond=0)
        (record,) = ledger.renewals(owner.run_id)
        assert (record.resources, record.pid, record.cloud) == (4, os.getpid(), "local")
        assert abs(record.expires_at - (now + timedelta(minutes=30))) < timedelta(milliseconds=1)

        # Not due again until less than half the window remains: nothing renewed, nothing recorded.
        assert lease.renew(timedelta(minutes=30), now=now + timedelta(minutes=5)) == 0
        assert len(ledger.renewals(owner.run_id)) == 1
        # Resources created after a beat get the lease of that beat.
        assert lease.owner.expires_at == now + timedelta(minutes=35)
        (late,) = lease.create_servers(ServerSpec("late", "m3.tiny", NOOP))
        assert late.ownership.expires_at == (now + timedelta(minutes=35)).replace(microsecond=0)
    assert lease.proof.clean


def test_a_renewal_never_shortens_a_lease(local_cloud, ledger):
    owner = Ownership.new("long", lease=timedelta(hours=5))
    with Lease(local_cloud, owner, ledger=ledger) as lease:
        lease.create_servers(ServerSpec("long", "m3.tiny", NOOP))
        before = expiries(local_cloud, owner.run_id)
        assert lease.renew(timedelta(minutes=30)) == 0
        assert expiries(local_cloud, owner.run_id) == before and lease.owner.expires_at == owner.expires_at
        now = datetime.now(UTC)
        with pytest.raises(InvalidRequest, match="would shorten them"):
            local_cloud.renew_lease(owner.run_id, LeaseRenewal(now, now, "h"), due_before=now + timedelta(hours=9))
        assert expiries(local_cloud, owner.run_id) == before


def test_a_renewal_touches_only_its_own_run(local_cloud, ledger):
    mine, theirs = (Ownership.new(p, lease=timedelta(minutes=1)) for p in ("mine", "theirs"))
    with Lease(local_cloud, mine, ledger=ledger) as a, Lease(local_cloud, theirs, ledger=ledger) as b:
        (made,) = a.create_servers(ServerSpec("a", "m3.tiny", NOOP))
        b.create_servers(ServerSpec("b", "m3.tiny", NOOP))
        wait_for_servers(local_cloud, mine.run_id, [made.id], timeout=20, poll_interval=0.05)
        assert a.renew(timedelta(minutes=30)) == 1
        assert [s.ownership.expires_at for s in local_cloud.list_servers(theirs.run_id)] == \
               [theirs.expires_at.replace(microsecond=0)]


def test_like_nova_a_building_or_shelved_server_keeps_the_lease_it_has(local_cloud, ledger):
    owner = Ownership.new("states", lease=timedelta(minutes=1))
    LocalCloud(options=replace(local_cloud.options, faults=FaultOptions(extra_boot_delay=3.0)))
    with Lease(local_cloud, owner, ledger=ledger) as lease:
        up, shelved = lease.create_servers(ServerSpec("s", "m3.tiny", NOOP, count=2))
        assert lease.renew(timedelta(minutes=30)) == 0  # both still building (for 3 s)
        wait_for_servers(local_cloud, owner.run_id, [up.id, shelved.id], timeout=20, poll_interval=0.05)
        local_cloud.shelve_server(shelved.id)
        assert lease.renew(timedelta(minutes=30)) == 1
        by_id = {s.id: s.ownership.expires_at for s in local_cloud.list_servers(owner.run_id)}
        assert by_id[shelved.id] == owner.expires_at.replace(microsecond=0) < by_id[up.id]


def test_keypairs_are_owned_only_for_run_ids_slipstream_makes(local_cloud, ledger):
    with pytest.raises(InvalidRequest, match="cannot own a keypair"):
        Keypair.name_for_run("laptop")
    with Lease(local_cloud, Ownership.new("keys", run_id="laptop"), ledger=ledger) as lease:
        with pytest.raises(InvalidRequest, match="cannot own a keypair"):
            lease.create_keypair("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE7x0Ff0Hnm3zQPMjLeCzLWV1dNfmSbEW9FbgpmPZx0X k")
    assert local_cloud.list_keypairs() == []
    for made in ("0123456789abcdef0123456789abcdef", "01234567-89ab-cdef-0123-456789abcdef"):
        assert Keypair.run_of(Keypair.name_for_run(made)) == made


def test_a_beating_runs_first_lease_covers_its_slowest_boot():
    assert first_lease(timedelta(minutes=15)) == FIRST_LEASE == timedelta(hours=1)
    assert first_lease(timedelta(hours=2)) == timedelta(hours=2) + LEASE_AFTER_BEAT


def test_a_renewal_the_cloud_refuses_says_when_the_run_may_lose_its_resources(local_cloud, ledger, caplog):
    """A cloud failing every renewal (5xx) lets the lease run out under a live run, and the reaper
    then deletes it: the run's log says so, with the time, instead of 'a heartbeat could not be sent'."""
    owner = Ownership.new("refused", lease=timedelta(minutes=10))  # due for renewal
    with Lease(local_cloud, owner, ledger=ledger) as lease:
        (server,) = lease.create_servers(ServerSpec("refused", "m3.tiny", NOOP))
        wait_for_servers(local_cloud, owner.run_id, [server.id], timeout=20, poll_interval=0.05)
        local_cloud.fail_next("renew_lease", 1)
        with caplog.at_level("ERROR", logger="slipstream.ownership.lease"), pytest.raises(Exception):
            lease.renew()
        (record,) = [r for r in caplog.records if "could not be renewed" in r.getMessage()]
        assert f"{owner.expires_at:%Y-%m-%d %H:%M} UTC" in record.getMessage() and owner.run_id in record.getMessage()
        assert lease.renew() == 1 and lease.lease_ends > owner.expires_at  # the next beat renews it
