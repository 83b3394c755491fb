"""The reaper's fault cases: a killed flow, a live run next to the reaper, a lost ledger.

Each case runs real flows (``vm_job`` in a subprocess of its own, as a researcher's terminal or a
worker would) against a real Prefect API and a real LocalCloud, then runs one pass of the
``reaper`` flow, and checks the two promises:

1. nothing owned remains (and the VM processes are gone: the ``local_cloud`` fixture checks);
2. the SUs metered from the state logs are right: a VM orphaned by a killed run is charged its
   flavour rate from ACTIVE until the moment the reaper deleted it — not a second less (it really
   kept costing) and nothing after.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType

from slipstream.cost.accounting import meter_servers
from slipstream.cloud.local import FaultOptions, LocalCloud
from slipstream.cloud.models import ServerStatus
from slipstream.jetstream2 import FLAVORS, su_per_hour
from support import wait_until

ROOT = Path(__file__).resolve().parents[2]
S = ServerStatus
pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def prefect_api(prefect_harness):
    return prefect_harness


class FlowProcess:
    """``vm_job`` run as a plain ``python`` process (no runner: nobody reports its death)."""

    def __init__(self, tmp_path: Path, api: str, command: str) -> None:
        code = textwrap.dedent(f"""
            import json
            from slipstream.flows.vm_job import vm_job
            r = vm_job(flavor="m3.tiny", command={command!r}, max_hours=0.2, boot_timeout_seconds=120)
            print("RESULT " + json.dumps({{"run_id": r.run_id, "clean": r.teardown_clean,
                                          "stdout": r.stdout_tail}}), flush=True)
        """)
        env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect-flow"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT)}
        self.log = tmp_path / "flow.log"
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=open(self.log, "wb"), text=True, start_new_session=True)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # no Lease.__exit__, no finally, no hook
        self.proc.wait(timeout=10)

    def result(self, timeout: float = 120) -> dict:
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, self.log.read_text()[-3000:]
        return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()


@pytest.fixture
def flow_process(cloud_env, prefect_api, tmp_path):
    started: list[FlowProcess] = []

    def start(command: str) -> FlowProcess:
        started.append(FlowProcess(tmp_path, prefect_api, command))
        return started[-1]

    yield start
    for fp in started:
        fp.stop()


def slow_boot(cloud: LocalCloud, seconds: float) -> None:
    LocalCloud(options=replace(cloud.options, faults=FaultOptions(extra_boot_delay=seconds)))


def the_vm(cloud: LocalCloud, status: ServerStatus | None = None):
    servers = [s for s in cloud.list_servers() if status is None or s.status == status]
    return servers[0] if servers else None


def assert_nothing_left(cloud: LocalCloud) -> None:
    assert cloud.list_servers() == [] and cloud.list_floating_ips() == []
    assert cloud.list_volumes() == [] and cloud.list_keypairs() == []


def assert_charged_until_reaped(cloud: LocalCloud, run_id: str, reaper_started: datetime) -> float:
    """The orphaned VM cost its rate from ACTIVE until the reaper deleted it; returns the SUs."""
    (history,) = cloud.server_history(run_id)
    assert [s for s, _ in history.log] == [S.BUILD, S.ACTIVE, S.DELETED]
    (_, active_at), (_, deleted_at) = history.log[1], history.log[2]
    assert deleted_at >= reaper_started  # nothing deleted it before the reaper did
    (metered,) = meter_servers(cloud, [(history.id, history.name, history.flavor)])
    rate = su_per_hour(FLAVORS[history.flavor])
    assert metered.su == pytest.approx(rate * (deleted_at - active_at).total_seconds() / 3600, rel=1e-9)
    assert metered.hours_active * 3600 >= (reaper_started - active_at).total_seconds()  # it kept costing
    return metered.su


def test_a_sigkilled_flow_is_cleaned_by_one_reaper_pass(flow_process, cloud_env):
    from slipstream.flows.reaper import reaper

    flow = flow_process("sleep 600")
    server = wait_until(lambda: the_vm(cloud_env, S.ACTIVE), timeout=90, what="the run's VM to be ACTIVE")
    run_id = server.ownership.run_id
    wait_until(lambda: cloud_env.list_floating_ips(run_id), timeout=60, what="the run's floating IP")
    flow.kill()
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state.type == StateType.RUNNING  # Prefect never heard it die

    reaper_started = datetime.now(UTC)
    result = reaper(grace_minutes=0)
    assert result.reaped_runs == [run_id] and result.clean
    (row,) = result.runs
    assert row["state"] == "crashed" and "Prefect says Running but its process" in row["reason"]
    assert "1 server" in row["resources"] and "1 keypair" in row["resources"]
    assert_nothing_left(cloud_env)
    assert assert_charged_until_reaped(cloud_env, run_id, reaper_started) > 0


def test_the_reaper_leaves_a_run_that_is_provisioning_alone(flow_process, cloud_env):
    from slipstream.flows.reaper import reaper

    slow_boot(cloud_env, 4.0)
    flow = flow_process("echo finished by myself")
    server = wait_until(lambda: the_vm(cloud_env, S.BUILD), timeout=60, what="the run's VM to be booting")
    run_id = server.ownership.run_id

    result = reaper(grace_minutes=0)  # no grace at all: only the run's liveness protects it
    assert result.reaped_runs == [] and result.leaked_resources == 0
    (row,) = result.runs
    assert row["state"] == "live" and row["verdict"] == "keep" and "is running" in row["reason"]
    assert cloud_env.get_server(server.id).status in (S.BUILD, S.ACTIVE)

    done = flow.result()
    assert done["run_id"] == run_id and done["clean"] and "finished by myself" in done["stdout"]
    assert_nothing_left(cloud_env)
    (history,) = cloud_env.server_history(run_id)
    assert [s for s, _ in history.log] == [S.BUILD, S.ACTIVE, S.DELETED]  # deleted by its own lease
    assert reaper(grace_minutes=0).runs == []


@pytest.mark.parametrize("damage", ["missing", "corrupted"])
def test_without_a_usable_ledger_the_reaper_still_finds_everything_by_its_tags(flow_process, cloud_env, damage):
    from slipstream.flows.reaper import reaper

    flow = flow_process("sleep 600")
    server = wait_until(lambda: the_vm(cloud_env, S.ACTIVE), timeout=90, what="the run's VM to be ACTIVE")
    run_id = server.ownership.run_id
    wait_until(lambda: cloud_env.list_floating_ips(run_id), timeout=60, what="the run's floating IP")
    flow.kill()
    with get_client(sync_client=True) as client:  # what a worker reports when its flow process dies
        from prefect.client.schemas.objects import State

        client.set_flow_run_state(run_id, State(type=StateType.CRASHED, message="process killed"), force=True)
    ledger = Path(os.environ["SLIPSTREAM_HOME"]) / "ledger.db"
    for part in ledger.parent.glob("ledger.db*"):
        part.unlink()
    if damage == "corrupted":
        ledger.write_bytes(os.urandom(8192))

    reaper_started = datetime.now(UTC)
    result = reaper(grace_minutes=0)
    assert result.reaped_runs == [run_id] and result.clean
    (row,) = result.runs
    assert row["state"] == "crashed" and "Prefect: Crashed" in row["reason"]
    assert sorted(row["resources"].split(", ")) == ["1 floating_ip", "1 keypair", "1 server"]
    if damage == "corrupted":
        assert any("ledger is unreadable" in n for n in result.notes)
        assert ledger.read_bytes()  # evidence kept: the reaper never overwrites the user's ledger
    assert_nothing_left(cloud_env)
    assert_charged_until_reaped(cloud_env, run_id, reaper_started)
