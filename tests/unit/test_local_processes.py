"""LocalCloud VMs as processes: detached, surviving their creator, shared across processes, and
ended only by their recorded identity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from dataclasses import replace
from pathlib import Path

from slipstream.cloud.local import LocalCloud
from slipstream.cloud.local.processes import proc_stat
from slipstream.cloud.local.store import utc_iso
from slipstream.cloud.models import ServerSpec, ServerStatus
from slipstream.cloud.waiting import wait_for_servers
from support import owner, wait_until

S = ServerStatus
NOOP = "slipstream-noop"
ROOT = Path(__file__).resolve().parents[2]




def python(code: str, home: Path, **kwargs) -> subprocess.Popen:
    """Run ``code`` in another Python process using the LocalCloud at ``home``."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, text=True,
                            env={**os.environ, "SLIPSTREAM_LOCAL_HOME": str(home), "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def running(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st.state not in ("Z", "X")


def guests(cloud: LocalCloud) -> dict[str, int]:
    return {vm.name: vm.pid for vm in cloud.status().vms}


def test_vms_outlive_a_sigkilled_creator_and_reset_ends_them(local_cloud):
    creator = python("""
        import json, sys, time
        from slipstream.cloud.local import LocalCloud
        from slipstream.cloud.models import Ownership, ServerSpec
        cloud = LocalCloud()  # the home and the fast boot come from the environment and config.json
        owner = Ownership.new("orphans")
        servers = cloud.create_servers(ServerSpec("orphan", "m3.tiny", "slipstream-noop", count=2), owner)
        print(json.dumps([owner.run_id, [s.id for s in servers]]), flush=True)
        time.sleep(600)
    """, local_cloud.home)
    try:
        run_id, ids = json.loads(creator.stdout.readline())
    finally:
        creator.send_signal(signal.SIGKILL)  # a crashed flow: no cleanup code runs
        creator.wait(timeout=10)

    active = wait_for_servers(local_cloud, run_id, ids, timeout=20, poll_interval=0.05)
    assert [s.status for s in active] == [S.ACTIVE, S.ACTIVE]
    for pid in guests(local_cloud).values():
        st = proc_stat(pid)
        assert st is not None and st.state not in ("Z", "X")
        assert st.pgrp == pid  # its own process group (and session)
        assert st.ppid != creator.pid
    summary = local_cloud.reset()
    assert summary.servers == 2 and summary.processes_signalled >= 2
    assert local_cloud.list_servers() == []


def _children() -> dict:
    me = os.getpid()
    return {pid: st for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if (st := proc_stat(pid)) is not None and st.ppid == me}


def test_creating_leaves_no_zombie_and_no_child_behind(local_cloud):
    before = set(_children())  # the suite's own (its Prefect server, when an earlier module started it)
    who = owner()
    servers = local_cloud.create_servers(ServerSpec("clean", "m3.tiny", NOOP, count=3), who)
    wait_for_servers(local_cloud, who.run_id, [s.id for s in servers], timeout=20, poll_interval=0.05)
    children = {pid: st for pid, st in _children().items() if pid not in before}
    assert children == {}, f"the creator has children (zombies or VMs): {children}"
    pids = list(guests(local_cloud).values())
    for s in servers:
        local_cloud.delete_server(s.id)
    # Ended, and reaped by init: not even a zombie is left.
    wait_until(lambda: not any(proc_stat(pid) for pid in pids), what="guests reaped")


def test_two_processes_share_one_cloud_without_stepping_on_each_other(local_cloud):
    script = """
        from slipstream.cloud.errors import QuotaExceeded
        from slipstream.cloud.local import LocalCloud
        from slipstream.cloud.models import Ownership, ServerSpec
        cloud, owner = LocalCloud(), Ownership.new("share")
        made = 0
        for i in range(3):
            try:
                made += len(cloud.create_servers(ServerSpec(f"s{i}", "m3.tiny", "slipstream-noop", count=2), owner))
            except QuotaExceeded:
                print("quota", flush=True)
            cloud.list_servers()
        print("made", made, flush=True)
    """
    procs = [python(script, local_cloud.home) for _ in range(2)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out)
    made = sum(int(line.split()[1]) for out in outputs for line in out.splitlines() if line.startswith("made"))
    quota_hits = sum(out.count("quota") for out in outputs)
    servers = local_cloud.list_servers()
    # 12 asked, 10 allowed: the quota held across processes, every address is distinct.
    assert made == len(servers) == 10 and quota_hits == 1
    assert len({s.address for s in servers}) == 10
    wait_for_servers(local_cloud, servers[0].ownership.run_id, [servers[0].id], timeout=20, poll_interval=0.05)


def _fake_server(cloud: LocalCloud, pid: int, start: int) -> str:
    sid = str(uuid.uuid4())
    with cloud._store.write() as con:
        con.execute(
            "INSERT INTO servers (id, name, run_id, flavor, image, metadata, tags, status, created_at, ssh_port, "
            "boot, pid, pgid, pid_start, vm_dir) VALUES (?, 'fake', 'r', 'm3.tiny', ?, '{}', '[]', 'ACTIVE', ?, "
            "22, 1, ?, ?, ?, ?)", (sid, NOOP, utc_iso(), pid, pid, start, str(cloud.home / "vms" / sid)))
    return sid


def test_reset_never_signals_a_process_that_reused_a_recorded_pid(local_cloud):
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)  # leads its own group
    try:
        real_start = proc_stat(bystander.pid).start
        _fake_server(local_cloud, bystander.pid, real_start - 1)  # same pid, another process
        local_cloud.reset()
        assert bystander.poll() is None and running(bystander.pid)
        # With the right start time the group is provably the recorded one: it is ended.
        _fake_server(local_cloud, bystander.pid, real_start)
        local_cloud.reset()
        assert bystander.wait(timeout=10) == -signal.SIGTERM
    finally:
        if bystander.poll() is None:
            bystander.kill()
            bystander.wait(timeout=10)


