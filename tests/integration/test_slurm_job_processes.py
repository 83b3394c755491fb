"""A job's processes live and die with its node's VM, even when nobody cancels the job first (a
budget teardown, a user's own Lease): slurmstepd leaves slurmd's process group and tree, but
keeps slurmd's environment (the VM's marker), and the job's processes are its descendants.

A daemon that double-forks AND clears its environment leaves both; the local cloud's guest as a
child subreaper (branch ``ownership``) keeps it among the VM's processes."""

from __future__ import annotations

import uuid

import pytest

from tests.integration.test_slurm_cluster import _job, elastic_cluster, homes, processes_naming  # noqa: F401
from tests.support import wait_until

pytestmark = pytest.mark.slurm


def test_a_running_job_and_the_daemon_it_forked_end_with_its_nodes_vm(local_cloud, homes):  # noqa: F811
    mark = f"jobmark-{uuid.uuid4().hex[:8]}"
    sleeper = "python3 -c 'import time; time.sleep(600)'"  # a process whose command line carries the mark
    script = _job(homes / "job.sh", f"setsid env -i {sleeper} {mark}-daemon </dev/null >/dev/null 2>&1 &\n"
                                    f"exec {sleeper} {mark}-job\n")
    with elastic_cluster(local_cloud, homes, "jp", max_nodes=1, suspend_time=300) as (cluster, run):
        job = cluster.slurm.sbatch(script, output=homes / "out.txt")
        wait_until(lambda: processes_naming(f"{mark}-job") and processes_naming(f"{mark}-daemon"), timeout=90,
                   what="the job and its daemon running")
        node = next(s for s in local_cloud.list_servers(run_id=run.run_id) if s.name == "jp-1")
        local_cloud.delete_server(node.id)  # what a budget teardown does: no scancel first
        wait_until(lambda: not processes_naming(mark), timeout=30,
                   what=f"job {job}'s processes ended with the VM of jp-1")


@pytest.mark.parametrize("name", ["100%j done.sh", "a\nb $(id).sh"])
def test_a_script_whose_name_has_slurm_filename_patterns_still_gets_its_output_back(local_cloud, homes, name):  # noqa: F811
    # sbatch expands %j, %x, %N ... in --output: run%j.sh's output went to run<id>/, no such directory
    from slipstream.slurm.jobs import collect_outputs, submit_batch

    (homes / "s").mkdir()
    script = _job(homes / "s" / name, 'echo "it ran"\n')
    with elastic_cluster(local_cloud, homes, "pc", max_nodes=1, suspend_time=300) as (cluster, run):
        (job,) = submit_batch(cluster.slurm, [script], homes / "jobs")
        (end,) = cluster.wait_for_jobs([job.job_id], timeout=120)
        copied, missing = collect_outputs(job, [], homes / "results")
        assert end.state == "COMPLETED" and missing == []
        assert (homes / "results" / f"{script.stem}.out").read_text() == "it ran\n"
