"""Elastic Slurm under the conditions that broke it (issue 17), with real Debian Slurm daemons:
jobs ending long apart (MinJobAge compressed to 2 s), job text posing as Slurm fields, a quota
that fits part of a resume, a node whose slurmd never registers, GPUs as Gres.

Every cluster is proven gone afterwards (``elastic_cluster``: no VM of its run, no daemon)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from slipstream.cloud.local import LocalCloud
from slipstream.slurm.cluster import NodesGaveUp
from tests.integration.test_slurm_cluster import _job, elastic_cluster, homes  # noqa: F401 (fixture)
from tests.support import wait_until

pytestmark = pytest.mark.slurm

WAIT_FOR_RELEASE = """i=0
while [ ! -f {release} ]; do i=$((i + 1)); [ "$i" -gt 1500 ] && exit 9; sleep 0.1; done
"""


def test_a_job_slurmctld_forgot_long_ago_still_counts_as_ended_and_job_text_cannot_pose_as_its_state(
        local_cloud, homes):  # noqa: F811
    """Job A ends; slurmctld purges it (MinJobAge=2 s, no accounting) long before B ends — the
    6-minutes-apart case of a real cluster, compressed. B's comment says JobState=COMPLETED."""
    release = homes / "release"
    with elastic_cluster(local_cloud, homes, "ma", max_nodes=2, suspend_time=300, min_job_age=2) as (cluster, _):
        first = cluster.slurm.sbatch(_job(homes / "a.sh", "echo a\n"), output=homes / "a.out")
        second = cluster.slurm.run(
            "sbatch", "--parsable", "--comment=x JobState=COMPLETED ExitCode=0:0", f"--output={homes / 'b.out'}",
            str(_job(homes / "b.sh", WAIT_FOR_RELEASE.format(release=release) + "echo b\n"))).strip()
        seen_b: set[str] = set()

        def progress(jobs):
            seen_b.add(next(j.state for j in jobs if j.job_id == second))
            # let B end only once slurmctld has forgotten A (it purges finished jobs every ~60 s)
            if cluster.slurm.job(first) is None and any(j.job_id == first and j.state == "COMPLETED" for j in jobs):
                release.touch()

        done = cluster.wait_for_jobs([first, second], timeout=240, on_progress=progress, poll=0.5)
        assert [(j.job_id, j.state) for j in done] == [(first, "COMPLETED"), (second, "COMPLETED")]
        assert release.exists(), "job B ended before slurmctld forgot job A: the test proved nothing"
        assert "RUNNING" in seen_b and (homes / "b.out").read_text().strip() == "b"


def test_a_node_reason_cannot_overwrite_its_address(local_cloud, homes):  # noqa: F811
    with elastic_cluster(local_cloud, homes, "nr", max_nodes=1, suspend_time=300) as (cluster, _):
        cluster.slurm.update_node(["nr-1"], State="DRAIN", Reason="x NodeAddr=10.9.9.9 Comment=instance=evil")
        node = cluster.slurm.nodes()["nr-1"]
        assert node.reason.startswith("x NodeAddr=10.9.9.9")
        assert node.address == "127.0.0.1" and node.instance_id is None and "DRAIN" in node.flags


