"""Prefect blocks: saved configuration that becomes slipstream core objects.

Register them with ``prefect block register -m slipstream.blocks``. Flows name a cloud with a string so the
Prefect UI can offer it as a plain field: ``"local"`` is the embedded local cloud with its
defaults; anything else is a saved block document, ``"<block-type-slug>/<document-name>"``.
"""

from __future__ import annotations

from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.port import CloudProvider


def load_cloud(ref: str) -> CloudProvider:
    """The cloud a flow parameter names: "local" or "<block-type-slug>/<document-name>"."""
    from prefect.blocks.core import Block

    # Block.load finds a block's class only once its module is imported, and a process that only
    # reaps (`slipstream reap`) has imported no flow that would have done it.
    from slipstream.blocks import openstack  # noqa: F401
    from slipstream.blocks.local_cloud import LocalCloudBlock

    if ref in ("", "local"):
        return LocalCloudBlock().get_cloud()
    if "/" not in ref:
        raise InvalidRequest(
            f"unknown cloud {ref!r}",
            hint='Use "local" for the embedded cloud, or a saved block as "<block-type>/<name>", '
            'e.g. "slipstream-local-cloud/lab" (see `prefect block ls`).',
        )
    try:
        block = Block.load(ref)
    except ValueError as err:
        raise InvalidRequest(f"no saved cloud block {ref!r}", hint=f"Save one first (prefect block ls). {err}") from None
    if not hasattr(block, "get_cloud"):
        raise InvalidRequest(f"block {ref!r} is not a cloud", hint="Name a slipstream cloud block.")
    return block.get_cloud()
