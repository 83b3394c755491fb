"""What to do with a worker VM the pool no longer needs: delete it, or park it until work is back.

On Jetstream2 a server is charged in every state but one: ACTIVE 100 %, SUSPENDED 75 %, SHUTOFF
(stopped) 50 %, SHELVED 0 % (:data:`slipstream.jetstream2.CHARGE_FRACTION`). Deleting also costs
nothing, but the next worker must then boot from scratch and install its software again (for a
Dask or Slurm worker that is minutes of ACTIVE, charged time). A *shelved* worker keeps its disk,
costs nothing, and comes back with its software in place. So, for a pool expected back soon,
shelving beats deleting::

    IdlePolicy(action=IdleAction.SHELVE, park_when_back_within_seconds=2 * 3600)

parks a released worker when the next burst of work is expected within two hours, deletes it
otherwise, and deletes any worker parked for longer than ``max_parked_seconds``.

Jetstream2 forbids suspending GPU VMs (and large-memory ones, :data:`NEVER_SUSPEND_FAMILIES`):
asking for ``SUSPEND`` on a g3 pool is refused when the pool is configured, before anything
exists. Suspend is not offered for other flavours either — the provider port has no suspend call,
and at 75 % of the rate it is never the cheap choice; shelve instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.models import ServerStatus
from slipstream.jetstream2 import CHARGE_FRACTION, NEVER_SUSPEND_FAMILIES


class IdleAction(StrEnum):
    DELETE = "delete"
    SHELVE = "shelve"    # 0 % of the rate on Jetstream2; the disk (and installed software) stays
    STOP = "stop"        # 50 %: only worth it where shelving is not allowed
    SUSPEND = "suspend"  # 75 %, never for GPU VMs: refused at configuration time


#: The status a parked worker sits in, for each way of parking.
PARKED_STATUS: dict[IdleAction, ServerStatus] = {
    IdleAction.SHELVE: ServerStatus.SHELVED_OFFLOADED,
    IdleAction.STOP: ServerStatus.SHUTOFF,
    IdleAction.SUSPEND: ServerStatus.SUSPENDED,
}


@dataclass(frozen=True)
class IdlePolicy:
    """How a pool lets go of workers it no longer needs.

    - ``action``: ``DELETE`` (default) or a way of parking (``SHELVE``, ``STOP``).
    - ``park_when_back_within_seconds``: park only when more work is expected within this many
      seconds (the pool's forecast); when the forecast is unknown or later, delete. Default 1 h.
    - ``max_parked_seconds``: delete a worker parked longer than this. Default 24 h (a shelved
      image is free in SUs but still holds quota: Nova counts it as an instance).
    - ``max_parked``: at most this many parked workers (None: no limit beyond the pool's maximum).
    """

    action: IdleAction = IdleAction.DELETE
    park_when_back_within_seconds: float = 3600.0
    max_parked_seconds: float = 24 * 3600.0
    max_parked: int | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "action", IdleAction(self.action))
        except ValueError:
            raise InvalidRequest(f"idle action {self.action!r} is unknown",
                                 hint=f"Use one of: {', '.join(a.value for a in IdleAction)}.") from None
        if self.park_when_back_within_seconds < 0 or self.max_parked_seconds < 0:
            raise InvalidRequest("park_when_back_within_seconds and max_parked_seconds must be >= 0")
        if self.max_parked is not None and self.max_parked < 0:
            raise InvalidRequest(f"max_parked must be >= 0 or None, got {self.max_parked!r}")

    @property
    def parks(self) -> bool:
        return self.action != IdleAction.DELETE

    @property
    def parked_status(self) -> ServerStatus | None:
        return PARKED_STATUS.get(self.action)

    @property
    def parked_charge_fraction(self) -> float:
        """The share of the ACTIVE rate a parked worker still costs (1.0 for none: it is deleted)."""
        status = self.parked_status
        return CHARGE_FRACTION[status] if status else 0.0

    def check_flavors(self, flavors: Iterable[str]) -> None:
        """Refuse an idle action the pool's flavours cannot take, before anything is created."""
        if self.action != IdleAction.SUSPEND:
            return
        names = list(flavors)
        forbidden = [f for f in names if f.split(".", 1)[0] in NEVER_SUSPEND_FAMILIES]
        if forbidden:
            raise InvalidRequest(
                f"idle action 'suspend' is not allowed for {', '.join(forbidden)}",
                resource="idle policy",
                hint="Jetstream2 never suspends GPU or large-memory VMs; use action='shelve' "
                     "(0 SU while parked) or 'delete'.")
        raise InvalidRequest(
            "idle action 'suspend' is not offered", resource="idle policy",
            hint="A suspended VM still costs 75 % of its rate; use action='shelve' (0 SU) or 'delete'.")

    def on_release(self, next_work_in: float | None, parked_now: int = 0) -> IdleAction:
        """What to do with a worker the pool just let go, given when work is expected back."""
        if not self.parks:
            return IdleAction.DELETE
        if self.max_parked is not None and parked_now >= self.max_parked:
            return IdleAction.DELETE
        if next_work_in is None or next_work_in > self.park_when_back_within_seconds:
            return IdleAction.DELETE
        return self.action

    def parked_too_long(self, parked_for_seconds: float) -> bool:
        return parked_for_seconds > self.max_parked_seconds

