"""What a run shows in the Prefect UI: resources held, SUs estimated vs spent, the teardown proof.

Artifact keys are stable per pipeline (``<pipeline>-resources``, ``-cost``, ``-teardown-proof``)
so the UI's Artifacts page shows their history run after run.
"""

from __future__ import annotations

import re

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from slipstream.accounting import MeteredServer, meter_servers
from slipstream.cloud.port import CloudProvider
from slipstream.lease import ResourceKind, TeardownProof


def _key(pipeline: str, what: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"{pipeline}-{what}".lower()).strip("-")


@task(name="report-run", cache_policy=NONE)
def report_run(cloud: CloudProvider, pipeline: str, proof: TeardownProof, estimated_su: float) -> list[MeteredServer]:
    """Publish the run's resources, cost and teardown proof as artifacts; return the SU meter."""
    logger = get_run_logger()
    servers = [(r.id, r.name, r.detail) for r in proof.deleted if r.kind == ResourceKind.SERVER and r.detail]
    metered = meter_servers(cloud, servers)
    spent = sum(m.su for m in metered)
    create_table_artifact(
        key=_key(pipeline, "resources"),
        table=[
            {"kind": str(r.kind), "name": r.name, "id": r.id, "detail": r.detail,
             "created": r.created_at.isoformat(timespec="seconds")}
            for r in proof.deleted
        ],
        description=f"Resources run {proof.run_id} created on {proof.cloud} (all deleted at the end).",
    )
    create_table_artifact(
        key=_key(pipeline, "cost"),
        table=[{"server": m.name, "flavor": m.flavor, "active_hours": round(m.hours_active, 5),
                "su_spent": round(m.su, 5)} for m in metered]
        + [{"server": "TOTAL", "flavor": "", "active_hours": "", "su_spent": round(spent, 5)}],
        description=f"SUs at Jetstream2 rates: estimated worst case {estimated_su:.2f}, spent {spent:.4f}.",
    )
    remaining = "\n".join(f"| {k} | {', '.join(v) or '—'} |" for k, v in proof.remaining.items())
    create_markdown_artifact(
        key=_key(pipeline, "teardown-proof"),
        markdown=(
            f"## Teardown proof — {'clean' if proof.clean else 'INCOMPLETE'}\n\n"
            f"Listing by run id `{proof.run_id}` on `{proof.cloud}` at {proof.checked_at:%Y-%m-%d %H:%M:%S} UTC:\n\n"
            f"| kind | remaining |\n|---|---|\n{remaining}\n"
            + ("".join(f"\n- error: {e}" for e in proof.errors))
        ),
        description="What is left of this run on the cloud after teardown (must be nothing).",
    )
    logger.info("SU: estimated worst case %.2f, spent %.4f; %s", estimated_su, spent, proof.summary())
    return metered
