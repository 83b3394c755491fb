"""What the LocalCloud offers: Jetstream2's flavours and images, and the one network.

Flavours come from :data:`slipstream.jetstream2.FLAVORS`, the cited catalogue, so a plan that
works here names the same flavours as on Jetstream2. Images: the Featured ones run a real
OpenSSH server (like Jetstream2's Featured images, which run sshd and cloud-init);
``slipstream-noop`` runs no sshd, only user_data, for fast tests and benchmarks.
"""

from __future__ import annotations

import getpass
import uuid
from dataclasses import dataclass

from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.models import Flavor, Image
from slipstream.jetstream2 import DEFAULT_NETWORK, FEATURED_IMAGE_PREFIX, FLAVORS

NOOP_IMAGE = "slipstream-noop"
IMAGE_NAMES: tuple[str, ...] = (
    "Featured-Ubuntu24", "Featured-Ubuntu22", "Featured-RockyLinux9", NOOP_IMAGE,
)
NETWORKS: tuple[str, ...] = (DEFAULT_NETWORK,)

# Stable ids, so an image id seen by one process means the same image in every other.
_IMAGE_NS = uuid.UUID("6b7f3c1e-58f4-4b0e-9a55-0d1c2a7e9b10")


@dataclass(frozen=True)
class LocalImage:
    image: Image
    runs_sshd: bool


def login_user() -> str:
    """Who can log in to a local VM: its sshd runs as us, so only we can (any user when root,
    but slipstream keeps one answer: the current user)."""
    return getpass.getuser()


def images() -> dict[str, LocalImage]:
    user = login_user()
    return {
        name: LocalImage(Image(str(uuid.uuid5(_IMAGE_NS, name)), name, user),
                         runs_sshd=name.startswith(FEATURED_IMAGE_PREFIX))
        for name in IMAGE_NAMES
    }


def flavors() -> dict[str, Flavor]:
    return dict(FLAVORS)


def flavor_named(name: str, cloud: str) -> Flavor:
    table = flavors()
    if name not in table:
        raise InvalidRequest(f"unknown flavour {name!r}", cloud=cloud,
                             hint=f"Valid flavours: {', '.join(table)}.")
    return table[name]


def image_named(name: str, cloud: str) -> LocalImage:
    table = images()
    by_id = {i.image.id: i for i in table.values()}
    if name in table:
        return table[name]
    if name in by_id:  # Nova accepts an image id as well as a name
        return by_id[name]
    raise InvalidRequest(f"unknown image {name!r}", cloud=cloud,
                         hint=f"Valid images: {', '.join(table)}.")


def check_network(name: str, cloud: str) -> None:
    if name not in NETWORKS:
        raise InvalidRequest(f"unknown network {name!r}", cloud=cloud,
                             hint=f"Valid networks: {', '.join(NETWORKS)}.")
