"""The reaper's core on a real LocalCloud: what it reaps, what it leaves alone, and why.

A "crashed run" here is a real process that created resources through a Lease and was then
SIGKILLed; a "live run" is a Lease held by the test process itself. Prefect's view of a run comes
through the resolver's seam (``ask_prefect``); the real Prefect client is exercised in
tests/integration/test_reaper_flow.py and tests/faults/test_reaper_cases.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from slipstream.cloud.errors import NotFound
from slipstream.cloud.models import Ownership, ServerSpec
from slipstream.ownership.lease import Lease
from slipstream.ownership.heartbeat import STALE_AFTER, heartbeat
from slipstream.ownership.ledger import Ledger
from slipstream.ownership.reaper import (
    REAP_TABLE,
    PrefectRun,
    PrefectUnreachable,
    RunResolver,
    RunState,
    Timing,
    Verdict,
    open_ledger,
    reap,
)
from support import owner, wait_until

ROOT = Path(__file__).resolve().parents[2]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE7x0Ff0Hnm3zQPMjLeCzLWV1dNfmSbEW9FbgpmPZx0X reaper-test"
NOOP = "slipstream-noop"
NO_GRACE = timedelta(0)
CRASHED_1, CRASHED_2, CRASHED_3 = (f"c{i}" * 16 for i in (1, 2, 3))  # generated-looking run ids


@pytest.fixture
def ledger(tmp_path, monkeypatch) -> Ledger:
    monkeypatch.setenv("SLIPSTREAM_HOME", str(tmp_path / "slipstream"))
    return Ledger()


def crashed_run(local_cloud, tmp_path, run_id: str, servers: int = 2) -> None:
    """A real plain-Python run: a process creates a key, servers and an address through a Lease,
    then is SIGKILLed (no ``with`` exit, no teardown)."""
    code = textwrap.dedent(f"""
        import sys, time
        from datetime import timedelta
        from slipstream.cloud.local import LocalCloud
        from slipstream.cloud.models import Ownership, ServerSpec
        from slipstream.ownership.lease import Lease
        lease = Lease(LocalCloud({str(local_cloud.home)!r}),
                      Ownership.new("crashy", run_id={run_id!r}, lease=timedelta(hours=1)))
        lease.create_keypair({KEY!r})
        lease.create_servers(ServerSpec("crashy", "m3.tiny", {NOOP!r}, count={servers}))
        lease.create_floating_ip()
        print("holding", flush=True)
        time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLIPSTREAM_HOME": os.environ["SLIPSTREAM_HOME"]}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "holding"  # blocks until the resources exist
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def owned(cloud, run_id: str) -> int:
    return sum(len(x) for x in (cloud.list_servers(run_id), cloud.list_floating_ips(run_id),
                                cloud.list_volumes(run_id), cloud.list_keypairs(run_id)))


def test_a_dry_run_says_what_and_why_and_acting_deletes_it_with_a_proof(local_cloud, ledger, tmp_path):
    crashed_run(local_cloud, tmp_path, CRASHED_1)
    resolver = RunResolver(ledger.run_processes())

    dry = reap(local_cloud, resolver, grace=NO_GRACE, ledger=ledger)
    (verdict,) = dry.verdicts
    assert dry.dry_run and verdict.verdict == Verdict.REAP and verdict.pipeline == "crashy"
    assert verdict.status.state == RunState.CRASHED and "is gone" in verdict.status.basis
    assert sorted(r.kind.value for r in verdict.resources) == ["floating_ip", "keypair", "server", "server"]
    assert owned(local_cloud, CRASHED_1) == 4 and dry.proofs == {}  # a dry run touches nothing
    row = dry.rows()[0]
    assert row["verdict"] == "reap" and row["state"] == "crashed" and "2 server" in row["resources"]

    done = reap(local_cloud, RunResolver(ledger.run_processes()), grace=NO_GRACE, act=True, ledger=ledger)
    proof = done.proofs[CRASHED_1]
    assert proof.clean and done.clean and owned(local_cloud, CRASHED_1) == 0
    assert sorted(r.kind.value for r in proof.deleted) == ["floating_ip", "keypair", "server", "server"]
    assert not ledger.entries(CRASHED_1, live_only=True)  # the ledger knows they are gone


