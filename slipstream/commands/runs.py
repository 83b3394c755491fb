"""``slipstream runs [--limit N]``: the recent runs on this machine, newest first, with their cost
and teardown state — from the ledger and the saved report files, without Prefect.

  run         the run id (its first 12 characters; `slipstream report` takes a prefix)
  pipeline    vm-job, gpu-job, slurm-cluster, ...; and the cloud it ran on
  started     when its first resource was recorded (UTC)
  resources   how many it created
  SU          spent (from its report files) of the worst case it planned
  teardown    "clean" when the ledger saw every resource deleted, else what is still recorded live

A run's report files (resources, cost, teardown proof, burn chart) are in
$SLIPSTREAM_HOME/reports/<run id>/; `slipstream report RUN_ID` writes them afresh from the cloud.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "runs", help="recent runs on this machine: cost and teardown proof (no Prefect needed)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--limit", type=int, default=20, metavar="N", help="show the N most recent runs (default 20)")
    parser.set_defaults(func=handle)


def _spent(report_dir: Path) -> str:
    try:
        with (report_dir / "cost.csv").open(newline="") as f:
            total = next((row for row in csv.DictReader(f) if row["server"] == "TOTAL"), None)
    except OSError:
        return "?"
    return f"{float(total['su_spent']):.4f}" if total and total["su_spent"] else "?"


def handle(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from slipstream.cost.reports import reports_dir
    from slipstream.ownership.ledger import Ledger
    from slipstream.temporary_servers import orphaned_temporary_servers

    console = Console(highlight=False, soft_wrap=True)
    ledger = Ledger()
    by_run = defaultdict(list)
    for entry in ledger.entries():
        by_run[entry.run_id].append(entry)
    runs = sorted(by_run.items(), key=lambda item: item[1][0].recorded_at, reverse=True)[: args.limit]
    if not runs:
        console.print(f"no runs recorded in {ledger.path}")
    else:
        table = Table(title=f"recent runs ({ledger.path})", title_justify="left")
        for col in ("run", "pipeline", "started (UTC)", "resources", "SU spent / worst case", "teardown"):
            table.add_column(col)
        for run_id, entries in runs:
            created = [e for e in entries if e.state != "failed"]
            live = [e for e in created if e.state in ("pending", "created")]
            worst = ledger.worst_case(run_id)
            report = reports_dir(run_id)
            teardown = (f"clean ({len(created)} deleted)" if not live else
                        f"{len(live)} left: {', '.join(sorted({e.kind for e in live}))}")
            table.add_row(run_id[:12], f"{entries[0].pipeline} on {entries[0].cloud}",
                          f"{entries[0].recorded_at:%Y-%m-%d %H:%M}", str(len(created)),
                          f"{_spent(report)} / {worst:.2f}" if worst is not None else _spent(report),
                          teardown)
        console.print(table)
        console.print(f"report files: {reports_dir('<run id>')}/")
    for server in orphaned_temporary_servers():
        console.print(f"note: {server.describe()}; `slipstream local reset` ends it")
    return 0
