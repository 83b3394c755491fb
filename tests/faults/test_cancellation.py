"""Cancel or kill a real deployment run of vm_job: the state hooks tear its VM down.

A real Prefect API (the test harness's server), a real runner (``serve()`` in a subprocess) or a
real process worker (``prefect worker start``, as ``prefect.yaml`` deploys), a real local-cloud VM
running a long command. Cancelling through the API makes the runner/worker kill the flow process
and run ``on_cancellation`` there; SIGKILLing the flow process makes the runner report Crashed and run
``on_crashed``. Either way: nothing the run owned remains, its VM's processes are gone, and the
SUs metered are what the VM's state log says.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import State, StateType

from slipstream.cost.accounting import meter_servers
from slipstream.cloud.local.processes import process_table
from slipstream.cloud.models import ServerStatus
from slipstream.jetstream2 import FLAVORS, su_per_hour
from support import wait_until

ROOT = Path(__file__).resolve().parents[2]
LONG_COMMAND = "echo started > started.txt && sleep 600"


@dataclass
class Served:
    """The deployments ``vm-job/<deployment>`` and ``gpu-job/<deployment>``, and the process that
    runs their flow runs (its children are the flow processes)."""

    process: subprocess.Popen
    deployment: str


# How a researcher's deployments run: `flow.serve()`-style (a Runner), or `prefect.yaml` with a
# process work pool and `prefect worker start` (hooks then run in the worker).
SERVE = """
from prefect import serve
from slipstream.flows.vm_job import gpu_job, vm_job
serve(vm_job.to_deployment(name={name!r}), gpu_job.to_deployment(name={name!r}), print_starting_message=False)
"""
WORKER = """
import os, sys
from pathlib import Path
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
with get_client(sync_client=True) as client:
    client.create_work_pool(WorkPoolCreate(name={name!r}, type="process"), overwrite=True)
for entrypoint in ("flows/vm_job.py:vm_job", "flows/vm_job.py:gpu_job"):
    flow.from_source(source={root!r}, entrypoint=entrypoint).deploy(
        name={name!r}, work_pool_name={name!r}, print_next_steps=False)
