"""What a run shows in the Prefect UI: resources held, SUs estimated vs spent, the teardown proof
and a burn chart.

Artifact keys are stable per pipeline (``<pipeline>-resources``, ``-cost``, ``-teardown-proof``,
``-burn-chart``) so the UI's Artifacts page shows their history run after run.

The burn chart is a Markdown artifact embedding the PNG as a ``data:image/png`` URI: Prefect's
image artifact only takes a URL the browser can fetch, which a run on a laptop or a worker does
not have, while both Prefect 3.9 UIs render ``data:image/…`` sources in Markdown artifacts (the
React UI whitelists exactly that prefix for ``<img src>``). The same files ``slipstream report``
writes are also kept under ``$SLIPSTREAM_HOME/reports/<run id>/``, so they survive the server.
"""

from __future__ import annotations

import base64
import re

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from slipstream.cost.accounting import MeteredServer
from slipstream.cloud.port import CloudProvider
from slipstream.ownership.lease import ResourceKind, TeardownProof
from slipstream.ownership.ledger import Ledger
from slipstream.cost.reports import RunReport, gather_run_report, reports_dir, write_report_files
from slipstream.tasks import CLOUD_TASK_OPTIONS


def _key(pipeline: str, what: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"{pipeline}-{what}".lower()).strip("-")


def _round(value: float | None, digits: int = 5) -> float | str:
    return "" if value is None else round(value, digits)


@task(name="report-run", **CLOUD_TASK_OPTIONS)
def report_run(
    cloud: CloudProvider, pipeline: str, proof: TeardownProof, estimated_su: float, budget_su: float | None = None,
) -> list[MeteredServer]:
    """Publish the run's resources, cost, teardown proof and burn chart as artifacts, keep the
    report files on this machine, and return the SU meter of each server."""
    logger = get_run_logger()
    ledger = Ledger()
    # Recorded for `slipstream report`: Nova forgets a deleted server's flavour, and the plan
    # lives only in this flow run.
    ledger.record_worst_case(proof.run_id, pipeline, cloud.name, estimated_su)
    ledger.record_server_flavors(cloud.name, {r.id: r.detail for r in proof.deleted
                                              if r.kind == ResourceKind.SERVER and r.detail})
    report = gather_run_report(cloud, proof.run_id, ledger=ledger)
    png = report.burn_chart_png(budget_su=budget_su)
    saved = reports_dir(proof.run_id)
    write_report_files(report, saved, png=png)

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
        table=[{"server": s.name, "flavor": s.flavor, "su_estimated": _round(s.su_estimated),
                "su_spent": _round(s.su_spent), "active_hours": _round(s.hours_active)} for s in report.servers]
        + [{"server": "TOTAL", "flavor": "", "su_estimated": round(estimated_su, 5),
            "su_spent": round(report.su_spent, 5), "active_hours": ""}],
        description=f"SUs at Jetstream2 rates: estimated worst case {estimated_su:.2f}, spent {report.su_spent:.4f}.",
    )
    _teardown_artifact(pipeline, proof)
    create_markdown_artifact(key=_key(pipeline, "burn-chart"), markdown=_burn_markdown(report, png, budget_su, saved),
                             description=f"Cumulative SUs of run {proof.run_id} over time.")
    for note in report.notes:
        logger.warning("report: %s", note)
    logger.info("SU: estimated worst case %.2f, spent %.4f; %s; report files in %s",
                estimated_su, report.su_spent, proof.summary(), saved)
    return report.metered()


TEARDOWN_DESCRIPTION = "What is left of this run on the cloud after teardown (must be nothing)."


def _teardown_markdown(proof: TeardownProof) -> str:
    remaining = "\n".join(f"| {k} | {', '.join(v) or '—'} |" for k, v in proof.remaining.items())
    return (
        f"## Teardown proof — {'clean' if proof.clean else 'INCOMPLETE'}\n\n"
        f"Listing by run id `{proof.run_id}` on `{proof.cloud}` at {proof.checked_at:%Y-%m-%d %H:%M:%S} UTC:\n\n"
        f"| kind | remaining |\n|---|---|\n{remaining}\n"
        + ("".join(f"\n- error: {e}" for e in proof.errors))
    )


def _teardown_artifact(pipeline: str, proof: TeardownProof) -> None:
    create_markdown_artifact(key=_key(pipeline, "teardown-proof"), markdown=_teardown_markdown(proof),
                             description=TEARDOWN_DESCRIPTION)


def publish_teardown_proof(flow_run_id: str, pipeline: str, proof: TeardownProof) -> None:
    """The teardown-proof artifact for ``flow_run_id`` from outside its run (a state hook runs in
    the runner or worker process, where no run context says which run an artifact belongs to)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    with get_client(sync_client=True) as client:
        client.create_artifact(ArtifactCreate(
            key=_key(pipeline, "teardown-proof"), type="markdown", data=_teardown_markdown(proof),
            description=TEARDOWN_DESCRIPTION, flow_run_id=flow_run_id))


def _burn_markdown(report: RunReport, png: bytes, budget_su: float | None, saved) -> str:
    worst = f" of a worst case of **{report.worst_case_su:.2f} SU** planned" if report.worst_case_su is not None else ""
    budget = f", run budget **{budget_su:.2f} SU**" if budget_su is not None else ""
    data_uri = f"data:image/png;base64,{base64.b64encode(png).decode()}"
    return (
        f"## SUs spent by run {report.run_id}\n\n"
        f"![Cumulative SUs of run {report.run_id} over time]({data_uri})\n\n"
        f"Spent **{report.su_spent:.4f} SU**{worst}{budget}. Saved as `{saved}/burn.png`; "
        f"`slipstream report {report.run_id}` writes it again with the tables.\n"
    )