def test_a_live_plain_python_run_is_never_reaped_and_its_own_teardown_still_works(local_cloud, ledger):
    me = owner("live")
    with Lease(local_cloud, me, ledger=ledger) as lease:
        lease.create_keypair(KEY)
        lease.create_servers(ServerSpec("live", "m3.tiny", NOOP))
        report = reap(local_cloud, RunResolver(ledger.run_processes()), grace=NO_GRACE, act=True, ledger=ledger)
        (verdict,) = report.verdicts
        assert verdict.status.state == RunState.LIVE and f"process {os.getpid()}" in verdict.status.basis
        assert verdict.verdict == Verdict.KEEP and report.proofs == {}
        assert owned(local_cloud, me.run_id) == 2
    assert lease.proof.clean and owned(local_cloud, me.run_id) == 0


def test_a_crashed_run_is_kept_within_the_grace_period_and_reaped_after_it(local_cloud, ledger, tmp_path):
    crashed_run(local_cloud, tmp_path, CRASHED_2, servers=1)
    resolver = RunResolver(ledger.run_processes())
    (young,) = reap(local_cloud, resolver, grace=timedelta(minutes=15), act=True, ledger=ledger).verdicts
    assert young.timing == Timing.IN_GRACE and young.verdict == Verdict.KEEP
    assert owned(local_cloud, CRASHED_2) == 3

    later = datetime.now(UTC) + timedelta(minutes=16)
    report = reap(local_cloud, resolver, grace=timedelta(minutes=15), act=True, ledger=ledger, now=later)
    assert report.verdicts[0].timing == Timing.PAST_GRACE and report.proofs[CRASHED_2].clean
    assert owned(local_cloud, CRASHED_2) == 0


def test_an_expired_lease_is_reaped_even_if_its_run_looks_live(local_cloud, ledger):
    expired = Ownership.new("overdue", run_id="overdue-run", lease=timedelta(seconds=-1))
    lease = Lease(local_cloud, expired, ledger=ledger)
    lease.create_servers(ServerSpec("overdue", "m3.tiny", NOOP))
    report = reap(local_cloud, RunResolver(ledger.run_processes()), grace=NO_GRACE, act=True, ledger=ledger)
    (verdict,) = report.verdicts
    assert verdict.status.state == RunState.LIVE and verdict.timing == Timing.LEASE_EXPIRED
    assert verdict.verdict == Verdict.REAP and "lease expired" in verdict.reason
    assert report.proofs["overdue-run"].clean and owned(local_cloud, "overdue-run") == 0
    assert lease.teardown().clean  # the run's own teardown finds nothing left, and does not fail


def test_prefects_view_decides_for_runs_this_host_does_not_hold(local_cloud, ledger, tmp_path):
    crashed_run(local_cloud, tmp_path, "9b1f0c2e5a6d4e7f8a9b0c1d2e3f4a5b", servers=1)  # Prefect thinks: Running
    for run_id in ("0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a", "1e2d3c4b5a6f7e8d9c0b1a2f3e4d5c6b"):
        Lease(local_cloud, Ownership.new("elsewhere", run_id=run_id), ledger=Ledger(tmp_path / "other.db")) \
            .create_keypair(KEY.replace("reaper-test", run_id))
    views = {"9b1f0c2e5a6d4e7f8a9b0c1d2e3f4a5b": PrefectRun("RUNNING", "Running"),
             "0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a": PrefectRun("COMPLETED", "Completed", datetime.now(UTC))}
    report = reap(local_cloud, RunResolver(ledger.run_processes(), ask_prefect=views.get), grace=NO_GRACE)
    states = {v.run_id: (v.status.state, v.verdict) for v in report.verdicts}
    assert states == {
        "9b1f0c2e5a6d4e7f8a9b0c1d2e3f4a5b": (RunState.CRASHED, Verdict.REAP),  # Running, but its process is gone
        "0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a": (RunState.FINISHED, Verdict.REAP),
        # Prefect never heard of it: a teammate's Prefect, or a temporary server. Not evidence of death.
        "1e2d3c4b5a6f7e8d9c0b1a2f3e4d5c6b": (RunState.UNKNOWN, Verdict.KEEP),
    }

    def unreachable(run_id):
        raise PrefectUnreachable("connection refused")

    report = reap(local_cloud, RunResolver([], ask_prefect=unreachable), grace=NO_GRACE, act=True, ledger=ledger)
    assert {v.status.state for v in report.verdicts} == {RunState.UNRESOLVED}
    assert all(v.verdict == Verdict.KEEP for v in report.verdicts) and report.proofs == {}
    assert any("Prefect API not reachable (connection refused)" in n for n in report.notes)
    reap(local_cloud, RunResolver(ledger.run_processes(), ask_prefect=views.get), grace=NO_GRACE, act=True,
         ledger=ledger)
    assert owned(local_cloud, None) == 1 and owned(local_cloud, "1e2d3c4b5a6f7e8d9c0b1a2f3e4d5c6b") == 1
    local_cloud.delete_keypair("slipstream-1e2d3c4b5a6f7e8d9c0b1a2f3e4d5c6b")


