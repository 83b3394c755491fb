"""Subcommands of the ``slipstream`` CLI, one module each.

A module here exposes ``add_parser(subparsers)``, which adds its subcommand and sets ``func``
to the handler (``handler(args) -> exit code``). :mod:`slipstream.cli` registers every module
listed in :data:`COMMAND_MODULES`. Like the rest of the core, a command imports Prefect (or the
flows) only inside its handler, so that ``import slipstream.commands.x`` stays Prefect-free.
"""

from __future__ import annotations

#: Registered in this order, after the built-in ones in slipstream.cli.
COMMAND_MODULES: tuple[str, ...] = ("plan", "report", "runs", "slurm", "reap")
