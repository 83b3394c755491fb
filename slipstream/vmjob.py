"""Planning a VM job: check everything a researcher asked for before a single SU is spent.

A VM job is "boot N servers of a flavour, upload inputs, run a command or a script, download the
outputs, delete everything". :func:`plan_vm_job` turns the request into a :class:`VmJobPlan` or
raises :class:`~slipstream.cloud.errors.InvalidRequest` naming the bad input and the valid
choices — unknown flavour or image, a script or input path that does not exist, a bad count,
an output path that could escape the job's directory — all before anything is created.
"""

from __future__ import annotations

import difflib
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from slipstream.cost.accounting import PlannedServers, estimate
from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.models import Flavor, Image, ServerSpec, check_name
from slipstream.cloud.port import CloudProvider

#: Where a job's files live on the VM, relative to the login user's home.
REMOTE_JOB_DIR = "slipstream-job"


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

    @property
    def worst_case_su(self) -> float:
        return estimate([PlannedServers(self.flavor, self.spec.count, self.max_hours)])


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
    if not path or norm.startswith(("/", "..")) or "\x00" in path:
        raise InvalidRequest(
            f"output path {path!r} is not inside the job directory",
            hint=f"Give outputs relative to the job directory (~/{REMOTE_JOB_DIR}), e.g. 'result.json'.",
        )
    return norm


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
) -> VmJobPlan:
    """Validate a VM job request against ``cloud``'s catalogue and the local filesystem."""
    check_name(name, "job name")
    if not isinstance(count, int) or count < 1:
        raise InvalidRequest(f"count must be a positive whole number, got {count!r}", hint="Ask for at least 1 server.")
    if not max_hours or max_hours <= 0:
        raise InvalidRequest(f"max_hours must be positive, got {max_hours!r}", hint="Give the job's longest plausible walltime in hours.")
    flavors = {f.name: f for f in cloud.list_flavors()}
    _choose("flavour", flavor, list(flavors), cloud.name)
    images = {i.name: i for i in cloud.list_images()}
    _choose("image", image, list(images), cloud.name)
    if bool(command) == bool(script):
        raise InvalidRequest("give exactly one of command or script", hint="A command is a shell line; a script is a local file to upload and run.")
    script_path = None
    if script:
        script_path = Path(script).expanduser()
        if not script_path.is_file():
            raise InvalidRequest(f"script {str(script)!r} does not exist", hint="Give the path of a local file; it is uploaded and run on the VM.")
        command = f"bash ./{script_path.name}" if script_path.suffix != ".py" else f"python3 ./{script_path.name}"
    input_paths = []
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise InvalidRequest(f"input {item!r} does not exist", hint="Give local files or directories to upload.")
        input_paths.append(p)
    spec = ServerSpec(name=name, flavor=flavor, image=image, count=count)
    return VmJobPlan(
        spec=spec,
        flavor=flavors[flavor],
        image=images[image],
        command=str(command),
        inputs=tuple(input_paths),
        outputs=tuple(_check_output_path(o) for o in outputs),
        script=script_path,
        max_hours=max_hours,
        results_dir=Path(results_dir),
    )
