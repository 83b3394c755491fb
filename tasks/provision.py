"""Tasks that create and wait for cloud resources, always through a :class:`~slipstream.ownership.lease.Lease`."""

from __future__ import annotations

import time

from prefect import get_run_logger, task

from slipstream import progress
from slipstream.cloud.errors import WaitTimeout
from slipstream.cloud.models import FloatingIP, Keypair, Server, ServerSpec, ServerStatus
from slipstream.cloud.waiting import wait_for_floating_ip, wait_for_servers
from slipstream.ownership.lease import Lease
from slipstream.tasks import CLOUD_TASK_OPTIONS


@task(name="register-keypair", **CLOUD_TASK_OPTIONS)
def register_keypair(lease: Lease, public_key: str) -> Keypair:
    """Register this run's SSH public key; the lease deletes it at the end."""
    return lease.create_keypair(public_key)


@task(name="provision-servers", **CLOUD_TASK_OPTIONS)
def provision_servers(lease: Lease, spec: ServerSpec, deadline: float | None = None) -> list[Server]:
    """Create ``spec.count`` servers in one request (retries adopt, never duplicate). With
    ``deadline`` (epoch seconds, the end of the boot phase) none is created once it has passed:
    a server that cannot be waited for would only be charged until its teardown."""
    logger = get_run_logger()
    if deadline is not None and _until(deadline, 0.0) <= 0:
        raise WaitTimeout(f"no time left to create {spec.count} x {spec.flavor}: the boot deadline "
                          "passed before the create call (the cloud API was slow or refused it)",
                          cloud=lease.cloud.name, hint="Raise boot_timeout_seconds, or try again later.")
    servers = lease.create_servers(spec)
    logger.info("requested %d x %s (%s) on %s: %s", spec.count, spec.flavor, spec.image,
                lease.cloud.name, ", ".join(s.name for s in servers))
    return servers


@task(name="wait-until-active", **CLOUD_TASK_OPTIONS)
def wait_until_active(lease: Lease, servers: list[Server], timeout: float = 900.0,
                      deadline: float | None = None) -> list[Server]:
    """Wait for every server to be ACTIVE: one list call per round, ERROR fails at once. With
    ``deadline`` (epoch seconds) retries of this task share it instead of each waiting ``timeout``."""
    logger = get_run_logger()
    last = {"done": -1}

    def on_progress(done: int, total: int, seen: list[Server]) -> None:
        states = ", ".join(f"{s.name}={s.status}" for s in seen)
        progress.report("booting", done, total, states)
        if done != last["done"]:
            logger.info("booting: %d/%d ACTIVE (%s)", done, total, states)
            last["done"] = done

    return wait_for_servers(
        lease.cloud, lease.owner.run_id, [s.id for s in servers],
        status=ServerStatus.ACTIVE, timeout=_until(deadline, timeout), poll_interval=0.5, on_progress=on_progress,
    )


@task(name="attach-floating-ip", **CLOUD_TASK_OPTIONS)
def attach_floating_ip(lease: Lease, server: Server, deadline: float | None = None) -> Server:
    """Give ``server`` a public (floating) address from the cloud's external network (seen on
    the server by ``deadline``, epoch seconds, if given)."""
    fip: FloatingIP = lease.create_floating_ip()
    lease.cloud.attach_floating_ip(fip.id, server.id)
    server = wait_for_floating_ip(lease.cloud, server.id, fip.address, timeout=_until(deadline, 60.0))
    get_run_logger().info("%s reachable at %s", server.name, fip.address)
    return server


def _until(deadline: float | None, default: float) -> float:
    return default if deadline is None else max(0.0, deadline - time.time())
