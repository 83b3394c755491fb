"""The worst case a vm_job plans is a true upper bound of what it is charged, and a teardown that
runs out of time says what it left behind.

vm_job under Prefect's test harness on the embedded local cloud, with short deadlines so that the
phases run into them: a job that outlives ``max_hours``, a cloud whose deletes are slow, a cloud
that refuses every server delete. (SSH calls at their deadlines — a slow handshake, a secret file
that never gets written — are in ``tests/unit/test_ssh_deadlines.py``.)
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from slipstream.cloud.local import FaultOptions, LocalCloud
from slipstream.cost.accounting import meter_servers
from slipstream.ownership.lease import teardown_run
from slipstream.ownership.ledger import Ledger
from slipstream.vmjob import JobFailed

pytestmark = pytest.mark.usefixtures("prefect_harness")

BOOT, TRANSFER, TEARDOWN, WORK = 30.0, 3.0, 4.0, 3.0


def _faults(cloud: LocalCloud, **faults) -> None:
    LocalCloud(options=replace(cloud.options, faults=FaultOptions(**faults)))


def test_a_job_that_runs_into_every_deadline_is_charged_at_most_its_worst_case(cloud_env):
    from slipstream.flows.vm_job import vm_job

    _faults(cloud_env, slow_calls={"delete_server": 2.0, "delete_floating_ip": 1.0})  # a slow teardown
    try:
        state = vm_job(flavor="m3.tiny", command="sleep 600", max_hours=WORK / 3600, boot_timeout_seconds=BOOT,
                       transfer_timeout_seconds=TRANSFER, teardown_timeout_seconds=TEARDOWN, return_state=True)
    finally:
        _faults(cloud_env)
    with pytest.raises(JobFailed, match="did not finish within max_hours"):
        state.result()
    (history,) = cloud_env.server_history()
    # The server's whole life fits in the deadlines the plan priced, and so does its bill.
    allowed = BOOT + 2 * TRANSFER + WORK + TEARDOWN
    assert (history.deleted_at - history.created_at).total_seconds() <= allowed
    spent = sum(m.su for m in meter_servers(cloud_env, [(history.id, history.name, history.flavor)]))
    worst = Ledger().worst_case(history.run_id)
    assert worst == pytest.approx(allowed / 3600 * 1.0)  # m3.tiny: 1 SU/h
    assert 0 < spent <= worst


def test_a_teardown_that_runs_out_of_time_names_what_is_left_and_who_deletes_it(cloud_env):
    from slipstream.flows.vm_job import vm_job

    _faults(cloud_env, error_rates={"delete_server": 1.0})  # every server delete: 503
    try:
        state = vm_job(flavor="m3.tiny", command="true", teardown_timeout_seconds=2, return_state=True)
    finally:
        _faults(cloud_env)
    with pytest.raises(RuntimeError) as err:
        state.result()
    message = str(err.value)
    (server,) = cloud_env.list_servers()
    assert "teardown INCOMPLETE" in message and f"server: {server.name}" in message
    assert "may still be charging" in message and "slipstream reap --yes" in message
    # What is left is the run's own, tagged: the reaper (here: its teardown) finds and deletes it.
    assert teardown_run(cloud_env, server.ownership.run_id).clean
    assert cloud_env.list_servers() == [] and cloud_env.list_floating_ips() == []


def test_no_server_is_created_once_the_boot_deadline_has_passed(cloud_env):
    from slipstream.flows.vm_job import vm_job

    _faults(cloud_env, fail_next={"create_keypair": 2})  # 503s: the keypair's two retries take 5 s
    try:
        state = vm_job(flavor="m3.tiny", command="true", boot_timeout_seconds=2, return_state=True)
    finally:
        _faults(cloud_env)
    with pytest.raises(Exception, match="boot_timeout_seconds") as err:
        state.result()
    # Before: the server was created after its boot deadline, only to be deleted at once.
    assert cloud_env.server_history() == [], err.value
    assert "no time left" in str(err.value)