prefect = str(Path(sys.executable).parent / "prefect")
os.execv(prefect, [prefect, "worker", "start", "--pool", {name!r}, "--type", "process"])
"""


@pytest.fixture(params=["runner"])
def served(request, prefect_harness, local_cloud, tmp_path):
    """The flows served by a runner (or a process worker) in its own process group, with private
    homes; stopped afterwards."""
    mode, name = request.param, f"faults-{request.param}"
    env = {**os.environ, "PREFECT_API_URL": prefect_harness, "PREFECT_HOME": str(tmp_path / "prefect-runner"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
           "SLIPSTREAM_HOME": str(tmp_path / "slipstream"), "SLIPSTREAM_LOCAL_HOME": str(local_cloud.home),
           "PYTHONPATH": str(ROOT)}
    code = (SERVE if mode == "runner" else WORKER).format(name=name, root=str(ROOT))
    log = open(tmp_path / f"{mode}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield Served(proc, name)
    finally:
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _start_long_run(client, local_cloud, served: Served, flow_name: str = "vm-job", flavor: str = "m3.tiny") -> str:
    """Start a run of the served ``flow_name`` running LONG_COMMAND; return the flow run id once
    the command runs on its VM (the only VM on this test's cloud)."""
    deployment = wait_until(lambda: _deployment(client, f"{flow_name}/{served.deployment}"), timeout=60,
                            what="the served deployment")
    run = client.create_flow_run_from_deployment(deployment.id, parameters={
        "flavor": flavor, "command": LONG_COMMAND, "max_hours": 0.2})
    (server,) = wait_until(lambda: [s for s in local_cloud.list_servers() if s.status == ServerStatus.ACTIVE],
                           timeout=90, what="the run's VM to be ACTIVE")
    # The long command really runs on the VM: it wrote its marker in the job directory.
    wait_until(lambda: list(local_cloud.home.glob(f"vms/{server.id}*/**/slipstream-job/started.txt")),
               timeout=60, what="the long command to start on the VM")
    assert local_cloud.status().processes > 0
    return str(run.id)


def _deployment(client, name: str):
    try:
        return client.read_deployment_by_name(name)
    except Exception:  # noqa: BLE001 - not registered yet
        return None


def _state(client, run_id: str):
    return client.read_flow_run(run_id).state


def _logs(client, run_id: str) -> list[str]:
    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return [entry.message for entry in logs]


def _assert_nothing_left_and_su_right(local_cloud, run_id: str | None = None) -> None:
    """Nothing owned by ``run_id`` (default: by anyone on this test's cloud) remains, the VM's
    processes are gone, and its SUs are its flavour rate for the time it was ACTIVE."""
    assert local_cloud.list_servers(run_id) == [] and local_cloud.list_keypairs(run_id) == []
    assert local_cloud.list_floating_ips(run_id) == [] and local_cloud.list_volumes(run_id) == []
    (history,) = local_cloud.server_history(run_id)
    assert [s for s, _ in history.log] == [ServerStatus.BUILD, ServerStatus.ACTIVE, ServerStatus.DELETED]
    # The VM's processes (guest, sshd, the long command) are gone, not just its database row.
    wait_until(lambda: local_cloud.status().processes == 0, timeout=20, what="the VM's processes to end")
    # Charged only while ACTIVE (m3.tiny: 1 SU/hour, g3.small: 8 SU/hour), nothing after DELETED.
    (metered,) = meter_servers(local_cloud, [(history.id, history.name, history.flavor)])
    (_, active_at), (_, deleted_at) = history.log[1], history.log[2]
    active_hours = (deleted_at - active_at).total_seconds() / 3600
    rate = su_per_hour(FLAVORS[history.flavor])
    assert metered.hours_active == pytest.approx(active_hours)
    assert metered.su == pytest.approx(rate * active_hours)
    assert 0 < metered.su < 0.2 * rate


@pytest.mark.parametrize("served", ["runner", "worker"], indirect=True)
def test_cancelling_a_deployment_run_tears_its_vm_down(served, local_cloud):
    with get_client(sync_client=True) as client:
        run_id = _start_long_run(client, local_cloud, served)

        client.set_flow_run_state(run_id, State(type=StateType.CANCELLING, message="cancelled by the test"))

        wait_until(lambda: _state(client, run_id).type == StateType.CANCELLED, timeout=120,
                   what="the run to be Cancelled")
        _assert_nothing_left_and_su_right(local_cloud, run_id)
        # The runner/worker ran our hook after killing the flow process, and it logged the proof
        # (the Lease in the flow process usually got there first on SIGTERM: then it found nothing).
        logs = wait_until(lambda: _hook_proof(client, run_id), timeout=30, what="the cancellation hook's proof")
    assert any(f"run {run_id} cancelled: tearing down" in m for m in logs), "\n".join(logs)


def _hook_proof(client, run_id: str) -> list[str]:
    logs = _logs(client, run_id)
    done = any(m.startswith("deleted ") and f"teardown proof for run {run_id} on local: no " in m for m in logs)
    return logs if done else []


@pytest.mark.parametrize("served", ["runner", "worker"], indirect=True)
def test_a_killed_flow_process_crashes_and_the_crash_hook_tears_down(served, local_cloud):
    with get_client(sync_client=True) as client:
        run_id = _start_long_run(client, local_cloud, served)
        # The flow process: the runner's child (the VMs live in sessions of their own).
        flow_processes = wait_until(lambda: _flow_processes(served.process.pid), timeout=10, what="the flow process")
        for pid in flow_processes:
            os.kill(pid, signal.SIGKILL)  # no Lease.__exit__, no finally: only the hook can clean up

        wait_until(lambda: _state(client, run_id).type == StateType.CRASHED, timeout=120,
                   what="the run to be Crashed")
        logs = wait_until(lambda: _hook_proof(client, run_id), timeout=60, what="the crash hook's proof")
        assert local_cloud.list_servers(run_id) == []  # the flow process was dead: the hook did it
        _assert_nothing_left_and_su_right(local_cloud, run_id)
        # The run's page shows the hook's proof, as it would for a run that ended by itself.
        proofs = wait_until(lambda: [a for a in client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))) if a.key == "vm-job-teardown-proof"],
            timeout=30, what="the teardown-proof artifact of the killed run")
        assert "Teardown proof — clean" in proofs[0].data and run_id in proofs[0].data
    assert any(f"run {run_id} crashed: tearing down" in m for m in logs), logs
    assert any(m.startswith("deleted ") and "server vm-job" in m for m in logs), "\n".join(logs)


