"""What each flow would create, from its parameters, without creating anything.

``slipstream plan <flow> key=value ...`` and the budget guard need, for every flow, the servers it
plans to hold and for how long: a list of :class:`~slipstream.cost.accounting.PlannedServers`. Each
flow registers a *plan builder* here — a plain function whose keyword parameters are the flow
parameters that change the cost (with the flow's defaults), returning that list::

    from slipstream.cost.planning import register_plan

    def plan_my_cluster(head_flavor: str = "m3.small", workers: int = 4,
                        worker_flavor: str = "m3.quad", max_hours: float = 2.0) -> list[PlannedServers]:
        return [PlannedServers(flavor_named(head_flavor), 1, max_hours),
                PlannedServers(flavor_named(worker_flavor), workers, max_hours)]

    register_plan("my-cluster", plan_my_cluster, ignores=("script",))
    # or, to keep this module light: register_plan("my-cluster", "mypkg.plans:plan_my_cluster")

:func:`build_plan` checks parameter names against the builder's signature (``ignores`` lists flow
parameters that do not change the cost), converts ``key=value`` strings by the type hints, and
names the valid flows, parameters and flavours when something is unknown. Nothing here talks to a
cloud or imports Prefect: flavours and rates are Jetstream2's (:mod:`slipstream.jetstream2`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from slipstream.cost.accounting import PlannedServers
from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.models import Flavor
from slipstream.jetstream2 import FLAVORS

PlanBuilder = Callable[..., list[PlannedServers]]


@dataclass(frozen=True)
class RegisteredPlan:
    flow: str
    builder: PlanBuilder | str  # a function, or "module:function" imported on first use
    ignores: frozenset[str] = frozenset()

    def function(self) -> PlanBuilder:
        if callable(self.builder):
            return self.builder
        module, _, name = self.builder.partition(":")
        return getattr(importlib.import_module(module), name)


_PLANS: dict[str, RegisteredPlan] = {}


def register_plan(flow_name: str, builder: PlanBuilder | str, *, ignores: Iterable[str] = ()) -> None:
    """Make ``flow_name``'s plan known to ``slipstream plan`` and the budget guard."""
    _PLANS[flow_name] = RegisteredPlan(flow_name, builder, frozenset(ignores))


def registered_flows() -> list[str]:
    return sorted(_PLANS)


def _registered(flow_name: str) -> RegisteredPlan:
    if flow_name not in _PLANS:
        raise InvalidRequest(
            f"no plan known for flow {flow_name!r}",
            hint=f"Flows with a plan: {', '.join(registered_flows())}.{_close(flow_name, _PLANS)}",
        )
    return _PLANS[flow_name]


def plan_parameters(flow_name: str) -> dict[str, inspect.Parameter]:
    """The parameters that change ``flow_name``'s cost, with their defaults."""
    return dict(inspect.signature(_registered(flow_name).function()).parameters)


def build_plan(flow_name: str, params: Mapping[str, Any]) -> list[PlannedServers]:
    """The servers ``flow_name`` would hold with ``params`` (strings are converted by type hint)."""
    registered = _registered(flow_name)
    builder = registered.function()
    accepted = plan_parameters(flow_name)
    hints = typing.get_type_hints(builder)
    kwargs: dict[str, Any] = {}
    for key, value in params.items():
        if key in registered.ignores:
            continue
        if key not in accepted:
            valid = ", ".join([*accepted, *sorted(registered.ignores)])
            raise InvalidRequest(
                f"{flow_name} has no parameter {key!r}",
                hint=f"Valid parameters: {valid}.{_close(key, [*accepted, *registered.ignores])}",
            )
        kwargs[key] = _convert(key, value, hints.get(key))
    return builder(**kwargs)


def parse_assignments(items: Sequence[str]) -> dict[str, str]:
    """``["flavor=g3.large", "max_hours=4"]`` -> ``{"flavor": "g3.large", "max_hours": "4"}``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(
                f"{item!r} is not key=value",
                hint="Give flow parameters as key=value, e.g. flavor=g3.large max_hours=4.",
            )
        out[key.strip()] = value.strip()
    return out


def flavor_named(name: str, families: Iterable[str] | None = None) -> Flavor:
    """Jetstream2's flavour ``name`` (optionally only of ``families``), or an error listing them."""
    allowed = set(families) if families else None
    choices = [f for f, flavor in FLAVORS.items() if allowed is None or flavor.family in allowed]
    if name not in choices:
        raise InvalidRequest(
            f"unknown flavour {name!r}",
            hint=f"Valid flavours: {', '.join(choices)}.{_close(name, choices)}",
        )
    return FLAVORS[name]


def _convert(key: str, value: Any, hint: Any) -> Any:
    if not isinstance(value, str) or hint in (None, str, "str"):
        return value
    try:
        if hint is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if hint in (int, float):
            return hint(value)
    except ValueError:
        kind = {bool: "true or false", int: "a whole number", float: "a number"}[hint]
        raise InvalidRequest(f"{key}={value!r} is not {kind}", hint=f"Give {key} as {kind}.") from None
    return value


