"""``slipstream report RUN_ID [--cloud local] [--out DIR]``: what a run held, cost and left behind, as files.

Writes into DIR (default ./slipstream-report-<run id>):

  resources.csv  every resource the run created (from the ledger), with its state
  cost.csv       SUs per server: its share of the planned worst case, and what it spent
  teardown.md    a fresh listing, by run id, of what is left of the run on the cloud now
  burn.png       cumulative SUs over the run, with the planned worst case

Needs no Prefect server: it reads the ledger and asks the cloud. A unique prefix of the run
id is enough (`slipstream ls` shows the first 12 characters).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="write a run's resources, SU cost, teardown state and burn chart to files",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_id", metavar="RUN_ID", help="the run's id (the Prefect flow-run id) or a unique prefix")
    parser.add_argument("--cloud", default="local",
                        help='"local" (default) or a saved cloud block "<block-type>/<name>"')
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="directory for the files (default ./slipstream-report-<run id>)")
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from rich.console import Console

    from slipstream.cloud import open_cloud
    from slipstream.cost.reports import gather_run_report, write_report_files

    console = Console(highlight=False, soft_wrap=True)
    report = gather_run_report(open_cloud(args.cloud), args.run_id)
    out = args.out or Path(f"slipstream-report-{report.run_id}")
    paths = write_report_files(report, out)
    for line in report.summary():
        console.print(line)
    console.print(f"wrote {out}/: {' '.join(p.name for p in paths)}")
    return 0
