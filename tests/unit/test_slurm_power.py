"""The Slurm power programs' logic without daemons: hostlist safety, the sweep table, the batch
spec, and the command line refusing bad input before anything runs."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.models import Server, ServerStatus
from slipstream.slurm.commands import Slurm, SlurmCommandError, _call, job_from_json, node_from_json
from slipstream.slurm.config import ClusterSettings, write_cluster_files
from slipstream.slurm.hostlist import check_hostlist, expand
from slipstream.slurm.power import SWEEP_TABLE, NodeBatch, NodeView, SlurmSide, SweepAction, VmSide, slurm_side

INJECTIONS = ["c-[1-2];rm -rf /", "$(reboot)", "c-1`id`", "c-1 c-2", "c-1|sh", "../etc", "c-[1-2]&&x",
              "c-1\nc-2", "C-1", "", "c-[1-2", "-c1", "c-1>/tmp/x", "c-'1'"]


@pytest.mark.parametrize("hostlist", INJECTIONS)
def test_hostlists_that_could_inject_are_refused_before_any_command_runs(hostlist):
    class NeverCalled(Slurm):
        def run(self, *argv, timeout=None):  # the one seam every Slurm command goes through
            raise AssertionError(f"a command ran for {hostlist!r}: {argv}")

    with pytest.raises(InvalidRequest, match="is not a Slurm hostlist"):
        expand(hostlist, NeverCalled("/nonexistent/slurm.conf"))


@pytest.mark.parametrize("hostlist", ["c-1", "c-[1-3]", "c-[1-3,7]", "node-[01-10],gpu-2", "a1"])
def test_plain_hostlists_are_accepted(hostlist):
    assert check_hostlist(hostlist) == hostlist


def test_scontrol_expands_hostlists_without_a_shell(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=127.0.0.1\n")
    assert expand("c-[1-3,7]", Slurm(conf)) == ["c-1", "c-2", "c-3", "c-7"]


def test_a_failing_slurm_command_says_what_ran_and_what_to_do(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=127.0.0.1\n")
    with pytest.raises(SlurmCommandError, match=r"`scontrol show frobnicate` failed with status 1: invalid entity.*"
                                                 r"Check that slurmctld"):
        _call(["scontrol", "show", "frobnicate"], conf=conf)
    with pytest.raises(SlurmCommandError, match="is not installed"):
        _call(["no-such-slurm-command"])


def test_job_and_node_fields_come_from_their_own_json_keys_never_from_free_text():
    """A job's comment or a node's Reason that looks like other fields changes nothing (issue 17.12);
    the entries are shaped as Debian's 22.05 ``squeue --json`` / ``sinfo --json`` print them."""
    job = job_from_json({"job_id": 7, "job_state": "RUNNING", "comment": "x JobState=COMPLETED ExitCode=0:0",
                         "name": "a JobState=COMPLETED", "nodes": "c-1", "state_reason": "None",
                         "restart_cnt": 0, "exit_code": 0})
    assert job.state == "RUNNING" and not job.finished and job.exit_code is None
    failed = job_from_json({"job_id": 8, "job_state": "FAILED", "exit_code": 4 << 8, "state_reason": "NonZeroExitCode"})
    assert (failed.exit_code, failed.signal) == (4, None)
    killed = job_from_json({"job_id": 9, "job_state": "FAILED", "exit_code": 9})
    assert killed.signal == 9
    node = node_from_json({"name": "c-1", "state": "idle", "state_flags": ["CLOUD", "POWERED_DOWN"],
                           "address": "127.64.0.7", "comment": "instance=abc",
                           "reason": "x NodeAddr=10.0.0.66 Comment=instance=evil"})
    assert node.address == "127.64.0.7" and node.instance_id == "abc" and node.flags == {"CLOUD", "POWERED_DOWN"}


def test_power_flags_map_to_the_sweep_view():
    assert slurm_side(frozenset({"CLOUD", "POWERED_DOWN"})) == SlurmSide.POWERED_DOWN
    assert slurm_side(frozenset({"CLOUD", "POWERING_UP"})) == SlurmSide.POWERING_UP
    assert slurm_side(frozenset({"CLOUD", "POWERING_DOWN"})) == SlurmSide.POWERING_DOWN
    assert slurm_side(frozenset({"CLOUD"})) == SlurmSide.UP


