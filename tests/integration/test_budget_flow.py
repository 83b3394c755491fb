"""The budget in vm_job under Prefect's test harness, on the embedded local cloud: refused before
anything exists, the override, a saved allocation's balance, and the watchdog's events and teardown."""

from __future__ import annotations

import pytest

from slipstream.cloud.errors import BudgetExceeded
from slipstream.ownership.ledger import Ledger
from support import wait_until

pytestmark = pytest.mark.usefixtures("prefect_harness")


def assert_nothing_was_created(cloud) -> None:
    assert cloud.server_history() == []
    assert cloud.list_keypairs() == [] and cloud.list_floating_ips() == []
    assert Ledger().entries() == []


def test_over_the_run_budget_fails_before_anything_exists(cloud_env):
    from slipstream.flows.vm_job import gpu_job

    with pytest.raises(BudgetExceeded) as err:
        gpu_job(command="python3 train.py", flavor="g3.large", max_hours=4, budget_su=100)
    text = str(err.value)
    assert ("worst case 149.33 SU (1 x g3.large at 32 SU/h for 4 h + 0.67 h to boot, transfer and tear down) "
            "exceeds the run budget of 100.00 SU") in text
    assert "raise budget_su to at least 149.33" in text and "override_budget=True" in text
    assert_nothing_was_created(cloud_env)


def test_elastic_pools_are_held_to_their_worst_case_too(cloud_env, tmp_path):
    from slipstream.flows.dask_pipeline import dask_pipeline
    from slipstream.flows.slurm_cluster import slurm_cluster

    # 8 x m3.quad (4 SU/h each) for 2 h = 64 SU of workers, whatever the pool really holds.
    with pytest.raises(BudgetExceeded, match=r"worst case 64.00 SU .* exceeds the run budget of 10.00 SU"):
        dask_pipeline(max_workers=8, flavor="m3.quad", max_hours=2, budget_su=10)
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\nhostname\n")
    # head m3.tiny (1 SU/h) + 4 x m3.small (2 SU/h) for 3 h = 27 SU
    with pytest.raises(BudgetExceeded, match=r"worst case 27.00 SU .* exceeds the run budget of 5.00 SU"):
        slurm_cluster(scripts=[str(script)], max_nodes=4, flavor="m3.small", max_hours=3, budget_su=5)
    assert_nothing_was_created(cloud_env)


def test_a_saved_allocation_holds_a_gpu_plan_to_its_gpu_balance(cloud_env, capsys):
    from slipstream.blocks.allocation import AllocationBlock
    from slipstream.flows.vm_job import gpu_job
    from slipstream.cli import main

    AllocationBlock(allocation_id="TRA160003", balance_cpu_su=100_000, balance_gpu_su=50,
                    thresholds=[0.75]).save("tra-test", overwrite=True)
    with pytest.raises(BudgetExceeded, match="exceeds the Jetstream2 GPU balance of allocation TRA160003: 50.00 SU left"):
        gpu_job(command="true", flavor="g3.medium", max_hours=4, allocation="tra-test")  # 74.67 SU
    assert_nothing_was_created(cloud_env)
    # `slipstream plan` reads the same saved allocation and says the same.
    assert main(["plan", "gpu-job", "flavor=g3.medium", "max_hours=4", "allocation=tra-test"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "budget: allocation TRA160003; Jetstream2 GPU balance 50.00 SU (fixed figure); warnings at 75%" in out
    assert "shorten max_hours to 2.45 or less" in out  # + 0.67 h to boot, transfer and tear down
    assert main(["plan", "vm-job", "flavor=m3.quad", "max_hours=4", "allocation=tra-test"]) == 0


def test_with_the_override_an_over_budget_job_runs_and_cleans_up(cloud_env):
    from slipstream.flows.vm_job import vm_job

    result = vm_job(flavor="m3.tiny", command="echo fits in practice", max_hours=1, budget_su=0.5,
                    override_budget=True, budget_check_seconds=0.2)
    assert result.exit_status == 0 and "fits in practice" in result.stdout_tail
    assert result.su_estimated == pytest.approx(1 + 2400 / 3600) and result.su_budget == 0.5 and 0 < result.su_spent < 0.5
    assert result.teardown_clean and cloud_env.list_servers() == []


def read_budget_events(run_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(filter=EventFilter(
            event=EventNameFilter(prefix=["slipstream.budget."]),
            resource=EventResourceFilter(id=[f"slipstream.run.{run_id}"]),
        ), limit=50)
    return sorted(page.events, key=lambda e: e.occurred)


def test_the_watchdog_warns_at_each_threshold_then_tears_the_run_down(cloud_env):
    from slipstream.flows.vm_job import vm_job

    budget = 0.005  # 9 s of an ACTIVE m3.small (2 SU/h): spent while `sleep 120` runs
    with pytest.raises(BudgetExceeded, match="run budget spent: 0.00[5-9]\\d* of 0.0050 SU; the run was torn down") as err:
        vm_job(flavor="m3.small", command="sleep 120", max_hours=1, budget_su=budget, override_budget=True,
               budget_check_seconds=0.2, boot_timeout_seconds=60)
    run_id = err.value.resource.removeprefix("run ")
    assert cloud_env.list_servers() == [] and cloud_env.list_floating_ips() == [] and cloud_env.list_keypairs() == []
    (history,) = cloud_env.server_history(run_id)
    assert history.deleted_at is not None

    events = wait_until(lambda: (e := read_budget_events(run_id)) and len(e) == 4 and e,
                        timeout=60, what="three threshold events and one spent event in Prefect")
    thresholds = [e for e in events if e.event == "slipstream.budget.threshold"]
    assert [e.payload["fraction"] for e in thresholds] == [0.5, 0.8, 0.9]
    assert all(e.payload["spent"] >= e.payload["fraction"] * budget and e.payload["budget"] == budget for e in thresholds)
    assert all(e.payload["su_per_hour"] == 2.0 for e in thresholds)
    (spent,) = [e for e in events if e.event == "slipstream.budget.spent"]
    assert spent.payload["spent"] >= budget
    assert spent.related[0].id == f"prefect.flow-run.{run_id}"
