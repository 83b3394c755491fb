"""The reaper deletes a run before its lease expires only on positive evidence that it is dead.

Runs here are real resources on a real LocalCloud; "this host's process of the run is gone" is a
real process that was started, recorded in the ledger, and killed. Prefect's view comes through
the resolver's seam (``ask_prefect``), as in test_reaper.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from slipstream.cloud.local.processes import proc_stat
from slipstream.cloud.models import LeaseRenewal, Ownership, ServerSpec
from slipstream.cloud.waiting import wait_for_servers
from slipstream.ownership.ledger import Ledger, RunProcess
from slipstream.ownership.lease import teardown_run
from slipstream.ownership.reaper import PrefectRun, RunResolver, RunState, Timing, Verdict, reap

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE7x0Ff0Hnm3zQPMjLeCzLWV1dNfmSbEW9FbgpmPZx0X evidence-test"
NOOP = "slipstream-noop"
NO_GRACE = timedelta(0)
HERE = socket.gethostname()


@pytest.fixture
def ledger(tmp_path, monkeypatch) -> Ledger:
    monkeypatch.setenv("SLIPSTREAM_HOME", str(tmp_path / "slipstream"))
    return Ledger()


def run_with_resources(cloud, *, lease: timedelta = timedelta(hours=2), run_id: str | None = None) -> Ownership:
    """A run holding a keypair and a server, created by no process this host's ledger knows."""
    who = Ownership.new("elsewhere", run_id=run_id or str(uuid.uuid4()), lease=lease)
    cloud.create_keypair(f"slipstream-{who.run_id}", KEY)
    (server,) = cloud.create_servers(ServerSpec("held", "m3.tiny", NOOP), who)
    wait_for_servers(cloud, who.run_id, [server.id], timeout=20, poll_interval=0.05)  # renewable from now on
    return who


def gone_process_here(ledger: Ledger, run_id: str) -> int:
    """Record a real process of this host as the run's holder, then end it; returns its pid."""
    proc = subprocess.Popen(["sleep", "60"])
    start = proc_stat(proc.pid).start
    proc.kill()
    proc.wait(timeout=10)
    ledger.record_run_process(RunProcess(run_id, "elsewhere", "local", HERE, proc.pid, start, datetime.now(UTC)))
    return proc.pid


def kinds_left(cloud, run_id: str) -> list[str]:
    return sorted([*(["server"] * len(cloud.list_servers(run_id))), *(["keypair"] * len(cloud.list_keypairs(run_id)))])


def test_a_live_run_on_a_teammates_prefect_waits_for_its_lease(local_cloud, ledger):
    """Our Prefect has no such run (it lives on a teammate's server, or a temporary one): that is
    not evidence of death. It is kept until its lease expires; then its server goes, its key stays."""
    theirs = run_with_resources(local_cloud)
    resolver = RunResolver(ledger.run_processes(), ask_prefect=lambda run_id: None)
    report = reap(local_cloud, resolver, grace=NO_GRACE, act=True, ledger=ledger)
    (verdict,) = report.verdicts
    assert verdict.status.state == RunState.UNKNOWN and verdict.verdict == Verdict.KEEP
    assert report.proofs == {} and kinds_left(local_cloud, theirs.run_id) == ["keypair", "server"]

    after_lease = theirs.expires_at + timedelta(minutes=1)
    expired = reap(local_cloud, RunResolver(ledger.run_processes(), ask_prefect=lambda run_id: None),
                   grace=NO_GRACE, act=True, ledger=ledger, now=after_lease)
    assert expired.verdicts[0].timing == Timing.LEASE_EXPIRED and expired.proofs[theirs.run_id].clean
    assert kinds_left(local_cloud, theirs.run_id) == ["keypair"]  # only a dead run's keypair is reaped
    assert any("keypair is kept" in note for note in expired.notes)
    local_cloud.delete_keypair(f"slipstream-{theirs.run_id}")


