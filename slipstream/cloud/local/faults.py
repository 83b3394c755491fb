"""Fault injection: make the LocalCloud fail the way a busy OpenStack does, reproducibly.

Configured by :class:`~slipstream.cloud.local.options.FaultOptions` (in ``config.json``, so every
process sees the same faults). Before an operation does anything, :meth:`FaultInjector.before`
may raise :class:`~slipstream.cloud.errors.TransientError`:

- when a burst is pending for it (``fail_next``; the counter is in the database, so the next N
  calls *from any process* fail), or
- with the configured probability. Draw *n* of an operation is
  ``Random(f"{seed}:{operation}:{n}")``, n counted in the database: the same sequence of calls
  fails at the same places in every run, whichever processes make them.

A slow API (``slow_calls``) makes a call wait before doing anything.
Boot-time faults (extra delay, forced ERROR, no capacity) are applied where servers are created.
"""

from __future__ import annotations

import random
import time

from slipstream.cloud.errors import TransientError
from slipstream.cloud.local.options import FaultOptions, check_operation
from slipstream.cloud.local.store import Store


class FaultInjector:
    def __init__(self, store: Store, cloud_name: str) -> None:
        self.store = store
        self.cloud_name = cloud_name

    def fail_next(self, operation: str, count: int) -> None:
        """Make the next ``count`` calls of ``operation`` fail with TransientError."""
        check_operation(operation)
        with self.store.write() as con:
            con.execute(
                "INSERT INTO fault_counters (operation, fail_next) VALUES (?, ?) "
                "ON CONFLICT(operation) DO UPDATE SET fail_next = fail_next + excluded.fail_next",
                (operation, int(count)))

    def pending(self, operation: str) -> int:
        with self.store.read() as con:
            row = con.execute("SELECT fail_next FROM fault_counters WHERE operation = ?",
                              (operation,)).fetchone()
        return int(row["fail_next"]) if row else 0

    def before(self, operation: str, faults: FaultOptions) -> None:
        """Take ``slow_calls`` seconds if ``operation`` is slow; raise TransientError if it is to fail now."""
        if faults.slow_calls.get(operation):
            time.sleep(float(faults.slow_calls[operation]))  # the injected latency itself
        if self.pending(operation) > 0:  # cheap read first: a write lock only when needed
            with self.store.write() as con:
                hit = con.execute(
                    "UPDATE fault_counters SET fail_next = fail_next - 1 "
                    "WHERE operation = ? AND fail_next > 0", (operation,)).rowcount
            if hit:
                raise self._error(operation, "an injected burst of failures")
        rate = faults.rate_for(operation)
        if rate <= 0:
            return
        with self.store.write() as con:
            con.execute(
                "INSERT INTO fault_counters (operation, draws) VALUES (?, 1) "
                "ON CONFLICT(operation) DO UPDATE SET draws = draws + 1", (operation,))
            draw = con.execute("SELECT draws FROM fault_counters WHERE operation = ?",
                               (operation,)).fetchone()["draws"]
        if random.Random(f"{faults.seed}:{operation}:{draw}").random() < rate:
            raise self._error(operation, f"an injected error rate of {rate:g}")

    def _error(self, operation: str, why: str) -> TransientError:
        return TransientError(
            f"503 Service Unavailable from the cloud API during {operation} ({why})",
            cloud=self.cloud_name,
            hint="This is temporary: retry with backoff (slipstream.retry does).",
        )
