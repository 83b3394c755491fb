"""A researcher's batch jobs on an elastic cluster: staged, tracked to their end, outputs brought back.

    jobs = submit_batch(slurm, [Path("a/run.sh"), Path("b/run.sh")], cluster_dir / "jobs")
    tracker = JobTracker(jobs)
    newly_ended = tracker.observe(slurm.jobs())      # each round of the wait
    fetched, missing = collect_outputs(jobs[0], ["out/summary.json"], results / jobs[0].label)

- Each script runs in a directory of its own, ``<jobs dir>/<label>/`` (its working directory and
  where its ``<stem>.out`` goes), so two scripts with the same file name never overwrite each
  other: labels are the script's stem, ``<stem>-<n>`` (``n`` its place in the list) when stems repeat.
- :class:`JobTracker` records each job's end state the first time it is seen. slurmctld forgets
  a finished job ``MinJobAge`` seconds after its end (there is no accounting database), so a job
  that was seen ending stays ended; one that vanished before its end was seen ended too, in a
  state nobody can know (``VANISHED``), which counts as a failure.
- A pending job whose reason says it can never start (``PartitionConfig``: it asks for more
  than any node has) is :class:`JobCannotRun` at once, with Slurm's reason.
"""

from __future__ import annotations

import posixpath
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from slipstream.cloud.errors import CloudError, InvalidRequest
from slipstream.slurm.commands import JobInfo, Slurm

#: What a job that slurmctld forgot before its end was seen ended as.
VANISHED = "VANISHED"

#: Pending reasons that waiting can never change on this cluster (no administrator will edit the
#: partition or the job): the job asks for more than the partition's nodes have or allow.
NEVER_RUNNABLE = {
    "PartitionConfig": "it asks for more CPUs, memory or GPUs per node than the cluster's nodes have",
    "BadConstraints": "its constraints can never be met by the cluster's nodes",
    "PartitionNodeLimit": "it asks for more nodes than the cluster may hold (max_nodes)",
    "PartitionTimeLimit": "it asks for more time than the partition allows",
    "DependencyNeverSatisfied": "it depends on a job that can no longer end as required",
}


class JobCannotRun(CloudError):
    """A job is pending for a reason that waiting cannot change."""


class JobsFailed(CloudError):
    """At least one job ended in another state than COMPLETED."""


@dataclass(frozen=True)
class BatchJob:
    """One submitted script: where it runs and writes."""

    job_id: str
    script: Path          # the researcher's script
    label: str            # unique among the batch: the script's stem, or <stem>-<n> when stems repeat
    workdir: Path         # the job's own directory on the cluster's shared disk

    @property
    def output(self) -> Path:
        """Slurm's stdout+stderr file of the job."""
        return self.workdir / f"{self.script.stem}.out"


def job_labels(scripts: Sequence[Path]) -> list[str]:
    """One directory name per script, all different: its stem, or ``<stem>-<n>`` when stems repeat
    (lengthened while it equals another script's label: ``run.sh`` twice beside ``run-1.sh``)."""
    stems = Counter(p.stem for p in scripts)
    labels: list[str] = []
    for i, path in enumerate(scripts, start=1):
        label = path.stem if stems[path.stem] == 1 else f"{path.stem}-{i}"
        while label in labels or (label != path.stem and label in stems):
            label += f"-{i}"
        labels.append(label)
    return labels


def check_outputs(outputs: Sequence[str]) -> list[str]:
    """``outputs`` normalised, or :class:`InvalidRequest` for one that could leave a job's directory."""
    checked = []
    for path in outputs:
        norm = posixpath.normpath(path) if path else ""
        if not norm or norm.startswith(("/", "..")) or "\x00" in path or norm == ".":
            raise InvalidRequest(f"output path {path!r} is not inside the job's directory",
                                 hint="Give outputs relative to the job's working directory, e.g. 'out/summary.json'.")
        checked.append(norm)
    return checked


def submit_batch(slurm: Slurm, scripts: Sequence[Path], jobs_dir: Path) -> list[BatchJob]:
    """Stage each script in its own directory under ``jobs_dir`` (the nodes read it there) and
    ``sbatch`` it with that directory as its working directory."""
    submitted = []
    for script, label in zip(scripts, job_labels(scripts), strict=True):
        workdir = jobs_dir / label
        workdir.mkdir(parents=True)
        staged = workdir / script.name
        shutil.copyfile(script, staged)
        job = BatchJob("", script, label, workdir)
        job_id = slurm.sbatch(staged, output=job.output, workdir=workdir, job_name=label)
        submitted.append(replace(job, job_id=job_id))
    return submitted


