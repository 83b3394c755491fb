"""Ctrl-C in a terminal: tear down, say so, and exit in seconds — even when Prefect is gone.

A terminal sends SIGINT to its whole process group. A flow called from Python without a Prefect
server runs Prefect's *temporary* server as a child in that group, so the same Ctrl-C stops the
API the flow reports to. The Lease still deletes everything (it needs only the cloud), but then
every Prefect call — the cost artifacts, the final state, the queued events and logs — retries
against a dead server for minutes before the process can end.

:func:`exit_if_prefect_is_gone` is called by a flow with the interrupt in hand, after its Lease
has torn down: if the API still answers it returns (the flow publishes as usual and the
interrupt goes on); if not, it writes the run's report files locally
(``$SLIPSTREAM_HOME/reports/<run id>/``, what ``slipstream runs`` and ``slipstream report`` read),
prints ``interrupted; teardown clean`` with the proof, and ends the process with status 130 at
once (``os._exit``: nothing left to say to Prefect could be said).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import httpx

from slipstream.cloud.port import CloudProvider
from slipstream.ownership.lease import Lease

log = logging.getLogger(__name__)

#: The exit status of a process ended by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT_STATUS = 130


def prefect_api_answers(timeout: float = 2.0) -> bool:
    """Whether the Prefect API this run reports to answers its health check now."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    context = FlowRunContext.get()
    url = str(context.client.api_url) if context and context.client else PREFECT_API_URL.value()
    if not url:
        return False
    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def exit_if_prefect_is_gone(lease: Lease, cloud: CloudProvider, results: Path | None = None) -> None:
    """After an interrupt: return if Prefect still answers, else report locally and exit 130."""
    proof = lease.proof
    if proof is None or prefect_api_answers():
        return
    lines = [f"run {proof.run_id}: {proof.summary()}"]
    try:
        from slipstream.cost.reports import gather_run_report, reports_dir, write_report_files

        saved = reports_dir(proof.run_id)
        write_report_files(gather_run_report(cloud, proof.run_id, ledger=lease.ledger), saved)
        lines.append(f"report files: {saved}")
    except Exception as err:  # noqa: BLE001 - the proof above is what matters; say why, go on
        lines.append(f"report files not written: {err}")
    if results is not None and results.exists():
        lines.append(f"results so far: {results}")
    verdict = "clean" if proof.clean else "INCOMPLETE (run `slipstream reap --yes` to finish it)"
    lines.insert(0, f"interrupted; teardown {verdict}")
    lines.append("Prefect's server was stopped by the same Ctrl-C: nothing more was sent to it.")
    print("\n".join(lines), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(INTERRUPTED_EXIT_STATUS)
