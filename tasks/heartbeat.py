"""A run's heartbeat: every minute while it works, a ``slipstream.run.heartbeat`` Prefect event
and a renewal of the lease on the run's resources themselves.

Started by :func:`slipstream.tasks.budget.watching_budget` around every flow's work, so scheduled runs,
UI-triggered runs and plain Python calls all beat. The reaper reads the newest beat of a run
Prefect calls Running (``tasks/reap.py``), and the host and process that sent it (the payload's
``host`` and ``pid``); a reaper that cannot ask this run's Prefect server sees the renewed lease
on the resources (:meth:`slipstream.ownership.lease.Lease.renew`). See
:mod:`slipstream.ownership.liveness`.

The two beat on threads of their own: a cloud API that hangs must not silence the Prefect
event (the reaper would call the run crashed), nor a Prefect API that is down stop the renewals.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from slipstream.ownership.heartbeat import HEARTBEAT_EVENT, heartbeat
from slipstream.ownership.lease import Lease
from slipstream.periodic import Periodic
from slipstream.tasks.events import run_event


@dataclass(frozen=True)
class RunHeartbeat:
    """The Prefect event and the lease renewal of one run, started and stopped together."""

    events: Periodic
    renewals: Periodic

    def start(self) -> RunHeartbeat:
        self.events.start()
        self.renewals.start()
        return self

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop both; True once both threads are gone."""
        stopped = [self.events.stop(timeout), self.renewals.stop(timeout)]
        return all(stopped)


def run_heartbeat(lease: Lease, interval: float | None = None) -> RunHeartbeat:
    """A (not yet started) heartbeat for ``lease``'s run."""
    owner = lease.owner
    payload = {"cloud": lease.cloud.name, "pipeline": owner.pipeline, "host": socket.gethostname(),
               "pid": os.getpid()}
    return RunHeartbeat(heartbeat(lambda: run_event(HEARTBEAT_EVENT, owner.run_id, payload), interval),
                        heartbeat(lease.renew, interval))
