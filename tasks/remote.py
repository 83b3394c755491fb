"""Tasks that talk to a server over SSH: wait for it, copy files in and out, run the work.

The host key is always checked against the fingerprints the server printed to its console log
at boot (as cloud-init does); a mismatch stops the run instead of trusting the network.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from slipstream import progress, ssh
from slipstream.cloud.models import Server
from slipstream.cloud.port import CloudProvider


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


@task(name="upload-inputs", retries=2, retry_delay_seconds=3, cache_policy=NONE)
def upload_inputs(target: ssh.SshTarget, paths: list[Path], remote_dir: str) -> None:
    ssh.run_command(target, f"mkdir -p {remote_dir}", timeout=60)
    if paths:
        ssh.upload(target, paths, remote_dir)
        get_run_logger().info("uploaded %s to ~/%s", ", ".join(p.name for p in paths), remote_dir)


@task(name="run-remote-command", cache_policy=NONE)
def run_remote_command(target: ssh.SshTarget, command: str, remote_dir: str, timeout: float) -> ssh.CommandResult:
    """Run the researcher's command in the job directory; its output goes to the flow's logs."""
    logger = get_run_logger()
    logger.info("running on %s: %s", target.host, command)
    result = ssh.run_command(target, f"cd {remote_dir} && {command}", timeout=timeout, check=False)
    for line in result.stdout.splitlines()[-50:]:
        logger.info("| %s", line)
    for line in result.stderr.splitlines()[-20:]:
        logger.warning("! %s", line)
    if result.exit_status != 0:
        raise ssh.RemoteCommandFailed(command, result.exit_status, result.stderr)
    return result


@task(name="download-outputs", retries=2, retry_delay_seconds=3, cache_policy=NONE)
def download_outputs(target: ssh.SshTarget, outputs: list[str], remote_dir: str, local_dir: Path) -> list[Path]:
    if not outputs:
        return []
    local_dir.mkdir(parents=True, exist_ok=True)
    ssh.download(target, [f"{remote_dir}/{o}" for o in outputs], local_dir)
    got = [local_dir / Path(o).name for o in outputs]
    get_run_logger().info("downloaded %s to %s", ", ".join(o for o in outputs), local_dir)
    return got
