"""Plain data that crosses the provider port: what a cloud has and what slipstream asks of it.

These dataclasses are deliberately cloud-neutral. An adapter (LocalCloud, OpenStackCloud) turns
its native objects into them; flows, the Lease, accounting and the reaper only ever see these.
Ownership is the one piece every created resource carries: it is how the reaper finds what a
crashed run left behind, on any cloud, without trusting a local file.
"""

from __future__ import annotations

import getpass
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from slipstream.cloud.errors import InvalidRequest


class ServerStatus(StrEnum):
    """Nova's server statuses that slipstream distinguishes."""

    BUILD = "BUILD"
    ACTIVE = "ACTIVE"
    SHUTOFF = "SHUTOFF"
    SUSPENDED = "SUSPENDED"
    SHELVED_OFFLOADED = "SHELVED_OFFLOADED"
    ERROR = "ERROR"
    DELETED = "DELETED"


#: The statuses in which Nova accepts a metadata update (so a lease renewal) of a server that is
#: not changing state: not while it builds, is shelved, or is in ERROR.
LEASE_RENEWABLE = (ServerStatus.ACTIVE, ServerStatus.SHUTOFF, ServerStatus.SUSPENDED)

# Names end up in hostnames and Jetstream2's automatic DNS records, and in Slurm node names:
# keep them DNS labels, which also means nothing a shell would interpret.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Run ids and pipeline names go into Nova tags (no "/" or ","; 60 characters at most).
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,43}$")


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a safe resource name, else raise :class:`InvalidRequest`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequest(
            f"{what} {name!r} is not allowed",
            hint="Use 1-63 lower-case letters, digits and '-', starting and ending with a "
            "letter or digit (it becomes a hostname and a DNS record).",
        )
    return name


def _check_token(value: str, what: str) -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise InvalidRequest(
            f"{what} {value!r} is not allowed",
            hint="Use 1-44 letters, digits, '.', '_' or '-' (it is stored in cloud tags).",
        )
    return value


OWNER_TAG = "slipstream"
RUN_TAG_PREFIX = "slipstream-run:"
_META_PREFIX = "slipstream:"
_KEY_PREFIX = "slipstream-"
# The run ids slipstream makes: a Prefect flow-run id (canonical UUID) or Ownership.new's uuid4().hex.
_MADE_RUN_ID = re.compile(r"^(?:[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")


def is_made_run_id(run_id: str) -> bool:
    """Is ``run_id`` of a form slipstream makes (a Prefect flow-run id or a generated one)?"""
    return isinstance(run_id, str) and bool(_MADE_RUN_ID.match(run_id))


@dataclass(frozen=True)
class Ownership:
    """Who owns a resource and until when: stamped on everything slipstream creates.

    ``run_id`` is the Prefect flow-run id when there is one, else a generated id. ``expires_at``
    is the lease: after it (plus a grace period) the reaper may delete the resource even if
    nobody can tell whether its run is still alive.
    """

    run_id: str
    pipeline: str
    creator: str
    expires_at: datetime

    def __post_init__(self) -> None:
        _check_token(self.run_id, "run id")
        _check_token(self.pipeline, "pipeline name")
        if self.expires_at.tzinfo is None:
            raise InvalidRequest("ownership expiry must be timezone-aware (UTC)")

    @classmethod
    def new(
        cls,
        pipeline: str,
        *,
        run_id: str | None = None,
        creator: str | None = None,
        lease: timedelta = timedelta(hours=24),
    ) -> Ownership:
        return cls(
            run_id=run_id or uuid.uuid4().hex,
            pipeline=pipeline,
            creator=creator or getpass.getuser(),
            expires_at=datetime.now(UTC) + lease,
        )

    @property
    def run_tag(self) -> str:
        return f"{RUN_TAG_PREFIX}{self.run_id}"

    def tags(self) -> list[str]:
        """Tags for Nova servers, Neutron resources and (as labels) Heat/Magnum."""
        return [OWNER_TAG, self.run_tag]

    def metadata(self) -> dict[str, str]:
        """Key/value form for Nova server metadata and Cinder volume metadata."""
        return {
            f"{_META_PREFIX}run_id": self.run_id,
            f"{_META_PREFIX}pipeline": self.pipeline,
            f"{_META_PREFIX}creator": self.creator[:255],
            f"{_META_PREFIX}expires_at": self.expires_at.astimezone(UTC).isoformat(timespec="seconds"),
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> Ownership | None:
        """The ownership stamped in ``metadata``, or None if it is not (validly) there."""
        try:
            return cls(
                run_id=metadata[f"{_META_PREFIX}run_id"],
                pipeline=metadata[f"{_META_PREFIX}pipeline"],
                creator=metadata[f"{_META_PREFIX}creator"],
                expires_at=datetime.fromisoformat(metadata[f"{_META_PREFIX}expires_at"]),
            )
        except (KeyError, ValueError, InvalidRequest):
            return None

    def is_expired(self, now: datetime | None = None, grace: timedelta = timedelta(0)) -> bool:
        return (now or datetime.now(UTC)) > self.expires_at + grace


@dataclass(frozen=True)
class LeaseRenewal:
    """A heartbeat's renewal of a run's lease, stamped on its servers and volumes beside the
    ownership: the new ``expires_at``, when and by which host. The host tells a reaper that a
    run whose processes on the reaper's host are gone is still held elsewhere."""

    expires_at: datetime
    renewed_at: datetime
    renewed_by: str  # host name of the renewing process
    renewed_pid: int = 0  # ... and its pid (0: not known)

    def metadata(self) -> dict[str, str]:
        """The keys a renewal writes (``expires_at`` replaces the ownership's)."""
        return {
            f"{_META_PREFIX}expires_at": self.expires_at.astimezone(UTC).isoformat(timespec="seconds"),
            f"{_META_PREFIX}renewed_at": self.renewed_at.astimezone(UTC).isoformat(timespec="seconds"),
            f"{_META_PREFIX}renewed_by": self.renewed_by[:255],
            f"{_META_PREFIX}renewed_pid": str(self.renewed_pid),
        }

    def check_extends(self, due_before: datetime) -> None:
        """Raise InvalidRequest unless renewing leases that end before ``due_before`` extends them."""
        if due_before > self.expires_at:
            raise InvalidRequest(
                f"renewing leases due before {due_before:%Y-%m-%d %H:%M:%S} UTC to "
                f"{self.expires_at:%Y-%m-%d %H:%M:%S} UTC would shorten them",
                hint="Pass a due_before no later than the renewal's expires_at.")

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> LeaseRenewal | None:
        """The last renewal stamped in ``metadata``, or None if the lease was never renewed or
        the stamp is not one slipstream writes (a time without a zone cannot be compared)."""
        try:
            renewal = cls(datetime.fromisoformat(metadata[f"{_META_PREFIX}expires_at"]),
                          datetime.fromisoformat(metadata[f"{_META_PREFIX}renewed_at"]),
                          metadata[f"{_META_PREFIX}renewed_by"], int(metadata.get(f"{_META_PREFIX}renewed_pid", 0)))
        except (KeyError, ValueError, TypeError):
            return None
        if renewal.expires_at.tzinfo is None or renewal.renewed_at.tzinfo is None:
            return None
        return renewal


@dataclass(frozen=True)
class Flavor:
    """A flavour as the cloud offers it. ``gpus`` is a fraction of an A100 (0.25 for g3.medium)."""

    name: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    gpus: float = 0.0

    @property
    def family(self) -> str:
        """The Jetstream2 family ("m3", "r3", "g3", ...): the part of the name before the dot."""
        return self.name.split(".", 1)[0]


@dataclass(frozen=True)
class Image:
    id: str
    name: str
    login_user: str = "ubuntu"


@dataclass(frozen=True)
class ServerSpec:
    """What to boot: ``count`` identical servers, created in one call.

    Servers of a batch are named ``{name}-{i}`` (i from 1), as Nova names multi-create servers.
    """

    name: str
    flavor: str
    image: str
    count: int = 1
    key_name: str | None = None
    user_data: str | None = field(default=None, repr=False)  # may carry a worker's TLS key: never in a repr
    network: str = "auto_allocated_network"
    security_groups: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.name, "server name")
        if not isinstance(self.count, int) or self.count < 1:
            raise InvalidRequest(
                f"server count must be a positive whole number, got {self.count!r}",
                resource=self.name,
                hint="Ask for at least 1 server.",
            )

    def server_names(self) -> list[str]:
        if self.count == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(1, self.count + 1)]


