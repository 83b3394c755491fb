"""Fault injection at the HTTP layer, in front of the lab's real services.

The lab's Nova, Neutron and Cinder are instant and never flaky; Jetstream2's are neither. An
:class:`HttpFaults` is mounted on one OpenStackCloud's requests session (the transport under
keystoneauth) and, for the requests a rule matches, answers in the cloud's place or changes the
real answer on its way back; every other request goes to the lab untouched. Canned bodies are
the shapes Nova and Cinder really send (from their source: ``nova/api/openstack/wsgi.py``'s
faults, ``cinder/exception.py``, ``cinder/volume/api.py``), never invented ones::

    with http_faults(lab_cloud) as faults:
        burst = faults.burst("GET", r"/servers/detail", seconds=6, retry_after=2)
        wait_for_servers(...)
    assert burst.hits

Used only by tests; installs nothing on the lab and listens nowhere.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import requests
from requests.adapters import HTTPAdapter

Forward = Callable[[], requests.Response]
VOLUME = r"/volumes/[0-9a-f-]{36}(\?|$)"  # one volume (the SDK adds ?cascade=...&force=...)
VOLUME_READS = rf"/volumes(/detail)?(\?|$)|{VOLUME}"
#: Cinder's answer to deleting a volume whose status is not available/error/... (``creating``,
#: ``deleting``, ``error_deleting``): ``InvalidVolume`` from cinder/volume/api.py's delete (Zed).
CINDER_INVALID_VOLUME = (
    "Invalid volume: Volume status must be available or error or error_restoring or "
    "error_extending or error_managing and must not be migrating, attached, belong to a "
    "group, have snapshots, awaiting a transfer, or be disassociated from snapshots after "
    "volume transfer.")
Responder = Callable[[requests.PreparedRequest, Forward], requests.Response]


def canned(request: requests.PreparedRequest, status: int, body: dict | None = None,
           headers: dict | None = None) -> requests.Response:
    """A response as the service would send it (JSON body, request id header)."""
    resp = requests.Response()
    resp.status_code = status
    resp.reason = {202: "Accepted", 400: "Bad Request", 429: "Too Many Requests", 503: "Service Unavailable"}.get(status, "")
    resp.headers.update({"Content-Type": "application/json", "X-Openstack-Request-Id": "req-injected",
                         **(headers or {})})
    resp._content = json.dumps(body).encode() if body is not None else b""
    resp.encoding = "utf-8"
    resp.url, resp.request = request.url, request
    return resp


#: HAProxy's built-in error pages (src/http.c), the bodies a balancer answers with by itself.
BALANCER_PAGES = {
    429: "<html><body><h1>429 Too Many Requests</h1>\nYou have sent too many requests in a given "
         "amount of time.\n</body></html>\n",
    503: "<html><body><h1>503 Service Unavailable</h1>\nNo server is available to handle this "
         "request.\n</body></html>\n",
}


def balancer_page(request: requests.PreparedRequest, status: int, headers: dict) -> requests.Response:
    resp = canned(request, status, None, {"Content-Type": "text/html", "Cache-Control": "no-cache", **headers})
    del resp.headers["X-Openstack-Request-Id"]
    resp._content = BALANCER_PAGES.get(status, f"<html><body><h1>{status}</h1></body></html>\n").encode()
    return resp


def rewritten(resp: requests.Response, change: Callable[[dict], None]) -> requests.Response:
    """The real response with its JSON body changed by ``change`` (in place)."""
    if resp.status_code < 300 and resp.content:
        body = resp.json()
        change(body)
        resp._content = json.dumps(body).encode()
        resp.headers["Content-Length"] = str(len(resp._content))
    return resp


@dataclass
class Rule:
    method: str
    path: re.Pattern
    respond: Responder
    hits: list[float] = field(default_factory=list)  # monotonic times of the requests it took

    def matches(self, request: requests.PreparedRequest) -> bool:
        return request.method == self.method and bool(self.path.search(request.path_url))


class HttpFaults(HTTPAdapter):
    """Answers matched requests itself (or edits the real answer); passes the rest through."""

    def __init__(self, inner: HTTPAdapter) -> None:
        super().__init__()
        self.inner = inner
        self.rules: list[Rule] = []
        self._lock = threading.Lock()

    def send(self, request, **kwargs):  # noqa: ANN001 - requests' own signature
        return self.dispatch(request, lambda: self.inner.send(request, **kwargs))

    def dispatch(self, request: requests.PreparedRequest, forward: Forward) -> requests.Response:
        with self._lock:
            rule = next((r for r in self.rules if r.matches(request)), None)
            if rule is not None:
                rule.hits.append(time.monotonic())
        return rule.respond(request, forward) if rule else forward()

    def add(self, method: str, path: str, respond: Responder) -> Rule:
        rule = Rule(method, re.compile(path), respond)
        self.rules.append(rule)
        return rule

    # the weather ----------------------------------------------------------------------------
    def burst(self, method: str, path: str, *, seconds: float, status: int = 503,
              retry_after: float | None = None) -> Rule:
        """``status`` for ``seconds`` from now, as the load balancer in front of the services
        sends it (HAProxy's own HTML page, no OpenStack request id: the request never reached
        the service)."""
        until = time.monotonic() + seconds
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}

        def respond(request, forward):
            if time.monotonic() < until:
                return balancer_page(request, status, headers)
            return forward()

        rule = self.add(method, path, respond)
        rule.until = until  # type: ignore[attr-defined]
        return rule

    def slow_cinder_delete(self, seconds: float) -> Rule:
        """Cinder's DELETE /volumes/{id} is accepted (202) at once and carried out ``seconds`` later,
        as a busy Ceph backend does; meanwhile listings show the volume ``deleting`` — the status
        cinder-api itself sets before it hands the delete to cinder-volume."""
        pending: set[str] = set()
        timers: list[threading.Timer] = []

        def delete(request, forward):
            volume_id = _volume_id(request)
            if volume_id in pending:  # Cinder refuses a second delete of a `deleting` volume
                return _invalid_volume(request)
            pending.add(volume_id)

            def later() -> None:
                forward()
                pending.discard(volume_id)

            timer = threading.Timer(seconds, later)
            timers.append(timer)
            timer.start()
            return canned(request, 202)

        def show_deleting(body: dict) -> None:
            for volume in body.get("volumes", []) + ([body["volume"]] if "volume" in body else []):
                if volume.get("id") in pending:
                    volume["status"] = "deleting"
                    listed_deleting.append(volume["id"])

        listed_deleting: list[str] = []
        rule = self.add("DELETE", VOLUME, delete)
        self.add("GET", VOLUME_READS, lambda request, forward: rewritten(forward(), show_deleting))
        rule.listed_deleting = listed_deleting  # type: ignore[attr-defined]
        rule.timers = timers  # type: ignore[attr-defined]
        return rule

    def cinder_stuck(self, volume_ids: set[str], status: str) -> Rule:
        """Volumes Cinder holds in ``status`` for the rest of the block — ``deleting`` on a hung
        backend, ``error_deleting`` after the backend failed the delete (only an admin's
        reset-state gets either out): listings show the status and every DELETE of them is refused
        with 400 ``InvalidVolume``, as cinder-api refuses any volume not available or error."""
        def show(body: dict) -> None:
            for volume in body.get("volumes", []) + ([body["volume"]] if "volume" in body else []):
                if volume.get("id") in volume_ids:
                    volume["status"] = status

        rule = self.add("DELETE", VOLUME, lambda request, forward: _invalid_volume(request)
                        if _volume_id(request) in volume_ids else forward())
        self.add("GET", VOLUME_READS, lambda request, forward: rewritten(forward(), show))
        return rule

    def cinder_busy_once(self, message: str) -> Rule:
        """The first DELETE of each volume is refused as Cinder refuses a volume still `creating`
        (400, ``InvalidVolume``); later ones reach the lab."""
        refused: set[str] = set()

        def respond(request, forward):
            volume_id = _volume_id(request)
            if volume_id in refused:
                return forward()
            refused.add(volume_id)
            return canned(request, 400, {"badRequest": {"code": 400, "message": message}})

        return self.add("DELETE", VOLUME, respond)

    def nova_fault(self, change: Callable[[dict], dict | None]) -> Rule:
        """The ``fault`` of every ERROR server, as listings and GETs show it, replaced by
        ``change(server)`` (``None``: no fault, as before Nova writes it)."""
        def edit(body: dict) -> None:
            for server in body.get("servers", []) + ([body["server"]] if "server" in body else []):
                if server.get("status") == "ERROR":
                    fault = change(server)
                    if fault is None:
                        server.pop("fault", None)
                    else:
                        server["fault"] = fault

        return self.add("GET", r"/servers/detail|/servers/[0-9a-f-]{36}$",
                        lambda request, forward: rewritten(forward(), edit))


def _invalid_volume(request: requests.PreparedRequest) -> requests.Response:
    return canned(request, 400, {"badRequest": {"code": 400, "message": CINDER_INVALID_VOLUME}})


def _volume_id(request: requests.PreparedRequest) -> str:
    return request.path_url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


@contextmanager
def http_faults(cloud) -> Iterator[HttpFaults]:
    """Mount an :class:`HttpFaults` on ``cloud``'s HTTP session for the ``with`` block."""
    session: requests.Session = cloud.conn.session.session
    inner = session.get_adapter("http://127.0.0.1/")
    faults = HttpFaults(inner)
    session.mount("http://", faults)
    try:
        yield faults
    finally:
        session.mount("http://", inner)
        for rule in faults.rules:
            for timer in getattr(rule, "timers", []):
                timer.join(timeout=60)  # a held delete still reaches the lab before we leave


@contextmanager
def http_faults_in_process() -> Iterator[HttpFaults]:
    """The same rules for every session this process opens in the block — for what happens
    inside :func:`connect` (the token request and its catalogue) before a cloud exists."""
    original = HTTPAdapter.send
    faults = HttpFaults(HTTPAdapter())

    def send(adapter, request, **kwargs):  # noqa: ANN001
        return faults.dispatch(request, lambda: original(adapter, request, **kwargs))

    HTTPAdapter.send = send  # type: ignore[method-assign]
    try:
        yield faults
    finally:
        HTTPAdapter.send = original  # type: ignore[method-assign]


def with_regions(*regions: str) -> Responder:
    """Keystone's token answer with every endpoint also offered in ``regions`` (same URLs), as
    Jetstream2's shared Keystone lists IU, ASU, Cornell, TACC and UH."""
    def add(body: dict) -> None:
        for service in body["token"].get("catalog", []):
            extra = [{**ep, "id": f"{ep['id']}-{region}", "region_id": region, "region": region}
                     for ep in service["endpoints"] for region in regions]
            service["endpoints"] += extra

    return lambda request, forward: rewritten(forward(), add)
