"""Every Slurm command slipstream runs goes through :func:`_call`, which turns failures into errors
that name the command, what Slurm said and what to do (as dask-jobqueue's ``_call`` does).

    slurm = Slurm(Path("~/.slipstream/slurm/demo/slurm.conf"))
    slurm.hostnames("c[1-2]")                 # ['c1', 'c2']
    slurm.nodes()                             # {"c1": NodeInfo(...), ...} from sinfo --json
    slurm.update_node(["c1"], NodeAddr="127.64.0.7", Comment="instance=...")
    job = slurm.sbatch(Path("job.sh"), partition="cloud", output=Path("out.txt"))

Arguments are passed as an argument vector, never through a shell; ``SLURM_CONF`` selects the
cluster, so nothing is ever read from or written to /etc/slurm. Jobs and nodes are read from
Slurm's JSON (``squeue --json``, ``sinfo --json``; Debian's 22.05 ``scontrol`` has no ``--json``),
never by splitting ``Key=Value`` text, in which a job's ``--comment "x JobState=COMPLETED"`` or a
node's Reason could pose as another field.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from slipstream.cloud.errors import CloudError


class SlurmCommandError(CloudError):
    """A Slurm command failed, could not be run, or answered something unreadable."""


def _call(argv: Sequence[str], *, conf: Path | None = None, timeout: float = 30.0,
          env: Mapping[str, str] | None = None) -> str:
    """Run one Slurm command and return its stdout; raise :class:`SlurmCommandError` on failure."""
    full_env = {**os.environ, **(env or {})}
    if conf is not None:
        full_env["SLURM_CONF"] = str(conf)
    shown = " ".join(argv)
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env=full_env, stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise SlurmCommandError(
            f"`{argv[0]}` is not installed", resource=shown,
            hint="Install Slurm's client commands (Debian: apt-get install slurm-client).") from None
    except subprocess.TimeoutExpired:
        raise SlurmCommandError(
            f"`{shown}` did not answer within {timeout:.0f} s", resource=str(conf or "SLURM_CONF"),
            hint="Is slurmctld running? Check the head node's slurmctld.log.") from None
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or "no output")[-800:]
        raise SlurmCommandError(
            f"`{shown}` failed with status {done.returncode}: {said}", resource=str(conf or "SLURM_CONF"),
            hint="Check that slurmctld is running and that SLURM_CONF points at this cluster's slurm.conf.")
    return done.stdout


@dataclass(frozen=True)
class NodeInfo:
    """One node as slurmctld sees it (an entry of ``sinfo --json``)."""

    name: str
    state: str                      # base state: IDLE, ALLOCATED, MIXED, DOWN, ...
    flags: frozenset[str] = field(default_factory=frozenset)   # CLOUD, POWERED_DOWN, POWERING_UP, DRAIN, ...
    address: str = ""
    comment: str = ""
    reason: str = ""

    @property
    def instance_id(self) -> str | None:
        """The cloud instance recorded by resume (``Comment=instance=<id>``)."""
        prefix = "instance="
        return self.comment[len(prefix):] if self.comment.startswith(prefix) else None


#: Job states after which a job will not run again by itself.
FINISHED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                             "BOOT_FAIL", "DEADLINE", "PREEMPTED"})


@dataclass(frozen=True)
class JobInfo:
    """One job as slurmctld sees it (an entry of ``squeue --json``)."""

    job_id: str
    state: str                      # PENDING, CONFIGURING, RUNNING, COMPLETED, FAILED, ...
    nodes: str = ""
    reason: str = ""                # Slurm's pending or failure reason: Resources, PartitionConfig, ...
    restarts: int = 0
    exit_code: int | None = None    # the batch script's exit status, once it ended
    signal: int | None = None       # the signal that ended it, if one did
    name: str = ""

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


def _json(text: str, command: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError as err:
        raise SlurmCommandError(f"`{command}` answered something that is not JSON: {err}",
                                hint="This needs Slurm 22.05 or newer with its serializer/json plugin.") from None
    if data.get("errors"):
        raise SlurmCommandError(f"`{command}` reported errors: {data['errors']}",
                                hint="Check the head node's slurmctld.log.")
    return data


def _text(raw: object) -> str:
    return "" if raw in (None, "(null)", "None") else str(raw)


def job_from_json(entry: dict) -> JobInfo:
    """A ``squeue --json`` job. Every field comes from its own JSON key: nothing a job controls
    (its comment, name or output path) can pose as another field."""
    state = _text(entry.get("job_state")).upper()
    status = entry.get("exit_code")  # the wait(2) status word of the batch script
    ended = state in FINISHED_STATES and isinstance(status, int)
    return JobInfo(str(entry["job_id"]), state, _text(entry.get("nodes")), _text(entry.get("state_reason")),
                   int(entry.get("restart_cnt") or 0),
                   exit_code=(status >> 8) & 0xFF if ended else None,
                   signal=((status & 0x7F) or None) if ended else None, name=_text(entry.get("name")))


def node_from_json(entry: dict) -> NodeInfo:
    """A ``sinfo --json`` node (its Reason and Comment cannot overwrite its address)."""
    return NodeInfo(_text(entry["name"]), _text(entry.get("state")).upper(),
                    frozenset(str(f).upper() for f in entry.get("state_flags") or ()),
                    _text(entry.get("address")), _text(entry.get("comment")), _text(entry.get("reason")))


class Slurm:
    """The Slurm cluster whose ``slurm.conf`` is ``conf``."""

    def __init__(self, conf: Path, *, timeout: float = 30.0) -> None:
        self.conf = Path(conf)
        self.timeout = timeout

    def run(self, *argv: str, timeout: float | None = None) -> str:
        return _call(argv, conf=self.conf, timeout=timeout or self.timeout)

    def ping(self) -> bool:
        """Does slurmctld answer?"""
        try:
            return "UP" in self.run("scontrol", "ping", timeout=10)
        except SlurmCommandError:
            return False

    def hostnames(self, hostlist: str) -> list[str]:
        """Slurm's own expansion of ``hostlist`` (check it first: see :mod:`slipstream.slurm.hostlist`)."""
        return self.run("scontrol", "show", "hostnames", hostlist).split()

    def nodes(self) -> dict[str, NodeInfo]:
        """Every node by name (``sinfo --json``; a node in two partitions is listed twice)."""
        data = _json(self.run("sinfo", "--json"), "sinfo --json")
        return {n.name: n for n in map(node_from_json, data.get("nodes") or ())}

    def update_node(self, names: Sequence[str], **fields: str) -> None:
        """``scontrol update NodeName=a,b Key=Value ...`` (values are single argv items: no shell)."""
        self.run("scontrol", "update", f"NodeName={','.join(names)}", *(f"{k}={v}" for k, v in fields.items()))

    def jobs(self) -> list[JobInfo]:
        """Every job slurmctld still knows: pending, running, and finished ones until
        ``MinJobAge`` seconds after their end (``squeue --json`` ignores state filters)."""
        data = _json(self.run("squeue", "--json"), "squeue --json")
        return [job_from_json(j) for j in data.get("jobs") or ()]

    def job(self, job_id: str) -> JobInfo | None:
        return next((j for j in self.jobs() if j.job_id == str(job_id)), None)

    def jobs_on(self, names: Sequence[str]) -> list[JobInfo]:
        """Jobs not yet finished that hold any of ``names``."""
        wanted = set(names)
        out = []
        for job in self.jobs():
            if job.finished or not job.nodes:
                continue
            if wanted & set(self.hostnames(job.nodes)):
                out.append(job)
        return out

    def requeue(self, job_ids: Sequence[str]) -> None:
        if job_ids:
            self.run("scontrol", "requeue", ",".join(job_ids))

    def cancel(self, job_ids: Sequence[str]) -> None:
        if job_ids:
            self.run("scancel", *job_ids)

    def sbatch(self, script: Path, *, partition: str | None = None, output: Path | None = None,
               workdir: Path | None = None, job_name: str | None = None) -> str:
        """Submit ``script``; returns the job id."""
        argv = ["sbatch", "--parsable"]
        if partition:
            argv.append(f"--partition={partition}")
        if output:  # sbatch expands %j, %x, %N ... in it ("%%" is a "%"): a script called 100%j.sh
            argv.append(f"--output={str(output).replace('%', '%%')}")
        if workdir:
            argv.append(f"--chdir={workdir}")
        if job_name:
            argv.append(f"--job-name={job_name}")
        out = self.run(*argv, str(script)).strip()
        return out.split(";", 1)[0]
