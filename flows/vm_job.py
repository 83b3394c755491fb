"""Run a job on a fresh VM and delete the VM afterwards: ``vm_job`` and its presets.

"Get me a g3.medium, copy my inputs over, run my script, bring the results back, and make sure
nothing keeps charging my allocation." That is the whole story, whatever happens in between:
the lease deletes every server, key and address when the flow ends — well, with an error, on
Ctrl-C or on cancellation — and publishes a teardown proof.

From Python::

    from slipstream.flows.vm_job import gpu_job
    gpu_job(command="nvidia-smi && python3 train.py", inputs=["train.py"], outputs=["model.pt"],
            max_hours=4, budget_su=100)    # refused before booting if 4 h could cost more

A budget (``budget_su``, or the run budget of a saved ``allocation``) is checked before anything
is created: a worst case (servers × ``max_hours``) over it, or over the allocation's balance for
the flavour's ACCESS resource, fails the flow at once unless ``override_budget=True``. While the
job runs a watchdog meters it, emits ``slipstream.budget.threshold`` events, and tears the run
down when the budget is spent.

From the Prefect UI the typed parameters render as a form (see ``prefect.yaml``).
"""

# No `from __future__ import annotations` here: `flow.serve()` pickles the flow function by
# value into the run's process, and string annotations (FlavorName...) would not resolve there.
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.runtime import deployment, flow_run
from pydantic import BaseModel, BeforeValidator

from slipstream.blocks import load_cloud
from slipstream import jetstream2, progress, ssh
from slipstream.cost.accounting import MeteredServer
from slipstream.cost.planning import flavor_named
from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.models import Ownership
from slipstream.ownership.lease import HeldResource, Lease, first_lease
from slipstream.transfer import FetchedOutputs
from slipstream.vmjob import (REMOTE_JOB_DIR, STDERR_FILE, STDOUT_FILE, RunSchedule, allowed_roots, job_failure,
                              plan_vm_job)
from slipstream.tasks.budget import guard_budget, watching_budget
from slipstream.tasks.events import resource_event_emitter
from slipstream.tasks.hooks import TEARDOWN_HOOKS
from slipstream.tasks.interrupt import exit_if_prefect_is_gone
from slipstream.tasks.provision import attach_floating_ip, provision_servers, register_keypair, wait_until_active
from slipstream.tasks.remote import download_outputs, run_remote_command, upload_inputs, wait_for_ssh
from slipstream.tasks.report import report_run


def _known_flavour(*families: str):
    """A validator giving a typo the CLI's "did you mean" instead of pydantic's bare literal_error."""
    def check(name: object) -> object:
        try:
            flavor_named(str(name), families or None)
        except InvalidRequest as err:
            raise ValueError(str(err)) from None
        return name
    return BeforeValidator(check)


FlavorName = Annotated[Literal[tuple(jetstream2.FLAVORS)], _known_flavour()]  # type: ignore[valid-type]
GpuFlavorName = Annotated[Literal["g3.small", "g3.medium", "g3.large", "g3.xl"], _known_flavour("g3")]
LargeMemoryFlavorName = Annotated[Literal["r3.large", "r3.xl"], _known_flavour("r3")]


class VmJobResult(BaseModel):
    run_id: str
    cloud: str
    exit_status: int
    stdout_tail: str
    results_dir: str
    """Where the outputs, stdout.txt and stderr.txt are (``results/<run id>`` by default)."""
    outputs: list[str]
    """Local paths of the files brought back, relative paths kept (``results/<id>/a/x.txt``)."""
    missing_outputs: list[str]
    refused_outputs: dict[str, str]
    resources: list[HeldResource]
    su_estimated: float
    su_spent: float
    su_budget: float | None = None
    metered: list[MeteredServer]
    teardown_clean: bool
    teardown_remaining: dict[str, list[str]]


