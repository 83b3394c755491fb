"""``slipstream plan <flow> [key=value ...]``: what a flow would hold, cost and be allowed, before it runs.

    slipstream plan gpu-job flavor=g3.large max_hours=4
    slipstream plan gpu-job flavor=g3.large max_hours=4 budget_su=100 balance_su=90
    slipstream plan vm-job flavor=m3.quad count=3 allocation=tra160003   # a saved AllocationBlock

Prints the planned servers, their SU/hour, the worst case (every server ACTIVE for the whole
walltime), which ACCESS balance pays, and the budget guard's verdict. Nothing is created and no
cloud is contacted; Prefect is imported only to load a saved allocation block (``allocation=``).
Exit status 0 when the flow may run, 1 when the guard would refuse it.
"""

from __future__ import annotations

import argparse

#: Parameters the command (not the flow's plan builder) understands.
BUDGET_PARAMETERS = ("budget_su", "balance_su", "allocation", "override_budget")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan", help="print a flow's planned resources, SU cost and budget verdict (creates nothing)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("flow", help="flow name, e.g. vm-job, gpu-job, large-memory-job")
    parser.add_argument("params", nargs="*", metavar="key=value",
                        help="flow parameters (flavor=, max_hours=, ...) and budget_su=, balance_su=, allocation=")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from slipstream.cost.budget import FixedBalances, check_plan, resource_name, resource_of
    from slipstream.cost.planning import build_plan, parse_assignments

    console = Console()
    params = parse_assignments(args.params)
    budget = {k: params.pop(k) for k in BUDGET_PARAMETERS if k in params}
    plan = build_plan(args.flow, params)
    run_budget, balances, allocation_id, thresholds = _budget_figures(budget)
    if budget.get("balance_su"):
        figure = _number("balance_su", budget["balance_su"])
        balances = FixedBalances({r: figure for r in {resource_of(p.flavor.name) for p in plan}}).read()
    verdict = check_plan(plan, run_budget_su=run_budget, balances=balances, allocation_id=allocation_id)

    shown = " ".join(f"{k}={v}" for k, v in params.items()) or "defaults"
    table = Table(title=f"plan for {args.flow} ({shown})", title_justify="left")
    for col, justify in (("servers", "right"), ("flavour", "left"), ("SU/hour", "right"), ("hours", "right"),
                         ("worst case SU", "right"), ("charged to", "left")):
        table.add_column(col, justify=justify)
    for line in verdict.lines:
        p = line.planned
        hours = f"{p.hours:g}" + (f" + {p.overhead_hours:.2f}" if p.overhead_hours else "")
        table.add_row(str(p.count), p.flavor.name, f"{line.su_per_hour:.2f}", hours,
                      f"{line.worst_case:.2f}", resource_name(line.resource))
    table.add_row("total", "", f"{verdict.su_per_hour:.2f}", "", f"{verdict.worst_case:.2f}", "")
    console.print(table)
    limits = []
    if run_budget is not None:
        limits.append(f"run budget {run_budget:.2f} SU")
    for resource in dict.fromkeys(line.resource for line in verdict.lines):
        if balances is not None and resource in balances:
            b = balances[resource]
            limits.append(f"{resource_name(resource)} balance {b.remaining:.2f} SU ({b.source})")
    if allocation_id:
        limits.insert(0, f"allocation {allocation_id}")
    if thresholds:
        limits.append("warnings at " + ", ".join(f"{t:.0%}" for t in thresholds))
    console.print("budget:  " + ("; ".join(limits) if limits else "none given (add budget_su=, balance_su= or allocation=)"), soft_wrap=True)
    if not verdict.refused:
        console.print(f"verdict: [green]OK[/green] — {verdict.summary()}", soft_wrap=True)
        return 0
    override = str(budget.get("override_budget", "")).lower() in ("1", "true", "yes")
    console.print(f"verdict: [red]REFUSED[/red] — {'; '.join(verdict.problems)}"
                  + (" (override_budget=true: the flow would run anyway)" if override else ""), soft_wrap=True)
    console.print("to proceed:", soft_wrap=True)
    for advice in verdict.advice:
        console.print(f"  - {advice}", soft_wrap=True)
    return 0 if override else 1


def _number(key: str, value: str) -> float:
    from slipstream.cloud.errors import InvalidRequest

    try:
        return float(value)
    except ValueError:
        raise InvalidRequest(
            f"{key}={value!r} is not a number",
            hint=f"Give {key} in SUs, e.g. {key}=100.",
        ) from None


def _budget_figures(budget: dict[str, str]):
    """(run budget, balances, allocation id, thresholds) from the command line
    and, when ``allocation=`` names one, the saved AllocationBlock."""
    run_budget = _number("budget_su", budget["budget_su"]) if budget.get("budget_su") else None
    if not budget.get("allocation"):
        return run_budget, None, None, ()
    from slipstream.blocks.allocation import load_allocation  # Prefect: only to read the saved block

    allocation = load_allocation(budget["allocation"])
    return (run_budget if run_budget is not None else allocation.run_budget_su,
            allocation.balances.read() if allocation.balances else None,
            allocation.allocation_id, allocation.thresholds)