@pytest.mark.parametrize("run_id", ["0f" * 16, None])
def test_a_plain_python_run_on_another_host_is_not_reaped_without_prefect(local_cloud, ledger, run_id):
    theirs = run_with_resources(local_cloud, run_id=run_id)
    for ask in (None, lambda r: None):  # Prefect not configured, or configured and ignorant of it
        report = reap(local_cloud, RunResolver(ledger.run_processes(), ask_prefect=ask), grace=NO_GRACE,
                      act=True, ledger=ledger)
        assert [v.verdict for v in report.verdicts] == [Verdict.KEEP], report.rows()
    assert kinds_left(local_cloud, theirs.run_id) == ["keypair", "server"]
    reap(local_cloud, RunResolver([]), grace=NO_GRACE, act=True, ledger=ledger,
         now=theirs.expires_at + timedelta(seconds=1))
    local_cloud.delete_keypair(f"slipstream-{theirs.run_id}")


def test_a_retry_on_another_host_with_a_fresh_heartbeat_is_live_though_its_process_here_is_gone(local_cloud, ledger):
    run = run_with_resources(local_cloud)
    dead_pid = gone_process_here(ledger, run.run_id)
    now = datetime.now(UTC)
    for host, pid in (("worker-b", 4242), ("worker-b", dead_pid), (HERE, dead_pid + 1), (None, None)):
        # Another host (whatever its pid), or a process of this host's name the ledger never saw
        # (a same-named machine), or a runner's beat that does not say: all outweigh the dead pid.
        retried = PrefectRun("RUNNING", "Running", last_heartbeat=now - timedelta(seconds=20),
                             heartbeat_host=host, heartbeat_pid=pid)
        report = reap(local_cloud, RunResolver(ledger.run_processes(), ask_prefect=lambda r: retried),
                      grace=NO_GRACE, act=True, ledger=ledger)
        (verdict,) = report.verdicts
        assert verdict.status.state == RunState.LIVE and "heartbeat" in verdict.status.basis, (host, pid)
        assert verdict.verdict == Verdict.KEEP and kinds_left(local_cloud, run.run_id) == ["keypair", "server"]
        assert host is None or f"heartbeat from {host}" in verdict.status.basis

    # A fresh beat sent by this host's recorded (now dead) process explains nothing: crashed.
    mine = PrefectRun("RUNNING", "Running", last_heartbeat=now - timedelta(seconds=20), heartbeat_host=HERE,
                      heartbeat_pid=dead_pid)
    report = reap(local_cloud, RunResolver(ledger.run_processes(), ask_prefect=lambda r: mine),
                  grace=NO_GRACE, act=True, ledger=ledger)
    assert report.verdicts[0].status.state == RunState.CRASHED and report.proofs[run.run_id].clean
    assert kinds_left(local_cloud, run.run_id) == []


def test_a_lease_renewed_from_another_host_outweighs_this_hosts_dead_process(local_cloud, ledger):
    run = run_with_resources(local_cloud)
    dead_pid = gone_process_here(ledger, run.run_id)
    resolver = RunResolver(ledger.run_processes())
    assert resolver(run.run_id).state == RunState.CRASHED  # this host's record alone: its process died

    now = datetime.now(UTC)
    # Another host; or this host's name but a process the ledger never saw (a same-named machine).
    for hours, host, pid in ((3, "worker-b", 0), (3.5, HERE, dead_pid + 1)):
        renewal = LeaseRenewal(now + timedelta(hours=hours), now, host, pid)
        assert local_cloud.renew_lease(run.run_id, renewal, due_before=renewal.expires_at) == 1
        report = reap(local_cloud, RunResolver(ledger.run_processes()), grace=NO_GRACE, act=True, ledger=ledger)
        (verdict,) = report.verdicts
        assert verdict.status.state == RunState.UNRESOLVED and f"renewed by {host}" in verdict.status.basis
        assert verdict.verdict == Verdict.KEEP and kinds_left(local_cloud, run.run_id) == ["keypair", "server"]

    # A renewal by the recorded (dead) process itself does not count as "held elsewhere".
    local_cloud.renew_lease(run.run_id, LeaseRenewal(now + timedelta(hours=4), now, HERE, dead_pid),
                            due_before=now + timedelta(hours=4))
    report = reap(local_cloud, RunResolver(ledger.run_processes()), grace=NO_GRACE, act=True, ledger=ledger)
    assert report.verdicts[0].status.state == RunState.CRASHED and report.proofs[run.run_id].clean


