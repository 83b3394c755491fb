"""The one place where openstacksdk and keystoneauth failures become slipstream errors.

Every call OpenStackCloud sends goes through :func:`sdk_errors`, a context manager that turns
whatever the SDK raises into the :mod:`slipstream.cloud.errors` hierarchy, with the resource, the
cloud and a next step for the user:

=====================================================  =======================================
SDK / HTTP                                             slipstream
=====================================================  =======================================
connection refused/reset, timeouts, 5xx, 429           :class:`TransientError` (+ ``retry_after``)
"Quota exceeded" (Nova 403, Neutron 409, Cinder 413)   :class:`QuotaExceeded` (before Retry-After)
413 with a positive Retry-After (a rate limit)         :class:`TransientError`
401 (token refused)                                    :class:`CredentialError`
404, ``ResourceNotFound``                              :class:`NotFound`
409, 400 "status must be ..." / "in use"               :class:`Conflict`
400, 403 (policy), other 4xx, no endpoint for region   :class:`InvalidRequest`
``ResourceTimeout`` / ``ResourceFailure``              :class:`WaitTimeout` / :class:`ServerFailed`
=====================================================  =======================================

Messages carry the service's own explanation (Nova's "Quota exceeded for cores: Requested 64,
but already used 0 of 20 cores") but never request bodies, so never a secret.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import requests
from keystoneauth1 import exceptions as ks_exc
from openstack import exceptions as sdk_exc

from slipstream.cloud.errors import (
    CloudError,
    Conflict,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    ServerFailed,
    TransientError,
    WaitTimeout,
)

_QUOTA = re.compile(
    r"quota exceeded|exceeds? (the )?allowed|over ?quota|exceeded for quota|quotaerror",
    re.IGNORECASE,
)
_BUSY = re.compile(
    r"status must be|is in use|in-use|invalid state|task_state|vm_state|cannot '\w+' instance",
    re.IGNORECASE,
)

HINTS = {
    TransientError: "The cloud did not answer properly; this usually passes, and slipstream retries it.",
    QuotaExceeded: "Delete what you no longer need (`slipstream reap`), ask for less, or request a "
    "larger quota (on Jetstream2: a ticket to help@jetstream-cloud.org).",
    NotFound: "It was deleted or never existed; `slipstream ls` shows what the run still has.",
    Conflict: "Wait until the resource's current operation has finished, then try again.",
    InvalidRequest: "Check the request's names and sizes against what the cloud offers.",
}


class CredentialError(InvalidRequest):
    """The cloud refused the credentials, or they cannot work as configured (see the hint)."""


EXPIRED_HINT = (
    "The application credential is wrong, deleted or expired. Make a new one in Horizon "
    "(Identity → Application Credentials) and set an expiration date: Horizon's default expiry "
    "is today, so a credential made without one stops working at midnight."
)


# The SDK raises some of these itself, without a response (e.g. "No Server found for x").
_STATUS_BY_CLASS: dict[type, int] = {
    sdk_exc.NotFoundException: 404,
    sdk_exc.ConflictException: 409,
    sdk_exc.BadRequestException: 400,
    sdk_exc.ForbiddenException: 403,
    sdk_exc.PreconditionFailedException: 412,
}


def _status(err: BaseException) -> int | None:
    if isinstance(err, sdk_exc.HttpException):
        return err.status_code
    return getattr(err, "http_status", None)


def retry_after(err: BaseException) -> float | None:
    """Seconds from the response's ``Retry-After`` (a number or an HTTP date), if it gave a finite
    one > 0; anything else a balancer may write there counts as not said."""
    value = (getattr(getattr(err, "response", None), "headers", None) or {}).get("Retry-After")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000" or no zone at all: HTTP dates are always GMT
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return seconds if 0 < seconds < math.inf else None


def _transient(make: Callable[..., CloudError], err: BaseException) -> CloudError:
    error = make(TransientError)
    error.retry_after = retry_after(err)  # type: ignore[attr-defined]
    return error


def _detail(err: BaseException) -> str:
    """The service's own explanation, without URLs or request ids when we can help it."""
    details = getattr(err, "details", None)
    if isinstance(details, str) and details.strip():
        return details.strip()
    message = getattr(err, "message", None)
    if isinstance(message, str) and message.strip() and message != "Error":
        return message.strip()
    return str(err) or type(err).__name__


def translate(err: BaseException, action: str, resource: str | None, cloud: str) -> CloudError:
    """The slipstream error for an SDK/keystoneauth/requests failure while doing ``action``."""
    if isinstance(err, CloudError):
        return err

    def make(
        kind: type[CloudError], detail: str | None = None, hint: str | None = None
    ) -> CloudError:
        text = f"{action} failed: {detail or _detail(err)}"
        return kind(text, resource=resource, cloud=cloud, hint=hint or HINTS.get(kind))

    if isinstance(err, sdk_exc.ResourceTimeout):
        return make(WaitTimeout, hint="Raise the timeout, or check the cloud's status page.")
    if isinstance(err, sdk_exc.ResourceFailure):
        return make(ServerFailed, hint="Its fault message or console log may say more.")
    if isinstance(err, (ks_exc.EndpointNotFound, sdk_exc.EndpointNotFound)):
        return make(
            InvalidRequest,
            hint="The project has no endpoint for this service in this region; pick a region "
            "your allocation includes (Jetstream2 grants IU by default, other regions on request).",
        )
    if isinstance(err, ks_exc.SSLError):
        return make(
            CloudError,
            hint="The cloud's TLS certificate was not accepted; check the auth URL and CA bundle.",
        )
    if isinstance(
        err,
        (
            ks_exc.ConnectionError,
            ks_exc.RetriableConnectionFailure,
            requests.ConnectionError,
            requests.Timeout,
        ),
    ):
        return make(TransientError)
    if isinstance(err, ks_exc.DiscoveryFailure):
        return make(
            TransientError,
            hint="The service's version document could not be read; retry, "
            "and check the auth URL if it keeps failing.",
        )

    status = _status(err) or _STATUS_BY_CLASS.get(type(err))
    detail = _detail(err)
    if status is None:
        return make(CloudError, hint="This is unexpected; the message above is the SDK's own.")
    if status == 401:
        return make(CredentialError, hint=EXPIRED_HINT)
    if status == 429 or status >= 500:
        return _transient(make, err)
    # Quota before Retry-After: Cinder answers every quota error with 413 *and* "Retry-After: 0".
    if _QUOTA.search(detail):
        return make(QuotaExceeded)
    if status == 413:  # a rate limit says how long to wait; a bare 413 is a quota
        return _transient(make, err) if retry_after(err) else make(QuotaExceeded)
    if status == 404:
        return make(NotFound)
    if status == 409:
        return make(Conflict)
    if status == 403:
        return make(
            InvalidRequest,
            hint="The cloud's policy does not allow this for your role; ask "
            "the project's administrator (on Jetstream2, the allocation's PI).",
        )
    if status == 400 and _BUSY.search(detail):
        return make(Conflict)
    return make(InvalidRequest)


@contextmanager
def sdk_errors(action: str, *, cloud: str, resource: str | None = None) -> Iterator[None]:
    """Run the block and re-raise any SDK failure as a slipstream :class:`CloudError`.

    SDK list calls are lazy generators: consume them (``list(...)``) inside the block.
    """
    try:
        yield
    except CloudError:
        raise
    except (sdk_exc.SDKException, ks_exc.ClientException, requests.RequestException) as err:
        raise translate(err, action, resource, cloud) from err
