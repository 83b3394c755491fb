"""The reaper flow and `slipstream reap` against a real Prefect API and a real LocalCloud.

Three runs own resources on the cloud, none held by a process on this host (their Leases write
to another ledger, as a run on another machine would): one Prefect says Crashed, one Prefect says
Running, one with a generated id Prefect never heard of (a teammate's Prefect, a temporary server:
not evidence of death). The flow must reap the first, leave the other two alone until their lease, emit a ``slipstream.resource.leaked`` event per leaked
resource and publish a table artifact; the CLI must say the same in a dry run, and degrade to
local resolution when no Prefect API answers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State, StateType

from slipstream.cloud.models import Ownership, ServerSpec
from slipstream.ownership.lease import Lease
from slipstream.ownership.ledger import Ledger
from support import wait_until

ROOT = Path(__file__).resolve().parents[2]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE7x0Ff0Hnm3zQPMjLeCzLWV1dNfmSbEW9FbgpmPZx0X reaper"


@pytest.fixture(scope="module", autouse=True)
def prefect_api(prefect_harness):
    return prefect_harness


@flow(name="somebodys-pipeline")
def somebodys_pipeline() -> None:
    """Only here so the API has flow runs whose states the test sets."""


def _flow_run(client, state: StateType) -> str:
    run = client.create_flow_run(somebodys_pipeline)
    client.set_flow_run_state(run.id, State(type=state), force=True)
    return str(run.id)


def _left_behind(cloud, run_id: str, other_ledger: Ledger) -> None:
    """What a run on another machine holds: a key and a VM tagged with ``run_id``."""
    lease = Lease(cloud, Ownership.new("elsewhere", run_id=run_id), ledger=other_ledger)
    lease.create_keypair(KEY)
    lease.create_servers(ServerSpec("elsewhere", "m3.tiny", "slipstream-noop"))


def _leaked_events(run_id: str) -> list:
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(filter=EventFilter(
            event=EventNameFilter(name=["slipstream.resource.leaked"]),
            related=EventRelatedFilter(id=[f"slipstream.run.{run_id}"]),
        ), limit=50)
    return page.events


def _cli(*args: str, api: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": api, "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    slipstream = Path(sys.executable).parent / "slipstream"
    return subprocess.run([str(slipstream), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_saved_openstack_cloud_that_does_not_answer_is_named_and_the_others_still_reaped(cloud_env, prefect_api,
                                                                                          tmp_path):
    """`slipstream reap` loads every saved OpenStack cloud. It crashed with a KeyError on the
    first one (the block's class was never imported in the CLI), so it reaped nothing at all."""
    from slipstream.blocks.openstack import OpenStackCredentials

    clouds_yaml = tmp_path / "clouds.yaml"
    clouds_yaml.write_text("clouds:\n  gone:\n    auth:\n      auth_url: http://127.0.0.1:9/v3\n"
                           "      application_credential_id: an-id\n      application_credential_secret: a-secret\n"
                           "    auth_type: v3applicationcredential\n    api_timeout: 5\n")
    OpenStackCredentials(cloud="gone", clouds_yaml_path=str(clouds_yaml)).save("unreachable", overwrite=True)
    dead = _flow_run_id(StateType.CRASHED)
    _left_behind(cloud_env, dead, Ledger(tmp_path / "another-host.db"))

    try:
        out = _cli("reap", "--grace", "0", "--yes", api=prefect_api)
    finally:
        OpenStackCredentials.delete("unreachable")  # the other tests here reap "local" alone
    assert "note: cannot list slipstream-openstack-credentials/unreachable: " in out.stdout, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and cloud_env.list_servers() == [], out.stdout + out.stderr


def _flow_run_id(state: StateType) -> str:
    with get_client(sync_client=True) as client:
        return _flow_run(client, state)


def test_the_reaper_flow_reaps_a_dead_run_and_leaves_a_running_and_an_unknown_one(cloud_env, prefect_api, tmp_path):
    from slipstream.flows.reaper import reaper

    other = Ledger(tmp_path / "another-host.db")
    with get_client(sync_client=True) as client:
        crashed, running = _flow_run(client, StateType.CRASHED), _flow_run(client, StateType.RUNNING)
    stranger = "0123456789abcdef0123456789abcdef"
    for run_id in (crashed, running, stranger):
        _left_behind(cloud_env, run_id, other)

    dry = _cli("reap", "--grace", "0", api=prefect_api)  # the CLI, through the same API
    assert dry.returncode == 0, dry.stderr
    lines = {run: next(line for line in dry.stdout.splitlines() if run[:20] in line) for run in (crashed, running, stranger)}
    assert "crashed" in lines[crashed] and "reap" in lines[crashed]
    assert "live" in lines[running] and "keep" in lines[running] and "Prefect: Running" in dry.stdout
    assert "unknown" in lines[stranger] and "keep" in lines[stranger]
    assert "dry run: 1 run(s) would be reaped" in dry.stdout
    assert len(cloud_env.list_servers()) == 3  # a dry run deletes nothing

    state = reaper(grace_minutes=0, return_state=True)
    result = state.result()
    assert result.reaped_runs == [crashed] and result.clean
    assert result.clouds == ["local"] and result.leaked_resources == 2
    assert sorted(s.ownership.run_id for s in cloud_env.list_servers()) == sorted([running, stranger])
    assert cloud_env.list_servers(crashed) == [] and cloud_env.list_keypairs(crashed) == []
    assert len(cloud_env.list_keypairs(running)) == 1 and len(cloud_env.list_keypairs(stranger)) == 1

    events = wait_until(lambda: (e := _leaked_events(crashed)) and len(e) == 2 and e, timeout=60,
                        what="two leaked events for the crashed run")
    assert {e.payload["kind"] for e in events} == {"server", "keypair"}
    assert all(e.payload["run_state"] == "crashed" and e.resource["slipstream.cloud"] == "local" for e in events)
    assert _leaked_events(running) == []

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(state.state_details.flow_run_id))])))
    assert artifact.key == "slipstream-reaper" and artifact.type == "table"
    assert crashed in str(artifact.data) and running in str(artifact.data)

    # The running and the unknown run end on their own; their teardown finds what the reaper left them.
    for run_id in (running, stranger):
        assert Lease(cloud_env, Ownership.new("elsewhere", run_id=run_id), ledger=other).teardown().clean
    assert cloud_env.list_servers() == [] and cloud_env.list_keypairs() == []


