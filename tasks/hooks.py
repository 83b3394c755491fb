"""Tear a run down when Prefect cancels it or it crashes: the flows' state hooks.

A Lease deletes everything when its ``with`` block ends, but a block cannot end if its process is
gone: a flow run cancelled from the UI is SIGTERMed and then SIGKILLed by its runner or worker, a
crashed one may have died outright. Prefect then runs the flow's ``on_cancellation`` /
``on_crashed`` hooks — for a deployment run in the *runner or worker process*, after the flow
process has been killed. So these hooks keep no in-memory state: they read the cloud from the
flow run's ``cloud`` parameter, find everything tagged with the run id (and with the ids of its
subflow runs, e.g. the ``vm-job`` run inside ``gpu-job``) and delete it, then log the teardown
proof to the run's logs. Attach them to a flow::

    from tasks.hooks import TEARDOWN_HOOKS

    @flow(name="vm-job", **TEARDOWN_HOOKS)
    def vm_job(..., cloud: str = "local"): ...

They are idempotent: a run the Lease already cleaned, or a second hook call, finds nothing and
logs a clean proof. They never raise (Prefect would only log it): a failure is logged as an
error that says to run ``slipstream reap --yes``, and the reaper finds the rest by its tags.
"""

from __future__ import annotations

import inspect
import logging
from datetime import UTC, datetime
from typing import Any

from prefect.logging.loggers import flow_run_logger

from blocks import load_cloud
from slipstream.cloud.models import Ownership
from slipstream.lease import TeardownProof, teardown_run
from tasks.events import resource_event_emitter
from tasks.report import publish_teardown_proof


def teardown_on_cancellation(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_cancellation`` hook: delete everything the cancelled run owns and log the proof."""
    tear_down_flow_run(flow, flow_run, "cancelled")


def teardown_on_crash(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_crashed`` hook: delete everything the crashed run owns and log the proof."""
    tear_down_flow_run(flow, flow_run, "crashed")


#: Keyword arguments for ``@flow(...)``: both hooks, so any flow that provisions can opt in.
TEARDOWN_HOOKS: dict[str, list] = {
    "on_cancellation": [teardown_on_cancellation],
    "on_crashed": [teardown_on_crash],
}


def tear_down_flow_run(flow: Any, flow_run: Any, why: str) -> list[TeardownProof]:
    """Tear down ``flow_run`` and its subflow runs on the cloud its ``cloud`` parameter names.

    Returns one proof per run id (empty if the cloud could not even be loaded); logs each proof
    to the flow run's logs. Safe to call any number of times.
    """
    logger = _logger(flow, flow_run)
    ref = str((flow_run.parameters or {}).get("cloud") or _default(flow, "cloud") or "local")
    pipeline = str((flow_run.parameters or {}).get("pipeline") or _default(flow, "pipeline") or "teardown")
    run_ids = [str(flow_run.id), *_subflow_run_ids(flow_run.id, logger)]
    logger.info("run %s %s: tearing down everything owned by run(s) %s on cloud %r",
                flow_run.id, why, ", ".join(run_ids), ref)
    try:
        cloud = load_cloud(ref)
    except Exception as err:  # noqa: BLE001 - a hook must not raise; say what to do instead
        logger.error("cannot load cloud %r to tear down run %s (%s: %s). Run `slipstream reap --yes` "
                     "where that cloud is configured.", ref, flow_run.id, type(err).__name__, err)
        return []
    proofs = []
    for run_id in run_ids:
        try:
            owner = _owner(run_id, pipeline)
            on_event = resource_event_emitter(owner, cloud.name) if owner else None
            proof = teardown_run(cloud, run_id, on_event=on_event)
        except Exception as err:  # noqa: BLE001
            logger.error("teardown of run %s on %s failed (%s: %s). Run `slipstream reap --yes`; the "
                         "reaper finds the run's resources by their tags.", run_id, cloud.name,
                         type(err).__name__, err)
            continue
        proofs.append(proof)
        deleted = ", ".join(f"{r.kind} {r.name}" for r in proof.deleted) or "nothing (already clean)"
        (logger.info if proof.clean else logger.error)("deleted %s; %s", deleted, proof.summary())
        for error in proof.errors:
            logger.warning("teardown error: %s", error)
        try:  # the run's page shows the proof, as for a run that ended by itself
            publish_teardown_proof(run_id, pipeline, proof)
        except Exception as err:  # noqa: BLE001 - the proof is in the logs already
            logger.warning("could not publish the teardown proof artifact (%s: %s)", type(err).__name__, err)
    return proofs


def _default(flow: Any, parameter: str) -> Any:
    """The flow's default for ``parameter`` (a run's parameters hold only what was passed)."""
    try:
        default = inspect.signature(flow.fn).parameters[parameter].default
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return None if default is inspect.Parameter.empty else default


def _owner(run_id: str, pipeline: str) -> Ownership | None:
    try:
        return Ownership(run_id=run_id, pipeline=pipeline, creator="slipstream", expires_at=datetime.now(UTC))
    except Exception:  # noqa: BLE001 - a pipeline name that is no valid tag: emit no events
        return None


def _subflow_run_ids(parent_id: Any, logger: Any) -> list[str]:
    """Ids of the runs nested in ``parent_id`` (their resources carry *their* run id)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    try:
        with get_client(sync_client=True) as client:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
    except Exception as err:  # noqa: BLE001 - still tear down the run itself
        logger.warning("could not list the subflow runs of %s (%s); tearing down the run itself only",
                       parent_id, err)
        return []
    return [str(c.id) for c in children if c.id != parent_id]


def _logger(flow: Any, flow_run: Any) -> logging.LoggerAdapter:
    try:
        return flow_run_logger(flow_run, flow)
    except Exception:  # noqa: BLE001 - e.g. a hook called by hand with a bare object
        return logging.LoggerAdapter(logging.getLogger("slipstream.hooks"), {})
