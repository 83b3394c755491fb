"""The reaper: find what dead runs left on a cloud and delete it, without touching a live run.

A Lease cleans up when its run ends, and Prefect's crash and cancellation hooks clean up when a
deployment run dies. What neither can catch — a flow process killed with ``kill -9`` outside a
runner, a laptop that lost power, a hook that failed — the reaper finds by the ownership tags
every resource carries, and deletes after a grace period::

    from slipstream.ownership.reaper import reap, run_resolver
    report = reap(cloud, run_resolver(ledger, ask_prefect=None))          # dry run: what and why
    report = reap(cloud, run_resolver(ledger), act=True)                  # delete, with proofs

Whether a run is alive is :mod:`slipstream.ownership.liveness`'s business (:class:`RunResolver`):
it resolves to LIVE, to a state that is positive evidence of death (FINISHED, CRASHED,
CANCELLED), or to UNKNOWN/UNRESOLVED when nothing the reaper can see says either way.

What happens to a run is the table :data:`REAP_TABLE`, keyed by (state, timing): FINISHED,
CRASHED and CANCELLED runs are reaped once the grace period has passed since the run's last sign
of life (its newest resource, its start, or its end, whichever is latest); LIVE, UNKNOWN and
UNRESOLVED runs only when their lease has expired (the latest ``expires_at`` on their resources,
which a beating run renews, plus the grace period). Floating IPs left by a run that is not
live and holds no server or volume any more count as lease expired (nothing carries a lease,
and an address without a server only takes quota). A keypair is reaped only with a run that is
positively dead: a lease that merely expired leaves it (it costs nothing). Nothing is ever
deleted that the provider port does not list as slipstream-owned, and deletion goes through
:func:`slipstream.ownership.lease.teardown_run` (dependency order, retries, teardown proof).
"""

from __future__ import annotations

import logging
import sqlite3
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

from slipstream.cloud.models import Keypair, LeaseRenewal
from slipstream.cloud.port import CloudProvider
from slipstream.ownership.lease import EventCallback, ResourceKind, TeardownProof, teardown_run
from slipstream.ownership.ledger import Ledger
from slipstream.ownership.liveness import (  # noqa: F401  (re-exported: the reaper's vocabulary)
    DEAD_STATES,
    PrefectLookup,
    PrefectRun,
    PrefectUnreachable,
    Resolver,
    RunResolver,
    RunState,
    RunStatus,
    process_alive,
)
from slipstream.retry import DEFAULT_RETRY, RetryPolicy
from slipstream.scaling.reconciler import ReconcileTable

log = logging.getLogger("slipstream.ownership.reaper")

DEFAULT_GRACE = timedelta(minutes=15)


class Timing(StrEnum):
    IN_GRACE = "within grace"
    PAST_GRACE = "past grace"
    LEASE_EXPIRED = "lease expired"


class Verdict(StrEnum):
    KEEP = "keep"
    REAP = "reap"


#: The reaper's whole policy: before its lease expires, a run is reaped only on positive evidence
#: of death. A live run, and one nothing here knows (maybe alive elsewhere), waits for its lease.
REAP_TABLE: ReconcileTable = ReconcileTable(
    "reaper",
    {
        **{(state, timing): Verdict.KEEP if timing == Timing.IN_GRACE else Verdict.REAP
           for state in DEAD_STATES for timing in Timing},
        **{(state, timing): Verdict.REAP if timing == Timing.LEASE_EXPIRED else Verdict.KEEP
           for state in (RunState.LIVE, RunState.UNKNOWN, RunState.UNRESOLVED) for timing in Timing},
    },
    classify=lambda verdict: (verdict.status.state, verdict.timing),
)


@dataclass(frozen=True)
class OwnedResource:
    kind: ResourceKind
    id: str
    name: str
    created_at: datetime | None = None
    expires_at: datetime | None = None
    detail: str = ""
    pipeline: str = ""  # servers and volumes carry it; addresses and keys do not
    renewal: LeaseRenewal | None = None  # the last heartbeat renewal of the lease, if any
    attached_to: str | None = None  # a floating IP's server, when attached


@dataclass
class RunVerdict:
    """One run's resources on one cloud, what is known of the run, and what the reaper does."""

    cloud: str
    run_id: str
    pipeline: str
    resources: list[OwnedResource]
    status: RunStatus
    last_sign_of_life: datetime | None
    expires_at: datetime | None
    timing: Timing
    verdict: Verdict = Verdict.KEEP
    reason: str = ""

    def age(self, now: datetime) -> timedelta | None:
        return None if self.last_sign_of_life is None else now - self.last_sign_of_life


