"""Planning a VM job: check everything a researcher asked for before a single SU is spent.

A VM job is "boot N servers of a flavour, upload inputs, run a command or a script, download the
outputs, delete everything". :func:`plan_vm_job` turns the request into a :class:`VmJobPlan` or
raises :class:`~slipstream.cloud.errors.InvalidRequest` naming the bad input and the valid
choices — unknown flavour or image, a script or input path that does not exist, a bad count,
an output path that could escape the job's directory, a local path outside the allowed roots
(deployment runs: see :func:`allowed_roots`) — all before anything is created.

The plan's worst case is a true upper bound of what the run can be charged: the servers for
``max_hours`` of work *plus* every other phase the flow bounds by a deadline (boot and SSH,
the uploads, the downloads, the teardown): :func:`~slipstream.cost.planning.vm_job_overhead_hours`.
:meth:`VmJobPlan.schedule` gives the flow those deadlines as one :class:`RunSchedule`, so that
what happens between the phases cannot add to the bill either.
"""

from __future__ import annotations

import difflib
import os
import posixpath
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from slipstream.cost.accounting import PlannedServers, estimate
from slipstream.cost.planning import TEARDOWN_ALLOWANCE_SECONDS, check_hours, check_seconds, vm_job_overhead_hours
from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.models import Flavor, Image, ServerSpec, check_name
from slipstream.cloud.port import CloudProvider
from slipstream.untrusted import printable

#: Where a job's files live on the VM, relative to the login user's home.
REMOTE_JOB_DIR = "slipstream-job"
#: The job's full stdout and stderr, saved beside its outputs in the results directory.
STDOUT_FILE, STDERR_FILE = "stdout.txt", "stderr.txt"
#: Directories a deployment run may read inputs from and write results to (``os.pathsep``-separated).
ALLOWED_ROOTS_ENV = "SLIPSTREAM_ALLOWED_ROOTS"


