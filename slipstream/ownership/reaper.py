"""The reaper: find what dead runs left on a cloud and delete it, without touching a live run.

A Lease cleans up when its run ends, and Prefect's crash and cancellation hooks clean up when a
deployment run dies. What neither can catch — a flow process killed with ``kill -9`` outside a
runner, a laptop that lost power, a hook that failed — the reaper finds by the ownership tags
every resource carries, and deletes after a grace period::

    from slipstream.ownership.reaper import reap, run_resolver
    report = reap(cloud, run_resolver(ledger, ask_prefect=None))          # dry run: what and why
    report = reap(cloud, run_resolver(ledger), act=True)                  # delete, with proofs

How a run's state is resolved (:func:`run_resolver`), in this order:

1. **A live process on this host.** A Lease notes ``(run id, host, pid, pid start time)`` in the
   ledger when it first creates something. If one such process is still running, the run is
   LIVE, whatever else says so: a plain-Python run (generated id, unknown to Prefect) is safe.
2. **Prefect**, if it can be asked: Scheduled/Pending/Running/Paused/Cancelling → LIVE,
   Completed/Failed → FINISHED, Crashed → CRASHED, Cancelled → CANCELLED. Exception: Prefect says
   the run is still going but every process that held its lease was on this host and is gone
   (a flow killed outside a runner never reports its crash), or the run's heartbeat
   (:mod:`slipstream.ownership.heartbeat`) stopped more than ``STALE_AFTER`` ago (its host died) → CRASHED.
3. **The ledger alone**: the run's processes were all on this host and are gone → CRASHED.
4. Otherwise UNKNOWN if Prefect was asked and has no such run; UNRESOLVED if Prefect could not
   be asked and nothing on this host knows the run (it may be alive on another machine).

What happens to a run is the table :data:`REAP_TABLE`, keyed by (state, timing): FINISHED,
CRASHED, CANCELLED and UNKNOWN runs are reaped once the grace period has passed since the run's
last sign of life (its newest resource, its start, or its end, whichever is latest); LIVE and
UNRESOLVED runs are reaped only when their lease has expired (``Ownership.expires_at`` + grace).
Nothing is ever deleted that the provider port does not list as slipstream-owned, and deletion
goes through :func:`slipstream.ownership.lease.teardown_run` (dependency order, retries, teardown proof).
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

from slipstream.cloud.local.processes import proc_stat
from slipstream.cloud.port import CloudProvider
from slipstream.ownership.heartbeat import STALE_AFTER
from slipstream.ownership.lease import EventCallback, ResourceKind, TeardownProof, teardown_run
from slipstream.ownership.ledger import Ledger, RunProcess
from slipstream.retry import DEFAULT_RETRY, RetryPolicy
from slipstream.scaling.reconciler import ReconcileTable

log = logging.getLogger("slipstream.ownership.reaper")

DEFAULT_GRACE = timedelta(minutes=15)


class RunState(StrEnum):
    LIVE = "live"
    FINISHED = "finished"
    CRASHED = "crashed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"  # Prefect was asked and has no such run; no live process here
    UNRESOLVED = "unresolved"  # Prefect could not be asked and this host does not know the run


class Timing(StrEnum):
    IN_GRACE = "within grace"
    PAST_GRACE = "past grace"
    LEASE_EXPIRED = "lease expired"


class Verdict(StrEnum):
    KEEP = "keep"
    REAP = "reap"


#: The reaper's whole policy. A LIVE run is never reaped before its lease expires.
REAP_TABLE: ReconcileTable = ReconcileTable(
    "reaper",
    {
        (RunState.LIVE, Timing.IN_GRACE): Verdict.KEEP,
        (RunState.LIVE, Timing.PAST_GRACE): Verdict.KEEP,
        (RunState.LIVE, Timing.LEASE_EXPIRED): Verdict.REAP,
        **{(state, timing): Verdict.KEEP if timing == Timing.IN_GRACE else Verdict.REAP
           for state in (RunState.FINISHED, RunState.CRASHED, RunState.CANCELLED, RunState.UNKNOWN)
           for timing in Timing},
        (RunState.UNRESOLVED, Timing.IN_GRACE): Verdict.KEEP,
        (RunState.UNRESOLVED, Timing.PAST_GRACE): Verdict.KEEP,  # maybe alive elsewhere: wait for expiry
        (RunState.UNRESOLVED, Timing.LEASE_EXPIRED): Verdict.REAP,
    },
    classify=lambda verdict: (verdict.status.state, verdict.timing),
)


@dataclass(frozen=True)
class RunStatus:
    """What a resolver says about a run, and on what basis (shown to the researcher)."""

    state: RunState
    basis: str
    ended_at: datetime | None = None


@dataclass(frozen=True)
class PrefectRun:
    """The little the reaper needs of a Prefect flow run."""

    state_type: str  # prefect StateType value: "RUNNING", "COMPLETED", "CRASHED", ...
    state_name: str
    ended_at: datetime | None = None
    last_heartbeat: datetime | None = None  # the run's newest heartbeat, if it ever beat


class PrefectUnreachable(Exception):
    """The Prefect API could not be asked; runs are resolved from this host's records only."""


