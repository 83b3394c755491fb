"""Small helpers shared by the tests: a fresh owner per test, and waiting on a condition with a
deadline (never sleep-and-hope)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from slipstream.cloud.local import FaultOptions, LocalCloud, LocalCloudOptions
from slipstream.cloud.models import Ownership


def owner(pipeline: str = "unit") -> Ownership:
    return Ownership.new(pipeline, run_id=uuid.uuid4().hex, lease=timedelta(hours=1))


def embedded_region(home, **faults) -> LocalCloud:
    """Another region for fallback cases: an embedded cloud (with ``faults``), which keeps its own
    keypairs and security groups as a real second region does."""
    return LocalCloud(options=LocalCloudOptions(home=home, boot_delay=0.2, stop_grace=0.5,
                                                faults=FaultOptions(**faults)))


def wait_until(predicate, timeout: float = 15.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.02)
    return result


def prefect_logs(flow_run_id=None, send_queued: bool = True) -> list[str]:
    """Every log message the Prefect API holds (only one flow run's and its subflows', if given),
    oldest first."""
    return [log.message for log in prefect_log_records(flow_run_id, send_queued)]


def prefect_log_records(flow_run_id=None, send_queued: bool = True) -> list:
    """Every log record the Prefect API holds (only one flow run's and its subflows', if given),
    oldest first.

    Prefect ships log lines to its API in the background, so a flow that has just returned may
    not have sent its last ones yet: unless ``send_queued`` is false, the lines this process
    still holds are sent first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    if send_queued:
        APILogHandler().flush()
    with get_client(sync_client=True) as client:
        wanted = None
        if flow_run_id is not None:
            wanted = LogFilter(flow_run_id=LogFilterFlowRunId(any_=_with_subflows(client, flow_run_id)))
        return every_page(client.read_logs, log_filter=wanted)


def _with_subflows(client, flow_run_id) -> list:
    from uuid import UUID

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    runs, level = [UUID(str(flow_run_id))], [UUID(str(flow_run_id))]
    for _ in range(5):  # nesting deeper than this is no flow of ours
        level = [r.id for r in every_page(client.read_flow_runs, flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=level)))]
        if not level:
            break
        runs += level
    return runs


def every_page(read, **filters) -> list:
    """Everything a paged Prefect client read returns, not just its first page of 200."""
    items: list = []
    while batch := read(**filters, limit=200, offset=len(items)):
        items += batch
    return items


@contextmanager
def captured_logs(name: str = "slipstream", level: int = logging.WARNING) -> Iterator[list[str]]:
    """The messages logger ``name`` and its children emit (at ``level`` or above) meanwhile.

    pytest's caplog listens on the root logger, whose handlers Prefect replaces when it sets up
    logging for a flow run: a test around a flow listens on the logger itself."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger, handler = logging.getLogger(name), Collect(level)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