def test_the_sweep_table_has_a_row_for_every_situation_and_never_touches_a_booting_nodes_vm():
    for slurm, vm in itertools.product(SlurmSide, VmSide):
        if (slurm, vm) == (SlurmSide.NOT_A_NODE, VmSide.MISSING):
            continue  # nothing to see: a name with neither node nor VM
        SWEEP_TABLE.action_for(NodeView("n", slurm, vm))  # raises UnhandledState if a row is missing
    for vm in (VmSide.MISSING, VmSide.BOOTING, VmSide.ACTIVE):
        assert SWEEP_TABLE.action_for(NodeView("n", SlurmSide.POWERING_UP, vm)) == SweepAction.NOTHING
    assert SWEEP_TABLE.action_for(NodeView("n", SlurmSide.POWERED_DOWN, VmSide.ACTIVE)) == SweepAction.DELETE_VM
    assert SWEEP_TABLE.action_for(NodeView("n", SlurmSide.UP, VmSide.MISSING)) == SweepAction.POWER_DOWN


def test_a_node_batch_creates_exactly_the_named_servers_in_one_call(local_cloud):
    from tests.support import owner

    run = owner("slurm-unit")
    before = local_cloud.api_calls
    made = local_cloud.create_servers(NodeBatch("c-2", "m3.tiny", "slipstream-noop", count=2, names=("c-2", "c-5")), run)
    assert [s.name for s in made] == ["c-2", "c-5"] and local_cloud.api_calls == before + 1
    assert all(s.ownership.run_id == run.run_id for s in made)
    with pytest.raises(InvalidRequest):
        NodeBatch("c-1", "m3.tiny", "slipstream-noop", count=2, names=("c-1", "c;2"))


def _settings(tmp_path, **kw) -> ClusterSettings:
    return ClusterSettings(name="uc", cloud="local", run_id="t123", pipeline="unit", creator="me",
                           expires_at="2030-01-01T00:00:00+00:00", directory=str(tmp_path / "cluster"),
                           head_address="127.64.9.1", **kw)


def test_the_command_line_refuses_an_injected_hostlist_and_creates_nothing(tmp_path, local_cloud):
    settings = _settings(tmp_path)
    write_cluster_files(settings)
    env = {"PATH": "/usr/bin:/bin", "SLIPSTREAM_HOME": str(tmp_path / "home"),
           "SLIPSTREAM_LOCAL_HOME": str(local_cloud.home), "SLIPSTREAM_SLURM_CLUSTER": str(settings.settings_path),
           "SLURM_CONF": str(settings.conf_path)}
    done = subprocess.run([sys.executable, "-m", "slipstream.cli", "slurm", "resume", "uc-[1-2];rm -rf /"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 1
    assert "hostlist 'uc-[1-2];rm -rf /' is not a Slurm hostlist" in done.stdout
    assert local_cloud.list_servers() == []
    assert "is not a Slurm hostlist" in (settings.dir / "power.log").read_text()


def test_nodes_of_another_cluster_are_refused(tmp_path, local_cloud):
    from slipstream.slurm.power import SlurmPower

    settings = _settings(tmp_path, max_nodes=2)
    write_cluster_files(settings)
    power = SlurmPower(settings, local_cloud)
    with pytest.raises(InvalidRequest, match="uc-3 are not cloud nodes of cluster uc"):
        power.resume("uc-[2-3]")
    assert local_cloud.list_servers() == []


def test_cluster_settings_round_trip_and_reject_bad_values(tmp_path):
    settings = _settings(tmp_path, max_nodes=3, suspend_time=7)
    settings.save()
    assert ClusterSettings.load(settings.settings_path) == settings
    assert json.loads(settings.settings_path.read_text())["head_address"] == "127.64.9.1"
    with pytest.raises(InvalidRequest, match="unknown flavour"):
        _settings(tmp_path, flavor="m9.huge")
    with pytest.raises(InvalidRequest, match="cluster name"):
        ClusterSettings(**{**settings.__dict__, "name": "Bad_Name"})
    with pytest.raises(InvalidRequest, match="suspend_time must be at least 1"):
        _settings(tmp_path, suspend_time=0)


def test_vm_status_maps_to_the_sweep_view():
    from slipstream.slurm.power import vm_side

    def vm(status):
        return Server("i", "n", status, "m3.tiny", "img")

    assert vm_side(None) == VmSide.MISSING
    assert vm_side(vm(ServerStatus.BUILD)) == VmSide.BOOTING
    assert vm_side(vm(ServerStatus.ACTIVE)) == VmSide.ACTIVE
    assert vm_side(vm(ServerStatus.ERROR)) == VmSide.BROKEN