def test_a_killed_gpu_job_tears_down_the_vm_of_its_vm_job_subflow(served, local_cloud):
    with get_client(sync_client=True) as client:
        run_id = _start_long_run(client, local_cloud, served, flow_name="gpu-job", flavor="g3.small")
        (history,) = local_cloud.server_history()
        assert history.run_id != run_id  # the VM belongs to the vm-job subflow run, not to gpu-job's
        for pid in wait_until(lambda: _flow_processes(served.process.pid), timeout=10, what="the flow process"):
            os.kill(pid, signal.SIGKILL)

        wait_until(lambda: _state(client, run_id).type == StateType.CRASHED, timeout=120,
                   what="the run to be Crashed")
        logs = wait_until(lambda: (m := _logs(client, run_id)) and any(
            "Hook 'teardown_on_crash' finished" in x for x in m) and m, timeout=60, what="the crash hook")
        _assert_nothing_left_and_su_right(local_cloud)
    assert any(f"owned by run(s) {run_id}, {history.run_id}" in m for m in logs), "\n".join(logs)


def _flow_processes(runner_pid: int) -> list[int]:
    found = []
    for pid, stat in process_table().items():
        try:
            # `python -m prefect.engine` or a multiprocessing child, depending on how the runner
            # starts flows; never its resource tracker.
            if stat.ppid == runner_pid and b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def test_the_hooks_are_idempotent_and_a_cloud_they_cannot_load_is_reported_not_raised(prefect_harness, cloud_env):
    from slipstream.flows.vm_job import vm_job
    from slipstream.cloud.models import Ownership, ServerSpec
    from slipstream.ownership.lease import Lease
    from slipstream.tasks.hooks import tear_down_flow_run, teardown_on_crash

    local_cloud = cloud_env
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(vm_job, parameters={"cloud": "local", "command": "true"})
        # What a dead flow process left behind: a key and a VM tagged with the run id.
        left = Lease(local_cloud, Ownership.new("vm-job", run_id=str(run.id)))
        left.create_keypair("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE7x0Ff0Hnm3zQPMjLeCzLWV1dNfmSbEW9FbgpmPZx0X t")
        left.create_servers(ServerSpec("vm-job", "m3.tiny", "slipstream-noop"))

        (first,) = tear_down_flow_run(vm_job, run, "crashed")
        (second,) = tear_down_flow_run(vm_job, run, "crashed")
        assert first.clean and sorted(r.kind.value for r in first.deleted) == ["keypair", "server"]
        assert second.clean and second.deleted == []  # nothing left to do, and no error either
        assert local_cloud.list_servers(str(run.id)) == [] and local_cloud.list_keypairs(str(run.id)) == []

        lost = client.create_flow_run(vm_job, parameters={"cloud": "no-such-cloud", "command": "true"})
        assert teardown_on_crash(vm_job, lost, lost.state) is None  # logged, not raised
        logs = wait_until(lambda: [m for m in _logs(client, str(lost.id)) if "cannot load cloud" in m],
                          timeout=30, what="the hook's error in the run's logs")
    assert "'no-such-cloud'" in logs[0] and "slipstream reap --yes" in logs[0]