def test_a_resume_the_quota_only_partly_fits_creates_what_fits_and_leaves_the_rest_to_slurm(local_cloud, homes):  # noqa: F811
    directory = homes / "cluster"
    # head + 2 workers: the instance quota fits 2 of the 3 nodes Slurm resumes in one call
    LocalCloud(options=replace(local_cloud.options, quotas=replace(local_cloud.options.quotas, instances=3)))
    with elastic_cluster(local_cloud, homes, "qt", max_nodes=3, suspend_time=300) as (cluster, run):
        cluster.slurm.update_node(["qt-1", "qt-2", "qt-3"], State="POWER_UP")
        power_log = directory / "power.log"
        log = wait_until(lambda: power_log.exists() and "resumed " in (t := power_log.read_text()) and t,
                         timeout=60, what="the resume program ended")
        up = wait_until(lambda: len(n := [name for name, i in cluster.slurm.nodes().items() if i.state == "IDLE"
                                          and not i.flags & {"POWERING_UP", "POWERED_DOWN", "POWERING_DOWN", "POWER_DOWN"}]) >= 2
                        and sorted(n), timeout=60, what="the nodes that fit up")
        assert len(up) == 2 and "a batch of 3 VM(s) is over the quota" in log and "the quota blocks" in log, log
        assert sorted(s.name for s in local_cloud.list_servers(run_id=run.run_id)) == sorted(["qt-head", *up])
        (blocked,) = {"qt-1", "qt-2", "qt-3"} - set(up)
        node = wait_until(lambda: (n := cluster.slurm.nodes()[blocked]).flags & {"POWERING_DOWN", "POWERED_DOWN"} and n,
                          timeout=30, what="the blocked node powered down")
        assert "the cloud's quota blocks this node: Quota exceeded for instances" in node.reason
        # jobs still run: on the nodes that fit
        jobs = [cluster.slurm.sbatch(_job(homes / f"j{i}.sh", "echo ok\n"), output=homes / f"j{i}.out") for i in range(3)]
        assert all(j.state == "COMPLETED" for j in cluster.wait_for_jobs(jobs, timeout=120))


def test_a_node_whose_slurmd_never_registers_is_retried_with_back_off_then_given_up(local_cloud, homes):  # noqa: F811
    directory = homes / "cluster"
    with elastic_cluster(local_cloud, homes, "nv", max_nodes=1, suspend_time=300, resume_timeout=5,
                         max_resume_attempts=2, resume_backoff=1, requeue_delay=5) as (cluster, run):
        (directory / "spool" / "nv-1").write_text("")  # the worker cannot make its spool dir: slurmd never starts
        job = cluster.slurm.sbatch(_job(homes / "job.sh", "echo never\n"), output=homes / "out.txt")
        with pytest.raises(NodesGaveUp, match="nv-1: slipstream gave up after 2 failed resume"):
            cluster.wait_for_jobs([job], timeout=240)
        boots = [h for h in local_cloud.server_history(run.run_id) if h.name == "nv-1"]
        assert len(boots) == 2 and all(h.deleted_at for h in boots)  # two VMs, then no more
        assert "DRAIN" in cluster.slurm.nodes()["nv-1"].flags
        log = (directory / "power.log").read_text()
        assert "backing off until" in log and "nv-1 drained" in log


def test_a_gpu_flavour_node_runs_a_job_that_asks_for_a_gpu(local_cloud, homes):  # noqa: F811
    with elastic_cluster(local_cloud, homes, "gp", max_nodes=1, suspend_time=300, flavor="g3.small") as (cluster, _):
        job = cluster.slurm.run("sbatch", "--parsable", "--gres=gpu:1", f"--output={homes / 'gpu.out'}",
                                str(_job(homes / "gpu.sh", 'echo "gpus: $SLURM_GPUS_ON_NODE"\n'))).strip()
        (done,) = cluster.wait_for_jobs([job], timeout=90)
        assert done.state == "COMPLETED"
        assert (homes / "gpu.out").read_text().strip() == "gpus: 1"


def test_the_wait_survives_a_slurmctld_that_stops_answering_for_a_while(local_cloud, homes, caplog):  # noqa: F811
    import os
    import signal
    import threading

    directory = homes / "cluster"
    with elastic_cluster(local_cloud, homes, "st", max_nodes=1, suspend_time=300) as (cluster, _):
        job = cluster.slurm.sbatch(_job(homes / "job.sh", "echo ok\n"), output=homes / "out.txt")
        (ctld,) = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p).startswith(
            "slurmctld -D -f " + str(directory))]
        os.kill(ctld, signal.SIGSTOP)  # squeue now times out (MessageTimeout=10 s) instead of answering
        resume = threading.Timer(25, os.kill, (ctld, signal.SIGCONT))
        resume.start()
        try:
            with caplog.at_level("WARNING", logger="slipstream.slurm.cluster"):
                (done,) = cluster.wait_for_jobs([job], timeout=150, poll=0.5)
        finally:
            resume.cancel()
            os.kill(ctld, signal.SIGCONT)
        assert done.state == "COMPLETED"
        assert "slurmctld did not answer" in caplog.text


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
