"""dask_pipeline under real Prefect (test harness) on LocalCloud VMs: the numbers are right, the
pool grew past one worker VM and shrank back to none, the SUs are metered, nothing owned remains
and no dask worker or scheduler outlives the run."""

from __future__ import annotations

import re
from pathlib import Path

import dask
import dask.array as da
import pytest
from prefect.exceptions import ParameterTypeError
from distributed.core import Status
from distributed.scheduler import Scheduler

from slipstream.cloud.errors import InvalidRequest
from tests.support import prefect_logs, wait_until


pytestmark = pytest.mark.usefixtures("prefect_harness")


def dask_worker_processes() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"dask\x00worker" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def api_log_lines(run_id: str, prefix: str) -> list[str]:
    """Messages starting with ``prefix`` among the run's log lines in the Prefect API, oldest first."""
    return [line for line in prefect_logs(run_id) if line.startswith(prefix)]


def test_the_pipeline_scales_from_zero_to_many_and_back_and_leaves_nothing(cloud_env):
    from slipstream.flows.dask_pipeline import dask_pipeline

    rows, cols, chunk_rows, seed = 16_000, 500, 500, 11
    before = set(dask_worker_processes())
    # boot_seconds=0: the policy is told a worker is ready at once, so even this small array is
    # worth spreading (with a realistic boot it rightly keeps one worker: see the policy's tests).
    result = dask_pipeline(rows=rows, cols=cols, chunk_rows=chunk_rows, seed=seed, max_workers=4, batch_size=2,
                           cooldown_seconds=1.0, boot_seconds=0.0, image="slipstream-noop", drain_seconds=60,
                           progress_seconds=0.3)

    with dask.config.set(scheduler="sync"):
        x = da.random.default_rng(seed).standard_normal((rows, cols), chunks=(chunk_rows, cols))
        expected = (float(x.mean().compute()), float(x.std().compute()))
    assert (result.mean, result.std) == pytest.approx(expected, rel=1e-12)
    assert result.elements == rows * cols and result.chunks == rows // chunk_rows
    # 0 -> N -> 0: more than one worker VM existed at once, and the policy released them all.
    assert result.peak_workers > 1 and len(result.workers_launched) >= result.peak_workers
    assert result.workers_held_at_end == 0
    # Metered from the VMs' state logs: something was spent, less than the worst case.
    assert 0 < result.su_spent < result.su_estimated
    assert {m.name for m in result.metered} == set(result.workers_launched)
    assert result.teardown_clean and not any(result.teardown_remaining.values())
    assert cloud_env.list_servers() == []
    wait_until(lambda: not set(dask_worker_processes()) - before, timeout=10, what="no dask worker process left")
    assert all(s.status == Status.closed for s in list(Scheduler._instances))
    # Progress while it ran: workers booting, then joined, and tasks done out of the total.
    progress = wait_until(lambda: api_log_lines(result.run_id, "progress: "), timeout=30, what="progress lines in the run's logs")
    assert any(" booting" in p and not p.endswith("0 booting, 0 parked; 0 VMs created so far") for p in progress)
    done = [tuple(map(int, re.match(r"progress: (\d+)/(\d+) tasks", p).groups())) for p in progress]
    assert done[-1][0] == done[-1][1] > 0 and any(0 <= d < t for d, t in done[:-1])


def test_a_bad_parameter_stops_the_pipeline_before_any_vm(cloud_env):
    from slipstream.flows.dask_pipeline import dask_pipeline

    with pytest.raises(InvalidRequest, match="no flavour among m3.tiny fits one task of 2 cores"):
        dask_pipeline(flavor="m3.tiny", cores_per_task=2, image="slipstream-noop")
    with pytest.raises(ParameterTypeError, match="idle_action"):  # a suspended VM still costs 75 %
        dask_pipeline(idle_action="suspend", image="slipstream-noop")
    assert cloud_env.list_servers() == []


def test_when_the_budget_is_spent_the_pool_is_closed_and_its_vms_deleted(cloud_env):
    from slipstream.flows.dask_pipeline import dask_pipeline

    from slipstream.cloud.errors import BudgetExceeded

    before = set(dask_worker_processes())
    # 0.0005 SU is under a second of one m3.small: spent long before 100 chunks are crunched.
    with pytest.raises(BudgetExceeded, match="run budget spent: .* of 0.0005 SU; the run was torn down") as err:
        dask_pipeline(rows=400_000, cols=1_000, chunk_rows=4_000, max_workers=2, batch_size=2,
                      cooldown_seconds=60, boot_seconds=0.0, image="slipstream-noop",
                      budget_su=0.0005, override_budget=True, budget_check_seconds=0.2)
    run_id = err.value.resource.removeprefix("run ")
    assert cloud_env.list_servers() == []
    history = cloud_env.server_history(run_id)
    assert history and all(h.deleted_at is not None for h in history)
    wait_until(lambda: not set(dask_worker_processes()) - before, timeout=10, what="no dask worker process left")


def test_a_quota_of_zero_fails_the_pipeline_with_the_clouds_words_instead_of_hanging(cloud_env):
    import time
    from dataclasses import replace

    from slipstream.cloud.local import LocalCloud
    from slipstream.dask_workers import NoWorkerVMs
    from slipstream.flows.dask_pipeline import dask_pipeline
    from slipstream.jetstream2 import Quotas

    # The same cloud (its config.json) with no room for any instance: what the flow's load_cloud opens.
    LocalCloud(options=replace(cloud_env.options, quotas=Quotas(instances=0, cores=150, ram_mb=600_000, floating_ips=10)))
    started = time.monotonic()
    with pytest.raises(NoWorkerVMs, match="no Dask worker VM could be created .*uota"):
        dask_pipeline(rows=4_000, cols=100, chunk_rows=1_000, max_workers=2, image="slipstream-noop",
                      boot_seconds=0.0, give_up_seconds=2.0, progress_seconds=0.5)
    assert time.monotonic() - started < 120  # before: waited for ever
    assert cloud_env.list_servers() == []
