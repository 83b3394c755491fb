"""The fault matrix: whatever the cloud does, nothing owned remains and the SUs metered are right.

Each case makes the LocalCloud fail the way a busy Jetstream2 does — 503 bursts on create and on
delete, a quota hit between two batches or by Nova's recheck inside one, no host for a GPU flavour, a boot slower than its
deadline, a delete that keeps failing, a create whose response is lost, a run started again —
and then checks the two promises a researcher cares about:

1. nothing tagged with the run id is left on the cloud (servers, addresses, volumes, keys), and
   the VMs' processes are gone (the ``local_cloud`` fixture fails the test otherwise);
2. the SUs metered from the servers' state logs (``accounting.meter_servers``) are exactly what
   Jetstream2 would charge: the flavour rate for the time each server was ACTIVE, and nothing for
   BUILD, ERROR or after DELETED — so a VM that never booted costs 0 and a failed batch costs
   nothing beyond its seconds.

The flow cases run ``vm_job`` under Prefect's test harness; the others use the Lease directly.
(Cancellation and crash of a deployment run are in ``test_cancellation.py``.)
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from prefect import flow

from slipstream.cost.accounting import meter_servers
from slipstream.cloud.errors import CapacityError, QuotaExceeded, TransientError, WaitTimeout
from slipstream.cloud.local import FaultOptions, LocalCloud
from slipstream.cloud.models import ServerSpec, ServerStatus
from slipstream.cloud.waiting import wait_for_servers
from slipstream.jetstream2 import FLAVORS, Quotas, su_per_hour
from slipstream.ownership.ledger import Ledger
from slipstream.ownership.lease import Lease, teardown_run
from slipstream.retry import RetryPolicy
from support import owner

S = ServerStatus
NOOP = "slipstream-noop"
FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)


pytestmark = pytest.mark.usefixtures("prefect_harness")


def configure(cloud: LocalCloud, **faults) -> None:
    LocalCloud(options=replace(cloud.options, faults=FaultOptions(**faults)))


def expected_su(history) -> float:
    """What Jetstream2 charges for one server's life: its rate while ACTIVE, nothing otherwise."""
    rate = su_per_hour(FLAVORS[history.flavor])
    hours = sum((nxt[1] - since).total_seconds() / 3600
                for (status, since), nxt in zip(history.log, history.log[1:]) if status == S.ACTIVE)
    return rate * hours


def assert_nothing_left_and_su_right(cloud: LocalCloud, run_id: str) -> float:
    """Both promises for ``run_id``; returns the SUs metered."""
    assert cloud.list_servers(run_id) == [] and cloud.list_floating_ips(run_id) == []
    assert cloud.list_volumes(run_id) == [] and cloud.list_keypairs(run_id) == []
    histories = cloud.server_history(run_id)
    assert all(h.log[-1][0] == S.DELETED and h.deleted_at for h in histories), histories
    metered = meter_servers(cloud, [(h.id, h.name, h.flavor) for h in histories])
    for h, m in zip(histories, metered):
        assert m.su == pytest.approx(expected_su(h), rel=1e-9, abs=1e-12), (h.name, h.log)
    return sum(m.su for m in metered)


def run_id_of(state) -> str:
    return str(state.state_details.flow_run_id)


# --- through the vm_job flow -------------------------------------------------------------------

def test_a_503_burst_on_create_is_retried_and_boots_exactly_one_vm(cloud_env):
    from slipstream.flows.vm_job import vm_job

    cloud_env.fail_next("create_servers", 2)
    result = vm_job(flavor="m3.tiny", command="echo survived")
    assert result.exit_status == 0 and "survived" in result.stdout_tail
    (history,) = cloud_env.server_history(result.run_id)  # two failed calls created nothing
    spent = assert_nothing_left_and_su_right(cloud_env, result.run_id)
    assert result.su_spent == pytest.approx(spent) and 0 < spent < result.su_estimated
    assert [s for s, _ in history.log] == [S.BUILD, S.ACTIVE, S.DELETED]


