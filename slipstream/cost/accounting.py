"""Service Units: what a plan will cost before it runs, and what a run really spent.

Jetstream2 charges ``SU/vCPU-hour of the flavour family × vCPUs × the state's charge fraction``
for every hour a server exists (rates and fractions in :mod:`slipstream.jetstream2`):

- :func:`estimate` — the worst case of a plan: every server ACTIVE for the whole walltime.
- :func:`meter` — what one server really cost, from its lifecycle (status, since) timestamps:
  LocalCloud's state log, or Nova's launched/terminated times and state changes.
- :func:`burn_rate` — what the servers a run holds cost per hour right now, given their states
  (a shelved server burns nothing, a stopped one half).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from slipstream.cloud.models import Flavor, Server, ServerStatus
from slipstream.jetstream2 import FLAVORS, su_per_hour


@dataclass(frozen=True)
class PlannedServers:
    """``count`` servers of ``flavor`` for at most ``hours`` of work, plus ``overhead_hours``
    around it (boot, transfers, teardown) that the run also pays for."""

    flavor: Flavor
    count: int
    hours: float
    overhead_hours: float = 0.0

    @property
    def held_hours(self) -> float:
        return self.hours + self.overhead_hours


def estimate(plan: Iterable[PlannedServers]) -> float:
    """Worst-case SUs for ``plan``: every server ACTIVE for its whole walltime."""
    return sum(su_per_hour(p.flavor) * p.count * p.held_hours for p in plan)


StateLog = Sequence[tuple[ServerStatus, datetime]]
"""A server's status changes in time order: (new status, when)."""


def meter(flavor: Flavor, state_log: StateLog, until: datetime | None = None) -> float:
    """SUs one server of ``flavor`` spent over ``state_log`` (up to ``until``, default now).

    Each interval between two changes is charged at its status's fraction of the flavour rate;
    the last status runs until ``until`` unless it is DELETED.
    """
    if not state_log:
        return 0.0
    end = until or datetime.now(UTC)
    total = 0.0
    for (status, since), nxt in zip(state_log, [*state_log[1:], None], strict=True):
        if status == ServerStatus.DELETED:
            break
        stop = nxt[1] if nxt else end
        hours = max(0.0, (stop - since).total_seconds() / 3600)
        total += su_per_hour(flavor, status) * hours
    return total


@dataclass(frozen=True)
class MeteredServer:
    name: str
    flavor: str
    su: float
    hours_active: float


def meter_log(name: str, flavor: Flavor, state_log: StateLog, until: datetime | None = None) -> MeteredServer:
    """One server's SUs and ACTIVE hours from a state log already read."""
    return MeteredServer(name, flavor.name, meter(flavor, state_log, until), _hours_in(state_log, ServerStatus.ACTIVE, until))


def meter_servers(cloud, servers: Iterable[tuple[str, str, str]], until: datetime | None = None) -> list[MeteredServer]:
    """Meter ``(server_id, name, flavor)`` triples from ``cloud``'s state logs (one read each)."""
    catalogue = {f.name: f for f in cloud.list_flavors()}
    return [meter_log(name, catalogue[flavor_name], cloud.state_log(server_id), until)
            for server_id, name, flavor_name in servers]


def _hours_in(state_log: StateLog, wanted: ServerStatus, until: datetime | None) -> float:
    end = until or datetime.now(UTC)
    total = 0.0
    for (status, since), nxt in zip(state_log, [*state_log[1:], None], strict=True):
        if status == ServerStatus.DELETED:
            break
        if status == wanted:
            total += max(0.0, ((nxt[1] if nxt else end) - since).total_seconds() / 3600)
    return total


def burn_rate(servers: Iterable[Server], flavors: Mapping[str, Flavor] | None = None) -> float:
    """SUs per hour ``servers`` cost now: each one's flavour rate × its status's charge fraction.

    ``flavors`` is the cloud's catalogue by name (Jetstream2's table when a name is missing).
    """
    total = 0.0
    for server in servers:
        flavor = (flavors or {}).get(server.flavor) or FLAVORS.get(server.flavor)
        if flavor is None:
            raise ValueError(f"server {server.name} has flavour {server.flavor!r}, which has no known SU rate")
        total += su_per_hour(flavor, server.status)
    return total


def run_burn_rate(cloud, run_id: str) -> float:
    """SUs per hour the servers of ``run_id`` on ``cloud`` cost now (two list calls)."""
    flavors = {f.name: f for f in cloud.list_flavors()}
    return burn_rate(cloud.list_servers(run_id=run_id), flavors)
