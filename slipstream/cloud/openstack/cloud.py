"""OpenStackCloud: the provider port on openstacksdk's proxy layer."""

from __future__ import annotations

from typing import Any

from keystoneauth1 import exceptions as ks_exc

from slipstream.cloud.errors import CloudError, InvalidRequest, NotFound
from slipstream.cloud.models import ServerSpec
from slipstream.cloud.openstack.leases import LeaseOperations
from slipstream.cloud.openstack.network import NetworkOperations
from slipstream.cloud.openstack.servers import ServerOperations
from slipstream.cloud.openstack.storage import StorageOperations


class OpenStackCloud(ServerOperations, NetworkOperations, StorageOperations, LeaseOperations):
    """A project on an OpenStack cloud (Jetstream2 first) behind the :class:`CloudProvider` port.

    Build one with :func:`slipstream.cloud.openstack.connect`, or from an existing
    ``openstack.connection.Connection``::

        cloud = OpenStackCloud(openstack.connect(cloud="mycloud"), external_network="public")

    ``api_calls`` counts every HTTP request the connection sends (token requests included).
    """

    def check_spec_resources(self, spec: ServerSpec) -> None:
        """Raise :class:`InvalidRequest` if ``spec``'s keypair, security groups or network are not
        in this region (a fallback asks before it tries; ``auto_allocated_network`` is made if
        missing). Any keypair counts, not only slipstream's: a user may import theirs everywhere."""
        if spec.key_name and not self._call(
            "looking up a keypair", lambda: self.conn.compute.find_keypair(spec.key_name), spec.key_name
        ):
            raise InvalidRequest(
                f"keypair {spec.key_name!r} does not exist", resource=spec.key_name, cloud=self.name,
                hint="`openstack keypair list` shows yours; keypairs belong to one region.",
            )
        for group in spec.security_groups:
            self.security_group_id(group)
        self._network_id(spec.network)

    def read_accounting(self) -> list[Any]:
        """The project's allocations from Jetstream2's ``accounting`` service (JSON list; see
        :func:`slipstream.cost.budget.parse_accounting`): found in the Keystone catalogue, read with
        one authenticated GET on the endpoint itself, as Exosphere does."""
        session = self.conn.session
        url = None
        for region in (self.region, None):  # this region's endpoint, else any region's
            try:
                url = session.get_endpoint(service_type="accounting", interface="public", region_name=region)
            except ks_exc.EndpointNotFound:
                url = None
            if url:
                break
        if not url:
            raise NotFound(
                "no `accounting` service in the Keystone catalogue",
                cloud=self.name,
                hint="Jetstream2 lists one; on other clouds give the allocation a fixed balance "
                "(AllocationBlock balance_source='fixed').",
            )
        response = self._call("reading the accounting service", lambda: session.get(url, raise_exc=True))
        try:
            return response.json()
        except ValueError:
            raise CloudError(
                f"the accounting service at {url} did not answer with JSON",
                cloud=self.name,
                hint="Check the catalogue's `accounting` endpoint; or use a fixed balance.",
            ) from None
