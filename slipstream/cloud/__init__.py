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


def open_cloud(ref: str = "local") -> CloudProvider:
    """The cloud ``ref`` names: ``"local"`` (the embedded LocalCloud, no Prefect needed) or a
    saved cloud block ``"<block-type>/<name>"`` (read from Prefect's block store)."""
    if ref in ("", "local"):
        from slipstream.cloud.local import LocalCloud

        return LocalCloud()
    from slipstream.blocks import load_cloud  # a saved block needs Prefect's block store

    return load_cloud(ref)

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
    "open_cloud",
]
