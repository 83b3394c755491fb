"""Secrets never leak: run the flows with a known fake credential secret and a known private key,
then look for them everywhere a researcher (or anyone they share a screen with) could see them.

The runs: a vm_job that succeeds on the local cloud (given a job secret through ``secret_env``), one whose command fails, and one whose cloud
is an OpenStack application credential (saved as a block) pointing at a closed port, so that
signing in fails — that failure's exception text is part of the scan. What is scanned for the
secret and for every line of the run's SSH private key:

- every log record Python saw (caplog, at DEBUG, tracebacks included) and every log line the
  Prefect API stored;
- every artifact, event (``slipstream.*``), flow-run and task-run state message and flow-run
  parameters in the API;
- the exception texts (with tracebacks) of the failed runs;
- the user_data and every other field of what the cloud was asked to create;
- every file slipstream wrote: its home (ledger, report files) and the local cloud's home (the VM's disk);
- for the job secret: the job's outputs and its stdout/stderr files, and its own shell's command line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import traceback
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client

# Imported here, not in the test: Prefect configures logging when first imported, which would
# drop caplog's handler from the root logger.
from slipstream.blocks.openstack import OpenStackCredentials
from slipstream.flows.vm_job import vm_job
from slipstream import ssh
from slipstream.cloud.local.servers import ServerOps
from support import every_page, prefect_log_records, wait_until

FAKE_SECRET = f"fake-app-cred-secret-{uuid.uuid4().hex}"
JOB_SECRET = f"job-token-{uuid.uuid4().hex}"


pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def private_keys(monkeypatch) -> list[str]:
    """The private key text of every keypair the flows generate (OpenSSH format)."""
    made: list[str] = []
    real = ssh.generate_keypair

    def recording(comment: str) -> ssh.SshKeypair:
        keypair = real(comment)
        made.append(keypair.private_key().export_private_key("openssh").decode())
        return keypair

    monkeypatch.setattr(ssh, "generate_keypair", recording)
    return made


@pytest.fixture
def sent_to_cloud(monkeypatch) -> list[str]:
    """Everything the local cloud was asked to create servers with (user_data included)."""
    sent: list[str] = []
    real = ServerOps.create_servers

    def recording(self, spec, owner):
        sent.append(repr(asdict(spec)))
        sent.append(spec.user_data or "")
        return real(self, spec, owner)

    monkeypatch.setattr(ServerOps, "create_servers", recording)
    return sent


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def needles(private_keys: list[str]) -> dict[str, str]:
    """What must never appear: the secret, and each base64 line of each private key."""
    found = {"credential secret": FAKE_SECRET, "job secret": JOB_SECRET}
    for n, text in enumerate(private_keys):
        for line in text.splitlines():
            if len(line) >= 20 and not line.startswith("-----"):
                found[f"private key {n} line {line[:6]}..."] = line
    return found


def api_texts(since: datetime) -> list[tuple[str, str]]:
    """Every log line, artifact, state message and parameter set the Prefect API holds, and the
    slipstream.* events since ``since``."""
    out = []
    with get_client(sync_client=True) as client:
        out += [("API log", f"{log.name}: {log.message}") for log in prefect_log_records()]
        out += [("artifact", f"{a.key} {a.description} {a.data}") for a in every_page(client.read_artifacts)]
        for run in every_page(client.read_flow_runs):
            out.append(("flow run", f"{run.name} {run.parameters} {run.state and run.state.message}"))
        out += [("task run", f"{t.name} {t.state and t.state.message}") for t in every_page(client.read_task_runs)]
        out += [("event", json.dumps(e)) for e in wait_until(lambda: _slipstream_events(client, since), timeout=30,
                                                           what="the runs' slipstream.* events")]
    return out


def _slipstream_events(client, since: datetime) -> list[dict]:
    page = client.request("POST", "/events/filter", json={
        "filter": {"event": {"prefix": ["slipstream."]}, "occurred": {"since": since.isoformat()}}, "limit": 50}).json()
    return page["events"]


def files_under(*roots: Path) -> list[tuple[str, str]]:
    out = []
    for root in roots:
        for path in root.rglob("*") if root.exists() else []:
            if path.is_file() and not path.is_symlink():
                out.append((f"file {path}", path.read_bytes().decode("utf-8", "replace")))
    return out


def test_no_secret_or_private_key_anywhere_a_run_leaves_text(cloud_env, caplog, private_keys, sent_to_cloud, tmp_path):
    caplog.set_level(logging.DEBUG)
    started = datetime.now(UTC)
    failures: list[str] = []

    Secret(value=JOB_SECRET).save("hygiene-job-token", overwrite=True)
    # The job gets the secret as an environment variable, and sees it nowhere else: not on the
    # command line of its own shell (which the VM's process table shows to everyone).
    ok = vm_job(flavor="m3.tiny", secret_env={"API_TOKEN": "hygiene-job-token"}, return_state=True, command=(
        'echo fine; printf %s "$API_TOKEN" | sha256sum; tr "\\0" " " < /proc/$$/cmdline > cmdline.txt; '
        'grep -c -F "$API_TOKEN" cmdline.txt; ls -a "$HOME" > home.txt'), outputs=["home.txt"])
    assert ok.is_completed(), ok.message
    job = ok.result()
    assert hashlib.sha256(JOB_SECRET.encode()).hexdigest() in job.stdout_tail
    assert job.stdout_tail.splitlines()[-1] == "0"  # not in its shell's command line
    home = (Path(job.results_dir) / "home.txt").read_text()
    assert ".slipstream-env" not in home  # the file that carried it was deleted before the job began
    for path in Path(job.results_dir).rglob("*"):
        if path.is_file():
            assert JOB_SECRET not in path.read_text(), path
    failed = vm_job(flavor="m3.tiny", command="echo about to fail >&2; exit 3", return_state=True)
    assert failed.is_failed()
    failures.append(_exception_text(failed))

    OpenStackCredentials(
        application_credential_id="fake-app-cred-id", application_credential_secret=FAKE_SECRET,
        auth_url=f"http://127.0.0.1:{closed_port()}/v3", region="IU",
    ).save("hygiene", overwrite=True)
    on_openstack = vm_job(flavor="m3.tiny", command="true", cloud="slipstream-openstack-credentials/hygiene",
                          return_state=True)
    assert on_openstack.is_failed()
    failures.append(_exception_text(on_openstack))
    assert "fake-app-cred-id" in failures[-1] or "127.0.0.1" in failures[-1], failures[-1]  # it did try

    assert len(private_keys) == 2 and cloud_env.server_history()  # both local runs made a key and a VM
    texts = (
        [("caplog", caplog.text)]
        + [("caplog traceback", _record_exception(r)) for r in caplog.records if r.exc_info]
        + [("exception", text) for text in failures]
        + [("sent to the cloud", text) for text in sent_to_cloud]
        + api_texts(since=started)
        + files_under(tmp_path / "slipstream", cloud_env.home, tmp_path / "results")
    )
    # The scan does see the runs' texts, the sign-in attempt, and a whole key's worth of needles.
    assert any("echo fine" in text for _, text in texts) and "auth/tokens" in caplog.text
    assert len(needles(private_keys)) >= 1 + 2 * 4
    leaks = [f"{what} in {where}" for where, text in texts for what, needle in needles(private_keys).items()
             if needle in text]
    assert not leaks, "\n".join(leaks)


def _exception_text(state) -> str:
    try:
        state.result()
    except BaseException as err:  # noqa: BLE001 - we want the text of whatever it raised
        return "".join(traceback.format_exception(err)) + f"\n{state.message}"
    pytest.fail(f"expected {state} to raise")


def _record_exception(record: logging.LogRecord) -> str:
    return "".join(traceback.format_exception(*record.exc_info))
