"""How long after a flow ends does nothing owned remain? Normal end, failed end, SIGKILL + reaper.

For 1 and 20 no-op VMs on a throwaway local cloud, a real Prefect flow (in a process of its own,
against a temporary Prefect API) creates a key, the VMs and a floating IP through a Lease, waits
for them to be ACTIVE, and then:

- **normal**: its work returns; the Lease tears down on leaving the ``with`` block;
- **failed**: its work raises; the same teardown runs on the way out;
- **killed**: it is SIGKILLed (no teardown at all); one reaper pass (grace 0) then cleans up.
  In production add the wait for the next scheduled pass (up to 15 min) plus the grace period.

The clock starts when the work ends (for "killed", at the kill) and stops when a listing by run id
finds no server, address, volume or key. Median of ``REPS`` repetitions, with the ratio against
the normal end measured in the same run. Run: .venv/bin/python benchmarks/teardown.py [REPS]
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1, 20)
ENDINGS = ("normal", "failed", "killed")
POLL = 0.02


def child(n: int, ending: str) -> None:
    """The flow process: provision ``n`` VMs, then end as ``ending`` says."""
    from prefect import flow
    from prefect.runtime import flow_run

    from slipstream import ssh
    from slipstream.cloud.local import LocalCloud
    from slipstream.cloud.models import Ownership, ServerSpec
    from slipstream.cloud.waiting import wait_for_servers
    from slipstream.ownership.lease import Lease

    @flow(name="teardown-benchmark")
    def bench(n: int, ending: str) -> None:
        cloud = LocalCloud()
        owner = Ownership.new("bench", run_id=str(flow_run.get_id()), lease=timedelta(hours=1))
        with Lease(cloud, owner) as lease:
            lease.create_keypair(ssh.generate_keypair(comment="bench").public_key)
            servers = lease.create_servers(ServerSpec("bench", "m3.tiny", "slipstream-noop", count=n))
            wait_for_servers(cloud, owner.run_id, [s.id for s in servers], timeout=300, poll_interval=0.1)
            lease.create_floating_ip()
            print(f"READY {owner.run_id} {time.time()}", flush=True)
            if ending == "killed":
                time.sleep(600)  # the parent kills us here
            if ending == "failed":
                raise RuntimeError("the work failed")

    try:
        bench(n, ending)
    except RuntimeError:
        pass  # a failed run: its teardown already ran


def owned(cloud, run_id: str) -> int:
    return sum(len(x) for x in (cloud.list_servers(run_id), cloud.list_floating_ips(run_id),
                                cloud.list_volumes(run_id), cloud.list_keypairs(run_id)))


def until_nothing_owned(cloud, run_id: str, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while owned(cloud, run_id):
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still owns resources after {timeout} s")
        time.sleep(POLL)
    return time.time()


def one(cloud, n: int, ending: str, client) -> float:
    """Seconds from the work's end (or the kill) to nothing owned, for one run."""
    from slipstream.ownership.ledger import Ledger
    from slipstream.ownership.reaper import RunResolver, reap
    from slipstream.tasks.reap import prefect_lookup

    log = open(Path(os.environ["SLIPSTREAM_HOME"]) / f"flow-{n}-{ending}.log", "ab")  # the flow's own logs
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(n), ending], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=log,
                            text=True, start_new_session=True)
    try:
        line = proc.stdout.readline().split()
        if not line or line[0] != "READY":
            raise RuntimeError(f"the benchmark flow did not start ({n} VMs, {ending}); see {log.name}")
        run_id, ready = line[1], float(line[2])
        if ending == "killed":
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            ended = time.time()
            report = reap(cloud, RunResolver(Ledger().run_processes(), prefect_lookup(client)),
                          grace=timedelta(0), act=True)
            assert report.proofs[run_id].clean, report.proofs
        else:
            ended = ready  # the work ends right after READY
        done = until_nothing_owned(cloud, run_id)
        proc.wait(timeout=120)
        return done - ended
    finally:
        log.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def main(reps: int = 3) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from slipstream.cloud.local import LocalCloud, LocalCloudOptions
    from slipstream.jetstream2 import Quotas

    logging.getLogger("slipstream").setLevel(logging.ERROR)  # the reaper's "reaping run ..." lines
    with tempfile.TemporaryDirectory(prefix="slipstream-teardown-bench-") as tmp:
        Path(tmp, "slipstream").mkdir()
        home = Path(tmp) / "localcloud"
        os.environ.update(SLIPSTREAM_HOME=f"{tmp}/slipstream", SLIPSTREAM_LOCAL_HOME=str(home),
                          PREFECT_HOME=f"{tmp}/prefect", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                          PREFECT_LOGGING_LEVEL="ERROR")
        big = Quotas(instances=max(SIZES), cores=max(SIZES), ram_mb=max(SIZES) * 4096, floating_ips=10)
        cloud = LocalCloud(home=home, options=LocalCloudOptions(home=home, boot_delay=0.5, quotas=big,
                                                                 stop_grace=1.0, network="127.64.203.0/24"))
        results: dict[tuple[int, str], list[float]] = {}
        try:
            with prefect_test_harness(server_startup_timeout=120):
                os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
                with get_client(sync_client=True) as client:
                    for _ in range(reps):
                        for n in SIZES:
                            for ending in ENDINGS:
                                results.setdefault((n, ending), []).append(one(cloud, n, ending, client))
        finally:
            cloud.reset()
    print(f"seconds from a flow's end to zero owned resources (median of {reps}; local cloud, m3.tiny no-op VMs)")
    print(f"{'VMs':>4}  {'ending':<22}{'median s':>10}{'min s':>8}{'max s':>8}{'vs normal':>11}")
    for n in SIZES:
        normal = statistics.median(results[(n, "normal")])
        for ending in ENDINGS:
            xs = results[(n, ending)]
            label = "killed + reaper pass" if ending == "killed" else ending
            print(f"{n:>4}  {label:<22}{statistics.median(xs):>10.2f}{min(xs):>8.2f}{max(xs):>8.2f}"
                  f"{statistics.median(xs) / normal:>10.2f}x")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3])
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
