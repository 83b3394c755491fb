"""``slipstream reap [--yes] [--grace 15m] [--cloud REF ...]``: delete what dead runs left behind.

Lists everything slipstream owns on every configured cloud — "local", each saved OpenStack
credentials block, and any ``--cloud`` — and decides per run: a finished, crashed or cancelled
run is reaped once the grace period has passed since its last sign of life; a live run, and one
nothing here knows, is reaped only when its lease has expired. Without ``--yes`` nothing is
deleted: the table says what would be and why. With ``--yes`` it deletes and prints each run's
teardown proof. Runs are resolved through the Prefect API when ``PREFECT_API_URL`` answers, and
from this host's ledger (which process holds which run) in any case.
"""

from __future__ import annotations

import argparse
import re
from datetime import timedelta

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"s": 1, "": 60, "m": 60, "h": 3600, "d": 86400}


def parse_grace(text: str) -> timedelta:
    """ "15m", "90s", "2h", "1d" or a bare number of minutes."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(
            f"--grace {text!r} is not a duration; use e.g. 15m, 90s, 2h or 0 (a bare number is minutes)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "reap", help="find and (with --yes) delete resources of finished, crashed or expired runs",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--yes", action="store_true", help="delete (default: dry run, only say what and why)")
    parser.add_argument("--grace", type=parse_grace, default=timedelta(minutes=15), metavar="DURATION",
                        help="wait this long after a run's last sign of life (default 15m)")
    parser.add_argument("--cloud", action="append", default=[], metavar="REF",
                        help='also reap this cloud: "local" or a saved block "<block-type>/<name>" (repeatable)')
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from slipstream.ownership.reaper import short_duration
    from slipstream.tasks.reap import configured_clouds, prefect_client, reap_clouds

    console = Console(highlight=False, soft_wrap=True)
    with prefect_client() as (client, why_not):
        refs = configured_clouds(client, args.cloud)
        reports = reap_clouds(refs, grace=args.grace, act=args.yes, client=client, prefect_note=why_not)
    mode = "deleting" if args.yes else "dry run"
    table = Table(title=f"slipstream reap ({mode}, grace {short_duration(args.grace)})")
    columns = ("cloud", "run", "pipeline", "state", "resources", "age", "verdict", "reason")
    for col in columns:
        table.add_column(col, overflow="fold")
    for report in reports:
        for row in report.rows():
            table.add_row(*(row[c] for c in columns))
    notes = sorted({n for r in reports for n in r.notes})
    for note in notes:
        console.print(f"note: {note}")
    if any(r.verdicts for r in reports):
        console.print(table)
    else:
        console.print(f"nothing owned by slipstream on {', '.join(refs)}")
    reapable = sum(len(r.to_reap) for r in reports)
    if not args.yes:
        if reapable:
            console.print(f"dry run: {reapable} run(s) would be reaped; run `slipstream reap --yes` to delete them")
        return 0
    for report in reports:
        for proof in report.proofs.values():
            console.print(proof.summary())
    return 0 if all(r.clean for r in reports) else 1