def test_the_hooks_follow_nested_runs_to_any_depth_each_on_its_own_cloud(prefect_harness, cloud_env, tmp_path):
    """gpu-job (local) -> a pipeline step on another cloud -> vm-job inside it (no ``cloud``
    parameter: its parent's). A crash of the outer run tears all three down where they live."""
    from prefect import task

    from slipstream.blocks.local_cloud import LocalCloudBlock
    from slipstream.flows.vm_job import gpu_job, vm_job
    from slipstream.cloud.local import LocalCloud
    from slipstream.cloud.models import Ownership, ServerSpec
    from slipstream.ownership.lease import Lease, teardown_run
    from slipstream.tasks.hooks import tear_down_flow_run

    @task
    def step() -> None:
        """Only here to give nested flow runs a parent task run, as a subflow call does."""

    other = LocalCloud(home=tmp_path / "other-cloud")
    LocalCloudBlock(home=str(other.home)).save("hooks-other", overwrite=True)
    with get_client(sync_client=True) as client:
        outer = client.create_flow_run(gpu_job, parameters={"cloud": "local", "command": "true"})
        middle = client.create_flow_run(vm_job, parameters={"cloud": "slipstream-local-cloud/hooks-other"},
                                        parent_task_run_id=client.create_task_run(step, outer.id, "0").id)
        inner = client.create_flow_run(vm_job, parameters={"command": "true"},
                                       parent_task_run_id=client.create_task_run(step, middle.id, "0").id)
        where = {outer.id: cloud_env, middle.id: other, inner.id: other}
        try:
            for run_id, cloud in where.items():  # what the dead runs left behind
                Lease(cloud, Ownership.new("vm-job", run_id=str(run_id))).create_servers(
                    ServerSpec("left", "m3.tiny", "slipstream-noop"))

            proofs = tear_down_flow_run(gpu_job, outer, "crashed")
            assert len(proofs) == 3 and all(p.clean and len(p.deleted) == 1 for p in proofs)
            for run_id, cloud in where.items():
                assert cloud.list_servers(str(run_id)) == [], f"run {run_id} left a server on {cloud.name}"
            logs = wait_until(lambda: [m for m in _logs(client, str(outer.id)) if "tearing down" in m],
                              timeout=30, what="the hook's plan in the run's logs")
        finally:
            for run_id, cloud in where.items():
                teardown_run(cloud, str(run_id))
    assert any(f"run(s) {outer.id} on cloud 'local'" in m for m in logs), logs
    assert any(f"run(s) {middle.id}, {inner.id} on cloud 'slipstream-local-cloud/hooks-other'" in m
               for m in logs), logs


def test_the_flows_can_be_served_directly_their_parameters_resolve_in_the_runs_process(tmp_path):
    """`flow.serve()` pickles the flow by value into a fresh process (DirectSubprocessStarter);
    its typed parameters (Literal flavour names) must still validate there."""
    import cloudpickle

    from slipstream.flows.vm_job import gpu_job, large_memory_job, vm_job

    for n, flow_obj in enumerate((vm_job, gpu_job, large_memory_job)):
        (tmp_path / f"{n}.pkl").write_bytes(cloudpickle.dumps(flow_obj))
    code = textwrap.dedent(f"""
        import cloudpickle, pathlib
        for n in range(3):
            f = cloudpickle.loads(pathlib.Path({str(tmp_path)!r}, f"{{n}}.pkl").read_bytes())
            print(f.name, f.validate_parameters({{"command": "true"}})["flavor"])
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "ph")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["vm-job", "m3.small", "gpu-job", "g3.medium", "large-memory-job", "r3.large"]


def test_hostile_deployment_parameters_are_refused_naming_the_allowed_directory(served, local_cloud):
    """A form anyone with UI access can fill must not make the worker read its own files or write
    into them: a deployment run is confined to its working directory."""
    with get_client(sync_client=True) as client:
        deployment = wait_until(lambda: _deployment(client, f"vm-job/{served.deployment}"), timeout=60,
                                what="the served deployment")
        runs = [client.create_flow_run_from_deployment(deployment.id, parameters={
            "flavor": "m3.tiny", "command": "true", **hostile}) for hostile in (
            {"inputs": ["/etc/shadow"]}, {"inputs": ["~/.ssh"]}, {"results_dir": "/root/.ssh"})]
        for run in runs:
            state = wait_until(lambda: (s := _state(client, run.id)).is_final() and s, timeout=120,
                               what="the hostile run to end")
            assert state.type == StateType.FAILED, state
            assert "outside the directories this run may use" in state.message and f"Allowed: {ROOT}" in state.message
    assert local_cloud.server_history() == [] and not list(local_cloud.list_keypairs())