def test_a_503_burst_on_every_delete_is_retried_and_the_teardown_is_clean(cloud_env):
    from slipstream.flows.vm_job import vm_job

    for op, n in (("delete_floating_ip", 2), ("delete_server", 3), ("delete_keypair", 2)):
        cloud_env.fail_next(op, n)
    result = vm_job(flavor="m3.tiny", command="true")
    assert result.teardown_clean and not any(result.teardown_remaining.values())
    assert {r.kind.value for r in result.resources} == {"server", "floating_ip", "keypair"}
    spent = assert_nothing_left_and_su_right(cloud_env, result.run_id)
    assert result.su_spent == pytest.approx(spent)


def test_no_host_for_a_gpu_flavour_fails_with_what_to_do_and_costs_nothing(cloud_env):
    from slipstream.flows.vm_job import gpu_job

    configure(cloud_env, no_capacity=("g3",))
    state = gpu_job(flavor="g3.large", command="nvidia-smi", return_state=True)
    assert state.is_failed()
    with pytest.raises(CapacityError) as err:
        state.result()
    assert "No valid host" in str(err.value) and "Try another flavour or region" in str(err.value)
    assert "g3.large" in str(err.value)
    (history,) = cloud_env.server_history()
    assert [s for s, _ in history.log] == [S.BUILD, S.ERROR, S.DELETED]
    assert assert_nothing_left_and_su_right(cloud_env, history.run_id) == 0.0


def test_a_boot_slower_than_its_deadline_times_out_and_the_vm_is_deleted_unbilled(cloud_env):
    from slipstream.flows.vm_job import vm_job

    configure(cloud_env, extra_boot_delay=60)
    state = vm_job(flavor="m3.small", command="true", boot_timeout_seconds=1.5, return_state=True)
    assert state.is_failed()
    with pytest.raises(WaitTimeout, match="Raise the boot timeout"):
        state.result()
    (history,) = cloud_env.server_history(run_id_of(state))
    assert [s for s, _ in history.log] == [S.BUILD, S.DELETED]  # never ACTIVE: never charged
    assert assert_nothing_left_and_su_right(cloud_env, run_id_of(state)) == 0.0


def test_hostile_symlinks_in_outputs_never_write_outside_the_results_nor_keep_setuid(cloud_env, tmp_path):
    """What a job (or anyone on the VM) leaves in its outputs cannot reach the host: symlinks out
    of the job directory, a chain of them, a link through which a requested path leads out, a
    04777 file, and a symlink the host already had in a reused results directory."""
    import os
    import stat

    from slipstream.flows.vm_job import vm_job

    beside, results = tmp_path / "beside-results", tmp_path / "results"
    beside.mkdir()
    (beside / "secret.txt").write_text("the VM must not get this back\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched\n")
    (results / "out").mkdir(parents=True)
    (results / "out" / "real.txt").symlink_to(victim)  # a rerun into a directory with a planted link
    plant = (f"mkdir -p out && echo ok > out/real.txt && ln -s real.txt out/alias.txt && ln -s /etc out/etc"
             f" && ln -s {beside} out/escape && ln -s c2 out/c1 && ln -s ../../../../../../../..{beside} out/c2"
             f" && ln -s ../out/c1 out/c0 && echo x > out/suid && chmod 4777 out/suid && ln -s {beside} door")
    result = vm_job(flavor="m3.tiny", command=plant, results_dir=str(results),
                    outputs=["out", "out/escape/new.txt", "door/secret.txt"])

    assert (results / "out" / "real.txt").read_text() == "ok\n" and not (results / "out" / "real.txt").is_symlink()
    assert victim.read_text() == "untouched\n"
    assert (results / "out" / "alias.txt").read_text() == "ok\n"  # a link inside the job directory: its file
    assert sorted(p.name for p in beside.iterdir()) == ["secret.txt"]  # nothing planted beside the results
    assert not [p for p in results.rglob("*") if p.is_symlink()]
    assert not (results / "door").exists()
    mode = stat.S_IMODE(os.stat(results / "out" / "suid").st_mode)
    assert mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWOTH) == 0, oct(mode)
    assert {"out/etc", "out/escape", "out/c0", "out/c1", "out/c2", "door/secret.txt"} <= set(result.refused_outputs)
    assert "outside the job directory" in result.refused_outputs["out/escape"]
    assert result.missing_outputs == ["out/escape/new.txt"] or "out/escape/new.txt" in result.refused_outputs
    assert not list(results.glob(".slipstream-download-*"))  # the staging directory is gone
    assert_nothing_left_and_su_right(cloud_env, result.run_id)


