"""A Lease's teardown — every delete, retry and wait — ends by ONE deadline, the allowance a run's
worst case counts for it, and when it runs out the proof says what may still be charging.

On the local cloud with its fault injection: slow deletes and a listing API that answers 503.
The bound asserted is the deadline plus :data:`LATENESS` (one injected call in flight and the
host's load), well below the fresh window each wait used to get.
"""

from __future__ import annotations

import time
from dataclasses import replace

from slipstream.cloud.local import FaultOptions, LocalCloud
from slipstream.cloud.models import ServerSpec
from slipstream.ownership.lease import Lease, teardown_run
from slipstream.ownership.ledger import Ledger
from slipstream.ssh import generate_keypair
from support import owner

LATENESS = 1.5


def _faults(cloud: LocalCloud, **faults) -> None:
    LocalCloud(options=replace(cloud.options, faults=FaultOptions(**faults)))


def test_teardowns_waits_share_the_deadline_of_its_deletes(local_cloud, tmp_path):
    run = owner("teardown-deadline")
    lease = Lease(local_cloud, run, ledger=Ledger(tmp_path / "ledger.db"), delete_timeout=3.0)
    lease.create_keypair(generate_keypair("t").public_key)
    (server,) = lease.create_servers(ServerSpec("w", "m3.tiny", "slipstream-noop"))
    lease.cloud.attach_floating_ip(lease.create_floating_ip().id, server.id)
    # The address takes 2.5 s of the 3 to delete; then the cloud cannot list servers at all.
    _faults(local_cloud, slow_calls={"delete_floating_ip": 2.5}, error_rates={"list_servers": 1.0})
    started = time.monotonic()
    try:
        proof = lease.teardown()
    finally:
        _faults(local_cloud)
    # Before: the wait for the server to vanish got 3 s of its own after the deletes' 2.5.
    assert time.monotonic() - started <= 3.0 + LATENESS
    assert not proof.clean and "may still be charging" in proof.summary()
    assert any("waiting for servers to be deleted" in e for e in proof.errors), proof.errors
    assert teardown_run(local_cloud, run.run_id).clean  # what it could not prove is the reaper's


def test_a_run_schedule_ends_teardown_where_the_worst_case_says(local_cloud, tmp_path):
    run = owner("teardown-deadline")
    ends_by = time.monotonic() + 2.0  # what is left of the run's schedule when teardown starts
    lease = Lease(local_cloud, run, ledger=Ledger(tmp_path / "ledger.db"), teardown_deadline=lambda: ends_by)
    lease.create_servers(ServerSpec("w", "m3.tiny", "slipstream-noop"))
    _faults(local_cloud, error_rates={"delete_server": 1.0})  # every delete: 503 until the deadline
    try:
        proof = lease.teardown()
    finally:
        _faults(local_cloud)
    assert time.monotonic() <= ends_by + LATENESS  # not the 300 s delete_timeout
    assert proof.remaining["server"] == ["w"]
    assert "teardown INCOMPLETE" in proof.summary() and "server: w may still be charging" in proof.summary()
    assert teardown_run(local_cloud, run.run_id).clean


def test_a_servers_delete_is_sent_before_slow_listings_and_other_deletes_spend_the_deadline(local_cloud, tmp_path):
    run = owner("teardown-deadline")
    lease = Lease(local_cloud, run, ledger=Ledger(tmp_path / "ledger.db"), teardown_deadline=lambda: ends_by)
    (server,) = lease.create_servers(ServerSpec("w", "m3.tiny", "slipstream-noop"))
    lease.cloud.attach_floating_ip(lease.create_floating_ip().id, server.id)
    # Neutron answers slowly (each call in flight; on OpenStack up to its 60-s api_timeout).
    _faults(local_cloud, slow_calls={"list_floating_ips": 1.0, "list_servers": 1.0, "list_volumes": 1.0,
                                     "list_keypairs": 1.0, "delete_floating_ip": 1.5})
    ends_by, ends_at = time.monotonic() + 2.0, time.time() + 2.0  # what is left of the run's schedule
    try:
        lease.teardown()
    finally:
        _faults(local_cloud)
    (history,) = local_cloud.server_history()
    # The server is what charges the run: its delete is the first call, not the sixth (before:
    # four listings and the address's delete, 5.5 s, went first and it outlived the deadline).
    assert history.deleted_at is not None
    assert history.deleted_at.timestamp() <= ends_at + LATENESS
    assert teardown_run(local_cloud, run.run_id).clean