@dataclass
class ReapReport:
    """What one pass found on one cloud; with ``act``, what it deleted and the teardown proofs."""

    cloud: str
    dry_run: bool
    grace: timedelta
    checked_at: datetime
    verdicts: list[RunVerdict] = field(default_factory=list)
    proofs: dict[str, TeardownProof] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def to_reap(self) -> list[RunVerdict]:
        return [v for v in self.verdicts if v.verdict == Verdict.REAP]

    @property
    def leaked(self) -> list[tuple[RunVerdict, OwnedResource]]:
        return [(v, r) for v in self.to_reap for r in v.resources]

    @property
    def clean(self) -> bool:
        """Acted, and every reaped run's teardown proof shows nothing left."""
        return all(p.clean for p in self.proofs.values())

    def rows(self) -> list[dict[str, str]]:
        """One row per run, for tables and artifacts."""
        out = []
        for v in self.verdicts:
            kinds: dict[str, int] = {}
            for r in v.resources:
                kinds[r.kind.value] = kinds.get(r.kind.value, 0) + 1
            age = v.age(self.checked_at)
            out.append({
                "cloud": v.cloud, "run": v.run_id, "pipeline": v.pipeline, "state": v.status.state.value,
                "resources": ", ".join(f"{n} {k}" for k, n in kinds.items()),
                "age": short_duration(age) if age is not None else "?",
                "verdict": v.verdict.value, "reason": v.reason,
            })
        return out


def owned_by_run(cloud: CloudProvider) -> dict[str, list[OwnedResource]]:
    """Everything slipstream owns on ``cloud``, by run id: one list call per kind.

    Addresses and keys are listed first: a run makes its server before its floating IP, so a
    floating IP listed here has its server listed after it, unless the server is really gone
    (see :func:`judge`)."""
    runs: dict[str, list[OwnedResource]] = {}
    for f in cloud.list_floating_ips():
        if f.run_id:
            runs.setdefault(f.run_id, []).append(OwnedResource(ResourceKind.FLOATING_IP, f.id, f.address,
                                                               attached_to=f.server_id))
    for k in cloud.list_keypairs():
        if k.run_id:
            runs.setdefault(k.run_id, []).append(OwnedResource(ResourceKind.KEYPAIR, k.name, k.name))
    for s in cloud.list_servers():
        o = s.ownership
        if o is not None:
            runs.setdefault(o.run_id, []).append(
                OwnedResource(ResourceKind.SERVER, s.id, s.name, s.created_at, o.expires_at, s.flavor, o.pipeline,
                              LeaseRenewal.from_metadata(s.metadata)))
    for vol in cloud.list_volumes():
        o = vol.ownership
        if o is not None:
            runs.setdefault(o.run_id, []).append(
                OwnedResource(ResourceKind.VOLUME, vol.id, vol.name, None, o.expires_at, f"{vol.size_gb} GB",
                              o.pipeline, LeaseRenewal.from_metadata(vol.metadata)))
    return runs


def judge(cloud: str, run_id: str, resources: list[OwnedResource], status: RunStatus, *,
          grace: timedelta, now: datetime, started_at: datetime | None = None,
          pipeline: str = "?") -> RunVerdict:
    """Apply :data:`REAP_TABLE` to one run."""
    signs = [t for t in (*(r.created_at for r in resources), started_at, status.ended_at) if t is not None]
    last = max(signs, default=None)
    expiries = [r.expires_at for r in resources if r.expires_at is not None]
    expires = max(expiries, default=None)  # the latest lease of the run: never reap early
    if expires is not None and now > expires + grace:
        timing = Timing.LEASE_EXPIRED
    elif last is not None and now - last < grace:
        timing = Timing.IN_GRACE
    elif _addresses_without_lease(resources, status):
        timing = Timing.LEASE_EXPIRED
    else:  # no sign of life at all is not a reason to wait: the resolver says the run is not live
        timing = Timing.PAST_GRACE
    v = RunVerdict(cloud, run_id, pipeline, resources, status, last, expires, timing)
    v.verdict = REAP_TABLE.action_for(v)
    v.reason = f"{status.state.value} ({status.basis}), {timing.value} ({short_duration(grace)})"
    if timing == Timing.LEASE_EXPIRED and expires is None:
        v.reason = (f"no server or volume of the run is left to hold a lease, only floating IPs (they serve "
                    f"nothing and take quota); {status.state.value} ({status.basis})")
    elif timing == Timing.LEASE_EXPIRED:
        v.reason = (f"lease expired at {expires:%Y-%m-%d %H:%M} UTC + {short_duration(grace)} grace; "
                    f"{status.state.value} ({status.basis})")
    return v


