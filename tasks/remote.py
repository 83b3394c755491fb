"""Tasks that talk to a server over SSH: wait for it, copy files in and out, run the work.

The host key is always checked against the fingerprints the server printed to its console log
at boot (as cloud-init does); a mismatch stops the run instead of trusting the network.

While the job runs, every line it prints goes to the run's logs as it is printed (``| `` for
stdout, ``! `` for stderr) and into ``stdout.txt`` / ``stderr.txt`` in the results directory, and
every few minutes (``SLIPSTREAM_PROGRESS_SECONDS``, default 300) a line says how long it has run
and what it has cost so far.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from slipstream import progress, ssh
from slipstream.cloud.models import Server
from slipstream.cloud.port import CloudProvider
from slipstream.cost.accounting import meter_servers
from slipstream.periodic import Periodic
from slipstream.transfer import FetchedOutputs, fetch_outputs
from slipstream.untrusted import printable, redact
from slipstream.vmjob import STDERR_FILE, STDOUT_FILE, JobOutcome, describe_duration

#: The most output lines one job sends to the run's logs; the rest is only in stdout.txt/stderr.txt.
MAX_LOGGED_LINES = 5000
#: The last lines of each stream kept in memory for the result and the error (all are in the files).
KEPT_LINES = 200


@task(name="wait-for-ssh", cache_policy=NONE)
def wait_for_ssh(cloud: CloudProvider, server: Server, keypair: ssh.SshKeypair, timeout: float = 600.0) -> ssh.SshTarget:
    """Wait until ``server`` has printed its host keys and accepts our key; return the target."""
    logger = get_run_logger()

    def target() -> ssh.SshTarget:
        return ssh.target_for(cloud.get_server(server.id), keypair, cloud.console_log(server.id))

    def on_progress(attempt: int, detail: str) -> None:
        progress.report("ssh", 0, 1, detail)
        logger.info("waiting for SSH on %s (attempt %d): %s", server.name, attempt, detail)

    ready = ssh.wait_for_ssh(target, timeout=timeout, on_progress=on_progress)
    progress.report("ssh", 1, 1, f"{server.name} accepts SSH")
    logger.info("SSH ready on %s (%s:%d), host key verified", server.name, ready.host, ready.port)
    return ready


def in_time(task, task_run, state) -> bool:
    """retry_condition_fn: retry a transfer after connection trouble, never after it ran out of
    its deadline (a retry then only waits its delay past it and fails with "no time left")."""
    return not isinstance(state.result(raise_on_failure=False), ssh.SshTimeout)


def _left(deadline: float, what: str) -> float:
    left = deadline - time.time()
    if left <= 0:
        raise ssh.SshTimeout(f"no time left for {what}: its deadline passed (raise transfer_timeout_seconds)")
    return left


@task(name="upload-inputs", retries=2, retry_delay_seconds=3, retry_condition_fn=in_time, cache_policy=NONE)
def upload_inputs(target: ssh.SshTarget, paths: list[Path], remote_dir: str, deadline: float) -> None:
    """Copy ``paths`` into ``remote_dir``; retries share one ``deadline`` (epoch seconds)."""
    ssh.run_command(target, f"mkdir -p {remote_dir}", timeout=min(60, _left(deadline, "the upload")))
    if paths:
        ssh.upload(target, paths, remote_dir, timeout=_left(deadline, "the upload"))
        get_run_logger().info("uploaded %s to ~/%s", ", ".join(p.name for p in paths), remote_dir)


@task(name="run-remote-command", cache_policy=NONE)
def run_remote_command(target: ssh.SshTarget, command: str, remote_dir: str, *, timeout: float, results_dir: Path,
                       cloud: CloudProvider, server: Server,
                       secret_env: dict[str, str] | None = None) -> JobOutcome:
    """Run the researcher's command in the job directory, streaming its output to the run's logs
    and to ``results_dir``; a timeout is an outcome, not an error, so the outputs are still fetched.

    ``secret_env`` maps variable names to *names* of saved Prefect Secret blocks: the values are
    read here, in the task, and go to the VM over SSH only (never a parameter, log or artifact);
    a job that prints one anyway has it replaced by ``***`` in the logs, stdout.txt/stderr.txt and
    the outcome. Control characters the job prints reach the logs as visible escapes."""
    logger = get_run_logger()
    logger.info("running on %s: %s", target.host, command)
    results_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    logged = 0
    secrets = _secret_values(secret_env or {})

    with open(results_dir / STDOUT_FILE, "w") as out, open(results_dir / STDERR_FILE, "w") as err:
        def on_output(stream: str, line: str) -> None:
            nonlocal logged
            line = redact(line, secrets.values())
            (out if stream == "stdout" else err).write(line + "\n")
            (out if stream == "stdout" else err).flush()
            logged += 1
            if logged <= MAX_LOGGED_LINES:
                (logger.info if stream == "stdout" else logger.warning)(
                    "%s %s", "|" if stream == "stdout" else "!", printable(line.removesuffix("\r")))
            elif logged == MAX_LOGGED_LINES + 1:
                logger.info("... more output than %d lines: the rest is in %s", MAX_LOGGED_LINES, results_dir)

        interval = float(os.environ.get("SLIPSTREAM_PROGRESS_SECONDS", 300))

        def so_far() -> None:
            if time.monotonic() - started < interval / 2:
                return  # the first round comes at once: nothing to say yet
            spent = sum(m.su for m in meter_servers(cloud, [(server.id, server.name, server.flavor)]))
            logger.info("running for %s, %.4f SU so far", describe_duration(time.monotonic() - started), spent)

        ticker = Periodic("slipstream-job-progress", so_far, interval, on_error=lambda e: logger.debug("progress line skipped: %s", e))
        ticker.start()
        try:
            result = ssh.run_command(target, f"cd {remote_dir} && {command}", timeout=timeout, check=False,
                                     on_output=on_output, secret_env=secrets, keep_lines=KEPT_LINES)
        except ssh.SshTimeout as timed_out:
            return JobOutcome(None, redact(timed_out.stdout, secrets.values()), redact(timed_out.stderr, secrets.values()),
                              time.monotonic() - started, timed_out=True)
        finally:
            ticker.stop(timeout=5)
    return JobOutcome(result.exit_status, redact(result.stdout, secrets.values()), redact(result.stderr, secrets.values()),
                      time.monotonic() - started)


def _secret_values(names: dict[str, str]) -> dict[str, str]:
    from prefect.blocks.system import Secret

    values = {}
    for variable, block in names.items():
        try:
            value = Secret.load(block).get()
        except ValueError as err:  # Prefect's "Unable to find block document named ..."
            raise ValueError(f"secret_env[{variable!r}]: no saved Secret block named {block!r} ({err}). "
                             f"Save one first: Secret(value=...).save({block!r})") from None
        if not isinstance(value, str):
            raise ValueError(f"secret_env[{variable!r}]: the Secret block {block!r} holds a "
                             f"{type(value).__name__}, not a string; save the value as a string")
        values[variable] = value
    return values


@task(name="download-outputs", retries=1, retry_delay_seconds=3, retry_condition_fn=in_time, cache_policy=NONE)
def download_outputs(target: ssh.SshTarget, outputs: list[str], remote_dir: str, local_dir: Path,
                     deadline: float) -> FetchedOutputs:
    """Fetch every output that exists (relative paths kept) and name the missing and refused ones.
    A retry (connection trouble) starts afresh within the same ``deadline``."""
    logger = get_run_logger()
    fetched = fetch_outputs(target, remote_dir, outputs, local_dir, timeout=_left(deadline, "the download"))
    if fetched.files:  # names chosen on the VM: shown with their control characters escaped
        logger.info("downloaded %s to %s", printable(", ".join(fetched.files)), local_dir)
    if fetched.missing:
        logger.warning("not on the VM (nothing to download): %s", ", ".join(fetched.missing))
    for path, why in fetched.refused.items():
        logger.warning("refused to download %s: %s", printable(path), printable(why))
    return fetched
