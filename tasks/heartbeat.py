"""A run's heartbeat as Prefect events: ``slipstream.run.heartbeat`` every minute while it works.

Started by :func:`slipstream.tasks.budget.watching_budget` around every flow's work, so scheduled runs,
UI-triggered runs and plain Python calls all beat. The reaper reads the newest beat of a run
Prefect calls Running (``tasks/reap.py``); see :mod:`slipstream.ownership.heartbeat` for the rule.
"""

from __future__ import annotations

from slipstream.ownership.heartbeat import HEARTBEAT_EVENT, heartbeat
from slipstream.ownership.lease import Lease
from slipstream.periodic import Periodic
from slipstream.tasks.events import run_event


def run_heartbeat(lease: Lease, interval: float | None = None) -> Periodic:
    """A (not yet started) heartbeat for ``lease``'s run."""
    owner = lease.owner
    payload = {"cloud": lease.cloud.name, "pipeline": owner.pipeline}
    return heartbeat(lambda: run_event(HEARTBEAT_EVENT, owner.run_id, payload), interval)
