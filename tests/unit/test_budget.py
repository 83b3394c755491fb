"""The budget guard, allocation balances, plan builders and `slipstream plan`: the figures and the
messages a researcher reads before anything is created."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slipstream.cost.accounting import PlannedServers
from slipstream.cost.budget import (
    CPU,
    GPU,
    LARGE_MEMORY,
    AccountingServiceBalances,
    FixedBalances,
    check_plan,
    enforce,
    parse_accounting,
    resource_of,
)
from slipstream.cloud.errors import BudgetExceeded, InvalidRequest
from slipstream.jetstream2 import FLAVORS
from slipstream.cost.planning import build_plan, parse_assignments, register_plan, registered_flows

REPO = Path(__file__).resolve().parents[2]

# What Jetstream2's accounting service answers (shape from Exosphere's decoder, figures made up).
ACCOUNTING_JSON = [
    {"description": "TRA160003", "abstract": "test", "service_units_allocated": 100000.0,
     "service_units_used": 2500.5, "start_date": "2026-01-01", "end_date": "2027-01-01",
     "resource": CPU, "active": 1},
    {"description": "TRA160003", "abstract": "test", "service_units_allocated": 200.0,
     "service_units_used": None, "start_date": "2026-01-01", "end_date": "2027-01-01",
     "resource": GPU, "active": 1},
    {"description": "TRA160003", "abstract": "old", "service_units_allocated": 99999.0,
     "service_units_used": 0, "start_date": "2024-01-01", "end_date": "2025-01-01",
     "resource": GPU, "active": 0},
    {"description": "TRA160003", "abstract": "test", "service_units_allocated": 1000.0,
     "service_units_used": 10.0, "start_date": "2026-01-01", "end_date": "2027-01-01",
     "resource": "jetstream2-storage.indiana.xsede.org", "active": 1},
]


def plan(flavor: str, count: int = 1, hours: float = 1.0) -> list[PlannedServers]:
    return [PlannedServers(FLAVORS[flavor], count, hours)]


# balances -------------------------------------------------------------------------------------
def test_each_family_is_charged_to_its_own_access_resource():
    assert {f: resource_of(f) for f in ("m3.quad", "g3.large", "g5.xl", "r3.large")} == {
        "m3.quad": CPU, "g3.large": GPU, "g5.xl": GPU, "r3.large": LARGE_MEMORY}


def test_the_accounting_service_list_becomes_one_balance_per_resource():
    balances = parse_accounting(ACCOUNTING_JSON)
    assert balances[CPU].remaining == pytest.approx(97499.5)
    assert balances[GPU].remaining == 200.0  # null "used" is 0; the expired GPU award is ignored
    assert LARGE_MEMORY not in balances
    assert balances[GPU].source == "accounting service"


def test_an_answer_that_is_not_a_list_is_a_clear_error():
    with pytest.raises(InvalidRequest, match="did not answer with a list.*fixed balance"):
        parse_accounting({"error": "unauthorised"})


def test_a_cloud_without_an_accounting_service_is_refused_up_front(local_cloud):
    with pytest.raises(InvalidRequest, match="has no accounting service.*fixed balance"):
        AccountingServiceBalances(local_cloud)


def test_fixed_balances_take_short_names_and_refuse_unknown_ones():
    assert FixedBalances({"gpu": 50}).read()[GPU].remaining == 50
    with pytest.raises(InvalidRequest, match="unknown ACCESS resource 'tpu'.*cpu, gpu, large-memory, storage"):
        FixedBalances({"tpu": 5})


# the guard ------------------------------------------------------------------------------------
def test_a_gpu_plan_is_held_to_the_gpu_balance_not_the_cpu_one():
    balances = parse_accounting(ACCOUNTING_JSON)  # 97 499 CPU SU, 200 GPU SU
    verdict = check_plan(plan("g3.large", hours=8), balances=balances, allocation_id="TRA160003")  # 256 SU
    assert verdict.refused
    assert verdict.problems == [
        "worst case 256.00 SU exceeds the Jetstream2 GPU balance of allocation TRA160003: 200.00 SU left "
        "(200.00 allocated, 0.00 used; accounting service)"]
    assert check_plan(plan("m3.large", hours=8), balances=balances).refused is False  # 128 SU of CPU


def test_a_refusal_names_the_figures_and_every_way_forward():
    verdict = check_plan(plan("g3.large", hours=4), run_budget_su=100)  # 4 h x 32 SU/h = 128
    with pytest.raises(BudgetExceeded) as err:
        enforce(verdict)
    text = str(err.value)
    assert "worst case 128.00 SU (1 x g3.large at 32 SU/h for 4 h) exceeds the run budget of 100.00 SU" in text
    assert "Nothing was created" in text
    assert "raise budget_su to at least 128.00" in text
    assert "shorten max_hours to 3.12 or less" in text
    assert "choose a smaller flavour, e.g. g3.medium (64.00 SU)" in text
    assert "override_budget=True" in text


def test_override_lets_a_refused_plan_through_and_within_budget_is_fine():
    verdict = check_plan(plan("g3.large", hours=4), run_budget_su=100)
    assert enforce(verdict, override=True) is verdict
    ok = check_plan(plan("g3.large", hours=3), run_budget_su=100, balances=FixedBalances({"gpu": 500}).read())
    assert not ok.refused
    assert ok.summary() == "worst case 96.00 SU is within the run budget of 100.00 SU and the Jetstream2 GPU balance of 500.00 SU"


def test_an_allocation_without_the_resource_refuses_the_plan():
    verdict = check_plan(plan("r3.large"), balances=FixedBalances({"cpu": 10_000}).read(), allocation_id="TRA160003")
    assert verdict.problems == ["allocation TRA160003 has no Jetstream2 Large Memory balance, and the plan needs 128.00 SU of it"]


def test_a_mixed_plan_sums_per_resource():
    mixed = [PlannedServers(FLAVORS["m3.small"], 1, 2), PlannedServers(FLAVORS["g3.medium"], 2, 2)]
    verdict = check_plan(mixed, balances=FixedBalances({"cpu": 4, "gpu": 63}).read())
    assert verdict.worst_case_on(CPU) == 4 and verdict.worst_case_on(GPU) == 64
    assert len(verdict.problems) == 1 and "Jetstream2 GPU" in verdict.problems[0]
    assert "shorten max_hours to 1.96 or less" in verdict.advice


@pytest.mark.parametrize("budget", [0, -1, float("nan")])
def test_a_zero_negative_or_nan_budget_is_bad_input(budget):
    # nan passed `<= 0`: no worst case is "over" it and no spend reaches it, so it was no budget.
    with pytest.raises(InvalidRequest, match="budget_su must be positive"):
        check_plan(plan("m3.tiny"), run_budget_su=budget)


# plan builders --------------------------------------------------------------------------------
def test_builders_convert_key_value_strings_by_type_and_skip_cost_free_flow_parameters():
    built = build_plan("vm-job", parse_assignments(["flavor=m3.quad", "max_hours=2.5", "command=ls",
                                                     "boot_timeout_seconds=600", "transfer_timeout_seconds=300"]))
    # The worst case holds the server for the work plus the deadlines around it: boot and SSH,
    # upload, download (each bounded by its timeout) and 5 minutes of teardown.
    assert built == [PlannedServers(FLAVORS["m3.quad"], 1, 2.5, overhead_hours=(600 + 2 * 300 + 300) / 3600)]


@pytest.mark.parametrize(
    ("flow", "params", "message"),
    [
        ("gpu-jobs", {}, r"no plan known for flow 'gpu-jobs'.*gpu-job, large-memory-job.*vm-job.*Did you mean gpu-job"),
        ("gpu-job", {"flavor": "m3.quad"}, r"unknown flavour 'm3.quad'.*Valid flavours: g3.small, g3.medium, g3.large, g3.xl"),
        ("vm-job", {"flavr": "m3.tiny"}, r"vm-job has no parameter 'flavr'.*Valid parameters: flavor, max_hours.*Did you mean flavor"),
        ("vm-job", {"max_hours": "four"}, r"max_hours='four' is not a number"),
        ("large-memory-job", {"max_hours": "0"}, r"max_hours must be positive"),
        # float() takes these: a worst case of nan or inf SU prices nothing and bounds nothing.
        ("vm-job", {"max_hours": "nan"}, r"max_hours must be positive and finite, got nan"),
        ("gpu-job", {"max_hours": "inf"}, r"max_hours must be positive and finite, got inf"),
    ],
)
def test_unknown_flows_flavours_and_parameters_name_what_is_valid(flow, params, message):
    with pytest.raises(InvalidRequest, match=message):
        build_plan(flow, params)


def plan_unit_cluster(worker_flavor: str = "m3.quad", workers: int = 2, max_hours: float = 1.0) -> list[PlannedServers]:
    from slipstream.cost.planning import flavor_named

    return [PlannedServers(flavor_named("m3.small"), 1, max_hours), PlannedServers(flavor_named(worker_flavor), workers, max_hours)]


def test_other_flows_register_builders_by_reference():
    register_plan("unit-test-cluster", "test_budget:plan_unit_cluster", ignores=("workers_script",))
    try:
        assert "unit-test-cluster" in registered_flows()
        built = build_plan("unit-test-cluster", {"workers": "4", "workers_script": "x"})
        assert [(p.flavor.name, p.count) for p in built] == [("m3.small", 1), ("m3.quad", 4)]
        with pytest.raises(InvalidRequest, match="workers='four' is not a whole number"):
            build_plan("unit-test-cluster", {"workers": "four"})
    finally:
        from slipstream.cost import planning

        planning._PLANS.pop("unit-test-cluster")


# slipstream plan ------------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real command line, in a fresh interpreter that must not import Prefect."""
    code = (
        "import sys\nfrom slipstream.cli import main\nrc = main(sys.argv[1:])\n"
        "assert not [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')], 'Prefect was imported'\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "120", "HOME": str(REPO / ".no-home")})


def test_slipstream_plan_prints_resources_rates_worst_case_and_balance():
    out = run_cli("plan", "gpu-job", "flavor=g3.large", "max_hours=4", "budget_su=200", "balance_su=5000")
    assert out.returncode == 0, out.stderr
    assert "plan for gpu-job (flavor=g3.large max_hours=4)" in out.stdout
    row = next(line for line in out.stdout.splitlines() if "g3.large" in line and "32.00" in line)
    # 4 h of work + 0.67 h to boot (900 s), transfer (2 x 600 s) and tear down (300 s): 149.33 SU.
    assert "4 + 0.67" in row and "149.33" in row and "Jetstream2 GPU" in row
    assert "run budget 200.00 SU; Jetstream2 GPU balance 5000.00 SU (fixed figure)" in out.stdout
    assert "verdict: OK" in out.stdout


def test_slipstream_plan_shows_a_refusal_and_exits_1():
    out = run_cli("plan", "gpu-job", "flavor=g3.large", "max_hours=4", "budget_su=100")
    assert out.returncode == 1, out.stderr
    assert ("verdict: REFUSED — worst case 149.33 SU (1 x g3.large at 32 SU/h for 4 h + 0.67 h to boot, "
            "transfer and tear down)") in out.stdout
    assert "- raise budget_su to at least 149.33" in out.stdout
    assert "- shorten max_hours to 2.45 or less" in out.stdout  # 2.45 h + 0.67 h at 32 SU/h fits in 100
    assert "- choose a smaller flavour, e.g. g3.medium (74.67 SU)" in out.stdout


def test_slipstream_plan_bad_input_is_one_clean_line():
    out = run_cli("plan", "gpu-job", "flavor=g3.huge")
    assert out.returncode == 2 and "Traceback" not in out.stdout + out.stderr
    assert "unknown flavour 'g3.huge'" in out.stdout and "g3.large" in out.stdout


# the allocation block ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "no balance is filled in: enter the SUs left in balance_cpu_su"),
        ({"balance_source": "accounting-service"}, "needs `cloud`: the saved OpenStack cloud block"),
        ({"balance_source": "accounting-service", "cloud": "x/y", "balance_gpu_su": 5}, "clear balance_\\*_su, or choose 'fixed'"),
        ({"balance_gpu_su": 5, "thresholds": [0.5, 80]}, r"thresholds \[80.0\] are not shares of the budget"),
        ({"balance_gpu_su": 5, "allocation_id": "TRA 16"}, "does not look like an ACCESS allocation"),
        ({"balance_gpu_su": 5, "run_budget_su": 0}, "greater than 0"),
    ],
)
def test_the_allocation_block_says_what_to_change(fields, message):
    from pydantic import ValidationError

    from slipstream.blocks.allocation import AllocationBlock

    with pytest.raises(ValidationError, match=message):
        AllocationBlock(**{"allocation_id": "TRA160003", **fields})