def _close(word: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(names), n=3)
    return f" Did you mean {', '.join(close)}?" if close else ""


def check_hours(max_hours: float) -> float:
    """A job's ``max_hours``: positive and finite (``nan`` would price "nan SU", which no budget
    refuses, and ``inf`` would be no deadline at all)."""
    if isinstance(max_hours, bool) or not isinstance(max_hours, (int, float)) or not 0 < max_hours < float("inf"):
        raise InvalidRequest(
            f"max_hours must be positive and finite, got {max_hours!r}",
            hint="Give the job's longest plausible walltime in hours.",
        )
    return max_hours


# vm_job and its presets ----------------------------------------------------------------------
#: vm_job parameters that do not change what it holds or for how long.
VM_JOB_IGNORES = ("command", "script", "inputs", "outputs", "image", "name", "cloud", "results_dir",
                  "pipeline", "budget_check_seconds", "secret_env")
#: How long deleting a run's servers may take after its work ends: every delete, retry and wait
#: shares this one deadline (vm_job's ``teardown_timeout_seconds``).
TEARDOWN_ALLOWANCE_SECONDS = 300.0
#: vm_job's deadlines for everything around the work (its parameters of the same names).
BOOT_TIMEOUT_SECONDS, TRANSFER_TIMEOUT_SECONDS = 900.0, 600.0


def vm_job_overhead_hours(boot_timeout_seconds: float = BOOT_TIMEOUT_SECONDS,
                          transfer_timeout_seconds: float = TRANSFER_TIMEOUT_SECONDS,
                          teardown_timeout_seconds: float = TEARDOWN_ALLOWANCE_SECONDS) -> float:
    """How long a vm_job's server can exist besides its ``max_hours`` of work, each phase bounded
    by its deadline: boot and SSH (one deadline), the upload, the download, the teardown (the
    flow's :class:`~slipstream.vmjob.RunSchedule`). Priced with it, the worst case is a true upper
    bound of what the run is charged."""
    return (check_seconds("boot_timeout_seconds", boot_timeout_seconds)
            + 2 * check_seconds("transfer_timeout_seconds", transfer_timeout_seconds)
            + check_seconds("teardown_timeout_seconds", teardown_timeout_seconds)) / 3600


def check_seconds(name: str, seconds: float) -> float:
    """A phase's deadline in seconds: positive and finite, since the worst case counts it."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < float("inf"):
        raise InvalidRequest(f"{name} must be a positive number of seconds, got {seconds!r}",
                             hint="Each phase of a run needs a finite deadline: the worst case counts it.")
    return float(seconds)


def vm_job_plan(flavor: str = "m3.small", max_hours: float = 1.0, boot_timeout_seconds: float = BOOT_TIMEOUT_SECONDS,
                transfer_timeout_seconds: float = TRANSFER_TIMEOUT_SECONDS,
                teardown_timeout_seconds: float = TEARDOWN_ALLOWANCE_SECONDS) -> list[PlannedServers]:
    """vm_job: one server of ``flavor`` for at most ``max_hours`` of work, plus boot, transfers
    and teardown."""
    return [PlannedServers(flavor_named(flavor), 1, check_hours(max_hours),
                           vm_job_overhead_hours(boot_timeout_seconds, transfer_timeout_seconds,
                                                 teardown_timeout_seconds))]


def gpu_job_plan(flavor: str = "g3.medium", max_hours: float = 1.0) -> list[PlannedServers]:
    """gpu_job: one A100 vGPU server (g3.*)."""
    return [PlannedServers(flavor_named(flavor, ["g3"]), 1, check_hours(max_hours), vm_job_overhead_hours())]


def large_memory_job_plan(flavor: str = "r3.large", max_hours: float = 1.0) -> list[PlannedServers]:
    """large_memory_job: one large-memory server (r3.*)."""
    return [PlannedServers(flavor_named(flavor, ["r3"]), 1, check_hours(max_hours), vm_job_overhead_hours())]


register_plan("vm-job", vm_job_plan, ignores=VM_JOB_IGNORES)
register_plan("gpu-job", gpu_job_plan, ignores=VM_JOB_IGNORES)
register_plan("large-memory-job", large_memory_job_plan, ignores=VM_JOB_IGNORES)

# dask_pipeline: an elastic pool, priced by its maximum (slipstream.scaling.policy) -------------
register_plan("dask-pipeline", "slipstream.scaling.policy:elastic_pool_plan",
              ignores=("rows", "cols", "chunk_rows", "seed", "batch_size", "cooldown_seconds", "boot_seconds",
                       "idle_action", "cloud", "image", "scheduler_host", "drain_seconds", "pipeline"))

# slurm_cluster: the head node and every cloud node for the whole deadline -----------------------
register_plan("slurm-cluster", "slipstream.slurm.cluster:slurm_cluster_plan",
              ignores=("scripts", "name", "cloud", "image", "suspend_time", "suspend_timeout", "resume_timeout",
                       "results_dir", "pipeline"))