def test_hostile_local_paths_are_refused_before_anything_is_created(cloud_env, tmp_path, monkeypatch):
    """With the allowed roots configured (a deployment run gets its working directory), inputs,
    scripts and results directories elsewhere on the worker are refused, naming the roots."""
    from slipstream.cloud.errors import InvalidRequest
    from slipstream.flows.vm_job import vm_job

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "key").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("SLIPSTREAM_ALLOWED_ROOTS", str(work))
    for bad in ({"inputs": ["/etc/passwd"]}, {"inputs": ["~/.ssh"]}, {"script": "/etc/hostname", "command": None},
                {"script": "/no/such/file.py", "command": None},  # refused as outside, not as missing
                {"results_dir": "/root/.ssh"}, {"results_dir": str(work / ".." / "x")}, {"inputs": [str(work / "data")]}):
        with pytest.raises(InvalidRequest, match=f"outside the directories this run may use.*Allowed: {work}"):
            vm_job(**{"flavor": "m3.tiny", "command": "true", **bad})
    assert cloud_env.server_history() == [] and not (tmp_path / "x").exists()


# --- through the Lease -------------------------------------------------------------------------

def test_a_quota_hit_by_the_second_batch_cleans_the_first_and_charges_only_its_seconds(local_cloud, tmp_path):
    LocalCloud(options=replace(local_cloud.options, quotas=Quotas(instances=4, cores=150,
                                                                    ram_mb=585 * 1024, floating_ips=10)))
    who, ledger = owner("quota"), Ledger(tmp_path / "ledger.db")
    with pytest.raises(QuotaExceeded) as err:
        with Lease(local_cloud, who, ledger=ledger) as lease:
            first = lease.create_servers(ServerSpec("first", "m3.small", NOOP, count=3))
            wait_for_servers(local_cloud, who.run_id, [s.id for s in first], timeout=30, poll_interval=0.05)
            lease.create_servers(ServerSpec("second", "m3.small", NOOP, count=3))
    assert "instances" in str(err.value) and "Delete servers you no longer need" in str(err.value)
    assert lease.proof.clean
    assert sorted(h.name for h in local_cloud.server_history(who.run_id)) == ["first-1", "first-2", "first-3"]
    assert {e.state for e in ledger.entries(who.run_id) if e.name.startswith("second")} == {"failed"}
    spent = assert_nothing_left_and_su_right(local_cloud, who.run_id)
    assert 0 < spent < 3 * su_per_hour(FLAVORS["m3.small"]) * 60 / 3600  # seconds, not hours


def test_a_batch_failing_novas_quota_recheck_is_a_quota_error_and_all_of_it_is_deleted(local_cloud, tmp_path):
    """Nova checks quota when the call is made and again once the batch is accepted; another
    request can take the cores in between. The call then succeeds but every server of the batch
    goes to ERROR with a quota fault: the run must say it is a quota problem, not a broken VM,
    and the half-made batch must go."""
    configure(local_cloud, quota_recheck=("m3.quad",))
    who, ledger = owner("recheck"), Ledger(tmp_path / "ledger.db")
    with pytest.raises(QuotaExceeded) as err:
        with Lease(local_cloud, who, ledger=ledger) as lease:
            batch = lease.create_servers(ServerSpec("wide", "m3.quad", NOOP, count=3))  # accepted
            wait_for_servers(local_cloud, who.run_id, [s.id for s in batch], timeout=30, poll_interval=0.05)
    assert "Quota exceeded for cores: Requested 12" in str(err.value)
    assert "Another request took the quota" in str(err.value) and "slipstream reap" in str(err.value)
    assert lease.proof.clean and sorted(r.name for r in lease.proof.deleted) == ["wide-1", "wide-2", "wide-3"]
    histories = local_cloud.server_history(who.run_id)
    assert [[s for s, _ in h.log] for h in histories] == [[S.BUILD, S.ERROR, S.DELETED]] * 3
    assert assert_nothing_left_and_su_right(local_cloud, who.run_id) == 0.0  # ERROR is never charged