@flow(name="vm-job", log_prints=True, **TEARDOWN_HOOKS)
def vm_job(
    flavor: FlavorName = "m3.small",
    command: str | None = None,
    script: str | None = None,
    inputs: list[str] | None = None,
    outputs: list[str] | None = None,
    image: str = jetstream2.DEFAULT_IMAGE,
    name: str = "vm-job",
    cloud: str = "local",
    max_hours: float = 1.0,
    results_dir: str | None = None,
    secret_env: dict[str, str] | None = None,
    boot_timeout_seconds: float = 900.0,
    transfer_timeout_seconds: float = 600.0,
    teardown_timeout_seconds: float = 300.0,
    pipeline: str = "vm-job",
    budget_su: float | None = None,
    allocation: str | None = None,
    override_budget: bool = False,
    budget_check_seconds: float = 60.0,
) -> VmJobResult:
    """Boot one VM of ``flavor``, upload ``inputs``, run ``command`` (or ``script``), download
    ``outputs`` into ``results_dir``, and delete everything.

    Args:
        flavor: Jetstream2 flavour: m3.* general purpose, r3.* large memory, g3.* A100 vGPU.
        command: Shell command run in the job directory on the VM.
        script: Local script to upload and run instead of a command (.py runs with python3).
        inputs: Local files or directories copied into the job directory first.
        outputs: Paths relative to the job directory to bring back (whatever the job's exit).
        image: Image name; Jetstream2's Featured images come with SSH and Python.
        name: Server name (a DNS label: lower-case letters, digits, '-').
        cloud: "local" for the embedded cloud, or a saved cloud block ("<block-type>/<name>").
        max_hours: Longest plausible walltime of the command; the run fails past it.
        results_dir: Local directory for the outputs and the job's stdout.txt/stderr.txt
            (default results/<run id>).
        secret_env: Environment variables for the job from saved Prefect Secret blocks,
            {"VARIABLE": "secret-block-name"}; the values are never logged.
        boot_timeout_seconds: How long to wait for the VM to be ACTIVE and reachable over SSH.
        transfer_timeout_seconds: How long the upload, and then the download, may take.
        teardown_timeout_seconds: How long deleting everything may take (deletes, retries and
            waits share it); anything still there then is named and left to the reaper.
        pipeline: Pipeline name stamped on every resource (used by `slipstream ls` and the reaper).
        budget_su: Most SUs this run may spend (default: the allocation's run budget, if any).
        allocation: A saved allocation block (its balances, run budget and warning thresholds).
        override_budget: Run even if the worst case is over the budget or the balance.
        budget_check_seconds: How often the budget watchdog meters the run.
    """
    logger = get_run_logger()
    provider = load_cloud(cloud)
    run_id = str(flow_run.get_id() or "") or uuid.uuid4().hex
    results = Path(results_dir or Path("results") / run_id)
    plan = plan_vm_job(
        provider, name=name, flavor=flavor, image=image, command=command, script=script,
        inputs=inputs or [], outputs=outputs or [], max_hours=max_hours, results_dir=results,
        secret_env=secret_env, boot_timeout_seconds=boot_timeout_seconds,
        transfer_timeout_seconds=transfer_timeout_seconds, teardown_timeout_seconds=teardown_timeout_seconds,
        roots=allowed_roots(bool(deployment.get_id())),
    )
    results = plan.results_dir
    (planned,) = plan.planned
    # The first lease covers the boot; the run's heartbeat renews it while the work goes on.
    owner = Ownership.new(pipeline, run_id=run_id, lease=first_lease(timedelta(seconds=boot_timeout_seconds)))
    logger.info("plan: 1 x %s on %s for at most %g h of work + %.2f h to boot, transfer and tear down: "
                "worst case %.2f SU", flavor, provider.name, max_hours, planned.overhead_hours, plan.worst_case_su)
    budget_su, held_allocation = guard_budget(plan.planned, budget_su, allocation, override_budget)

    keypair = ssh.generate_keypair(comment=f"slipstream-{owner.run_id}")
    # Every phase ends by the deadline the worst case counts for it, teardown included.
    schedule = plan.schedule()
    lease = Lease(provider, owner, on_event=resource_event_emitter(owner, provider.name),
                  teardown_deadline=lambda: schedule.deadline("teardown"))
    lease.ledger.record_worst_case(owner.run_id, pipeline, provider.name, plan.worst_case_su)
    outcome, fetched, server = None, FetchedOutputs(results), None
    try:
        with lease, watching_budget(lease, budget_su, allocation=held_allocation, interval=budget_check_seconds):
            boot_by = schedule.deadline("boot")  # one deadline: boot, address and SSH
            registered = register_keypair(lease, keypair.public_key)
            spec = replace(plan.spec, key_name=registered.name)
            (server,) = wait_until_active(lease, provision_servers(lease, spec, deadline=schedule.wall_clock(boot_by)),
                                          deadline=schedule.wall_clock(boot_by))
            server = attach_floating_ip(lease, server, deadline=schedule.wall_clock(boot_by))
            target = wait_for_ssh(provider, server, keypair, timeout=schedule.seconds_left(boot_by))
            progress.report("work", 0, 3, "uploading inputs")
            upload_inputs(target, [*plan.inputs, *([plan.script] if plan.script else [])], REMOTE_JOB_DIR,
                          deadline=schedule.wall_clock(schedule.deadline("upload")))
            progress.report("work", 1, 3, f"running: {plan.command[:40]}")
            try:
                outcome = run_remote_command(target, plan.command, REMOTE_JOB_DIR,
                                             timeout=schedule.seconds_left(schedule.deadline("work")),
                                             results_dir=results, cloud=provider, server=server,
                                             secret_env=plan.secret_env)
            finally:  # whatever the exit, even a dropped connection: bring back what exists
                progress.report("work", 2, 3, "downloading outputs")
                fetched = _fetch_what_exists(target, plan, results, schedule.deadline("download"), logger)
            progress.report("work", 3, 3, "done")
            progress.report("teardown", 0, 1, "deleting everything the run created")
    except KeyboardInterrupt:
        exit_if_prefect_is_gone(lease, provider, results)
        raise
    finally:
        # Runs on failure too: the researcher sees what was created, what it cost and the proof.
        if lease.proof is not None:
            metered = report_run(provider, pipeline, lease.proof, plan.worst_case_su, budget_su)
    proof = lease.proof
    progress.report("teardown", 1, 1, "clean" if proof.clean else "INCOMPLETE")
    if not proof.clean:
        raise RuntimeError(proof.summary())
    kept = (f"Outputs and the job's full {STDOUT_FILE}/{STDERR_FILE} are in {results}/: {fetched.summary()}.")
    if failure := job_failure(plan, outcome, server.name, kept):
        raise failure
    return VmJobResult(
        run_id=owner.run_id, cloud=provider.name, exit_status=outcome.exit_status,
        stdout_tail="\n".join(outcome.stdout.splitlines()[-20:]), results_dir=str(results),
        outputs=[str(results / f) for f in fetched.files], missing_outputs=fetched.missing,
        refused_outputs=fetched.refused, resources=proof.deleted, su_estimated=plan.worst_case_su,
        su_spent=sum(m.su for m in metered), metered=metered, teardown_clean=proof.clean,
        teardown_remaining=proof.remaining, su_budget=budget_su,
    )