def test_a_users_own_slipstream_named_keypair_is_never_owned_or_reaped(local_cloud, ledger):
    for name in ("slipstream-laptop", "slipstream-0f0f", "slipstream-" + "A" * 32, "slipstream-" + "0" * 32 + "x"):
        local_cloud.create_keypair(name, KEY)
    assert local_cloud.list_keypairs() == []
    report = reap(local_cloud, RunResolver(ledger.run_processes(), ask_prefect=lambda r: None),
                  grace=NO_GRACE, act=True, ledger=ledger, now=datetime.now(UTC) + timedelta(days=30))
    assert report.verdicts == []
    for name in ("slipstream-laptop", "slipstream-0f0f", "slipstream-" + "A" * 32, "slipstream-" + "0" * 32 + "x"):
        local_cloud.delete_keypair(name)  # still there: deleting succeeds


def tamper(cloud, table: str, resource_id: str, **metadata: str) -> None:
    """What a teammate's ``openstack server set --property`` / ``volume set --property`` does:
    rewrite slipstream's keys on one resource (LocalCloud has no API for it, so its store)."""
    import json

    with cloud._store.write() as con:
        (raw,) = con.execute(f"SELECT metadata FROM {table} WHERE id = ?", (resource_id,)).fetchone()
        keys = {f"slipstream:{k}": v for k, v in metadata.items()}
        con.execute(f"UPDATE {table} SET metadata = ? WHERE id = ?", (json.dumps({**json.loads(raw), **keys}),
                                                                      resource_id))


def test_a_tampered_renewal_stamp_neither_stops_the_reaper_nor_counts_as_a_renewal(local_cloud, ledger):
    """A renewal time without a zone (hand-edited metadata) next to a real renewal used to compare
    naive with aware datetimes and stop the whole pass with a TypeError, for every run in the project."""
    run = run_with_resources(local_cloud)
    volume = local_cloud.create_volume("scratch", 1, run)
    now = datetime.now(UTC)
    assert local_cloud.renew_lease(run.run_id, LeaseRenewal(now + timedelta(hours=3), now, "worker-b", 7),
                                   due_before=now + timedelta(hours=3)) == 2
    tamper(local_cloud, "volumes", volume.id, renewed_at="2026-01-01T00:00:00", renewed_by="mallory")
    gone_process_here(ledger, run.run_id)  # so only the renewal from worker-b keeps the run
    report = reap(local_cloud, RunResolver(ledger.run_processes()), grace=NO_GRACE, act=True, ledger=ledger)
    (verdict,) = report.verdicts
    assert verdict.verdict == Verdict.KEEP and "renewed by worker-b" in verdict.status.basis
    teardown_run(local_cloud, run.run_id)


@pytest.mark.parametrize("renewed_ago", [timedelta(minutes=1), timedelta(minutes=12)])
def test_a_stopped_heartbeat_does_not_outweigh_a_lease_renewed_elsewhere(local_cloud, ledger, renewed_ago):
    """The beat and the lease renewal are separate threads: the beat's may die (or its events be
    lost, or its host's clock lag) while the work and its renewals go on. An unexpired renewal by
    a process other than this host's dead one keeps the run until that lease runs out; before,
    the stale beat alone made it CRASHED and a grace-0 pass deleted it."""
    run = run_with_resources(local_cloud, lease=timedelta(minutes=5))
    now = datetime.now(UTC)
    renewal = LeaseRenewal(now - renewed_ago + timedelta(minutes=30), now - renewed_ago, "worker-b", 4242)
    assert local_cloud.renew_lease(run.run_id, renewal, due_before=renewal.expires_at) == 1
    silent = PrefectRun("RUNNING", "Running", last_heartbeat=now - timedelta(minutes=6), heartbeat_host="worker-b",
                        heartbeat_pid=4242)
    report = reap(local_cloud, RunResolver(ledger.run_processes(), ask_prefect=lambda r: silent),
                  grace=NO_GRACE, act=True, ledger=ledger)
    (verdict,) = report.verdicts
    assert verdict.status.state == RunState.LIVE and "heartbeat stopped" in verdict.status.basis
    assert "renewed by worker-b" in verdict.status.basis
    assert verdict.verdict == Verdict.KEEP and kinds_left(local_cloud, run.run_id) == ["keypair", "server"]

    # When that lease runs out too, the run's server is reaped.
    report = reap(local_cloud, RunResolver(ledger.run_processes(), ask_prefect=lambda r: silent),
                  grace=NO_GRACE, act=True, ledger=ledger, now=renewal.expires_at + timedelta(seconds=1))
    assert report.proofs[run.run_id].clean and local_cloud.list_servers(run.run_id) == []
    teardown_run(local_cloud, run.run_id)