def test_without_a_reachable_prefect_api_the_cli_resolves_locally_and_says_so(cloud_env, tmp_path):
    _left_behind(cloud_env, "0123456789abcdef0123456789abcdee", Ledger(tmp_path / "another-host.db"))
    out = _cli("reap", "--grace", "0", "--yes", api="http://127.0.0.1:9/api")  # nothing listens on port 9
    assert out.returncode == 0, out.stderr
    assert "the Prefect API at http://127.0.0.1:9/api is not reachable" in out.stdout
    assert "unresolved" in out.stdout and "keep" in out.stdout  # maybe alive elsewhere: wait for its lease
    assert len(cloud_env.list_servers()) == 1
    listed = _cli("ls", api="http://127.0.0.1:9/api")
    assert "elsewhere" in listed.stdout and "listing the local cloud only" in listed.stdout
    assert Lease(cloud_env, Ownership.new("x", run_id="0123456789abcdef0123456789abcdee")).teardown().clean


def test_a_running_run_whose_heartbeat_stopped_is_reaped_and_one_still_beating_is_kept(cloud_env, prefect_api, tmp_path):
    """Prefect says both are Running; nothing on this host knows them (their host is another
    machine). The pass is judged 10 minutes from now: one last beat now — its host dies with it —
    the other beats still then (its beat is stamped by a host whose clock runs 10 minutes ahead;
    a beat's age is judged by the later of its stamp and when Prefect received it)."""
    from datetime import UTC, datetime, timedelta

    from slipstream.ownership.heartbeat import HEARTBEAT_EVENT
    from slipstream.tasks.events import run_event
    from slipstream.tasks.reap import reap_clouds

    other = Ledger(tmp_path / "another-host.db")
    with get_client(sync_client=True) as client:
        dead, alive = _flow_run(client, StateType.RUNNING), _flow_run(client, StateType.RUNNING)
    for run_id in (dead, alive):
        _left_behind(cloud_env, run_id, other)
    from prefect.events import emit_event

    later = datetime.now(UTC) + timedelta(minutes=10)
    run_event(HEARTBEAT_EVENT, dead, {"cloud": "local"})
    emit_event(event=HEARTBEAT_EVENT, resource={"prefect.resource.id": f"slipstream.run.{alive}"}, occurred=later)
    wait_until(lambda: _beats(dead) and _beats(alive), timeout=60, what="both heartbeats stored")

    with get_client(sync_client=True) as client:
        (report,) = reap_clouds(["local"], grace=timedelta(0), act=True, client=client, now=later)
    verdicts = {v.run_id: v for v in report.verdicts}
    assert verdicts[dead].status.state.value == "crashed" and "heartbeat stopped at" in verdicts[dead].status.basis
    assert verdicts[alive].status.state.value == "live" and list(report.proofs) == [dead]
    assert cloud_env.list_servers(dead) == [] and len(cloud_env.list_servers(alive)) == 1
    assert Lease(cloud_env, Ownership.new("elsewhere", run_id=alive), ledger=other).teardown().clean


