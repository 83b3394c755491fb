"""The budget watchdog: while a run holds servers, meter what it has spent and act on it.

A background thread that, every ``interval`` seconds, lists the run's servers on the cloud (one
call, by run id), reads each one's state log and meters it at Jetstream2 rates
(:func:`slipstream.cost.accounting.meter_log`) — servers it saw earlier are still counted after they
are deleted (their final cost, read once), so the total never goes down. Then:

- ``on_threshold(fraction, spent, budget)`` once for each configured share of the budget the run
  has crossed (in order, also when one round crosses several);
- ``on_exhausted(spent, budget)`` once, when ``spent >= budget``; the watchdog stops watching.
  The caller decides what that means — the flows tear the run down (``teardown_run``) and fail
  with a "budget spent" error.

One failed round (the cloud did not answer) is logged and the next round tries again. The thread
is a daemon, stops on :meth:`BudgetWatchdog.stop` or after ``max_seconds``, and never outlives
its ``with`` block::

    with BudgetWatchdog(cloud, run_id, budget_su=10, interval=60,
                        on_threshold=warn, on_exhausted=tear_down):
        ...  # the run's work

No Prefect here: the Prefect layer (``tasks/budget.py``) turns the callbacks into events.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from slipstream.cost.accounting import burn_rate, meter_log
from slipstream.cloud.models import Flavor, ServerStatus
from slipstream.cloud.port import CloudProvider
from slipstream.periodic import Periodic

log = logging.getLogger("slipstream.cost.watchdog")

#: Shares of the run budget at which the watchdog warns, unless an allocation says otherwise.
WARNING_THRESHOLDS: tuple[float, ...] = (0.5, 0.8, 0.9)

ThresholdCallback = Callable[[float, float, float], None]
"""Told ``(fraction, spent_su, budget_su)`` when the run crosses ``fraction`` of its budget."""
ExhaustedCallback = Callable[[float, float], None]
"""Told ``(spent_su, budget_su)`` once, when the run has spent its budget."""


class BudgetWatchdog:
    def __init__(
        self,
        cloud: CloudProvider,
        run_id: str,
        budget_su: float,
        *,
        thresholds: Iterable[float] = WARNING_THRESHOLDS,
        interval: float = 60.0,
        on_threshold: ThresholdCallback | None = None,
        on_exhausted: ExhaustedCallback | None = None,
        max_seconds: float = 7 * 24 * 3600.0,
    ) -> None:
        if not budget_su > 0:  # also nan, which no spend would ever reach
            raise ValueError(f"budget_su must be positive, got {budget_su!r}")
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        self.cloud = cloud
        self.run_id = run_id
        self.budget_su = budget_su
        self.thresholds = tuple(sorted(set(thresholds)))
        self.interval = interval
        self.on_threshold = on_threshold
        self.on_exhausted = on_exhausted
        self.spent = 0.0
        self.su_per_hour = 0.0
        self.crossed: list[float] = []
        self.exhausted = False
        self.rounds = 0
        self._watching: dict[str, tuple[str, str]] = {}  # server id -> (name, flavour), not yet deleted
        self._settled_su = 0.0  # what deleted servers cost: their state logs no longer change
        self._catalogue: dict[str, Flavor] | None = None  # flavours do not change during a run
        self._rounds = Periodic(f"budget-watchdog-{run_id}", self.check, interval, on_error=self._round_failed,
                                finished=lambda: self.exhausted, max_seconds=max_seconds)

    # one round -------------------------------------------------------------------------------
    def check(self) -> float:
        """Meter the run once and fire the callbacks it calls for; returns the SUs spent."""
        servers = self.cloud.list_servers(run_id=self.run_id)
        if self._catalogue is None:
            self._catalogue = {f.name: f for f in self.cloud.list_flavors()}
        for s in servers:
            self._watching.setdefault(s.id, (s.name, s.flavor))
        listed = {s.id for s in servers}
        running_su = 0.0
        for server_id, (name, flavor) in list(self._watching.items()):
            state_log = self.cloud.state_log(server_id)
            su = meter_log(name, self._catalogue[flavor], state_log).su
            if server_id not in listed and state_log and state_log[-1][0] == ServerStatus.DELETED:
                self._settled_su += su  # final: never read its log again
                del self._watching[server_id]
            else:
                running_su += su
        self.spent = max(self.spent, self._settled_su + running_su)
        self.su_per_hour = burn_rate(servers, self._catalogue)
        self.rounds += 1
        for fraction in self.thresholds:
            if fraction not in self.crossed and self.spent >= fraction * self.budget_su:
                self.crossed.append(fraction)
                log.warning("run %s has spent %.0f %% of its budget: %.4f of %.4f SU (burning %.2f SU/h)",
                            self.run_id, fraction * 100, self.spent, self.budget_su, self.su_per_hour)
                if self.on_threshold:
                    self.on_threshold(fraction, self.spent, self.budget_su)
        if not self.exhausted and self.spent >= self.budget_su:
            self.exhausted = True
            log.error("run %s has spent its budget: %.4f of %.4f SU", self.run_id, self.spent, self.budget_su)
            if self.on_exhausted:
                self.on_exhausted(self.spent, self.budget_su)
        return self.spent

    # the thread ------------------------------------------------------------------------------
    def start(self) -> BudgetWatchdog:
        self._rounds.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop watching and wait (at most ``timeout`` s) for a round in progress to finish."""
        if not self._rounds.stop(timeout):
            log.warning("budget watchdog of run %s still busy after %.0f s; left as a daemon", self.run_id, timeout)

    @property
    def running(self) -> bool:
        return self._rounds.running

    @property
    def failed_rounds(self) -> int:
        return self._rounds.failed

    def _round_failed(self, err: Exception) -> None:  # one bad round (cloud hiccup) must not end the watch
        log.warning("budget check of run %s failed (will try again in %.0f s): %s", self.run_id, self.interval, err)

    def __enter__(self) -> BudgetWatchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
