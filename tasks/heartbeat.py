"""A run's heartbeat: every minute while it works, a ``slipstream.run.heartbeat`` Prefect event
and a renewal of the lease on the run's resources themselves.

Started by :func:`slipstream.tasks.budget.watching_budget` around every flow's work, so scheduled runs,
UI-triggered runs and plain Python calls all beat. The reaper reads the newest beat of a run
Prefect calls Running (``tasks/reap.py``), and the host and process that sent it (the payload's
``host`` and ``pid``);
a reaper that cannot ask this run's Prefect server sees the renewed lease on the resources
(:meth:`slipstream.ownership.lease.Lease.renew`). See :mod:`slipstream.ownership.liveness`.
"""

from __future__ import annotations

import os
import socket

from slipstream.ownership.heartbeat import HEARTBEAT_EVENT, heartbeat
from slipstream.ownership.lease import Lease
from slipstream.periodic import Periodic
from slipstream.tasks.events import run_event


def run_heartbeat(lease: Lease, interval: float | None = None) -> Periodic:
    """A (not yet started) heartbeat for ``lease``'s run."""
    owner = lease.owner
    payload = {"cloud": lease.cloud.name, "pipeline": owner.pipeline, "host": socket.gethostname(),
               "pid": os.getpid()}

    def beat() -> None:
        try:
            run_event(HEARTBEAT_EVENT, owner.run_id, payload)
        finally:  # a Prefect API that is down must not stop the renewal, nor the other way round
            lease.renew()

    return heartbeat(beat, interval)
