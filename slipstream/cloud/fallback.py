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
and timeouts are raised at once (another flavour would not fix them). Capacity includes Nova's
"Exceeded maximum number of retries" (every host it tried failed the build, the usual end of a
vGPU claim). Before anything is tried, each region must have what the spec names: the run's
keypair is imported where it is missing (owned by that region's lease), other missing keypairs,
security groups or networks are refused with the region named.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from slipstream.cloud.errors import CapacityError, InvalidRequest
from slipstream.cloud.models import Keypair, Server, ServerSpec, ServerStatus
from slipstream.cloud.waiting import wait_for_servers, wait_until_gone
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
    _prepare_regions(spec, candidates)
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


def _prepare_regions(spec: ServerSpec, candidates: Sequence[Candidate]) -> None:
    """Before anything is tried: what ``spec`` names must exist in every region it may land in.

    Keypairs, security groups and networks belong to one region. The run's own keypair
    (``Lease.create_keypair``) is imported into each region that lacks it, through that region's
    lease (so it is owned and deleted with the run); anything else missing in a region — a
    group, a network, the user's own keypair — is refused here, naming the region, rather than
    after capacity failed somewhere else.
    """
    leases = list({id(c.lease): c.lease for c in candidates}.values())
    if len({id(lease.cloud) for lease in leases}) < 2:
        return  # one region: the spec was made for it
    for lease in leases:
        runs_key = spec.key_name == Keypair.name_for_run(lease.owner.run_id)
        check = getattr(lease.cloud, "check_spec_resources", None)  # OpenStack: groups, network, key
        if check is not None:
            try:
                check(replace(spec, key_name=None) if runs_key else spec)  # the run's key is carried
            except InvalidRequest as err:
                raise InvalidRequest(
                    f"cannot fall back to {lease.cloud.name}: {err.message}",
                    resource=spec.name, cloud=lease.cloud.name,
                    hint="Keypairs, security groups and networks belong to one region: make them "
                    "there too (or pass names that exist in every region), or leave that region out.",
                ) from err
        if runs_key:
            _carry_keypair(spec.key_name, lease, leases)


def _carry_keypair(key_name: str, lease: Lease, leases: list[Lease]) -> None:
    """Import the run's keypair ``key_name`` into ``lease``'s region if it is not there yet."""
    run_id = lease.owner.run_id
    if any(k.name == key_name for k in lease.cloud.list_keypairs(run_id=run_id)):
        return
    public_key = next((k.public_key for other in leases if other is not lease
                       for k in other.cloud.list_keypairs(run_id=other.owner.run_id)
                       if k.name == key_name and k.public_key), None)
    if public_key is None:
        raise InvalidRequest(
            f"the run's keypair {key_name!r} is in none of the regions, so it cannot be carried "
            f"to {lease.cloud.name}",
            resource=key_name, cloud=lease.cloud.name,
            hint="Make the key with Lease.create_keypair before the fallback.",
        )
    log.info("importing keypair %s into %s for the fallback", key_name, lease.cloud.name)
    lease.create_keypair(public_key)


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
    wait_until_gone(
        lambda: lease.cloud.list_servers(run_id=run_id), doomed, what="failed attempt",
        cloud=lease.cloud.name, timeout=timeout, poll_interval=poll_interval,
        describe=lambda s: f"{s.name}={s.status}", hint="The run's teardown and the reaper will retry the delete.",
        sleep=sleep)
