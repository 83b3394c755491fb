"""Work done every few seconds on a background thread while a run works: the budget watchdog's
metering rounds and the run's heartbeat.

The thread runs in the context of whoever started it (``contextvars``): code in it that talks to
Prefect reaches the same API, with the same settings, as the flow. A bare thread would see none
of a run's context, and Prefect would start a temporary server just for it.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable


class Periodic:
    """Call ``work()`` now and then every ``interval`` seconds on a daemon thread, until
    :meth:`stop`, until ``finished()`` says there is nothing left to do, or for ``max_seconds``.

    A call that raises is handed to ``on_error`` and the next one is tried: one bad round must not
    end the thread. :attr:`done` and :attr:`failed` count the calls that finished and that raised.
    """

    def __init__(self, name: str, work: Callable[[], object], interval: float, *,
                 on_error: Callable[[Exception], None], finished: Callable[[], bool] = lambda: False,
                 max_seconds: float | None = None) -> None:
        self.name = name
        self.work = work
        self.finished = finished
        self.interval = interval
        self.on_error = on_error
        self.max_seconds = max_seconds
        self.done = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Periodic:
        if self._thread is None:
            context = contextvars.copy_context()
            self._thread = threading.Thread(target=context.run, args=(self._loop,), name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop, and wait at most ``timeout`` s for a call in progress; True once the thread is gone."""
        self._stop.set()
        if self.running and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self.running

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        deadline = time.monotonic() + self.max_seconds if self.max_seconds is not None else None
        while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
            try:
                self.work()
                self.done += 1
            except Exception as err:  # noqa: BLE001 - handed to on_error; the next round tries again
                self.failed += 1
                self.on_error(err)
            if self.finished() or self._stop.wait(self.interval):
                return
