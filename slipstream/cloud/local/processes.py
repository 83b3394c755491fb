"""The processes behind LocalCloud VMs: start them detached, find them, and end only them.

A VM is a *guest* process (``python -m slipstream.cloud.local.guest``) leading its own process
group, plus what it starts (sshd, user_data). :func:`launch_guests` starts guests through a
double fork (see ``_launcher.py``) so they outlive their creator and leave no zombie.

Ending a VM must never hit an unrelated process that happens to reuse a recorded pid. So:

- a guest is identified by (pid, start time), both recorded when it starts; its process group
  is signalled only while its leader still has that start time, or, when the leader is gone,
  only members that prove they are the VM's: by its marker variable or, for sshd (which
  overwrites its environment with its process title), by the VM directory on their command
  line (Linux does not reuse a pid while a process group of that number has members);
- processes that left the group (sshd sessions call setsid, and so may user daemons) are found
  by the marker variable every VM process inherits (``SLIPSTREAM_LOCALCLOUD_VM=<id>/<boot>``)
  and as descendants of processes already found (a child belongs to its running parent);
- a process that also left the tree (a daemon's double fork) and cleared its environment
  (``env -i``) carries nothing of the VM: so the guest is a *child subreaper*
  (:func:`become_subreaper`), and such an orphan is re-parented to the guest instead of init,
  which keeps it among the guest's descendants for as long as the guest runs;
- each process is signalled through a pidfd opened *before* its identity is checked, so the
  signal reaches exactly the process that was checked.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

LAUNCHER = Path(__file__).with_name("_launcher.py")
#: Every process of every VM of a home carries ``SLIPSTREAM_LOCALCLOUD=<home>``.
HOME_MARKER = "SLIPSTREAM_LOCALCLOUD"
#: ... and ``SLIPSTREAM_LOCALCLOUD_VM=<server id>/<boot number>`` for its own VM and boot.
VM_MARKER = "SLIPSTREAM_LOCALCLOUD_VM"


@dataclass(frozen=True)
class GuestProcess:
    pid: int
    pgid: int
    start: int  # clock ticks since boot, /proc/<pid>/stat field 22


@dataclass(frozen=True)
class ProcStat:
    ppid: int
    pgrp: int
    start: int
    state: str


def vm_marker(server_id: str, boot: int) -> str:
    return f"{server_id}/{boot}"


def proc_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return ProcStat(ppid=int(fields[1]), pgrp=int(fields[2]), start=int(fields[19]), state=fields[0])


def _running(pid: int, start: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st.start == start and st.state not in ("Z", "X")


def guest_alive(guest: GuestProcess) -> bool:
    """Is this exact guest (same pid *and* start time) still running (not a zombie)?"""
    st = proc_stat(guest.pid)
    return st is not None and st.start == guest.start and st.pgrp == guest.pgid and st.state not in ("Z", "X")


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False  # gone, or not ours to read (then not ours to signal either)


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def processes_with(variable: str, value: str) -> set[tuple[int, int]]:
    """(pid, start) of every running process whose environment has ``variable=value``."""
    return _processes_with_any({f"{variable}={value}".encode()})


def _processes_with_any(entries: set[bytes]) -> set[tuple[int, int]]:
    if not entries:
        return set()
    me = os.getpid()
    found = set()
    for pid in _all_pids():
        if pid == me:
            continue
        try:
            environ = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue  # gone, or not ours to read (then not ours to signal either)
        if environ & entries:
            st = proc_stat(pid)
            if st is not None and st.state not in ("Z", "X"):
                found.add((pid, st.start))
    return found


def process_table() -> dict[int, ProcStat]:
    """Every process now, pid -> its /proc stat."""
    table = {}
    for pid in _all_pids():
        st = proc_stat(pid)
        if st is not None:
            table[pid] = st
    return table


@dataclass(frozen=True)
class VmProcesses:
    """How to find one boot of a VM: its recorded guest, marker and directory."""

    guest: GuestProcess | None
    marker: str   # the VM_MARKER value of this boot
    vm_dir: str   # a process whose command line names it belongs to this VM (e.g. its sshd)


def _cmdline_has(pid: int, text: bytes) -> bool:
    try:
        return text in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def group_members(vm: VmProcesses, table: dict[int, ProcStat] | None = None) -> set[tuple[int, int]]:
    """(pid, start) of the guest's process group, if it is still provably the guest's."""
    guest = vm.guest
    if guest is None:
        return set()
    members = set()
    leader_ok = False
    for pid, st in (table if table is not None else process_table()).items():
        if st.pgrp != guest.pgid or st.state in ("Z", "X"):
            continue
        if pid == guest.pgid:
            if st.start != guest.start:
                return set()  # the number was recycled: this group is someone else's
            leader_ok = True
        members.add((pid, st.start))
    if leader_ok:
        return members
    # Leader gone (killed on its own): keep the members that prove they belong to the VM, by
    # its marker or (sshd overwrites its environment with its process title) its directory.
    entry, where = f"{VM_MARKER}={vm.marker}".encode(), vm.vm_dir.encode()
    return {(pid, start) for pid, start in members
            if _environ_has(pid, entry) or _cmdline_has(pid, where)}


def descendants(roots: set[tuple[int, int]], table: dict[int, ProcStat]) -> set[tuple[int, int]]:
    """Every running descendant of ``roots``: while a parent runs, its children are its own
    (sshd's per-connection processes call setsid and leave the group, but not the tree)."""
    children: dict[int, list[int]] = {}
    for pid, st in table.items():
        children.setdefault(st.ppid, []).append(pid)
    found: set[tuple[int, int]] = set()
    todo = [pid for pid, _ in roots]
    while todo:
        for child in children.get(todo.pop(), []):
            st = table[child]
            if (child, st.start) not in found and st.state not in ("Z", "X"):
                found.add((child, st.start))
                todo.append(child)
    return found


def _signal(targets: Iterable[tuple[int, int]], sig: int) -> int:
    """Signal each (pid, start) that is still that process; returns how many were signalled."""
    sent = 0
    for pid, start in targets:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue  # already gone
        try:
            if _running(pid, start):  # checked after the pidfd pins the process
                signal.pidfd_send_signal(fd, sig)
                sent += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return sent


def end_vms(vms: Iterable[VmProcesses], grace: float, *, home: str | None = None) -> int:
    """End VMs' processes: SIGTERM, then SIGKILL after ``grace`` seconds; returns how many
    processes were signalled. The targets: each guest's process group (verified) and the
    descendants of its members, every process carrying one of the VMs' markers and, when
    ``home`` is given, every process of that LocalCloud home."""
    vms = list(vms)

    def targets() -> set[tuple[int, int]]:
        table = process_table()
        found: set[tuple[int, int]] = set()
        for vm in vms:
            found |= group_members(vm, table)
        markers = {f"{VM_MARKER}={vm.marker}".encode() for vm in vms}
        if home:
            markers.add(f"{HOME_MARKER}={home}".encode())
        found |= _processes_with_any(markers)
        return found | descendants(found, table)

    seen: set[tuple[int, int]] = set()
    signalled = 0
    deadline = time.monotonic() + grace
    while True:
        new = targets() - seen  # the first round, then any started while we end the others
        signalled += _signal(new, signal.SIGTERM)
        seen |= new
        left = {t for t in seen if _running(*t)}
        if not left:
            return signalled
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    _signal(left, signal.SIGKILL)
    hard_deadline = time.monotonic() + 10.0  # SIGKILL cannot be ignored; this only bounds the wait
    while (left := {t for t in seen if _running(*t)} | targets()) and time.monotonic() < hard_deadline:
        _signal(left, signal.SIGKILL)
        time.sleep(0.02)
    return signalled


_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children instead of init's (Linux >= 3.4);
    returns False where the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def reap_adopted(seen_before: set[int]) -> set[int]:
    """Wait for this process's children that are zombies now *and* were already at the last call
    (``seen_before``): orphans it adopted as a subreaper, which nobody else waits for. A child
    the event loop started is waited for by its own watcher at once, so it is never a zombie
    twice in a row. Returns the zombies seen now, for the next call."""
    me = os.getpid()
    zombies = {pid for pid, st in process_table().items() if st.ppid == me and st.state == "Z"}
    for pid in zombies & seen_before:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # waited for meanwhile
    return zombies - seen_before


def launch_guests(vms: list[dict], python: str | None = None, timeout: float = 60.0) -> list[GuestProcess]:
    """Start one detached guest per ``{"vm_dir", "console", "env"}``; returns them in order.

    Raises RuntimeError (with the launcher's message) if the launcher fails.
    """
    python = python or sys.executable
    if not vms:
        return []
    done = subprocess.run(
        [python, "-I", "-S", str(LAUNCHER), python],
        input=json.dumps(vms), capture_output=True, text=True, timeout=timeout,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the LocalCloud launcher failed ({done.returncode}): {done.stderr.strip()}")
    started = json.loads(done.stdout)
    # setsid() made each guest the leader of a process group numbered like itself.
    return [GuestProcess(pid=s["pid"], pgid=s["pid"], start=s["start"]) for s in started]
