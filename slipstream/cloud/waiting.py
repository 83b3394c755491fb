"""Waiting for many servers at once: one list call per poll round, a deadline, ERROR as failure.

This is the only wait loop for servers in slipstream. Waiting server by server costs one API
call per server per round; listing the run's servers by tag costs one call per round, whatever
the batch size (see ``benchmarks/local_provision.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from slipstream.cloud.errors import CapacityError, CloudError, QuotaExceeded, ServerFailed, WaitTimeout
from slipstream.cloud.models import Server, ServerStatus
from slipstream.cloud.port import CloudProvider

ProgressCallback = Callable[[int, int, list[Server]], None]
"""Called after every round with (servers in the wanted state, servers waited for, last view)."""

_CONSOLE_HINT = "Its console log may say more (slipstream ls shows it)."
#: What an ERROR server's fault means, by the words Nova puts in it. A quota fault comes from
#: Nova's second quota check, made after the batch was accepted (another request took the cores).
_ERROR_FAULTS: dict[str, tuple[type[CloudError], str]] = {
    "no valid host": (CapacityError, "Try another flavour or region, or try again later."),
    "quota exceeded": (QuotaExceeded, ("Another request took the quota while this batch was being "
                                       "built. Delete servers you no longer need (`slipstream reap`), "
                                       "ask for fewer, or request a larger quota.")),
}


def _fault_kind(fault: str) -> str:
    return next((words for words in _ERROR_FAULTS if words in fault.lower()), "")


def wait_for_servers(
    cloud: CloudProvider,
    run_id: str,
    server_ids: Iterable[str],
    *,
    status: ServerStatus = ServerStatus.ACTIVE,
    timeout: float = 600.0,
    poll_interval: float = 1.0,
    on_progress: ProgressCallback | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Server]:
    """Wait until every server in ``server_ids`` (all of run ``run_id``) has ``status``.

    Returns the servers in the order of ``server_ids``. Raises :class:`ServerFailed` (or
    :class:`CapacityError` for Nova's "No valid host", :class:`QuotaExceeded` for its quota
    recheck) as soon as one goes to ERROR or vanishes, and :class:`WaitTimeout` naming the
    laggards when ``timeout`` seconds pass.
    """
    wanted = list(server_ids)
    deadline = clock() + timeout
    while True:
        seen = {s.id: s for s in cloud.list_servers(run_id=run_id)}
        for sid in wanted:
            server = seen.get(sid)
            if server is None:
                raise ServerFailed(
                    "server disappeared while slipstream was waiting for it",
                    resource=sid,
                    cloud=cloud.name,
                    hint="Someone or something deleted it; the run cannot continue.",
                )
            if server.status == ServerStatus.ERROR and status != ServerStatus.ERROR:
                fault = server.fault or "no fault message"
                kind, hint = _ERROR_FAULTS.get(_fault_kind(fault), (ServerFailed, _CONSOLE_HINT))
                err = kind(
                    f"server went to ERROR: {fault}",
                    resource=f"{server.name} ({server.flavor})",
                    cloud=cloud.name,
                    hint=hint,
                )
                err.fault = fault  # type: ignore[attr-defined]
                raise err
        ready = [seen[sid] for sid in wanted if seen[sid].status == status]
        if on_progress:
            on_progress(len(ready), len(wanted), [seen[sid] for sid in wanted])
        if len(ready) == len(wanted):
            return ready
        if clock() >= deadline:
            late = ", ".join(f"{seen[s].name}={seen[s].status}" for s in wanted if seen[s].status != status)
            raise WaitTimeout(
                f"servers not {status} after {timeout:.0f} s: {late}",
                cloud=cloud.name,
                hint="Raise the boot timeout, or check the cloud's status page.",
            )
        sleep(poll_interval)


def wait_for_floating_ip(
    cloud: CloudProvider,
    server_id: str,
    address: str,
    *,
    timeout: float = 60.0,
    poll_interval: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Server:
    """Wait until Nova shows ``address`` on the server: Neutron tells Nova about a new floating IP
    a moment after the attach call returns, and SSH must go to the public address, not the fixed one."""
    deadline = clock() + timeout
    while True:
        server = cloud.get_server(server_id)
        if server.floating_ip == address:
            return server
        if clock() >= deadline:
            raise WaitTimeout(
                f"floating IP {address} not shown on the server after {timeout:.0f} s",
                resource=server.name,
                cloud=cloud.name,
                hint="Neutron may be slow; check `openstack server show` and try again.",
            )
        sleep(poll_interval)
