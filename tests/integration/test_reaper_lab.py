"""The reaper on real OpenStack (the lab): it finds a crashed run's server, address and key by
their tags, deletes them with a clean proof, and leaves a live run and an untagged server alone.

The run states come through the resolver seam (Prefect's side is tested in
tests/integration/test_reaper_flow.py); what is real here is Nova's and Neutron's listing by tag
and the deletes.
"""

from __future__ import annotations

import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contract"))

from openstack_lab import NO_HOST_FLAVOR, lab_cloud_fixture  # noqa: F401  (the fixture registers itself by import)
from support import wait_until

from slipstream.cloud.models import Ownership, ServerSpec
from slipstream.cloud.waiting import wait_for_servers
from slipstream.jetstream2 import DEFAULT_IMAGE
from slipstream.ownership.lease import Lease, teardown_run
from slipstream.ownership.ledger import Ledger
from slipstream.ownership.reaper import RunState, RunStatus, Timing, Verdict, reap

pytestmark = pytest.mark.lab

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE7x0Ff0Hnm3zQPMjLeCzLWV1dNfmSbEW9FbgpmPZx0X reaper-lab"


def _run(pipeline: str) -> Ownership:
    return Ownership.new(pipeline, run_id=uuid.uuid4().hex, lease=timedelta(hours=1))


def _small(cloud) -> tuple[str, str]:
    # never the flavour no host can take, which another lab test may have made in this session
    usable = [f for f in cloud.list_flavors() if f.gpus == 0 and f.name != NO_HOST_FLAVOR]
    flavor = min(usable, key=lambda f: (f.vcpus, f.ram_mb)).name
    images = [i.name for i in cloud.list_images()]
    return flavor, DEFAULT_IMAGE if DEFAULT_IMAGE in images else min(images)


def test_the_reaper_deletes_a_crashed_runs_resources_and_nothing_else(lab_cloud, tmp_path):
    ledger = Ledger(tmp_path / "ledger.db")
    flavor, image = _small(lab_cloud)
    crashed, live = _run("crashed"), _run("still-running")

    compute = lab_cloud.conn.compute
    stranger = None
    try:
        # The crashed run: created through a Lease that never got to tear down (its process died).
        dead = Lease(lab_cloud, crashed, ledger=ledger)
        dead.create_keypair(KEY)
        (server,) = dead.create_servers(ServerSpec("reap-me", flavor, image))
        wait_for_servers(lab_cloud, crashed.run_id, [server.id], timeout=300, poll_interval=0.5)
        dead.create_floating_ip()

        # Someone else's server in the same project, without slipstream's tags.
        stranger = compute.create_server(
            name=f"not-slipstream-{uuid.uuid4().hex[:6]}",
            flavor_id=compute.find_flavor(flavor).id,
            image_id=lab_cloud.conn.image.find_image(image).id,
            networks=[{"uuid": lab_cloud.conn.network.find_network("auto_allocated_network").id}],
        )
        with Lease(lab_cloud, live, ledger=ledger) as alive:
            (running,) = alive.create_servers(ServerSpec("keep-me", flavor, image))

            def resolve(run_id: str) -> RunStatus:
                if run_id == crashed.run_id:
                    return RunStatus(RunState.CRASHED, "its process is gone (test)")
                return RunStatus(RunState.LIVE, "alive (test)")  # the live run, and anything else on the lab

            dry = reap(lab_cloud, resolve, grace=timedelta(0), ledger=ledger)
            verdicts = {v.run_id: v for v in dry.verdicts}
            assert verdicts[crashed.run_id].verdict == Verdict.REAP
            assert sorted(r.kind for r in verdicts[crashed.run_id].resources) == ["floating_ip", "keypair", "server"]
            assert verdicts[live.run_id].verdict == Verdict.KEEP
            assert lab_cloud.list_servers(run_id=crashed.run_id), "a dry run deletes nothing"

            done = reap(lab_cloud, resolve, grace=timedelta(0), act=True, ledger=ledger)
            assert done.proofs[crashed.run_id].clean and live.run_id not in done.proofs
            # The project is shared (as a research group's is): another run's leftovers may be reaped
            # too, but only because their lease is over, never because they merely look idle.
            others = [v for v in done.verdicts if v.run_id in done.proofs and v.run_id != crashed.run_id]
            assert all(v.timing == Timing.LEASE_EXPIRED for v in others), [v.reason for v in others]
            assert not lab_cloud.list_servers(run_id=crashed.run_id)
            assert not lab_cloud.list_floating_ips(run_id=crashed.run_id)
            assert not lab_cloud.list_keypairs(run_id=crashed.run_id)
            # The live run and the untagged server are untouched.
            assert [s.id for s in lab_cloud.list_servers(run_id=live.run_id)] == [running.id]
            assert compute.get_server(stranger.id).name == stranger.name
        assert alive.proof.clean
    finally:  # whatever failed above, leave the lab as it was
        teardown_run(lab_cloud, crashed.run_id, ledger=ledger)  # idempotent; the body asserted the proof
        if stranger is not None:
            compute.delete_server(stranger, ignore_missing=True)
            wait_until(lambda: compute.find_server(stranger.id, ignore_missing=True) is None, timeout=120,
                       what="the untagged test server deleted")