PrefectLookup = Callable[[str], "PrefectRun | None"]
"""Prefect's view of a run id: a :class:`PrefectRun`, None if Prefect has no such run; raises
:class:`PrefectUnreachable` if it cannot be asked."""

Resolver = Callable[[str], RunStatus]

_PREFECT_STATES = {
    "SCHEDULED": RunState.LIVE, "PENDING": RunState.LIVE, "RUNNING": RunState.LIVE,
    "PAUSED": RunState.LIVE, "CANCELLING": RunState.LIVE,
    "COMPLETED": RunState.FINISHED, "FAILED": RunState.FINISHED,
    "CRASHED": RunState.CRASHED, "CANCELLED": RunState.CANCELLED,
}


def process_alive(proc: RunProcess, host: str | None = None) -> bool:
    """Is ``proc`` (same host, same pid *and* start time) still running here?"""
    if proc.host != (host or socket.gethostname()):
        return False
    st = proc_stat(proc.pid)
    return st is not None and st.start == proc.pid_start and st.state not in ("Z", "X")


class RunResolver:
    """The resolution order of the module docstring, with one Prefect question per run at most.

    After the first :class:`PrefectUnreachable` it stops asking and notes why in :attr:`notes`.
    """

    def __init__(self, processes: Iterable[RunProcess], ask_prefect: PrefectLookup | None = None,
                 host: str | None = None) -> None:
        self.host = host or socket.gethostname()
        self.processes: dict[str, list[RunProcess]] = {}
        for proc in processes:
            self.processes.setdefault(proc.run_id, []).append(proc)
        self.ask_prefect = ask_prefect
        self.notes: list[str] = [] if ask_prefect else ["Prefect not asked: runs resolved from this host's records"]
        self._cache: dict[str, RunStatus] = {}

    def started_at(self, run_id: str) -> datetime | None:
        procs = self.processes.get(run_id, [])
        return max((p.started_at for p in procs), default=None)

    def __call__(self, run_id: str) -> RunStatus:
        if run_id not in self._cache:
            self._cache[run_id] = self._resolve(run_id)
        return self._cache[run_id]

    def _resolve(self, run_id: str) -> RunStatus:
        procs = self.processes.get(run_id, [])
        for proc in procs:
            if process_alive(proc, self.host):
                return RunStatus(RunState.LIVE, f"process {proc.pid} on {proc.host} is running")
        local_and_gone = bool(procs) and all(p.host == self.host for p in procs)
        gone = f"its process {', '.join(str(p.pid) for p in procs)} on {self.host} is gone"
        prefect = self._ask(run_id)
        if isinstance(prefect, PrefectRun):
            state = _PREFECT_STATES.get(prefect.state_type, RunState.UNKNOWN)
            if state == RunState.LIVE and local_and_gone:
                return RunStatus(RunState.CRASHED, f"Prefect says {prefect.state_name} but {gone}")
            beat = prefect.last_heartbeat
            if state == RunState.LIVE and beat is not None and datetime.now(UTC) - beat > STALE_AFTER:
                return RunStatus(RunState.CRASHED, f"Prefect says {prefect.state_name} but its heartbeat "
                                 f"stopped at {beat:%Y-%m-%d %H:%M:%S} UTC", beat)
            return RunStatus(state, f"Prefect: {prefect.state_name}", prefect.ended_at)
        if local_and_gone:
            return RunStatus(RunState.CRASHED, gone)
        if prefect == "unknown":
            return RunStatus(RunState.UNKNOWN, "Prefect has no such run and no process here holds it")
        return RunStatus(RunState.UNRESOLVED, "Prefect not asked and this host has no record of the run")

    def _ask(self, run_id: str) -> PrefectRun | str | None:
        if self.ask_prefect is None:
            return None
        try:
            uuid.UUID(run_id)
        except ValueError:
            return "unknown"  # not a flow-run id: a plain-Python run Prefect cannot know
        try:
            found = self.ask_prefect(run_id)
        except PrefectUnreachable as err:
            self.notes.append(f"Prefect API not reachable ({err}): runs resolved from this host's records")
            self.ask_prefect = None
            return None
        return found if found is not None else "unknown"


