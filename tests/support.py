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


def prefect_logs(flow_run_id=None, send_queued: bool = True) -> list[str]:
    """Every log message the Prefect API holds (only one flow run's, if given), oldest first."""
    return [log.message for log in prefect_log_records(flow_run_id, send_queued)]


def prefect_log_records(flow_run_id=None, send_queued: bool = True) -> list:
    """Every log record the Prefect API holds (only one flow run's, if given), oldest first.

    Prefect ships log lines to its API in the background, so a flow that has just returned may
    not have sent its last ones yet: unless ``send_queued`` is false, the lines this process
    still holds are sent first."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    if send_queued:
        APILogHandler().flush()
    wanted = None if flow_run_id is None else LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(str(flow_run_id))]))
    records: list = []
    with get_client(sync_client=True) as client:
        while batch := client.read_logs(log_filter=wanted, limit=200, offset=len(records)):
            records += batch
    return records
