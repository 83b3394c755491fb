"""The provider port and its clouds.

``from slipstream.cloud import open_cloud`` gives the cloud a user configured (the embedded
LocalCloud when nothing is configured); everything else a flow needs is re-exported here.
"""

from slipstream.cloud.errors import (
    CapacityError,
    CloudError,
    Conflict,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    ServerFailed,
    TransientError,
    WaitTimeout,
)
from slipstream.cloud.models import (
    Flavor,
    FloatingIP,
    Image,
    Keypair,
    Ownership,
    Server,
    ServerSpec,
    ServerStatus,
    Volume,
    check_name,
)
from slipstream.cloud.port import CloudProvider

__all__ = [
    "CapacityError",
    "CloudError",
    "CloudProvider",
    "Conflict",
    "Flavor",
    "FloatingIP",
    "Image",
    "InvalidRequest",
    "Keypair",
    "NotFound",
    "Ownership",
    "QuotaExceeded",
    "Server",
    "ServerFailed",
    "ServerSpec",
    "ServerStatus",
    "TransientError",
    "Volume",
    "WaitTimeout",
    "check_name",
]
