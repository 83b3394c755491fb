"""Ctrl-C in a terminal, and a flow SIGKILLed: what a researcher running vm_job from a script sees.

Each test runs a real script in its own process group with Prefect's *temporary* server (no
PREFECT_API_URL), as a researcher's ``python my_job.py`` does, on a LocalCloud of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slipstream.cloud.local.processes import process_table
from slipstream.temporary_servers import end_orphaned_temporary_servers, orphaned_temporary_servers
from support import wait_until

ROOT = Path(__file__).resolve().parents[2]

JOB = """
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a test runner may ignore it)
from slipstream.flows.vm_job import vm_job
vm_job(flavor="m3.tiny", command="echo JOB-IS-RUNNING; sleep 600", results_dir={results!r})
"""

SERVER_ONLY = """
import slipstream.flows  # marks this process, as any flow run does
from prefect.server.api.server import SubprocessASGIServer
server = SubprocessASGIServer()
server.start(timeout=120)
print("SERVER-UP", server.server_process.pid, flush=True)
import time; time.sleep(600)
"""


def _script_env(tmp_path: Path, local_cloud) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), SLIPSTREAM_HOME=str(tmp_path / "slipstream"),
               SLIPSTREAM_LOCAL_HOME=str(local_cloud.home), PYTHONPATH=str(ROOT / "tests"))
    return env  # no PREFECT_SERVER_ANALYTICS_ENABLED: slipstream must turn analytics off itself


def _group_alive(pgid: int) -> list[int]:
    return [pid for pid, st in process_table().items() if st.pgrp == pgid and st.state not in ("Z", "X")]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_ctrl_c_to_the_process_group_tears_down_and_exits_130_in_seconds(local_cloud, tmp_path):
    out = tmp_path / "out.txt"
    code = textwrap.dedent(JOB.format(results=str(tmp_path / "results")))
    with open(out, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=_script_env(tmp_path, local_cloud),
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # The job's first line is streamed into the run's logs (the console) while it runs.
        wait_until(lambda: "| JOB-IS-RUNNING" in out.read_text(errors="replace"), timeout=300,
                   what="the job to run on its VM")
        assert local_cloud.list_servers()
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group, server too
        rc = proc.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        _kill_group(proc)
    text = out.read_text(errors="replace")
    assert rc == 130, text[-3000:]
    assert took < 20, f"took {took:.1f} s to exit after Ctrl-C"
    assert "interrupted; teardown clean" in text and "no floating_ip, server, volume, keypair remain" in text
    assert "Failed to send telemetry" not in text
    assert local_cloud.list_servers() == [] and local_cloud.list_keypairs() == []
    wait_until(lambda: not _group_alive(proc.pid), timeout=10, what="the group's processes (temporary server) to end")
    report = wait_until(lambda: list((tmp_path / "slipstream" / "reports").glob("*/cost.csv")), timeout=5,
                        what="the run's report files")
    assert "TOTAL" in report[0].read_text()


def test_a_temporary_server_left_by_a_killed_flow_is_found_and_ended(local_cloud, tmp_path):
    out = tmp_path / "out.txt"
    with open(out, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SERVER_ONLY)], cwd=tmp_path,
                                env=_script_env(tmp_path, local_cloud), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        line = wait_until(lambda: [x for x in out.read_text().splitlines() if x.startswith("SERVER-UP")],
                          timeout=180, what="the temporary server")
        server_pid = int(line[0].split()[1])
        environ = dict(e.partition(b"=")[::2] for e in Path(f"/proc/{server_pid}/environ").read_bytes().split(b"\0"))
        assert environ[b"PREFECT_SERVER_ANALYTICS_ENABLED"].lower() == b"false"  # quiet by default, from Python too
        assert server_pid not in {s.pid for s in orphaned_temporary_servers()}  # its flow process lives
        os.kill(proc.pid, signal.SIGKILL)  # the flow process only: no atexit, no cleanup
        proc.wait(timeout=30)
        orphans = wait_until(lambda: [s for s in orphaned_temporary_servers() if s.pid == server_pid], timeout=10,
                             what="the orphaned server to be found")
        assert f"PID {server_pid}" in orphans[0].describe() and f"process {proc.pid}" in orphans[0].describe()
        ended = end_orphaned_temporary_servers(pids={server_pid})  # never another run's
        assert server_pid in {s.pid for s in ended}
        wait_until(lambda: server_pid not in process_table(), timeout=10, what="the server to end")
    finally:
        _kill_group(proc)


@pytest.fixture(autouse=True)
def _no_harness_env(monkeypatch):
    # These scripts start Prefect's temporary server themselves, whatever this test session uses.
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