class JobTracker:
    """Each job's latest state, with its end state kept from the first time it is seen."""

    def __init__(self, job_ids: Sequence[str]) -> None:
        self.job_ids = [str(i) for i in job_ids]
        self.latest: dict[str, JobInfo] = {}
        self.ended: dict[str, JobInfo] = {}

    def observe(self, snapshot: Sequence[JobInfo]) -> list[JobInfo]:
        """Take one ``squeue`` snapshot; returns the jobs whose end is new in it."""
        now = {j.job_id: j for j in snapshot}
        newly = []
        for job_id in self.job_ids:
            if job_id in self.ended:
                continue  # a purged job, or a later snapshot, never changes an end once seen
            job = now.get(job_id)
            if job is None:
                job = replace(self.latest.get(job_id) or JobInfo(job_id, ""), state=VANISHED,
                              reason="slurmctld forgot it (MinJobAge) before its end was seen")
            self.latest[job_id] = job
            if job.finished or job.state == VANISHED:
                self.ended[job_id] = job
                newly.append(job)
        return newly

    @property
    def jobs(self) -> list[JobInfo]:
        return [self.latest.get(i) or JobInfo(i, "SUBMITTED") for i in self.job_ids]

    @property
    def done(self) -> bool:
        return len(self.ended) == len(self.job_ids)

    def never_runnable(self) -> list[JobInfo]:
        return [j for j in self.jobs if j.state == "PENDING" and j.reason in NEVER_RUNNABLE]


def collect_outputs(job: BatchJob, outputs: Sequence[str], target: Path) -> tuple[list[Path], list[str]]:
    """Copy the job's Slurm output and each of ``outputs`` that exists into ``target``, keeping
    relative paths; returns (copied files, names of the outputs that do not exist). A link, at the
    top or inside an output directory, is followed only while it stays inside the job's directory:
    the job must not make the flow copy its user's files, and a dangling link must not fail the run."""
    copied, missing = [], []
    target.mkdir(parents=True, exist_ok=True)
    home = job.workdir.resolve()
    for rel in [job.output.name, *outputs]:
        source = job.workdir / rel
        if not _inside(source, home, rel, missing):
            continue
        if source.is_dir():
            _copy_tree(source, target / rel, home, rel, missing)
        elif source.is_file():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target / rel)
        else:
            missing.append(rel)
            continue
        copied.append(target / rel)
    return copied, missing


def _inside(source: Path, home: Path, rel: str, skipped: list[str]) -> bool:
    if not source.resolve().is_relative_to(home):
        skipped.append(f"{rel} (points outside the job's directory)")
        return False
    if source.is_symlink() and not source.exists():
        skipped.append(f"{rel} (points nowhere)")
        return False
    return True


def _copy_tree(source: Path, target: Path, home: Path, rel: str, skipped: list[str]) -> None:
    """``copytree`` that skips (and names) links leaving ``home`` or pointing nowhere; a linked
    directory is not entered (a link to its parent would never end)."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        entry_rel = f"{rel}/{entry.name}"
        if not _inside(entry, home, entry_rel, skipped):
            continue
        if entry.is_dir() and not entry.is_symlink():
            _copy_tree(entry, target / entry.name, home, entry_rel, skipped)
        elif entry.is_file():
            shutil.copyfile(entry, target / entry.name)


def tail(path: Path, lines: int = 20, most: int = 64 * 1024) -> str:
    """The last ``lines`` lines of ``path``, reading at most its last ``most`` bytes (a job may print gigabytes)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - most))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output file)"


def describe_end(job: JobInfo) -> str:
    """``COMPLETED``, ``FAILED (exit 4)``, ``CANCELLED (signal 9)``, ``VANISHED (...)``."""
    if job.state == VANISHED:
        return f"{VANISHED} ({job.reason})"
    if job.signal:
        return f"{job.state} (signal {job.signal})"
    if job.exit_code:
        return f"{job.state} (exit {job.exit_code})"
    return job.state
