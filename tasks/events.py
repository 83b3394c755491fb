"""Prefect events for resources (``slipstream.resource.created`` / ``.deleted`` / ``.leaked``)
and for runs (budget thresholds, heartbeats: :func:`run_event`).

Automations can react to them (for instance, alert when a GPU server lives longer than a day).
Resource ids look like ``slipstream.server.<id>``; the run id and cloud are related resources.
"""

from __future__ import annotations

from prefect.events import emit_event

from slipstream.cloud.models import Ownership
from slipstream.ownership.lease import HeldResource


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


def emit_leaked(cloud_name: str, run_id: str, pipeline: str, kind: str, resource_id: str, name: str, *,
                state: str, reason: str) -> None:
    """``slipstream.resource.leaked``: the reaper found ``resource_id`` owned by a run that is not
    live (or whose lease expired) — one event per resource, whether or not it then deleted it."""
    emit_event(
        event="slipstream.resource.leaked",
        resource={
            "prefect.resource.id": f"slipstream.{kind}.{resource_id}",
            "prefect.resource.name": name,
            "slipstream.cloud": cloud_name,
        },
        related=[
            {
                "prefect.resource.id": f"slipstream.run.{run_id}",
                "prefect.resource.role": "run",
                "slipstream.pipeline": pipeline,
            }
        ],
        payload={"kind": kind, "run_state": state, "reason": reason},
    )


def run_event(event: str, run_id: str, payload: dict) -> None:
    """An event about run ``run_id`` (resource ``slipstream.run.<id>``, the flow run related)."""
    emit_event(
        event=event,
        resource={"prefect.resource.id": f"slipstream.run.{run_id}", "prefect.resource.name": run_id},
        related=[{"prefect.resource.id": f"prefect.flow-run.{run_id}", "prefect.resource.role": "flow-run"}],
        payload=payload,
    )
