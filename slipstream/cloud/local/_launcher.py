"""Starts LocalCloud guests as detached process groups: the middle process of a double fork.

Run by :func:`slipstream.cloud.local.processes.launch_guests` as ``python -I -S _launcher.py
<python> <vm_dir>...`` with a JSON list on stdin, one ``{"vm_dir", "console", "env"}`` per VM.
For each VM it forks a child that calls ``setsid()`` (a new session and process group, with no
controlling terminal), points stdin at /dev/null and stdout/stderr at the VM's console log,
closes every other descriptor and execs ``<python> -m slipstream.cloud.local.guest <vm_dir>``.
It prints one ``{"pid", "start"}`` per VM as JSON and exits; whoever started it reaps it, and
the guests, now orphans, are adopted (and later reaped) by init. So nothing is left as a zombie
and the guests outlive the process that created them, as VMs outlive a crashed flow.

Deliberately standard-library only and single-threaded: forking is only safe here.
"""

import json
import os
import sys


def _start_time(pid: int) -> int:
    # Field 22 of /proc/<pid>/stat; the command name (field 2) may contain spaces and ')'.
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def _become_guest(python: str, vm: dict) -> None:
    """In the child: detach and exec the guest. Never returns."""
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        console = os.open(vm["console"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(null, 0)
        os.dup2(console, 1)
        os.dup2(console, 2)
        os.closerange(3, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0 else 4096)
        os.chdir(vm["vm_dir"])
        os.execve(python, [python, "-m", "slipstream.cloud.local.guest", vm["vm_dir"]], vm["env"])
    except BaseException as err:  # noqa: BLE001 - report on the console, then die
        try:
            os.write(2, f"slipstream-local: the guest could not start: {err!r}\n".encode())
        finally:
            os._exit(127)


def main() -> None:
    python = sys.argv[1]
    vms = json.load(sys.stdin)
    started = []
    for vm in vms:
        pid = os.fork()
        if pid == 0:
            _become_guest(python, vm)
        # The child cannot be reaped (hence its pid not recycled) while we live: read its
        # start time now, so that later checks can tell it from a process that reuses the pid.
        started.append({"pid": pid, "start": _start_time(pid)})
    sys.stdout.write(json.dumps(started))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