def reap(
    cloud: CloudProvider,
    resolve: Resolver,
    *,
    grace: timedelta = DEFAULT_GRACE,
    act: bool = False,
    ledger: Ledger | None = None,
    now: datetime | None = None,
    on_event: EventCallback | None = None,
    retry_policy: RetryPolicy = DEFAULT_RETRY,
) -> ReapReport:
    """One pass over ``cloud``: judge every run that owns something; with ``act``, tear down the
    ones :data:`REAP_TABLE` says to reap (dry run otherwise) and keep their teardown proofs.

    ``resolve`` is any ``run id -> RunStatus`` callable; a :class:`RunResolver` also lends its
    run start times (signs of life), pipeline names and notes to the report.
    """
    now = now or datetime.now(UTC)
    report = ReapReport(cloud.name, not act, grace, now)
    started = getattr(resolve, "started_at", lambda run_id: None)
    owned = owned_by_run(cloud)
    if isinstance(resolve, RunResolver):
        resolve.note_renewals(newest_renewals(owned))
    for run_id, resources in sorted(owned.items()):
        status = resolve(run_id)
        pipeline = _pipeline_of(run_id, resources, resolve)
        report.verdicts.append(judge(cloud.name, run_id, resources, status, grace=grace, now=now,
                                     started_at=started(run_id), pipeline=pipeline))
    report.notes.extend(getattr(resolve, "notes", []))
    if act:
        for v in report.to_reap:
            if (still := _still_to_reap(v, resolve, grace, now, started(v.run_id))) is not None:
                report.notes.append(f"run {v.run_id} not reaped: since this pass judged it, {still}")
                v.verdict = Verdict.KEEP
                continue
            log.warning("reaping run %s on %s: %s", v.run_id, cloud.name, v.reason)
            target = cloud if v.status.state in DEAD_STATES else _KeypairsKept(cloud)
            if target is not cloud and any(r.kind == ResourceKind.KEYPAIR for r in v.resources):
                report.notes.append(f"run {v.run_id}: its keypair is kept (the lease expired, but nothing "
                                    "shows the run is dead; keypairs cost nothing)")
            report.proofs[v.run_id] = teardown_run(target, v.run_id, ledger=ledger, on_event=on_event,
                                                   retry_policy=retry_policy)
    return report


def _still_to_reap(v: RunVerdict, resolve: Resolver, grace: timedelta, now: datetime,
                   started_at: datetime | None) -> str | None:
    """Ask about ``v``'s run again just before deleting it: a pass may spend minutes deleting
    other runs, and meanwhile a crashed run may be retried under the same flow-run id (Prefect's
    Retry). None if it is still to be reaped, else what changed."""
    if isinstance(resolve, RunResolver):
        resolve.forget(v.run_id)
    status = resolve(v.run_id)
    again = judge(v.cloud, v.run_id, v.resources, status, grace=grace, now=now, started_at=started_at,
                  pipeline=v.pipeline)
    return None if again.verdict == Verdict.REAP else f"it is {status.state.value} ({status.basis})"


def _addresses_without_lease(resources: list[OwnedResource], status: RunStatus) -> bool:
    """Does a run that is not known live hold floating IPs, none attached to a server, and
    nothing that carries a lease (no server, no volume)? A floating IP only serves a server, so
    nothing can wait for it: a run elsewhere whose teardown failed to free its address is told
    the reaper will retry. (An attached one serves a server, maybe one whose tags we cannot read.)"""
    kinds = {r.kind for r in resources}
    return (status.state != RunState.LIVE and ResourceKind.FLOATING_IP in kinds
            and not kinds & {ResourceKind.SERVER, ResourceKind.VOLUME}
            and not any(r.attached_to for r in resources if r.kind == ResourceKind.FLOATING_IP))


def newest_renewals(owned: dict[str, list[OwnedResource]]) -> dict[str, LeaseRenewal]:
    """The newest lease renewal stamped on each run's resources (runs never renewed left out)."""
    newest: dict[str, LeaseRenewal] = {}
    for run_id, resources in owned.items():
        renewals = [r.renewal for r in resources if r.renewal is not None]
        if renewals:
            newest[run_id] = max(renewals, key=lambda r: r.renewed_at)
    return newest


class _KeypairsKept:
    """``cloud`` as a teardown of a run that is not positively dead should see it: without
    keypairs (a keypair is reaped only with a dead run, see the module docstring)."""

    def __init__(self, cloud: CloudProvider) -> None:
        self._cloud = cloud

    def __getattr__(self, name: str):
        return getattr(self._cloud, name)

    def list_keypairs(self, run_id: str | None = None) -> list[Keypair]:
        return []


def _pipeline_of(run_id: str, resources: list[OwnedResource], resolve) -> str:
    known = [r.pipeline for r in resources if r.pipeline]
    known += [p.pipeline for p in getattr(resolve, "processes", {}).get(run_id, [])]
    return known[0] if known else "?"


def open_ledger(path: Path | None = None) -> tuple[Ledger, list[str]]:
    """The local ledger, or — if it is unreadable — a scratch one, with a note saying so.

    The reaper must work without the ledger: every resource carries its tags on the cloud.
    """
    try:
        ledger = Ledger(path)
        ledger.run_processes()
        return ledger, []
    except sqlite3.DatabaseError as err:
        scratch = Path(tempfile.mkdtemp(prefix="slipstream-reaper-")) / "ledger.db"
        note = f"the local ledger is unreadable ({err}); finding resources by their tags only"
        log.warning(note)
        return Ledger(scratch), [note]


def short_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
