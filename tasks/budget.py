"""The budget in a flow: the guard before anything is created, the watchdog while the run works.

- :func:`check_budget` (a task) holds the plan's worst case to the run budget and the allocation's
  balance for each ACCESS resource, and fails the flow with
  :class:`~slipstream.cloud.errors.BudgetExceeded` before anything exists — unless the flow was
  given ``override_budget=True``, which logs a warning and goes ahead.
- :func:`start_budget_watchdog` meters the run while it holds servers and emits Prefect events
  ``slipstream.budget.threshold`` (payload: fraction, spent, budget, allocation, SU/hour) at each
  configured share of the budget; when the budget is spent it emits ``slipstream.budget.spent``,
  deletes everything the run owns (:func:`slipstream.ownership.lease.teardown_run`), and the flow then fails
  with a "budget spent" error. Automations can react to either event (e.g. notify the PI).

Events name the run as resource ``slipstream.run.<run id>`` with the flow run as a related resource.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from slipstream.blocks.allocation import load_allocation
from slipstream.cost.accounting import PlannedServers
from slipstream.cost.budget import Allocation, BudgetVerdict, check_plan, enforce
from slipstream.cloud.errors import BudgetExceeded
from slipstream.ownership.lease import Lease, teardown_run
from slipstream.cost.watchdog import WARNING_THRESHOLDS, BudgetWatchdog
from slipstream.tasks.events import run_event
from slipstream.tasks.heartbeat import run_heartbeat

THRESHOLD_EVENT = "slipstream.budget.threshold"
SPENT_EVENT = "slipstream.budget.spent"


def resolve_allocation(ref: str | None) -> Allocation | None:
    """The saved allocation a flow's ``allocation`` parameter names (None when empty)."""
    return load_allocation(ref) if ref else None


@task(name="check-budget", cache_policy=NONE)
def check_budget(
    plan: Sequence[PlannedServers], budget_su: float | None, allocation: Allocation | None, override: bool
) -> BudgetVerdict:
    """Refuse a plan whose worst case is over the run budget or a balance (unless overridden)."""
    logger = get_run_logger()
    balances = allocation.balances.read() if allocation and allocation.balances else None
    verdict = check_plan(plan, run_budget_su=budget_su, balances=balances,
                         allocation_id=allocation.allocation_id if allocation else None)
    if verdict.refused and override:
        logger.warning("over budget, running anyway (override_budget=True): %s", "; ".join(verdict.problems))
    elif not verdict.refused:
        logger.info("budget: %s", verdict.summary())
    return enforce(verdict, override=override)


def guard_budget(
    plan: Sequence[PlannedServers], budget_su: float | None, allocation: str | None, override: bool
) -> tuple[float | None, Allocation | None]:
    """A flow's guard in one call: load the ``allocation`` block it names, take the run budget
    from it when ``budget_su`` is not given, and check ``plan`` (raises BudgetExceeded).

    Returns the effective run budget and the allocation, for the watchdog.
    """
    held = resolve_allocation(allocation)
    if budget_su is None and held is not None:
        budget_su = held.run_budget_su
    check_budget(plan, budget_su, held, override)
    return budget_su, held


def start_budget_watchdog(
    lease: Lease,
    budget_su: float | None,
    *,
    allocation: Allocation | None = None,
    interval: float = 60.0,
    stop_work: Callable[[], object] | None = None,
) -> BudgetWatchdog | None:
    """Watch ``lease``'s run against ``budget_su`` (None: nothing to watch). Stop it when done.

    ``stop_work`` is called first when the budget is spent, before the teardown, to stop whatever
    would otherwise create more (an adaptive pool relaunching the workers being deleted)."""
    if budget_su is None:
        return None
    logger = get_run_logger()  # bound to this flow run: usable from the watchdog's thread
    run_id = lease.owner.run_id
    common = {"allocation": allocation.allocation_id if allocation else None, "budget": budget_su,
              "cloud": lease.cloud.name, "pipeline": lease.owner.pipeline}
    watchdog: BudgetWatchdog

    def on_threshold(fraction: float, spent: float, budget: float) -> None:
        logger.warning("budget: %.0f %% spent (%.4f of %.4f SU, burning %.2f SU/h)",
                       fraction * 100, spent, budget, watchdog.su_per_hour)
        run_event(THRESHOLD_EVENT, run_id, {**common, "fraction": fraction, "spent": round(spent, 6),
                                               "su_per_hour": watchdog.su_per_hour})

    def on_exhausted(spent: float, budget: float) -> None:
        logger.error("budget spent: %.4f of %.4f SU; deleting everything run %s holds", spent, budget, run_id)
        run_event(SPENT_EVENT, run_id, {**common, "spent": round(spent, 6)})
        if stop_work is not None:
            try:
                stop_work()
            except Exception as err:  # noqa: BLE001 - the teardown below must happen regardless
                logger.error("stopping the work failed (%s: %s); deleting its resources anyway", type(err).__name__, err)
        proof = teardown_run(lease.cloud, run_id, ledger=lease.ledger, on_event=lease.on_event)
        logger.error("after the budget was spent: %s", proof.summary())

    thresholds = allocation.thresholds if allocation else WARNING_THRESHOLDS
    watchdog = BudgetWatchdog(lease.cloud, run_id, budget_su, thresholds=thresholds, interval=interval,
                              on_threshold=on_threshold, on_exhausted=on_exhausted)
    return watchdog.start()


@contextmanager
def watching_budget(
    lease: Lease, budget_su: float | None, *, allocation: Allocation | None = None, interval: float = 60.0,
    stop_work: Callable[[], object] | None = None,
) -> Iterator[BudgetWatchdog | None]:
    """Meter the run while the block does its work; if the budget ran out, fail with "budget spent".
    Meanwhile the run beats its heartbeat (:mod:`slipstream.tasks.heartbeat`), budget or not, so the reaper
    can tell when its process died with its host.

    Use inside the lease, around the work only, so the lease's own teardown is never metered as
    "over budget"::

        with lease, watching_budget(lease, budget_su, allocation=held):
            ...the work...

    When the watchdog spent the budget it has already torn the run down; whatever the work then
    raised (a dropped SSH session, a vanished Slurm node) is replaced by BudgetExceeded.
    """
    watchdog = start_budget_watchdog(lease, budget_su, allocation=allocation, interval=interval, stop_work=stop_work)
    heartbeat = run_heartbeat(lease).start()
    failure: Exception | None = None
    try:
        yield watchdog
    except Exception as err:  # noqa: BLE001 - re-raised below, once the watch has stopped
        failure = err
    finally:
        heartbeat.stop()
        if watchdog is not None:
            watchdog.stop()
    if watchdog is not None and watchdog.exhausted:
        raise budget_spent_error(watchdog) from failure
    if failure is not None:
        raise failure


def budget_spent_error(watchdog: BudgetWatchdog) -> BudgetExceeded:
    return BudgetExceeded(
        f"run budget spent: {watchdog.spent:.4f} of {watchdog.budget_su:.4f} SU; the run was torn down",
        resource=f"run {watchdog.run_id}",
        cloud=watchdog.cloud.name,
        hint="Give the run a larger budget_su (or allocation run budget), or a smaller flavour or shorter job.",
    )