def test_a_delete_failing_past_the_deadline_is_reported_then_finished_by_run_id(local_cloud, tmp_path):
    """Nova's API down for longer than the lease's delete_timeout (a 503 burst shorter than it is
    ridden out: test_a_503_burst_during_teardown_is_ridden_out_and_the_proof_is_clean)."""
    who, ledger = owner("stubborn"), Ledger(tmp_path / "ledger.db")
    lease = Lease(local_cloud, who, ledger=ledger, retry_policy=FAST_RETRY, delete_timeout=1)
    started = time.monotonic()
    with lease:
        (server,) = lease.create_servers(ServerSpec("stubborn", "m3.quad", NOOP))
        wait_for_servers(local_cloud, who.run_id, [server.id], timeout=30, poll_interval=0.05)
        LocalCloud(options=replace(local_cloud.options, faults=FaultOptions(error_rates={"delete_server": 1.0})))
    LocalCloud(options=replace(local_cloud.options, faults=FaultOptions()))  # the API is back
    proof = lease.proof
    assert time.monotonic() - started < 60  # no wait for a server whose delete was never accepted
    assert not proof.clean and proof.remaining["server"] == ["stubborn"]
    assert "teardown INCOMPLETE" in proof.summary() and "stubborn" in proof.summary()
    assert any("503" in e for e in proof.errors) and any("slipstream reap --yes" in e for e in proof.errors)
    assert local_cloud.get_server(server.id).status == S.ACTIVE  # still charging, and the proof says so

    again = teardown_run(local_cloud, who.run_id, ledger=ledger, retry_policy=FAST_RETRY)  # as the reaper does
    assert again.clean and [r.name for r in again.deleted] == ["stubborn"]
    (history,) = local_cloud.server_history(who.run_id)
    spent = assert_nothing_left_and_su_right(local_cloud, who.run_id)
    # Charged until the delete that finally worked, not until the first attempt.
    assert history.deleted_at > proof.checked_at and spent > 0


def test_the_same_run_started_again_adopts_its_vms_instead_of_booting_duplicates(local_cloud, tmp_path):
    who, ledger = owner("rerun"), Ledger(tmp_path / "ledger.db")
    spec = ServerSpec("worker", "m3.small", NOOP, count=2)
    # First attempt: the process dies after creating (no teardown ran).
    crashed = Lease(local_cloud, who, ledger=ledger).create_servers(spec)
    with Lease(local_cloud, who, ledger=ledger) as lease:  # the same run id, started again
        again = lease.create_servers(spec)
        assert [s.id for s in again] == [s.id for s in crashed]
        wait_for_servers(local_cloud, who.run_id, [s.id for s in again], timeout=30, poll_interval=0.05)
    assert lease.proof.clean and len(local_cloud.server_history(who.run_id)) == 2
    assert_nothing_left_and_su_right(local_cloud, who.run_id)


class LostResponseCloud:
    """A cloud whose first create_servers is carried out but answered with a gateway timeout."""

    def __init__(self, cloud: LocalCloud) -> None:
        self._cloud, self.lost = cloud, 1

    def __getattr__(self, name):
        return getattr(self._cloud, name)

    def create_servers(self, spec, owner):
        made = self._cloud.create_servers(spec, owner)
        if self.lost:
            self.lost -= 1
            raise TransientError("504 Gateway Timeout while creating servers", cloud=self._cloud.name)
        return made


def test_a_retried_task_whose_first_create_went_through_does_not_duplicate(local_cloud, tmp_path):
    from slipstream.tasks.provision import provision_servers, wait_until_active

    who, ledger = owner("lost-response"), Ledger(tmp_path / "ledger.db")
    cloud = LostResponseCloud(local_cloud)

    @flow
    def provision_twice_asked() -> list[str]:
        with Lease(cloud, who, ledger=ledger) as lease:
            servers = provision_servers(lease, ServerSpec("w", "m3.small", NOOP, count=3))
            return [s.id for s in wait_until_active(lease, servers, timeout=30)]

    ids = provision_twice_asked()
    assert cloud.lost == 0  # the Prefect task did retry after the 504
    assert sorted(h.id for h in local_cloud.server_history(who.run_id)) == sorted(ids) and len(ids) == 3
    assert_nothing_left_and_su_right(local_cloud, who.run_id)
