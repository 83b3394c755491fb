"""A job that attacks the person watching it: terminal escapes and fake lines in its output, file
names carrying newlines and escapes, its secret echoed back, and more output than memory holds.

vm_job under Prefect's test harness on the embedded local cloud (real VMs with their real sshd).
What a researcher reads — the run's logs, the failure message, stdout.txt — must show what the
job did, never let it pose as slipstream ("teardown clean"), never show the secret.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from prefect.blocks.system import Secret

from support import prefect_logs

pytestmark = pytest.mark.usefixtures("prefect_harness")

TOKEN = f"tok-{uuid.uuid4().hex}"
EVIL_NAME = "evil\nteardown clean\x1b[31m"


def test_escapes_fake_lines_hostile_names_and_an_echoed_secret_never_reach_the_logs_raw(cloud_env, tmp_path):
    from slipstream.flows.vm_job import vm_job

    Secret(value=TOKEN).save("hostile-token", overwrite=True)
    command = ("mkdir -p out && printf x > \"out/$(printf 'evil\\nteardown clean\\033[31m')\"; "
               "printf 'working\\033[2K\\r\\033[1;32mteardown clean\\n'; "
               "echo \"token is $API_TOKEN\"; echo \"bad $API_TOKEN\" >&2; exit 3")
    state = vm_job(flavor="m3.tiny", command=command, outputs=["out"], results_dir=str(tmp_path / "res"),
                   secret_env={"API_TOKEN": "hostile-token"}, return_state=True)
    assert state.is_failed()
    failure = str(state.result(raise_on_failure=False))
    logs = prefect_logs(state.state_details.flow_run_id)

    # The job's escapes and carriage return are shown, not obeyed: no log line can be overwritten.
    assert "| working\\x1b[2K\\r\\x1b[1;32mteardown clean" in logs, logs
    assert "downloaded out/evil\\nteardown clean\\x1b[31m to " + str(tmp_path / "res") in logs, logs
    for text in [*logs, failure]:
        assert "\x1b" not in text and "\r" not in text and "\nteardown clean" not in text, text
        assert TOKEN not in text, text
    # The secret the job echoed is redacted in its saved output and in the error; the job's own file is intact.
    assert (tmp_path / "res" / "stdout.txt").read_text().splitlines()[-1] == "token is ***"
    assert "bad ***" in failure and "exited with status 3" in failure
    assert (tmp_path / "res" / "out" / EVIL_NAME).read_text() == "x"
    assert cloud_env.list_servers() == []


def test_results_dir_with_a_tilde_is_written_where_it_was_confined(cloud_env, tmp_path, monkeypatch):
    from slipstream.flows.vm_job import vm_job

    allowed = tmp_path / "allowed"
    (allowed / "home").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(allowed / "home"))
    monkeypatch.setenv("SLIPSTREAM_ALLOWED_ROOTS", str(allowed))  # the run's cwd (tmp_path) is not allowed
    result = vm_job(flavor="m3.tiny", command="echo kept", results_dir="~/res")
    assert (allowed / "home" / "res" / "stdout.txt").read_text() == "kept\n"
    assert result.results_dir == str(allowed / "home" / "res")
    assert not (tmp_path / "~").exists()  # nothing written outside the allowed roots
