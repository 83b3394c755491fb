"""A researcher's results survive whatever the job does, and the job can be watched while it runs.

vm_job under Prefect's test harness on the embedded local cloud: a missing output, colliding
output names, a failing job, a timeout, a script whose name needs quoting, and output streamed
into the run's logs (with the "running for ..., ... SU so far" line) while the job still runs.
"""

from __future__ import annotations

import re
import threading

import pytest

from slipstream.cost.accounting import meter_servers
from slipstream.ownership.ledger import Ledger
from slipstream.vmjob import JobFailed
from support import prefect_logs, wait_until

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_every_existing_output_comes_back_under_its_path_and_the_missing_one_is_named(cloud_env, tmp_path, monkeypatch):
    from slipstream.flows.vm_job import vm_job

    monkeypatch.chdir(tmp_path)  # the default results directory is relative to where you run
    result = vm_job(flavor="m3.tiny", command=(
        "mkdir -p a b out && echo from-a > a/x.txt && echo from-b > b/x.txt && echo '{}' > out/summary.json"
        " && echo all done && echo a warning >&2"),
        outputs=["out/summary.json", "out/plot.png", "a/x.txt", "b/x.txt"])

    results = tmp_path / "results" / result.run_id  # results/<run id>/, not a shared results/
    assert result.results_dir == str(results.relative_to(tmp_path))
    assert (results / "a" / "x.txt").read_text() == "from-a\n" and (results / "b" / "x.txt").read_text() == "from-b\n"
    assert (results / "out" / "summary.json").read_text() == "{}\n"
    assert sorted(result.outputs) == sorted(f"{result.results_dir}/{p}" for p in ("out/summary.json", "a/x.txt", "b/x.txt"))
    assert result.missing_outputs == ["out/plot.png"]
    # The job's full stdout and stderr are kept beside its outputs.
    assert (results / "stdout.txt").read_text() == "all done\n"
    assert (results / "stderr.txt").read_text() == "a warning\n"
    logs = prefect_logs(result.run_id)
    assert any("not on the VM (nothing to download): out/plot.png" in m for m in logs), logs
    assert not any("No such file" in m for m in logs)  # named once, never retried
    assert cloud_env.list_servers() == []


def test_a_failing_job_still_brings_back_what_it_wrote_and_says_where(cloud_env, tmp_path):
    from slipstream.flows.vm_job import vm_job

    script = tmp_path / "my job's run.sh"  # a name that needs quoting in the remote command
    script.write_text("echo step 1 > log.txt\necho 'cannot go on' >&2\nexit 2\n")
    with pytest.raises(JobFailed) as err:
        vm_job(flavor="m3.tiny", script=str(script), outputs=["log.txt"], results_dir=str(tmp_path / "res"))
    message = str(err.value)
    assert "exited with status 2" in message and "cannot go on" in message
    assert str(tmp_path / "res") in message and "1 file(s)" in message
    assert (tmp_path / "res" / "log.txt").read_text() == "step 1\n"
    assert (tmp_path / "res" / "stderr.txt").read_text() == "cannot go on\n"
    assert cloud_env.list_servers() == [] and cloud_env.list_keypairs() == []


def test_a_timeout_names_max_hours_keeps_the_output_and_stays_under_the_worst_case(cloud_env, tmp_path):
    from slipstream.flows.vm_job import vm_job

    state = vm_job(flavor="m3.tiny", max_hours=4 / 3600, results_dir=str(tmp_path / "res"), outputs=["partial.txt"],
                   command="echo half way > partial.txt; echo started; sleep 600", return_state=True)
    assert state.is_failed()
    with pytest.raises(JobFailed) as err:
        state.result()
    message = str(err.value)
    assert "did not finish within max_hours=0.00111111 (4.0 s)" in message and "Raise max_hours" in message
    assert "ran for 4." in message and "0.0 h" not in message
    assert (tmp_path / "res" / "partial.txt").read_text() == "half way\n"
    assert (tmp_path / "res" / "stdout.txt").read_text() == "started\n"  # printed before the timeout
    # What the run was charged stays under the worst case it planned (boot and SSH included).
    (history,) = cloud_env.server_history()
    spent = sum(m.su for m in meter_servers(cloud_env, [(history.id, history.name, history.flavor)]))
    worst = Ledger().worst_case(history.run_id)
    assert 0 < spent < worst


def test_output_is_streamed_into_the_logs_while_the_job_runs(cloud_env, tmp_path, monkeypatch):
    from slipstream.flows.vm_job import vm_job

    monkeypatch.setenv("SLIPSTREAM_PROGRESS_SECONDS", "0.5")
    release = tmp_path / "release"  # the local cloud's VM is a process on this machine: it sees this path
    command = (f"echo FIRST-LINE; echo on-stderr >&2; for i in $(seq 1 1200); do [ -e {release} ] && break; "
               "sleep 0.1; done; echo LAST-LINE")
    done: dict = {}
    runner = threading.Thread(target=lambda: done.setdefault("result", vm_job(
        flavor="m3.tiny", command=command, results_dir=str(tmp_path / "res"))))
    runner.start()
    try:
        def seen() -> list[str]:
            logs = prefect_logs(send_queued=False)  # lines must arrive while the job runs
            progress = [m for m in logs if re.fullmatch(r"running for \d+\.\d s, \d+\.\d{4} SU so far", m)]
            return logs if progress and "| FIRST-LINE" in logs else []

        logs = wait_until(seen, timeout=120, what="the first line and a progress line in the run's logs")
        assert runner.is_alive() and "| LAST-LINE" not in logs
        assert "! on-stderr" in logs
    finally:
        release.touch()
        runner.join(timeout=120)
    assert done["result"].exit_status == 0 and "LAST-LINE" in done["result"].stdout_tail
    assert (tmp_path / "res" / "stdout.txt").read_text() == "FIRST-LINE\nLAST-LINE\n"
