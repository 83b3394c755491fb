"""A run's heartbeat: proof, every minute, that the process holding a run's resources is alive.

The reaper cannot see a process on another machine. When a worker host dies with its flow run,
nobody tells Prefect, which keeps saying "Running" until the run's lease expires (hours). A run
that beats while it holds resources lets the reaper tell sooner: Prefect says Running, but the
beats stopped :data:`STALE_AFTER` ago, so the run is treated as crashed.

:class:`Heartbeat` only calls ``beat()`` on a daemon thread; what a beat is (a Prefect event, see
``tasks/heartbeat.py``) is the caller's business, so the core knows nothing of Prefect.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
from collections.abc import Callable
from datetime import timedelta

log = logging.getLogger("slipstream.heartbeat")

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


class Heartbeat:
    """Call ``beat`` now and then every ``interval`` seconds until :meth:`stop`. A failing beat is
    logged and the next one tried: a missed beat is harmless, a dead heartbeat thread is not."""

    def __init__(self, beat: Callable[[], object], interval: float | None = None) -> None:
        self.beat = beat
        self.interval = interval or interval_from_env()
        self.beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Heartbeat:
        # Beats run in the starter's context (its settings and run): a bare thread would not know
        # which API to send to, and Prefect would start a temporary server of its own for it.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name="slipstream-heartbeat",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.running and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while True:
            try:
                self.beat()
                self.beats += 1
            except Exception as err:  # noqa: BLE001 - keep beating
                log.warning("a heartbeat could not be sent (%s: %s); trying again in %.0f s",
                            type(err).__name__, err, self.interval)
            if self._stop.wait(self.interval):
                return
