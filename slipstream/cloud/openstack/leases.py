"""Lease renewal on OpenStack: a heartbeat pushes a run's ``slipstream:expires_at`` forward.

Nova server metadata and Cinder volume metadata can only be updated one resource per request,
so a renewal costs one listing per kind (servers by the run's tag, volumes by its metadata) plus
one request per resource *that is due* — the Lease asks for renewal only of leases with less than
half the renewal window left (:data:`slipstream.ownership.lease.LEASE_AFTER_BEAT`), so a run of N
servers sends about N + 2 requests per half window (every 15 minutes), and 2 per beat otherwise.

Nova refuses metadata updates while a server builds, is in ERROR or is shelved
(:data:`~slipstream.cloud.models.LEASE_RENEWABLE`); such servers keep the lease they have and are
renewed at a later beat if they change state. The reaper judges a run by the latest lease among
its resources, so a run's shelved servers live as long as its renewed ones; a run whose servers
are *all* shelved keeps only its last lease (shelved servers cost no SUs).
"""

from __future__ import annotations

from datetime import datetime

from slipstream.cloud.errors import CloudError, Conflict, NotFound
from slipstream.cloud.models import LEASE_RENEWABLE, LeaseRenewal
from slipstream.cloud.openstack.base import OpenStackBase, log


class LeaseOperations(OpenStackBase):
    def renew_lease(self, run_id: str, renewal: LeaseRenewal, *, due_before: datetime) -> int:
        """Renew every due server and volume of the run; returns how many were renewed.

        One resource that cannot be renewed never costs the others their renewal: one deleted
        since the listing (an elastic pool scaling down) or changing state is skipped, and any
        other failure is raised only once every other resource has been tried, so that a run is
        never left to expire — and be reaped while it works — because of one bad server."""
        renewal.check_extends(due_before)
        stamp, renewed, failures = renewal.metadata(), 0, []
        due = [(f"server {s.name}", lambda sid=s.id: self.conn.compute.set_server_metadata(sid, **stamp), s.id)
               for s in self.list_servers(run_id)  # type: ignore[attr-defined]
               if s.ownership is not None and s.ownership.expires_at < due_before and s.status in LEASE_RENEWABLE]
        due += [(f"volume {v.name}", lambda vid=v.id: self.conn.block_storage.set_volume_metadata(vid, **stamp), v.id)
                for v in self.list_volumes(run_id)  # type: ignore[attr-defined]
                if v.ownership is not None and v.ownership.expires_at < due_before]
        for what, update, resource_id in due:
            try:
                self._call(f"renewing the lease of {what}", update, resource_id)
            except (Conflict, NotFound) as err:  # changed state or gone since the listing
                log.info("lease of %s not renewed now: %s", what, err)
                continue
            except CloudError as err:
                failures.append(err)
                continue
            renewed += 1
        if failures:
            raise failures[0]
        return renewed
