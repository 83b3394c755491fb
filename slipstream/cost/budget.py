"""Can this run afford its plan? Allocation balances and the budget guard.

Jetstream2 keeps a separate SU balance per ACCESS resource — CPU (m3), GPU (g3/g4/g5), large
memory (r3) and storage — so a g3 plan is checked against the GPU balance, never the CPU one.
Before anything is created, :func:`check_plan` compares a plan's worst case (every server ACTIVE
for its whole walltime, :func:`slipstream.cost.accounting.estimate`) with

- the run's budget (SU this one run may spend), and
- the remaining balance of each ACCESS resource the plan charges,

and :func:`enforce` refuses an unaffordable plan with :class:`BudgetExceeded`, naming the figures
and the ways forward (raise the budget, shorten ``max_hours``, a smaller flavour, or the explicit
override)::

    from slipstream.cost.budget import FixedBalances, check_plan, enforce
    verdict = check_plan(plan, run_budget_su=100, balances=FixedBalances({"gpu": 5000}).read())
    enforce(verdict)                 # raises BudgetExceeded when refused
    print(verdict.summary())

Balances come from a fixed figure (:class:`FixedBalances`) or Jetstream2's ``accounting`` service
found in the Keystone catalogue (:class:`AccountingServiceBalances`; ACCESS reports usage 12-24 h
late, so the balance is an upper bound of what is really left).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from slipstream.cost.accounting import PlannedServers, estimate
from slipstream.cloud.errors import BudgetExceeded, InvalidRequest
from slipstream.jetstream2 import ACCESS_RESOURCES, FLAVORS, su_per_hour
from slipstream.cost.watchdog import WARNING_THRESHOLDS

CPU = "jetstream2.indiana.xsede.org"
GPU = "jetstream2-gpu.indiana.xsede.org"
LARGE_MEMORY = "jetstream2-lm.indiana.xsede.org"
STORAGE = "jetstream2-storage.indiana.xsede.org"

#: ACCESS resource id -> the name researchers see on ACCESS and in Exosphere.
RESOURCE_NAMES: dict[str, str] = {
    CPU: "Jetstream2 CPU",
    GPU: "Jetstream2 GPU",
    LARGE_MEMORY: "Jetstream2 Large Memory",
    STORAGE: "Jetstream2 Storage",
}

#: Short names accepted wherever a resource is named by a person ("gpu": 5000).
RESOURCE_ALIASES: dict[str, str] = {"cpu": CPU, "gpu": GPU, "large-memory": LARGE_MEMORY, "storage": STORAGE}

OVERRIDE_HINT = (
    "or pass override_budget=True to run anyway "
    "(the budget watchdog still stops the run when its budget is spent)"
)


def resource_of(flavor_name: str) -> str:
    """The ACCESS resource whose balance a flavour is charged to (by its family: m3, g3, ...)."""
    family = flavor_name.split(".", 1)[0]
    try:
        return ACCESS_RESOURCES[family]
    except KeyError:
        raise InvalidRequest(
            f"flavour {flavor_name!r} belongs to no Jetstream2 ACCESS resource",
            hint=f"Known families: {', '.join(sorted(ACCESS_RESOURCES))}.",
        ) from None


def resource_name(resource: str) -> str:
    return RESOURCE_NAMES.get(resource, resource)


@dataclass(frozen=True)
class Balance:
    """What an allocation has left on one ACCESS resource."""

    resource: str
    allocated: float
    used: float
    source: str  # where the figure came from, for messages: "fixed figure", "accounting service"

    @property
    def remaining(self) -> float:
        return self.allocated - self.used


class FixedBalances:
    """Balances the researcher states: ``{"gpu": 5000}`` or by ACCESS resource id."""

    def __init__(self, figures: Mapping[str, float]) -> None:
        self.figures: dict[str, float] = {}
        for key, value in figures.items():
            resource = RESOURCE_ALIASES.get(key, key)
            if resource not in RESOURCE_NAMES:
                raise InvalidRequest(
                    f"unknown ACCESS resource {key!r} for a balance",
                    hint=f"Use one of {', '.join(RESOURCE_ALIASES)} (or their ACCESS ids).",
                )
            if value is None or value < 0:
                raise InvalidRequest(f"balance for {key} must be a figure of 0 SU or more, got {value!r}")
            self.figures[resource] = float(value)

    def read(self) -> dict[str, Balance]:
        return {r: Balance(r, su, 0.0, "fixed figure") for r, su in self.figures.items()}


def parse_accounting(entries: Any) -> dict[str, Balance]:
    """Balances from the ``accounting`` service's JSON: a list of allocations, each with
    ``resource``, ``service_units_allocated``, ``service_units_used`` (may be null) and ``active``.

    An inactive (expired) allocation of a resource counts only when no active one exists.
    """
    if not isinstance(entries, list):
        raise InvalidRequest(
            "the accounting service did not answer with a list of allocations",
            hint="Check that the catalogue's `accounting` endpoint is Jetstream2's; or use a fixed balance.",
        )
    chosen: dict[str, tuple[bool, Balance]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or "resource" not in entry:
            continue
        try:
            allocated = float(entry.get("service_units_allocated") or 0.0)
            used = float(entry.get("service_units_used") or 0.0)
        except (TypeError, ValueError):
            continue
        active = str(entry.get("active", 1)) in ("1", "True", "true")
        resource = str(entry["resource"])
        if resource in chosen and chosen[resource][0] and not active:
            continue
        chosen[resource] = (active, Balance(resource, allocated, used, "accounting service"))
    return {r: b for r, (_, b) in chosen.items()}


class AccountingServiceBalances:
    """Balances read from the cloud's ``accounting`` service (Jetstream2's Keystone catalogue).

    ``cloud`` is an :class:`~slipstream.cloud.openstack.OpenStackCloud` (anything with
    ``read_accounting() -> list``); each :meth:`read` asks the service once.
    """

    def __init__(self, cloud: Any) -> None:
        if not hasattr(cloud, "read_accounting"):
            raise InvalidRequest(
                f"cloud {getattr(cloud, 'name', cloud)!r} has no accounting service",
                hint="Balances from the accounting service need an OpenStack cloud (Jetstream2); "
                "use a fixed balance instead.",
            )
        self.cloud = cloud

    def read(self) -> dict[str, Balance]:
        return parse_accounting(self.cloud.read_accounting())


@dataclass(frozen=True)
class Allocation:
    """An allocation as a run sees it: its id, a per-run budget, warning thresholds, balances."""

    allocation_id: str
    run_budget_su: float | None = None
    thresholds: tuple[float, ...] = WARNING_THRESHOLDS
    balances: FixedBalances | AccountingServiceBalances | None = None


@dataclass(frozen=True)
class PlanLine:
    planned: PlannedServers
    resource: str

    @property
    def su_per_hour(self) -> float:
        return su_per_hour(self.planned.flavor) * self.planned.count

    @property
    def worst_case(self) -> float:
        return estimate([self.planned])


@dataclass
class BudgetVerdict:
    """The guard's answer for a plan: its lines, the figures it was held to and why it is refused."""

    lines: list[PlanLine]
    run_budget_su: float | None
    balances: dict[str, Balance]
    allocation_id: str | None = None
    problems: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    @property
    def worst_case(self) -> float:
        return sum(line.worst_case for line in self.lines)

    @property
    def su_per_hour(self) -> float:
        return sum(line.su_per_hour for line in self.lines)

    @property
    def refused(self) -> bool:
        return bool(self.problems)

    def worst_case_on(self, resource: str) -> float:
        return sum(line.worst_case for line in self.lines if line.resource == resource)

    def summary(self) -> str:
        if not self.refused:
            limits = self._limits()
            held = f" is within {limits}" if limits else "; no budget or balance to hold it to"
            return f"worst case {_su(self.worst_case)} SU{held}"
        return f"{'; '.join(self.problems)}. To proceed: {'; '.join(self.advice)}."

    def _limits(self) -> str:
        parts = [f"the run budget of {_su(self.run_budget_su)} SU"] if self.run_budget_su is not None else []
        for resource in dict.fromkeys(line.resource for line in self.lines):
            if resource in self.balances:
                parts.append(f"the {resource_name(resource)} balance of {_su(self.balances[resource].remaining)} SU")
        return " and ".join(parts)