def test_a_stopped_heartbeat_with_no_renewal_elsewhere_is_still_a_crash(local_cloud, ledger):
    run = run_with_resources(local_cloud)
    dead_pid = gone_process_here(ledger, run.run_id)
    now = datetime.now(UTC)
    mine = LeaseRenewal(now + timedelta(minutes=29), now - timedelta(minutes=1), HERE, dead_pid)
    local_cloud.renew_lease(run.run_id, mine, due_before=mine.expires_at)  # renewed by the dead process itself
    silent = PrefectRun("RUNNING", "Running", last_heartbeat=now - timedelta(minutes=6))
    report = reap(local_cloud, RunResolver(ledger.run_processes(), ask_prefect=lambda r: silent),
                  grace=NO_GRACE, act=True, ledger=ledger)
    assert report.verdicts[0].status.state == RunState.CRASHED and report.proofs[run.run_id].clean
    assert kinds_left(local_cloud, run.run_id) == []


def test_a_floating_ip_left_without_its_server_by_a_run_elsewhere_is_reaped(local_cloud, ledger):
    """A run on another host whose teardown could not delete its floating IP (then deleted its
    server, and ended) is told "the reaper will retry". Nothing holds a lease any more, and the
    reaper cannot know the run (it is not ours), so the address used to stay allocated forever,
    taking the project's floating-IP quota. A floating IP serves only a server: without any server
    or volume of its run it goes after the grace; the key stays (the run is not known dead)."""
    theirs = run_with_resources(local_cloud)
    fip = local_cloud.create_floating_ip(theirs)
    for server in local_cloud.list_servers(theirs.run_id):
        local_cloud.delete_server(server.id)  # their teardown went on after the address failed
    for ask in (None, lambda r: None):
        report = reap(local_cloud, RunResolver(ledger.run_processes(), ask_prefect=ask), grace=timedelta(minutes=15),
                      act=False, ledger=ledger, now=datetime.now(UTC) + timedelta(minutes=16))
        (verdict,) = report.verdicts
        assert verdict.verdict == Verdict.REAP and "no server or volume" in verdict.reason, verdict.reason
    report = reap(local_cloud, RunResolver(ledger.run_processes(), ask_prefect=lambda r: None), grace=NO_GRACE,
                  act=True, ledger=ledger)
    assert report.proofs[theirs.run_id].clean and local_cloud.list_floating_ips(theirs.run_id) == []
    assert kinds_left(local_cloud, theirs.run_id) == ["keypair"]
    assert fip.id not in {f.id for f in local_cloud.list_floating_ips()}
    local_cloud.delete_keypair(f"slipstream-{theirs.run_id}")


def test_an_attached_floating_ip_is_not_orphaned_by_its_servers_unreadable_lease(local_cloud, ledger):
    """A server whose lease metadata someone mangled is invisible to the reaper; the address
    attached to it still serves it, so it is not reaped as left without a server."""
    theirs = run_with_resources(local_cloud)
    (server,) = local_cloud.list_servers(theirs.run_id)
    fip = local_cloud.create_floating_ip(theirs)
    local_cloud.attach_floating_ip(fip.id, server.id)
    tamper(local_cloud, "servers", server.id, expires_at="next tuesday")
    report = reap(local_cloud, RunResolver(ledger.run_processes(), ask_prefect=lambda r: None), grace=NO_GRACE,
                  act=True, ledger=ledger)
    assert [v.verdict for v in report.verdicts] == [Verdict.KEEP]
    assert [f.id for f in local_cloud.list_floating_ips(theirs.run_id)] == [fip.id]
    teardown_run(local_cloud, theirs.run_id)