@dataclass(frozen=True)
class OwnedResource:
    kind: ResourceKind
    id: str
    name: str
    created_at: datetime | None = None
    expires_at: datetime | None = None
    detail: str = ""
    pipeline: str = ""  # servers and volumes carry it; addresses and keys do not


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
    """Everything slipstream owns on ``cloud``, by run id: one list call per kind."""
    runs: dict[str, list[OwnedResource]] = {}
    for s in cloud.list_servers():
        o = s.ownership
        if o is not None:
            runs.setdefault(o.run_id, []).append(
                OwnedResource(ResourceKind.SERVER, s.id, s.name, s.created_at, o.expires_at, s.flavor, o.pipeline))
    for f in cloud.list_floating_ips():
        if f.run_id:
            runs.setdefault(f.run_id, []).append(OwnedResource(ResourceKind.FLOATING_IP, f.id, f.address))
    for vol in cloud.list_volumes():
        o = vol.ownership
        if o is not None:
            runs.setdefault(o.run_id, []).append(
                OwnedResource(ResourceKind.VOLUME, vol.id, vol.name, None, o.expires_at, f"{vol.size_gb} GB",
                              o.pipeline))
    for k in cloud.list_keypairs():
        if k.run_id:
            runs.setdefault(k.run_id, []).append(OwnedResource(ResourceKind.KEYPAIR, k.name, k.name))
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
    else:  # no sign of life at all is not a reason to wait: the resolver says the run is not live
        timing = Timing.PAST_GRACE
    v = RunVerdict(cloud, run_id, pipeline, resources, status, last, expires, timing)
    v.verdict = REAP_TABLE.action_for(v)
    v.reason = f"{status.state.value} ({status.basis}), {timing.value} ({short_duration(grace)})"
    if timing == Timing.LEASE_EXPIRED:
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
    for run_id, resources in sorted(owned_by_run(cloud).items()):
        status = resolve(run_id)
        pipeline = _pipeline_of(run_id, resources, resolve)
        report.verdicts.append(judge(cloud.name, run_id, resources, status, grace=grace, now=now,
                                     started_at=started(run_id), pipeline=pipeline))
    report.notes.extend(getattr(resolve, "notes", []))
    if act:
        for v in report.to_reap:
            log.warning("reaping run %s on %s: %s", v.run_id, cloud.name, v.reason)
            report.proofs[v.run_id] = teardown_run(cloud, v.run_id, ledger=ledger, on_event=on_event,
                                                   retry_policy=retry_policy)
    return report


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
