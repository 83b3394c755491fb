"""LocalCloud fault injection and configuration: reproducible 503s, bursts, slow boots, forced
ERROR and missing capacity, all seen by every process through config.json and the database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from slipstream.cloud.errors import CapacityError, InvalidRequest, ServerFailed, TransientError
from slipstream.cloud.local import FaultOptions, LocalCloud, LocalCloudOptions
from slipstream.cloud.models import ServerSpec, ServerStatus
from slipstream.cloud.waiting import wait_for_servers
from slipstream.retry import RetryPolicy, retry
from support import owner

S = ServerStatus
NOOP = "slipstream-noop"
ROOT = Path(__file__).resolve().parents[2]



def configure(cloud: LocalCloud, **faults) -> LocalCloud:
    LocalCloud(options=replace(cloud.options, faults=FaultOptions(**faults)))
    return cloud


def run_python(code: str, home: Path) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, text=True,
                          capture_output=True, timeout=120,
                          env={**os.environ, "SLIPSTREAM_LOCAL_HOME": str(home), "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return done.stdout


def outcomes(cloud: LocalCloud, n: int) -> str:
    out = ""
    for _ in range(n):
        try:
            cloud.list_servers()
            out += "."
        except TransientError:
            out += "E"
    return out


def test_error_rates_are_reproducible_across_runs_and_processes(tmp_path):
    faults = FaultOptions(error_rates={"list_servers": 0.5}, seed=7)
    first = LocalCloud(options=LocalCloudOptions(home=tmp_path / "a", faults=faults))
    pattern = outcomes(first, 12)
    assert "E" in pattern and "." in pattern

    # Same seed, another home: half the calls from another process, half from here.
    second = LocalCloud(options=LocalCloudOptions(home=tmp_path / "b", faults=faults))
    elsewhere = run_python("""
        from slipstream.cloud.errors import TransientError
        from slipstream.cloud.local import LocalCloud
        cloud, out = LocalCloud(), ""
        for _ in range(6):
            try:
                cloud.list_servers(); out += "."
            except TransientError:
                out += "E"
        print(out)
    """, second.home).strip()
    assert elsewhere + outcomes(second, 6) == pattern

    other_seed = LocalCloud(options=LocalCloudOptions(home=tmp_path / "c", faults=replace(faults, seed=8)))
    assert outcomes(other_seed, 12) != pattern
    assert outcomes(first, 0) == "" and first.list_flavors()  # other operations are unaffected


def test_a_burst_fails_the_next_calls_from_any_process_then_retry_gets_through(local_cloud):
    local_cloud.fail_next("create_servers", 2)
    who = owner()
    spec = ServerSpec("burst", "m3.tiny", NOOP)
    out = run_python(f"""
        from slipstream.cloud.errors import TransientError
        from slipstream.cloud.local import LocalCloud
        from slipstream.cloud.models import Ownership, ServerSpec
        try:
            LocalCloud().create_servers(ServerSpec("burst", "m3.tiny", "{NOOP}"), Ownership.new("x"))
        except TransientError as err:
            print("503" if "503" in str(err) else err)
    """, local_cloud.home)
    assert out.strip() == "503"
    with pytest.raises(TransientError):
        local_cloud.create_servers(spec, who)
    assert local_cloud.list_servers() == []  # a failed call created nothing

    local_cloud.fail_next("create_servers", 3)
    calls_before = local_cloud.api_calls
    servers = retry(lambda: local_cloud.create_servers(spec, who), RetryPolicy(attempts=5), sleep=lambda _: None)
    assert len(servers) == 1 and local_cloud.api_calls - calls_before == 4


def test_bursts_can_come_with_the_options(tmp_path):
    faults = FaultOptions(fail_next={"list_images": 1})
    cloud = LocalCloud(options=LocalCloudOptions(home=tmp_path / "lc", faults=faults))
    with pytest.raises(TransientError, match="list_images"):
        cloud.list_images()
    assert cloud.list_images()


def test_extra_boot_delay_slows_every_boot(local_cloud):
    configure(local_cloud, extra_boot_delay=0.3)
    who = owner()
    (server,) = local_cloud.create_servers(ServerSpec("slow", "m3.tiny", NOOP), who)
    wait_for_servers(local_cloud, who.run_id, [server.id], timeout=20, poll_interval=0.05)
    (_, built), (_, active) = local_cloud.state_log(server.id)
    assert (active - built).total_seconds() == pytest.approx(0.2 + 0.3, abs=0.005)


def test_a_call_delay_makes_that_operation_slow_from_any_process(local_cloud):
    configure(local_cloud, slow_calls={"list_images": 0.4})
    assert json.loads((local_cloud.home / "config.json").read_text())["faults"]["slow_calls"] == {"list_images": 0.4}
    took = run_python("""
        import time
        from slipstream.cloud.local import LocalCloud
        cloud = LocalCloud()
        t = time.monotonic(); cloud.list_flavors(); fast = time.monotonic() - t
        t = time.monotonic(); cloud.list_images(); print(fast, time.monotonic() - t)
    """, local_cloud.home).split()
    assert float(took[0]) < 0.4 <= float(took[1])


def test_a_flavour_set_to_fail_goes_to_error_at_the_end_of_its_boot(local_cloud):
    configure(local_cloud, error_flavors=("g3.small",))
    who = owner()
    (server,) = local_cloud.create_servers(ServerSpec("doomed", "g3.small", NOOP), who)
    assert server.status == S.BUILD
    with pytest.raises(ServerFailed) as err:
        wait_for_servers(local_cloud, who.run_id, [server.id], timeout=20, poll_interval=0.05)
    assert not isinstance(err.value, CapacityError) and "fault injection" in str(err.value)
    assert [s for s, _ in local_cloud.state_log(server.id)] == [S.BUILD, S.ERROR]
    assert local_cloud.status().hosts[3]["gpus"] == "0/4"  # ERROR released its vGPU
    (fine,) = local_cloud.create_servers(ServerSpec("fine", "g3.medium", NOOP), who)
    wait_for_servers(local_cloud, who.run_id, [fine.id], timeout=20, poll_interval=0.05)


def test_no_capacity_for_a_family_is_nova_no_valid_host(local_cloud):
    configure(local_cloud, no_capacity=("g3",))
    who = owner()
    (server,) = local_cloud.create_servers(ServerSpec("gpu", "g3.large", NOOP), who)
    with pytest.raises(CapacityError, match="No valid host"):
        wait_for_servers(local_cloud, who.run_id, [server.id], timeout=20, poll_interval=0.05)


def test_options_are_written_to_config_json_and_read_by_other_processes(local_cloud):
    configure(local_cloud, error_rates={"*": 0.0, "delete_server": 0.25}, seed=3)
    data = json.loads((local_cloud.home / "config.json").read_text())
    assert data["faults"]["error_rates"]["delete_server"] == 0.25 and data["boot_delay"] == 0.2
    seen = run_python("""
        from slipstream.cloud.local import LocalCloud
        opts = LocalCloud().options
        print(opts.boot_delay, opts.faults.seed, opts.faults.rate_for("delete_server"), opts.network)
    """, local_cloud.home).split()
    assert seen == ["0.2", "3", "0.25", local_cloud.options.network]


@pytest.mark.parametrize("make, words", [
    (lambda: FaultOptions(error_rates={"reboot_server": 0.1}), "create_servers"),
    (lambda: FaultOptions(error_rates={"list_servers": 2}), "between 0 and 1"),
    (lambda: LocalCloudOptions(network="10.0.0.0/16"), "127.0.0.0/8"),
    (lambda: LocalCloudOptions(stop_grace=-1), ">= 0"),
    (lambda: FaultOptions(slow_calls={"create_servers": -1}), ">= 0 seconds"),
    (lambda: FaultOptions(slow_calls={"boot": 1}), "create_servers"),
])
def test_bad_options_are_refused_with_the_valid_choices(make, words):
    with pytest.raises(InvalidRequest) as err:
        make()
    assert words in str(err.value)
