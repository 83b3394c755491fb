"""Waiting for many servers at once: one list call per poll round, a deadline, ERROR as failure.

This is the only wait loop for servers in slipstream. Waiting server by server costs one API
call per server per round; listing the run's servers by tag costs one call per round, whatever
the batch size (see ``benchmarks/local_provision.py``).

A wait belongs to its deadline, not to the cloud's worst minute: a poll that fails with a
:class:`TransientError` (a 503 burst from the load balancer, a 429, a reset connection) is
tried again, as soon as the cloud's ``Retry-After`` allows, until the wait's own deadline
(:func:`observe`, used by every wait here and by the Lease's teardown).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from slipstream.cloud.errors import (
    CapacityError,
    CloudError,
    QuotaExceeded,
    ServerFailed,
    TransientError,
    WaitTimeout,
)
from slipstream.cloud.models import Server, ServerStatus
from slipstream.cloud.port import CloudProvider
from slipstream.retry import pause_for, within

log = logging.getLogger("slipstream.waiting")
T = TypeVar("T")

ProgressCallback = Callable[[int, int, list[Server]], None]
"""Called after every round with (servers in the wanted state, servers waited for, last view)."""

_CONSOLE_HINT = "Its console log may say more (slipstream ls shows it)."
_CAPACITY_HINT = "Try another flavour or region, or try again later."
#: What a failed server's fault means, by the words Nova puts in it. A quota fault comes from
#: Nova's second quota check, made after the batch was accepted (another request took the cores).
#: "Exceeded maximum number of retries" is Nova's MaxRetriesExceeded: every host it tried failed
#: the build (the usual end of a vGPU claim on a full GPU host) — capacity, like "No valid host".
_ERROR_FAULTS: dict[str, tuple[type[CloudError], str]] = {
    "no valid host": (CapacityError, _CAPACITY_HINT),
    "exceeded maximum number of retries": (CapacityError, _CAPACITY_HINT),
    "quota exceeded": (QuotaExceeded, ("Another request took the quota while this batch was being "
                                       "built. Delete servers you no longer need (`slipstream reap`), "
                                       "ask for fewer, or request a larger quota.")),
}
#: Nova sets ERROR a moment before it writes the fault: a faultless ERROR is read again for this
#: long before it is judged without one.
FAULT_GRACE = 5.0


def _fault_kind(fault: str) -> str:
    return next((words for words in _ERROR_FAULTS if words in fault.lower()), "")


def observe(
    read: Callable[[], T],
    *,
    deadline: float,
    poll_interval: float,
    what: str,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``read()`` for one round of a wait, riding out :class:`TransientError` until ``deadline``.

    Each failed read is followed by a pause of ``poll_interval`` or what the cloud's
    ``Retry-After`` asked, whichever is longer (never past the deadline). When the deadline
    passes with the cloud still failing, :class:`WaitTimeout` names ``what`` and the last error.
    """
    while True:
        try:
            with within(time.monotonic() + max(0.0, deadline - clock())):
                return read()
        except TransientError as err:
            left = deadline - clock()
            if left <= 0:
                raise WaitTimeout(
                    f"gave up {what}: the cloud kept failing until the deadline ({err.message})",
                    resource=err.resource,
                    cloud=err.cloud,
                    hint="The cloud is having trouble; check its status page and try again.",
                ) from err
            pause = min(pause_for(err, poll_interval), left)
            log.warning("%s: %s; reading again in %.1f s", what, err.message, pause)
            sleep(pause)


def wait_until_gone(
    listing: Callable[[], Iterable[T]],
    ids: set[str],
    *,
    what: str,
    cloud: str,
    timeout: float,
    poll_interval: float,
    describe: Callable[[T], str],
    hint: str,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Until ``listing()`` shows none of ``ids`` (deletes are asynchronous: Nova's, Cinder's), or
    :class:`WaitTimeout` naming what is left (``describe``) after ``timeout`` seconds."""
    deadline = clock() + timeout
    while True:
        listed = observe(listing, deadline=deadline, poll_interval=poll_interval,
                         what=f"waiting for {what} to be deleted", clock=clock, sleep=sleep)
        left = [r for r in listed if getattr(r, "id", None) in ids]
        if not left:
            return
        if clock() >= deadline:
            raise WaitTimeout(f"{what} still present {timeout:.0f} s after delete: "
                              + ", ".join(describe(r) for r in left), cloud=cloud, hint=hint)
        sleep(min(poll_interval, deadline - clock()))


def _failure(server: Server, cloud: CloudProvider) -> CloudError:
    fault = server.fault or "no fault message"
    kind, hint = _ERROR_FAULTS.get(_fault_kind(fault), (ServerFailed, _CONSOLE_HINT))
    state = "went to ERROR" if server.status == ServerStatus.ERROR else f"failed and stays {server.status}"
    err = kind(f"server {state}: {fault}", resource=f"{server.name} ({server.flavor})",
               cloud=cloud.name, hint=hint)
    err.fault = fault  # type: ignore[attr-defined]
    return err


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
    :class:`CapacityError` for Nova's "No valid host" and "Exceeded maximum number of retries",
    :class:`QuotaExceeded` for its quota recheck) as soon as one goes to ERROR (with its fault,
    read again for up to :data:`FAULT_GRACE` s), settles with a fault (an unshelve without a
    host) or vanishes, and :class:`WaitTimeout` naming the laggards when ``timeout`` seconds pass.
    Transient listing failures are ridden out until then (:func:`observe`).
    """
    wanted = list(server_ids)
    deadline = clock() + timeout
    faultless_since: dict[str, float] = {}
    while True:
        listing = observe(lambda: cloud.list_servers(run_id=run_id), deadline=deadline,
                          poll_interval=poll_interval, what="waiting for servers", clock=clock, sleep=sleep)
        seen = {s.id: s for s in listing}
        for sid in wanted:
            server = seen.get(sid)
            if server is None:
                raise ServerFailed(
                    "server disappeared while slipstream was waiting for it",
                    resource=sid,
                    cloud=cloud.name,
                    hint="Someone or something deleted it; the run cannot continue.",
                )
            if server.status == status:
                continue
            if server.status == ServerStatus.ERROR and not server.fault:
                first = faultless_since.setdefault(sid, clock())
                if clock() - first < FAULT_GRACE and clock() < deadline:
                    continue  # Nova writes the fault just after ERROR: judge it next round
            if server.status == ServerStatus.ERROR or server.fault:
                # a fault on a server that is not ERROR: its last operation failed for good
                # (an unshelve Nova found no host for stays SHELVED_OFFLOADED)
                raise _failure(server, cloud)
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
        server = observe(lambda: cloud.get_server(server_id), deadline=deadline, poll_interval=poll_interval,
                         what="waiting for a floating IP", clock=clock, sleep=sleep)
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
