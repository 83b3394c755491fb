"""OpenStack (Jetstream2 first) behind slipstream's provider port.

What it is for: everything a flow needs from an OpenStack project — servers in batches, floating
IPs, keypairs, volumes, an SSH security group — with slipstream's ownership stamped on each one
in the creating request, one listing request per poll round however many servers a run has, and
every SDK failure turned into :mod:`slipstream.cloud.errors`. It uses openstacksdk's proxy layer
(``conn.compute``, ``conn.network``, ``conn.block_storage``, ``conn.image``), never the ``cloud``
layer, which retries, waits and hides errors on its own.

How to configure it: a cloud from ``clouds.yaml``, or a Jetstream2 application credential
(Horizon → Identity → Application Credentials; set an expiry, Horizon's default is today)::

    from slipstream.cloud.openstack import connect

    cloud = connect("TRA160003_IU")                               # from clouds.yaml
    cloud = connect(application_credential_id="8a1f...",           # or a credential;
                    application_credential_secret="...", region="IU")  # auth URL: Jetstream2's

Example::

    from slipstream.cloud import Ownership, ServerSpec
    from slipstream.cloud.waiting import wait_for_servers
    from slipstream.ownership.lease import Lease

    owner = Ownership.new("my-pipeline")
    with Lease(cloud, owner) as lease:
        servers = lease.create_servers(ServerSpec("work", "m3.small", "Featured-Ubuntu24", count=4))
        wait_for_servers(cloud, owner.run_id, [s.id for s in servers])
        ...
    assert lease.proof.clean

On Jetstream2, servers also get Exosphere's metadata (``exoServerVersion``,
``exoCreatorUsername``, ``exoSetup`` = complete) so teammates see who made them; turn it off
with ``connect(..., exosphere_metadata=False)``.
"""

from slipstream.cloud.openstack.cloud import OpenStackCloud
from slipstream.cloud.openstack.connection import SCOPE_VARIABLES, connect, leftover_scope_variables
from slipstream.cloud.openstack.errors import CredentialError, sdk_errors, translate

__all__ = [
    "SCOPE_VARIABLES",
    "CredentialError",
    "OpenStackCloud",
    "connect",
    "leftover_scope_variables",
    "sdk_errors",
    "translate",
]