def _fetch_what_exists(target, plan, results: Path, deadline: float, logger) -> FetchedOutputs:
    """The outputs that exist by ``deadline`` (``time.monotonic()``), or nothing if the VM cannot
    be reached any more (logged: the job's own outcome is the error worth raising)."""
    try:
        return download_outputs(target, list(plan.outputs), REMOTE_JOB_DIR, results,
                                deadline=RunSchedule.wall_clock(deadline))
    except ssh.SshError as err:
        logger.error("could not download the outputs: %s", err)
        return FetchedOutputs(results, missing=list(plan.outputs))


@flow(name="gpu-job", log_prints=True, **TEARDOWN_HOOKS)
def gpu_job(
    command: str | None = None,
    script: str | None = None,
    flavor: GpuFlavorName = "g3.medium",
    inputs: list[str] | None = None,
    outputs: list[str] | None = None,
    cloud: str = "local",
    max_hours: float = 1.0,
    results_dir: str | None = None,
    secret_env: dict[str, str] | None = None,
    budget_su: float | None = None,
    allocation: str | None = None,
    override_budget: bool = False,
) -> VmJobResult:
    """A VM job on an A100 vGPU slice (g3.small … g3.xl). Never suspended: Jetstream2 forbids it."""
    return vm_job(flavor=flavor, command=command, script=script, inputs=inputs, outputs=outputs,
                  cloud=cloud, max_hours=max_hours, results_dir=results_dir, secret_env=secret_env,
                  name="gpu-job", pipeline="gpu-job",
                  budget_su=budget_su, allocation=allocation, override_budget=override_budget)


@flow(name="large-memory-job", log_prints=True, **TEARDOWN_HOOKS)
def large_memory_job(
    command: str | None = None,
    script: str | None = None,
    flavor: LargeMemoryFlavorName = "r3.large",
    inputs: list[str] | None = None,
    outputs: list[str] | None = None,
    cloud: str = "local",
    max_hours: float = 1.0,
    results_dir: str | None = None,
    secret_env: dict[str, str] | None = None,
    budget_su: float | None = None,
    allocation: str | None = None,
    override_budget: bool = False,
) -> VmJobResult:
    """A VM job on a large-memory flavour (r3.large: 500 GB, r3.xl: 1000 GB RAM)."""
    return vm_job(flavor=flavor, command=command, script=script, inputs=inputs, outputs=outputs,
                  cloud=cloud, max_hours=max_hours, results_dir=results_dir, secret_env=secret_env,
                  name="large-memory-job",
                  pipeline="large-memory-job", budget_su=budget_su, allocation=allocation,
                  override_budget=override_budget)


if __name__ == "__main__":
    print(vm_job(command="python3 -c 'import numpy; print(numpy.arange(10).sum())'"))
