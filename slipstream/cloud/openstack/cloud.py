"""OpenStackCloud: the provider port on openstacksdk's proxy layer."""

from __future__ import annotations

from slipstream.cloud.openstack.network import NetworkOperations
from slipstream.cloud.openstack.servers import ServerOperations
from slipstream.cloud.openstack.storage import StorageOperations


class OpenStackCloud(ServerOperations, NetworkOperations, StorageOperations):
    """A project on an OpenStack cloud (Jetstream2 first) behind the :class:`CloudProvider` port.

    Build one with :func:`slipstream.cloud.openstack.connect`, or from an existing
    ``openstack.connection.Connection``::

        cloud = OpenStackCloud(openstack.connect(cloud="mycloud"), external_network="public")

    ``api_calls`` counts every HTTP request the connection sends (token requests included).
    """