def check_plan(
    plan: Sequence[PlannedServers],
    *,
    run_budget_su: float | None = None,
    balances: Mapping[str, Balance] | None = None,
    allocation_id: str | None = None,
) -> BudgetVerdict:
    """Hold ``plan``'s worst case to the run budget and to each charged resource's balance.

    ``balances=None`` checks no balance; a balances mapping without the resource a line needs
    means the allocation has no access to it (Jetstream2: "having access to one does NOT include
    access to all"), which refuses the plan.
    """
    if run_budget_su is not None and not run_budget_su > 0:  # also nan, which every comparison passes
        raise InvalidRequest(
            f"budget_su must be positive, got {run_budget_su!r}",
            hint="Give the SUs this run may spend, or leave it empty.",
        )
    lines = [PlanLine(p, resource_of(p.flavor.name)) for p in plan]
    verdict = BudgetVerdict(lines, run_budget_su, dict(balances or {}), allocation_id)
    squeeze: list[tuple[float, float]] = []  # (limit, need) of every figure the plan breaks
    who = f"allocation {allocation_id}" if allocation_id else "the allocation"
    if run_budget_su is not None and verdict.worst_case > run_budget_su + 1e-9:
        verdict.problems.append(
            f"worst case {_su(verdict.worst_case)} SU ({_describe(lines)}) exceeds the run budget of {_su(run_budget_su)} SU"
        )
        verdict.advice.append(f"raise budget_su to at least {_su(verdict.worst_case)}")
        squeeze.append((run_budget_su, verdict.worst_case))
    if balances is not None:
        for resource in dict.fromkeys(line.resource for line in lines):
            need = verdict.worst_case_on(resource)
            have = balances.get(resource)
            if have is None:
                name = resource_name(resource)
                verdict.problems.append(f"{who} has no {name} balance, and the plan needs {_su(need)} SU of it")
                verdict.advice.append(
                    f"use a flavour charged to a resource {who} has ({_names(balances)}), or add {name} to it on ACCESS"
                )
                squeeze.append((0.0, need))
            elif need > have.remaining + 1e-9:
                verdict.problems.append(
                    f"worst case {_su(need)} SU exceeds the {resource_name(resource)} balance of {who}: "
                    f"{_su(have.remaining)} SU left ({_su(have.allocated)} allocated, {_su(have.used)} used; {have.source})"
                )
                verdict.advice.append(f"ask ACCESS for a supplement of {resource_name(resource)}")
                squeeze.append((max(have.remaining, 0.0), need))
    if verdict.refused:
        verdict.advice.extend(_shrink_advice(lines, squeeze))
        verdict.advice.append(OVERRIDE_HINT)
    return verdict