class RunSchedule:
    """When each phase of a run must end, so that its servers never live longer than the worst
    case prices: the sum of the phases' allowances, counted from before the first create call.

    A phase may use its whole allowance from the moment it starts, but never past the run's start
    plus the allowances of it and every phase before it: time spent between phases (Prefect's
    bookkeeping, stopping the budget watchdog) comes out of the next phase's share instead of
    adding to the bill. Deadlines are ``time.monotonic()`` values; ask for a phase's deadline
    once, when it starts."""

    def __init__(self, allowances: Sequence[tuple[str, float]], started: float | None = None):
        self.started = time.monotonic() if started is None else started
        self._phases: dict[str, tuple[float, float]] = {}  # phase -> (its allowance, sum so far)
        total = 0.0
        for phase, seconds in allowances:
            total += seconds
            self._phases[phase] = (seconds, total)

    def deadline(self, phase: str) -> float:
        """The deadline of ``phase``, starting now."""
        seconds, through = self._phases[phase]
        return min(time.monotonic() + seconds, self.started + through)

    @staticmethod
    def seconds_left(deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    @staticmethod
    def wall_clock(deadline: float) -> float:
        """``deadline`` as epoch seconds, for tasks that take one (they may run elsewhere)."""
        return time.time() + (deadline - time.monotonic())


@dataclass(frozen=True)
class VmJobPlan:
    spec: ServerSpec
    flavor: Flavor
    image: Image
    command: str
    inputs: tuple[Path, ...] = ()
    outputs: tuple[str, ...] = ()
    script: Path | None = None
    max_hours: float = 1.0
    results_dir: Path = field(default_factory=lambda: Path("results"))
    secret_env: dict[str, str] = field(default_factory=dict)
    """Environment variable -> name of the saved secret whose value it gets (names only)."""
    boot_timeout_seconds: float = 900.0
    transfer_timeout_seconds: float = 600.0
    teardown_timeout_seconds: float = TEARDOWN_ALLOWANCE_SECONDS

    @property
    def planned(self) -> list[PlannedServers]:
        """The servers for ``max_hours`` of work plus the time around it (a true upper bound)."""
        overhead = vm_job_overhead_hours(self.boot_timeout_seconds, self.transfer_timeout_seconds,
                                         self.teardown_timeout_seconds)
        return [PlannedServers(self.flavor, self.spec.count, self.max_hours, overhead)]

    def schedule(self) -> RunSchedule:
        """The deadlines of the run's phases, exactly those :attr:`planned` prices; make it
        before the first create call."""
        return RunSchedule([("boot", self.boot_timeout_seconds), ("upload", self.transfer_timeout_seconds),
                            ("work", self.max_hours * 3600), ("download", self.transfer_timeout_seconds),
                            ("teardown", self.teardown_timeout_seconds)])

    @property
    def worst_case_su(self) -> float:
        return estimate(self.planned)


def _choose(kind: str, wanted: str, names: list[str], cloud: str) -> None:
    if wanted in names:
        return
    close = difflib.get_close_matches(wanted, names, n=3)
    maybe = f" Did you mean {', '.join(close)}?" if close else ""
    raise InvalidRequest(
        f"unknown {kind} {wanted!r}",
        cloud=cloud,
        hint=f"Valid {kind}s: {', '.join(sorted(names))}.{maybe}",
    )


def _check_output_path(path: str) -> str:
    norm = posixpath.normpath(path)
    if not path or norm == "." or norm.startswith(("/", "..")) or "\x00" in path:
        raise InvalidRequest(
            f"output path {path!r} is not inside the job directory",
            hint=f"Give outputs relative to the job directory (~/{REMOTE_JOB_DIR}), e.g. 'result.json'.",
        )
    return norm


@dataclass(frozen=True)
class JobOutcome:
    """How the researcher's command ended: its exit status (None if it outlived its time), its
    full output, how long it ran."""

    exit_status: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False


class JobFailed(RuntimeError):
    """The researcher's command exited non-zero or outlived ``max_hours``. Its outputs were
    fetched anyway; the message says where they are."""

    def __init__(self, message: str, outcome: JobOutcome):
        self.outcome = outcome
        self.exit_status = outcome.exit_status
        super().__init__(message)


def describe_duration(seconds: float) -> str:
    """``7.2 s``, ``12.5 min``, ``3.25 h``: never a rounded-away "0.0 h"."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def job_failure(plan: VmJobPlan, outcome: JobOutcome, server: str, kept: str) -> JobFailed | None:
    """The error to fail the run with for ``outcome`` (None when the job succeeded). ``kept``
    says what was brought back and where."""
    tail = "\n".join(printable(line) for line in outcome.stderr.rstrip().splitlines()[-20:])  # the VM's text
    tail = f"\nlast lines of stderr:\n{tail}" if tail else ""
    if outcome.timed_out:
        return JobFailed(
            f"the job on {server} did not finish within max_hours={plan.max_hours:g} "
            f"({describe_duration(plan.max_hours * 3600)}); it ran for {describe_duration(outcome.seconds)} "
            f"and was stopped. Raise max_hours if it needs longer. {kept}{tail}", outcome)
    if outcome.exit_status:
        return JobFailed(
            f"the job on {server} exited with status {outcome.exit_status} after "
            f"{describe_duration(outcome.seconds)}: {plan.command[:200]!r}. {kept}{tail}", outcome)
    return None


def allowed_roots(from_deployment: bool) -> list[Path] | None:
    """Where a run may read inputs and write results: the roots ``SLIPSTREAM_ALLOWED_ROOTS`` lists,
    else for a deployment run (its parameters come from a form anyone with UI access can fill)
    only the run's working directory; a call from Python is the caller's own business (None)."""
    if configured := [Path(p).expanduser().resolve() for p in os.environ.get(ALLOWED_ROOTS_ENV, "").split(os.pathsep) if p]:
        return configured
    return [Path.cwd().resolve()] if from_deployment else None


def _confine(what: str, path: Path, roots: list[Path]) -> None:
    real = path.expanduser().resolve()
    if not any(real == root or real.is_relative_to(root) for root in roots):
        raise InvalidRequest(
            f"{what} {str(path)!r} is outside the directories this run may use",
            hint=f"Allowed: {', '.join(str(r) for r in roots)} (set {ALLOWED_ROOTS_ENV} on the worker to "
                 "allow others, separated by ':'). Give a path inside one of them.",
        )


def _confine_tree(what: str, path: Path, roots: list[Path]) -> None:
    """``path`` and, for a directory, every symlink under it must resolve inside ``roots``: an
    innocent-looking input directory must not carry a link to ~/.ssh onto the VM."""
    _confine(what, path, roots)
    if path.is_dir():
        for below, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                if (Path(below) / name).is_symlink():
                    _confine(f"{what} (symlink inside it)", Path(below) / name, roots)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_secret_env(secret_env: dict[str, str]) -> dict[str, str]:
    for name, block in secret_env.items():
        if not _ENV_NAME.match(name) or not block:
            raise InvalidRequest(
                f"secret_env entry {name!r} -> {block!r} is not ENV_NAME -> saved secret name",
                hint="Map environment variable names to the names of saved Prefect Secret blocks, "
                     "e.g. {'HF_TOKEN': 'hf-token'}: the job gets the secret's value, no log sees it.",
            )
    return dict(secret_env)


def _check_not_reserved(output: str) -> str:
    if output in (STDOUT_FILE, STDERR_FILE):
        raise InvalidRequest(
            f"output {output!r} would collide with the job's own {output}",
            hint=f"The job's full stdout and stderr are saved as {STDOUT_FILE} and {STDERR_FILE} in the "
                 "results directory; write your output under another name.",
        )
    return output


def plan_vm_job(
    cloud: CloudProvider,
    *,
    name: str,
    flavor: str,
    image: str,
    command: str | None = None,
    script: str | Path | None = None,
    inputs: list[str] | tuple[str, ...] = (),
    outputs: list[str] | tuple[str, ...] = (),
    count: int = 1,
    max_hours: float = 1.0,
    results_dir: str | Path = "results",
    secret_env: dict[str, str] | None = None,
    boot_timeout_seconds: float = 900.0,
    transfer_timeout_seconds: float = 600.0,
    teardown_timeout_seconds: float = TEARDOWN_ALLOWANCE_SECONDS,
    roots: list[Path] | None = None,
) -> VmJobPlan:
    """Validate a VM job request against ``cloud``'s catalogue and the local filesystem (local
    paths confined to ``roots`` when given: see :func:`allowed_roots`)."""
    check_name(name, "job name")
    if not isinstance(count, int) or count < 1:
        raise InvalidRequest(f"count must be a positive whole number, got {count!r}", hint="Ask for at least 1 server.")
    check_hours(max_hours)
    flavors = {f.name: f for f in cloud.list_flavors()}
    _choose("flavour", flavor, list(flavors), cloud.name)
    images = {i.name: i for i in cloud.list_images()}
    _choose("image", image, list(images), cloud.name)
    if bool(command) == bool(script):
        raise InvalidRequest("give exactly one of command or script", hint="A command is a shell line; a script is a local file to upload and run.")
    script_path = None
    if script:
        script_path = Path(script).expanduser()
        if roots is not None:  # before looking: a refusal must not tell what exists out there
            _confine_tree("script", script_path, roots)
        if not script_path.is_file():
            raise InvalidRequest(f"script {str(script)!r} does not exist", hint="Give the path of a local file; it is uploaded and run on the VM.")
        runner = "python3" if script_path.suffix == ".py" else "bash"
        command = f"{runner} {shlex.quote('./' + script_path.name)}"
    input_paths = []
    for item in inputs:
        p = Path(item).expanduser()
        if roots is not None:
            _confine_tree("input", p, roots)
        if not p.exists():
            raise InvalidRequest(f"input {item!r} does not exist", hint="Give local files or directories to upload.")
        input_paths.append(p)
    results_path = Path(results_dir).expanduser()  # the path checked is the path written to
    if roots is not None:
        _confine("results_dir", results_path, roots)
    spec = ServerSpec(name=name, flavor=flavor, image=image, count=count)
    return VmJobPlan(
        spec=spec,
        flavor=flavors[flavor],
        image=images[image],
        command=str(command),
        inputs=tuple(input_paths),
        outputs=tuple(_check_not_reserved(_check_output_path(o)) for o in outputs),
        script=script_path,
        max_hours=max_hours,
        results_dir=results_path,
        secret_env=_check_secret_env(secret_env or {}),
        boot_timeout_seconds=check_seconds("boot_timeout_seconds", boot_timeout_seconds),
        transfer_timeout_seconds=check_seconds("transfer_timeout_seconds", transfer_timeout_seconds),
        teardown_timeout_seconds=check_seconds("teardown_timeout_seconds", teardown_timeout_seconds),
    )
