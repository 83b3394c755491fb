"""A run's heartbeat: proof, every minute, that the process holding a run's resources is alive.

The reaper cannot see a process on another machine. When a worker host dies with its flow run,
nobody tells Prefect, which keeps saying "Running" until the run's lease expires (hours). A run
that beats while it holds resources lets the reaper tell sooner: Prefect says Running, but the
beats stopped :data:`STALE_AFTER` ago, so the run is treated as crashed.

:func:`heartbeat` only calls ``beat()`` on a daemon thread; what a beat is (a Prefect event, see
``tasks/heartbeat.py``) is the caller's business, so the core knows nothing of Prefect.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta

from slipstream.periodic import Periodic

log = logging.getLogger("slipstream.ownership.heartbeat")

#: The event a beat is, in Prefect (resource ``slipstream.run.<run id>``).
HEARTBEAT_EVENT = "slipstream.run.heartbeat"

#: Seconds between beats (``SLIPSTREAM_HEARTBEAT_SECONDS`` overrides it, e.g. in tests).
DEFAULT_INTERVAL = 60.0
#: A run whose last beat is older than this is dead: five beats missed, so a slow API or a busy
#: host never makes a live run look dead.
STALE_AFTER = timedelta(seconds=5 * DEFAULT_INTERVAL)


def interval_from_env() -> float:
    """``SLIPSTREAM_HEARTBEAT_SECONDS`` if set, else 60 s. Never slower than 60 s: the reaper
    (maybe on another host, without this setting) judges beats by :data:`STALE_AFTER`."""
    raw = os.environ.get("SLIPSTREAM_HEARTBEAT_SECONDS", "")
    try:
        seconds = float(raw) if raw else DEFAULT_INTERVAL
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= DEFAULT_INTERVAL:
        log.warning("SLIPSTREAM_HEARTBEAT_SECONDS=%r is not a number of seconds in (0, %.0f]; using %.0f",
                    raw, DEFAULT_INTERVAL, DEFAULT_INTERVAL)
        return DEFAULT_INTERVAL
    return seconds


def heartbeat(beat: Callable[[], object], interval: float | None = None) -> Periodic:
    """A (not yet started) heartbeat: ``beat()`` now and then every ``interval`` seconds (by
    default :func:`interval_from_env`). A beat that fails is logged and the next one tried: a
    missed beat is harmless, a dead heartbeat is not."""
    seconds = interval or interval_from_env()

    def failed(err: Exception) -> None:
        log.warning("a heartbeat could not be sent (%s: %s); trying again in %.0f s",
                    type(err).__name__, err, seconds)

    return Periodic("slipstream-heartbeat", beat, seconds, on_error=failed)