def enforce(verdict: BudgetVerdict, *, override: bool = False) -> BudgetVerdict:
    """Raise :class:`BudgetExceeded` for a refused verdict unless ``override`` is set."""
    if verdict.refused and not override:
        raise BudgetExceeded(
            "; ".join(verdict.problems),
            hint=f"Nothing was created. To proceed: {'; '.join(verdict.advice)}.",
        )
    return verdict


def _shrink_advice(lines: list[PlanLine], squeeze: list[tuple[float, float]]) -> list[str]:
    """Ways to fit every broken (limit, need): a shorter walltime, a smaller flavour."""
    factor = min((limit / need for limit, need in squeeze if need > 0), default=0.0)
    if factor <= 0 or not lines:
        return []
    advice = []
    hours = {(line.planned.hours, line.planned.overhead_hours) for line in lines}
    if len(hours) == 1 and (shorter := _floor(sum(work_and_overhead := hours.pop()) * factor
                                              - work_and_overhead[1])) > 0:
        advice.append(f"shorten max_hours to {shorter:g} or less")
    if len(lines) == 1:
        limit = min(limit for limit, _ in squeeze)
        p = lines[0].planned
        fits = [
            f for f in FLAVORS.values()
            if f.family == p.flavor.family and f.vcpus < p.flavor.vcpus
            and estimate([replace(p, flavor=f)]) <= limit
        ]
        if fits:
            best = max(fits, key=lambda f: f.vcpus)
            cost = estimate([replace(p, flavor=best)])
            advice.append(f"choose a smaller flavour, e.g. {best.name} ({_su(cost)} SU)")
    return advice


def _su(x: float) -> str:
    """An SU figure as people read it: 128.00, 0.0025 (tiny test budgets keep their digits)."""
    return f"{x:.2f}" if x >= 1 or x == 0 else f"{x:.2g}"


def _floor(x: float) -> float:
    return int(x * 100) / 100


def _describe(lines: Iterable[PlanLine]) -> str:
    return " + ".join(
        f"{p.count} x {p.flavor.name} at {su_per_hour(p.flavor):g} SU/h for {p.hours:g} h"
        + (f" + {p.overhead_hours:.2f} h to boot, transfer and tear down" if p.overhead_hours else "")
        for p in (line.planned for line in lines)
    )


def _names(balances: Mapping[str, Balance]) -> str:
    return ", ".join(resource_name(r) for r in balances) or "none"