def test_a_running_run_is_crashed_once_its_heartbeat_is_stale_and_live_while_it_beats():
    now = datetime.now(UTC)
    views = {"a" * 32: PrefectRun("RUNNING", "Running", last_heartbeat=now - STALE_AFTER - timedelta(seconds=5)),
             "b" * 32: PrefectRun("RUNNING", "Running", last_heartbeat=now - timedelta(seconds=30)),
             "c" * 32: PrefectRun("RUNNING", "Running"),  # never beat (an older slipstream): its state decides
             "d" * 32: PrefectRun("COMPLETED", "Completed", now, last_heartbeat=now - timedelta(hours=1))}
    resolve = RunResolver([], ask_prefect=views.get)
    stale = resolve("a" * 32)
    assert stale.state == RunState.CRASHED and "heartbeat stopped at" in stale.basis
    assert stale.ended_at == views["a" * 32].last_heartbeat  # the grace period counts from the last beat
    assert [resolve(r * 32).state for r in "bcd"] == [RunState.LIVE, RunState.LIVE, RunState.FINISHED]


def test_a_heartbeat_beats_until_stopped_and_survives_a_failing_beat():
    calls: list[float] = []

    def beat() -> None:
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise ConnectionError("the API blinked")

    beating = heartbeat(beat, interval=0.05).start()
    wait_until(lambda: len(calls) >= 4, timeout=10, what="four beats")
    beating.stop()
    assert not beating.running  # stop() returns once its thread is gone: no beat can follow
    assert beating.done == len(calls) - 1  # the failed beat is not counted, and the next ones came


def test_a_resource_without_slipstream_ownership_is_never_touched(local_cloud, ledger, tmp_path):
    local_cloud.create_keypair("someone-elses-key", KEY)  # not named slipstream-<run id>: not ours
    crashed_run(local_cloud, tmp_path, CRASHED_3, servers=1)
    report = reap(local_cloud, RunResolver(ledger.run_processes()), grace=NO_GRACE, act=True, ledger=ledger)
    assert [v.run_id for v in report.verdicts] == [CRASHED_3] and report.clean
    local_cloud.delete_keypair("someone-elses-key")  # still there: deleting it now succeeds
    with pytest.raises(NotFound):
        local_cloud.delete_keypair("someone-elses-key")


def test_the_table_reaps_before_the_lease_expires_only_on_evidence_of_death():
    rows = dict(REAP_TABLE.rows)
    assert set(rows) == {(s, t) for s in RunState for t in Timing}
    for state in (RunState.LIVE, RunState.UNKNOWN, RunState.UNRESOLVED):
        assert [t for t in Timing if rows[(state, t)] == Verdict.REAP] == [Timing.LEASE_EXPIRED]
    for state in (RunState.FINISHED, RunState.CRASHED, RunState.CANCELLED):
        assert rows[(state, Timing.IN_GRACE)] == Verdict.KEEP and rows[(state, Timing.PAST_GRACE)] == Verdict.REAP
    assert ("crashed + past grace", "reap") in REAP_TABLE.describe()


def test_a_corrupted_ledger_is_reported_and_replaced_by_a_scratch_one(tmp_path):
    bad = tmp_path / "ledger.db"
    bad.write_bytes(b"this is not an sqlite database" * 100)
    ledger, notes = open_ledger(bad)
    assert ledger.path != bad and ledger.run_processes() == []
    assert notes and "unreadable" in notes[0] and "by their tags" in notes[0]
