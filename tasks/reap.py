"""The Prefect side of the reaper: which clouds are configured, and what Prefect knows of a run.

:func:`reap_clouds` is the one pass shared by ``slipstream reap`` and the ``reaper`` flow: for
every configured cloud it lists what slipstream owns, resolves each run through this host's
ledger and (when reachable) the Prefect API, and — unless it is a dry run — deletes what the
reaper's table says to. See :mod:`slipstream.ownership.reaper` for the resolution order and the table.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from slipstream.cloud import open_cloud
from slipstream.cloud.errors import CloudError
from slipstream.ownership.heartbeat import HEARTBEAT_EVENT
from slipstream.ownership.reaper import (
    OwnedResource,
    PrefectLookup,
    PrefectRun,
    PrefectUnreachable,
    ReapReport,
    RunResolver,
    RunVerdict,
    open_ledger,
    reap,
)

log = logging.getLogger("slipstream.ownership.reaper")

OPENSTACK_BLOCK_SLUG = "slipstream-openstack-credentials"

LeakCallback = Callable[[str, RunVerdict, OwnedResource], None]


@contextmanager
def prefect_client() -> Iterator[tuple[object | None, str]]:
    """``(sync Prefect client, "")`` if an API is configured and answers, else ``(None, why not)``.

    Without ``PREFECT_API_URL`` Prefect would start a temporary server just to answer; the
    reaper does not (it would know no runs anyway), it resolves runs from this host's records.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        yield None, "no Prefect API configured (PREFECT_API_URL is unset)"
        return
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
        if problem is not None:
            yield None, f"the Prefect API at {url} is not reachable ({type(problem).__name__})"
        else:
            yield client, ""


def prefect_lookup(client) -> PrefectLookup:
    """Ask ``client`` (a sync Prefect client) for a flow run's state: the resolver's Prefect seam."""
    from prefect.exceptions import ObjectNotFound

    def ask(run_id: str) -> PrefectRun | None:
        try:
            run = client.read_flow_run(uuid.UUID(run_id))
        except ObjectNotFound:
            return None
        except Exception as err:  # noqa: BLE001 - any transport failure means "cannot ask"
            raise PrefectUnreachable(f"{type(err).__name__}: {err}") from None
        state = run.state
        if state is None:
            return PrefectRun("PENDING", "no state yet")
        beat, host, pid = last_heartbeat(client, run_id) if state.type.value == "RUNNING" else (None, None, None)
        return PrefectRun(state.type.value, state.name, run.end_time, beat, host, pid)

    return ask


def last_heartbeat(client, run_id: str) -> tuple[datetime | None, str | None, int | None]:
    """When the run last beat (by the later of its sender's and the Prefect server's clocks),
    from which host and process: slipstream's own heartbeat
    (``tasks/heartbeat.py``, whose payload names them) or the one a Prefect runner sends with
    ``PREFECT_RUNNER_HEARTBEAT_FREQUENCY`` set (sender unknown); all None if it never beat."""
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventOrder,
        EventResourceFilter,
    )

    now = datetime.now(UTC)
    try:
        page = client.read_events(filter=EventFilter(
            # Prefect's default window ends now: a sender whose clock runs ahead would be unseen.
            occurred=EventOccurredFilter(since=now - timedelta(days=1), until=now + timedelta(days=1)),
            event=EventNameFilter(name=[HEARTBEAT_EVENT, "prefect.flow-run.heartbeat"]),
            resource=EventResourceFilter(id=[f"slipstream.run.{run_id}", f"prefect.flow-run.{run_id}"]),
            order=EventOrder.DESC), limit=1)
    except Exception as err:  # noqa: BLE001 - without beats the run is judged by its state alone
        log.info("could not read the heartbeat of run %s: %s", run_id, err)
        return None, None, None
    if not page.events:
        return None, None, None
    newest = page.events[0]
    host, pid = (newest.payload or {}).get("host"), (newest.payload or {}).get("pid")
    # ``occurred`` is the sender's clock: a host running behind would make every fresh beat look
    # stopped. When the API received it is the Prefect server's clock; the later of the two never
    # makes a live run look dead (a sender running ahead only delays the verdict).
    when = max(newest.occurred, getattr(newest, "received", None) or newest.occurred)
    return (when, host if isinstance(host, str) and host else None,
            pid if isinstance(pid, int) and not isinstance(pid, bool) else None)


def configured_clouds(client, extra: Iterable[str] = ()) -> list[str]:
    """"local", every saved OpenStackCredentials block (if Prefect answers), and ``extra``."""
    refs = ["local"]
    if client is not None:
        try:
            for doc in client.read_block_documents_by_type(OPENSTACK_BLOCK_SLUG, include_secrets=False):
                refs.append(f"{OPENSTACK_BLOCK_SLUG}/{doc.name}")
        except Exception as err:  # noqa: BLE001 - no such block type registered yet is normal
            log.info("no saved OpenStack clouds: %s", err)
    for ref in extra:
        if ref not in refs:
            refs.append(ref)
    return refs


def reap_clouds(
    refs: Iterable[str],
    *,
    grace: timedelta,
    act: bool,
    client=None,
    prefect_note: str = "",
    on_leak: LeakCallback | None = None,
    now: datetime | None = None,
) -> list[ReapReport]:
    """One reaper pass over each cloud in ``refs`` (as at ``now``, default the clock); a cloud
    that cannot be listed gets a report with a note instead of stopping the others."""
    ledger, ledger_notes = open_ledger()
    processes = ledger.run_processes()
    reports = []
    for ref in refs:
        resolver = RunResolver(processes, ask_prefect=prefect_lookup(client) if client is not None else None,
                               now=now)
        if client is None and prefect_note:  # say why Prefect was not asked
            resolver.notes = [f"{prefect_note}: runs resolved from this host's records"]
        try:
            cloud = open_cloud(ref)
            report = reap(cloud, resolver, grace=grace, act=act, ledger=ledger, now=now,
                          on_event=_deleted_logger(cloud.name))
        except CloudError as err:
            report = ReapReport(ref, not act, grace, datetime.now(UTC), notes=[f"cannot list {ref}: {err}"])
        report.notes[:0] = ledger_notes
        if on_leak is not None:
            for verdict, resource in report.leaked:
                on_leak(report.cloud, verdict, resource)
        reports.append(report)
    return reports


def _deleted_logger(cloud_name: str):
    def told(action: str, res) -> None:
        log.info("%s %s %s on %s", action, res.kind, res.name, cloud_name)

    return told


def leak_event_emitter() -> LeakCallback:
    """An ``on_leak`` callback emitting one ``slipstream.resource.leaked`` event per resource."""
    from slipstream.tasks.events import emit_leaked

    def emit(cloud_name: str, verdict: RunVerdict, res: OwnedResource) -> None:
        emit_leaked(cloud_name, verdict.run_id, verdict.pipeline, str(res.kind), res.id, res.name,
                    state=verdict.status.state.value, reason=verdict.reason)

    return emit
