"""Is a run alive? What the reaper knows of a run, and how sure it is.

The reaper (:mod:`slipstream.ownership.reaper`) deletes a run's resources before their lease
expires only on **positive evidence that the run is dead**. :class:`RunResolver` weighs the
evidence, in this order:

1. **A live process on this host.** A Lease notes ``(run id, host, pid, pid start time)`` in the
   ledger when it first creates or renews something. If one such process still runs, the run is
   LIVE, whatever else says.
2. **Prefect**, if it can be asked and knows the run. Completed/Failed → FINISHED, Crashed →
   CRASHED, Cancelled → CANCELLED: evidence of death. Scheduled/Pending/Running/Paused/Cancelling
   → LIVE, except:

   - its heartbeat (:mod:`slipstream.ownership.heartbeat`) stopped more than ``STALE_AFTER`` ago
     (its host died with it) → CRASHED, unless its lease is held elsewhere (below): the beat and
     the renewal run on threads of their own, so a beat thread that died, events Prefect lost, or
     a sender whose clock is behind must not outweigh an unexpired renewal → LIVE until it expires;
   - a *fresh* heartbeat wins over this host's process table (a retry picked up by a worker on
     another host beats while this host's process is gone) → LIVE; unless that beat came from
     one of this host's recorded processes of the run, which are all gone;
   - no heartbeat, and this host's processes are all gone → CRASHED (a flow killed outside a
     runner never reports its crash), unless the run is held elsewhere (below).
3. **This host's ledger alone**: the run's processes were all on this host and are gone, and no
   other process renewed its lease since (a renewal stamped on its resources with its host and
   pid, see :class:`~slipstream.cloud.models.LeaseRenewal`) → CRASHED.
4. Everything else is not evidence: UNKNOWN (Prefect was asked and has no such run: a teammate's
   Prefect server, ``vm_job()`` with a temporary server, a plain-Python Lease on another host, an
   id Prefect never made) or UNRESOLVED (Prefect could not be asked). Such runs wait for their
   lease, which a beating run keeps renewing.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from slipstream.cloud.local.processes import proc_stat
from slipstream.cloud.models import LeaseRenewal
from slipstream.ownership.heartbeat import STALE_AFTER
from slipstream.ownership.ledger import RunProcess


class RunState(StrEnum):
    LIVE = "live"
    FINISHED = "finished"
    CRASHED = "crashed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"  # Prefect was asked and has no such run; no live process here
    UNRESOLVED = "unresolved"  # Prefect could not be asked and this host does not know the run


#: The states that are positive evidence of death.
DEAD_STATES = frozenset({RunState.FINISHED, RunState.CRASHED, RunState.CANCELLED})


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
    heartbeat_host: str | None = None  # the host and process that sent it, when the beat says so
    heartbeat_pid: int | None = None


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
    :meth:`note_renewals` tells it the newest lease renewal found on each run's resources.
    """

    def __init__(self, processes: Iterable[RunProcess], ask_prefect: PrefectLookup | None = None,
                 host: str | None = None, now: datetime | None = None) -> None:
        self.host = host or socket.gethostname()
        self.now = now  # when beats and renewals are judged (None: the clock at each question)
        self.processes: dict[str, list[RunProcess]] = {}
        for proc in processes:
            self.processes.setdefault(proc.run_id, []).append(proc)
        self.ask_prefect = ask_prefect
        self.notes: list[str] = [] if ask_prefect else ["Prefect not asked: runs resolved from this host's records"]
        self.renewals: dict[str, LeaseRenewal] = {}
        self._cache: dict[str, RunStatus] = {}

    def started_at(self, run_id: str) -> datetime | None:
        procs = self.processes.get(run_id, [])
        return max((p.started_at for p in procs), default=None)

    def note_renewals(self, renewals: dict[str, LeaseRenewal]) -> None:
        """The newest lease renewal stamped on each run's resources (run id -> renewal)."""
        self.renewals.update(renewals)
        self._cache.clear()

    def forget(self, run_id: str) -> None:
        """Ask afresh next time (Prefect included, if it is still reachable)."""
        self._cache.pop(run_id, None)

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
        elsewhere = self._held_elsewhere(run_id, procs)
        prefect = self._ask(run_id)
        if isinstance(prefect, PrefectRun):
            return self._from_prefect(prefect, procs, local_and_gone, gone, elsewhere)
        if local_and_gone and not elsewhere:
            return RunStatus(RunState.CRASHED, gone)
        why = f"; {elsewhere}" if elsewhere else ""
        if prefect == "unknown":
            return RunStatus(RunState.UNKNOWN, f"Prefect has no such run and no process here holds it{why}")
        return RunStatus(RunState.UNRESOLVED, f"Prefect not asked and this host has no record of the run{why}")

    def _from_prefect(self, prefect: PrefectRun, procs: list[RunProcess], local_and_gone: bool, gone: str,
                      elsewhere: str) -> RunStatus:
        state = _PREFECT_STATES.get(prefect.state_type, RunState.UNKNOWN)
        name = prefect.state_name
        if state != RunState.LIVE:
            return RunStatus(state, f"Prefect: {name}", prefect.ended_at)
        beat = prefect.last_heartbeat
        if beat is not None and (self.now or datetime.now(UTC)) - beat > STALE_AFTER:
            stopped = f"Prefect says {name} but its heartbeat stopped at {beat:%Y-%m-%d %H:%M:%S} UTC"
            if elsewhere:  # the renewals go on a thread of their own: the beat alone died, or was lost
                return RunStatus(RunState.LIVE, f"{stopped}; {elsewhere}")
            return RunStatus(RunState.CRASHED, stopped, beat)
        beat_explained_here = local_and_gone and self._one_of(prefect.heartbeat_host, prefect.heartbeat_pid, procs)
        if beat is not None and not beat_explained_here:  # a fresh beat wins over this host's processes
            sender = f" from {prefect.heartbeat_host}" if prefect.heartbeat_host else ""
            return RunStatus(RunState.LIVE, f"Prefect: {name}, heartbeat{sender} at {beat:%H:%M:%S} UTC")
        if local_and_gone and not elsewhere:
            return RunStatus(RunState.CRASHED, f"Prefect says {name} but {gone}")
        return RunStatus(RunState.LIVE, f"Prefect: {name}" + (f"; {elsewhere}" if elsewhere else ""))

    def _one_of(self, host: str | None, pid: int | None, procs: list[RunProcess]) -> bool:
        """Was ``pid`` on ``host`` one of this host's recorded processes ``procs``? (A same-named
        host, or a process the ledger never saw, is someone else.)"""
        return host == self.host and any(p.pid == pid for p in procs)

    def _held_elsewhere(self, run_id: str, procs: list[RunProcess]) -> str:
        """Why the run may be held by a process other than this host's recorded ones (its lease
        renewed by it and not yet expired), or "" if nothing says so."""
        renewal = self.renewals.get(run_id)
        if (renewal is None or renewal.expires_at <= (self.now or datetime.now(UTC))
                or self._one_of(renewal.renewed_by, renewal.renewed_pid, procs)):
            return ""
        return (f"its lease was renewed by {renewal.renewed_by} at {renewal.renewed_at:%Y-%m-%d %H:%M} UTC "
                f"until {renewal.expires_at:%H:%M} UTC")

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
