"""LocalCloud: the embedded Jetstream2-shaped cloud (see architecture.md, section 2).

``from slipstream.cloud.local import LocalCloud, LocalCloudOptions`` — see
:mod:`slipstream.cloud.local.cloud` for a user guide. Names are imported lazily so that a VM's
guest process (``python -m slipstream.cloud.local.guest``) starts without loading the cloud.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slipstream.cloud.local.admin import LocalCloudStatus, ResetSummary
    from slipstream.cloud.local.cloud import LocalCloud
    from slipstream.cloud.local.options import FaultOptions, HostGroup, LocalCloudOptions
    from slipstream.cloud.local.servers import ServerHistory

_EXPORTS = {
    "LocalCloud": "slipstream.cloud.local.cloud",
    "LocalCloudOptions": "slipstream.cloud.local.options",
    "FaultOptions": "slipstream.cloud.local.options",
    "HostGroup": "slipstream.cloud.local.options",
    "LocalCloudStatus": "slipstream.cloud.local.admin",
    "ResetSummary": "slipstream.cloud.local.admin",
    "ServerHistory": "slipstream.cloud.local.servers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
