"""Prefect's temporary servers that slipstream flows leave behind when they are killed.

A flow called from Python with no Prefect server configured makes Prefect start a *temporary*
server (uvicorn, a child process) and stop it at exit. A flow process that is SIGKILLed (or
loses its terminal) never gets to stop it: the server lives on, holding a port and memory.

Every process that imports slipstream's flows is marked (``SLIPSTREAM_FLOW_PROCESS=<pid>:<start
time>`` in its environment, which the temporary server inherits), so such a server can be told
apart from anybody else's: it is a Prefect temporary server (``prefect.server.api.server``,
``PREFECT__SERVER_EPHEMERAL=1``) carrying our marker, and the flow process it names is gone.
``slipstream local reset`` ends them; ``slipstream runs`` names them.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from slipstream.cloud.local.processes import _all_pids, _running, _signal, proc_stat

MARKER = "SLIPSTREAM_FLOW_PROCESS"
_SERVER_APP = b"prefect.server.api.server:create_app"


@dataclass(frozen=True)
class OrphanedServer:
    """A temporary Prefect server whose slipstream flow process is gone."""

    pid: int
    start: int
    port: str
    flow_pid: int

    def describe(self) -> str:
        return (f"Prefect temporary server PID {self.pid} (port {self.port}) left by killed flow "
                f"process {self.flow_pid}")


def mark_this_process() -> None:
    """Mark this process, so a temporary server it starts can be found if it is killed."""
    me = proc_stat(os.getpid())
    if me is not None:
        os.environ[MARKER] = f"{os.getpid()}:{me.start}"


def _environ(pid: int) -> dict[bytes, bytes]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}  # gone, or not ours to read (then not ours to end either)
    return dict(entry.partition(b"=")[::2] for entry in raw.split(b"\0") if entry)


def orphaned_temporary_servers() -> list[OrphanedServer]:
    """Every temporary Prefect server on this machine started by a slipstream flow process that
    no longer runs."""
    found = []
    for pid in _all_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if _SERVER_APP not in cmdline:
            continue
        env = _environ(pid)
        owner = env.get(MARKER.encode(), b"")
        flow_pid, _, flow_start = owner.decode(errors="replace").partition(":")
        if env.get(b"PREFECT__SERVER_EPHEMERAL") != b"1" or not flow_pid.isdigit() or not flow_start.isdigit():
            continue
        st = proc_stat(pid)
        if st is None or st.state in ("Z", "X") or _running(int(flow_pid), int(flow_start)):
            continue
        port = cmdline[cmdline.index(b"--port") + 1].decode() if b"--port" in cmdline else "?"
        found.append(OrphanedServer(pid, st.start, port, int(flow_pid)))
    return found


def end_orphaned_temporary_servers(grace: float = 5.0, *, pids: set[int] | None = None) -> list[OrphanedServer]:
    """End (SIGTERM, then SIGKILL after ``grace`` s) every orphaned temporary server (of ``pids``
    only, if given); returns them."""
    servers = [s for s in orphaned_temporary_servers() if pids is None or s.pid in pids]
    targets = {(s.pid, s.start) for s in servers}
    _signal(targets, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := {t for t in targets if _running(*t)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal(left, signal.SIGKILL)
    return servers
