"""The provider port: the small set of operations every slipstream flow needs from a cloud.

Two clouds implement it — :class:`slipstream.cloud.local.LocalCloud` (embedded, the default) and
:class:`slipstream.cloud.openstack.OpenStackCloud` (Jetstream2 and any OpenStack) — and one
contract suite (``tests/contract``) holds both to the same inputs, states and errors.

Rules every implementation keeps:

- Failures are raised as :mod:`slipstream.cloud.errors`, never as SDK exceptions.
- Creating calls stamp the given :class:`Ownership` on the resource in the same API call, so a
  resource can never exist without it.
- ``list_*`` calls return only resources carrying slipstream ownership (optionally of one run),
  in one API call; nothing slipstream did not create is ever listed, changed or deleted.
- ``delete_*`` calls raise :class:`NotFound` for a resource that is already gone, so callers
  can treat deletion as idempotent.
- ``renew_lease`` never shortens a lease, and costs as few requests as the cloud allows: one
  per resource kind where it can update many resources at once (LocalCloud), else one listing per
  kind plus one request per resource that is due (Nova server and Cinder volume metadata).
- ``api_calls`` counts requests sent to the cloud (benchmarks compare strategies with it).
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, runtime_checkable

from slipstream.cloud.models import (
    Flavor,
    FloatingIP,
    Image,
    Keypair,
    LeaseRenewal,
    Ownership,
    Server,
    ServerSpec,
    ServerStatus,
    Volume,
)


@runtime_checkable
class CloudProvider(Protocol):
    #: A short human name used in messages and tables, e.g. "local" or "openstack:IU".
    name: str
    api_calls: int

    # catalogue -------------------------------------------------------------
    def list_flavors(self) -> list[Flavor]: ...

    def list_images(self) -> list[Image]: ...

    # servers ---------------------------------------------------------------
    def create_servers(self, spec: ServerSpec, owner: Ownership) -> list[Server]:
        """Create ``spec.count`` servers in one request; all or none (a failed batch is removed)."""
        ...

    def list_servers(self, run_id: str | None = None) -> list[Server]: ...

    def get_server(self, server_id: str) -> Server: ...

    def delete_server(self, server_id: str) -> None: ...

    def stop_server(self, server_id: str) -> None: ...

    def start_server(self, server_id: str) -> None: ...

    def shelve_server(self, server_id: str) -> None: ...

    def unshelve_server(self, server_id: str) -> None: ...

    def console_log(self, server_id: str) -> str: ...

    def state_log(self, server_id: str) -> list[tuple[ServerStatus, datetime]]:
        """The server's status changes in time order, also after it was deleted (for metering)."""
        ...

    # keypairs --------------------------------------------------------------
    def create_keypair(self, name: str, public_key: str) -> Keypair: ...

    def list_keypairs(self, run_id: str | None = None) -> list[Keypair]: ...

    def delete_keypair(self, name: str) -> None: ...

    # floating IPs ----------------------------------------------------------
    def create_floating_ip(self, owner: Ownership) -> FloatingIP: ...

    def attach_floating_ip(self, floating_ip_id: str, server_id: str) -> FloatingIP: ...

    def list_floating_ips(self, run_id: str | None = None) -> list[FloatingIP]: ...

    def delete_floating_ip(self, floating_ip_id: str) -> None: ...

    # volumes ---------------------------------------------------------------
    def create_volume(self, name: str, size_gb: int, owner: Ownership) -> Volume: ...

    def list_volumes(self, run_id: str | None = None) -> list[Volume]: ...

    def delete_volume(self, volume_id: str) -> None: ...

    # leases ----------------------------------------------------------------
    def renew_lease(self, run_id: str, renewal: LeaseRenewal, *, due_before: datetime) -> int:
        """Stamp ``renewal`` (a later ``expires_at``, when, by which host) on every server and
        volume of ``run_id`` whose lease ends before ``due_before``; returns how many it renewed.
        Raises InvalidRequest if ``due_before`` is after ``renewal.expires_at`` (that would
        shorten leases)."""
        ...
