"""Where slipstream keeps its local state on this machine.

``SLIPSTREAM_HOME`` (default ``~/.slipstream``) holds the ledger of created resources; the local
cloud keeps its own state under ``SLIPSTREAM_LOCAL_HOME`` (default ``$SLIPSTREAM_HOME/localcloud``).
"""

from __future__ import annotations

import os
from pathlib import Path


def slipstream_home() -> Path:
    return Path(os.environ.get("SLIPSTREAM_HOME") or Path.home() / ".slipstream")


def local_cloud_home() -> Path:
    env = os.environ.get("SLIPSTREAM_LOCAL_HOME")
    return Path(env) if env else slipstream_home() / "localcloud"
