"""The fault matrix, live runs: runs the reaper must not delete, though a naive one would.

- a live run on a teammate's Prefect (our Prefect has no such run, our ledger no record of it);
- a lease renewed past its first expiry by the run's heartbeat;
- a retry on another host (this host's process of the run is gone; the retry beats elsewhere).
- a run beating from a host whose clock lags (its beats look 10 minutes old by their own stamp).

Each runs one real reaper pass (``reap_clouds``, as ``slipstream reap --yes`` and the reaper
flow do) against a real Prefect API and a real LocalCloud with grace 0, so only the evidence
protects the run; the runs then end on their own and their teardown proofs are clean.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State, StateType

from slipstream.cloud.models import Ownership, ServerSpec
from slipstream.ownership.heartbeat import HEARTBEAT_EVENT, heartbeat
from slipstream.ownership.lease import Lease, teardown_run
from slipstream.ownership.ledger import Ledger
from support import wait_until

ROOT = Path(__file__).resolve().parents[2]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE7x0Ff0Hnm3zQPMjLeCzLWV1dNfmSbEW9FbgpmPZx0X live-runs"
NOOP = "slipstream-noop"
pytestmark = pytest.mark.usefixtures("prefect_harness")


def holding_run(cloud, run_id: str, slipstream_home: str) -> subprocess.Popen:
    """A real process holding ``run_id``'s key and server through a Lease until its stdin closes,
    then tearing down and printing whether the proof was clean."""
    code = textwrap.dedent(f"""
        import sys
        from datetime import timedelta
        from slipstream.cloud.local import LocalCloud
        from slipstream.cloud.models import Ownership, ServerSpec
        from slipstream.ownership.lease import Lease
        owner = Ownership.new("live", run_id={run_id!r}, lease=timedelta(hours=1))
        with Lease(LocalCloud({str(cloud.home)!r}), owner) as lease:
            lease.create_keypair({KEY!r})
            lease.create_servers(ServerSpec("live", "m3.tiny", {NOOP!r}))
            print("holding", flush=True)
            sys.stdin.read()
        print("clean" if lease.proof.clean else lease.proof.summary(), flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLIPSTREAM_HOME": slipstream_home}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def one_reaper_pass():
    from slipstream.tasks.reap import reap_clouds

    with get_client(sync_client=True) as client:
        (report,) = reap_clouds(["local"], grace=timedelta(0), act=True, client=client)
    return report


def held(cloud, run_id: str) -> tuple[int, int]:
    return len(cloud.list_servers(run_id)), len(cloud.list_keypairs(run_id))


def test_a_live_run_on_a_teammates_prefect_is_left_alone(cloud_env, tmp_path):
    run_id = str(uuid.uuid4())  # a flow-run id of their Prefect server, unknown to ours
    theirs = holding_run(cloud_env, run_id, str(tmp_path / "teammates-host"))
    try:
        report = one_reaper_pass()
        (verdict,) = report.verdicts
        assert verdict.status.state.value == "unknown" and verdict.verdict.value == "keep", verdict.reason
        assert report.proofs == {} and held(cloud_env, run_id) == (1, 1)
    finally:
        out, _ = theirs.communicate("", timeout=60)  # their run ends on its own, with a clean teardown
    assert out.strip() == "clean" and held(cloud_env, run_id) == (0, 0)


def test_a_lease_renewed_past_its_first_expiry_is_kept_and_one_not_renewed_is_reaped(cloud_env, tmp_path):
    ledger = Ledger()
    renewed, forgotten = (Ownership.new(p, lease=timedelta(seconds=2)) for p in ("renewed", "forgotten"))
    with Lease(cloud_env, renewed, ledger=ledger) as lease, Lease(cloud_env, forgotten, ledger=ledger) as other:
        lease.create_servers(ServerSpec("renewed", "m3.tiny", NOOP))
        other.create_servers(ServerSpec("forgotten", "m3.tiny", NOOP))
        beating = heartbeat(lambda: lease.renew(timedelta(seconds=8)), interval=0.2).start()
        try:
            first_expiry = renewed.expires_at
            wait_until(lambda: datetime.now(UTC) > first_expiry + timedelta(seconds=1), timeout=10,
                       what="the first lease to expire")
            report = one_reaper_pass()
            verdicts = {v.run_id: v for v in report.verdicts}
            assert verdicts[renewed.run_id].verdict.value == "keep", verdicts[renewed.run_id].reason
            assert verdicts[renewed.run_id].expires_at > first_expiry
            # Both runs are alive on this host; only the lease the heartbeat renewed protects one.
            assert verdicts[forgotten.run_id].timing.value == "lease expired"
            assert list(report.proofs) == [forgotten.run_id] and held(cloud_env, renewed.run_id) == (1, 0)
            assert ledger.renewals(renewed.run_id)  # the ledger keeps the renewals
        finally:
            beating.stop()
    assert lease.proof.clean and other.proof.clean


def test_a_retry_on_another_host_is_not_reaped_for_the_first_attempts_dead_process(cloud_env, tmp_path):
    from slipstream.tasks.events import run_event

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(retried_pipeline)
        client.set_flow_run_state(run.id, State(type=StateType.RUNNING), force=True)
    run_id = str(run.id)
    first_attempt = holding_run(cloud_env, run_id, os.environ["SLIPSTREAM_HOME"])  # this host's ledger
    os.killpg(first_attempt.pid, signal.SIGKILL)
    first_attempt.wait(timeout=10)
    run_event(HEARTBEAT_EVENT, run_id, {"cloud": "local", "pipeline": "live", "host": "worker-b"})
    wait_until(lambda: _beats(run_id), timeout=60, what="the retry's heartbeat stored")
    try:
        report = one_reaper_pass()
        (verdict,) = report.verdicts
        assert verdict.status.state.value == "live" and "heartbeat from worker-b" in verdict.status.basis
        assert report.proofs == {} and held(cloud_env, run_id) == (1, 1)
    finally:
        assert teardown_run(cloud_env, run_id).clean  # the retry ends and tears down


@flow(name="retried-pipeline")
def retried_pipeline() -> None:
    """Only here so the API has a flow run whose state the test sets."""


def _beats(run_id: str) -> list:
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(filter=EventFilter(
            event=EventNameFilter(name=[HEARTBEAT_EVENT]),
            resource=EventResourceFilter(id=[f"slipstream.run.{run_id}"])), limit=5)
    return page.events


def test_a_run_beating_from_a_host_whose_clock_lags_is_not_judged_by_that_clock(cloud_env, tmp_path):
    """A teammate's worker whose clock is 10 minutes behind stamps its beats 10 minutes in the
    past. Judged by the sender's clock, every fresh beat looked 'stopped 10 minutes ago' and the
    run, alive on that host, was CRASHED and deleted; the time the Prefect API received it counts."""
    from prefect.events import emit_event

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(retried_pipeline)
        client.set_flow_run_state(run.id, State(type=StateType.RUNNING), force=True)
    run_id = str(run.id)
    theirs = holding_run(cloud_env, run_id, str(tmp_path / "lagging-host"))  # a ledger we cannot see
    emit_event(HEARTBEAT_EVENT, occurred=datetime.now(UTC) - timedelta(minutes=10),
               resource={"prefect.resource.id": f"slipstream.run.{run_id}"},
               payload={"cloud": "local", "pipeline": "live", "host": "lagging-b", "pid": 4242})
    wait_until(lambda: _beats(run_id), timeout=60, what="the lagging host's heartbeat stored")
    try:
        report = one_reaper_pass()
        (verdict,) = report.verdicts
        assert verdict.status.state.value == "live", verdict.reason
        assert report.proofs == {} and held(cloud_env, run_id) == (1, 1)
    finally:
        out, _ = theirs.communicate("", timeout=60)
    assert out.strip() == "clean"