def test_a_guest_that_dies_leaves_the_vm_shutoff_and_its_sshd_is_ended(local_cloud):
    who = owner()
    (server,) = local_cloud.create_servers(ServerSpec("crash", "m3.tiny", "Featured-Ubuntu24"), who)
    wait_for_servers(local_cloud, who.run_id, [server.id], timeout=20, poll_interval=0.05)
    wait_until(lambda: "END SSH HOST KEY KEYS" in local_cloud.console_log(server.id), what="sshd up")
    vm_dir = str(local_cloud.home / "vms" / server.id).encode()

    def sshd_pids() -> set[int]:
        found = set()
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            try:
                if b"sshd" in (cmd := Path(f"/proc/{pid}/cmdline").read_bytes()) and vm_dir in cmd:
                    found.add(pid)
            except OSError:
                pass
        return {p for p in found if running(p)}

    assert sshd_pids()
    os.kill(guests(local_cloud)["crash"], signal.SIGKILL)  # the VM's "hypervisor process" dies
    wait_until(lambda: local_cloud.get_server(server.id).status == S.SHUTOFF, what="SHUTOFF")
    wait_until(lambda: not sshd_pids(), what="the orphaned sshd to be ended")
    local_cloud.start_server(server.id)  # the address is free again for the next boot
    wait_for_servers(local_cloud, who.run_id, [server.id], timeout=20, poll_interval=0.05)
    wait_until(lambda: local_cloud.console_log(server.id).count("END SSH HOST KEY KEYS") == 2, what="sshd again")


def test_deleting_ends_daemons_that_left_the_process_group(local_cloud):
    who = owner()
    user_data = "#!/bin/sh\nsetsid sleep 300 > /dev/null 2>&1 < /dev/null &\necho started\n"
    (server,) = local_cloud.create_servers(ServerSpec("daemon", "m3.tiny", NOOP, user_data=user_data), who)
    wait_until(lambda: "started" in (local_cloud.home / "vms" / server.id / "console.log").read_text(),
               what="user_data")
    marker = f"SLIPSTREAM_SERVER_ID={server.id}".encode()

    def vm_processes() -> set[int]:
        found = set()
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            try:
                if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") and running(pid):
                    found.add(pid)
            except OSError:
                pass
        return found

    assert len(vm_processes()) >= 2  # the guest and the daemon
    local_cloud.delete_server(server.id)
    assert vm_processes() == set()


