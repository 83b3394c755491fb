"""Prefect tasks: thin wrappers over the slipstream core that add retries, logs and events.

Each task retries only transient cloud errors (:data:`CLOUD_TASK_OPTIONS`); a quota, capacity or
bad-request error fails at once with the core's message, which says what to do.
"""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NONE

from slipstream.cloud.errors import TransientError


def only_transient(task: Any, task_run: Any, state: Any) -> bool:
    """retry_condition_fn: retry a failed task only when the cloud said "try again later"."""
    return isinstance(state.result(raise_on_failure=False), TransientError)


#: Options shared by every task that talks to a cloud. Inputs are live objects (clouds, leases),
#: so results are never cached.
CLOUD_TASK_OPTIONS: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [1, 4, 10],
    "retry_condition_fn": only_transient,
    "cache_policy": NONE,
}
