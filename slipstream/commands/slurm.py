"""``slipstream slurm``: Slurm's power-saving programs for an elastic cluster, and its orphan sweep.

    slipstream slurm resume c-[1-3]        # slurmctld's ResumeProgram: create the nodes' VMs
    slipstream slurm suspend c-[1-3]       # SuspendProgram: delete them, metering their SUs
    slipstream slurm resume-fail c-2       # ResumeFailProgram: delete, power down, requeue
    slipstream slurm sweep [--dry-run]     # VMs without a powered-up node, nodes up without a VM

slurmctld runs these through the cluster's ``bin/`` programs, which set ``SLIPSTREAM_SLURM_CLUSTER``
(the cluster's cluster.json), ``SLURM_CONF`` and the slipstream homes. What they do is logged to
``<cluster>/power.log`` and stderr; a failure exits 1 (slurmctld logs the reason given to the nodes).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("slurm", help="power programs and orphan sweep of an elastic Slurm cluster",
                                   description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    for action, text in (("resume", "create the VMs of powered-down cloud nodes"),
                         ("suspend", "delete the VMs of idle cloud nodes"),
                         ("resume-fail", "delete the VMs of nodes that failed to resume, power them down")):
        p = sub.add_parser(action, help=text)
        p.add_argument("hostlist", help="Slurm hostlist, e.g. c-[1-3]")
        p.add_argument("--cluster", help="the cluster's cluster.json (default: $SLIPSTREAM_SLURM_CLUSTER)")
        p.set_defaults(func=run)
    p = sub.add_parser("sweep", help="delete orphan VMs, power down nodes without a VM")
    p.add_argument("--cluster", help="the cluster's cluster.json (default: $SLIPSTREAM_SLURM_CLUSTER)")
    p.add_argument("--dry-run", action="store_true", help="print what would be done")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # slurmctld runs its programs with SIGTERM/SIGINT blocked; VMs (and their daemons) started
    # from here would inherit the mask and ignore the signals that end them.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    from slipstream.cloud import open_cloud  # LocalCloud needs no Prefect on the resume path
    from slipstream.cloud.errors import CloudError, InvalidRequest
    from slipstream.slurm.config import ClusterSettings
    from slipstream.slurm.power import SlurmPower

    path = args.cluster or os.environ.get("SLIPSTREAM_SLURM_CLUSTER")
    if not path:
        raise InvalidRequest("no cluster given", hint="Pass --cluster <dir>/cluster.json or set SLIPSTREAM_SLURM_CLUSTER.")
    settings = ClusterSettings.load(path)
    _log_to(settings.dir / "power.log", args.action, getattr(args, "hostlist", ""))
    log = logging.getLogger("slipstream.slurm.power")
    try:
        power = SlurmPower(settings, open_cloud(settings.cloud))
        if args.action == "resume":
            power.resume(args.hostlist)
        elif args.action == "suspend":
            power.suspend(args.hostlist)
        elif args.action == "resume-fail":
            power.resume_fail(args.hostlist)
        else:
            report = power.sweep(dry_run=args.dry_run)
            for name, action in report.actions:
                print(f"{name}: {action}{' (dry run)' if args.dry_run else ''}")
            if not report.actions:
                print(f"cluster {settings.name}: every node matches its VM")
        return 0
    except CloudError as err:
        log.error("%s %s failed: %s", args.action, getattr(args, "hostlist", ""), err)
        print(f"error: {err}")
        return 1


def _log_to(path, action: str, hostlist: str) -> None:
    fmt = logging.Formatter(f"%(asctime)s [{os.getpid()} {action} {hostlist}] %(levelname)s %(message)s")
    root = logging.getLogger("slipstream")
    root.setLevel(logging.INFO)
    for handler in (logging.FileHandler(path), logging.StreamHandler()):
        handler.setFormatter(fmt)
        root.addHandler(handler)
