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

from slipstream.cloud.errors import Conflict
from slipstream.cloud.models import LEASE_RENEWABLE, LeaseRenewal
from slipstream.cloud.openstack.base import OpenStackBase, log


class LeaseOperations(OpenStackBase):
    def renew_lease(self, run_id: str, renewal: LeaseRenewal, *, due_before: datetime) -> int:
        renewal.check_extends(due_before)
        stamp, renewed = renewal.metadata(), 0
        for server in self.list_servers(run_id):  # type: ignore[attr-defined]
            owner = server.ownership
            if owner is None or owner.expires_at >= due_before or server.status not in LEASE_RENEWABLE:
                continue
            try:
                self._call("renewing a server's lease",
                           lambda sid=server.id: self.conn.compute.set_server_metadata(sid, **stamp), server.id)
            except Conflict as err:  # it changed state since the listing: the next beat tries again
                log.info("lease of server %s not renewed now: %s", server.name, err)
                continue
            renewed += 1
        for volume in self.list_volumes(run_id):  # type: ignore[attr-defined]
            owner = volume.ownership
            if owner is None or owner.expires_at >= due_before:
                continue
            self._call("renewing a volume's lease",
                       lambda vid=volume.id: self.conn.block_storage.set_volume_metadata(vid, **stamp), volume.id)
            renewed += 1
        return renewed