def test_status_reports_vms_quota_and_processes(local_cloud):
    who = owner()
    servers = local_cloud.create_servers(ServerSpec("st", "m3.small", NOOP, count=2), who)
    wait_for_servers(local_cloud, who.run_id, [s.id for s in servers], timeout=20, poll_interval=0.05)
    local_cloud.stop_server(servers[1].id)
    status = local_cloud.status()
    assert status.by_status == {"ACTIVE": 1, "SHUTOFF": 1}
    assert status.guests_alive == 1 and status.processes >= 1
    assert status.quota["instances"] == (2, 10) and status.quota["cores"] == (4, 150)
    text = status.render()
    assert "st-1" in text and servers[0].address in text and "general-1" in text


def _pids_with(entry: str) -> set[int]:
    """Running processes whose environment has ``entry`` (``NAME=value``)."""
    found = set()
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            if entry.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") and running(pid):
                found.add(pid)
        except OSError:
            pass
    return found


def test_a_delete_that_dies_halfway_leaves_the_server_listed_and_a_second_delete_ends_it(local_cloud):
    who = owner()
    stubborn = "#!/bin/sh\ntrap '' TERM\necho ready\nexec sleep 300\n"  # ignores SIGTERM
    (server,) = local_cloud.create_servers(ServerSpec("stubborn", "m3.tiny", NOOP, user_data=stubborn), who)
    wait_until(lambda: "ready" in local_cloud.console_log(server.id), what="user_data")
    guest = guests(local_cloud)["stubborn"]
    user_data = _pids_with(f"SLIPSTREAM_SERVER_ID={server.id}") - {guest}
    assert user_data
    LocalCloud(options=replace(local_cloud.options, stop_grace=60.0))  # the deleter waits a long time
    deleter = python(f"""
        from slipstream.cloud.local import LocalCloud
        LocalCloud().delete_server({server.id!r})
    """, local_cloud.home, start_new_session=True)
    try:
        wait_until(lambda: not running(guest), timeout=30, what="the guest ended by the delete")
    finally:
        os.killpg(deleter.pid, signal.SIGKILL)  # the deleting process dies in its grace period
        deleter.communicate(timeout=10)
    assert all(running(pid) for pid in user_data)  # SIGTERM was ignored: the VM's work still runs
    (listed,) = local_cloud.list_servers(who.run_id)  # ... and the server is not hidden
    assert listed.id == server.id
    LocalCloud(options=replace(local_cloud.options, stop_grace=0.5))
    local_cloud.delete_server(server.id)  # a second delete finishes the job
    assert local_cloud.list_servers(who.run_id) == []
    wait_until(lambda: not any(running(pid) for pid in user_data), what="the user_data ended")
    (history,) = local_cloud.server_history(who.run_id)
    assert [s for s, _ in history.log][-1] == S.DELETED


def test_a_daemon_that_double_forked_with_a_clean_environment_is_ended_by_reset_and_delete(local_cloud):
    who = owner()
    escapees = {}
    for name in ("reset-me", "delete-me"):
        tag = f"SLIPSTREAM_TEST_ESCAPEE={uuid.uuid4().hex}"
        # The subshell exits at once, orphaning a sleep that carries none of the VM's markers.
        user_data = f"#!/bin/sh\n(setsid env -i {tag} sleep 300 > /dev/null 2>&1 < /dev/null &)\necho started\n"
        (server,) = local_cloud.create_servers(ServerSpec(name, "m3.tiny", NOOP, user_data=user_data), who)
        escapees[name] = (server.id, tag)
    try:
        for server_id, tag in escapees.values():
            wait_until(lambda server_id=server_id: "started" in local_cloud.console_log(server_id), what="user_data")
            wait_until(lambda tag=tag: _pids_with(tag), what="the daemon")
        local_cloud.delete_server(escapees["delete-me"][0])
        assert _pids_with(escapees["delete-me"][1]) == set()
        local_cloud.reset()
        assert _pids_with(escapees["reset-me"][1]) == set()
    finally:  # on failure, do not leave a stray sleep behind
        for _, tag in escapees.values():
            for pid in _pids_with(tag):
                os.kill(pid, signal.SIGKILL)