def test_a_live_runs_floating_ip_is_kept_even_without_a_server(local_cloud, ledger):
    """A process of the run alive here: its address stays whatever else the run holds."""
    mine = Ownership.new("mine", run_id=str(uuid.uuid4()))
    holder = subprocess.Popen(["sleep", "60"])
    try:
        ledger.record_run_process(RunProcess(mine.run_id, "mine", "local", HERE, holder.pid,
                                             proc_stat(holder.pid).start, datetime.now(UTC)))
        local_cloud.create_floating_ip(mine)
        report = reap(local_cloud, RunResolver(ledger.run_processes()), grace=NO_GRACE, act=True, ledger=ledger)
        assert [v.verdict for v in report.verdicts] == [Verdict.KEEP] and len(local_cloud.list_floating_ips(mine.run_id)) == 1
    finally:
        holder.kill()
        holder.wait(timeout=10)
    teardown_run(local_cloud, mine.run_id)


def test_a_run_retried_after_the_pass_judged_it_is_not_deleted(local_cloud, ledger):
    """The pass judges every run, then deletes one after another (each waits for its servers to
    go). A crashed run retried meanwhile under the same flow-run id (Prefect's Retry) is Running
    with a fresh beat when its turn comes: it is asked about again and kept."""
    run = run_with_resources(local_cloud)
    answers = iter([PrefectRun("CRASHED", "Crashed", ended_at=datetime.now(UTC) - timedelta(hours=1))])

    def prefect(run_id: str) -> PrefectRun:
        return next(answers, PrefectRun("RUNNING", "Running", last_heartbeat=datetime.now(UTC), heartbeat_host="b"))

    report = reap(local_cloud, RunResolver(ledger.run_processes(), ask_prefect=prefect), grace=NO_GRACE,
                  act=True, ledger=ledger)
    assert report.proofs == {} and kinds_left(local_cloud, run.run_id) == ["keypair", "server"]
    assert report.verdicts[0].verdict == Verdict.KEEP
    assert any("not reaped" in note and "live" in note for note in report.notes), report.notes
    teardown_run(local_cloud, run.run_id)


def test_a_retry_on_another_host_stamps_its_renewal_at_once_so_a_reaper_without_prefect_keeps_it(
        local_cloud, ledger, tmp_path):
    """The first attempt (this host) made the run's server with an hour's lease and died; a retry
    on worker-b adopts it and beats. Without Prefect the reaper sees the retry only in the renewal
    stamped on the resources, and that used to wait until the lease was half gone: meanwhile this
    host's dead process made the run CRASHED and the retry's server was deleted. A process's first
    renewal now stamps every resource of its run that its own lease outlasts."""
    run = run_with_resources(local_cloud, lease=timedelta(minutes=50))  # made 10 minutes before the retry
    gone_process_here(ledger, run.run_id)
    retry = textwrap.dedent(f"""
        from datetime import timedelta
        from slipstream.cloud.local import LocalCloud
        from slipstream.cloud.models import Ownership
        from slipstream.ownership.lease import Lease
        from pathlib import Path
        from slipstream.ownership.ledger import Ledger
        owner = Ownership.new("elsewhere", run_id={run.run_id!r}, lease=timedelta(hours=1))
        lease = Lease(LocalCloud({str(local_cloud.home)!r}), owner, ledger=Ledger(Path({str(tmp_path / "b.db")!r})))
        print(lease.renew())
    """)
    done = subprocess.run(["unshare", "--uts", "sh", "-c", 'hostname worker-b && exec "$0" -c "$1"', sys.executable,
                           retry], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr
    report = reap(local_cloud, RunResolver(ledger.run_processes()), grace=NO_GRACE, act=True, ledger=ledger)
    (verdict,) = report.verdicts
    assert verdict.verdict == Verdict.KEEP and "renewed by worker-b" in verdict.status.basis, verdict.reason
    assert kinds_left(local_cloud, run.run_id) == ["keypair", "server"]
    teardown_run(local_cloud, run.run_id)
