"""The elastic Slurm cluster with real Debian Slurm daemons on the local cloud.

slurmctld and munged run in a head-node VM, one slurmd per worker VM (each on its own 127.64.x.y
address and port); Slurm's power saving calls ``slipstream slurm resume|suspend|resume-fail``.
Every test proves that nothing of the cluster is left: no VM of its run, no daemon process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from slipstream.cloud.models import Ownership, ServerSpec
from slipstream.ownership.lease import Lease
from slipstream.slurm.cluster import ClusterPlan, ElasticCluster, start_cluster
from slipstream.slurm.power import SlurmPower
from tests.support import captured_logs, owner, prefect_logs, wait_until

pytestmark = pytest.mark.slurm


def daemons_of(directory: Path) -> list[str]:
    """Command lines of running processes that name the cluster's directory (slurmctld, slurmd and
    munged are started with paths inside it)."""
    return processes_naming(str(directory))


def processes_naming(text: str) -> list[str]:
    """Command lines of running processes (other than this one) that contain ``text``."""
    needle = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmd and state not in ("Z", "X"):
            found.append(cmd.replace(b"\0", b" ").decode(errors="replace"))
    return found


@pytest.fixture
def homes(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIPSTREAM_HOME", str(tmp_path / "home"))
    return tmp_path


def _job(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    return path


@contextmanager
def elastic_cluster(cloud, homes: Path, name: str, max_nodes: int, suspend_time: int,
                    **plan: object) -> Iterator[tuple[ElasticCluster, Ownership]]:
    """A cluster owned by a fresh run; afterwards, proof that no VM and no daemon of it is left."""
    run = owner("slurm-cluster")
    directory = homes / "cluster"
    settings = {"suspend_timeout": 5, "resume_timeout": 60, **plan}
    with Lease(cloud, run) as lease:
        yield start_cluster(lease, ClusterPlan(name=name, directory=directory, max_nodes=max_nodes,
                                               suspend_time=suspend_time, **settings)), run
    assert lease.proof is not None and lease.proof.clean, lease.proof.summary()
    wait_until(lambda: not daemons_of(directory), timeout=15, what="every Slurm daemon of the cluster ended")


def test_a_job_makes_cloud_nodes_appear_run_and_vanish_after_the_idle_time(local_cloud, homes):
    directory = homes / "cluster"
    with elastic_cluster(local_cloud, homes, "ec", max_nodes=2, suspend_time=5) as (cluster, run):
        assert [s.name for s in local_cloud.list_servers(run_id=run.run_id)] == ["ec-head"]  # no worker yet
        job = cluster.slurm.sbatch(_job(homes / "job.sh", 'echo "hello from $SLURMD_NODENAME on $(hostname)"\n'),
                                   output=homes / "out.txt")

        vm = wait_until(lambda: next((s for s in local_cloud.list_servers(run_id=run.run_id) if s.name == "ec-1"), None),
                        timeout=30, what="the VM of node ec-1")
        assert vm.ownership.run_id == run.run_id and vm.metadata["slurm_cluster"] == "ec"
        node = wait_until(lambda: (n := cluster.slurm.nodes()["ec-1"]).address == vm.address and n, timeout=30,
                          what="NodeAddr of ec-1 = its VM's address")
        assert node.instance_id == vm.id
        done = cluster.wait_for_jobs([job], timeout=90)
        assert done[0].state == "COMPLETED"
        assert (homes / "out.txt").read_text().strip() == f"hello from ec-1 on {vm.address}"
        assert "ec-2" not in {s.name for s in local_cloud.list_servers(run_id=run.run_id)}  # one job, one node

        # idle for SuspendTime: Slurm suspends ec-1, its VM is deleted (its slurmd with it) and metered
        wait_until(lambda: "ec-1" not in {s.name for s in local_cloud.list_servers(run_id=run.run_id)},
                   timeout=60, what="the VM of ec-1 deleted after the idle time")
        wait_until(lambda: cluster.slurm.nodes()["ec-1"].flags & {"POWERING_DOWN", "POWERED_DOWN"}, timeout=30,
                   what="ec-1 powering down")
        wait_until(lambda: not [c for c in daemons_of(directory) if "-N ec-1" in c], timeout=10,
                   what="slurmd of ec-1 ended with its VM")
        log = wait_until(lambda: "node ec-1 suspended: VM deleted; m3.tiny" in (t := (directory / "power.log").read_text())
                         and t, timeout=10, what="the suspend program metered ec-1")
        assert "created 1 VM(s) in one batch for ec-1" in log and " SU" in log
        costs = {m.name: m for m in cluster.node_costs()}
        assert costs["ec-1"].su > 0 and costs["ec-head"].su > costs["ec-1"].su


def test_a_failed_resume_powers_the_node_down_and_requeues_the_job(local_cloud, homes):
    directory = homes / "cluster"
    with elastic_cluster(local_cloud, homes, "fr", max_nodes=2, suspend_time=5) as (cluster, run):
        local_cloud.fail_next("create_servers", 5)  # every attempt of the first resume gets a 503
        job = cluster.slurm.sbatch(_job(homes / "job.sh", 'echo "ran on $SLURMD_NODENAME"\n'), output=homes / "out.txt")

        requeued = wait_until(lambda: (j := cluster.slurm.job(job)) and j.restarts >= 1 and j, timeout=60,
                              what="the job requeued")
        assert requeued.state in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETED")
        log = (directory / "power.log").read_text()
        assert "resume of fr-1 failed: 503" in log and f"requeued job(s) {job}" in log
        ctld_log = directory / "log" / "slurmctld.log"
        # slurmctld may write these lines a moment after the requeue is visible through scontrol
        wait_until(lambda: "node fr-1 reason set to: slipstream resume failed" in (text := ctld_log.read_text())
                   and "powering down node fr-1" in text, timeout=30, what="slurmctld logging the power-down")
        assert cluster.slurm.nodes()["fr-1"].flags & {"POWER_DOWN", "POWERING_DOWN", "POWERED_DOWN"}

        # the requeued job is scheduled again; this resume (of fr-2) works and the job runs
        done = cluster.wait_for_jobs([job], timeout=90)
        assert done[0].state == "COMPLETED" and done[0].restarts >= 1
        assert (homes / "out.txt").read_text().strip() == "ran on fr-2"
        assert "fr-1" not in {s.name for s in local_cloud.list_servers(run_id=run.run_id)}


def test_the_sweep_deletes_orphan_vms_and_powers_down_nodes_without_one(local_cloud, homes):
    with elastic_cluster(local_cloud, homes, "sw", max_nodes=3, suspend_time=300) as (cluster, run):
        cluster.slurm.update_node(["sw-1"], State="POWER_UP")  # Slurm calls resume for sw-1
        # one snapshot, and up means slurmd registered: 22.05 can drop POWERING_UP before that
        wait_until(lambda: (n := cluster.slurm.nodes()["sw-1"]).state == "IDLE" and n.address != "127.0.0.1"
                   and not n.flags & {"POWER_UP", "POWERING_UP", "POWERED_DOWN", "NOT_RESPONDING"},
                   timeout=40, what="sw-1 up")
        # an orphan: a VM of the cluster for a node Slurm holds powered down (a suspend that failed)
        Lease(local_cloud, run).create_servers(ServerSpec("sw-2", "m3.tiny", "slipstream-noop"))
        # and a node that claims to be up but whose VM is gone
        sw1 = next(s for s in local_cloud.list_servers(run_id=run.run_id) if s.name == "sw-1")
        local_cloud.delete_server(sw1.id)

        power = SlurmPower(cluster.settings, local_cloud)
        report = power.sweep()
        assert dict(report.actions) == {"sw-1": "power the node down and requeue its jobs",
                                        "sw-2": "delete the VM (it is charging for nothing)"}
        assert {s.name for s in local_cloud.list_servers(run_id=run.run_id)} == {"sw-head"}
        wait_until(lambda: cluster.slurm.nodes()["sw-1"].flags & {"POWERING_DOWN", "POWERED_DOWN"}, timeout=30,
                   what="sw-1 powering down")
        assert power.sweep().actions == []  # nothing left to fix


@pytest.fixture
def flow_env(prefect_harness, local_cloud, homes, monkeypatch):
    monkeypatch.setenv("SLIPSTREAM_LOCAL_HOME", str(local_cloud.home))
    return local_cloud


def test_the_flow_runs_batch_scripts_and_tears_the_whole_cluster_down(flow_env, homes):
    from slipstream.flows.slurm_cluster import slurm_cluster

    first = _job(homes / "count.sh", "echo $((1 + 2 + 3 + 4 + 5))\n")
    second = _job(homes / "greet.sh", 'echo "greetings from $SLURMD_NODENAME"\n')
    result = slurm_cluster(scripts=[str(first), str(second)], name="fl", max_nodes=2, suspend_time=300,
                           resume_timeout=60, results_dir=str(homes / "results"), max_hours=0.05)
    assert [(j.script, j.state) for j in result.jobs] == [(str(first), "COMPLETED"), (str(second), "COMPLETED")]
    outputs = [Path(j.output).read_text().strip() for j in result.jobs]
    assert outputs[0] == "15" and outputs[1].startswith("greetings from fl-")
    servers = {m.name for m in result.metered}
    assert "fl-head" in servers and servers & {"fl-1", "fl-2"}
    assert all(m.su > 0 for m in result.metered) and 0 < result.su_spent < result.su_estimated
    assert result.teardown_clean and flow_env.list_servers() == []
    wait_until(lambda: not [c for c in daemons_of(Path("/tmp")) if "slurm-fl-" in c], timeout=15,
               what="every daemon of the flow's cluster ended")


def test_the_budget_watchdog_tears_a_cluster_down_when_its_budget_is_spent(flow_env, homes):
    from slipstream.flows.slurm_cluster import slurm_cluster

    from slipstream.cloud.errors import BudgetExceeded

    endless = _job(homes / "endless.sh", "sleep 600\n")
    # The head node alone (m3.tiny, 1 SU/h) spends 0.003 SU in under 11 s, long before the job ends.
    with pytest.raises(BudgetExceeded, match="run budget spent: .* of 0.0030 SU; the run was torn down") as err, \
            captured_logs() as messages:
        slurm_cluster(scripts=[str(endless)], name="bw", max_nodes=1, resume_timeout=60, max_hours=0.05,
                      budget_su=0.003, override_budget=True, budget_check_seconds=0.5,
                      results_dir=str(homes / "results"))
    run_id = err.value.resource.removeprefix("run ")
    assert flow_env.list_servers(run_id=run_id) == [] and flow_env.list_servers() == []
    assert all(h.deleted_at is not None for h in flow_env.server_history(run_id))
    # Once the budget is spent the flow stops waiting at once: it does not keep asking the deleted
    # head node's slurmctld for minutes (it did, for 2), nor try to cancel jobs through it.
    spent = next(i for i, m in enumerate(messages) if "has spent its budget:" in m)  # the watchdog's own line
    after = messages[spent:] + prefect_logs(run_id)
    assert not [m for m in after if "slurmctld did not answer" in m or "could not cancel" in m], after
    wait_until(lambda: not [c for c in daemons_of(Path("/tmp")) if "slurm-bw-" in c], timeout=15,
               what="every daemon of the cluster ended")


def test_the_flow_refuses_missing_scripts_before_creating_anything(flow_env, homes):
    from slipstream.flows.slurm_cluster import slurm_cluster

    from slipstream.cloud.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="batch scripts not found: .*nope.sh"):
        slurm_cluster(scripts=[str(homes / "nope.sh")])
    assert flow_env.list_servers() == []
