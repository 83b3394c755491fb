"""Tear a run down when Prefect cancels it or it crashes: the flows' state hooks.

A Lease deletes everything when its ``with`` block ends, but a block cannot end if its process is
gone: a flow run cancelled from the UI is SIGTERMed and then SIGKILLed by its runner or worker, a
crashed one may have died outright. Prefect then runs the flow's ``on_cancellation`` /
``on_crashed`` hooks — for a deployment run in the *runner or worker process*, after the flow
process has been killed. So these hooks keep no in-memory state: they read the cloud from the
flow run's ``cloud`` parameter, find everything tagged with the run id (and with the ids of the
flow runs nested in it, at any depth and on each one's own cloud, e.g. the ``vm-job`` run inside
``gpu-job``) and delete it, then log the teardown proof to the run's logs. Attach them to a flow::

    from slipstream.tasks.hooks import TEARDOWN_HOOKS

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

from slipstream.blocks import load_cloud
from slipstream.cloud.models import Ownership
from slipstream.ownership.lease import TeardownProof, teardown_run
from slipstream.tasks.events import resource_event_emitter
from slipstream.tasks.report import publish_teardown_proof


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
    """Tear down ``flow_run`` and the flow runs nested in it, each on the cloud its ``cloud``
    parameter names (a subflow without one is taken to use its parent's).

    Returns one proof per run id (none for a cloud that could not even be loaded); logs each proof
    to the flow run's logs. Safe to call any number of times.
    """
    logger = _logger(flow, flow_run)
    ref = str((flow_run.parameters or {}).get("cloud") or _default(flow, "cloud") or "local")
    pipeline = str((flow_run.parameters or {}).get("pipeline") or _default(flow, "pipeline") or "teardown")
    runs_by_cloud: dict[str, list[str]] = {ref: [str(flow_run.id)]}
    for run_id, cloud_ref in _nested_runs(flow_run.id, ref, logger):
        runs_by_cloud.setdefault(cloud_ref, []).append(run_id)
    proofs = []
    for cloud_ref, run_ids in runs_by_cloud.items():
        logger.info("run %s %s: tearing down everything owned by run(s) %s on cloud %r",
                    flow_run.id, why, ", ".join(run_ids), cloud_ref)
        try:
            cloud = load_cloud(cloud_ref)
        except Exception as err:  # noqa: BLE001 - a hook must not raise; say what to do instead
            logger.error("cannot load cloud %r to tear down run(s) %s (%s: %s). Run `slipstream reap --yes` "
                         "where that cloud is configured.", cloud_ref, ", ".join(run_ids), type(err).__name__, err)
            continue
        for run_id in run_ids:
            proof = _tear_down_one(cloud, run_id, pipeline, logger)
            if proof is not None:
                proofs.append(proof)
    return proofs


def _tear_down_one(cloud: Any, run_id: str, pipeline: str, logger: Any) -> TeardownProof | None:
    try:
        owner = _owner(run_id, pipeline)
        on_event = resource_event_emitter(owner, cloud.name) if owner else None
        proof = teardown_run(cloud, run_id, on_event=on_event)
    except Exception as err:  # noqa: BLE001
        logger.error("teardown of run %s on %s failed (%s: %s). Run `slipstream reap --yes`; the "
                     "reaper finds the run's resources by their tags.", run_id, cloud.name,
                     type(err).__name__, err)
        return None
    deleted = ", ".join(f"{r.kind} {r.name}" for r in proof.deleted) or "nothing (already clean)"
    (logger.info if proof.clean else logger.error)("deleted %s; %s", deleted, proof.summary())
    for error in proof.errors:
        logger.warning("teardown error: %s", error)
    try:  # the run's page shows the proof, as for a run that ended by itself
        publish_teardown_proof(run_id, pipeline, proof)
    except Exception as err:  # noqa: BLE001 - the proof is in the logs already
        logger.warning("could not publish the teardown proof artifact (%s: %s)", type(err).__name__, err)
    return proof


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


#: How deep nested flow runs are followed (a pipeline calling a flow calling vm_job is 2).
MAX_NESTING = 8


def _nested_runs(parent_id: Any, parent_cloud: str, logger: Any) -> list[tuple[str, str]]:
    """(run id, cloud) of every flow run nested in ``parent_id``, level by level: their resources
    carry *their* run id, and a subflow may work on another cloud than its parent."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    found: list[tuple[str, str]] = []
    level = [(str(parent_id), parent_cloud)]
    try:
        with get_client(sync_client=True) as client:
            for _ in range(MAX_NESTING):
                below = []
                for run_id, cloud_ref in level:  # one call per run: each child inherits its parent's cloud
                    children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))
                    below += [(str(c.id), str((c.parameters or {}).get("cloud") or cloud_ref))
                              for c in children if str(c.id) != run_id]
                if not below:
                    break
                found += below
                level = below
    except Exception as err:  # noqa: BLE001 - still tear down what is known
        logger.warning("could not list all the subflow runs of %s (%s); tearing down the runs found: %s",
                       parent_id, err, ", ".join(r for r, _ in found) or "the run itself only")
    return found


def _logger(flow: Any, flow_run: Any) -> logging.LoggerAdapter:
    try:
        return flow_run_logger(flow_run, flow)
    except Exception:  # noqa: BLE001 - e.g. a hook called by hand with a bare object
        return logging.LoggerAdapter(logging.getLogger("slipstream.hooks"), {})