def test_the_allocation_block_becomes_the_core_allocation():
    from slipstream.blocks.allocation import AllocationBlock

    block = AllocationBlock(allocation_id="TRA160003", balance_gpu_su=500, run_budget_su=50, thresholds=[0.9, 0.5])
    allocation = block.get_allocation()
    assert allocation.run_budget_su == 50 and allocation.thresholds == (0.5, 0.9)
    assert json.loads(json.dumps({r: b.remaining for r, b in allocation.balances.read().items()})) == {GPU: 500}


# the vm_job schedule: what the worst case prices is what the flow's deadlines allow -------------
def test_a_vm_jobs_deadlines_add_up_to_exactly_what_its_worst_case_prices():
    from slipstream.cloud.models import ServerSpec
    from slipstream.cost.planning import vm_job_plan
    from slipstream.vmjob import VmJobPlan

    out = run_cli("plan", "vm-job", "flavor=m3.quad", "max_hours=0.5", "teardown_timeout_seconds=900")
    assert out.returncode == 0, out.stderr
    # 0.5 h + boot 900 s + 2 x 600 s transfers + 900 s teardown = 0.5 + 0.83 h at 4 SU/h.
    assert "0.5 + 0.83" in out.stdout and "5.33" in out.stdout
    refused = run_cli("plan", "vm-job", "teardown_timeout_seconds=0")  # no deadline: no bound
    assert refused.returncode == 2 and "teardown_timeout_seconds must be a positive number" in refused.stdout
    (planned,) = vm_job_plan("m3.quad", 0.5, 900, 600, 900)
    plan = VmJobPlan(ServerSpec("job", "m3.quad", "img"), FLAVORS["m3.quad"], None, "true", max_hours=0.5,
                     boot_timeout_seconds=900, transfer_timeout_seconds=600, teardown_timeout_seconds=900)
    assert plan.planned == [planned]
    # A run whose phases all ran into their deadlines ends its teardown when the worst case says.
    schedule = plan.schedule()
    schedule.started -= 10 * 3600
    assert schedule.deadline("teardown") - schedule.started == pytest.approx(planned.held_hours * 3600)

def test_time_lost_between_phases_comes_out_of_the_next_phase_not_the_bill():
    import time

    from slipstream.vmjob import RunSchedule

    # Boot used its whole 10 s, then 2 s went by before the upload began (a task's bookkeeping).
    schedule = RunSchedule([("boot", 10), ("upload", 5), ("work", 60)], started=time.monotonic() - 12)
    upload_by = schedule.deadline("upload")
    assert upload_by == pytest.approx(schedule.started + 15)  # 3 s left of its 5, not 5
    # A phase that starts with time to spare gets its whole allowance, no more.
    assert schedule.deadline("work") - time.monotonic() == pytest.approx(60, abs=1)


@pytest.mark.parametrize("max_hours", [float("nan"), float("inf")])
def test_a_vm_job_without_a_finite_max_hours_is_refused_before_anything_is_created(local_cloud, max_hours):
    from slipstream.vmjob import plan_vm_job

    # Before: nan passed `<= 0` and priced "nan SU", which no budget refuses; inf meant no deadline.
    with pytest.raises(InvalidRequest, match=r"max_hours must be positive and finite, got (nan|inf)"):
        plan_vm_job(local_cloud, name="job", flavor="m3.tiny", image="slipstream-noop", command="true",
                    max_hours=max_hours)