@dataclass(frozen=True)
class Server:
    """A server as last seen. ``address`` is how slipstream reaches it (a floating IP if any)."""

    id: str
    name: str
    status: ServerStatus
    flavor: str
    image: str
    address: str | None = None
    floating_ip: str | None = None
    key_name: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    fault: str | None = None
    created_at: datetime | None = None
    ssh_port: int = 22
    ssh_user: str = "ubuntu"

    @property
    def ownership(self) -> Ownership | None:
        return Ownership.from_metadata(self.metadata)

    @property
    def reachable_address(self) -> str | None:
        return self.floating_ip or self.address


@dataclass(frozen=True)
class Keypair:
    """An SSH public key registered with the cloud. Nova keypairs carry no tags or metadata, so
    slipstream's ownership lives in the name: ``slipstream-<run id>``, and only for run ids of the
    form slipstream makes (:func:`is_made_run_id`) — a researcher's own ``slipstream-laptop`` key
    is never slipstream's."""

    name: str
    fingerprint: str
    public_key: str

    @staticmethod
    def name_for_run(run_id: str) -> str:
        if not is_made_run_id(run_id):
            raise InvalidRequest(
                f"run id {run_id!r} cannot own a keypair",
                hint="Keypairs carry no tags, so slipstream owns only keys named slipstream-<run id> "
                     "for a Prefect flow-run id or an id Ownership.new generated; let Ownership.new "
                     "choose the run id (or pass the flow run's id).")
        return f"{_KEY_PREFIX}{run_id}"

    @staticmethod
    def run_of(name: str) -> str | None:
        """The run owning a keypair named ``name``, or None if slipstream does not own it."""
        suffix = name[len(_KEY_PREFIX):] if isinstance(name, str) and name.startswith(_KEY_PREFIX) else ""
        return suffix if is_made_run_id(suffix) else None

    @property
    def run_id(self) -> str | None:
        return Keypair.run_of(self.name)



@dataclass(frozen=True)
class FloatingIP:
    id: str
    address: str
    server_id: str | None = None
    tags: tuple[str, ...] = ()

    @property
    def run_id(self) -> str | None:
        return _run_id_from_tags(self.tags)


@dataclass(frozen=True)
class Volume:
    id: str
    name: str
    size_gb: int
    status: str
    metadata: dict[str, str] = field(default_factory=dict)
    attached_to: str | None = None

    @property
    def ownership(self) -> Ownership | None:
        return Ownership.from_metadata(self.metadata)


def _run_id_from_tags(tags: tuple[str, ...] | list[str]) -> str | None:
    if OWNER_TAG not in tags:
        return None
    for tag in tags:
        if tag.startswith(RUN_TAG_PREFIX):
            return tag[len(RUN_TAG_PREFIX):]
    return None
