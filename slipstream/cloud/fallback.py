"""Capacity fallback: try flavours and regions in order until one of them boots.

Jetstream2's GPU flavours run out: a g3.large can be accepted by the API and then go to ERROR
with "No valid host was found" (a :class:`CapacityError`). Another size, or another region,
may have room. :func:`create_with_fallback` tries each :class:`Candidate` in turn — a lease
(and so a cloud/region) with a flavour — and removes every failed attempt through its lease
(:meth:`Lease.forget`) before the next, so a failed GPU request never keeps quota or costs SUs::

    owner = Ownership.new("train")
    with Lease(iu, owner) as at_iu, Lease(tacc, owner) as at_tacc:
        result = create_with_fallback(
            ServerSpec("trainer", "g3.large", "Featured-Ubuntu24"),
            [Candidate(at_iu, "g3.large"), Candidate(at_iu, "g3.medium"), Candidate(at_tacc, "g3.large")],
        )
        print(result.candidate.label, [s.address for s in result.servers])

Only capacity failures fall through to the next candidate; quota, bad requests, other ERRORs
and timeouts are raised at once (another flavour would not fix them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from slipstream.cloud.errors import CapacityError, InvalidRequest, WaitTimeout
from slipstream.cloud.models import Server, ServerSpec, ServerStatus
from slipstream.cloud.waiting import wait_for_servers
from slipstream.ownership.lease import Lease, ResourceKind

log = logging.getLogger("slipstream.fallback")


@dataclass(frozen=True)
class Candidate:
    """One thing to try: ``flavor`` on the cloud (region) of ``lease``."""

    lease: Lease
    flavor: str

    @property
    def label(self) -> str:
        return f"{self.flavor} on {self.lease.cloud.name}"


@dataclass
class FallbackResult:
    """The candidate that booted, its ACTIVE servers, and what failed before it."""

    candidate: Candidate
    servers: list[Server]
    failures: list[tuple[Candidate, CapacityError]] = field(default_factory=list)


FallbackCallback = Callable[[Candidate, CapacityError], None]
"""Told about each candidate that had no capacity (for logs and events)."""


def create_with_fallback(
    spec: ServerSpec,
    candidates: Sequence[Candidate],
    *,
    boot_timeout: float = 600.0,
    poll_interval: float = 1.0,
    cleanup_timeout: float = 300.0,
    on_fallback: FallbackCallback | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> FallbackResult:
    """Create ``spec`` (its flavour replaced by each candidate's) until all servers are ACTIVE.

    Raises :class:`CapacityError` naming every candidate when none had room; each failed
    attempt has been deleted (and is gone from the listing) by then.
    """
    if not candidates:
        raise InvalidRequest(
            "no flavours or regions to try", resource=spec.name, hint="Give at least one Candidate."
        )
    failures: list[tuple[Candidate, CapacityError]] = []
    for candidate in candidates:
        attempt = replace(spec, flavor=candidate.flavor)
        lease = candidate.lease
        created: list[Server] = []
        try:
            created = lease.create_servers(attempt)
            ready = wait_for_servers(
                lease.cloud,
                lease.owner.run_id,
                [s.id for s in created],
                status=ServerStatus.ACTIVE,
                timeout=boot_timeout,
                poll_interval=poll_interval,
                sleep=sleep,
            )
            return FallbackResult(candidate, ready, failures)
        except CapacityError as err:
            log.warning("no capacity for %s: %s", candidate.label, err.message)
            failures.append((candidate, err))
            _discard(lease, attempt, created, cleanup_timeout, poll_interval, sleep)
            if on_fallback:
                on_fallback(candidate, err)
    tried = "; ".join(f"{c.label}: {e.message}" for c, e in failures)
    raise CapacityError(
        f"no capacity for {spec.name} with any of {len(failures)} choice(s) ({tried})",
        resource=spec.name,
        hint="Try again later, another region, or a smaller flavour; failed attempts were deleted.",
    )


def _discard(
    lease: Lease,
    attempt: ServerSpec,
    created: list[Server],
    timeout: float,
    poll_interval: float,
    sleep: Callable[[float], None],
) -> None:
    """Delete a failed attempt (what it returned, plus any of its names the run has) and wait
    until the listing no longer shows it, so the next attempt cannot adopt it."""
    run_id = lease.owner.run_id
    names = set(attempt.server_names())
    doomed = {s.id for s in created}
    doomed |= {s.id for s in lease.cloud.list_servers(run_id=run_id) if s.name in names}
    for server_id in doomed:
        lease.forget(ResourceKind.SERVER, server_id)
    deadline = time.monotonic() + timeout
    while True:
        left = [s for s in lease.cloud.list_servers(run_id=run_id) if s.id in doomed]
        if not left:
            return
        if time.monotonic() > deadline:
            raise WaitTimeout(
                f"failed attempt still present {timeout:.0f} s after delete: "
                + ", ".join(f"{s.name}={s.status}" for s in left),
                cloud=lease.cloud.name,
                hint="The run's teardown and the reaper will retry the delete.",
            )
        sleep(poll_interval)
