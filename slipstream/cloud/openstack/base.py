"""Plumbing every OpenStackCloud operation shares: the connection, the request counter, the
error seam, catalogue caches and the ownership guard."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import openstack.connection

from slipstream.cloud.errors import InvalidRequest, NotFound
from slipstream.cloud.models import OWNER_TAG
from slipstream.cloud.openstack.errors import sdk_errors
from slipstream.jetstream2 import EXTERNAL_NETWORK
from slipstream.retry import DEFAULT_RETRY, RetryPolicy, retry

log = logging.getLogger("slipstream.openstack")
T = TypeVar("T")


class OpenStackBase:
    """State and helpers; the operations live in the mixins that make up ``OpenStackCloud``."""

    def __init__(
        self,
        conn: openstack.connection.Connection,
        *,
        name: str | None = None,
        region: str | None = None,
        external_network: str = EXTERNAL_NETWORK,
        exosphere_metadata: bool = False,
        username: str | None = None,
        read_retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        self.conn = conn
        self.region = region or conn.config.region_name or "default"
        self.name = name or f"openstack:{self.region}"
        self.external_network = external_network
        self.exosphere_metadata = exosphere_metadata
        self.username = username
        self.read_retry = read_retry
        self.api_calls = 0
        self._count_lock = threading.Lock()
        conn.session.session.hooks.setdefault("response", []).append(self._count_request)
        # catalogue caches (names are stable; ids of what we created need no re-check)
        self._flavors: dict[str, Any] | None = None
        self._images: dict[str, Any] | None = None
        self._image_names: dict[str, str] = {}
        self._networks: dict[tuple[str, bool], str] = {}
        self._group_ids: dict[str, str] = {}  # security group name -> the id Nova gets
        self._faults: dict[str, str] = {}  # server id -> Nova's fault message
        self._unshelving: set[str] = set()  # servers slipstream asked to unshelve, not yet settled
        self._owned: dict[str, set[str]] = {"server": set(), "floating_ip": set(), "volume": set()}

    def _count_request(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        with self._count_lock:
            self.api_calls += 1
        return response

    def close(self) -> None:
        self.conn.close()

    def __repr__(self) -> str:
        return f"<OpenStackCloud {self.name}>"

    # the one seam ------------------------------------------------------------------
    def _call(self, action: str, fn: Callable[[], T], resource: str | None = None) -> T:
        """Send one request (or consume one listing) with SDK errors translated."""
        with sdk_errors(action, cloud=self.name, resource=resource):
            return fn()

    def _read(
        self, action: str, fn: Callable[[], Iterable[T]], resource: str | None = None
    ) -> list[T]:
        """An idempotent listing, consumed inside the seam and retried on transient errors."""
        return retry(
            lambda: self._call(action, lambda: list(fn()), resource),
            self.read_retry,
            on_retry=lambda n, err, d: log.warning("%s: retry %d in %.1f s: %s", action, n, d, err),
        )

    # ownership guard ------------------------------------------------------------------
    def _remember(self, kind: str, res_id: str) -> None:
        self._owned[kind].add(res_id)

    def _ensure_owned(
        self, kind: str, res_id: str, fetch: Callable[[], Any], owned: Callable[[Any], bool]
    ) -> None:
        """Refuse to touch a resource slipstream did not create. Free for ids already seen."""
        if res_id in self._owned[kind]:
            return
        found = self._call(f"looking up {kind} {res_id}", fetch, res_id)
        if found is None:
            raise NotFound(f"{kind} does not exist", resource=res_id, cloud=self.name)
        if not owned(found):
            raise InvalidRequest(
                f"{kind} was not created by slipstream",
                resource=res_id,
                cloud=self.name,
                hint="slipstream only changes or deletes resources carrying its ownership tags.",
            )
        self._remember(kind, res_id)

    # catalogue caches --------------------------------------------------------------------
    def _flavor_by_name(self, refresh: bool = False) -> dict[str, Any]:
        if self._flavors is None or refresh:
            found = self._read("listing flavours", lambda: self.conn.compute.flavors(details=True))
            self._flavors = {f.name: f for f in found}
        return self._flavors

    def _image_by_name(self, refresh: bool = False) -> dict[str, Any]:
        if self._images is None or refresh:
            found = self._read("listing images", lambda: self.conn.image.images(limit=1000))
            self._images = {}
            for image in sorted(found, key=lambda i: str(i.created_at or "")):
                self._images[image.name] = image  # the newest image of a name wins, as in Horizon
                self._image_names[image.id] = image.name
        return self._images


def has_owner_tag(resource: Any) -> bool:
    return OWNER_TAG in (getattr(resource, "tags", None) or [])
