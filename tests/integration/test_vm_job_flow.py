"""vm_job end to end under Prefect's test harness, on the embedded local cloud."""

from __future__ import annotations

import json

import pytest

from slipstream.cloud.errors import InvalidRequest


pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_vm_job_runs_a_script_brings_results_back_and_leaves_nothing(cloud_env, tmp_path):
    from slipstream.flows.vm_job import gpu_job

    data = tmp_path / "numbers.txt"
    data.write_text("1 2 3 4\n")
    script = tmp_path / "work.py"
    script.write_text(
        "import json, numpy as np\n"
        "x = np.loadtxt('numbers.txt')\n"
        "json.dump({'sum': float(x.sum())}, open('out.json', 'w'))\n"
        "print('summed', x.size, 'numbers')\n"
    )
    result = gpu_job(script=str(script), inputs=[str(data)], outputs=["out.json"],
                     results_dir=str(tmp_path / "results"))
    assert result.exit_status == 0
    assert "summed 4 numbers" in result.stdout_tail
    assert json.loads((tmp_path / "results" / "out.json").read_text()) == {"sum": 10.0}
    assert result.teardown_clean and not any(result.teardown_remaining.values())
    assert {r.kind.value for r in result.resources} == {"server", "keypair", "floating_ip"}
    assert [m.flavor for m in result.metered] == ["g3.medium"]
    assert 0 < result.su_spent < result.su_estimated
    assert cloud_env.list_servers() == [] and cloud_env.list_keypairs() == []


def test_a_failing_command_fails_the_flow_and_still_tears_down(cloud_env):
    from slipstream.flows.vm_job import vm_job

    with pytest.raises(Exception, match="exit status 3|exited with 3|status 3"):
        vm_job(flavor="m3.tiny", command="echo working; exit 3")
    assert cloud_env.list_servers() == []
    assert cloud_env.list_floating_ips() == [] and cloud_env.list_keypairs() == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # The typed parameter refuses it in Prefect itself, with the CLI's "did you mean".
        ({"flavor": "g3.huge", "command": "true"}, "unknown flavour 'g3.huge'.*g3.medium.*Did you mean g3.large"),
        ({"image": "Featured-Windows", "command": "true"}, "unknown image 'Featured-Windows'.*Featured-Ubuntu24"),
        ({"script": "/no/such/script.py"}, "script '/no/such/script.py' does not exist"),
        ({"command": "true", "name": "x; rm -rf ~"}, "not allowed"),
        ({"command": "true", "outputs": ["../../etc/passwd"]}, "not inside the job directory"),
        ({"command": "true", "outputs": ["."]}, "not inside the job directory"),
        ({"command": "true", "outputs": ["stdout.txt"]}, "would collide with the job's own stdout.txt"),
        ({"command": "true", "secret_env": {"BAD NAME": "x"}}, "is not ENV_NAME -> saved secret name"),
    ],
)
def test_bad_input_fails_before_anything_is_created(cloud_env, kwargs, message):
    from slipstream.flows.vm_job import vm_job

    calls_before = cloud_env.server_history()
    with pytest.raises((InvalidRequest, Exception), match=message):
        vm_job(**{"flavor": "m3.tiny", **kwargs})
    assert cloud_env.server_history() == calls_before


def test_a_gpu_job_flavour_typo_from_python_says_did_you_mean(cloud_env):
    from slipstream.flows.vm_job import gpu_job

    with pytest.raises(Exception, match=r"unknown flavour 'g3.medum'.*Did you mean g3.medium\?") as err:
        gpu_job(command="true", flavor="g3.medum")
    assert "literal_error" not in str(err.value)
    assert cloud_env.server_history() == []


def test_a_negative_count_is_refused_with_the_rule(cloud_env):
    from slipstream.vmjob import plan_vm_job

    with pytest.raises(InvalidRequest, match="positive whole number"):
        plan_vm_job(cloud_env, name="job", flavor="m3.tiny", image="Featured-Ubuntu24", command="true", count=-1)


def test_an_unknown_flavour_from_plain_python_names_the_valid_choices(cloud_env):
    from slipstream.vmjob import plan_vm_job

    with pytest.raises(InvalidRequest, match="unknown flavour 'g3.huge'.*Valid flavours: .*g3.medium"):
        plan_vm_job(cloud_env, name="job", flavor="g3.huge", image="Featured-Ubuntu24", command="true")
