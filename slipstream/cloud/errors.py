"""One error hierarchy for every cloud slipstream talks to.

Adapters translate their native failures (HTTP codes, SDK exceptions, Nova faults) into these so
that flows, retries and the reaper can decide what to do without knowing which cloud answered:

- :class:`TransientError` — worth retrying (5xx, timeouts, connection resets).
- :class:`QuotaExceeded` — the project's quota would be exceeded; retrying will not help.
- :class:`CapacityError` — the cloud has no host for this flavour right now ("No valid host was
  found", typical for GPU flavours); another flavour or region may work.
- :class:`NotFound`, :class:`Conflict`, :class:`InvalidRequest` — as their names say.
- :class:`WaitTimeout` — a resource did not reach the wanted state before its deadline.
- :class:`ServerFailed` — a server went to ERROR.
- :class:`BudgetExceeded` — a plan would cost more SUs than the run budget or the balance allows,
  or a run spent its budget.

Every error carries the resource, the cloud and a hint that tells the user what to do next.
"""

from __future__ import annotations


class CloudError(Exception):
    """Base of every cloud failure. ``str(err)`` is a complete sentence for the user."""

    def __init__(
        self,
        message: str,
        *,
        resource: str | None = None,
        cloud: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.resource = resource
        self.cloud = cloud
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.resource:
            where.append(self.resource)
        if self.cloud:
            where.append(f"on {self.cloud}")
        text = f"{self.message} ({' '.join(where)})" if where else self.message
        return f"{text}. {self.hint}" if self.hint else text


class TransientError(CloudError):
    """A failure that may go away on its own: retry with backoff. ``retry_after`` is how many
    seconds the cloud asked to wait (its ``Retry-After`` header), when it said."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kwargs)


class QuotaExceeded(CloudError):
    """The request would exceed a project quota (instances, cores, RAM, floating IPs, ...)."""


class CapacityError(CloudError):
    """The cloud has no host that can take this flavour now ("No valid host was found")."""


class NotFound(CloudError):
    """The resource does not exist (or no longer exists)."""


class Conflict(CloudError):
    """The resource is in a state that does not allow the operation (e.g. shelving a BUILD server)."""


class InvalidRequest(CloudError):
    """The request itself is wrong: unknown flavour or image, bad name, bad count."""


class WaitTimeout(CloudError):
    """A resource did not reach the wanted state before the deadline."""


class BudgetExceeded(CloudError):
    """A plan's worst case is over the run budget or the allocation's balance (refused before
    anything is created), or a running job spent its budget (torn down)."""


class ServerFailed(CloudError):
    """A server went to ERROR. ``fault`` holds the cloud's own explanation."""

    def __init__(self, message: str, *, fault: str | None = None, **kwargs) -> None:
        self.fault = fault
        super().__init__(message, **kwargs)
