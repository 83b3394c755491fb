"""Slurm hostlists (``c[1-3,7]``) made safe: checked, then expanded by Slurm itself.

slurmctld hands ``ResumeProgram`` and ``SuspendProgram`` a hostlist. :func:`expand` refuses
anything that is not a plain hostlist *before* any command runs — so ``c[1-2];rm -rf /`` or
``$(reboot)`` never reach a program — then asks ``scontrol show hostnames`` (an argument vector,
never a shell) and checks every resulting name is a DNS label, as VM names must be.
"""

from __future__ import annotations

import re

from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.models import check_name
from slipstream.slurm.commands import Slurm

# Letters, digits, '-', and the bracket syntax: '[', ']', ',', and '-' inside ranges. No space,
# quote, '$', ';', '|', '&', '`', '/', '*' or anything else a shell or a path would interpret.
_HOSTLIST = re.compile(r"^[a-z0-9][a-z0-9\-\[\],]{0,1023}$")
MAX_NODES = 1000


def check_hostlist(hostlist: str) -> str:
    """Return ``hostlist`` if it only uses hostlist syntax, else raise :class:`InvalidRequest`."""
    if not isinstance(hostlist, str) or not _HOSTLIST.match(hostlist) or hostlist.count("[") != hostlist.count("]"):
        raise InvalidRequest(
            f"hostlist {hostlist!r} is not a Slurm hostlist of node names",
            hint="Give node names like c1 or c[1-3,7]: lower-case letters, digits, '-', and "
                 "'[', ']', ',' for ranges. Nothing was run.")
    return hostlist


def expand(hostlist: str, slurm: Slurm) -> list[str]:
    """The node names in ``hostlist``, in Slurm's order, without duplicates."""
    names = list(dict.fromkeys(slurm.hostnames(check_hostlist(hostlist))))
    if not names:
        raise InvalidRequest(f"hostlist {hostlist!r} names no node", hint="Give at least one node name.")
    if len(names) > MAX_NODES:
        raise InvalidRequest(f"hostlist {hostlist!r} names {len(names)} nodes",
                             hint=f"A single call may name at most {MAX_NODES} nodes.")
    for name in names:
        check_name(name, "Slurm node name")
    return names
