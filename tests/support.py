"""Small helpers shared by the tests: a fresh owner per test, and waiting on a condition with a
deadline (never sleep-and-hope)."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

from slipstream.cloud.models import Ownership


def owner(pipeline: str = "unit") -> Ownership:
    return Ownership.new(pipeline, run_id=uuid.uuid4().hex, lease=timedelta(hours=1))


def wait_until(predicate, timeout: float = 15.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.02)
    return result
