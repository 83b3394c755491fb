"""slurm.conf and user_data rendered for an elastic cluster."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from slipstream.slurm.config import ClusterSettings, render_slurm_conf, write_cluster_files
from slipstream.slurm.nodesetup import (
    _real_head,
    _real_worker,
    head_user_data,
    node_name_script,
    worker_user_data,
)


def _settings(tmp_path, **kw) -> ClusterSettings:
    return ClusterSettings(name="demo", cloud="local", run_id="r1", pipeline="unit", creator="me",
                           expires_at="2030-01-01T00:00:00+00:00", directory=str(tmp_path / "c"),
                           head_address="127.64.3.1", max_nodes=3, suspend_time=9, **kw)


def _conf(text: str) -> dict[str, str]:
    return {line.split("=", 1)[0]: line.split("=", 1)[1] for line in text.splitlines()
            if "=" in line and not line.startswith(("#", "NodeName", "PartitionName"))}


def test_cloud_nodes_call_slipstream_and_bind_their_own_loopback_address(tmp_path):
    s = _settings(tmp_path)
    text = render_slurm_conf(s)
    conf = _conf(text)
    assert conf["SlurmctldHost"] == "127.64.3.1"
    assert conf["ResumeProgram"] == str(s.dir / "bin" / "resume")
    assert conf["SuspendProgram"] == str(s.dir / "bin" / "suspend")
    assert conf["ResumeFailProgram"] == str(s.dir / "bin" / "resume-fail")
    assert conf["SuspendTime"] == "9" and conf["PrivateData"] == "cloud"
    assert conf["CommunicationParameters"] == "NoCtldInAddrAny,NoInAddrAny"
    # a job requeued by a failed resume waits Slurm's 120 s (its credential lifetime) to start again
    assert conf["AuthInfo"] == f"socket={s.dir / 'munge' / 'munge.socket'},cred_expire=120"
    assert ("NodeName=demo-[1-3] CPUs=1 RealMemory=3072 State=CLOUD Port=[6818-6820] "
            "NodeAddr=127.0.0.1,127.0.0.1,127.0.0.1") in text
    assert "PartitionName=cloud Nodes=demo-[1-3] Default=YES" in text
    assert "/etc/slurm" not in text


def test_on_a_real_cloud_the_head_is_named_and_daemons_use_the_defaults(tmp_path):
    text = render_slurm_conf(_settings(tmp_path, loopback=False))
    assert "SlurmctldHost=demo-head(127.64.3.1)" in text
    assert "NoInAddrAny" not in text and "socket=" not in text and "NodeAddr=" not in text
    assert "AuthInfo=cred_expire=120\n" in text


def test_the_power_programs_set_the_environment_and_pass_only_the_hostlist(tmp_path):
    s = _settings(tmp_path, env={"SLIPSTREAM_HOME": "/x y/home"})
    write_cluster_files(s)
    program = (s.dir / "bin" / "resume").read_text()
    assert "export SLIPSTREAM_HOME='/x y/home'" in program
    assert f"export SLURM_CONF={s.conf_path}" in program
    assert program.rstrip().endswith('-m slipstream.cli slurm resume "$1"')
    assert (s.dir / "bin" / "suspend").stat().st_mode & 0o111
    assert ClusterSettings.load(s.settings_path) == s


def test_user_data_scripts_are_valid_shell_and_start_the_daemons_in_the_foreground(tmp_path):
    s = _settings(tmp_path)
    head, worker = head_user_data(s), worker_user_data(s)
    assert "munged -F" in head and "slurmctld -D" in head
    assert "slurmd -D -b -N" in worker and 'hostname "$1"' in worker
    for script in (head, worker):
        subprocess.run(["sh", "-n"], input=script, text=True, check=True)
    real = _settings(tmp_path, loopback=False)
    for script in (_real_head(real), _real_worker(real)):
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert "apptainer --version" in _real_worker(real)


@pytest.mark.parametrize(("nova_name", "node"), [("sw-3", "sw-3"), ("sw-2-1", None), ("other-3", None), ("sw-", None)])
def test_a_real_worker_takes_its_node_name_only_once_the_resume_has_renamed_it(tmp_path, nova_name, node):
    """Nova first names a batch of sw-2, sw-3 as sw-2-1, sw-2-2; the worker must not start slurmd
    as a node until the metadata service shows the name the resume program gave it."""
    meta = tmp_path / "meta_data.json"
    meta.write_text(json.dumps({"name": nova_name, "uuid": "x"}))
    script = node_name_script("sw") + 'wait_for_node_name && echo "NODE=$NODE"'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, check=False, env={
        **os.environ, "SLIPSTREAM_METADATA_URL": meta.as_uri(), "SLIPSTREAM_NAME_TRIES": "3",
        "SLIPSTREAM_NAME_WAIT": "0.1"})
    if node:
        assert done.returncode == 0 and done.stdout.strip() == f"NODE={node}"
    else:
        assert done.returncode == 1 and f"no node name of this cluster from the metadata service (last: {nova_name})" \
            in done.stderr


def test_a_gpu_flavour_makes_its_gpus_schedulable_and_cpu_flavours_have_none(tmp_path):
    from slipstream.slurm.config import render_gres_conf

    gpu = _settings(tmp_path, flavor="g3.small")
    text = render_slurm_conf(gpu)
    assert "GresTypes=gpu" in text and " Gres=gpu:1 " in text
    assert render_gres_conf(gpu).splitlines()[-1] == f"NodeName=demo-[1-3] Name=gpu File={gpu.dir}/gpu/nvidia0"
    assert "File=/dev/nvidia0" in render_gres_conf(_settings(tmp_path, flavor="g3.xl", loopback=False))
    cpu = _settings(tmp_path)
    assert "Gres" not in render_slurm_conf(cpu) and render_gres_conf(cpu) == ""


def test_min_job_age_is_rendered_and_slurms_minimum_enforced(tmp_path):
    assert _conf(render_slurm_conf(_settings(tmp_path)))["MinJobAge"] == "300"
    assert _conf(render_slurm_conf(_settings(tmp_path, min_job_age=2)))["MinJobAge"] == "2"
    with pytest.raises(Exception, match="min_job_age must be at least 2"):
        _settings(tmp_path, min_job_age=1)
