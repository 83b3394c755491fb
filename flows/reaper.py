"""The reaper flow: every 15 minutes, delete what crashed, cancelled or forgotten runs left behind.

A run's own Lease and its crash/cancel hooks clean up almost everything; the reaper is the net
under them. It lists what slipstream owns on every configured cloud (the embedded "local" cloud
and each saved OpenStack credentials block, or the ``clouds`` given), asks Prefect for the state
of each owning run, and deletes the resources of runs that are positively dead (finished, crashed,
cancelled) once ``grace_minutes`` have passed — and of any run whose lease has expired. A live run,
or one nothing here knows (it may be alive on a teammate's Prefect), waits for its lease. Each leaked resource is a ``slipstream.resource.leaked`` event, so
an automation can tell someone; a table artifact shows what was found and what was deleted.

Scheduled by the ``reaper`` deployment in ``prefect.yaml``; from Python::

    from slipstream.flows.reaper import reaper
    reaper(dry_run=True)          # what would be deleted, and why
"""

from datetime import timedelta

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from pydantic import BaseModel

from slipstream.tasks.reap import configured_clouds, leak_event_emitter, reap_clouds


class ReaperResult(BaseModel):
    clouds: list[str]
    runs: list[dict[str, str]]
    reaped_runs: list[str]
    leaked_resources: int
    clean: bool
    notes: list[str]


@flow(name="reaper", log_prints=True)
def reaper(clouds: list[str] | None = None, grace_minutes: float = 15, dry_run: bool = False) -> ReaperResult:
    """Find resources of runs that are not live and, unless ``dry_run``, delete them.

    Args:
        clouds: Clouds to reap ("local" or "<block-type>/<name>"); default: every configured one.
        grace_minutes: Minutes after a run's last sign of life before its resources are deleted.
        dry_run: Only report (and emit leak events); delete nothing.
    """
    logger = get_run_logger()
    if grace_minutes < 0:
        raise ValueError(f"grace_minutes must be 0 or more, got {grace_minutes!r}")
    with get_client(sync_client=True) as client:
        refs = list(clouds) if clouds else configured_clouds(client)
        reports = reap_clouds(refs, grace=timedelta(minutes=grace_minutes), act=not dry_run, client=client,
                              on_leak=leak_event_emitter())
    rows = [row for report in reports for row in report.rows()]
    for note in sorted({n for r in reports for n in r.notes}):
        logger.warning(note)
    for row in rows:
        logger.info("%(cloud)s run %(run)s (%(pipeline)s): %(state)s, %(resources)s -> %(verdict)s: %(reason)s", row)
    for report in reports:
        for proof in report.proofs.values():
            (logger.info if proof.clean else logger.error)(proof.summary())
    leaked = sum(len(r.leaked) for r in reports)
    create_table_artifact(
        key="slipstream-reaper",
        table=rows or [{"cloud": ", ".join(refs), "run": "", "verdict": "nothing owned by slipstream"}],
        description=f"Reaper pass ({'dry run' if dry_run else 'deleting'}, grace {grace_minutes:g} min): "
                    f"{leaked} leaked resource(s) in {sum(len(r.to_reap) for r in reports)} run(s).",
    )
    result = ReaperResult(
        clouds=refs, runs=rows, reaped_runs=[run for r in reports for run in r.proofs],
        leaked_resources=leaked, clean=all(r.clean for r in reports), notes=[n for r in reports for n in r.notes],
    )
    if not result.clean:
        raise RuntimeError("the reaper could not delete everything: " + "; ".join(
            p.summary() for r in reports for p in r.proofs.values() if not p.clean))
    return result


if __name__ == "__main__":
    print(reaper(dry_run=True))
