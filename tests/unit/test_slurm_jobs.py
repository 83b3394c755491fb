"""A batch of Slurm jobs without daemons: end states kept once seen, vanished jobs, labels that never
collide, outputs brought back with their relative paths, node progress lines, resume back-off."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from slipstream.cloud.errors import InvalidRequest
from slipstream.slurm.attempts import GAVE_UP, ResumeAttempts
from slipstream.slurm.commands import JobInfo, NodeInfo
from slipstream.slurm.jobs import (VANISHED, BatchJob, JobTracker, check_outputs, collect_outputs, describe_end,
                                   job_labels)
from slipstream.slurm.watch import NodeWatch


def test_an_end_state_seen_once_is_kept_after_slurmctld_forgets_the_job():
    tracker = JobTracker(["1", "2"])
    assert tracker.observe([JobInfo("1", "RUNNING"), JobInfo("2", "PENDING")]) == []
    ended = tracker.observe([JobInfo("1", "COMPLETED", exit_code=0), JobInfo("2", "RUNNING")])
    assert [j.job_id for j in ended] == ["1"]
    # MinJobAge later job 1 is gone from squeue: it stays COMPLETED, the wait goes on for job 2
    assert tracker.observe([JobInfo("2", "RUNNING")]) == [] and not tracker.done
    assert tracker.jobs[0].state == "COMPLETED"
    tracker.observe([JobInfo("2", "FAILED", exit_code=4)])
    assert tracker.done and [j.state for j in tracker.jobs] == ["COMPLETED", "FAILED"]


def test_a_job_that_vanished_before_its_end_was_seen_has_ended_in_an_unknown_state():
    tracker = JobTracker(["5"])
    tracker.observe([JobInfo("5", "RUNNING", nodes="c-1")])
    (gone,) = tracker.observe([])
    assert tracker.done and gone.state == VANISHED and gone.nodes == "c-1"
    assert "MinJobAge" in describe_end(gone)


def test_scripts_with_the_same_name_get_labels_of_their_own():
    assert job_labels([Path("a/run.sh"), Path("b/run.sh"), Path("x.sh")]) == ["run-1", "run-2", "x"]
    tricky = job_labels([Path("a/run.sh"), Path("b/run.sh"), Path("run-1.sh"), Path("c/run-1.sh")])
    assert len(set(tricky)) == 4 and tricky[:2] == ["run-1-1", "run-2"]


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "a/../../x", "", "."])
def test_outputs_outside_the_job_directory_are_refused(bad):
    with pytest.raises(InvalidRequest, match="is not inside the job's directory"):
        check_outputs([bad])


def test_outputs_that_exist_come_back_with_their_paths_and_the_missing_are_named(tmp_path):
    work = tmp_path / "job"
    (work / "a").mkdir(parents=True)
    (work / "b").mkdir()
    (work / "a" / "x.txt").write_text("A")
    (work / "b" / "x.txt").write_text("B")
    (work / "run.out").write_text("log")
    (work / "leak").symlink_to("/etc/hostname")
    job = BatchJob("3", Path("run.sh"), "run", work)
    copied, missing = collect_outputs(job, check_outputs(["a/x.txt", "b/x.txt", "out/plot.png", "leak"]),
                                      tmp_path / "results")
    assert (tmp_path / "results" / "a" / "x.txt").read_text() == "A"
    assert (tmp_path / "results" / "b" / "x.txt").read_text() == "B"
    assert (tmp_path / "results" / "run.out").read_text() == "log" and len(copied) == 3
    assert missing == ["out/plot.png", "leak (points outside the job's directory)"]


def test_node_boots_are_reported_while_they_happen(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("slipstream.slurm.watch.time.monotonic", lambda: clock[0])
    watch = NodeWatch(["c-1"], every=10)
    down = NodeInfo("c-1", "IDLE", frozenset({"CLOUD", "POWERED_DOWN"}))
    assert watch.see({"c-1": down}) == []
    assert watch.see({"c-1": NodeInfo("c-1", "IDLE", frozenset({"CLOUD", "POWERING_UP"}))})[0][1].endswith(
        "powering up (creating its VM, then slurmd registers)")
    clock[0] = 111.0
    assert watch.see({"c-1": NodeInfo("c-1", "IDLE", frozenset({"CLOUD", "POWERING_UP"}))}) == [
        (logging.INFO, "node c-1: still booting (11 s)")]
    # seen on 22.05: POWERING_UP can go before slurmd registers; the node is not up yet
    assert watch.see({"c-1": NodeInfo("c-1", "ALLOCATED", frozenset({"CLOUD", "NOT_RESPONDING"}),
                                      address="127.0.0.1")}) == []
    clock[0] = 115.0
    # seen on CI: every flag gone while the node still has its parked address and no VM recorded
    assert watch.see({"c-1": NodeInfo("c-1", "ALLOCATED", frozenset({"CLOUD"}), address="127.0.0.1")}) == []
    assert watch.see({"c-1": NodeInfo("c-1", "ALLOCATED", frozenset({"CLOUD"}), address="127.64.0.9",
                                      comment="instance=vm-1")}) == [
        (logging.INFO, "node c-1: up at 127.64.0.9 after 15 s")]
    quota = NodeInfo("c-1", "IDLE", frozenset({"CLOUD", "POWERING_DOWN"}), reason="slipstream: the cloud's quota …")
    assert (logging.WARNING, "node c-1: slipstream: the cloud's quota …") in watch.see({"c-1": quota})


def test_failed_resumes_back_off_and_end_in_giving_the_node_up(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("slipstream.slurm.attempts.time.time", lambda: clock[0])
    record = ResumeAttempts(tmp_path / "resume-failures.json", max_attempts=3, backoff=10)
    assert record.holding(["c-1"], 60) == {}
    record.failed("c-1", "slurmd did not register")
    assert "backing off until" in record.holding(["c-1", "c-2"], 60)["c-1"]
    clock[0] += 11
    assert record.holding(["c-1"], 60) == {}  # the back-off of the first failure is over
    record.failed("c-1", "slurmd did not register")
    clock[0] += 11
    assert "c-1" in record.holding(["c-1"], 60)  # the second failure doubles it: 20 s
    clock[0] += 10
    assert record.holding(["c-1"], 60) == {}
    third = record.failed("c-1", "slurmd did not register")
    clock[0] += 10_000
    held = record.holding(["c-1"], 60)["c-1"]
    assert held.startswith(GAVE_UP) and "3 failed resume(s) of c-1" in held and record.given_up(third)


def test_an_output_directory_brings_back_its_files_but_not_what_its_links_point_to(tmp_path):
    # A hostile (or merely tidy) job: a link to a file of the flow's user, and a dangling link.
    secret = tmp_path / "secret"
    secret.write_text("not the job's")
    work = tmp_path / "jobs" / "run"
    (work / "out" / "sub").mkdir(parents=True)
    (work / "out" / "sub" / "result.txt").write_text("R")
    (work / "out" / "stolen").symlink_to(secret)
    (work / "out" / "latest").symlink_to(work / "out" / "gone-run")
    (work / "out" / "inside").symlink_to(work / "out" / "sub" / "result.txt")
    (work / "run.out").write_text("log")
    copied, missing = collect_outputs(BatchJob("4", Path("run.sh"), "run", work), ["out"], tmp_path / "results")
    out = tmp_path / "results" / "out"
    assert (out / "sub" / "result.txt").read_text() == "R" and (out / "inside").read_text() == "R"
    assert not (out / "stolen").exists() and not (out / "stolen").is_symlink()
    assert not (out / "latest").is_symlink()
    assert sorted(missing) == ["out/latest (points nowhere)", "out/stolen (points outside the job's directory)"]
    assert out in copied


def test_the_tail_of_a_huge_output_is_read_without_reading_the_whole_file(tmp_path):
    # a job that printed 2 GB: the failure message needs its last lines, not 2 GB of memory
    import resource
    import subprocess
    import sys
    huge = tmp_path / "run.out"
    with open(huge, "wb") as f:
        f.truncate(2 * 1024**3)
        f.seek(0, 2)
        f.write(b"".join(f"line {i}\n".encode() for i in range(30)))
    limit = 600 * 1024**2  # the interpreter needs ~100 MB; reading the file needs > 2 GB
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from slipstream.slurm.jobs import tail; "
                               "print(tail(Path(sys.argv[1]), 3))", str(huge)],
        capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert result.returncode == 0, result.stderr[-500:]
    assert result.stdout.splitlines() == ["line 27", "line 28", "line 29"]


@pytest.mark.parametrize("content", ["[]", "null", '{"c-1": 3}', '{"c-1": {"count": 1}}', "{\"c-1\": {\"cou"])
def test_a_damaged_resume_failures_file_never_blocks_a_resume_or_its_failure_count(tmp_path, content):
    # every resume and every resume-fail reads it: one that raises leaves the nodes with no VM and no back-off
    (tmp_path / "resume-failures.json").write_text(content)
    record = ResumeAttempts(tmp_path / "resume-failures.json", max_attempts=3, backoff=10)
    assert record.holding(["c-1", "c-2"], 60) == {}
    assert record.failed("c-1", "slurmd did not register").count == 1
    assert "backing off until" in record.holding(["c-1"], 60)["c-1"]


def test_a_node_that_booted_between_two_looks_is_still_reported_powering_up():
    # the local cloud boots in 0.2 s and 22.05 drops POWERING_UP early: one poll may see down, the next up
    watch = NodeWatch(["c-1"], every=10)
    assert watch.see({"c-1": NodeInfo("c-1", "IDLE", frozenset({"CLOUD", "POWERED_DOWN"}))}) == []
    lines = [line for _, line in watch.see({"c-1": NodeInfo("c-1", "ALLOCATED", frozenset({"CLOUD"}),
                                                            address="127.64.0.9", comment="instance=vm-1")})]
    assert lines == ["node c-1: powering up (creating its VM, then slurmd registers)", "node c-1: up at 127.64.0.9"]