def test_a_flow_beats_its_heartbeat_while_it_works(cloud_env, prefect_api, monkeypatch):
    from slipstream.flows.vm_job import vm_job

    monkeypatch.setenv("SLIPSTREAM_HEARTBEAT_SECONDS", "0.5")
    result = vm_job(flavor="m3.tiny", command="sleep 3")
    beats = wait_until(lambda: (b := _beats(result.run_id)) and len(b) >= 4 and b, timeout=60,
                       what="the run's heartbeats")
    assert all(b.payload == {"cloud": "local", "pipeline": "vm-job", "host": socket.gethostname(), "pid": os.getpid()}
               for b in beats)
    assert result.teardown_clean


def test_a_cloud_that_hangs_on_renewals_does_not_silence_the_heartbeat(cloud_env, prefect_api, tmp_path):
    """The Prefect event and the lease renewal beat on threads of their own: a renewal that takes
    a minute (an OpenStack API that hangs) must not stop the beats the reaper judges the run by."""
    from dataclasses import replace

    from slipstream.cloud.local import FaultOptions, LocalCloud
    from slipstream.tasks.heartbeat import run_heartbeat

    from datetime import UTC, datetime, timedelta

    lease = Lease(cloud_env, Ownership.new("slow-cloud"), ledger=Ledger(tmp_path / "ledger.db"))
    LocalCloud(options=replace(cloud_env.options, faults=FaultOptions(slow_calls={"renew_lease": 10.0})))
    hang_ends = datetime.now(UTC) + timedelta(seconds=10)
    beating = run_heartbeat(lease, interval=0.2).start()
    try:
        beats = wait_until(lambda: (b := _beats(lease.owner.run_id)) and len(b) >= 5 and b, timeout=60,
                           what="five beats stored")
        assert len([b for b in beats if b.occurred < hang_ends]) >= 5  # sent while the renewal hung
    finally:
        LocalCloud(options=replace(cloud_env.options, faults=FaultOptions()))
        assert beating.stop(timeout=30)  # the hanging renewal ends, then both threads


def _beats(run_id: str) -> list:
    from datetime import UTC, datetime, timedelta

    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    from slipstream.ownership.heartbeat import HEARTBEAT_EVENT

    now = datetime.now(UTC)
    with get_client(sync_client=True) as client:
        page = client.read_events(filter=EventFilter(
            occurred=EventOccurredFilter(since=now - timedelta(days=1), until=now + timedelta(days=1)),
            event=EventNameFilter(name=[HEARTBEAT_EVENT]),
            resource=EventResourceFilter(id=[f"slipstream.run.{run_id}"])), limit=50)
    return page.events
