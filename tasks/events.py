"""Prefect events for resources: ``slipstream.resource.created`` / ``slipstream.resource.deleted``.

Automations can react to them (for instance, alert when a GPU server lives longer than a day).
Resource ids look like ``slipstream.server.<id>``; the run id and cloud are related resources.
"""

from __future__ import annotations

from prefect.events import emit_event

from slipstream.cloud.models import Ownership
from slipstream.lease import HeldResource


def resource_event_emitter(owner: Ownership, cloud_name: str):
    """A Lease ``on_event`` callback that emits one Prefect event per created/deleted resource."""

    def emit(action: str, res: HeldResource) -> None:
        emit_event(
            event=f"slipstream.resource.{action}",
            resource={
                "prefect.resource.id": f"slipstream.{res.kind}.{res.id}",
                "prefect.resource.name": res.name,
                "slipstream.cloud": cloud_name,
            },
            related=[
                {
                    "prefect.resource.id": f"slipstream.run.{owner.run_id}",
                    "prefect.resource.role": "run",
                    "slipstream.pipeline": owner.pipeline,
                }
            ],
            payload={"kind": str(res.kind), "detail": res.detail},
        )

    return emit
