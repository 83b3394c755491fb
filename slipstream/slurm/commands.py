"""Every Slurm command slipstream runs goes through :func:`_call`, which turns failures into errors
that name the command, what Slurm said and what to do (as dask-jobqueue's ``_call`` does).

    slurm = Slurm(Path("~/.slipstream/slurm/demo/slurm.conf"))
    slurm.hostnames("c[1-2]")                 # ['c1', 'c2']
    slurm.nodes()                             # {"c1": NodeInfo(...), ...} from scontrol show node -o
    slurm.update_node(["c1"], NodeAddr="127.64.0.7", Comment="instance=...")
    job = slurm.sbatch(Path("job.sh"), partition="cloud", output=Path("out.txt"))

Arguments are passed as an argument vector, never through a shell; ``SLURM_CONF`` selects the
cluster, so nothing is ever read from or written to /etc/slurm.
"""

from __future__ import annotations

import os
import re
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
    """One node as slurmctld sees it (``scontrol show node -o``)."""

    name: str
    state: str                      # base state: IDLE, ALLOCATED, MIXED, DOWN, ...
    flags: frozenset[str] = field(default_factory=frozenset)   # CLOUD, POWERED_DOWN, POWERING_UP, ...
    address: str = ""
    comment: str = ""
    reason: str = ""

    @property
    def instance_id(self) -> str | None:
        """The cloud instance recorded by resume (``Comment=instance=<id>``)."""
        prefix = "instance="
        return self.comment[len(prefix):] if self.comment.startswith(prefix) else None


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str                      # PENDING, CONFIGURING, RUNNING, COMPLETED, FAILED, ...
    nodes: str = ""
    reason: str = ""
    restarts: int = 0
    exit_code: str = ""


#: Job states after which a job will not run again by itself.
FINISHED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                             "BOOT_FAIL", "DEADLINE", "PREEMPTED"})


# "Key=Value Key=Value ..." where a value may hold spaces (Reason=..., Comment=...): a key is a
# capitalised word at the start or after a space, followed by "=".
_KEY = re.compile(r"(?:^| )([A-Z][A-Za-z0-9:_/]*)=")


def parse_record(line: str) -> dict[str, str]:
    """One line of ``scontrol show node|job -o`` as {key: value}."""
    marks = list(_KEY.finditer(line.strip()))
    text = line.strip()
    return {m.group(1): text[m.end():(marks[i + 1].start() if i + 1 < len(marks) else len(text))].strip()
            for i, m in enumerate(marks)}


def _value(raw: str | None) -> str:
    return "" if raw in (None, "(null)", "None") else raw


class Slurm:
    """The Slurm cluster whose ``slurm.conf`` is ``conf``."""

    def __init__(self, conf: Path, *, timeout: float = 30.0) -> None:
        self.conf = Path(conf)
        self.timeout = timeout

    def run(self, *argv: str, timeout: float | None = None) -> str:
        return _call(argv, conf=self.conf, timeout=timeout or self.timeout)

    def _records(self, *argv: str) -> list[dict[str, str]]:
        """``scontrol show <x> -o``: one record per line, as {key: value}."""
        out = self.run(*argv)
        return [parse_record(line) for line in out.splitlines() if "=" in line]

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
        found = {}
        for n in self._records("scontrol", "show", "node", "-o"):
            base, *flags = n.get("State", "").upper().split("+")
            found[n["NodeName"]] = NodeInfo(n["NodeName"], base, frozenset(flags), _value(n.get("NodeAddr")),
                                            _value(n.get("Comment")), _value(n.get("Reason")))
        return found

    def update_node(self, names: Sequence[str], **fields: str) -> None:
        """``scontrol update NodeName=a,b Key=Value ...`` (values are single argv items: no shell)."""
        self.run("scontrol", "update", f"NodeName={','.join(names)}", *(f"{k}={v}" for k, v in fields.items()))

    def jobs(self) -> list[JobInfo]:
        return [JobInfo(j["JobId"], j.get("JobState", "").upper(), _value(j.get("NodeList")),
                        _value(j.get("Reason")), int(j.get("Restarts") or 0), j.get("ExitCode", ""))
                for j in self._records("scontrol", "show", "job", "-o")]

    def job(self, job_id: str) -> JobInfo | None:
        return next((j for j in self.jobs() if j.job_id == str(job_id)), None)

    def jobs_on(self, names: Sequence[str]) -> list[JobInfo]:
        """Jobs not yet finished that hold any of ``names``."""
        wanted = set(names)
        out = []
        for job in self.jobs():
            if job.state in FINISHED_STATES or not job.nodes:
                continue
            if wanted & set(self.hostnames(job.nodes)):
                out.append(job)
        return out

    def requeue(self, job_ids: Sequence[str]) -> None:
        if job_ids:
            self.run("scontrol", "requeue", ",".join(job_ids))

    def sbatch(self, script: Path, *, partition: str | None = None, output: Path | None = None,
               workdir: Path | None = None, job_name: str | None = None) -> str:
        """Submit ``script``; returns the job id."""
        argv = ["sbatch", "--parsable"]
        if partition:
            argv.append(f"--partition={partition}")
        if output:
            argv.append(f"--output={output}")
        if workdir:
            argv.append(f"--chdir={workdir}")
        if job_name:
            argv.append(f"--job-name={job_name}")
        out = self.run(*argv, str(script)).strip()
        return out.split(";", 1)[0]
