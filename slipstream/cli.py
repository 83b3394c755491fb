"""``slipstream``: the command line.

    slipstream demo                 run the demo pipeline on the embedded local cloud
    slipstream ls                   resources slipstream owns, on every configured cloud
    slipstream local status         the local cloud: VMs, addresses, quota use, processes
    slipstream local reset          end every local-cloud VM by its recorded process group, and any
                                    Prefect temporary server a killed flow left running
    slipstream lab up|down|status   a real OpenStack control plane on this machine (root, Debian)
    slipstream plan FLOW [k=v ...]  a flow's worst-case SUs against its budget, creating nothing
    slipstream report RUN_ID        a run's resources, SU estimated vs spent, proof, burn chart
    slipstream runs                 recent runs on this machine: cost and teardown proof
    slipstream reap [--yes]         delete what finished, crashed or expired runs left behind
    slipstream slurm ...            Slurm's power programs (resume|suspend|resume-fail) and sweep

Only ``demo`` needs Prefect running; ``ls`` and ``reap`` ask its API for saved clouds and run
states when ``PREFECT_API_URL`` is set, and work from this host's records when it is not.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from slipstream.cloud.errors import CloudError
from slipstream.commands import COMMAND_MODULES

console = Console()


def _local_cloud():
    from slipstream.cloud.local import LocalCloud

    return LocalCloud()


def cmd_ls(args: argparse.Namespace) -> int:
    """Everything slipstream owns on every configured cloud: "local" and each saved OpenStack block."""
    from slipstream.cloud import open_cloud
    from slipstream.tasks.reap import configured_clouds, prefect_client

    with prefect_client() as (client, why_not):
        refs = configured_clouds(client)
    if why_not:
        console.print(f"note: {why_not}: listing the local cloud only")
    for ref in refs:
        try:
            _list_owned(open_cloud(ref))
        except CloudError as err:
            console.print(f"[red]cannot list {ref}:[/red] {err}")
    return 0


def _list_owned(cloud) -> None:
    table = Table(title=f"resources owned by slipstream on {cloud.name}")
    for col in ("kind", "name", "id", "status", "run", "pipeline", "expires"):
        table.add_column(col)
    count = 0
    for s in cloud.list_servers():
        o = s.ownership
        table.add_row("server", s.name, s.id[:12], str(s.status), o.run_id[:12] if o else "?",
                      o.pipeline if o else "?", f"{o.expires_at:%Y-%m-%d %H:%M}" if o else "?")
        count += 1
    for f in cloud.list_floating_ips():
        table.add_row("floating_ip", f.address, f.id[:12], "attached" if f.server_id else "free",
                      (f.run_id or "?")[:12], "", "")
        count += 1
    for v in cloud.list_volumes():
        o = v.ownership
        table.add_row("volume", v.name, v.id[:12], v.status, o.run_id[:12] if o else "?", o.pipeline if o else "?", "")
        count += 1
    for k in cloud.list_keypairs():
        table.add_row("keypair", k.name, "", "", (k.run_id or "?")[:12], "", "")
        count += 1
    if count:
        console.print(table)
    else:
        console.print(f"nothing owned by slipstream on {cloud.name}")


def cmd_local_status(args: argparse.Namespace) -> int:
    status = _local_cloud().status()
    console.print(status.render() if hasattr(status, "render") else status)
    return 0


def cmd_local_reset(args: argparse.Namespace) -> int:
    from slipstream.temporary_servers import end_orphaned_temporary_servers

    summary = _local_cloud().reset()
    console.print(f"local cloud reset: {summary}")
    for server in end_orphaned_temporary_servers():
        console.print(f"ended {server.describe()}")
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    from slipstream import lab

    return {"up": lab.up, "down": lab.down, "status": lab.status}[args.action]() or 0


def cmd_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # Prefect's temporary server migrates a new database on first use; on a busy 2-core machine
    # that takes longer than Prefect's 20 s default, and the demo died before it began.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from slipstream.flows.demo import run_with_progress  # the CLI sits on top of the flows

    return run_with_progress(console)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slipstream", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the demo on the embedded local cloud").set_defaults(func=cmd_demo)
    sub.add_parser("ls", help="list resources slipstream owns").set_defaults(func=cmd_ls)
    local = sub.add_parser("local", help="the embedded local cloud").add_subparsers(dest="action", required=True)
    local.add_parser("status", help="VMs, addresses, quota use").set_defaults(func=cmd_local_status)
    local.add_parser("reset", help="end every VM of the local cloud").set_defaults(func=cmd_local_reset)
    lab = sub.add_parser("lab", help="the OpenStack lab (root, Debian/Ubuntu)")
    lab.add_argument("action", choices=["up", "down", "status"])
    lab.set_defaults(func=cmd_lab)
    for module in COMMAND_MODULES:
        importlib.import_module(f"slipstream.commands.{module}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except Exception as err:  # the front door: one clean line, not a traceback
        from slipstream.cloud.errors import CloudError

        if isinstance(err, CloudError):
            console.print(f"[red]error:[/red] {err}")
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
