"""The slurm_cluster flow as a researcher meets it (issues 15 and 17): every job's outputs come back
under its own directory, a failed job fails the run with its exit code and output, an impossible
job fails at once with Slurm's reason, node boots are reported while they happen, and the cluster's
logs outlive a failed run. Real Prefect harness, real Debian Slurm daemons."""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

import pytest

from slipstream.slurm.jobs import JobCannotRun, JobsFailed
from tests.integration.test_slurm_cluster import daemons_of, flow_env, homes  # noqa: F401 (fixtures)
from tests.support import prefect_logs, wait_until

pytestmark = pytest.mark.slurm


def _script(path: Path, body: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    return str(path)


def _artifact(run_id: str, key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)])))


def _no_daemons_left(name: str) -> None:
    wait_until(lambda: not [c for c in daemons_of(Path("/tmp")) if f"slurm-{name}-" in c], timeout=15,
               what="every daemon of the flow's cluster ended")


def test_each_jobs_outputs_come_back_and_a_failed_job_fails_the_run_with_its_exit_code(flow_env, homes):  # noqa: F811
    from slipstream.flows.slurm_cluster import slurm_cluster

    writes = 'mkdir -p out && echo "{x}" > out/summary.json\n'
    good = _script(homes / "a" / "run.sh", writes.format(x="A") + "echo done A\n")
    bad = _script(homes / "b" / "run.sh", writes.format(x="B") + 'echo "bad input line 7" >&2\nexit 4\n')
    results = homes / "results"
    with pytest.raises(JobsFailed, match=r"job \d+ run.sh ended FAILED with exit code 4; last lines of its output") as err:
        slurm_cluster(scripts=[good, bad], name="fo", max_nodes=2, resume_timeout=60, max_hours=0.05,
                      outputs=["out/summary.json", "out/plot.png"], results_dir=str(results))
    assert "bad input line 7" in str(err.value)
    run_id = err.value.resource.removeprefix("run ")
    run_dir = results / run_id
    # same script name, two jobs: each its own directory, relative paths kept, the missing one named
    assert (run_dir / "run-1" / "out" / "summary.json").read_text().strip() == "A"
    assert (run_dir / "run-2" / "out" / "summary.json").read_text().strip() == "B"
    assert (run_dir / "run-1" / "run.out").read_text().strip() == "done A"
    # the warning was logged (see the captured output); under load it can reach the API seconds late
    logs = wait_until(lambda: (m := prefect_logs(run_id)) and any("did not leave out/plot.png" in x for x in m) and m,
                      timeout=60, what="the missing output's warning in the run's Prefect logs")
    assert any(m.startswith("node fo-") and "powering up" in m for m in logs)   # boots are reported …
    assert any(m.startswith("node fo-") and " up at 127.64." in m for m in logs)  # … while they happen
    # the failed run keeps the cluster's logs, on disk and as an artifact
    kept = run_dir / "cluster-logs"
    assert " VM(s) in one batch for fo-" in (kept / "power.log").read_text()
    assert (kept / "slurmctld.log").stat().st_size
    assert list(kept.glob("slurmd-fo-*.log"))
    (artifact,) = _artifact(run_id, "slurm-cluster-logs")
    assert "### slurmctld.log" in artifact.data and "### power.log" in artifact.data
    assert flow_env.list_servers() == []
    _no_daemons_left("fo")


def test_with_fail_on_job_failure_false_the_run_returns_the_failed_state(flow_env, homes):  # noqa: F811
    from slipstream.flows.slurm_cluster import slurm_cluster

    result = slurm_cluster(scripts=[_script(homes / "fails.sh", "echo partial > log.txt\nexit 3\n")], name="ff",
                           max_nodes=1, resume_timeout=60, max_hours=0.05, outputs=["log.txt", "model.pt"],
                           fail_on_job_failure=False, results_dir=str(homes / "results"))
    (job,) = result.jobs
    assert (job.state, job.exit_code, job.missing_outputs) == ("FAILED", 3, ["model.pt"])
    assert (Path(result.results_dir) / "fails" / "log.txt").read_text().strip() == "partial"
    assert result.teardown_clean and flow_env.list_servers() == []
    _no_daemons_left("ff")


def test_a_job_no_node_can_ever_run_fails_the_run_at_once_with_slurms_reason(flow_env, homes):  # noqa: F811
    from slipstream.flows.slurm_cluster import slurm_cluster

    huge = _script(homes / "huge.sh", "#SBATCH --cpus-per-task=64\necho never\n")
    started = time.monotonic()
    with pytest.raises(JobCannotRun, match=r"job \d+ \(huge\) can never start: Slurm says PartitionConfig") as err:
        slurm_cluster(scripts=[huge], name="im", max_nodes=2, resume_timeout=60, max_hours=1.0,
                      results_dir=str(homes / "results"))
    assert time.monotonic() - started < 120  # not the 1 h deadline
    assert "m3.tiny (1 CPU(s), 3072 MB)" in err.value.hint
    assert flow_env.list_servers() == []
    _no_daemons_left("im")


def test_at_the_deadline_running_jobs_are_cancelled_and_what_they_wrote_comes_back(flow_env, homes):  # noqa: F811
    from slipstream.cloud.errors import WaitTimeout
    from slipstream.flows.slurm_cluster import slurm_cluster

    endless = _script(homes / "endless.sh", "echo started > progress.txt\necho first line\n"
                                            "while true; do sleep 1; done\n")
    quick = _script(homes / "quick.sh", "echo done > progress.txt\n")
    with pytest.raises(WaitTimeout, match="jobs still running after 72 s") as err:
        slurm_cluster(scripts=[endless, quick], name="dl", max_nodes=2, resume_timeout=60, max_hours=0.02,
                      outputs=["progress.txt"], results_dir=str(homes / "results"))
    (run_dir,) = (homes / "results").iterdir()
    assert (run_dir / "quick" / "progress.txt").read_text().strip() == "done"  # brought back as it ended
    assert (run_dir / "endless" / "progress.txt").read_text().strip() == "started"
    assert (run_dir / "endless" / "endless.out").read_text().startswith("first line")
    assert (run_dir / "cluster-logs" / "slurmctld.log").exists()
    assert flow_env.list_servers() == [] and err.value.resource == "dl"
    _no_daemons_left("dl")  # the job's shell too: it was cancelled before its VM was deleted
