"""What the cluster's nodes are doing, in lines a researcher can follow while the jobs wait.

Between ``sbatch`` and a job running, Slurm resumes a node: its VM boots and its slurmd registers
(~10–30 s). :class:`NodeWatch` turns successive ``sinfo`` snapshots into log lines — a node
powering up, still booting every ``every`` seconds, up (and how long it took), powered down, and
any Reason the power programs gave it (a quota, a failed resume, a node given up)::

    watch = NodeWatch(["c-1", "c-2"])
    for level, line in watch.see(slurm.nodes()):   # each round
        log.log(level, line)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from slipstream.slurm.commands import NodeInfo

_BOOTING = {"POWERING_UP", "POWER_UP"}
_DOWN = {"POWERED_DOWN", "POWERING_DOWN", "POWER_DOWN"}


def _phase(node: NodeInfo, was: str) -> str:
    if node.flags & _BOOTING:
        return "booting"
    if node.flags & _DOWN:
        return "down"
    if "NOT_RESPONDING" in node.flags:  # between the resume and slurmd's registration, POWERING_UP
        return was if was in ("booting", "down") else "not responding"  # may be gone already (22.05)
    if node.instance_id is None:  # resume records the VM and its address together: not there yet
        return "booting"  # (seen on CI: no flag left at all, still at its parked address)
    return "up"


class NodeWatch:
    def __init__(self, names: Sequence[str], *, every: float = 10.0) -> None:
        self.names = list(names)
        self.every = every
        self._phase: dict[str, str] = {n: "down" for n in names}
        self._since: dict[str, float] = {}
        self._told: dict[str, float] = {}
        self._reason: dict[str, str] = {}

    def see(self, nodes: Mapping[str, NodeInfo]) -> list[tuple[int, str]]:
        now = time.monotonic()
        lines: list[tuple[int, str]] = []
        for name in self.names:
            node = nodes.get(name)
            if node is None:
                continue
            was = self._phase[name]
            phase = _phase(node, was)
            if phase != was:
                self._phase[name] = phase
                if phase == "booting":
                    self._since[name] = self._told[name] = now
                if phase == "booting" or (phase == "up" and was == "down"):  # it may boot between two looks
                    lines.append((logging.INFO, f"node {name}: powering up (creating its VM, then slurmd registers)"))
                if phase == "up":
                    took = f" after {now - self._since[name]:.0f} s" if name in self._since else ""
                    lines.append((logging.INFO, f"node {name}: up at {node.address}{took}"))
                elif phase == "down":
                    lines.append((logging.INFO, f"node {name}: powering down (its VM is deleted)"))
                elif phase == "not responding":
                    lines.append((logging.WARNING, f"node {name}: not responding (its slurmd is unreachable)"))
            elif phase == "booting" and now - self._told.get(name, now) >= self.every:
                self._told[name] = now
                lines.append((logging.INFO, f"node {name}: still booting ({now - self._since[name]:.0f} s)"))
            if node.reason != self._reason.get(name, "") and node.reason.startswith("slipstream"):
                lines.append((logging.WARNING, f"node {name}: {node.reason}"))
            self._reason[name] = node.reason
        return lines
