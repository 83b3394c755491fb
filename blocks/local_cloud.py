"""The embedded local cloud as a Prefect block.

Save one to give a deployment its own local cloud home or a faster boot::

    from slipstream.blocks.local_cloud import LocalCloudBlock
    LocalCloudBlock(home="/srv/slipstream/local", boot_delay_seconds=0.5).save("fast")
    # flows then take cloud="slipstream-local-cloud/fast"

Left empty it is the default cloud every flow uses with ``cloud="local"``: state under
``~/.slipstream/localcloud`` (or ``$SLIPSTREAM_LOCAL_HOME``), Jetstream2's quotas, boot in ≤ 2 s.
"""

from __future__ import annotations

from pathlib import Path

from prefect.blocks.core import Block
from pydantic import Field

from slipstream.cloud.local import LocalCloud, LocalCloudOptions


class LocalCloudBlock(Block):
    """Options of slipstream's embedded local cloud (VMs are processes on this machine)."""

    _block_type_name = "Slipstream Local Cloud"
    _block_type_slug = "slipstream-local-cloud"

    home: str | None = Field(
        default=None,
        description="Directory for the local cloud's state; empty means ~/.slipstream/localcloud "
        "or $SLIPSTREAM_LOCAL_HOME.",
    )
    boot_delay_seconds: float | None = Field(
        default=None, ge=0, le=120,
        description="Seconds from BUILD to ACTIVE for every flavour; empty keeps the defaults "
        "(1 s for m3, 1.5 s for r3/g3).",
    )

    def get_cloud(self) -> LocalCloud:
        home = Path(self.home).expanduser() if self.home else None
        if self.boot_delay_seconds is None:
            return LocalCloud(home=home)
        return LocalCloud(home=home, options=LocalCloudOptions(home=home, boot_delay=self.boot_delay_seconds))
